"""A ``ray start --head`` with token authentication on loopback, for the tests and
benchmarks that play a user's cluster (``ray job submit``, ``python -m featurestore``, the
chaos run): its own temp dir, ports and token, and stopped by killing only its own
processes (``ray stop`` would also stop the session's other Ray instance)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_instance(marker: str) -> None:
    """Kill the processes whose command line names ``marker`` (the head's temp dir)."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []):
                p.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


@dataclass
class Head:
    """A running head: its GCS address, dashboard port and the environment of a client
    holding its token (``env``)."""

    address: str
    dashboard_port: int
    env: dict[str, str]
    temp_dir: str
    """Its ``--temp-dir``: every process of the head names it on its command line."""

    @property
    def dashboard_url(self) -> str:
        """``http://127.0.0.1:PORT``: where ``ray job`` commands and the state API go."""
        return f"http://127.0.0.1:{self.dashboard_port}"


@contextlib.contextmanager
def token_head(cache_dir: Path, num_cpus: int = 2) -> Iterator[Head]:
    """Start a token-authenticated head on loopback; kill it on exit."""
    ray_bin = Path(sys.executable).with_name("ray")
    temp = Path(tempfile.mkdtemp(prefix="npid-head-", dir="/tmp"))  # short: socket paths
    # Every port of its own: Ray's dashboard agent listens on 52365 by default, and the
    # session's other instance (even one started without a dashboard) already holds it;
    # a head whose agent cannot bind answers every `ray job submit` "No available agent".
    port, dashboard, agent = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "NPID_CACHE_DIR": str(cache_dir),
        "RAY_ADDRESS": "",
        "RAY_DEDUP_LOGS": "0",  # a job's log shows every worker's line
    }
    try:
        subprocess.run(
            [str(ray_bin), "start", "--head", "--num-cpus", str(num_cpus), "--temp-dir",
             str(temp), "--port", str(port), "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dashboard), "--dashboard-agent-listen-port", str(agent)],
            check=True, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        yield Head(
            f"127.0.0.1:{port}", dashboard, {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, str(temp)
        )
    finally:
        kill_instance(str(temp))
        if os.environ.get("NPID_KEEP_HEAD_DIR") != "1":  # =1: keep its logs to read
            shutil.rmtree(temp, ignore_errors=True)


def submit(
    head: Head,
    entrypoint: list[str],
    working_dir: Path,
    *,
    no_wait: bool = False,
    submission_id: str | None = None,
    timeout: float = 420,
    agent_wait_s: float = 120,
) -> subprocess.CompletedProcess:
    """``ray job submit [--no-wait] --working-dir DIR -- ENTRYPOINT`` as a user types it.

    The head's job agent may still be starting right after ``ray start``: Ray's "No
    available agent" is retried for up to ``agent_wait_s``.
    """
    ray_bin = Path(sys.executable).with_name("ray")
    env = {**head.env, "RAY_ADDRESS": ""}  # `ray job submit` names the dashboard
    cmd = [str(ray_bin), "job", "submit", "--address", head.dashboard_url,
           "--working-dir", str(working_dir)]  # fmt: skip
    if no_wait:
        cmd.append("--no-wait")
    if submission_id is not None:
        cmd += ["--submission-id", submission_id]
    deadline = time.monotonic() + agent_wait_s
    while True:
        job = subprocess.run(
            [*cmd, "--", *entrypoint], env=env, capture_output=True, text=True, timeout=timeout
        )
        if "No available agent" not in job.stdout + job.stderr or time.monotonic() > deadline:
            return job
        time.sleep(10)
