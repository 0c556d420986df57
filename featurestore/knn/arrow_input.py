"""Arrow record batches -> ``(ids, vectors)`` arrays, for :meth:`KnnIndex.from_batches`.

Batches have an integer column ``id`` and a column ``vector`` of
``fixed_size_list<float16|float32|float64>[dim]`` or ``list<…>`` with every row of length
``dim``; float32 values are read zero-copy. ``pyarrow`` is imported only when used.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np


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
