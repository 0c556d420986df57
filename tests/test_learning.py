"""Tests that fail when training stops learning.

A short run of the real trainer (``--launcher local``: the Ray Train worker loop in this
process) must end with recomputed kNN features clearly better than where it started (the
untrained encoder, epoch 0) and than the input itself (raw pixels, mean-centred, cosine,
the same 200-NN weighted vote), by margins set from measurement (see each test). Breaking
the method on purpose (ids shuffled between the loader and the bank, or the momentum
update switched off) makes these tests fail; the notes of issue 10 say how that was
checked.

- the fast test runs on the built-in digits, made harder in one way raw pixels cannot
  follow: each 8×8 digit sits at a random place of a 16×16 canvas (ids, labels and
  splits unchanged), so a pixel-by-pixel match no longer finds the same digit while an
  encoder trained to ignore crops does (raw pixels 67.5 %, the trained encoder 80 %);
- the opt-in test (``NPID_CIFAR_TESTS=1``) runs on a class-balanced subset of CIFAR-10.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch.nn.functional as F
from PIL import Image

from featurestore.knn import knn_evaluate
from trainer.data import ShardIndex
from trainer.data.augment import build_batch_transform
from trainer.data.cache import load_decoded
from trainer.metrics import read_jsonl
from trainer.run import main
from trainer.shards.make import make_shards

ARCHIVE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def raw_pixel_knn(train: Path, val: Path, preset: str, sigma: float, k: int = 200) -> float:
    """Top-1 of the 200-NN vote on test-transform pixels, mean-centred, cosine."""
    tf = build_batch_transform(preset, train=False)
    feats = []
    for shards in (train, val):
        data = load_decoded(ShardIndex.load(shards))
        feats.append((tf(data.images).flatten(1), data.labels))
    (a, ya), (b, yb) = feats
    mean = a.mean(dim=0)
    a, b = F.normalize(a - mean, dim=1), F.normalize(b - mean, dim=1)
    classes = int(ya.max()) + 1
    return float(knn_evaluate(a, ya, b, yb, num_classes=classes, k=k, temperature=sigma)["top1"])


def _learning(shards: dict[str, Path], run: list[str], preset: str, output: Path):
    """Train on ``shards`` with ``run`` flags (the local launcher); top-1 of ``(epoch 0
    recomputed, last epoch's bank, final recomputed, raw pixels with σ 0.07)``."""
    data = ["--data", str(shards["train"]), "--val-data", str(shards["test"])]
    assert main(["--launcher", "local", "--no-progress", "--output", str(output), *data, *run]) == 0
    records = read_jsonl(output / "metrics.jsonl")
    recomputed = [r["knn_top1"] for r in records if r.get("features") == "recomputed"]
    bank = [r["knn_top1"] for r in records if r.get("features") == "bank"]
    pixels = raw_pixel_knn(shards["train"], shards["test"], preset, 0.07)
    return recomputed[0], bank[-1], recomputed[-1], pixels


@pytest.fixture(scope="module")
def shifted_digits(tmp_path_factory) -> dict[str, Path]:
    """The built-in digits, each pasted at a seeded random place of a 16×16 canvas."""
    from sklearn.datasets import load_digits

    from trainer.data.sources import DIGITS_TEST_EVERY

    root = tmp_path_factory.mktemp("shifted-digits")
    digits = load_digits()
    rng = np.random.default_rng(0)
    out = {}
    rows_of = {
        split: [i for i in range(len(digits.target)) if (i % DIGITS_TEST_EVERY == 0) == test]
        for split, test in (("train", False), ("test", True))
    }
    for split, rows in rows_of.items():
        src = root / f"src-{split}"
        for i in rows:
            canvas = np.zeros((16, 16), dtype=np.uint8)
            r, c = rng.integers(0, 9, 2)
            canvas[r : r + 8, c : c + 8] = (digits.images[i] * 255 / 16).astype(np.uint8)
            folder = src / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(canvas).convert("RGB").save(folder / f"{i:04d}.png")
        make_shards(src, root / split, progress=False)
        out[split] = root / split
    return out


#: The fast run (about 30 s on 2 cores): the CPU recipe's objective, τ and schedule, with the
#: digits augmentation (crops of 50-100 %: a 16x16 canvas survives them, CIFAR's 20-100 %
#: crops often cut the digit out). Measured (seed 0, 2026-12-08, the same at every evaluation
#: before and after the redesign of issue 24): epoch 0 26.9 %, after 80 epochs 78.1 %
#: (bank 76.9 %); first measured (seeds 0 / 1, an older state, the cause not traced) 80.3 /
#: 78.6 %. Raw pixels 67.5 % (σ 0.07; 61.9 % with σ 0.1).
FAST_RUN = ["--arch", "small", "--augment", "digits", "--nce-k", "0", "--nce-t", "0.1",
            "--lr", "0.05", "--schedule", "cosine", "--batch-size", "128", "--epochs", "80",
            "--seed", "0"]  # fmt: skip
#: Margins (top-1, as fractions) over the untrained encoder and over raw pixels.
FAST_MARGIN_OVER_EPOCH_0 = 0.40
FAST_MARGIN_OVER_PIXELS = 0.05
#: The bank must track the encoder: its kNN ends close to the recomputed one (measured +1.4
#: points). With the momentum update switched off the bank keeps its random rows and the
#: encoder, pulled towards them, still learns (fixed random targets teach something:
#: recomputed 86.4 %) while the bank's kNN falls 14.5 points behind.
FAST_BANK_BEHIND_RECOMPUTED = 0.07


@pytest.mark.slow  # 80 epochs: the learning guard, kept on the default path
def test_a_short_run_learns_features_better_than_its_start_and_its_input(shifted_digits, tmp_path):
    start, bank, end, pixels = _learning(shifted_digits, FAST_RUN, "digits", tmp_path / "run")
    assert end >= start + FAST_MARGIN_OVER_EPOCH_0, (start, bank, end, pixels)
    assert end >= pixels + FAST_MARGIN_OVER_PIXELS, (start, bank, end, pixels)
    assert bank >= end - FAST_BANK_BEHIND_RECOMPUTED, (start, bank, end, pixels)


#: The opt-in CIFAR-10 subset: the first images of each class (train, test).
CIFAR_PER_CLASS = {"train": 1000, "test": 200}


@pytest.fixture(scope="module")
def cifar_subset(tmp_path_factory) -> dict[str, Path]:
    """Shards of a class-balanced CIFAR-10 subset (10,000 train, 2,000 test images)."""
    root = tmp_path_factory.mktemp("cifar-subset")

    def wanted(name: str) -> bool:
        parts = name.split("/")  # cifar10/<split>/<class>/<nnnn>.jpg
        return (
            len(parts) == 4
            and parts[1] in CIFAR_PER_CLASS
            and int(parts[3].split(".")[0]) < CIFAR_PER_CLASS[parts[1]]
        )

    with tarfile.open(ARCHIVE) as tar:
        members = [m for m in tar if m.isfile() and wanted(m.name)]
        tar.extractall(root, members=members, filter="data")
    out = {}
    for split in CIFAR_PER_CLASS:
        out[split] = root / "shards" / split
        summary = make_shards(root / "cifar10" / split, out[split], progress=False)
        assert summary.num_skipped == 0
    return out


#: The CPU recipe's settings with the small encoder on the subset. Measured (seed 0, about
#: 4 min on 2 cores, 2026-12-08, the same at every evaluation at 49c610f and after it):
#: epoch 0 34.8 %, after 40 epochs 40.8 % recomputed and 38.8 % from the bank; raw pixels
#: 36.4 % (σ 0.07). First measured (an older state, the cause not traced): 42.5 % / 38.7 %.
CIFAR_RUN = ["--arch", "small", "--nce-k", "0", "--nce-t", "0.1", "--lr", "0.05",
             "--schedule", "cosine", "--batch-size", "256", "--epochs", "40",
             "--seed", "0"]  # fmt: skip
CIFAR_MARGIN_OVER_EPOCH_0 = 0.04
CIFAR_MARGIN_OVER_PIXELS = 0.03
CIFAR_BANK_BEHIND_RECOMPUTED = 0.08


@pytest.fixture(scope="module")
def cifar_run(cifar_subset, tmp_path_factory) -> tuple[tuple[float, ...], Path]:
    """The CPU recipe's run on the subset: ``(_learning's four top-1s, its output)``."""
    output = tmp_path_factory.mktemp("cifar-run") / "run"
    return _learning(cifar_subset, CIFAR_RUN, "cifar", output), output


#: The CIFAR-10 learning tests (about 5 min) are in the long tier (``pytest -m long``): the
#: digits test above guards learning on the default path (the same trainer, objective and
#: margins over the start and over raw pixels), ``test_finetune`` the fine-tuning claim on
#: digits and ``test_cifar_data`` the real JPEG shards.
@pytest.mark.cifar
@pytest.mark.slow
@pytest.mark.long
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision.io.image")
def test_cifar_subset_learns_features_better_than_its_start_and_its_input(cifar_run):
    (start, bank, end, pixels), _ = cifar_run
    assert end >= start + CIFAR_MARGIN_OVER_EPOCH_0, (start, bank, end, pixels)
    assert end >= pixels + CIFAR_MARGIN_OVER_PIXELS, (start, bank, end, pixels)
    assert bank >= end - CIFAR_BANK_BEHIND_RECOMPUTED, (start, bank, end, pixels)


#: Fine-tuning on 10 % of the subset's labels (1,000 images), the defaults otherwise.
#: Measured from this run (2026-12-07, seeds 0 and 1): 42.2 % and 42.35 % against 41.3 % and
#: 40.45 % from scratch (leads 0.9 and 1.9 points; when the margin was set scratch gave
#: 39.6 % and 40.3 %, cause of the change not traced); a 20-epoch run's features gave no lead.
#: The lead is asked of each seed and, on average over the two, this much:
FINETUNE_MARGIN_OVER_SCRATCH = 0.01
FINETUNE_SEEDS = ("0", "1")


@pytest.mark.cifar
@pytest.mark.slow
@pytest.mark.long
def test_cifar_fine_tuning_from_the_npid_run_beats_scratch_at_ten_percent_labels(
    cifar_run, cifar_subset, tmp_path, capsys
):
    """The paper's semi-supervised claim (its Fig. 6) on real images: the whole encoder
    fine-tuned from the NPID run beats the same network trained from scratch on the same
    labelled sample. (On the built-in digits scratch training catches up: README.)"""
    from trainer.experiments import finetune

    _, run = cifar_run
    common = ["--data", str(cifar_subset["train"]), "--val-data", str(cifar_subset["test"]),
              "--label-fraction", "0.1", "--launcher", "local"]  # fmt: skip
    leads = {}
    for seed in FINETUNE_SEEDS:
        top1 = {}
        for name, start in (("pretrained", ["--checkpoint", str(run)]),
                            ("scratch", ["--from-scratch", "--arch", "small"])):  # fmt: skip
            out = str(tmp_path / f"{name}-{seed}")
            assert finetune.main([*start, *common, "--seed", seed, "--output", out]) == 0
            top1[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"]
        leads[seed] = top1["pretrained"] - top1["scratch"]
        assert leads[seed] > 0, (seed, top1)
    assert sum(leads.values()) / len(leads) >= FINETUNE_MARGIN_OVER_SCRATCH, leads
