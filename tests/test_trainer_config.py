"""Trainer configuration, planning and the CLI's bad-input handling (no Ray needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from featurestore import NCE, SampledSoftmax, Softmax
from trainer.checkpoints import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from trainer.config import ConfigError, TrainConfig
from trainer.flags import parse_config
from trainer.loop import learning_rate
from trainer.metrics import append_jsonl, read_jsonl, truncate_jsonl_after
from trainer.model.encoders import EncoderConfig
from trainer.plan import SOFTMAX_AUTO_MAX_ROWS, RunPlan, make_plan, resolve_objective
from trainer.shards.make import make_shards

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """Generated digits-like shards: 60 train and 20 test images of 3 classes."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for split, n in (("train", 60), ("test", 20)):
        src = root / f"src-{split}"
        rng = np.random.default_rng(0 if split == "train" else 1)
        for i in range(n):
            cls = f"c{i % 3}"
            (src / cls).mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(src / cls / f"{i:03d}.png")
        make_shards(src, root / split, shard_size=25, progress=False)
        out[split] = root / split
    return out


def test_defaults_mirror_the_reference():
    cfg = parse_config([])
    reference = (cfg.resolved_nce_k, cfg.nce_t, cfg.nce_m, cfg.low_dim, cfg.lr)
    assert reference == (4096, 0.07, 0.5, 128, 0.03)
    assert cfg.nce_k is None  # not given: auto stays auto
    assert (cfg.momentum, cfg.weight_decay) == (0.9, 5e-4)
    assert cfg.builtin and cfg.resolved_arch == "small" and cfg.resolved_epochs == 40
    assert (cfg.num_workers, cfg.num_shards) == (1, 1)  # one shard holds any bank one device fits
    other = parse_config(["--data", "/x", "--batch-size", "512"])
    assert other.resolved_arch == "small-wide" and other.resolved_epochs == 200  # on a CPU
    assert parse_config(["--data", "/x", "--use-gpu"]).resolved_arch == "resnet18"
    assert (
        other.resolved_batch_size == 512
        and parse_config(["--data", "/x"]).resolved_batch_size == 256
    )


def test_yaml_config_and_flag_precedence(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("nce-k: 100\nlr: 0.1\nobjective: sampled-softmax\n")
    cfg = parse_config(["--config", str(file), "--lr", "0.2"])
    assert (cfg.nce_k, cfg.lr, cfg.objective) == (100, 0.2, "sampled-softmax")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "-1"], "--lr must be > 0"),
        (["--nce-m", "2"], "--nce-m must be in"),
        (["--batch-size", "10", "--num-workers", "3"], "not divisible"),
        (["--num-shards", "0"], "--num-shards must be > 0"),
        (["--eval-every", "-1"], "--eval-every must be >= 0"),  # 0 = never evaluate
        (["--objective", "sampled-softmax", "--nce-k", "0"], "needs --nce-k"),
        (["--bank", "local", "--num-workers", "2"], "--num-workers 1"),
        (["--config", "/nonexistent.yaml"], "no such file"),
    ],
)
def test_impossible_values_are_config_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)


