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
   per query (group maxima, see ``_block_candidates``) that go through FAISS's k-best heaps.
   The result is the exact search of FAISS ``IndexFlatIP``, but faster: the ``faiss-cpu``
   wheel's OpenBLAS matmul is ~5x slower than torch's MKL on the dev machine, and most of
   the selection work is skipped (see ``benchmarks/bench_knn.py``). ``backend="faiss"``
   forces ``IndexFlatIP``;
5. without an importable FAISS: the same blocks with torch ``topk`` on CPU (logged warning;
   ``"ivf"`` then falls back to exact search).

The index keeps its own position -> id array, so ids are any distinct non-negative int64
(default: ``0, 1, …`` continuing in insertion order across :meth:`KnnIndex.add` calls) and
``-1`` is reserved for "no neighbour" (IVF can return fewer than ``k`` candidates; those slots
get id ``-1`` and similarity ``-inf``).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any

import numpy as np
import torch

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
        self._impl = _make_backend(dim, kind, nprobe, nlist, device, backend)
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


def _default_nlist(n: int) -> int:
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


def _make_backend(
    dim: int,
    kind: str,
    nprobe: int,
    nlist: int | None,
    device: str | torch.device | None,
    backend: str,
) -> _FaissBackend | _TorchBackend:
    faiss = _import_faiss()
    num_faiss_gpus = faiss.get_num_gpus() if faiss is not None else 0
    if device is None:
        want_gpu = num_faiss_gpus > 0 or torch.cuda.is_available()
        cuda = torch.device("cuda", 0)
    else:
        try:
            cuda = torch.device(device)
        except (RuntimeError, TypeError):
            cuda = None
        if cuda is None or cuda.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be None, 'cpu' or a CUDA device, got {device!r}")
        want_gpu = cuda.type == "cuda"
        if want_gpu and num_faiss_gpus == 0 and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but no CUDA device is available")
    gpu_index = cuda.index or 0

    faiss_gpu_ok = want_gpu and num_faiss_gpus > 0
    use_faiss = backend == "faiss" or (
        backend == "auto" and faiss is not None and (faiss_gpu_ok or kind == "ivf")
    )
    if use_faiss:
        if faiss is None:
            raise ValueError("backend='faiss' but the faiss package cannot be imported")
        if want_gpu and num_faiss_gpus == 0 and device is not None:
            raise ValueError(f"backend='faiss' with device={device!r} needs a FAISS GPU build")
        faiss_gpu = gpu_index if want_gpu and num_faiss_gpus > 0 else None
        return _FaissBackend(faiss, dim, kind, nlist, nprobe, faiss_gpu)
    if kind == "ivf":
        if backend == "torch":
            raise ValueError("backend='torch' supports kind='flat' only")
        logger.warning("faiss is unavailable: kind='ivf' falls back to exact torch search")
    torch_device = torch.device("cuda", gpu_index) if want_gpu else torch.device("cpu")
    heap_faiss = faiss if torch_device.type == "cpu" else None
    return _TorchBackend(dim, torch_device, heap_faiss, nprobe)


# ---------------------------------------------------------------------- backends
_BANK_BLOCK = {"cpu": 1 << 16, "cuda": 1 << 20}  # exact search: bank rows per matmul block
_BLOCK_BUDGET = {"cpu": 1 << 23, "cuda": 1 << 28}  # exact search: similarities per block
_FAISS_GPU_MAX_K = 2048

_faiss_module: ModuleType | None = None
_faiss_tried = False


def _import_faiss() -> ModuleType | None:
    """The faiss module, or ``None`` (with one logged warning) when it cannot be imported."""
    global _faiss_module, _faiss_tried
    if not _faiss_tried:
        _faiss_tried = True
        try:
            import faiss

            _faiss_module = faiss
        except ImportError as err:
            logger.warning("faiss cannot be imported (%s): using torch top-k search", err)
    return _faiss_module


