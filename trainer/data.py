"""Streaming loader for the webdataset shards written by :mod:`trainer.make_shards`.

A dataset *location* is a local directory or any URL holding ``shard-*.tar``,
``index.parquet`` and ``dataset.json``: ``file://``, ``http(s)://``, ``s3://``, ``gs://`` ...
(read with fsspec, falling back to webdataset's ``gopen`` for curl/gsutil), or a
``pipe:`` command template with ``{}`` where the file name goes
(``pipe:aws s3 cp s3://bucket/ds/{} -``). The metadata files are read first; shard URLs come
from the index's ``shard`` column, so remote stores are never listed.

Batches are ``(images, ids, labels)``: ``images`` float ``[B, 3, H, W]`` (the transform's
output), ``ids`` int64 ``[B]`` (instance ids), ``labels`` int64 ``[B]`` (``-1`` = unknown).
Every image becomes RGB first (:func:`decode_image`, any PIL mode including ``I;16``).

**Training epochs** (:func:`train_loader`). The epoch order is the concatenation of all
shards in a random order, rotated by a random offset, both drawn from ``(seed, epoch)``
(:func:`epoch_order`). Rank ``r`` of ``W`` takes samples ``[r*N//W, (r+1)*N//W)`` of it, so
ranks are balanced by sample counts to within one sample, whatever the shard sizes
(:func:`plan_epoch`; at most one shard per rank boundary is read in part by two ranks). Every
rank yields exactly :func:`steps_per_epoch` ``= ceil(ceil(N / W) / B)`` full batches of ``B``:
a rank short of ``steps * B`` samples tops its last batches up with repeats of a few of its own
samples (fewer than ``B + 1`` per rank), so every instance is visited at least once per epoch
and no rank waits for another in DDP. Inside a rank, batch ``j`` comes from DataLoader worker
``j % num_workers`` (the order DataLoader collects them in); each worker gets a contiguous,
proportional part of the rank's samples, streams it through a shuffle buffer and collates
whole batches itself. Corrupt samples are replaced by further samples, so step counts hold
even then. The order depends only on ``(seed, epoch, rank, world_size, num_workers,
batch_size, shuffle_buffer)``; augmentation draws are seeded the same way inside worker
processes (with ``num_workers=0`` they use the caller's global torch RNG). Call
:meth:`ShardLoader.set_epoch` before each epoch, as with ``DistributedSampler``.

**Evaluation** (:func:`eval_loader`): no shuffling, every instance exactly once across ranks,
in id order: rank ``r`` takes ids ``[r*N//W, (r+1)*N//W)`` (ranks' batch counts may differ
by one), batches are consecutive id ranges, the last one may be short.

**Corrupt samples** (undecodable bytes, a missing image or ``cls`` field, a key that is not in
the index, samples absent from a truncated shard) are skipped, logged (the first few per
worker) and counted: each batch carries its worker's count of samples skipped since the
previous batch, and :class:`ShardLoader` adds them up in the main process as
``loader.skipped`` (since creation) and ``loader.epoch_skipped`` (current iteration).
A shard that cannot be opened at all is an error.

Shards must hold their samples in id order (make_shards writes them so). Speed without
changing a pixel: JPEG bytes are decoded by torchvision's libjpeg-turbo decoder when it gives
the same pixels as PIL (1 or 3 channels), PIL otherwise; a transform ending in ``ToTensor`` (+
``Normalize``) has that tail applied once per batch, bit-identical to per sample; shards are
read with a small tar reader that seeks over samples it does not need.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from urllib.parse import urlparse
from urllib.request import url2pathname

import fsspec
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import Compose, Normalize, ToTensor

try:  # torchvision's libjpeg-turbo decoder (deprecated in 0.29 in favour of torchcodec)
    from torchvision.io import decode_jpeg as _decode_jpeg

    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision.io.image")
except ImportError:  # pragma: no cover - a torchvision without it: PIL decodes everything
    _decode_jpeg = None

logger = logging.getLogger(__name__)

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm")
DEFAULT_SHUFFLE_BUFFER = 2000
MAX_OPEN_SHARDS = 512
_LOGGED_SKIPS = 5  # per worker and iteration; the rest are only counted
_SALT_PLAN, _SALT_BUFFER, _SALT_AUGMENT = 0x5EED01, 0x5EED02, 0x5EED03

Segment = tuple[int, int, int]
"""``(shard, lo, hi)``: positions ``[lo, hi)`` of shard ``shard``'s samples (in id order)."""
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------- locations


def _is_local(location: str) -> bool:
    return len(urlparse(location).scheme) <= 1  # "" or a Windows drive letter


