"""The per-worker training loop (runs inside each Ray Train worker).

Each step: encode → ``store.step_async(f, ids, objective)`` → load the next batch while the
shards work → ``f.backward(∂loss/∂f)`` with the step's result → optimizer step. Labels are
never used for training, only by the kNN evaluation.
Ray appears at the marked places only: the context, model preparation, reporting and
checkpoints; the store client hides its own Ray calls.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train  # Ray: context, report, checkpoints
import ray.train.torch  # Ray: DDP preparation, device
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from featurestore import MemoryBank
from trainer.checkpoints import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.data import ShardIndex, eval_loader, train_loader
from trainer.evaluation import extract_features, index_from_export, knn_accuracy
from trainer.metrics import append_jsonl, train_metrics, truncate_jsonl_after
from trainer.models import EncoderConfig, build_encoder, export_encoder
from trainer.plan import RunPlan
from trainer.transforms import build_transform

logger = logging.getLogger(__name__)

MILESTONES = (0.4, 0.6, 0.8)
EVAL_BATCH = 256


def learning_rate(cfg: TrainConfig, epoch: int, epochs: int) -> float:
    """LR of ``epoch`` (0-based): ×0.1 at each milestone (step) or cosine decay."""
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / max(1, epochs)))
    drops = sum(1 for f in MILESTONES if int(f * epochs) > 0 and epoch >= int(f * epochs))
    return cfg.lr * (0.1**drops)


@dataclass
class Worker:
    """What one worker holds for the run."""

    cfg: TrainConfig
    plan: RunPlan
    rank: int
    world: int
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    bank: object  # ShardedStore or MemoryBank: the same interface
    train_index: ShardIndex
    val_index: ShardIndex | None
    """Dataset indexes, read once per worker (not at every evaluation)."""

    @property
    def encoder(self) -> nn.Module:
        """The model without its DDP wrapper."""
        return getattr(self.model, "module", self.model)


def _open_bank(cfg: TrainConfig, plan: RunPlan):
    if cfg.bank == "local":  # in-process bank (benchmarks, one worker)
        return MemoryBank(
            plan.num_rows, cfg.low_dim, momentum=cfg.nce_m, seed=cfg.seed, dtype=cfg.store_dtype
        )
    from featurestore.store import ShardedStore

    return ShardedStore.attach(plan.store_name)


def _setup(loop_config: dict) -> Worker:
    cfg = TrainConfig.from_dict(loop_config["config"])
    plan = RunPlan.from_dict(loop_config["plan"])
    ctx = ray.train.get_context()  # Ray: who am I
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(cfg.seed)
    model = build_encoder(
        plan.arch,
        cfg.low_dim,
        cifar_stem=plan.preset != "imagenet" if plan.arch != "small" else None,
    )
    if cfg.use_gpu:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # Ray: device placement + DDP
    device = ray.train.torch.get_device()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    train_index = ShardIndex.load(plan.train_data)
    val_index = ShardIndex.load(plan.val_data) if plan.val_data is not None else None
    bank = _open_bank(cfg, plan)
    return Worker(cfg, plan, rank, world, device, model, optimizer, bank, train_index, val_index)


def _resume(w: Worker) -> tuple[int, int]:
    """Load the latest checkpoint: ``(start_epoch, step)``.

    After a worker failure Ray Train hands back the last reported checkpoint; on
    ``--resume`` the driver found the run's latest one (``plan.resume_from``).
    """
    checkpoint = ray.train.get_checkpoint()  # Ray: set after a worker-group restart
    # A worker killed right after reporting can restart before the controller registered
    # that report: then the newest complete checkpoint of this launch on disk is the truth.
    on_disk = None
    if "://" not in w.plan.storage_path:
        on_disk = latest_checkpoint(Path(w.plan.storage_path) / w.plan.run_name)
    if on_disk is not None:
        state, _ = load_checkpoint(on_disk)
    elif checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state, _ = load_checkpoint(directory)
    elif w.plan.resume_from:
        state, _ = load_checkpoint(w.plan.resume_from)
    else:
        return 0, 0
    w.encoder.load_state_dict(state.model)
    w.optimizer.load_state_dict(state.optimizer)
    if w.rank == 0:
        if state.store_snapshot and hasattr(w.bank, "load_snapshot"):
            w.bank.load_snapshot(state.store_snapshot)  # bank back to the checkpoint's rows
        truncate_jsonl_after(Path(w.plan.output) / "metrics.jsonl", state.step)
    logger.info("resumed at epoch %d, step %d", state.epoch, state.step)
    return state.epoch, state.step


def _encode_all(w: Worker, index: ShardIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every instance of ``index`` with the test transform: ``(feats, seen)``."""
    test_tf = build_transform(w.plan.preset, train=False, image_size=w.plan.image_size)
    loader = eval_loader(index, EVAL_BATCH, test_tf)
    return extract_features(w.encoder, loader, index.num_instances, w.cfg.low_dim, w.device)


