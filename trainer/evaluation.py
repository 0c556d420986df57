"""kNN evaluation during training (DESIGN §1 "Weighted kNN", §6).

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

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featurestore.knn import KnnIndex, knn_evaluate
from trainer.augment import build_batch_transform
from trainer.data import ShardIndex, eval_loader
from trainer.data.cache import DecodedDataset
from trainer.data.memory_loader import CachedLoader
from trainer.transforms import build_transform

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


def encode_split(model: nn.Module, split: Split, setup: EvalSetup) -> tuple[Tensor, Tensor]:
    """Features of every instance of ``split`` with the test transform: ``(feats [N, d],
    seen [N] bool)``, from the decoded pixels when held, else streamed from the shards."""
    if split.pixels is not None:
        test = build_batch_transform(setup.preset, train=False, image_size=setup.image_size)
        loader = CachedLoader(split.pixels, EVAL_BATCH, test, train=False, device=setup.device)
    else:
        test_tf = build_transform(setup.preset, train=False, image_size=setup.image_size)
        loader = eval_loader(split.index, EVAL_BATCH, test_tf)
    n = split.index.num_instances
    return extract_features(model, loader, n, setup.dim, setup.device, setup.autocast)


def evaluate(
    model: nn.Module, train: Split, val: Split, setup: EvalSetup, bank: KnnIndex | None = None
) -> dict[str, float]:
    """The 200-NN vote of ``val`` against ``train``: the bank's rows when ``bank`` is given,
    else train features recomputed with the test transform. ``{"knn_top1", "knn_top5"}``."""
    val_feats, val_seen = encode_split(model, val, setup)
    train_labels = train.labels()
    if bank is None:
        feats, seen = encode_split(model, train, setup)
        train_side: KnnIndex | Tensor = feats[seen]
        train_labels = train_labels[seen]  # skipped samples left out
    else:
        train_side = bank
    return knn_accuracy(
        train_side,
        train_labels,
        val_feats[val_seen],
        val.labels()[val_seen],
        setup.num_classes,
        setup.k,
        setup.temperature,
    )


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


def knn_accuracy(
    train: KnnIndex | Tensor,
    train_labels: Tensor,
    val_feats: Tensor,
    val_labels: Tensor,
    num_classes: int,
    k: int,
    temperature: float,
) -> dict[str, float]:
    """``{"knn_top1", "knn_top5"}`` as fractions; ``k`` is capped at the train size."""
    size = len(train) if isinstance(train, KnnIndex) else train.shape[0]
    result = knn_evaluate(
        train,
        train_labels,
        val_feats,
        val_labels,
        num_classes=num_classes,
        k=min(k, size),
        temperature=temperature,
    )
    return {"knn_top1": float(result["top1"]), "knn_top5": float(result["top5"])}
