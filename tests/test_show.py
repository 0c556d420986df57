"""knn_service.show and .figures: PNGs of the expected size and content; bad input exits 2."""

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
from test_knn_cli import REPO_ROOT, features, make_tiny_data, make_tiny_encoder, run_cli

from knn_service import show
from knn_service.figures import (
    BORDER,
    CAPTION,
    GAP,
    HEADER,
    LEGEND,
    OTHER_COLOR,
    PAD,
    QUERY_COLOR,
    SAME_COLOR,
    Tile,
    nice_ticks,
    retrieval_grid,
    retrieval_grid_size,
    training_curves,
)
from trainer.model.export import load_encoder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = make_tiny_data(tmp_path_factory.mktemp("knn-show"))
    make_tiny_encoder(root / "encoder")
    return root


def _retrieval(tiny: Path, out: Path, capsys, *extra: str) -> tuple[int, dict | None, str]:
    argv = [
        "retrieval",
        "--checkpoint", str(tiny / "encoder"),
        "--train-data", str(tiny / "train"),
        "--val-data", str(tiny / "val"),
        "--out", str(out),
        *extra,
    ]  # fmt: skip
    code, stdout, err = run_cli(show.main, show.PROG, argv, capsys)
    return code, (json.loads(stdout) if code == 0 else None), err


def test_grid_size_formula() -> None:
    # 3 queries, 10 neighbours, 32 px cells: box = 38; 6 + 38 + 14 + 10 * 44 by the title and
    # legend (36) + 6 + 3 * 60; at least 360 wide for the legend
    assert retrieval_grid_size(3, 10, 32) == (498, 222)
    assert retrieval_grid_size(1, 2, 16) == (360, 36 + 6 + 44)


def test_retrieval_grid_png(tiny: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "grid.png"
    code, summary, err = _retrieval(tiny, out, capsys, "--ids", "0,5,11", "--cell", "32")
    assert code == 0, err
    image = Image.open(out)
    assert image.format == "PNG" and image.mode == "RGB"
    assert image.size == retrieval_grid_size(3, 10, 32) == tuple(summary["size"])
    assert summary["query_ids"] == [0, 5, 11]

    # neighbours are the exact 10-NN of the recomputed features
    model = load_encoder(tiny / "encoder")
    train_f, train_y = features(model, tiny / "train")
    val_f, val_y = features(model, tiny / "val")
    expected = (val_f[[0, 5, 11]] @ train_f.T).topk(10, dim=1).indices
    assert summary["neighbour_ids"] == expected.tolist()

    # frames: blue query, green same label, red other label
    pixels = np.asarray(image)
    box = 32 + 2 * BORDER
    mismatches = 0
    for r, (qid, row) in enumerate(zip(summary["query_ids"], summary["neighbour_ids"])):
        y = HEADER + PAD + r * (box + CAPTION + PAD) + 1
        assert tuple(pixels[y, PAD + 1]) == QUERY_COLOR
        for j, nid in enumerate(row):
            x = PAD + box + GAP + j * (box + PAD) + 1
            same = int(train_y[nid]) == int(val_y[qid])
            assert tuple(pixels[y, x]) == (SAME_COLOR if same else OTHER_COLOR)
            mismatches += not same
    assert summary["other_label_neighbours"] == mismatches
    assert 0 < mismatches < 30  # both colours appear on this data


def test_retrieval_random_queries_follow_seed(tiny: Path, tmp_path: Path, capsys) -> None:
    code, first, _ = _retrieval(tiny, tmp_path / "a.png", capsys, "--queries", "4", "--seed", "3")
    assert code == 0
    _, again, _ = _retrieval(tiny, tmp_path / "b.png", capsys, "--queries", "4", "--seed", "3")
    assert first["query_ids"] == again["query_ids"] and len(set(first["query_ids"])) == 4
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert Image.open(tmp_path / "a.png").size == retrieval_grid_size(4, 10, 64)


def _records() -> list[dict]:
    records = [
        {"epoch": 0, "step": 0, "loss": None, "knn_top1": 0.2, "knn_top5": 0.5,
         "features": "recomputed"},
    ]  # fmt: skip
    for e in range(1, 6):
        records.append(
            {"epoch": e, "step": 10 * e, "loss": 8.0 / e, "knn_top1": 0.2 + 0.1 * e,
             "knn_top5": 0.9, "features": "bank"}
        )  # fmt: skip
    records.append(
        {"epoch": 5, "step": 50, "loss": None, "knn_top1": 0.75, "features": "recomputed"}
    )
    return records


def test_curves_png(tmp_path: Path, capsys) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in _records()) + "\n")
    out = tmp_path / "curves.png"
    code, stdout, err = run_cli(
        show.main, show.PROG, ["curves", "--metrics", str(metrics), "--out", str(out)], capsys
    )
    assert code == 0, err
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (1000, 420)
    summary = json.loads(stdout)
    assert summary["records"] == 7 and summary["epochs"] == [0, 5]
    assert summary["last_knn_top1"] == 0.75
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colors = {tuple(p) for p in pixels}
    assert (31, 119, 180) in colors and (255, 127, 14) in colors  # both series drawn


def test_recomputed_features_are_markers_not_a_line() -> None:
    # Recomputed at epochs 0 and 5 only: two markers and a legend dot (about 280 pixels);
    # a line between them across the panel would add more than 1,000.
    pixels = np.asarray(training_curves(_records())).reshape(-1, 3)
    orange = int((pixels == (255, 127, 14)).all(axis=1).sum())
    assert 0 < orange < 500, orange


