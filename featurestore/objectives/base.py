"""What every objective is: a small frozen config that computes its own partial statistics
where the rows live and merges them exactly (README, *Which objective*; *The feature
store*, "move statistics, not rows").

An objective says *what* to compute and holds no state: NCE's normalising constant ``Z``
lives in the bank or store that estimates it on the first step (unless fixed through
``z``). The bank and the store shards call the same three methods, so a new objective is
one new module in this package (a subclass of :class:`Objective`, registered by its
``kind``) and its test; nothing outside asks which objective it holds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from torch import Tensor

    from featurestore.noise import LocalNoise
    from featurestore.partial_stats import PartialStats

#: Every objective class by its ``kind`` (filled as the subclasses are defined).
REGISTRY: dict[str, type[Objective]] = {}


def check_common(temperature: float, prox_lambda: float) -> None:
    """``ValueError`` unless ``temperature > 0`` and ``prox_lambda >= 0`` are finite."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number, got {temperature!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not (isinstance(prox_lambda, (int, float)) and math.isfinite(prox_lambda)):
        raise ValueError(f"prox_lambda must be a finite number, got {prox_lambda!r}")
    if prox_lambda < 0:
        raise ValueError(f"prox_lambda must be >= 0, got {prox_lambda}")


def check_negatives(num_negatives: int) -> None:
    """``ValueError`` unless ``num_negatives`` is an int >= 1."""
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int):
        raise ValueError(f"num_negatives must be an int, got {num_negatives!r}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")


@dataclass(frozen=True)
class Objective:
    """Base class: the interface the bank and the store shards call.

    Subclasses set ``kind`` (registers them for :meth:`from_dict`) and ``sampled``, and
    implement :meth:`shard_statistics` and :meth:`merge_terms`; NCE also its ``Z`` rules.
    """

    kind: ClassVar[str] = "base"
    #: Whether the objective scores sampled noise rows (False: all rows).
    sampled: ClassVar[bool] = False
    #: Whether the objective needs a normalising constant ``Z`` (NCE).
    uses_z: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind != "base":
            REGISTRY[cls.kind] = cls

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for Ray calls, configs and logs)."""
        return {"kind": self.kind, **asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Objective:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        kind = data.pop("kind", None)
        if kind not in REGISTRY:
            raise ValueError(f"unknown objective kind {kind!r}; choose from {sorted(REGISTRY)}")
        return REGISTRY[kind](**data)

    @property
    def tracks_z(self) -> bool:
        """Whether ``Z`` is re-estimated after every step (NCE with ``z_momentum``)."""
        return False

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
        """Fill ``out``'s fields for this objective from a shard's rows.

        Args:
            out: the shard's :class:`PartialStats` (positives already set).
            rows: ``[n, d]`` the shard's rows (global ids ``[lo, lo + n)``), any float dtype.
            lo: global id of ``rows[0]``.
            feats: ``[B, d]`` float32 queries on the rows' device.
            noise: this shard's noise (None when not :attr:`sampled`).
            z: the normalising constant (when :attr:`uses_z`).
            num_rows: ``N``, rows in the whole bank.
            memory_budget: bytes of temporary score tensors for an all-rows objective.
        """
        raise NotImplementedError

    def merge_terms(
        self,
        parts: list[PartialStats],
        pos: Tensor,
        s_pos: Tensor,
        z: float | None,
        num_rows: int | None,
    ) -> tuple[Tensor, Tensor]:
        """Per-sample loss ``[B]`` and ``∂loss/∂f`` ``[B, d]`` (not yet divided by ``B``, no
        proximal term) from every shard's parts, the positives' old rows ``pos`` ``[B, d]``
        and their scores ``s_pos = pos·f / τ`` ``[B]``."""
        raise NotImplementedError

    def observe_z(self, parts: list[PartialStats], feats: Tensor, num_rows: int) -> float | None:
        """This step's observation of ``Z`` for a running estimate (None: not tracked)."""
        return None

    def next_z(self, z: float | None, observation: float | None) -> float | None:
        """``Z`` for the next step after ``observation`` (unchanged unless tracked)."""
        return z


__all__ = ["REGISTRY", "Objective", "check_common", "check_negatives"]
