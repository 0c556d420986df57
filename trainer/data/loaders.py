"""The loaders over :class:`~trainer.data.stream.ShardStream`: :class:`ShardLoader` (the
``DataLoader`` around a stream, adding up skipped samples) and its constructors
:func:`train_loader` and :func:`eval_loader`. What an epoch reads, in which order, and how
corrupt samples are counted is described in :mod:`trainer.data.stream`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader

from trainer.data.index import ShardIndex, load_index
from trainer.data.stream import (
    DEFAULT_OPEN_SHARDS,
    DEFAULT_SHUFFLE_BUFFER,
    Batch,
    ShardStream,
)


class ShardLoader:
    """Iterate to get batches ``(images [B, 3, H, W] float, ids [B] int64, labels [B] int64)``.

    Attributes:
        stream: the :class:`ShardStream` (index, rank, world_size, batch_size, epoch).
        skipped: corrupt samples skipped since this loader was made (all workers).
        epoch_skipped: corrupt samples skipped during the current/last iteration.
    """

    def __init__(
        self,
        stream: ShardStream,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        multiprocessing_context: str | None = None,
    ):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        self.multiprocessing_context = multiprocessing_context if num_workers > 0 else None
        self.skipped = 0
        self.epoch_skipped = 0

    @property
    def index(self) -> ShardIndex:
        return self.stream.index

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan/shuffle the next iteration follows."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.stream.epoch = epoch

    def __len__(self) -> int:
        """Batches per epoch on this rank (:func:`steps_per_epoch` for training)."""
        return self.stream.num_batches()

    def __iter__(self) -> Iterator[Batch]:
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            multiprocessing_context=self.multiprocessing_context,
        )
        self.epoch_skipped = 0
        for images, ids, labels, skipped in loader:
            self.skipped += int(skipped)
            self.epoch_skipped += int(skipped)
            if len(ids):
                yield images, ids, labels


def train_loader(
    dataset: str | os.PathLike | ShardIndex,
    batch_size: int,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    open_shards: int = DEFAULT_OPEN_SHARDS,
    piece_size: int | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    fast_jpeg: bool = True,
    output: str = "tensor",
) -> ShardLoader:
    """Shuffled training batches; every rank yields exactly :func:`steps_per_epoch` full
    batches of ``batch_size`` per epoch (see the module docstring).

    Args:
        dataset: dataset location (directory, URL, ``pipe:`` template) or a loaded index.
        batch_size: ``B`` per rank.
        transform: PIL RGB image -> float tensor ``[3, H, W]`` (e.g.
            :func:`trainer.data.transforms.build_transform`); default ``ToTensor()``.
        rank, world_size: this process's rank and the number of ranks (explicit; no
            ``torch.distributed`` needed).
        num_workers: DataLoader worker processes (0 = in this process).
        seed: shuffling seed; with the epoch it fixes the order.
        shuffle_buffer: samples held (as bytes) by each worker's shuffle buffer (0: none). It
            fills completely before the first sample leaves, so the first batches mix too.
        open_shards: pieces of shards each worker reads at once, drawing every sample from a
            random one (1: one piece after another).
        piece_size: samples per piece; default 64 for local shards, 1024 for URLs (a piece
            costs a seek, a range request remotely); whole segments where shards cannot be
            entered at an offset (``pipe:`` or an index without offsets).
        pin_memory, prefetch_factor: passed to ``DataLoader``.
        fast_jpeg: see :func:`decode_image`.
        output: ``"tensor"``: images through ``transform``; ``"pixels"``: decoded uint8
            ``[B, H, W, 3]`` (images of one size); ``"bytes"``: a list of the encoded image
            files (for :class:`trainer.data.device_batches.DeviceBatches`).
    """
    stream = ShardStream(
        load_index(dataset),
        batch_size=batch_size,
        transform=transform,
        train=True,
        output=output,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        open_shards=open_shards,
        piece_size=piece_size,
        fast_jpeg=fast_jpeg,
    )
    return ShardLoader(stream, num_workers, pin_memory, prefetch_factor)


def eval_loader(
    dataset: str | os.PathLike | ShardIndex,
    batch_size: int,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    fast_jpeg: bool = True,
) -> ShardLoader:
    """Every instance exactly once across ranks, in id order, no shuffling; rank ``r`` gets
    ids ``[r*N//W, (r+1)*N//W)`` in batches of ``batch_size`` (the last may be short).
    Arguments as in :func:`train_loader`; use the test transform."""
    stream = ShardStream(
        load_index(dataset),
        batch_size=batch_size,
        transform=transform,
        train=False,
        rank=rank,
        world_size=world_size,
        fast_jpeg=fast_jpeg,
    )
    return ShardLoader(stream, num_workers, pin_memory, prefetch_factor)