def _evaluate(w: Worker, recompute: bool = False) -> dict[str, float]:
    """kNN top-1/top-5 on the validation data (rank 0 only): train features from the bank,
    or recomputed with the test transform."""
    if w.val_index is None:
        return {}
    val_feats, val_seen = _encode_all(w, w.val_index)
    train_labels = torch.from_numpy(w.train_index.labels)
    if recompute:
        train, seen = _encode_all(w, w.train_index)
        train, train_labels = train[seen], train_labels[seen]  # skipped samples left out
    else:
        train = index_from_export(w.bank.export(), w.cfg.low_dim)
    result = knn_accuracy(
        train,
        train_labels,
        val_feats[val_seen],
        torch.from_numpy(w.val_index.labels)[val_seen],
        w.plan.num_classes,
        w.cfg.knn_k,
        w.cfg.nce_t,
    )
    metrics = train_metrics()
    metrics.keep(metrics.knn_top1, result["knn_top1"])
    metrics.keep(metrics.knn_top5, result["knn_top5"])
    return result


def _train_batches(w: Worker):
    """This rank's training loader: its part of every epoch, train transform, batch
    ``global batch / world``."""
    train_tf = build_transform(w.plan.preset, train=True, image_size=w.plan.image_size)
    return train_loader(
        w.train_index,
        w.cfg.resolved_batch_size // w.world,
        train_tf,
        rank=w.rank,
        world_size=w.world,
        num_workers=w.cfg.loader_workers,
        seed=w.cfg.seed,
    )


def _train_epoch(w: Worker, loader, epoch: int, step: int) -> tuple[int, float, float, int]:
    """One epoch: ``(step, mean loss, images/s, corrupt samples skipped)``, all ranks."""
    lr = learning_rate(w.cfg, epoch, w.plan.epochs)
    for group in w.optimizer.param_groups:
        group["lr"] = lr
    objective = w.plan.build_objective()
    metrics = train_metrics()
    metrics.keep(metrics.epoch, epoch + 1)
    loader.set_epoch(epoch)
    w.model.train()
    total, count, images = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{w.plan.epochs}",
        leave=False,
        unit="batch",
        disable=w.rank != 0 or not w.cfg.progress,
    )
    batches = iter(bar)
    batch = next(batches, None)
    while batch is not None:
        x, ids, _labels = batch
        t0 = time.perf_counter()
        x = x.to(w.device, non_blocking=True)
        if w.cfg.use_gpu:
            x = x.to(memory_format=torch.channels_last)
        with torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=w.cfg.use_gpu):
            feats = w.model(x)
        pending = w.bank.step_async(feats.detach().float(), ids, objective)
        batch = next(batches, None)  # the shards score and update while the next batch loads
        out = pending.result()
        w.optimizer.zero_grad(set_to_none=True)
        feats.backward(out.grad.to(feats.device, feats.dtype))
        w.optimizer.step()
        step += 1
        loss = float(out.loss)
        total, count, images = total + loss * len(ids), count + len(ids), images + len(ids)
        seconds = time.perf_counter() - t0
        metrics.loss.set(loss)
        metrics.images.inc(len(ids))
        metrics.step_seconds.observe(seconds)
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images / (time.perf_counter() - start):.0f}")
    elapsed = time.perf_counter() - start
    if loader.epoch_skipped:
        metrics.skipped.inc(loader.epoch_skipped)
    sums = torch.tensor([total, count, images, elapsed, loader.epoch_skipped], dtype=torch.float64)
    if w.world > 1 and dist.is_initialized():
        dist.all_reduce(sums)
    skipped = int(sums[4])
    if skipped and w.rank == 0:  # reported once per epoch, for all ranks
        logger.warning("epoch %d: skipped %d corrupt samples", epoch + 1, skipped)
    loss_mean = float(sums[0] / max(1.0, sums[1]))
    return step, loss_mean, float(sums[2] / (sums[3] / w.world)), skipped


