"""How a store client reaches its shard actors: one transport for the shard group.

# Ray: with store.py and shard_actor.py, the only place the store touches Ray.

:class:`ShardGroup` holds the actor handles of one store and is the single place of the
call policy: every data call may be retried (same arguments, so the shard's request ids
make a repeated update idempotent) while its shard restarts, with exponential back-off up
to ``max_retries``; every reply carries the shard's :class:`ShardStamp`, and a new stamp
means the shard restarted (logged with the steps of updates its rows lost); an exception a
shard raised comes back as the same exception type with the shard named. Control calls go
to shard 0's ``control`` group. :class:`TransferCounter` measures the bytes of calls for
benchmarks, outside the hot path unless switched on.

:func:`start_shards` and :func:`find_shards` create a store's actors or look up a running
store's.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from featurestore import wire
from featurestore.ray_connect import connect
from featurestore.shard_actor import RemoteShard
from featurestore.shard_protocol import ShardStamp, StoreConfig

logger = logging.getLogger(__name__)

#: Ray namespace of the shard actors unless another is given.
DEFAULT_NAMESPACE = "npid"


def actor_name(name: str, shard: int) -> str:
    """Ray actor name of shard ``shard`` of store ``name``."""
    return f"{name}.shard{shard}"


def ensure_ray(connect_only: bool) -> None:
    """Connect to Ray (``RAY_ADDRESS`` or a running local cluster); unless
    ``connect_only``, start a local instance on loopback when there is none.

    Raises:
        LookupError: no cluster to attach to, or it refuses this client (one line).
    """
    connect(start_local=not connect_only)


def lookup(name: str, namespace: str, shard: int):
    """The actor handle of a shard, or None when no such actor exists."""
    try:
        return ray.get_actor(actor_name(name, shard), namespace=namespace)
    except ValueError:
        return None


def kill(actor) -> None:
    """Remove an actor for good (no restart); one already gone is fine."""
    try:
        ray.kill(actor, no_restart=True)
    except Exception as err:  # already gone
        logger.debug("ray.kill: %s", err)


def check_retry_args(max_retries: int, retry_backoff_s: float) -> None:
    """Raise ``ValueError`` for a negative or non-integer retry count or back-off."""
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
    if not isinstance(retry_backoff_s, (int, float)) or retry_backoff_s < 0:
        raise ValueError(f"retry_backoff_s must be a number >= 0, got {retry_backoff_s!r}")


def _translate(err: RayTaskError, shard: int, name: str) -> Exception:
    """The exception a shard raised, re-raised in the caller with the shard's message."""
    cause = err.cause
    where = f" (shard {shard} of store {name!r})"
    for cls in (FileNotFoundError, FileExistsError, ValueError, LookupError):
        if isinstance(cause, cls):
            return cls(f"{cause}{where}")
    return RuntimeError(f"shard {shard} of store {name!r} failed: {cause!r}")


def start_shards(
    config: StoreConfig, restore_uri: str | None, ready_timeout_s: float
) -> tuple[list, list[dict[str, Any]]]:
    """Start the (named, detached) shard actors of a new store: ``(actors, infos)``.

    Raises:
        ValueError: a store of that name exists; TimeoutError: the shards did not start.
    """
    name, namespace = config.name, config.namespace
    num_gpus, num_cpus = config.num_gpus_per_shard, config.num_cpus_per_shard
    if lookup(name, namespace, 0) is not None:
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
            kill(actor)
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
    return actors, infos


