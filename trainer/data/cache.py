"""Decoded datasets: a sharded dataset decoded once into uint8 pixels ``[N, H, W, 3]``.

Small datasets (CIFAR-10/100, STL-10, the built-in digits, any subset that fits) do not need
to be decoded and augmented image by image every epoch: :func:`load_decoded` decodes the
shards once into one uint8 array (row ``i`` = instance id ``i``), stores it in a cache
directory under the dataset's :func:`fingerprint`, and maps it back on later runs. A changed
dataset (other ``dataset.json`` or ``index.parquet``, or, for local shards, another shard
size or modification time) has another fingerprint, so it is never served stale.

Cache layout: ``CACHE/<fingerprint>/images.npy`` (uint8 ``[N, H, W, 3]``), ``seen.npy`` (bool
``[N]``, false for samples that did not decode: they are skipped and counted) and
``meta.json``; the directory appears under its final name only when complete, and a file lock
makes concurrent workers on one machine decode it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featurestore.files import is_url, make_temp_dir
from trainer.data.index import ShardIndex
from trainer.data.loaders import eval_loader

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "npid" / "decoded"
DECODE_BATCH = 512


class DataCacheError(ValueError):
    """The dataset cannot be held decoded (images of different sizes, too large)."""


@dataclass(frozen=True)
class DecodedDataset:
    """A dataset's pixels and labels, indexed by instance id.

    Attributes:
        images: uint8 ``[N, H, W, 3]`` (host memory, possibly memory-mapped, or a device).
        labels: int64 ``[N]`` (``-1`` unknown).
        seen: bool ``[N]``: false for samples that did not decode.
        fingerprint: the dataset's :func:`fingerprint`.
    """

    images: torch.Tensor
    labels: torch.Tensor
    seen: torch.Tensor
    fingerprint: str

    @property
    def num_skipped(self) -> int:
        """Samples that did not decode (left out of every epoch)."""
        return int((~self.seen).sum())

    def to(self, device: torch.device | str) -> DecodedDataset:
        """The same dataset with its pixels on ``device``."""
        return DecodedDataset(self.images.to(device), self.labels, self.seen, self.fingerprint)


def cache_dir() -> Path:
    """``$NPID_CACHE_DIR/decoded`` when set, else ``~/.cache/npid/decoded``."""
    root = os.environ.get("NPID_CACHE_DIR")
    return Path(root) / "decoded" if root else DEFAULT_CACHE_DIR


def fingerprint(index: ShardIndex) -> str:
    """A digest of what defines a dataset's pixels: ``dataset.json``, ``index.parquet`` and,
    for local shards, each shard's size and modification time."""
    h = hashlib.sha256()
    for name in ("dataset.json", "index.parquet"):
        h.update(index.location.read_bytes(name))
    for shard in index.shards:
        url = index.location.url(shard)
        if not is_url(url):
            stat = os.stat(url)
            h.update(f"{shard}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            h.update(shard.encode())
    return h.hexdigest()[:24]


def decoded_size(index: ShardIndex) -> tuple[int, int] | None:
    """``(H, W)`` when ``dataset.json`` says every image has the same square size, else None."""
    lo, hi = index.meta.get("image_size_min"), index.meta.get("image_size_max")
    if lo and hi and int(lo) == int(hi):
        return int(lo), int(lo)
    return None


def decoded_bytes(index: ShardIndex) -> int | None:
    """Bytes of the decoded array, when the image size is known up front."""
    size = decoded_size(index)
    return None if size is None else index.num_instances * size[0] * size[1] * 3


def _pixels(image) -> torch.Tensor:
    """PIL RGB image -> uint8 ``[H, W, 3]`` tensor (a picklable loader transform)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())


def _decode(index: ShardIndex, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode every sample of ``index``: ``(images [N, H, W, 3] uint8, seen [N] bool)``."""
    images: np.ndarray | None = None
    seen = np.zeros(index.num_instances, dtype=bool)
    loader = eval_loader(index, DECODE_BATCH, _pixels, num_workers=workers)
    try:
        for batch, ids, _labels in loader:
            if images is None:
                images = np.zeros((index.num_instances, *batch.shape[1:]), dtype=np.uint8)
            elif tuple(batch.shape[1:]) != images.shape[1:]:
                raise DataCacheError(
                    f"{index.location.location}: images differ in size ({tuple(batch.shape[1:3])}"
                    f" and {images.shape[1:3]}); a decoded cache needs one size"
                )
            images[ids.numpy()] = batch.numpy()
            seen[ids.numpy()] = True
    except ValueError as exc:  # the loader's "images of one batch differ in shape"
        if isinstance(exc, DataCacheError):
            raise
        raise DataCacheError(
            f"{index.location.location}: images differ in size; a decoded cache needs one size"
        ) from None
    if images is None:
        raise DataCacheError(f"{index.location.location}: no sample decodes")
    return images, seen


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load_decoded(
    index: ShardIndex, root: str | os.PathLike | None = None, workers: int = 0
) -> DecodedDataset:
    """The decoded dataset, from the cache under ``root`` (default :func:`cache_dir`) or
    decoded now and cached.

    Raises:
        DataCacheError: images of different sizes, or nothing decodes.
    """
    base = Path(root) if root is not None else cache_dir()
    key = fingerprint(index)
    final = base / key
    with _locked(base / f".{key}.lock"):
        if not (final / "meta.json").is_file():
            logger.info(
                "decoding %d images of %s once into %s",
                index.num_instances,
                index.location.location,
                final,
            )
            images, seen = _decode(index, workers)
            tmp = make_temp_dir(base, f".{key}.")
            try:
                np.save(tmp / "images.npy", images)
                np.save(tmp / "seen.npy", seen)
                meta = {
                    "dataset": index.location.location,
                    "shape": list(images.shape),
                    "skipped": int((~seen).sum()),
                }
                (tmp / "meta.json").write_text(json.dumps(meta))
                if final.exists():  # an incomplete directory left by a killed run
                    shutil.rmtree(final)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    images = np.load(final / "images.npy", mmap_mode="r")
    seen = np.load(final / "seen.npy")
    if images.shape[0] != index.num_instances or seen.shape[0] != index.num_instances:
        raise DataCacheError(f"decoded cache {final} does not match {index.location.location}")
    return DecodedDataset(
        images=torch.from_numpy(np.array(images)),  # read into memory (a writable copy)
        labels=torch.from_numpy(index.labels.astype(np.int64)),
        seen=torch.from_numpy(seen),
        fingerprint=key,
    )


__all__ = [
    "DataCacheError",
    "DecodedDataset",
    "cache_dir",
    "decoded_bytes",
    "decoded_size",
    "fingerprint",
    "load_decoded",
]
