"""Retries with backoff for the writes of a snapshot to object storage.

Object storage fails transiently (HTTP 500/503, a reset connection, a timeout) where a
local disk does not: each file of a snapshot on ``s3://``, ``gs://`` … is written again
after 0.5, 1 and 2 s before the snapshot fails. Errors that will not pass by waiting (no
permission, no such bucket) fail at once, and so does every error of a local filesystem (a
full or read-only disk does not heal in seconds; the automatic snapshot schedule retries
later). Plain Python; no Ray.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Attempts of one file write to object storage, and the first pause (doubling).
ATTEMPTS = 4
BACKOFF_S = 0.5

#: Errors that waiting does not mend.
PERMANENT = (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError,
             NotADirectoryError)  # fmt: skip


def transient(err: BaseException) -> bool:
    """Whether ``err`` from an object store may pass if the call is tried again (any
    ``OSError``, timeouts and reset connections included, but :data:`PERMANENT`); the
    trainer's shard reads (``trainer.data.retrying``) use the same rule."""
    return isinstance(err, OSError) and not isinstance(err, PERMANENT)


def retrying(
    what: str,
    write: Callable[[], T],
    remote: bool,
    on_retry: Callable[[], None] | None = None,
    attempts: int = ATTEMPTS,
    backoff_s: float = BACKOFF_S,
) -> T:
    """``write()``; on object storage (``remote``) tried again after a transient error.

    Args:
        what: the file being written (named in the log line of each retry).
        write: writes the whole file (a fresh temporary name each call) and returns.
        remote: the file is on object storage; False: one attempt.
        on_retry: called once per retry (the store's retry counter and metric).
        attempts, backoff_s: attempts in all; pause before the first retry (doubling).

    Raises:
        OSError: naming ``what``, when every attempt failed; a permanent error (or any on a
            local filesystem) as raised.
    """
    for attempt in range(attempts if remote else 1):
        try:
            return write()
        except Exception as err:
            if not remote or not transient(err):
                raise
            if attempt + 1 >= attempts:
                raise OSError(
                    getattr(err, "errno", None),
                    f"writing {what} failed {attempts} times ({type(err).__name__}: {err})",
                ) from err
            delay = backoff_s * 2**attempt
            logger.warning(
                "writing %s failed (%s: %s); retry %d/%d in %.1f s",
                what, type(err).__name__, err, attempt + 1, attempts - 1, delay,
            )  # fmt: skip
            if on_retry is not None:
                on_retry()
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


__all__ = ["ATTEMPTS", "BACKOFF_S", "retrying", "transient"]
