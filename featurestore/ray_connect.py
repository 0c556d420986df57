"""How every npid command reaches Ray: the cluster ``RAY_ADDRESS`` names, or a local
instance that listens on loopback only.

# Ray: the one place npid calls ``ray.init``.

- ``RAY_ADDRESS`` set (``ray job submit`` sets it; so does a user joining a cluster): join
  that cluster (on a loopback address as a loopback client: Ray would otherwise dial the
  GCS at the host's own IP, where a loopback head does not listen, and hang). Before
  Ray's own connect (which retries for about 20 s and ends in a traceback, or for minutes
  when something other than Ray answers) three quick checks turn the common mistakes into
  one line: nothing answers at the address, what answers is not Ray (no gRPC), or the
  cluster wants token authentication and this client has no token.
- Otherwise, where a command may start Ray (``trainer.run``, a new ``ShardedStore``): a
  new local instance (never a stray one found on this machine) whose every process (GCS,
  raylet, workers, agents, dashboard) binds 127.0.0.1, because an unauthenticated Ray on
  all interfaces lets anyone on the network run code. :func:`started_on_loopback` tells
  the trainer to keep its torch rendezvous on loopback too.
- A command that only attaches (``featurestore status``, ``knn_service.serve
  --store-name``) looks for a running local cluster (``ray start --head``) and otherwise
  says how to start one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
#: Ray's switch: "0" makes the node address 127.0.0.1 (read when Ray is imported; the
#: processes a driver starts inherit it).
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
TOKEN_HINT = (
    "a cluster started with a plain `ray start --head` uses token authentication: every "
    "client needs the head's `RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<token>` (or "
    "RAY_AUTH_TOKEN_PATH) in its environment"
)
START_HINT = (
    "start one with `export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(openssl rand -hex 32); "
    "ray start --head` and export RAY_ADDRESS=127.0.0.1:6379 (or run this inside "
    "`ray job submit`)"
)

#: Ray's switch for the GCS port of an instance ``ray.init`` starts (read at start).
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"

_started_local = False


class RayConnectError(LookupError):
    """Ray could not be reached; the message says why and what to do, on one line."""


def started_on_loopback() -> bool:
    """True when this process started the local Ray instance (bound to 127.0.0.1)."""
    import ray

    return _started_local and ray.is_initialized()


def loopback_only() -> None:
    """Make a Ray instance this process starts listen on 127.0.0.1 only.

    Sets :data:`LOCAL_ONLY_ENV` (inherited by every process Ray starts) and, when Ray is
    already imported, Ray's constant read from it at import.
    """
    os.environ[LOCAL_ONLY_ENV] = "0"
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _host_port(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def is_loopback(address: str) -> bool:
    """True when ``address`` (``host:port``, optionally ``ray://``) names this machine's
    loopback interface: 127.0.0.0/8, ``localhost`` or ``::1``."""
    parsed = _host_port(address.removeprefix("ray://"))
    if parsed is None:
        return False
    host = parsed[0].lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def check_reachable(address: str, timeout_s: float = 3.0, what: str | None = None) -> None:
    """Raise :class:`RayConnectError` when nothing accepts a TCP connection at ``address``
    (``host:port``; other forms are left to Ray); ``what`` names it in the message."""
    parsed = _host_port(address)
    if parsed is None:
        return
    try:
        with socket.create_connection(parsed, timeout=timeout_s):
            pass
    except OSError as exc:
        raise RayConnectError(
            f"{what or f'RAY_ADDRESS={address}'}: no Ray cluster answers there "
            f"({exc.strerror or exc}); {START_HINT}"
        ) from None


def check_protocol(address: str, timeout_s: float = 5.0, what: str | None = None) -> None:
    """Raise :class:`RayConnectError` when the server at ``address`` (``host:port``) does not
    open a gRPC (HTTP/2) connection within ``timeout_s``: something else listens there (a
    web server, another service), where Ray's own connect would retry for minutes. Skipped
    with TLS (``RAY_USE_TLS``), where a plain channel cannot be opened."""
    parsed = _host_port(address)
    if parsed is None or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return
    try:
        import grpc
    except ImportError:  # grpcio comes with ray[default]; without it leave it to ray.init
        return
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        raise RayConnectError(
            f"{what or f'RAY_ADDRESS={address}'}: something listens there but does not speak "
            f"Ray's protocol (no gRPC answer in {timeout_s:g} s): is it the head's GCS port "
            "(6379 unless `ray start --port` said otherwise)?"
        ) from None
    finally:
        channel.close()


def _has_token_config() -> bool:
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null inside the block (C++ logging writes there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def local_cluster_address() -> str | None:
    """The address ``ray start --head`` recorded on this machine, if any."""
    try:
        from ray._private.services import find_bootstrap_address
    except ImportError:
        return None
    try:
        return find_bootstrap_address(None)
    except Exception:  # no record, unreadable: there is no local cluster to use
        return None


def check_token(address: str, what: str | None = None, auto: bool = False) -> None:
    """Raise :class:`RayConnectError` at once when the cluster at ``address`` refuses this
    client: it wants token authentication and this process has no token, or another one
    (Ray itself would retry for 20 s and end in a traceback). ``what`` names the cluster in
    the message; ``auto``: found on this machine, where Ray also reads ``~/.ray/auth_token``.
    """
    if _host_port(address) is None:
        return
    try:
        from ray._private.authentication import authentication_token_setup as tokens
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:  # another Ray version: leave it to ray.init
        return
    name = what or f"RAY_ADDRESS={address}"
    try:
        if auto:  # what ray.init(address="auto") does first
            tokens.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        tokens.ensure_token_if_auth_enabled(None, create_token_if_missing=False)
        with _quiet_stderr():  # Ray's C++ client logs the refusal itself
            GcsClient(address=address)
    except AuthenticationError:
        if _has_token_config():
            raise RayConnectError(
                f"{name}: the cluster refused this client's token: RAY_AUTH_TOKEN (or "
                "RAY_AUTH_TOKEN_PATH) must hold the head's token"
            ) from None
        raise RayConnectError(f"{name}: {TOKEN_HINT}") from None
    except RuntimeError as exc:  # token mode without a token
        raise RayConnectError(f"{name}: {exc}; {TOKEN_HINT}") from None
    except Exception as exc:  # only a probe: ray.init gives the real error
        logger.debug("Ray probe of %s: %s", address, exc)


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def _start_local(**init_kwargs: Any) -> None:
    """``ray.init`` a new instance on loopback whose processes know its address.

    Ray's own helpers inside actors (Ray Train's placement-group cleaner asks the state
    API for its controller) look for "the" cluster when ``RAY_ADDRESS`` is unset: with
    another Ray on the machine they raised "Found multiple active Ray instances", or
    picked the other one. So the GCS port is chosen first (``RAY_GCS_SERVER_PORT``) and
    ``RAY_ADDRESS`` names it in the environment of the processes ``ray.init`` spawns (GCS,
    raylet, and through the raylet every worker and actor). This process's own environment
    is restored afterwards: a later ``ray.init()`` here must not join a stopped instance.
    """
    import ray

    address = f"{LOOPBACK}:{_free_loopback_port()}"
    saved = {name: os.environ.get(name) for name in ("RAY_ADDRESS", GCS_PORT_ENV)}
    os.environ[GCS_PORT_ENV] = address.rpartition(":")[2]
    os.environ["RAY_ADDRESS"] = address  # read by the processes Ray starts, not ray.init
    try:
        ray.init(address="local", _node_ip_address=LOOPBACK, **init_kwargs)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def connect(*, start_local: bool, **init_kwargs: Any) -> bool:
    """Connect this process to Ray once.

    Args:
        start_local: without ``RAY_ADDRESS``, start a local instance on 127.0.0.1 (else
            attach to a running local cluster, or fail with how to start one).
        init_kwargs: more ``ray.init`` arguments (``log_to_driver``, ``num_cpus`` …).

    Returns:
        True when this call started a local instance (the caller shuts it down).

    Raises:
        RayConnectError: no cluster to join, or it refuses this client (one line).
    """
    global _started_local
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS") or None
    if address is not None and address != "auto":
        if is_loopback(address):  # else Ray dials the host's own IP, where no one listens
            loopback_only()
        if not address.startswith("ray://"):
            check_reachable(address)
            check_protocol(address)
            check_token(address)
        try:
            ray.init(address=address, **init_kwargs)
        except ConnectionError as exc:
            raise RayConnectError(f"RAY_ADDRESS={address}: {exc}; {TOKEN_HINT}") from None
        return False
    if address == "auto" or not start_local:
        found = local_cluster_address()
        if found is None:
            raise RayConnectError(f"no running Ray cluster; {START_HINT}")
        recorded = f"the local cluster recorded by `ray start` ({found})"
        check_reachable(found, what=recorded)
        check_protocol(found, what=recorded)
        check_token(found, what=f"the local cluster at {found}", auto=True)
        try:
            ray.init(address="auto", **init_kwargs)
        except ConnectionError as exc:
            raise RayConnectError(f"the local cluster at {found}: {exc}; {TOKEN_HINT}") from None
        return False
    loopback_only()
    _start_local(**init_kwargs)
    _started_local = True
    logger.info("started a local Ray instance on %s (set RAY_ADDRESS to join a cluster)", LOOPBACK)
    return True


__all__ = [
    "LOCAL_ONLY_ENV",
    "LOOPBACK",
    "RayConnectError",
    "check_protocol",
    "check_reachable",
    "check_token",
    "connect",
    "is_loopback",
    "local_cluster_address",
    "loopback_only",
    "started_on_loopback",
]
