"""argparse pieces shared by every command: a parser and number types whose errors are one
line naming the input (``featurestore`` sits below both the trainer and the service; no
torch, no Ray)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def number_type(
    convert: Callable[[str], float], noun: str, ok: Callable[[float], bool], bound: str
) -> Callable[[str], float]:
    """An argparse type: ``convert(text)`` that must satisfy ``ok``, else a one-line error
    ("expected ``noun``, got 'x'" or "must be ``bound``, got x")."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse
