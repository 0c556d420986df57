"""The GPU path's habits, exercised on the CPU where the code path exists there: fused SGD,
bf16 autocast with float32 bank math, channels_last evaluation, ``--compile``, and the
flags that choose them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from generated_images import colour_class_folder

from trainer.checkpoints import latest_checkpoint, load_checkpoint
from trainer.config import ConfigError, TrainConfig
from trainer.evaluation import extract_features
from trainer.flags import parse_config
from trainer.metrics import read_jsonl
from trainer.model.encoders import EncoderConfig, build_encoder
from trainer.shards.make import make_shards
from trainer.worker import build_optimizer

REPO = Path(__file__).resolve().parent.parent


def _encoder(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_encoder(**EncoderConfig.for_preset("small", 16, "digits").to_dict())


def test_the_optimizer_is_fused_sgd_and_steps_like_the_reference():
    cfg = TrainConfig(lr=0.1, momentum=0.9, weight_decay=5e-4)
    fused_model, plain_model = _encoder(), _encoder()
    fused = build_optimizer(fused_model, cfg)
    assert fused.defaults["fused"] is True
    plain = torch.optim.SGD(plain_model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(8, 3, 32, 32, generator=gen)
        for model, opt in ((fused_model, fused), (plain_model, plain)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_features_match_float32_and_come_back_float32():
    model = _encoder().to(memory_format=torch.channels_last)
    x = torch.rand(64, 3, 32, 32)
    batches = [(x[:32], torch.arange(32), None), (x[32:], torch.arange(32, 64), None)]
    ref, seen = extract_features(model, batches, 64, 16, torch.device("cpu"))
    got, _ = extract_features(model, batches, 64, 16, torch.device("cpu"), autocast=True)
    assert seen.all() and got.dtype == torch.float32
    assert not torch.equal(ref, got)  # bf16 really ran
    assert F.cosine_similarity(ref, got).min() > 0.99


def test_precision_flag_and_its_default():
    assert not TrainConfig().autocast  # auto on a CPU: float32
    assert TrainConfig(use_gpu=True).autocast  # auto on a GPU: bf16
    assert TrainConfig(precision="bf16").autocast
    assert not TrainConfig(use_gpu=True, precision="fp32").autocast
    assert parse_config(["--precision", "bf16", "--compile"]).compile
    with pytest.raises(ConfigError, match="--precision must be one of auto, bf16, fp32"):
        TrainConfig(precision="fp16")


def test_bad_precision_on_the_command_line_is_one_line_and_exit_2():
    result = subprocess.run(
        [sys.executable, "-m", "trainer.run", "--precision", "fp8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--precision: invalid choice: 'fp8'" in result.stderr


def test_compiled_bf16_training_runs_and_checkpoints_the_plain_module(tmp_path):
    src = colour_class_folder(tmp_path / "src", 64, seed=0)
    make_shards(src, tmp_path / "shards", shard_size=40, progress=False)
    out = tmp_path / "run"
    args = [
        "--launcher", "local", "--data", str(tmp_path / "shards"), "--output", str(out),
        "--arch", "small", "--low-dim", "16", "--batch-size", "16", "--epochs", "2",
        "--nce-k", "0", "--no-progress", "--precision", "bf16", "--compile",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "trainer.run", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r.get("loss") is not None]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    state, _ = load_checkpoint(latest_checkpoint(out))
    assert not any(k.startswith("_orig_mod") for k in state.model)  # loadable without compile
    _encoder().load_state_dict(state.model)
