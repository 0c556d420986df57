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


def umask() -> int:
    """The process's file-mode creation mask (read, not changed, where /proc tells it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting, restored at once
    os.umask(mask)
    return mask


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new directory in ``parent`` for a result renamed into place later, with the
    permissions of an ordinary ``mkdir`` (``tempfile.mkdtemp`` makes it private, 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o777 & ~umask())
    return path


def write_atomic(
    final: str | os.PathLike, write: Callable[[Path], None], suffix: str = ".tmp"
) -> None:
    """Call ``write(tmp)`` on a new temporary file beside ``final`` (named ``.<name>.*<suffix>``,
    with the permissions the user's umask gives), fsync it, then rename it over ``final``;
    the temporary file never outlives the call."""
    final = Path(final)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~umask())  # as an ordinary open() would create it (mkstemp: 0600)
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


__all__ = ["is_url", "make_temp_dir", "umask", "write_atomic", "write_text_atomic"]
