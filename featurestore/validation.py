"""Input checks shared by :class:`MemoryBank` and the sharded store.

Every check raises :class:`ValueError` naming the argument and the problem, before any
row is touched, so a rejected call leaves the bank unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from featurestore.objectives import Objective

_STORAGE_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def storage_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Resolve a row storage dtype (float32, bfloat16 or float16)."""
    if isinstance(dtype, torch.dtype):
        if dtype in _STORAGE_DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.replace("torch.", "") in _STORAGE_DTYPES:
        return _STORAGE_DTYPES[dtype.replace("torch.", "")]
    raise ValueError(f"dtype must be one of {sorted(_STORAGE_DTYPES)}, got {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


def check_shape_args(num_rows: int, dim: int, momentum: float) -> None:
    """Validate constructor arguments of a bank or store."""
    for name, value in (("num_rows", num_rows), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")


def check_count(n: int, name: str = "n") -> int:
    """``n`` as a non-negative int (a number of rows to sample, say)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    return n


def check_ids(ids: Tensor, num_rows: int, name: str = "ids", length: int | None = None) -> Tensor:
    """``ids`` as a 1-D int64 CPU tensor of row ids in ``[0, num_rows)``."""
    if not isinstance(ids, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of integer ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
    if length is not None and ids.numel() != length:
        raise ValueError(f"{name} has {ids.numel()} entries but the batch has {length}")
    ids = ids.to(device="cpu", dtype=torch.int64)
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= num_rows:
            bad = low if low < 0 else high
            raise ValueError(f"{name} out of range: {bad} is not in [0, {num_rows})")
    return ids


def check_rows(rows: Tensor, dim: int, name: str = "feats", length: int | None = None) -> Tensor:
    """``rows`` as a finite float32 ``[n, dim]`` tensor (device kept)."""
    if not isinstance(rows, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(rows).__name__}")
    if not rows.dtype.is_floating_point:
        raise ValueError(f"{name} must have a floating dtype, got {rows.dtype}")
    if rows.dim() != 2 or rows.shape[1] != dim:
        raise ValueError(f"{name} must have shape [n, {dim}], got {tuple(rows.shape)}")
    if length is not None and rows.shape[0] != length:
        raise ValueError(f"{name} has {rows.shape[0]} rows but {length} ids were given")
    rows = rows.detach().float()
    if not bool(torch.isfinite(rows).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return rows


def check_step(
    feats: Tensor,
    ids: Tensor,
    objective: Objective,
    num_rows: int,
    dim: int,
    noise_ids: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Validate one ``step`` call; returns ``(feats float32, ids int64 CPU, noise_ids)``."""
    if not isinstance(objective, Objective):
        raise ValueError(f"objective must be NCE, Softmax or SampledSoftmax, got {objective!r}")
    feats = check_rows(feats, dim, "feats")
    if feats.shape[0] == 0:
        raise ValueError("feats is an empty batch")
    ids = check_ids(ids, num_rows, "ids", feats.shape[0])
    if not objective.sampled:
        if noise_ids is not None:
            raise ValueError(f"noise_ids given but {type(objective).__name__} scores all rows")
        return feats, ids, None
    k = objective.num_negatives
    if k > num_rows:
        raise ValueError(f"num_negatives (K={k}) is larger than the bank's {num_rows} rows")
    if noise_ids is None:
        return feats, ids, None
    expected = (k,) if objective.shared_noise else (feats.shape[0], k)
    if not isinstance(noise_ids, Tensor) or tuple(noise_ids.shape) != expected:
        shape = tuple(noise_ids.shape) if isinstance(noise_ids, Tensor) else type(noise_ids)
        raise ValueError(f"noise_ids must have shape {list(expected)}, got {shape}")
    flat = check_ids(noise_ids.reshape(-1), num_rows, "noise_ids")
    return feats, ids, flat.reshape(expected)


__all__ = [
    "check_count",
    "check_ids",
    "check_rows",
    "check_shape_args",
    "check_step",
    "dtype_name",
    "storage_dtype",
]
