"""Noise ids for sampled objectives, drawn where the rows live (README, *The feature store*).

Rows ``[0, N)`` are split into contiguous shards by ``bounds`` (``bounds[s]`` to
``bounds[s+1]``). For a step with seed ``seed`` every party computes the same per-query
counts ``c[b, s] ~ Multinomial(K, size_s / N)``; shard ``s`` then draws its ``c[b, s]`` ids
uniformly from its own range with a generator seeded by ``(seed, s)``. The union over
shards is ``K`` i.i.d. uniform draws from ``[0, N)`` per query, and no shard needs the
others' ids. With ``shared=True`` one set of ``K`` ids serves every query of the batch.

Explicit ids (tests, reproducibility) are split by range instead of drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class NoiseSpec:
    """What noise one step scores.

    Attributes:
        num_negatives: ``K``, noise ids per query.
        shared: one set of ``K`` ids for the whole batch instead of ``K`` per query.
        seed: step seed from which counts and ids are drawn (ignored with ``explicit``).
        explicit: global noise ids, ``[B, K]`` (per query) or ``[K]`` (shared), int64.
    """

    num_negatives: int
    shared: bool
    seed: int
    explicit: Tensor | None = None


@dataclass(frozen=True)
class LocalNoise:
    """One shard's share of the noise.

    Attributes:
        ids: global row ids inside the shard, ``[Bq, C]`` int64, where ``Bq`` is ``B`` for
            per-query noise and 1 for shared noise; padded entries hold the shard's first id.
        valid: ``[Bq, C]`` bool marking real (not padded) entries, or None when all are real.
    """

    ids: Tensor
    valid: Tensor | None

    def to(self, device: torch.device | str) -> LocalNoise:
        """The same share with its tensors on ``device``."""
        valid = None if self.valid is None else self.valid.to(device)
        return LocalNoise(ids=self.ids.to(device), valid=valid)

    @property
    def count(self) -> int:
        """Number of real noise ids in this share."""
        return int(self.ids.numel() if self.valid is None else self.valid.sum())


def _seed_for(seed: int, *salt: int) -> int:
    """A 63-bit seed mixed from ``seed`` and ``salt`` (stable across processes)."""
    state = np.random.SeedSequence([seed % (2**63), *salt]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def shard_counts(spec: NoiseSpec, batch_size: int, bounds: list[int]) -> np.ndarray:
    """Per-query noise counts for each shard, ``[Bq, S]`` int64 (``Bq`` = 1 when shared).

    Every row sums to ``K``; the counts follow ``Multinomial(K, size_s / N)``.
    """
    sizes = np.diff(np.asarray(bounds, dtype=np.int64))
    rows = 1 if spec.shared else batch_size
    if len(sizes) == 1:
        return np.full((rows, 1), spec.num_negatives, dtype=np.int64)
    rng = np.random.default_rng(_seed_for(spec.seed, 0x5EED))
    return rng.multinomial(spec.num_negatives, sizes / sizes.sum(), size=rows).astype(np.int64)


def _pack(ids: Tensor, mask: Tensor, fill: int) -> LocalNoise:
    """Move the ``mask``-ed entries of each row of ``ids`` ``[Bq, K]`` to the front."""
    counts = mask.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    if width == ids.shape[1] and bool(mask.all()):
        return LocalNoise(ids=ids, valid=None)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    packed = torch.gather(ids, 1, order)
    valid = torch.arange(width).unsqueeze(0) < counts.unsqueeze(1)
    packed = torch.where(valid, packed, torch.full_like(packed, fill))
    return LocalNoise(ids=packed, valid=valid)


def local_noise(spec: NoiseSpec, batch_size: int, bounds: list[int], shard: int) -> LocalNoise:
    """The noise ids that shard ``shard`` scores for one step.

    Args:
        spec: the step's noise.
        batch_size: ``B``.
        bounds: shard boundaries, ``S + 1`` increasing ints from 0 to ``N``.
        shard: index of the shard asking.

    Returns:
        The shard's share; ``ids`` are global ids in ``[bounds[shard], bounds[shard+1])``.
    """
    lo, hi = bounds[shard], bounds[shard + 1]
    if spec.explicit is not None:
        ids = spec.explicit.reshape(1, -1) if spec.shared else spec.explicit
        ids = ids.to(device="cpu", dtype=torch.int64)
        return _pack(ids, (ids >= lo) & (ids < hi), lo)
    counts = torch.from_numpy(shard_counts(spec, batch_size, bounds)[:, shard])
    width = int(counts.max()) if counts.numel() else 0
    gen = torch.Generator().manual_seed(_seed_for(spec.seed, shard))
    ids = torch.randint(lo, max(hi, lo + 1), (counts.numel(), width), generator=gen)
    if bool((counts == width).all()):
        return LocalNoise(ids=ids, valid=None)
    valid = torch.arange(width).unsqueeze(0) < counts.unsqueeze(1)
    return LocalNoise(ids=torch.where(valid, ids, torch.full_like(ids, lo)), valid=valid)


def step_seed(seed: int, step: int, client: int = 0) -> int:
    """The seed of step ``step`` of a bank or store created with ``seed``.

    ``client`` tells apart clients of one store that step at the same step number: 0 (the
    bank, the client that created the store) keeps the plain per-step seed.
    """
    if client == 0:
        return _seed_for(seed, 0x57E9, step % (2**32), step >> 32)
    return _seed_for(seed, 0x57E9, step % (2**32), step >> 32, client % (2**32), client >> 32)


def sample_ids(n: int, num_rows: int, seed: int) -> Tensor:
    """``n`` ids drawn uniformly with replacement from ``[0, num_rows)``, ``[n]`` int64."""
    gen = torch.Generator().manual_seed(_seed_for(seed, 0x5A3F))
    return torch.randint(0, num_rows, (n,), generator=gen)


__all__ = ["LocalNoise", "NoiseSpec", "local_noise", "sample_ids", "shard_counts", "step_seed"]
