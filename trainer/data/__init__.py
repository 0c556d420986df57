"""Reading, writing, indexing and ordering the webdataset shards of a dataset.

- :mod:`~trainer.data.shard_files`: where a dataset lives (local, fsspec URL, ``pipe:``) and
  how a shard's tar members are read;
- :mod:`~trainer.data.index`: :class:`ShardIndex`, a dataset's ids, labels, classes, shards;
- :mod:`~trainer.data.order`: the deterministic epoch plan (equal steps on every rank);
- :mod:`~trainer.data.segments`: reading the planned segments of shards;
- :mod:`~trainer.data.decode`: image bytes to RGB pixels;
- :mod:`~trainer.data.stream`: the per-worker stream of shuffled, mixed batches;
- :mod:`~trainer.data.loaders`: the streaming loaders (:func:`train_loader`,
  :func:`eval_loader`);
- :mod:`~trainer.data.cache` and :mod:`~trainer.data.memory_loader`: the dataset decoded
  once into uint8 pixels and served in augmented batches (``--data-cache``);
- :mod:`~trainer.data.sources`: the image sources ``python -m trainer.make_shards`` reads.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.data.decode import decode_image
    from trainer.data.index import ShardIndex, load_index
    from trainer.data.loaders import eval_loader, train_loader
    from trainer.data.order import steps_per_epoch
    from trainer.data.shard_files import DatasetLocation, open_url

#: Each public name and its module, imported on first use (``import trainer.data.sources``
#: for ``make_shards --help`` then loads no torch).
_HOMES = {
    "DatasetLocation": "trainer.data.shard_files",
    "ShardIndex": "trainer.data.index",
    "decode_image": "trainer.data.decode",
    "eval_loader": "trainer.data.loaders",
    "load_index": "trainer.data.index",
    "open_url": "trainer.data.shard_files",
    "steps_per_epoch": "trainer.data.order",
    "train_loader": "trainer.data.loaders",
}

__all__ = [
    "DatasetLocation",
    "ShardIndex",
    "decode_image",
    "eval_loader",
    "load_index",
    "open_url",
    "steps_per_epoch",
    "train_loader",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'trainer.data' has no attribute {name!r}")
