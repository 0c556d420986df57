"""The trainer as the serving layer sees it: the one module :mod:`knn_service` imports.

Load an encoder (checkpoints, the resolved config, exported models, the pooled features
before its head), open a dataset (its index, labels and number of classes, raw image bytes),
build an evaluation loader, encode a dataset, decode an image and evaluate with the kNN vote.
Everything else in :mod:`trainer` (the loop, the launchers, the shard writer) is the
trainer's own business; the import contract in ``pyproject.toml`` keeps it so.
"""

import logging

from trainer.checkpoints import STATE_FILE, latest_checkpoint, load_checkpoint
from trainer.config import TrainConfig
from trainer.data import eval_loader
from trainer.data.decode import decode_image
from trainer.data.index import ShardIndex, load_index, read_index_table
from trainer.data.segments import read_image_bytes as read_shard_images
from trainer.data.sources import builtin_name
from trainer.data.transforms import DEFAULT_SIZE, PRESETS, build_transform
from trainer.evaluation import (
    EVAL_BATCH,
    EvalSetup,
    Split,
    evaluate,
    extract_features,
    index_from_export,
)
from trainer.model.encoders import EncoderConfig, build_encoder, pooled_trunk
from trainer.model.export import CONFIG_FILE, load_encoder, read_export_config
from trainer.run_record import local_bank_state, read_run_record

logger = logging.getLogger(__name__)


def dataset_location(location: str, split: str) -> str:
    """``location`` itself, or for the built-in dataset's name (``digits``, or
    ``builtin:digits`` even beside a directory of that name) the shards of its ``split``
    (``"train"`` or ``"test"``), converted on first use; the log names where they are."""
    name = builtin_name(location)
    if name is None:
        return location
    from trainer.shards.make import ensure_builtin_dataset  # the writer: built-in data only

    path = ensure_builtin_dataset(split=split, name=name)
    logger.info("built-in dataset %s, %s split: shards at %s", name, split, path)
    return str(path)


__all__ = [
    "CONFIG_FILE",
    "DEFAULT_SIZE",
    "EVAL_BATCH",
    "PRESETS",
    "STATE_FILE",
    "EncoderConfig",
    "EvalSetup",
    "ShardIndex",
    "Split",
    "TrainConfig",
    "build_encoder",
    "build_transform",
    "dataset_location",
    "decode_image",
    "eval_loader",
    "evaluate",
    "extract_features",
    "index_from_export",
    "latest_checkpoint",
    "load_checkpoint",
    "load_encoder",
    "load_index",
    "local_bank_state",
    "pooled_trunk",
    "read_export_config",
    "read_index_table",
    "read_run_record",
    "read_shard_images",
]
