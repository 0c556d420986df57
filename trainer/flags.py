"""The command line of ``python -m trainer.run``: flags (and ``--config`` YAML) to a
:class:`~trainer.config.TrainConfig`.

Every flag's default is None in the parser so that a YAML file can fill what the command
line leaves out; ``--help`` shows each setting's real default (:class:`TrainConfig`'s).
Imports neither torch nor Ray, so ``--help`` and bad flags answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from featurestore.argtypes import OneLineParser
from trainer.config import (
    ARCHS,
    AUGMENTS,
    BANKS,
    BUILTIN,
    CACHE_MODES,
    DECODE_MODES,
    LAUNCHERS,
    NCE_Z_MODES,
    OBJECTIVES,
    PRECISIONS,
    SCHEDULES,
    SOFTMAX_AUTO_MAX_ROWS,
    ConfigError,
    TrainConfig,
)

#: Settings whose 0 means "the dataset's default"; an explicit 0 is refused.
_ZERO_IS_AUTO = {"epochs", "batch_size"}

#: ``--help`` text of every flag (the default is appended from TrainConfig).
HELP: dict[str, str] = {
    "data": "training data: a make_shards directory or URL; webdataset tar URLs, brace "
    f"patterns ('train-{{000000..000099}}.tar') or a folder of .tar files (indexed once, "
    f"not copied); or '{BUILTIN}', the built-in dataset",
    "val_data": "validation shards for the kNN evaluation (built-in data: its test split)",
    "output": "output directory: metrics.jsonl, checkpoints under ray/, the encoder",
    "arch": "encoder; auto: small on the built-in data, resnet18 with --use-gpu, "
    "small-wide on a CPU",
    "low_dim": "embedding size d",
    "objective": f"auto: the exact softmax up to {SOFTMAX_AUTO_MAX_ROWS:,} instances, the "
    "sampled softmax above; nce: the paper's NCE; parametric: the paper's baseline, a learned "
    "N-way classifier over instance ids (no bank; kNN on recomputed features)",
    "nce_k": "noise samples K per positive (NCE, sampled softmax); 0 = the exact softmax",
    "nce_t": "temperature τ",
    "nce_m": "memory bank momentum m",
    "nce_z": "NCE's Z: ema (re-estimated every step) or fixed after the first (the paper's)",
    "nce_z_momentum": "momentum of --nce-z ema",
    "prox_lambda": "proximal regularisation λ (the paper's §3.4; 0 = off)",
    "lr": "learning rate (SGD)",
    "momentum": "SGD momentum",
    "weight_decay": "SGD weight decay",
    "schedule": "step: ×0.1 at 40/60/80 %% of the epochs; cosine",
    "warmup_epochs": "linear learning-rate warm-up epochs",
    "batch_size": "global batch size (default: 128 on the built-in data, 256 otherwise)",
    "epochs": "epochs (default: 40 on the built-in data, 200 otherwise)",
    "num_workers": "Ray Train workers (data parallel)",
    "num_shards": "feature store shards",
    "use_gpu": "train on GPUs (workers and store shards)",
    "precision": "encoder forward: auto = bf16 with --use-gpu, fp32 on a CPU",
    "compile": "torch.compile the encoder's training forward",
    "store_name": "attach to this running feature store instead of creating one",
    "store_dtype": "row storage of the bank (its math is float32)",
    "store_gpus_per_shard": "GPUs per store shard with --use-gpu (0 = share half a GPU)",
    "store_threads": "torch threads per store shard (0 = cores / shards on a local Ray)",
    "bank": "store: the feature store service; local: an in-process bank (one worker); "
    "unused with --objective parametric",
    "launcher": "ray: Ray Train; local: this process, no Ray",
    "resume": "continue the newest checkpoint under --output (and --storage-path)",
    "eval_every": "kNN evaluation every N epochs; 0 = never (throughput runs)",
    "checkpoint_every": "checkpoint (model, optimizer, bank) every N epochs",
    "knn_k": "neighbours k of the kNN vote",
    "max_failures": "worker-group restarts from the last checkpoint",
    "loader_workers": "DataLoader processes per worker (streaming; decoding for the cache)",
    "decode": "streaming: where JPEGs are decoded and augmented: cpu (loader processes), gpu "
    "(torchvision decode_jpeg on the CUDA device, augmentation there), auto: gpu on CUDA for "
    "streamed images of varying size",
    "data_label": "labels of existing webdataset shards named by --data: cls, json:FIELD or none",
    "shuffle_buffer": "streaming: samples each loader process holds to shuffle (0 = none; "
    "memory ~ buffer x file size)",
    "open_shards": "streaming: pieces of shards each loader process reads at once",
    "image_size": "input side in pixels (0 = by dataset: 32 up to 64 px images, else 224)",
    "data_cache": "auto: hold the decoded data in memory (on the GPU with --use-gpu) when it "
    "fits --data-cache-budget; off: stream the shards",
    "data_cache_budget": "GiB the decoded data may take with --data-cache auto",
    "augment": "augmentation preset; auto: by dataset",
    "seed": "seed of the model, the bank, the data order and the noise",
    "progress": "no progress bar (bars are shown only on a terminal anyway)",
    "storage_path": "Ray Train storage (local path or s3://…; default OUTPUT/ray)",
}

_CHOICES = {
    "arch": ARCHS,
    "objective": OBJECTIVES,
    "nce_z": NCE_Z_MODES,
    "schedule": SCHEDULES,
    "precision": PRECISIONS,
    "store_dtype": ("float32", "bfloat16", "float16"),
    "bank": BANKS,
    "launcher": LAUNCHERS,
    "data_cache": CACHE_MODES,
    "decode": DECODE_MODES,
    "augment": AUGMENTS,
}
_SWITCHES = {"use_gpu", "compile", "resume"}


def _help(name: str, default: Any) -> str:
    text = HELP[name]
    if name in _ZERO_IS_AUTO or name in _SWITCHES or name == "progress":
        return text
    shown = {"data": BUILTIN, "output": "runs/npid"}.get(name, default)
    return text if shown is None else f"{text} (default: {shown})"


def build_parser() -> argparse.ArgumentParser:
    """The CLI parser; every default is None so that the YAML file can fill it."""
    p = OneLineParser(
        prog="python -m trainer.run",
        description="Train an image encoder by non-parametric instance discrimination.",
    )
    p.add_argument("--config", help="YAML file with any of the settings below")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name in HELP:
        flag = "--" + name.replace("_", "-")
        help_text = _help(name, defaults.get(name))
        if name == "progress":
            p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                           help=help_text)  # fmt: skip
        elif name in _SWITCHES:
            p.add_argument(flag, action="store_true", default=None, help=help_text)
        elif name in _CHOICES:
            p.add_argument(flag, choices=_CHOICES[name], help=help_text)
        else:
            kind = type(defaults.get(name))
            p.add_argument(flag, type=kind if kind in (int, float) else str, help=help_text)
    return p


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags (and ``--config`` YAML) -> :class:`TrainConfig`; raises :class:`ConfigError`."""
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    path = args.pop("config")
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected a mapping of settings")
        values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    values.update({k: v for k, v in args.items() if v is not None})
    for name in _ZERO_IS_AUTO:
        value = values.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{flag} must be >= 1, got {value} (leave it out for the dataset's default)"
            )
    try:
        return TrainConfig.from_dict(values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
