"""The files :mod:`trainer.make_shards` writes: one sample's tar members, a shard being
written, the full PIL decode every image passes first (in threads, in input order), and the
index, skip list and ``dataset.json`` of a conversion (formats in that module's docstring)."""

from __future__ import annotations

import io
import json
import re
import resource
import tarfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from featurestore.files import write_atomic
from trainer.data.sources import Record, Source

#: How PIL names the in-memory file in its messages (``<_io.BytesIO object at 0x…>``).
_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")

SHARD_NAME = "shard-{:06d}.tar"
SHARD_GLOB = "shard-*.tar"
PARTIAL_SUFFIX = ".partial"
MIN_KEY_WIDTH = 9
FORMAT_VERSION = 2  # 2: ids in a seeded random order by default; offset column
ORDERS = ("random", "sorted")
INDEX_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("label", pa.int32()),
        ("key", pa.string()),
        ("shard", pa.string()),
        ("offset", pa.int64()),
        ("source", pa.string()),
    ]
)

_T = TypeVar("_T")
_R = TypeVar("_R")


# --------------------------------------------------------------------------- tar writing


def tar_member(name: str, data: bytes) -> bytes:
    """One ustar member: header + data + zero padding to a 512-byte boundary.

    Metadata is fixed (mtime 0, mode 0444, no owner) so identical inputs give identical shards.
    """
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    return header + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


class ShardFileWriter:
    """Appends samples to one ``.partial`` tar file; ``close`` writes the end-of-archive."""

    def __init__(self, path: Path):
        self.path = path
        self.count = 0
        self._size = 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()

    def write(self, key: str, ext: str, image: bytes, label: int) -> int:
        """Append one sample; returns the byte offset of its first header."""
        chunk = tar_member(f"{key}.{ext}", image) + tar_member(f"{key}.cls", b"%d" % label)
        offset = self._size
        self._file.write(chunk)
        self._size += len(chunk)
        self.count += 1
        return offset

    def close(self) -> None:
        if self._file.closed:
            return
        # Two zero blocks end the archive; pad to a whole 10240-byte record like tar(1).
        end = 2 * tarfile.BLOCKSIZE
        end += -(self._size + end) % tarfile.RECORDSIZE
        self._file.write(b"\0" * end)
        self._file.close()


# --------------------------------------------------------------------------- verification


def ordered_map(fn: Callable[[_T], _R], items: Iterable[_T], threads: int) -> Iterator[_R]:
    """``map(fn, items)`` on a thread pool, in input order, with a bounded window in flight."""
    window = 4 * threads
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="make_shards") as pool:
        pending: deque[Future[_R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


def verify_image(data: bytes) -> tuple[tuple[int, int] | None, str | None]:
    """Fully decode ``data`` with PIL.

    Returns:
        ``((width, height), None)`` when it decodes, else ``(None, reason)`` (one line).
    """
    if not data:
        return None, "empty file"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.size, None
    except Image.UnidentifiedImageError:
        return None, "not an image PIL can read (unknown or damaged format)"
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        text = _BUFFER_REPR.sub("the image", f"{type(exc).__name__}: {exc}")
        return None, " ".join(text.split())


def load_verified(source: Source) -> Callable[[Record], tuple[bytes | None, Any]]:
    """``record -> (bytes, (width, height))`` for an image that decodes, else
    ``(None, reason)``."""

    def load(record: Record) -> tuple[bytes | None, Any]:
        try:
            data = source.read(record)
        except OSError as exc:
            return None, " ".join(f"unreadable: {exc}".split())
        size, reason = verify_image(data)
        return (None, reason) if size is None else (data, size)

    return load


# --------------------------------------------------------------------------- output files


def existing_output(out: Path) -> list[Path]:
    """Files in ``out`` that mark a previous conversion."""
    if not out.is_dir():
        return []
    marks = [out / "index.parquet", out / "dataset.json"]
    return sorted(out.glob(SHARD_GLOB)) + [p for p in marks if p.exists()]


def ensure_open_files(n: int) -> None:
    """Raise the soft open-file limit when ``n`` shards must be open at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = n + 256
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise ValueError(
                f"{n} shards would be open at once but the open-file limit is {hard}; "
                f"use a larger --shard-size"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def write_outputs(
    out: Path,
    source: Source,
    rows: dict[str, list],
    skipped: list[tuple[str, str]],
    shards: tuple[str, ...],
    counts: tuple[int, ...],
    key_width: int,
    sides: tuple[int, int],
    order: str,
    seed: int,
) -> None:
    """index.parquet, skipped.txt, then dataset.json (last: it marks completion)."""
    table = pa.table(rows, schema=INDEX_SCHEMA)
    write_atomic(out / "index.parquet", lambda p: pq.write_table(table, p), PARTIAL_SUFFIX)
    lines = "".join(f"{path}\t{reason}\n" for path, reason in skipped)
    write_atomic(out / "skipped.txt", lambda p: p.write_text(lines, "utf-8"), PARTIAL_SUFFIX)
    meta = {
        "format": "npid-webdataset",
        "format_version": FORMAT_VERSION,
        "num_instances": len(rows["id"]),
        "classes": list(source.classes),
        "num_classes": len(source.classes),
        "source": source.location,
        "source_type": source.kind,
        "split": source.split,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "num_skipped": len(skipped) - len(source.ignored),
        "key_width": key_width,
        "order": order,
        "order_seed": seed if order == "random" else None,
        "image_size_min": sides[0],
        "image_size_max": sides[1],
        "shards": list(shards),
        "shard_counts": list(counts),
    }
    text = json.dumps(meta, indent=2) + "\n"
    write_atomic(out / "dataset.json", lambda p: p.write_text(text, "utf-8"), PARTIAL_SUFFIX)
