"""The in-process memory bank (Wu et al. §3.1-3.2; README, *Which objective*).

:class:`MemoryBank` keeps one unit vector per training instance and runs a training step
through the same partial-statistics protocol the sharded store uses (one shard covering
every row, then the exact merge), so the in-process and the sharded bank compute the same
numbers by the same code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import torch
from torch import Tensor

from featurestore import arrow_io
from featurestore.bank_shard import BankShard, initial_rows
from featurestore.noise import NoiseSpec, local_noise, sample_ids, step_seed
from featurestore.objectives import Objective
from featurestore.statistics import DEFAULT_MEMORY_BUDGET, estimate_z, merge
from featurestore.validation import (
    check_count,
    check_ids,
    check_rows,
    check_shape_args,
    check_step,
    storage_dtype,
)

logger = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """Result of one ``step``.

    Attributes:
        loss: scalar float32 tensor, the batch mean of the objective.
        grad: ``[B, d]`` float32, ``∂loss/∂feats``; drive the encoder with
            ``feats.backward(grad)``.
        sample_loss: ``[B]`` per-sample loss (``loss == sample_loss.mean()``).
        z: NCE's normalising constant used for this step (None for other objectives).
    """

    loss: Tensor
    grad: Tensor
    sample_loss: Tensor
    z: float | None = None

    @classmethod
    def merged(
        cls, sample_loss: Tensor, grad: Tensor, z: float | None, device: torch.device | None
    ) -> StepOutput:
        """The output of a merge (``sample_loss`` ``[B]``, ``grad`` ``[B, d]``) on ``device``."""
        return cls(
            loss=sample_loss.mean().to(device),
            grad=grad.to(device),
            sample_loss=sample_loss.to(device),
            z=z,
        )


class PendingStep:
    """A step in flight (:meth:`MemoryBank.step_async`, :meth:`ShardedStore.step_async`).

    The bank has accepted the step (inputs checked; the store's shards are working on it);
    :meth:`result` waits for it and returns its :class:`StepOutput`. Call ``result`` once per
    step: a store client takes its due automatic snapshot there.
    """

    def __init__(self, finish: Callable[[], StepOutput]) -> None:
        self._finish: Callable[[], StepOutput] | None = finish
        self._output: StepOutput | None = None

    @classmethod
    def completed(cls, output: StepOutput) -> PendingStep:
        """A step that has already finished with ``output``."""
        pending = cls(lambda: output)
        pending.result()
        return pending

    def result(self) -> StepOutput:
        """The step's :class:`StepOutput`, waiting for the shards if needed.

        Raises:
            RuntimeError, ValueError: as the blocking ``step`` would.
        """
        if self._finish is not None:
            finish, self._finish = self._finish, None
            self._output = finish()
        assert self._output is not None
        return self._output


class MemoryBank:
    """``N`` rows of ``dim`` floats, one per training instance, in this process.

    Args:
        num_rows: ``N``.
        dim: ``d``, feature dimension.
        momentum: ``m`` in ``v_i ← normalize(m·v_i + (1-m)·f)``.
        seed: seeds the initial rows and each step's noise (step ``t`` uses
            ``step_seed(seed, t)`` unless a seed is passed to :meth:`step`).
        device: where the rows live (``"cpu"``, ``"cuda"``, ``"cuda:1"``…).
        dtype: row storage, ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``;
            the math is always float32.
        normalize_init: start from normalized rows instead of the reference's raw
            uniform ``[-a, a]`` rows.
        memory_budget: bytes of temporary ``[B, chunk]`` tensors for the exact softmax.
    """

    def __init__(
        self,
        num_rows: int,
        dim: int = 128,
        momentum: float = 0.5,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        normalize_init: bool = False,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        check_shape_args(num_rows, dim, momentum)
        self.num_rows = num_rows
        self.dim = dim
        self.momentum = float(momentum)
        self.seed = int(seed)
        self.dtype = storage_dtype(dtype)
        rows = initial_rows(self.seed, 0, num_rows, dim, normalize_init)
        self._shard = BankShard(rows, 0, self.momentum, device, self.dtype, memory_budget)
        self.z: float | None = None
        self.step_count = 0

    @property
    def device(self) -> torch.device:
        """Device holding the rows."""
        return self._shard.device

    @property
    def rows(self) -> Tensor:
        """The stored rows ``[N, d]`` (storage dtype; a view, do not modify)."""
        return self._shard.rows

    def get(self, ids: Tensor) -> Tensor:
        """Rows of ``ids`` ``[n]`` as float32 ``[n, d]`` on the bank's device."""
        return self._shard.get(check_ids(ids, self.num_rows))

    def set(self, ids: Tensor, rows: Tensor) -> None:
        """Overwrite the rows of ``ids`` ``[n]`` with ``rows`` ``[n, d]`` (stored as given)."""
        ids = check_ids(ids, self.num_rows)
        self._shard.set(ids, check_rows(rows, self.dim, "rows", ids.numel()))

    def update(self, ids: Tensor, feats: Tensor) -> None:
        """Momentum update of the rows of ``ids`` ``[n]`` towards ``feats`` ``[n, d]``."""
        ids = check_ids(ids, self.num_rows)
        self._shard.update(ids, check_rows(feats, self.dim, "feats", ids.numel()))

    def sample(self, n: int, seed: int | None = None) -> tuple[Tensor, Tensor]:
        """``n`` uniform noise rows: ``(ids [n] int64, rows [n, d] float32)``."""
        check_count(n)
        ids = sample_ids(n, self.num_rows, self.seed + self.step_count if seed is None else seed)
        return ids, self._shard.get(ids)

    def step(
        self,
        feats: Tensor,
        ids: Tensor,
        objective: Objective,
        noise_ids: Tensor | None = None,
        seed: int | None = None,
    ) -> StepOutput:
        """One training step: score ``feats`` against the bank, then update it.

        Args:
            feats: ``[B, d]`` encoder outputs (unit rows; any float dtype, any device).
            ids: ``[B]`` instance ids of the batch.
            objective: :class:`NCE`, :class:`Softmax` or :class:`SampledSoftmax`.
            noise_ids: explicit noise, ``[B, K]`` (``[K]`` with ``shared_noise``);
                drawn from the step seed when None.
            seed: the step's noise seed; defaults to ``step_seed(self.seed, step_count)``.

        Returns:
            :class:`StepOutput` with ``loss``, ``grad`` ``[B, d]`` on ``feats.device``.
            Rows are scored against the pre-update bank, then the rows of ``ids`` move
            towards ``feats``.

        Raises:
            ValueError: bad shapes, dtypes, ids or noise ids out of range, non-finite
                features, ``K > N``. The bank is left unchanged.
        """
        out_device = feats.device if isinstance(feats, Tensor) else None
        feats, ids, noise_ids = check_step(
            feats, ids, objective, self.num_rows, self.dim, noise_ids
        )
        feats = feats.to(self.device)
        bounds = [0, self.num_rows]
        noise = None
        if objective.sampled:
            spec = NoiseSpec(
                objective.num_negatives,
                objective.shared_noise,
                step_seed(self.seed, self.step_count) if seed is None else int(seed),
                noise_ids,
            )
            noise = local_noise(spec, feats.shape[0], bounds, 0)
        z = self._nce_z(objective, feats, ids, noise)
        part = self._shard.statistics(feats, ids, objective, noise, z, self.num_rows)
        sample_loss, grad = merge([part], feats, objective, z, self.num_rows)
        self.z = objective.next_z(self.z, objective.observe_z([part], feats, self.num_rows))
        self._shard.update(ids, feats)
        self.step_count += 1
        return StepOutput.merged(sample_loss, grad, z, out_device)

    def step_async(
        self,
        feats: Tensor,
        ids: Tensor,
        objective: Objective,
        noise_ids: Tensor | None = None,
        seed: int | None = None,
    ) -> PendingStep:
        """:meth:`step`, as the :class:`PendingStep` a store returns (already finished here).

        Lets a training loop treat both banks alike: start the step, fetch the next batch,
        then take the result.
        """
        return PendingStep.completed(self.step(feats, ids, objective, noise_ids, seed))

    def _nce_z(self, objective: Objective, feats: Tensor, ids: Tensor, noise) -> float | None:
        """NCE's Z: the objective's, the bank's, or estimated now (first NCE step)."""
        if not objective.uses_z:
            return None
        if objective.z is not None:
            return float(objective.z)
        if self.z is None:
            pos = self._shard.get(ids)
            s_pos = (pos * feats).sum(dim=1) / objective.temperature
            expsum = self._shard.expsum(feats, noise, objective.temperature)
            pairs = feats.shape[0] * (objective.num_negatives + 1)
            self.z = estimate_z(expsum, s_pos, self.num_rows, pairs)
            logger.info("NCE normalization constant estimated on the first step: Z = %.6g", self.z)
        return self.z

    def export(self, batch_rows: int = arrow_io.EXPORT_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """Stream the bank as Arrow record batches ``(id int64, vector float32[d])``."""
        for r0 in range(0, self.num_rows, batch_rows):
            r1 = min(self.num_rows, r0 + batch_rows)
            yield arrow_io.to_record_batch(torch.arange(r0, r1), self._shard.rows[r0:r1])

    def state_dict(self) -> dict:
        """Everything needed to rebuild the bank (rows on CPU in storage dtype)."""
        return {
            "rows": self._shard.rows.cpu(),
            "momentum": self.momentum,
            "seed": self.seed,
            "z": self.z,
            "step": self.step_count,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output; its shape, momentum and seed must match this
        bank's (``ValueError`` naming the first that differs; the bank is left unchanged)."""
        rows = state["rows"]
        if tuple(rows.shape) != (self.num_rows, self.dim):
            raise ValueError(
                f"state has rows of shape {tuple(rows.shape)}, bank is "
                f"({self.num_rows}, {self.dim})"
            )
        for name in ("momentum", "seed"):
            if name in state and state[name] != getattr(self, name):
                raise ValueError(f"state has {name} {state[name]}, bank has {getattr(self, name)}")
        self._shard.rows.copy_(rows.to(self.device, self.dtype))
        self.z = state.get("z")
        self.step_count = int(state.get("step", 0))

    #: The rows live in this process (the step's math runs here, on every thread).
    in_process = True

    def checkpoint_state(self, snapshot_uri: str | None = None) -> dict:
        """What a training checkpoint keeps of the bank: ``{"bank": state_dict()}``
        (``snapshot_uri`` is the store's and unused here)."""
        return {"bank": self.state_dict()}

    def restore_checkpoint(self, state: dict, source: str) -> None:
        """Load what :meth:`checkpoint_state` kept (``source``: the checkpoint, for the
        error when it holds no in-process bank)."""
        if state.get("bank") is None:
            raise ValueError(f"checkpoint {source} holds no in-process bank to restore")
        self.load_state_dict(state["bank"])

    def __repr__(self) -> str:
        return (
            f"MemoryBank(num_rows={self.num_rows}, dim={self.dim}, momentum={self.momentum}, "
            f"dtype={self.dtype}, device={self.device})"
        )


__all__ = ["MemoryBank", "StepOutput"]
