"""Where the kNN service reads the bank from: a running store, a snapshot, or a finished run.

A :class:`BankSource` gives the service what it needs of a bank: its size, a fresh stream of
Arrow record batches ``(id, vector)`` for every index rebuild, and the rows of given ids (for
``"ids"`` queries). Only :func:`store_source` needs Ray; a snapshot or a run directory is
read from files (Parquet), so a finished run is served with no cluster:

- :func:`snapshot_source`: one snapshot, or a snapshot directory, whose newest complete
  snapshot is read again on every rebuild (a run still writing snapshots is followed);
- :func:`run_source`: a run directory (``trainer.run --output``): its snapshot directory, or
  for an in-process bank (``--launcher local``) its newest checkpoint's rows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass
class BankSource:
    """The bank as the service reads it.

    Attributes:
        dim: ``d``.
        num_rows: ``N``.
        export: returns a fresh iterable of record batches ``(id int64, vector float32[d])``.
        rows: ids ``[Q]`` → rows ``[Q, d]`` (float32).
        described: what was opened (logged, and in the service's health).
        train_data: the run's training data (``run_source`` only), else None.
        encoder: the run's exported encoder directory when it exists, else None.
    """

    dim: int
    num_rows: int
    export: Callable[[], Iterable[Any]]
    rows: Callable[[np.ndarray], torch.Tensor]
    described: dict[str, Any] = field(default_factory=dict)
    train_data: str | None = None
    encoder: str | None = None


def store_source(store: Any) -> BankSource:
    """A running :class:`~featurestore.store.ShardedStore` (attached by the caller)."""
    return BankSource(
        dim=store.dim,
        num_rows=store.num_rows,
        export=store.export,
        rows=lambda ids: store.get(torch.as_tensor(ids, dtype=torch.int64)),
        described={"store_name": store.name},
    )


def snapshot_source(location: str) -> BankSource:
    """A snapshot (its directory or ``manifest.json``), or a directory of snapshots (the
    newest, looked up again on every rebuild).

    Raises:
        OSError, ValueError: nothing readable there (the message names it).
    """
    from featurestore import snapshot

    first = snapshot.read_manifest(snapshot.resolve(location))
    current = {"manifest": first}

    def export():
        manifest = snapshot.read_manifest(snapshot.resolve(location))
        if (manifest.num_rows, manifest.dim) != (first.num_rows, first.dim):
            raise ValueError(
                f"{manifest.uri} has {manifest.num_rows} x {manifest.dim} rows, "
                f"the service started with {first.num_rows} x {first.dim}"
            )
        current["manifest"] = manifest
        logger.info("bank from snapshot %s (step %d)", manifest.uri, manifest.step)
        return snapshot.iter_batches(manifest)

    def rows(ids: np.ndarray) -> torch.Tensor:
        manifest = current["manifest"]
        out = torch.empty(len(ids), manifest.dim)
        for j, i in enumerate(ids.tolist()):
            snapshot.read_rows(manifest, i, i + 1, out[j : j + 1])
        return out

    return BankSource(
        dim=first.dim,
        num_rows=first.num_rows,
        export=export,
        rows=rows,
        described={"snapshot": location, "step": first.step},
    )


def _tensor_source(bank_rows: torch.Tensor, described: dict[str, Any]) -> BankSource:
    from featurestore.arrow_io import EXPORT_BATCH_ROWS, to_record_batch

    rows = bank_rows.float()

    def export():
        for r0 in range(0, rows.shape[0], EXPORT_BATCH_ROWS):
            r1 = min(rows.shape[0], r0 + EXPORT_BATCH_ROWS)
            yield to_record_batch(torch.arange(r0, r1), rows[r0:r1])

    return BankSource(
        dim=rows.shape[1],
        num_rows=rows.shape[0],
        export=export,
        rows=lambda ids: rows[torch.as_tensor(ids, dtype=torch.int64)],
        described=described,
    )


def run_source(run_dir: str | os.PathLike) -> BankSource:
    """A finished (or running) training run's bank, training data and encoder.

    Raises:
        FileNotFoundError: not a run directory, or no bank saved yet.
        ValueError: unreadable files.
    """
    from trainer.api import local_bank_state, read_run_record

    record = read_run_record(run_dir)
    objective = (record.get("objective") or {}).get("kind")
    if objective == "parametric":
        raise ValueError(
            f"{run_dir}: a parametric run has no memory bank to serve; serve its encoder "
            "over recomputed features with knn_service.eval --recompute instead"
        )
    snapshots = record.get("snapshots")
    if record.get("bank") == "local" or not snapshots:
        state = local_bank_state(run_dir, record)
        source = _tensor_source(state["rows"], {"run": str(run_dir), "step": state.get("step")})
    else:
        from featurestore import snapshot

        if snapshot.latest_snapshot(snapshots) is None:
            raise FileNotFoundError(f"{run_dir}: no complete bank snapshot in {snapshots} yet")
        source = snapshot_source(snapshots)
        source.described = {"run": str(run_dir), **source.described}
    source.train_data = record.get("train_data")
    encoder = record.get("encoder")
    source.encoder = encoder if encoder and os.path.isdir(encoder) else None
    return source


__all__ = ["BankSource", "run_source", "snapshot_source", "store_source"]
