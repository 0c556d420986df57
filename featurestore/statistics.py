"""Partial statistics and their exact merge: "move statistics, not rows" (README, *The
feature store*).

A shard holding rows ``[lo, hi)`` scores the queries ``f`` (``[B, d]``) against its rows
(all of them for the exact softmax, its share of the noise otherwise) and returns
:class:`PartialStats`, ``O(B·d)`` numbers whatever ``K`` or ``N``:

* softmax family: per query the max score ``m``, ``Σ exp(s - m)`` and ``Σ exp(s - m)·v``;
* NCE: per query the summed noise loss ``Σ_k -log(1 - h(n_k))`` and
  ``Σ_k (∂ℓ_k/∂s_k)·v_k / τ``;
* the old rows of the positives the shard owns.

:func:`shard_statistics` and :func:`merge` are the two calls the bank and the store make;
what each objective computes lives in its own module of :mod:`featurestore.objectives`
(whose per-objective functions import from here as before). The result of :func:`merge`
does not depend on how rows were split into shards. Plain torch, on the rows' device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from featurestore.noise import LocalNoise
from featurestore.objectives import NCE, Objective
from featurestore.objectives.nce import estimate_z, nce_stats_sampled
from featurestore.objectives.sampled_softmax import softmax_stats_sampled
from featurestore.objectives.scoring import (
    DEFAULT_GATHER_BUDGET,
    DEFAULT_MEMORY_BUDGET,
    expsum_sampled,
)
from featurestore.objectives.softmax import softmax_stats_all
from featurestore.partial_stats import PartialStats, positive_rows


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
    if not isinstance(objective, Objective):
        raise ValueError(f"unsupported objective {objective!r}")
    hi = lo + rows.shape[0]
    pos_index = torch.nonzero((ids >= lo) & (ids < hi)).squeeze(1)
    pos_rows = rows.index_select(0, ids[pos_index] - lo).float()
    out = PartialStats(pos_index=pos_index, pos_rows=pos_rows)
    objective.shard_statistics(out, rows, lo, feats, noise, z, num_rows, memory_budget)
    return out


def observed_z(parts: list[PartialStats], feats: Tensor, objective: NCE, num_rows: int) -> float:
    """``N · mean(exp(s))`` over this step's ``B·(K+1)`` scored pairs: the observation an
    NCE ``z_momentum`` average takes (:meth:`featurestore.objectives.NCE.observe_z`)."""
    found = objective.observe_z(parts, feats, num_rows)
    if found is None:
        raise ValueError(f"{objective!r} does not track Z")
    return found


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
    if not isinstance(objective, Objective):
        raise ValueError(f"unsupported objective {objective!r}")
    batch, dim = feats.shape
    pos = positive_rows(parts, batch, dim)
    s_pos = (pos * feats).sum(dim=1) / objective.temperature
    loss, grad = objective.merge_terms(parts, pos, s_pos, z, num_rows)
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
