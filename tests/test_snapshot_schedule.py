"""The automatic snapshot schedule of shard 0, on a fake clock."""

from __future__ import annotations

import logging

from featurestore.shard_protocol import SNAPSHOT_STALE_S
from featurestore.snapshot_schedule import SnapshotSchedule


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_every_steps_counts_from_the_last_attempt_and_waits_for_the_running_one():
    sched = SnapshotSchedule(every_steps=3, every_seconds=0, clock=Clock())
    assert [sched.due(s) for s in (1, 2)] == [False, False]
    assert sched.due(3)
    assert not sched.due(4) and not sched.due(9)  # one at a time
    sched.finished(ok=False, step=3)  # a failure: counted, retried one interval later
    assert sched.failures == 1 and sched.last_committed == 0 and sched.last_attempt == 3
    assert [sched.due(s) for s in (4, 5, 6)] == [False, False, True]
    sched.finished(ok=True, step=6)
    assert sched.last_committed == 6 and sched.failures == 1


def test_every_seconds_starts_the_clock_at_the_first_step():
    clock = Clock()
    sched = SnapshotSchedule(every_steps=0, every_seconds=60, clock=clock)
    clock.now += 500  # idle before the first step: does not count
    assert not sched.due(1)
    clock.now += 59
    assert not sched.due(2)
    clock.now += 1
    assert sched.due(3)
    sched.finished(ok=True, step=3)
    clock.now += 30
    assert not sched.due(4)


def test_an_abandoned_snapshot_is_presumed_dead_with_one_line(caplog):
    clock = Clock()
    sched = SnapshotSchedule(every_steps=1, every_seconds=0, store_name="bank-x", clock=clock)
    assert sched.due(1)
    clock.now += SNAPSHOT_STALE_S - 1
    assert not sched.due(2)
    clock.now += 1
    with caplog.at_level(logging.WARNING, logger="featurestore.snapshot_schedule"):
        assert sched.due(3)
    assert "'bank-x'" in caplog.text and "never reported back" in caplog.text


def test_disabled_and_reset():
    sched = SnapshotSchedule(every_steps=0, every_seconds=0, step=7)
    assert not sched.enabled and not sched.due(100)
    assert sched.last_committed == sched.last_attempt == 7
    sched = SnapshotSchedule(every_steps=5, every_seconds=0)
    sched.reset(20)
    assert not sched.due(24) and sched.due(25)
