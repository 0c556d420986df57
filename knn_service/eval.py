"""Weighted kNN accuracy of a trained encoder, as the trainer reports it.

    python -m knn_service.eval --checkpoint CKPT --train-data DIR --val-data DIR
        [--recompute | --store-name NAME [--namespace NS] | --snapshot URI]
        [--kind flat|ivf] [--k 200] [--temperature 0.07] [--batch-size 256]

Prints one JSON object: ``top1`` and ``top5`` (fractions) of the ``k``-NN weighted vote
(Wu et al. §3.4) of every validation image, plus the inputs used. Validation features are
always computed with the checkpoint's encoder and its test transform. Train features are

- ``--recompute``: recomputed the same way (the trainer's final ``"recomputed"`` record);
- ``--store-name``: the memory bank of a running feature store (attach + export; the
  trainer's per-epoch ``"bank"`` records);
- ``--snapshot``: the bank rows of a store snapshot (a snapshot directory or a snapshot dir
  holding several: the newest), read without Ray.

The numbers come from the trainer's own evaluation (:func:`trainer.evaluation.evaluate`, the
function the training loop calls, and :func:`~trainer.evaluation.index_from_export`) with
the trainer's class count and batch size, so they equal what the trainer reports for the
same inputs. ``--k`` and ``--temperature`` default to the training config's ``knn_k`` and
``nce_t`` for a training checkpoint, else 200 and 0.07. Samples that do not decode are left
out (and counted under ``"skipped"``). Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from knn_service.cli import OneLineParser, UsageError, positive_float, positive_int, run

logger = logging.getLogger("knn_service.eval")

PROG = "python -m knn_service.eval"
DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.07


def parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = OneLineParser(prog=PROG, description="kNN top-1/top-5 of a trained encoder (JSON).")
    p.add_argument("--checkpoint", required=True, help="exported encoder, checkpoint or run dir")
    p.add_argument("--train-data", required=True, help="training shards (labels; recompute)")
    p.add_argument("--val-data", required=True, help="validation shards")
    bank = p.add_mutually_exclusive_group()
    bank.add_argument(
        "--recompute", action="store_true", help="recompute train features (test transform)"
    )
    bank.add_argument("--store-name", help="train features: the bank of this running store")
    bank.add_argument("--snapshot", help="train features: the bank rows of this store snapshot")
    p.add_argument("--namespace", default="npid", help="Ray namespace of --store-name")
    p.add_argument("--kind", choices=("flat", "ivf"), default="flat", help="index kind")
    p.add_argument("--k", type=positive_int, default=None, help="neighbours (default 200)")
    p.add_argument(
        "--temperature", type=positive_float, default=None, help="vote temperature (0.07)"
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="encoding batch (default: the trainer's evaluation batch, 256)",
    )
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    return p


def _load_index(location: str, flag: str):
    from trainer.api import ShardIndex, dataset_location  # heavy: --help stays fast

    split = "test" if flag == "--val-data" else "train"
    try:
        return ShardIndex.load(dataset_location(location, split))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{flag} {location}: {exc}") from None


def _bank_batches(args: argparse.Namespace, dim: int, num_rows: int):
    """``(record batches, description)`` of the bank rows from the store or snapshot."""
    if args.store_name is not None:
        from featurestore.store import ShardedStore

        try:
            store = ShardedStore.attach(args.store_name, namespace=args.namespace)
        except (LookupError, ValueError) as exc:
            raise UsageError(f"--store-name {args.store_name}: {exc}") from None
        found_dim, found_rows, batches = store.dim, store.num_rows, store.export()
        described: dict[str, Any] = {"store_name": args.store_name, "namespace": args.namespace}
        flag = f"--store-name {args.store_name}"
    else:
        from featurestore import snapshot

        try:
            manifest = snapshot.read_manifest(snapshot.resolve(args.snapshot))
        except (OSError, ValueError) as exc:
            raise UsageError(f"--snapshot {args.snapshot}: {exc}") from None
        found_dim, found_rows = manifest.dim, manifest.num_rows
        batches = snapshot.iter_batches(manifest)
        described = {"snapshot": manifest.uri, "step": manifest.step}
        flag = f"--snapshot {args.snapshot}"
    if found_dim != dim:
        raise UsageError(f"{flag}: the bank has dim {found_dim} but the encoder embeds in {dim}")
    if found_rows != num_rows:
        raise UsageError(
            f"{flag}: the bank has {found_rows} rows but --train-data has {num_rows} instances"
        )
    return batches, described


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation described by parsed ``args``; returns the printed record."""
    import torch

    from knn_service.encoders import load_encoder_from
    from trainer.api import EVAL_BATCH, EvalSetup, ShardIndex, Split, index_from_export
    from trainer.api import evaluate as evaluate_split

    args.batch_size = args.batch_size or EVAL_BATCH
    if not (args.recompute or args.store_name or args.snapshot):
        raise UsageError(
            "the train features are the bank: pass --store-name or --snapshot, or --recompute"
        )
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {args.num_workers}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    train_index = _load_index(args.train_data, "--train-data")
    val_index = _load_index(args.val_data, "--val-data")
    try:
        encoder = load_encoder_from(args.checkpoint, train_index, device=device)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"--checkpoint {args.checkpoint}: {exc}") from None
    cfg = encoder.config
    setup = EvalSetup(
        preset=encoder.preset,
        image_size=encoder.image_size,
        dim=encoder.dim,
        device=encoder.device,
        num_classes=ShardIndex.classes_of(train_index, val_index),
        k=args.k or (cfg.knn_k if cfg is not None else DEFAULT_K),
        temperature=args.temperature or (cfg.nce_t if cfg is not None else DEFAULT_TEMPERATURE),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        kind=args.kind,
    )
    bank: dict[str, Any] | None = None
    index = None
    if not args.recompute:
        batches, bank = _bank_batches(args, encoder.dim, train_index.num_instances)
        index = index_from_export(batches, encoder.dim, args.kind)
    try:  # the trainer's own evaluation, as its metrics.jsonl records it
        result = evaluate_split(encoder.model, Split(train_index), Split(val_index), setup, index)
    except ValueError as exc:
        raise UsageError(f"--val-data {args.val_data}: {exc}") from None
    return {
        "top1": result["knn_top1"],
        "top5": result["knn_top5"],
        "k": setup.k,
        "k_used": result["k_used"],
        "temperature": setup.temperature,
        "features": "recomputed" if args.recompute else "bank",
        "bank": bank,
        "kind": args.kind,
        "encoder": encoder.describe(),
        "train_data": args.train_data,
        "val_data": args.val_data,
        "num_train": result["num_train"],
        "num_val": result["num_val"],
        "num_classes": setup.num_classes,
        "batch_size": args.batch_size,
        "device": str(encoder.device),
        "skipped": {"train": result["skipped_train"], "val": result["skipped_val"]},
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints the JSON record, returns the exit status."""
    args = parser().parse_args(argv)
    record = evaluate(args)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run(PROG, main))
