"""The Ray Train implementation of :class:`trainer.runtime.Runtime`.

# Ray: every Ray call of the worker loop is here (context, DDP preparation, device,
# the restart checkpoint, report) and in trainer/metrics.py (the metric objects).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from trainer.metrics import train_metrics
from trainer.runtime import Metrics


class RayRuntime:
    """One Ray Train worker of a TorchTrainer group (DDP over gloo or nccl)."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device: torch.device = ray.train.torch.get_device()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Device placement and, with more than one worker, DDP."""
        return ray.train.torch.prepare_model(model)

    def restart_checkpoint(self) -> str | Path | None:
        """Ray Train's last reported checkpoint after a worker-group restart (copied to a
        local directory), else None."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        return checkpoint.to_directory(tempfile.mkdtemp(prefix="npid-restart-"))

    def report(self, record: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        """``ray.train.report``; Ray Train persists ``checkpoint_dir`` to its storage."""
        if checkpoint_dir is None:
            ray.train.report(record)
        else:
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))

    def metrics(self) -> Metrics:
        """Ray's metric exporter (``npid_train_*``, ``npid_knn_*``)."""
        return train_metrics()


__all__ = ["RayRuntime"]
