"""Nearest-neighbour index over (unit) feature vectors, keyed by instance id.

``KnnIndex`` ranks by inner product (cosine similarity for unit rows). Two kinds:

- ``"flat"``: exact search over all vectors.
- ``"ivf"``: approximate FAISS ``IndexIVFFlat`` (inner product); the coarse quantizer is trained
  (spherical k-means) on the first vectors added, or by an explicit :meth:`KnnIndex.train`.

Where the search runs (``backend="auto"``):

1. FAISS on GPU when ``faiss.get_num_gpus() > 0``;
2. ``"ivf"`` otherwise on CPU FAISS;
3. ``"flat"`` with CUDA but a CPU-only FAISS: torch matmul + top-k on the GPU;
4. ``"flat"`` on CPU: torch (MKL) matmul in blocks, each block narrowed to a few candidates
   per query (group maxima, see ``backends._block_candidates``) that go through FAISS's
   k-best heaps. The result is the exact search of FAISS ``IndexFlatIP``, but faster: the
   ``faiss-cpu`` wheel's OpenBLAS matmul is ~5x slower than torch's MKL on the dev machine,
   and most of the selection work is skipped (see ``benchmarks/bench_knn.py``).
   ``backend="faiss"`` forces ``IndexFlatIP``;
5. without an importable FAISS: the same blocks with torch ``topk`` on CPU (logged warning;
   ``"ivf"`` then falls back to exact search).

The index keeps its own position -> id array, so ids are any distinct non-negative int64
(default: ``0, 1, …`` continuing in insertion order across :meth:`KnnIndex.add` calls) and
``-1`` is reserved for "no neighbour" (IVF can return fewer than ``k`` candidates; those slots
get id ``-1`` and similarity ``-inf``).

This module holds :class:`KnnIndex` and its input checks; the backends, and the choice
among them (with the lazy FAISS import and the torch block sizes), are in
:mod:`featurestore.knn.backends`, Arrow batch parsing in :mod:`featurestore.knn.arrow_input`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from featurestore.knn.arrow_input import _iter_arrow_batches
from featurestore.knn.backends import make_backend

__all__ = ["KnnIndex"]

logger = logging.getLogger(__name__)

_KINDS = ("flat", "ivf")
_BACKENDS = ("auto", "faiss", "torch")


class KnnIndex:
    """Top-k inner-product search over vectors keyed by int64 ids.

    Args:
        dim: vector dimension ``d``.
        kind: ``"flat"`` (exact) or ``"ivf"`` (FAISS ``IndexIVFFlat``, approximate).
        nprobe: IVF cells visited per query (clamped to ``nlist``); ignored for ``"flat"``.
        nlist: IVF cell count; ``None`` picks ``min(4·sqrt(n), n // 39)`` (at least 1) at train
            time, ``n`` the number of training vectors (FAISS wants >= 39 points per cell).
        device: ``None`` (GPU when present), ``"cpu"`` or a CUDA device.
        backend: ``"auto"`` (see module docstring), ``"faiss"`` (a FAISS index does all the work)
            or ``"torch"`` (exact, torch matmul; ``"flat"`` only).
    """

    def __init__(
        self,
        dim: int = 128,
        kind: str = "flat",
        nprobe: int = 32,
        nlist: int | None = None,
        device: str | torch.device | None = None,
        backend: str = "auto",
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        if isinstance(nprobe, bool) or not isinstance(nprobe, int) or nprobe < 1:
            raise ValueError(f"nprobe must be an int >= 1, got {nprobe!r}")
        if nlist is not None and (isinstance(nlist, bool) or not isinstance(nlist, int)):
            raise ValueError(f"nlist must be None or an int >= 1, got {nlist!r}")
        if nlist is not None and nlist < 1:
            raise ValueError(f"nlist must be None or an int >= 1, got {nlist!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.dim = dim
        self.kind = kind
        self._impl = make_backend(dim, kind, nprobe, nlist, device, backend)
        self._id_chunks: list[np.ndarray] = []
        self._id_array: np.ndarray | None = np.empty(0, dtype=np.int64)
        self._max_id = -1
        self._identity_ids = True  # ids == positions so far: search skips the lookup

    # ------------------------------------------------------------------ properties
    @property
    def backend(self) -> str:
        """``"faiss"`` or ``"torch"``: what actually searches."""
        return self._impl.name

    @property
    def device(self) -> torch.device:
        """Device holding the vectors."""
        return self._impl.device

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return self._impl.ntotal

    def __len__(self) -> int:
        return self.ntotal

    @property
    def is_trained(self) -> bool:
        """Whether vectors can be added without training first (always true for ``"flat"``)."""
        return self._impl.is_trained

    @property
    def nlist(self) -> int | None:
        """IVF cell count (``None`` for ``"flat"`` or before training with ``nlist=None``)."""
        return self._impl.nlist

    @property
    def nprobe(self) -> int:
        """IVF cells visited per query."""
        return self._impl.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"nprobe must be an int >= 1, got {value!r}")
        self._impl.set_nprobe(value)

    def __repr__(self) -> str:
        return (
            f"KnnIndex(dim={self.dim}, kind={self.kind!r}, backend={self.backend!r}, "
            f"device={str(self.device)!r}, ntotal={self.ntotal})"
        )

    # ------------------------------------------------------------------ building
    def train(self, vectors: torch.Tensor | np.ndarray) -> None:
        """Train the IVF quantizer on ``vectors`` ``[n, d]`` (no-op for ``"flat"``).

        Raises:
            ValueError: on bad ``vectors`` or when the index already holds vectors.
        """
        x = self._impl.prepare(_check_matrix(vectors, "vectors", self.dim))
        if self.ntotal:
            raise ValueError("train() must come before add(); call reset() first")
        if x.shape[0] == 0:
            raise ValueError("vectors is empty: cannot train on 0 vectors")
        self._impl.train(x)

    def add(
        self,
        vectors: torch.Tensor | np.ndarray,
        ids: torch.Tensor | np.ndarray | Iterable[int] | None = None,
    ) -> None:
        """Append ``vectors`` ``[n, d]`` under ``ids`` ``[n]`` (default: continue ``0, 1, …``).

        Vectors are converted to contiguous float32 (a copy). An untrained ``"ivf"`` index is
        trained on these vectors first.

        Raises:
            ValueError: non-2-D or wrong-width ``vectors``, non-finite values, ``ids`` of the
                wrong length/dtype, negative ids, or ids already in the index or repeated.
        """
        x = _check_matrix(vectors, "vectors", self.dim)
        n = int(x.shape[0])
        new_ids = self._check_new_ids(ids, n)
        if n == 0:
            return
        x = self._impl.prepare(x)
        if not self._impl.is_trained:
            self._impl.train(x)
        start = self.ntotal
        self._impl.add(x)
        self._id_chunks.append(new_ids)
        self._id_array = None
        self._max_id = max(self._max_id, int(new_ids.max()))
        if self._identity_ids:
            self._identity_ids = bool(
                new_ids[0] == start and np.array_equal(new_ids, np.arange(start, start + n))
            )

    def reset(self) -> None:
        """Remove all vectors and ids (a trained IVF quantizer is kept)."""
        self._impl.reset()
        self._id_chunks = []
        self._id_array = np.empty(0, dtype=np.int64)
        self._max_id = -1
        self._identity_ids = True

    @classmethod
    def from_batches(
        cls,
        batches: Iterable[Any],
        dim: int,
        kind: str = "flat",
        train_size: int = 262_144,
        **kwargs: Any,
    ) -> KnnIndex:
        """Build an index from Arrow record batches with columns ``id`` and ``vector``.

        ``vector`` is ``fixed_size_list<float16|float32|float64>[dim]`` or ``list<…>`` with
        every row of length ``dim``; ``id`` is an integer column. Batches are added one at a
        time (float32 values are read zero-copy). For ``"ivf"`` the first ``train_size`` rows
        (or all, if fewer) are buffered to train the quantizer; with ``nlist=None`` and a
        longer stream, ``nlist`` is then picked from ``train_size`` rows.

        Args:
            batches: iterable of ``pyarrow.RecordBatch`` (or ``pyarrow.Table``).
            dim: vector dimension.
            kind: ``"flat"`` or ``"ivf"``.
            train_size: IVF training sample size (rows).
            **kwargs: passed to :class:`KnnIndex` (``nprobe``, ``nlist``, ``device``, ``backend``).
        """
        if isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1:
            raise ValueError(f"train_size must be an int >= 1, got {train_size!r}")
        index = cls(dim=dim, kind=kind, **kwargs)
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        pending_rows = 0
        for ids, vectors in _iter_arrow_batches(batches, dim):
            if index.is_trained:
                index.add(vectors, ids)
                continue
            pending.append((ids, vectors))
            pending_rows += len(ids)
            if pending_rows >= train_size:
                index._train_then_add(pending)
                pending = []
        if pending:
            index._train_then_add(pending)
        return index

    def _train_then_add(self, pending: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.train(np.concatenate([v for _, v in pending]))
        for ids, vectors in pending:
            self.add(vectors, ids)

    # ------------------------------------------------------------------ search
    def search(
        self, queries: torch.Tensor | np.ndarray, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` vectors with the largest inner product to each query, best first.

        Args:
            queries: ``[Q, d]`` floating.
            k: neighbours per query, ``1 <= k <= len(self)``.

        Returns:
            ``(sims, ids)``: CPU tensors ``[Q, k]``, float32 similarities (descending) and int64
            ids. IVF slots without a candidate hold id ``-1`` and similarity ``-inf``.

        Raises:
            ValueError: bad ``k`` or bad ``queries`` (see :meth:`add`).
        """
        q = _check_matrix(queries, "queries", self.dim)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        k = int(k)
        if k > self.ntotal:
            raise ValueError(
                f"k={k} is larger than the number of vectors in the index ({self.ntotal})"
            )
        if q.shape[0] == 0:
            return torch.empty((0, k), dtype=torch.float32), torch.empty((0, k), dtype=torch.int64)
        sims, pos = self._impl.search(self._impl.prepare(q), k)
        return sims, self._positions_to_ids(pos)

    def _positions_to_ids(self, pos: torch.Tensor) -> torch.Tensor:
        any_missing = int(pos.min()) < 0
        if self._identity_ids and not any_missing:
            return pos
        table = torch.from_numpy(self._ids())
        if not any_missing:
            return table[pos]
        ids = table[pos.clamp(min=0)]
        ids[pos < 0] = -1
        return ids

    # ------------------------------------------------------------------ ids
    def _ids(self) -> np.ndarray:
        if self._id_array is None:
            self._id_array = np.concatenate(self._id_chunks)
            self._id_chunks = [self._id_array]
        return self._id_array

    def _check_new_ids(self, ids: Any, n: int) -> np.ndarray:
        if ids is None:
            new = np.arange(self.ntotal, self.ntotal + n, dtype=np.int64)
        else:
            if isinstance(ids, torch.Tensor):
                ids = ids.detach().cpu().numpy()
            arr = np.asarray(ids)
            if arr.ndim != 1 or arr.shape[0] != n:
                raise ValueError(f"ids must be 1-D of length {n} (one per vector), got {arr.shape}")
            if n and not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"ids must be integers, got dtype {arr.dtype}")
            new = arr.astype(np.int64, copy=True)
            if n and int(new.min()) < 0:
                raise ValueError(f"ids must be >= 0 (-1 means no neighbour), got {int(new.min())}")
        if n == 0:
            return new
        sorted_new = np.sort(new)
        if np.any(sorted_new[1:] == sorted_new[:-1]):
            dup = sorted_new[1:][sorted_new[1:] == sorted_new[:-1]][0]
            raise ValueError(f"ids contains duplicates (e.g. {int(dup)})")
        if int(sorted_new[0]) <= self._max_id:  # cannot all be new: check against the index
            clash = np.isin(sorted_new, self._ids(), assume_unique=True)
            if clash.any():
                raise ValueError(f"ids already in the index (e.g. {int(sorted_new[clash][0])})")
        return new


def _check_matrix(x: Any, name: str, dim: int) -> torch.Tensor:
    """Validate a ``[n, dim]`` floating matrix; returns it as a float32 tensor (maybe a view)."""
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
        with warnings.catch_warnings():  # read-only (e.g. Arrow) arrays: only read, never written
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [n, {dim}], got shape {tuple(x.shape)}")
    if x.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} columns (the index dim), got {x.shape[1]}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    x = x.detach().to(torch.float32)
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return x
