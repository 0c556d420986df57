"""Resolve a :class:`TrainConfig` against its data before anything starts (no Ray).

Everything that can be known up front is checked here, so that bad input fails in the
driver with one clear line instead of inside a training worker: the data locations and
their index, the objective against the dataset size, the augmentation preset, the
checkpoint to resume from and whether it matches the config.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from featurestore.files import is_url
from featurestore.objectives import NCE, Objective, SampledSoftmax, Softmax
from trainer.checkpoints import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    load_checkpoint_meta,
)
from trainer.config import (
    BUILTIN,
    DEFAULT_NCE_K,
    RESUME_KEYS,
    SOFTMAX_AUTO_MAX_ROWS,
    ConfigError,
    TrainConfig,
)
from trainer.data import ShardIndex
from trainer.data.cache import decoded_bytes
from trainer.data.transforms import DEFAULT_SIZE
from trainer.experiments.parametric import KIND as PARAMETRIC
from trainer.experiments.parametric import Parametric
from trainer.model.encoders import EncoderConfig
from trainer.shards.index import ensure_index, names_shards
from trainer.shards.make import ensure_builtin_dataset

logger = logging.getLogger(__name__)

#: The reference default K, replaced by the exact softmax on datasets smaller than it.
DEFAULT_K = DEFAULT_NCE_K


@dataclass
class RunPlan:
    """A config resolved against its data: what the driver and workers run."""

    config: dict[str, Any]
    train_data: str
    val_data: str | None
    num_rows: int
    num_classes: int
    preset: str
    image_size: int
    arch: str
    epochs: int
    objective: dict[str, Any]
    output: str
    store_name: str
    create_store: bool
    resume_from: str | None
    storage_path: str
    """Ray Train storage of this launch (local path or URL)."""
    run_name: str
    """Ray Train run name, unique per launch: checkpoints under storage_path/run_name."""
    data_cache: str = "off"
    """off | memory | device: where the decoded dataset is held (resolved from auto)."""
    batch_size: int = 256
    """The global batch size (the dataset's default when ``--batch-size`` is not given)."""
    bank: str = "store"
    """store | local | none: where the bank lives (``--bank auto`` resolved)."""
    encoder: dict[str, Any] = field(default_factory=dict)
    """The encoder the workers build and export: an
    :class:`~trainer.model.encoders.EncoderConfig` as a dict (``arch``, ``low_dim`` and the
    stem the preset asks for)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data (sent to every worker)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunPlan:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)

    def encoder_config(self) -> EncoderConfig:
        """The encoder, typed (see :attr:`encoder`)."""
        return EncoderConfig.from_dict(self.encoder)

    def build_objective(self) -> Objective | None:
        """The bank's objective object; None with ``--objective parametric`` (no bank)."""
        if self.objective["kind"] == PARAMETRIC:
            return None
        return Objective.from_dict(self.objective)


def _absolute(location: str) -> str:
    return location if is_url(location) else os.path.abspath(location)


def _writable_dir(location: str, flag: str) -> str:
    """``location`` made absolute, created if missing and checked writable, or a
    :class:`ConfigError` naming ``flag`` and the reason (an impossible or read-only path)."""
    path = os.path.abspath(location)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".npid-write-test-{uuid.uuid4().hex[:8]}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{flag} {location}: cannot write there ({reason})") from None
    return path


def _no_index_hint(path: Path) -> str:
    """What to run for a directory without an index or tar shards (those are indexed on
    the fly): its images (an ImageFolder) written as shards beside it, never into it."""
    if not path.is_dir():
        return "--data names a shard directory (index.parquet, dataset.json, shard-*.tar)"
    out = f"{path.resolve().as_posix().rstrip('/')}-shards"
    return (
        f"if it holds images (one folder per class), write shards beside it with "
        f"python -m trainer.make_shards {path} {out}, then pass --data {out}"
    )


