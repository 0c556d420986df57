"""How a configuration field is declared and checked, once for every component of
:mod:`trainer.config`: :func:`setting` (a field with its one help text, which ``--help``
and the YAML keys are generated from), the checks, and reading plain data (flat or by
component, and complete dumps of an older npid). No torch, no Ray."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

BUILTIN = "digits"
#: ``--objective auto`` uses the exact softmax up to this many instances, the sampled
#: softmax (K noise rows) above (README, "Which objective", has the measurement).
SOFTMAX_AUTO_MAX_ROWS = 200_000


class ConfigError(ValueError):
    """An impossible or inconsistent setting; the CLI prints it on one line, exit 2."""


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    switch: bool = False,
    flag: str | None = None,
    zero_is_default: bool = False,
    shown_default: Any = None,
) -> Any:
    """A config field and its one description.

    Args:
        default: the field's default.
        help: what the setting does, as ``--help`` shows it.
        choices: the accepted strings.
        switch: a boolean flag without a value (``--use-gpu``).
        flag: the flag when not ``--`` + the name with ``-`` (``--no-progress``).
        zero_is_default: 0 means "the dataset's default"; on the command line or in YAML
            an explicit 0 is refused.
        shown_default: what ``--help`` shows as the default when not the field's.
    """
    meta = {
        "help": help,
        "choices": choices,
        "switch": switch,
        "flag": flag,
        "zero_is_default": zero_is_default,
        "shown_default": shown_default,
        "cli": True,
    }
    return dataclasses.field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of field ``f``."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_number(config: Any, name: str, allow_zero: bool = False) -> None:
    """``ConfigError`` unless ``config.name`` is a finite number > 0 (>= 0 with
    ``allow_zero``), naming the flag."""
    value = getattr(config, name)
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{flag} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{flag} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_choice(config: Any, name: str) -> None:
    """``ConfigError`` unless ``config.name`` is one of its field's choices."""
    f = next(f for f in dataclasses.fields(config) if f.name == name)
    value, choices = getattr(config, name), f.metadata["choices"]
    if value not in choices:
        raise ConfigError(f"{flag_of(f)} must be one of {', '.join(choices)}, got {value!r}")


def flatten(data: dict[str, Any], sections: dict[str, type]) -> dict[str, Any]:
    """Plain data with ``-`` or ``_`` keys, flat or under a component's name
    (``{"optim": {"lr": 0.1}}``), as flat field names. A key that is both a section and a
    field (``data``, ``objective``, ``bank``) is the section only when its value is a
    mapping."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in sections and isinstance(value, dict):
            known = {f.name for f in dataclasses.fields(sections[name])}
            for sub, inner in value.items():
                sub_name = str(sub).replace("-", "_")
                if sub_name not in known:
                    raise ConfigError(f"unknown config key {name}.{sub} ({name} has: "
                                      f"{', '.join(sorted(known))})")  # fmt: skip
                flat[sub_name] = inner
        else:
            flat[name] = value
    return flat


def upgrade(data: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """``data`` with ``config_version`` removed; a complete dump without it (a checkpoint
    of an older npid: every field present) keeps its meaning: ``--nce-k`` then held the
    default 4096 even when not given (and ``--objective auto`` did not become NCE), and
    ``--bank store`` beside ``--launcher local`` meant the in-process bank."""
    data = dict(data)
    version = data.pop("config_version", None)
    if version is not None or not names - {"extra"} <= set(data):
        return data
    if data.get("objective") == "auto" and data.get("nce_k") == 4096:
        data["nce_k"] = None
    if data.get("bank") == "store" and data.get("launcher") == "local":
        data["bank"] = "auto"
    return data


__all__ = [
    "BUILTIN",
    "SOFTMAX_AUTO_MAX_ROWS",
    "ConfigError",
    "check_choice",
    "check_number",
    "flag_of",
    "flatten",
    "setting",
    "upgrade",
]
