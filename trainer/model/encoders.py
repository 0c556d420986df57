"""Image encoders: an image batch ``[B, 3, H, W]`` to L2-normalized embeddings ``[B, low_dim]``.

Three architectures, picked by name in :func:`build_encoder`:

- ``"resnet18"`` / ``"resnet50"``: torchvision's ResNet whose ``fc`` *is* the linear head to
  ``low_dim`` (``torchvision.models.resnet18(num_classes=low_dim)``), with the output divided by
  its L2 norm. :class:`ResNetEncoder` subclasses torchvision's ``ResNet``, so ``state_dict()``
  keys are exactly torchvision's (no wrapper prefix). ``cifar_stem=True`` swaps in the stem used
  for 32x32 images: ``conv1`` 3x3 stride 1 padding 1 without bias, ``maxpool`` = ``Identity``.
- ``"small"``: :class:`SmallConvNet`, a three-block convnet that trains in minutes on a laptop
  CPU (the default for the built-in digits dataset). It is an ``nn.Sequential`` built from a
  JSON-able layer list, so a plain ``torch.nn.Sequential`` rebuilt from that list loads its
  weights.
- ``"small-wide"``: the same three blocks with twice the channels (64, 128, 256): 4x the
  multiply-adds of ``"small"`` and, on a 2-core CPU, about 0.7x its training images/s; the
  encoder of the CIFAR-10 CPU recipe (``trainer/configs/cifar10-cpu.yaml``).

Models are pure: torch/torchvision only, no device moves, no distributed code, no files.
Writing and reading an encoder (``encoder.pt`` + ``encoder.json``) is
:mod:`trainer.model.export`; its names stay importable from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

ARCHS: tuple[str, ...] = ("resnet18", "resnet50", "small", "small-wide")
"""Accepted values of ``arch``."""

_RESNET_LAYERS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}
CIFAR_CONV1_KWARGS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 64,
    "kernel_size": 3,
    "stride": 1,
    "padding": 1,
    "bias": False,
}
"""The CIFAR stem's conv1, as keyword arguments of ``torch.nn.Conv2d`` (in ``encoder.json``)."""
SMALL_WIDTHS: tuple[int, ...] = (32, 64, 128)
"""Channel widths of the default :class:`SmallConvNet` blocks."""
CONVNET_WIDTHS: dict[str, tuple[int, ...]] = {"small": SMALL_WIDTHS, "small-wide": (64, 128, 256)}
"""The :class:`SmallConvNet` archs and their block widths."""


def _check_low_dim(low_dim: object) -> int:
    if isinstance(low_dim, bool) or not isinstance(low_dim, int) or low_dim <= 0:
        raise ValueError(f"low_dim must be a positive int, got {low_dim!r}")
    return low_dim


def _check_arch(arch: object) -> str:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return str(arch)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """What :func:`build_encoder` needs; saved beside every checkpoint and exported encoder.

    ``cifar_stem=None`` resolves in ``__post_init__``: ``False`` for every arch (torchvision's
    ImageNet stem for the resnets; the small convnets have no stem option), so the stored config is
    always concrete.
    """

    arch: str = "small"
    """One of :data:`ARCHS`."""
    low_dim: int = 128
    """Embedding size ``d`` (the paper uses 128)."""
    cifar_stem: bool | None = None
    """ResNets only: 3x3 stride-1 ``conv1`` and no ``maxpool``, for 32x32 inputs."""

    def __post_init__(self) -> None:
        _check_arch(self.arch)
        _check_low_dim(self.low_dim)
        if self.cifar_stem is not None and not isinstance(self.cifar_stem, bool):
            raise ValueError(f"cifar_stem must be a bool or None, got {self.cifar_stem!r}")
        if self.arch in CONVNET_WIDTHS and self.cifar_stem:
            raise ValueError(f"cifar_stem=True applies to resnet archs only, not {self.arch!r}")
        if self.cifar_stem is None:
            object.__setattr__(self, "cifar_stem", False)

    @classmethod
    def for_preset(cls, arch: str, low_dim: int, preset: str) -> EncoderConfig:
        """The encoder a run builds for data of augmentation ``preset``: a resnet takes the
        CIFAR stem (3x3 conv, no max-pool) unless the images are ImageNet-sized."""
        stem = preset != "imagenet" if arch.startswith("resnet") else None
        return cls(arch, low_dim, stem)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the (resolved) fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncoderConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"encoder config must be a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown encoder config keys {unknown}; expected {sorted(names)}")
        return cls(**data)


