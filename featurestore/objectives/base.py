"""Training objectives over a memory bank (Wu et al. §3.1-3.2; README, *Which objective*).

An objective is a small frozen config object: it says *what* to compute. The bank (or a
store shard) computes partial statistics for it where the rows live
(:mod:`featurestore.statistics`) and the caller merges them exactly into a loss and
``∂loss/∂f``. Objectives hold no state; NCE's normalising constant ``Z`` lives in the bank
or store that estimates it on the first step (unless fixed here through ``z``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar


def _check_common(temperature: float, prox_lambda: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number, got {temperature!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not (isinstance(prox_lambda, (int, float)) and math.isfinite(prox_lambda)):
        raise ValueError(f"prox_lambda must be a finite number, got {prox_lambda!r}")
    if prox_lambda < 0:
        raise ValueError(f"prox_lambda must be >= 0, got {prox_lambda}")


def _check_negatives(num_negatives: int) -> None:
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int):
        raise ValueError(f"num_negatives must be an int, got {num_negatives!r}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")


@dataclass(frozen=True)
class Objective:
    """Base class: fields shared by every objective."""

    kind: ClassVar[str] = "base"
    #: Whether the objective scores sampled noise rows (False: all rows).
    sampled: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for Ray calls, configs and logs)."""
        return {"kind": self.kind, **asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Objective:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        kind = data.pop("kind", None)
        classes = {cls.kind: cls for cls in (NCE, Softmax, SampledSoftmax)}
        if kind not in classes:
            raise ValueError(f"unknown objective kind {kind!r}; choose from {sorted(classes)}")
        return classes[kind](**data)


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
        _check_common(self.temperature, self.prox_lambda)


@dataclass(frozen=True)
class SampledSoftmax(Objective):
    """Softmax cross-entropy over ``[s_i, s_{n_1} … s_{n_K}]`` with target 0.

    The reference's 2020 update ("InfoNCE with bank negatives"). Noise ids are drawn
    uniformly from ``[0, N)``, per sample by default or one set per batch with
    ``shared_noise=True``.
    """

    num_negatives: int = 4096
    temperature: float = 0.07
    prox_lambda: float = 0.0
    shared_noise: bool = False

    kind: ClassVar[str] = "sampled_softmax"
    sampled: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_negatives(self.num_negatives)
        _check_common(self.temperature, self.prox_lambda)


@dataclass(frozen=True)
class NCE(Objective):
    """Noise-contrastive estimation (paper §3.2; reference ``NCEAverage`` + ``NCECriterion``).

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

    def __post_init__(self) -> None:
        _check_negatives(self.num_negatives)
        _check_common(self.temperature, self.prox_lambda)
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


__all__ = ["NCE", "Objective", "SampledSoftmax", "Softmax"]
