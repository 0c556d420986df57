"""Reading shards from object storage that fails now and then: a file object that reopens
the URL and seeks back to where it was after a transient error, with exponential backoff,
counting every retry; an error that persists ends in one line naming the URL.

Only remote (fsspec) files are wrapped: a local file's errors are not transient. Errors that
say the object is not there or not ours to read (``FileNotFoundError``,
``PermissionError``, ``IsADirectoryError``) are never retried.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from featurestore.write_retries import transient

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; the wait before try ``i + 1`` is
    ``min(first_delay * factor**(i - 1), max_delay)`` seconds."""

    attempts: int = 5
    first_delay: float = 0.5
    factor: float = 2.0
    max_delay: float = 8.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure (1-based)."""
        return min(self.first_delay * self.factor ** (failures - 1), self.max_delay)


#: The policy of every shard read (tests shorten it).
POLICY = RetryPolicy()

_lock = threading.Lock()
_retries = 0


def retries() -> int:
    """Retried reads and opens in this process so far."""
    return _retries


def _count() -> None:
    global _retries
    with _lock:
        _retries += 1


class ShardUnreachableError(OSError):
    """A shard stayed unreadable through every retry; the message names it."""


def with_retries(url: str, what: str, call: Callable[[], Any], policy: RetryPolicy) -> Any:
    """``call()``, retried on transient ``OSError`` (backoff per ``policy``).

    Raises:
        ShardUnreachableError: the last attempt failed too (names ``url``).
    """
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except Exception as exc:
            if not transient(exc):
                raise
            if attempt == policy.attempts:
                raise ShardUnreachableError(
                    f"{url}: {what} failed {attempt} times, the last with "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            wait = policy.delay(attempt)
            _count()
            logger.warning(
                "%s: %s failed (%s: %s); retry %d of %d in %.1f s",
                url, what, type(exc).__name__, exc, attempt, policy.attempts - 1, wait,
            )  # fmt: skip
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


class RetryingReader:
    """A binary reader over ``open_fn()`` (a seekable remote file) that survives transient
    errors: on one it reopens the file and seeks back to its position, then reads again."""

    def __init__(
        self, url: str, open_fn: Callable[[], BinaryIO], policy: RetryPolicy | None = None
    ):
        self.url = url
        self._open_fn = open_fn
        self._policy = policy or POLICY
        self._pos = 0
        self._file: BinaryIO | None = with_retries(url, "open", open_fn, self._policy)

    def _reopen(self) -> BinaryIO:
        if self._file is not None:
            with contextlib.suppress(Exception):  # a broken connection may not close cleanly
                self._file.close()
            self._file = None
        f = self._open_fn()
        if self._pos:
            f.seek(self._pos)
        self._file = f
        return f

    def _attempt(self, fn: Callable[[BinaryIO], Any]) -> Callable[[], Any]:
        first = [True]

        def call() -> Any:
            f = self._file if first[0] and self._file is not None else self._reopen()
            first[0] = False
            return fn(f)

        return call

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all that is left when negative)."""
        data = with_retries(self.url, "read", self._attempt(lambda f: f.read(size)), self._policy)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        """Move like ``io`` files do (``whence`` 0, 1 or 2); the new position."""
        self._pos = with_retries(
            self.url, "seek", self._attempt(lambda f: f.seek(offset, whence)), self._policy
        )
        return self._pos

    def tell(self) -> int:
        """The position."""
        return self._pos

    def seekable(self) -> bool:
        """True: the files wrapped are remote files that seek (fsspec range reads)."""
        return True

    def close(self) -> None:
        """Close the current file."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RetryingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["POLICY", "RetryPolicy", "RetryingReader", "ShardUnreachableError", "retries"]
