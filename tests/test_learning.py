"""Tests that fail when training stops learning.

A short run of the real trainer (``--launcher local``: the Ray Train worker loop in this
process) must end with recomputed kNN features clearly better than where it started (the
untrained encoder, epoch 0) and than the input itself (raw pixels, mean-centred, cosine,
the same 200-NN weighted vote), by margins set from measurement (see each test). Breaking
the method on purpose (ids shuffled between the loader and the bank, or the momentum
update switched off) makes these tests fail; the notes of issue 10 say how that was
checked.

- the fast test runs on the built-in digits, made harder in one way raw pixels cannot
  follow: each 8×8 digit sits at a random place of a 16×16 canvas (ids, labels and
  splits unchanged), so a pixel-by-pixel match no longer finds the same digit while an
  encoder trained to ignore crops does;
- the opt-in test (``NPID_CIFAR_TESTS=1``) runs on a class-balanced subset of CIFAR-10.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from knn_service import knn_evaluate
from trainer.augment import build_batch_transform
from trainer.data import ShardIndex
from trainer.data_cache import load_decoded
from trainer.make_shards import make_shards
from trainer.metrics import read_jsonl
from trainer.run import main

ARCHIVE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def raw_pixel_knn(train: Path, val: Path, preset: str, sigma: float, k: int = 200) -> float:
    """Top-1 of the 200-NN vote on test-transform pixels, mean-centred, cosine."""
    tf = build_batch_transform(preset, train=False)
    feats = []
    for shards in (train, val):
        data = load_decoded(ShardIndex.load(shards))
        feats.append((tf(data.images).flatten(1), data.labels))
    (a, ya), (b, yb) = feats
    mean = a.mean(dim=0)
    a, b = F.normalize(a - mean, dim=1), F.normalize(b - mean, dim=1)
    classes = int(ya.max()) + 1
    return float(knn_evaluate(a, ya, b, yb, num_classes=classes, k=k, temperature=sigma)["top1"])


def _train(args: list[str]) -> tuple[float, float]:
    """Run the trainer; ``(epoch-0 recomputed top-1, final recomputed top-1)``."""
    assert main(["--launcher", "local", "--no-progress", *args]) == 0
    output = Path(args[args.index("--output") + 1])
    records = read_jsonl(output / "metrics.jsonl")
    recomputed = [r["knn_top1"] for r in records if r.get("features") == "recomputed"]
    return recomputed[0], recomputed[-1]


@pytest.fixture(scope="module")
def shifted_digits(tmp_path_factory) -> dict[str, Path]:
    """The built-in digits, each pasted at a seeded random place of a 16×16 canvas."""
    from sklearn.datasets import load_digits

    from trainer.datasets import DIGITS_TEST_EVERY

    root = tmp_path_factory.mktemp("shifted-digits")
    digits = load_digits()
    rng = np.random.default_rng(0)
    out = {}
    rows_of = {
        split: [i for i in range(len(digits.target)) if (i % DIGITS_TEST_EVERY == 0) == test]
        for split, test in (("train", False), ("test", True))
    }
    for split, rows in rows_of.items():
        src = root / f"src-{split}"
        for i in rows:
            canvas = np.zeros((16, 16), dtype=np.uint8)
            r, c = rng.integers(0, 9, 2)
            canvas[r : r + 8, c : c + 8] = (digits.images[i] * 255 / 16).astype(np.uint8)
            folder = src / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(canvas).convert("RGB").save(folder / f"{i:04d}.png")
        make_shards(src, root / split, progress=False)
        out[split] = root / split
    return out
