"""A million images, streamed: indexing, step time at N = 1M against N = 50k, peak memory of
the trainer and of each store shard, and the kNN evaluation over the full bank.

1. **Collection.** ``--num-images`` (default 1,000,000) synthetic 32×32 JPEGs in ordinary
   webdataset shards written by webdataset's own ``TarWriter`` (keys ``img-<n>``, fields
   ``jpg`` and ``cls``; ``--shard-size`` samples per shard, in class order: the worst case for
   mixing). Each image is its class's colour pattern plus its own noise, so every sample is a
   distinct file. Kept in ``--work-dir`` (default ``.data/scale``) and reused by later runs.
   A 10,000-image validation collection is made the same way.
2. **Index.** ``trainer.index_shards.index_shards`` over the shards' brace pattern (the same
   pass as ``python -m trainer.make_shards index``), timed from scratch, for the whole
   collection and for its first ``--small`` images (its first shards).
3. **Steps.** For N = ``--small`` and then N = all: a 4-shard ``ShardedStore`` (Ray actors,
   one local Ray), the streaming ``train_loader`` over the index (shuffle buffer and open
   pieces at the trainer's defaults), the CPU encoder the trainer uses on a CPU
   (``small-wide``, CIFAR augmentation) and NCE with ``K = --nce-k`` (the same objective on
   both sides, so only N differs). ``--steps`` timed steps after ``--warmup``; a step is
   "next batch + forward + store step + backward + SGD", as in ``trainer.loop``. Medians;
   the ratio is N = all over N = small.
4. **Memory.** Peak RSS of this process (the trainer) and of its loader workers, and each
   shard actor's peak RSS (``shard_info()[s]["memory"]["process_peak_rss_bytes"]``) and rows bytes.
5. **Evaluation.** The bank exported from the store into a flat FAISS index (all N rows),
   then ``trainer.evaluation.evaluate``: the validation images encoded and the weighted
   200-NN vote against the full bank. Times of both parts.

    python benchmarks/bench_scale.py                           # 1M images (~3 GB on disk)
    python benchmarks/bench_scale.py --num-images 60000 --small 20000 --steps 5   # smoke run
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import resource
import shutil
import statistics
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ray  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402

from featurestore import NCE, ShardedStore  # noqa: E402
from trainer.data import ShardIndex, train_loader  # noqa: E402
from trainer.data.transforms import build_transform  # noqa: E402
from trainer.evaluation import EvalSetup, Split, evaluate, index_from_export  # noqa: E402
from trainer.model.encoders import EncoderConfig, build_encoder  # noqa: E402
from trainer.shards.index import index_shards  # noqa: E402

NUM_CLASSES = 10
SIDE = 32
VAL_IMAGES = 10_000
#: The classes' patterns are the same in every collection (train and val); only the noise
#: follows a collection's seed.
PATTERN_SEED = 0


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-images", type=int, default=1_000_000)
    p.add_argument("--small", type=int, default=50_000, help="N of the small side")
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--work-dir", type=Path, default=REPO / ".data" / "scale")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--nce-k", type=int, default=4096)
    p.add_argument("--store-shards", type=int, default=4)
    p.add_argument("--steps", type=int, default=30, help="timed steps per N")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--loader-workers", type=int, default=1)
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="writers")
    return p.parse_args()


# --------------------------------------------------------------------------- collection


def _images(n: int, first: int, seed: int, total: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images ``[n, 32, 32, 3]`` uint8 of samples ``first…`` of ``total``, labels
    ``[n]`` in class order: a class's pattern (a colour, a stripe frequency; the same for
    every ``seed``) plus noise drawn from ``(seed, first)``."""
    rng = np.random.default_rng([seed, first])
    labels = (np.arange(first, first + n) * NUM_CLASSES) // total
    colours = np.random.default_rng(PATTERN_SEED).integers(40, 216, size=(NUM_CLASSES, 3))
    grid = np.arange(SIDE, dtype=np.float32)
    stripes = np.sin(grid[None, :] * (labels[:, None] + 1) * 0.3)  # [n, W]
    base = colours[labels][:, None, None, :] + 30 * stripes[:, None, :, None]
    noisy = base + rng.normal(0, 25, size=(n, SIDE, SIDE, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8), labels


def _write_shard(job: tuple[Path, int, int, int, int]) -> int:
    path, first, count, seed, total = job
    images, labels = _images(count, first, seed, total)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f, wds.TarWriter(f) as sink:
        for j in range(count):
            buf = io.BytesIO()
            Image.fromarray(images[j]).save(buf, format="JPEG", quality=90)
            sink.write({"__key__": f"img-{first + j:09d}", "jpg": buf.getvalue(),
                        "cls": int(labels[j])})  # fmt: skip
    tmp.rename(path)
    return count


def make_collection(out: Path, n: int, shard_size: int, seed: int, processes: int) -> str:
    """Shards ``out/train-{000000..}.tar`` of ``n`` images (reused when complete); returns
    the brace pattern."""
    out.mkdir(parents=True, exist_ok=True)
    shards = -(-n // shard_size)
    jobs = []
    for s in range(shards):
        path = out / f"train-{s:06d}.tar"
        if not path.is_file():
            first = s * shard_size
            jobs.append((path, first, min(shard_size, n - first), seed, n))
    if jobs:
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_write_shard, jobs))
    return str(out / f"train-{{000000..{shards - 1:06d}}}.tar")


def timed_index(pattern: str, out: Path) -> tuple[float, ShardIndex]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    index_shards([pattern], out, threads=os.cpu_count() or 1, progress=False)
    elapsed = time.perf_counter() - start
    return elapsed, ShardIndex.load(out)


# --------------------------------------------------------------------------- steps


