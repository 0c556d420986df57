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

import itertools
import logging
import math
import sys
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

import numpy as np
import ray
import torch
from torch import Tensor

from featurestore import arrow_io, snapshot, wire
from featurestore.bank_shard import BankShard, initial_rows
from featurestore.metrics import store_metrics
from featurestore.noise import NoiseSpec, local_noise
from featurestore.objectives import Objective
from featurestore.statistics import DEFAULT_MEMORY_BUDGET, PartialStats
from featurestore.validation import check_shape_args, dtype_name, storage_dtype

logger = logging.getLogger(__name__)

#: Step requests remembered per shard so that a retried call is answered, not re-applied.
RECENT_REQUESTS = 32
#: An auto snapshot still "in progress" after this long is presumed abandoned.
SNAPSHOT_STALE_S = 900.0


def shard_bounds(num_rows: int, num_shards: int) -> list[int]:
    """Shard boundaries like ``numpy.array_split``: ``S + 1`` ints from 0 to ``N``."""
    base, extra = divmod(num_rows, num_shards)
    sizes = [base + (1 if s < extra else 0) for s in range(num_shards)]
    return [0, *itertools.accumulate(sizes)]


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


@dataclass(frozen=True)
class StoreConfig:
    """Everything a shard (and an attaching client) knows about a store; checked on creation.

    Field meanings: see :class:`featurestore.store.ShardedStore`.
    """

    num_rows: int
    dim: int = 128
    num_shards: int = 1
    momentum: float = 0.5
    seed: int = 0
    name: str = "npid-bank"
    namespace: str = "npid"
    num_gpus_per_shard: float = 0.0
    num_cpus_per_shard: float = 0.0
    threads_per_shard: int = 1
    dtype: str = "float32"
    normalize_init: bool = False
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    snapshot_dir: str | None = None
    snapshot_every_steps: int = 0
    snapshot_every_seconds: float = 0.0
    keep_snapshots: int = 3
    snapshot_compression: str | None = None
    #: Unique per store (snapshots name the store that wrote them).
    store_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        check_shape_args(self.num_rows, self.dim, self.momentum)
        _check_int("num_shards", self.num_shards, 1)
        if self.num_shards > self.num_rows:
            raise ValueError(
                f"num_shards ({self.num_shards}) is larger than num_rows ({self.num_rows})"
            )
        _check_int("seed", self.seed, -(2**63))
        for label, value in (("name", self.name), ("namespace", self.namespace)):
            if not isinstance(value, str) or not value or any(c.isspace() for c in value):
                raise ValueError(
                    f"{label} must be a non-empty string without spaces, got {value!r}"
                )
        _check_number("num_gpus_per_shard", self.num_gpus_per_shard)
        if self.num_gpus_per_shard > 1 and self.num_gpus_per_shard != int(self.num_gpus_per_shard):
            raise ValueError(
                f"num_gpus_per_shard above 1 must be whole, got {self.num_gpus_per_shard}"
            )
        _check_number("num_cpus_per_shard", self.num_cpus_per_shard)
        _check_number("snapshot_every_seconds", self.snapshot_every_seconds)
        _check_int("threads_per_shard", self.threads_per_shard, 1)
        _check_int("snapshot_every_steps", self.snapshot_every_steps, 0)
        _check_int("keep_snapshots", self.keep_snapshots, 1)
        _check_int("memory_budget", self.memory_budget, 1)
        object.__setattr__(self, "dtype", dtype_name(storage_dtype(self.dtype)))
        object.__setattr__(self, "momentum", float(self.momentum))
        if self.snapshot_dir is not None:
            if not isinstance(self.snapshot_dir, str) or not self.snapshot_dir:
                raise ValueError(f"snapshot_dir must be a path or URL, got {self.snapshot_dir!r}")
            snapshot.check_shared(self.snapshot_dir, "snapshot_dir")
            object.__setattr__(self, "snapshot_dir", self.snapshot_dir.rstrip("/") or "/")
        elif self.snapshot_every_steps or self.snapshot_every_seconds:
            raise ValueError("automatic snapshots (snapshot_every_*) need a snapshot_dir")

    @property
    def bounds(self) -> list[int]:
        """Shard boundaries, ``S + 1`` ints."""
        return shard_bounds(self.num_rows, self.num_shards)

    @property
    def device(self) -> str:
        """Where each shard keeps its rows."""
        return "cuda" if self.num_gpus_per_shard > 0 else "cpu"


#: How a shard that does not know a step's objective key starts its error message.
UNKNOWN_OBJECTIVE = "unknown objective"


