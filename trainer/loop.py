"""The per-worker training loop, the same under both launchers (:mod:`trainer.runtime`).

Each step: encode → ``bank.step_async(f, ids, objective)`` → load the next batch while the
bank (the store's shards, or the in-process bank) works → ``f.backward(∂loss/∂f)`` →
optimizer step. Labels are never used for training, only by the kNN evaluation.
Ray Train runs :func:`train_loop_per_worker` in each worker; ``--launcher local`` runs
:func:`run_worker` in the launching process with :class:`~trainer.runtime.LocalRuntime`,
and nothing on that path imports Ray.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from featurestore import MemoryBank
from featurestore.files import is_url
from trainer.augment import build_batch_transform
from trainer.checkpoints import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.data import ShardIndex, train_loader
from trainer.data.cache import load_decoded
from trainer.data.device_batches import DeviceBatches, resolve_decode
from trainer.data.memory_loader import CachedLoader
from trainer.data.order import _mix
from trainer.evaluation import EvalSetup, Split, evaluate, index_from_export
from trainer.guard import DivergenceWatch, TrainingStoppedError
from trainer.metrics import append_jsonl, truncate_jsonl_after
from trainer.mixing import LabelMixing, mixing_warning
from trainer.models import EncoderConfig, build_encoder, export_encoder
from trainer.parametric import InstanceClassifier, head_state, load_head_state, with_head
from trainer.plan import RunPlan
from trainer.run_record import snapshot_for_checkpoint
from trainer.runtime import Metrics, Runtime
from trainer.transforms import build_transform

logger = logging.getLogger(__name__)

MILESTONES = (0.4, 0.6, 0.8)
_SALT_EPOCH = 0x5EED04


def learning_rate(cfg: TrainConfig, epoch: int, epochs: int) -> float:
    """LR of ``epoch`` (0-based): a linear warm-up over ``cfg.warmup_epochs``, then ×0.1 at
    each milestone (step) or cosine decay."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / max(1, epochs)))
    drops = sum(1 for f in MILESTONES if int(f * epochs) > 0 and epoch >= int(f * epochs))
    return cfg.lr * (0.1**drops)


@dataclass
class Worker:
    """What one worker holds for the run."""

    cfg: TrainConfig
    plan: RunPlan
    runtime: Runtime
    metrics: Metrics
    model: nn.Module
    optimizer: torch.optim.Optimizer
    bank: object  # ShardedStore or MemoryBank (the same interface); None: --objective parametric
    train: Split
    val: Split | None
    """The datasets, read once per worker (index, and pixels when held decoded)."""

    @property
    def rank(self) -> int:
        return self.runtime.rank

    @property
    def world(self) -> int:
        return self.runtime.world

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def network(self) -> nn.Module:
        """The model without its torch.compile and DDP wrappers (with --objective parametric
        the encoder and its classifier, :class:`~trainer.parametric.InstanceClassifier`)."""
        model = getattr(self.model, "_orig_mod", self.model)
        return getattr(model, "module", model)

    @property
    def encoder(self) -> nn.Module:
        """The bare encoder."""
        network = self.network
        return network.encoder if isinstance(network, InstanceClassifier) else network

    def eval_setup(self) -> EvalSetup:
        """How this run encodes and votes."""
        return EvalSetup(
            preset=self.plan.preset,
            image_size=self.plan.image_size,
            dim=self.cfg.low_dim,
            device=self.device,
            num_classes=self.plan.num_classes,
            k=self.cfg.knn_k,
            temperature=self.cfg.nce_t,
            autocast=self.cfg.autocast,
        )


def _open_bank(cfg: TrainConfig, plan: RunPlan, device: torch.device):
    if cfg.resolved_bank == "none":  # --objective parametric: the classifier replaces it
        return None
    if cfg.resolved_bank == "local":  # in-process bank (the local launcher, benchmarks)
        return MemoryBank(
            plan.num_rows,
            cfg.low_dim,
            momentum=cfg.nce_m,
            seed=cfg.seed,
            dtype=cfg.store_dtype,
            device=device,
        )
    from featurestore.store import ShardedStore  # Ray: the store client

    return ShardedStore.attach(plan.store_name)


