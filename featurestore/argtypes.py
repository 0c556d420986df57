"""argparse number types whose errors are one line naming the bound, shared by every
command (``featurestore`` sits below both the trainer and the service; no torch, no Ray)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


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
