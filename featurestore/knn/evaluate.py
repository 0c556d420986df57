"""Weighted kNN evaluation: top-1 / top-5 accuracy of the 200-NN vote (Wu et al. 2018, §3.4).

Numbers match the reference evaluation (lemniscate.pytorch ``kNN``: cosine similarities,
``topk(k)``, weights ``exp(s / σ)``, one-hot vote, classes ranked by ``sort(descending)``):

- ranking uses a *stable* descending sort, so tied class scores (notably classes with no
  votes, score 0) are ordered by class index, as the reference's CPU sort does;
- top-5 counts a hit when the true class is among the first ``min(5, C)`` ranked classes
  (like the reference's ``correct[:, :5]``; with ``C <= 5`` every query is a top-5 hit);
- neighbours with train label ``-1`` (unknown) are ignored by the vote; test labels must be
  known (``>= 0``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from featurestore.knn.index import KnnIndex
from featurestore.knn.vote import weighted_knn_vote

__all__ = ["knn_evaluate", "knn_predict"]

DEFAULT_CHUNK_SIZE = 8192  # queries per search + vote call


def knn_predict(
    index_or_train_features: KnnIndex | torch.Tensor,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    num_classes: int | None = None,
    k: int = 200,
    temperature: float = 0.07,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Weighted kNN class scores of every test vector.

    Args:
        index_or_train_features: a :class:`KnnIndex` whose ids index ``train_labels``, or train
            features ``[N, d]`` (unit rows; an exact index is built with ids ``0..N-1``).
        train_labels: ``[N]`` (or ``[max id + 1]``) integer labels, ``-1`` = unknown.
        test_features: ``[Q, d]`` unit rows.
        num_classes: ``C``; ``None`` means ``max(train_labels) + 1``.
        k: neighbours per query (``<=`` the number of train vectors).
        temperature: ``σ`` of the weights ``exp(s / σ)``.
        chunk_size: queries searched and voted per step.

    Returns:
        ``[Q, C]`` float32 class scores on CPU.
    """
    index, labels, num_classes = _prepare(index_or_train_features, train_labels, None, num_classes)
    chunks = _iter_scores(index, labels, test_features, num_classes, k, temperature, chunk_size)
    parts = [scores for _, scores in chunks]
    if not parts:
        return torch.zeros((0, num_classes), dtype=torch.float32)
    return torch.cat(parts)


def knn_evaluate(
    index_or_train_features: KnnIndex | torch.Tensor,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    num_classes: int | None = None,
    k: int = 200,
    temperature: float = 0.07,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy of the weighted kNN vote.

    Args:
        index_or_train_features, train_labels, test_features, k, temperature, chunk_size:
            as in :func:`knn_predict`.
        test_labels: ``[Q]`` integer labels in ``[0, C)``.
        num_classes: ``C``; ``None`` means ``max(train_labels, test_labels) + 1``.

    Returns:
        ``{"top1": fraction, "top5": fraction}`` over the ``Q`` test vectors.

    Raises:
        ValueError: on bad shapes, labels, ``k``, ``chunk_size`` or an empty test set.
    """
    test_y = _as_labels(test_labels, "test_labels")
    num_q = _num_rows(test_features, "test_features")
    if test_y.shape[0] != num_q:
        raise ValueError(
            f"test_labels has {test_y.shape[0]} entries but test_features has {num_q} rows"
        )
    if num_q == 0:
        raise ValueError("test_features is empty: nothing to evaluate")
    if int(test_y.min()) < 0:
        raise ValueError("test_labels must be known class ids >= 0 (found -1 / negative)")
    index, labels, num_classes = _prepare(
        index_or_train_features, train_labels, test_y, num_classes
    )

    top = min(5, num_classes)
    top1 = top5 = 0
    for start, scores in _iter_scores(
        index, labels, test_features, num_classes, k, temperature, chunk_size
    ):
        ranked = scores.sort(dim=1, descending=True, stable=True).indices[:, :top]  # [q, top]
        hits = ranked == test_y[start : start + scores.shape[0], None]
        top1 += int(hits[:, 0].sum())
        top5 += int(hits.any(dim=1).sum())
    return {"top1": top1 / num_q, "top5": top5 / num_q}


def _iter_scores(
    index: KnnIndex,
    labels: torch.Tensor,
    test_features: torch.Tensor | np.ndarray,
    num_classes: int,
    k: int,
    temperature: float,
    chunk_size: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first row, scores [q, C])`` per chunk of test vectors."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    for start in range(0, _num_rows(test_features, "test_features"), chunk_size):
        sims, ids = index.search(test_features[start : start + chunk_size], k)  # [q, k] each
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if hi >= labels.shape[0]:
            raise ValueError(
                f"index returned id {hi} but train_labels has only "
                f"{labels.shape[0]} entries (ids must index train_labels)"
            )
        if lo >= 0:
            neighbor_labels = labels[ids]
        else:  # IVF: fewer than k candidates
            neighbor_labels = labels[ids.clamp(min=0)]
            neighbor_labels[ids < 0] = -1
        yield start, weighted_knn_vote(sims, neighbor_labels, num_classes, temperature)


def _prepare(
    index_or_train_features: KnnIndex | torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | None,
    num_classes: int | None,
) -> tuple[KnnIndex, torch.Tensor, int]:
    labels = _as_labels(train_labels, "train_labels")
    if labels.numel() and int(labels.min()) < -1:
        raise ValueError("train_labels must be class ids >= 0 or -1 (unknown)")
    if isinstance(index_or_train_features, KnnIndex):
        index = index_or_train_features
    else:
        feats = index_or_train_features
        if not isinstance(feats, (torch.Tensor, np.ndarray)) or feats.ndim != 2:
            raise ValueError(
                "index_or_train_features must be a KnnIndex or a 2-D [N, d] feature tensor"
            )
        if feats.shape[0] != labels.shape[0]:
            raise ValueError(
                f"train_labels has {labels.shape[0]} entries but the train features have "
                f"{feats.shape[0]} rows"
            )
        index = KnnIndex(dim=int(feats.shape[1]), kind="flat")
        index.add(feats)
    max_label = int(labels.max()) if labels.numel() else -1
    if test_labels is not None and test_labels.numel():
        max_label = max(max_label, int(test_labels.max()))
    if num_classes is None:
        num_classes = max_label + 1
        if num_classes < 1:
            raise ValueError("cannot infer num_classes: no known labels; pass num_classes")
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be None or an int >= 1, got {num_classes!r}")
    elif max_label >= num_classes:
        raise ValueError(f"labels go up to {max_label} but num_classes={num_classes}")
    return index, labels, num_classes


def _as_labels(labels: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """A 1-D int64 CPU tensor from integer labels."""
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError(f"{name} must be a 1-D integer tensor or array")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be integer, got {labels.dtype}")
    return labels.to("cpu", torch.int64)


def _num_rows(x: torch.Tensor | np.ndarray, name: str) -> int:
    if not isinstance(x, (torch.Tensor, np.ndarray)) or x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [Q, d] tensor or array")
    return int(x.shape[0])
