"""One learning result, whichever data path: the decoded cache against the streamed shards.

For each seed, ``python -m trainer.run`` twice with the same flags, once with
``--data-cache memory`` (the decoded uint8 pixels, a full permutation per epoch) and once
with ``--data-cache off`` (the streaming webdataset reader: shard permutation, pieces of
several open shards, a shuffle buffer), runs alternating. Printed: each run's final kNN
top-1 (train features recomputed, the trainer's last metrics line), its mean batch label
mixing (fraction of uniform, where labels exist) and wall time; the mean over seeds of each
path and their difference (issue target: within 1 point).

    python benchmarks/bench_paths.py --seeds 0 1 2 3 4 -- --launcher local     # the digits
    python benchmarks/bench_paths.py --seeds 0 -- --config trainer/configs/cifar10-cpu.yaml \\
        --data .data/shards/train --val-data .data/shards/test --epochs 10

Everything after ``--`` goes to both runs unchanged.
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
PATHS = {"decoded": "memory", "streamed": "off"}
TARGET_POINTS = 1.0


def run_once(cache: str, seed: int, extra: list[str], out: Path) -> dict:
    """One training run; its final kNN top-1 (%), mean label mixing and wall seconds."""
    cmd = [sys.executable, "-m", "trainer.run", *extra, "--data-cache", cache, "--seed",
           str(seed), "--output", str(out), "--no-progress"]  # fmt: skip
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    mixing = [r["label_mixing"] for r in records if r.get("label_mixing") is not None]
    return {
        "top1": 100.0 * final["knn_top1"],
        "first": 100.0 * records[0]["knn_top1"],
        "mixing": statistics.mean(mixing) if mixing else None,
        "wall": wall,
        "epochs": final["epoch"],
    }


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    ours = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args(ours)
    found: dict[str, list[dict]] = {name: [] for name in PATHS}
    with tempfile.TemporaryDirectory(prefix="npid-bench-paths-") as tmp:
        root = args.out or Path(tmp)
        for seed in args.seeds:
            for name, cache in PATHS.items():
                r = run_once(cache, seed, extra, root / f"{name}-seed{seed}")
                found[name].append(r)
                mix = "-" if r["mixing"] is None else f"{r['mixing']:.3f}"
                print(
                    f"seed {seed} {name:<9} kNN {r['first']:5.1f} % -> {r['top1']:5.1f} % "
                    f"after {r['epochs']} epochs, mixing {mix}, {r['wall']:6.1f} s",
                    flush=True,
                )
    print(f"flags: {' '.join(extra) or '(defaults: the built-in digits)'}; seeds {args.seeds}")
    print(f"{'path':<10}" + "".join(f"{'seed ' + str(s):>9}" for s in args.seeds) + f"{'mean':>9}")
    means = {}
    for name in PATHS:
        tops = [r["top1"] for r in found[name]]
        means[name] = statistics.mean(tops)
        print(f"{name:<10}" + "".join(f"{t:>8.1f}%" for t in tops) + f"{means[name]:>8.1f}%")
    gap = means["decoded"] - means["streamed"]
    verdict = "within" if abs(gap) <= TARGET_POINTS else "NOT within"
    print(f"decoded - streamed: {gap:+.2f} points ({verdict} the {TARGET_POINTS:g}-point target)")
    walls = {n: statistics.median(r["wall"] for r in found[n]) for n in PATHS}
    print(f"median wall s: decoded {walls['decoded']:.1f}, streamed {walls['streamed']:.1f}")


if __name__ == "__main__":
    main()
