"""The row calls of a store client: read, write, move and export rows by id.

:class:`RowCalls` is a base of :class:`~featurestore.store.ShardedStore`: each call splits
the ids by owning shard (contiguous ranges, ``numpy.array_split`` bounds) and sends every
shard its part at once through the client's :class:`~featurestore.store_transport.ShardGroup`.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from featurestore import arrow_io
from featurestore.noise import sample_ids
from featurestore.validation import check_count, check_ids, check_rows

if TYPE_CHECKING:
    from featurestore.metrics import StoreMetrics
    from featurestore.store_transport import ShardGroup


class RowCalls:
    """``get``, ``set``, ``update``, ``sample`` and ``export`` over the shard group."""

    _group: ShardGroup
    _metrics: StoreMetrics
    _inner_bounds: Tensor
    num_rows: int
    dim: int
    num_shards: int
    bounds: list[int]
    seed: int
    _client_id: str
    _requests: Iterator[int]
    # and from the store: _check_open(), _request_id(), step_count

    def _split(self, ids: Tensor) -> dict[int, Tensor]:
        """Positions of ``ids`` ``[n]`` grouped by owning shard (shards with none omitted)."""
        owner = torch.bucketize(ids, self._inner_bounds, right=True)
        return {
            s: pos
            for s in range(self.num_shards)
            if (pos := torch.nonzero(owner == s).squeeze(1)).numel()
        }

    def _timed(self, op: str, start: float) -> None:
        self._metrics.observe_request(op, time.perf_counter() - start)

    def get(self, ids: Tensor) -> Tensor:
        """Rows of ``ids`` ``[n]`` as float32 ``[n, d]`` (CPU)."""
        self._check_open()
        start = time.perf_counter()
        ids = check_ids(ids, self.num_rows)
        out = torch.empty(ids.numel(), self.dim)
        groups = self._split(ids)
        rows = self._group.call("get", {s: (ids[pos],) for s, pos in groups.items()})
        for s, pos in groups.items():
            out[pos] = rows[s]
        self._timed("get", start)
        return out

    def set(self, ids: Tensor, rows: Tensor) -> None:
        """Overwrite the rows of ``ids`` ``[n]`` with ``rows`` ``[n, d]`` (last one wins)."""
        self._check_open()
        start = time.perf_counter()
        ids = check_ids(ids, self.num_rows)
        rows = check_rows(rows, self.dim, "rows", ids.numel()).cpu()
        groups = self._split(ids)
        self._group.call("set", {s: (ids[pos], rows[pos]) for s, pos in groups.items()})
        self._timed("set", start)

    def update(self, ids: Tensor, feats: Tensor) -> None:
        """Momentum update of the rows of ``ids`` ``[n]`` towards ``feats`` ``[n, d]``."""
        self._check_open()
        start = time.perf_counter()
        ids = check_ids(ids, self.num_rows)
        feats = check_rows(feats, self.dim, "feats", ids.numel()).cpu()
        request = self._request_id()
        groups = self._split(ids)
        self._group.call(
            "update", {s: (request, ids[pos], feats[pos]) for s, pos in groups.items()}
        )
        self._timed("update", start)

    def sample(self, n: int, seed: int | None = None) -> tuple[Tensor, Tensor]:
        """``n`` uniform noise rows: ``(ids [n] int64, rows [n, d] float32)``.

        ``seed=None`` draws fresh ids (mixed from the store seed, the step counter and this
        client, so concurrent clients draw different ids).
        """
        self._check_open()
        check_count(n)
        if seed is None:
            mix = [self.seed, self.step_count, int(self._client_id[:15], 16), next(self._requests)]
            seed = int(np.random.SeedSequence(mix).generate_state(1, dtype=np.uint64)[0] >> 1)
        ids = sample_ids(n, self.num_rows, int(seed))
        return ids, self.get(ids)

    def export(self, batch_rows: int = arrow_io.EXPORT_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """Stream the bank as Arrow record batches ``(id int64, vector float32[d])``.

        Shard by shard, ``batch_rows`` rows per call, the next batch requested while the
        caller consumes the current one. Not a point-in-time view if others keep stepping.
        """
        self._check_open()
        if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
            raise ValueError(f"batch_rows must be a positive int, got {batch_rows!r}")
        ranges = [
            (s, r0, min(r0 + batch_rows, self.bounds[s + 1]))
            for s in range(self.num_shards)
            for r0 in range(self.bounds[s], self.bounds[s + 1], batch_rows)
        ]
        pending: deque = deque()
        queue = iter(ranges)
        for item in itertools.islice(queue, 2):
            pending.append((item, self._group.submit(item[0], "export_batch", item[1:])))
        while pending:
            (shard, r0, r1), ref = pending.popleft()
            batch = self._group.await_reply(shard, "export_batch", ref, (r0, r1))
            nxt = next(queue, None)
            if nxt is not None:
                pending.append((nxt, self._group.submit(nxt[0], "export_batch", nxt[1:])))
            yield batch


__all__ = ["RowCalls"]
