"""Linear evaluation of a trained encoder: a linear classifier on its frozen features.

    python -m knn_service.linear --checkpoint RUN --train-data DIR --val-data DIR
        [--features embedding|pooled] [--classifier logistic|svm]
        [--holdout-fraction 0.1] [--seed 0] [--batch-size 256] [--device cuda]

The paper's linear evaluation (Wu et al. Table 1): the train and validation images are
encoded once with the checkpoint's encoder and its test transform (no augmentation), as the
kNN evaluation does; the features are

- ``embedding``: the ``d``-dim unit embedding (128 in the paper);
- ``pooled``: the globally pooled features the linear head reads (512 for resnet18), taken
  through the same encoding path, so each row is L2-normalized before standardization.

Then a linear classifier (:mod:`knn_service.linear_probe`: multinomial logistic regression,
or a one-vs-rest squared-hinge linear SVM) is fitted in plain torch on ``--device``. Its L2
strength is chosen from ``1e-6 … 1e-1`` on a seeded, class-stratified held-out part of the
training set (``--holdout-fraction``), never on the validation set, then the classifier is
refitted on the whole training set and scored on validation.

Prints one JSON line: ``top1`` and ``top5`` (fractions), the chosen ``l2``, the held-out
top-1 of every strength, the feature kind and size, the counts and the seconds spent.
Every image of both datasets must have a label. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from knn_service.cli import OneLineParser, UsageError, positive_int, run

logger = logging.getLogger("knn_service.linear")

PROG = "python -m knn_service.linear"
FEATURES = ("embedding", "pooled")
CLASSIFIERS = ("logistic", "svm")


def _fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = OneLineParser(
        prog=PROG, description="Linear classifier on frozen features: top-1/top-5 (JSON)."
    )
    p.add_argument("--checkpoint", required=True, help="exported encoder, checkpoint or run dir")
    p.add_argument("--train-data", required=True, help="training shards (or: digits)")
    p.add_argument("--val-data", required=True, help="validation shards (or: digits)")
    p.add_argument(
        "--features",
        choices=FEATURES,
        default="embedding",
        help="the embedding, or the pooled features before the head (default: embedding)",
    )
    p.add_argument(
        "--classifier",
        choices=CLASSIFIERS,
        default="logistic",
        help="softmax logistic regression, or a one-vs-rest linear SVM (default: logistic)",
    )
    p.add_argument(
        "--holdout-fraction",
        type=_fraction,
        default=0.1,
        help="part of the training set that chooses the L2 strength (default: 0.1)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default: 0)")
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="encoding batch (default: 256)"
    )
    p.add_argument(
        "--max-iter", type=positive_int, default=None, help="L-BFGS iterations per fit (200)"
    )
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    return p


def _load_labelled_index(location: str, flag: str):
    """The dataset's index; refuses one with images that have no label."""
    from trainer.api import ShardIndex, dataset_location  # heavy: --help stays fast

    split = "test" if flag == "--val-data" else "train"
    try:
        index = ShardIndex.load(dataset_location(location, split))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{flag} {location}: {exc}") from None
    unlabelled = int((index.labels < 0).sum())
    if index.num_instances == 0:
        raise UsageError(f"{flag} {location}: the dataset has no images")
    if unlabelled:
        raise UsageError(
            f"{flag} {location}: {unlabelled} of its {index.num_instances} images have no "
            "label (-1); a linear classifier needs every label"
        )
    return index


def _encode(model, index, dim: int, encoder, args: argparse.Namespace, flag: str):
    """``(features [n, dim], labels [n])`` of the images of ``index`` that decode."""
    import torch

    from trainer.api import eval_loader, extract_features

    loader = eval_loader(index, args.batch_size, encoder.transform, num_workers=args.num_workers)
    feats, seen = extract_features(model, loader, index.num_instances, dim, encoder.device)
    if not bool(seen.any()):
        raise UsageError(f"{flag}: no image decodes")
    return feats[seen], torch.from_numpy(index.labels).long()[seen]


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the linear evaluation described by parsed ``args``; returns the printed record."""
    import torch

    from knn_service.encoders import load_encoder_from
    from knn_service.linear_probe import MAX_ITER, select_and_fit, topk_accuracy
    from trainer.api import EVAL_BATCH, ShardIndex, pooled_trunk

    started = time.perf_counter()
    args.batch_size = args.batch_size or EVAL_BATCH
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {args.num_workers}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    train_index = _load_labelled_index(args.train_data, "--train-data")
    val_index = _load_labelled_index(args.val_data, "--val-data")
    try:
        encoder = load_encoder_from(args.checkpoint, train_index, device=device)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"--checkpoint {args.checkpoint}: {exc}") from None
    model, dim = encoder.model, encoder.dim
    if args.features == "pooled":
        try:
            model, dim = pooled_trunk(encoder.model)
        except ValueError as exc:
            raise UsageError(f"--features pooled: {exc}") from None
    num_classes = ShardIndex.classes_of(train_index, val_index)

    train_x, train_y = _encode(model, train_index, dim, encoder, args, "--train-data")
    val_x, val_y = _encode(model, val_index, dim, encoder, args, "--val-data")
    encoded = time.perf_counter()
    try:
        probe = select_and_fit(
            train_x.to(encoder.device),
            train_y,
            num_classes,
            args.classifier,
            holdout_fraction=args.holdout_fraction,
            seed=args.seed,
            max_iter=args.max_iter or MAX_ITER,
        )
    except ValueError as exc:
        raise UsageError(f"--train-data {args.train_data}: {exc}") from None
    fitted = time.perf_counter()
    val_scores = probe.classifier.scores(val_x.to(encoder.device))
    accuracy = topk_accuracy(val_scores, val_y, (1, 5))
    train_top1 = topk_accuracy(probe.classifier.scores(train_x.to(encoder.device)), train_y, (1,))
    return {
        "top1": accuracy[1],
        "top5": accuracy[5],
        "train_top1": train_top1[1],
        "features": args.features,
        "dim": dim,
        "classifier": args.classifier,
        "l2": probe.l2,
        "holdout": [{"l2": l2, "top1": top1} for l2, top1 in probe.holdout_top1.items()],
        "holdout_fraction": args.holdout_fraction,
        "seed": args.seed,
        "lbfgs_evaluations": probe.classifier.evaluations,
        "encoder": encoder.describe(),
        "train_data": args.train_data,
        "val_data": args.val_data,
        "num_train": len(train_y),
        "num_fit": probe.num_fit,
        "num_holdout": probe.num_holdout,
        "num_val": len(val_y),
        "num_classes": num_classes,
        "skipped": {
            "train": train_index.num_instances - len(train_y),
            "val": val_index.num_instances - len(val_y),
        },
        "device": str(encoder.device),
        "seconds": {
            "encode": round(encoded - started, 3),
            "fit": round(fitted - encoded, 3),
            "total": round(time.perf_counter() - started, 3),
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints the JSON record on one line, returns the exit status."""
    args = parser().parse_args(argv)
    record = evaluate(args)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(run(PROG, main))
