"""Summarise a run's ``metrics.jsonl`` for ``device_check.sh``: epochs, images/s, epoch
time and the kNN curve, as JSON (``--out``) and as Markdown on standard output.

    python benchmarks/device_summary.py --metrics RUN/metrics.jsonl --out summary.json
    python benchmarks/device_summary.py --metrics RUN/metrics.jsonl --fit-seconds 390 \
        --num-images 50000        # prints how many epochs fit that many seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def read_records(path: Path) -> list[dict]:
    """The JSON records of a ``metrics.jsonl`` (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise(records: list[dict], num_images: int | None = None) -> dict:
    """Epochs run, median images/s over the training records (the first epoch left out when
    there are more: it pays for warm-up), the training seconds of an epoch at that rate
    (with ``num_images``), and the kNN curve."""
    train = [r for r in records if r.get("images_per_sec")]
    rates = [r["images_per_sec"] for r in train[1:] or train]
    curve = [
        {"epoch": r["epoch"], "features": r.get("features"), "knn_top1": r["knn_top1"]}
        for r in records
        if r.get("knn_top1") is not None
    ]
    rate = statistics.median(rates) if rates else None
    return {
        "epochs": max((r["epoch"] for r in records), default=0),
        "images_per_sec_median": rate,
        "epoch_seconds": num_images / rate if rate and num_images else None,
        "final_loss": train[-1]["loss"] if train else None,
        "knn_curve": curve,
    }


def markdown(summary: dict) -> str:
    """The summary as a Markdown table of the kNN curve with a header line."""
    rate = summary["images_per_sec_median"]
    lines = [
        f"epochs {summary['epochs']}, median {rate:,.0f} images/s" if rate else "no training",
        "",
        "| epoch | features | kNN top-1 |",
        "|---|---|---|",
    ]
    for point in summary["knn_curve"]:
        lines.append(f"| {point['epoch']} | {point['features']} | {point['knn_top1']:.2%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--metrics", type=Path, required=True)
    p.add_argument("--out", type=Path, help="summary JSON written")
    p.add_argument("--fit-seconds", type=float, help="print the epochs that fit these seconds")
    p.add_argument("--num-images", type=int, help="training images per epoch")
    p.add_argument("--max-epochs", type=int, default=200)
    args = p.parse_args(argv)
    summary = summarise(read_records(args.metrics), args.num_images)
    if args.fit_seconds is not None:
        rate = summary["images_per_sec_median"]
        if not rate or not args.num_images:
            p.error("--fit-seconds needs training records and --num-images")
        fit = int(args.fit_seconds * rate / args.num_images)
        print(max(1, min(args.max_epochs, fit)))
        return 0
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
