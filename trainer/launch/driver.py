"""The driver side of a run: Ray, the feature store and the Ray Train TorchTrainer.

# Ray: this module and trainer/loop.py are where the trainer touches Ray.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from featurestore import ray_connect
from featurestore.shard_protocol import StoreConfig
from trainer.checkpoints import ray_storage
from trainer.config import ConfigError, TrainConfig
from trainer.guard import TrainingStoppedError
from trainer.launch.progress import is_terminal
from trainer.loop import train_loop_per_worker
from trainer.plan import RunPlan

logger = logging.getLogger(__name__)

PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def connect(create_store: bool = True) -> bool:
    """Connect to Ray: ``RAY_ADDRESS`` when set, else a new local instance on 127.0.0.1
    (a run that only attaches to ``--store-name`` looks for a running local cluster).

    Returns:
        True when this call started Ray (and the run should shut it down).

    Raises:
        ConfigError: no cluster to join, or it refuses this client (one line).
    """
    if create_store and not os.environ.get("RAY_ADDRESS"):
        # One machine, nothing to preempt: Ray Train's preemption watcher only adds an
        # error-level line about its own constructor to a default run's log.
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    try:
        return ray_connect.connect(start_local=create_store, log_to_driver=True)
    except ray_connect.RayConnectError as exc:
        raise ConfigError(str(exc)) from None


def store_threads(cfg: TrainConfig, local_ray: bool) -> int:
    """Threads per shard: ``--store-threads``, or with a local Ray this run started the
    machine's cores over the shards (the trainer's threads are idle while it waits for the
    shards' statistics), else 1."""
    if cfg.store_threads:
        return cfg.store_threads
    if not local_ray:
        return 1
    return max(1, (os.cpu_count() or 1) // cfg.num_shards)


def open_store(cfg: TrainConfig, plan: RunPlan, local_ray: bool = False):
    """Create the run's store or attach to ``--store-name``; check it fits the data."""
    if plan.bank != "store":  # in-process bank, or none (--objective parametric)
        return None
    from featurestore.store import ShardedStore

    if not plan.create_store:
        try:
            store = ShardedStore.attach(plan.store_name)
        except (LookupError, ValueError) as exc:
            raise ConfigError(f"--store-name {plan.store_name}: {exc}") from None
        if store.dim != cfg.low_dim:
            raise ConfigError(
                f"--store-name {plan.store_name}: the store has dim {store.dim}, "
                f"--low-dim is {cfg.low_dim}"
            )
        if store.num_rows < plan.num_rows:
            raise ConfigError(
                f"--store-name {plan.store_name}: the store has {store.num_rows} "
                f"rows but --data has ids up to {plan.num_rows - 1}"
            )
        return store
    return ShardedStore.from_config(store_config(cfg, plan, local_ray))


def store_config(cfg: TrainConfig, plan: RunPlan, local_ray: bool = False) -> StoreConfig:
    """The store a run creates: the bank component (``--num-shards --nce-m --store-dtype
    --store-threads --store-gpus-per-shard``) laid over the plan's rows, name and output."""
    return StoreConfig(
        num_rows=plan.num_rows,
        dim=cfg.low_dim,
        num_shards=cfg.num_shards,
        momentum=cfg.nce_m,
        seed=cfg.seed,
        name=plan.store_name,
        num_gpus_per_shard=(cfg.store_gpus_per_shard or 0.5 / cfg.num_shards) if cfg.use_gpu else 0,
        dtype=cfg.store_dtype,
        snapshot_dir=str(Path(plan.output) / "snapshots"),
        threads_per_shard=store_threads(cfg, local_ray),
    )


def torch_config(backend: str) -> TorchConfig:
    """Ray Train's torch setup; with the local Ray this process started, the workers'
    rendezvous listens on 127.0.0.1 only (:mod:`trainer.launch.rendezvous`)."""
    if ray_connect.started_on_loopback():
        from trainer.launch.rendezvous import LoopbackTorchConfig

        return LoopbackTorchConfig(backend=backend)
    return TorchConfig(backend=backend)


#: Ray Train's console log level (``INFO`` shows its per-epoch checkpoint lines).
RAY_TRAIN_LOG_ENV = "NPID_RAY_TRAIN_LOG_LEVEL"


def build_trainer(
    cfg: TrainConfig,
    plan: RunPlan,
    loop: Callable[[dict], None] = train_loop_per_worker,
    extra: dict[str, Any] | None = None,
) -> TorchTrainer:
    """The TorchTrainer: W workers of 1 CPU (1 GPU with --use-gpu), gloo or nccl.

    ``loop`` runs in each worker with ``{"config": …, "plan": …, **extra}`` (another loop:
    ``benchmarks/bench_trainer_interleaved.py``).
    """
    resources = {"CPU": 1, "GPU": 1} if cfg.use_gpu else {"CPU": 1}
    ray_log_level = os.environ.get(RAY_TRAIN_LOG_ENV, "WARNING").upper()
    if ray_log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(
            f"{RAY_TRAIN_LOG_ENV}={ray_log_level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL"
        )
    storage_path, storage_filesystem = ray_storage(plan.storage_path)
    return TorchTrainer(
        loop,
        train_loop_config={
            "config": cfg.to_dict(),
            "plan": plan.to_dict(),
            "terminal": is_terminal(),  # the workers' bars are drawn on this terminal
            "ray_log_level": ray_log_level,
            **(extra or {}),
        },
        torch_config=torch_config(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            # Ray Train V2's controller reserves no resources (its `trainer_resources` is
            # deprecated), so W workers of 1 CPU fit on W cores.
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=plan.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train's INFO lines (a checkpoint made, a result reported: two per epoch)
            # stay in its log files; npid prints its own line per epoch
            logging_config=LoggingConfig(log_level=ray_log_level),
        ),
    )


def run(
    cfg: TrainConfig,
    plan: RunPlan,
    loop: Callable[[dict], None] = train_loop_per_worker,
    extra: dict[str, Any] | None = None,
) -> None:
    """Train; raises on failure. Starts and stops Ray and the store when it made them.

    ``loop`` and ``extra`` as in :func:`build_trainer` (``python -m trainer.finetune``
    runs its own loop through this driver)."""
    Path(plan.output).mkdir(parents=True, exist_ok=True)
    started = connect(plan.create_store)
    store = None
    try:
        store = open_store(cfg, plan, local_ray=started)
        result = build_trainer(cfg, plan, loop, extra).fit()
        if result.error is not None:
            raise result.error
        stopped = (result.metrics or {}).get("error")
        if stopped:  # the workers stopped the run on purpose (non-finite values)
            raise TrainingStoppedError(stopped, epoch=-1, step=-1)
    finally:
        if store is not None and plan.create_store:
            store.shutdown()
        if started:
            ray.shutdown()
