"""kNN evaluation during training (Wu et al. §3.4; README, *Reproducing the paper*).

Two flavours, both the paper's 200-NN weighted vote with ``σ = τ``:

* **bank**: train features are the memory bank itself, streamed from the store's
  ``export()`` into a :class:`~knn_service.KnnIndex` (fast; used after each epoch);
* **recomputed**: train features recomputed with the test transform (the final numbers).

Validation features are always recomputed with the test transform. Everything is keyed by
instance id, so the order in which loaders deliver samples does not matter.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featurestore.knn import KnnIndex, knn_evaluate
from trainer.data import ShardIndex, eval_loader
from trainer.data.augment import build_batch_transform
from trainer.data.cache import DecodedDataset
from trainer.data.memory_loader import CachedLoader
from trainer.data.transforms import build_transform

logger = logging.getLogger(__name__)

#: Images per forward pass when encoding a dataset for evaluation.
EVAL_BATCH = 256


@dataclass(frozen=True)
class Split:
    """One dataset of an evaluation: its index and, when held decoded, its pixels."""

    index: ShardIndex
    pixels: DecodedDataset | None = None

    def labels(self) -> Tensor:
        """``[N]`` int64 labels by id."""
        return torch.from_numpy(self.index.labels).long()


@dataclass(frozen=True)
class EvalSetup:
    """How to encode and vote: the test transform's preset and size, the embedding size,
    the device, and the vote's classes, ``k`` and ``σ``."""

    preset: str
    image_size: int
    dim: int
    device: torch.device
    num_classes: int
    k: int
    temperature: float
    autocast: bool = False
    """Encode under bf16 autocast (features are normalised in float32)."""
    batch_size: int = EVAL_BATCH
    num_workers: int = 0
    """DataLoader processes when streaming from the shards."""
    kind: str = "flat"
    """Index of recomputed train features: flat (exact) or ivf."""


def eval_batches(split: Split, setup: EvalSetup) -> Iterable:
    """Every instance of ``split`` that decodes once, in id order, with the test transform:
    batches ``(images [b, 3, S, S], ids [b], labels [b])``, from the decoded pixels when
    held (on ``setup.device``), else streamed from the shards."""
    if split.pixels is not None:
        test = build_batch_transform(setup.preset, train=False, image_size=setup.image_size)
        return CachedLoader(split.pixels, setup.batch_size, test, train=False, device=setup.device)
    test_tf = build_transform(setup.preset, train=False, image_size=setup.image_size)
    return eval_loader(split.index, setup.batch_size, test_tf, num_workers=setup.num_workers)


def encode_split(model: nn.Module, split: Split, setup: EvalSetup) -> tuple[Tensor, Tensor]:
    """Features of every instance of ``split`` with the test transform: ``(feats [N, d],
    seen [N] bool)``, from the decoded pixels when held, else streamed from the shards."""
    loader = eval_batches(split, setup)
    n = split.index.num_instances
    return extract_features(model, loader, n, setup.dim, setup.device, setup.autocast)


def evaluate(
    model: nn.Module, train: Split, val: Split, setup: EvalSetup, bank: KnnIndex | None = None
) -> dict[str, Any]:
    """The kNN vote of ``val`` against ``train``, as the training loop and ``python -m
    knn_service.eval`` both report it: the bank's rows when ``bank`` is given, else train
    features recomputed with the test transform (samples that did not decode left out).

    Returns:
        ``{"knn_top1", "knn_top5", "k_used", "num_train", "num_val", "skipped_train",
        "skipped_val"}``.

    Raises:
        ValueError: no validation image decodes ("no image decodes"), or one has no label
            ("has images without a label (-1)").
    """
    val_feats, val_seen = encode_split(model, val, setup)
    val_labels = val.labels()[val_seen]
    if len(val_labels) == 0:
        raise ValueError("no image decodes")
    if int(val_labels.min()) < 0:
        raise ValueError("has images without a label (-1)")
    train_labels, skipped_train = train.labels(), 0
    if bank is None:
        feats, seen = encode_split(model, train, setup)
        skipped_train = int((~seen).sum())
        train_side: KnnIndex | Tensor = feats[seen]
        if setup.kind != "flat":
            train_side = KnnIndex(dim=setup.dim, kind=setup.kind)
            train_side.add(feats[seen], ids=torch.nonzero(seen).flatten())
        else:
            train_labels = train_labels[seen]
    else:
        train_side = bank
    size = len(train_side) if isinstance(train_side, KnnIndex) else int(train_side.shape[0])
    k = min(setup.k, size)  # the reference's k = 200 on a smaller training set: all of it
    found = knn_evaluate(
        train_side,
        train_labels,
        val_feats[val_seen],
        val_labels,
        num_classes=setup.num_classes,
        k=k,
        temperature=setup.temperature,
    )
    return {
        "knn_top1": float(found["top1"]),
        "knn_top5": float(found["top5"]),
        "k_used": k,
        "num_train": size,
        "num_val": len(val_labels),
        "skipped_train": skipped_train,
        "skipped_val": int((~val_seen).sum()),
    }


@torch.no_grad()
def extract_features(
    model: nn.Module,
    batches: Iterable,
    num_rows: int,
    dim: int,
    device: torch.device,
    autocast: bool = False,
) -> tuple[Tensor, Tensor]:
    """Encode every sample of ``batches`` (``(images, ids, labels)``), placed by id, in
    channels_last (the layout the trainer uses) and under bf16 autocast when asked.

    Returns:
        ``(features [num_rows, d] float32 on CPU, seen [num_rows] bool)``.
    """
    was_training = model.training
    model.eval()
    feats = torch.zeros(num_rows, dim)
    seen = torch.zeros(num_rows, dtype=torch.bool)
    try:
        for images, ids, _labels in batches:
            x = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = model(x).float()
            feats[ids] = F.normalize(out, dim=1).cpu()
            seen[ids] = True
    finally:
        model.train(was_training)
    return feats, seen


def index_from_export(batches: Iterator[pa.RecordBatch], dim: int, kind: str = "flat") -> KnnIndex:
    """A :class:`KnnIndex` over a store's exported rows (ids = instance ids)."""
    return KnnIndex.from_batches(batches, dim=dim, kind=kind)
