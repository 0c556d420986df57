"""Epoch plans: which samples each rank and DataLoader worker reads, as segments.

**Training epochs.** The epoch order is the concatenation of all shards in a random order,
rotated by a random offset, both drawn from ``(seed, epoch)`` (:func:`epoch_order`). Rank
``r`` of ``W`` takes samples ``[r*N//W, (r+1)*N//W)`` of it, so ranks are balanced by sample
counts to within one sample, whatever the shard sizes (:func:`plan_epoch`; at most one shard
per rank boundary is read in part by two ranks). Every rank yields exactly
:func:`steps_per_epoch` ``= ceil(ceil(N / W) / B)`` full batches of ``B``. Inside a rank,
batch ``j`` comes from DataLoader worker ``j % num_workers`` (the order DataLoader collects
them in); each worker gets a contiguous, proportional part of the rank's samples
(:func:`_worker_share`).

**Evaluation**: rank ``r`` takes ids ``[r*N//W, (r+1)*N//W)``, batches are consecutive id
ranges (:func:`_id_segments`).

Seeds are derived with :func:`_mix` from ints and a salt per use (plan, shuffle buffer,
augmentation), so the order depends only on the loader's settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from trainer.data.index import ShardIndex

_SALT_PLAN, _SALT_BUFFER, _SALT_AUGMENT = 0x5EED01, 0x5EED02, 0x5EED03

Segment = tuple[int, int, int]
"""``(shard, lo, hi)``: positions ``[lo, hi)`` of shard ``shard``'s samples (in id order)."""


def _mix(*values: int) -> int:
    """A 63-bit seed from non-negative ints."""
    return int(np.random.SeedSequence(list(values)).generate_state(2, np.uint64)[0] >> 1)


def take_segments(segments: Sequence[Segment], start: int, stop: int) -> list[Segment]:
    """Samples ``[start, stop)`` of the concatenation of ``segments``, as segments."""
    out: list[Segment] = []
    pos = 0
    for shard, lo, hi in segments:
        a, b = max(start, pos), min(stop, pos + hi - lo)
        if a < b:
            out.append((shard, lo + a - pos, lo + b - pos))
        pos += hi - lo
        if pos >= stop:
            break
    return out


def epoch_order(
    shard_sizes: Sequence[int], seed: int = 0, epoch: int = 0, shuffle: bool = True
) -> list[Segment]:
    """All samples of an epoch as segments: shards in a random order from ``(seed, epoch)``,
    rotated by a random offset so rank boundaries move between epochs; index order when
    ``shuffle`` is false."""
    segments = [(s, 0, n) for s, n in enumerate(shard_sizes) if n > 0]
    total = sum(shard_sizes)
    if not shuffle or total == 0:
        return segments
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    rng = np.random.default_rng(_mix(seed, epoch, _SALT_PLAN))
    segments = [segments[i] for i in rng.permutation(len(segments))]
    offset = int(rng.integers(total))
    return take_segments(segments, offset, total) + take_segments(segments, 0, offset)


def plan_epoch(
    shard_sizes: Sequence[int], world_size: int, seed: int = 0, epoch: int = 0
) -> list[list[Segment]]:
    """Split a training epoch over ranks: rank ``r`` gets samples ``[r*N//W, (r+1)*N//W)`` of
    :func:`epoch_order`, i.e. ``floor(N/W)`` or ``ceil(N/W)`` samples each.

    Returns:
        ``world_size`` lists of segments.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    order = epoch_order(shard_sizes, seed, epoch)
    n = sum(shard_sizes)
    return [
        take_segments(order, r * n // world_size, (r + 1) * n // world_size)
        for r in range(world_size)
    ]


def steps_per_epoch(num_instances: int, world_size: int, batch_size: int) -> int:
    """Training batches every rank yields per epoch: ``ceil(ceil(N / W) / B)``.

    Rounding up (instead of dropping the remainder) visits every instance at least once per
    epoch; ranks short of ``steps * B`` samples repeat a few of their own.
    """
    if num_instances < 1 or world_size < 1 or batch_size < 1:
        raise ValueError(
            f"need num_instances, world_size, batch_size >= 1, got "
            f"{num_instances}, {world_size}, {batch_size}"
        )
    return math.ceil(math.ceil(num_instances / world_size) / batch_size)


def _worker_share(
    rank_segments: list[Segment], steps: int, batch_size: int, num_workers: int, worker: int
) -> tuple[list[Segment], int]:
    """A worker's samples of the rank and how many it must yield.

    Worker ``k`` yields batches ``k, k + K, ...`` of the rank (DataLoader's collection order),
    i.e. ``target = len(range(k, steps, K)) * B`` samples; the rank's ``n <= steps * B`` samples
    are cut into contiguous parts proportional to the targets.
    """
    n = sum(hi - lo for _, lo, hi in rank_segments)
    total = steps * batch_size
    targets = [len(range(k, steps, num_workers)) * batch_size for k in range(num_workers)]
    before = sum(targets[:worker])
    lo, hi = n * before // total, n * (before + targets[worker]) // total
    return take_segments(rank_segments, lo, hi), targets[worker]


def _id_segments(index: ShardIndex, lo: int, hi: int) -> list[Segment]:
    """Ids ``[lo, hi)`` in id order as segments (runs of consecutive positions of a shard)."""
    shard = index.id_shard[lo:hi]
    pos = index.id_pos[lo:hi]
    if len(shard) == 0:
        return []
    breaks = np.flatnonzero((np.diff(shard) != 0) | (np.diff(pos) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(shard)]))
    return [
        (int(shard[a]), int(pos[a]), int(pos[b - 1]) + 1) for a, b in zip(starts, ends, strict=True)
    ]
