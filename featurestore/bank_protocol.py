"""The one bank interface the trainer programs against (:class:`Bank`), kept by the
in-process :class:`~featurestore.bank.MemoryBank` and the sharded
:class:`~featurestore.store.ShardedStore` alike: a step (started now, its result taken
later), the rows as Arrow batches, and what a training checkpoint keeps and restores."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import pyarrow as pa
    from torch import Tensor

    from featurestore.bank import PendingStep, StepOutput
    from featurestore.objectives import Objective


@runtime_checkable
class Bank(Protocol):
    """``N`` rows of ``d`` floats, one per instance, wherever they live."""

    num_rows: int
    dim: int
    #: Whether the step's math runs in this process (True) or where the rows are (False).
    in_process: bool

    @property
    def z(self) -> float | None:
        """NCE's normalising constant, None until estimated."""

    @property
    def step_count(self) -> int:
        """Steps taken so far."""

    def step(
        self,
        feats: Tensor,
        ids: Tensor,
        objective: Objective,
        noise_ids: Tensor | None = None,
        seed: int | None = None,
    ) -> StepOutput:
        """Score ``feats`` ``[B, d]`` against the pre-update rows, then move the rows of
        ``ids`` ``[B]`` towards them: the loss and ``∂loss/∂f`` ``[B, d]``."""

    def step_async(
        self,
        feats: Tensor,
        ids: Tensor,
        objective: Objective,
        noise_ids: Tensor | None = None,
        seed: int | None = None,
    ) -> PendingStep:
        """:meth:`step`, started now; ``result()`` gives its :class:`StepOutput`."""

    def get(self, ids: Tensor) -> Tensor:
        """Rows ``[n, d]`` of ``ids`` ``[n]``."""

    def export(self, batch_rows: int = ...) -> Iterator[pa.RecordBatch]:
        """Every row as Arrow batches ``(id int64, vector float32[d])``, in id order."""

    def checkpoint_state(self, snapshot_uri: str | None = None) -> dict[str, Any]:
        """What a training checkpoint keeps (``{"bank": …}`` or ``{"store_snapshot": …}``)."""

    def restore_checkpoint(self, state: dict[str, Any], source: str) -> None:
        """Restore what :meth:`checkpoint_state` kept (``ValueError`` naming ``source`` when
        the checkpoint holds nothing for this kind of bank)."""


__all__ = ["Bank"]
