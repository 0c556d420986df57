"""argparse pieces shared by every command: a parser and number types whose errors are one
line naming the input (``featurestore`` sits below both the trainer and the service; no
torch, no Ray)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (the error and a pointer
    to ``--help``, not the usage) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that ends each option with ``(default: X)`` unless the text already names its
    default or there is none to show (``None``, ``False``, a required option)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = action.default is None or action.default is False
        shown = not hidden and action.default is not argparse.SUPPRESS and not action.required
        if shown and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


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
