"""Softmax cross-entropy over the positive and ``K`` noise rows drawn uniformly from the
bank (the reference's 2020 update, "InfoNCE with bank negatives"): each shard scores only
its share of the noise and returns the softmax family's statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from featurestore.objectives.base import Objective, check_common, check_negatives
from featurestore.objectives.scoring import DEFAULT_GATHER_BUDGET, scores_per_query, weighted_sum
from featurestore.objectives.softmax import merge_logsumexp

if TYPE_CHECKING:
    from featurestore.noise import LocalNoise
    from featurestore.partial_stats import PartialStats


def softmax_stats_sampled(
    rows: Tensor,
    lo: int,
    feats: Tensor,
    noise: LocalNoise,
    temperature: float,
    budget: int = DEFAULT_GATHER_BUDGET,
) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax statistics over this shard's noise rows: ``(max [B], sumexp [B],
    weighted [B, d])`` as :func:`~featurestore.objectives.softmax.softmax_stats_all`."""
    batch, dim = feats.shape
    run_max = torch.full((batch,), -math.inf, device=feats.device)
    sumexp = torch.zeros(batch, device=feats.device)
    weighted = torch.zeros(batch, dim, device=feats.device)
    if noise.ids.shape[1] == 0:
        return run_max, sumexp, weighted
    for b0, b1, g, s, valid in scores_per_query(rows, lo, feats, noise, temperature, budget):
        if valid is not None:
            s = s.masked_fill(~valid, -math.inf)
        m = s.amax(dim=1)
        safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        w = torch.exp(s - safe.unsqueeze(1))
        run_max[b0:b1] = m
        sumexp[b0:b1] = w.sum(dim=1)
        weighted[b0:b1] = weighted_sum(w, g)
    return run_max, sumexp, weighted


@dataclass(frozen=True)
class SampledSoftmax(Objective):
    """Softmax cross-entropy over ``[s_i, s_{n_1} … s_{n_K}]`` with target 0.

    Noise ids are drawn uniformly from ``[0, N)``, per sample by default or one set per
    batch with ``shared_noise=True``.
    """

    num_negatives: int = 4096
    temperature: float = 0.07
    prox_lambda: float = 0.0
    shared_noise: bool = False

    kind: ClassVar[str] = "sampled_softmax"
    sampled: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_negatives(self.num_negatives)
        check_common(self.temperature, self.prox_lambda)

    def shard_statistics(
        self,
        out: PartialStats,
        rows: Tensor,
        lo: int,
        feats: Tensor,
        noise: LocalNoise | None,
        z: float | None,
        num_rows: int,
        memory_budget: int,
    ) -> None:
        """The shard's share of the noise is scored (see :meth:`Objective.shard_statistics`)."""
        if noise is None:
            raise ValueError("sampled softmax statistics need the shard's noise")
        out.max, out.sumexp, out.weighted = softmax_stats_sampled(
            rows, lo, feats, noise, self.temperature
        )

    def merge_terms(
        self,
        parts: list[PartialStats],
        pos: Tensor,
        s_pos: Tensor,
        z: float | None,
        num_rows: int | None,
    ) -> tuple[Tensor, Tensor]:
        """See :meth:`Objective.merge_terms`: the positive's logit joins the noise."""
        return merge_logsumexp(parts, pos, s_pos, self.temperature, with_positive=True)


__all__ = ["SampledSoftmax", "softmax_stats_sampled"]
