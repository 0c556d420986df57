"""ShardedStore vs the in-process MemoryBank, side by side in one run (README, *The feature store*).

Measures (medians over ``--repeats``):

1. step latency of ``ShardedStore(S=--shards)`` and ``MemoryBank`` for NCE (``B``, ``K``) and
   the exact softmax over ``N`` rows; the in-process bank uses 2 torch threads, each shard
   actor 1 (together they use the same two cores);
2. bytes that cross the process boundary per step (pickled arguments and results of every
   call, shard 0's bookkeeping included) for ``K`` and ``--big-negatives``, next to what
   pulling the noise rows would move (``B·K·d·4``);
3. a big bfloat16 bank (``--big-rows`` × ``d``, default 20M × 128 = 5 GB) over the shards:
   create, step, snapshot and restore times, and the per-step bytes again (independent of N).

Full size: ``python benchmarks/bench_store.py``; a quick run:
``python benchmarks/bench_store.py --num-rows 100000 --big-rows 1000000 --repeats 3``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray

from featurestore import NCE, MemoryBank, ShardedStore, Softmax


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-rows", type=int, default=1_281_167, help="N for the latency runs")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--negatives", type=int, default=4096, help="K")
    p.add_argument("--big-negatives", type=int, default=65_536, help="second K for bytes/step")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--big-rows", type=int, default=20_000_000, help="0 skips the big bank")
    p.add_argument("--big-repeats", type=int, default=3)
    p.add_argument("--snapshot-dir", default=None, help="default: a temporary directory")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    return p.parse_args(argv)


def median_time(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_times(
    fa: Callable[[], object], fb: Callable[[], object], repeats: int, warmup: int
) -> tuple[float, float, float]:
    """Medians of ``fa`` and ``fb`` run alternately, and the median of the per-pair ratios.

    Alternating keeps a change of machine load from favouring one side.
    """
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((fa, ta), (fb, tb)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    ratios = [b / a for a, b in zip(ta, tb)]
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def step_bytes(store: ShardedStore, feats, ids, objective) -> int:
    """Pickled bytes of every call (arguments + results) of one step."""
    store.step(feats, ids, objective)  # NCE's first step (Z estimate) is not measured
    store.transfer.reset()
    store.transfer.enabled = True
    store.step(feats, ids, objective)
    store.transfer.enabled = False
    return store.transfer.bytes["sent"] + store.transfer.bytes["received"]


def batch(n: int, b: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    return feats, torch.randperm(n, generator=g)[:b].clone()


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    n, d, b, k = args.num_rows, args.dim, args.batch, args.negatives
    rows: list[tuple[str, str, str, str]] = []
    feats, ids = batch(n, b, d)
    nce = NCE(num_negatives=k)
    softmax = Softmax()

    # 1. latency, side by side
    store = ShardedStore(
        num_rows=n, dim=d, num_shards=args.shards, seed=0, name=f"bench-{uuid.uuid4().hex[:6]}"
    )
    store.step(feats, ids, nce)  # Z
    bank = MemoryBank(n, d, seed=0)
    bank.step(feats, ids, nce)
    for label, objective, reps in (
        (f"NCE step B={b} K={k} N={n} (ms)", nce, args.repeats),
        (f"softmax step B={b} N={n} (ms)", softmax, max(3, args.repeats // 2)),
    ):
        t_bank, t_store, ratio = paired_times(
            lambda o=objective: bank.step(feats, ids, o),
            lambda o=objective: store.step(feats, ids, o),
            reps,
            args.warmup,
        )
        note = f"{t_store / t_bank:.2f}x (pairs: {ratio:.2f}x)"
        rows.append((label, f"{t_bank * 1e3:.1f}", f"{t_store * 1e3:.1f}", note))
    bank = None  # free its rows before the big bank

    # 2. bytes per step: statistics, not rows
    byte_counts = {}
    for kk in (k, args.big_negatives):
        byte_counts[kk] = step_bytes(store, feats, ids, NCE(num_negatives=kk))
        pulled = b * kk * d * 4
        rows.append(
            (
                f"bytes/step NCE K={kk} N={n} (rows pulled | store)",
                fmt_bytes(pulled),
                fmt_bytes(byte_counts[kk]),
                f"{byte_counts[kk] / pulled:.4f}x",
            )
        )
    store.shutdown()

    # 3. the big bf16 bank
    if args.big_rows:
        big_n = args.big_rows
        tmp = args.snapshot_dir or tempfile.mkdtemp(prefix="npid-bench-")
        try:
            t_create, big = timed(
                lambda: ShardedStore(
                    num_rows=big_n,
                    dim=d,
                    num_shards=args.shards,
                    seed=0,
                    dtype="bfloat16",
                    name=f"bench-big-{uuid.uuid4().hex[:6]}",
                    snapshot_dir=tmp,
                )
            )
            rows.append((f"{big_n:,} x {d} bf16: create (s)", "", f"{t_create:.1f}", ""))
            big_feats, big_ids = batch(big_n, b, d, seed=1)
            big.step(big_feats, big_ids, nce)
            t_step = median_time(
                lambda: big.step(big_feats, big_ids, nce), args.big_repeats, args.warmup
            )
            rows.append((f"{big_n:,} bf16: NCE step K={k} (ms)", "", f"{t_step * 1e3:.1f}", ""))
            big_bytes = step_bytes(big, big_feats, big_ids, nce)
            rows.append(
                (
                    f"bytes/step NCE K={k} N={big_n:,}",
                    fmt_bytes(byte_counts[k]),
                    fmt_bytes(big_bytes),
                    f"{big_bytes / byte_counts[k]:.3f}x",
                )
            )
            probe = torch.randint(0, big_n, (4096,))
            expect = big.get(probe)
            step_before = big.step_count
            t_snap, uri = timed(big.snapshot)
            size = sum(
                os.path.getsize(os.path.join(uri, f))
                for f in os.listdir(uri)
                if f.endswith(".parquet")
            )
            rows.append((f"{big_n:,} bf16: snapshot (s)", "", f"{t_snap:.1f}", fmt_bytes(size)))
            big.shutdown()
            t_restore, restored = timed(
                lambda: ShardedStore.restore(
                    uri, num_shards=args.shards, name=f"bench-restored-{uuid.uuid4().hex[:6]}"
                )
            )
            ok = torch.equal(restored.get(probe), expect) and restored.step_count == step_before
            rows.append(
                (
                    f"{big_n:,} bf16: restore S={args.shards} (s)",
                    "",
                    f"{t_restore:.1f}",
                    "ok" if ok else "MISMATCH",
                )
            )
            restored.shutdown()
        finally:
            if args.snapshot_dir is None:
                shutil.rmtree(tmp, ignore_errors=True)

    header = ("measure", "MemoryBank", f"ShardedStore S={args.shards}", "ratio of medians / note")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    line = " | ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    sys.stdout.flush()
    ray.shutdown()


if __name__ == "__main__":
    main()
