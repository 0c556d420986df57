"""Noise-contrastive estimation (paper §3.2; reference ``NCEAverage`` + ``NCECriterion``):
its per-shard noise terms, its merge, and every rule about its normalising constant ``Z``
(the first-step estimate, a step's observation and the running average), so the in-process
bank, the store client and shard 0 all follow the same formulas."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from featurestore.objectives.base import Objective, check_common, check_negatives
from featurestore.objectives.scoring import DEFAULT_GATHER_BUDGET, scores_per_query, weighted_sum
from featurestore.partial_stats import positive_rows

if TYPE_CHECKING:
    from featurestore.noise import LocalNoise
    from featurestore.partial_stats import PartialStats


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
    for b0, b1, g, s, valid in scores_per_query(
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
        grad[b0:b1] = weighted_sum(dl_ds, g).div_(objective.temperature)
    return loss, grad, expsum


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


@dataclass(frozen=True)
class NCE(Objective):
    """Noise-contrastive estimation with ``K`` noise rows drawn uniformly from the bank.

    ``P(j|f) = exp(s_j) / Z``, ``h(j) = P(j|f) / (P(j|f) + K/N + eps)``; per positive
    ``-log h(i) - Σ_k log((K/N) / (P(n_k|f) + K/N + eps))``, averaged over the batch.
    ``z=None`` lets the bank estimate ``Z = N · mean(exp(s))`` on its first NCE step; a number
    fixes it. With ``z_momentum=None`` (the paper's and the reference's choice) the first
    estimate is kept for the whole run. With ``z_momentum=m`` (0.99 in later instance
    discrimination code) ``Z`` follows the features: after every step
    ``Z ← m·Z + (1 − m)·N·mean(exp(s))`` over that step's ``B·(K+1)`` scored pairs, used from
    the next step on (one step late, so a step stays one round trip to the store).
    """

    num_negatives: int = 4096
    temperature: float = 0.07
    prox_lambda: float = 0.0
    z: float | None = None
    eps: float = 1e-7
    shared_noise: bool = False
    z_momentum: float | None = None

    kind: ClassVar[str] = "nce"
    sampled: ClassVar[bool] = True
    uses_z: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_negatives(self.num_negatives)
        check_common(self.temperature, self.prox_lambda)
        if self.z is not None and not (math.isfinite(self.z) and self.z > 0):
            raise ValueError(f"z must be a finite positive number or None, got {self.z!r}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}")
        if self.z_momentum is not None and not (
            isinstance(self.z_momentum, (int, float)) and 0 <= self.z_momentum < 1
        ):
            raise ValueError(f"z_momentum must be None or in [0, 1), got {self.z_momentum!r}")
        if self.z_momentum is not None and self.z is not None:
            raise ValueError("z_momentum re-estimates Z: it cannot be combined with a fixed z")

    @property
    def tracks_z(self) -> bool:
        """Whether ``Z`` is re-estimated after every step (``z_momentum`` set)."""
        return self.z_momentum is not None

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
        """The shard's share of the noise terms (see :meth:`Objective.shard_statistics`)."""
        if noise is None or z is None:
            raise ValueError("NCE statistics need the shard's noise and Z")
        out.noise_loss, out.noise_grad, out.noise_expsum = nce_stats_sampled(
            rows, lo, feats, noise, self, z, num_rows
        )

    def merge_terms(
        self,
        parts: list[PartialStats],
        pos: Tensor,
        s_pos: Tensor,
        z: float | None,
        num_rows: int | None,
    ) -> tuple[Tensor, Tensor]:
        """The positive's term plus every shard's noise terms (:meth:`Objective.merge_terms`)."""
        if z is None or num_rows is None:
            raise ValueError("NCE merge needs z and num_rows")
        c = self.num_negatives / num_rows + self.eps
        p_pos = torch.exp(s_pos) / z
        loss = torch.log(p_pos + c) - torch.log(p_pos)
        grad = (-c / (p_pos + c)).unsqueeze(1) * pos / self.temperature
        for p in parts:
            loss = loss + p.noise_loss
            grad = grad + p.noise_grad
        return loss, grad

    def observe_z(self, parts: list[PartialStats], feats: Tensor, num_rows: int) -> float | None:
        """``N · mean(exp(s))`` over this step's ``B·(K+1)`` scored pairs (noise and
        positives), from the parts' ``noise_expsum``; None unless :attr:`tracks_z`."""
        if not self.tracks_z:
            return None
        batch, dim = feats.shape
        pos = positive_rows(parts, batch, dim)
        s_pos = (pos * feats).sum(dim=1).double() / self.temperature
        noise = sum(
            float(p.noise_expsum.double().sum()) for p in parts if p.noise_expsum is not None
        )
        pairs = batch * (self.num_negatives + 1)
        return num_rows * (noise + float(s_pos.exp().sum())) / pairs

    def next_z(self, z: float | None, observation: float | None) -> float | None:
        """``Z ← m·Z + (1 − m)·observation`` with ``m = z_momentum``; ``Z`` unchanged when
        not tracked, not yet known, or the observation is missing or not finite."""
        if not self.tracks_z or z is None or observation is None:
            return z
        if not math.isfinite(observation):
            return z
        m = float(self.z_momentum)
        return m * z + (1 - m) * float(observation)


__all__ = ["NCE", "estimate_z", "nce_stats_sampled"]