def _load_index(location: str, flag: str, label: str = "cls") -> ShardIndex:
    if names_shards(location):  # existing webdataset shards: index them once
        try:
            location = str(ensure_index(location, label))
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{flag} {location}: {exc}") from None
    if not is_url(location):
        path = Path(location)
        if not path.exists():
            raise ConfigError(f"{flag} {location}: no such directory")
        if not (path / "index.parquet").is_file():
            raise ConfigError(f"{flag} {location}: no index.parquet; {_no_index_hint(path)}")
    try:
        return ShardIndex.load(location)
    except ValueError as exc:
        raise ConfigError(f"{flag} {location}: {exc}") from None


def resolve_objective(cfg: TrainConfig, num_rows: int) -> Objective | Parametric:
    """The objective for ``num_rows`` instances; raises :class:`ConfigError` on K >= N."""
    kind = cfg.objective_kind  # a given --nce-k has made auto NCE already
    if kind == PARAMETRIC:
        return Parametric()
    common = {"temperature": cfg.nce_t, "prox_lambda": cfg.prox_lambda}
    k = cfg.resolved_nce_k
    if kind == "auto":
        if num_rows <= SOFTMAX_AUTO_MAX_ROWS:
            logger.info(
                "objective auto: the exact softmax over all %d instances (the sampled "
                "softmax above %d; pass --objective nce or --nce-k K for the paper's NCE)",
                num_rows,
                SOFTMAX_AUTO_MAX_ROWS,
            )
            kind = "softmax"
        else:
            logger.info(
                "objective auto: the sampled softmax with K=%d (the exact softmax up to %d "
                "instances; pass --objective nce or --nce-k K for the paper's NCE)",
                k,
                SOFTMAX_AUTO_MAX_ROWS,
            )
            kind = "sampled-softmax"
    if kind != "softmax" and k >= num_rows:
        if cfg.nce_k is None:  # the default K on a small dataset: no noise to sample
            # asked for by name (--objective nce), the switch is worth a warning
            say = logger.info if cfg.objective == "auto" else logger.warning
            say(
                "the default K=%d noise samples is not smaller than the %d training images: "
                "using the exact softmax, not %s (pass --nce-k to choose K)",
                k,
                num_rows,
                kind,
            )
            return Softmax(**common)
        raise ConfigError(
            f"--nce-k {k} must be smaller than the {num_rows} training instances "
            f"(or 0 for the exact softmax)"
        )
    if kind == "softmax":
        return Softmax(**common)
    if kind == "sampled-softmax":
        return SampledSoftmax(num_negatives=k, **common)
    momentum = cfg.nce_z_momentum if cfg.nce_z == "ema" else None
    return NCE(num_negatives=k, z_momentum=momentum, **common)


def resolve_data_cache(
    cfg: TrainConfig, train_index: ShardIndex, val_index: ShardIndex | None
) -> str:
    """off | memory | device for ``--data-cache`` (auto: the decoded data fit the budget)."""
    if cfg.data_cache != "auto":
        return cfg.data_cache
    sizes = [decoded_bytes(i) for i in (train_index, val_index) if i is not None]
    budget = cfg.data_cache_budget * 2**30
    if any(size is None for size in sizes):
        logger.info("data cache off: images of more than one size (streaming the shards)")
        return "off"
    if sum(sizes) > budget:
        logger.info(
            "data cache off: decoded data (%.1f GiB) exceed --data-cache-budget %.1f GiB",
            sum(sizes) / 2**30,
            cfg.data_cache_budget,
        )
        return "off"
    return "device" if cfg.use_gpu else "memory"


def _newest_checkpoint(roots: list[str]) -> str | None:
    """The newest (by step) complete checkpoint below any of ``roots`` (paths or URLs)."""
    best: tuple[int, str] | None = None
    for root in roots:
        found = latest_checkpoint(root)
        if found is not None:
            step = int(load_checkpoint_meta(found)["step"])
            if best is None or step > best[0]:
                best = (step, str(found))
    return None if best is None else best[1]


