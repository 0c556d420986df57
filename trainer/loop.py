"""The per-worker training loop, the same under both launchers (:mod:`trainer.launch.runtime`).

Each step: encode → ``bank.step_async(f, ids, objective)`` → load the next batch while the
bank (the store's shards, or the in-process bank) works → ``f.backward(∂loss/∂f)`` →
optimizer step. Labels are never used for training, only by the kNN evaluation.
Ray Train runs :func:`train_loop_per_worker` in each worker; ``--launcher local`` runs
:func:`run_worker` in the launching process with :class:`~trainer.launch.runtime.LocalRuntime`,
and nothing on that path imports Ray.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from featurestore.files import is_url
from trainer.checkpoints import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.config import OptimConfig
from trainer.data.mixing import LabelMixing, mixing_warning
from trainer.data.order import _mix
from trainer.evaluation import evaluate, index_from_export
from trainer.experiments.parametric import head_state, load_head_state
from trainer.guard import DivergenceWatch, TrainingStoppedError
from trainer.launch.runtime import Runtime
from trainer.metrics import append_jsonl, truncate_jsonl_after
from trainer.model.export import export_encoder
from trainer.run_record import checkpoint_bank

# What a worker holds and how it is built; these names import from here as before.
from trainer.worker import (  # noqa: F401
    Worker,
    build_optimizer,
    load_split,
    setup,
    train_batches,
)

logger = logging.getLogger(__name__)

MILESTONES = (0.4, 0.6, 0.8)
_SALT_EPOCH = 0x5EED04


def learning_rate(cfg: OptimConfig, epoch: int, epochs: int) -> float:
    """LR of ``epoch`` (0-based): a linear warm-up over ``cfg.warmup_epochs``, then ×0.1 at
    each milestone (step) or cosine decay."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / max(1, epochs)))
    drops = sum(1 for f in MILESTONES if int(f * epochs) > 0 and epoch >= int(f * epochs))
    return cfg.lr * (0.1**drops)


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
        if w.bank is not None:  # the bank's rows, Z and step (none with --objective parametric)
            w.bank.restore_checkpoint(
                {"bank": state.bank, "store_snapshot": state.store_snapshot}, str(source)
            )
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


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (None: unchanged). Batch augmentation is
    many small elementwise ops: on a CPU one thread does them faster than two, and leaves
    the other core to a store shard computing the step's statistics at the same time
    (README, "Performance", has the measurement)."""
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
    w.runtime.all_reduce(ok, op="min")
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
    # The store client's per-step math is O(B·d): on a CPU one thread (more spin and take
    # the shards' cores); the in-process bank does the whole step's math itself and keeps
    # every thread.
    client = None if w.bank is not None and w.bank.in_process else loading
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
    w.runtime.all_reduce(sums)
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
    kept = {} if w.bank is None else checkpoint_bank(w.bank, w.plan)
    state = TrainState(
        model=w.encoder.state_dict(),
        optimizer=w.optimizer.state_dict(),
        epoch=epoch,
        step=step,
        store_snapshot=kept.get("store_snapshot"),
        bank=kept.get("bank"),
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
    w.runtime.barrier()  # nobody steps the store before rank 0 has restored its snapshot
    epochs = w.plan.epochs
    loader = train_batches(w)
    evaluate_now = w.cfg.eval_every > 0  # 0: never (throughput runs)
    objective = w.plan.objective
    z_mode = "ema" if objective.get("z_momentum") is not None else "fixed"
    watch = DivergenceWatch(objective["kind"], z_mode, w.cfg.nce_m)
    mixing = LabelMixing(w.train.index.labels, w.plan.batch_size // w.world)
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
        w.plan.encoder_config(),
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
    from trainer.launch.ray_runtime import RayRuntime, worker_logging  # Ray: the worker's context

    worker_logging(loop_config.get("ray_log_level", "WARNING"))
    run_worker(loop_config, RayRuntime(terminal=loop_config.get("terminal", False)))
