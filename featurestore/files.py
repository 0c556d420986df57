"""Two file rules every package shares: what counts as a URL, and how a file is written so
that a reader never sees half of it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse


def is_url(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a URL (``s3://…``, ``file://…``, ``pipe:cmd``: any scheme of two
    or more letters) rather than a local path (``C:\\data`` and ``runs/a:b`` are paths)."""
    return len(urlparse(os.fspath(location)).scheme) > 1


def write_atomic(
    final: str | os.PathLike, write: Callable[[Path], None], suffix: str = ".tmp"
) -> None:
    """Call ``write(tmp)`` on a new temporary file beside ``final`` (named ``.<name>.*<suffix>``),
    fsync it, then rename it over ``final``; the temporary file never outlives the call."""
    final = Path(final)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(final: str | os.PathLike, text: str) -> None:
    """:func:`write_atomic` of UTF-8 ``text``."""
    write_atomic(final, lambda tmp: tmp.write_text(text, encoding="utf-8"))


__all__ = ["is_url", "write_atomic", "write_text_atomic"]
