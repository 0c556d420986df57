"""A sharded dataset's metadata: :class:`ShardIndex` (which ids each shard holds, labels).

The metadata files (``dataset.json``, ``index.parquet``) are read first; shard URLs come from
the index's ``shard`` column, so remote stores are never listed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featurestore.files import is_url
from trainer.data.shard_files import DatasetLocation

# --------------------------------------------------------------------------- index


@dataclass(frozen=True, eq=False)
class ShardIndex:
    """A dataset's metadata: which ids each shard holds, labels, classes.

    Attributes:
        location: where the dataset lives.
        shards: shard file names, in the dataset's order.
        shard_ids: per shard, its ids ascending (int64); a sample's *position* indexes this.
        labels: int64 ``[N]``, the label of each id (``-1`` unknown).
        id_shard: int32 ``[N]``, the shard of each id.
        id_pos: int64 ``[N]``, the position of each id inside its shard.
        classes: class names.
        meta: the content of ``dataset.json``.
        shard_keys: per shard, the sample keys in position order (object arrays of str), from
            the index's ``key`` column; ``None`` when the index has none (keys are then the
            zero-padded ids, as make_shards wrote them before format 2).
        shard_offsets: per shard, the byte offset of each sample's first tar header (int64),
            from the ``offset`` column; ``None`` when absent (readers then walk the shard
            from its start).
    """

    location: DatasetLocation
    shards: tuple[str, ...]
    shard_ids: tuple[np.ndarray, ...] = field(repr=False)
    labels: np.ndarray = field(repr=False)
    id_shard: np.ndarray = field(repr=False)
    id_pos: np.ndarray = field(repr=False)
    classes: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, repr=False)
    shard_keys: tuple[np.ndarray, ...] | None = field(default=None, repr=False)
    shard_offsets: tuple[np.ndarray, ...] | None = field(default=None, repr=False)

    @property
    def num_instances(self) -> int:
        """``N``: ids are ``[0, N)``."""
        return len(self.labels)

    @property
    def shard_sizes(self) -> list[int]:
        """Samples per shard."""
        return [len(ids) for ids in self.shard_ids]

    def shard_url(self, shard: int) -> str:
        """URL of shard number ``shard``: its name in the dataset's location, or the name
        itself when it is a URL or an absolute path (an index of shards kept elsewhere)."""
        name = self.shards[shard]
        if is_url(name) or os.path.isabs(name):
            return name
        return self.location.url(name)

    @property
    def num_classes(self) -> int:
        """Classes of the vote: the named classes, or one past the largest label if more
        (at least 1)."""
        top = int(self.labels.max()) + 1 if len(self.labels) else 0
        return max(len(self.classes), top, 1)

    @property
    def preset(self) -> str:
        """The augmentation preset of the images: digits, cifar (images <= 64 px) or
        imagenet."""
        kind = self.meta.get("source_type", "")
        if kind == "digits":
            return "digits"
        if kind.startswith("cifar"):
            return "cifar"
        side = self.meta.get("image_size_max") or 0
        return "cifar" if side and int(side) <= 64 else "imagenet"

    @staticmethod
    def classes_of(*indexes: ShardIndex | None) -> int:
        """Classes of a vote between datasets (train and val): the largest
        :attr:`num_classes` of those given."""
        return max(i.num_classes for i in indexes if i is not None)

    @classmethod
    def load(cls, location: str | os.PathLike | DatasetLocation) -> ShardIndex:
        """Read ``dataset.json`` and ``index.parquet`` of a dataset (never lists a directory).

        Raises:
            ValueError: a file is missing or unreadable, or the index is inconsistent (ids not
                dense ``[0, N)``, ``N`` not ``num_instances``, a shard not in the shard list).
        """
        if not isinstance(location, DatasetLocation):
            location = DatasetLocation(os.fspath(location))
        where = location.location
        try:
            meta = json.loads(location.read_bytes("dataset.json"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"bad dataset.json in {where}: {exc}") from None
        table = read_index_table(location)
        missing = {"id", "label", "shard"} - set(table.column_names)
        if missing:
            raise ValueError(f"index.parquet in {where} lacks columns {sorted(missing)}")
        ids = table["id"].to_numpy().astype(np.int64, copy=False)
        n = len(ids)
        if n == 0 or not np.array_equal(np.sort(ids), np.arange(n)):
            raise ValueError(f"index.parquet in {where}: ids are not dense [0, N) (N={n})")
        if meta.get("num_instances", n) != n:
            raise ValueError(
                f"{where}: dataset.json says {meta['num_instances']} instances, index has {n}"
            )
        encoded = pc.dictionary_encode(table["shard"].combine_chunks())
        names_in_index = encoded.dictionary.to_pylist()
        shards = list(meta.get("shards") or sorted(names_in_index))
        unknown = set(names_in_index) - set(shards)
        if unknown:
            raise ValueError(
                f"index.parquet in {where} names shards not in dataset.json: {unknown}"
            )
        position = {name: s for s, name in enumerate(shards)}
        remap = np.array([position[name] for name in names_in_index], dtype=np.int32)
        id_shard = np.empty(n, dtype=np.int32)
        id_shard[ids] = remap[encoded.indices.to_numpy()]
        labels = np.empty(n, dtype=np.int64)
        labels[ids] = table["label"].to_numpy()
        classes = tuple(meta.get("classes", ()))
        _check_labels(labels, classes, where, table, ids)
        order = np.lexsort((np.arange(n), id_shard))  # ids grouped by shard, ascending
        bounds = np.searchsorted(id_shard[order], np.arange(len(shards) + 1))
        shard_ids = tuple(order[bounds[s] : bounds[s + 1]] for s in range(len(shards)))
        id_pos = np.empty(n, dtype=np.int64)
        for sid in shard_ids:
            id_pos[sid] = np.arange(len(sid))
        shard_keys = shard_offsets = None
        if "key" in table.column_names:
            _check_unique_keys(table, encoded.indices.to_numpy(), where)
            by_id = np.empty(n, dtype=object)
            by_id[ids] = np.asarray(table["key"].to_pylist(), dtype=object)
            shard_keys = tuple(by_id[sid] for sid in shard_ids)
        if "offset" in table.column_names:
            off = np.empty(n, dtype=np.int64)
            off[ids] = table["offset"].to_numpy()
            shard_offsets = tuple(off[sid] for sid in shard_ids)
        return cls(
            location=location,
            shards=tuple(shards),
            shard_ids=shard_ids,
            labels=labels,
            id_shard=id_shard,
            id_pos=id_pos,
            classes=classes,
            meta=meta,
            shard_keys=shard_keys,
            shard_offsets=shard_offsets,
        )


def _check_labels(
    labels: np.ndarray, classes: tuple, where: str, table: pa.Table, ids: np.ndarray
) -> None:
    """Raise ValueError naming the first id whose label is below -1 or, when dataset.json
    names the classes, not one of them (``labels`` ``[N]`` by id)."""
    top = len(classes) if classes else None
    bad = labels < -1 if top is None else (labels < -1) | (labels >= top)
    if not bad.any():
        return
    first = int(np.flatnonzero(bad)[0])
    row = int(np.flatnonzero(ids == first)[0])
    member = ""
    if "key" in table.column_names:
        member = f" (key {table['key'][row].as_py()!r} in {table['shard'][row].as_py()})"
    allowed = (
        "a label is >= 0, or -1 for unknown"
        if top is None
        else f"dataset.json names {top} classes: 0..{top - 1}, or -1 for unknown"
    )
    raise ValueError(
        f"index.parquet in {where}: {int(bad.sum())} label(s) outside the classes, the first "
        f"id {first}{member} with label {int(labels[first])} ({allowed})"
    )


def _check_unique_keys(table: pa.Table, shard_codes: np.ndarray, where: str) -> None:
    """Raise ValueError naming a key that two ids share within one shard (samples are
    matched to ids by key: one of them could never be read). ``shard_codes`` ``[N]``: each
    row's shard number. Plain numpy: Arrow's grouping would start thread pools."""
    keys = pc.dictionary_encode(table["key"].combine_chunks())
    codes = keys.indices.to_numpy().astype(np.int64)
    pairs = shard_codes.astype(np.int64) * max(1, len(keys.dictionary)) + codes
    unique, first, counts = np.unique(pairs, return_index=True, return_counts=True)
    if len(unique) == len(pairs):
        return
    dup = int(first[np.flatnonzero(counts > 1)[0]])
    raise ValueError(
        f"index.parquet in {where}: {int((counts > 1).sum())} key(s) name more than one id "
        f"in one shard, the first {table['key'][dup].as_py()!r} in "
        f"{table['shard'][dup].as_py()} ({int(counts[counts > 1][0])} ids)"
    )


def read_index_table(location: DatasetLocation) -> pa.Table:
    """The whole ``index.parquet`` of a dataset, read in the calling thread.

    ``pq.read_table`` would start Arrow's thread pools for this small file; a pool still
    alive at interpreter exit can abort a short-lived process (apache/arrow#34314), so the
    CLIs' exit status would depend on timing.

    Raises:
        ValueError: the file is missing or not Parquet (the message names the location).
    """
    try:
        data = location.read_bytes("index.parquet")
        return pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)
    except Exception as exc:  # pyarrow raises its own error types
        raise ValueError(f"bad index.parquet in {location.location}: {exc}") from None


def load_index(location: str | os.PathLike | DatasetLocation | ShardIndex) -> ShardIndex:
    """:meth:`ShardIndex.load`, passing an already loaded index through."""
    return location if isinstance(location, ShardIndex) else ShardIndex.load(location)
