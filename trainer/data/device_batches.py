"""Streamed batches decoded and augmented on the training device, like the in-memory path.

The shard loader's workers read (and, with ``decode="cpu"``, decode) samples; this module
turns their batches into training tensors on the device with the same batched augmentation
as :class:`trainer.data.memory_loader.CachedLoader` (:class:`trainer.data.augment.BatchTransform`,
seeded from ``(seed, epoch, rank)``), so the streamed and the in-memory paths differ only in
the order of the samples:

- ``decode="cpu"``: workers decode to uint8 pixels; a batch of one image size is a uint8
  ``[B, H, W, 3]`` tensor, moved to the device and augmented there as a whole.
- ``decode="gpu"``: workers ship the encoded bytes; :func:`decode_batch` decodes JPEGs with
  ``torchvision.io.decode_jpeg`` on the device in one batched call (other formats, and JPEGs
  it refuses, go through PIL on the CPU); then the same augmentation runs on the device.

Images of different sizes (ImageNet-style collections) are cropped one by one with the
batch's crop draws (:func:`augment_images`), then jittered and normalised as a batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.data.augment import BatchTransform, sample_crops
from trainer.data.decode import decode_image
from trainer.data.loaders import ShardLoader
from trainer.data.order import _SALT_AUGMENT, _mix

try:
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as _decode_jpeg
except ImportError:  # pragma: no cover - a torchvision without it: PIL decodes everything
    _decode_jpeg = None

logger = logging.getLogger(__name__)

DECODE_MODES = ("auto", "cpu", "gpu")
Batch = tuple[Tensor, Tensor, Tensor]


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def _pil_chw(data: bytes) -> Tensor | None:
    try:
        pixels = np.asarray(decode_image(data, fast_jpeg=False))
    except Exception:  # PIL raises many types for bad bytes
        return None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def decode_batch(encoded: Sequence[bytes], device: torch.device | str) -> list[Tensor | None]:
    """Decode images to RGB uint8 ``[3, H, W]`` tensors on ``device``.

    JPEGs are decoded by ``torchvision.io.decode_jpeg`` in one batched call on ``device``
    (nvJPEG on CUDA, libjpeg-turbo on the CPU); other formats, and a batch the batched call
    refuses, go through PIL one by one. An image that does not decode is ``None``.

    Args:
        encoded: the images' file bytes.
        device: where the pixels go.
    """
    device = torch.device(device)
    out: list[Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, data in enumerate(encoded) if _is_jpeg(data)]
    if jpegs and _decode_jpeg is not None:
        tensors = [torch.frombuffer(bytearray(encoded[i]), dtype=torch.uint8) for i in jpegs]
        try:
            decoded = _decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
            for i, image in zip(jpegs, decoded, strict=True):
                out[i] = image
        except RuntimeError:  # one bad JPEG fails the batch: decode the rest one by one
            jpegs = []
    for i, data in enumerate(encoded):
        if out[i] is None:
            image = _pil_chw(data)
            out[i] = None if image is None else image.to(device, non_blocking=True)
    return out


def augment_images(
    images: Sequence[Tensor], transform: BatchTransform, gen: torch.Generator
) -> Tensor:
    """uint8 ``[3, H_i, W_i]`` images (one device) -> float ``[B, 3, S, S]``, normalised.

    Images of one size are stacked and go through ``transform`` as a batch (bit for bit the
    in-memory path). Otherwise each is cropped (training: its own random-resized crop drawn
    from ``gen``, only the crop converted to float and resized, antialiased as PIL does;
    test: resize and centre crop) to ``S x S``, then the batch is jittered and normalised
    together. Crop parameters come from the CPU generator, so this syncs once per image on
    CUDA only for the crop's slice bounds (host values, no device read).
    """
    if len({tuple(x.shape) for x in images}) == 1:
        return transform(torch.stack(list(images)).permute(0, 2, 3, 1), gen)
    if not transform.train:
        views = [transform.test_view(x.unsqueeze(0).float().div_(255)) for x in images]
        return transform.normalize(torch.cat(views).clamp_(0, 1))
    crops = [sample_crops(1, x.shape[1], x.shape[2], transform.crop_scale, gen) for x in images]
    flip = transform.flips(len(images), gen).tolist()
    size = transform.size
    views = []
    for x, c, mirror in zip(images, crops, flip, strict=True):
        t, left, h, w = int(c.top), int(c.left), int(c.height), int(c.width)
        patch = x[None, :, t : t + h, left : left + w].float().div_(255)  # only the crop
        view = F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True)
        views.append(view.flip(-1) if mirror else view)
    x = torch.cat(views).clamp_(0, 1)
    return transform.normalize(transform.photometric(x, gen))


class DeviceBatches:
    """A :class:`ShardLoader` (made with ``output="pixels"`` or ``"bytes"``) whose batches
    are decoded (bytes) and augmented on ``device``: ``(images [B, 3, S, S] float on device,
    ids [B], labels [B])``. Same interface as the loader (``set_epoch``, ``len``,
    ``skipped``, ``epoch_skipped``, ``index``)."""

    def __init__(
        self,
        loader: ShardLoader,
        transform: BatchTransform,
        device: torch.device | str,
        seed: int = 0,
        rank: int = 0,
    ):
        self.loader = loader
        self.transform = transform
        self.device = torch.device(device)
        self.seed = seed
        self.rank = rank
        self.skipped = 0
        self.epoch_skipped = 0

    @property
    def index(self):
        return self.loader.index

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(
            _mix(self.seed, self.loader.epoch, self.rank, 0, _SALT_AUGMENT)
        )
        undecodable = 0
        pin = self.device.type == "cuda"
        for payload, ids, labels in self.loader:
            if isinstance(payload, Tensor):  # uint8 [B, H, W, 3] from the workers
                pixels = payload.pin_memory() if pin else payload
                x = self.transform(pixels.to(self.device, non_blocking=True), gen)
            else:
                images = decode_batch(payload, self.device)
                keep = [i for i, image in enumerate(images) if image is not None]
                undecodable += len(images) - len(keep)
                if not keep:
                    continue
                if len(keep) < len(images):
                    ids, labels = ids[keep], labels[keep]
                x = augment_images([images[i] for i in keep], self.transform, gen)
            yield x, ids, labels
        self.epoch_skipped = self.loader.epoch_skipped + undecodable
        self.skipped = self.loader.skipped + undecodable


def resolve_decode(decode: str, device: torch.device, fixed_size: bool, cached: bool) -> str:
    """``cpu`` or ``gpu`` for ``--decode``: ``auto`` is ``gpu`` when training on CUDA from
    streamed images (not the decoded cache) of varying size, else ``cpu``; ``gpu`` without CUDA
    falls back to ``cpu`` with a one-line notice."""
    if decode not in DECODE_MODES:
        raise ValueError(f"--decode must be one of {DECODE_MODES}, got {decode!r}")
    if decode == "gpu" and device.type != "cuda":
        logger.warning("--decode gpu: no CUDA device here; decoding JPEGs on the CPU")
        return "cpu"
    if decode == "auto":
        return "gpu" if device.type == "cuda" and not cached and not fixed_size else "cpu"
    return decode
