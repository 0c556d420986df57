"""The step wire format: row blocks and reply pieces below Ray's inline limit."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import unit

from featurestore import NCE, Softmax, wire
from featurestore.bank_shard import BankShard, initial_rows
from featurestore.noise import LocalNoise
from featurestore.shard_protocol import ShardStamp, StepControl, pack_stats


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 3000), dim=st.integers(1, 300), piece=st.integers(1, 200_000))
def test_split_rows_then_join_gives_the_array_back(rows, dim, piece):
    array = np.arange(rows * dim, dtype=np.float32).reshape(rows, dim)
    pieces = wire.split_rows(array, piece)
    assert all(p.nbytes <= max(piece, dim * 4) for p in pieces)
    assert sum(len(p) for p in pieces) == rows
    np.testing.assert_array_equal(wire.join_rows(pieces), array)


@settings(max_examples=40, deadline=None)
@given(size=st.integers(0, 400_000), n=st.integers(1, 8))
def test_pieces_round_trip(size, n):
    obj = {"blob": bytes(range(256)) * (size // 256), "x": np.arange(size // 64)}
    pieces = wire.to_pieces(obj, n)
    assert len(pieces) == n
    back = wire.from_pieces(pieces)
    assert back["blob"] == obj["blob"]
    np.testing.assert_array_equal(back["x"], obj["x"])


def test_a_step_reply_fits_its_pieces_below_the_inline_limit():
    """The reply bound holds for the biggest replies: one shard owning every positive."""
    n, k = 5000, 64
    stamp = ShardStamp("f" * 32, False, "s3://bucket/" + "x" * 200, 10**9)
    control = StepControl(10**12, 1.5e6, True)
    for b, d in [(1, 1), (12, 16), (256, 128), (1000, 128), (4096, 256)]:
        shard = BankShard(initial_rows(0, 0, n, d), 0, 0.5)
        ids = torch.arange(b) % n
        feats = unit(b, d, 1)
        noise = LocalNoise(torch.randint(0, n, (b, k)), None)
        for objective, noise_ids in [(Softmax(), None), (NCE(num_negatives=k), noise)]:
            stats = shard.statistics(feats, ids, objective, noise_ids, 2.0, n)
            pieces = wire.to_pieces((stamp, (pack_stats(stats), control)), wire.reply_pieces(b, d))
            assert max(len(p) for p in pieces) <= wire.PIECE_BYTES, (b, d, objective)
