"""One contiguous range of bank rows and the operations on it.

:class:`BankShard` is what a store shard actor holds, and what :class:`MemoryBank` holds
for the whole bank (one shard covering ``[0, N)``). It owns its rows; every method that
changes them is explicit (``set``, ``update``) and runs under ``torch.no_grad``.
Inputs reach it already validated (:mod:`featurestore.validation`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from featurestore.noise import LocalNoise
from featurestore.objectives import Objective
from featurestore.statistics import (
    DEFAULT_MEMORY_BUDGET,
    PartialStats,
    expsum_sampled,
    shard_statistics,
)

#: Initial rows are generated in blocks of this many rows, each seeded by its index, so a
#: row's initial value depends on ``(seed, id)`` alone and not on how rows are sharded.
INIT_BLOCK = 65536


def initial_rows(
    seed: int, lo: int, hi: int, dim: int, normalize: bool = False, dtype=torch.float32
) -> Tensor:
    """Reference initial rows ``[lo, hi)``: uniform in ``[-a, a]``, ``a = 1/sqrt(d/3)``.

    Returns:
        ``[hi - lo, dim]`` tensor of ``dtype`` (unit rows when ``normalize``).
    """
    bound = 1.0 / math.sqrt(dim / 3)
    out = torch.empty(hi - lo, dim, dtype=dtype)
    block = lo // INIT_BLOCK
    while block * INIT_BLOCK < hi:
        b0 = block * INIT_BLOCK
        gen = torch.Generator().manual_seed((seed * 1_000_003 + block) % (2**63))
        rows = torch.rand(INIT_BLOCK, dim, generator=gen).mul_(2 * bound).sub_(bound)
        if normalize:
            rows = torch.nn.functional.normalize(rows, dim=1)
        start, stop = max(lo, b0), min(hi, b0 + INIT_BLOCK)
        out[start - lo : stop - lo] = rows[start - b0 : stop - b0]
        block += 1
    return out


def dedupe_last(ids: Tensor) -> Tensor:
    """Positions of the last occurrence of each distinct id in ``ids`` ``[B]``, ascending."""
    if ids.numel() <= 1:
        return torch.arange(ids.numel())
    rev = torch.flip(ids, dims=[0])
    uniq, inverse = torch.unique(rev, return_inverse=True)
    first_in_rev = torch.full((uniq.numel(),), rev.numel(), dtype=torch.int64)
    first_in_rev.scatter_reduce_(0, inverse, torch.arange(rev.numel()), reduce="amin")
    return torch.sort(ids.numel() - 1 - first_in_rev).values


class BankShard:
    """Rows ``[lo, lo + n)`` of a bank, stored on one device in one dtype.

    Args:
        rows: ``[n, d]`` initial rows (copied to ``device`` and ``dtype``).
        lo: global id of the first row.
        momentum: ``m`` of the update ``v ← normalize(m·v + (1-m)·f)``.
        memory_budget: bytes of temporary score tensors for the exact softmax.
    """

    def __init__(
        self,
        rows: Tensor,
        lo: int,
        momentum: float,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        self.rows = rows.to(device=device, dtype=dtype).contiguous()
        self.lo = lo
        self.momentum = float(momentum)
        self.memory_budget = memory_budget

    @property
    def hi(self) -> int:
        """One past the last global id held."""
        return self.lo + self.rows.shape[0]

    @property
    def device(self) -> torch.device:
        """Device of the rows."""
        return self.rows.device

    def owned(self, ids: Tensor) -> Tensor:
        """Positions ``[p]`` of the entries of ``ids`` ``[B]`` that fall in this shard."""
        return torch.nonzero((ids >= self.lo) & (ids < self.hi)).squeeze(1)

    @torch.no_grad()
    def get(self, ids: Tensor) -> Tensor:
        """Rows of global ``ids`` ``[n]`` (all owned), float32 ``[n, d]`` on the rows' device."""
        return self.rows.index_select(0, ids.to(self.device) - self.lo).float()

    @torch.no_grad()
    def set(self, ids: Tensor, rows: Tensor) -> None:
        """Overwrite rows of global ``ids`` ``[n]`` with ``rows`` ``[n, d]`` (last one wins)."""
        keep = dedupe_last(ids)
        local = ids[keep].to(self.device) - self.lo
        self.rows.index_copy_(0, local, rows[keep].to(self.device, self.rows.dtype))

    @torch.no_grad()
    def update(self, ids: Tensor, feats: Tensor) -> None:
        """Momentum update of global ``ids`` ``[n]`` towards ``feats`` ``[n, d]``.

        ``v ← normalize(m·v + (1-m)·f)``. An id repeated in the batch is updated once,
        from its old row, with its last feature.
        """
        keep = dedupe_last(ids)
        local = ids[keep].to(self.device) - self.lo
        old = self.rows.index_select(0, local).float()
        new = old.mul_(self.momentum).add_(feats[keep].to(self.device), alpha=1 - self.momentum)
        new = torch.nn.functional.normalize(new, dim=1)
        self.rows.index_copy_(0, local, new.to(self.rows.dtype))

    @torch.no_grad()
    def statistics(
        self,
        feats: Tensor,
        ids: Tensor,
        objective: Objective,
        noise: LocalNoise | None,
        z: float | None,
        num_rows: int,
    ) -> PartialStats:
        """Partial statistics for one step (see :func:`.statistics.shard_statistics`)."""
        return shard_statistics(
            self.rows,
            self.lo,
            feats.to(self.device),
            ids.to(self.device),
            objective,
            None if noise is None else noise.to(self.device),
            z,
            num_rows,
            self.memory_budget,
        )

    @torch.no_grad()
    def expsum(self, feats: Tensor, noise: LocalNoise, temperature: float) -> float:
        """``Σ exp(s)`` over this shard's (query, noise) pairs (NCE's first-step Z)."""
        return expsum_sampled(
            self.rows,
            self.lo,
            feats.to(self.device),
            noise.to(self.device),
            temperature,
        )


__all__ = ["INIT_BLOCK", "BankShard", "dedupe_last", "initial_rows"]
