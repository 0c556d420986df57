"""Progress bars: shown on a terminal, absent from logs.

:func:`terminal_bar` is tqdm on ``stderr`` when it is a terminal. Its width comes from
:func:`shutil.get_terminal_size`, not from tqdm's own probe: a terminal that reports zero
columns (``script``, ``docker exec -t`` before a resize, some CI ptys) made tqdm draw a
bar of width 0, i.e. nothing. Ray Train workers have no terminal; their bar is drawn by
the driver (:meth:`trainer.launch.ray_runtime.RayRuntime.progress`).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, TextIO

from tqdm import tqdm

__all__ = ["Bar", "is_terminal", "terminal_bar", "terminal_shape"]


class Bar(Protocol):
    """What the loops use of a progress bar (tqdm's names)."""

    def __iter__(self) -> Iterator[Any]: ...

    def set_postfix(self, **values: Any) -> None:
        """Show ``key=value`` after the bar."""

    def close(self) -> None:
        """Remove the bar (``leave=False``)."""


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default ``sys.stderr``) is a terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):  # a closed stream
        return False


def terminal_shape() -> tuple[int, int]:
    """``(columns, lines)`` for a bar: the terminal's, ``$COLUMNS``/``$LINES``, else 80 x 24
    (never 0: tqdm draws nothing in 0 columns and hides every bar below line 0)."""
    size = shutil.get_terminal_size((80, 24))
    return size.columns or 80, size.lines or 24


def terminal_bar(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    unit: str,
    total: int | None = None,
    initial: int = 0,
    enabled: bool | None = None,
    leave: bool = False,
) -> tqdm:
    """A tqdm bar on ``stderr``; ``enabled=None``: only when ``stderr`` is a terminal."""
    show = is_terminal() if enabled is None else enabled
    columns, lines = terminal_shape()
    return tqdm(
        iterable,
        desc=desc,
        unit=unit,
        total=total,
        initial=initial,
        leave=leave,
        file=sys.stderr,
        ncols=columns,
        nrows=lines,
        disable=not show,
    )