class ResNetEncoder(ResNet):
    """torchvision ResNet with ``fc: 2048|512 -> low_dim`` and L2-normalized output.

    A subclass rather than a wrapper, so ``state_dict()`` keys and shapes equal those of
    ``torchvision.models.resnet18(num_classes=low_dim)`` (resp. ``resnet50``) after the same
    stem replacement. Weights are randomly initialized exactly as torchvision does; nothing is
    downloaded.

    Args:
        arch: ``"resnet18"`` or ``"resnet50"``.
        low_dim: output size ``d``.
        cifar_stem: replace ``conv1`` by a 3x3 stride-1 conv (no bias) and ``maxpool`` by
            ``Identity``, as for 32x32 images.
    """

    def __init__(self, arch: str = "resnet18", low_dim: int = 128, cifar_stem: bool = False):
        if arch not in _RESNET_LAYERS:
            raise ValueError(
                f"unknown resnet arch {arch!r}; choose one of {sorted(_RESNET_LAYERS)}"
            )
        block, layers = _RESNET_LAYERS[arch]
        super().__init__(block, layers, num_classes=_check_low_dim(low_dim))
        self.arch = arch
        self.low_dim = low_dim
        self.cifar_stem = bool(cifar_stem)
        if self.cifar_stem:
            self.conv1 = nn.Conv2d(**CIFAR_CONV1_KWARGS)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.maxpool = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, 3, H, W]`` -> unit rows ``[B, low_dim]``."""
        return F.normalize(super().forward(x), dim=1)


def small_layer_spec(
    low_dim: int = 128, widths: tuple[int, ...] = SMALL_WIDTHS, in_channels: int = 3
) -> list[dict[str, Any]]:
    """The layers of :class:`SmallConvNet` as ``[{"class": "torch.nn.X", "kwargs": {...}}]``.

    Block ``i``: ``Conv2d(3x3, bias=False) -> BatchNorm2d -> ReLU``, the first conv with
    stride 2 (32x32 -> 16x16) and a 2x2 max-pool after every block but the last; then global
    average pool, flatten, ``Linear(widths[-1], low_dim)`` and ``BatchNorm1d(low_dim)``. For
    32x32 inputs the blocks run
    at 16x16, 8x8 and 4x4.
    """
    _check_low_dim(low_dim)
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths):
        raise ValueError(f"widths must be a non-empty sequence of positive ints, got {widths!r}")
    spec: list[dict[str, Any]] = []
    c_in = in_channels
    for i, width in enumerate(widths):
        conv = {
            "in_channels": c_in,
            "out_channels": width,
            "kernel_size": 3,
            "stride": 2 if i == 0 else 1,
            "padding": 1,
            "bias": False,
        }
        spec.append({"class": "torch.nn.Conv2d", "kwargs": conv})
        spec.append({"class": "torch.nn.BatchNorm2d", "kwargs": {"num_features": width}})
        spec.append({"class": "torch.nn.ReLU", "kwargs": {"inplace": True}})
        if i < len(widths) - 1:
            spec.append({"class": "torch.nn.MaxPool2d", "kwargs": {"kernel_size": 2}})
        c_in = width
    spec.append({"class": "torch.nn.AdaptiveAvgPool2d", "kwargs": {"output_size": 1}})
    spec.append({"class": "torch.nn.Flatten", "kwargs": {"start_dim": 1}})
    spec.append(
        {"class": "torch.nn.Linear", "kwargs": {"in_features": c_in, "out_features": low_dim}}
    )
    # Centre the embedding before the L2 normalization: after ReLU + average pooling every
    # feature is positive and a linear head alone maps all images to nearly one direction
    # (mean cosine ~0.98 at init), from which instance discrimination does not recover.
    spec.append({"class": "torch.nn.BatchNorm1d", "kwargs": {"num_features": low_dim}})
    return spec


def _torch_nn_class(name: str) -> type[nn.Module]:
    prefix = "torch.nn."
    cls = getattr(nn, name[len(prefix) :], None) if name.startswith(prefix) else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"layer class {name!r} is not a torch.nn module class")
    return cls


class SmallConvNet(nn.Sequential):
    """A small conv encoder for tiny 32x32 datasets: ``[B, 3, 32, 32]`` -> unit ``[B, low_dim]``.

    The layers are :func:`small_layer_spec`; ``state_dict()`` keys are those of a plain
    ``torch.nn.Sequential`` of the same layers (``"0.weight"``, ``"1.running_mean"``, ...).
    """

    def __init__(
        self, low_dim: int = 128, widths: tuple[int, ...] = SMALL_WIDTHS, in_channels: int = 3
    ):
        spec = small_layer_spec(low_dim, tuple(widths), in_channels)
        super().__init__(*(_torch_nn_class(s["class"])(**s["kwargs"]) for s in spec))
        self.layer_spec = spec
        named = {w: name for name, w in CONVNET_WIDTHS.items()}
        self.arch = named.get(tuple(widths), "small")
        self.low_dim = low_dim
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, in_channels, H, W]`` -> unit rows ``[B, low_dim]``."""
        return F.normalize(super().forward(x), dim=1)


