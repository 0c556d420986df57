"""When a store takes its automatic snapshots: every ``every_steps`` steps and/or every
``every_seconds`` seconds, counted from the last attempt (a failed snapshot is retried one
interval later, not at every step), one at a time (one still running after
:data:`~featurestore.shard_protocol.SNAPSHOT_STALE_S` is presumed abandoned). Shard 0 keeps
one :class:`SnapshotSchedule`; plain Python, the caller holds the lock."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from featurestore.shard_protocol import SNAPSHOT_STALE_S

logger = logging.getLogger(__name__)


@dataclass
class SnapshotSchedule:
    """The schedule of one store, starting at ``step`` (the snapshot it loaded, or 0)."""

    every_steps: int
    every_seconds: float
    step: int = 0
    store_name: str = "npid-bank"
    clock: Callable[[], float] = time.monotonic
    #: The step of the last committed snapshot.
    last_committed: int = field(init=False)
    #: The step of the last attempt, committed or not: the step interval counts from it.
    last_attempt: int = field(init=False)
    #: Snapshots that failed to commit.
    failures: int = field(init=False, default=0)
    _last_time: float | None = field(init=False, default=None)  # starts at the first step
    _started: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.last_committed = self.last_attempt = int(self.step)

    @property
    def enabled(self) -> bool:
        """Whether any interval is set."""
        return self.every_steps > 0 or self.every_seconds > 0

    def due(self, next_step: int) -> bool:
        """Whether the snapshot after step ``next_step`` should start now (then it counts as
        running until :meth:`finished`)."""
        if not self.enabled:
            return False
        now = self.clock()
        if self._last_time is None:
            self._last_time = now
        if self._started is not None:
            if now - self._started < SNAPSHOT_STALE_S:
                return False
            logger.warning(
                "an automatic snapshot of store %r started %.0f s ago never reported back; "
                "starting another",
                self.store_name,
                now - self._started,
            )
        due = (self.every_steps > 0 and next_step - self.last_attempt >= self.every_steps) or (
            self.every_seconds > 0 and now - self._last_time >= self.every_seconds
        )
        if due:
            self._started = now
        return due

    def finished(self, ok: bool, step: int) -> None:
        """A snapshot at ``step`` ended (``ok``: committed). The intervals restart from this
        attempt either way; a failure is counted and logged with the last committed step."""
        self._started = None
        self.last_attempt = max(self.last_attempt, int(step))
        self._last_time = self.clock()
        if ok:
            self.last_committed = max(self.last_committed, int(step))
            return
        self.failures += 1
        logger.warning(
            "snapshot of store %r at step %d failed (%d failed so far; the last committed "
            "one is at step %d); the next is tried on schedule",
            self.store_name,
            step,
            self.failures,
            self.last_committed,
        )

    def reset(self, step: int) -> None:
        """The store was loaded from a snapshot at ``step``."""
        self.last_committed = self.last_attempt = int(step)


__all__ = ["SnapshotSchedule"]
