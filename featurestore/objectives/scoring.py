"""Scoring queries against a shard's rows, shared by the objectives: the gathered noise
rows of each query, their scores, and weighted sums of rows. Plain torch, on the rows'
device; memory per call is bounded by a byte budget."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from featurestore.noise import LocalNoise

#: Default bytes a shard may spend on temporary ``[B, chunk]`` score tensors.
DEFAULT_MEMORY_BUDGET = 64 * 2**20
#: Default bytes of gathered noise rows scored at once (sized to stay in cache).
DEFAULT_GATHER_BUDGET = 4 * 2**20


def _gathered(rows: Tensor, local_ids: Tensor) -> Tensor:
    """``rows[local_ids]`` as float32, shape ``local_ids.shape + (d,)``."""
    out = rows.index_select(0, local_ids.reshape(-1))
    return out.float().reshape(*local_ids.shape, rows.shape[1])


def _query_chunk(width: int, dim: int, budget: int) -> int:
    """How many queries' noise rows fit in ``budget`` bytes of float32 gathers."""
    return max(1, budget // max(1, width * dim * 4))


def scores_per_query(
    rows: Tensor, lo: int, feats: Tensor, noise: LocalNoise, temperature: float, budget: int
) -> Iterator[tuple[int, int, Tensor, Tensor, Tensor | None]]:
    """Yield ``(b0, b1, gathered [bc, C, d], scores [bc, C], valid [bc, C] | None)``.

    For shared noise (``noise.ids`` has one row) a single chunk covers all queries with
    ``gathered`` of shape ``[C, d]`` and ``scores`` ``[B, C]``.
    """
    local = noise.ids - lo
    batch = feats.shape[0]
    if local.shape[0] == 1 and batch != 1:  # shared noise: one GEMM
        g = _gathered(rows, local[0])
        valid = None if noise.valid is None else noise.valid.expand(batch, -1)
        yield 0, batch, g, (feats @ g.T) / temperature, valid
        return
    step = _query_chunk(local.shape[1], rows.shape[1], budget)
    for b0 in range(0, batch, step):
        b1 = min(batch, b0 + step)
        g = _gathered(rows, local[b0:b1])
        s = torch.bmm(g, feats[b0:b1].unsqueeze(2)).squeeze(2).div_(temperature)
        valid = None if noise.valid is None else noise.valid[b0:b1]
        yield b0, b1, g, s, valid


def weighted_sum(w: Tensor, g: Tensor) -> Tensor:
    """``Σ_c w[b, c]·g[b, c]`` (or ``w @ g`` for shared ``g`` of shape ``[C, d]``)."""
    if g.dim() == 2:
        return w @ g
    return torch.bmm(w.unsqueeze(1), g).squeeze(1)


def expsum_sampled(
    rows: Tensor,
    lo: int,
    feats: Tensor,
    noise: LocalNoise,
    temperature: float,
    budget: int = DEFAULT_GATHER_BUDGET,
) -> float:
    """``Σ exp(s)`` over every (query, noise id) pair of this shard, for estimating Z."""
    total = 0.0
    if noise.ids.shape[1] == 0:
        return total
    for _b0, _b1, _g, s, valid in scores_per_query(rows, lo, feats, noise, temperature, budget):
        e = s.double().exp_()
        if valid is not None:
            e = e.masked_fill_(~valid, 0.0)
        total += float(e.sum())
    return total