def test_curves_sizes_and_sparse_records() -> None:
    image = training_curves([{"epoch": 0, "loss": None, "knn_top1": 0.1}], 600, 300)
    assert image.size == (600, 300)  # loss panel says "no data"
    image = training_curves([], 400, 200)
    assert image.size == (400, 200)
    with pytest.raises(ValueError, match="at least 400 x 200"):
        training_curves(_records(), 300, 300)


@settings(max_examples=200, deadline=None)
@given(
    lo=st.floats(-1e6, 1e6, allow_nan=False),
    span=st.floats(0, 1e6, allow_nan=False),
    max_ticks=st.integers(2, 10),
)
def test_nice_ticks_cover_the_range_evenly(lo: float, span: float, max_ticks: int) -> None:
    hi = lo + span
    ticks = nice_ticks(lo, hi, max_ticks)
    assert len(ticks) >= 2
    step = ticks[1] - ticks[0]
    assert step > 0
    assert ticks[0] <= lo + 1e-9 * max(1.0, abs(lo)) + step * 1e-6
    assert ticks[-1] >= hi - 1e-9 * max(1.0, abs(hi)) - step * 1e-6
    assert np.allclose(np.diff(ticks), step, rtol=1e-6, atol=1e-9 * max(1.0, abs(hi)))
    mantissa = step / 10 ** np.floor(np.log10(step))
    assert any(np.isclose(mantissa, m) for m in (1, 2, 2.5, 5, 10))
    assert len(ticks) <= max_ticks + 2 or span == 0


def test_retrieval_grid_rejects_bad_rows() -> None:
    tile = Tile(Image.new("RGB", (8, 8)), 0, "x")
    with pytest.raises(ValueError, match="one neighbour row per query"):
        retrieval_grid([tile], [])
    with pytest.raises(ValueError, match="same number"):
        retrieval_grid([tile, tile], [[tile], [tile, tile]])
    image = retrieval_grid([tile], [[tile, tile]], cell=16)
    assert image.size == retrieval_grid_size(1, 2, 16)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["curves", "--metrics", "/nonexistent/m.jsonl", "--out", "{tmp}/c.png"], "--metrics"),
        (["curves", "--metrics", "{tmp}/bad.jsonl", "--out", "{tmp}/c.png"], "line 2 is not JSON"),
        (["curves", "--metrics", "{tmp}/empty.jsonl", "--out", "{tmp}/c.png"], "no records"),
        (["curves", "--metrics", "{tmp}/ok.jsonl", "--out", "{tmp}/c.jpg"], "must end in .png"),
        (["curves", "--metrics", "{tmp}/ok.jsonl", "--out", "/nonexistent/c.png"], "no such dir"),
        (["curves", "--metrics", "{tmp}/ok.jsonl", "--out", "{tmp}/c.png", "--width", "0"],
         "--width"),
        (["curves", "--metrics", "{tmp}/ok.jsonl", "--out", "{tmp}/c.png", "--width", "100"],
         "at least 400"),
        (["retrieval", "--checkpoint", "{data}/encoder", "--train-data", "{data}/train",
          "--val-data", "{data}/val", "--out", "{tmp}/g.png", "--ids", "0,99"], "outside [0, 12)"),
        (["retrieval", "--checkpoint", "{data}/encoder", "--train-data", "{data}/train",
          "--val-data", "{data}/val", "--out", "{tmp}/g.png", "--ids", "a,b"], "integers"),
        (["retrieval", "--checkpoint", "{data}/encoder", "--train-data", "{data}/train",
          "--val-data", "{data}/val", "--out", "{tmp}/g.png", "--queries", "0"], "--queries"),
        (["retrieval", "--checkpoint", "{tmp}", "--train-data", "{data}/train",
          "--val-data", "{data}/val", "--out", "{tmp}/g.png"], "--checkpoint"),
        (["retrieval", "--checkpoint", "{data}/encoder", "--train-data", "{tmp}/none",
          "--val-data", "{data}/val", "--out", "{tmp}/g.png"], "--train-data"),
        (["bogus"], "invalid choice"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, argv, needle) -> None:
    (tmp_path / "bad.jsonl").write_text('{"epoch": 1}\nnot json\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "ok.jsonl").write_text(json.dumps({"epoch": 1, "loss": 1.0}) + "\n")
    argv = [a.format(tmp=tmp_path, data=tiny) for a in argv]
    code, out, err = run_cli(show.main, show.PROG, argv, capsys)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err
    assert not (tmp_path / "c.png").exists() and not (tmp_path / "g.png").exists()


def test_module_entry_point(tmp_path: Path) -> None:
    """The real ``python -m knn_service.show``: a PNG and exit 0; bad input exit 2."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    ok = subprocess.run(
        [sys.executable, "-m", "knn_service.show", "curves", "--metrics", str(metrics),
         "--out", str(tmp_path / "c.png"), "--width", "640", "--height", "320"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert Image.open(tmp_path / "c.png").size == (640, 320)
    bad = subprocess.run(
        [sys.executable, "-m", "knn_service.show", "curves", "--metrics", str(tmp_path / "no"),
         "--out", str(tmp_path / "d.png")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_the_retrieval_picture_has_a_title_and_a_legend_of_its_frame_colours() -> None:
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    grid = retrieval_grid([Tile(image, 0, "q")], [[Tile(image, 0, "a"), Tile(image, 1, "b")]])
    pixels = np.asarray(grid)
    assert (pixels[4:18, PAD:200] < 100).all(axis=2).any()  # the title's dark text
    swatches = {tuple(pixels[26, x]) for x in range(PAD, grid.width)}
    assert {color for _, color in LEGEND} <= swatches  # one swatch per frame colour
