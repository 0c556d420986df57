"""Streamed batches decoded and augmented on the device (run here on the CPU)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data import train_loader
from trainer.data.augment import build_batch_transform, resized_crops, sample_crops
from trainer.data.decode import decode_image
from trainer.data.device_batches import (
    DeviceBatches,
    augment_images,
    decode_batch,
    resolve_decode,
)
from trainer.shards.make import make_shards

TOLERANCE = 2  # libjpeg-turbo (torchvision) against PIL's libjpeg: rounding of the IDCT


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth image (JPEG decoders agree closely on it) with some noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], -1)
    return np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)


def _pil(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.asarray(decode_image(data, fast_jpeg=False)).copy()).permute(2, 0, 1)


def test_decode_batch_matches_pil_within_jpeg_tolerance() -> None:
    files = [_encode(_smooth(40 + i, 50 - i, i), "JPEG") for i in range(4)]
    files.append(_encode(_smooth(20, 30, 9), "PNG"))  # not a JPEG: PIL
    gray = _encode(_smooth(16, 16, 3)[..., 0], "JPEG")  # one channel: RGB out
    files += [gray, b"\xff\xd8\xff broken"]
    out = decode_batch(files, "cpu")
    assert out[-1] is None  # does not decode (and does not fail the batch)
    for data, image in zip(files[:-1], out[:-1], strict=True):
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        diff = (image.int() - _pil(data).int()).abs().max()
        assert diff <= TOLERANCE, diff
    assert torch.equal(out[4], _pil(files[4]))  # PNG: exactly PIL's pixels


def test_same_size_batches_are_the_in_memory_transform_bit_for_bit() -> None:
    images = [torch.from_numpy(_smooth(12, 12, i)).permute(2, 0, 1) for i in range(6)]
    tf = build_batch_transform("cifar", train=True, image_size=8)
    got = augment_images(images, tf, torch.Generator().manual_seed(3))
    want = tf(torch.stack(images).permute(0, 2, 3, 1), torch.Generator().manual_seed(3))
    assert torch.equal(got, want)


@pytest.mark.parametrize("train", [True, False])
def test_varying_sizes_crop_each_image_like_the_reference(train: bool) -> None:
    """Both decoders, same bytes, same crop draws: the same crops within JPEG tolerance."""
    files = [_encode(_smooth(60 + 7 * i, 80 - 5 * i, i), "JPEG") for i in range(4)]
    tf = build_batch_transform("imagenet", train=train, image_size=32)
    decoded = decode_batch(files, "cpu")
    got = augment_images(decoded, tf, torch.Generator().manual_seed(1))
    assert got.shape == (4, 3, 32, 32)
    gen = torch.Generator().manual_seed(1)
    refs = [_pil(f).unsqueeze(0).float().div(255) for f in files]
    if train:
        crops = [sample_crops(1, r.shape[2], r.shape[3], tf.crop_scale, gen) for r in refs]
        flip = tf.flips(4, gen)
        views = [
            resized_crops(r, c, 32, flip[b : b + 1]) for b, (r, c) in enumerate(zip(refs, crops))
        ]
        want = tf.normalize(tf.photometric(torch.cat(views).clamp(0, 1), gen))
    else:
        want = tf.normalize(torch.cat([tf.test_view(r) for r in refs]).clamp(0, 1))
    std = torch.tensor(tf.std).view(1, 3, 1, 1)
    assert ((got - want).abs() * std).max() <= TOLERANCE / 255 + 1e-5


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("jpeg")
    for c in range(3):
        (root / "src" / f"c{c}").mkdir(parents=True)
        for i in range(10):
            (root / "src" / f"c{c}" / f"{i}.jpg").write_bytes(
                _encode(_smooth(16, 16, 10 * c + i), "JPEG")
            )
    make_shards(root / "src", root / "shards", shard_size=12, progress=False)
    return root / "shards"


def test_bytes_and_pixels_loaders_give_the_same_batches(jpeg_shards: Path) -> None:
    """Decoding in the workers (PIL) or batched on the device (decode_jpeg): same order, same
    augmentation draws, the same pixels within JPEG tolerance."""
    tf = build_batch_transform("cifar", train=True, image_size=12)
    runs = {}
    for output in ("pixels", "bytes"):
        loader = train_loader(jpeg_shards, 8, num_workers=2, seed=4, output=output, fast_jpeg=False)
        batches = DeviceBatches(loader, tf, "cpu", seed=4)
        batches.set_epoch(1)
        runs[output] = list(batches)
        assert len(runs[output]) == len(batches) == 4
    for (xa, ia, ya), (xb, ib, yb) in zip(runs["pixels"], runs["bytes"], strict=True):
        assert torch.equal(ia, ib) and torch.equal(ya, yb)
        std = torch.tensor(tf.std).view(1, 3, 1, 1)
        assert ((xa - xb).abs() * std).max() <= TOLERANCE / 255 + 1e-5


def test_resolve_decode(caplog: pytest.LogCaptureFixture) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with caplog.at_level(logging.WARNING):
        assert resolve_decode("gpu", cpu, fixed_size=False, cached=False) == "cpu"
    assert "no CUDA device" in caplog.text
    assert resolve_decode("auto", cuda, fixed_size=False, cached=False) == "gpu"
    assert resolve_decode("auto", cuda, fixed_size=True, cached=False) == "cpu"
    assert resolve_decode("auto", cpu, fixed_size=False, cached=False) == "cpu"
    with pytest.raises(ValueError, match="--decode"):
        resolve_decode("tpu", cpu, fixed_size=False, cached=False)
