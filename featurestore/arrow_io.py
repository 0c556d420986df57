"""Bank rows as Arrow data: ``(id int64, vector fixed_size_list<float32>[d])``.

The export stream and the snapshot files use this one schema, so any Arrow reader
(pyarrow, pandas, DuckDB, polars) reads them without this project.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

#: Rows per record batch in exports and snapshot row groups.
EXPORT_BATCH_ROWS = 65536


def schema(dim: int, metadata: dict[str, str] | None = None) -> pa.Schema:
    """The bank schema for vectors of ``dim`` float32 values."""
    fields = [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
    ]
    meta = {k.encode(): v.encode() for k, v in (metadata or {}).items()}
    return pa.schema(fields, metadata=meta or None)


def to_record_batch(ids: Tensor, rows: Tensor) -> pa.RecordBatch:
    """``ids`` ``[n]`` and ``rows`` ``[n, d]`` (any float dtype) as one record batch."""
    dim = rows.shape[1]
    flat = rows.detach().to("cpu", torch.float32).contiguous().numpy().reshape(-1)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), dim)
    id_array = pa.array(ids.detach().cpu().numpy().astype(np.int64), type=pa.int64())
    return pa.RecordBatch.from_arrays([id_array, vectors], schema=schema(dim))


def from_record_batch(batch: pa.RecordBatch | pa.Table) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`to_record_batch`: ``(ids [n] int64, rows [n, d] float32)``."""
    if isinstance(batch, pa.Table):
        batch = batch.combine_chunks().to_batches()[0] if batch.num_rows else None
        if batch is None:
            return torch.empty(0, dtype=torch.int64), torch.empty(0, 0)
    col = batch.column("vector")
    if not pa.types.is_fixed_size_list(col.type):
        raise ValueError(f"column 'vector' must be a fixed-size list, got {col.type}")
    dim = col.type.list_size
    values = col.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    rows = torch.from_numpy(values.reshape(-1, dim).copy())
    ids = torch.from_numpy(batch.column("id").to_numpy(zero_copy_only=False).astype(np.int64))
    return ids, rows


__all__ = ["EXPORT_BATCH_ROWS", "from_record_batch", "schema", "to_record_batch"]
