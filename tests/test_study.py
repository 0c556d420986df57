"""``python -m trainer.study``: the grid, the seeded class-balanced data subsets, the report,
and one study end to end on the built-in data through Ray Tune."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from trainer.data.index import ShardIndex
from trainer.data.segments import read_image_bytes
from trainer.data.subset import sample_ids, subset_source
from trainer.experiments.study import STUDIES, StudyError, grid, trial_flags
from trainer.experiments.study_report import markdown, plot
from trainer.shards.make import ensure_builtin_dataset, make_shards

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str, timeout: int = 900, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.study", *args], cwd=cwd, capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip


@settings(max_examples=50, deadline=None)
@given(
    labels=st.lists(st.integers(-1, 5), min_size=1, max_size=200),
    fraction=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_sample_is_class_balanced_seeded_and_sorted(labels, fraction, seed) -> None:
    labels = np.array(labels)
    ids = sample_ids(labels, fraction, seed)
    assert np.all(np.diff(ids) > 0) and np.array_equal(ids, sample_ids(labels, fraction, seed))
    for label in np.unique(labels):
        count = int((labels == label).sum())
        assert int((labels[ids] == label).sum()) == max(1, int(np.floor(fraction * count + 0.5)))


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, float("nan")])
def test_a_fraction_outside_0_1_is_refused(fraction) -> None:
    with pytest.raises(ValueError, match="fraction must be in"):
        sample_ids(np.zeros(10, dtype=int), fraction, 0)


def test_a_subset_is_written_as_shards_of_the_sampled_images(tmp_path) -> None:
    digits = ensure_builtin_dataset(split="train", name="digits")
    source = subset_source(str(digits), 0.1, seed=3)
    make_shards(source, tmp_path / "subset", order="sorted", progress=False)
    original, subset = ShardIndex.load(str(digits)), ShardIndex.load(str(tmp_path / "subset"))
    ids = sample_ids(np.asarray(original.labels), 0.1, 3)
    assert subset.num_instances == len(ids) and subset.classes == original.classes
    assert np.array_equal(subset.labels, original.labels[ids])
    mine = read_image_bytes(subset, range(3))
    theirs = read_image_bytes(original, ids[:3])
    assert [mine[j] for j in range(3)] == [theirs[int(i)] for i in ids[:3]]


def test_grid_parses_checks_and_leaves_out_noise_counts_above_the_data() -> None:
    assert grid(STUDIES["nce-k"], None, 1437) == [1, 10, 512]
    assert grid(STUDIES["embedding-size"], ["8", "16"], 100) == [8, 16]
    assert trial_flags(STUDIES["nce-k"], 10, "D") == ["--data", "D", "--objective", "nce",
                                                      "--nce-k", "10"]  # fmt: skip
    nce = trial_flags(STUDIES["objective"], "nce", "D", 1437)
    assert nce == ["--data", "D", "--objective", "nce", "--nce-k", "1436"]  # not the softmax
    assert trial_flags(STUDIES["objective"], "nce", "D", 50_000)[-1] == "nce"  # K = 4096
    for study, values, needle in [
        ("data-fraction", ["0"], "in \\(0, 1\\]"),
        ("embedding-size", ["x"], "not an integer"),
        ("objective", ["magic"], "unknown objective"),
        ("nce-k", ["5000"], "nothing left to run"),
    ]:
        with pytest.raises(StudyError, match=needle):
            grid(STUDIES[study], values, 1437)


def test_the_report_has_a_row_per_trial_and_a_picture() -> None:
    record = {
        "study": "objective", "varies": "--objective", "data": "d", "val_data": "v",
        "trainer_flags": ["--epochs", "1"],
        "trials": [
            {"value": "softmax", "knn_top1": 0.5, "knn_top5": 0.9, "epochs": 1, "seconds": 3.0,
             "run": "r", "error": None},
            {"value": "nce", "knn_top1": None, "knn_top5": None, "epochs": None,
             "seconds": None, "run": "r", "error": "RuntimeError: boom"},
        ],
    }  # fmt: skip
    table = markdown(record)
    assert "| softmax | 50.00 % | 90.00 % | 1 | 3.0 |" in table
    assert "| nce | failed: RuntimeError: boom |" in table
    assert isinstance(plot(record), Image.Image)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["width"], "invalid choice: 'width'"),
        (["data-fraction", "--values", "0"], "a data fraction must be in (0, 1]"),
        (["objective", "--data", "/no/such/data"], "--data /no/such/data"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle) -> None:
    result = _cli(*args, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_a_data_fraction_study_runs_on_ray_tune(tmp_path) -> None:
    # Relative paths, as a user types them: Tune moves each trial into its own directory,
    # and the trials must still find the data, the output and a --config after `--`.
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "train").symlink_to(ensure_builtin_dataset(split="train"))
    (tmp_path / "small.yaml").write_text("batch-size: 64\n")
    out = tmp_path / "study"
    result = _cli(
        "data-fraction", "--values", "0.25", "--epochs", "1", "--data", "shards/train",
        "--output", "study", "--", "--config", "small.yaml", "--low-dim", "16", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert [t["value"] for t in record["trials"]] == [0.25]
    for trial in record["trials"]:
        assert trial["error"] is None and 0 <= trial["knn_top1"] <= 1 and trial["epochs"] == 1
    assert json.loads((out / "study.json").read_text()) == record
    assert "| 0.25 |" in (out / "study.md").read_text()
    assert Image.open(out / "study.png").size == (640, 360)
    subset = ShardIndex.load(str(out / "data" / "fraction-0.25-seed-0"))
    assert subset.num_instances == 361  # a quarter of each of the ten classes, rounded