def _checkpoint(w: Worker, epoch: int, step: int, record: dict) -> None:
    """Snapshot the store and report a checkpoint (rank 0) or just the metrics."""
    if w.rank != 0:
        ray.train.report(record)  # Ray: every rank reports
        return
    uri = w.bank.snapshot() if hasattr(w.bank, "snapshot") else None
    state = TrainState(
        model=w.encoder.state_dict(),
        optimizer=w.optimizer.state_dict(),
        epoch=epoch,
        step=step,
        store_snapshot=uri,
        data_position={"epoch": epoch, "batch": 0},
    )
    with tempfile.TemporaryDirectory(prefix="npid-ckpt-") as tmp:
        save_checkpoint(tmp, state, w.cfg.to_dict())
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp))  # Ray


def _record(w: Worker, record: dict) -> None:
    if w.rank == 0:
        append_jsonl(Path(w.plan.output) / "metrics.jsonl", record)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}
        logger.info("npid %s", shown)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point; ``loop_config = {"config": TrainConfig, "plan": RunPlan}`` dicts."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    w = _setup(loop_config)
    start_epoch, step = _resume(w)
    if w.world > 1 and dist.is_initialized():
        dist.barrier()  # nobody steps the store before rank 0 has restored its snapshot
    epochs = w.plan.epochs
    loader = _train_batches(w)
    evaluate = w.cfg.eval_every > 0  # 0: never (throughput runs)
    if evaluate and start_epoch == 0 and step == 0 and w.rank == 0:
        # Before the first step the bank holds random rows: evaluate recomputed features.
        knn = _evaluate(w, recompute=True)
        _record(
            w,
            {
                "epoch": 0,
                "step": 0,
                "loss": None,
                "images_per_sec": None,
                "features": "recomputed",
                **knn,
            },
        )
    for epoch in range(start_epoch, epochs):
        step, loss, ips, skipped = _train_epoch(w, loader, epoch, step)
        done = epoch + 1
        record = {
            "epoch": done,
            "step": step,
            "loss": loss,
            "images_per_sec": ips,
            "skipped": skipped,
        }
        if evaluate and w.rank == 0 and (done % w.cfg.eval_every == 0 or done == epochs):
            record.update(features="bank", **_evaluate(w))
        _record(w, record)
        if done % w.cfg.checkpoint_every == 0 or done == epochs:
            _checkpoint(w, done, step, record)
        else:
            ray.train.report(record)  # Ray
    if w.rank != 0:
        return
    if evaluate:
        final = _evaluate(w, recompute=True)
        _record(
            w,
            {
                "epoch": epochs,
                "step": step,
                "features": "recomputed",
                "loss": None,
                "images_per_sec": None,
                **final,
            },
        )
    export_encoder(
        w.encoder.cpu(),
        EncoderConfig(
            w.plan.arch,
            w.cfg.low_dim,
            None if w.plan.arch == "small" else w.plan.preset != "imagenet",
        ),
        Path(w.plan.output) / "encoder",
        metadata={"preset": w.plan.preset, "image_size": w.plan.image_size},
    )
