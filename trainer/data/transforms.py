"""Augmentation presets: a PIL RGB image to a normalized float tensor ``[3, H, W]``.

The presets follow the reference lemniscate code (Wu et al. 2018):

- ``"cifar"`` train: ``RandomResizedCrop(32, scale=(0.2, 1))``, ``ColorJitter(0.4, 0.4, 0.4,
  0.4)``, ``RandomGrayscale(p=0.2)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``
  with the CIFAR-10 mean/std; test: ``ToTensor`` + ``Normalize`` (CIFAR images are already
  32x32; with ``image_size`` given, a ``Resize`` + ``CenterCrop`` is put in front).
- ``"imagenet"`` train: ``RandomResizedCrop(224, scale=(0.2, 1))`` and the same jitter,
  grayscale and flip, ImageNet mean/std; test: ``Resize(256)`` + ``CenterCrop(224)``.
- ``"digits"``: the tiny built-in dataset (scikit-learn's 8x8 digits, see
  :mod:`trainer.data.sources`). Train: ``RandomResizedCrop(32, scale=(0.5, 1))`` (which also
  upsamples 8x8 to 32x32), a mild brightness/contrast jitter, no flip (digits are not mirror
  invariant); test: ``Resize((32, 32))``. Light on purpose, so the small encoder learns the
  digits in minutes on a CPU.

Images reach the transform already converted to RGB (the loader does it, see
:func:`trainer.data.decode_image`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision import transforms as T

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Pixel statistics of the built-in digits (8-bit png, 0..16 scaled to 0..255), all channels.
DIGITS_MEAN = (0.3053, 0.3053, 0.3053)
DIGITS_STD = (0.3759, 0.3759, 0.3759)

PRESETS = ("cifar", "imagenet", "digits")
DEFAULT_SIZE = {"cifar": 32, "imagenet": 224, "digits": 32}


def _jitter_gray_flip() -> list[Callable]:
    """The reference's photometric augmentation plus the horizontal flip."""
    return [
        T.ColorJitter(0.4, 0.4, 0.4, 0.4),
        T.RandomGrayscale(p=0.2),
        T.RandomHorizontalFlip(),
    ]


def build_transform(
    preset: str, train: bool, image_size: int | None = None
) -> Callable[..., torch.Tensor]:
    """Build the augmentation of a preset.

    Args:
        preset: ``"cifar"``, ``"imagenet"`` or ``"digits"``.
        train: the training augmentation when true, the deterministic test transform otherwise.
        image_size: output side length; ``None`` uses the preset's (32, 224, 32). For
            ``"imagenet"`` test the resize side is ``round(image_size * 256 / 224)``.

    Returns:
        A ``torchvision.transforms.Compose`` mapping a PIL RGB image to a float tensor
        ``[3, image_size, image_size]`` (``[3, H, W]`` of the input for ``"cifar"`` test
        without ``image_size``), normalized with the preset's mean/std.

    Raises:
        ValueError: unknown preset or a non-positive ``image_size``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown transform preset {preset!r}; expected one of {PRESETS}")
    if image_size is not None and image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    size = DEFAULT_SIZE[preset] if image_size is None else int(image_size)

    if preset == "cifar":
        norm = T.Normalize(CIFAR_MEAN, CIFAR_STD)
        if train:
            ops = [T.RandomResizedCrop(size, scale=(0.2, 1.0)), *_jitter_gray_flip()]
        elif image_size is None:
            ops = []
        else:
            ops = [T.Resize(size), T.CenterCrop(size)]
    elif preset == "imagenet":
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        if train:
            ops = [T.RandomResizedCrop(size, scale=(0.2, 1.0)), *_jitter_gray_flip()]
        else:
            ops = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    else:  # digits
        norm = T.Normalize(DIGITS_MEAN, DIGITS_STD)
        if train:
            ops = [
                T.RandomResizedCrop(size, scale=(0.5, 1.0)),
                T.ColorJitter(brightness=0.3, contrast=0.3),
            ]
        else:
            ops = [T.Resize((size, size))]
    return T.Compose([*ops, T.ToTensor(), norm])


def describe_test_transform(preset: str, image_size: int) -> dict[str, Any]:
    """The test transform of ``preset`` at ``image_size`` as data (what ``encoder.json``
    records under ``"preprocessing"``): the steps, the mean/std and the torchvision code
    that builds it, so an image can be encoded outside npid exactly as the service does."""
    mean, std = {
        "cifar": (CIFAR_MEAN, CIFAR_STD),
        "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
        "digits": (DIGITS_MEAN, DIGITS_STD),
    }[preset]
    if preset == "imagenet":
        resize: Any = round(image_size * 256 / 224)
        ops = [f"T.Resize({resize})", f"T.CenterCrop({image_size})"]
    elif preset == "cifar":
        resize = image_size
        ops = [f"T.Resize({image_size})", f"T.CenterCrop({image_size})"]
    else:
        resize = [image_size, image_size]
        ops = [f"T.Resize(({image_size}, {image_size}))"]
    code = (
        "from torchvision import transforms as T\n"
        f"transform = T.Compose([{', '.join(ops)}, T.ToTensor(), "
        f"T.Normalize({list(mean)}, {list(std)})])  # on an RGB PIL image"
    )
    return {
        "preset": preset,
        "image_size": image_size,
        "convert": "RGB",
        "resize": resize,
        "center_crop": None if preset == "digits" else image_size,
        "to_tensor": "float32 in [0, 1], [3, H, W]",
        "mean": list(mean),
        "std": list(std),
        "python": code,
    }
