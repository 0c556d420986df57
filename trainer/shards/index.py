"""Index webdataset shards you already have, without copying a byte of their images.

    python -m trainer.make_shards index URLS... OUT [--label cls|json:FIELD|none]

``URLS``: tar files or URLs (local paths, ``file://``, ``s3://``, ``gs://``, ``http(s)://``,
``pipe:``), brace patterns such as ``s3://bucket/train-{000000..001023}.tar`` (ranges keep
their zero padding; ``{a,b}`` lists), or local directories (their ``*.tar``). Any key naming
and member layout webdataset reads works: a sample is the consecutive members sharing a key
(the base name up to its first dot); its image is the first of ``jpg jpeg png webp ...``.

One streaming pass over every shard (threads, a progress bar) writes to ``OUT`` only:

- ``index.parquet``: ``id`` (dense, in shard-then-file order), ``label``, ``key``, ``shard``
  (the shard's full URL), ``offset`` (byte offset of the sample's first tar header),
  ``source`` (``URL#key``);
- ``dataset.json`` (``format: npid-webdataset-index``), written last;
- ``skipped.txt``: samples left out (no image field, a key seen before in the same shard,
  an unreadable image header), and damaged shards' tails.

The pass is resumable: each finished shard's rows go to ``OUT/.parts/`` first, and a rerun
reads only shards without a part. Labels: ``cls`` (an integer field, as make_shards and
webdataset's ``ShardWriter`` examples write it), ``json:FIELD`` (a field of the ``json``
member: integers are labels, strings become classes in sorted order), or ``none``
(unlabelled: training works, the kNN evaluation then reports no accuracy). A sample lacking
its label is kept with ``-1``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from featurestore.files import is_url, write_atomic
from trainer.data.decode import IMAGE_FIELDS
from trainer.data.shard_files import _ShardCursor, _TarError
from trainer.launch.progress import terminal_bar

logger = logging.getLogger(__name__)

INDEX_FORMAT = "npid-webdataset-index"
INDEX_VERSION = 1
PARTS = ".parts"
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")
_SCHEMA = pa.schema(
    [
        ("label", pa.int64()),
        ("key", pa.string()),
        ("offset", pa.int64()),
        ("side_min", pa.int32()),
        ("side_max", pa.int32()),
        ("label_name", pa.string()),
    ]
)


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar a-001.tar a-002.tar``; ``{x,y}`` lists too
    (webdataset's brace notation). Ranges keep the width of their first bound."""
    m = _RANGE.search(pattern)
    n = _LIST.search(pattern)
    if m is None and n is None:
        return [pattern]
    if m is not None and (n is None or m.start() < n.start()):
        lo, hi = m.group(1), m.group(2)
        if int(hi) < int(lo):
            raise ValueError(f"empty brace range {m.group(0)} in {pattern}")
        width = len(lo) if lo.startswith("0") else 0
        heads = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
        a, b = m.span()
    else:
        heads = n.group(1).split(",")
        a, b = n.span()
    return [x for h in heads for x in expand_braces(pattern[:a] + h + pattern[b:])]


def shard_urls(items: list[str]) -> list[str]:
    """The shard URLs named by ``items`` (URLs, brace patterns, local directories).

    Raises:
        ValueError: nothing named, a local path that does not exist, or a directory
            without ``.tar`` files (the message names it).
    """
    urls: list[str] = []
    for item in items:
        for url in expand_braces(item):
            if is_url(url) or url.startswith("pipe:"):
                urls.append(url)
                continue
            path = Path(url)
            if path.is_dir():
                found = sorted(str(p.resolve()) for p in path.glob("*.tar"))
                if not found:
                    raise ValueError(f"{url}: a directory without .tar shards")
                urls.extend(found)
            elif path.is_file():
                urls.append(str(path.resolve()))
            else:
                raise ValueError(f"{url}: no such shard")
    if not urls:
        raise ValueError("no shards given")
    return urls


def _label_of(fields: dict[str, bytes], label: str) -> int | str | None:
    if label == "none":
        return None
    if label == "cls":
        raw = fields.get("cls")
        try:
            return int(raw) if raw is not None else None
        except ValueError:
            return None
    data = fields.get("json")
    if data is None:
        return None
    try:
        value = json.loads(data).get(label[len("json:") :])
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None


