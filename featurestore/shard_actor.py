"""One feature store shard: a Ray actor holding rows ``[lo, hi)`` in a :class:`BankShard`.

# Ray: this module defines the shard actor (``RemoteShard``); the client is store.py.

The actor runs the store protocol (README, *The feature store*) where the rows are: for a
step it draws its share of the noise (:func:`featurestore.noise.local_noise`), scores it,
returns only :class:`~featurestore.statistics.PartialStats` and applies the momentum update
to its own rows, all in one call. Row-touching methods run one at a time (``max_concurrency=1``), so
each call's score-then-update is atomic. Shard 0 is also the store's authority for the step
counter, NCE's ``Z`` and the snapshot schedule: it counts each step in the step call itself
and returns that state with the statistics (a :class:`StepControl`), so a step costs one
round trip. A second concurrency group, ``control``, serves small bookkeeping calls
without waiting behind a running step.

A restarted actor (``max_restarts=-1``) reloads its rows, ``Z`` and step from the newest
complete snapshot its store wrote under ``snapshot_dir`` (else the snapshot the store was
restored from, else the seeded initial rows, with a warning).
"""

from __future__ import annotations

import logging
import sys
import threading
import uuid
import warnings
from collections import OrderedDict
from dataclasses import asdict
from typing import Any

import numpy as np
import ray
import torch
from torch import Tensor

from featurestore import arrow_io, snapshot, wire
from featurestore.bank_shard import BankShard, initial_rows
from featurestore.metrics import store_metrics
from featurestore.noise import NoiseSpec, local_noise
from featurestore.objectives import Objective

# The protocol's names, importable from here as before.
from featurestore.shard_protocol import (
    RECENT_REQUESTS,
    UNKNOWN_OBJECTIVE,
    ShardStamp,
    StepControl,
    StepRequest,
    StoreConfig,
    as_tensor,
    pack_stats,
    shard_bounds,
    unpack_stats,
)
from featurestore.snapshot_schedule import SnapshotSchedule
from featurestore.statistics import DEFAULT_MEMORY_BUDGET
from featurestore.validation import storage_dtype

logger = logging.getLogger(__name__)


def _was_reconstructed() -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def _memory(rows: Tensor) -> dict[str, int]:
    """Bytes of the shard's rows, of its process (RSS now and its peak) and, on a GPU,
    allocated there."""
    import resource

    import psutil

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    found = {
        "rows_bytes": rows.numel() * rows.element_size(),
        "process_rss_bytes": psutil.Process().memory_info().rss,
        "process_peak_rss_bytes": peak if sys.platform == "darwin" else peak * 1024,
    }
    if rows.is_cuda:
        found["cuda_allocated_bytes"] = torch.cuda.memory_allocated(rows.device)
    return found


