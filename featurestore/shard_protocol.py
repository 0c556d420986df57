"""What a store shard and its clients agree on: the store's :class:`StoreConfig` (checked
on creation), the row split (:func:`shard_bounds`), the messages of a step
(:class:`StepRequest` in; :class:`StepControl` and :class:`ShardStamp` out) and the wire
form of :class:`~featurestore.statistics.PartialStats` (:func:`pack_stats`). Plain data:
no Ray here; the actor is in shard_actor.py, the client in store.py."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from featurestore import snapshot
from featurestore.noise import NoiseSpec
from featurestore.statistics import DEFAULT_MEMORY_BUDGET, PartialStats
from featurestore.validation import check_shape_args, dtype_name, storage_dtype

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