def load_split(index: ShardIndex, plan: RunPlan, cfg: TrainConfig, device: torch.device) -> Split:
    """``index``'s split, its decoded pixels held (on ``device`` or the CPU, as the plan's
    data cache says) or streamed from the shards."""
    if plan.data_cache == "off":
        return Split(index)
    where = device if plan.data_cache == "device" else torch.device("cpu")
    return Split(index, load_decoded(index, workers=cfg.loader_workers).to(where))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum and weight decay, fused (one kernel for all parameters, on CUDA and
    CPU) where this torch supports it for the parameters' device."""
    kwargs = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.SGD(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError) as exc:  # an older torch or an unsupported device
        logger.info("fused SGD unavailable (%s): using the foreach implementation", exc)
        return torch.optim.SGD(model.parameters(), **kwargs)


def setup(loop_config: dict, runtime: Runtime) -> Worker:
    """Build this worker's model, optimizer, bank client and datasets."""
    cfg = TrainConfig.from_dict(loop_config["config"])
    plan = RunPlan.from_dict(loop_config["plan"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // runtime.world))
    torch.manual_seed(cfg.seed)
    model = build_encoder(**EncoderConfig.for_preset(plan.arch, cfg.low_dim, plan.preset).to_dict())
    model = with_head(model, plan.objective, plan.num_rows, cfg.low_dim)  # parametric: + head
    # channels_last: oneDNN's and cuDNN's fast convolution layout (1.4x for the small
    # encoder on a 2-core CPU, measured).
    model = runtime.prepare_model(model.to(memory_format=torch.channels_last))
    optimizer = build_optimizer(model, cfg)
    if cfg.compile:
        model = torch.compile(model)
    device = runtime.device
    train = load_split(ShardIndex.load(plan.train_data), plan, cfg, device)
    val = None
    if plan.val_data is not None:
        val = load_split(ShardIndex.load(plan.val_data), plan, cfg, device)
    bank = _open_bank(cfg, plan, device)
    return Worker(cfg, plan, runtime, runtime.metrics(), model, optimizer, bank, train, val)


def resume(w: Worker) -> tuple[int, int]:
    """Load the latest checkpoint: ``(start_epoch, step)``.

    After a worker failure the launcher hands back the last reported checkpoint; on
    ``--resume`` the driver found the run's latest one (``plan.resume_from``).
    """
    restart = w.runtime.restart_checkpoint()
    # A worker killed right after reporting can restart before the controller registered
    # that report: then the newest complete checkpoint of this launch on disk is the truth.
    on_disk = None
    if not is_url(w.plan.storage_path):
        on_disk = latest_checkpoint(Path(w.plan.storage_path) / w.plan.run_name)
    source = on_disk or restart or w.plan.resume_from
    if not source:
        return 0, 0
    state, _ = load_checkpoint(source)
    w.encoder.load_state_dict(state.model)
    load_head_state(w.network, state.head, str(source))
    w.optimizer.load_state_dict(state.optimizer)
    if w.rank == 0:
        if isinstance(w.bank, MemoryBank):
            if state.bank is None:
                raise ValueError(f"checkpoint {source} holds no in-process bank to restore")
            w.bank.load_state_dict(state.bank)  # the in-process bank's rows, Z and step
        elif w.bank is not None:  # the store (none with --objective parametric)
            if state.store_snapshot is None:
                raise ValueError(f"checkpoint {source} names no store snapshot to restore")
            w.bank.load_snapshot(state.store_snapshot)  # rows, Z and step of the checkpoint
        truncate_jsonl_after(Path(w.plan.output) / "metrics.jsonl", state.step)
    why = "after a worker failure" if (on_disk or restart) else "on --resume"
    bank = "" if w.bank is None else ", the bank's rows and Z"
    say = logger.warning if (on_disk or restart) else logger.info
    say(
        "resumed at epoch %d, step %d %s: the model, optimiser%s restored from checkpoint %s; "
        "the steps after it are repeated", state.epoch, state.step, why, bank, source,
    )  # fmt: skip
    return state.epoch, state.step


def evaluate_knn(w: Worker, recompute: bool = False) -> dict[str, float]:
    """kNN top-1/top-5 on the validation data (rank 0 only): train features from the bank,
    or recomputed with the test transform (always without a bank: --objective parametric)."""
    if w.val is None:
        return {}
    recompute = recompute or w.bank is None
    bank = None if recompute else index_from_export(w.bank.export(), w.cfg.low_dim)
    found = evaluate(w.encoder, w.train, w.val, w.eval_setup(), bank)
    result = {"knn_top1": found["knn_top1"], "knn_top5": found["knn_top5"]}
    w.metrics.gauge("knn_top1", result["knn_top1"])
    w.metrics.gauge("knn_top5", result["knn_top5"])
    return result


def train_batches(w: Worker):
    """This rank's training loader: its part of every epoch, train transform, batch
    ``global batch / world``; from the decoded pixels when held, else the shards. Streamed
    images of one size (and any images with ``--decode gpu``) are augmented on the device
    by the same batched transform as the decoded cache's."""
    batch = w.cfg.resolved_batch_size // w.world
    if w.train.pixels is not None:
        return CachedLoader(
            w.train.pixels,
            batch,
            build_batch_transform(w.plan.preset, train=True, image_size=w.plan.image_size),
            train=True,
            rank=w.rank,
            world_size=w.world,
            seed=w.cfg.seed,
            device=w.device,
        )
    meta = w.train.index.meta
    fixed = bool(meta.get("image_size_min")) and meta.get("image_size_min") == meta.get(
        "image_size_max"
    )
    decode = resolve_decode(w.cfg.decode, w.device, fixed, cached=False)
    on_device = decode == "gpu" or fixed  # the in-memory path's batched augmentation
    loader = train_loader(
        w.train.index,
        batch,
        None if on_device else build_transform(w.plan.preset, True, w.plan.image_size),
        rank=w.rank,
        world_size=w.world,
        num_workers=w.cfg.loader_workers,
        seed=w.cfg.seed,
        shuffle_buffer=w.cfg.shuffle_buffer,
        open_shards=w.cfg.open_shards,
        pin_memory=w.device.type == "cuda" and not on_device,
        output=("bytes" if decode == "gpu" else "pixels") if on_device else "tensor",
    )
    if not on_device:
        return loader
    transform = build_batch_transform(w.plan.preset, train=True, image_size=w.plan.image_size)
    return DeviceBatches(loader, transform, w.device, seed=w.cfg.seed, rank=w.rank)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (None: unchanged). Batch augmentation is
    many small elementwise ops: on a CPU one thread does them faster than two (20 vs 33 ms
    for 256 CIFAR images, measured), and leaves the other core to a store shard computing
    the step's statistics at the same time."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _all_finite(w: Worker, feats: torch.Tensor) -> bool:
    """Whether every rank's features are finite (one small all-reduce with several ranks)."""
    ok = torch.isfinite(feats).all().to(torch.float32).reshape(1).cpu()
    if w.world > 1 and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def train_epoch(
    w: Worker, loader, epoch: int, step: int, mixing: LabelMixing | None = None
) -> tuple[int, float, float, int]:
    """One epoch: ``(step, mean loss, images/s, corrupt samples skipped)``, all ranks.

    With ``mixing``, the batches' labels are counted there and ``mixing.last`` becomes the
    epoch's label mixing (all ranks; ``None`` without labels).

    Raises:
        TrainingStoppedError: the features or the epoch's loss are not finite.
    """
    lr = learning_rate(w.cfg, epoch, w.plan.epochs)
    for group in w.optimizer.param_groups:
        group["lr"] = lr
    objective = w.plan.build_objective()
    w.metrics.gauge("epoch", epoch + 1)
    # Everything random in an epoch follows (seed, epoch, rank): the in-process loader's
    # augmentation draws from the global RNG, so a resumed run repeats them exactly.
    torch.manual_seed(_mix(w.cfg.seed, epoch, w.rank, _SALT_EPOCH))
    loader.set_epoch(epoch)
    w.model.train()
    total, count, images = 0.0, 0, 0
    start = time.perf_counter()
    bar = w.runtime.progress(
        loader,
        desc=f"epoch {epoch + 1}/{w.plan.epochs}",
        unit="batch",
        # a bar on a terminal only (the driver's, for Ray workers): a log gets one line an epoch
        enabled=w.rank == 0 and w.cfg.progress,
    )
    batches = iter(bar)
    loading = 1 if w.device.type == "cpu" else None  # see _torch_threads
    # The store client's per-step math is O(B·d): on a CPU one thread (more spin and take the
    # shards' cores: 4.3 ms of CPU per step instead of 1.5 with two, measured); the
    # in-process bank does the whole step's math itself and keeps every thread.
    client = None if isinstance(w.bank, MemoryBank) else loading
    with _torch_threads(loading):
        batch = next(batches, None)
    while batch is not None:
        x, ids, labels = batch
        if mixing is not None:
            mixing.add(labels)
        t0 = time.perf_counter()
        x = x.to(w.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=w.cfg.autocast):
            # parametric: the model is the encoder and its classifier and gives the loss too
            feats, step_loss = w.model(x, ids) if objective is None else (w.model(x), None)
        if not _all_finite(w, feats):
            raise TrainingStoppedError(
                f"the encoder's features became non-finite at epoch {epoch + 1}, step "
                f"{step + 1} (lr {lr:.4g}): lower --lr or add --warmup-epochs",
                epoch + 1,
                step,
            )
        if step_loss is None:
            with _torch_threads(client):
                pending = w.bank.step_async(feats.detach().float(), ids, objective)
        with _torch_threads(loading):
            batch = next(batches, None)  # the bank scores and updates while the next loads
        w.optimizer.zero_grad(set_to_none=True)
        if step_loss is None:
            with _torch_threads(client):
                out = pending.result()
            feats.backward(out.grad.to(feats.device, feats.dtype))
            step_loss = out.loss
        else:
            step_loss.backward()
        w.optimizer.step()
        step += 1
        loss = float(step_loss.detach())
        total, count, images = total + loss * len(ids), count + len(ids), images + len(ids)
        w.metrics.gauge("loss", loss)
        w.metrics.count("images", len(ids))
        w.metrics.observe("step_seconds", time.perf_counter() - t0)
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images / (time.perf_counter() - start):.0f}")
    bar.close()
    elapsed = time.perf_counter() - start
    if loader.epoch_skipped:
        w.metrics.count("skipped", loader.epoch_skipped)
    entropy = mixing.entropy_sum() if mixing is not None else 0.0
    batches = mixing.batches if mixing is not None else 0
    sums = torch.tensor(
        [total, count, images, elapsed, loader.epoch_skipped, entropy, batches],
        dtype=torch.float64,
    )
    if w.world > 1 and dist.is_initialized():
        dist.all_reduce(sums)
    skipped = int(sums[4])
    if mixing is not None:
        mixing.last = mixing.fraction(float(sums[5]), int(sums[6]))
        mixing.reset()
    if skipped and w.rank == 0:  # reported once per epoch, for all ranks
        logger.warning("epoch %d: skipped %d corrupt samples", epoch + 1, skipped)
    loss_mean = float(sums[0] / max(1.0, sums[1]))
    if not math.isfinite(loss_mean):
        raise TrainingStoppedError(
            f"the loss became non-finite in epoch {epoch + 1} (lr {lr:.4g}): lower --lr",
            epoch + 1,
            step,
        )
    return step, loss_mean, float(sums[2] / (sums[3] / w.world)), skipped


def checkpoint(w: Worker, epoch: int, step: int, record: dict) -> None:
    """Snapshot the bank and report a checkpoint (rank 0) or just the metrics."""
    if w.rank != 0:
        w.runtime.report(record)
        return
    local = isinstance(w.bank, MemoryBank)
    state = TrainState(
        model=w.encoder.state_dict(),
        optimizer=w.optimizer.state_dict(),
        epoch=epoch,
        step=step,
        store_snapshot=None if local or w.bank is None else snapshot_for_checkpoint(w.bank, w.plan),
        bank=w.bank.state_dict() if local else None,
        head=head_state(w.network),
    )
    with tempfile.TemporaryDirectory(prefix="npid-ckpt-") as tmp:
        save_checkpoint(tmp, state, w.cfg.to_dict())
        w.runtime.report(record, checkpoint_dir=Path(tmp))


def _record(w: Worker, record: dict) -> None:
    if w.rank == 0:
        append_jsonl(Path(w.plan.output) / "metrics.jsonl", record)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}
        logger.info("npid %s", shown)


