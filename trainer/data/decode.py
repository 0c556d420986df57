"""Decoding a sample's image to RGB, and the batched ``ToTensor``/``Normalize`` tail.

Every image becomes RGB first (:func:`decode_image`, any PIL mode including ``I;16``).
Speed without changing a pixel: JPEG bytes are decoded by torchvision's libjpeg-turbo decoder
when it gives the same pixels as PIL (1 or 3 channels), PIL otherwise; a transform ending in
``ToTensor`` (+ ``Normalize``) has that tail applied once per batch, bit-identical to per
sample (:class:`_TensorTail`).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import Compose, Normalize, ToTensor

try:  # torchvision's libjpeg-turbo decoder (deprecated in 0.29 in favour of torchcodec)
    from torchvision.io import decode_jpeg as _decode_jpeg

    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision.io.image")
except ImportError:  # pragma: no cover - a torchvision without it: PIL decodes everything
    _decode_jpeg = None

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm")


# --------------------------------------------------------------------------- decoding


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB. 16/32-bit integer modes (``I;16*``, ``I``) keep their top 8 bits
    of ``0..65535`` (plain ``convert`` would clip them); palette transparency goes through
    RGBA; everything else is ``Image.convert("RGB")`` (alpha dropped, CMYK converted)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
        return Image.fromarray(values.astype(np.uint8), "L").convert("RGB")
    if mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def decode_image(data: bytes, fast_jpeg: bool = True) -> Image.Image:
    """Decode image bytes to a PIL RGB image (fully loaded).

    Args:
        data: encoded image (any format PIL reads).
        fast_jpeg: decode 1- and 3-channel JPEGs with torchvision's libjpeg-turbo decoder,
            which gives the same pixels as PIL, faster (when this torchvision has it);
            anything else goes through PIL.

    Raises:
        Exception: whatever PIL raises for bytes that do not decode.
    """
    if fast_jpeg and _decode_jpeg is not None and data[:3] == b"\xff\xd8\xff":
        try:
            chw = _decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except RuntimeError:
            chw = None  # let PIL decide (and raise for truly broken data)
        if chw is not None and chw.shape[0] == 3:
            return Image.fromarray(chw.permute(1, 2, 0).contiguous().numpy(), "RGB")
        if chw is not None and chw.shape[0] == 1:
            return Image.fromarray(chw[0].numpy(), "L").convert("RGB")
    image = Image.open(io.BytesIO(data))
    image.load()
    return to_rgb(image)


class _BadSampleError(Exception):
    """A sample lacks a field or its bytes do not decode."""


def _image_field(fields: dict[str, bytes]) -> bytes:
    """The image bytes of a sample (the first of :data:`IMAGE_FIELDS` present). Labels come
    from the index (make_shards' ``cls``, or whatever field an index of existing shards
    took them from), so a sample needs nothing but its image."""
    image = next((fields[ext] for ext in IMAGE_FIELDS if ext in fields), None)
    if image is None:
        raise _BadSampleError(f"no image field (fields: {sorted(fields)})")
    return image


# --------------------------------------------------------------------------- collation


class _TensorTail:
    """A transform's trailing ``ToTensor`` (+ ``Normalize``), applied to a whole batch.

    ``ToTensor`` and ``Normalize`` are elementwise (``x / 255``, ``(x - mean) / std`` in
    float32), so running them once on the stacked uint8 batch gives bit-identical results
    with far less per-sample overhead.
    """

    def __init__(self, ops: Compose, mean: Sequence[float] | None, std: Sequence[float] | None):
        self.ops = ops  # the original per-sample ops, for images that are not 8-bit RGB/L
        dtype = torch.get_default_dtype()
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=dtype).view(1, -1, 1, 1)
        self.std = None if std is None else torch.as_tensor(std, dtype=dtype).view(1, -1, 1, 1)

    @staticmethod
    def split(transform: Callable) -> tuple[Callable, _TensorTail | None]:
        """``(PIL part, tail)`` of a ``Compose`` ending in ``ToTensor[, Normalize]``, else
        ``(transform, None)``."""
        if not isinstance(transform, Compose):
            return transform, None
        ops = list(transform.transforms)
        mean = std = None
        if ops and isinstance(ops[-1], Normalize):
            mean, std = ops[-1].mean, ops[-1].std
            ops.pop()
            if isinstance(mean, torch.Tensor) or isinstance(std, torch.Tensor):
                return transform, None
            if any(v == 0 for v in np.atleast_1d(std)):
                return transform, None
        if not ops or type(ops[-1]) is not ToTensor:
            return transform, None
        tail = transform.transforms[len(ops) - 1 :]
        return Compose(ops[:-1]), _TensorTail(Compose(tail), mean, std)

    def __call__(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """uint8 ``[H, W, C]`` arrays -> float ``[B, C, H, W]``."""
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        x = x.to(torch.get_default_dtype()).div_(255)
        if self.mean is not None:
            x = x.sub_(self.mean).div_(self.std)
        return x


def _uint8_hwc(image: Any) -> np.ndarray | None:
    """The uint8 ``[H, W, C]`` pixels of an 8-bit RGB/L PIL image, else ``None``."""
    if not isinstance(image, Image.Image) or image.mode not in ("RGB", "L"):
        return None
    pixels = np.asarray(image)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels
