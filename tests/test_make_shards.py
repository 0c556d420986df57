"""make_shards: round trips for every source kind, skipped files, ids, atomicity, CLI errors."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from trainer.data.sources import SourceError
from trainer.shards import tar_writer
from trainer.shards.make import OutputExistsError, ensure_builtin_dataset, make_shards

REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers


def _encode(pixels: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    image = Image.fromarray(pixels)
    if mode is not None:
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _pixels(seed: int, h: int = 6, w: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# (relative path, label name or None, bytes factory) of the good files, any order.
GOOD = {
    "a_cls/x.JPG": lambda: _encode(_pixels(1), "JPEG"),
    "a_cls/sub/deep/y.png": lambda: _encode(_pixels(2), "PNG", "RGBA"),
    "a_cls/sub/b.webp": lambda: _encode(_pixels(3), "WEBP"),
    "b_cls/z.jpeg": lambda: _encode(_pixels(4), "JPEG", "L"),
    "b_cls/w.Png": lambda: _encode(_pixels(5), "PNG", "P"),
    "b_cls/u.BMP": lambda: _encode(_pixels(6), "BMP"),
    "c_cls/good.jpg": lambda: _encode(_pixels(7, 9, 4), "JPEG"),
    "loose.png": lambda: _encode(_pixels(8), "PNG"),
}
BAD = {
    "c_cls/trunc.jpg": lambda: _encode(_pixels(9, 64, 64), "JPEG")[:300],
    "c_cls/empty.png": lambda: b"",
    "c_cls/text.png": lambda: b"this is not an image\n",
}
IGNORED = {
    "c_cls/notes.txt": lambda: b"notes",
    "a_cls/.hidden.png": lambda: _encode(_pixels(10), "PNG"),
    ".cache/img.png": lambda: _encode(_pixels(11), "PNG"),
    "a_cls/data.npy": lambda: b"\x93NUMPY",
}
CLASSES = ["a_cls", "b_cls", "c_cls", "d_empty"]


def _sorted_paths(paths) -> list[str]:
    return sorted(paths, key=lambda p: tuple(p.split("/")))


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for rel, make in {**GOOD, **BAD, **IGNORED}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make())
    (root / "d_empty").mkdir()
    return root


def _read_tar(path: Path) -> dict[str, bytes]:
    """Members of a tar with the standard library's reader (independent of ours)."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.make_shards", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


# --------------------------------------------------------------------------- ImageFolder