def find_shards(
    name: str, namespace: str, max_retries: int = 5, retry_backoff_s: float = 0.5
) -> tuple[StoreConfig, list, list[dict[str, Any]]]:
    """The configuration, actors and infos of the running store ``name``; a restarting
    shard is asked again (``max_retries`` times, the delay doubling from the backoff).

    Raises:
        LookupError: no such store, or one of its shards is missing.
        RuntimeError: a shard stayed unavailable through every retry.
    """
    first = lookup(name, namespace, 0)
    if first is None:
        raise LookupError(
            f"no feature store named {name!r} in Ray namespace {namespace!r} "
            "(create it with ShardedStore(..., name=...) first)"
        )
    actors, infos = [first], [_info(first, 0, name, max_retries, retry_backoff_s)]
    config: StoreConfig = infos[0]["config"]
    for s in range(1, config.num_shards):
        actor = lookup(name, namespace, s)
        if actor is None:
            raise LookupError(f"feature store {name!r} has no shard {s} (was it shut down?)")
        actors.append(actor)
        infos.append(_info(actor, s, name, max_retries, retry_backoff_s))
    return config, actors, infos


def _info(actor, shard: int, name: str, max_retries: int, backoff_s: float) -> dict[str, Any]:
    """``actor.info()``, retried while the shard restarts (one line per retry)."""
    for attempt in range(max_retries + 1):
        try:
            return ray.get(actor.info.remote())
        except RayActorError as err:
            if attempt >= max_retries:
                msg = f"shard {shard} of store {name!r} is unavailable after {max_retries} "
                raise RuntimeError(f"{msg}retries of attaching: {err}") from err
            delay = backoff_s * 2**attempt
            logger.warning(
                "shard %d of store %r unavailable while attaching (%s); retry %d/%d in %.2f s",
                shard, name, type(err).__name__, attempt + 1, max_retries, delay,
            )  # fmt: skip
            time.sleep(delay)
    raise AssertionError("unreachable")


class TransferCounter:
    """Pickled bytes of every call's arguments and results, while ``enabled`` (benchmarks)."""

    def __init__(self) -> None:
        self.enabled = False
        self.bytes = {"sent": 0, "received": 0}
        self.shared: dict[Any, Any] = {}  # object refs put once, counted per shard
        self._lock = threading.Lock()

    def count(self, key: str, obj: Any) -> None:
        """Add the pickled size of ``obj`` to ``bytes[key]``."""
        size = len(pickle.dumps(obj, protocol=5))
        with self._lock:
            self.bytes[key] += size

    def reset(self) -> None:
        """Zero the counts (and forget shared objects)."""
        with self._lock:
            self.bytes = {"sent": 0, "received": 0}
            self.shared.clear()


