"""Decoded datasets (trainer.data.cache) and their loader (trainer.data.memory_loader), on real
shards written by make_shards: pixels equal to PIL's decode, a fingerprint that never
serves a changed dataset, corrupt samples skipped and counted, and epochs that are full
random permutations split evenly across ranks (the property the class-sorted shard stream
lacked: batches mix classes as DataLoader(shuffle=True) does)."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data import ShardIndex
from trainer.data.augment import build_batch_transform
from trainer.data.cache import DataCacheError, decoded_bytes, fingerprint, load_decoded
from trainer.data.memory_loader import CachedLoader
from trainer.shards.make import make_shards

CLASSES = 4


def _write_source(root: Path, n: int, size=(12, 12), odd_size_at: int | None = None) -> Path:
    src = root / "src"
    rng = np.random.default_rng(0)
    for i in range(n):
        label = i * CLASSES // n  # class-sorted ids, as an ImageFolder gives
        shape = (size[0] + 4, size[1], 3) if i == odd_size_at else (*size, 3)
        pixels = rng.integers(0, 255, shape, dtype=np.uint8)
        (src / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(src / f"c{label}" / f"{i:03d}.png")
    return src


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, Path]:
    """80 class-sorted 12×12 images in 3 shards: ``(source, shards)``."""
    src = _write_source(tmp_path, 80)
    make_shards(src, tmp_path / "shards", shard_size=30, order="sorted", progress=False)
    return src, tmp_path / "shards"


def test_decoded_pixels_equal_pil_and_come_back_from_the_cache(dataset, tmp_path, monkeypatch):
    src, shards = dataset
    index = ShardIndex.load(shards)
    data = load_decoded(index, tmp_path / "cache")
    assert data.images.shape == (80, 12, 12, 3) and data.images.dtype == torch.uint8
    assert decoded_bytes(index) == 80 * 12 * 12 * 3 and data.num_skipped == 0
    files = sorted(src.rglob("*.png"))
    for iid in (0, 41, 79):
        want = np.asarray(Image.open(files[iid]).convert("RGB"))
        assert np.array_equal(data.images[iid].numpy(), want)
    assert data.labels.tolist() == index.labels.tolist()

    import trainer.data.cache as data_cache

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again although cached")

    monkeypatch.setattr(data_cache, "_decode", no_decode)
    again = load_decoded(index, tmp_path / "cache")
    assert torch.equal(again.images, data.images)


def test_a_changed_dataset_gets_another_fingerprint(dataset, tmp_path):
    _src, shards = dataset
    before = fingerprint(ShardIndex.load(shards))
    meta = json.loads((shards / "dataset.json").read_text())
    meta["created"] = "another conversion"
    (shards / "dataset.json").write_text(json.dumps(meta))
    assert fingerprint(ShardIndex.load(shards)) != before
    touched = fingerprint(ShardIndex.load(shards))
    shard = shards / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes())  # same bytes, a new modification time
    import os

    os.utime(shard, ns=(1, 1))
    assert fingerprint(ShardIndex.load(shards)) != touched


def test_corrupt_sample_is_skipped_and_counted(dataset, tmp_path):
    _src, shards = dataset
    shard = shards / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    with shard.open("r+b") as fh:
        fh.seek(member.offset_data)
        fh.write(b"\0" * member.size)
    data = load_decoded(ShardIndex.load(shards), tmp_path / "cache")
    assert data.num_skipped == 1 and not bool(data.seen[0])
    loader = CachedLoader(data, 16, build_batch_transform("cifar", True, 12), train=True)
    ids = torch.cat([b[1] for b in loader])
    assert 0 not in ids.tolist() and loader.epoch_skipped == 1


def test_images_of_two_sizes_cannot_be_cached(tmp_path):
    src = _write_source(tmp_path, 20, odd_size_at=7)
    make_shards(src, tmp_path / "shards", shard_size=30, order="sorted", progress=False)
    index = ShardIndex.load(tmp_path / "shards")
    assert decoded_bytes(index) is None
    with pytest.raises(DataCacheError, match="differ in size"):
        load_decoded(index, tmp_path / "cache")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_training_epochs_are_permutations_split_evenly(dataset, tmp_path, world):
    _src, shards = dataset
    data = load_decoded(ShardIndex.load(shards), tmp_path / "cache")
    train = build_batch_transform("cifar", True, 12)
    batch = 8
    seen_epochs = []
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world):
            loader = CachedLoader(data, batch, train, train=True, rank=rank, world_size=world)
            loader.set_epoch(epoch)
            batches = list(loader)
            steps = math.ceil(math.ceil(80 / world) / batch)
            assert len(batches) == len(loader) == steps
            assert all(x.shape == (batch, 3, 12, 12) for x, _, _ in batches)
            per_rank.append(torch.cat([ids for _, ids, _ in batches]))
        everything = torch.cat(per_rank)
        assert set(everything.tolist()) == set(range(80))  # every instance, every epoch
        firsts = [set(p.tolist()) for p in per_rank]
        assert sum(len(f) for f in firsts) == 80  # ranks' own samples are disjoint
        seen_epochs.append(everything)
    assert not torch.equal(seen_epochs[0], seen_epochs[1])  # a new order each epoch
    again = CachedLoader(data, batch, train, train=True, rank=0, world_size=world)
    again.set_epoch(1)
    assert torch.equal(
        torch.cat([ids for _, ids, _ in again]), seen_epochs[1][: len(again) * batch]
    )


def test_batches_mix_classes_like_a_shuffled_dataloader(dataset, tmp_path):
    """Ids are class-sorted; a batch of 16 from a uniform permutation of 80 images in 4
    classes holds more than 2 classes on average (a class-sorted stream gives about 1)."""
    _src, shards = dataset
    data = load_decoded(ShardIndex.load(shards), tmp_path / "cache")
    loader = CachedLoader(data, 16, build_batch_transform("cifar", True, 12), train=True)
    counts = []
    for epoch in range(10):
        loader.set_epoch(epoch)
        counts += [len(set(labels.tolist())) for _, _, labels in loader]
    assert np.mean(counts) > 3.5


def test_evaluation_visits_ids_in_order_once_across_ranks(dataset, tmp_path):
    _src, shards = dataset
    data = load_decoded(ShardIndex.load(shards), tmp_path / "cache")
    test = build_batch_transform("cifar", False)
    ids = []
    for rank in range(3):
        loader = CachedLoader(data, 7, test, train=False, rank=rank, world_size=3)
        for _x, batch_ids, labels in loader:
            assert torch.equal(labels, data.labels[batch_ids])
            ids += batch_ids.tolist()
    assert ids == list(range(80))
