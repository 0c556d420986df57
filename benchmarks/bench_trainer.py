"""Training images/s with the ShardedStore vs an in-process MemoryBank (issue target >= 0.95x).

Both variants run the real ``python -m trainer.run`` with one worker, the same model,
objective and data; only ``--bank store`` (the feature store service, ``--num-shards``
actors) vs ``--bank local`` (a MemoryBank inside the worker) differs. Runs alternate
(store, local, store, …) so that machine load hits both; images/s is the median over the
epochs after the first of each run, then the median over repeats.

    python benchmarks/bench_trainer.py                                 # built-in digits
    python benchmarks/bench_trainer.py --data DIR --val-data DIR --nce-k 4096 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_once(bank: str, args: argparse.Namespace, out: Path) -> float:
    """One training run; returns the median images/s of its epochs after the first."""
    cmd = [sys.executable, "-m", "trainer.run", "--bank", bank, "--num-workers", "1",
           "--num-shards", str(args.num_shards), "--epochs", str(args.epochs), "--arch",
           args.arch, "--output", str(out), "--no-progress", "--eval-every", "1000",
           "--checkpoint-every", "1000"]  # fmt: skip
    if args.data:
        cmd += ["--data", args.data]
    if args.val_data:
        cmd += ["--val-data", args.val_data]
    if args.nce_k is not None:
        cmd += ["--nce-k", str(args.nce_k)]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    subprocess.run(cmd, check=True, cwd=REPO, env=env, capture_output=True, text=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_sec"] for r in records if r.get("images_per_sec")]
    return statistics.median(speeds[1:] or speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data")
    parser.add_argument("--val-data")
    parser.add_argument("--arch", default="small")
    parser.add_argument("--nce-k", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--num-shards", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"store": [], "local": []}
    with tempfile.TemporaryDirectory(prefix="npid-bench-trainer-") as tmp:
        for r in range(args.repeats):
            for bank in ("store", "local"):
                results[bank].append(run_once(bank, args, Path(tmp) / f"{bank}-{r}"))
                print(f"repeat {r} {bank:<5} {results[bank][-1]:9.1f} img/s", flush=True)
    store, local = (statistics.median(results[b]) for b in ("store", "local"))
    print(
        f"data={args.data or 'digits (built-in)'} arch={args.arch} nce_k={args.nce_k} "
        f"shards={args.num_shards} epochs={args.epochs} repeats={args.repeats}"
    )
    print(f"{'bank':<34}{'median img/s':>14}")
    print(f"{'in-process MemoryBank (baseline)':<34}{local:>14.1f}")
    print(f"{'ShardedStore (feature store)':<34}{store:>14.1f}")
    print(f"ratio store / in-process: {store / local:.3f}x  (target >= 0.95x)")


if __name__ == "__main__":
    main()
