"""Load a trained encoder for the kNN tools: an exported encoder or a training checkpoint.

Shared by ``python -m knn_service.serve``, ``.eval`` and ``.show``. ``--checkpoint`` may name

- an **exported encoder** directory (``encoder.json`` + ``encoder.pt``, written by
  :func:`trainer.model.export.export_encoder` at the end of a run): architecture, preset and image
  size come from its JSON (``metadata.preset`` / ``metadata.image_size``);
- a **training checkpoint** directory (``state.pt`` + ``config.json`` + ``meta.json``, see
  :mod:`trainer.checkpoints`): the architecture comes from the saved ``TrainConfig``; the
  augmentation preset is resolved from the training data exactly as the trainer does
  (:class:`trainer.plan.RunPlan`), so it needs the train data unless the run used the
  built-in dataset;
- a **run output** directory: its ``encoder/`` export when present, else its newest checkpoint.

The result is an :class:`Encoder`: the model in eval mode plus the deterministic test transform
the trainer evaluates with (``build_transform(preset, train=False, image_size)``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from trainer.api import (
    CONFIG_FILE,
    DEFAULT_SIZE,
    PRESETS,
    STATE_FILE,
    EncoderConfig,
    ShardIndex,
    TrainConfig,
    build_encoder,
    build_transform,
    latest_checkpoint,
    load_checkpoint,
    load_encoder,
    load_index,
    read_export_config,
)

__all__ = ["Encoder", "load_encoder_from"]

logger = logging.getLogger(__name__)

EXPORT_SUBDIR = "encoder"  # where trainer.loop exports the final encoder inside a run output


@dataclasses.dataclass(frozen=True, eq=False)
class Encoder:
    """A trained encoder with the test transform it is evaluated with.

    Attributes:
        model: maps ``[B, 3, H, W]`` to unit rows ``[B, dim]``; in eval mode, on ``device``.
        arch: ``"small"``, ``"small-wide"``, ``"resnet18"`` or ``"resnet50"``.
        dim: embedding size ``d``.
        preset: augmentation preset (``"cifar"``, ``"imagenet"``, ``"digits"``).
        image_size: side length the test transform produces.
        kind: ``"export"`` or ``"checkpoint"``.
        path: the directory the weights came from.
        device: where ``model`` lives.
        config: the training config for a checkpoint (``None`` for an export).
    """

    model: nn.Module
    arch: str
    dim: int
    preset: str
    image_size: int
    kind: str
    path: str
    device: torch.device
    config: TrainConfig | None = None

    @property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL RGB image -> normalized ``[3, image_size, image_size]`` (the test transform)."""
        return build_transform(self.preset, train=False, image_size=self.image_size)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Encode PIL RGB images with the test transform.

        Returns:
            ``[n, dim]`` float32 unit rows on CPU.
        """
        if not images:
            return torch.empty(0, self.dim)
        tf = self.transform
        batch = torch.stack([tf(image) for image in images]).to(self.device)
        return F.normalize(self.model(batch).float(), dim=1).cpu()

    def describe(self) -> dict[str, object]:
        """JSON-able summary (what the CLIs print as "the inputs used")."""
        return {
            "path": self.path,
            "kind": self.kind,
            "arch": self.arch,
            "dim": self.dim,
            "preset": self.preset,
            "image_size": self.image_size,
        }


def load_encoder_from(
    path: str | os.PathLike[str],
    train_data: str | os.PathLike[str] | ShardIndex | None = None,
    device: str | torch.device = "cpu",
) -> Encoder:
    """Load the encoder at ``path`` (export, checkpoint or run output; see module docstring).

    Args:
        path: a local directory.
        train_data: the training data (location or loaded index); resolves the preset of a
            training checkpoint, and of an export whose JSON lacks one.
        device: where to put the model.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds neither an export nor a checkpoint.
        ValueError: unreadable/inconsistent files, or the preset cannot be resolved.
    """
    where = Path(path)
    if not where.is_dir():
        raise FileNotFoundError(f"checkpoint {where}: no such directory")
    if (where / CONFIG_FILE).is_file():
        return _from_export(where, train_data, torch.device(device))
    if (where / STATE_FILE).is_file():
        return _from_checkpoint(where, train_data, torch.device(device))
    if (where / EXPORT_SUBDIR / CONFIG_FILE).is_file():
        return _from_export(where / EXPORT_SUBDIR, train_data, torch.device(device))
    latest = latest_checkpoint(where)
    if latest is not None:
        return _from_checkpoint(latest, train_data, torch.device(device))
    raise FileNotFoundError(
        f"checkpoint {where}: neither an exported encoder ({CONFIG_FILE}), a training "
        f"checkpoint ({STATE_FILE}) nor a run directory holding one"
    )


def _resolve_preset(train_data: str | os.PathLike[str] | ShardIndex | None, what: str) -> str:
    if train_data is None:
        raise ValueError(f"{what}: the augmentation preset is unknown; pass the train data")
    return load_index(train_data).preset


def _from_export(
    where: Path, train_data: str | os.PathLike[str] | ShardIndex | None, device: torch.device
) -> Encoder:
    document = read_export_config(where)
    model = load_encoder(where)
    meta = document.get("metadata") or {}
    preset = meta.get("preset") or _resolve_preset(train_data, f"exported encoder {where}")
    if preset not in PRESETS:
        raise ValueError(f"exported encoder {where}: unknown preset {preset!r}")
    image_size = meta.get("image_size") or DEFAULT_SIZE[preset]
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"exported encoder {where}: bad image_size {image_size!r}")
    return Encoder(
        model=model.to(device).eval(),
        arch=str(document["arch"]),
        dim=int(document["low_dim"]),
        preset=preset,
        image_size=image_size,
        kind="export",
        path=str(where),
        device=device,
    )


def _from_checkpoint(
    where: Path, train_data: str | os.PathLike[str] | ShardIndex | None, device: torch.device
) -> Encoder:
    state, saved = load_checkpoint(where)
    cfg = TrainConfig.from_dict(saved)
    if train_data is None and cfg.builtin:
        preset = "digits"
    else:
        preset = _resolve_preset(train_data, f"training checkpoint {where}")
    enc_cfg = EncoderConfig.for_preset(cfg.resolved_arch, cfg.low_dim, preset)
    model = build_encoder(**enc_cfg.to_dict())
    try:
        model.load_state_dict(state.model, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ValueError(
            f"training checkpoint {where}: weights do not fit {enc_cfg} ({first})"
        ) from None
    return Encoder(
        model=model.to(device).eval(),
        arch=enc_cfg.arch,
        dim=cfg.low_dim,
        preset=preset,
        image_size=cfg.image_size or DEFAULT_SIZE[preset],
        kind="checkpoint",
        path=str(where),
        device=device,
        config=cfg,
    )
