"""``python -m trainer.finetune``: semi-supervised fine-tuning on a fraction of the labels.

    python -m trainer.finetune --checkpoint RUN --data D --val-data V --label-fraction 0.01
        [--from-scratch] [--output DIR] [--launcher ray|local] [--epochs E] [--seed S]

The paper's semi-supervised experiment (Wu et al. §4.4, Fig. 6): the whole encoder of a
trained run plus a linear classifier are fine-tuned with cross-entropy on a class-balanced,
seeded sample of ``--label-fraction`` of the labelled training ids (:func:`label_sample`,
written to ``OUTPUT/labelled_ids.json``), then scored on ``V``. ``--from-scratch`` trains
the same network from a random initialisation, the figure's baseline. Training goes through
the trainer's own pieces: :func:`trainer.plan.make_plan` resolves the data,
:mod:`trainer.launch.driver` runs Ray Train (``--launcher ray``, the default) and
:class:`~trainer.launch.runtime.LocalRuntime` runs the loop in this process (``--launcher local``);
the loop is :mod:`trainer.experiments.finetune_loop`.

``--checkpoint`` names an exported encoder, a training checkpoint or a run directory (its
``encoder/`` export, else its newest checkpoint). The last line of standard output is one
JSON object: ``top1`` and ``top5`` (fractions) on ``V``, ``label_fraction``,
``num_labelled``, ``from_scratch``, ``epochs``, ``seconds``, ``checkpoint`` and the
settings; ``OUTPUT/metrics.jsonl`` has a record per epoch. Bad input: one line on stderr,
exit 2. ``--help`` loads no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from featurestore.argtypes import OneLineParser, number_type
from trainer.config import ARCHS, BUILTIN, CACHE_MODES, LAUNCHERS, ConfigError, TrainConfig

logger = logging.getLogger("trainer.finetune")

PROG = "python -m trainer.finetune"
FEATURES = (
    "pooled",
    "embedding",
)  # trainer.experiments.finetune_loop.FEATURES (that module loads torch)
LABELS_FILE = "labelled_ids.json"
#: Default epochs, and the fewest optimizer steps a default run takes (tiny label sets).
DEFAULT_EPOCHS, MIN_STEPS = 30, 300
DEFAULT_BATCH = 64
DEFAULT_LR = 0.05
DEFAULT_TRUNK_SCALE = 1.0


_fraction = number_type(float, "a number", lambda v: 0 < v <= 1, "in (0, 1]")
_positive_int = number_type(int, "an integer", lambda v: v >= 1, ">= 1")
_count = number_type(int, "an integer", lambda v: v >= 0, ">= 0")
_positive = number_type(float, "a number", lambda v: 0 < v < float("inf"), "a finite number > 0")
_non_negative = number_type(
    float, "a number", lambda v: 0 <= v < float("inf"), "a finite number >= 0"
)


#: ``--help`` of each flag and its argparse settings.
_FLAGS: dict[str, dict[str, Any]] = {
    "--checkpoint": dict(help="exported encoder, training checkpoint or run directory "
                         "(optional with --from-scratch: then --arch says the encoder)"),
    "--data": dict(default=BUILTIN, help=f"training shards, or '{BUILTIN}' (the default)"),
    "--val-data": dict(help="validation shards (built-in data: its test split)"),
    "--label-fraction": dict(type=_fraction, required=True,
                             help="part of the labelled training ids used, in (0, 1]; each "
                             "class gives round(fraction x its count), at least 1"),
    "--from-scratch": dict(action="store_true",
                           help="a random initialisation of the same arch (the baseline)"),
    "--output": dict(default="runs/finetune",
                     help="metrics.jsonl, labelled_ids.json and finetuned.pt go here "
                     "(default: runs/finetune)"),
    "--arch": dict(choices=ARCHS, default="auto",
                   help="encoder with --from-scratch and no --checkpoint (default: auto)"),
    "--features": dict(choices=FEATURES, default="pooled",
                       help="the classifier reads the pooled features before the encoder's "
                       "head, or its unit embedding (default: pooled)"),
    "--epochs": dict(type=_positive_int,
                     help=f"epochs over the labelled sample (default: {DEFAULT_EPOCHS}, more "
                     f"for tiny samples, so that a run takes at least {MIN_STEPS} steps)"),
    "--batch-size": dict(type=_positive_int, default=DEFAULT_BATCH,
                         help=f"global batch size (default: {DEFAULT_BATCH})"),
    "--lr": dict(type=_positive, default=DEFAULT_LR,
                 help=f"learning rate of SGD, cosine schedule (default: {DEFAULT_LR})"),
    "--trunk-lr-scale": dict(type=_non_negative, default=DEFAULT_TRUNK_SCALE,
                             help="the encoder learns at lr x this, the classifier at lr "
                             f"(default: {DEFAULT_TRUNK_SCALE}; 0 keeps the encoder's weights, "
                             "pretrained or random, so only the classifier learns; its "
                             "batch-norm statistics still follow the labelled images)"),
    "--weight-decay": dict(type=_non_negative, default=5e-4,
                           help="SGD weight decay (default: 0.0005; momentum 0.9)"),
    "--seed": dict(type=_count, default=0,
                   help="seed of the label sample, the classifier and the data order"),
    "--eval-every": dict(type=_count, default=0,
                         help="score the validation data every N epochs too (default: 0, "
                         "at the end only)"),
    "--launcher": dict(choices=LAUNCHERS, default="ray",
                       help="ray: Ray Train (the default); local: this process, no Ray"),
    "--num-workers": dict(type=_positive_int, default=1, help="Ray Train workers"),
    "--use-gpu": dict(action="store_true", help="train on GPUs"),
    "--data-cache": dict(choices=CACHE_MODES, default="auto",
                         help="hold the decoded data in memory (auto: when they fit) or "
                         "stream the shards"),
    "--loader-workers": dict(type=_count, default=0, help="DataLoader processes per worker"),
}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    """The command-line parser (no torch)."""
    p = OneLineParser(
        prog=PROG,
        description="Fine-tune an encoder on a fraction of the labels; prints top-1/top-5 "
        "on the validation data as JSON.",
    )
    for flag, settings in _FLAGS.items():
        p.add_argument(flag, **settings)
    return p


def label_sample(labels, fraction: float, seed: int):
    """Sorted ids ``[M]`` of a class-balanced, seeded sample of the *labelled* ids of
    ``labels`` ``[N]`` (int, ``-1`` = no label): each class gives ``round(fraction × its
    count)`` ids rounded half up, at least 1 (:func:`trainer.data.subset.sample_ids`).

    Raises:
        ValueError: ``fraction`` not in ``(0, 1]``, or no id has a label.
    """
    import numpy as np

    from trainer.data.subset import sample_ids

    labels = np.asarray(labels)
    labelled = np.flatnonzero(labels >= 0)
    if len(labelled) == 0:
        raise ValueError("no image has a label")
    return labelled[sample_ids(labels[labelled], fraction, seed)]


def _data_locations(args: argparse.Namespace) -> tuple[str, str | None]:
    """``(--data, --val-data)`` for :class:`TrainConfig`: the built-in name for its train
    split, None for its test split beside it (``make_plan`` resolves both)."""
    from trainer.api import dataset_location

    try:
        val = args.val_data
        if args.data == BUILTIN and val == BUILTIN:
            val = None
        elif val is not None:
            val = dataset_location(val, "test")
        data = args.data if args.data == BUILTIN else dataset_location(args.data, "train")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if val is None and data != BUILTIN:
        raise ConfigError("--val-data is required unless --data is the built-in dataset")
    return data, val


def pretrained(location: str, preset: str) -> tuple[dict[str, Any], dict[str, str]]:
    """``(EncoderConfig dict, weights source)`` of ``--checkpoint location``, the weights
    checked to load into that encoder; raises :class:`ConfigError` (one line)."""
    from trainer.checkpoints import STATE_FILE, latest_checkpoint, load_checkpoint
    from trainer.experiments.finetune_loop import load_weights
    from trainer.model.encoders import EncoderConfig, build_encoder
    from trainer.model.export import CONFIG_FILE, read_export_config

    where, flag = Path(location), f"--checkpoint {location}"
    if not where.is_dir():
        raise ConfigError(f"{flag}: no such directory")
    found: Path | str | None = where
    if not (where / CONFIG_FILE).is_file() and not (where / STATE_FILE).is_file():
        found = where / "encoder" if (where / "encoder" / CONFIG_FILE).is_file() else None
        found = found or latest_checkpoint(where)
    if found is None:
        raise ConfigError(f"{flag}: neither an exported encoder, a training checkpoint nor a "
                          "run directory holding one")  # fmt: skip
    try:
        if (Path(found) / CONFIG_FILE).is_file():
            document = read_export_config(found)
            names = ("arch", "low_dim", "cifar_stem")
            encoder = EncoderConfig.from_dict({k: document[k] for k in names if k in document})
            source = {"kind": "export", "path": os.path.abspath(found)}
        else:
            state, saved = load_checkpoint(found)
            cfg = TrainConfig.from_dict(saved)
            encoder = EncoderConfig.for_preset(cfg.resolved_arch, cfg.low_dim, preset)
            source = {"kind": "checkpoint", "path": os.path.abspath(found)}
        weights = load_weights(source) if source["kind"] == "export" else state.model
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{flag}: {exc}") from None
    try:
        build_encoder(**encoder.to_dict()).load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{flag}: weights do not fit {encoder} ({first})") from None
    return encoder.to_dict(), source


def _sources(location: str):
    """Where each image of the shard dataset at ``location`` came from, indexed by id (an
    object array ``[N]``): the index's ``source`` column, made absolute with
    ``dataset.json``'s ``source`` root when relative (an ImageFolder's ``cat/0001.jpg`` is
    another image in another folder); None for an index without the column."""
    import numpy as np

    from trainer.data.index import read_index_table
    from trainer.data.shard_files import DatasetLocation

    where = DatasetLocation(location)
    table = read_index_table(where)
    if "source" not in table.column_names:
        return None
    root = str(json.loads(where.read_bytes("dataset.json")).get("source") or location)
    names = [
        name if ":" in name or name.startswith("/") else f"{root.rstrip('/')}/{name}"
        for name in table.column("source").to_pylist()
    ]
    by_id = np.empty(len(names), dtype=object)  # rows need not be in id order
    by_id[table.column("id").to_numpy()] = names
    return by_id


def _check_disjoint(plan, ids) -> None:
    """Refuse validation data that is the training data, or shares images (where each image
    came from: :func:`_sources`) with the labelled sample."""
    if plan.train_data == plan.val_data:
        raise ConfigError(f"--val-data {plan.val_data} is the training data: the labelled "
                          "sample must be scored on other images")  # fmt: skip
    train, val = _sources(plan.train_data), _sources(plan.val_data)
    if train is None or val is None:
        return
    shared = set(train[ids].tolist()) & set(val.tolist())
    if shared:
        raise ConfigError(f"--val-data {plan.val_data}: {len(shared)} of its images are in the "
                          f"labelled sample (e.g. {sorted(shared)[0]})")  # fmt: skip


def default_epochs(num_labelled: int, batch_size: int) -> int:
    """:data:`DEFAULT_EPOCHS`, or more when the sample is so small that they would take fewer
    than :data:`MIN_STEPS` steps (each epoch is at least one full batch)."""
    steps = max(1, -(-num_labelled // batch_size))
    return max(DEFAULT_EPOCHS, -(-MIN_STEPS // steps))


def make_finetune(args: argparse.Namespace) -> tuple[TrainConfig, Any, dict[str, Any]]:
    """``(config, plan, finetune spec)`` of the parsed ``args``, the label sample written to
    ``OUTPUT/labelled_ids.json``; raises :class:`ConfigError` naming the bad input."""
    import numpy as np

    from featurestore.files import write_text_atomic
    from trainer.data import ShardIndex
    from trainer.plan import make_plan

    if args.checkpoint is None and not args.from_scratch:
        raise ConfigError("--checkpoint is required (or --from-scratch for the baseline)")
    data, val_data = _data_locations(args)
    common = dict(data=data, val_data=val_data, output=args.output, objective="parametric",
                  lr=args.lr, weight_decay=args.weight_decay, schedule="cosine",
                  seed=args.seed, launcher=args.launcher, num_workers=args.num_workers,
                  use_gpu=args.use_gpu, data_cache=args.data_cache,
                  loader_workers=args.loader_workers, batch_size=args.batch_size)  # fmt: skip
    # objective parametric: no memory bank (nor store) is made; the loop ignores its head.
    cfg = TrainConfig(**common, arch=args.arch, epochs=1)
    plan = make_plan(cfg)  # data, preset, classes, cache; the arch and epochs come below
    index = ShardIndex.load(plan.train_data)
    try:
        ids = label_sample(index.labels, args.label_fraction, args.seed)
    except ValueError as exc:
        raise ConfigError(f"--data {args.data}: {exc}") from None
    _check_disjoint(plan, ids)
    weights = None
    if args.checkpoint is not None:
        encoder, weights = pretrained(args.checkpoint, plan.preset)
        if args.arch not in ("auto", encoder["arch"]):
            raise ConfigError(f"--checkpoint {args.checkpoint} is of arch {encoder['arch']}, "
                              f"not --arch {args.arch}")  # fmt: skip
    else:
        encoder = plan.encoder
    if args.from_scratch:
        weights = None
    epochs = args.epochs or default_epochs(len(ids), args.batch_size)
    cfg = dataclasses.replace(cfg, arch=encoder["arch"], low_dim=encoder["low_dim"], epochs=epochs)
    plan = dataclasses.replace(plan, config=cfg.to_dict(), arch=cfg.arch, epochs=epochs)
    counts = np.bincount(index.labels[ids], minlength=plan.num_classes)
    Path(plan.output).mkdir(parents=True, exist_ok=True)
    sample = {"label_fraction": args.label_fraction, "seed": args.seed,
              "train_data": plan.train_data, "num_labelled": len(ids),
              "per_class": counts.tolist(), "ids": ids.tolist()}  # fmt: skip
    write_text_atomic(Path(plan.output) / LABELS_FILE, json.dumps(sample) + "\n")
    spec = {"encoder": encoder, "weights": weights, "features": args.features,
            "labelled_ids": ids.tolist(), "eval_every": args.eval_every,
            "trunk_lr_scale": args.trunk_lr_scale}  # fmt: skip
    return cfg, plan, spec


def finetune(cfg: TrainConfig, plan: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Run the fine-tuning; returns its final record (``top1``, ``top5`` …)."""
    if cfg.launcher == "local":
        from trainer.experiments.finetune_loop import run_finetune_worker
        from trainer.launch.runtime import LocalRuntime

        loop_config = {"config": cfg.to_dict(), "plan": plan.to_dict(), "finetune": spec}
        runtime = LocalRuntime(plan.storage_path, plan.run_name, cfg.use_gpu)
        return run_finetune_worker(loop_config, runtime) or {}
    from trainer.experiments.finetune_loop import finetune_loop_per_worker
    from trainer.launch import driver
    from trainer.metrics import read_jsonl

    driver.run(cfg, plan, finetune_loop_per_worker, {"finetune": spec})
    records = read_jsonl(Path(plan.output) / "metrics.jsonl")
    return records[-1] if records else {}


def main(argv: list[str] | None = None) -> int:
    """Run; returns the exit code (2 for bad input, 1 for a failed run)."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    started = time.perf_counter()
    try:
        cfg, plan, spec = make_finetune(args)
        result = finetune(cfg, plan, spec)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a failed run: one line, the details are in the log above
        logger.debug("fine-tuning failed", exc_info=True)
        print(f"{PROG}: fine-tuning failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if "top1" not in result:
        print(f"{PROG}: fine-tuning finished without a validation score", file=sys.stderr)
        return 1
    record = {
        "top1": result["top1"],
        "top5": result["top5"],
        "label_fraction": args.label_fraction,
        "num_labelled": len(spec["labelled_ids"]),
        "from_scratch": args.from_scratch,
        "epochs": plan.epochs,
        "seconds": round(time.perf_counter() - started, 3),
        "checkpoint": args.checkpoint,
        "arch": plan.arch,
        "features": spec["features"],
        "num_classes": plan.num_classes,
        "num_val": result["num_val"],
        "train_loss": result["loss"],
        "train_top1": result["train_top1"],
        "seed": args.seed,
        "launcher": cfg.launcher,
        "train_data": plan.train_data,
        "val_data": plan.val_data,
        "output": plan.output,
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
