"""Validation of the kNN service's JSON requests (pure: no HTTP, no index).

A query body is a JSON object with exactly one of

- ``"vectors"``: a list of ``Q`` lists of ``d`` finite numbers (``1 <= Q <= max_queries``);
- ``"image"``: one base64-encoded image file (any format PIL reads), or ``"images"``: a list of
  them (encoded with the service's encoder and test transform);
- ``"ids"``: a list of training instance ids, whose bank rows are the queries ("more like
  this"; an instance is its own first neighbour);

plus ``"k"`` (int, default 10) and, for ``/classify``, ``"temperature"`` (finite number
> 0, default 0.07). Unknown fields are rejected, so typos do not pass silently.

Vectors are **L2-normalized** before the search (so the similarity is the cosine), in float64
after scaling by their largest magnitude, so any finite input survives; an all-zero vector
has no direction and is rejected. Every problem raises :class:`RequestError` with a status
(400, 413, 415) and a message naming the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_K",
    "DEFAULT_TEMPERATURE",
    "Query",
    "RequestError",
    "check_k",
    "decode_image_payload",
    "parse_ids",
    "parse_json",
    "parse_query",
]

DEFAULT_K = 10
DEFAULT_TEMPERATURE = 0.07
DEFAULT_MAX_PIXELS = 4096 * 4096


class RequestError(Exception):
    """A bad request: HTTP ``status`` (4xx) and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Query:
    """A validated query.

    Attributes:
        vectors: ``[Q, d]`` float32 unit rows, or ``None`` for an image query.
        images: raw image files (base64-decoded, not yet decoded), or ``None``.
        ids: ``[Q]`` int64 training instance ids (range checked against the index by the
            service), or ``None``.
        k: neighbours per query (range checked against the index by :func:`check_k`).
        temperature: ``σ`` of the vote weights ``exp(s / σ)``.
    """

    vectors: np.ndarray | None
    images: list[bytes] | None
    k: int
    temperature: float
    ids: np.ndarray | None = None

    @property
    def num_queries(self) -> int:
        if self.ids is not None:
            return int(self.ids.shape[0])
        return len(self.images) if self.images is not None else int(self.vectors.shape[0])


def parse_json(body: bytes) -> Any:
    """Decode a UTF-8 JSON body; :class:`RequestError` 400 on anything malformed."""
    if not body:
        raise RequestError(400, "empty request body: send a JSON object")
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"request body is not UTF-8: {exc.reason}") from None
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"malformed JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise RequestError(400, "malformed JSON: nested too deeply") from None


def parse_query(
    payload: Any, dim: int, *, classify: bool = False, max_queries: int = 1024
) -> Query:
    """Validate a decoded ``/neighbors`` (``classify=False``) or ``/classify`` body.

    Args:
        payload: the decoded JSON.
        dim: the index dimension ``d``.
        classify: whether ``"temperature"`` is allowed.
        max_queries: most vectors / images per request.

    Raises:
        RequestError: 400 naming the bad field (413 for too many queries).
    """
    if not isinstance(payload, dict):
        raise RequestError(400, f"request body must be a JSON object, got {_json_type(payload)}")
    allowed = {"vectors", "image", "images", "ids", "k"} | ({"temperature"} if classify else set())
    unknown = sorted(set(payload) - allowed)
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    given = [name for name in ("vectors", "image", "images", "ids") if name in payload]
    if len(given) != 1:
        raise RequestError(
            400,
            f"give exactly one of 'vectors', 'image', 'images' or 'ids' (got {given or 'none'})",
        )
    k = payload.get("k", DEFAULT_K)
    if isinstance(k, bool) or not isinstance(k, int):
        raise RequestError(400, f"'k' must be an integer, got {_json_type(k)}")
    temperature = payload.get("temperature", DEFAULT_TEMPERATURE)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise RequestError(400, f"'temperature' must be a finite number > 0, got {temperature!r}")
    if "vectors" in payload:
        vectors = parse_vectors(payload["vectors"], dim, max_queries)
        return Query(vectors, None, k, float(temperature))
    if "ids" in payload:
        return Query(None, None, k, float(temperature), parse_ids(payload["ids"], max_queries))
    if "image" in payload:
        images = [_decode_base64(payload["image"], "image")]
    else:
        items = payload["images"]
        if not isinstance(items, list) or not items:
            raise RequestError(400, "'images' must be a non-empty list of base64 strings")
        if len(items) > max_queries:
            raise RequestError(413, f"too many images: {len(items)} > {max_queries} per request")
        images = [_decode_base64(item, f"images[{i}]") for i, item in enumerate(items)]
    return Query(None, images, k, float(temperature))


