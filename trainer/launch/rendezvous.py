"""The training workers' torch rendezvous on loopback, when the driver's Ray is local.

# Ray: a Ray Train backend (the driver passes :class:`LoopbackTorchConfig` to TorchTrainer).

Ray Train's own torch setup gives ``init_process_group`` an ``env://`` address, and torch's
``TCPStore`` then listens on every interface (``::``) whatever ``MASTER_ADDR`` says; gloo
and NCCL pick their interface from the host name. When the run started its own Ray on
127.0.0.1 (:func:`featurestore.ray_connect.started_on_loopback`) every worker is on this
machine, so rank 0 opens the store's listening socket itself on 127.0.0.1 and hands it to
``TCPStore`` (``master_listen_fd``), and gloo/NCCL are pointed at the loopback interface.
On a cluster (``RAY_ADDRESS``) the driver keeps Ray Train's plain ``TorchConfig``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import psutil
import ray
import torch.distributed as dist
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

LOOPBACK = "127.0.0.1"

_listen_fd: int | None = None  # rank 0's listening socket, until TCPStore takes it


def loopback_interface() -> str | None:
    """The name of the network interface holding 127.0.0.1 (``lo``, ``lo0``), if any."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == LOOPBACK for a in addresses):
            return name
    return None


def listen_on_loopback() -> int:
    """Open rank 0's rendezvous socket on 127.0.0.1 (any free port); returns the port."""
    global _listen_fd
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    _listen_fd = sock.detach()  # TCPStore owns it from here
    return port


def init_process_group(backend: str, world_rank: int, world_size: int, port: int, timeout_s: int):
    """Join the process group through a ``TCPStore`` served by rank 0 on 127.0.0.1."""
    global _listen_fd
    interface = loopback_interface()
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = LOOPBACK, str(port)
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        if _listen_fd is None:
            raise RuntimeError("the loopback rendezvous socket was not opened on rank 0")
        store = dist.TCPStore(
            LOOPBACK, port, world_size, True, timeout=timeout, master_listen_fd=_listen_fd
        )
        _listen_fd = None
    else:
        store = dist.TCPStore(LOOPBACK, port, world_size, False, timeout=timeout)
    dist.init_process_group(
        backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout
    )


class LoopbackTorchBackend(_TorchBackend):
    """Ray Train's torch backend with the rendezvous of :func:`init_process_group`."""

    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        """Open rank 0's socket, set the torch env vars, join the group on every worker."""
        backend = backend_config.backend or "gloo"
        port = worker_group.execute_single(0, listen_on_loopback)
        if not isinstance(worker_group, V1WorkerGroup):  # V1 sets them at training start
            worker_group.execute(_set_torch_distributed_env_vars)
        world_size = len(worker_group)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    init_process_group,
                    backend=backend,
                    world_rank=rank,
                    world_size=world_size,
                    port=port,
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(world_size)
            ]
        )


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose process group meets on 127.0.0.1 only."""

    @property
    def backend_cls(self):
        """The backend Ray Train instantiates."""
        return LoopbackTorchBackend


__all__ = [
    "LoopbackTorchBackend",
    "LoopbackTorchConfig",
    "init_process_group",
    "loopback_interface",
]
