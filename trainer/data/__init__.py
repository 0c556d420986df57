"""Reading, writing, indexing and ordering the webdataset shards of a dataset.

- :mod:`~trainer.data.shard_files`: where a dataset lives (local, fsspec URL, ``pipe:``) and
  how a shard's tar members are read;
- :mod:`~trainer.data.index`: :class:`ShardIndex`, a dataset's ids, labels, classes, shards;
- :mod:`~trainer.data.order`: the deterministic epoch plan (equal steps on every rank);
- :mod:`~trainer.data.segments`: reading the planned segments of shards;
- :mod:`~trainer.data.decode`: image bytes to RGB pixels;
- :mod:`~trainer.data.stream`: the streaming loaders (:func:`train_loader`,
  :func:`eval_loader`);
- :mod:`~trainer.data.cache` and :mod:`~trainer.data.memory_loader`: the dataset decoded
  once into uint8 pixels and served in augmented batches (``--data-cache``);
- :mod:`~trainer.data.sources`: the image sources ``python -m trainer.make_shards`` reads.
"""

from trainer.data.decode import decode_image
from trainer.data.index import ShardIndex, load_index
from trainer.data.order import steps_per_epoch
from trainer.data.shard_files import DatasetLocation, open_url
from trainer.data.stream import eval_loader, train_loader

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