class ShardActor:
    """Shard ``shard`` of a store: rows ``[bounds[shard], bounds[shard + 1])``.

    Args:
        config: the store's configuration.
        shard: this shard's index.
        restore_uri: snapshot to load the rows from on first start (None: seeded rows).
    """

    def __init__(self, config: StoreConfig, shard: int, restore_uri: str | None) -> None:
        torch.set_num_threads(config.threads_per_shard)
        self.config = config
        self.shard = shard
        self.lo, self.hi = config.bounds[shard], config.bounds[shard + 1]
        self._bounds = list(config.bounds)
        self._dtype = storage_dtype(config.dtype)
        self._lock = threading.Lock()
        self._recent: OrderedDict[str, Any] = OrderedDict()
        #: Objectives clients registered, by key: a step names its objective, not sends it.
        self._objectives: dict[str, Objective] = {}
        self._metrics = store_metrics()
        reconstructed = _was_reconstructed()
        rows, manifest = self._initial_rows(restore_uri, reconstructed)
        device = config.device
        if device != "cpu" and not torch.cuda.is_available():
            raise RuntimeError(f"shard {shard} was given a GPU but torch sees no CUDA device")
        self.bank = BankShard(
            rows, self.lo, config.momentum, device, self._dtype, config.memory_budget
        )
        del rows
        loaded_step = manifest.step if manifest is not None else 0
        self.stamp = ShardStamp(
            instance=uuid.uuid4().hex,
            reconstructed=reconstructed,
            loaded_from=None if manifest is None else manifest.uri,
            loaded_step=loaded_step,
        )
        # Store-wide state; authoritative on shard 0 only.
        self._z: float | None = None if manifest is None else manifest.z
        self._counter = loaded_step
        self._schedule = SnapshotSchedule(
            config.snapshot_every_steps if config.snapshot_dir else 0,
            config.snapshot_every_seconds if config.snapshot_dir else 0.0,
            loaded_step,
            config.name,
        )
        self._snapshot_retries = 0
        self._applied = 0
        self._metrics.set_rows(shard, self.hi - self.lo)
        if reconstructed:
            self._metrics.count_restart(shard)

    # ------------------------------------------------------------------ start-up

    def _initial_rows(
        self, restore_uri: str | None, reconstructed: bool
    ) -> tuple[Tensor, snapshot.Manifest | None]:
        """This shard's starting rows and the manifest they came from (None: seeded)."""
        cfg = self.config
        if reconstructed:
            candidates = []
            if cfg.snapshot_dir is not None:
                candidates = [
                    m.uri for m in snapshot.list_snapshots(cfg.snapshot_dir, cfg.store_id)
                ]
            if restore_uri is not None:
                candidates.append(restore_uri)
            for uri in candidates:
                try:
                    rows, manifest = self._load(uri)
                except (FileNotFoundError, ValueError) as err:
                    logger.error("shard %d: cannot reload snapshot %s: %s", self.shard, uri, err)
                    continue
                logger.warning(
                    "shard %d of store %r restarted: rows [%d, %d) reloaded from snapshot %s "
                    "(step %d)", self.shard, cfg.name, self.lo, self.hi, uri, manifest.step
                )  # fmt: skip
                return rows, manifest
            logger.warning(
                "shard %d of store %r restarted with no snapshot to reload: rows [%d, %d) are "
                "back to their seeded initial values and every update to them is lost",
                self.shard, cfg.name, self.lo, self.hi,
            )  # fmt: skip
        elif restore_uri is not None:
            return self._load(restore_uri)
        rows = initial_rows(
            cfg.seed, self.lo, self.hi, cfg.dim, cfg.normalize_init, dtype=self._dtype
        )
        return rows, None

    def _load(self, uri: str) -> tuple[Tensor, snapshot.Manifest]:
        """Rows ``[lo, hi)`` read from the snapshot at ``uri`` (only the row groups needed)."""
        manifest = self._check_snapshot(uri)
        rows = torch.empty(self.hi - self.lo, self.config.dim, dtype=self._dtype)
        snapshot.read_rows(manifest, self.lo, self.hi, rows)
        return rows, manifest

    def _check_snapshot(self, uri: str) -> snapshot.Manifest:
        """The manifest at ``uri``, checked to fit this store's row count and dim."""
        manifest = snapshot.read_manifest(uri)
        if manifest.num_rows != self.config.num_rows or manifest.dim != self.config.dim:
            raise ValueError(
                f"snapshot {uri} holds {manifest.num_rows} rows of dim {manifest.dim}; the store "
                f"{self.config.name!r} has {self.config.num_rows} rows of dim {self.config.dim}"
            )
        return manifest

    # ------------------------------------------------------------- data plane

    def _remember(self, request_id: str, result: Any) -> None:
        self._recent[request_id] = result
        while len(self._recent) > RECENT_REQUESTS:
            self._recent.popitem(last=False)

    def register_objective(self, key: str, objective: dict[str, Any]) -> tuple[ShardStamp, None]:
        """Keep ``objective`` (``Objective.to_dict()``) under ``key`` for the steps naming it."""
        self._objectives[key] = Objective.from_dict(objective)
        return self.stamp, None

    def step(self, request: StepRequest, *feats: np.ndarray | Tensor) -> list[bytes]:
        """Score the features ``[B, d]`` against this shard's rows, then update the owned ids.

        ``feats`` are consecutive row blocks (:func:`featurestore.wire.split_rows`), each
        small enough for Ray to carry inline, or one array the client shared through the
        object store; everything else comes in one :class:`StepRequest`.

        Returns ``(stamp, (stats, control))`` cut into ``request.pieces`` byte strings
        (:func:`featurestore.wire.to_pieces`): the :class:`PartialStats` in wire form
        (:func:`pack_stats`) and, from shard 0 only, the store's :class:`StepControl` after
        counting this step. A repeated ``request_id`` (a client retry) returns the first
        answer and does not update again.
        """
        self._metrics.count_request("step", self.shard)
        if request.request_id in self._recent:
            return wire.to_pieces((self.stamp, self._recent[request.request_id]), request.pieces)
        obj = self._objectives.get(request.objective)
        if obj is None:  # a restarted shard: the client registers it again and resends
            raise LookupError(f"{UNKNOWN_OBJECTIVE} {request.objective!r}")
        feats = as_tensor(wire.join_rows([np.asarray(f) for f in feats]))
        ids = as_tensor(request.ids)
        noise = None
        if obj.sampled:
            assert request.spec is not None
            noise = local_noise(request.spec, feats.shape[0], self._bounds, self.shard)
        stats = self.bank.statistics(feats, ids, obj, noise, request.z, self.config.num_rows)
        owned = self.bank.owned(ids)
        if owned.numel():
            self.bank.update(ids[owned], feats[owned])
        control = None
        if self.shard == 0:
            control = self._count_step(
                request.min_step, request.known_z, request.z_observation, obj
            )
        reply = (pack_stats(stats), control)
        self._remember(request.request_id, reply)
        self._applied += 1
        return wire.to_pieces((self.stamp, reply), request.pieces)

    def _count_step(
        self,
        min_step: int,
        known_z: float | None,
        z_observation: float | None = None,
        objective: Objective | None = None,
    ) -> StepControl:
        """Shard 0: count one step (and fold a client's ``Z`` observation into ``Z``); the
        counter, ``Z`` and whether a snapshot is due."""
        with self._lock:
            self._counter = max(self._counter, int(min_step)) + 1
            if self._z is None and known_z is not None:
                self._z = float(known_z)
            if objective is not None:  # the objective's rule (NCE with z_momentum: an EMA)
                self._z = objective.next_z(self._z, z_observation)
            return StepControl(self._counter, self._z, self._schedule.due(self._counter))

    def expsum(
        self, feats: Tensor, ids: Tensor, objective: dict[str, Any], spec: NoiseSpec
    ) -> tuple[ShardStamp, tuple[float, Tensor, Tensor]]:
        """First-step NCE statistics: ``(Σ exp(s) over this shard's noise, positions [p],
        positive scores s_i [p])`` for the positives this shard owns. Changes nothing."""
        self._metrics.count_request("expsum", self.shard)
        obj = Objective.from_dict(objective)
        noise = local_noise(spec, feats.shape[0], self._bounds, self.shard)
        total = self.bank.expsum(feats, noise, obj.temperature)
        owned = self.bank.owned(ids)
        pos = self.bank.get(ids[owned]).cpu()
        s_pos = (pos * feats[owned]).sum(dim=1) / obj.temperature
        return self.stamp, (total, owned, s_pos)

    def get(self, ids: Tensor) -> tuple[ShardStamp, Tensor]:
        """Rows of ``ids`` ``[n]`` (all owned) as float32 ``[n, d]`` on the CPU."""
        self._metrics.count_request("get", self.shard)
        return self.stamp, self.bank.get(ids).cpu()

    def set(self, ids: Tensor, rows: Tensor) -> tuple[ShardStamp, None]:
        """Overwrite the rows of ``ids`` ``[n]`` (all owned) with ``rows`` ``[n, d]``."""
        self._metrics.count_request("set", self.shard)
        self.bank.set(ids, rows)
        return self.stamp, None

    def update(self, request_id: str, ids: Tensor, feats: Tensor) -> tuple[ShardStamp, None]:
        """Momentum update of ``ids`` ``[n]`` (all owned); a repeated request is ignored."""
        self._metrics.count_request("update", self.shard)
        if request_id not in self._recent:
            self.bank.update(ids, feats)
            self._remember(request_id, None)
        return self.stamp, None

    def export_batch(self, r0: int, r1: int) -> tuple[ShardStamp, Any]:
        """Rows ``[r0, r1)`` (global ids, inside this shard) as one Arrow record batch."""
        self._metrics.count_request("export", self.shard)
        rows = self.bank.rows[r0 - self.lo : r1 - self.lo]
        return self.stamp, arrow_io.to_record_batch(torch.arange(r0, r1), rows)

    def write_snapshot(self, directory: str, metadata: dict[str, Any]) -> tuple[ShardStamp, dict]:
        """Write this shard's rows as one file of the snapshot in ``directory``."""
        self._metrics.count_request("snapshot", self.shard)
        meta = {**metadata, "shard_applied_steps": self._applied}
        entry = snapshot.write_shard_file(
            directory,
            self.shard,
            self.config.num_shards,
            self.lo,
            self.bank.rows,
            meta,
            compression=self.config.snapshot_compression,
            on_retry=self._count_snapshot_retry,
        )
        return self.stamp, asdict(entry)

    def _count_snapshot_retry(self) -> None:
        with self._lock:
            self._snapshot_retries += 1
        self._metrics.count_snapshot_retry()

    def load_snapshot(self, uri: str) -> tuple[ShardStamp, int]:
        """Replace this shard's rows with rows ``[lo, hi)`` of the snapshot at ``uri``."""
        self._metrics.count_request("load", self.shard)
        manifest = self._check_snapshot(uri)
        snapshot.check_files(manifest)
        snapshot.read_rows(manifest, self.lo, self.hi, self.bank.rows)  # in place, by row group
        self._recent.clear()
        return self.stamp, manifest.step

    # ---------------------------------------------------------------- control

    @ray.method(concurrency_group="control")
    def info(self) -> dict[str, Any]:
        """The store config, this incarnation's stamp and the shard's counters."""
        with self._lock:
            return {
                "config": self.config,
                "shard": self.shard,
                "stamp": self.stamp,
                "z": self._z,
                "step": self._counter,
                "applied_steps": self._applied,
                "rows": self.hi - self.lo,
                "device": str(self.bank.device),
                "last_snapshot_step": self._schedule.last_committed,
                "snapshot_failures": self._schedule.failures,
                "snapshot_retries": self._snapshot_retries,
                "memory": _memory(self.bank.rows),
            }

    @ray.method(concurrency_group="control")
    def propose_z(self, z: float) -> float:
        """Shard 0: set NCE's ``Z`` unless already set; returns the value everyone uses."""
        with self._lock:
            if self._z is None:
                self._z = float(z)
            return self._z

    @ray.method(concurrency_group="control")
    def state(self) -> tuple[int, float | None]:
        """Shard 0: ``(step counter, Z)``."""
        with self._lock:
            return self._counter, self._z

    @ray.method(concurrency_group="control")
    def snapshot_finished(self, ok: bool, step: int) -> None:
        """Shard 0: a snapshot at ``step`` ended (``ok``: committed). The schedule restarts
        from this attempt either way; only a committed one counts as the last snapshot, and
        a failed one is counted (``info()["snapshot_failures"]``) and logged."""
        with self._lock:
            self._schedule.finished(ok, step)
            if not ok:
                self._metrics.count_snapshot_failure()

    @ray.method(concurrency_group="control")
    def reset_state(self, step: int, z: float | None) -> None:
        """Shard 0: the store was loaded from a snapshot at ``step`` with ``z``."""
        with self._lock:
            self._counter = int(step)
            self._z = z
            self._schedule.reset(step)


#: The actor class; store.py sets names, lifetime, restarts and resources via ``.options``.
RemoteShard = ray.remote(concurrency_groups={"control": 1})(ShardActor)

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "RemoteShard",
    "ShardActor",
    "ShardStamp",
    "StepControl",
    "StepRequest",
    "StoreConfig",
    "pack_stats",
    "shard_bounds",
    "unpack_stats",
]