def open_url(url: str) -> BinaryIO:
    """Open a local path, ``file://``, ``pipe:`` or fsspec/webdataset URL for binary reading."""
    if url.startswith("pipe:"):
        return wds.gopen(url, "rb")
    if _is_local(url):
        return open(url, "rb", buffering=1 << 20)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return open(url2pathname(parsed.path), "rb", buffering=1 << 20)
    try:
        return fsspec.open(url, "rb").open()
    except ImportError as exc:  # fsspec lacks the protocol's package (s3fs, gcsfs, ...)
        if parsed.scheme in wds.gopen_schemes:
            return wds.gopen(url, "rb")
        raise ValueError(f"cannot open {url}: {exc}") from None


@dataclass(frozen=True)
class DatasetLocation:
    """Where a sharded dataset lives; :meth:`url` names a file in it.

    Attributes:
        location: a directory, a URL (names are appended after ``/``) or a ``pipe:`` command
            with ``{}`` standing for the file name.
    """

    location: str

    def __post_init__(self) -> None:
        if self.location.startswith("pipe:") and "{}" not in self.location:
            raise ValueError(f"pipe: dataset location needs a '{{}}' placeholder: {self.location}")

    def url(self, name: str) -> str:
        """The URL (or path) of file ``name`` of the dataset."""
        if self.location.startswith("pipe:"):
            return self.location.replace("{}", name)
        if _is_local(self.location):
            return os.path.join(self.location, name)
        return self.location.rstrip("/") + "/" + name

    def read_bytes(self, name: str) -> bytes:
        """The whole content of file ``name``; errors name the file."""
        url = self.url(name)
        try:
            with open_url(url) as f:
                return f.read()
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {url}: {exc}") from None


# --------------------------------------------------------------------------- index


