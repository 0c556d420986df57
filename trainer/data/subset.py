"""A seeded fraction of a shard dataset, as a :class:`~trainer.data.sources.Source` that
``make_shards`` writes into shards of its own (the paper's training-set-size study).

The sample is class-balanced: each class keeps ``round(fraction × its count)`` images (at
least one; unlabelled images count as one more class), drawn with ``numpy``'s generator
seeded by ``seed``, and kept in id order. ``Record.source`` names the original id
(``"<location>#<id>"``) so the subset's index tells where every image came from. The
sample's images are read once, into memory: a study-sized sample, not a web-scale one.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from trainer.data.index import ShardIndex, load_index
from trainer.data.segments import read_image_bytes
from trainer.data.sources import Record, Source

_EXT = {"jpeg": "jpg", "png": "png", "webp": "webp", "bmp": "bmp", "gif": "gif", "tiff": "tif"}


def sample_ids(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted ids ``[M]`` of a class-balanced, seeded sample of ``fraction`` of ``labels``
    ``[N]`` (each class keeps ``max(1, round(fraction × count))``).

    Raises:
        ValueError: ``fraction`` not in ``(0, 1]``.
    """
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"the fraction must be in (0, 1], got {fraction!r}")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keep = max(1, math.floor(fraction * len(members) + 0.5))
        chosen.append(rng.choice(members, size=min(keep, len(members)), replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def subset_source(location: str, fraction: float, seed: int) -> Source:
    """The sample of :func:`sample_ids` of the shard dataset at ``location`` as a source.

    Raises:
        OSError, ValueError: ``location`` is not a readable shard dataset, or a bad fraction.
    """
    index: ShardIndex = load_index(location)
    ids = sample_ids(np.asarray(index.labels), fraction, seed)
    images = read_image_bytes(index, ids)  # every shard read once (a laptop-scale sample)
    with Image.open(io.BytesIO(images[int(ids[0])])) as probe:
        ext = _EXT.get((probe.format or "").lower(), "png")
    records = [Record(f"{location}#{int(i)}", int(index.labels[i]), ext) for i in ids]

    def read(record: Record) -> bytes:
        return images[int(record.source.rsplit("#", 1)[1])]

    return Source(
        kind="subset",
        location=str(location),
        split="train",
        classes=list(index.classes),
        records=records,
        read=read,
    )


__all__ = ["sample_ids", "subset_source"]
