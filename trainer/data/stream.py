"""Streaming loader for the webdataset shards written by :mod:`trainer.make_shards`.

This module holds the per-worker stream (:class:`ShardStream`); the loader around it
(:class:`ShardLoader`, :func:`train_loader`, :func:`eval_loader`) lives in
:mod:`trainer.data.loaders` (and stays importable from here). It builds on the other
modules of :mod:`trainer.data`:

- :mod:`trainer.data.shard_files`: dataset locations (directory, URL, ``pipe:`` template), URL
  opening, the tar reader;
- :mod:`trainer.data.index`: :class:`ShardIndex`, a dataset's metadata;
- :mod:`trainer.data.order`: segments, epoch orders and plans, :func:`steps_per_epoch`;
- :mod:`trainer.data.segments`: reading segments of shards, skipping corrupt samples;
- :mod:`trainer.data.decode`: :func:`decode_image`, :func:`to_rgb`, the batched tensor tail.

Batches are ``(images, ids, labels)``: ``images`` float ``[B, 3, H, W]`` (the transform's
output), ``ids`` int64 ``[B]`` (instance ids), ``labels`` int64 ``[B]`` (``-1`` = unknown).
Every image becomes RGB first (:func:`decode_image`, any PIL mode including ``I;16``).

**Training epochs** (:func:`train_loader`). Rank ``r`` of ``W`` takes its part of the epoch
order (shards shuffled and rotated from ``(seed, epoch)``, ranks balanced to within one sample;
see :mod:`trainer.data.order`). Every rank yields exactly :func:`steps_per_epoch`
``= ceil(ceil(N / W) / B)`` full batches of ``B``: a rank short of ``steps * B`` samples tops
its last batches up with repeats of a few of its own samples (fewer than ``B + 1`` per rank),
so every instance is visited at least once per epoch and no rank waits for another in DDP.
Inside a rank, batch ``j`` comes from DataLoader worker ``j % num_workers`` (the order
DataLoader collects them in); each worker gets a contiguous, proportional part of the rank's
samples, cuts it into pieces (64 samples locally), reads the pieces in a random order with
``open_shards`` of them open at once (each sample from a random open piece), streams that
through a shuffle buffer and collates whole batches itself. So batches mix classes even on
shards written in class order (webdataset's shard shuffle + sample buffer, with pieces in
place of whole shards where shards can be entered at an offset). Corrupt
samples are replaced by further samples, so step counts hold even then. The order depends
only on ``(seed, epoch, rank, world_size, num_workers, batch_size, shuffle_buffer,
open_shards, piece_size)``;
augmentation draws are seeded the same way inside worker processes (with ``num_workers=0``
they use the caller's global torch RNG). Call :meth:`ShardLoader.set_epoch` before each
epoch, as with ``DistributedSampler``.

**Evaluation** (:func:`eval_loader`): no shuffling, every instance exactly once across ranks,
in id order: rank ``r`` takes ids ``[r*N//W, (r+1)*N//W)`` (ranks' batch counts may differ
by one), batches are consecutive id ranges, the last one may be short.

**Corrupt samples** (undecodable bytes, a missing image field, a key that is not in
the index, samples absent from a truncated shard) are skipped, logged (the first few per
worker) and counted: each batch carries its worker's count of samples skipped since the
previous batch, and :class:`ShardLoader` adds them up in the main process as
``loader.skipped`` (since creation) and ``loader.epoch_skipped`` (current iteration).
A shard that cannot be opened at all is an error.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms import ToTensor

from featurestore.files import is_url
from trainer.data.decode import (
    _BadSampleError,
    _image_field,
    _TensorTail,
    _uint8_hwc,
    decode_image,
)
from trainer.data.index import ShardIndex
from trainer.data.order import (
    _SALT_AUGMENT,
    _SALT_BUFFER,
    Segment,
    _id_segments,
    _mix,
    _worker_share,
    epoch_order,
    plan_epoch,
    steps_per_epoch,
)
from trainer.data.segments import (
    _LOGGED_SKIPS,
    _SegmentReader,
    _SkipCounter,
)

logger = logging.getLogger(__name__)

DEFAULT_SHUFFLE_BUFFER = 2000
DEFAULT_OPEN_SHARDS = 16
OUTPUTS = ("tensor", "pixels", "bytes")
PIECE_LOCAL, PIECE_REMOTE = 64, 1024
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------- the stream


def _shuffled(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle with a buffer of ``size`` items (a full shuffle when all items fit)."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


class ShardStream(IterableDataset):
    """The per-worker part of a loader: yields collated batches
    ``(images [b, 3, H, W], ids [b], labels [b], skipped: int)``; see the module docstring.
    Used through :class:`ShardLoader`; ``b`` is 0 only for an eval batch whose every sample
    was corrupt."""

    def __init__(
        self,
        index: ShardIndex,
        *,
        batch_size: int,
        transform: Callable[[Image.Image], torch.Tensor] | None,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        open_shards: int = DEFAULT_OPEN_SHARDS,
        piece_size: int | None = None,
        fast_jpeg: bool = True,
        output: str = "tensor",
    ):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if shuffle_buffer < 0 or open_shards < 1:
            raise ValueError(
                f"need shuffle_buffer >= 0 and open_shards >= 1, got {shuffle_buffer}, "
                f"{open_shards}"
            )
        if piece_size is None:
            remote = is_url(index.location.location) or index.location.location.startswith("pipe:")
            piece_size = PIECE_REMOTE if remote else PIECE_LOCAL
        self.index = index
        self.batch_size = batch_size
        self.transform = transform if transform is not None else ToTensor()
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.open_shards = open_shards
        self.piece_size = piece_size
        self.fast_jpeg = fast_jpeg
        self.output = output
        self.epoch = 0
        self._pil_transform, self._tail = _TensorTail.split(self.transform)

    def rank_instances(self) -> int:
        """Instances this rank covers per epoch (before top-up)."""
        n, w, r = self.index.num_instances, self.world_size, self.rank
        return (r + 1) * n // w - r * n // w

    def num_batches(self) -> int:
        """Batches this rank yields per epoch."""
        if self.train:
            return steps_per_epoch(self.index.num_instances, self.world_size, self.batch_size)
        return math.ceil(self.rank_instances() / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:  # own process: seeding its global RNG touches nobody else
            torch.manual_seed(_mix(self.seed, self.epoch, self.rank, worker, _SALT_AUGMENT))
        where = f"rank {self.rank} worker {worker}"
        skips = _SkipCounter(where)
        reader = _SegmentReader(self.index, skips)
        try:
            if self.train:
                yield from self._train_batches(reader, skips, worker, num_workers)
            else:
                yield from self._eval_batches(reader, skips, worker, num_workers)
        finally:
            reader.close()
        if skips.total > _LOGGED_SKIPS:
            logger.warning("%s: skipped %d samples in total this epoch", where, skips.total)

    def _prepare(
        self, iid: int, fields: dict[str, bytes], skips: _SkipCounter
    ) -> tuple[torch.Tensor | np.ndarray, int, int] | None:
        """``(image, id, label)``, or ``None`` (counted) for a corrupt sample. ``image`` is the
        transform's tensor, or uint8 pixels awaiting the batched ``ToTensor``/``Normalize``."""
        try:
            data, label = _image_field(fields), int(self.index.labels[iid])
            if self.output == "bytes":  # decoded (and checked) on the device
                return data, iid, label
            try:
                image = decode_image(data, self.fast_jpeg)
            except Exception as exc:  # PIL raises many types for bad bytes
                raise _BadSampleError(f"{type(exc).__name__}: {exc}") from None
        except _BadSampleError as exc:
            skips.add(1, f"id {iid}: {exc}", self.index.location.location)
            return None
        if self.output == "pixels":
            return np.asarray(image), iid, label
        if self._tail is None:
            return self.transform(image), iid, label
        image = self._pil_transform(image)
        pixels = _uint8_hwc(image)
        if pixels is None:  # not 8-bit RGB/L after the PIL part: the tail per sample
            return self._tail.ops(image), iid, label
        return pixels, iid, label

    def _collate(
        self, items: list[tuple[torch.Tensor | np.ndarray, int, int]], skipped: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        ids = torch.tensor([i for _, i, _ in items], dtype=torch.int64)
        labels = torch.tensor([y for _, _, y in items], dtype=torch.int64)
        if not items:
            return torch.empty(0), ids, labels, skipped
        images = [x for x, _, _ in items]
        if self.output == "bytes":
            return images, ids, labels, skipped
        if self.output == "pixels":
            if len({x.shape for x in images}) == 1:
                return torch.from_numpy(np.stack(images)), ids, labels, skipped
            raise ValueError(
                f"images of one batch differ in shape {sorted({x.shape for x in images})}: "
                f"output='pixels' needs images of one size (use output='bytes')"
            )
        try:
            if self._tail is not None and all(isinstance(x, np.ndarray) for x in images):
                return self._tail(images), ids, labels, skipped
            if self._tail is not None:  # some samples went through the per-sample tail
                images = [x if isinstance(x, torch.Tensor) else self._tail([x])[0] for x in images]
            images = torch.stack(images)
        except (RuntimeError, ValueError):
            shapes = sorted({tuple(x.shape) for x, _, _ in items})
            raise ValueError(
                f"images of one batch differ in shape {shapes}; use a transform with a fixed "
                f"output size"
            ) from None
        return images, ids, labels, skipped

    def _train_batches(
        self, reader: _SegmentReader, skips: _SkipCounter, worker: int, num_workers: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        sizes = self.index.shard_sizes
        rank_segments = plan_epoch(sizes, self.world_size, self.seed, self.epoch)[self.rank]
        steps = self.num_batches()
        segments, target = _worker_share(rank_segments, steps, self.batch_size, num_workers, worker)
        if target == 0:
            return
        rng = random.Random(_mix(self.seed, self.epoch, self.rank, worker, _SALT_BUFFER))
        batch: list[tuple[torch.Tensor, int, int]] = []
        kept: list[tuple[int, dict[str, bytes]]] = []  # the first good samples, for top-up
        emitted = 0
        mixed = reader.read_mixed(segments, rng, self.piece_size, self.open_shards)
        for iid, fields in _shuffled(mixed, self.shuffle_buffer, rng):
            item = self._prepare(iid, fields, skips)
            if item is None:
                continue
            if len(kept) < self.batch_size:
                kept.append((iid, fields))
            batch.append(item)
            emitted += 1
            if len(batch) == self.batch_size:
                yield self._collate(batch, skips.take())
                batch = []
        if emitted < target and not kept:
            kept = self._fallback_samples(rank_segments)
        for i in range(target - emitted):  # top-up: repeats of this worker's first samples
            item = self._prepare(*kept[i % len(kept)], skips)
            assert item is not None  # decoded before
            batch.append(item)
            if len(batch) == self.batch_size:
                yield self._collate(batch, skips.take())
                batch = []

    def _fallback_samples(self, rank_segments: list[Segment]) -> list[tuple[int, dict]]:
        """Good samples for a worker that has none of its own (tiny datasets)."""
        everything = epoch_order(self.index.shard_sizes, shuffle=False)
        quiet = _SkipCounter("fallback")
        for segments in (rank_segments, everything):
            reader = _SegmentReader(self.index, quiet)
            found = []
            try:
                for iid, fields in reader.read(segments):
                    if self._prepare(iid, fields, quiet) is not None:
                        found.append((iid, fields))
                        if len(found) == self.batch_size:
                            break
            finally:
                reader.close()
            if found:
                return found
        raise RuntimeError(f"no sample of {self.index.location.location} decodes")

    def _eval_batches(
        self, reader: _SegmentReader, skips: _SkipCounter, worker: int, num_workers: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        n, w, r = self.index.num_instances, self.world_size, self.rank
        first, last = r * n // w, (r + 1) * n // w
        for j in range(worker, self.num_batches(), num_workers):
            lo = first + j * self.batch_size
            hi = min(lo + self.batch_size, last)
            items = [
                item
                for iid, fields in reader.read(_id_segments(self.index, lo, hi))
                if (item := self._prepare(iid, fields, skips)) is not None
            ]
            yield self._collate(items, skips.take())


def __getattr__(name: str) -> Any:
    """The loaders moved to :mod:`trainer.data.loaders`; they stay importable from here."""
    if name in ("ShardLoader", "train_loader", "eval_loader"):
        from trainer.data import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
