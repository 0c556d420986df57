"""``ray start --head`` with token authentication, then ``ray job submit -- python -m
trainer.run``: the cluster path of the README, unchanged, on loopback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_head import token_head

from trainer.metrics import read_jsonl

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_ray_job_submit_runs_the_trainer(tmp_path):
    ray_bin = Path(sys.executable).with_name("ray")
    out = tmp_path / "run"
    with token_head(tmp_path / "cache") as head:
        env = {**head.env, "RAY_ADDRESS": ""}  # `ray job submit` names the dashboard
        deadline = time.monotonic() + 180  # the head's job agent may still be starting
        while True:  # (it took over 60 s on a loaded 2-core machine)
            job = subprocess.run(
                [str(ray_bin), "job", "submit", "--address",
                 f"http://127.0.0.1:{head.dashboard_port}", "--working-dir", str(REPO), "--",
                 "python", "-m", "trainer.run", "--epochs", "2", "--output", str(out),
                 "--no-progress"],
                env=env, capture_output=True, text=True, timeout=420,
            )  # fmt: skip
            if "No available agent" not in job.stdout + job.stderr or time.monotonic() > deadline:
                break
            time.sleep(10)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout + job.stderr
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2, 2]
    assert records[-1]["features"] == "recomputed"
