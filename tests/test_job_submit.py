"""``ray start --head`` with token authentication, then ``ray job submit -- python -m
trainer.run``: the cluster path of the README, unchanged, on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray_head import submit, token_head

from trainer.metrics import read_jsonl

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_ray_job_submit_runs_the_trainer(tmp_path):
    out = tmp_path / "run"
    with token_head(tmp_path / "cache") as head:
        job = submit(
            head,
            ["python", "-m", "trainer.run", "--epochs", "2", "--output", str(out), "--no-progress"],
            REPO,
        )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout + job.stderr
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2, 2]
    assert records[-1]["features"] == "recomputed"
