"""What the worker loop needs from whoever launched it: one small interface, two launchers.

The training loop (:mod:`trainer.loop`) asks its :class:`Runtime` for its rank, world size
and device, to place the model (and wrap it for DDP), for the checkpoint to restart from,
to report a finished epoch (with or without a checkpoint directory) and for the metric
sink. :class:`LocalRuntime` (here, no Ray) runs the loop in this process:
``python -m trainer.run --launcher local``. ``trainer.launch.ray_runtime.RayRuntime`` is the Ray
Train implementation, the default and the only multi-worker path.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from trainer.launch.progress import Bar, is_terminal, terminal_bar

logger = logging.getLogger(__name__)

#: Checkpoints a local run keeps (Ray Train keeps the same number).
KEEP_CHECKPOINTS = 2


class Metrics(Protocol):
    """The metric sink of a worker (Ray's exporter, or nothing for a local run)."""

    def gauge(self, name: str, value: float) -> None:
        """Set gauge ``name`` (``loss``, ``epoch``, ``knn_top1``, ``knn_top5``)."""

    def count(self, name: str, value: float) -> None:
        """Add ``value`` to counter ``name`` (``images``, ``skipped``)."""

    def observe(self, name: str, value: float) -> None:
        """Record ``value`` in histogram ``name`` (``step_seconds``)."""


class Runtime(Protocol):
    """A launcher's services to the worker loop."""

    rank: int
    world: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """``model`` on this worker's device (wrapped for data parallelism when needed)."""

    def restart_checkpoint(self) -> str | Path | None:
        """The checkpoint directory to restart from after a worker failure, else None."""

    def report(self, record: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        """Report a finished epoch; ``checkpoint_dir`` (rank 0) is persisted by the launcher."""

    def metrics(self) -> Metrics:
        """This worker's metric sink."""

    def progress(self, iterable: Iterable[Any], *, desc: str, unit: str, enabled: bool) -> Bar:
        """``iterable`` with a bar on the user's terminal when ``enabled`` (and there is one)."""

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``tensor`` (CPU or this device) reduced in place over every worker (``"sum"`` or
        ``"min"``) and returned; unchanged with one worker."""

    def barrier(self) -> None:
        """Wait until every worker got here (nothing with one worker)."""


class Collectives:
    """:meth:`Runtime.all_reduce` and :meth:`Runtime.barrier` over torch.distributed's
    process group, when there is more than one worker and the group is up: the one place
    the loops' collectives go through."""

    world: int

    def _grouped(self) -> bool:
        import torch.distributed as dist

        return self.world > 1 and dist.is_initialized()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` in place over the workers (``"sum"`` or ``"min"``)."""
        if op not in ("sum", "min"):
            raise ValueError(f"op must be 'sum' or 'min', got {op!r}")
        if self._grouped():
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
        return tensor

    def barrier(self) -> None:
        """Wait for every worker."""
        if self._grouped():
            import torch.distributed as dist

            dist.barrier()


class NoMetrics:
    """A local run exports no metrics: ``metrics.jsonl`` and the log carry them."""

    def gauge(self, name: str, value: float) -> None:
        """Nothing to export."""

    def count(self, name: str, value: float) -> None:
        """Nothing to export."""

    def observe(self, name: str, value: float) -> None:
        """Nothing to export."""


class LocalRuntime(Collectives):
    """One worker in this process: no Ray, no DDP.

    Checkpoints are copied to ``storage/run_name/checkpoint_NNNNNN`` (a temporary name,
    then a rename), keeping the newest :data:`KEEP_CHECKPOINTS`, the layout
    :func:`trainer.checkpoints.latest_checkpoint` searches.
    """

    def __init__(self, storage: str | os.PathLike, run_name: str, use_gpu: bool) -> None:
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("--use-gpu: no CUDA device is visible to this process")
        self.rank, self.world = 0, 1
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.directory = Path(storage) / run_name
        self._reports = 0

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model on this process's device."""
        return model.to(self.device)

    def restart_checkpoint(self) -> str | Path | None:
        """A local run is not restarted from inside: ``--resume`` starts it again."""
        return None

    def report(self, record: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        """Keep ``checkpoint_dir`` (copied) as this run's next checkpoint."""
        self._reports += 1
        if checkpoint_dir is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"checkpoint_{self._reports:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=self.directory))
        try:
            shutil.copytree(checkpoint_dir, tmp, dirs_exist_ok=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = sorted(self.directory.glob("checkpoint_*"))
        for old in kept[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)

    def metrics(self) -> Metrics:
        """No exporter in a local run."""
        return NoMetrics()

    def progress(self, iterable: Iterable[Any], *, desc: str, unit: str, enabled: bool) -> Bar:
        """A tqdm bar on this process's ``stderr`` when it is a terminal."""
        return terminal_bar(iterable, desc=desc, unit=unit, enabled=enabled and is_terminal())


__all__ = ["KEEP_CHECKPOINTS", "Collectives", "LocalRuntime", "Metrics", "NoMetrics", "Runtime"]