class ShardGroup:
    """The shard actors of one store and the policy every call to them follows.

    Args:
        config: the store's configuration.
        actors: one handle per shard.
        infos: each shard's ``info()`` when the client connected (stamps).
        max_retries, retry_backoff_s: retries of a call whose shard is restarting.
        client_step: the next step number as the client knows it (for restart reports).
    """

    def __init__(
        self,
        config: StoreConfig,
        actors: list,
        infos: list[dict[str, Any]],
        max_retries: int,
        retry_backoff_s: float,
        client_step: Callable[[], int],
    ) -> None:
        self.name = config.name
        self.namespace = config.namespace
        self.num_shards = config.num_shards
        self.bounds = list(config.bounds)
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.actors = actors
        self.transfer = TransferCounter()
        #: Restarts of each shard this client has seen.
        self.restarts = [0] * self.num_shards
        self._instances: list[str] = [info["stamp"].instance for info in infos]
        self._client_step = client_step
        self._lock = threading.Lock()

    def submit(self, shard: int, op: str, args: tuple):
        """Start ``op(*args)`` on one shard; its object ref(s)."""
        if self.transfer.enabled:  # what the shard receives: shared objects count per shard
            shared = self.transfer.shared
            plain = tuple(shared.get(a, a) if isinstance(a, ray.ObjectRef) else a for a in args)
            self.transfer.count("sent", (op, plain))
        method = getattr(self.actors[shard], op)
        if op == "step":  # the reply comes back in pieces Ray carries inline (wire.py)
            method = method.options(num_returns=args[0].pieces)
        return method.remote(*args)

    def submit_all(self, op: str, calls: dict[int, tuple]) -> dict[int, Any]:
        """Start ``op`` on each shard of ``calls`` ``{shard: args}``; their object refs."""
        return {s: self.submit(s, op, args) for s, args in calls.items()}

    def collect(self, op: str, refs: dict[int, Any], calls: dict[int, tuple]) -> dict[int, Any]:
        """The payloads of calls started by :meth:`submit_all` (retried while restarting).

        When one shard's call fails, the others' replies are still awaited (and their
        errors dropped) before the first error is raised: an error nobody fetched is
        printed by Ray as an "Unhandled error" traceback when its ref is collected."""
        replies: dict[int, Any] = {}
        try:
            for s, ref in refs.items():
                replies[s] = self.await_reply(s, op, ref, calls[s])
        except BaseException:
            for s, ref in refs.items():
                if s not in replies:
                    with contextlib.suppress(Exception):
                        ray.get(ref)
            raise
        return replies

    def call(self, op: str, calls: dict[int, tuple]) -> dict[int, Any]:
        """Call ``op`` on several shards at once (all in flight), then collect in order."""
        return self.collect(op, self.submit_all(op, calls), calls)

    def wire_feats(self, feats: np.ndarray) -> list[Any]:
        """A step's features ``[B, d]`` as call arguments: inline row blocks, or one
        object-store copy that every shard reads when they are too big to go inline."""
        if feats.nbytes <= wire.MAX_INLINE_BYTES:
            return wire.split_rows(feats)
        ref = ray.put(feats)
        if self.transfer.enabled:
            self.transfer.shared[ref] = feats
        return [ref]

    def control(self, op: str, *args: Any) -> Any:
        """A small bookkeeping call to shard 0 (``control`` group), with retries."""
        for attempt in range(self.max_retries + 1):
            try:
                if self.transfer.enabled:
                    self.transfer.count("sent", (op, args))
                result = ray.get(getattr(self.actors[0], op).remote(*args))
                if self.transfer.enabled:
                    self.transfer.count("received", result)
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

    def info(self) -> list[dict[str, Any]]:
        """Every shard's ``info()`` (stamp, rows, device, steps applied, snapshots …)."""
        return ray.get([a.info.remote() for a in self.actors])

    def shutdown(self) -> None:
        """Remove the actors and wait (up to 10 s) until their names are free."""
        for actor in self.actors:
            kill(actor)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and any(
            lookup(self.name, self.namespace, s) is not None for s in range(self.num_shards)
        ):
            time.sleep(0.05)

    def await_reply(self, shard: int, op: str, ref, args: tuple) -> Any:
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
                ref = self.submit(shard, op, args)
                continue
            if self.transfer.enabled:
                self.transfer.count("received", reply)
            stamp, payload = reply
            self._check_stamp(shard, stamp)
            return payload

    def _check_stamp(self, shard: int, stamp: ShardStamp) -> None:
        """Notice (and log) a shard that restarted since this client last heard from it."""
        with self._lock:
            if self._instances[shard] == stamp.instance:
                return
            self._instances[shard] = stamp.instance
            self.restarts[shard] += 1
        client_step = self._client_step()
        try:
            store_step = max(client_step, int(self.control("state")[0]))
        except RuntimeError:
            store_step = client_step
        lost = max(0, store_step - stamp.loaded_step)
        source = stamp.loaded_from or "its seeded initial rows (no snapshot)"
        logger.warning(
            "shard %d of store %r restarted and reloaded rows [%d, %d) from %s at step %d; the "
            "store is at step %d: up to %d steps of updates to those rows were lost (a "
            "snapshot written during training also holds some steps after its own)",
            shard, self.name, self.bounds[shard], self.bounds[shard + 1], source,
            stamp.loaded_step, store_step, lost,
        )  # fmt: skip


__all__ = [
    "DEFAULT_NAMESPACE",
    "ShardGroup",
    "TransferCounter",
    "actor_name",
    "check_retry_args",
    "ensure_ray",
    "find_shards",
    "kill",
    "lookup",
    "start_shards",
]
