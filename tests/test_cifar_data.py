"""Opt-in: shard the real CIFAR-10 test split (JPEG ImageFolder) and read it back.

Runs only with ``NPID_CIFAR_TESTS=1`` and ``../shared/data/cifar10-jpeg.tar.gz`` beside the repo.
"""

from __future__ import annotations

import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from trainer.data import ShardIndex, eval_loader, steps_per_epoch, train_loader
from trainer.data.transforms import build_transform
from trainer.shards.make import make_shards

ARCHIVE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"

pytestmark = [
    pytest.mark.cifar,
    pytest.mark.skipif(
        os.environ.get("NPID_CIFAR_TESTS") != "1" or not ARCHIVE.is_file(),
        reason="opt-in: set NPID_CIFAR_TESTS=1 with ../shared/data/cifar10-jpeg.tar.gz present",
    ),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision.io.image"),
]


@pytest.fixture(scope="module")
def cifar_test_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    with tarfile.open(ARCHIVE) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("cifar10/test/")]
        tar.extractall(root, members=members, filter="data")
    out = root / "shards"
    summary = make_shards(root / "cifar10" / "test", out, shard_size=2500, progress=False)
    assert summary.num_skipped == 0
    return out


def test_cifar_test_split_shards(cifar_test_shards: Path) -> None:
    index = ShardIndex.load(cifar_test_shards)
    assert index.num_instances == 10000
    assert index.classes == (
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    )  # fmt: skip
    assert Counter(index.labels.tolist()) == {c: 1000 for c in range(10)}
    assert index.meta["image_size_max"] == 32


def test_cifar_loader_pass(cifar_test_shards: Path) -> None:
    index = ShardIndex.load(cifar_test_shards)
    ids = []
    for images, batch_ids, labels in eval_loader(
        cifar_test_shards, 500, build_transform("cifar", train=False), num_workers=2
    ):
        assert images.shape[1:] == (3, 32, 32)
        assert labels.tolist() == index.labels[batch_ids.numpy()].tolist()
        ids += batch_ids.tolist()
    assert ids == list(range(10000))

    loader = train_loader(
        cifar_test_shards,
        256,
        build_transform("cifar", train=True),
        world_size=3,
        rank=2,
        num_workers=2,
    )
    batches = [len(b) for b, _, _ in loader]
    assert batches == [256] * steps_per_epoch(10000, 3, 256)
    assert loader.epoch_skipped == 0
