"""An encoder as files: ``encoder.pt`` (a plain ``str -> Tensor`` dict, loadable with
``torch.load(weights_only=True)``) and ``encoder.json`` (how to rebuild the network with plain
torch/torchvision, without this project, and the preprocessing it was evaluated with).
:func:`export_encoder` writes them at the end of a run, :func:`load_encoder` reads them back
and :func:`encode_images` embeds PIL images with them exactly as ``knn_service`` does."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from featurestore.files import write_atomic
from trainer.data.decode import to_rgb
from trainer.data.transforms import build_transform, describe_test_transform
from trainer.model.encoders import (
    CIFAR_CONV1_KWARGS,
    CONVNET_WIDTHS,
    EncoderConfig,
    build_encoder,
    small_layer_spec,
)

WEIGHTS_FILE = "encoder.pt"
CONFIG_FILE = "encoder.json"
EXPORT_FORMAT = "npid-encoder"
EXPORT_FORMAT_VERSION = 1


def rebuild_recipe(config: EncoderConfig) -> dict[str, Any]:
    """How to rebuild ``config``'s network with plain torch/torchvision (the ``encoder.json`` body).

    Returns a JSON-able dict with ``"build"`` (machine-readable: a constructor and its
    keyword arguments, plus module replacements or a layer list) and ``"python"`` (the same as
    source code). Either way the output must be L2-normalized along ``dim=1`` afterwards.
    """
    if config.arch in CONVNET_WIDTHS:
        layers = small_layer_spec(config.low_dim, CONVNET_WIDTHS[config.arch])
        build: dict[str, Any] = {"constructor": "torch.nn.Sequential", "layers": layers}
        lines = ["import torch", "model = torch.nn.Sequential("]
        for layer in layers:
            kwargs = ", ".join(f"{k}={v!r}" for k, v in layer["kwargs"].items())
            lines.append(f"    {layer['class']}({kwargs}),")
        lines.append(")")
    else:
        build = {
            "constructor": f"torchvision.models.{config.arch}",
            "kwargs": {"weights": None, "num_classes": config.low_dim},
            "replace": {},
        }
        lines = [
            "import torch, torchvision",
            f"model = torchvision.models.{config.arch}(weights=None, num_classes={config.low_dim})",
        ]
        if config.cifar_stem:
            build["replace"] = {
                "conv1": {"class": "torch.nn.Conv2d", "kwargs": dict(CIFAR_CONV1_KWARGS)},
                "maxpool": {"class": "torch.nn.Identity", "kwargs": {}},
            }
            lines += [
                "model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, "
                "bias=False)",
                "model.maxpool = torch.nn.Identity()",
            ]
    lines += [
        f"model.load_state_dict(torch.load('{WEIGHTS_FILE}', weights_only=True))",
        "model.eval()",
        "embedding = torch.nn.functional.normalize(model(images), dim=1)  # [B, low_dim]",
    ]
    return {"build": build, "python": "\n".join(lines)}


def export_encoder(
    model: nn.Module,
    config: EncoderConfig,
    out_dir: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/encoder.pt`` (weights) and then ``out_dir/encoder.json`` (recipe).

    ``encoder.pt`` is a flat ``{name: Tensor}`` dict on CPU saved with ``torch.save``, loadable
    with ``torch.load(path, weights_only=True)`` into the network described by
    :func:`rebuild_recipe`. Both files are written to temp names and renamed, the JSON last.

    Args:
        model: the encoder built from ``config`` (unwrapped: not the DDP module).
        config: its :class:`EncoderConfig`.
        out_dir: local directory, created if missing.
        metadata: optional JSON-able extras stored under ``"metadata"`` (e.g. input mean/std).

    Returns:
        The path of ``encoder.json``.

    Raises:
        ValueError: ``model``'s state dict keys or shapes do not match ``config``'s network.
    """
    if not isinstance(config, EncoderConfig):
        raise ValueError(f"config must be an EncoderConfig, got {type(config).__name__}")
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    expected = build_encoder(**config.to_dict()).state_dict()
    if list(state) != list(expected):
        missing = sorted(set(expected) - set(state))[:5]
        extra = sorted(set(state) - set(expected))[:5]
        raise ValueError(
            f"model does not match config {config}: missing keys {missing}, unexpected keys "
            f"{extra} (pass the bare encoder, e.g. ddp_model.module)"
        )
    bad = [k for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"model does not match config {config}: wrong shapes for {bad[:5]}")
    document = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        **config.to_dict(),
        "normalization": {"kind": "l2", "dim": 1},
        "input": {"layout": "NCHW", "channels": 3},
        "weights": WEIGHTS_FILE,
        "weights_format": "torch.save of a flat dict str -> Tensor; torch.load(weights_only=True)",
        **rebuild_recipe(config),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "metadata": dict(metadata or {}),
    }
    meta = dict(metadata or {})
    if "preset" in meta and "image_size" in meta:
        document["preprocessing"] = describe_test_transform(meta["preset"], meta["image_size"])
    text = json.dumps(document, indent=2, sort_keys=False) + "\n"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / WEIGHTS_FILE, lambda tmp: torch.save(state, tmp))
    write_atomic(out / CONFIG_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return out / CONFIG_FILE


def read_export_config(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``encoder.json`` of an export directory, with its format checked."""
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no exported encoder: {path} does not exist")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not an {EXPORT_FORMAT} file")
    if document.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ValueError(
            f"{path}: unsupported format_version {document.get('format_version')!r} "
            f"(this code reads {EXPORT_FORMAT_VERSION})"
        )
    return document


@torch.no_grad()
def encode_images(out_dir: str | os.PathLike[str], images: Sequence[Image.Image]) -> torch.Tensor:
    """Encode PIL images with an exported encoder exactly as ``knn_service`` does.

    ``out_dir`` is an export written by a training run (``OUTPUT/encoder``); its
    ``encoder.json`` names the preprocessing (``"preprocessing"``: RGB, resize, crop,
    mean/std). Returns ``[n, low_dim]`` float32 unit rows on CPU::

        from PIL import Image
        from trainer.model.export import encode_images
        vectors = encode_images("runs/npid/encoder", [Image.open("cat.jpg")])
    """
    document = read_export_config(out_dir)
    pre = document.get("preprocessing")
    if pre is None:
        raise ValueError(f"{out_dir}: encoder.json records no preprocessing (an older export)")
    model = load_encoder(out_dir)
    if not images:
        return torch.empty(0, int(document["low_dim"]))
    tf = build_transform(pre["preset"], train=False, image_size=pre["image_size"])
    batch = torch.stack([tf(to_rgb(image)) for image in images])
    return F.normalize(model(batch).float(), dim=1)


def load_encoder(out_dir: str | os.PathLike[str]) -> nn.Module:
    """Rebuild an encoder written by :func:`export_encoder`, in eval mode, on CPU.

    Returns the normalized encoder (:class:`ResNetEncoder` or :class:`SmallConvNet`):
    ``[B, 3, H, W]`` -> unit rows ``[B, low_dim]``. Weights load strictly.
    """
    document = read_export_config(out_dir)
    names = {f.name for f in dataclasses.fields(EncoderConfig)}
    config = EncoderConfig.from_dict({k: document[k] for k in names if k in document})
    model = build_encoder(**config.to_dict())
    weights = Path(out_dir) / document.get("weights", WEIGHTS_FILE)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
