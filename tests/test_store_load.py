"""The store stepped by several clients at once equals a sequential replay of what they
did (``benchmarks/bench_store_load.py``, small): no update lost, doubled or torn."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_store_load import run_load

pytestmark = pytest.mark.ray


def test_concurrent_clients_leave_the_rows_a_sequential_replay_gives(ray_cluster) -> None:
    result = run_load(num_rows=3000, dim=16, shards=3, clients=4, batch=32, negatives=64,
                      seconds=60, max_steps=15, namespace="npid-tests")  # fmt: skip
    assert result.steps == 4 * 15 and len(result.latencies) == result.steps
    assert result.rows_checked > 1000
    assert result.rows_differing == 0, result.max_difference


def test_a_shard_killed_mid_load_rolls_back_to_its_snapshot_and_nothing_else(ray_cluster):
    """A snapshot, then the last shard killed while 4 clients step: every row of that shard
    is its snapshot value followed by a suffix of its updates (the ones in between lost,
    counted), every other row the sequential replay; nothing doubled or torn."""
    result = run_load(num_rows=3000, dim=16, shards=3, clients=4, batch=32, negatives=64,
                      seconds=60, max_steps=80, namespace="npid-tests",
                      kill_after_s=1.0)  # fmt: skip
    assert result.killed_shard == 2 and result.steps == 4 * 80
    assert result.rows_rolled_back > 0 and result.updates_lost > 0, result  # a real rollback
    assert result.rows_differing == 0, result
    assert result.max_difference <= 1e-6
