"""``python -m trainer.run --launcher local``: the Ray Train worker loop in one process, with
no Ray imported; its checkpoints carry the in-process bank, so a resumed run continues
exactly where an uninterrupted one would be; a run whose values stop being finite stops
with one line and exit code 1, keeping its last checkpoint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from generated_images import colour_shards
from without_ray import no_ray_program

from trainer.checkpoints import latest_checkpoint, load_checkpoint
from trainer.metrics import read_jsonl

REPO = Path(__file__).resolve().parent.parent
#: Runs the CLI with every ``import ray`` failing, so the local path provably avoids Ray.
NO_RAY = no_ray_program("trainer.run")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """96 train and 32 test 16×16 images of 4 colour classes."""
    return colour_shards(tmp_path_factory.mktemp("local"), 96, 32, shard_size=40)


def _run(shards, output, *extra, timeout=240):
    args = [
        "--launcher", "local", "--data", str(shards["train"]), "--val-data", str(shards["test"]),
        "--output", str(output), "--arch", "small", "--low-dim", "16", "--batch-size", "16",
        "--nce-k", "0", "--no-progress", *extra,
    ]  # fmt: skip
    return subprocess.run(
        [sys.executable, "-c", NO_RAY, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )


def test_local_launcher_trains_evaluates_and_exports_without_ray(shards, tmp_path):
    out = tmp_path / "run"
    result = _run(shards, out, "--epochs", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert [(r["epoch"], r["step"]) for r in records] == [(0, 0), (1, 6), (2, 12), (2, 12)]
    assert [r["features"] for r in records] == ["recomputed", "bank", "bank", "recomputed"]
    assert all(0 <= r["knn_top1"] <= r["knn_top5"] <= 1 for r in records)
    assert (out / "encoder" / "encoder.pt").is_file()
    found = latest_checkpoint(out)
    state, config = load_checkpoint(found)
    assert state.epoch == 2 and state.bank is not None and config["launcher"] == "local"
    assert tuple(state.bank["rows"].shape) == (96, 16)


@pytest.mark.parametrize("data_cache", ["memory", "off"])
def test_resumed_run_continues_exactly_like_an_uninterrupted_one(shards, tmp_path, data_cache):
    """Model, optimizer, the bank's rows and step count all come back: epoch 3 after a resume
    equals epoch 3 of one run (the data order and the augmentation depend on the epoch only)."""
    whole = _run(shards, tmp_path / "whole", "--epochs", "3", "--data-cache", data_cache)
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = _run(shards, tmp_path / "split", "--epochs", "3", "--data-cache", data_cache,
                 "--eval-every", "0", "--checkpoint-every", "1")  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    # drop the last checkpoint: resume from epoch 2
    ckpts = sorted((tmp_path / "split" / "ray").rglob("checkpoint_*"))
    assert len(ckpts) == 2
    import shutil

    shutil.rmtree(ckpts[-1])
    (tmp_path / "split" / "metrics.jsonl").unlink()
    resumed = _run(shards, tmp_path / "split", "--epochs", "3", "--data-cache", data_cache,
                   "--resume", "--eval-every", "0")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at epoch 2" in resumed.stdout + resumed.stderr
    want = [r for r in read_jsonl(tmp_path / "whole" / "metrics.jsonl") if r.get("loss")][-1]
    got = [r for r in read_jsonl(tmp_path / "split" / "metrics.jsonl") if r.get("loss")][-1]
    assert (got["epoch"], got["step"]) == (want["epoch"], want["step"]) == (3, 18)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)


def test_non_finite_features_stop_the_run_with_one_line_and_keep_the_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    first = _run(shards, out, "--epochs", "1", "--eval-every", "0")
    assert first.returncode == 0, first.stderr[-3000:]
    kept = latest_checkpoint(out)
    blown = _run(shards, out, "--epochs", "3", "--resume", "--lr", "1e30", "--eval-every", "0")
    assert blown.returncode == 1
    lines = blown.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training stopped:")
    assert "non-finite" in lines[0] and "--lr" in lines[0]
    last = read_jsonl(out / "metrics.jsonl")[-1]
    assert "non-finite" in last["error"] and last["epoch"] == 2
    assert latest_checkpoint(out) == kept
    state, _ = load_checkpoint(kept)
    assert state.epoch == 1  # the last good checkpoint, intact and loadable


@pytest.fixture(scope="module")
def one_epoch_run(shards, tmp_path_factory) -> Path:
    """The output of a one-epoch run (its checkpoint is what the refusals resume)."""
    out = tmp_path_factory.mktemp("one-epoch") / "run"
    first = _run(shards, out, "--epochs", "1", "--eval-every", "0")
    assert first.returncode == 0, first.stderr[-3000:]
    return out


@pytest.mark.parametrize(
    ("changed", "says"),
    [
        (("--nce-m", "0.9"), "nce_m: 0.9 != 0.5"),
        (("--seed", "3"), "seed: 3 != 0"),
        (("--low-dim", "8"), "low_dim: 8 != 16"),
        (("--launcher", "ray"), "bank: 'store' != 'local'"),
    ],
)
def test_resume_refuses_a_checkpoint_of_another_bank_or_seed_in_one_line(
    shards, one_epoch_run, tmp_path, changed, says
):
    out = tmp_path / "run"
    shutil.copytree(one_epoch_run, out)  # each refusal against the same checkpoint
    again = _run(shards, out, "--epochs", "2", "--resume", "--eval-every", "0", *changed)
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "is from another config" in lines[0] and says in lines[0], lines


def test_sigterm_stops_the_run_with_one_line_and_exit_143(shards, tmp_path):
    """``ray job stop`` and schedulers send SIGTERM: the run ends through its cleanup (the
    store a Ray run created is shut down there) with one line and exit code 143."""
    import signal
    import time

    args = [
        "--launcher", "local", "--data", str(shards["train"]), "--val-data", str(shards["test"]),
        "--output", str(tmp_path / "run"), "--arch", "small", "--low-dim", "16",
        "--batch-size", "16", "--nce-k", "0", "--no-progress", "--epochs", "200",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", NO_RAY, *args], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and len(read_jsonl(metrics)) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, out[-2000:] + err[-2000:]
    assert err.strip().splitlines()[-1] == (
        "stopped by SIGTERM (a store this run created was shut down); resume with --resume"
    ), err[-2000:]
    assert "Traceback" not in err