def parse_vectors(value: Any, dim: int, max_queries: int = 1024) -> np.ndarray:
    """``[Q, dim]`` float32 unit rows from a JSON list of lists of numbers.

    Raises:
        RequestError: not a non-empty list of lists, a row of the wrong length, a
            non-number, a non-finite value or an all-zero row (400); too many rows (413).
    """
    if not isinstance(value, list) or not value:
        raise RequestError(400, f"'vectors' must be a non-empty list of lists of {dim} numbers")
    for i, row in enumerate(value):
        if not isinstance(row, list):
            raise RequestError(
                400, f"vectors[{i}] must be a list of {dim} numbers, got {_json_type(row)}"
            )
        if len(row) != dim:
            raise RequestError(
                400, f"vectors[{i}] has {len(row)} numbers; the index dimension is {dim}"
            )
        for j, x in enumerate(row):
            if type(x) not in (int, float):  # excludes bool (and str, None, lists)
                raise RequestError(400, f"vectors[{i}][{j}] must be a number, got {_json_type(x)}")
    if len(value) > max_queries:
        raise RequestError(413, f"too many vectors: {len(value)} > {max_queries} per request")
    try:
        x = np.array(value, dtype=np.float64)  # [Q, d]
    except OverflowError:
        raise RequestError(400, "'vectors' holds an integer too large for a float") from None
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise RequestError(400, f"vectors[{i}] contains NaN or infinity")
    scale = np.abs(x).max(axis=1, keepdims=True)  # [Q, 1]: no overflow in the norm
    if not (scale > 0).all():
        i = int(np.flatnonzero(scale[:, 0] == 0)[0])
        raise RequestError(400, f"vectors[{i}] is all zeros: it has no direction to search")
    x = x / scale
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def parse_ids(value: Any, max_queries: int = 1024) -> np.ndarray:
    """``[Q]`` int64 instance ids from a JSON list of non-negative integers.

    Raises:
        RequestError: not a non-empty list of integers >= 0 (400); too many (413).
    """
    if not isinstance(value, list) or not value:
        raise RequestError(400, "'ids' must be a non-empty list of training instance ids")
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise RequestError(400, f"ids[{i}] must be an integer >= 0, got {x!r}")
    if len(value) > max_queries:
        raise RequestError(413, f"too many ids: {len(value)} > {max_queries} per request")
    return np.array(value, dtype=np.int64)


def check_k(k: int, rows: int, max_k: int) -> int:
    """``k`` if ``1 <= k <= min(max_k, rows)``, else :class:`RequestError` 400."""
    upper = min(max_k, rows)
    if not 1 <= k <= upper:
        raise RequestError(
            400, f"'k' must be in [1, {upper}] (min of max_k={max_k} and {rows} rows), got {k}"
        )
    return k


def decode_image_payload(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
    """Decode image file bytes to a PIL RGB image, checking the pixel count first.

    Raises:
        RequestError: 400 when the bytes are not an image PIL reads, 413 when it has more
            than ``max_pixels`` pixels (checked from the header, before decoding).
    """
    from trainer.api import decode_image  # heavy import, only for image queries

    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Exception as exc:  # PIL raises many types for bad bytes
        raise RequestError(400, f"{name} is not a readable image: {_short(exc)}") from None
    if width * height > max_pixels:
        raise RequestError(
            413, f"{name} is {width}x{height} pixels; at most {max_pixels} pixels allowed"
        )
    try:
        return decode_image(data)
    except Exception as exc:
        raise RequestError(400, f"{name} does not decode: {_short(exc)}") from None


def _decode_base64(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise RequestError(400, f"'{name}' must be a base64 string, got {_json_type(value)}")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, f"'{name}' is not valid base64: {exc}") from None
    if not data:
        raise RequestError(400, f"'{name}' is empty")
    return data


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    for cls, label in names.items():
        if isinstance(value, cls):
            return label
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:197] + "..."
