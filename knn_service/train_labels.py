"""What the kNN tools read from a sharded dataset (README, *Data format*): labels, keys,
single images.

:class:`TrainLabels` is the per-instance metadata (label, webdataset key, source path) the
service attaches to neighbours; :func:`read_image_bytes` fetches the original image files of
a few instances (the retrieval figure) by streaming only the shards that hold them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from trainer.api import ShardIndex, load_index, read_index_table, read_shard_images

__all__ = ["TrainLabels", "read_image_bytes"]


@dataclass(frozen=True, eq=False)
class TrainLabels:
    """Per-instance metadata of a dataset, indexed by instance id.

    Attributes:
        index: the dataset's :class:`~trainer.data.ShardIndex`.
        labels: int64 ``[N]`` (``-1`` = unknown).
        keys: ``N`` webdataset keys (``index.parquet`` column ``key``).
        sources: ``N`` source paths (column ``source``), or ``None`` when absent.
        num_classes: ``C = max(len(classes), max label + 1, 1)``.
    """

    index: ShardIndex
    labels: np.ndarray
    keys: list[str]
    sources: list[str] | None
    num_classes: int

    @property
    def num_instances(self) -> int:
        return len(self.labels)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.index.classes

    @property
    def location(self) -> str:
        return self.index.location.location

    @classmethod
    def load(cls, location: str | os.PathLike[str] | ShardIndex) -> TrainLabels:
        """Read ``dataset.json`` and ``index.parquet`` of a dataset (directory or URL).

        Raises:
            ValueError: missing or inconsistent files (the message names the location).
        """
        index = load_index(location)
        where = index.location.location
        table = read_index_table(index.location)
        if "key" not in table.column_names:
            raise ValueError(f"index.parquet in {where} lacks the column 'key'")
        order = np.argsort(table["id"].to_numpy(), kind="stable")  # ids are dense [0, N)
        keys = _strings(table["key"], order)
        sources = _strings(table["source"], order) if "source" in table.column_names else None
        labels = index.labels.astype(np.int64, copy=False)
        return cls(index, labels, keys, sources, index.num_classes)


def _strings(column: pa.ChunkedArray, order: np.ndarray) -> list[str]:
    values = column.to_pylist()
    return [str(values[i]) for i in order]


def read_image_bytes(data: TrainLabels, ids: Iterable[int]) -> dict[int, bytes]:
    """The original image file of each of ``ids`` (as stored in the shards), read with the
    trainer's shard reader.

    Raises:
        ValueError: an id outside ``[0, N)``, or a wanted sample missing from its shard.
    """
    return read_shard_images(data.index, ids)
