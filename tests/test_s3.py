"""``s3://`` data and checkpoints, through s3fs against a real S3-compatible server.

moto's server runs on 127.0.0.1 (``s3_server`` fixture); the same code paths as against
AWS S3: ``ShardIndex.load``, the loaders, ``latest_checkpoint`` / ``load_checkpoint``.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from trainer.checkpoints import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.data import ShardIndex, eval_loader, train_loader
from trainer.make_shards import make_shards

N = 30


def upload(local: Path, prefix: str) -> str:
    """Copy the directory ``local`` to ``s3://npid/<prefix>-<random>``; returns the URL."""
    url = f"s3://npid/{prefix}-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3").put(str(local), url, recursive=True)
    return url


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, s3_server) -> tuple[Path, str]:
    """``(local shards, the same shards on S3)``: 30 RGB images, 3 classes, 4 shards."""
    root = tmp_path_factory.mktemp("s3data")
    rng = np.random.default_rng(0)
    for i in range(N):
        folder = root / "src" / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    make_shards(root / "src", root / "shards", shard_size=8, progress=False)
    return root / "shards", upload(root / "shards", "ds")


def test_index_and_loaders_read_s3_like_local(dataset) -> None:
    local, url = dataset
    here, there = ShardIndex.load(local), ShardIndex.load(url)
    assert there.num_instances == here.num_instances == N
    assert np.array_equal(there.labels, here.labels) and there.classes == here.classes
    got = [(x, i) for x, i, _ in eval_loader(url, 7)]
    want = [(x, i) for x, i, _ in eval_loader(local, 7)]
    assert torch.equal(torch.cat([i for _, i in got]), torch.arange(N))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, want))
    seen = torch.cat([ids for _, ids, _ in train_loader(url, 5, seed=1)])
    assert sorted(seen.tolist()) == list(range(N))  # every instance once per epoch


def test_missing_s3_dataset_names_the_url(s3_server) -> None:
    with pytest.raises(ValueError, match="s3://npid/nothing-here"):
        ShardIndex.load("s3://npid/nothing-here")


def test_latest_and_load_checkpoint_on_s3(tmp_path, s3_server) -> None:
    model = {"w": torch.arange(6.0).view(2, 3)}
    for step in (4, 12, 8):
        state = TrainState(model, {"lr": 0.1}, step // 4, step, None, {"epoch": 0, "batch": 0})
        save_checkpoint(tmp_path / "ray" / f"checkpoint-{step:02d}", state, {"lr": 0.1})
    (tmp_path / "ray" / "half" / "meta.json").parent.mkdir()
    (tmp_path / "ray" / "half" / "meta.json").write_text('{"step": 99}')  # no state: skipped
    url = upload(tmp_path / "ray", "ckpt")
    found = latest_checkpoint(url)
    assert isinstance(found, str) and found.startswith("s3://") and found.endswith("checkpoint-12")
    state, config = load_checkpoint(found)
    assert state.step == 12 and config == {"lr": 0.1} and torch.equal(state.model["w"], model["w"])
    assert latest_checkpoint("s3://npid/no-checkpoints-here") is None
    with pytest.raises(FileNotFoundError, match="not a complete npid checkpoint"):
        load_checkpoint(f"{url}/half")
