"""Training metrics: Ray's metric exporter (``npid_*``) and ``OUTPUT/metrics.jsonl``.

# Ray: ray.util.metrics objects are created lazily inside the training workers; Ray's
# per-node exporter serves them to Prometheus.
"""

from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from featurestore.files import write_text_atomic

logger = logging.getLogger(__name__)

#: Names the Grafana dashboard and the monitoring test rely on.
METRIC_NAMES = (
    "npid_train_loss",
    "npid_train_images_total",
    "npid_train_step_seconds",
    "npid_train_epoch",
    "npid_train_skipped_samples_total",
    "npid_knn_top1",
    "npid_knn_top5",
)

STEP_SECONDS_BOUNDARIES = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]


class TrainMetrics:
    """The trainer's Ray metrics (one instance per worker process)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram  # Ray: metric objects

        from featurestore.metrics import GaugeKeeper  # imports Ray: only where metrics are made

        self.loss = Gauge("npid_train_loss", description="Training loss (batch mean).")
        self.images = Counter("npid_train_images_total", description="Images trained on.")
        self.step_seconds = Histogram(
            "npid_train_step_seconds",
            description="Wall time of one training step (encode, store step, backward, update; "
            "the next batch loads while the store works).",
            boundaries=STEP_SECONDS_BOUNDARIES,
        )
        self.epoch = Gauge("npid_train_epoch", description="Current epoch.")
        self.skipped = Counter(
            "npid_train_skipped_samples_total", description="Corrupt samples skipped."
        )
        self.knn_top1 = Gauge("npid_knn_top1", description="Weighted kNN top-1 accuracy.")
        self.knn_top5 = Gauge("npid_knn_top5", description="Weighted kNN top-5 accuracy.")
        self._keeper = GaugeKeeper()

    def gauge(self, name: str, value: float) -> None:
        """Set gauge ``name``; the rarely changing ones (epoch, kNN) stay exported between
        sets."""
        if name == "loss":
            self.loss.set(value)
        else:
            self._keeper.set(getattr(self, name), value)

    def count(self, name: str, value: float) -> None:
        """Add ``value`` to counter ``name`` (``images``, ``skipped``)."""
        getattr(self, name).inc(value)

    def observe(self, name: str, value: float) -> None:
        """Record ``value`` in histogram ``name`` (``step_seconds``)."""
        getattr(self, name).observe(value)


@lru_cache(maxsize=1)
def train_metrics() -> TrainMetrics:
    """This process's :class:`TrainMetrics` (created on first use)."""
    return TrainMetrics()


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON object as a line to ``path`` (created with its parents)."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (empty list when missing)."""
    file = Path(path)
    if not file.exists():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def truncate_jsonl_after(path: str | os.PathLike, step: int) -> None:
    """Drop what a run resumed at ``step`` writes again: the records after ``step``, and a
    final evaluation at ``step`` itself (``loss`` None, epoch > 0: written after the last
    checkpoint, by a run stopped during it or finished before more epochs were asked for)."""

    def redone(r: dict) -> bool:
        at = int(r.get("step", 0))
        final = at == step and "loss" in r and r["loss"] is None and int(r.get("epoch", 0)) > 0
        return at > step or final

    records = read_jsonl(path)
    kept = [r for r in records if not redone(r)]
    if len(kept) == len(records):
        return
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    logger.info("metrics.jsonl: dropped %d records after step %d", len(records) - len(kept), step)
