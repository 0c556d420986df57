"""Images/s of the training loaders on the same CIFAR-10 JPEGs, side by side in one run:

- ``ImageFolder+DataLoader``: torchvision, PIL augmentation (the baseline of the streaming
  path);
- ``trainer.data (webdataset)``: the streaming shard loader, PIL augmentation (our tar
  reader and the deterministic epoch plan: equal steps on every rank, segments of shards
  split across ranks and DataLoader workers);
- ``webdataset pipeline``: webdataset's own ``WebDataset(...).shuffle().decode("pil")`` with
  ``WebLoader``, the same transform, batch and workers (shards split across workers, a
  shuffle buffer of the same size; no equal steps per rank);
- ``cached (decoded, batched)``: :class:`trainer.data.memory_loader.CachedLoader` over the
  decoded uint8 pixels with the batched CIFAR augmentation (``--data-cache memory``), one
  torch thread as in the training loop; decoding once into the cache is timed apart.

The two PIL pipelines use ``build_transform("cifar", train=True)``, the same batch size and
worker count; one epoch over the subset is one measurement, worker start-up included, and
the pipelines alternate. Also checks that our decoder gives the same pixels as PIL on every
image of the subset.

    python benchmarks/bench_loader.py                      # 5000 images, 5 repeats
    python benchmarks/bench_loader.py --num-images 1000 --repeats 2   # smoke run

The archive (``../shared/data/cifar10-jpeg.tar.gz``) is extracted once into ``--work-dir``
(default ``.data/``, git-ignored).
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.data import ShardIndex, decode_image, train_loader  # noqa: E402
from trainer.data.augment import build_batch_transform  # noqa: E402
from trainer.data.cache import load_decoded  # noqa: E402
from trainer.data.memory_loader import CachedLoader  # noqa: E402
from trainer.data.transforms import build_transform  # noqa: E402
from trainer.shards.make import make_shards  # noqa: E402


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--archive", type=Path, default=REPO.parent / "shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--work-dir", type=Path, default=REPO / ".data")
    p.add_argument("--split", default="train", choices=("train", "test"))
    p.add_argument("--num-images", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shard-size", type=int, default=5000)
    return p.parse_args()


def _prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    """Extract the archive (once), copy an every-k-th subset, shard it. Returns both dirs."""
    root = args.work_dir / "cifar10" / args.split
    if not root.is_dir():
        args.work_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.archive) as tar:
            tar.extractall(args.work_dir, filter="data")
    files = sorted(root.glob("*/*.jpg"))
    step = max(1, len(files) // args.num_images)
    chosen = files[::step][: args.num_images]
    bench = args.work_dir / "bench_loader"
    subset = bench / f"subset-{len(chosen)}"
    shards = bench / f"shards-{len(chosen)}-{args.shard_size}"
    if not (shards / "dataset.json").is_file():
        shutil.rmtree(bench, ignore_errors=True)
        for f in chosen:
            (subset / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, subset / f.parent.name / f.name)
        make_shards(subset, shards, shard_size=args.shard_size, progress=False)
    return subset, shards


def _webdataset_pipeline(shards: Path, args: argparse.Namespace, transform):
    """webdataset's own reading pipeline over the same shards."""
    import webdataset as wds

    from trainer.data.stream import DEFAULT_SHUFFLE_BUFFER

    index = ShardIndex.load(shards)
    urls = [index.shard_url(i) for i in range(len(index.shards))]
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .shuffle(DEFAULT_SHUFFLE_BUFFER)
        .decode("pil")
        .to_tuple("jpg;png", "__key__", "cls")
        .map_tuple(transform, int, int)
    )
    return wds.WebLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)


def _epoch(loader) -> tuple[float, int]:
    start = time.perf_counter()
    n = 0
    for batch in loader:
        n += len(batch[0])
    return time.perf_counter() - start, n


def _check_pixels(subset: Path) -> tuple[int, int]:
    files = sorted(subset.glob("*/*.jpg"))
    same = 0
    for f in files:
        data = f.read_bytes()
        ours = np.asarray(decode_image(data))
        ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        same += ours.shape == ref.shape and bool((ours == ref).all())
    return same, len(files)


def main() -> None:
    args = _parse()
    torch.set_num_threads(1)
    subset, shards = _prepare(args)
    transform = build_transform("cifar", train=True)
    baseline = DataLoader(
        ImageFolder(str(subset), transform=transform),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
    )
    ours = train_loader(shards, args.batch_size, transform, num_workers=args.workers, seed=0)
    with tempfile.TemporaryDirectory() as cache:  # a cold cache: the one-time decode, timed
        start = time.perf_counter()
        decoded = load_decoded(ShardIndex.load(shards), root=cache, workers=args.workers)
        decode_seconds = time.perf_counter() - start
    batched = build_batch_transform("cifar", train=True, image_size=32)
    cached = CachedLoader(decoded, args.batch_size, batched, train=True, seed=0)
    loaders = {
        "ImageFolder+DataLoader": baseline,
        "trainer.data (webdataset)": ours,
        "webdataset pipeline": _webdataset_pipeline(shards, args, transform),
        "cached (decoded, batched)": cached,
    }
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for rep in range(args.repeats):
        ours.set_epoch(rep)
        cached.set_epoch(rep)
        for name, loader in loaders.items():
            seconds, n = _epoch(loader)
            times[name].append(n / seconds)
    same, total = _check_pixels(subset)
    print(
        f"CIFAR-10 {args.split} JPEG subset: {total} images, batch {args.batch_size}, "
        f"{args.workers} workers, {args.repeats} repeats, cifar train augmentation"
    )
    print(f"{'pipeline':28s} {'median img/s':>12s} {'min':>8s} {'max':>8s}")
    for name, rates in times.items():
        print(f"{name:28s} {statistics.median(rates):12.0f} {min(rates):8.0f} {max(rates):8.0f}")
    base, mine, native, held = (statistics.median(r) for r in times.values())
    print(f"ratio (webdataset / ImageFolder): {mine / base:.2f}x")
    print(f"ratio (trainer.data / webdataset pipeline): {mine / native:.2f}x")
    print(f"ratio (cached / webdataset): {held / mine:.2f}x")
    print(
        f"decoding once into the cache: {decode_seconds:.1f} s ({total / decode_seconds:.0f} img/s)"
    )
    print(f"decoded pixels identical to PIL: {same}/{total}")


if __name__ == "__main__":
    main()
