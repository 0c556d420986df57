"""knn_service.linear and linear_probe: the linear evaluation matches scikit-learn on the same
features, the L2 strength is chosen on a stratified, seeded held-out part of the training
set only, the command runs end to end on the built-in data, and bad input exits 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from generated_images import unlabelled_shards

from knn_service import linear, linear_probe
from knn_service.cli import run
from knn_service.linear_probe import (
    L2_GRID,
    fit_linear,
    select_and_fit,
    stratified_holdout,
    topk_accuracy,
)
from trainer.api import dataset_location
from trainer.checkpoints import TrainState, save_checkpoint
from trainer.config import TrainConfig
from trainer.model.encoders import EncoderConfig, build_encoder, pooled_trunk
from trainer.model.export import export_encoder

REPO = Path(__file__).resolve().parent.parent
DIM = 16


# --------------------------------------------------------------------------- the classifier


@pytest.fixture(scope="module")
def digits_features() -> tuple[torch.Tensor, ...]:
    """scikit-learn's 8x8 digits as features: ``(x_train, y_train, x_val, y_val)``."""
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x = torch.tensor(x[order], dtype=torch.float32)
    y = torch.tensor(y[order])
    return x[:1200], y[:1200], x[1200:], y[1200:]


def _sklearn_top1(estimator, x_train, y_train, x_val, y_val) -> float:
    mean, std = x_train.mean(0), x_train.std(0, unbiased=False).clamp_min(1e-6)
    estimator.fit(((x_train - mean) / std).numpy(), y_train.numpy())
    return float(estimator.score(((x_val - mean) / std).numpy(), y_val.numpy()))


@pytest.mark.parametrize("l2", [1e-3, 1e-2])
def test_logistic_regression_matches_sklearn(digits_features, l2) -> None:
    from sklearn.linear_model import LogisticRegression

    x_train, y_train, x_val, y_val = digits_features
    ours = fit_linear(x_train, y_train, 10, l2, "logistic")
    top1 = topk_accuracy(ours.scores(x_val), y_val, (1,))[1]
    sk = LogisticRegression(C=1 / (l2 * len(x_train)), max_iter=1000, tol=1e-5)
    assert abs(top1 - _sklearn_top1(sk, x_train, y_train, x_val, y_val)) <= 0.01


def test_the_whole_linear_evaluation_is_within_a_point_of_sklearn(digits_features) -> None:
    from sklearn.linear_model import LogisticRegression

    x_train, y_train, x_val, y_val = digits_features
    probe = select_and_fit(x_train, y_train, 10, "logistic", seed=0)
    top1 = topk_accuracy(probe.classifier.scores(x_val), y_val, (1,))[1]
    sk = LogisticRegression(C=1 / (probe.l2 * len(x_train)), max_iter=1000, tol=1e-5)
    assert top1 > 0.9
    assert abs(top1 - _sklearn_top1(sk, x_train, y_train, x_val, y_val)) <= 0.01


def test_linear_svm_is_close_to_sklearns_linear_svc(digits_features) -> None:
    from sklearn.svm import LinearSVC

    x_train, y_train, x_val, y_val = digits_features
    l2 = 1e-2
    ours = fit_linear(x_train, y_train, 10, l2, "svm")
    top1 = topk_accuracy(ours.scores(x_val), y_val, (1,))[1]
    sk = LinearSVC(C=1 / (l2 * len(x_train)), max_iter=20000)  # also penalizes the bias
    assert abs(top1 - _sklearn_top1(sk, x_train, y_train, x_val, y_val)) <= 0.02


def test_topk_accuracy_caps_k_at_the_classes() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    assert topk_accuracy(scores, torch.tensor([1, 2]), (1, 2, 5)) == {1: 0.5, 2: 0.5, 5: 1.0}


def test_fit_linear_rejects_bad_input() -> None:
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="unknown loss"):
        fit_linear(x, y, 3, 1e-3, "hinge")
    with pytest.raises(ValueError, match="labels must lie"):
        fit_linear(x, y, 2, 1e-3)
    with pytest.raises(ValueError, match=r"x \[N, D\]"):
        fit_linear(x, y[:5], 3, 1e-3)


# --------------------------------------------------------------------------- the held-out split


def test_the_held_out_split_is_stratified_seeded_and_a_partition() -> None:
    labels = torch.tensor([0] * 100 + [1] * 50 + [2] * 20 + [3] * 1)[torch.randperm(171)]
    fit, held = stratified_holdout(labels, 0.1, seed=3)
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(171))
    assert torch.bincount(labels[held], minlength=4).tolist() == [10, 5, 2, 0]  # 1-row class kept
    again = stratified_holdout(labels, 0.1, seed=3)
    assert torch.equal(again[1], held) and torch.equal(again[0], fit)
    assert not torch.equal(stratified_holdout(labels, 0.1, seed=4)[1], held)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        stratified_holdout(labels, 1.0, seed=0)
    with pytest.raises(ValueError, match="no row out"):
        stratified_holdout(torch.tensor([0, 1, 2]), 0.1, seed=0)


def test_the_strength_is_the_best_on_the_held_out_rows(digits_features) -> None:
    x_train, y_train, _, _ = digits_features
    probe = select_and_fit(x_train, y_train, 10, grid=(1e-4, 1e-1), holdout_fraction=0.2, seed=1)
    assert set(probe.holdout_top1) == {1e-4, 1e-1}
    assert probe.holdout_top1[probe.l2] == max(probe.holdout_top1.values())
    assert (probe.num_fit, probe.num_holdout) == (960, 240)
    assert probe.classifier.l2 == probe.l2  # refitted on every training row


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> dict:
    """A freshly initialized small encoder (d=16) exported for the built-in digits data."""
    root = tmp_path_factory.mktemp("linear")
    torch.manual_seed(0)
    model = build_encoder("small", DIM).eval()
    metadata = {"preset": "digits", "image_size": 32}
    export_encoder(model, EncoderConfig("small", DIM), root / "encoder", metadata=metadata)
    return {"root": root, "model": model, "train": dataset_location("digits", "train")}


