"""The exact non-parametric softmax over all ``N`` bank rows (paper §3.1, eq. 2), and the
log-sum-exp merge the softmax family shares: each shard returns per query its max score,
``Σ exp(s - max)`` and ``Σ exp(s - max)·v``; any split of the rows merges to the same loss."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from featurestore.objectives.base import Objective, check_common
from featurestore.objectives.scoring import DEFAULT_MEMORY_BUDGET

if TYPE_CHECKING:
    from featurestore.noise import LocalNoise
    from featurestore.partial_stats import PartialStats


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


def merge_logsumexp(
    parts: list[PartialStats],
    pos: Tensor,
    s_pos: Tensor,
    tau: float,
    with_positive: bool,
) -> tuple[Tensor, Tensor]:
    """Softmax-family loss ``[B]`` and ``∂loss/∂f`` ``[B, d]`` from the parts' ``(max,
    sumexp, weighted)``; ``with_positive`` adds the positive's own logit (sampled softmax:
    the noise does not contain it)."""
    maxes = torch.stack([p.max for p in parts])  # [S, B]
    sums = torch.stack([p.sumexp for p in parts])
    vecs = torch.stack([p.weighted for p in parts])  # [S, B, d]
    if with_positive:
        maxes = torch.cat([maxes, s_pos.unsqueeze(0)])
        sums = torch.cat([sums, torch.ones_like(s_pos).unsqueeze(0)])
        vecs = torch.cat([vecs, pos.unsqueeze(0)])
    top = maxes.amax(dim=0)  # [B]
    scale = torch.exp(maxes - top)  # parts without rows have max -inf: scale 0
    total = (sums * scale).sum(dim=0)
    expect = (vecs * scale.unsqueeze(2)).sum(dim=0) / total.unsqueeze(1)
    return top + torch.log(total) - s_pos, (expect - pos) / tau


@dataclass(frozen=True)
class Softmax(Objective):
    """Exact non-parametric softmax over all ``N`` bank rows.

    ``loss = -log(exp(s_i) / Σ_j exp(s_j))`` with ``s_j = v_j·f / temperature``.
    """

    temperature: float = 0.07
    prox_lambda: float = 0.0

    kind: ClassVar[str] = "softmax"
    sampled: ClassVar[bool] = False

    def __post_init__(self) -> None:
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
        """Every row of the shard is scored (see :meth:`Objective.shard_statistics`)."""
        out.max, out.sumexp, out.weighted = softmax_stats_all(
            rows, feats, self.temperature, memory_budget
        )

    def merge_terms(
        self,
        parts: list[PartialStats],
        pos: Tensor,
        s_pos: Tensor,
        z: float | None,
        num_rows: int | None,
    ) -> tuple[Tensor, Tensor]:
        """See :meth:`Objective.merge_terms` (the bank's own rows include the positive)."""
        return merge_logsumexp(parts, pos, s_pos, self.temperature, with_positive=False)


__all__ = ["Softmax", "merge_logsumexp", "softmax_stats_all"]
