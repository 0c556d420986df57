"""trainer.data.transforms: the presets against the reference lemniscate augmentations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from trainer.data.transforms import (
    CIFAR_MEAN,
    CIFAR_STD,
    DIGITS_MEAN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_transform,
)


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _ops(transform) -> list[type]:
    return [type(op) for op in transform.transforms]


def _normalized(image: Image.Image, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image).astype(np.float32) / 255).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


# ids must not be exactly "cifar": conftest skips items with that keyword (the opt-in marker).
@pytest.mark.parametrize("preset", ["cifar", "imagenet"], ids=lambda p: f"{p}-train")
def test_train_presets_follow_the_reference(preset: str) -> None:
    tf = build_transform(preset, train=True)
    assert _ops(tf) == [
        T.RandomResizedCrop,
        T.ColorJitter,
        T.RandomGrayscale,
        T.RandomHorizontalFlip,
        T.ToTensor,
        T.Normalize,
    ]
    crop, jitter, gray, _, _, norm = tf.transforms
    assert crop.size == ((32, 32) if preset == "cifar" else (224, 224))
    assert crop.scale == (0.2, 1.0)
    assert (jitter.brightness, jitter.contrast, jitter.saturation) == ((0.6, 1.4),) * 3
    assert jitter.hue == (-0.4, 0.4)
    assert gray.p == 0.2
    mean, std = (CIFAR_MEAN, CIFAR_STD) if preset == "cifar" else (IMAGENET_MEAN, IMAGENET_STD)
    assert tuple(norm.mean) == mean and tuple(norm.std) == std


def test_cifar_test_is_exactly_normalize() -> None:
    image = _image(32, 32)
    out = build_transform("cifar", train=False)(image)
    assert torch.allclose(out, _normalized(image, CIFAR_MEAN, CIFAR_STD), atol=1e-6)


def test_imagenet_test_resizes_and_center_crops() -> None:
    tf = build_transform("imagenet", train=False)
    assert _ops(tf) == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert tf.transforms[0].size == 256 and tf.transforms[1].size == (224, 224)
    assert tf(_image(300, 500)).shape == (3, 224, 224)
    assert build_transform("imagenet", False, image_size=112).transforms[0].size == 128


@pytest.mark.parametrize("preset", ["cifar", "imagenet", "digits"])
@pytest.mark.parametrize("train", [True, False])
def test_output_shape_and_size_override(preset: str, train: bool) -> None:
    size = {"cifar": 32, "imagenet": 224, "digits": 32}[preset]
    source = _image(8, 8) if preset == "digits" else _image(size, size)
    out = build_transform(preset, train)(source)
    assert out.dtype == torch.float32 and out.shape == (3, size, size)
    assert build_transform(preset, train, image_size=48)(_image(60, 50)).shape == (3, 48, 48)


def test_digits_is_light_and_never_flips() -> None:
    train = build_transform("digits", train=True)
    assert T.RandomHorizontalFlip not in _ops(train)
    assert train.transforms[0].scale == (0.5, 1.0)
    test = build_transform("digits", train=False)
    digit = Image.fromarray(np.tile(np.arange(8, dtype=np.uint8) * 30, (8, 1))).convert("RGB")
    out = test(digit)
    assert out.shape == (3, 32, 32)
    assert torch.equal(out, test(digit))  # deterministic
    assert tuple(test.transforms[-1].mean) == DIGITS_MEAN


def test_train_is_random_test_is_not() -> None:
    image = _image(40, 40)
    train = build_transform("cifar", train=True)
    torch.manual_seed(0)
    a = train(image)
    torch.manual_seed(0)
    assert torch.equal(a, train(image))
    assert not torch.equal(a, train(image))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="preset"):
        build_transform("mnist", train=True)
    with pytest.raises(ValueError, match="image_size"):
        build_transform("cifar", train=True, image_size=0)