def _image_sides(data: bytes) -> tuple[int, int]:
    """(smallest, largest) side from the image header, ``(-1, -1)`` if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            w, h = image.size
        return min(w, h), max(w, h)
    except Exception:  # PIL raises many types for bad headers
        return -1, -1


def _index_one(url: str, label: str) -> tuple[pa.Table, list[str]]:
    """One shard's rows and skip lines."""
    rows: dict[str, list] = {name: [] for name in _SCHEMA.names}
    skipped: list[str] = []
    seen: set[str] = set()
    cursor = _ShardCursor(url)
    try:
        while (key := cursor.peek_key()) is not None:
            offset = cursor.key_offset
            fields = cursor.take(read=True)
            image = next((fields[e] for e in IMAGE_FIELDS if e in fields), None)
            if image is None:
                skipped.append(f"{url}#{key}\tno image field (fields: {sorted(fields)})")
                continue
            if key in seen:
                skipped.append(f"{url}#{key}\tduplicate key in the shard")
                continue
            lo, hi = _image_sides(image)
            if lo < 0:
                skipped.append(f"{url}#{key}\timage header does not decode")
                continue
            seen.add(key)
            value = _label_of(fields, label)
            for col, v in zip(
                _SCHEMA.names,
                (value if isinstance(value, int) else -1, key, offset, lo, hi,
                 value if isinstance(value, str) else None),
                strict=True,
            ):  # fmt: skip
                rows[col].append(v)
    except (_TarError, OSError) as exc:
        skipped.append(f"{url}\tdamaged after {len(rows['key'])} samples: {exc}")
    finally:
        cursor.close()
    return pa.table(rows, schema=_SCHEMA), skipped


def _part_name(url: str) -> str:
    return hashlib.sha1(url.encode()).hexdigest()[:20]


