"""Training images/s with the ShardedStore vs an in-process MemoryBank, epoch by epoch in
one run (issue target >= 0.95x).

``bench_trainer.py`` compares whole ``python -m trainer.run`` processes; on a shared
2-core machine their speeds drift by ±10 % from one process to the next, more than the
difference being measured. Here one Ray Train run (one worker) holds every bank at once:
an in-process ``MemoryBank`` and one ``ShardedStore`` per ``--num-shards`` value (the
store actors all exist for the whole run, idle when it is not their turn). The worker
runs the trainer's own epoch (``trainer.loop.train_epoch``: encode, ``step_async``, next
batch, backward, optimizer step) with each bank in turn: round ``r`` runs every variant
for one epoch, in an order rotated by ``r`` so that each variant takes each position
equally often. Same model (training continues across epochs), same data order, same
process, same moment. Round 0 is a warm-up and is left out. Printed: each variant's median
images/s, the ratio of medians, and the median over rounds of the per-round ratio
against the in-process bank.

    python benchmarks/bench_trainer_interleaved.py                       # built-in digits
    python benchmarks/bench_trainer_interleaved.py --data .data/shards/cifar-train \\
        --rounds 3 --batch-size 256
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trainer import add_data_args, data_flags


def interleaved_loop(loop_config: dict) -> None:
    """Ray Train worker: every variant one epoch per round; one JSON line per epoch."""
    import ray.train

    from featurestore.store import ShardedStore
    from trainer.launch.ray_runtime import RayRuntime
    from trainer.loop import setup, train_batches, train_epoch

    w = setup(loop_config, RayRuntime())  # the config says --bank local: w.bank is the MemoryBank
    banks = {"local": w.bank}
    for label, name in loop_config["stores"].items():
        banks[label] = ShardedStore.attach(name)
    order = list(banks)
    loader = train_batches(w)
    step, epoch = 0, 0
    with open(loop_config["results"], "a") as out:
        for r in range(loop_config["rounds"]):
            for label in order[r % len(order) :] + order[: r % len(order)]:
                w.bank = banks[label]
                step, _loss, ips, _skipped = train_epoch(w, loader, epoch, step)
                out.write(json.dumps({"round": r, "bank": label, "images_per_sec": ips}) + "\n")
                out.flush()
                epoch += 1
            ray.train.report({"round": r})


def summarize(records: list[dict]) -> list[tuple[str, float, float, float]]:
    """``(bank, median images/s, ratio of medians, median per-round ratio)`` per variant,
    the in-process bank first; round 0 (warm-up) left out."""
    speeds: dict[str, dict[int, float]] = {}
    for rec in records:
        if rec["round"] > 0:
            speeds.setdefault(rec["bank"], {})[rec["round"]] = rec["images_per_sec"]
    local = speeds["local"]
    base = statistics.median(local.values())
    rows = []
    for bank, by_round in sorted(speeds.items(), key=lambda item: item[0] != "local"):
        median = statistics.median(by_round.values())
        paired = statistics.median(v / local[r] for r, v in by_round.items())
        rows.append((bank, median, median / base, paired))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_args(parser)
    parser.add_argument("--num-shards", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=41, help="rounds, the first a warm-up")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 0 is a warm-up and is left out)")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from trainer.flags import parse_config
    from trainer.launch import driver
    from trainer.plan import make_plan

    variants = 1 + len(args.num_shards)
    with tempfile.TemporaryDirectory(prefix="npid-bench-interleaved-") as tmp:
        flags = ["--bank", "local", "--num-workers", "1", "--arch", args.arch,
                 "--epochs", str(args.rounds * variants), "--output", tmp, "--no-progress",
                 "--eval-every", "0"]  # fmt: skip
        cfg = parse_config(flags + data_flags(args))
        plan = make_plan(cfg)
        started = driver.connect()
        stores = []
        try:
            names = {}
            for shards in args.num_shards:
                label = f"S={shards}"
                names[label] = f"{plan.store_name}-s{shards}"
                store_cfg = dataclasses.replace(cfg, bank="store", num_shards=shards)
                store_plan = dataclasses.replace(plan, store_name=names[label])
                stores.append(driver.open_store(store_cfg, store_plan))
            results = Path(tmp) / "epochs.jsonl"
            extra = {"stores": names, "results": str(results), "rounds": args.rounds}
            result = driver.build_trainer(cfg, plan, interleaved_loop, extra).fit()
            if result.error is not None:
                raise result.error
            records = [json.loads(line) for line in results.read_text().splitlines()]
        finally:
            for store in stores:
                store.shutdown()
            if started:
                ray.shutdown()
    for rec in records:
        print(f"round {rec['round']:>2} {rec['bank']:<10} {rec['images_per_sec']:9.1f} img/s")
    print(
        f"data={args.data or 'digits (built-in)'} arch={args.arch} nce_k={args.nce_k} "
        f"rounds={args.rounds} (round 0 left out; one worker, one run, one epoch per variant "
        "per round)"
    )
    print(f"{'bank':<34}{'median img/s':>14}{'ratio':>8}{'paired':>8}")
    for bank, median, ratio, paired in summarize(records):
        label, target = "in-process MemoryBank (baseline)", ""
        if bank != "local":
            label = f"ShardedStore, {bank[2:]} shard{'s' * (bank != 'S=1')}"
            target = "  (target >= 0.95x)"
        print(f"{label:<34}{median:>14.1f}{ratio:>7.3f}x{paired:>7.3f}x{target}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
