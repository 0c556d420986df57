"""The search backends behind :class:`featurestore.knn.index.KnnIndex` (chosen there).

- :class:`_TorchBackend`: exact search over torch tensors (CPU or CUDA), matmul in blocks,
  each block narrowed by :func:`_block_candidates`; on CPU with FAISS, the candidates go
  through FAISS's k-best heaps, otherwise torch ``topk``.
- :class:`_FaissBackend`: a FAISS ``IndexFlatIP`` or ``IndexIVFFlat`` (inner product) on CPU
  or one GPU.

Both take and return row positions; :class:`~featurestore.knn.index.KnnIndex` maps them to ids.
"""

from __future__ import annotations

import logging
import math
from types import ModuleType
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

_FAISS_GPU_MAX_K = 2048


def _default_nlist(n: int) -> int:
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


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

    def __init__(
        self,
        dim: int,
        device: torch.device,
        faiss: ModuleType | None,
        nprobe: int,
        bank_block: int,
        block_budget: int,
    ):
        self.dim = dim
        self.device = device
        self.nprobe = nprobe
        self._faiss = faiss
        self._bank_block = bank_block  # bank rows per matmul block
        self._block_budget = block_budget  # similarities per block
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
        bank_block = min(n, self._bank_block)
        return max(1, min(num_q, self._block_budget // bank_block)), bank_block

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


def make_backend(
    dim: int,
    kind: str,
    nprobe: int,
    nlist: int | None,
    device: str | torch.device | None,
    backend: str,
) -> _FaissBackend | _TorchBackend:
    """The backend for an index of ``dim`` columns (the rules: :mod:`featurestore.knn.index`)."""
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
    return _TorchBackend(
        dim,
        torch_device,
        heap_faiss,
        nprobe,
        bank_block=_BANK_BLOCK[torch_device.type],
        block_budget=_BLOCK_BUDGET[torch_device.type],
    )


# ---------------------------------------------------------------------- backend choice
_BANK_BLOCK = {"cpu": 1 << 16, "cuda": 1 << 20}  # exact search: bank rows per matmul block
_BLOCK_BUDGET = {"cpu": 1 << 23, "cuda": 1 << 28}  # exact search: similarities per block

_faiss_module: ModuleType | None = None
_faiss_tried = False


def _import_faiss() -> ModuleType | None:
    """The faiss module, or ``None`` (with one logged warning) when it cannot be imported."""
    global _faiss_module, _faiss_tried
    if not _faiss_tried:
        _faiss_tried = True
        # faiss.loader logs each instruction set it tries (a ModuleNotFoundError for AVX512
        # on most CPUs) at INFO: import noise, not news.
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
        try:
            import faiss

            _faiss_module = faiss
        except ImportError as err:
            logger.warning("faiss cannot be imported (%s): using torch top-k search", err)
    return _faiss_module
