"""The kNN query service's core: an index of the bank, rebuilt on demand, and its queries.

No HTTP here (see :mod:`knn_service.http_app`). :class:`KnnService` holds an :class:`IndexState`
(a :class:`~knn_service.KnnIndex` over the bank's rows and when it was built). A rebuild
(:meth:`KnnService.refresh`) streams the rows from a source (``store.export``) into a new
index while queries keep using the old one; the new state then replaces the old in one
reference assignment, so a query sees either the old or the new index, never a mix.

Labels, keys and source paths of the neighbours come from the training data's
``index.parquet`` (:class:`TrainLabels`); without it they are ``null`` and ``/classify`` is
unavailable. Query vectors are L2-normalized (:mod:`knn_service.request_parsing`); image queries are
encoded with the service's :class:`~knn_service.encoders.Encoder` and its test transform.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from featurestore.knn.index import KnnIndex
from featurestore.knn.vote import weighted_knn_vote
from knn_service.encoders import Encoder
from knn_service.familiarity import NearestScale, SampledRows, far_note
from knn_service.request_parsing import (
    DEFAULT_MAX_PIXELS,
    Query,
    RequestError,
    check_k,
    decode_image_payload,
)
from knn_service.train_labels import TrainLabels

__all__ = ["IndexState", "KnnService"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class IndexState:
    """One built index: never modified after it is published."""

    index: KnnIndex
    rows: int
    built_at: float
    """Unix time the build finished."""
    build_seconds: float
    nearest: NearestScale | None = None
    """The bank rows' similarity to their nearest other row (``/classify``'s far hint)."""


class KnnService:
    """Queries over an index of the bank that can be rebuilt while serving.

    Args:
        source: returns a fresh iterable of Arrow record batches ``(id, vector)`` (e.g.
            ``store.export``); called by every :meth:`refresh`.
        dim: vector dimension ``d``.
        kind: ``"flat"`` (exact) or ``"ivf"`` (approximate).
        train: labels/keys of the training data (``None``: neighbours without labels and no
            ``classify``).
        encoder: encodes image queries (``None``: image queries are rejected).
        max_k: largest ``k`` a query may ask for (also capped by the row count).
        max_queries: most vectors/images per request.
        max_pixels: largest decoded image (width x height).
        rows: returns the bank rows ``[Q, d]`` of instance ids ``[Q]`` (``ids`` queries;
            ``None``: they are rejected).
    """

    def __init__(
        self,
        source: Callable[[], Iterable[Any]],
        dim: int,
        kind: str = "flat",
        train: TrainLabels | None = None,
        encoder: Encoder | None = None,
        max_k: int = 1000,
        max_queries: int = 1024,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        rows: Callable[[np.ndarray], Any] | None = None,
    ) -> None:
        if isinstance(max_k, bool) or not isinstance(max_k, int) or max_k < 1:
            raise ValueError(f"max_k must be an int >= 1, got {max_k!r}")
        if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 1:
            raise ValueError(f"max_queries must be an int >= 1, got {max_queries!r}")
        if encoder is not None and encoder.dim != dim:
            raise ValueError(f"the encoder embeds in {encoder.dim} dims but the bank has {dim}")
        KnnIndex(dim=dim, kind=kind)  # validates dim and kind now rather than at the first build
        self.source = source
        self.dim = dim
        self.kind = kind
        self.train = train
        self.encoder = encoder
        self.max_k = max_k
        self.max_queries = max_queries
        self.max_pixels = max_pixels
        self.rows = rows
        self._state: IndexState | None = None
        self._build_lock = threading.Lock()
        self._labels = None if train is None else torch.from_numpy(train.labels)

    # ------------------------------------------------------------------ index
    @property
    def state(self) -> IndexState:
        """The index now served (raises ``RuntimeError`` before the first :meth:`refresh`)."""
        state = self._state
        if state is None:
            raise RuntimeError("the index has not been built yet: call refresh() first")
        return state

    def refresh(self) -> IndexState:
        """Rebuild the index from ``source`` and publish it (one build at a time).

        Queries running meanwhile use the previous index. On failure the previous index
        stays and the exception propagates.

        Raises:
            ValueError: the rows do not match the training data's instance count.
        """
        with self._build_lock:
            start = time.perf_counter()
            sampled = SampledRows(self.source(), self.dim)
            index = KnnIndex.from_batches(sampled, dim=self.dim, kind=self.kind)
            rows = index.ntotal
            if rows == 0:
                raise ValueError("the bank exported no rows")
            if self.train is not None and rows != self.train.num_instances:
                raise ValueError(
                    f"the bank has {rows} rows but the train data {self.train.location} has "
                    f"{self.train.num_instances} instances"
                )
            nearest = NearestScale.measure(index, *sampled.sample())
            state = IndexState(index, rows, time.time(), time.perf_counter() - start, nearest)
            self._state = state  # the atomic swap
        logger.info(
            "kNN index rebuilt: %d rows x %d (%s) in %.2f s",
            rows, self.dim, self.kind, state.build_seconds,
        )  # fmt: skip
        return state

    def health(self) -> dict[str, Any]:
        """``{"status", "rows", "index_built_at", ...}`` of the served index."""
        state = self._state
        if state is None:
            return {"status": "starting", "rows": 0, "index_built_at": None}
        return {
            "status": "ok",
            "rows": state.rows,
            "dim": self.dim,
            "kind": self.kind,
            "index_built_at": state.built_at,
            "index_age_seconds": max(0.0, time.time() - state.built_at),
            "index_build_seconds": state.build_seconds,
            "nearest_similarity": None
            if state.nearest is None
            else {"p01": state.nearest.p01, "median": state.nearest.median},
            "labels": self.train is not None,
            "images": self.encoder is not None,
        }

    # ------------------------------------------------------------------ queries
    def query_vectors(self, query: Query) -> np.ndarray:
        """``[Q, d]`` unit rows of a query: its vectors, or its images encoded.

        Raises:
            RequestError: an image query without an encoder, or an image that does not decode.
        """
        if query.vectors is not None:
            return query.vectors
        if query.ids is not None:
            return self._id_vectors(query.ids)
        if self.encoder is None:
            raise RequestError(
                400,
                "image queries need an encoder: start the service with --checkpoint "
                "(or send 'vectors')",
            )
        assert query.images is not None
        name = "image" if len(query.images) == 1 else "images[{}]"
        pil = [
            decode_image_payload(data, name.format(i), self.max_pixels)
            for i, data in enumerate(query.images)
        ]
        return self.encoder.encode_images(pil).numpy()

    def _id_vectors(self, ids: np.ndarray) -> np.ndarray:
        """``[Q, d]`` unit bank rows of instance ids ``[Q]``."""
        if self.rows is None:
            raise RequestError(400, "this service cannot look rows up by id: send 'vectors'")
        rows = self.state.rows
        bad = ids >= rows
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise RequestError(
                400, f"ids[{i}] = {int(ids[i])} is not an instance id in [0, {rows})"
            )
        x = torch.as_tensor(self.rows(ids)).float()  # [Q, d]
        return torch.nn.functional.normalize(x, dim=1).numpy()

    def _search(
        self, query: Query, state: IndexState | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.state if state is None else state  # one index for the whole request
        k = check_k(query.k, state.rows, self.max_k)
        vectors = self.query_vectors(query)
        return state.index.search(vectors, k)  # [Q, k] each

    def neighbors(self, query: Query) -> dict[str, Any]:
        """``{"results": [{"ids", "similarities", "labels", "keys", "sources"}, ...]}``.

        Lists are best first; an approximate (IVF) index may return fewer than ``k``.
        ``labels``/``keys``/``sources`` are ``None`` without training data.
        """
        sims, ids = self._search(query)
        results = []
        for row_sims, row_ids in zip(sims.tolist(), ids.tolist()):
            keep = [j for j, i in enumerate(row_ids) if i >= 0]
            row_ids = [row_ids[j] for j in keep]
            results.append(
                {
                    "ids": row_ids,
                    "similarities": [row_sims[j] for j in keep],
                    **self._metadata(row_ids),
                }
            )
        return {"results": results}

    def _metadata(self, ids: list[int]) -> dict[str, Any]:
        train = self.train
        if train is None:
            return {"labels": None, "keys": None, "sources": None}
        return {
            "labels": [int(train.labels[i]) for i in ids],
            "keys": [train.keys[i] for i in ids],
            "sources": None if train.sources is None else [train.sources[i] for i in ids],
        }

    def classify(self, query: Query) -> dict[str, Any]:
        """Weighted kNN vote (Wu et al. §3.4): ``{"predictions": [{"class", "class_name",
        "probabilities", "scores", "nearest_similarity", "note"}, ...]}``: ``scores`` ``[C]``
        = ``Σ exp(s/σ)`` over the neighbours of each class (float64, the raw vote) and
        ``probabilities`` ``[C]`` the same normalised to sum to 1 (all 0 when no neighbour
        has a known label). ``nearest_similarity`` is the best neighbour's; ``note`` says
        when that is below what 99 % of the bank's rows have to their nearest other row
        (the query is far from the training data), else ``None``.

        ``class`` is the first class of highest score, ``None`` when no neighbour has a
        known label.

        Raises:
            RequestError: no training labels, bad ``k``, or a temperature so small that the
                weights overflow.
        """
        if self.train is None or self._labels is None:
            raise RequestError(400, "classify needs labels: start the service with --train-data")
        state = self.state
        sims, ids = self._search(query, state)
        labels = self._labels[ids.clamp(min=0)]  # [Q, k]
        labels[ids < 0] = -1
        scores = weighted_knn_vote(sims.double(), labels, self.train.num_classes, query.temperature)
        if not bool(torch.isfinite(scores).all()):
            raise RequestError(
                400, f"temperature {query.temperature} is too small: the vote weights overflow"
            )
        best = scores.argmax(dim=1).tolist()  # first maximum: ties go to the lower class
        predictions = []
        totals = scores.sum(dim=1, keepdim=True)
        probabilities = torch.where(totals > 0, scores / totals.clamp(min=1e-300), 0.0)
        nearest = sims[:, 0].tolist()
        for row, probs, c, near in zip(scores.tolist(), probabilities.tolist(), best, nearest):
            known = any(v > 0 for v in row)
            predictions.append(
                {
                    "class": c if known else None,
                    "class_name": self._class_name(c) if known else None,
                    "probabilities": probs,
                    "scores": row,
                    "nearest_similarity": near,
                    "note": far_note(near, state.nearest),
                }
            )
        return {"predictions": predictions}

    def _class_name(self, c: int) -> str | None:
        assert self.train is not None
        return self.train.classes[c] if c < len(self.train.classes) else None
