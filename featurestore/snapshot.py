"""Bank snapshots: one Parquet file per shard and a JSON manifest written last (README,
*The feature store*).

Layout of one snapshot (a directory on any fsspec filesystem: a local path, ``file://``,
``memory://``, ``s3://`` …)::

    <snapshot_dir>/step-000000123/
        shard-00000-of-00002.parquet   # rows [lo_0, hi_0): id int64, vector float32[d]
        shard-00001-of-00002.parquet
        manifest.json                  # written last: the commit point

Shard files are written under a temporary name and renamed when complete; the manifest is
written the same way after every shard file exists, so a snapshot without a manifest is
incomplete and ignored by :func:`latest_snapshot`. Files are written and read one row group
(:data:`~featurestore.arrow_io.EXPORT_BATCH_ROWS` rows) at a time, and a reader asks only
for the row groups covering the range it needs, so any number of new shards can restore
from any number of old files without gathering the bank. Vectors are stored as float32
whatever the bank's storage dtype (recorded in the metadata), so pyarrow, pandas, DuckDB …
read them without this project. Plain pyarrow and fsspec; no Ray.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from featurestore import arrow_io, write_retries
from featurestore.snapshot_format import (
    FORMAT,
    MANIFEST_NAME,
    Manifest,
    ShardFile,
    _fs,
    _is_local,
    _rename,
    check_shared,
    join,
    shard_file_name,
    wall_time,
)
from featurestore.snapshot_read import (
    _candidate_dirs,
    check_files,
    iter_batches,
    latest_snapshot,
    list_snapshots,
    read_manifest,
    read_rows,
    resolve,
)

logger = logging.getLogger(__name__)


def write_shard_file(
    directory: str,
    shard: int,
    num_shards: int,
    lo: int,
    rows: Tensor,
    metadata: dict[str, Any],
    compression: str | None = None,
    batch_rows: int = arrow_io.EXPORT_BATCH_ROWS,
    on_retry: Callable[[], None] | None = None,
) -> ShardFile:
    """Write rows ``[lo, lo + n)`` of a bank as one Parquet file of a snapshot.

    Rows are converted to float32 one row group of ``batch_rows`` rows at a time; the file
    is written under a temporary name and renamed when complete.

    Args:
        directory: the snapshot directory (created when missing).
        shard, num_shards: which file this is (names it).
        lo: global id of ``rows[0]``.
        rows: ``[n, d]`` rows in any float dtype, on any device.
        metadata: extra schema metadata (values JSON-encoded).
        compression: Parquet codec; None picks ``lz4`` for 16-bit storage dtypes (the
            float32 values then have two zero bytes each; byte-stream-split makes them
            compress to half) and no compression for float32.
        batch_rows: rows per row group.
        on_retry: called at each retry of a transient object-storage error
            (:mod:`~featurestore.write_retries`).

    Returns:
        The :class:`ShardFile` entry for the manifest.
    """
    n, dim = rows.shape
    fs, dir_path = _fs(directory)
    name = shard_file_name(shard, num_shards)
    final = f"{dir_path.rstrip('/')}/{name}"
    meta = {key: json.dumps(value) for key, value in metadata.items()}
    meta.update(
        {
            "format": json.dumps(FORMAT),
            "dim": json.dumps(dim),
            "shard": json.dumps(shard),
            "num_shards": json.dumps(num_shards),
            "lo": json.dumps(lo),
            "hi": json.dumps(lo + n),
        }
    )
    schema = arrow_io.schema(dim, meta)
    if compression is None:
        compression = "none" if rows.dtype == torch.float32 else "lz4"
    options: dict[str, Any] = {
        "compression": compression,
        "use_dictionary": False,
        "write_statistics": ["id"],
    }
    if compression != "none":
        options["use_byte_stream_split"] = ["vector.list.element"]

    def write() -> int:
        fs.makedirs(dir_path, exist_ok=True)
        tmp = f"{dir_path.rstrip('/')}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        sink = pa.OSFile(tmp, "wb") if _is_local(fs) else fs.open(tmp, "wb")
        try:
            with sink, pq.ParquetWriter(sink, schema, **options) as writer:
                for r0 in range(0, n, batch_rows):
                    r1 = min(n, r0 + batch_rows)
                    ids = torch.arange(lo + r0, lo + r1)
                    batch = arrow_io.to_record_batch(ids, rows[r0:r1])
                    writer.write_batch(
                        batch.replace_schema_metadata(meta), row_group_size=batch_rows
                    )
            size = int(fs.size(tmp))
            _rename(fs, tmp, final)
        except BaseException:
            try:
                if fs.exists(tmp):
                    fs.rm(tmp)
            except OSError:
                pass
            raise
        return size

    nbytes = write_retries.retrying(
        join(directory, name), write, remote=not _is_local(fs), on_retry=on_retry
    )
    return ShardFile(path=name, lo=lo, hi=lo + n, nbytes=nbytes)


def write_manifest(manifest: Manifest, on_retry: Callable[[], None] | None = None) -> str:
    """Commit a snapshot: write its manifest (temp name, then rename). Returns its URI.

    ``on_retry``: called at each retry of a transient object-storage error."""
    manifest.validate()
    fs, dir_path = _fs(manifest.uri)
    for f in manifest.files:
        path = f"{dir_path.rstrip('/')}/{f.path}"
        if not fs.exists(path):
            raise FileNotFoundError(f"snapshot shard file missing: {manifest.file_uri(f)}")
    final = f"{dir_path.rstrip('/')}/{MANIFEST_NAME}"

    def write() -> None:
        tmp = f"{dir_path.rstrip('/')}/.{MANIFEST_NAME}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "w") as out:
            out.write(manifest.to_json())
        _rename(fs, tmp, final)

    uri = join(manifest.uri, MANIFEST_NAME)
    write_retries.retrying(uri, write, remote=not _is_local(fs), on_retry=on_retry)
    return uri


def new_snapshot_uri(snapshot_dir: str, step: int) -> str:
    """A fresh directory name ``snapshot_dir/step-000000123[-k]`` for a snapshot at ``step``."""
    taken = {name for _s, _q, name in _candidate_dirs(snapshot_dir)}
    name = f"step-{step:09d}"
    k = 0
    while name in taken:
        k += 1
        name = f"step-{step:09d}-{k}"
    return join(snapshot_dir, name)


def remove_snapshot(uri: str) -> None:
    """Delete a snapshot directory (best effort; missing is fine)."""
    fs, path = _fs(uri)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except OSError as err:
        logger.warning("could not remove snapshot %s: %s", uri, err)


def prune_snapshots(snapshot_dir: str, keep: int, store_id: str | None = None) -> list[str]:
    """Keep the newest ``keep`` complete snapshots (of ``store_id``) under ``snapshot_dir``.

    Older complete ones are deleted, and so are incomplete ``step-*`` directories (left by
    an interrupted snapshot) whose step is below the newest complete snapshot's.

    Returns:
        URIs removed.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    complete = list_snapshots(snapshot_dir, store_id)
    removed = [m.uri for m in complete[keep:]]
    if complete:
        newest_step = max(m.step for m in complete[:keep])
        complete_names = {
            m.uri.rstrip("/").rsplit("/", 1)[-1] for m in list_snapshots(snapshot_dir)
        }
        for step, _seq, name in _candidate_dirs(snapshot_dir):
            if name not in complete_names and step < newest_step:
                removed.append(join(snapshot_dir, name))
    for uri in removed:
        remove_snapshot(uri)
    return removed


__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "Manifest",
    "ShardFile",
    "check_files",
    "check_shared",
    "iter_batches",
    "join",
    "latest_snapshot",
    "list_snapshots",
    "new_snapshot_uri",
    "prune_snapshots",
    "read_manifest",
    "read_rows",
    "remove_snapshot",
    "resolve",
    "shard_file_name",
    "wall_time",
    "write_manifest",
    "write_shard_file",
]
