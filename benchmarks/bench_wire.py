"""Store step latency with inline pieces (featurestore/wire.py) vs whole objects, one run.

The same ShardedStore steps the same batches two ways, alternating: as shipped (features
and replies cut into pieces below Ray's 100 KiB inline limit), and with the pieces made
as large as the whole message, so that Ray puts the features and each reply in its
object store (what a plain ``actor.step.remote(feats)`` does). Prints median step
latencies per (batch, shards) and their ratio.

    python benchmarks/bench_wire.py                      # B = 128, 256, 512; S = 1, 2
    python benchmarks/bench_wire.py --batch 256 --shards 2 --steps 400
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray

from featurestore import ShardedStore, Softmax, wire

#: The shipped piece size (the module's value is swapped for the whole-object variant).
PIECE_BYTES = wire.PIECE_BYTES


def step_ms(store: ShardedStore, feats, ids, objective, pieces: bool) -> float:
    """Wall time of one step in ms, with inline pieces or with whole objects."""
    wire.PIECE_BYTES = PIECE_BYTES if pieces else 1 << 40
    start = time.perf_counter()
    store.step(feats, ids, objective)
    return 1e3 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-rows", type=int, default=2_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=300, help="per variant and setting")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    objective = Softmax()
    print(f"N={args.num_rows} d={args.dim} exact softmax, {args.steps} steps per variant")
    print(f"{'B':>5}{'S':>3}{'KiB in':>8}{'pieces ms':>11}{'objects ms':>12}{'ratio':>8}")
    for shards in args.shards:
        store = ShardedStore(
            args.num_rows, args.dim, num_shards=shards, name=f"bench-wire-{shards}"
        )
        try:
            for b in args.batch:
                g = torch.Generator().manual_seed(b)
                times: dict[bool, list[float]] = {True: [], False: []}
                for i in range(args.steps * 2 + 20):
                    feats = torch.nn.functional.normalize(torch.randn(b, args.dim, generator=g))
                    ids = torch.randperm(args.num_rows, generator=g)[:b]
                    ms = step_ms(store, feats, ids, objective, pieces=i % 2 == 0)
                    if i >= 20:  # warm-up
                        times[i % 2 == 0].append(ms)
                fast, slow = statistics.median(times[True]), statistics.median(times[False])
                kib = b * args.dim * 4 / 1024
                print(f"{b:>5}{shards:>3}{kib:>8.0f}{fast:>11.2f}{slow:>12.2f}{fast / slow:>7.2f}x")
        finally:
            wire.PIECE_BYTES = PIECE_BYTES
            store.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
