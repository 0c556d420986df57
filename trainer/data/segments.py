"""Reading the samples of segments from shards, skipping (and counting) corrupt ones.

Shards must hold their samples in id order (make_shards writes them so; an index of
existing shards numbers their samples in the order they are stored). Samples are matched to
the index by key (the index's ``key`` column). A key that is not in
the index and samples absent from a truncated or damaged shard are skipped, logged (the first
few per worker) and counted by a :class:`_SkipCounter`; a shard that cannot be opened at all
is an error.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence

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
    """Yields ``(id, fields)`` for the samples of segments.

    :meth:`read` walks segments one after another and keeps shards open between calls, so
    that consecutive segments of one shard are read in a single pass. :meth:`read_mixed` is
    the training read: segments cut into pieces, pieces in a random order, several pieces
    read at once with every sample drawn from a random one of them.
    """

    def __init__(self, index: ShardIndex, skips: _SkipCounter):
        self.index = index
        self.skips = skips
        self._open: OrderedDict[int, _ShardCursor] = OrderedDict()
        self._positions: dict[int, dict[str, int]] = {}

    def read(self, segments: Iterable[Segment]) -> Iterator[tuple[int, dict[str, bytes]]]:
        for shard, lo, hi in segments:
            cursor = self._cursor(shard, lo)
            yield from self._read_segment(cursor, shard, lo, hi)

    def read_mixed(
        self,
        segments: Sequence[Segment],
        rng: random.Random,
        piece: int,
        open_pieces: int,
    ) -> Iterator[tuple[int, dict[str, bytes]]]:
        """The samples of ``segments``, mixed: cut into pieces of ``piece`` samples (whole
        segments when shards cannot be entered at an offset: no ``offset`` column or a
        stream that cannot seek), the pieces shuffled with ``rng``, then ``open_pieces`` of
        them read at once, each sample drawn from a random open piece.
        Every sample of ``segments`` comes exactly once (less skipped ones)."""
        pieces = list(segments)
        if piece > 0 and self.index.shard_offsets is not None and self._seekable(pieces):
            pieces = cut_pieces(pieces, piece)
        rng.shuffle(pieces)
        todo = iter(pieces)
        lanes: list[Iterator[tuple[int, dict[str, bytes]]]] = []
        for _ in range(max(1, open_pieces)):
            lane = self._lane(next(todo, None))
            if lane is not None:
                lanes.append(lane)
        while lanes:
            j = rng.randrange(len(lanes))
            item = next(lanes[j], None)
            if item is not None:
                yield item
                continue
            lane = self._lane(next(todo, None))
            if lane is None:
                lanes[j] = lanes[-1]
                lanes.pop()
            else:
                lanes[j] = lane

    def _lane(self, segment: Segment | None) -> Iterator[tuple[int, dict[str, bytes]]] | None:
        if segment is None:
            return None
        shard, lo, hi = segment
        return self._read_segment(self._entered(shard, lo), shard, lo, hi, own=True)

    def _seekable(self, segments: Sequence[Segment]) -> bool:
        if not segments or self.index.shard_url(segments[0][0]).startswith("pipe:"):
            return False
        cursor = self._entered(segments[0][0], 0)
        try:
            return cursor.seekable
        finally:
            cursor.close()

    def _entered(self, shard: int, lo: int) -> _ShardCursor:
        """A new cursor of ``shard`` at position ``lo`` (a seek by the index's offset)."""
        offsets = self.index.shard_offsets
        if offsets is None or lo == 0:
            return _ShardCursor(self.index.shard_url(shard))
        return _ShardCursor(self.index.shard_url(shard), int(offsets[shard][lo]), lo)

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
            cursor = self._entered(shard, lo)
            while len(self._open) >= MAX_OPEN_SHARDS:
                self._open.popitem(last=False)[1].close()
        self._open[shard] = cursor
        return cursor

    def _position(self, shard: int, key: str, guess: int) -> int | None:
        """Position of the sample with ``key`` in ``shard`` (``None``: not in the index).
        ``guess`` (the next expected position) is tried first."""
        keys = self.index.shard_keys
        if keys is None:
            return _id_position(self.index.shard_ids[shard], key)
        own = keys[shard]
        if 0 <= guess < len(own) and own[guess] == key:
            return guess
        table = self._positions.get(shard)
        if table is None:
            table = self._positions[shard] = {k: i for i, k in enumerate(own)}
        return table.get(key)

    def _read_segment(
        self, cursor: _ShardCursor, shard: int, lo: int, hi: int, own: bool = False
    ) -> Iterator[tuple[int, dict[str, bytes]]]:
        """Samples ``[lo, hi)`` of ``shard`` from ``cursor``; closes it after when ``own``."""
        ids = self.index.shard_ids[shard]
        seen = 0
        try:
            while seen < hi - lo:
                key = cursor.peek_key()
                if key is None:
                    break
                pos = self._position(shard, key, max(cursor.next_pos, lo))
                if pos is not None and pos >= hi:
                    break
                take = pos is not None and pos >= max(lo, cursor.next_pos)
                fields = cursor.take(read=take)
                if pos is None:
                    self.skips.add(1, f"key {key!r} is not in the index", cursor.url)
                elif take:
                    cursor.next_pos = pos + 1
                    seen += 1
                    yield int(ids[pos]), fields
        except (_TarError, OSError) as exc:
            logger.warning("damaged shard %s: %s", cursor.url, exc)
            if self._open.get(shard) is cursor:
                self._open.pop(shard)
            cursor.close()
        finally:
            if own:
                cursor.close()
        self.skips.add(hi - lo - seen, "sample absent from the shard", cursor.url)


def cut_pieces(segments: Iterable[Segment], piece: int) -> list[Segment]:
    """``segments`` cut into consecutive pieces of at most ``piece`` samples (in order)."""
    if piece < 1:
        raise ValueError(f"piece must be >= 1, got {piece}")
    return [
        (shard, a, min(a + piece, hi)) for shard, lo, hi in segments for a in range(lo, hi, piece)
    ]


def _id_position(ids: np.ndarray, key: str) -> int | None:
    """Position of the sample with ``key`` in a shard holding ``ids`` (ascending), for keys
    that are the sample's id (make_shards)."""
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
                keys = index.shard_keys
                expected = keys[shard][pos] if keys is not None else f"{i:0{len(key)}d}"
                if key != expected or image is None:
                    raise ValueError(f"{url}: sample {pos} ({key!r}) is not the image of id {i}")
                found[i] = image
        except _TarError as exc:
            raise ValueError(f"{url} is damaged: {exc}") from None
        finally:
            cursor.close()
    return found
