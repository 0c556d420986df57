"""``OUTPUT/run.json``: what a run directory holds, for the commands that come after it.

``trainer.run`` writes it before training starts (again on ``--resume``): the resolved
training and validation data, the instance count, the embedding size, the network, the
bank kind and where its snapshots go. ``python -m knn_service.serve --run RUN_DIR`` reads
it to serve the run without a cluster. When the run ends it adds ``skipped_samples``
(corrupt or missing samples, in all and per epoch) and ``finished``. Runs written before
this file existed are read from their newest checkpoint's config instead.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from featurestore.files import write_text_atomic
from trainer.checkpoints import latest_checkpoint, load_checkpoint

RUN_FILE = "run.json"
SNAPSHOT_SUBDIR = "snapshots"
EXPORT_SUBDIR = "encoder"
#: Snapshots of an attached store kept in the run directory (more than the checkpoints kept).
KEEP_SNAPSHOTS = 3


def write_run_record(plan: Any) -> Path:
    """Write ``plan.output/run.json`` from a :class:`trainer.plan.RunPlan`."""
    output = Path(plan.output)
    bank = plan.bank  # store | local | none (--objective parametric: a learned classifier)
    record = {
        "train_data": plan.train_data,
        "val_data": plan.val_data,
        "num_rows": plan.num_rows,
        "num_classes": plan.num_classes,
        "low_dim": plan.config.get("low_dim"),
        "arch": plan.arch,
        "preset": plan.preset,
        "objective": plan.objective,
        "bank": bank,
        "store_name": plan.store_name,
        "snapshots": str(output / SNAPSHOT_SUBDIR) if bank == "store" else None,
        "encoder": str(output / EXPORT_SUBDIR),
        "checkpoints": plan.storage_path,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    output.mkdir(parents=True, exist_ok=True)
    path = output / RUN_FILE
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def record_outcome(output: str | os.PathLike, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Add what the finished run met to ``output/run.json``: ``skipped_samples`` (corrupt
    or missing samples skipped, ``total`` and ``by_epoch`` from the training records of
    ``metrics.jsonl``; a resumed epoch counts once, its last record) and ``finished``.

    Returns:
        The ``skipped_samples`` entry.
    """
    by_epoch: dict[str, int] = {}
    for r in records:
        if "skipped" in r and "epoch" in r:
            by_epoch[str(int(r["epoch"]))] = int(r["skipped"])
    skipped = {"total": sum(by_epoch.values()), "by_epoch": by_epoch}
    path = Path(output) / RUN_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    record.update(skipped_samples=skipped, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return skipped


def read_run_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``run.json``, or for an older run what its newest checkpoint says.

    Raises:
        FileNotFoundError: not a directory, or neither ``run.json`` nor a checkpoint.
        ValueError: an unreadable ``run.json``.
    """
    where = Path(run_dir)
    if not where.is_dir():
        raise FileNotFoundError(f"{where}: no such run directory")
    path = where / RUN_FILE
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "train_data" not in record:
            raise ValueError(f"{path}: not a run record (no train_data)")
        return record
    found = latest_checkpoint(where)
    if found is None:
        raise FileNotFoundError(
            f"{where}: not a run directory (no {RUN_FILE} and no checkpoint below it)"
        )
    _, config = load_checkpoint(found)
    snapshots = where / SNAPSHOT_SUBDIR
    return {
        "train_data": config.get("data"),
        "val_data": config.get("val_data"),
        "low_dim": config.get("low_dim"),
        "bank": _resolved_bank(config),
        "snapshots": str(snapshots) if snapshots.is_dir() else None,
        "encoder": str(where / EXPORT_SUBDIR),
        "checkpoints": str(where),
    }


def checkpoint_bank(bank: Any, plan: Any) -> dict[str, Any]:
    """What the run's checkpoint keeps of ``bank`` (:meth:`Bank.checkpoint_state
    <featurestore.bank_protocol.Bank.checkpoint_state>`): the in-process bank's state, or
    the URI of a store snapshot taken now.

    A store the run created writes to its ``snapshot_dir`` (the run's ``snapshots/``). A
    store the run attached to (``--store-name``, e.g. one ``python -m featurestore start``
    started) keeps its own directory for its automatic snapshots; the run's checkpoints put
    theirs in the run's ``snapshots/`` (newest :data:`KEEP_SNAPSHOTS` kept), so the run
    directory alone can be served or resumed.
    """
    if bank.in_process or plan.create_store:
        return bank.checkpoint_state()
    from featurestore import snapshot

    root = str(Path(plan.output) / SNAPSHOT_SUBDIR)
    kept = bank.checkpoint_state(snapshot.new_snapshot_uri(root, bank.step_count))
    snapshot.prune_snapshots(root, KEEP_SNAPSHOTS)
    return kept


def _resolved_bank(config: dict[str, Any]) -> str:
    """store | local | none of a checkpoint's saved config (``--bank auto`` resolved as the
    run did: :attr:`trainer.config.TrainConfig.resolved_bank`)."""
    from trainer.config import TrainConfig

    return TrainConfig.from_dict(config).resolved_bank


def local_bank_state(run_dir: str | os.PathLike, record: dict[str, Any]) -> dict[str, Any]:
    """The in-process bank (``rows`` ``[N, d]``, ``z``, ``step``) of the run's newest
    checkpoint (``--bank local`` / ``--launcher local`` runs keep it there).

    Raises:
        FileNotFoundError: no checkpoint, or it holds no in-process bank.
    """
    roots = [record.get("checkpoints"), str(run_dir)]
    for root in [r for r in roots if r]:
        found = latest_checkpoint(root)
        if found is None:
            continue
        state, _ = load_checkpoint(found)
        if state.bank is None:
            raise FileNotFoundError(f"checkpoint {found} holds no in-process bank")
        return state.bank
    raise FileNotFoundError(f"{run_dir}: no checkpoint with the bank below it yet")


__all__ = [
    "EXPORT_SUBDIR",
    "RUN_FILE",
    "SNAPSHOT_SUBDIR",
    "checkpoint_bank",
    "local_bank_state",
    "read_run_record",
    "record_outcome",
    "write_run_record",
]