def _block_candidates(
    sims: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Columns of ``sims`` ``[b, n]`` among which each row's ``k`` largest values lie.

    Each row is cut into ``G`` strided groups of ``L ≈ sqrt(n / k)`` columns (column
    ``l·G + g`` is in group ``g``). Let ``thr`` be the ``k``-th largest group maximum: ``k``
    distinct values reach it, so ``thr`` is at most the row's ``k``-th largest value, and every
    value above ``thr`` sits in one of the ``k`` groups with the largest maxima. The row's top
    ``k`` therefore lie among those groups' ``k·L`` columns plus the ``n mod L`` ungrouped ones
    (ties at ``thr`` may be resolved differently, as in any top-k): ~6 % of the row for
    ``n = 50k, k = 200``, found with one vectorised pass (group maxima) and a small ``topk``.

    Returns:
        ``(values [b, m], columns [b, m] int64, thr [b, 1])``, or ``None`` when the block is
        too narrow for the grouping to pay (use every column).
    """
    b, n = sims.shape
    group = max(1, round(math.sqrt(n / k)))
    num_groups = n // group
    if num_groups < 2 * k:
        return None
    group_max = sims[:, : group * num_groups].view(b, group, num_groups).amax(1)  # [b, G]
    top_max, top_groups = group_max.topk(k, dim=1, sorted=False)  # [b, k]
    offsets = torch.arange(group, device=sims.device).mul_(num_groups).view(1, group, 1)
    columns = (top_groups.unsqueeze(1) + offsets).view(b, group * k)  # column = l·G + g
    if n > group * num_groups:  # the n mod L columns outside every group
        tail = torch.arange(group * num_groups, n, device=sims.device).expand(b, -1)
        columns = torch.cat([columns, tail], dim=1)
    return sims.gather(1, columns), columns, top_max.amin(1, keepdim=True)


class _TorchBackend:
    """Exact search over vectors kept as torch tensors (CPU or CUDA).

    Similarities are computed block by block with torch's matmul; :func:`_block_candidates`
    narrows each block to a few candidates per query. On CPU with FAISS present the candidates
    go through FAISS's k-best heaps (``float_minheap_array_t``), started just below a lower
    bound of each query's ``k``-th best so that almost only true neighbours are inserted;
    otherwise ``topk`` per block, merged across bank blocks.
    """

    name = "torch"
    nlist = None
    is_trained = True

    def __init__(self, dim: int, device: torch.device, faiss: ModuleType | None, nprobe: int):
        self.dim = dim
        self.device = device
        self.nprobe = nprobe
        self._faiss = faiss
        self._chunks: list[torch.Tensor] = []
        self._n = 0

    @property
    def ntotal(self) -> int:
        return self._n

    def set_nprobe(self, value: int) -> None:
        self.nprobe = value

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, torch.float32).contiguous()

    def train(self, x: torch.Tensor) -> None:
        del x  # exact search needs no training

    def add(self, x: torch.Tensor) -> None:
        self._chunks.append(x.to(self.device, torch.float32, copy=True).contiguous())
        self._n += x.shape[0]

    def reset(self) -> None:
        self._chunks = []
        self._n = 0

    def _data(self) -> torch.Tensor:
        if len(self._chunks) > 1:  # consolidate once; later adds append to the merged chunk
            self._chunks = [torch.cat(self._chunks)]
        return self._chunks[0]

    def _block_shape(self, num_q: int, n: int) -> tuple[int, int]:
        bank_block = min(n, _BANK_BLOCK[self.device.type])
        return max(1, min(num_q, _BLOCK_BUDGET[self.device.type] // bank_block)), bank_block

    def search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        data = self._data()
        if self._faiss is not None:
            return self._heap_search(q, data, k)
        return self._topk_search(q, data, k)

    def _heap_search(
        self, q: torch.Tensor, data: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        faiss, ptr = self._faiss, self._faiss.swig_ptr
        num_q, n = q.shape[0], data.shape[0]
        sims = np.empty((num_q, k), dtype=np.float32)
        pos = np.empty((num_q, k), dtype=np.int64)
        qb, nb = self._block_shape(num_q, n)
        buf = torch.empty(qb * nb, dtype=torch.float32)
        for q0 in range(0, num_q, qb):
            q_blk = q[q0 : q0 + qb]
            b = q_blk.shape[0]
            heaps = faiss.float_minheap_array_t()  # keeps the k largest per query
            heaps.k, heaps.nh = k, b
            heaps.val, heaps.ids = ptr(sims[q0 : q0 + b]), ptr(pos[q0 : q0 + b])
            started = False
            for j0 in range(0, n, nb):
                bank_blk = data[j0 : j0 + nb]
                block = buf[: b * bank_blk.shape[0]].view(b, -1)
                torch.mm(q_blk, bank_blk.t(), out=block)  # [b, nb]
                cand = _block_candidates(block, k)
                if cand is None:
                    if not started:
                        heaps.heapify()
                        started = True
                    heaps.addn(block.shape[1], ptr(block.numpy()), j0, 0, b)
                    continue
                values, columns, thr = cand
                if not started:  # k placeholders just below thr: each is displaced (>= k
                    # candidates reach thr), and values below thr are never inserted
                    below = torch.nextafter(thr, torch.tensor(float("-inf")))
                    sims[q0 : q0 + b] = below.numpy()
                    pos[q0 : q0 + b] = -1
                    started = True
                columns += j0
                m = columns.shape[1]
                heaps.addn_with_ids(m, ptr(values.numpy()), ptr(columns.numpy()), m, 0, b)
            heaps.reorder()  # best first
        return torch.from_numpy(sims), torch.from_numpy(pos)

    def _topk_search(
        self, q: torch.Tensor, data: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = data.shape[0]
        qb, nb = self._block_shape(q.shape[0], n)
        out_sims, out_pos = [], []
        for q0 in range(0, q.shape[0], qb):
            q_blk = q[q0 : q0 + qb]
            best_s = best_p = None
            for j0 in range(0, n, nb):
                block = q_blk @ data[j0 : j0 + nb].t()  # [b, nb]
                cand = _block_candidates(block, k)
                values, columns = (block, None) if cand is None else cand[:2]
                top_s, top_c = values.topk(min(k, values.shape[1]), dim=1)
                top_p = (top_c if columns is None else columns.gather(1, top_c)) + j0
                if best_s is not None:
                    top_s, top_p = torch.cat([best_s, top_s], 1), torch.cat([best_p, top_p], 1)
                    top_s, order = top_s.topk(min(k, top_s.shape[1]), dim=1)
                    top_p = top_p.gather(1, order)
                best_s, best_p = top_s, top_p
            out_sims.append(best_s.cpu())
            out_pos.append(best_p.cpu())
        return torch.cat(out_sims), torch.cat(out_pos)


class _FaissBackend:
    """A FAISS index (``IndexFlatIP`` or ``IndexIVFFlat``, inner product) on CPU or one GPU."""

    name = "faiss"

    def __init__(
        self,
        faiss: ModuleType,
        dim: int,
        kind: str,
        nlist: int | None,
        nprobe: int,
        gpu: int | None,
    ) -> None:
        self._faiss = faiss
        self.dim = dim
        self.kind = kind
        self.nlist = nlist if kind == "ivf" else None
        self.nprobe = nprobe
        self._gpu = gpu
        self.device = torch.device("cuda", gpu) if gpu is not None else torch.device("cpu")
        self._gpu_resources = faiss.StandardGpuResources() if gpu is not None else None
        self._quantizer = None
        self._index = self._on_device(faiss.IndexFlatIP(dim)) if kind == "flat" else None

    def _on_device(self, cpu_index: Any) -> Any:
        if self._gpu is None:
            return cpu_index
        return self._faiss.index_cpu_to_gpu(self._gpu_resources, self._gpu, cpu_index)

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def is_trained(self) -> bool:
        return self._index is not None and bool(self._index.is_trained)

    def set_nprobe(self, value: int) -> None:
        self.nprobe = value
        if self.kind == "ivf" and self._index is not None:
            self._index.nprobe = min(value, self.nlist)

    def prepare(self, x: torch.Tensor) -> np.ndarray:
        return x.cpu().contiguous().numpy()

    def train(self, x: np.ndarray) -> None:
        if self.kind != "ivf":
            return
        faiss = self._faiss
        if self.nlist is None:
            self.nlist = _default_nlist(x.shape[0])
        self._quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(self._quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.spherical = True  # centroids on the unit sphere, as the data
        self._index = self._on_device(ivf)
        self._index.train(x)
        self.set_nprobe(self.nprobe)
        logger.info("trained IVF index: nlist=%d on %d vectors", self.nlist, x.shape[0])

    def add(self, x: np.ndarray) -> None:
        self._index.add(x)

    def reset(self) -> None:
        if self._index is not None:
            self._index.reset()

    def search(self, q: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._gpu is not None and k > _FAISS_GPU_MAX_K:
            raise ValueError(f"k={k} exceeds the FAISS GPU limit of {_FAISS_GPU_MAX_K}")
        dist, pos = self._index.search(q, k)
        sims, pos = torch.from_numpy(dist), torch.from_numpy(pos)
        sims[pos < 0] = float("-inf")
        return sims, pos


# ---------------------------------------------------------------------- arrow input
def _iter_arrow_batches(
    batches: Iterable[Any], dim: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(ids [n] int64, vectors [n, dim] float32)`` per Arrow batch (Tables are split)."""
    import pyarrow as pa

    for batch in batches:
        if isinstance(batch, pa.Table):
            parts = batch.to_batches()
        elif isinstance(batch, pa.RecordBatch):
            parts = [batch]
        else:
            kind = type(batch).__name__
            raise ValueError(f"batches must yield pyarrow RecordBatch or Table, got {kind}")
        for part in parts:
            yield _arrow_ids_vectors(part, dim)


def _arrow_ids_vectors(batch: Any, dim: int) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa

    names = batch.schema.names
    if "id" not in names or "vector" not in names:
        raise ValueError(f"batch must have columns 'id' and 'vector', got {names}")
    id_col, vec_col = batch.column("id"), batch.column("vector")
    if not pa.types.is_integer(id_col.type) or id_col.null_count:
        raise ValueError(f"batch column 'id' must be non-null integers, got {id_col.type}")
    vtype = vec_col.type
    if pa.types.is_fixed_size_list(vtype):
        if vtype.list_size != dim:
            raise ValueError(f"batch column 'vector' has size {vtype.list_size}, not dim={dim}")
    elif pa.types.is_list(vtype) or pa.types.is_large_list(vtype):
        lengths = vec_col.value_lengths().to_numpy(zero_copy_only=False)
        if len(lengths) and (vec_col.null_count or np.any(lengths != dim)):
            raise ValueError(f"batch column 'vector' has rows not of length dim={dim}")
    else:
        raise ValueError(f"batch column 'vector' must be a (fixed-size) list, got {vtype}")
    values = vec_col.flatten()  # honours slicing offsets, zero-copy
    if vec_col.null_count or values.null_count or not pa.types.is_floating(values.type):
        raise ValueError(f"batch column 'vector' must hold non-null floats, got {vtype}")
    flat = values.to_numpy(zero_copy_only=False)  # zero-copy for float32 without nulls
    ids = id_col.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    return ids, flat.astype(np.float32, copy=False).reshape(len(ids), dim)