def _peak_bytes(who: int) -> int:
    return resource.getrusage(who).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def run_steps(
    index: ShardIndex, args: argparse.Namespace
) -> tuple[list[float], list[float], ShardedStore, torch.nn.Module]:
    """Timed steps on ``index`` through a fresh store: ``(step seconds, data-wait seconds,
    store, encoder)``."""
    n = index.num_instances
    store = ShardedStore(num_rows=n, dim=128, num_shards=args.store_shards, seed=0,
                         name=f"scale-{uuid.uuid4().hex[:6]}")  # fmt: skip
    torch.manual_seed(0)
    model = build_encoder(**EncoderConfig.for_preset("small-wide", 128, "cifar").to_dict())
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4)
    loader = train_loader(index, args.batch_size, build_transform("cifar", train=True),
                          num_workers=args.loader_workers, seed=0)  # fmt: skip
    nce = NCE(num_negatives=args.nce_k)
    steps, waits = [], []
    batches = iter(loader)
    model.train()
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        x, ids, _ = next(batches)
        t1 = time.perf_counter()
        feats = model(x.contiguous(memory_format=torch.channels_last))
        out = store.step(feats.detach(), ids, nce)
        opt.zero_grad(set_to_none=True)
        feats.backward(out.grad)
        opt.step()
        if i >= args.warmup:
            steps.append(time.perf_counter() - t0)
            waits.append(t1 - t0)
    del batches  # stops the loader's workers
    return steps, waits, store, model


def evaluate_bank(
    store: ShardedStore, model: torch.nn.Module, train: ShardIndex, val: ShardIndex
) -> tuple[float, float, dict]:
    """``(export + index seconds, evaluate seconds, result)`` of the kNN over the full bank."""
    start = time.perf_counter()
    bank = index_from_export(store.export(), 128)
    built = time.perf_counter()
    setup = EvalSetup(preset="cifar", image_size=SIDE, dim=128, device=torch.device("cpu"),
                      num_classes=NUM_CLASSES, k=200, temperature=0.07)  # fmt: skip
    model.eval()
    result = evaluate(model, Split(train), Split(val), setup, bank)
    return built - start, time.perf_counter() - built, result


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    args = _parse()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    if not 0 < args.small < args.num_images or args.small % args.shard_size:
        sys.exit("--small must be below --num-images and a multiple of --shard-size")
    work = args.work_dir
    start = time.perf_counter()
    pattern = make_collection(work / f"shards-{args.num_images}", args.num_images,
                              args.shard_size, 0, args.processes)  # fmt: skip
    val_pattern = make_collection(work / "val", VAL_IMAGES, VAL_IMAGES, 1, 1)
    made = time.perf_counter() - start
    small_pattern = (
        pattern.rsplit("{", 1)[0] + f"{{000000..{args.small // args.shard_size - 1:06d}}}.tar"
    )

    t_big, big = timed_index(pattern, work / "index-all")
    t_small, small = timed_index(small_pattern, work / "index-small")
    _, val = timed_index(val_pattern, work / "index-val")
    print(f"collection ready in {made:.0f} s (0 when reused); {big.num_instances:,} indexed")

    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    rows = []
    for index, t_index in ((small, t_small), (big, t_big)):
        steps, waits, store, model = run_steps(index, args)
        shards = [s["memory"] for s in store.shard_info()]
        t_build, t_eval, result = evaluate_bank(store, model, index, val)
        rows.append({
            "N": index.num_instances, "index_s": t_index, "step_s": statistics.median(steps),
            "wait_s": statistics.median(waits), "trainer_peak": _peak_bytes(resource.RUSAGE_SELF),
            "workers_peak": _peak_bytes(resource.RUSAGE_CHILDREN),
            "shard_peak": max(s["process_peak_rss_bytes"] for s in shards),
            "shard_rows": max(s["rows_bytes"] for s in shards), "build_s": t_build,
            "eval_s": t_eval, "top1": result["knn_top1"], "num_train": result["num_train"],
        })  # fmt: skip
        store.shutdown()

    b = args.batch_size
    print(f"\nbatch {b}, NCE K={args.nce_k}, {args.store_shards} store shards, "
          f"{args.loader_workers} loader worker(s), {os.cpu_count()} cores; "
          f"medians of {args.steps} steps after {args.warmup}")  # fmt: skip
    print("| N | index (s) | step (ms) | of it waiting for data (ms) | img/s | trainer peak RSS "
          "| loader workers peak | per-shard peak RSS (rows) | bank → FAISS (s) "
          "| kNN eval, 10k queries (s) |")  # fmt: skip
    print("|" + "---|" * 10)
    for r in rows:
        print(f"| {r['N']:,} | {r['index_s']:.1f} | {r['step_s'] * 1e3:.0f} "
              f"| {r['wait_s'] * 1e3:.0f} | {b / r['step_s']:.0f} | {_mib(r['trainer_peak'])} "
              f"| {_mib(r['workers_peak'])} | {_mib(r['shard_peak'])} ({_mib(r['shard_rows'])}) "
              f"| {r['build_s']:.1f} | {r['eval_s']:.1f} |")  # fmt: skip
    small_row, big_row = rows
    print(f"\nstep time N={big_row['N']:,} / N={small_row['N']:,}: "
          f"{big_row['step_s'] / small_row['step_s']:.2f}x; index time per image "
          f"{big_row['index_s'] / big_row['N'] * 1e6:.1f} us; kNN top-1 after the few steps "
          f"(not a learning result): {small_row['top1']:.3f} / {big_row['top1']:.3f} "
          f"over {big_row['num_train']:,} bank rows")  # fmt: skip
    ray.shutdown()


if __name__ == "__main__":
    main()
