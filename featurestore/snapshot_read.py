"""Reading snapshots: a manifest, the rows of any range (only the row groups that cover
it), every batch in order, and finding the newest complete snapshot under a directory
(one whose manifest, written last, exists and is valid). Plain pyarrow and fsspec."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from featurestore import arrow_io
from featurestore.snapshot_format import (
    _SNAPSHOT_DIR_RE,
    MANIFEST_NAME,
    Manifest,
    ShardFile,
    _fs,
    _is_local,
    _snapshot_root,
    join,
)


def read_manifest(uri: str) -> Manifest:
    """Read and validate the manifest of the snapshot at ``uri`` (directory or manifest path).

    Raises:
        FileNotFoundError: no manifest there (missing, or an incomplete snapshot).
        ValueError: the manifest is malformed.
    """
    root = _snapshot_root(uri)
    fs, path = _fs(root)
    manifest_path = f"{path.rstrip('/')}/{MANIFEST_NAME}"
    try:
        with fs.open(manifest_path, "r") as src:
            text = src.read()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {root}: not a snapshot, or an incomplete one "
            "(the manifest is written last)"
        ) from None
    return Manifest.from_json(text, root)


class _ShardReader:
    """An open shard file with its row groups' global row ranges."""

    def __init__(self, manifest: Manifest, entry: ShardFile) -> None:
        self.uri = manifest.file_uri(entry)
        fs, path = _fs(self.uri)
        if not fs.exists(path):
            raise FileNotFoundError(f"snapshot shard file missing: {self.uri}")
        self._handle = None if _is_local(fs) else fs.open(path, "rb")
        try:
            source = path if self._handle is None else self._handle
            self.file = pq.ParquetFile(source, memory_map=self._handle is None)
        except (pa.ArrowException, OSError) as err:
            self.close()
            raise ValueError(f"snapshot shard file {self.uri} is corrupt: {err}") from None
        names = self.file.schema_arrow.names
        vector = self.file.schema_arrow.field("vector") if "vector" in names else None
        if (
            vector is None
            or not pa.types.is_fixed_size_list(vector.type)
            or vector.type.list_size != manifest.dim
        ):
            self.close()
            raise ValueError(
                f"snapshot shard file {self.uri} does not hold float32[{manifest.dim}] vectors"
            )
        if self.file.metadata.num_rows != entry.hi - entry.lo:
            self.close()
            raise ValueError(
                f"snapshot shard file {self.uri} has {self.file.metadata.num_rows} rows, "
                f"the manifest says {entry.hi - entry.lo}"
            )
        self.groups: list[tuple[int, int]] = []
        edge = entry.lo
        for g in range(self.file.num_row_groups):
            n = self.file.metadata.row_group(g).num_rows
            self.groups.append((edge, edge + n))
            edge += n

    def read_group(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Row group ``g`` as ``(ids [n] int64, vectors [n, d] float32)`` numpy arrays."""
        try:
            table = self.file.read_row_group(g, columns=["id", "vector"])
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"snapshot shard file {self.uri} is corrupt: {err}") from None
        ids = table.column("id").to_numpy()
        vectors = table.column("vector").combine_chunks()
        values = vectors.flatten().to_numpy(zero_copy_only=False)
        g0, g1 = self.groups[g]
        if ids.shape[0] != g1 - g0 or (ids.shape[0] and (ids[0] != g0 or ids[-1] != g1 - 1)):
            raise ValueError(
                f"snapshot shard file {self.uri}: row group {g} does not hold ids [{g0}, {g1})"
            )
        return ids, values.reshape(g1 - g0, -1)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _as_tensor(values: np.ndarray) -> Tensor:
    """A tensor view of (possibly read-only, Arrow-owned) ``values``; only ever read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(values))


def check_files(manifest: Manifest) -> None:
    """Check that every shard file exists and matches the manifest (footers only).

    Raises:
        FileNotFoundError: a shard file is missing.
        ValueError: a shard file is corrupt or does not match the manifest.
    """
    for entry in manifest.files:
        _ShardReader(manifest, entry).close()


