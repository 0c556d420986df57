"""The sharded feature store: the memory bank as S Ray actors (DESIGN §2-§4).

# Ray: this module is the store's client; every Ray call of the client is in this file.

:class:`ShardedStore` has the interface of :class:`~featurestore.bank.MemoryBank` plus
``sample``, ``snapshot``, ``restore``, ``export``, ``attach`` and ``shutdown``. Shard ``s``
(a named, detached actor, :mod:`featurestore.shard_actor`) owns rows ``[lo_s, hi_s)`` with
bounds as ``numpy.array_split``. A training step is one call per shard, all in flight at
once, carrying ``f`` (``B×d``), the ids, the objective and the step's noise seed; each
shard answers with ``O(B·d)`` partial statistics and updates its own rows in the same call;
the client merges them exactly (:func:`featurestore.statistics.merge`). Shard 0 counts
the steps inside that same call and answers with the step count, NCE's ``Z`` (which it
owns) and whether an automatic snapshot is due, so a step is one round trip;
:meth:`ShardedStore.step_async` returns while the calls are in flight. Attached clients
mix a random key into their step seeds, so concurrent clients never draw the same noise.

Any number of clients may step one store at once: every process calls
``ShardedStore.attach(name)`` (or receives a pickled store, which attaches on unpickling).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import pickle
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from torch import Tensor

from featurestore import arrow_io, snapshot, wire
from featurestore.bank import PendingStep, StepOutput
from featurestore.metrics import store_metrics
from featurestore.noise import NoiseSpec, sample_ids, step_seed
from featurestore.objectives import NCE, Objective
from featurestore.shard_actor import (
    RemoteShard,
    ShardStamp,
    StepControl,
    StepRequest,
    StoreConfig,
    shard_bounds,
    unpack_stats,
)
from featurestore.snapshot import latest_snapshot
from featurestore.statistics import DEFAULT_MEMORY_BUDGET, estimate_z, merge, observed_z
from featurestore.validation import (
    check_count,
    check_ids,
    check_rows,
    check_step,
    dtype_name,
    storage_dtype,
)

logger = logging.getLogger(__name__)

#: Ray namespace of the shard actors unless another is given.
DEFAULT_NAMESPACE = "npid"


def actor_name(name: str, shard: int) -> str:
    """Ray actor name of shard ``shard`` of store ``name``."""
    return f"{name}.shard{shard}"


def _ensure_ray(connect_only: bool) -> None:
    """Connect to Ray (``RAY_ADDRESS`` or the running local instance); start one if allowed."""
    if ray.is_initialized():
        return
    if connect_only:
        try:
            ray.init(address=os.environ.get("RAY_ADDRESS") or "auto")
        except ConnectionError as err:
            raise LookupError(
                f"no running Ray cluster to attach a feature store to: {err}"
            ) from None
    else:
        ray.init()


def _lookup(name: str, namespace: str, shard: int):
    """The actor handle of a shard, or None when no such actor exists."""
    try:
        return ray.get_actor(actor_name(name, shard), namespace=namespace)
    except ValueError:
        return None


def _compact(t: Tensor) -> Tensor:
    """``t`` itself if it owns exactly its storage, else a compact copy.

    Pickling a view sends its whole storage (e.g. all of ``randperm(N)[:B]``).
    """
    if (
        t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    ):
        return t
    return t.clone(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the client's per-step tensor math (``O(B·d)``) on the calling thread alone.

    With several torch threads these small ops fork OpenMP teams whose threads then spin,
    taking cores from the shards and from the caller's data loading (measured: 4.3 ms of
    CPU per step instead of 1.5 with two threads, S = 2, B = 128). Setting the count is
    cheap (about 15 µs) and it is restored on exit.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _translate(err: RayTaskError, shard: int, name: str) -> Exception:
    """The exception a shard raised, re-raised in the caller with the shard's message."""
    cause = err.cause
    where = f" (shard {shard} of store {name!r})"
    for cls in (FileNotFoundError, FileExistsError, ValueError, LookupError):
        if isinstance(cause, cls):
            return cls(f"{cause}{where}")
    return RuntimeError(f"shard {shard} of store {name!r} failed: {cause!r}")