class StepRequest(NamedTuple):
    """What a shard needs for one step, besides the features (one serialized argument)."""

    #: Into how many byte strings the shard cuts its reply (``num_returns`` of the call).
    pieces: int

    #: Unique per client call; a retried call reuses it and is answered, not re-applied.
    request_id: str
    #: ``[B]`` int64 instance ids of the batch.
    ids: np.ndarray | Tensor
    #: Key of the objective, registered once per shard (:meth:`ShardActor.register_objective`).
    objective: str
    #: How to draw (or which are) the noise ids; None for the exact softmax.
    spec: NoiseSpec | None
    #: NCE's normalising constant for this step (None for other objectives).
    z: float | None
    #: Shard 0: one past the client's last known step (restores a restarted counter).
    min_step: int
    #: Shard 0: the store's ``Z`` as the client knows it (restores a restarted shard 0).
    known_z: float | None
    #: Shard 0, NCE with ``z_momentum``: the client's ``N·mean(exp(s))`` of its last step,
    #: folded into the store's ``Z`` (``Z ← m·Z + (1 − m)·observation``).
    z_observation: float | None = None


class StepControl(NamedTuple):
    """Store-wide state that shard 0 returns with each step."""

    #: Steps counted so far (the number the next step gets).
    step_count: int
    #: NCE's normalising constant, None until set.
    z: float | None
    #: Whether the client should now take the automatic snapshot.
    snapshot_due: bool


class ShardStamp(NamedTuple):
    """Identifies one incarnation of a shard actor; returned with every data call.

    A client that sees a new ``instance`` for a shard knows it restarted, and from
    ``loaded_step`` how many steps of updates to its rows were lost.
    """

    instance: str
    reconstructed: bool
    loaded_from: str | None
    loaded_step: int


def as_tensor(array: np.ndarray | Tensor) -> Tensor:
    """A CPU tensor from a wire array (numpy arrays Ray hands over may be read-only)."""
    if isinstance(array, Tensor):
        return array
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def pack_stats(stats: PartialStats) -> dict[str, np.ndarray | None]:
    """:class:`PartialStats` as numpy arrays on the CPU: Ray moves these without pickling."""
    return {
        f.name: None if getattr(stats, f.name) is None else getattr(stats, f.name).cpu().numpy()
        for f in fields(stats)
    }


def unpack_stats(wire: dict[str, np.ndarray | None]) -> PartialStats:
    """Inverse of :func:`pack_stats`."""
    return PartialStats(**{k: None if v is None else as_tensor(v) for k, v in wire.items()})


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
        self._last_snapshot_step = loaded_step  # the last committed snapshot
        # The schedule counts from the last attempt, committed or not: a failed snapshot is
        # retried one interval later, not at every step.
        self._last_attempt_step = loaded_step
        self._last_snapshot_time: float | None = None  # the clock starts at the first step
        self._snapshot_started: float | None = None
        self._snapshot_failures = 0
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
            momentum = getattr(obj, "z_momentum", None)
            control = self._count_step(
                request.min_step, request.known_z, request.z_observation, momentum
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
        z_momentum: float | None = None,
    ) -> StepControl:
        """Shard 0: count one step (and fold a client's ``Z`` observation into ``Z``); the
        counter, ``Z`` and whether a snapshot is due."""
        with self._lock:
            self._counter = max(self._counter, int(min_step)) + 1
            if self._z is None and known_z is not None:
                self._z = float(known_z)
            usable = z_observation is not None and math.isfinite(z_observation)
            if usable and z_momentum is not None and self._z is not None:
                self._z = z_momentum * self._z + (1 - z_momentum) * float(z_observation)
            return StepControl(self._counter, self._z, self._snapshot_due(self._counter))

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
                "last_snapshot_step": self._last_snapshot_step,
                "snapshot_failures": self._snapshot_failures,
                "snapshot_retries": self._snapshot_retries,
                "memory": _memory(self.bank.rows),
            }

    def _snapshot_due(self, next_step: int) -> bool:
        cfg = self.config
        if cfg.snapshot_dir is None:
            return False
        now = time.monotonic()
        if self._last_snapshot_time is None:
            self._last_snapshot_time = now
        if self._snapshot_started is not None:
            if now - self._snapshot_started < SNAPSHOT_STALE_S:
                return False
            logger.warning("an auto snapshot of store %r never finished; starting another")
        due = (
            cfg.snapshot_every_steps > 0
            and next_step - self._last_attempt_step >= cfg.snapshot_every_steps
        ) or (
            cfg.snapshot_every_seconds > 0
            and now - self._last_snapshot_time >= cfg.snapshot_every_seconds
        )
        if due:
            self._snapshot_started = now
        return due

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
            self._snapshot_started = None
            self._last_attempt_step = max(self._last_attempt_step, int(step))
            self._last_snapshot_time = time.monotonic()
            if ok:
                self._last_snapshot_step = max(self._last_snapshot_step, int(step))
                return
            self._snapshot_failures += 1
            self._metrics.count_snapshot_failure()
            logger.warning(
                "snapshot of store %r at step %d failed (%d failed so far; the last committed "
                "one is at step %d); the next is tried on schedule",
                self.config.name,
                step,
                self._snapshot_failures,
                self._last_snapshot_step,
            )

    @ray.method(concurrency_group="control")
    def reset_state(self, step: int, z: float | None) -> None:
        """Shard 0: the store was loaded from a snapshot at ``step`` with ``z``."""
        with self._lock:
            self._counter = int(step)
            self._z = z
            self._last_snapshot_step = self._last_attempt_step = int(step)


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
