"""What a new user meets in the first hour, tried from the command line: zero epochs or
batch size, ``--help`` (every flag explained with its default, fast because it loads no
torch), the token variable of the service, and a quiet log (no progress bars off a terminal,
no FAISS import noise)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from generated_images import colour_class_folder

from trainer.flags import build_parser
from trainer.shards.make import make_shards

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("value", ["0", "-4"])
@pytest.mark.parametrize("flag", ["--epochs", "--batch-size"])
def test_zero_or_negative_epochs_or_batch_size_is_one_line_and_exit_2(flag, value):
    result = _cli("-m", "trainer.run", flag, value)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {flag} must be >= 1, got {value} (leave it out for the dataset's default)"
    )


def test_every_trainer_flag_is_explained_with_its_default():
    for action in build_parser()._actions:
        if action.dest in ("help", "config"):
            continue
        assert action.help, f"{action.option_strings} has no help"
    text = " ".join(_cli("-m", "trainer.run", "--help").stdout.split())  # one line
    for expected in (
        "--lr LR learning rate (SGD) (default: 0.03)",
        "--low-dim LOW_DIM embedding size d (default: 128)",
        "--knn-k KNN_K neighbours k of the kNN vote (default: 200)",
        "--epochs EPOCHS epochs (default: 40 on the built-in data, 200 otherwise)",
        "global batch size (default: 128 on the built-in data, 256 otherwise)",
    ):
        assert expected in text


def test_the_commands_answer_help_without_loading_torch():
    code = (
        "import sys, trainer.flags, trainer.make_shards, trainer.study, trainer.finetune, "
        "knn_service.serve, "
        "knn_service.eval, knn_service.show, knn_service.linear, featurestore.cli; "
        "print(sorted(m for m in ('torch', 'ray', 'faiss') if m in sys.modules))"
    )
    assert _cli("-c", code).stdout.strip() == "[]"
    for module in ("trainer.run", "trainer.make_shards", "trainer.study", "trainer.finetune",
                   "knn_service.serve",
                   "knn_service.eval", "knn_service.linear", "featurestore"):  # fmt: skip
        result = _cli("-m", module, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout, module


def test_serve_help_names_the_token_variable():
    assert "NPID_API_TOKEN" in _cli("-m", "knn_service.serve", "--help").stdout


def test_a_run_logged_to_a_file_has_no_progress_bars_and_no_faiss_noise(tmp_path):
    src = colour_class_folder(tmp_path / "src", 48, seed=0)
    make_shards(src, tmp_path / "shards", shard_size=40, progress=False)
    result = _cli(
        "-m", "trainer.run", "--launcher", "local", "--data", str(tmp_path / "shards"),
        "--val-data", str(tmp_path / "shards"), "--output", str(tmp_path / "run"),
        "--arch", "small", "--low-dim", "16", "--batch-size", "16", "--epochs", "2",
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "batch/s" not in log and "\r" not in log  # no tqdm bar: stderr is not a terminal
    assert "swigfaiss" not in log and "Loading faiss" not in log
    assert sum("'epoch': " in line for line in log.splitlines()) >= 2  # one line per epoch


def test_val_data_with_unlabelled_images_is_refused_up_front(tmp_path):
    src = colour_class_folder(tmp_path / "src", 24, seed=1)
    stray = next(src.glob("*/*"))
    (src / f"stray{stray.suffix}").write_bytes(stray.read_bytes())  # at the root: no class
    make_shards(src, tmp_path / "val", shard_size=40, progress=False)
    make_shards(colour_class_folder(tmp_path / "t", 24, seed=2), tmp_path / "train", progress=False)
    result = _cli(
        "-m", "trainer.run", "--launcher", "local", "--data", str(tmp_path / "train"),
        "--val-data", str(tmp_path / "val"), "--output", str(tmp_path / "run"),
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "1 of its 25 images have no label (-1" in lines[0], lines


def test_the_exported_encoder_carries_its_preprocessing_and_encodes_as_the_service(tmp_path):
    import io
    import json

    import torch
    from PIL import Image

    from knn_service.encoders import load_encoder_from
    from trainer.data.decode import decode_image
    from trainer.model.export import encode_images

    src = colour_class_folder(tmp_path / "src", 32, seed=3)
    make_shards(src, tmp_path / "shards", shard_size=40, progress=False)
    result = _cli(
        "-m", "trainer.run", "--launcher", "local", "--data", str(tmp_path / "shards"),
        "--output", str(tmp_path / "run"), "--arch", "small", "--low-dim", "16",
        "--batch-size", "16", "--epochs", "1", "--eval-every", "0",
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    export = tmp_path / "run" / "encoder"
    pre = json.loads((export / "encoder.json").read_text())["preprocessing"]
    assert pre["convert"] == "RGB" and len(pre["mean"]) == len(pre["std"]) == 3
    data = next(src.glob("*/*")).read_bytes()
    mine = encode_images(export, [Image.open(io.BytesIO(data))])  # the documented call
    service = load_encoder_from(str(export), None, device="cpu").encode_images([decode_image(data)])
    assert mine.shape == (1, 16) and torch.equal(mine, service)
    scope: dict = {}
    exec(pre["python"], scope)  # the recorded torchvision code builds the same transform
    image = decode_image(data)
    from trainer.data.transforms import build_transform

    expected = build_transform(pre["preset"], train=False, image_size=pre["image_size"])(image)
    assert torch.equal(scope["transform"](image), expected)


def test_the_built_in_dataset_can_be_named_in_the_next_commands(tmp_path):
    import json

    run = tmp_path / "run"
    result = _cli(
        "-m", "trainer.run", "--launcher", "local", "--epochs", "1", "--eval-every", "0",
        "--output", str(run), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    digits = ("--train-data", "digits", "--val-data", "digits")
    result = _cli(
        "-m", "knn_service.eval", "--checkpoint", str(run / "encoder"), *digits, "--recompute",
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout)
    assert (record["num_train"], record["num_val"]) == (1437, 360) and record["top1"] > 0.5
    out = tmp_path / "grid.png"
    result = _cli(
        "-m", "knn_service.show", "retrieval", "--checkpoint", str(run / "encoder"), *digits,
        "--out", str(out), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0 and out.stat().st_size > 0, result.stderr[-3000:]
