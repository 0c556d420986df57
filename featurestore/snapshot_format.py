"""The snapshot format: where its files go and what the manifest says (the layout and the
commit rule are in :mod:`featurestore.snapshot`). Plain fsspec; no Ray."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

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


def _snapshot_root(uri: str) -> str:
    """The snapshot directory of ``uri`` (a directory or its ``manifest.json``)."""
    trimmed = uri.rstrip("/")
    if trimmed.endswith("/" + MANIFEST_NAME) or trimmed == MANIFEST_NAME:
        return trimmed[: -len(MANIFEST_NAME)].rstrip("/") or "."
    return trimmed


def wall_time() -> float:
    """Commit time recorded in manifests."""
    return time.time()
