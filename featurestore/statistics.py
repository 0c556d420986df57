"""Partial statistics and their exact merge: "move statistics, not rows" (README, *The
feature store*).

A shard holding rows ``[lo, hi)`` scores the queries ``f`` (``[B, d]``) against its rows
(all of them for the exact softmax, its share of the noise otherwise) and returns
:class:`PartialStats`, ``O(B·d)`` numbers whatever ``K`` or ``N``:

* softmax family: per query the max score ``m``, ``Σ exp(s - m)`` and ``Σ exp(s - m)·v``;
* NCE: per query the summed noise loss ``Σ_k -log(1 - h(n_k))`` and
  ``Σ_k (∂ℓ_k/∂s_k)·v_k / τ``;
* the old rows of the positives the shard owns.

:func:`merge` combines any number of such parts with log-sum-exp algebra into the batch
loss and ``∂loss/∂f``; the result does not depend on how rows were split into shards.
Everything here is plain torch and runs on whatever device the rows are on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from featurestore.noise import LocalNoise
from featurestore.objectives import NCE, Objective, SampledSoftmax, Softmax

#: Default bytes a shard may spend on temporary ``[B, chunk]`` score tensors.
DEFAULT_MEMORY_BUDGET = 64 * 2**20
#: Default bytes of gathered noise rows scored at once (sized to stay in cache).
DEFAULT_GATHER_BUDGET = 4 * 2**20


@dataclass
class PartialStats:
    """What one shard returns for one step. All tensors float32 except ``pos_index``.

    Attributes:
        max: ``[B]`` max score over the shard's scored rows (``-inf`` where none); softmax.
        sumexp: ``[B]`` ``Σ exp(s - max)``; softmax family.
        weighted: ``[B, d]`` ``Σ exp(s - max)·v``; softmax family.
        noise_loss: ``[B]`` ``Σ_k -log(1 - h(n_k))`` over this shard's noise; NCE.
        noise_grad: ``[B, d]`` ``Σ_k (∂ℓ_k/∂s_k)·v_k / τ``; NCE.
        noise_expsum: ``[B]`` ``Σ_k exp(s_k)`` over this shard's noise; NCE (for ``Z``).
        pos_index: ``[p]`` int64 batch positions whose id this shard owns.
        pos_rows: ``[p, d]`` the (pre-update) rows of those positives.
    """

    pos_index: Tensor
    pos_rows: Tensor
    max: Tensor | None = None
    sumexp: Tensor | None = None
    weighted: Tensor | None = None
    noise_loss: Tensor | None = None
    noise_grad: Tensor | None = None
    noise_expsum: Tensor | None = None

    def to(self, device: torch.device | str) -> PartialStats:
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
            for f in fields(self)
        }
        return PartialStats(**moved)

    def nbytes(self) -> int:
        """Bytes of tensor payload (what a shard sends back)."""
        return sum(
            t.numel() * t.element_size()
            for t in (getattr(self, f.name) for f in fields(self))
            if t is not None
        )


def _gathered(rows: Tensor, local_ids: Tensor) -> Tensor:
    """``rows[local_ids]`` as float32, shape ``local_ids.shape + (d,)``."""
    out = rows.index_select(0, local_ids.reshape(-1))
    return out.float().reshape(*local_ids.shape, rows.shape[1])


def _query_chunk(width: int, dim: int, budget: int) -> int:
    """How many queries' noise rows fit in ``budget`` bytes of float32 gathers."""
    return max(1, budget // max(1, width * dim * 4))


def _scores_per_query(
    rows: Tensor, lo: int, feats: Tensor, noise: LocalNoise, temperature: float, budget: int
):
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


def _weighted_sum(w: Tensor, g: Tensor) -> Tensor:
    """``Σ_c w[b, c]·g[b, c]`` (or ``w @ g`` for shared ``g`` of shape ``[C, d]``)."""
    if g.dim() == 2:
        return w @ g
    return torch.bmm(w.unsqueeze(1), g).squeeze(1)


def softmax_stats_all(
    rows: Tensor, feats: Tensor, temperature: float, budget: int = DEFAULT_MEMORY_BUDGET
) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax statistics of ``feats`` ``[B, d]`` against every row of ``rows`` ``[n, d]``.

    Rows are processed in chunks so that no ``[B, n]`` tensor larger than ``budget`` bytes
    exists. Returns ``(max [B], sumexp [B], weighted [B, d])``.
    """
    batch, dim = feats.shape
    run_max = torch.full((batch,), -math.inf, device=feats.device)
    sumexp = torch.zeros(batch, device=feats.device)
    weighted = torch.zeros(batch, dim, device=feats.device)
    chunk = max(1, budget // max(1, 4 * batch * 2))
    scaled = feats / temperature
    for r0 in range(0, rows.shape[0], chunk):
        block = rows[r0 : r0 + chunk]
        if block.dtype != torch.float32:
            block = block.float()
        s = scaled @ block.T  # [B, c]
        new_max = torch.maximum(run_max, s.amax(dim=1))
        rescale = torch.exp(run_max - new_max)  # exp(-inf) = 0 on the first chunk
        s.sub_(new_max.unsqueeze(1)).exp_()
        sumexp.mul_(rescale).add_(s.sum(dim=1))
        weighted.mul_(rescale.unsqueeze(1)).addmm_(s, block)
        run_max = new_max
    return run_max, sumexp, weighted


def softmax_stats_sampled(
    rows: Tensor,
    lo: int,
    feats: Tensor,
    noise: LocalNoise,
    temperature: float,
    budget: int = DEFAULT_GATHER_BUDGET,
) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax statistics over this shard's noise rows. Shapes as :func:`softmax_stats_all`."""
    batch, dim = feats.shape
    run_max = torch.full((batch,), -math.inf, device=feats.device)
    sumexp = torch.zeros(batch, device=feats.device)
    weighted = torch.zeros(batch, dim, device=feats.device)
    if noise.ids.shape[1] == 0:
        return run_max, sumexp, weighted
    for b0, b1, g, s, valid in _scores_per_query(rows, lo, feats, noise, temperature, budget):
        if valid is not None:
            s = s.masked_fill(~valid, -math.inf)
        m = s.amax(dim=1)
        safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        w = torch.exp(s - safe.unsqueeze(1))
        run_max[b0:b1] = m
        sumexp[b0:b1] = w.sum(dim=1)
        weighted[b0:b1] = _weighted_sum(w, g)
    return run_max, sumexp, weighted


def nce_stats_sampled(
    rows: Tensor,
    lo: int,
    feats: Tensor,
    noise: LocalNoise,
    objective: NCE,
    z: float,
    num_rows: int,
    budget: int = DEFAULT_GATHER_BUDGET,
) -> tuple[Tensor, Tensor, Tensor]:
    """NCE noise terms over this shard's noise rows.

    With ``p = exp(s)/Z`` and ``c = K/N``: loss ``Σ_k log(p_k + c + eps) - log(c)`` and
    ``∂ℓ_k/∂s_k = p_k / (p_k + c + eps)``. Returns ``(noise_loss [B], noise_grad [B, d],
    noise_expsum [B])``, the last being ``Σ_k exp(s_k)`` (for re-estimating ``Z``).
    """
    batch, dim = feats.shape
    loss = torch.zeros(batch, device=feats.device)
    grad = torch.zeros(batch, dim, device=feats.device)
    expsum = torch.zeros(batch, device=feats.device)
    if noise.ids.shape[1] == 0:
        return loss, grad, expsum
    c = objective.num_negatives / num_rows
    log_c = math.log(c)
    for b0, b1, g, s, valid in _scores_per_query(
        rows, lo, feats, noise, objective.temperature, budget
    ):
        p = s.exp_().div_(z)  # s is a temporary: reuse it for p
        if valid is not None:
            p = p.masked_fill_(~valid, 0.0)
        expsum[b0:b1] = p.sum(dim=1) * z
        denom = p + (c + objective.eps)
        dl_ds = p.div_(denom)
        term = denom.log_().sub_(log_c)
        if valid is not None:
            term = term.masked_fill_(~valid, 0.0)
        loss[b0:b1] = term.sum(dim=1)
        grad[b0:b1] = _weighted_sum(dl_ds, g).div_(objective.temperature)
    return loss, grad, expsum


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
    for _b0, _b1, _g, s, valid in _scores_per_query(rows, lo, feats, noise, temperature, budget):
        e = s.double().exp_()
        if valid is not None:
            e = e.masked_fill_(~valid, 0.0)
        total += float(e.sum())
    return total


def shard_statistics(
    rows: Tensor,
    lo: int,
    feats: Tensor,
    ids: Tensor,
    objective: Objective,
    noise: LocalNoise | None,
    z: float | None,
    num_rows: int,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> PartialStats:
    """All statistics a shard owning ``rows`` (global ids ``[lo, lo + n)``) returns.

    Args:
        rows: ``[n, d]`` the shard's rows (any float dtype; math in float32).
        lo: global id of ``rows[0]``.
        feats: ``[B, d]`` float32 queries on the rows' device.
        ids: ``[B]`` int64 global ids of the positives.
        objective: what to compute.
        noise: this shard's noise (None for the exact softmax).
        z: NCE's normalising constant (required for NCE).
        num_rows: ``N``, rows in the whole bank.
        memory_budget: bytes of temporary score tensors for the exact softmax.
    """
    hi = lo + rows.shape[0]
    pos_index = torch.nonzero((ids >= lo) & (ids < hi)).squeeze(1)
    pos_rows = rows.index_select(0, ids[pos_index] - lo).float()
    out = PartialStats(pos_index=pos_index, pos_rows=pos_rows)
    if isinstance(objective, Softmax):
        out.max, out.sumexp, out.weighted = softmax_stats_all(
            rows, feats, objective.temperature, memory_budget
        )
    elif isinstance(objective, SampledSoftmax):
        assert noise is not None
        out.max, out.sumexp, out.weighted = softmax_stats_sampled(
            rows, lo, feats, noise, objective.temperature
        )
    elif isinstance(objective, NCE):
        assert noise is not None and z is not None
        out.noise_loss, out.noise_grad, out.noise_expsum = nce_stats_sampled(
            rows, lo, feats, noise, objective, z, num_rows
        )
    else:
        raise ValueError(f"unsupported objective {objective!r}")
    return out


def estimate_z(expsum_noise: float, pos_scores: Tensor, num_rows: int, num_pairs: int) -> float:
    """First-step NCE constant ``Z = N · mean(exp(s))`` over all ``B·(K+1)`` scored pairs.

    Args:
        expsum_noise: ``Σ exp(s)`` over all (query, noise) pairs, summed over shards.
        pos_scores: ``[B]`` positive scores ``s_i``.
        num_rows: ``N``.
        num_pairs: ``B·(K+1)``.
    """
    total = expsum_noise + float(pos_scores.double().exp().sum())
    return num_rows * total / num_pairs


def observed_z(parts: list[PartialStats], feats: Tensor, objective: NCE, num_rows: int) -> float:
    """``N · mean(exp(s))`` over this step's ``B·(K+1)`` scored pairs (noise and positives),
    from the parts' ``noise_expsum``: the observation an NCE ``z_momentum`` average takes."""
    batch, dim = feats.shape
    pos = positive_rows(parts, batch, dim)
    s_pos = (pos * feats).sum(dim=1).double() / objective.temperature
    noise = sum(float(p.noise_expsum.double().sum()) for p in parts if p.noise_expsum is not None)
    pairs = batch * (objective.num_negatives + 1)
    return num_rows * (noise + float(s_pos.exp().sum())) / pairs


def positive_rows(parts: list[PartialStats], batch: int, dim: int) -> Tensor:
    """Assemble the positives' old rows ``[B, d]`` from the parts that own them."""
    device = parts[0].pos_rows.device
    index = torch.cat([p.pos_index.to(device=device, dtype=torch.int64) for p in parts])
    once = torch.ones(batch, dtype=torch.int64, device=device)
    if index.numel() != batch or not torch.equal(torch.bincount(index, minlength=batch), once):
        raise RuntimeError("the shards did not return each positive row exactly once")
    rows = torch.cat([p.pos_rows.to(device=device, dtype=torch.float32) for p in parts])
    return torch.empty((batch, dim), device=device).index_copy_(0, index, rows)


def merge(
    parts: list[PartialStats],
    feats: Tensor,
    objective: Objective,
    z: float | None = None,
    num_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Merge shards' statistics exactly into ``(per-sample loss [B], ∂(mean loss)/∂f [B, d])``.

    Args:
        parts: one :class:`PartialStats` per shard, all on ``feats.device``.
        feats: ``[B, d]`` float32 queries.
        objective: the objective the parts were computed for.
        z: NCE's normalising constant.
        num_rows: ``N`` (NCE).
    """
    batch, dim = feats.shape
    pos = positive_rows(parts, batch, dim)
    tau = objective.temperature
    s_pos = (pos * feats).sum(dim=1) / tau
    if isinstance(objective, (Softmax, SampledSoftmax)):
        maxes = torch.stack([p.max for p in parts])  # [S, B]
        sums = torch.stack([p.sumexp for p in parts])
        vecs = torch.stack([p.weighted for p in parts])  # [S, B, d]
        if isinstance(objective, SampledSoftmax):  # the positive's logit joins the noise
            maxes = torch.cat([maxes, s_pos.unsqueeze(0)])
            sums = torch.cat([sums, torch.ones_like(s_pos).unsqueeze(0)])
            vecs = torch.cat([vecs, pos.unsqueeze(0)])
        top = maxes.amax(dim=0)  # [B]
        scale = torch.exp(maxes - top)  # parts without rows have max -inf: scale 0
        total = (sums * scale).sum(dim=0)
        expect = (vecs * scale.unsqueeze(2)).sum(dim=0) / total.unsqueeze(1)
        loss = top + torch.log(total) - s_pos
        grad = (expect - pos) / tau
    elif isinstance(objective, NCE):
        if z is None or num_rows is None:
            raise ValueError("NCE merge needs z and num_rows")
        c = objective.num_negatives / num_rows + objective.eps
        p_pos = torch.exp(s_pos) / z
        loss = torch.log(p_pos + c) - torch.log(p_pos)
        grad = (-c / (p_pos + c)).unsqueeze(1) * pos / tau
        for p in parts:
            loss = loss + p.noise_loss
            grad = grad + p.noise_grad
    else:
        raise ValueError(f"unsupported objective {objective!r}")
    if objective.prox_lambda > 0:
        diff = feats - pos
        loss = loss + objective.prox_lambda * (diff * diff).sum(dim=1)
        grad = grad + 2 * objective.prox_lambda * diff
    return loss, grad / batch


__all__ = [
    "DEFAULT_GATHER_BUDGET",
    "DEFAULT_MEMORY_BUDGET",
    "PartialStats",
    "estimate_z",
    "expsum_sampled",
    "merge",
    "nce_stats_sampled",
    "observed_z",
    "positive_rows",
    "shard_statistics",
    "softmax_stats_all",
    "softmax_stats_sampled",
]
