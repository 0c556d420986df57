"""Figures of a run: nearest-neighbour retrieval and training curves (PNG, drawn with PIL).

    python -m knn_service.show retrieval --checkpoint CKPT --train-data DIR --val-data DIR
        --out grid.png [--queries 8 | --ids 1,2,3] [--seed 0] [--k 10] [--cell 64]
    python -m knn_service.show curves --metrics RUN/metrics.jsonl --out curves.png
        [--width 1000] [--height 420]

``retrieval``: validation images (``--ids``, or ``--queries`` drawn with ``--seed``) and
their ``k`` nearest training images by cosine similarity of the encoder's features, train
features recomputed with the test transform (the paper's retrieval figure); neighbours of
another label than the query get a red frame, of the same label a green one (see
:mod:`knn_service.figures`). ``curves``: training loss and kNN top-1 by epoch from a
``metrics.jsonl``. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from knn_service.cli import OneLineParser, UsageError, non_negative_int, positive_int, run

if TYPE_CHECKING:  # numpy, torch and PIL load when a figure is drawn: --help stays fast
    from PIL import Image

logger = logging.getLogger("knn_service.show")

PROG = "python -m knn_service.show"


def parser() -> argparse.ArgumentParser:
    """The command-line parser (sub-commands ``retrieval`` and ``curves``)."""
    p = OneLineParser(prog=PROG, description="Figures of a run (PNG).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    r = sub.add_parser("retrieval", help="query images and their nearest training images")
    r.add_argument("--checkpoint", required=True, help="exported encoder, checkpoint or run dir")
    r.add_argument("--train-data", required=True, help="training shards (the neighbours)")
    r.add_argument("--val-data", required=True, help="validation shards (the queries)")
    r.add_argument("--out", required=True, help="output PNG")
    r.add_argument("--queries", type=positive_int, default=8, help="random queries to show")
    r.add_argument("--ids", help="comma-separated validation ids (instead of random ones)")
    r.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random queries")
    r.add_argument("--k", type=positive_int, default=10, help="neighbours per query")
    r.add_argument("--cell", type=positive_int, default=64, help="image cell size in pixels")
    r.add_argument("--batch-size", type=positive_int, default=256, help="encoding batch size")
    r.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    c = sub.add_parser("curves", help="training loss and kNN top-1 by epoch")
    c.add_argument("--metrics", required=True, help="the run's metrics.jsonl")
    c.add_argument("--out", required=True, help="output PNG")
    c.add_argument("--width", type=positive_int, default=1000, help="image width")
    c.add_argument("--height", type=positive_int, default=420, help="image height")
    return p


def _check_out(out: str) -> Path:
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the file name must end in .png")
    if not path.parent.is_dir():
        raise UsageError(f"--out {out}: no such directory {path.parent}")
    return path


def _save_png(image: Image.Image, path: Path) -> None:
    """Write to a temp name beside ``path``, then rename (no half-written figures)."""
    from featurestore.files import write_atomic

    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def _parse_ids(text: str, num_val: int) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--ids {text}: expected comma-separated integers") from None
    if not ids:
        raise UsageError("--ids: no ids given")
    bad = [i for i in ids if not 0 <= i < num_val]
    if bad:
        raise UsageError(f"--ids: {bad[:5]} outside [0, {num_val}) of --val-data")
    return ids


def _load_data(location: str, flag: str):
    from knn_service.train_labels import TrainLabels
    from trainer.api import dataset_location

    split = "test" if flag == "--val-data" else "train"
    try:
        return TrainLabels.load(dataset_location(location, split))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{flag} {location}: {exc}") from None


def _label_name(data: Any, label: int) -> str:
    if 0 <= label < len(data.classes):
        return str(data.classes[label])
    return str(label) if label >= 0 else "?"


def show_retrieval(args: argparse.Namespace) -> dict[str, Any]:
    """Draw the retrieval grid; returns a summary."""
    import numpy as np
    import torch

    from featurestore.knn.index import KnnIndex
    from knn_service.encoders import load_encoder_from
    from knn_service.figures import Tile, retrieval_grid
    from knn_service.train_labels import read_image_bytes
    from trainer.api import decode_image, eval_loader, extract_features

    out = _check_out(args.out)
    train = _load_data(args.train_data, "--train-data")
    val = _load_data(args.val_data, "--val-data")
    if args.ids is not None:
        ids = _parse_ids(args.ids, val.num_instances)
    else:
        rng = np.random.default_rng(args.seed)
        count = min(args.queries, val.num_instances)
        ids = sorted(int(i) for i in rng.choice(val.num_instances, size=count, replace=False))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        encoder = load_encoder_from(args.checkpoint, train.index, device=device)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"--checkpoint {args.checkpoint}: {exc}") from None

    loader = eval_loader(train.index, args.batch_size, encoder.transform)
    feats, seen = extract_features(
        encoder.model, loader, train.num_instances, encoder.dim, encoder.device
    )
    index = KnnIndex(dim=encoder.dim, kind="flat")
    index.add(feats[seen], ids=torch.nonzero(seen).flatten())
    k = min(args.k, len(index))

    query_bytes = read_image_bytes(val, ids)
    query_images = []
    for i in ids:
        try:
            query_images.append(decode_image(query_bytes[i]))
        except Exception as exc:  # PIL raises many types for bad bytes
            raise UsageError(
                f"--val-data {args.val_data}: image of id {i} does not decode: {exc}"
            ) from None
    sims, nbr = index.search(encoder.encode_images(query_images).numpy(), k)  # [Q, k]
    nbr_bytes = read_image_bytes(train, nbr.flatten().tolist())
    queries = [
        Tile(image, int(val.labels[i]), _label_name(val, int(val.labels[i])))
        for i, image in zip(ids, query_images)
    ]
    rows = [
        [
            Tile(decode_image(nbr_bytes[j]), int(train.labels[j]), f"{s:.3f}")
            for s, j in zip(row_s, row_ids)
        ]
        for row_s, row_ids in zip(sims.tolist(), nbr.tolist())
    ]
    image = retrieval_grid(queries, rows, cell=args.cell)
    _save_png(image, out)
    mismatched = sum(
        t.label != q.label for q, row in zip(queries, rows) for t in row if t.label >= 0
    )
    return {
        "out": str(out),
        "size": list(image.size),
        "query_ids": ids,
        "neighbour_ids": nbr.tolist(),
        "k": k,
        "other_label_neighbours": mismatched,
        "encoder": encoder.describe(),
    }


def _read_metrics(path: str) -> list[dict[str, Any]]:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--metrics {path}: no such file")
    records = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--metrics {path}: line {number} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise UsageError(f"--metrics {path}: line {number} is not a JSON object")
        records.append(record)
    if not records:
        raise UsageError(f"--metrics {path}: no records")
    return records


def show_curves(args: argparse.Namespace) -> dict[str, Any]:
    """Draw the training curves; returns a summary."""
    out = _check_out(args.out)
    records = _read_metrics(args.metrics)
    try:
        from knn_service.figures import training_curves

        image = training_curves(records, args.width, args.height)
    except ValueError as exc:
        raise UsageError(f"--width/--height: {exc}") from None
    _save_png(image, out)
    epochs = [r["epoch"] for r in records if isinstance(r.get("epoch"), (int, float))]
    return {
        "out": str(out),
        "size": list(image.size),
        "records": len(records),
        "epochs": [min(epochs), max(epochs)] if epochs else None,
        "last_knn_top1": next(
            (
                r["knn_top1"]
                for r in reversed(records)
                if isinstance(r.get("knn_top1"), (int, float)) and math.isfinite(r["knn_top1"])
            ),
            None,
        ),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints a JSON summary of the figure, returns the exit status."""
    args = parser().parse_args(argv)
    summary = show_retrieval(args) if args.command == "retrieval" else show_curves(args)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run(PROG, main))