def test_imagefolder_round_trip(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = make_shards(image_folder, out, shard_size=3, order="sorted")

    expected = _sorted_paths(GOOD)
    n = len(expected)
    assert summary.num_instances == n
    assert summary.num_skipped == len(BAD)
    assert summary.classes == tuple(CLASSES)
    assert summary.shards == (
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
        "shard-000003.tar",
    )

    table = pq.read_table(out / "index.parquet")
    assert table.schema == pa.schema(
        [
            ("id", pa.int64()),
            ("label", pa.int32()),
            ("key", pa.string()),
            ("shard", pa.string()),
            ("offset", pa.int64()),
            ("source", pa.string()),
        ]
    )
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == list(range(n))
    assert [r["source"] for r in rows] == expected
    for r in rows:
        top = r["source"].split("/")[0]
        assert r["label"] == (CLASSES.index(top) if top in CLASSES else -1)
        assert r["key"] == f"{r['id']:09d}"

    # Every shard, read with the standard tarfile module: original bytes, cls, key order.
    members: dict[str, bytes] = {}
    for shard in summary.shards:
        content = _read_tar(out / shard)
        keys = [name.split(".")[0] for name in content]
        assert keys == sorted(keys)
        members.update({name: (shard, data) for name, data in content.items()})
    assert len(members) == 2 * n
    for r in rows:
        ext = r["source"].rsplit(".", 1)[1].lower()
        shard, data = members[f"{r['key']}.{ext}"]
        assert data == (image_folder / r["source"]).read_bytes()
        assert shard == r["shard"]
        assert members[f"{r['key']}.cls"][1] == str(r["label"]).encode()

    meta = json.loads((out / "dataset.json").read_text())
    assert meta["num_instances"] == n
    assert meta["classes"] == CLASSES
    assert meta["source"] == str(image_folder.resolve())
    assert meta["source_type"] == "imagefolder"
    assert meta["shards"] == list(summary.shards)
    assert sum(meta["shard_counts"]) == n
    assert meta["image_size_min"] == 4 and meta["image_size_max"] == 9
    assert "created" in meta

    lines = (out / "skipped.txt").read_text().splitlines()
    reasons = dict(line.split("\t") for line in lines)
    not_taken = {*BAD, "c_cls/notes.txt", "a_cls/.hidden.png", ".cache/", "a_cls/data.npy"}
    assert sorted(reasons) == sorted(not_taken)  # every file it did not take, with a reason
    assert all(reasons.values()) and not any("BytesIO" in r or "0x" in r for r in reasons.values())
    assert reasons["a_cls/.hidden.png"] == "hidden file (its name starts with '.')"
    assert reasons[".cache/"] == "hidden directory: not scanned"
    assert reasons["c_cls/notes.txt"] == "not an image file name (.txt)"
    assert reasons["c_cls/text.png"] == "not an image PIL can read (unknown or damaged format)"
    assert meta["num_skipped"] == len(BAD)  # images that did not decode
    assert not list(out.glob(".*")), "temporary files left behind"


def test_ids_stable_and_output_identical_across_runs(image_folder: Path, tmp_path: Path) -> None:
    a = make_shards(image_folder, tmp_path / "a", shard_size=2)
    b = make_shards(image_folder, tmp_path / "b", shard_size=2)
    assert a.shards == b.shards
    assert pq.read_table(tmp_path / "a/index.parquet").equals(
        pq.read_table(tmp_path / "b/index.parquet")
    )
    for shard in a.shards:
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()


def test_shards_interleave_ids(image_folder: Path, tmp_path: Path) -> None:
    """Instance i lives in shard i % num_shards, so every shard samples all classes."""
    summary = make_shards(image_folder, tmp_path / "out", shard_size=3)
    rows = pq.read_table(tmp_path / "out/index.parquet").to_pylist()
    for r in rows:
        assert r["shard"] == summary.shards[r["id"] % len(summary.shards)]
    assert max(summary.shard_counts) - min(summary.shard_counts) <= 1


def test_output_inside_source_is_not_scanned(image_folder: Path) -> None:
    make_shards(image_folder, image_folder / "shards", shard_size=100)
    summary = make_shards(image_folder, image_folder / "shards", shard_size=100, overwrite=True)
    assert "shards" not in summary.classes


def test_overwrite_replaces_and_removes_stale_shards(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    make_shards(image_folder, out, shard_size=1)
    assert len(list(out.glob("shard-*.tar"))) == len(GOOD)  # empty trailing shards dropped
    with pytest.raises(OutputExistsError):
        make_shards(image_folder, out, shard_size=100)
    summary = make_shards(image_folder, out, shard_size=100, overwrite=True)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar"]
    assert summary.shards == ("shard-000000.tar",)
    assert set(pq.read_table(out / "index.parquet")["shard"].to_pylist()) == {"shard-000000.tar"}
    assert json.loads((out / "dataset.json").read_text())["shards"] == ["shard-000000.tar"]


def test_failed_run_leaves_no_partial_output(
    image_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "out"
    make_shards(image_folder, out, shard_size=2)
    before = _snapshot(out)
    calls = []

    def failing_write(self, *args):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk on fire")
        return original(self, *args)

    original = tar_writer.ShardFileWriter.write
    monkeypatch.setattr(tar_writer.ShardFileWriter, "write", failing_write)
    with pytest.raises(RuntimeError):
        make_shards(image_folder, out, shard_size=1, overwrite=True)
    assert _snapshot(out) == before  # old output untouched, no temp files
    fresh = tmp_path / "fresh"
    calls.clear()
    with pytest.raises(RuntimeError):
        make_shards(image_folder, fresh, shard_size=1)
    assert list(fresh.iterdir()) == []


def test_all_images_bad_is_an_empty_source(tmp_path: Path) -> None:
    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    (src / "a.jpg").write_bytes(b"")
    (src / "b.png").write_bytes(b"nope")
    with pytest.raises(SourceError, match="empty"):
        make_shards(tmp_path / "src", tmp_path / "out")
    assert not list((tmp_path / "out").glob("*"))


# --------------------------------------------------------------------------- CIFAR batches


def _fake_cifar(root: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {"data_batch_1": 5, "data_batch_2": 3, "test_batch": 4}
    content = {}
    for name, rows in batches.items():
        data = rng.integers(0, 256, (rows, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, rows)]
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, f)
        content[name] = (data, labels)
    names = [f"name{i}".encode() for i in range(10)]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": 10000}, f)
    return content


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar_batches_round_trip(tmp_path: Path, split: str) -> None:
    src = tmp_path / "cifar-10-batches-py"
    content = _fake_cifar(src)
    out = tmp_path / "out"
    summary = make_shards(src, out, shard_size=2, split=split, order="sorted")
    names = ["data_batch_1", "data_batch_2"] if split == "train" else ["test_batch"]
    expected = [(n, r) for n in names for r in range(len(content[n][1]))]
    assert summary.num_instances == len(expected)
    assert summary.classes == tuple(f"name{i}" for i in range(10))
    rows = pq.read_table(out / "index.parquet").to_pylist()
    assert [r["source"] for r in rows] == [f"{n}:{r}" for n, r in expected]
    members = {}
    for shard in summary.shards:
        members.update(_read_tar(out / shard))
    for r, (name, row) in zip(rows, expected, strict=True):
        data, labels = content[name]
        assert r["label"] == labels[row]
        png = members[f"{r['key']}.png"]
        decoded = np.asarray(Image.open(io.BytesIO(png)))
        assert np.array_equal(decoded, data[row].reshape(3, 32, 32).transpose(1, 2, 0))
    assert json.loads((out / "dataset.json").read_text())["source_type"] == "cifar10"


def test_cifar_rejects_pickled_code(tmp_path: Path) -> None:
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    with open(src / "data_batch_1", "wb") as f:
        pickle.dump({b"data": os.getcwd}, f)  # a global outside the allow-list
    with pytest.raises(SourceError, match="not a CIFAR-10 batch"):
        make_shards(src, tmp_path / "out")


# --------------------------------------------------------------------------- built-in digits


def test_digits_splits(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    train = make_shards("digits", tmp_path / "train", shard_size=500, split="train")
    test = make_shards("digits", tmp_path / "test", split="test")
    assert (train.num_instances, test.num_instances) == (1437, 360)
    assert train.classes == tuple(str(i) for i in range(10))
    rows = {}
    for split in ("train", "test"):
        for r in pq.read_table(tmp_path / split / "index.parquet").to_pylist():
            rows[int(r["source"].split(":")[1])] = (split, r)
    assert sorted(rows) == list(range(1797))
    assert all((split == "test") == (i % 5 == 0) for i, (split, _) in rows.items())
    members = {}
    for shard in train.shards:
        members.update(_read_tar(tmp_path / "train" / shard))
    for i, (split, r) in rows.items():
        assert r["label"] == digits.target[i]
        if split == "train" and i < 200:
            image = Image.open(io.BytesIO(members[f"{r['key']}.png"]))
            assert image.mode == "L"
            expected = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
            assert np.array_equal(np.asarray(image), expected)


def test_ensure_builtin_dataset_converts_once(tmp_path: Path) -> None:
    path = ensure_builtin_dataset(tmp_path / "cache", "test")
    assert path == tmp_path / "cache" / "digits-test"
    meta = json.loads((path / "dataset.json").read_text())
    assert meta["num_instances"] == 360
    stamp = (path / "dataset.json").stat().st_mtime_ns
    assert ensure_builtin_dataset(tmp_path / "cache", "test") == path
    assert (path / "dataset.json").stat().st_mtime_ns == stamp
    (path / "dataset.json").unlink()  # a broken earlier attempt is rebuilt
    assert ensure_builtin_dataset(tmp_path / "cache", "test") == path
    assert (path / "dataset.json").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["digits-test"]


# --------------------------------------------------------------------------- CLI


def test_cli_success_logs_summary(image_folder: Path, tmp_path: Path) -> None:
    result = _cli(image_folder, tmp_path / "out", "--shard-size", "4")
    assert result.returncode == 0, result.stderr
    assert "wrote 8 instances" in result.stderr
    assert "skipped 3" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "out/dataset.json").is_file()


def _assert_one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert needle in lines[0]


def test_cli_missing_source(tmp_path: Path) -> None:
    result = _cli(tmp_path / "nope", tmp_path / "out")
    _assert_one_line_error(result, "not found")
    assert not (tmp_path / "out").exists()


def test_cli_empty_source(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    _assert_one_line_error(_cli(tmp_path / "src", tmp_path / "out"), "empty")
    (tmp_path / "src" / "cls").mkdir()
    (tmp_path / "src" / "cls" / "readme.txt").write_text("no images here")
    _assert_one_line_error(_cli(tmp_path / "src", tmp_path / "out"), "empty")
    assert not (tmp_path / "out").exists()


def test_cli_unknown_source_type(tmp_path: Path) -> None:
    (tmp_path / "data.tar.gz").write_bytes(b"\x1f\x8b")
    _assert_one_line_error(_cli(tmp_path / "data.tar.gz", tmp_path / "out"), "unknown source")
    _assert_one_line_error(_cli("no-such-builtin", tmp_path / "out"), "not found")


def test_cli_existing_output_untouched(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    make_shards(image_folder, out, shard_size=3)
    before = _snapshot(out)
    _assert_one_line_error(_cli(image_folder, out, "--shard-size", "1"), "--overwrite")
    assert _snapshot(out) == before
    result = _cli(image_folder, out, "--shard-size", "100", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar"]


def test_an_unwritable_output_is_exit_2_and_outputs_keep_the_umask(tmp_path: Path) -> None:
    import os
    import stat
    import subprocess
    import sys

    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    (src / "a.png").write_bytes(_encode(_pixels(5), "PNG"))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = subprocess.run(
        [sys.executable, "-m", "trainer.make_shards", str(tmp_path / "src"), str(blocker / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"make_shards: error: cannot write {blocker / 'out'}")
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        make_shards(tmp_path / "src", out, progress=False)
    finally:
        os.umask(old)
    for name in ("dataset.json", "index.parquet", "skipped.txt", "shard-000000.tar"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


# --------------------------------------------------------------------------- order, offsets


def test_random_order_is_a_seeded_permutation(image_folder: Path, tmp_path: Path) -> None:
    """Default order: ids follow a permutation of the sorted paths drawn from the seed (the
    same for the same seed, another for another), the index still maps id -> source."""
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 5)):
        make_shards(image_folder, tmp_path / name, shard_size=3, seed=seed)
        runs[name] = pq.read_table(tmp_path / name / "index.parquet").to_pylist()
    sources = [r["source"] for r in runs["a"]]
    assert sources == [r["source"] for r in runs["b"]]
    assert sources != [r["source"] for r in runs["c"]]
    assert sorted(sources, key=lambda p: tuple(p.split("/"))) == _sorted_paths(GOOD)
    assert sources != _sorted_paths(GOOD)
    assert [r["id"] for r in runs["a"]] == list(range(len(GOOD)))
    meta = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert meta["order"] == "random" and meta["order_seed"] == 0
    for r in runs["a"]:  # the bytes stored under each id are those of its source file
        members = _read_tar(tmp_path / "a" / r["shard"])
        ext = Path(r["source"]).suffix.lower().lstrip(".")
        assert members[f"{r['key']}.{ext}"] == (image_folder / r["source"]).read_bytes()


def test_offsets_point_at_each_samples_first_header(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    make_shards(image_folder, out, shard_size=3)
    rows = pq.read_table(out / "index.parquet").to_pylist()
    for r in rows:
        with tarfile.open(out / r["shard"]) as tar:
            first = next(m for m in tar.getmembers() if m.name.startswith(r["key"] + "."))
        assert first.offset == r["offset"]


def test_bad_order_is_refused(image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown order"):
        make_shards(image_folder, tmp_path / "out", order="shuffled")
    result = _cli(image_folder, tmp_path / "out2", "--order", "shuffled")
    assert result.returncode == 2 and "--order" in result.stderr
