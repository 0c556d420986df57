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
