"""Batched augmentation against torchvision's per-image PIL path (trainer.data.transforms).

Exact where both compute the same thing (crop geometry, hue rotation, test transforms, up
to PIL's 8-bit rounding); equal in distribution where they draw (crop areas and aspect
ratios, colour moments, grayscale and flip rates).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

from trainer.data.augment import (
    CropParams,
    adjust_hue,
    build_batch_transform,
    color_jitter,
    grayscale,
    resized_crops,
    sample_crops,
)
from trainer.data.transforms import CIFAR_MEAN, CIFAR_STD, build_transform


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 ``[n, size, size, 3]``: smooth colour gradients plus a block and noise, so
    that crops, flips and colour changes all show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        img = np.stack([a * xx, b * yy, c * (1 - xx) * yy], axis=-1) * 255
        r0, c0 = rng.integers(0, size // 2, 2)
        img[r0 : r0 + size // 4, c0 : c0 + size // 3] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 8, img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return torch.from_numpy(out)


def _pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(x.numpy()) for x in images]


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (values rounded to 1e-5: grayscale images sit
    exactly at 0 in some statistics, up to float noise that must not count)."""
    a, b = np.round(a, 5), np.round(b, 5)
    grid = np.sort(np.concatenate([a, b]))
    ca = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(ca - cb).max())


@pytest.mark.parametrize(("size", "scale"), [((32, 32), (0.2, 1.0)), ((24, 40), (0.08, 1.0))])
def test_crop_parameters_follow_torchvision(size, scale):
    h, w = size
    n = 4000
    crops = sample_crops(n, h, w, scale, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    img = torch.zeros(3, h, w)
    ref = np.array([T.RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3)) for _ in range(n)])
    ours = np.stack([c.numpy() for c in (crops.top, crops.left, crops.height, crops.width)], 1)
    assert (ours[:, 2] >= 1).all() and (ours[:, 0] + ours[:, 2] <= h).all()
    assert (ours[:, 3] >= 1).all() and (ours[:, 1] + ours[:, 3] <= w).all()
    area = lambda p: p[:, 2] * p[:, 3] / (h * w)  # noqa: E731
    ratio = lambda p: np.log(p[:, 3] / p[:, 2])  # noqa: E731
    offset = lambda p: (p[:, 0] + p[:, 2] / 2) / h  # noqa: E731
    for stat in (area, ratio, offset):
        assert _ks(stat(ours), stat(ref)) < 0.05


def test_crop_fallback_is_torchvision_central_crop():
    # no area in (2, 3) x H x W fits: every sample takes the fallback
    crops = sample_crops(5, 20, 40, (2.0, 3.0), torch.Generator().manual_seed(0))
    ref = T.RandomResizedCrop.get_params(torch.zeros(3, 20, 40), (2.0, 3.0), (3 / 4, 4 / 3))
    for field, want in zip(("top", "left", "height", "width"), ref):
        assert getattr(crops, field).tolist() == [want] * 5


@pytest.mark.parametrize("crop", [(0, 0, 32, 32), (3, 5, 10, 20), (10, 2, 17, 9), (0, 0, 7, 7)])
@pytest.mark.parametrize("flip", [False, True])
def test_resized_crop_equals_pil_up_to_rounding(crop, flip):
    images = _images(1)
    x = images.permute(0, 3, 1, 2).float() / 255
    params = CropParams(*(torch.tensor([v]) for v in crop))
    out = resized_crops(x, params, 32, torch.tensor([flip]))[0]
    ref = TF.resized_crop(_pil(images)[0], *crop, [32, 32])
    if flip:
        ref = TF.hflip(ref)
    assert float((out - TF.to_tensor(ref)).abs().max()) <= 1.5 / 255


def test_downscaling_crop_is_antialiased():
    images = _images(1, size=64)
    x = images.permute(0, 3, 1, 2).float() / 255
    params = CropParams(*(torch.tensor([v]) for v in (4, 6, 50, 40)))
    out = resized_crops(x, params, 16, torch.tensor([False]))[0]
    ref = TF.to_tensor(TF.resized_crop(_pil(images)[0], 4, 6, 50, 40, [16, 16]))
    assert float((out - ref).abs().mean()) < 2 / 255


@pytest.mark.parametrize("shift", [-0.4, -0.13, 0.0, 0.25, 0.4])
def test_hue_rotation_equals_torchvision(shift):
    x = _images(2).permute(0, 3, 1, 2).float() / 255
    out = adjust_hue(x, torch.full((2,), shift))
    for i in range(2):
        torch.testing.assert_close(out[i], TF.adjust_hue(x[i], shift), atol=1e-4, rtol=0)