class ShardedStore:
    """The memory bank as ``num_shards`` Ray actors (same interface as ``MemoryBank``).

    Args:
        num_rows: ``N``.
        dim: ``d``.
        num_shards: ``S``; shard ``s`` owns a contiguous range of about ``N/S`` rows.
        momentum: ``m`` of the update ``v ← normalize(m·v + (1-m)·f)``.
        seed: seeds the initial rows (identical for any ``S``) and each step's noise.
        name: the store's name; clients attach with ``ShardedStore.attach(name)``.
        num_gpus_per_shard: GPUs per shard actor (fractions share a GPU); 0: CPU rows.
        num_cpus_per_shard: CPUs each actor reserves (small, so trainers still fit).
        threads_per_shard: torch threads of each actor.
        dtype: row storage, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        normalize_init: start from unit rows instead of the reference's uniform rows.
        memory_budget: bytes of temporary score tensors per shard (exact softmax).
        snapshot_dir: where ``snapshot()`` writes without a URI, automatic snapshots go
            and restarted shards reload from: a local path (one node) or a URL every
            shard process can reach (``file://``, ``s3://`` …; not ``memory://``).
        snapshot_every_steps: automatic snapshot every this many steps (0: never).
        snapshot_every_seconds: automatic snapshot when this much time passed (0: never).
        keep_snapshots: complete snapshots kept under ``snapshot_dir``.
        snapshot_compression: Parquet codec of snapshot files (None: lz4 for 16-bit
            storage, none for float32).
        namespace: Ray namespace of the actors.
        exist_ok: attach to a store of this name if one exists instead of raising (its
            configuration is kept; ``num_rows``, ``dim`` and ``num_shards`` must match).
        max_retries: retries of a call whose shard is unavailable (restarting).
        retry_backoff_s: first retry delay; doubles each retry.
        ready_timeout_s: how long to wait for the shards to start.

    Raises:
        ValueError: bad arguments, or a store called ``name`` exists (without ``exist_ok``).
    """

    def __init__(
        self,
        num_rows: int,
        dim: int = 128,
        num_shards: int = 1,
        momentum: float = 0.5,
        seed: int = 0,
        name: str = "npid-bank",
        num_gpus_per_shard: float = 0.0,
        *,
        num_cpus_per_shard: float = 0.0,
        threads_per_shard: int = 1,
        dtype: str | torch.dtype = "float32",
        normalize_init: bool = False,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        snapshot_dir: str | None = None,
        snapshot_every_steps: int = 0,
        snapshot_every_seconds: float = 0.0,
        keep_snapshots: int = 3,
        snapshot_compression: str | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        exist_ok: bool = False,
        max_retries: int = 5,
        retry_backoff_s: float = 0.5,
        ready_timeout_s: float = 600.0,
    ) -> None:
        config = StoreConfig(
            num_rows=num_rows,
            dim=dim,
            num_shards=num_shards,
            momentum=momentum,
            seed=seed,
            name=name,
            namespace=namespace,
            num_gpus_per_shard=num_gpus_per_shard,
            num_cpus_per_shard=num_cpus_per_shard,
            threads_per_shard=threads_per_shard,
            dtype=dtype,
            normalize_init=normalize_init,
            memory_budget=memory_budget,
            snapshot_dir=snapshot_dir,
            snapshot_every_steps=snapshot_every_steps,
            snapshot_every_seconds=snapshot_every_seconds,
            keep_snapshots=keep_snapshots,
            snapshot_compression=snapshot_compression,
        )
        _check_retry_args(max_retries, retry_backoff_s)
        _ensure_ray(connect_only=False)
        if exist_ok and _lookup(name, namespace, 0) is not None:
            self._attach(name, namespace, max_retries, retry_backoff_s)
            for field in ("num_rows", "dim", "num_shards"):
                if getattr(self, field) != getattr(config, field):
                    raise ValueError(
                        f"a store named {name!r} exists with {field}={getattr(self, field)}, "
                        f"not {getattr(config, field)}"
                    )
            return
        self._create(config, None, max_retries, retry_backoff_s, ready_timeout_s)

    # ------------------------------------------------------------ construction

    def _create(
        self,
        config: StoreConfig,
        restore_uri: str | None,
        max_retries: int,
        retry_backoff_s: float,
        ready_timeout_s: float,
    ) -> None:
        """Start the shard actors of a new store and connect to them."""
        name, namespace = config.name, config.namespace
        num_gpus, num_cpus = config.num_gpus_per_shard, config.num_cpus_per_shard
        if _lookup(name, namespace, 0) is not None:
            raise ValueError(
                f"a feature store named {name!r} already exists in Ray namespace "
                f"{namespace!r}; attach to it with ShardedStore.attach({name!r}), pass "
                "exist_ok=True, or shut it down first"
            )
        if num_gpus > 0:
            total = ray.cluster_resources().get("GPU", 0.0)
            if total < num_gpus * config.num_shards:
                logger.warning(
                    "store %r asks for %g GPUs per shard (%g in all) but the Ray cluster has %g;"
                    " the shards wait until GPUs join",
                    name, num_gpus, num_gpus * config.num_shards, total,
                )  # fmt: skip
        actors = []
        try:
            for s in range(config.num_shards):
                actors.append(
                    RemoteShard.options(
                        name=actor_name(name, s),
                        namespace=namespace,
                        lifetime="detached",
                        max_restarts=-1,
                        max_task_retries=0,
                        max_concurrency=1,
                        num_cpus=num_cpus,
                        num_gpus=num_gpus,
                    ).remote(config, s, restore_uri)
                )
            infos = ray.get([a.info.remote() for a in actors], timeout=ready_timeout_s)
        except BaseException as err:
            for actor in actors:
                _kill(actor)
            if isinstance(err, GetTimeoutError):
                raise TimeoutError(
                    f"the shards of store {name!r} did not start within {ready_timeout_s} s "
                    f"(each needs {num_cpus} CPUs and {num_gpus} GPUs)"
                ) from None
            if isinstance(err, ValueError) and "already taken" in str(err):
                raise ValueError(
                    f"a feature store named {name!r} already exists in Ray namespace {namespace!r}"
                ) from None
            if isinstance(err, RayActorError):
                raise RuntimeError(f"could not start the shards of store {name!r}: {err}") from None
            raise
        self._connect(config, actors, infos, max_retries, retry_backoff_s, client=0)
        logger.info(
            "feature store %r: %d rows x %d (%s) in %d shards", name, config.num_rows,
            config.dim, config.dtype, config.num_shards,
        )  # fmt: skip

    def _connect(
        self,
        config: StoreConfig,
        actors: list,
        infos: list[dict[str, Any]],
        max_retries: int,
        retry_backoff_s: float,
        client: int,
    ) -> None:
        self.config = config
        self.name = config.name
        self.namespace = config.namespace
        self.num_rows = config.num_rows
        self.dim = config.dim
        self.num_shards = config.num_shards
        self.bounds = list(config.bounds)
        self.seed = config.seed
        self.momentum = config.momentum
        self.dtype = storage_dtype(config.dtype)
        self.snapshot_dir = config.snapshot_dir
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self._actors = actors
        self._inner_bounds = torch.tensor(self.bounds[1:-1], dtype=torch.int64)
        self._client_id = uuid.uuid4().hex
        #: Mixed into this client's step seeds (0: the creator, seeds as MemoryBank's).
        self._client = client
        self._requests = itertools.count()
        self._lock = threading.Lock()
        self._instances: list[str] = [info["stamp"].instance for info in infos]
        #: Restarts of each shard this client has seen.
        self.restarts = [0] * self.num_shards
        self._z: float | None = infos[0]["z"]
        #: NCE with z_momentum: this client's last Z observation, sent with its next step.
        self._z_observation: float | None = None
        self._max_step = int(infos[0]["step"]) - 1
        self._closed = False
        self._metrics = store_metrics()
        #: Set True to count the pickled bytes of every call's arguments and results.
        self.measure_transfer = False
        #: Bytes sent to / received from the shards while ``measure_transfer`` is on.
        self.transfer_bytes = {"sent": 0, "received": 0}
        self._shared: dict[Any, Any] = {}

    def _attach(self, name: str, namespace: str, max_retries: int, retry_backoff_s: float) -> None:
        first = _lookup(name, namespace, 0)
        if first is None:
            raise LookupError(
                f"no feature store named {name!r} in Ray namespace {namespace!r} "
                "(create it with ShardedStore(..., name=...) first)"
            )
        info = ray.get(first.info.remote())
        config: StoreConfig = info["config"]
        actors = [first]
        for s in range(1, config.num_shards):
            actor = _lookup(name, namespace, s)
            if actor is None:
                raise LookupError(f"feature store {name!r} has no shard {s} (was it shut down?)")
            actors.append(actor)
        infos = [info, *ray.get([a.info.remote() for a in actors[1:]])]
        client = uuid.uuid4().int >> 65  # 63 bits, never 0 in practice
        self._connect(config, actors, infos, max_retries, retry_backoff_s, client=client or 1)

    @classmethod
    def attach(
        cls,
        name: str = "npid-bank",
        namespace: str = DEFAULT_NAMESPACE,
        *,
        max_retries: int = 5,
        retry_backoff_s: float = 0.5,
    ) -> ShardedStore:
        """A client of the running store ``name`` (from any process of the Ray cluster).

        Raises:
            LookupError: no store of that name (or no Ray cluster to look in).
        """
        _check_retry_args(max_retries, retry_backoff_s)
        _ensure_ray(connect_only=True)
        store = cls.__new__(cls)
        store._attach(name, namespace, max_retries, retry_backoff_s)
        return store

    @classmethod
    def restore(
        cls,
        uri: str,
        num_shards: int | None = None,
        name: str = "npid-bank",
        *,
        num_rows: int | None = None,
        dim: int | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        max_retries: int = 5,
        retry_backoff_s: float = 0.5,
        ready_timeout_s: float = 600.0,
        **options: Any,
    ) -> ShardedStore:
        """A new store holding the snapshot at ``uri``, in any number of shards.

        Each new shard reads only the row groups of its own range from the old files.
        Rows, ``Z``, step counter, seed, momentum and dtype come from the snapshot.

        Args:
            uri: a snapshot directory (or its manifest), or a snapshot dir whose newest
                complete snapshot is taken.
            num_shards: ``S`` of the new store (default: the snapshot's).
            name, namespace: the new store's name and Ray namespace.
            num_rows, dim: expected sizes; a snapshot of other sizes is refused.
            **options: other constructor options (``num_gpus_per_shard``, ``dtype``,
                ``snapshot_dir``, ``snapshot_every_steps`` …).

        Raises:
            FileNotFoundError: no complete snapshot at ``uri``, or a shard file missing.
            ValueError: corrupt files, or sizes other than ``num_rows``/``dim``.
        """
        snapshot.check_shared(uri, "snapshot uri")
        resolved = snapshot.resolve(uri)
        manifest = snapshot.read_manifest(resolved)
        for label, expected in (("num_rows", num_rows), ("dim", dim)):
            if expected is not None and getattr(manifest, label) != expected:
                raise ValueError(
                    f"snapshot {resolved} has {label}={getattr(manifest, label)}, "
                    f"expected {expected}"
                )
        allowed = {f.name for f in fields(StoreConfig)} - {
            "num_rows", "dim", "num_shards", "name", "namespace", "store_id"
        }  # fmt: skip
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(f"restore() got unexpected options {unknown}")
        settings: dict[str, Any] = {
            "momentum": manifest.momentum,
            "seed": manifest.seed,
            "dtype": manifest.dtype,
            "normalize_init": bool(manifest.extra.get("normalize_init", False)),
            **options,
        }
        config = StoreConfig(
            num_rows=manifest.num_rows,
            dim=manifest.dim,
            num_shards=num_shards or len(manifest.bounds) - 1,
            name=name,
            namespace=namespace,
            **settings,
        )
        snapshot.check_files(manifest)
        _check_retry_args(max_retries, retry_backoff_s)
        _ensure_ray(connect_only=False)
        store = cls.__new__(cls)
        store._create(config, resolved, max_retries, retry_backoff_s, ready_timeout_s)
        logger.info("store %r restored from %s (step %d)", name, resolved, manifest.step)
        return store

    def __reduce__(self):
        return (ShardedStore.attach, (self.name, self.namespace))

    def __enter__(self) -> ShardedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return (
            f"ShardedStore(name={self.name!r}, num_rows={self.num_rows}, dim={self.dim}, "
            f"num_shards={self.num_shards}, dtype={dtype_name(self.dtype)})"
        )

    # ---------------------------------------------------------------- plumbing

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"feature store {self.name!r} was shut down")

    def _submit(self, shard: int, op: str, args: tuple):
        if self.measure_transfer:  # what the shard receives: shared objects count per shard
            plain = tuple(
                self._shared.get(a, a) if isinstance(a, ray.ObjectRef) else a for a in args
            )
            self._count_bytes("sent", (op, plain))
        method = getattr(self._actors[shard], op)
        if op == "step":  # the reply comes back in pieces Ray carries inline (wire.py)
            method = method.options(num_returns=args[0].pieces)
        return method.remote(*args)

    def _wire_feats(self, feats: np.ndarray) -> list[Any]:
        """A step's features ``[B, d]`` as call arguments: inline row blocks, or one
        object-store copy that every shard reads when they are too big to go inline."""
        if feats.nbytes <= wire.MAX_INLINE_BYTES:
            return wire.split_rows(feats)
        ref = ray.put(feats)
        if self.measure_transfer:
            self._shared[ref] = feats
        return [ref]

    def _count_bytes(self, key: str, obj: Any) -> None:
        size = len(pickle.dumps(obj, protocol=5))
        with self._lock:
            self.transfer_bytes[key] += size

    def _await(self, shard: int, op: str, ref, args: tuple) -> Any:
        """The payload of a data call, retrying (same arguments) while the shard restarts."""
        attempt = 0
        while True:
            try:
                reply = ray.get(ref)
                if op == "step":
                    reply = wire.from_pieces(reply)
            except RayTaskError as err:
                raise _translate(err, shard, self.name) from None
            except RayActorError as err:
                if attempt >= self.max_retries:
                    raise RuntimeError(
                        f"shard {shard} of store {self.name!r} is unavailable after "
                        f"{self.max_retries} retries of {op!r}: {err}"
                    ) from err
                delay = self.retry_backoff_s * 2**attempt
                attempt += 1
                logger.warning(
                    "shard %d of store %r unavailable during %r (%s); retry %d/%d in %.2f s",
                    shard, self.name, op, type(err).__name__, attempt, self.max_retries, delay,
                )  # fmt: skip
                time.sleep(delay)
                ref = self._submit(shard, op, args)
                continue
            if self.measure_transfer:
                self._count_bytes("received", reply)
            stamp, payload = reply
            self._check_stamp(shard, stamp)
            return payload

    def _call_shards(self, op: str, calls: dict[int, tuple]) -> dict[int, Any]:
        """Call ``op`` on several shards at once (all in flight), then collect in order."""
        return self._collect(op, self._submit_all(op, calls), calls)

    def _submit_all(self, op: str, calls: dict[int, tuple]) -> dict[int, Any]:
        """Start ``op`` on each shard of ``calls`` ``{shard: args}``; their object refs."""
        return {s: self._submit(s, op, args) for s, args in calls.items()}

    def _collect(self, op: str, refs: dict[int, Any], calls: dict[int, tuple]) -> dict[int, Any]:
        """The payloads of calls started by :meth:`_submit_all` (retried while restarting)."""
        return {s: self._await(s, op, ref, calls[s]) for s, ref in refs.items()}

    def _control(self, op: str, *args: Any) -> Any:
        """A small bookkeeping call to shard 0 (``control`` group), with retries."""
        for attempt in range(self.max_retries + 1):
            try:
                if self.measure_transfer:
                    self._count_bytes("sent", (op, args))
                result = ray.get(getattr(self._actors[0], op).remote(*args))
                if self.measure_transfer:
                    self._count_bytes("received", result)
                return result
            except RayTaskError as err:
                raise _translate(err, 0, self.name) from None
            except RayActorError as err:
                if attempt >= self.max_retries:
                    raise RuntimeError(
                        f"shard 0 of store {self.name!r} is unavailable after "
                        f"{self.max_retries} retries of {op!r}: {err}"
                    ) from err
                time.sleep(self.retry_backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _check_stamp(self, shard: int, stamp: ShardStamp) -> None:
        """Notice (and log) a shard that restarted since this client last heard from it."""
        with self._lock:
            if self._instances[shard] == stamp.instance:
                return
            self._instances[shard] = stamp.instance
            self.restarts[shard] += 1
            client_step = self._max_step + 1
        try:
            store_step = max(client_step, int(self._control("state")[0]))
        except RuntimeError:
            store_step = client_step
        lost = max(0, store_step - stamp.loaded_step)
        source = stamp.loaded_from or "its seeded initial rows (no snapshot)"
        logger.warning(
            "shard %d of store %r restarted and reloaded rows [%d, %d) from %s at step %d; the "
            "store is at step %d: %d steps of updates to those rows were lost",
            shard, self.name, self.bounds[shard], self.bounds[shard + 1], source,
            stamp.loaded_step, store_step, lost,
        )  # fmt: skip

    def _request_id(self) -> str:
        return f"{self._client_id}:{next(self._requests)}"

    def _split(self, ids: Tensor) -> dict[int, Tensor]:
        """Positions of ``ids`` ``[n]`` grouped by owning shard (shards with none omitted)."""
        owner = torch.bucketize(ids, self._inner_bounds, right=True)
        return {
            s: pos
            for s in range(self.num_shards)
            if (pos := torch.nonzero(owner == s).squeeze(1)).numel()
        }

    def _timed(self, op: str, start: float) -> None:
        self._metrics.observe_request(op, time.perf_counter() - start)

    # -------------------------------------------------------------- interface

    @property
    def z(self) -> float | None:
        """NCE's normalising constant (None until the first NCE step estimates it)."""
        self._check_open()
        return self._control("state")[1]

    @property
    def step_count(self) -> int:
        """Steps taken by all clients of the store (the next step's number)."""
        self._check_open()
        return int(self._control("state")[0])

    def get(self, ids: Tensor) -> Tensor:
        """Rows of ``ids`` ``[n]`` as float32 ``[n, d]`` (CPU)."""
        self._check_open()
        start = time.perf_counter()
        ids = check_ids(ids, self.num_rows)
        out = torch.empty(ids.numel(), self.dim)
        groups = self._split(ids)
        rows = self._call_shards("get", {s: (ids[pos],) for s, pos in groups.items()})
        for s, pos in groups.items():
            out[pos] = rows[s]
        self._timed("get", start)
        return out

    def set(self, ids: Tensor, rows: Tensor) -> None:
        """Overwrite the rows of ``ids`` ``[n]`` with ``rows`` ``[n, d]`` (last one wins)."""
        self._check_open()
        start = time.perf_counter()
        ids = check_ids(ids, self.num_rows)
        rows = check_rows(rows, self.dim, "rows", ids.numel()).cpu()
        groups = self._split(ids)
        self._call_shards("set", {s: (ids[pos], rows[pos]) for s, pos in groups.items()})
        self._timed("set", start)

    def update(self, ids: Tensor, feats: Tensor) -> None:
        """Momentum update of the rows of ``ids`` ``[n]`` towards ``feats`` ``[n, d]``."""
        self._check_open()
        start = time.perf_counter()
        ids = check_ids(ids, self.num_rows)
        feats = check_rows(feats, self.dim, "feats", ids.numel()).cpu()
        request = self._request_id()
        groups = self._split(ids)
        self._call_shards(
            "update", {s: (request, ids[pos], feats[pos]) for s, pos in groups.items()}
        )
        self._timed("update", start)

    def sample(self, n: int, seed: int | None = None) -> tuple[Tensor, Tensor]:
        """``n`` uniform noise rows: ``(ids [n] int64, rows [n, d] float32)``.

        ``seed=None`` draws fresh ids (mixed from the store seed, the step counter and this
        client, so concurrent clients draw different ids).
        """
        self._check_open()
        check_count(n)
        if seed is None:
            mix = [self.seed, self.step_count, int(self._client_id[:15], 16), next(self._requests)]
            seed = int(np.random.SeedSequence(mix).generate_state(1, dtype=np.uint64)[0] >> 1)
        ids = sample_ids(n, self.num_rows, int(seed))
        return ids, self.get(ids)

    def step(
        self,
        feats: Tensor,
        ids: Tensor,
        objective: Objective,
        noise_ids: Tensor | None = None,
        seed: int | None = None,
    ) -> StepOutput:
        """One training step: score ``feats`` against the bank, then update it.

        One call per shard, all in flight at once; each returns partial statistics
        (``O(B·d)``, whatever ``K`` or ``N``) and updates its own rows after scoring.
        The same as ``step_async(...).result()``.

        Args:
            feats: ``[B, d]`` encoder outputs (any float dtype, any device).
            ids: ``[B]`` instance ids.
            objective: :class:`NCE`, :class:`Softmax` or :class:`SampledSoftmax`.
            noise_ids: explicit noise, ``[B, K]`` (``[K]`` with ``shared_noise``).
            seed: the step's noise seed; default ``step_seed(seed, t, client)``: ``t`` is
                the store's step count as this client knows it (from shard 0's replies and
                its own steps, so a lone client numbers its steps 0, 1, 2, … like
                ``MemoryBank``), ``client`` 0 for the client that created the store and
                a random key for each attached one (concurrent clients draw apart).

        Returns:
            :class:`StepOutput` (``loss``, ``grad`` ``[B, d]`` …) on ``feats.device``;
            equal to ``MemoryBank.step`` with the same noise ids.

        Raises:
            ValueError: as ``MemoryBank.step``; the store is left unchanged.
        """
        return self.step_async(feats, ids, objective, noise_ids, seed).result()

    def step_async(
        self,
        feats: Tensor,
        ids: Tensor,
        objective: Objective,
        noise_ids: Tensor | None = None,
        seed: int | None = None,
    ) -> PendingStep:
        """Start :meth:`step` and return at once; ``.result()`` gives its :class:`StepOutput`.

        The inputs are checked (and bad ones raise) before anything is sent; the shard calls
        are then in flight while the caller works, e.g. fetches the next batch.
        """
        self._check_open()
        start = time.perf_counter()
        with _one_thread():
            return self._start_step(start, feats, ids, objective, noise_ids, seed)

    def _start_step(
        self,
        start: float,
        feats: Tensor,
        ids: Tensor,
        objective: Objective,
        noise_ids: Tensor | None,
        seed: int | None,
    ) -> PendingStep:
        out_device = feats.device if isinstance(feats, Tensor) else None
        feats, ids, noise_ids = check_step(
            feats, ids, objective, self.num_rows, self.dim, noise_ids
        )
        feats, ids = _compact(feats.cpu()), _compact(ids)
        if noise_ids is not None:
            noise_ids = _compact(noise_ids)
        with self._lock:  # reserve a step number: steps in flight draw different noise
            self._max_step += 1
            next_step, known_z = self._max_step, self._z
            observation, self._z_observation = self._z_observation, None
        spec = None
        if objective.sampled:
            spec = NoiseSpec(
                objective.num_negatives,
                objective.shared_noise,
                step_seed(self.seed, next_step, self._client) if seed is None else int(seed),
                noise_ids,
            )
        z = self._nce_z(objective, feats, ids, spec, known_z)
        request = self._request_id()
        obj = objective.to_dict()
        pieces = wire.reply_pieces(*feats.shape)
        message = StepRequest(
            pieces, request, ids.numpy(), obj, spec, z, next_step, known_z, observation
        )
        args = (message, *self._wire_feats(feats.numpy()))
        calls = dict.fromkeys(range(self.num_shards), args)
        refs = self._submit_all("step", calls)
        self._shared.clear()

        def finish() -> StepOutput:
            with _one_thread():
                return finish_step()

        def finish_step() -> StepOutput:
            replies = self._collect("step", refs, calls)
            parts = [unpack_stats(replies[s][0]) for s in range(self.num_shards)]
            control: StepControl = replies[0][1]
            with self._lock:
                self._max_step = max(self._max_step, control.step_count - 1)
                if control.z is not None:
                    self._z = control.z
            sample_loss, grad = merge(parts, feats, objective, z, self.num_rows)
            if isinstance(objective, NCE) and objective.tracks_z:
                # Fold the observation in now, as shard 0 will when the next step brings it:
                # this client's next step then uses the Z a MemoryBank would.
                seen = observed_z(parts, feats, objective, self.num_rows)
                m = float(objective.z_momentum)
                with self._lock:
                    self._z_observation = seen
                    if self._z is not None and math.isfinite(seen):
                        self._z = m * self._z + (1 - m) * seen
            self._timed("step", start)
            if control.snapshot_due:
                self._auto_snapshot(control.step_count)
            return StepOutput.merged(sample_loss, grad, z, out_device)

        return PendingStep(finish)

    def _nce_z(
        self,
        objective: Objective,
        feats: Tensor,
        ids: Tensor,
        spec: NoiseSpec | None,
        store_z: float | None,
    ) -> float | None:
        """NCE's Z: the objective's, the store's, or estimated now from this step's noise."""
        if not isinstance(objective, NCE):
            return None
        if objective.z is not None:
            return float(objective.z)
        if store_z is not None:
            return store_z
        assert spec is not None
        obj = objective.to_dict()
        parts = self._call_shards(
            "expsum", dict.fromkeys(range(self.num_shards), (feats, ids, obj, spec))
        )
        s_pos = torch.empty(feats.shape[0])
        expsum = 0.0
        for total, pos_index, scores in parts.values():
            expsum += total
            s_pos[pos_index] = scores
        pairs = feats.shape[0] * (objective.num_negatives + 1)
        proposed = estimate_z(expsum, s_pos, self.num_rows, pairs)
        z = float(self._control("propose_z", proposed))
        with self._lock:
            self._z = z
        logger.info("store %r: NCE normalization constant Z = %.6g (first step)", self.name, z)
        return z

    def export(self, batch_rows: int = arrow_io.EXPORT_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """Stream the bank as Arrow record batches ``(id int64, vector float32[d])``.

        Shard by shard, ``batch_rows`` rows per call, the next batch requested while the
        caller consumes the current one. Not a point-in-time view if others keep stepping.
        """
        self._check_open()
        if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
            raise ValueError(f"batch_rows must be a positive int, got {batch_rows!r}")
        ranges = [
            (s, r0, min(r0 + batch_rows, self.bounds[s + 1]))
            for s in range(self.num_shards)
            for r0 in range(self.bounds[s], self.bounds[s + 1], batch_rows)
        ]
        pending: deque = deque()
        queue = iter(ranges)
        for item in itertools.islice(queue, 2):
            pending.append((item, self._submit(item[0], "export_batch", item[1:])))
        while pending:
            (shard, r0, r1), ref = pending.popleft()
            batch = self._await(shard, "export_batch", ref, (r0, r1))
            nxt = next(queue, None)
            if nxt is not None:
                pending.append((nxt, self._submit(nxt[0], "export_batch", nxt[1:])))
            yield batch

    # -------------------------------------------------------------- snapshots

    def snapshot(self, uri: str | None = None) -> str:
        """Write a snapshot: one Parquet file per shard (in parallel), then the manifest.

        Args:
            uri: target directory (local path or fsspec URL); default a new
                ``snapshot_dir/step-<step>`` directory.

        Returns:
            The snapshot's URI (pass it to :meth:`restore`).

        Raises:
            ValueError: no ``uri`` and the store has no ``snapshot_dir``.
            FileExistsError: ``uri`` already holds a complete snapshot.
        """
        self._check_open()
        return self._snapshot(uri)

    def _snapshot(self, uri: str | None) -> str:
        if uri is None and self.snapshot_dir is None:
            raise ValueError(
                f"snapshot() needs a uri: store {self.name!r} was created without snapshot_dir"
            )
        snapshot.check_shared(uri or self.snapshot_dir or "", "snapshot uri")
        start = time.perf_counter()
        step, z = self._control("state")
        if uri is not None:
            target = snapshot.join(uri)
            try:
                snapshot.read_manifest(target)
            except FileNotFoundError:
                pass
            else:
                raise FileExistsError(f"a snapshot already exists at {uri}")
        else:
            assert self.snapshot_dir is not None
            target = snapshot.new_snapshot_uri(self.snapshot_dir, step)
        meta = {
            "num_rows": self.num_rows,
            "dim": self.dim,
            "dtype": dtype_name(self.dtype),
            "momentum": self.momentum,
            "seed": self.seed,
            "z": z,
            "step": step,
            "bounds": self.bounds,
            "store_id": self.config.store_id,
            "name": self.name,
        }
        committed = False
        try:
            files = self._call_shards(
                "write_snapshot", dict.fromkeys(range(self.num_shards), (target, meta))
            )
            manifest = snapshot.Manifest(
                uri=target,
                num_rows=self.num_rows,
                dim=self.dim,
                dtype=dtype_name(self.dtype),
                momentum=self.momentum,
                seed=self.seed,
                z=z,
                step=step,
                bounds=self.bounds,
                files=[snapshot.ShardFile(**files[s]) for s in range(self.num_shards)],
                created=snapshot.wall_time(),
                store_id=self.config.store_id,
                name=self.name,
                extra={"normalize_init": self.config.normalize_init},
            )
            snapshot.write_manifest(manifest)
            committed = True
        finally:
            if not committed and uri is None:
                snapshot.remove_snapshot(target)  # a fresh directory of ours: drop the debris
            try:
                self._control("snapshot_finished", committed, step)
            except RuntimeError as err:
                logger.warning("could not tell shard 0 that a snapshot ended: %s", err)
        if self.snapshot_dir is not None:
            snapshot.prune_snapshots(
                self.snapshot_dir, self.config.keep_snapshots, self.config.store_id
            )
        seconds = time.perf_counter() - start
        self._metrics.observe_snapshot(seconds)
        self._timed("snapshot", start)
        logger.info(
            "store %r: snapshot at step %d written to %s (%.1f s)", self.name, step, target, seconds
        )
        return target

    def _auto_snapshot(self, step: int) -> None:
        """The automatic snapshot shard 0 asked this client to take (failures are logged)."""
        try:
            self._snapshot(None)
        except Exception:
            logger.exception("automatic snapshot of store %r after step %d failed", self.name, step)

    def load_snapshot(self, uri: str) -> None:
        """Replace the store's rows, ``Z`` and step counter with the snapshot at ``uri``.

        Each shard reads just its row range. The snapshot must have this store's row
        count and dim; it may come from a store with any number of shards. With a
        ``snapshot_dir`` a snapshot of the loaded state is written at once, so that a shard
        that restarts later reloads this state.

        Raises:
            FileNotFoundError: no complete snapshot at ``uri`` or a shard file missing.
            ValueError: another row count or dim, or corrupt files; the store is unchanged.
        """
        self._check_open()
        snapshot.check_shared(uri, "snapshot uri")
        resolved = snapshot.resolve(uri)
        manifest = snapshot.read_manifest(resolved)
        if manifest.num_rows != self.num_rows or manifest.dim != self.dim:
            raise ValueError(
                f"snapshot {resolved} holds {manifest.num_rows} rows of dim {manifest.dim}; "
                f"store {self.name!r} has {self.num_rows} rows of dim {self.dim}"
            )
        snapshot.check_files(manifest)
        self._call_shards("load_snapshot", dict.fromkeys(range(self.num_shards), (resolved,)))
        self._control("reset_state", manifest.step, manifest.z)
        with self._lock:
            self._z = manifest.z
            self._max_step = manifest.step - 1
        if self.snapshot_dir is not None:
            self._snapshot(None)

    # -------------------------------------------------------------- lifecycle

    def shard_info(self) -> list[dict[str, Any]]:
        """Per-shard state: stamp (incarnation), rows, device, steps applied, …"""
        self._check_open()
        return ray.get([a.info.remote() for a in self._actors])

    def shutdown(self) -> None:
        """Remove the shard actors (the store is gone for every client)."""
        if self._closed:
            return
        for actor in self._actors:
            _kill(actor)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and any(
            _lookup(self.name, self.namespace, s) is not None for s in range(self.num_shards)
        ):
            time.sleep(0.05)
        self._closed = True
        logger.info("feature store %r shut down", self.name)


def _kill(actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception as err:  # already gone
        logger.debug("ray.kill: %s", err)


def _check_retry_args(max_retries: int, retry_backoff_s: float) -> None:
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
    if not isinstance(retry_backoff_s, (int, float)) or retry_backoff_s < 0:
        raise ValueError(f"retry_backoff_s must be a number >= 0, got {retry_backoff_s!r}")


__all__ = ["DEFAULT_NAMESPACE", "ShardedStore", "actor_name", "latest_snapshot", "shard_bounds"]
