"""The Ray Train implementation of :class:`trainer.launch.runtime.Runtime`.

# Ray: every Ray call of the worker loop is here (context, DDP preparation, device,
# the restart checkpoint, report) and in trainer/metrics.py (the metric objects).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from trainer.launch.progress import Bar, terminal_bar
from trainer.launch.runtime import Collectives, Metrics
from trainer.metrics import train_metrics


def worker_logging(others: str = "WARNING") -> None:
    """npid's log lines (``trainer.*``, ``featurestore.*`` at INFO) on this worker's stdout,
    which Ray forwards to the driver; every other logger at ``others`` and above.

    Ray Train's ``LoggingConfig`` filters only loggers named ``ray.train.*``; its worker
    context logs each report ("Reporting training result N: …") to a logger named by its
    file path, which the root logger printed at INFO (Ray 2.60)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("trainer", "featurestore"):
        log = logging.getLogger(name)
        if not any(getattr(h, "_npid_worker", False) for h in log.handlers):
            handler._npid_worker = True  # type: ignore[attr-defined]
            log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    logging.getLogger().setLevel(others)


class RayRuntime(Collectives):
    """One Ray Train worker of a TorchTrainer group (DDP over gloo or nccl).

    Args:
        terminal: the driver's ``stderr`` is a terminal (bars are drawn there).
    """

    def __init__(self, terminal: bool = False) -> None:
        self.terminal = terminal
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

    def progress(self, iterable: Iterable[Any], *, desc: str, unit: str, enabled: bool) -> Bar:
        """A bar the driver draws on its terminal (``ray.experimental.tqdm_ray``); a worker's
        own ``stderr`` is a log."""
        if not (enabled and self.terminal):
            return terminal_bar(iterable, desc=desc, unit=unit, enabled=False)
        return _DriverBar(iterable, desc, unit)


class _DriverBar:
    """:class:`~trainer.launch.progress.Bar` over ``tqdm_ray`` (which has no ``set_postfix``)."""

    def __init__(self, iterable: Iterable[Any], desc: str, unit: str) -> None:
        self._desc = desc
        self._bar = _one_line_bar()(iterable, desc=desc, unit=unit)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._bar)

    def set_postfix(self, **values: Any) -> None:
        """Shown after the description (sent to the driver at most once a second)."""
        self._bar.set_description(" ".join([self._desc, *(f"{k}={v}" for k, v in values.items())]))

    def close(self) -> None:
        self._bar.close()


def _one_line_bar() -> type:
    """``tqdm_ray.tqdm`` whose state updates are one stdout line each: its own ``print(state +
    "\\n", end="")`` reached a Ray Train driver as the state and an empty worker line (two
    blank ``(RayTrainWorker)`` lines an epoch, seen with Ray 2.60)."""
    import json
    import time

    from ray.experimental import tqdm_ray

    class OneLine(tqdm_ray.tqdm):
        def _dump_state(self, force_flush: bool = False) -> None:
            now = time.time()
            if not force_flush and now - self._last_flush_time < self._flush_interval_s:
                return
            self._last_flush_time = now
            print(json.dumps(self._get_state()), flush=True)

    return OneLine


__all__ = ["RayRuntime"]