def build_encoder(arch: str, low_dim: int = 128, cifar_stem: bool | None = None) -> nn.Module:
    """A freshly initialized encoder mapping ``[B, 3, H, W]`` to unit vectors ``[B, low_dim]``.

    Args:
        arch: one of :data:`ARCHS` (``"resnet18"``, ``"resnet50"``, ``"small"``, ``"small-wide"``).
        low_dim: embedding size, a positive int.
        cifar_stem: resnets only; ``None`` means ``False`` (see :class:`EncoderConfig`).

    Raises:
        ValueError: unknown ``arch``, non-positive ``low_dim``, or ``cifar_stem=True`` with
            a small convnet.
    """
    config = EncoderConfig(arch=arch, low_dim=low_dim, cifar_stem=cifar_stem)
    if config.arch in CONVNET_WIDTHS:
        return SmallConvNet(low_dim=config.low_dim, widths=CONVNET_WIDTHS[config.arch])
    return ResNetEncoder(config.arch, config.low_dim, bool(config.cifar_stem))


def pooled_trunk(model: nn.Module) -> tuple[nn.Module, int]:
    """The encoder up to its global average pool, the features its linear head reads.

    Returns ``(trunk, p)``: ``trunk`` maps ``[B, 3, H, W]`` to ``[B, p]`` (``p`` = 512 for
    resnet18, 2048 for resnet50, the last block's width for the small convnets), shares its
    weights with ``model`` and is in ``model``'s train/eval mode.

    Raises:
        ValueError: ``model`` is neither a :class:`ResNetEncoder` nor a :class:`SmallConvNet`.
    """
    if isinstance(model, ResNetEncoder):
        parts = [getattr(model, n) for n in ("conv1", "bn1", "relu", "maxpool")]
        parts += [model.layer1, model.layer2, model.layer3, model.layer4, model.avgpool]
        trunk, width = nn.Sequential(*parts, nn.Flatten(1)), model.fc.in_features
    elif isinstance(model, SmallConvNet):  # drop the head: Linear, BatchNorm1d
        trunk, width = nn.Sequential(*list(model)[:-2]), model[-2].in_features
    else:
        raise ValueError(f"no pooled features for a {type(model).__name__}")
    return trunk.train(model.training), int(width)


def encoder_num_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``model`` (buffers excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


#: Names that moved to :mod:`trainer.model.export`; still importable from here.
_MOVED_TO_EXPORT = frozenset(
    {
        "CONFIG_FILE",
        "EXPORT_FORMAT",
        "EXPORT_FORMAT_VERSION",
        "WEIGHTS_FILE",
        "encode_images",
        "export_encoder",
        "load_encoder",
        "read_export_config",
        "rebuild_recipe",
    }
)


def __getattr__(name: str) -> Any:
    """The export names, from :mod:`trainer.model.export` (imported only when asked for,
    so this module stays torch/torchvision only)."""
    if name in _MOVED_TO_EXPORT:
        from trainer.model import export as encoder_export

        return getattr(encoder_export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
