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

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from knn_service import KnnIndex, knn_evaluate

logger = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(
    model: nn.Module, batches: Iterable, num_rows: int, dim: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Encode every sample of ``batches`` (``(images, ids, labels)``), placed by id.

    Returns:
        ``(features [num_rows, d] float32 on CPU, seen [num_rows] bool)``.
    """
    was_training = model.training
    model.eval()
    feats = torch.zeros(num_rows, dim)
    seen = torch.zeros(num_rows, dtype=torch.bool)
    try:
        for images, ids, _labels in batches:
            out = model(images.to(device, non_blocking=True)).float()
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