def index_shards(
    items: list[str],
    out: str | os.PathLike,
    label: str = "cls",
    *,
    threads: int = 8,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Index existing webdataset shards into ``out`` (see the module docstring).

    Args:
        items: shard URLs, brace patterns or local directories.
        out: where ``index.parquet``/``dataset.json`` go (created; never the images).
        label: ``cls``, ``json:FIELD`` or ``none``.
        threads: shards read at once.
        progress: a tqdm bar on stderr; ``None``: on a terminal.

    Returns:
        The written ``dataset.json`` content.

    Raises:
        ValueError: bad ``label``, no shards, or no sample with an image in any of them.
    """
    if label not in ("cls", "none") and not (label.startswith("json:") and len(label) > 5):
        raise ValueError(f"--label must be cls, json:FIELD or none, got {label!r}")
    urls = shard_urls(items)
    if len(set(urls)) != len(urls):
        raise ValueError("a shard is named twice")
    out = Path(out)
    parts = out / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    todo = [u for u in urls if not (parts / f"{_part_name(u)}.parquet").is_file()]
    if len(todo) < len(urls):
        logger.info("resuming: %d of %d shards already indexed", len(urls) - len(todo), len(urls))

    def run(url: str) -> int:
        table, skipped = _index_one(url, label)
        name = _part_name(url)
        text = "".join(f"{line}\n" for line in skipped)
        write_atomic(parts / f"{name}.skipped", lambda p: p.write_text(text, "utf-8"))
        write_atomic(parts / f"{name}.parquet", lambda p: pq.write_table(table, p))
        return table.num_rows

    bar = terminal_bar(total=len(urls), initial=len(urls) - len(todo), desc="index", unit="shard",
                       enabled=progress)  # fmt: skip
    with bar, ThreadPoolExecutor(max(1, threads)) as pool:
        for n in pool.map(run, todo):
            bar.update(1)
            bar.set_postfix(samples=n)
    return _write_index(out, urls, label)


def _write_index(out: Path, urls: list[str], label: str) -> dict[str, Any]:
    parts = out / PARTS
    tables, skipped, counts = [], [], []
    for url in urls:
        name = _part_name(url)
        table = pq.read_table(parts / f"{name}.parquet")
        tables.append(table.append_column("shard", pa.array([url] * table.num_rows, pa.string())))
        skipped.append((parts / f"{name}.skipped").read_text("utf-8"))
        counts.append(table.num_rows)
    table = pa.concat_tables(tables)
    n = table.num_rows
    if n == 0:
        raise ValueError(f"no sample with an image in the {len(urls)} shard(s) given")
    names = sorted({v for v in table["label_name"].to_pylist() if v is not None})
    labels = table["label"].to_pylist()
    if names:
        position = {v: i for i, v in enumerate(names)}
        named = table["label_name"].to_pylist()
        labels = [position[v] if v is not None else y for v, y in zip(named, labels, strict=True)]
    keys = table["key"].to_pylist()
    shards = table["shard"].to_pylist()
    index = pa.table({
        "id": pa.array(range(n), pa.int64()),
        "label": pa.array(labels, pa.int64()),
        "key": table["key"],
        "shard": table["shard"],
        "offset": table["offset"],
        "source": pa.array([f"{u}#{k}" for u, k in zip(shards, keys, strict=True)]),
    })  # fmt: skip
    write_atomic(out / "index.parquet", lambda p: pq.write_table(index, p))
    lines = "".join(skipped)
    write_atomic(out / "skipped.txt", lambda p: p.write_text(lines, "utf-8"))
    top = max(labels) if labels else -1
    sides_min = [v for v in table["side_min"].to_pylist() if v >= 0]
    meta = {
        "format": INDEX_FORMAT,
        "format_version": INDEX_VERSION,
        "num_instances": n,
        "classes": names or [str(c) for c in range(top + 1)],
        "num_classes": len(names) or top + 1,
        "label": label,
        "source": urls[0] if len(urls) == 1 else f"{urls[0]} ... ({len(urls)} shards)",
        "source_type": "webdataset",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "num_skipped": lines.count("\n"),
        "image_size_min": min(sides_min) if sides_min else 0,
        "image_size_max": max(table["side_max"].to_pylist()),
        "shards": urls,
        "shard_counts": counts,
    }
    text = json.dumps(meta, indent=2) + "\n"
    write_atomic(out / "dataset.json", lambda p: p.write_text(text, "utf-8"))
    logger.info("indexed %d samples in %d shards into %s (%d skipped, listed in skipped.txt)",
                n, len(urls), out, meta["num_skipped"])  # fmt: skip
    return meta


def names_shards(location: str) -> bool:
    """Whether a ``--data`` value names shards themselves (tar URLs, brace patterns, several
    whitespace-separated items, or a local directory of ``.tar`` files without an index)
    rather than a dataset with ``index.parquet``."""
    items = location.split()
    if len(items) != 1:
        return True
    item = items[0]
    if item.endswith(".tar") or _RANGE.search(item) or _LIST.search(item):
        return True
    path = Path(item)
    return (
        not is_url(item)
        and path.is_dir()
        and not (path / "index.parquet").exists()
        and any(path.glob("*.tar"))
    )


def ensure_index(location: str, label: str = "cls", cache_dir: str | None = None) -> Path:
    """The index of the shards ``location`` names (see :func:`names_shards`), made on first
    use in ``cache_dir`` (default ``$NPID_CACHE_DIR`` or ``~/.cache/npid``, ``index-<hash>``);
    an interrupted first pass resumes."""
    urls = shard_urls(location.split())
    root = Path(cache_dir or os.environ.get("NPID_CACHE_DIR") or Path.home() / ".cache" / "npid")
    digest = hashlib.sha1("\n".join([label, *urls]).encode()).hexdigest()[:16]
    out = root / f"index-{digest}"
    try:
        meta = json.loads((out / "dataset.json").read_text("utf-8"))
        if meta.get("format") == INDEX_FORMAT and meta.get("shards") == urls:
            return out
    except (OSError, ValueError):
        pass
    logger.info("indexing %d shard(s) into %s (one pass; the images are not copied)",
                len(urls), out)  # fmt: skip
    index_shards(urls, out, label)
    return out


def main(argv: list[str]) -> int:
    """``make_shards index`` CLI; returns the exit code (2 on bad input)."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m trainer.make_shards index",
        description="Index existing webdataset shards (writes index.parquet and dataset.json "
        "only; the images stay where they are).",
    )
    p.add_argument("urls", nargs="+", help="shard URLs, brace patterns or directories")
    p.add_argument("out", help="output directory for the index")
    p.add_argument("--label", default="cls", help="cls, json:FIELD or none (default cls)")
    p.add_argument("--threads", type=int, default=8, help="shards read at once (default 8)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="make_shards: %(message)s", stream=sys.stderr)
    try:
        index_shards(args.urls, args.out, args.label, threads=args.threads)
    except (ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"make_shards index: error: {exc}\n")
        return 2
    return 0
