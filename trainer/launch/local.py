"""``python -m trainer.run --launcher local``: the worker loop in this process, without Ray.

The very loop Ray Train runs (:func:`trainer.loop.run_worker`), with one worker, the
in-process :class:`~featurestore.MemoryBank` and :class:`~trainer.launch.runtime.LocalRuntime`
(checkpoints under ``OUTPUT/ray/<run>/checkpoint_*``, found again by ``--resume``). Nothing
imported on this path imports Ray, so it runs where Ray is not installed.
"""

from __future__ import annotations

from pathlib import Path

from trainer.config import TrainConfig
from trainer.guard import TrainingStoppedError
from trainer.launch.runtime import LocalRuntime
from trainer.loop import run_worker
from trainer.plan import RunPlan


def run(cfg: TrainConfig, plan: RunPlan) -> None:
    """Train in this process; raises :class:`TrainingStoppedError` when the run stopped."""
    Path(plan.output).mkdir(parents=True, exist_ok=True)
    runtime = LocalRuntime(plan.storage_path, plan.run_name, cfg.use_gpu)
    stopped = run_worker({"config": cfg.to_dict(), "plan": plan.to_dict()}, runtime)
    if stopped is not None:
        raise TrainingStoppedError(stopped, epoch=-1, step=-1)
