"""Command-line plumbing shared by ``knn_service.serve``, ``.eval`` and ``.show``.

Bad input is one line on stderr (``prog: message``) and exit status 2, argparse errors
included (no usage dump); ``--help`` still prints the full usage.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable

from featurestore.argtypes import DefaultsHelpFormatter, OneLineParser, number_type

#: Largest request body the HTTP service accepts unless --max-body-bytes says otherwise.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024

__all__ = [
    "DefaultsHelpFormatter",
    "OneLineParser",
    "UsageError",
    "non_negative_float",
    "non_negative_int",
    "port_number",
    "positive_float",
    "positive_int",
    "run",
]


class UsageError(ValueError):
    """A bad command-line input; the message names it."""


#: argparse type: an int >= 1.
positive_int = number_type(int, "an integer", lambda v: v >= 1, ">= 1")
#: argparse type: an int >= 0.
non_negative_int = number_type(int, "an integer", lambda v: v >= 0, ">= 0")
#: argparse type: a finite float >= 0.
non_negative_float = number_type(
    float, "a number", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"
)
#: argparse type: a TCP port in [0, 65535] (0: any free port).
port_number = number_type(int, "a port number", lambda v: 0 <= v <= 65535, "in [0, 65535]")
#: argparse type: a finite float > 0.
positive_float = number_type(
    float, "a number", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"
)


def run(prog: str, main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Call ``main(argv)``; a :class:`UsageError` becomes one stderr line and status 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main(argv)
    except UsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
