"""``--objective parametric``: the paper's baseline (Table 1, first row), a learned N-way
classifier over instance ids instead of a memory bank. Its loss is plain cross-entropy over
``v @ Wᵀ``; it keeps no bank (no store, every evaluation recomputed); checkpoints carry the
classifier so ``--resume`` continues it, and the exported encoder never includes it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from generated_images import colour_shards
from without_ray import no_ray_program

from featurestore.objectives import Softmax
from trainer.checkpoints import latest_checkpoint, load_checkpoint
from trainer.config import ConfigError
from trainer.experiments.parametric import InstanceClassifier, Parametric, ParametricHead, with_head
from trainer.flags import parse_config
from trainer.metrics import read_jsonl
from trainer.model.encoders import EncoderConfig, build_encoder
from trainer.plan import resolve_objective

REPO = Path(__file__).resolve().parent.parent
#: Runs the CLI with every ``import ray`` failing, so the local path provably avoids Ray.
NO_RAY = no_ray_program("trainer.run")


def test_head_loss_is_cross_entropy_over_instance_ids_exactly():
    torch.manual_seed(0)
    head = ParametricHead(num_instances=50, dim=8)
    feats = F.normalize(torch.randn(6, 8), dim=1).requires_grad_()
    ids = torch.tensor([0, 3, 49, 7, 3, 11])
    loss = head(feats, ids)
    reference = F.cross_entropy(feats @ head.weight.T, ids)
    assert torch.equal(loss, reference)
    loss.backward()
    # ∂loss/∂W = (softmax − onehot)ᵀ v / B
    p = torch.softmax(feats.detach() @ head.weight.detach().T, dim=1)
    p[torch.arange(6), ids] -= 1
    torch.testing.assert_close(head.weight.grad, p.T @ feats.detach() / 6)


def test_head_temperature_divides_the_logits_and_bad_shapes_are_refused():
    head = ParametricHead(10, 4, temperature=0.5)
    feats, ids = torch.randn(3, 4), torch.tensor([1, 2, 3])
    assert torch.equal(head(feats, ids), F.cross_entropy(feats @ head.weight.T / 0.5, ids))
    with pytest.raises(ValueError, match="feats must be"):
        head(torch.randn(3, 5), ids)


def test_the_classifier_wraps_the_encoder_only_for_the_parametric_objective():
    encoder = build_encoder(**EncoderConfig.for_preset("small", 16, "digits").to_dict())
    assert with_head(encoder, Softmax().to_dict(), 100, 16) is encoder
    model = with_head(encoder, Parametric().to_dict(), 100, 16)
    assert isinstance(model, InstanceClassifier) and model.encoder is encoder
    assert tuple(model.head.weight.shape) == (100, 16)
    feats, loss = model(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 99]))
    assert feats.shape == (4, 16) and loss.dim() == 0
    assert torch.allclose(feats.norm(dim=1), torch.ones(4), atol=1e-5)  # unit embeddings


def test_config_keeps_no_bank_and_refuses_bank_settings():
    cfg = parse_config(["--objective", "parametric", "--nce-k", "0"])
    assert cfg.resolved_bank == "none" and cfg.objective_kind == "parametric"
    assert parse_config(["--objective", "parametric", "--launcher", "local"]).resolved_bank == (
        "none"
    )
    assert resolve_objective(cfg, 1437) == Parametric()
    for extra, says in (
        (["--store-name", "bank"], "drop --store-name"),
        (["--num-shards", "2"], "drop --num-shards"),
        (["--prox-lambda", "0.1"], "needs a memory bank"),
    ):
        with pytest.raises(ConfigError, match=says):
            parse_config(["--objective", "parametric", *extra])


def _cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


@pytest.mark.slow
def test_local_run_on_digits_recomputes_every_evaluation_exports_without_head_and_resumes(
    tmp_path,
):
    out = tmp_path / "run"
    base = ["--objective", "parametric", "--launcher", "local", "--output", str(out),
            "--no-progress"]  # fmt: skip
    first = _cli("-c", NO_RAY, *base, "--epochs", "2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert [(r["epoch"], r["step"]) for r in records] == [(0, 0), (1, 12), (2, 24), (2, 24)]
    assert all(r["features"] == "recomputed" for r in records)
    assert all(0 <= r["knn_top1"] <= r["knn_top5"] <= 1 for r in records)
    assert records[1]["loss"] > 0
    assert not (out / "snapshots").exists()  # no bank, no store
    # the exported encoder is the bare encoder: the 1437x128 classifier stays out
    exported = torch.load(out / "encoder" / "encoder.pt", weights_only=True)
    bare = build_encoder(**EncoderConfig.for_preset("small", 128, "digits").to_dict())
    assert list(exported) == list(bare.state_dict())
    state, config = load_checkpoint(latest_checkpoint(out))
    assert config["objective"] == "parametric" and state.bank is None
    assert state.store_snapshot is None and list(state.model) == list(bare.state_dict())
    assert tuple(state.head["weight"].shape) == (1437, 128)

    refused = _cli("-m", "trainer.run", *base, "--epochs", "3", "--resume", "--objective", "nce")
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "objective: 'nce' != 'parametric'" in lines[0], lines

    resumed = _cli("-c", NO_RAY, *base, "--epochs", "3", "--resume", "--eval-every", "0")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed at epoch 2" in resumed.stdout + resumed.stderr
    last = read_jsonl(out / "metrics.jsonl")[-1]
    assert (last["epoch"], last["step"]) == (3, 36) and last["loss"] > 0
    state, _ = load_checkpoint(latest_checkpoint(out))
    assert state.epoch == 3 and state.head is not None


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """48 train and 16 test 16×16 images of 4 colour classes."""
    return colour_shards(tmp_path_factory.mktemp("parametric"), 48, 16, shard_size=40)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_two_workers_share_the_classifier_and_create_no_store(shards, tmp_path):
    out = tmp_path / "run"
    ray_tmp = Path(tempfile.mkdtemp(prefix="npid-ray-", dir="/tmp"))  # short: socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # a new local Ray in a private temp dir, never another test's or engineer's instance
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "trainer.run", "--objective", "parametric",
             "--data", str(shards["train"]), "--val-data", str(shards["test"]),
             "--output", str(out), "--arch", "small", "--low-dim", "16", "--batch-size", "16",
             "--num-workers", "2", "--epochs", "1", "--no-progress"],
            capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = read_jsonl(out / "metrics.jsonl")
    # ceil(ceil(48 / 2 ranks) / (16 / 2 per rank)) = 3 steps
    assert [(r["epoch"], r["step"]) for r in records] == [(0, 0), (1, 3), (1, 3)]
    assert all(r["features"] == "recomputed" for r in records)
    assert not (out / "snapshots").exists()  # no store: its snapshots would be here
    state, _ = load_checkpoint(latest_checkpoint(out))
    assert tuple(state.head["weight"].shape) == (48, 16)
