"""Decode + augment throughput for ImageNet-size JPEGs: the CPU paths against each other and,
on a CUDA machine, the GPU path (``--decode gpu``).

    python -m benchmarks.bench_decode [--images 2000] [--batch 256] [--repeats 3]

Images: ``--images`` JPEGs of 400-500 px sides (quality 90), generated here from smooth
gradients plus noise (nothing downloaded). Paths, each over the same bytes with the
``imagenet`` preset at 224 px (random-resized crop, flip, jitter, grayscale, normalise):

- ``pil``: the per-sample PIL transform the streaming loader runs without a fixed image size
  (decode with torchvision's libjpeg-turbo, then torchvision transforms on PIL images): one
  process, so its figure is img/s per core;
- ``cpu-batched``: :func:`trainer.data.device_batches.decode_batch` on the CPU, then
  :func:`~trainer.data.device_batches.augment_images` (the device path run on the CPU);
- ``gpu``: the same two on CUDA (nvJPEG batched decode), when a GPU is present.

Prints the median img/s of ``--repeats`` passes per path and its ratio to ``pil``;
``--json`` writes them too. Uses no Ray, webdataset or FAISS (runs on the GPU machine).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from trainer.data.augment import build_batch_transform
from trainer.data.decode import decode_image
from trainer.data.device_batches import augment_images, decode_batch
from trainer.data.transforms import build_transform


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` JPEGs of 400-500 px sides: gradients, blobs and noise (JPEG-typical content)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(400, 501, 2))
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        phase = rng.uniform(0, 6.3, 3)
        freq = rng.uniform(0.005, 0.03, 3)
        base = np.stack(
            [127 + 100 * np.sin(freq[c] * (x + y * (c + 1)) + phase[c]) for c in range(3)], -1
        )
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _timed(fn: Callable[[], int], repeats: int, sync: Callable[[], None]) -> float:
    rates = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        n = fn()
        sync()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    torch.set_num_threads(1)  # per-core figures on the CPU
    files = make_jpegs(args.images)
    mb = sum(map(len, files)) / len(files) / 1e3
    print(f"{len(files)} JPEGs, 400-500 px, mean {mb:.0f} kB; batch {args.batch}")
    pil_tf = build_transform("imagenet", train=True, image_size=224)
    batch_tf = build_batch_transform("imagenet", train=True, image_size=224)

    def pil() -> int:
        for data in files:
            pil_tf(decode_image(data))
        return len(files)

    def batched(device: str) -> Callable[[], int]:
        def run() -> int:
            gen = torch.Generator().manual_seed(0)
            for start in range(0, len(files), args.batch):
                images = decode_batch(files[start : start + args.batch], device)
                augment_images([x for x in images if x is not None], batch_tf, gen)
            return len(files)

        return run

    def nothing() -> None:
        return None

    results = {"pil": _timed(pil, args.repeats, nothing)}
    results["cpu-batched"] = _timed(batched("cpu"), args.repeats, nothing)
    if torch.cuda.is_available():
        batched("cuda")()  # warm-up: nvJPEG handles, kernels
        results["gpu"] = _timed(batched("cuda"), args.repeats, torch.cuda.synchronize)
    print(f"{'path':<12} {'img/s':>9} {'x pil':>7}")
    for name, rate in results.items():
        print(f"{name:<12} {rate:9.0f} {rate / results['pil']:7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": len(files), "batch": args.batch, "img_per_s": results}, f)


if __name__ == "__main__":
    main()
