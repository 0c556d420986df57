"""What ``python -m trainer.study`` writes: ``study.json``, ``study.md`` and ``study.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from featurestore.files import write_atomic, write_text_atomic

WIDTH, HEIGHT, MARGIN = 640, 360, 48


def markdown(record: dict[str, Any]) -> str:
    """The study as a Markdown table (top-1/top-5 in %, one row per trial)."""
    linear = any(t.get("linear_top1") is not None for t in record["trials"])
    extra = " linear SVM top-1 |" if linear else ""
    lines = [
        f"Study `{record['study']}` ({record['varies']}), data `{record['data']}`, "
        f"validation `{record['val_data']}`, trainer flags `{' '.join(record['trainer_flags'])}`.",
        "",
        f"| {record['study']} | kNN top-1 | kNN top-5 |{extra} epochs | seconds |",
        "|---|---|---|---|---|" + ("---|" if linear else ""),
    ]
    for t in record["trials"]:
        if t["error"]:
            lines.append(f"| {t['value']} | failed: {t['error']} | | | |")
            continue
        svm = f" {100 * t['linear_top1']:.2f} % |" if linear and t.get("linear_top1") else ""
        lines.append(
            f"| {t['value']} | {100 * t['knn_top1']:.2f} % | {100 * t['knn_top5']:.2f} % "
            f"|{svm} {t['epochs']} | {t['seconds']} |"
        )
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any]) -> Image.Image:
    """kNN top-1 per value: one bar each, labelled (PIL only: no plotting library)."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    trials = record["trials"]
    draw.text((MARGIN, 12), f"{record['study']}: kNN top-1 (%) per value", fill="black")
    x0, y0, x1, y1 = MARGIN, MARGIN, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill="black")
    for pct in (0, 25, 50, 75, 100):
        y = y1 - (y1 - y0) * pct / 100
        draw.line([(x0 - 4, y), (x0, y)], fill="black")
        draw.text((4, y - 6), f"{pct}", fill="black")
    slot = (x1 - x0) / max(1, len(trials))
    for i, t in enumerate(trials):
        left = x0 + i * slot + slot * 0.2
        right = x0 + (i + 1) * slot - slot * 0.2
        if t["knn_top1"] is not None:
            top = y1 - (y1 - y0) * t["knn_top1"]
            draw.rectangle([(left, top), (right, y1)], fill=(70, 110, 200))
            draw.text((left, top - 14), f"{100 * t['knn_top1']:.1f}", fill="black")
        else:
            draw.text((left, y1 - 14), "failed", fill="red")
        draw.text((left, y1 + 6), str(t["value"]), fill="black")
    return image


def write_report(record: dict[str, Any], output: Path) -> None:
    """``study.json``, ``study.md`` and ``study.png`` in ``output`` (each written atomically)."""
    output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output / "study.json", json.dumps(record, indent=2) + "\n")
    write_text_atomic(output / "study.md", markdown(record))
    write_atomic(output / "study.png", lambda tmp: plot(record).save(tmp, format="PNG"))


__all__ = ["markdown", "plot", "write_report"]
