"""Batched augmentation: the presets of :mod:`trainer.data.transforms` on whole uint8 batches.

:func:`build_batch_transform` maps a batch of decoded images, uint8 ``[B, H, W, 3]`` on any
device, to the normalized float ``[B, 3, S, S]`` that
:func:`trainer.data.transforms.build_transform` gives image by image, with independent
random parameters per sample drawn exactly as torchvision draws them:

- ``RandomResizedCrop(S, scale, ratio=(3/4, 4/3))``: ten attempts at an area fraction
  ``U(scale)`` and a log-uniform aspect ratio, the first one that fits, else the central
  fallback; the crop is resampled bilinearly (``grid_sample`` for up-scaling, PIL's
  pixel-centre convention; an antialiased ``interpolate`` where a crop is larger than ``S``);
- ``ColorJitter(b, c, s, h)``: factors ``U(1 - x, 1 + x)`` (hue ``U(-h, h)``) applied in a
  random order per sample, as torchvision's ``ColorJitter`` does per image;
- ``RandomGrayscale(p)``, ``RandomHorizontalFlip()`` (folded into the crop's sampling grid);
- ``ToTensor`` + ``Normalize``.

The PIL path rounds to 8 bits after each colour operation and this one computes in float,
so single images differ by rounding; the distributions agree (``tests/test_augment.py``
compares crop areas, aspect ratios, colour moments, grayscale and flip rates with the PIL
path on the same images). Parameters are drawn on the CPU from the caller's generator, so a
run is reproducible on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.data.transforms import (
    CIFAR_MEAN,
    CIFAR_STD,
    DEFAULT_SIZE,
    DIGITS_MEAN,
    DIGITS_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
)

RATIO = (3 / 4, 4 / 3)
_GRAY = (0.299, 0.587, 0.114)  # PIL's "L" conversion (ITU-R 601-2 luma)


@dataclass(frozen=True)
class CropParams:
    """Per-sample crops, int64 ``[B]`` each: top row, left column, height, width."""

    top: Tensor
    left: Tensor
    height: Tensor
    width: Tensor


def sample_crops(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    generator: torch.Generator,
    ratio: tuple[float, float] = RATIO,
) -> CropParams:
    """torchvision's ``RandomResizedCrop.get_params`` for ``batch`` images of ``height×width``.

    Ten attempts per sample (area ``U(scale)·H·W``, ``log ratio ~ U(log r0, log r1)``), the
    first whose rounded sides fit; samples with none take torchvision's central fallback.
    """
    attempts = 10
    area = height * width
    u = torch.rand(batch, attempts, 4, generator=generator, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(fits.int(), dim=1)  # the first attempt that fits (0 if none)
    rows = torch.arange(batch)
    ok = fits[rows, first]
    w, h = w[rows, first], h[rows, first]
    top = torch.floor(u[rows, first, 2] * (height - h + 1)).long()
    left = torch.floor(u[rows, first, 3] * (width - w + 1)).long()
    # torchvision's fallback: a central crop of the largest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fh, fw = height, round(height * max(ratio))
    else:
        fw, fh = width, height
    fallback = ~ok
    w = torch.where(fallback, torch.full_like(w, fw), w)
    h = torch.where(fallback, torch.full_like(h, fh), h)
    top = torch.where(fallback, torch.full_like(top, (height - fh) // 2), top)
    left = torch.where(fallback, torch.full_like(left, (width - fw) // 2), left)
    return CropParams(top, left, h, w)


def resized_crops(images: Tensor, crops: CropParams, size: int, flip: Tensor) -> Tensor:
    """Crop each image of ``images`` float ``[B, C, H, W]`` and resize it to ``size×size``
    (bilinear; antialiased where the crop is larger than ``size``), mirrored where ``flip``
    ``[B]`` bool is set. Returns ``[B, C, size, size]``."""
    height, width = images.shape[-2:]
    dev = images.device
    steps = (torch.arange(size, device=dev, dtype=torch.float32) + 0.5) / size  # [S]
    top, left = crops.top.to(dev).float(), crops.left.to(dev).float()
    h, w = crops.height.to(dev).float(), crops.width.to(dev).float()
    # Sample points in pixel-index space, kept inside the crop (PIL resizes the crop alone).
    left, top, w, h = left.unsqueeze(1), top.unsqueeze(1), w.unsqueeze(1), h.unsqueeze(1)
    px = (left + steps * w - 0.5).clamp(left, left + w - 1)
    py = (top + steps * h - 0.5).clamp(top, top + h - 1)
    gx = (px + 0.5) * (2 / width) - 1  # [B, S], grid_sample's align_corners=False coordinates
    gy = (py + 0.5) * (2 / height) - 1
    flip = flip.to(dev)
    gx = torch.where(flip.unsqueeze(1), gx.flip(1), gx)
    grid = torch.stack(torch.broadcast_tensors(gx.unsqueeze(1), gy.unsqueeze(2)), dim=-1)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    shrink = torch.nonzero((crops.height > size) | (crops.width > size)).squeeze(1).tolist()
    for b in shrink:  # downscaling: antialias as PIL does
        t, lf = int(crops.top[b]), int(crops.left[b])
        hh, ww = int(crops.height[b]), int(crops.width[b])
        patch = images[b : b + 1, :, t : t + hh, lf : lf + ww]
        patch = F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True)
        out[b] = patch[0].flip(-1) if bool(flip[b]) else patch[0]
    return out


def grayscale(images: Tensor) -> Tensor:
    """Luma of ``[B, 3, H, W]`` as ``[B, 1, H, W]`` (PIL's weights)."""
    r, g, b = images.unbind(dim=1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * images + (1 - f) * other).clamp_(0, 1)


def adjust_hue(images: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of ``[B, 3, H, W]`` in ``[0, 1]`` by ``shift`` ``[B]`` (turns).

    HSV keeps each pixel's max ``M`` and min ``m``; the rotated pixel is
    ``m + (M - m)·pure(h + shift)`` with ``pure`` the fully saturated colour of a hue.
    """
    r, g, b = images[:, 0], images[:, 1], images[:, 2]
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)
    h = torch.where(maxc == r, (g - b) / safe, h)
    h6 = torch.remainder(h + 6.0 * shift.view(-1, 1, 1), 6.0)  # hue in sixths of a turn
    pure_r = ((h6 - 3.0).abs_() - 1.0).clamp_(0, 1)
    pure_g = (2.0 - (h6 - 2.0).abs_()).clamp_(0, 1)
    pure_b = (2.0 - (h6 - 4.0).abs_()).clamp_(0, 1)
    pure = torch.stack((pure_r, pure_g, pure_b), dim=1)
    return minc.unsqueeze(1) + delta.unsqueeze(1) * pure


def color_jitter(
    images: Tensor, strength: tuple[float, float, float, float], generator: torch.Generator
) -> Tensor:
    """torchvision's ``ColorJitter(*strength)`` on each image of ``[B, 3, H, W]`` in ``[0, 1]``,
    with its own factors and its own random order of the four operations."""
    batch, dev = images.shape[0], images.device
    u = torch.rand(batch, 4, generator=generator)
    order = torch.argsort(torch.rand(batch, 4, generator=generator), dim=1)  # a randperm each
    factors = []
    for k, x in enumerate(strength):
        low, high = (-x, x) if k == 3 else (max(0.0, 1 - x), 1 + x)
        factors.append((low + (high - low) * u[:, k]).to(dev))
    for position in range(4):
        for op, x in enumerate(strength):
            if not x:
                continue
            sel = torch.nonzero(order[:, position] == op).squeeze(1).to(dev)
            if sel.numel() == 0:
                continue
            part, f = images.index_select(0, sel), factors[op].index_select(0, sel)
            if op == 0:  # brightness: blend with black
                part = (part * f.view(-1, 1, 1, 1)).clamp_(0, 1)
            elif op == 1:  # contrast: blend with the mean gray level
                part = _blend(part, grayscale(part).mean(dim=(1, 2, 3), keepdim=True), f)
            elif op == 2:  # saturation: blend with the grayscale image
                part = _blend(part, grayscale(part), f)
            else:
                part = adjust_hue(part, f)
            images = images.index_copy(0, sel, part)
    return images


@dataclass(frozen=True)
class BatchTransform:
    """A preset's transform on uint8 ``[B, H, W, 3]`` batches; see the module docstring."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train: bool
    crop_scale: tuple[float, float] = (0.2, 1.0)
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    gray_p: float = 0.0
    flip: bool = False
    test_resize: int | None = None
    """Test transform: resize the shorter side to this (``None``: keep), then centre-crop."""

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``images`` uint8 ``[B, H, W, 3]`` (any device) -> float ``[B, 3, S, S]`` there."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"expected uint8 [B, H, W, 3] images, got {images.dtype} {tuple(images.shape)}"
            )
        x = images.permute(0, 3, 1, 2).float().div_(255)
        if self.train:
            x = self._augment(x, generator if generator is not None else torch.Generator())
        else:
            x = self._test(x)
        return self.normalize(x)

    def normalize(self, x: Tensor) -> Tensor:
        """``(x - mean) / std`` of float ``[B, 3, S, S]`` in ``[0, 1]`` (in place)."""
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std).contiguous()

    def flips(self, batch: int, gen: torch.Generator) -> Tensor:
        """The mirror draws of a batch, bool ``[B]`` (all false without flips)."""
        flip = torch.rand(batch, generator=gen) < 0.5
        return flip if self.flip else flip.zero_()

    def _augment(self, x: Tensor, gen: torch.Generator) -> Tensor:
        batch, _, height, width = x.shape
        crops = sample_crops(batch, height, width, self.crop_scale, gen)
        flip = self.flips(batch, gen)
        x = resized_crops(x, crops, self.size, flip).clamp_(0, 1)
        return self.photometric(x, gen)

    def photometric(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """Colour jitter and random grayscale of float ``[B, 3, S, S]`` in ``[0, 1]``."""
        batch = x.shape[0]
        if any(self.jitter):
            x = color_jitter(x, self.jitter, gen)
        if self.gray_p > 0:
            gray = (torch.rand(batch, generator=gen) < self.gray_p).to(x.device)
            x = torch.where(gray.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
        return x

    def test_view(self, x: Tensor) -> Tensor:
        """The test geometry of float ``[B, 3, H, W]``: shorter side to ``test_resize``, then
        a centre ``size`` crop (a resize when smaller). Returns ``[B, 3, S, S]``."""
        return self._test(x)

    def _test(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        if self.test_resize is not None and min(height, width) != self.test_resize:
            short = self.test_resize
            new = (
                (short, round(width * short / height))
                if height <= width
                else (round(height * short / width), short)
            )
            x = F.interpolate(x, size=new, mode="bilinear", antialias=True, align_corners=False)
            x = x.clamp_(0, 1)
            height, width = new
        if (height, width) != (self.size, self.size):
            if height < self.size or width < self.size:
                x = F.interpolate(
                    x, size=(self.size, self.size), mode="bilinear", align_corners=False
                )
            else:
                top, left = (height - self.size) // 2, (width - self.size) // 2
                x = x[..., top : top + self.size, left : left + self.size]
        return x


def build_batch_transform(
    preset: str, train: bool, image_size: int | None = None
) -> BatchTransform:
    """The batched twin of :func:`trainer.data.transforms.build_transform` (same arguments)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown transform preset {preset!r}; expected one of {PRESETS}")
    if image_size is not None and image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    size = DEFAULT_SIZE[preset] if image_size is None else int(image_size)
    if preset == "digits":
        return BatchTransform(
            size,
            DIGITS_MEAN,
            DIGITS_STD,
            train,
            crop_scale=(0.5, 1.0),
            jitter=(0.3, 0.3, 0.0, 0.0),
            test_resize=None,
        )
    mean, std = (CIFAR_MEAN, CIFAR_STD) if preset == "cifar" else (IMAGENET_MEAN, IMAGENET_STD)
    if preset == "cifar":
        test_resize = None if image_size is None else size
    else:
        test_resize = round(size * 256 / 224)
    return BatchTransform(
        size,
        mean,
        std,
        train,
        crop_scale=(0.2, 1.0),
        jitter=(0.4, 0.4, 0.4, 0.4),
        gray_p=0.2,
        flip=True,
        test_resize=test_resize,
    )


__all__ = [
    "BatchTransform",
    "CropParams",
    "adjust_hue",
    "build_batch_transform",
    "color_jitter",
    "grayscale",
    "resized_crops",
    "sample_crops",
]
