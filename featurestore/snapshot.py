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
import re
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import Tensor

from featurestore import arrow_io, write_retries

logger = logging.getLogger(__name__)

#: Name of the manifest file inside a snapshot directory.
MANIFEST_NAME = "manifest.json"
#: ``format`` field of every manifest.
FORMAT = "npid-bank-snapshot"
#: Manifest layout version.
VERSION = 1

_SNAPSHOT_DIR_RE = re.compile(r"^step-(\d+)(?:-(\d+))?$")


@dataclass(frozen=True)
class ShardFile:
    """One shard file of a snapshot: rows ``[lo, hi)`` in ``path`` (relative to the snapshot)."""

    path: str
    lo: int
    hi: int
    nbytes: int = 0


@dataclass
class Manifest:
    """What a snapshot holds. ``uri`` is the snapshot directory (not stored in the JSON).

    Attributes:
        num_rows: ``N``; dim: ``d``; dtype: the bank's storage dtype name.
        momentum, seed: the bank's update momentum and seed.
        z: NCE's normalising constant (None until estimated).
        step: the store's step counter when the snapshot was taken.
        bounds: shard boundaries of the store that wrote it (``S + 1`` ints).
        files: one :class:`ShardFile` per shard, covering ``[0, N)`` in order.
        created: unix time the snapshot was committed; orders snapshots.
        store_id: id of the store that wrote it; name: that store's name.
    """

    uri: str
    num_rows: int
    dim: int
    dtype: str
    momentum: float
    seed: int
    z: float | None
    step: int
    bounds: list[int]
    files: list[ShardFile]
    created: float = 0.0
    store_id: str = ""
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """The manifest file's text."""
        data = asdict(self)
        del data["uri"]
        data = {"format": FORMAT, "version": VERSION, **data}
        return json.dumps(data, indent=1, sort_keys=True)

    @staticmethod
    def from_json(text: str, uri: str) -> Manifest:
        """Parse and validate a manifest read from snapshot ``uri``."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"snapshot manifest in {uri} is not valid JSON: {err}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{uri} does not hold an npid bank snapshot manifest")
        if data.get("version") != VERSION:
            raise ValueError(f"snapshot {uri} has manifest version {data.get('version')!r}")
        try:
            files = [ShardFile(**f) for f in data["files"]]
            manifest = Manifest(
                uri=uri,
                num_rows=int(data["num_rows"]),
                dim=int(data["dim"]),
                dtype=str(data["dtype"]),
                momentum=float(data["momentum"]),
                seed=int(data["seed"]),
                z=None if data["z"] is None else float(data["z"]),
                step=int(data["step"]),
                bounds=[int(b) for b in data["bounds"]],
                files=files,
                created=float(data.get("created", 0.0)),
                store_id=str(data.get("store_id", "")),
                name=str(data.get("name", "")),
                extra=dict(data.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"snapshot manifest in {uri} is malformed: {err!r}") from None
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Check that the files cover ``[0, num_rows)`` contiguously."""
        edge = 0
        for f in self.files:
            if f.lo != edge or f.hi < f.lo:
                raise ValueError(
                    f"snapshot {self.uri}: shard files do not cover [0, {self.num_rows}) in "
                    f"order (file {f.path} holds [{f.lo}, {f.hi}), expected to start at {edge})"
                )
            edge = f.hi
        if edge != self.num_rows or self.num_rows < 1 or self.dim < 1:
            raise ValueError(
                f"snapshot {self.uri}: files cover [0, {edge}) but num_rows is {self.num_rows}"
            )

    def file_uri(self, f: ShardFile) -> str:
        """Full URI of one shard file."""
        return join(self.uri, f.path)


def join(base: str, *names: str) -> str:
    """``base/name/...`` for a local path or any fsspec URL."""
    out = base.rstrip("/")
    for name in names:
        out = f"{out}/{name.strip('/')}"
    return out


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def check_shared(uri: str, what: str = "snapshot location") -> None:
    """Refuse a filesystem private to one process (``memory://``): shards could not share it."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if protocol == "memory":
        raise ValueError(
            f"{what} {uri!r} is on fsspec's in-process memory filesystem, which the shard "
            "processes cannot share; use a path or a shared URL (file://, s3://, gs://, ...)"
        )


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _rename(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Move ``src`` to ``dst`` (atomic on local filesystems)."""
    if _is_local(fs):
        import os

        os.replace(src, dst)
    else:
        fs.mv(src, dst)


def shard_file_name(shard: int, num_shards: int) -> str:
    """``shard-00001-of-00004.parquet``."""
    return f"shard-{shard:05d}-of-{num_shards:05d}.parquet"


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


def _snapshot_root(uri: str) -> str:
    """The snapshot directory of ``uri`` (a directory or its ``manifest.json``)."""
    trimmed = uri.rstrip("/")
    if trimmed.endswith("/" + MANIFEST_NAME) or trimmed == MANIFEST_NAME:
        return trimmed[: -len(MANIFEST_NAME)].rstrip("/") or "."
    return trimmed


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


def wall_time() -> float:
    """Commit time recorded in manifests."""
    return time.time()


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