def read_rows(manifest: Manifest, lo: int, hi: int, out: Tensor) -> Tensor:
    """Fill ``out`` ``[hi - lo, d]`` (any dtype and device) with rows ``[lo, hi)``.

    Reads only the row groups that overlap ``[lo, hi)``, one at a time.
    """
    if not 0 <= lo <= hi <= manifest.num_rows:
        raise ValueError(f"rows [{lo}, {hi}) are not inside [0, {manifest.num_rows})")
    if tuple(out.shape) != (hi - lo, manifest.dim):
        raise ValueError(f"out must have shape {(hi - lo, manifest.dim)}, got {tuple(out.shape)}")
    for entry in manifest.files:
        a, b = max(lo, entry.lo), min(hi, entry.hi)
        if a >= b:
            continue
        reader = _ShardReader(manifest, entry)
        try:
            for g, (g0, g1) in enumerate(reader.groups):
                s0, s1 = max(a, g0), min(b, g1)
                if s0 >= s1:
                    continue
                _, values = reader.read_group(g)
                block = _as_tensor(values[s0 - g0 : s1 - g0])
                out[s0 - lo : s1 - lo].copy_(block)
        finally:
            reader.close()
    return out


def iter_batches(manifest: Manifest) -> Iterator[pa.RecordBatch]:
    """Stream a snapshot as ``(id, vector)`` record batches, one row group at a time."""
    for entry in manifest.files:
        reader = _ShardReader(manifest, entry)
        try:
            for g in range(len(reader.groups)):
                ids, values = reader.read_group(g)
                yield arrow_io.to_record_batch(_as_tensor(ids), _as_tensor(values))
        finally:
            reader.close()


def _candidate_dirs(snapshot_dir: str) -> list[tuple[int, int, str]]:
    """``(step, sequence, name)`` of every ``step-*`` entry directly under ``snapshot_dir``."""
    fs, path = _fs(snapshot_dir)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        match = _SNAPSHOT_DIR_RE.match(name)
        if match:
            out.append((int(match.group(1)), int(match.group(2) or 0), name))
    return out


def list_snapshots(snapshot_dir: str, store_id: str | None = None) -> list[Manifest]:
    """Complete snapshots under ``snapshot_dir``, newest first (by commit time, then step).

    Directories without a (valid) manifest are skipped. With ``store_id`` only snapshots
    written by that store are listed.
    """
    found = []
    for _step, _seq, name in _candidate_dirs(snapshot_dir):
        try:
            manifest = read_manifest(join(snapshot_dir, name))
        except (FileNotFoundError, ValueError):
            continue
        if store_id is None or manifest.store_id == store_id:
            found.append(manifest)
    found.sort(key=lambda m: (m.created, m.step), reverse=True)
    return found


def latest_snapshot(snapshot_dir: str, store_id: str | None = None) -> str | None:
    """URI of the newest complete snapshot under ``snapshot_dir`` (None when there is none)."""
    snapshots = list_snapshots(snapshot_dir, store_id)
    return snapshots[0].uri if snapshots else None


def resolve(uri: str) -> str:
    """A snapshot's URI from ``uri``: the snapshot itself, or the latest under a snapshot dir.

    Raises:
        FileNotFoundError: ``uri`` is neither a snapshot (no manifest) nor a directory of
            complete snapshots.
    """
    root = _snapshot_root(uri)
    fs, path = _fs(root)
    if fs.exists(f"{path.rstrip('/')}/{MANIFEST_NAME}"):
        return root
    if _candidate_dirs(root):
        latest = latest_snapshot(root)
        if latest is not None:
            return latest
    raise FileNotFoundError(
        f"no {MANIFEST_NAME} in {root} and no complete snapshot under it: not a snapshot, "
        "or an incomplete one (the manifest is written last)"
    )
