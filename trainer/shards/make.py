"""Convert one split of an image dataset into webdataset shards (README, *Data format*).

    python -m trainer.make_shards SRC OUT [--shard-size N] [--split train|test] [--overwrite]
    python -m trainer.make_shards index URLS... OUT [--label cls|json:FIELD|none]

The second form indexes webdataset shards that exist already (:mod:`trainer.index_shards`).

``SRC`` is an ImageFolder root, a ``cifar-10-batches-py`` directory or the name of the built-in
dataset (``digits``); see :mod:`trainer.data.sources`. Output in ``OUT``:

- ``shard-000000.tar`` ...: one webdataset sample per image, key = the dense instance id
  zero-padded to (at least) 9 digits, fields ``<ext>`` = the original image bytes (never
  re-encoded; png for CIFAR batches and the built-in dataset) and ``cls`` = the label as ASCII
  (``-1`` when unknown). Samples inside a shard are in id order.
- ``index.parquet``: one row per instance in id order: ``id`` int64, ``label`` int32, ``key``
  string, ``shard`` string (the shard's file name), ``offset`` int64 (byte offset of the
  sample's first tar header in its shard), ``source`` string (path relative to
  ``SRC`` or ``batch:row``).
- ``skipped.txt``: one ``source<TAB>reason`` line per file that was not taken: images that did
  not decode, then (ImageFolder) hidden files and directories and non-image file names.
- ``dataset.json``: ``num_instances``, ``classes``, ``source``, ``created`` plus ``split``,
  ``source_type`` (``imagefolder``/``cifar10``/``digits``), ``num_classes``, ``num_skipped``,
  ``key_width``, ``image_size_min``/``image_size_max`` (smallest/largest image side),
  ``shards`` and ``shard_counts``. Written last: its presence marks a complete conversion.

Ids are dense over the images that decode, in a random order drawn from ``--seed`` (a
permutation of the sorted paths, so stable for a given seed; ``--order sorted`` keeps sorted
paths, where class folders become runs of ids). Shard layout: instance ``i`` goes to shard
``i % num_shards``; ``num_shards = ceil(#files / shard_size)``. In random order every shard
and every run of consecutive samples mixes classes; the streaming reader mixes shards written
in sorted order too (:mod:`trainer.data.stream`), at the cost of more open pieces.

Every image is fully decoded with PIL (in threads) before it is written; one that fails is
skipped and listed. Everything is written under temporary names in ``OUT`` and renamed once
complete; with ``--overwrite`` the previous run's shards that were not rewritten are removed
after the new output is in place. Bad input (missing/empty/unknown source, an ``OUT`` that
already holds shards) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurestore.argtypes import OneLineParser
from featurestore.files import make_temp_dir
from trainer.data.sources import (
    BUILTIN_DATASETS,
    BUILTIN_PREFIX,
    SPLITS,
    Source,
    SourceError,
    open_source,
)
from trainer.launch.progress import terminal_bar
from trainer.shards.tar_writer import (
    FORMAT_VERSION,
    INDEX_SCHEMA,
    MIN_KEY_WIDTH,
    ORDERS,
    PARTIAL_SUFFIX,
    SHARD_GLOB,
    SHARD_NAME,
    ShardFileWriter,
    ensure_open_files,
    existing_output,
    load_verified,
    ordered_map,
    write_outputs,
)
from trainer.shards.tar_writer import verify_image as verify_image  # public here before the split

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 5000
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "npid" / "data"
_SALT_ORDER = 0x5EED04


class OutputExistsError(ValueError):
    """``OUT`` already holds a converted dataset and ``overwrite`` is off."""


@dataclass(frozen=True)
class ShardSummary:
    """What :func:`make_shards` wrote.

    Attributes:
        out: the output directory.
        num_instances: images written (ids ``[0, num_instances)``).
        num_skipped: files that did not decode (listed in ``skipped.txt``).
        shards: shard file names, in order.
        shard_counts: samples per shard.
        classes: class names (labels index this).
    """

    out: Path
    num_instances: int
    num_skipped: int
    shards: tuple[str, ...]
    shard_counts: tuple[int, ...]
    classes: tuple[str, ...]


# --------------------------------------------------------------------------- conversion


def make_shards(
    src: str | os.PathLike | Source,
    out: str | os.PathLike,
    shard_size: int = DEFAULT_SHARD_SIZE,
    split: str = "train",
    overwrite: bool = False,
    *,
    num_threads: int | None = None,
    progress: bool | None = None,
    order: str = "random",
    seed: int = 0,
) -> ShardSummary:
    """Convert one split of ``src`` into webdataset shards in ``out`` (see module docstring).

    Args:
        src: ImageFolder root, ``cifar-10-batches-py`` directory or built-in name (``digits``),
            or an opened :class:`Source` (e.g. :func:`trainer.data.subset.subset_source`).
        out: output directory (created if missing).
        shard_size: at most this many samples per shard (``>= 1``).
        split: ``"train"`` or ``"test"`` (CIFAR batches and built-ins).
        overwrite: replace a previous conversion in ``out``.
        num_threads: decode-verification threads; default ``min(8, cpu count)``.
        progress: show a tqdm bar on stderr; ``None`` shows it when stderr is a terminal.
        order: ``"random"``: ids follow a permutation of the sorted paths drawn from
            ``seed``, so every shard and every run of consecutive ids mixes classes;
            ``"sorted"``: ids in sorted-path order (class folders become runs of ids).
        seed: the permutation's seed (``order="random"``).

    Returns:
        A :class:`ShardSummary`.

    Raises:
        SourceError: missing, empty or unknown source, or no image decodes.
        OutputExistsError: ``out`` holds shards/index/dataset.json and ``overwrite`` is off.
        ValueError: bad ``shard_size``/``split``, or ``out`` is not a directory.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; expected one of {ORDERS}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory")
    source = src if isinstance(src, Source) else open_source(src, split, exclude=[out])
    previous = existing_output(out)
    if previous and not overwrite:
        raise OutputExistsError(
            f"output {out} already holds shards ({previous[0].name}, ...); "
            f"pass --overwrite to replace them"
        )
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f".*{PARTIAL_SUFFIX}"):  # left by a killed run
        stale.unlink(missing_ok=True)

    records = source.records
    if order == "random":
        perm = np.random.default_rng(np.random.SeedSequence([seed, _SALT_ORDER]))
        records = [records[i] for i in perm.permutation(len(records))]
    num_shards = math.ceil(len(records) / shard_size)
    key_width = max(MIN_KEY_WIDTH, len(str(len(records) - 1)))
    threads = num_threads or min(8, os.cpu_count() or 1)
    ensure_open_files(num_shards)

    names = [SHARD_NAME.format(s) for s in range(num_shards)]
    writers: list[ShardFileWriter] = []
    rows: dict[str, list] = {name: [] for name in INDEX_SCHEMA.names}
    skipped: list[tuple[str, str]] = list(source.ignored)  # files the scan did not take
    sides = (sys.maxsize, 0)  # smallest and largest image side seen
    try:
        writers = [ShardFileWriter(out / f".{name}{PARTIAL_SUFFIX}") for name in names]
        bar = terminal_bar(total=len(records), desc="make_shards", unit="img", enabled=progress)
        with bar:
            verified = ordered_map(load_verified(source), records, threads)
            for record, (data, info) in zip(records, verified, strict=True):
                bar.update(1)
                if data is None:
                    skipped.append((record.source, info))
                    continue
                sides = (min(sides[0], *info), max(sides[1], *info))
                iid = len(rows["id"])
                key = f"{iid:0{key_width}d}"
                shard = iid % num_shards
                offset = writers[shard].write(key, record.ext, data, record.label)
                for col, value in zip(
                    INDEX_SCHEMA.names,
                    (iid, record.label, key, names[shard], offset, record.source),
                    strict=True,
                ):
                    rows[col].append(value)
        for w in writers:
            w.close()
        num_instances = len(rows["id"])
        if num_instances == 0:
            raise SourceError(
                f"source is empty: none of the {len(records)} images in {source.location} "
                f"decode (first: {skipped[0][0]}: {skipped[0][1]})"
            )
        # Only the last shards can be empty (when fewer images than shards survive).
        kept = [i for i, w in enumerate(writers) if w.count > 0]
        for i in kept:
            os.replace(writers[i].path, out / names[i])
        shards = tuple(names[i] for i in kept)
        counts = tuple(writers[i].count for i in kept)
        write_outputs(out, source, rows, skipped, shards, counts, key_width, sides, order, seed)
    finally:
        for w in writers:
            w.close()
            w.path.unlink(missing_ok=True)

    for old in out.glob(SHARD_GLOB):
        if old.name not in shards:
            old.unlink()
    failed = len(skipped) - len(source.ignored)  # images that did not decode
    summary = ShardSummary(out, num_instances, failed, shards, counts, tuple(source.classes))
    logger.info(
        "wrote %d instances (%d classes) in %d shards to %s",
        num_instances,
        len(source.classes),
        len(shards),
        out,
    )
    if failed:
        logger.warning(
            "skipped %d of %d files that do not decode; listed in %s",
            failed,
            len(records),
            out / "skipped.txt",
        )
    if source.ignored:
        logger.warning(
            "did not take %d other files (hidden, or not image file names); listed in %s",
            len(source.ignored),
            out / "skipped.txt",
        )
    unlabelled = sum(1 for label in rows["label"] if label < 0)
    if unlabelled:
        logger.warning(
            "%d images outside any class folder (at the root) have no label (-1); they "
            "train, but cannot be --val-data",
            unlabelled,
        )
    return summary


