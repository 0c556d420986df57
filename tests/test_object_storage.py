"""``s3://`` and ``gs://`` data and checkpoints, through fsspec against real servers.

moto's S3 server (``s3_server``) and gcp-storage-emulator (``gcs_server``) run on
127.0.0.1; s3fs and gcsfs reach them as they would AWS S3 and Google Cloud Storage. Every
test runs against both: ``ShardIndex.load``, the loaders, ``latest_checkpoint`` /
``load_checkpoint``, ``ray_storage``.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from trainer.checkpoints import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    ray_storage,
    save_checkpoint,
)
from trainer.data import ShardIndex, eval_loader, train_loader
from trainer.shards.make import make_shards

N = 30


@pytest.fixture(scope="module", params=["s3", "gs"])
def bucket(request) -> str:
    """``s3://npid`` or ``gs://npid``, its server running."""
    request.getfixturevalue({"s3": "s3_server", "gs": "gcs_server"}[request.param])
    return f"{request.param}://npid"


def upload(local: Path, bucket: str, prefix: str) -> str:
    """Copy the directory ``local`` to ``<bucket>/<prefix>-<random>``; returns the URL."""
    url = f"{bucket}/{prefix}-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem(bucket.split("://")[0], skip_instance_cache=True)
    fs.put(str(local), url, recursive=True)
    return url


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, bucket) -> tuple[Path, str]:
    """``(local shards, the same shards in the bucket)``: 30 RGB images, 3 classes, 4 shards."""
    root = tmp_path_factory.mktemp("s3data")
    rng = np.random.default_rng(0)
    for i in range(N):
        folder = root / "src" / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    make_shards(root / "src", root / "shards", shard_size=8, progress=False)
    return root / "shards", upload(root / "shards", bucket, "ds")


def test_index_and_loaders_read_the_bucket_like_local(dataset) -> None:
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


def test_missing_dataset_names_the_url(bucket) -> None:
    with pytest.raises(ValueError, match=f"{bucket}/nothing-here"):
        ShardIndex.load(f"{bucket}/nothing-here")


def test_latest_and_load_checkpoint_in_a_bucket(tmp_path, bucket) -> None:
    model = {"w": torch.arange(6.0).view(2, 3)}
    for step in (4, 12, 8):
        state = TrainState(model, {"lr": 0.1}, step // 4, step, None, {"epoch": 0, "batch": 0})
        save_checkpoint(tmp_path / "ray" / f"checkpoint-{step:02d}", state, {"lr": 0.1})
    (tmp_path / "ray" / "half" / "meta.json").parent.mkdir()
    (tmp_path / "ray" / "half" / "meta.json").write_text('{"step": 99}')  # no state: skipped
    url = upload(tmp_path / "ray", bucket, "ckpt")
    found = latest_checkpoint(url)
    assert isinstance(found, str) and found.startswith(bucket) and found.endswith("checkpoint-12")
    state, config = load_checkpoint(found)
    assert state.step == 12 and config == {"lr": 0.1} and torch.equal(state.model["w"], model["w"])
    assert latest_checkpoint(f"{bucket}/no-checkpoints-here") is None
    with pytest.raises(FileNotFoundError, match="not a complete npid checkpoint"):
        load_checkpoint(f"{url}/half")


def test_ray_storage_gives_ray_a_working_filesystem(tmp_path, bucket) -> None:
    """``ray_storage``: local paths and s3:// go to Ray as they are; gs:// becomes a
    scheme-less path on a pyarrow filesystem over gcsfs that writes where fsspec reads."""
    assert ray_storage(str(tmp_path)) == (str(tmp_path), None)
    url = f"{bucket}/ray-{uuid.uuid4().hex[:8]}"
    path, filesystem = ray_storage(url)
    if bucket.startswith("s3://"):
        assert (path, filesystem) == (url, None)
        return
    assert path == url[len("gs://") :]
    with filesystem.open_output_stream(f"{path}/run/meta.json") as out:
        out.write(b'{"epoch": 1}')
    fs = fsspec.filesystem("gs", skip_instance_cache=True)
    assert fs.cat(f"{url}/run/meta.json") == b'{"epoch": 1}'