def test_jitter_of_strength_zero_is_identity_and_factors_differ_per_sample():
    x = _images(8).permute(0, 3, 1, 2).float() / 255
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(color_jitter(x.clone(), (0, 0, 0, 0), gen), x)
    same = x[:1].expand(8, -1, -1, -1).clone()
    out = color_jitter(same, (0.4, 0.4, 0.4, 0.4), gen)
    assert len({round(float(v), 5) for v in out.mean(dim=(1, 2, 3))}) == 8


def _stats(x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image statistics of ``[n, 3, H, W]`` in [0, 1]."""
    maxc, minc = x.max(dim=1).values, x.min(dim=1).values
    sat = ((maxc - minc) / maxc.clamp_min(1e-6)).mean(dim=(1, 2))
    luma = grayscale(x)[:, 0]
    hue_x = torch.stack([x[:, 0] - 0.5 * (x[:, 1] + x[:, 2]), (x[:, 1] - x[:, 2]) * 0.866], 1)
    return {
        "brightness": x.mean(dim=(1, 2, 3)).numpy(),
        "contrast": luma.std(dim=(1, 2)).numpy(),
        "saturation": sat.numpy(),
        "hue_cos": hue_x[:, 0].mean(dim=(1, 2)).numpy(),
        "hue_sin": hue_x[:, 1].mean(dim=(1, 2)).numpy(),
        "gray": ((maxc - minc).amax(dim=(1, 2)) < 1e-6).numpy(),
        "left_right": (x[..., : x.shape[-1] // 2].mean(dim=(1, 2, 3))
                       - x[..., x.shape[-1] // 2 :].mean(dim=(1, 2, 3))).numpy(),
    }  # fmt: skip


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def test_cifar_preset_draws_the_distribution_of_the_pil_path():
    images = _images(40, seed=3)
    repeats = 50
    batch = images.repeat(repeats, 1, 1, 1)
    ours = _unnormalize(
        build_batch_transform("cifar", True)(batch, torch.Generator().manual_seed(1))
    )
    torch.manual_seed(1)
    pil_tf = build_transform("cifar", True)
    ref = _unnormalize(torch.stack([pil_tf(p) for p in _pil(images) * repeats]))
    a, b = _stats(ours), _stats(ref)
    assert abs(a["gray"].mean() - 0.2) < 0.03 and abs(b["gray"].mean() - 0.2) < 0.03
    for key in ("brightness", "contrast", "saturation", "hue_cos", "hue_sin", "left_right"):
        assert _ks(a[key], b[key]) < 0.06, key
        assert abs(a[key].mean() - b[key].mean()) < 0.1 * b[key].std() + 1e-3, key


def test_flip_rate_is_one_half():
    images = _images(1).repeat(2000, 1, 1, 1)
    tf = build_batch_transform("cifar", True)
    plain = type(tf)(tf.size, tf.mean, tf.std, True, crop_scale=(1.0, 1.0), flip=True)
    out = plain(images, torch.Generator().manual_seed(0))
    base = build_batch_transform("cifar", False)(images[:1])
    flipped = (out - base.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    kept = (out - base).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((flipped | kept).all())
    assert abs(float(flipped.float().mean()) - 0.5) < 0.04


@pytest.mark.parametrize(("preset", "size"), [("cifar", 32), ("digits", 8)])
def test_test_transform_equals_the_pil_test_transform(preset, size):
    images = _images(4, size=size)
    out = build_batch_transform(preset, False)(images)
    ref = torch.stack([build_transform(preset, False)(p) for p in _pil(images)])
    assert out.shape == ref.shape
    std = max(build_batch_transform(preset, False).std)
    assert float((out - ref).abs().max()) <= 1.5 / 255 / std


def test_imagenet_test_transform_resizes_and_centre_crops():
    images = _images(2, size=80)
    out = build_batch_transform("imagenet", False, image_size=64)(images)
    ref = torch.stack([build_transform("imagenet", False, image_size=64)(p) for p in _pil(images)])
    assert out.shape == ref.shape == (2, 3, 64, 64)
    assert float((out - ref).abs().mean()) < 0.05


def test_same_generator_same_batch_and_bad_input():
    images = _images(6)
    tf = build_batch_transform("cifar", True)
    a = tf(images, torch.Generator().manual_seed(5))
    b = tf(images, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="uint8"):
        tf(images.float())
    with pytest.raises(ValueError, match="unknown transform preset"):
        build_batch_transform("nope", True)
    assert not math.isnan(float(a.mean()))
