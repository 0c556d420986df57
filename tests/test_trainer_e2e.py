"""The trainer end to end on tiny generated shards: real Ray, real store, real Ray Train.

Runs use their own local Ray instance (a subprocess of ``python -m trainer.run``), except
the store-mismatch cases, which attach to the session's test cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch
from generated_images import colour_shards

from trainer.checkpoints import latest_checkpoint
from trainer.metrics import read_jsonl

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 train (one corrupt) and 24 test images (16×16 RGB, 4 classes), 3 uneven shards."""
    root = tmp_path_factory.mktemp("e2e")
    out = colour_shards(root, 64, 24, shard_size=25)
    _corrupt_one_image(root / "train" / "shard-000000.tar")
    return out


def _corrupt_one_image(shard: Path) -> None:
    """Overwrite the bytes of the shard's first image in place (tar structure intact)."""
    import tarfile

    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    with shard.open("r+b") as fh:
        fh.seek(member.offset_data)
        fh.write(b"\0" * member.size)


def _args(shards, output, *extra):
    return [
        "--data", str(shards["train"]), "--val-data", str(shards["test"]),
        "--output", str(output), "--arch", "small", "--low-dim", "16", "--nce-k", "8",
        "--batch-size", "16", "--num-workers", "2", "--num-shards", "2", "--no-progress",
        *extra,
    ]  # fmt: skip


def _env():
    return {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_ADDRESS": "",
        "PYTHONUNBUFFERED": "1",
    }


def _run(args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "trainer.run", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(),
        timeout=timeout,
    )


def _start(args, log: Path):
    fh = log.open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.run", *args],
        stdout=fh,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env=_env(),
        start_new_session=True,
    )


def _wait_for(predicate, proc, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(0.5)
    return False


def _checkpoints(output: Path) -> int:
    return sum(1 for _ in (output / "ray").rglob("meta.json")) if (output / "ray").exists() else 0


def test_cli_end_to_end_two_workers_two_shards(shards, tmp_path):
    out = tmp_path / "run"
    result = _run(_args(shards, out, "--epochs", "2"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2, 2]
    assert records[0]["step"] == 0 and records[0]["features"] == "recomputed"
    # ceil(ceil(64 instances / 2 ranks) / (16 / 2 per rank)) = 4 steps per epoch
    assert [r["step"] for r in records] == [0, 4, 8, 8]
    for r in records[1:3]:
        assert r["features"] == "bank" and r["loss"] > 0 and r["images_per_sec"] > 0
        assert r["skipped"] == 1  # the corrupt image: skipped, counted, reported
    assert (result.stdout + result.stderr).count("skipped 1 corrupt samples") == 2
    for r in records:
        assert 0 <= r["knn_top1"] <= r["knn_top5"] <= 1
    assert records[-1]["features"] == "recomputed"
    # the exported encoder loads into a plain torch model without this project's code
    meta = json.loads((out / "encoder" / "encoder.json").read_text())
    state = torch.load(out / "encoder" / "encoder.pt", weights_only=True)
    assert meta["low_dim"] == 16 and all(isinstance(v, torch.Tensor) for v in state.values())
    assert latest_checkpoint(out) is not None
    assert "npid: final" in result.stdout


def test_eval_every_0_trains_without_evaluation_on_a_local_bank(shards, tmp_path):
    """The benchmark's set-up: one worker, in-process MemoryBank, no kNN evaluation."""
    out = tmp_path / "run"
    extra = ["--epochs", "2", "--eval-every", "0", "--bank", "local", "--num-workers", "1"]
    result = _run(_args(shards, out, *extra))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 4), (2, 8)]  # 64 / 16 per step
    assert all(r["images_per_sec"] > 0 and "knn_top1" not in r for r in records)
    assert (out / "encoder" / "encoder.pt").is_file()


