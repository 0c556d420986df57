"""Training checkpoints: what a restarted or resumed run needs, in plain files.

A checkpoint directory holds ``state.pt`` (model and optimizer state dicts, epoch, step,
the store snapshot URI or the in-process bank, the parametric classifier; tensors and
plain Python only, loadable with ``torch.load(weights_only=True)``), ``config.json`` (the
resolved run config) and, written last as the commit point, ``meta.json`` (epoch, step,
snapshot URI).
Ray Train wraps the directory in a ``ray.train.Checkpoint``.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.fs
import torch

from featurestore.files import is_url, write_atomic, write_text_atomic

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
    """URI of the store snapshot taken at this boundary (``--bank store``)."""
    bank: dict[str, Any] | None = None
    """The in-process bank's :meth:`~featurestore.MemoryBank.state_dict` (rows, Z, step)
    with ``--bank local``; the store's rows are in ``store_snapshot`` instead."""
    head: dict[str, Any] | None = None
    """The parametric classifier's state dict with ``--objective parametric`` (the encoder's
    is ``model``, so readers of the encoder never see the head)."""


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
        "bank": state.bank,
        "head": state.head,
    }
    write_atomic(path / STATE_FILE, lambda tmp: torch.save(payload, tmp))
    write_text_atomic(path / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True))
    meta = {"epoch": state.epoch, "step": state.step, "store_snapshot": state.store_snapshot}
    write_text_atomic(path / META_FILE, json.dumps(meta))  # last: marks the checkpoint complete
    return path


def _checkpoint_fs(directory: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path without a trailing slash)`` of a local path or an fsspec URL."""
    fs, path = fsspec.core.url_to_fs(os.fspath(directory))
    return fs, path.rstrip("/")


def load_checkpoint(directory: str | os.PathLike) -> tuple[TrainState, dict]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(state, config)``.

    ``directory`` is a local path or an fsspec URL (``s3://…``: a Ray Train storage path).
    """
    fs, path = _checkpoint_fs(directory)
    if not all(fs.isfile(f"{path}/{name}") for name in (STATE_FILE, CONFIG_FILE, META_FILE)):
        raise FileNotFoundError(
            f"{os.fspath(directory)} is not a complete npid checkpoint "
            f"(needs {STATE_FILE}, {CONFIG_FILE} and {META_FILE})"
        )
    payload = torch.load(
        io.BytesIO(fs.cat_file(f"{path}/{STATE_FILE}")), map_location="cpu", weights_only=True
    )
    config = json.loads(fs.cat_file(f"{path}/{CONFIG_FILE}"))
    payload.pop("data_position", None)  # written by older versions, never read
    return TrainState(**payload), config


def load_checkpoint_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of a checkpoint (epoch, step, snapshot URI); a path or an fsspec URL."""
    fs, path = _checkpoint_fs(directory)
    return json.loads(fs.cat_file(f"{path}/{META_FILE}"))


def _latest_remote(url: str) -> str | None:
    """:func:`latest_checkpoint` below an fsspec URL (ties: the later directory name)."""
    fs, path = _checkpoint_fs(url)
    try:
        files = set(fs.find(path))
    except FileNotFoundError:
        return None
    best: tuple[int, str] | None = None
    for meta_file in sorted(f for f in files if f.endswith(f"/{META_FILE}")):
        directory = meta_file[: -len(META_FILE) - 1]
        if not all(f"{directory}/{n}" in files for n in (STATE_FILE, CONFIG_FILE)):
            continue
        try:
            step = int(json.loads(fs.cat_file(meta_file))["step"])
        except (ValueError, KeyError, TypeError):  # not a checkpoint to resume from
            continue
        if best is None or (step, directory) > best:
            best = (step, directory)
    return None if best is None else fs.unstrip_protocol(best[1])


def latest_checkpoint(root: str | os.PathLike) -> Path | str | None:
    """The newest complete checkpoint directory below ``root`` (by step), or None.

    ``root`` is a local directory (a ``Path`` comes back) or an fsspec URL (a URL string).
    """
    if is_url(root):
        return _latest_remote(str(root))
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


def ray_storage(path: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """Ray Train's ``(storage_path, storage_filesystem)`` for the run storage ``path``.

    ``gs://`` goes through gcsfs (fsspec), the client that reads ``--data gs://`` and
    finds checkpoints for ``--resume``, so one set of credentials and settings (including
    ``STORAGE_EMULATOR_HOST``) serves all three; Ray then gets the path without its scheme.
    Local paths and other URLs (``s3://`` …) go to Ray as they are.
    """
    if not path.startswith("gs://"):
        return path, None
    handler = pyarrow.fs.FSSpecHandler(fsspec.filesystem("gs"))
    return path[len("gs://") :], pyarrow.fs.PyFileSystem(handler)
