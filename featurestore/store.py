"""The sharded feature store: the memory bank as S Ray actors (README; ARCHITECTURE.md).

# Ray: the store's client; its Ray calls go through featurestore/store_transport.py.

:class:`ShardedStore` has the interface of :class:`~featurestore.bank.MemoryBank` plus
``sample``, ``snapshot``, ``restore``, ``export``, ``attach`` and ``shutdown``; shard ``s``
(:mod:`featurestore.shard_actor`) owns rows ``[lo_s, hi_s)``. Its parts: the transport and
its retry and restart policy (:mod:`~featurestore.store_transport`), the steps
(:mod:`~featurestore.store_steps`: one call per shard, merged exactly), the row calls
(:mod:`~featurestore.store_rows`) and the snapshots (:mod:`~featurestore.store_snapshots`).
Any number of clients may step one store at once: every process calls
``ShardedStore.attach(name)`` (or receives a pickled store, which attaches on unpickling).
"""

from __future__ import annotations

import itertools
import logging
import uuid
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor

from featurestore.bank import PendingStep, StepOutput
from featurestore.metrics import store_metrics
from featurestore.objectives import Objective
from featurestore.shard_protocol import StoreConfig, shard_bounds
from featurestore.snapshot import latest_snapshot
from featurestore.statistics import DEFAULT_MEMORY_BUDGET
from featurestore.store_rows import RowCalls
from featurestore.store_snapshots import SnapshotCalls, SnapshotCoordinator, config_from_snapshot
from featurestore.store_steps import StepProtocol
from featurestore.store_transport import (
    DEFAULT_NAMESPACE,
    ShardGroup,
    actor_name,
    check_retry_args,
    ensure_ray,
    find_shards,
    lookup,
    start_shards,
)
from featurestore.validation import dtype_name, storage_dtype

logger = logging.getLogger(__name__)


class ShardedStore(RowCalls, SnapshotCalls):
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
        snapshot_every_steps, snapshot_every_seconds: automatic snapshots every this many
            steps or seconds (0: never); keep_snapshots: complete ones kept.
        snapshot_compression: Parquet codec (None: lz4 for 16-bit storage, else none).
        namespace: Ray namespace of the actors.
        exist_ok: attach to an existing store of this name (its num_rows, dim, num_shards
            must match).
        max_retries, retry_backoff_s: retries of a call whose shard is restarting, and the
            first delay (doubling).
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
            num_rows=num_rows, dim=dim, num_shards=num_shards, momentum=momentum, seed=seed,
            name=name, namespace=namespace, num_gpus_per_shard=num_gpus_per_shard,
            num_cpus_per_shard=num_cpus_per_shard, threads_per_shard=threads_per_shard,
            dtype=dtype, normalize_init=normalize_init, memory_budget=memory_budget,
            snapshot_dir=snapshot_dir, snapshot_every_steps=snapshot_every_steps,
            snapshot_every_seconds=snapshot_every_seconds, keep_snapshots=keep_snapshots,
            snapshot_compression=snapshot_compression,
        )  # fmt: skip
        check_retry_args(max_retries, retry_backoff_s)
        ensure_ray(connect_only=False)
        if exist_ok and lookup(name, namespace, 0) is not None:
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
        actors, infos = start_shards(config, restore_uri, ready_timeout_s)
        self._connect(config, actors, infos, max_retries, retry_backoff_s, client=0)
        logger.info(
            "feature store %r: %d rows x %d (%s) in %d shards", config.name, config.num_rows,
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
        self._inner_bounds = torch.tensor(self.bounds[1:-1], dtype=torch.int64)
        self._client_id = uuid.uuid4().hex
        self._requests = itertools.count()
        self._closed = False
        self._metrics = store_metrics()
        self._group = ShardGroup(
            config, actors, infos, max_retries, retry_backoff_s, lambda: self._steps.next_step
        )
        #: Bytes of every call while ``transfer.enabled`` (benchmarks).
        self.transfer = self._group.transfer
        self._snapshots = SnapshotCoordinator(
            self._group,
            config,
            self._metrics.observe_snapshot,
            lambda s, z: self._steps.reset(s, z),
        )
        self._steps = StepProtocol(
            self._group,
            config,
            client,
            infos[0]["z"],
            int(infos[0]["step"]),
            self._request_id,
            self._metrics.observe_request,
            self._snapshots,
        )

    def _attach(self, name: str, namespace: str, max_retries: int, retry_backoff_s: float) -> None:
        config, actors, infos = find_shards(name, namespace, max_retries, retry_backoff_s)
        client = uuid.uuid4().int >> 65  # 63 bits, never 0 in practice
        self._connect(config, actors, infos, max_retries, retry_backoff_s, client=client or 1)

    @classmethod
    def from_config(cls, config: StoreConfig, **options: Any) -> ShardedStore:
        """A new store laid out as ``config`` says (its ``store_id`` is drawn afresh);
        ``options`` are the client's (``exist_ok``, ``max_retries``, ``retry_backoff_s``,
        ``ready_timeout_s``)."""
        layout = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "store_id"}
        return cls(**layout, **options)

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
        check_retry_args(max_retries, retry_backoff_s)
        ensure_ray(connect_only=True)
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
        config, manifest = config_from_snapshot(
            uri, num_shards, name, namespace, num_rows, dim, options
        )
        check_retry_args(max_retries, retry_backoff_s)
        ensure_ray(connect_only=False)
        store = cls.__new__(cls)
        store._create(config, manifest.uri, max_retries, retry_backoff_s, ready_timeout_s)
        logger.info("store %r restored from %s (step %d)", name, manifest.uri, manifest.step)
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

    def _request_id(self) -> str:
        return f"{self._client_id}:{next(self._requests)}"

    @property
    def restarts(self) -> list[int]:
        """Restarts of each shard this client has seen (no remote call)."""
        return list(self._group.restarts)

    # -------------------------------------------------------------- interface

    @property
    def z(self) -> float | None:
        """NCE's normalising constant as this client knows it (no remote call: from shard 0's
        replies and this client's steps; :meth:`state` asks shard 0)."""
        return self._steps.z

    @property
    def step_count(self) -> int:
        """The next step's number as this client knows it (no remote call: shard 0's
        replies and this client's own steps; :meth:`state` asks shard 0)."""
        return self._steps.next_step

    def state(self) -> tuple[int, float | None]:
        """``(step count, Z)`` of the whole store, asked of shard 0 (one remote call)."""
        self._check_open()
        step, z = self._group.control("state")
        return int(step), z

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
            seed: the step's noise seed; default ``step_seed(seed, t, client)`` with ``t``
                this client's step count (a lone client's: 0, 1, 2, … as ``MemoryBank``'s)
                and ``client`` 0 for the creator, a random key for each attached client.

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
        return self._steps.start(feats, ids, objective, noise_ids, seed)

    # -------------------------------------------------------------- lifecycle

    def shard_info(self) -> list[dict[str, Any]]:
        """Per-shard state: stamp (incarnation), rows, device, steps applied, snapshots …"""
        self._check_open()
        return self._group.info()

    def shutdown(self) -> None:
        """Remove the shard actors (the store is gone for every client)."""
        if self._closed:
            return
        self._snapshots.wait()
        self._group.shutdown()
        self._closed = True
        logger.info("feature store %r shut down", self.name)


__all__ = ["DEFAULT_NAMESPACE", "ShardedStore", "actor_name", "latest_snapshot", "shard_bounds"]
