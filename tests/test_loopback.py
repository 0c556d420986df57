"""A local Ray that npid starts listens on loopback only, and so does the training
workers' torch rendezvous: every listening socket of a default ``python -m trainer.run``
(the driver and every process under it: GCS, raylet, agents, dashboard, the store's
shard actor, the Ray Train workers) is sampled while it trains; its log has no
error-level line (Ray Train's preemption watcher logged one on a one-machine Ray)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listening(root: psutil.Process) -> set[tuple[str, int, str]]:
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = " ".join(proc.cmdline()[:3])[:120]
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port, name))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _sample_run(args: list[str], env: dict[str, str], timeout: float = 300):
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.run", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    seen: set[tuple[str, int, str]] = set()
    deadline = time.monotonic() + timeout
    root = psutil.Process(proc.pid)
    while proc.poll() is None and time.monotonic() < deadline:
        seen |= _listening(root)
        time.sleep(0.3)
    if proc.poll() is None:
        proc.kill()
    out = proc.communicate()[0]
    return proc.returncode, out, seen


@pytest.mark.ray
def test_a_default_run_listens_on_loopback_only(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")  # a user's shell
    }
    code, out, seen = _sample_run(
        ["--epochs", "3", "--num-workers", "2", "--output", str(tmp_path / "run")], env
    )
    assert code == 0, out[-3000:]
    names = " ".join(name for _, _, name in seen)
    assert "gcs_server" in names and "raylet" in names, sorted(seen)
    assert "RayTrainWorker" in names, sorted(seen)  # sampled while the workers trained
    exposed = sorted(s for s in seen if s[0] not in LOOPBACK)
    assert not exposed, f"listening beyond loopback: {exposed}"
    errors = [line for line in out.splitlines() if re.search(r"\d E \d+ \d+\]|\bERROR\b", line)]
    assert not errors, errors  # a default run logs no error-level line


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:6379", True),
        ("127.1.2.3:10001", True),
        ("localhost:6379", True),
        ("[::1]:6379", True),
        ("ray://127.0.0.1:10001", True),
        ("192.0.2.2:6379", False),
        ("head.example:6379", False),
        ("auto", False),
        ("127.0.0.1", False),  # no port: left to Ray
    ],
)
def test_is_loopback_names_only_this_machines_loopback(address, expected) -> None:
    from featurestore.ray_connect import is_loopback

    assert is_loopback(address) is expected