def _final_record(w: Worker, epoch: int, step: int, result: dict) -> dict:
    return {
        "epoch": epoch,
        "step": step,
        "features": "recomputed",
        "loss": None,
        "images_per_sec": None,
        **result,
    }


def _train(w: Worker) -> None:
    start_epoch, step = resume(w)
    if w.world > 1 and dist.is_initialized():
        dist.barrier()  # nobody steps the store before rank 0 has restored its snapshot
    epochs = w.plan.epochs
    loader = train_batches(w)
    evaluate_now = w.cfg.eval_every > 0  # 0: never (throughput runs)
    objective = w.plan.objective
    z_mode = "ema" if objective.get("z_momentum") is not None else "fixed"
    watch = DivergenceWatch(objective["kind"], z_mode, w.cfg.nce_m)
    mixing = LabelMixing(w.train.index.labels, w.cfg.resolved_batch_size // w.world)
    mixing_warned = False
    if evaluate_now and start_epoch == 0 and step == 0 and w.rank == 0:
        # Before the first step the bank holds random rows: evaluate recomputed features.
        _record(w, _final_record(w, 0, 0, evaluate_knn(w, recompute=True)))
    for epoch in range(start_epoch, epochs):
        step, loss, ips, skipped = train_epoch(w, loader, epoch, step, mixing)
        done = epoch + 1
        record = {
            "epoch": done,
            "step": step,
            "loss": loss,
            "images_per_sec": ips,
            "skipped": skipped,
        }
        if mixing.last is not None:
            record["label_mixing"] = mixing.last
            poor = mixing_warning(mixing.last)
            if poor is not None and not mixing_warned and w.rank == 0:
                mixing_warned = True
                logger.warning("warning: %s", poor)
        warning = watch.check(done, loss)
        if warning is not None:
            record["warning"] = warning
            if w.rank == 0:
                logger.warning("warning: %s", warning)
        if evaluate_now and w.rank == 0 and (done % w.cfg.eval_every == 0 or done == epochs):
            features = "bank" if w.bank is not None else "recomputed"
            record.update(features=features, **evaluate_knn(w))
        _record(w, record)
        if done % w.cfg.checkpoint_every == 0 or done == epochs:
            checkpoint(w, done, step, record)
        else:
            w.runtime.report(record)
    if w.rank != 0:
        return
    if evaluate_now:
        _record(w, _final_record(w, epochs, step, evaluate_knn(w, recompute=True)))
    export_encoder(
        w.encoder.cpu(),
        EncoderConfig.for_preset(w.plan.arch, w.cfg.low_dim, w.plan.preset),
        Path(w.plan.output) / "encoder",
        metadata={"preset": w.plan.preset, "image_size": w.plan.image_size},
    )


def run_worker(loop_config: dict, runtime: Runtime) -> str | None:
    """Run one worker's part of the training; ``loop_config = {"config": TrainConfig,
    "plan": RunPlan}`` dicts. Returns None, or the reason the run stopped (non-finite
    values; recorded in ``metrics.jsonl`` as ``"error"`` and reported, so the launcher ends
    the run instead of restarting it)."""
    w = setup(loop_config, runtime)
    try:
        _train(w)
    except TrainingStoppedError as exc:
        record = {"epoch": exc.epoch, "step": exc.step, "error": str(exc)}
        _record(w, record)
        runtime.report(record)
        return str(exc)
    return None


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point (``loop_config`` as in :func:`run_worker`)."""
    from trainer.ray_runtime import RayRuntime, worker_logging  # Ray: the worker's context

    worker_logging(loop_config.get("ray_log_level", "WARNING"))
    run_worker(loop_config, RayRuntime(terminal=loop_config.get("terminal", False)))