def ensure_builtin_dataset(
    cache_dir: str | os.PathLike | None = None, split: str = "train", name: str = "digits"
) -> Path:
    """Shards of a built-in dataset, converted into ``cache_dir`` on first use.

    Safe to call from several processes at once: each converts into its own temporary
    directory and the first to rename it into place wins.

    Args:
        cache_dir: where converted datasets live; default ``$NPID_CACHE_DIR`` or
            ``~/.cache/npid/data``.
        split: ``"train"`` or ``"test"``.
        name: the built-in dataset (``"digits"``).

    Returns:
        The dataset directory ``cache_dir/<name>-<split>`` (shards, index.parquet,
        dataset.json), ready for :mod:`trainer.data`.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in dataset {name!r}; expected one of {BUILTIN_DATASETS}")
    root = Path(cache_dir or os.environ.get("NPID_CACHE_DIR") or DEFAULT_CACHE_DIR)
    target = root / f"{name}-{split}"
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(root, f".{name}-{split}-")
    try:
        make_shards(BUILTIN_PREFIX + name, tmp, split=split, overwrite=True, progress=False)
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target, ignore_errors=True)  # a broken earlier attempt
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(path: Path) -> bool:
    try:
        meta = json.loads((path / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return meta.get("format_version") == FORMAT_VERSION


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m trainer.make_shards",
        description="Convert one split of an image dataset into webdataset shards.",
    )
    p.add_argument(
        "src", help="ImageFolder root, cifar-10-batches-py dir, or 'digits' ('builtin:digits')"
    )
    p.add_argument("out", help="output directory")
    p.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        help=f"samples per shard (default {DEFAULT_SHARD_SIZE})",
    )
    p.add_argument("--split", choices=SPLITS, default="train", help="split (default train)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing conversion")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="decode-verification threads (default min(8, cores))",
    )
    p.add_argument(
        "--order",
        choices=ORDERS,
        default="random",
        help="id order: random (seeded permutation, batches mix classes; default) or sorted "
        "(sorted paths: class folders become runs of ids)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --order random (default 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 on bad input)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["index"]:
        from trainer.shards.index import main as index_main

        return index_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.exit(2, f"make_shards: error: --shard-size must be >= 1, got {args.shard_size}\n")
    logging.basicConfig(level=logging.INFO, format="make_shards: %(message)s", stream=sys.stderr)
    try:
        make_shards(
            args.src,
            args.out,
            shard_size=args.shard_size,
            split=args.split,
            overwrite=args.overwrite,
            num_threads=args.threads,
            order=args.order,
            seed=args.seed,
        )
    except ValueError as exc:  # SourceError, OutputExistsError and other bad input
        sys.stderr.write(f"make_shards: error: {exc}\n")
        return 2
    except (PermissionError, NotADirectoryError, FileNotFoundError, IsADirectoryError) as exc:
        sys.stderr.write(f"make_shards: error: cannot write {args.out}: {exc}\n")
        return 2  # an output the user cannot write to is bad input
    except OSError as exc:
        if exc.errno == errno.EROFS:
            sys.stderr.write(f"make_shards: error: cannot write {args.out}: {exc}\n")
            return 2
        sys.stderr.write(f"make_shards: error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