def _linear(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = run(linear.PROG, linear.main, argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _argv(run_dir: dict, *extra: str, checkpoint: str | None = None, **data: str) -> list[str]:
    return [
        "--checkpoint", checkpoint or str(run_dir["root"] / "encoder"),
        "--train-data", data.get("train", "digits"),
        "--val-data", data.get("val", "digits"),
        "--batch-size", "512",
        *extra,
    ]  # fmt: skip


def test_the_command_end_to_end_on_the_built_in_data(digits_run) -> None:
    """The real ``python -m knn_service.linear``: one JSON line last on stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "knn_service.linear", *_argv(digits_run)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (record["num_train"], record["num_val"], record["num_classes"]) == (1437, 360, 10)
    assert (record["features"], record["dim"], record["classifier"]) == (
        "embedding",
        DIM,
        "logistic",
    )
    assert (
        record["num_fit"] + record["num_holdout"] == 1437 and abs(record["num_holdout"] - 144) <= 5
    )
    assert [h["l2"] for h in record["holdout"]] == list(L2_GRID)
    assert record["l2"] in L2_GRID
    assert 0.5 < record["top1"] <= record["top5"] <= 1.0  # random conv features separate digits
    assert record["seconds"]["total"] > 0


def test_pooled_features_are_those_before_the_head(digits_run, capsys, monkeypatch) -> None:
    seen = {}
    real = linear_probe.select_and_fit

    def spy(x, y, *args, **kwargs):
        seen["rows"], seen["dim"] = x.shape
        return real(x, y, *args, **kwargs)

    monkeypatch.setattr(linear_probe, "select_and_fit", spy)
    code, out, err = _linear(_argv(digits_run, "--features", "pooled", "--seed", "5"), capsys)
    assert code == 0, err
    record = json.loads(out.strip().splitlines()[-1])
    trunk, width = pooled_trunk(digits_run["model"])
    assert record["features"] == "pooled" and record["dim"] == width == 128
    assert seen == {"rows": 1437, "dim": 128}  # the classifier sees train rows only, never val
    assert record["seed"] == 5 and record["top1"] > 0.5
    image = torch.randn(2, 3, 32, 32)
    head = torch.nn.Sequential(*list(digits_run["model"])[-2:])  # Linear, BatchNorm1d
    expected = torch.nn.functional.normalize(head(trunk(image)), dim=1)
    torch.testing.assert_close(digits_run["model"](image), expected)


def test_the_resnet18_trunk_gives_the_512_features_its_head_reads() -> None:
    torch.manual_seed(0)
    model = build_encoder("resnet18", DIM, cifar_stem=True).eval()
    trunk, width = pooled_trunk(model)
    image = torch.randn(2, 3, 32, 32)
    pooled = trunk(image)
    assert width == 512 and pooled.shape == (2, 512) and not trunk.training
    expected = torch.nn.functional.normalize(model.fc(pooled), dim=1)
    torch.testing.assert_close(model(image), expected)
    with pytest.raises(ValueError, match="no pooled features"):
        pooled_trunk(torch.nn.Linear(3, 4))


def _checkpoint_of_another_arch(run_dir: dict) -> str:
    """A training checkpoint whose config says small-wide but holds small weights."""
    config = TrainConfig(arch="small-wide", low_dim=DIM)
    state = TrainState(
        model=run_dir["model"].state_dict(), optimizer={}, epoch=1, step=1, store_snapshot=None
    )
    return str(save_checkpoint(run_dir["root"] / "wide-ckpt", state, config.to_dict()))


@pytest.mark.parametrize(
    "case,needle",
    [
        ("missing checkpoint", "--checkpoint /nonexistent/run"),
        ("checkpoint of another arch", "weights do not fit"),
        ("train data without labels", "12 of its 12 images have no label (-1)"),
        ("val data without labels", "--val-data"),
        ("missing val data", "--val-data /nonexistent/val"),
        ("bad features", "--features: invalid choice: 'logits'"),
        ("bad classifier", "--classifier"),
        ("holdout fraction 1", "--holdout-fraction: must lie in (0, 1)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(digits_run, capsys, case, needle) -> None:
    argv = {
        "missing checkpoint": lambda: _argv(digits_run, checkpoint="/nonexistent/run"),
        "checkpoint of another arch": lambda: _argv(
            digits_run, checkpoint=_checkpoint_of_another_arch(digits_run)
        ),
        "train data without labels": lambda: _argv(
            digits_run, train=unlabelled_shards(digits_run["root"] / "t")
        ),
        "val data without labels": lambda: _argv(
            digits_run, val=unlabelled_shards(digits_run["root"] / "v")
        ),
        "missing val data": lambda: _argv(digits_run, val="/nonexistent/val"),
        "bad features": lambda: _argv(digits_run, "--features", "logits"),
        "bad classifier": lambda: _argv(digits_run, "--classifier", "tree"),
        "holdout fraction 1": lambda: _argv(digits_run, "--holdout-fraction", "1"),
    }[case]()
    code, out, err = _linear(argv, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{linear.PROG}: ") and needle in err, err


def test_help_does_not_load_torch() -> None:
    code = "import sys, knn_service.linear; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "False", result.stderr
