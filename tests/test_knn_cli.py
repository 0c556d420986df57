"""knn_service.eval: the CLI's numbers equal trainer.evaluation's on tiny data; bad input exits 2.

Also home of the tiny-dataset helpers shared with test_show.py and test_serve.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featurestore.knn import knn_evaluate
from knn_service import eval as knn_eval
from knn_service.cli import run
from trainer.checkpoints import TrainState, save_checkpoint
from trainer.config import TrainConfig
from trainer.data import ShardIndex, eval_loader
from trainer.data.transforms import build_transform
from trainer.evaluation import extract_features, index_from_export
from trainer.model.encoders import EncoderConfig, build_encoder
from trainer.model.export import export_encoder, load_encoder
from trainer.shards.make import make_shards

REPO_ROOT = Path(__file__).resolve().parent.parent
DIM = 16
NUM_CLASSES = 3

# --------------------------------------------------------------------------- tiny data


def make_tiny_data(root: Path, per_class: dict[str, int] | None = None, seed: int = 0) -> Path:
    """ImageFolder PNGs (3 classes, 16x16, class tint + heavy noise) -> shards per split.

    Returns ``root``, holding ``train/`` and ``val/`` shard dirs, ``src/`` the images.
    """
    per_class = per_class or {"train": 10, "val": 4}
    rng = np.random.default_rng(seed)
    tints = np.array([[8, -8, 0], [-8, 8, 0], [0, -8, 8]])  # weak: accuracies below 1
    for split, count in per_class.items():
        for c in range(NUM_CLASSES):
            folder = root / "src" / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                noise = rng.normal(0, 70, (16, 16, 3))
                pixels = np.clip(128 + tints[c] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        make_shards(
            root / "src" / split, root / split, shard_size=7, order="sorted", progress=False
        )
    return root


def make_tiny_encoder(out: Path, seed: int = 0) -> torch.nn.Module:
    """Export a freshly initialized small encoder (d=16, cifar preset, 32 px) to ``out``."""
    torch.manual_seed(seed)
    model = build_encoder("small", DIM)
    export_encoder(
        model, EncoderConfig("small", DIM), out, metadata={"preset": "cifar", "image_size": 32}
    )
    return model.eval()


def make_tiny_checkpoint(out: Path, model: torch.nn.Module, train_data: Path, **cfg) -> Path:
    """A training checkpoint (state.pt + config.json + meta.json) holding ``model``."""
    config = TrainConfig(data=str(train_data), arch="small", low_dim=DIM, **cfg)
    state = TrainState(
        model=model.state_dict(),
        optimizer={},
        epoch=1,
        step=3,
        store_snapshot=None,
    )
    return save_checkpoint(out, state, config.to_dict())


def features(model: torch.nn.Module, location: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [N, d], labels [N])`` as the trainer computes them (test transform)."""
    index = ShardIndex.load(location)
    tf = build_transform("cifar", train=False, image_size=32)
    feats, seen = extract_features(
        model, eval_loader(index, 256, tf), index.num_instances, DIM, torch.device("cpu")
    )
    assert bool(seen.all())
    return feats, torch.from_numpy(index.labels)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = make_tiny_data(tmp_path_factory.mktemp("knn-cli"))
    model = make_tiny_encoder(root / "encoder")
    make_tiny_checkpoint(root / "ckpt", model, root / "train", knn_k=7, nce_t=0.1)
    train_f, train_y = features(load_encoder(root / "encoder"), root / "train")
    val_f, val_y = features(load_encoder(root / "encoder"), root / "val")
    return {
        "root": root,
        "train_f": train_f,
        "train_y": train_y,
        "val_f": val_f,
        "val_y": val_y,
    }


