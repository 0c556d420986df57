"""Batches from a decoded dataset: a full random permutation per epoch, augmented in batches.

:class:`CachedLoader` is the in-memory twin of :class:`trainer.data.loaders.ShardLoader` (same
interface: ``set_epoch``, ``len``, iteration over ``(images, ids, labels)``,
``epoch_skipped``) for datasets held as uint8 pixels (:mod:`trainer.data.cache`):

- **training**: every epoch is a uniformly random permutation of the instances that decode,
  drawn from ``(seed, epoch)``, exactly what ``DataLoader(shuffle=True)`` gives; rank ``r`` of
  ``W`` takes positions ``[r*n//W, (r+1)*n//W)`` of it and yields
  :func:`~trainer.data.order.steps_per_epoch` full batches of ``B`` (a rank short of
  ``steps * B`` samples repeats a few of its own, as the shard loader does);
- **evaluation**: ids in order, rank ``r`` takes ids ``[r*N//W, (r+1)*N//W)``;
- each batch is gathered where the pixels are (host or device), moved to ``device`` (pinned,
  non-blocking from the host) and transformed there by a
  :class:`~trainer.data.augment.BatchTransform` with per-sample parameters from a generator
  seeded by ``(seed, epoch, rank)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from trainer.data.augment import BatchTransform
from trainer.data.cache import DecodedDataset
from trainer.data.order import _SALT_AUGMENT, _SALT_PLAN, _mix, steps_per_epoch

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class CachedLoader:
    """Iterate to get ``(images [B, 3, S, S] float on device, ids [B] int64, labels [B] int64)``.

    Args:
        data: the decoded dataset.
        batch_size: ``B`` per rank.
        transform: the batched train or test transform.
        train: shuffled full batches (training) or every instance once in id order.
        rank, world_size: this rank and the number of ranks.
        seed: with the epoch, fixes the order and the augmentation draws.
        device: where batches are transformed and delivered.
    """

    def __init__(
        self,
        data: DecodedDataset,
        batch_size: int,
        transform: BatchTransform,
        *,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank}, {world_size}")
        self.data = data
        self.batch_size = batch_size
        self.transform = transform
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.device = torch.device(device)
        self.epoch = 0
        self._usable = torch.nonzero(data.seen).squeeze(1)
        if self._usable.numel() == 0:
            raise ValueError("no sample of the decoded dataset is usable")
        self.skipped = 0
        self.epoch_skipped = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation and augmentation the next iteration uses."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if self.train:
            return steps_per_epoch(self._usable.numel(), self.world_size, self.batch_size)
        return -(-self._eval_ids().numel() // self.batch_size)

    def epoch_ids(self) -> torch.Tensor:
        """This rank's ids for the current epoch, in delivery order (training: padded to
        ``len(self) * batch_size``)."""
        if not self.train:
            return self._eval_ids()
        gen = torch.Generator().manual_seed(_mix(self.seed, self.epoch, _SALT_PLAN))
        order = self._usable[torch.randperm(self._usable.numel(), generator=gen)]
        n, w, r = order.numel(), self.world_size, self.rank
        mine = order[r * n // w : (r + 1) * n // w]
        want = len(self) * self.batch_size
        if mine.numel() < want:  # top up with repeats of this rank's own first samples
            reps = -(-(want - mine.numel()) // max(1, mine.numel()))
            mine = torch.cat([mine, mine.repeat(reps)[: want - mine.numel()]])
        return mine

    def _eval_ids(self) -> torch.Tensor:
        n, w, r = self.data.seen.numel(), self.world_size, self.rank
        ids = torch.arange(r * n // w, (r + 1) * n // w)
        return ids[self.data.seen[ids]]

    def __iter__(self) -> Iterator[Batch]:
        ids = self.epoch_ids()
        gen = torch.Generator().manual_seed(
            _mix(self.seed, self.epoch, self.rank, 0, _SALT_AUGMENT)
        )
        skipped = self.data.num_skipped if self.rank == 0 else 0
        self.epoch_skipped = skipped
        self.skipped += skipped
        images = self.data.images
        pin = images.device.type == "cpu" and self.device.type == "cuda"
        for start in range(0, ids.numel(), self.batch_size):
            batch_ids = ids[start : start + self.batch_size]
            pixels = images.index_select(0, batch_ids.to(images.device))
            if pin:
                pixels = pixels.pin_memory()
            pixels = pixels.to(self.device, non_blocking=True)
            yield self.transform(pixels, gen), batch_ids, self.data.labels[batch_ids]


__all__ = ["CachedLoader"]