@dataclass(frozen=True, eq=False)
class ShardIndex:
    """A dataset's metadata: which ids each shard holds, labels, classes.

    Attributes:
        location: where the dataset lives.
        shards: shard file names, in the dataset's order.
        shard_ids: per shard, its ids ascending (int64); a sample's *position* indexes this.
        labels: int64 ``[N]``, the label of each id (``-1`` unknown).
        id_shard: int32 ``[N]``, the shard of each id.
        id_pos: int64 ``[N]``, the position of each id inside its shard.
        classes: class names.
        meta: the content of ``dataset.json``.
    """

    location: DatasetLocation
    shards: tuple[str, ...]
    shard_ids: tuple[np.ndarray, ...] = field(repr=False)
    labels: np.ndarray = field(repr=False)
    id_shard: np.ndarray = field(repr=False)
    id_pos: np.ndarray = field(repr=False)
    classes: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_instances(self) -> int:
        """``N``: ids are ``[0, N)``."""
        return len(self.labels)

    @property
    def shard_sizes(self) -> list[int]:
        """Samples per shard."""
        return [len(ids) for ids in self.shard_ids]

    def shard_url(self, shard: int) -> str:
        """URL of shard number ``shard``."""
        return self.location.url(self.shards[shard])

    @classmethod
    def load(cls, location: str | os.PathLike | DatasetLocation) -> ShardIndex:
        """Read ``dataset.json`` and ``index.parquet`` of a dataset (never lists a directory).

        Raises:
            ValueError: a file is missing or unreadable, or the index is inconsistent (ids not
                dense ``[0, N)``, ``N`` not ``num_instances``, a shard not in the shard list).
        """
        if not isinstance(location, DatasetLocation):
            location = DatasetLocation(os.fspath(location))
        where = location.location
        try:
            meta = json.loads(location.read_bytes("dataset.json"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"bad dataset.json in {where}: {exc}") from None
        try:
            table = pq.read_table(io.BytesIO(location.read_bytes("index.parquet")))
        except Exception as exc:  # pyarrow raises its own error types
            raise ValueError(f"bad index.parquet in {where}: {exc}") from None
        missing = {"id", "label", "shard"} - set(table.column_names)
        if missing:
            raise ValueError(f"index.parquet in {where} lacks columns {sorted(missing)}")
        ids = table["id"].to_numpy().astype(np.int64, copy=False)
        n = len(ids)
        if n == 0 or not np.array_equal(np.sort(ids), np.arange(n)):
            raise ValueError(f"index.parquet in {where}: ids are not dense [0, N) (N={n})")
        if meta.get("num_instances", n) != n:
            raise ValueError(
                f"{where}: dataset.json says {meta['num_instances']} instances, index has {n}"
            )
        encoded = pc.dictionary_encode(table["shard"].combine_chunks())
        names_in_index = encoded.dictionary.to_pylist()
        shards = list(meta.get("shards") or sorted(names_in_index))
        unknown = set(names_in_index) - set(shards)
        if unknown:
            raise ValueError(
                f"index.parquet in {where} names shards not in dataset.json: {unknown}"
            )
        position = {name: s for s, name in enumerate(shards)}
        remap = np.array([position[name] for name in names_in_index], dtype=np.int32)
        id_shard = np.empty(n, dtype=np.int32)
        id_shard[ids] = remap[encoded.indices.to_numpy()]
        labels = np.empty(n, dtype=np.int64)
        labels[ids] = table["label"].to_numpy()
        order = np.lexsort((np.arange(n), id_shard))  # ids grouped by shard, ascending
        bounds = np.searchsorted(id_shard[order], np.arange(len(shards) + 1))
        shard_ids = tuple(order[bounds[s] : bounds[s + 1]] for s in range(len(shards)))
        id_pos = np.empty(n, dtype=np.int64)
        for sid in shard_ids:
            id_pos[sid] = np.arange(len(sid))
        return cls(
            location=location,
            shards=tuple(shards),
            shard_ids=shard_ids,
            labels=labels,
            id_shard=id_shard,
            id_pos=id_pos,
            classes=tuple(meta.get("classes", ())),
            meta=meta,
        )


def load_index(location: str | os.PathLike | DatasetLocation | ShardIndex) -> ShardIndex:
    """:meth:`ShardIndex.load`, passing an already loaded index through."""
    return location if isinstance(location, ShardIndex) else ShardIndex.load(location)


# --------------------------------------------------------------------------- epoch plans


def _mix(*values: int) -> int:
    """A 63-bit seed from non-negative ints."""
    return int(np.random.SeedSequence(list(values)).generate_state(2, np.uint64)[0] >> 1)


def take_segments(segments: Sequence[Segment], start: int, stop: int) -> list[Segment]:
    """Samples ``[start, stop)`` of the concatenation of ``segments``, as segments."""
    out: list[Segment] = []
    pos = 0
    for shard, lo, hi in segments:
        a, b = max(start, pos), min(stop, pos + hi - lo)
        if a < b:
            out.append((shard, lo + a - pos, lo + b - pos))
        pos += hi - lo
        if pos >= stop:
            break
    return out


def epoch_order(
    shard_sizes: Sequence[int], seed: int = 0, epoch: int = 0, shuffle: bool = True
) -> list[Segment]:
    """All samples of an epoch as segments: shards in a random order from ``(seed, epoch)``,
    rotated by a random offset so rank boundaries move between epochs; index order when
    ``shuffle`` is false."""
    segments = [(s, 0, n) for s, n in enumerate(shard_sizes) if n > 0]
    total = sum(shard_sizes)
    if not shuffle or total == 0:
        return segments
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    rng = np.random.default_rng(_mix(seed, epoch, _SALT_PLAN))
    segments = [segments[i] for i in rng.permutation(len(segments))]
    offset = int(rng.integers(total))
    return take_segments(segments, offset, total) + take_segments(segments, 0, offset)


def plan_epoch(
    shard_sizes: Sequence[int], world_size: int, seed: int = 0, epoch: int = 0
) -> list[list[Segment]]:
    """Split a training epoch over ranks: rank ``r`` gets samples ``[r*N//W, (r+1)*N//W)`` of
    :func:`epoch_order`, i.e. ``floor(N/W)`` or ``ceil(N/W)`` samples each.

    Returns:
        ``world_size`` lists of segments.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    order = epoch_order(shard_sizes, seed, epoch)
    n = sum(shard_sizes)
    return [
        take_segments(order, r * n // world_size, (r + 1) * n // world_size)
        for r in range(world_size)
    ]


def steps_per_epoch(num_instances: int, world_size: int, batch_size: int) -> int:
    """Training batches every rank yields per epoch: ``ceil(ceil(N / W) / B)``.

    Rounding up (instead of dropping the remainder) visits every instance at least once per
    epoch; ranks short of ``steps * B`` samples repeat a few of their own.
    """
    if num_instances < 1 or world_size < 1 or batch_size < 1:
        raise ValueError(
            f"need num_instances, world_size, batch_size >= 1, got "
            f"{num_instances}, {world_size}, {batch_size}"
        )
    return math.ceil(math.ceil(num_instances / world_size) / batch_size)


def _worker_share(
    rank_segments: list[Segment], steps: int, batch_size: int, num_workers: int, worker: int
) -> tuple[list[Segment], int]:
    """A worker's samples of the rank and how many it must yield.

    Worker ``k`` yields batches ``k, k + K, ...`` of the rank (DataLoader's collection order),
    i.e. ``target = len(range(k, steps, K)) * B`` samples; the rank's ``n <= steps * B`` samples
    are cut into contiguous parts proportional to the targets.
    """
    n = sum(hi - lo for _, lo, hi in rank_segments)
    total = steps * batch_size
    targets = [len(range(k, steps, num_workers)) * batch_size for k in range(num_workers)]
    before = sum(targets[:worker])
    lo, hi = n * before // total, n * (before + targets[worker]) // total
    return take_segments(rank_segments, lo, hi), targets[worker]


# --------------------------------------------------------------------------- tar reading


class _TarError(Exception):
    """A shard is truncated or its tar structure is damaged."""


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


def _tar_number(field_bytes: bytes) -> int:
    if field_bytes[0] & 0x80:  # GNU base-256
        return int.from_bytes(field_bytes[1:], "big")
    digits = field_bytes.strip(b" \0")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise _TarError(f"bad number field {field_bytes!r}") from None


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header, if any."""
    pos = 0
    path = None
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos += length
    return path


class _TarReader:
    """Minimal sequential tar reader (ustar, GNU long names, pax paths) that can skip a
    member's data without reading it (a seek on seekable streams)."""

    def __init__(self, fileobj: BinaryIO):
        self._f = fileobj
        try:
            self._seekable = bool(fileobj.seekable())
        except (AttributeError, OSError):
            self._seekable = False

    def next_member(self) -> tuple[str, int] | None:
        """The next regular file's ``(name, size)``; ``None`` at the end of the archive."""
        long_name: str | None = None
        while True:
            block = self._f.read(_BLOCK)
            if not block or block == _ZERO_BLOCK:
                return None
            if len(block) < _BLOCK:
                raise _TarError("truncated tar header")
            stored = _tar_number(block[148:156])
            if stored != sum(block) - sum(block[148:156]) + 8 * 32:
                raise _TarError("tar header checksum mismatch")
            size = _tar_number(block[124:136])
            kind = block[156:157]
            if kind in (b"0", b"\0", b"7"):
                if long_name is not None:
                    return long_name, size
                name = block[:100].split(b"\0", 1)[0]
                if block[257:262] == b"ustar":
                    prefix = block[345:500].split(b"\0", 1)[0]
                    if prefix:
                        name = prefix + b"/" + name
                return name.decode("utf-8", "surrogateescape"), size
            if kind == b"L":
                long_name = (
                    self.read_data(size).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                )
            elif kind == b"x":
                long_name = _pax_path(self.read_data(size)) or long_name
            else:  # directories, links, global pax headers, ...
                self.skip_data(size)

    def read_data(self, size: int) -> bytes:
        """The current member's data (then skips its padding)."""
        data = self._f.read(size)
        if len(data) < size:
            raise _TarError("truncated tar member")
        self._skip(-size % _BLOCK)
        return data

    def skip_data(self, size: int) -> None:
        """Skip the current member's data and padding."""
        self._skip(size + (-size % _BLOCK))

    def _skip(self, n: int) -> None:
        if n == 0:
            return
        if self._seekable:
            self._f.seek(n, os.SEEK_CUR)
            return
        while n > 0:
            chunk = self._f.read(min(n, 1 << 20))
            if not chunk:
                raise _TarError("truncated tar member")
            n -= len(chunk)


class _ShardCursor:
    """Reads one shard sample by sample; members of a sample are consecutive, named
    ``<key>.<ext>`` (webdataset convention: the key ends at the first dot of the base name)."""

    def __init__(self, url: str):
        self.url = url
        self.next_pos = 0  # no sample before this position is still unread
        try:
            self._file = open_url(url)
        except FileNotFoundError:
            raise FileNotFoundError(f"shard not found: {url}") from None
        self._tar = _TarReader(self._file)
        self._head: tuple[str, str, int] | None = None  # read header, unread data
        self._eof = False

    def peek_key(self) -> str | None:
        """Key of the next sample, without consuming it; ``None`` at the end."""
        if self._head is None and not self._eof:
            member = self._tar.next_member()
            if member is None:
                self._eof = True
            else:
                name, size = member
                slash = name.rfind("/") + 1
                dot = name.find(".", slash)
                dot = len(name) if dot < 0 else dot
                self._head = (name[:dot], name[dot + 1 :].lower(), size)
        return None if self._head is None else self._head[0]

    def take(self, read: bool) -> dict[str, bytes]:
        """Consume the next sample; its fields (extension -> bytes) when ``read``."""
        key = self.peek_key()
        fields: dict[str, bytes] = {}
        while self._head is not None and self._head[0] == key:
            _, ext, size = self._head
            if read:
                fields[ext] = self._tar.read_data(size)
            else:
                self._tar.skip_data(size)
            self._head = None
            self.peek_key()
        return fields

    def close(self) -> None:
        self._file.close()


class _SkipCounter:
    """Counts skipped samples of one worker; logs the first few."""

    def __init__(self, where: str):
        self.where = where
        self.pending = 0
        self.total = 0

    def add(self, n: int, reason: str, url: str) -> None:
        if n <= 0:
            return
        if self.total < _LOGGED_SKIPS:
            logger.warning("%s: skipped %d sample(s) in %s: %s", self.where, n, url, reason)
        self.pending += n
        self.total += n

    def take(self) -> int:
        """Skips since the last call."""
        n, self.pending = self.pending, 0
        return n


class _SegmentReader:
    """Yields ``(id, fields)`` for the samples of segments; keeps shards open between calls
    so that consecutive segments of one shard are read in a single pass."""

    def __init__(self, index: ShardIndex, skips: _SkipCounter):
        self.index = index
        self.skips = skips
        self._open: OrderedDict[int, _ShardCursor] = OrderedDict()

    def read(self, segments: Iterable[Segment]) -> Iterator[tuple[int, dict[str, bytes]]]:
        for shard, lo, hi in segments:
            yield from self._read_segment(shard, lo, hi)

    def close(self) -> None:
        for cursor in self._open.values():
            cursor.close()
        self._open.clear()

    def _cursor(self, shard: int, lo: int) -> _ShardCursor:
        cursor = self._open.pop(shard, None)
        if cursor is not None and cursor.next_pos > lo:
            cursor.close()
            cursor = None
        if cursor is None:
            cursor = _ShardCursor(self.index.shard_url(shard))
            while len(self._open) >= MAX_OPEN_SHARDS:
                self._open.popitem(last=False)[1].close()
        self._open[shard] = cursor
        return cursor

    def _read_segment(self, shard: int, lo: int, hi: int) -> Iterator[tuple[int, dict[str, bytes]]]:
        ids = self.index.shard_ids[shard]
        cursor = self._cursor(shard, lo)
        seen = 0
        try:
            while seen < hi - lo:
                key = cursor.peek_key()
                if key is None:
                    break
                pos = _position(ids, key)
                if pos is not None and pos >= hi:
                    break
                take = pos is not None and pos >= lo
                fields = cursor.take(read=take)
                if pos is None:
                    self.skips.add(1, f"key {key!r} is not in the index", cursor.url)
                elif take:
                    cursor.next_pos = pos + 1
                    seen += 1
                    yield int(ids[pos]), fields
        except (_TarError, OSError) as exc:
            logger.warning("damaged shard %s: %s", cursor.url, exc)
            self._open.pop(shard).close()
        self.skips.add(hi - lo - seen, "sample absent from the shard", cursor.url)


def _position(ids: np.ndarray, key: str) -> int | None:
    """Position of the sample with ``key`` in a shard holding ``ids`` (ascending)."""
    if not (key.isascii() and key.isdigit()):
        return None
    iid = int(key)
    pos = int(np.searchsorted(ids, iid))
    return pos if pos < len(ids) and ids[pos] == iid else None


# --------------------------------------------------------------------------- decoding


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB. 16/32-bit integer modes (``I;16*``, ``I``) keep their top 8 bits
    of ``0..65535`` (plain ``convert`` would clip them); palette transparency goes through
    RGBA; everything else is ``Image.convert("RGB")`` (alpha dropped, CMYK converted)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
        return Image.fromarray(values.astype(np.uint8), "L").convert("RGB")
    if mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def decode_image(data: bytes, fast_jpeg: bool = True) -> Image.Image:
    """Decode image bytes to a PIL RGB image (fully loaded).

    Args:
        data: encoded image (any format PIL reads).
        fast_jpeg: decode 1- and 3-channel JPEGs with torchvision's libjpeg-turbo decoder,
            which gives the same pixels as PIL, faster (when this torchvision has it);
            anything else goes through PIL.

    Raises:
        Exception: whatever PIL raises for bytes that do not decode.
    """
    if fast_jpeg and _decode_jpeg is not None and data[:3] == b"\xff\xd8\xff":
        try:
            chw = _decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except RuntimeError:
            chw = None  # let PIL decide (and raise for truly broken data)
        if chw is not None and chw.shape[0] == 3:
            return Image.fromarray(chw.permute(1, 2, 0).contiguous().numpy(), "RGB")
        if chw is not None and chw.shape[0] == 1:
            return Image.fromarray(chw[0].numpy(), "L").convert("RGB")
    image = Image.open(io.BytesIO(data))
    image.load()
    return to_rgb(image)


class _BadSampleError(Exception):
    """A sample lacks a field or its bytes do not decode."""


def _image_and_label(fields: dict[str, bytes]) -> tuple[bytes, int]:
    image = next((fields[ext] for ext in IMAGE_FIELDS if ext in fields), None)
    if image is None:
        raise _BadSampleError(f"no image field (fields: {sorted(fields)})")
    cls = fields.get("cls")
    if cls is None:
        raise _BadSampleError("no cls field")
    try:
        return image, int(cls)
    except ValueError:
        raise _BadSampleError(f"bad cls field {cls[:20]!r}") from None


# --------------------------------------------------------------------------- collation


class _TensorTail:
    """A transform's trailing ``ToTensor`` (+ ``Normalize``), applied to a whole batch.

    ``ToTensor`` and ``Normalize`` are elementwise (``x / 255``, ``(x - mean) / std`` in
    float32), so running them once on the stacked uint8 batch gives bit-identical results
    with far less per-sample overhead.
    """

    def __init__(self, ops: Compose, mean: Sequence[float] | None, std: Sequence[float] | None):
        self.ops = ops  # the original per-sample ops, for images that are not 8-bit RGB/L
        dtype = torch.get_default_dtype()
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=dtype).view(1, -1, 1, 1)
        self.std = None if std is None else torch.as_tensor(std, dtype=dtype).view(1, -1, 1, 1)

    @staticmethod
    def split(transform: Callable) -> tuple[Callable, _TensorTail | None]:
        """``(PIL part, tail)`` of a ``Compose`` ending in ``ToTensor[, Normalize]``, else
        ``(transform, None)``."""
        if not isinstance(transform, Compose):
            return transform, None
        ops = list(transform.transforms)
        mean = std = None
        if ops and isinstance(ops[-1], Normalize):
            mean, std = ops[-1].mean, ops[-1].std
            ops.pop()
            if isinstance(mean, torch.Tensor) or isinstance(std, torch.Tensor):
                return transform, None
            if any(v == 0 for v in np.atleast_1d(std)):
                return transform, None
        if not ops or type(ops[-1]) is not ToTensor:
            return transform, None
        tail = transform.transforms[len(ops) - 1 :]
        return Compose(ops[:-1]), _TensorTail(Compose(tail), mean, std)

    def __call__(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """uint8 ``[H, W, C]`` arrays -> float ``[B, C, H, W]``."""
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        x = x.to(torch.get_default_dtype()).div_(255)
        if self.mean is not None:
            x = x.sub_(self.mean).div_(self.std)
        return x


def _uint8_hwc(image: Any) -> np.ndarray | None:
    """The uint8 ``[H, W, C]`` pixels of an 8-bit RGB/L PIL image, else ``None``."""
    if not isinstance(image, Image.Image) or image.mode not in ("RGB", "L"):
        return None
    pixels = np.asarray(image)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


# --------------------------------------------------------------------------- the stream


def _shuffled(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle with a buffer of ``size`` items (a full shuffle when all items fit)."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


class ShardStream(IterableDataset):
    """The per-worker part of a loader: yields collated batches
    ``(images [b, 3, H, W], ids [b], labels [b], skipped: int)``; see the module docstring.
    Used through :class:`ShardLoader`; ``b`` is 0 only for an eval batch whose every sample
    was corrupt."""

    def __init__(
        self,
        index: ShardIndex,
        *,
        batch_size: int,
        transform: Callable[[Image.Image], torch.Tensor] | None,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        fast_jpeg: bool = True,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.index = index
        self.batch_size = batch_size
        self.transform = transform if transform is not None else ToTensor()
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.fast_jpeg = fast_jpeg
        self.epoch = 0
        self._pil_transform, self._tail = _TensorTail.split(self.transform)

    def rank_instances(self) -> int:
        """Instances this rank covers per epoch (before top-up)."""
        n, w, r = self.index.num_instances, self.world_size, self.rank
        return (r + 1) * n // w - r * n // w

    def num_batches(self) -> int:
        """Batches this rank yields per epoch."""
        if self.train:
            return steps_per_epoch(self.index.num_instances, self.world_size, self.batch_size)
        return math.ceil(self.rank_instances() / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:  # own process: seeding its global RNG touches nobody else
            torch.manual_seed(_mix(self.seed, self.epoch, self.rank, worker, _SALT_AUGMENT))
        where = f"rank {self.rank} worker {worker}"
        skips = _SkipCounter(where)
        reader = _SegmentReader(self.index, skips)
        try:
            if self.train:
                yield from self._train_batches(reader, skips, worker, num_workers)
            else:
                yield from self._eval_batches(reader, skips, worker, num_workers)
        finally:
            reader.close()
        if skips.total > _LOGGED_SKIPS:
            logger.warning("%s: skipped %d samples in total this epoch", where, skips.total)

    def _prepare(
        self, iid: int, fields: dict[str, bytes], skips: _SkipCounter
    ) -> tuple[torch.Tensor | np.ndarray, int, int] | None:
        """``(image, id, label)``, or ``None`` (counted) for a corrupt sample. ``image`` is the
        transform's tensor, or uint8 pixels awaiting the batched ``ToTensor``/``Normalize``."""
        try:
            data, label = _image_and_label(fields)
            try:
                image = decode_image(data, self.fast_jpeg)
            except Exception as exc:  # PIL raises many types for bad bytes
                raise _BadSampleError(f"{type(exc).__name__}: {exc}") from None
        except _BadSampleError as exc:
            skips.add(1, f"id {iid}: {exc}", self.index.location.location)
            return None
        if self._tail is None:
            return self.transform(image), iid, label
        image = self._pil_transform(image)
        pixels = _uint8_hwc(image)
        if pixels is None:  # not 8-bit RGB/L after the PIL part: the tail per sample
            return self._tail.ops(image), iid, label
        return pixels, iid, label

    def _collate(
        self, items: list[tuple[torch.Tensor | np.ndarray, int, int]], skipped: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        ids = torch.tensor([i for _, i, _ in items], dtype=torch.int64)
        labels = torch.tensor([y for _, _, y in items], dtype=torch.int64)
        if not items:
            return torch.empty(0), ids, labels, skipped
        images = [x for x, _, _ in items]
        try:
            if self._tail is not None and all(isinstance(x, np.ndarray) for x in images):
                return self._tail(images), ids, labels, skipped
            if self._tail is not None:  # some samples went through the per-sample tail
                images = [x if isinstance(x, torch.Tensor) else self._tail([x])[0] for x in images]
            images = torch.stack(images)
        except (RuntimeError, ValueError):
            shapes = sorted({tuple(x.shape) for x, _, _ in items})
            raise ValueError(
                f"images of one batch differ in shape {shapes}; use a transform with a fixed "
                f"output size"
            ) from None
        return images, ids, labels, skipped

    def _train_batches(
        self, reader: _SegmentReader, skips: _SkipCounter, worker: int, num_workers: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        sizes = self.index.shard_sizes
        rank_segments = plan_epoch(sizes, self.world_size, self.seed, self.epoch)[self.rank]
        steps = self.num_batches()
        segments, target = _worker_share(rank_segments, steps, self.batch_size, num_workers, worker)
        if target == 0:
            return
        rng = random.Random(_mix(self.seed, self.epoch, self.rank, worker, _SALT_BUFFER))
        batch: list[tuple[torch.Tensor, int, int]] = []
        kept: list[tuple[int, dict[str, bytes]]] = []  # the first good samples, for top-up
        emitted = 0
        for iid, fields in _shuffled(reader.read(segments), self.shuffle_buffer, rng):
            item = self._prepare(iid, fields, skips)
            if item is None:
                continue
            if len(kept) < self.batch_size:
                kept.append((iid, fields))
            batch.append(item)
            emitted += 1
            if len(batch) == self.batch_size:
                yield self._collate(batch, skips.take())
                batch = []
        if emitted < target and not kept:
            kept = self._fallback_samples(rank_segments)
        for i in range(target - emitted):  # top-up: repeats of this worker's first samples
            item = self._prepare(*kept[i % len(kept)], skips)
            assert item is not None  # decoded before
            batch.append(item)
            if len(batch) == self.batch_size:
                yield self._collate(batch, skips.take())
                batch = []

    def _fallback_samples(self, rank_segments: list[Segment]) -> list[tuple[int, dict]]:
        """Good samples for a worker that has none of its own (tiny datasets)."""
        everything = epoch_order(self.index.shard_sizes, shuffle=False)
        quiet = _SkipCounter("fallback")
        for segments in (rank_segments, everything):
            reader = _SegmentReader(self.index, quiet)
            found = []
            try:
                for iid, fields in reader.read(segments):
                    if self._prepare(iid, fields, quiet) is not None:
                        found.append((iid, fields))
                        if len(found) == self.batch_size:
                            break
            finally:
                reader.close()
            if found:
                return found
        raise RuntimeError(f"no sample of {self.index.location.location} decodes")

    def _eval_batches(
        self, reader: _SegmentReader, skips: _SkipCounter, worker: int, num_workers: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        n, w, r = self.index.num_instances, self.world_size, self.rank
        first, last = r * n // w, (r + 1) * n // w
        for j in range(worker, self.num_batches(), num_workers):
            lo = first + j * self.batch_size
            hi = min(lo + self.batch_size, last)
            items = [
                item
                for iid, fields in reader.read(_id_segments(self.index, lo, hi))
                if (item := self._prepare(iid, fields, skips)) is not None
            ]
            yield self._collate(items, skips.take())


def _id_segments(index: ShardIndex, lo: int, hi: int) -> list[Segment]:
    """Ids ``[lo, hi)`` in id order as segments (runs of consecutive positions of a shard)."""
    shard = index.id_shard[lo:hi]
    pos = index.id_pos[lo:hi]
    if len(shard) == 0:
        return []
    breaks = np.flatnonzero((np.diff(shard) != 0) | (np.diff(pos) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(shard)]))
    return [
        (int(shard[a]), int(pos[a]), int(pos[b - 1]) + 1) for a, b in zip(starts, ends, strict=True)
    ]


# --------------------------------------------------------------------------- loaders


class ShardLoader:
    """Iterate to get batches ``(images [B, 3, H, W] float, ids [B] int64, labels [B] int64)``.

    Attributes:
        stream: the :class:`ShardStream` (index, rank, world_size, batch_size, epoch).
        skipped: corrupt samples skipped since this loader was made (all workers).
        epoch_skipped: corrupt samples skipped during the current/last iteration.
    """

    def __init__(
        self,
        stream: ShardStream,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        multiprocessing_context: str | None = None,
    ):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        self.multiprocessing_context = multiprocessing_context if num_workers > 0 else None
        self.skipped = 0
        self.epoch_skipped = 0

    @property
    def index(self) -> ShardIndex:
        return self.stream.index

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan/shuffle the next iteration follows."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.stream.epoch = epoch

    def __len__(self) -> int:
        """Batches per epoch on this rank (:func:`steps_per_epoch` for training)."""
        return self.stream.num_batches()

    def __iter__(self) -> Iterator[Batch]:
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            multiprocessing_context=self.multiprocessing_context,
        )
        self.epoch_skipped = 0
        for images, ids, labels, skipped in loader:
            self.skipped += int(skipped)
            self.epoch_skipped += int(skipped)
            if len(ids):
                yield images, ids, labels


def train_loader(
    dataset: str | os.PathLike | ShardIndex,
    batch_size: int,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    fast_jpeg: bool = True,
) -> ShardLoader:
    """Shuffled training batches; every rank yields exactly :func:`steps_per_epoch` full
    batches of ``batch_size`` per epoch (see the module docstring).

    Args:
        dataset: dataset location (directory, URL, ``pipe:`` template) or a loaded index.
        batch_size: ``B`` per rank.
        transform: PIL RGB image -> float tensor ``[3, H, W]`` (e.g.
            :func:`trainer.transforms.build_transform`); default ``ToTensor()``.
        rank, world_size: this process's rank and the number of ranks (explicit; no
            ``torch.distributed`` needed).
        num_workers: DataLoader worker processes (0 = in this process).
        seed: shuffling seed; with the epoch it fixes the order.
        shuffle_buffer: samples held (as bytes) by each worker's shuffle buffer.
        pin_memory, prefetch_factor: passed to ``DataLoader``.
        fast_jpeg: see :func:`decode_image`.
    """
    stream = ShardStream(
        load_index(dataset),
        batch_size=batch_size,
        transform=transform,
        train=True,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        fast_jpeg=fast_jpeg,
    )
    return ShardLoader(stream, num_workers, pin_memory, prefetch_factor)


def eval_loader(
    dataset: str | os.PathLike | ShardIndex,
    batch_size: int,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    fast_jpeg: bool = True,
) -> ShardLoader:
    """Every instance exactly once across ranks, in id order, no shuffling; rank ``r`` gets
    ids ``[r*N//W, (r+1)*N//W)`` in batches of ``batch_size`` (the last may be short).
    Arguments as in :func:`train_loader`; use the test transform."""
    stream = ShardStream(
        load_index(dataset),
        batch_size=batch_size,
        transform=transform,
        train=False,
        rank=rank,
        world_size=world_size,
        fast_jpeg=fast_jpeg,
    )
    return ShardLoader(stream, num_workers, pin_memory, prefetch_factor)
