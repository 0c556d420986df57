"""How close a query is to the training data, against how close training images are to
each other.

A kNN vote always names a class, also for an image unlike anything the encoder was
trained on. :class:`NearestScale` is measured at every index rebuild: for a sample of the
bank's rows, the cosine similarity to their nearest *other* row. A query whose nearest
neighbour is less similar than the 1st percentile of that distribution is farther from the
training data than 99 % of the training images are from each other: ``/classify`` says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["NearestScale", "SampledRows", "far_note"]

#: Rows kept from each exported batch (the store exports every shard in batches).
PER_BATCH = 256
#: Rows measured in all.
SAMPLE = 2048


@dataclass(frozen=True)
class NearestScale:
    """The bank's nearest-other-row similarity: 1st percentile and median (cosine)."""

    p01: float
    median: float
    rows: int
    """How many sampled rows they were measured on."""

    @classmethod
    def measure(cls, index: Any, ids: np.ndarray, vectors: np.ndarray) -> NearestScale | None:
        """Search ``vectors`` ``[S, d]`` (rows ``ids`` ``[S]`` of ``index``) for their two
        nearest rows and keep the nearest that is not the row itself. ``None`` when the
        index has fewer than two rows or nothing was sampled."""
        if len(ids) == 0 or index.ntotal < 2:
            return None
        sims, found = (t.numpy() for t in index.search(vectors, 2))  # [S, 2] each
        self_first = found[:, 0] == ids  # ties (duplicates) may put another row first
        other = np.where(self_first, sims[:, 1], sims[:, 0])
        valid = np.where(self_first, found[:, 1], found[:, 0]) >= 0  # -1: no such neighbour
        other = other[valid & np.isfinite(other)]
        if len(other) == 0:
            return None
        return cls(float(np.quantile(other, 0.01)), float(np.median(other)), len(other))


class SampledRows:
    """Passes Arrow record batches ``(id, vector)`` through, keeping the first
    :data:`PER_BATCH` rows of each; :meth:`sample` then draws :data:`SAMPLE` of them."""

    def __init__(self, batches: Iterable[Any], dim: int) -> None:
        self._batches = batches
        self._dim = dim
        self._kept: list[tuple[np.ndarray, np.ndarray]] = []

    def __iter__(self) -> Iterator[Any]:
        for batch in self._batches:
            yield batch
            head = batch.slice(0, PER_BATCH)
            self._kept.append((_column(head, "id").astype(np.int64), _vectors(head, self._dim)))

    def sample(self, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(ids [S], unit vectors [S, d])``, at most :data:`SAMPLE` rows, seeded."""
        if not self._kept:
            return np.zeros(0, np.int64), np.zeros((0, self._dim), np.float32)
        ids = np.concatenate([i for i, _ in self._kept])
        vectors = np.concatenate([v for _, v in self._kept])
        if len(ids) > SAMPLE:
            pick = np.sort(np.random.default_rng(seed).choice(len(ids), SAMPLE, replace=False))
            ids, vectors = ids[pick], vectors[pick]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return ids, (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def far_note(similarity: float, scale: NearestScale | None) -> str | None:
    """A sentence when ``similarity`` (a query's nearest neighbour) is below ``scale.p01``."""
    if scale is None or not similarity < scale.p01:
        return None
    return (
        f"far from the training data: its nearest training image has similarity "
        f"{similarity:.3f}, less than 99 % of training images have to theirs "
        f"(1st percentile {scale.p01:.3f}, median {scale.median:.3f}); the class is a guess"
    )


def _column(batch: Any, name: str) -> np.ndarray:
    col = batch.column(name)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.to_numpy(zero_copy_only=False)


def _vectors(batch: Any, dim: int) -> np.ndarray:
    col = batch.column("vector")
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(-1, dim)
