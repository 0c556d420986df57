"""Training images/s with the ShardedStore vs an in-process MemoryBank (issue target >= 0.95x).

All variants run the real ``python -m trainer.run`` with one worker, the same model,
objective and data; only ``--bank store`` (the feature store service, ``--num-shards``
actors, one variant per shard count) vs ``--bank local`` (a MemoryBank inside the worker)
differs; kNN evaluation is off (``--eval-every 0``). Runs alternate (local, store S1,
store S2, local, …) so that machine load hits all; a run's images/s is the median over its
epochs after the first (its only epoch when it has one). Printed: the median over repeats
of each variant, the ratio of those medians, and the median of the per-repeat ratios (each
against the local run of the same repeat).

Whole processes drift by ±10 % here from one to the next; ``bench_trainer_interleaved.py``
compares the banks epoch by epoch inside one run instead.

    python benchmarks/bench_trainer.py                                 # built-in digits
    python benchmarks/bench_trainer.py --data .data/shards/cifar-train --epochs 1
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


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The flags both trainer benchmarks pass on to ``trainer.run``."""
    parser.add_argument("--data")
    parser.add_argument("--arch", default="small")
    parser.add_argument("--objective", help="as trainer.run's (default auto)")
    parser.add_argument("--nce-k", type=int)
    parser.add_argument("--batch-size", type=int)


def data_flags(args: argparse.Namespace) -> list[str]:
    """``trainer.run`` flags for the optional ones of :func:`add_data_args`."""
    flags = ["--data", args.data] if args.data else []
    if args.objective:
        flags += ["--objective", args.objective]
    if args.nce_k is not None:
        flags += ["--nce-k", str(args.nce_k)]
    if args.batch_size:
        flags += ["--batch-size", str(args.batch_size)]
    return flags


def run_once(bank: str, shards: int, args: argparse.Namespace, out: Path) -> float:
    """One training run; returns the median images/s of its epochs after the first."""
    cmd = [sys.executable, "-m", "trainer.run", "--bank", bank, "--num-workers", "1",
           "--num-shards", str(shards), "--epochs", str(args.epochs), "--arch",
           args.arch, "--output", str(out), "--no-progress", "--eval-every", "0",
           "--checkpoint-every", "1000"]  # fmt: skip
    cmd += data_flags(args)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    subprocess.run(cmd, check=True, cwd=REPO, env=env, capture_output=True, text=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_sec"] for r in records if r.get("images_per_sec")]
    return statistics.median(speeds[1:] or speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_args(parser)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--num-shards", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    variants = [("local", 0), *(("store", s) for s in args.num_shards)]
    results: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="npid-bench-trainer-") as tmp:
        for r in range(args.repeats):
            for bank, shards in variants:
                out = Path(tmp) / f"{bank}{shards}-{r}"
                results[bank, shards].append(run_once(bank, max(shards, 1), args, out))
                label = f"{bank} S={shards}" if shards else bank
                print(f"repeat {r} {label:<10} {results[bank, shards][-1]:9.1f} img/s", flush=True)
    medians = {v: statistics.median(speeds) for v, speeds in results.items()}
    local = medians["local", 0]
    print(
        f"data={args.data or 'digits (built-in)'} arch={args.arch} nce_k={args.nce_k} "
        f"epochs={args.epochs} repeats={args.repeats} (one worker)"
    )
    print(f"{'bank':<34}{'median img/s':>14}{'ratio':>8}{'paired':>8}")
    print(f"{'in-process MemoryBank (baseline)':<34}{local:>14.1f}{1.0:>7.3f}x{1.0:>7.3f}x")
    for shards in args.num_shards:
        speed = medians["store", shards]
        paired = statistics.median(
            s / b for s, b in zip(results["store", shards], results["local", 0], strict=True)
        )
        label = f"ShardedStore, {shards} shard{'s' * (shards > 1)}"
        print(f"{label:<34}{speed:>14.1f}{speed / local:>7.3f}x{paired:>7.3f}x  (target >= 0.95x)")


if __name__ == "__main__":
    main()
