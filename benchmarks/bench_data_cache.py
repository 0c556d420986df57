"""End-to-end training with the decoded data cache vs the streaming shard loader (issue
target: >= 1.3x images/s for the small encoder on CIFAR-10).

Both variants run the real ``python -m trainer.run`` (Ray Train, one worker, the feature
store), same model, objective, data and loader workers; only ``--data-cache memory`` (the
decoded uint8 pixels, batched augmentation) vs ``--data-cache off`` (webdataset shards,
PIL augmentation per image) differs; kNN evaluation is off. The decoded cache is filled once
before the first repeat (its one-time cost is in ``bench_loader.py``). Runs alternate
(cached, streaming, cached, …); a run's images/s is the median over its epochs after the
first (its only epoch when it has one), and its wall time is the whole process. Printed: the
median over repeats of each, their ratio, and the median of the per-repeat ratios.

    python benchmarks/bench_data_cache.py --data .data/shards/train --epochs 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_trainer import add_data_args, data_flags  # noqa: E402

VARIANTS = {"cached": "memory", "streaming": "off"}


def run_once(cache: str, args: argparse.Namespace, out: Path) -> tuple[float, float]:
    """One training run: ``(median images/s after the first epoch, wall seconds)``."""
    cmd = [sys.executable, "-m", "trainer.run", "--data-cache", cache, "--epochs",
           str(args.epochs), "--arch", args.arch, "--output", str(out), "--no-progress",
           "--eval-every", "0", "--checkpoint-every", "1000", "--loader-workers",
           str(args.loader_workers)]  # fmt: skip
    cmd += data_flags(args)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_sec"] for r in records if r.get("images_per_sec")]
    return statistics.median(speeds[1:] or speeds), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_args(parser)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loader-workers", type=int, default=2)
    args = parser.parse_args()
    speed: dict[str, list[float]] = {v: [] for v in VARIANTS}
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="npid-bench-cache-") as tmp:
        warm = argparse.Namespace(**{**vars(args), "epochs": 1})
        run_once("memory", warm, Path(tmp) / "fill")  # decode into the cache, untimed
        for r in range(args.repeats):
            for name, cache in VARIANTS.items():
                ips, seconds = run_once(cache, args, Path(tmp) / f"{name}-{r}")
                speed[name].append(ips)
                wall[name].append(seconds)
                print(f"repeat {r} {name:<10} {ips:9.1f} img/s {seconds:7.1f} s", flush=True)
    print(
        f"data={args.data or 'digits (built-in)'} arch={args.arch} epochs={args.epochs} "
        f"repeats={args.repeats} loader_workers={args.loader_workers} (Ray Train, one worker)"
    )
    print(f"{'loader':<36}{'median img/s':>14}{'median wall s':>15}")
    labels = {"cached": "decoded cache, batched augmentation", "streaming": "webdataset, PIL"}
    for name in VARIANTS:
        med_s, med_w = statistics.median(speed[name]), statistics.median(wall[name])
        print(f"{labels[name]:<36}{med_s:>14.1f}{med_w:>15.1f}")
    ratio = statistics.median(speed["cached"]) / statistics.median(speed["streaming"])
    paired = statistics.median(c / s for c, s in zip(speed["cached"], speed["streaming"]))
    walls = statistics.median(s / c for c, s in zip(wall["cached"], wall["streaming"]))
    print(
        f"images/s ratio (cached / streaming): {ratio:.2f}x, paired {paired:.2f}x (target >= 1.3x)"
    )
    print(f"wall-time speed-up (streaming / cached), paired: {walls:.2f}x")


if __name__ == "__main__":
    main()