def run_cli(main, prog: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a CLI in-process: ``(exit status, stdout, stderr)``."""
    try:
        code = run(prog, main, argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _eval(tiny: dict, capsys, *extra: str, checkpoint: str = "encoder") -> dict:
    root = tiny["root"]
    argv = [
        "--checkpoint", str(root / checkpoint),
        "--train-data", str(root / "train"),
        "--val-data", str(root / "val"),
        *extra,
    ]  # fmt: skip
    code, out, err = run_cli(knn_eval.main, knn_eval.PROG, argv, capsys)
    assert code == 0, err
    return json.loads(out)


def brute_force_top1(train_f, train_y, val_f, val_y, k: int, sigma: float) -> float:
    """Plain float64 reference of the weighted vote's top-1."""
    sims = val_f.double() @ train_f.double().T  # [Q, N]
    top_s, top_i = sims.topk(k, dim=1)
    scores = torch.zeros(val_f.shape[0], NUM_CLASSES, dtype=torch.float64)
    scores.scatter_add_(1, train_y[top_i], (top_s / sigma).exp())
    return float((scores.argmax(dim=1) == val_y).double().mean())


def knn_accuracy(train, train_y, val_f, val_y, num_classes, k, temperature) -> dict:
    """The vote as the trainer's evaluation runs it: ``k`` capped at the training size."""
    size = len(train) if hasattr(train, "ntotal") else train.shape[0]
    found = knn_evaluate(train, train_y, val_f, val_y, num_classes, min(k, size), temperature)
    return {"knn_top1": found["top1"], "knn_top5": found["top5"]}


# --------------------------------------------------------------------------- numbers


def test_recompute_equals_trainer_evaluation(tiny, capsys) -> None:
    record = _eval(tiny, capsys, "--recompute")
    expected = knn_accuracy(
        tiny["train_f"], tiny["train_y"], tiny["val_f"], tiny["val_y"], NUM_CLASSES, 200, 0.07
    )
    assert record["top1"] == expected["knn_top1"]
    assert record["top5"] == expected["knn_top5"]
    assert record["top1"] == brute_force_top1(
        tiny["train_f"], tiny["train_y"], tiny["val_f"], tiny["val_y"], 30, 0.07
    )
    assert 0 < record["top1"] < 1  # a non-trivial number on this data
    assert record["top5"] == 1.0  # C = 3 <= 5
    assert record["k"] == 200 and record["k_used"] == 30 and record["temperature"] == 0.07
    assert record["features"] == "recomputed" and record["num_classes"] == NUM_CLASSES
    assert record["num_train"] == 30 and record["num_val"] == 12
    assert record["encoder"]["kind"] == "export" and record["encoder"]["preset"] == "cifar"


def test_checkpoint_uses_its_config_k_and_temperature(tiny, capsys) -> None:
    record = _eval(tiny, capsys, "--recompute", checkpoint="ckpt")
    assert record["encoder"]["kind"] == "checkpoint"
    assert (record["k"], record["temperature"]) == (7, 0.1)
    expected = knn_accuracy(
        tiny["train_f"], tiny["train_y"], tiny["val_f"], tiny["val_y"], NUM_CLASSES, 7, 0.1
    )
    assert (record["top1"], record["top5"]) == (expected["knn_top1"], expected["knn_top5"])
    assert record["top1"] == brute_force_top1(
        tiny["train_f"], tiny["train_y"], tiny["val_f"], tiny["val_y"], 7, 0.1
    )
    # explicit flags win over the config
    record = _eval(
        tiny, capsys, "--recompute", "--k", "5", "--temperature", "0.5", checkpoint="ckpt"
    )
    expected = knn_accuracy(
        tiny["train_f"], tiny["train_y"], tiny["val_f"], tiny["val_y"], NUM_CLASSES, 5, 0.5
    )
    assert (record["k"], record["temperature"], record["top1"]) == (5, 0.5, expected["knn_top1"])


def test_ivf_kind_with_every_cell_probed_equals_flat(tiny, capsys) -> None:
    flat = _eval(tiny, capsys, "--recompute", "--k", "10")
    ivf = _eval(tiny, capsys, "--recompute", "--k", "10", "--kind", "ivf")
    assert ivf["kind"] == "ivf"
    assert (ivf["top1"], ivf["top5"]) == (flat["top1"], flat["top5"])  # 30 rows: one cell


@pytest.mark.ray
def test_bank_from_store_and_snapshot(tiny, capsys, make_store, tmp_path) -> None:
    store = make_store(num_rows=30, dim=DIM, num_shards=2)
    bank = torch.nn.functional.normalize(tiny["train_f"] + 0.3 * torch.randn(30, DIM), dim=1)
    store.set(torch.arange(30), bank)
    expected = knn_accuracy(
        index_from_export(store.export(), DIM),
        tiny["train_y"],
        tiny["val_f"],
        tiny["val_y"],
        NUM_CLASSES,
        200,
        0.07,
    )
    plain = knn_accuracy(
        bank, tiny["train_y"], tiny["val_f"], tiny["val_y"], NUM_CLASSES, 200, 0.07
    )
    assert expected == plain
    record = _eval(tiny, capsys, "--store-name", store.name, "--namespace", "npid-tests")
    assert (record["top1"], record["top5"]) == (expected["knn_top1"], expected["knn_top5"])
    assert record["features"] == "bank" and record["bank"]["store_name"] == store.name

    uri = store.snapshot(str(tmp_path / "snap"))
    record = _eval(tiny, capsys, "--snapshot", uri)
    assert (record["top1"], record["top5"]) == (expected["knn_top1"], expected["knn_top5"])

    # the bank must fit the encoder (dim) and the train data (rows)
    export_encoder(build_encoder("small", 8), EncoderConfig("small", 8), tmp_path / "enc8",
                   metadata={"preset": "cifar", "image_size": 32})  # fmt: skip
    bank_args = ("--store-name", store.name, "--namespace", "npid-tests")
    for override, what in (
        ({"checkpoint": str(tmp_path / "enc8")}, "dim 16 but the encoder embeds in 8"),
        ({"train_data": str(tiny["root"] / "val")}, "30 rows but --train-data has 12"),
    ):
        code, _, err = run_cli(
            knn_eval.main, knn_eval.PROG, _argv(tiny, *bank_args, **override), capsys
        )
        assert code == 2 and what in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(
        knn_eval.main,
        knn_eval.PROG,
        _argv(tiny, "--store-name", "no-such-store-knn", "--namespace", "npid-tests"),
        capsys,
    )
    assert code == 2 and "--store-name no-such-store-knn" in err


# --------------------------------------------------------------------------- bad input


def _argv(tiny: dict, *extra: str, **override: str) -> list[str]:
    root = tiny["root"]
    paths = {
        "checkpoint": str(root / "encoder"),
        "train_data": str(root / "train"),
        "val_data": str(root / "val"),
    }
    paths.update(override)
    return [
        "--checkpoint", paths["checkpoint"],
        "--train-data", paths["train_data"],
        "--val-data", paths["val_data"],
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "extra,override,needle",
    [
        ((), {}, "--store-name or --snapshot, or --recompute"),
        (("--recompute",), {"checkpoint": "/nonexistent/ckpt"}, "--checkpoint"),
        (("--recompute",), {"train_data": "/nonexistent/train"}, "--train-data"),
        (("--recompute",), {"val_data": "/nonexistent/val"}, "--val-data"),
        (("--recompute", "--k", "0"), {}, "--k"),
        (("--recompute", "--temperature", "-1"), {}, "--temperature"),
        (("--recompute", "--temperature", "nan"), {}, "--temperature"),
        (("--recompute", "--batch-size", "x"), {}, "--batch-size"),
        (("--recompute", "--kind", "hnsw"), {}, "--kind"),
        (("--recompute", "--snapshot", "/x"), {}, "not allowed with"),
        (("--snapshot", "/nonexistent/snap"), {}, "--snapshot"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny, capsys, extra, override, needle) -> None:
    code, out, err = run_cli(knn_eval.main, knn_eval.PROG, _argv(tiny, *extra, **override), capsys)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err


def test_checkpoint_dir_without_weights_is_exit_2(tiny, capsys, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(
        knn_eval.main,
        knn_eval.PROG,
        _argv(tiny, "--recompute", checkpoint=str(tmp_path / "empty")),
        capsys,
    )
    assert code == 2 and "neither an exported encoder" in err


def test_module_entry_point_exit_status(tiny) -> None:
    """The real ``python -m knn_service.eval``: exit 2, one stderr line, nothing on stdout."""
    argv = _argv(tiny, "--recompute", val_data="/nonexistent/val")
    proc = subprocess.run(
        [sys.executable, "-m", "knn_service.eval", *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert (
        proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        and "--val-data /nonexistent/val" in proc.stderr
    )


# --------------------------------------------------------------------------- encoder loading


def test_load_encoder_from_export_checkpoint_and_run_dir(tiny, tmp_path) -> None:
    from knn_service.encoders import load_encoder_from

    root = tiny["root"]
    images = [Image.new("RGB", (16, 16), (200, 10, 10)), Image.new("RGB", (20, 12), (0, 90, 9))]
    export = load_encoder_from(root / "encoder")
    assert (export.kind, export.arch, export.dim, export.preset, export.image_size) == (
        "export", "small", DIM, "cifar", 32,
    )  # fmt: skip
    expected = export.encode_images(images)
    assert expected.shape == (2, DIM)
    torch.testing.assert_close(expected.norm(dim=1), torch.ones(2))

    ckpt = load_encoder_from(root / "ckpt", root / "train")
    assert (ckpt.kind, ckpt.preset, ckpt.image_size) == ("checkpoint", "cifar", 32)
    assert ckpt.config is not None and ckpt.config.knn_k == 7
    torch.testing.assert_close(ckpt.encode_images(images), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="preset is unknown"):
        load_encoder_from(root / "ckpt")  # not the built-in data: needs the train data

    # a run output: its encoder/ export wins; without one, the newest checkpoint
    run_dir = tmp_path / "run"
    model = load_encoder(root / "encoder")
    make_tiny_checkpoint(run_dir / "ray" / "train-x" / "checkpoint_000000", model, root / "train")
    found = load_encoder_from(run_dir, root / "train")
    assert found.kind == "checkpoint" and found.path.endswith("checkpoint_000000")
    export_encoder(model, EncoderConfig("small", DIM), run_dir / "encoder",
                   metadata={"preset": "cifar", "image_size": 32})  # fmt: skip
    assert load_encoder_from(run_dir).kind == "export"

    builtin = tmp_path / "builtin"
    config = TrainConfig(arch="small", low_dim=DIM)  # data = the built-in digits
    state = TrainState(model.state_dict(), {}, 1, 1, None, {"epoch": 1, "batch": 0})
    save_checkpoint(builtin, state, config.to_dict())
    loaded = load_encoder_from(builtin)
    assert (loaded.preset, loaded.image_size) == ("digits", 32)

    wrong = tmp_path / "wrong"
    save_checkpoint(wrong, state, TrainConfig(arch="resnet18", low_dim=DIM).to_dict())
    with pytest.raises(ValueError, match="weights do not fit"):
        load_encoder_from(wrong, root / "train")
