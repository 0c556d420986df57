"""What one training worker holds (:class:`Worker`) and how it is built from the run's
config and plan (:func:`setup`): the model (channels-last, maybe compiled), fused SGD, the
bank (the store's client, the in-process bank, or none for ``--objective parametric``), the
datasets, and the training loader of this rank (:func:`train_batches`). Used by
:mod:`trainer.loop` and, for the data, by :mod:`trainer.experiments.finetune_loop`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from featurestore import MemoryBank
from featurestore.bank_protocol import Bank
from trainer.config import OptimConfig, TrainConfig
from trainer.data import ShardIndex, train_loader
from trainer.data.augment import build_batch_transform
from trainer.data.cache import load_decoded
from trainer.data.device_batches import DeviceBatches, resolve_decode
from trainer.data.memory_loader import CachedLoader
from trainer.data.transforms import build_transform
from trainer.evaluation import EvalSetup, Split
from trainer.experiments.parametric import InstanceClassifier, with_head
from trainer.launch.runtime import Metrics, Runtime
from trainer.model.encoders import build_encoder
from trainer.plan import RunPlan

logger = logging.getLogger(__name__)


@dataclass
class Worker:
    """What one worker holds for the run."""

    cfg: TrainConfig
    plan: RunPlan
    runtime: Runtime
    metrics: Metrics
    model: nn.Module
    optimizer: torch.optim.Optimizer
    bank: Bank | None  # the store client or a MemoryBank; None: --objective parametric
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
        the encoder and its classifier,
        :class:`~trainer.experiments.parametric.InstanceClassifier`)."""
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


def open_bank(cfg: TrainConfig, plan: RunPlan, device: torch.device) -> Bank | None:
    """This worker's bank: an in-process :class:`MemoryBank` (``--bank local``), the run's
    store attached by name (``--bank store``; the driver created it or found it), or None
    (``--objective parametric``: the classifier replaces it)."""
    if plan.bank == "none":  # --objective parametric: the classifier replaces it
        return None
    if plan.bank == "local":  # in-process bank (the local launcher, benchmarks)
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


def load_splits(
    plan: RunPlan, cfg: TrainConfig, device: torch.device
) -> tuple[Split, Split | None]:
    """The run's training split and its validation split (None without ``--val-data``), each
    read once per worker (:func:`load_split`)."""
    train = load_split(ShardIndex.load(plan.train_data), plan, cfg, device)
    val = None
    if plan.val_data is not None:
        val = load_split(ShardIndex.load(plan.val_data), plan, cfg, device)
    return train, val


def seed_worker(cfg: TrainConfig, runtime: Runtime) -> None:
    """This worker's share of the machine's threads, and the run's seed (the model's
    initial weights are then the same on every rank)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // runtime.world))
    torch.manual_seed(cfg.seed)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
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
    seed_worker(cfg, runtime)
    model = build_encoder(**plan.encoder)
    model = with_head(model, plan.objective, plan.num_rows, cfg.low_dim)  # parametric: + head
    # channels_last: oneDNN's and cuDNN's fast convolution layout (README, "Performance").
    model = runtime.prepare_model(model.to(memory_format=torch.channels_last))
    optimizer = build_optimizer(model, cfg)
    if cfg.compile:
        model = torch.compile(model)
    device = runtime.device
    train, val = load_splits(plan, cfg, device)
    bank = open_bank(cfg, plan, device)
    return Worker(cfg, plan, runtime, runtime.metrics(), model, optimizer, bank, train, val)


def train_batches(w: Worker):
    """This rank's training loader: its part of every epoch, train transform, batch
    ``global batch / world``; from the decoded pixels when held, else the shards. Streamed
    images of one size (and any images with ``--decode gpu``) are augmented on the device
    by the same batched transform as the decoded cache's."""
    batch = w.plan.batch_size // w.world
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