def test_unknown_yaml_key(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("nce_kk: 3\n")
    with pytest.raises(ConfigError, match="unknown config key"):
        parse_config(["--config", str(file)])


def test_objective_resolution():
    cfg = parse_config([])
    assert isinstance(resolve_objective(cfg, 1437), Softmax)  # built-in: auto, N small
    ema = NCE(num_negatives=100, z_momentum=0.99)
    assert resolve_objective(parse_config(["--nce-k", "100"]), 1437) == ema
    fixed = parse_config(["--nce-k", "100", "--nce-z", "fixed"])
    assert resolve_objective(fixed, 1437) == NCE(num_negatives=100)
    assert isinstance(resolve_objective(parse_config(["--nce-k", "0"]), 10**6), Softmax)
    sampled = resolve_objective(parse_config(["--objective", "sampled-softmax"]), 10**6)
    assert sampled == SampledSoftmax(num_negatives=4096)
    with pytest.raises(ConfigError, match="smaller than the 1437"):
        resolve_objective(parse_config(["--nce-k", "5000"]), 1437)
    # The default K on a dataset smaller than K: the exact softmax (one log line), on any data.
    small = parse_config(["--data", "/x", "--objective", "nce"])
    assert isinstance(resolve_objective(small, 1000), Softmax)
    assert isinstance(resolve_objective(parse_config(["--objective", "nce"]), 1437), Softmax)


def test_objective_auto_is_the_exact_softmax_up_to_a_size_then_sampled():
    auto = parse_config(["--data", "/x"])
    assert isinstance(resolve_objective(auto, 50_000), Softmax)
    assert isinstance(resolve_objective(auto, SOFTMAX_AUTO_MAX_ROWS), Softmax)
    above = resolve_objective(auto, SOFTMAX_AUTO_MAX_ROWS + 1)
    assert above == SampledSoftmax(num_negatives=4096)
    assert resolve_objective(parse_config(["--data", "/x", "--objective", "nce"]), 50_000) == NCE(
        num_negatives=4096, z_momentum=0.99
    )


def test_learning_rate_schedules():
    cfg = parse_config([])
    assert [learning_rate(cfg, e, 10) for e in (0, 3, 4, 6, 8)] == pytest.approx(
        [0.03, 0.03, 0.003, 0.0003, 0.00003]
    )
    cos = parse_config(["--schedule", "cosine"])
    assert learning_rate(cos, 0, 10) == pytest.approx(0.03)
    assert learning_rate(cos, 5, 10) == pytest.approx(0.015)


def test_plan_resolves_data(tiny_shards, tmp_path):
    cfg = parse_config(
        [
            "--data",
            str(tiny_shards["train"]),
            "--val-data",
            str(tiny_shards["test"]),
            "--nce-k",
            "10",
            "--output",
            str(tmp_path),
        ]
    )
    plan = make_plan(cfg)
    assert (plan.num_rows, plan.num_classes, plan.preset) == (60, 3, "cifar")
    assert plan.objective["kind"] == "nce" and plan.create_store
    # the encoder is resolved once, into the plan: the arch and the stem the preset asks for
    encoder = plan.encoder_config()
    assert encoder == EncoderConfig.for_preset(plan.arch, 128, "cifar")
    assert plan.encoder == encoder.to_dict() == RunPlan.from_dict(plan.to_dict()).encoder


def test_the_store_a_run_creates_is_its_bank_component(tiny_shards, tmp_path):
    from trainer.launch.driver import store_config

    flags = ["--num-shards", "2", "--nce-m", "0.3", "--store-dtype", "bfloat16",
             "--store-threads", "3", "--seed", "7", "--low-dim", "16"]  # fmt: skip
    cfg = parse_config(["--data", str(tiny_shards["train"]), "--output", str(tmp_path), *flags])
    plan = make_plan(cfg)
    config = store_config(cfg, plan)
    got = (
        config.num_rows,
        config.dim,
        config.num_shards,
        config.momentum,
        config.seed,
        config.dtype,
        config.threads_per_shard,
        config.name,
        config.num_gpus_per_shard,
    )
    assert got == (60, 16, 2, 0.3, 7, "bfloat16", 3, plan.store_name, 0)
    assert config.snapshot_dir == str(tmp_path / "snapshots")


def test_augment_preset_follows_the_data_unless_chosen(tiny_shards, tmp_path):
    base = ["--data", str(tiny_shards["train"]), "--output", str(tmp_path)]
    assert make_plan(parse_config(base)).preset == "cifar"  # 16-px images
    assert make_plan(parse_config([*base, "--augment", "digits"])).preset == "digits"
    file = tmp_path / "c.yaml"
    file.write_text("augment: mnist\n")
    with pytest.raises(ConfigError, match="--augment must be one of auto, digits"):
        parse_config(["--config", str(file)])


def test_plan_rejects_bad_data(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        make_plan(parse_config(["--data", str(tmp_path / "missing")]))
    with pytest.raises(ConfigError, match=r"no index\.parquet"):
        make_plan(parse_config(["--data", str(tmp_path)]))


def test_resume_needs_a_matching_checkpoint(tiny_shards, tmp_path):
    argv = ["--data", str(tiny_shards["train"]), "--nce-k", "10", "--output", str(tmp_path)]
    with pytest.raises(ConfigError, match="no checkpoint"):
        make_plan(parse_config([*argv, "--resume"]))
    state = TrainState({}, {}, epoch=1, step=5, store_snapshot="file:///snapshots/step-5")
    save_checkpoint(tmp_path / "ck", state, parse_config(argv).to_dict())
    plan = make_plan(parse_config([*argv, "--resume"]))
    assert plan.resume_from == str(tmp_path / "ck")
    with pytest.raises(ConfigError, match="another config"):
        make_plan(
            parse_config([*argv[:-2], "--output", str(tmp_path), "--low-dim", "64", "--resume"])
        )


def test_resume_needs_the_bank_of_its_kind_in_the_checkpoint(tiny_shards, tmp_path):
    argv = ["--data", str(tiny_shards["train"]), "--nce-k", "10", "--output", str(tmp_path)]
    save_checkpoint(tmp_path / "ck", TrainState({}, {}, 1, 5, None), parse_config(argv).to_dict())
    with pytest.raises(ConfigError, match="names no store snapshot to restore"):
        make_plan(parse_config([*argv, "--resume"]))
    local = [*argv, "--launcher", "local"]
    save_checkpoint(tmp_path / "ck", TrainState({}, {}, 1, 5, None), parse_config(local).to_dict())
    with pytest.raises(ConfigError, match="holds no in-process bank to restore"):
        make_plan(parse_config([*local, "--resume"]))


def test_resume_takes_the_newest_of_output_and_storage_path(tiny_shards, tmp_path):
    storage = tmp_path / "elsewhere"
    argv = ["--data", str(tiny_shards["train"]), "--nce-k", "10", "--output", str(tmp_path / "o")]
    argv += ["--storage-path", str(storage)]
    config = parse_config(argv).to_dict()
    for root, step in ((tmp_path / "o" / "ray" / "a", 4), (storage / "b", 8)):
        state = TrainState({}, {}, epoch=step // 4, step=step, store_snapshot="file:///s")
        save_checkpoint(root, state, config)
    assert make_plan(parse_config([*argv, "--resume"])).resume_from == str(storage / "b")
    empty = ["--data", str(tiny_shards["train"]), "--nce-k", "10", "--resume"]
    empty += ["--output", str(tmp_path / "x"), "--storage-path", str(tmp_path / "none")]
    with pytest.raises(ConfigError, match=f"no checkpoint under .* or {tmp_path / 'none'}"):
        make_plan(parse_config(empty))


def test_checkpoint_roundtrip_and_latest(tmp_path):
    import torch

    for step in (3, 9, 6):
        state = TrainState({"w": torch.ones(2) * step}, {}, 1, step, f"snap-{step}", {"epoch": 1})
        save_checkpoint(tmp_path / f"c{step}", state, {"seed": step})
    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "c9"
    state, config = load_checkpoint(latest)
    assert state.step == 9 and state.store_snapshot == "snap-9" and config == {"seed": 9}
    assert torch.equal(state.model["w"], torch.ones(2) * 9)
    (tmp_path / "c9" / "meta.json").unlink()  # incomplete: no commit point
    assert latest_checkpoint(tmp_path) == tmp_path / "c6"
    with pytest.raises(FileNotFoundError, match="not a complete npid checkpoint"):
        load_checkpoint(tmp_path / "c9")


def test_metrics_jsonl_append_and_truncate(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    for step in (0, 5, 10):
        append_jsonl(path, {"epoch": step // 5, "step": step})
    truncate_jsonl_after(path, 5)
    assert [r["step"] for r in read_jsonl(path)] == [0, 5]


def test_a_run_resumed_from_its_last_checkpoint_writes_its_final_evaluation_once(tmp_path):
    """Stopped during its final evaluation (after the last checkpoint), a run resumed with
    --resume evaluates again: the first final record goes, the epoch-0 one stays."""
    path = tmp_path / "metrics.jsonl"
    final = {"features": "recomputed", "loss": None, "images_per_sec": None}
    records = [
        {"epoch": 0, "step": 0, **final},
        {"epoch": 1, "step": 5, "loss": 2.0},
        {"epoch": 2, "step": 10, "loss": 1.5},
        {"epoch": 2, "step": 10, **final},
    ]
    for record in records:
        append_jsonl(path, record)
    truncate_jsonl_after(path, 10)
    assert [(r["epoch"], r["loss"]) for r in read_jsonl(path)] == [(0, None), (1, 2.0), (2, 1.5)]


def _cli(*argv: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "trainer.run", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "/nonexistent/shards"], "no such directory"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--nce-k", "5000"], "--nce-k 5000 must be smaller"),
        (["--objective", "nope"], "invalid choice"),
    ],
)
def test_cli_bad_input_one_line_exit_2(argv, message, tmp_path):
    result = _cli(*argv, "--output", str(tmp_path), env_extra={"NPID_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert message in lines[-1]


def test_cli_folder_without_shards(tmp_path):
    result = _cli("--data", str(tmp_path), "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no index.parquet" in result.stderr


def _other_loop(loop_config: dict) -> None:
    """A worker loop other than the trainer's (never run here)."""


def test_build_trainer_runs_the_given_loop_with_extra_config(tiny_shards, tmp_path):
    from trainer.launch.driver import build_trainer
    from trainer.loop import train_loop_per_worker

    cfg = parse_config(
        ["--data", str(tiny_shards["train"]), "--nce-k", "0", "--output", str(tmp_path)]
    )
    plan = make_plan(cfg)
    default = build_trainer(cfg, plan)
    assert default.train_loop_per_worker is train_loop_per_worker
    assert set(default.train_loop_config) == {"config", "plan", "terminal", "ray_log_level"}
    other = build_trainer(cfg, plan, _other_loop, {"rounds": 3})
    assert other.train_loop_per_worker is _other_loop
    assert other.train_loop_config["rounds"] == 3
    assert other.train_loop_config["plan"] == plan.to_dict()