#: gs:// is in the long tier: on the default path s3:// runs the same fsspec path end to end
#: and ``test_object_storage`` reads the index, loaders and checkpoints on both schemes.
@pytest.mark.parametrize("scheme", ["s3", pytest.param("gs", marks=pytest.mark.long)])
def test_a_run_on_object_storage_interrupted_resumes_its_steps_and_metrics(
    shards, tmp_path, request, scheme
):
    """--data/--val-data and --storage-path on s3:// (moto's S3 server) or gs:// (gcsfs
    against gcp-storage-emulator), both on 127.0.0.1: the workers train on the bucket's
    shards, the evaluations read it, Ray Train writes its checkpoints there. The run,
    interrupted as Ctrl-C does (SIGINT) once a checkpoint is in the bucket, is launched again
    with --resume: it finds the newest checkpoint there and continues, every epoch recorded
    once, the step count going on, epoch 0's evaluation not repeated."""
    import fsspec

    request.getfixturevalue({"s3": "s3_server", "gs": "gcs_server"}[scheme])
    run = uuid.uuid4().hex[:8]
    fs = fsspec.filesystem(scheme, skip_instance_cache=True)
    for split in ("train", "test"):
        fs.put(str(shards[split]), f"{scheme}://npid/{run}/{split}", recursive=True)
    remote = {split: f"{scheme}://npid/{run}/{split}" for split in ("train", "test")}
    out = tmp_path / "run"
    args = [
        *_args(remote, out, "--num-workers", "1", "--num-shards", "1"),
        "--storage-path", f"{scheme}://npid/{run}/ray", "--epochs", "4", "--max-failures", "0",
    ]  # fmt: skip

    def checkpoint_in_bucket() -> bool:
        fs.invalidate_cache()
        return fs.exists(f"npid/{run}/ray") and any(
            f.endswith("/meta.json") for f in fs.find(f"npid/{run}/ray")
        )

    proc = _start(args, tmp_path / "first.log")
    try:
        assert _wait_for(checkpoint_in_bucket, proc), (tmp_path / "first.log").read_text()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = read_jsonl(out / "metrics.jsonl")
    done = max(r["epoch"] for r in before)
    assert 1 <= done < 4 or before[-1].get("features") == "recomputed", before
    assert all(0 <= r["knn_top1"] <= r["knn_top5"] <= 1 for r in before if "knn_top1" in r)
    assert before[1]["skipped"] == 1  # the corrupt image, read from the bucket too
    assert _checkpoints(out) == 0  # checkpoints went to the bucket, not under --output
    resumed = _run([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed at epoch" in resumed.stdout + resumed.stderr
    records = read_jsonl(out / "metrics.jsonl")
    final = [r for r in records if r.get("features") == "recomputed" and r["epoch"] > 0]
    epochs = [r["epoch"] for r in records if r not in final]
    assert epochs == sorted(epochs) and epochs[-1] == 4, epochs
    assert epochs.count(0) == 1  # the epoch-0 evaluation is not repeated
    trained = [r for r in records if r.get("loss") is not None]
    assert [r["epoch"] for r in trained] == list(range(1, 5))  # each epoch once
    assert [r["step"] for r in trained] == [4 * r["epoch"] for r in trained]  # 64 / 16


def test_killed_worker_restarts_from_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    proc = _start(_args(shards, out, "--epochs", "6", "--max-failures", "2"), tmp_path / "run.log")
    killed = False
    try:
        assert _wait_for(lambda: _checkpoints(out) >= 1, proc)
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "RayTrainWorker" in cmd and p.pid != os.getpid():
                try:
                    if any(a.pid == proc.pid for a in p.parents()):
                        p.kill()
                        killed = True
                        break
                except psutil.NoSuchProcess:
                    continue
        assert killed, "no training worker found to kill"
        assert proc.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    records = read_jsonl(out / "metrics.jsonl")
    trained = [r for r in records if r.get("loss") is not None]
    assert trained[-1]["epoch"] == 6
    per_epoch = trained[0]["step"] // trained[0]["epoch"]
    assert trained[-1]["step"] == 6 * per_epoch
    assert "resumed at epoch" in (tmp_path / "run.log").read_text()


def test_store_of_another_dim_or_too_few_rows_is_rejected(shards, tmp_path, ray_cluster, capsys):
    from featurestore.store import ShardedStore
    from trainer.run import main

    for name, rows, dim, message in (
        ("e2e-small-store", 10, 16, "has 10 rows"),
        ("e2e-dim-store", 64, 8, "has dim 8"),
    ):
        store = ShardedStore(num_rows=rows, dim=dim, num_shards=1, name=name)
        try:
            assert main(_args(shards, tmp_path / name, "--store-name", name)) == 2
            assert message in capsys.readouterr().err
        finally:
            store.shutdown()


def test_cli_errors_for_missing_store_print_one_line(shards, tmp_path, capsys, ray_cluster):
    from trainer.run import main

    assert main(_args(shards, tmp_path / "y", "--store-name", "missing-store-xyz")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing-store-xyz" in err[0]
