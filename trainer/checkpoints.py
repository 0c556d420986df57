"""Training checkpoints: what a restarted or resumed run needs, in plain files.

A checkpoint directory holds ``state.pt`` (model and optimizer state dicts, epoch, step,
data position, the store snapshot URI; tensors and plain Python only, loadable with
``torch.load(weights_only=True)``), ``config.json`` (the resolved run config) and, written
last as the commit point, ``meta.json`` (epoch, step, snapshot URI).
Ray Train wraps the directory in a ``ray.train.Checkpoint``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"


@dataclass
class TrainState:
    """Where a run stands at an epoch boundary."""

    model: dict[str, Any]
    optimizer: dict[str, Any]
    epoch: int
    """Epochs completed (the next epoch to run)."""
    step: int
    """Optimizer steps completed."""
    store_snapshot: str | None
    """URI of the store snapshot taken at this boundary."""
    data_position: dict[str, int]
    """``{"epoch": e, "batch": b}``: the next batch the loader delivers."""


def save_checkpoint(directory: str | os.PathLike, state: TrainState, config: dict) -> Path:
    """Write ``state`` and ``config`` into ``directory`` (temp names, then rename)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": state.model,
        "optimizer": state.optimizer,
        "epoch": state.epoch,
        "step": state.step,
        "store_snapshot": state.store_snapshot,
        "data_position": state.data_position,
    }
    tmp = path / f".{STATE_FILE}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path / STATE_FILE)
    tmp = path / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp, path / CONFIG_FILE)
    meta = {"epoch": state.epoch, "step": state.step, "store_snapshot": state.store_snapshot}
    tmp = path / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, path / META_FILE)
    return path


def load_checkpoint(directory: str | os.PathLike) -> tuple[TrainState, dict]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(state, config)``."""
    path = Path(directory)
    state_file, config_file = path / STATE_FILE, path / CONFIG_FILE
    if not all((path / name).is_file() for name in (STATE_FILE, CONFIG_FILE, META_FILE)):
        raise FileNotFoundError(
            f"{path} is not a complete npid checkpoint "
            f"(needs {STATE_FILE}, {CONFIG_FILE} and {META_FILE})"
        )
    payload = torch.load(state_file, map_location="cpu", weights_only=True)
    config = json.loads(config_file.read_text())
    return TrainState(**payload), config


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory below ``root`` (by step), or None."""
    base = Path(root)
    if not base.exists():
        return None
    best: tuple[int, float, Path] | None = None
    for meta_file in base.rglob(META_FILE):
        directory = meta_file.parent
        if not all((directory / n).is_file() for n in (STATE_FILE, CONFIG_FILE)):
            continue
        try:
            step = int(json.loads(meta_file.read_text())["step"])
        except (ValueError, KeyError, TypeError):  # not a checkpoint to resume from
            continue
        key = (step, meta_file.stat().st_mtime, directory)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]
