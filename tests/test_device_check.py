"""``benchmarks/device_check.sh --cpu --smoke``: the GPU machine's one command, run here on
the CPU the way it runs there (no Ray, webdataset or FAISS importable), and its summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.device_summary import markdown, summarise  # noqa: E402

BLOCKED = REPO / "tests" / "blocked_imports"


def _check(*args: str, env_extra: dict | None = None, timeout: int = 300):
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": str(BLOCKED),
        "ARCHIVE": "/nonexistent/cifar10-jpeg.tar.gz",
        **(env_extra or {}),
    }
    return subprocess.run(
        ["bash", "benchmarks/device_check.sh", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cpu_smoke_runs_every_step_without_ray_webdataset_or_faiss(tmp_path):
    out = tmp_path / "out"
    result = _check("--cpu", "--smoke", str(out), env_extra={"DATA": str(tmp_path / "data")})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    smoke = json.loads((out / "smoke.json").read_text())
    names = [c["check"] for c in smoke["checks"]]
    assert names == [
        "bank-softmax",
        "bank-sampled-softmax",
        "bank-nce",
        "shard-statistics",
        "knn-torch",
        "train-steps",
    ]
    assert all(c["ok"] for c in smoke["checks"]), smoke
    assert "(blocked)" in (out / "run.log").read_text()  # faiss really was unavailable
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 20 and summary["images_per_sec_median"] > 0
    curve = summary["knn_curve"]
    assert [p["epoch"] for p in curve] == [0, 5, 10, 15, 20, 20]
    assert curve[-1]["features"] == "recomputed" and curve[-1]["knn_top1"] > 0.5
    assert (out / "curves.png").stat().st_size > 0
    assert "| epoch | features | kNN top-1 |" in (out / "summary.md").read_text()


def test_without_an_archive_the_full_check_says_so(tmp_path):
    result = _check("--cpu", str(tmp_path / "out"), env_extra={"DATA": str(tmp_path / "d")})
    assert result.returncode == 2
    assert "no CIFAR-10 archive at /nonexistent/cifar10-jpeg.tar.gz" in result.stdout


@pytest.mark.parametrize("args", [(), ("--cpu",), ("--gpu", "x"), ("a", "b")])
def test_bad_arguments_print_the_usage(args):
    result = _check(*args)
    assert result.returncode == 2
    assert "usage: bash benchmarks/device_check.sh [--cpu] [--smoke] OUTDIR" in result.stderr


def test_summary_takes_the_median_rate_after_the_first_epoch_and_fits_epochs(tmp_path):
    records = [
        {"epoch": 0, "features": "recomputed", "knn_top1": 0.4, "images_per_sec": None},
        {"epoch": 1, "loss": 9.0, "images_per_sec": 100.0},
        {"epoch": 2, "loss": 8.0, "images_per_sec": 1000.0, "features": "bank", "knn_top1": 0.5},
        {"epoch": 3, "loss": 7.0, "images_per_sec": 3000.0},
        {"epoch": 4, "loss": 6.0, "images_per_sec": 2000.0},
        {"epoch": 4, "features": "recomputed", "knn_top1": 0.6, "images_per_sec": None},
    ]
    summary = summarise(records, num_images=4000)
    assert summary["epochs"] == 4
    assert summary["images_per_sec_median"] == 2000.0  # 100 (warm-up) left out
    assert summary["epoch_seconds"] == 2.0
    assert summary["final_loss"] == 6.0
    assert [p["knn_top1"] for p in summary["knn_curve"]] == [0.4, 0.5, 0.6]
    assert "| 4 | recomputed | 60.00% |" in markdown(summary)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    fit = subprocess.run(
        [
            *(sys.executable, "benchmarks/device_summary.py", "--metrics", str(metrics)),
            *("--fit-seconds", "30", "--num-images", "4000", "--max-epochs", "12"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert fit.stdout.strip() == "12"  # 30 s at 2000 img/s is 15 epochs, capped at 12
