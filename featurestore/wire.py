"""A step's features and reply in pieces small enough for Ray to send inside the call.

Ray puts every argument or return value of 100 KiB or more (its default
``max_direct_call_object_size``) in the object store: a put, a pin and a fetch per
object, which made a 128 KiB-in, 256 KiB-out step call cost 3.6 ms instead of 2.0 ms on
2 cores (``benchmarks/bench_wire.py`` measures both side by side). Any number of values
below the limit travel inline in the task's RPC, so the client sends the ``B×d`` features as
row blocks of at most :data:`PIECE_BYTES` each, and a shard returns its pickled reply as
``n`` byte strings (``num_returns=n``, ``n`` fixed by the client from ``B`` and ``d``).
This needs no cluster setting; beyond :data:`MAX_INLINE_BYTES` the client shares one
object-store copy instead.

Plain numpy and pickle; no Ray import.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np

#: Largest piece sent inline (Ray's own limit is 100 KiB; the rest is pickle framing).
PIECE_BYTES = 90 * 1024
#: Step features above this go through one shared object-store copy, not inline pieces.
MAX_INLINE_BYTES = 1024 * 1024
#: Bytes of a step reply besides its ``B×d`` blocks: stamp, control, framing.
_REPLY_OVERHEAD = 16 * 1024


def split_rows(array: np.ndarray, piece_bytes: int | None = None) -> list[np.ndarray]:
    """``array`` ``[n, ...]`` as consecutive row blocks of at most ``piece_bytes`` each
    (default :data:`PIECE_BYTES`).

    Views, no copy. An empty array gives one empty block; a single row larger than
    ``piece_bytes`` is its own block.
    """
    piece_bytes = PIECE_BYTES if piece_bytes is None else piece_bytes
    row_bytes = max(1, array[:1].nbytes)
    rows = max(1, piece_bytes // row_bytes)
    if len(array) <= rows:
        return [array]
    return [array[i : i + rows] for i in range(0, len(array), rows)]


def join_rows(pieces: Sequence[np.ndarray]) -> np.ndarray:
    """Inverse of :func:`split_rows`: the rows of ``pieces`` in order, ``[n, ...]``."""
    if len(pieces) == 1:
        return pieces[0]
    return np.concatenate(pieces)


def reply_pieces(batch: int, dim: int) -> int:
    """How many pieces a shard's step reply for ``batch`` rows of ``dim`` needs.

    A reply holds at most two ``[B, d]`` float32 blocks (``weighted`` or ``noise_grad``,
    and the positives' rows), a few ``[B]`` vectors and small fixed parts.
    """
    bound = 2 * batch * dim * 4 + 6 * batch * 8 + _REPLY_OVERHEAD
    return max(1, math.ceil(bound / PIECE_BYTES))


def to_pieces(obj: Any, n: int) -> list[bytes]:
    """``obj`` pickled and cut into ``n`` byte strings of about equal length."""
    data = memoryview(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    size = math.ceil(len(data) / n) if len(data) else 0
    return [bytes(data[i * size : (i + 1) * size]) for i in range(n)]


def from_pieces(pieces: Sequence[bytes]) -> Any:
    """Inverse of :func:`to_pieces`."""
    return pickle.loads(b"".join(pieces))
