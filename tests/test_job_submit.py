"""``ray start --head`` with token authentication, then ``ray job submit -- python -m
trainer.run``: the cluster path of the README, unchanged, on loopback."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from trainer.metrics import read_jsonl

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_instance(marker: str) -> None:
    """Kill the processes of this test's Ray head only (their command lines name its dir);
    ``ray stop`` would also stop the session's other Ray instance."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []):
                p.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def test_ray_job_submit_runs_the_trainer(tmp_path):
    ray_bin = Path(sys.executable).with_name("ray")
    temp = Path(tempfile.mkdtemp(prefix="npid-job-", dir="/tmp"))  # short: socket paths
    dashboard = _free_port()
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "NPID_CACHE_DIR": str(tmp_path / "cache"),
        "RAY_ADDRESS": "",
    }
    out = tmp_path / "run"
    try:
        subprocess.run(
            [str(ray_bin), "start", "--head", "--num-cpus", "2", "--temp-dir", str(temp),
             "--port", str(_free_port()), "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dashboard)],
            check=True, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        job = subprocess.run(
            [str(ray_bin), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
             "--working-dir", str(REPO), "--", "python", "-m", "trainer.run", "--epochs", "2",
             "--output", str(out), "--no-progress"],
            env=env, capture_output=True, text=True, timeout=420,
        )  # fmt: skip
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout + job.stderr
        records = read_jsonl(out / "metrics.jsonl")
        assert [r["epoch"] for r in records] == [0, 1, 2, 2]
        assert records[-1]["features"] == "recomputed"
    finally:
        _kill_instance(str(temp))
        shutil.rmtree(temp, ignore_errors=True)
