"""Whole-store snapshots for one client: written on request, automatically off the training
step's path, and loaded back.

Each shard writes its own rows as one Parquet file of the snapshot directory
(:meth:`ShardActor.write_snapshot`); the client then writes the manifest, which marks the
snapshot complete (:mod:`featurestore.snapshot`). Shard 0 decides when an automatic
snapshot is due and tells the client in a step's reply; :meth:`SnapshotCoordinator.start_auto`
then writes it on a background thread, so the training step that learnt of it does not wait.
While it is written, training continues: a shard's file holds its rows as of the moment the
shard wrote it, at most the steps then in flight after the manifest's step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from featurestore import snapshot
from featurestore.metrics import store_metrics
from featurestore.shard_protocol import StoreConfig
from featurestore.store_transport import ShardGroup
from featurestore.validation import dtype_name, storage_dtype

logger = logging.getLogger(__name__)


def config_from_snapshot(
    uri: str,
    num_shards: int | None,
    name: str,
    namespace: str,
    num_rows: int | None,
    dim: int | None,
    options: dict[str, Any],
) -> tuple[StoreConfig, snapshot.Manifest]:
    """The configuration of a new store restored from the snapshot at ``uri`` (rows, dim,
    momentum, seed, dtype from the snapshot; ``options`` override the rest) and the
    snapshot's manifest (``uri`` resolved: the newest complete one under a directory).

    Raises:
        FileNotFoundError: no complete snapshot or a shard file missing; ValueError: corrupt
            files, or sizes other than ``num_rows``/``dim``; TypeError: an unknown option.
    """
    snapshot.check_shared(uri, "snapshot uri")
    resolved = snapshot.resolve(uri)
    manifest = snapshot.read_manifest(resolved)
    for label, expected in (("num_rows", num_rows), ("dim", dim)):
        if expected is not None and getattr(manifest, label) != expected:
            raise ValueError(
                f"snapshot {resolved} has {label}={getattr(manifest, label)}, expected {expected}"
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
    return config, manifest


class SnapshotCoordinator:
    """Takes and loads the snapshots of the store behind ``group``.

    Args:
        group: the store's shard group.
        config: the store's configuration (sizes, seed, momentum, snapshot settings).
        observe: called with the seconds each committed snapshot took (metrics).
        on_loaded: called with ``(step, z)`` after :meth:`load` replaced the store's state.
    """

    def __init__(
        self,
        group: ShardGroup,
        config: StoreConfig,
        observe: Callable[[float], None],
        on_loaded: Callable[[int, float | None], None],
    ) -> None:
        self.group = group
        self.config = config
        self.snapshot_dir = config.snapshot_dir
        self._observe = observe
        self._on_loaded = on_loaded
        self._auto: threading.Thread | None = None
        self._lock = threading.Lock()

    def take(self, uri: str | None) -> str:
        """Write a snapshot to ``uri`` (None: a new directory under ``snapshot_dir``) now.

        Raises:
            ValueError: no ``uri`` and no ``snapshot_dir``; FileExistsError: ``uri`` holds
                a complete snapshot.
        """
        cfg = self.config
        if uri is None and self.snapshot_dir is None:
            raise ValueError(
                f"snapshot() needs a uri: store {cfg.name!r} was created without snapshot_dir"
            )
        snapshot.check_shared(uri or self.snapshot_dir or "", "snapshot uri")
        start = time.perf_counter()
        step, z = self.group.control("state")
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
        fields = {
            "num_rows": cfg.num_rows,
            "dim": cfg.dim,
            "dtype": dtype_name(storage_dtype(cfg.dtype)),
            "momentum": cfg.momentum,
            "seed": cfg.seed,
            "z": z,
            "step": step,
            "bounds": list(cfg.bounds),
            "store_id": cfg.store_id,
            "name": cfg.name,
        }
        committed = False
        try:
            files = self.group.call(
                "write_snapshot", dict.fromkeys(range(cfg.num_shards), (target, fields))
            )
            manifest = snapshot.Manifest(
                uri=target,
                files=[snapshot.ShardFile(**files[s]) for s in range(cfg.num_shards)],
                created=snapshot.wall_time(),
                extra={"normalize_init": cfg.normalize_init},
                **fields,
            )
            snapshot.write_manifest(manifest, on_retry=store_metrics().count_snapshot_retry)
            committed = True
        finally:
            if not committed and uri is None:
                snapshot.remove_snapshot(target)  # a fresh directory of ours: drop the debris
            try:
                self.group.control("snapshot_finished", committed, step)
            except RuntimeError as err:
                logger.warning("could not tell shard 0 that a snapshot ended: %s", err)
        if self.snapshot_dir is not None:
            snapshot.prune_snapshots(self.snapshot_dir, cfg.keep_snapshots, cfg.store_id)
        seconds = time.perf_counter() - start
        self._observe(seconds)
        logger.debug(  # one an epoch: the trainer's epoch line is what a user reads
            "store %r: snapshot at step %d written to %s (%.1f s)", cfg.name, step, target, seconds
        )
        return target

    def start_auto(self, step: int) -> None:
        """Write the automatic snapshot shard 0 asked for after ``step``, on a background
        thread (one at a time; failures are logged, and shard 0 retries on schedule)."""
        with self._lock:
            if self._auto is not None and self._auto.is_alive():
                return
            self._auto = threading.Thread(
                target=self._run_auto, args=(step,), name=f"snapshot-{self.config.name}"
            )
            self._auto.start()

    def wait(self, timeout: float | None = None) -> None:
        """Until the automatic snapshot being written (if any) has ended."""
        with self._lock:
            thread = self._auto
        if thread is not None:
            thread.join(timeout)

    def load(self, uri: str) -> None:
        """Replace the store's rows, ``Z`` and step counter with the snapshot at ``uri``
        (any shard count, this store's rows and dim); with a ``snapshot_dir`` a snapshot of
        the loaded state is written at once, for shards that restart later.

        Raises:
            FileNotFoundError: no complete snapshot at ``uri`` or a shard file missing.
            ValueError: another row count or dim, or corrupt files; the store is unchanged.
        """
        cfg = self.config
        snapshot.check_shared(uri, "snapshot uri")
        resolved = snapshot.resolve(uri)
        manifest = snapshot.read_manifest(resolved)
        if manifest.num_rows != cfg.num_rows or manifest.dim != cfg.dim:
            raise ValueError(
                f"snapshot {resolved} holds {manifest.num_rows} rows of dim {manifest.dim}; "
                f"store {cfg.name!r} has {cfg.num_rows} rows of dim {cfg.dim}"
            )
        snapshot.check_files(manifest)
        self.wait()
        self.group.call("load_snapshot", dict.fromkeys(range(cfg.num_shards), (resolved,)))
        self.group.control("reset_state", manifest.step, manifest.z)
        self._on_loaded(manifest.step, manifest.z)
        if self.snapshot_dir is not None:
            self.take(None)

    def _run_auto(self, step: int) -> None:
        try:
            self.take(None)
        except Exception as exc:  # one line; training goes on and shard 0 retries on schedule
            logger.error(
                "automatic snapshot of store %r after step %d failed: %s: %s (training goes "
                "on; the previous snapshot stays the latest)",
                self.config.name,
                step,
                type(exc).__name__,
                exc,
            )
            logger.debug("the failed snapshot", exc_info=True)


__all__ = ["SnapshotCoordinator"]


class SnapshotCalls:
    """The store's snapshot methods, and its part of the bank interface's checkpoint
    (:class:`featurestore.bank_protocol.Bank`): a checkpoint names a snapshot."""

    _snapshots: SnapshotCoordinator
    # and from the store: _check_open()

    #: The rows live in the shard actors, not in this process.
    in_process = False

    def snapshot(self, uri: str | None = None) -> str:
        """Write a snapshot (one Parquet file per shard, in parallel, then the manifest) to
        ``uri`` or a new ``snapshot_dir/step-<step>``; returns its URI (for :meth:`restore`).

        Raises:
            ValueError: no ``uri`` and no ``snapshot_dir``; FileExistsError: ``uri`` already
                holds a complete snapshot.
        """
        self._check_open()
        return self._snapshots.take(uri)

    def wait_for_snapshots(self, timeout: float | None = None) -> None:
        """Until the automatic snapshot being written in the background (if any) ended."""
        self._snapshots.wait(timeout)

    def load_snapshot(self, uri: str) -> None:
        """Replace the store's rows, ``Z`` and step counter with the snapshot at ``uri`` (any
        shard count; this store's rows and dim, else ``ValueError``; a missing snapshot is
        ``FileNotFoundError``). See :meth:`SnapshotCoordinator.load`."""
        self._check_open()
        self._snapshots.load(uri)

    def checkpoint_state(self, snapshot_uri: str | None = None) -> dict[str, Any]:
        """What a training checkpoint keeps of the store: ``{"store_snapshot": URI}`` of a
        snapshot taken now (to ``snapshot_uri``, or a new one under ``snapshot_dir``)."""
        return {"store_snapshot": self.snapshot(snapshot_uri)}

    def restore_checkpoint(self, state: dict[str, Any], source: str) -> None:
        """Load the snapshot a :meth:`checkpoint_state` named (``source``: the checkpoint,
        for the error when it names none)."""
        if state.get("store_snapshot") is None:
            raise ValueError(f"checkpoint {source} names no store snapshot to restore")
        self.load_snapshot(state["store_snapshot"])
