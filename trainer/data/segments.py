"""Reading the samples of segments from shards, skipping (and counting) corrupt ones.

Shards must hold their samples in id order (make_shards writes them so). A key that is not in
the index and samples absent from a truncated or damaged shard are skipped, logged (the first
few per worker) and counted by a :class:`_SkipCounter`; a shard that cannot be opened at all
is an error.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator

import numpy as np

from trainer.data.index import ShardIndex
from trainer.data.order import Segment
from trainer.data.shard_files import _ShardCursor, _TarError

logger = logging.getLogger(__name__)

MAX_OPEN_SHARDS = 512
_LOGGED_SKIPS = 5  # per worker and iteration; the rest are only counted


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


def read_image_bytes(index: ShardIndex, ids: Iterable[int]) -> dict[int, bytes]:
    """The stored image file of each of ``ids`` (``{id: bytes}``), as make_shards wrote it.

    Each shard holding a wanted id is read once, with the trainer's tar reader, up to its
    last wanted sample (samples before it are skipped without reading their data).

    Raises:
        ValueError: an id outside ``[0, N)``, or a shard whose sample at an id's position is
            missing, has another key or holds no image (the message names the shard).
    """
    from trainer.data.decode import IMAGE_FIELDS

    wanted = sorted({int(i) for i in ids})
    n = index.num_instances
    bad = [i for i in wanted if not 0 <= i < n]
    if bad:
        raise ValueError(f"ids {bad[:5]} are outside [0, {n}) of {index.location.location}")
    by_shard: dict[int, dict[int, int]] = {}
    for i in wanted:
        by_shard.setdefault(int(index.id_shard[i]), {})[int(index.id_pos[i])] = i
    found: dict[int, bytes] = {}
    for shard, need in sorted(by_shard.items()):
        url = index.shard_url(shard)
        cursor = _ShardCursor(url)
        try:
            for pos in range(max(need) + 1):
                key = cursor.peek_key()
                if key is None:
                    raise ValueError(f"{url} ends before the sample of id {need.get(pos, pos)}")
                fields = cursor.take(read=pos in need)
                if pos not in need:
                    continue
                i = need[pos]
                image = next((fields[e] for e in IMAGE_FIELDS if e in fields), None)
                if not key.isdigit() or int(key) != i or image is None:
                    raise ValueError(f"{url}: sample {pos} ({key!r}) is not the image of id {i}")
                found[i] = image
        except _TarError as exc:
            raise ValueError(f"{url} is damaged: {exc}") from None
        finally:
            cursor.close()
    return found