def check_resumable(cfg: TrainConfig, found: str, state: TrainState, saved: TrainConfig) -> None:
    """Raise one :class:`ConfigError` line unless ``cfg`` may continue checkpoint ``found``:
    every setting of :data:`RESUME_KEYS` (data, model, objective, bank kind, momentum, seed)
    as saved, and the checkpoint holding the bank of that kind (rows and Z)."""
    diffs = cfg.differences(saved, RESUME_KEYS)
    if diffs:
        raise ConfigError(
            f"--resume: checkpoint {found} is from another config (" + "; ".join(diffs) + ")"
        )
    if cfg.resolved_bank == "local" and state.bank is None:
        raise ConfigError(f"--resume: checkpoint {found} holds no in-process bank to restore")
    if cfg.resolved_bank == "store" and state.store_snapshot is None:
        raise ConfigError(f"--resume: checkpoint {found} names no store snapshot to restore")
    if cfg.resolved_bank == "none" and state.head is None:
        raise ConfigError(f"--resume: checkpoint {found} holds no parametric classifier")


def make_plan(cfg: TrainConfig) -> RunPlan:
    """Resolve ``cfg``; raises :class:`ConfigError` naming the bad input."""
    if cfg.builtin:
        cache = os.environ.get("NPID_CACHE_DIR")
        train_data = str(ensure_builtin_dataset(cache, "train"))
        val_data = cfg.val_data or str(ensure_builtin_dataset(cache, "test"))
        logger.info(
            "built-in dataset %s: shards at %s (train) and %s (test); name it 'digits' in "
            "knn_service commands",
            BUILTIN,
            train_data,
            val_data,
        )
    else:  # workers run in another directory: local paths become absolute
        train_data, val_data = _absolute(cfg.data), cfg.val_data and _absolute(cfg.val_data)
    train_index = _load_index(train_data, "--data", cfg.data_label)
    val_index: ShardIndex | None = None
    if val_data is not None:
        val_index = _load_index(val_data, "--val-data", cfg.data_label)
        unlabelled = int((val_index.labels < 0).sum())
        if unlabelled:
            raise ConfigError(
                f"--val-data {val_data}: {unlabelled} of its {val_index.num_instances} images "
                "have no label (-1; e.g. files at the ImageFolder root), so the kNN vote "
                "cannot score them: use a labelled split"
            )
    num_classes = ShardIndex.classes_of(train_index, val_index)
    preset = train_index.preset if cfg.augment == "auto" else cfg.augment
    objective = resolve_objective(cfg, train_index.num_instances)
    output = _writable_dir(cfg.output, "--output")
    resume_from = None
    if cfg.resume:
        roots = [output, *([cfg.storage_path] if cfg.storage_path else [])]
        try:
            found = _newest_checkpoint(roots)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--resume: cannot search {' or '.join(roots)}: {exc}") from None
        if found is None:
            raise ConfigError(f"--resume: no checkpoint under {' or '.join(roots)}")
        state, saved = load_checkpoint(found)
        check_resumable(cfg, found, state, TrainConfig.from_dict(saved))
        resume_from = str(found)
    arch, why = cfg.arch_choice()
    if cfg.arch == "auto":
        logger.info("--arch auto: %s (%s)", arch, why)
    store_name = cfg.store_name or f"npid-{uuid.uuid4().hex[:8]}"
    return RunPlan(
        config=cfg.to_dict(),
        train_data=train_data,
        val_data=val_data,
        num_rows=train_index.num_instances,
        num_classes=num_classes,
        preset=preset,
        image_size=cfg.image_size or DEFAULT_SIZE[preset],
        arch=arch,
        epochs=cfg.resolved_epochs,
        batch_size=cfg.resolved_batch_size,
        bank=cfg.resolved_bank,
        encoder=EncoderConfig.for_preset(arch, cfg.low_dim, preset).to_dict(),
        objective=objective.to_dict(),
        output=output,
        store_name=store_name,
        create_store=cfg.store_name is None,
        resume_from=resume_from,
        storage_path=cfg.storage_path or os.path.join(output, "ray"),
        run_name=f"train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
        data_cache=resolve_data_cache(cfg, train_index, val_index),
    )
