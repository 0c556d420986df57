"""``python -m trainer.finetune``: the paper's semi-supervised experiment (Fig. 6). The label
sample (class-balanced, seeded, labelled ids only, disjoint from validation), the classifier's
start (imprinted class means) and its scoring against plain references, the pretrained
features' head start over random ones, the command end to end through Ray Train, and bad
input as one line with exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from generated_images import colour_class_folder, unlabelled_shards
from without_ray import no_ray_program

from trainer.checkpoints import TrainState, save_checkpoint
from trainer.config import TrainConfig
from trainer.experiments import finetune
from trainer.experiments.finetune_loop import TEMPERATURE, FinetuneNet, accuracy
from trainer.model.encoders import EncoderConfig, build_encoder
from trainer.shards.make import make_shards

REPO = Path(__file__).resolve().parent.parent
#: The command with every ``import ray`` failing: ``--launcher local`` provably avoids Ray.
NO_RAY = no_ray_program("trainer.finetune")


def _cli(*argv: str, ray: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    head = ["-m", "trainer.finetune"] if ray else ["-c", NO_RAY]
    return subprocess.run(
        [sys.executable, *head, *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _last_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the label sample


def test_the_label_sample_is_class_balanced_seeded_and_only_labelled():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=1000)
    labels[rng.random(1000) < 0.2] = -1  # a fifth without a label
    ids = finetune.label_sample(labels, 0.1, seed=3)
    assert np.all(np.diff(ids) > 0) and np.all(labels[ids] >= 0)
    counts = np.bincount(labels[ids], minlength=5)
    expected = [int(0.1 * int((labels == c).sum()) + 0.5) for c in range(5)]  # half up
    assert counts.tolist() == expected
    assert np.array_equal(ids, finetune.label_sample(labels, 0.1, seed=3))
    assert not np.array_equal(ids, finetune.label_sample(labels, 0.1, seed=4))
    assert np.array_equal(finetune.label_sample(labels, 1.0, 0), np.flatnonzero(labels >= 0))
    tiny = finetune.label_sample(labels, 0.0001, 0)
    assert np.bincount(labels[tiny], minlength=5).tolist() == [1] * 5  # at least one a class
    with pytest.raises(ValueError, match="no image has a label"):
        finetune.label_sample(np.full(10, -1), 0.5, 0)


def test_default_epochs_give_tiny_samples_enough_steps():
    assert finetune.default_epochs(10_000, 64) == finetune.DEFAULT_EPOCHS
    assert finetune.default_epochs(143, 64) == 100  # 3 steps an epoch, 300 steps
    assert finetune.default_epochs(1, 64) == finetune.MIN_STEPS


# --------------------------------------------------------------------------- the network


def test_imprinting_sets_the_unit_class_means_and_the_network_starts_as_nearest_mean():
    torch.manual_seed(0)
    encoder = build_encoder(**EncoderConfig.for_preset("small", 16, "digits").to_dict())
    net = FinetuneNet(encoder, num_classes=3).eval()
    images, labels = torch.rand(12, 3, 32, 32), torch.tensor([0, 1, 2, 0] * 3)
    batches = [(images[:5], torch.arange(5), labels[:5]), (images[5:], torch.arange(7), labels[5:])]
    net.imprint(batches, torch.device("cpu"))
    with torch.no_grad():
        unit = F.normalize(net.trunk(images), dim=1)
        means = torch.stack([F.normalize(unit[labels == c].mean(0), dim=0) for c in range(3)])
        torch.testing.assert_close(net.classifier.weight, means)
        assert torch.equal(net.classifier.bias, torch.zeros(3))
        torch.testing.assert_close(net(images), unit @ means.T / TEMPERATURE)
    assert not net.training  # its mode is kept


def test_accuracy_is_top1_and_top5_of_the_logits():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x[:, 0, 0, :7]  # 7 classes' logits read from the image

    images = torch.randn(20, 3, 1, 7)
    labels = torch.randint(0, 7, (20,))
    logits = images[:, 0, 0, :7]
    batches = [(images[:8], None, labels[:8]), (images[8:], None, labels[8:])]
    got = accuracy(Fixed(), batches, torch.device("cpu"))
    top5 = logits.topk(5, dim=1).indices
    assert got["num_val"] == 20
    assert got["top1"] == int((logits.argmax(1) == labels).sum()) / 20
    assert got["top5"] == int((top5 == labels[:, None]).any(1).sum()) / 20


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """The default NPID run of the small encoder on the built-in digits (40 epochs, no Ray;
    15 epochs are too few: their pooled features were below random ones)."""
    root = tmp_path_factory.mktemp("finetune")
    run = [sys.executable, "-c", NO_RAY.replace("trainer.finetune", "trainer.run"),
           "--launcher", "local", "--eval-every", "0",
           "--output", str(root / "run")]  # fmt: skip
    result = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def test_pretrained_features_beat_random_ones_at_ten_percent_of_the_labels(pretrained, tmp_path):
    """The encoder frozen (``--trunk-lr-scale 0``): only the classifier learns, so the score is
    the features' own. NPID's features must beat the same network's random ones by far (0.82
    against 0.69 when written). Fully fine-tuned on this easy data, scratch
    training catches up; the README gives those numbers."""
    common = ["--label-fraction", "0.1", "--epochs", "20", "--trunk-lr-scale", "0",
              "--launcher", "local"]  # fmt: skip
    ours = _last_json(
        _cli("--checkpoint", str(pretrained), *common, "--output", str(tmp_path / "a"))
    )
    scratch = _last_json(
        _cli("--from-scratch", *common, "--arch", "small", "--output", str(tmp_path / "b"))
    )
    assert (ours["num_labelled"], ours["num_val"], ours["epochs"]) == (143, 360, 20)
    assert ours["top1"] >= scratch["top1"] + 0.05, (ours, scratch)
    sample = json.loads((tmp_path / "a" / "labelled_ids.json").read_text())
    assert sample["num_labelled"] == 143 and len(sample["per_class"]) == 10
    from trainer.data.index import ShardIndex

    classes = np.bincount(ShardIndex.load(_digits_train()).labels, minlength=10)
    assert sample["per_class"] == [int(0.1 * c + 0.5) for c in classes]


def test_the_command_runs_through_ray_train(pretrained, tmp_path):
    out = tmp_path / "ray"
    result = _cli("--checkpoint", str(pretrained), "--label-fraction", "0.05", "--epochs", "2",
                  "--eval-every", "1", "--output", str(out), ray=True)  # fmt: skip
    record = _last_json(result)
    assert "RayTrainWorker" in result.stdout + result.stderr  # it ran in a Ray Train worker
    assert record["launcher"] == "ray" and record["from_scratch"] is False
    assert 0.0 < record["top1"] <= record["top5"] <= 1.0 and record["epochs"] == 2
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2] and all("top1" in e for e in epochs)
    assert epochs[-1]["top1"] == record["top1"]
    state = torch.load(out / "finetuned.pt", weights_only=True)
    assert state["classifier.weight"].shape == (10, 128)  # the small trunk's pooled width


def _another_arch(root: Path) -> str:
    """A training checkpoint whose config says small-wide but holds the small encoder."""
    model = build_encoder(**EncoderConfig.for_preset("small", 128, "digits").to_dict())
    config = TrainConfig(arch="small-wide", low_dim=128)
    state = TrainState(model=model.state_dict(), optimizer={}, epoch=1, step=1, store_snapshot=None)
    return str(save_checkpoint(root / "wide", state, config.to_dict()))


@pytest.mark.parametrize(
    "case,needle",
    [
        ("fraction 0", "--label-fraction: must be in (0, 1], got 0"),
        ("fraction above 1", "--label-fraction: must be in (0, 1], got 1.5"),
        ("missing checkpoint", "--checkpoint /nonexistent/run: no such directory"),
        ("no checkpoint", "--checkpoint is required (or --from-scratch"),
        ("checkpoint of another arch", "weights do not fit"),
        ("data without labels", "no image has a label"),
        ("validation is the training data", "is the training data"),
        ("val data missing", "--val-data is required"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, needle):
    argv = {
        "fraction 0": lambda: ["--from-scratch", "--label-fraction", "0"],
        "fraction above 1": lambda: ["--from-scratch", "--label-fraction", "1.5"],
        "missing checkpoint": lambda: ["--checkpoint", "/nonexistent/run",
                                       "--label-fraction", "0.1"],
        "no checkpoint": lambda: ["--label-fraction", "0.1"],
        "checkpoint of another arch": lambda: ["--checkpoint", _another_arch(tmp_path),
                                       "--label-fraction", "0.1"],
        "data without labels": lambda: ["--from-scratch", "--label-fraction", "0.5", "--data",
                                unlabelled_shards(tmp_path), "--val-data", "digits"],
        "validation is the training data": lambda: ["--from-scratch", "--label-fraction", "0.5",
                                            "--data", "digits", "--val-data",
                                            _digits_train()],
        "val data missing": lambda: ["--from-scratch", "--label-fraction", "0.5", "--data",
                             unlabelled_shards(tmp_path)],
    }[case]()  # fmt: skip
    argv = [*argv, "--launcher", "local", "--output", str(tmp_path / "out")]
    try:
        code = finetune.main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    _, err = capsys.readouterr()
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{finetune.PROG}: ") and needle in err, err


def _digits_train() -> str:
    """The built-in digits' training shards (written on first use, not at collection)."""
    from trainer.api import dataset_location

    return dataset_location("digits", "train")


def test_validation_images_in_the_labelled_sample_are_refused_by_where_they_came_from(tmp_path):
    """Shards made twice from one folder share their images; another folder whose files
    have the same relative names (``c0/00000.png``) does not."""
    src = colour_class_folder(tmp_path / "src", 16, seed=0)
    other = colour_class_folder(tmp_path / "other", 16, seed=1)
    for name, folder in (("train", src), ("again", src), ("other", other)):
        make_shards(folder, tmp_path / name, progress=False)

    def args(val: str):
        argv = ["--from-scratch", "--arch", "small", "--label-fraction", "0.5",
                "--launcher", "local", "--data", str(tmp_path / "train"),
                "--val-data", str(tmp_path / val), "--output", str(tmp_path / "out")]  # fmt: skip
        return finetune.parser().parse_args(argv)

    with pytest.raises(finetune.ConfigError, match="8 of its images are in the labelled"):
        finetune.make_finetune(args("again"))
    _, _, spec = finetune.make_finetune(args("other"))
    assert len(spec["labelled_ids"]) == 8
