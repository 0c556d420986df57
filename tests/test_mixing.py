"""Label mixing of training batches: the metric, and the streamed reader on class-sorted shards."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data import train_loader
from trainer.data.mixing import LabelMixing, batch_entropy, mixing_warning, shuffled_entropy
from trainer.data.segments import cut_pieces
from trainer.shards.make import make_shards

CLASSES, PER_CLASS = 10, 200


def _plain_entropy(labels: list[int]) -> float:
    known = [y for y in labels if y >= 0]
    if not known:
        return 0.0
    total = 0.0
    for c in set(known):
        p = known.count(c) / len(known)
        total -= p * math.log(p)
    return total


@pytest.mark.parametrize(
    "labels", [[0, 0, 1, 2], [3] * 8, [0, 1, 2, 3, 4, 5, 6, 7], [-1, 2, 2, 5, -1], [-1, -1]]
)
def test_batch_entropy_matches_a_plain_reference(labels: list[int]) -> None:
    got = batch_entropy(torch.tensor(labels), 8)
    assert got.dim() == 0
    assert float(got) == pytest.approx(_plain_entropy(labels), abs=1e-6)


def test_shuffled_entropy_is_below_log_c_as_sampling_predicts() -> None:
    labels = np.repeat(np.arange(10), 500)
    ref = shuffled_entropy(labels, 256)
    assert ref == shuffled_entropy(labels, 256)  # deterministic
    # Miller-Madow: the plug-in entropy of n draws is about ln C - (C - 1) / (2 n) low.
    assert ref == pytest.approx(math.log(10) - 9 / 512, abs=0.01)
    assert shuffled_entropy(np.zeros(50, dtype=int), 8) == 0.0  # one class: nothing to mix


def test_label_mixing_fraction_and_warning() -> None:
    labels = np.repeat(np.arange(10), 100)
    mixing = LabelMixing(labels, 50)
    for start in range(0, 1000, 50):  # class runs: every batch is one class
        mixing.add(torch.from_numpy(labels[start : start + 50]))
    assert mixing.fraction(mixing.entropy_sum(), mixing.batches) == 0.0
    assert mixing_warning(0.5) is not None and "--shuffle-buffer" in mixing_warning(0.5)
    assert mixing_warning(0.95) is None and mixing_warning(None) is None
    unlabelled = LabelMixing(np.full(10, -1), 4)
    unlabelled.add(torch.full((4,), -1))
    assert unlabelled.fraction(0.0, 1) is None


def test_cut_pieces_covers_segments_in_order() -> None:
    segments = [(0, 3, 10), (2, 0, 4)]
    pieces = cut_pieces(segments, 3)
    assert pieces == [(0, 3, 6), (0, 6, 9), (0, 9, 10), (2, 0, 3), (2, 3, 4)]
    with pytest.raises(ValueError, match="piece"):
        cut_pieces(segments, 0)


@pytest.fixture(scope="module")
def sorted_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 classes x 200 tiny images, written in sorted order: 4 shards of class runs."""
    root = tmp_path_factory.mktemp("mix")
    src = root / "src"
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (src / f"c{c}").mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(src / f"c{c}" / f"{i:03d}.png")
    make_shards(src, root / "shards", shard_size=500, order="sorted", progress=False)
    return root / "shards"


def _epoch_mixing(root: Path, **kwargs) -> float:
    loader = train_loader(root, 64, **kwargs)
    mixing = LabelMixing(loader.index.labels, 64)
    fractions = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        for _, _, labels in loader:
            mixing.add(labels)
        fractions.append(mixing.fraction(mixing.entropy_sum(), mixing.batches))
        mixing.reset()
    return min(fractions)


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_mix_classes_on_sorted_shards(sorted_shards: Path, workers: int) -> None:
    """A buffer of an eighth of the data, 16 open pieces (default): as mixed as a shuffle."""
    got = _epoch_mixing(sorted_shards, shuffle_buffer=256, num_workers=workers)
    assert got >= 0.95, got


def test_without_buffer_and_open_pieces_batches_are_class_runs(sorted_shards: Path) -> None:
    """The same reading with mixing turned off fails the bound above (and warns)."""
    got = _epoch_mixing(sorted_shards, shuffle_buffer=0, open_shards=1)
    assert got < 0.9, got
    assert mixing_warning(got) is not None
