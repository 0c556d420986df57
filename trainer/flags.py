"""The command line of ``python -m trainer.run``: flags (and ``--config`` YAML) to a
:class:`~trainer.config.TrainConfig`.

Every flag's default is None in the parser so that a YAML file can fill what the command
line leaves out; ``--help`` shows each setting's real default (:class:`TrainConfig`'s).
Imports neither torch nor Ray, so ``--help`` and bad flags answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from featurestore.argtypes import OneLineParser
from trainer.config import COMPONENTS, ConfigError, TrainConfig
from trainer.config_fields import flag_of, flatten

#: Settings whose 0 means "the dataset's default"; an explicit 0 is refused.
_ZERO_IS_AUTO = {
    f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("zero_is_default")
}

#: ``--help`` text of every flag, from the config's fields (each documented once there).
HELP: dict[str, str] = {
    f.name: f.metadata["help"]
    for f in dataclasses.fields(TrainConfig)
    if f.metadata.get("cli", False)
}


def _help(f: dataclasses.Field) -> str:
    text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
    if f.metadata["zero_is_default"] or f.metadata["switch"] or f.metadata["flag"]:
        return text
    shown = f.metadata["shown_default"]
    shown = f.default if shown is None else shown
    return text if shown is None else f"{text} (default: {shown})"


def build_parser() -> argparse.ArgumentParser:
    """The CLI parser, one argument group per config component, generated from the
    fields; every default is None so that the YAML file can fill it."""
    p = OneLineParser(
        prog="python -m trainer.run",
        description="Train an image encoder by non-parametric instance discrimination.",
    )
    p.add_argument("--config", help="YAML file with any of the settings below")
    for _section, component in COMPONENTS:
        group = p.add_argument_group(component.__doc__.split("\n")[0].rstrip("."))
        for f in dataclasses.fields(component):
            if not f.metadata.get("cli", False):
                continue
            meta, flag = f.metadata, flag_of(f)
            if f.name == "progress":
                group.add_argument(flag, dest="progress", action="store_false", default=None,
                                   help=_help(f))  # fmt: skip
            elif meta["switch"]:
                group.add_argument(flag, action="store_true", default=None, help=_help(f))
            elif meta["choices"]:
                group.add_argument(flag, choices=meta["choices"], help=_help(f))
            else:
                kind = type(meta["shown_default"] if f.default is None else f.default)
                kind = kind if kind in (int, float) else str
                group.add_argument(flag, type=kind, help=_help(f))
    return p


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags (and ``--config`` YAML) -> :class:`TrainConfig`; raises :class:`ConfigError`."""
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    path = args.pop("config")
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected a mapping of settings")
        values.update(flatten(loaded, dict(COMPONENTS)))  # flat keys, or one mapping per component
    values.update({k: v for k, v in args.items() if v is not None})
    for name in _ZERO_IS_AUTO:
        value = values.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{flag} must be >= 1, got {value} (leave it out for the dataset's default)"
            )
    try:
        return TrainConfig.from_dict(values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
