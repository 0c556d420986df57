"""Indexing and training on ordinary webdataset shards (written by webdataset's ShardWriter)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from trainer.data import ShardIndex, eval_loader, train_loader
from trainer.shards.index import ensure_index, expand_braces, index_shards, names_shards

REPO_ROOT = Path(__file__).resolve().parents[1]
N_SHARDS, PER_SHARD = 3, 20


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def wds_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 shards written by webdataset's ShardWriter: arbitrary keys, ``jpg`` + ``cls`` +
    ``json``; shard 1 holds a sample without an image and a duplicated key."""
    root = tmp_path_factory.mktemp("wds")
    pattern = str(root / "train-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=PER_SHARD + 2) as sink:
        n = 0
        for s in range(N_SHARDS):
            for i in range(PER_SHARD):
                label = (s * PER_SHARD + i) % 4
                sample = {
                    "__key__": f"cam{s}/img_{i:03d}",  # a key with a directory part
                    "jpg": _jpeg(n),
                    "cls": label,
                    "json": {"species": ["cat", "dog", "eel", "fox"][label]},
                }
                sink.write(sample)
                n += 1
            if s == 1:
                sink.write({"__key__": "no_image", "txt": "just text"})
                sink.write({"__key__": "cam1/img_000", "jpg": _jpeg(999), "cls": 0})
            else:
                sink.write({"__key__": f"pad_{s}_a", "jpg": _jpeg(1000 + s), "cls": 1})
                sink.write({"__key__": f"pad_{s}_b", "jpg": _jpeg(2000 + s), "cls": 2})
    return root


def test_expand_braces() -> None:
    assert expand_braces("s3://b/t-{000..002}.tar") == [f"s3://b/t-{i:03d}.tar" for i in range(3)]
    assert expand_braces("x{a,b}-{1..2}") == ["xa-1", "xa-2", "xb-1", "xb-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="empty brace range"):
        expand_braces("t-{5..1}.tar")


def test_index_reads_any_keys_and_skips_what_is_not_an_image(wds_shards: Path, tmp_path: Path):
    out = tmp_path / "idx"
    meta = index_shards([str(wds_shards / "train-{000000..000002}.tar")], out, progress=False)
    n = N_SHARDS * PER_SHARD + 4  # 2 pads in shards 0 and 2
    assert meta["num_instances"] == n and meta["num_skipped"] == 2
    assert not list(out.glob("*.tar"))  # no copy of the images
    rows = pq.read_table(out / "index.parquet").to_pylist()
    assert [r["id"] for r in rows] == list(range(n))
    assert rows[0]["key"] == "cam0/img_000" and rows[0]["label"] == 0
    skipped = (out / "skipped.txt").read_text()
    assert "no_image" in skipped and "duplicate key" in skipped
    index = ShardIndex.load(out)
    assert index.shard_url(0) == str((wds_shards / "train-000000.tar").resolve())
    ids, labels = [], []
    for _, i, y in eval_loader(index, 16):
        ids += i.tolist()
        labels += y.tolist()
    assert ids == list(range(n))
    assert labels == [r["label"] for r in rows]


def test_labels_from_a_json_field_or_none(wds_shards: Path, tmp_path: Path) -> None:
    meta = index_shards([str(wds_shards)], tmp_path / "j", label="json:species", progress=False)
    assert meta["classes"] == ["cat", "dog", "eel", "fox"]
    table = pq.read_table(tmp_path / "j" / "index.parquet").to_pylist()
    assert table[5]["label"] == 5 % 4
    assert sum(r["label"] < 0 for r in table) == 4  # the pads carry no json: unlabelled
    none = index_shards([str(wds_shards)], tmp_path / "n", label="none", progress=False)
    assert none["num_classes"] == 0
    assert ShardIndex.load(tmp_path / "n").labels.max() == -1


def test_training_batches_from_indexed_shards(wds_shards: Path, tmp_path: Path) -> None:
    index_shards([str(wds_shards)], tmp_path / "idx", progress=False)
    loader = train_loader(tmp_path / "idx", 8, num_workers=2, shuffle_buffer=16)
    seen = []
    for x, ids, _ in loader:
        assert x.shape[1:] == (3, 12, 10)
        seen += ids.tolist()
    assert set(seen) == set(range(N_SHARDS * PER_SHARD + 4))
    assert loader.epoch_skipped == 0  # what the index left out is seeked over, not read


def test_resumes_from_finished_shards(wds_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    index_shards([str(wds_shards / "train-000000.tar")], out, progress=False)
    parts = sorted((out / ".parts").glob("*.parquet"))
    stamp = parts[0].stat().st_mtime_ns
    index_shards([str(wds_shards)], out, progress=False)  # only the other two are read
    assert parts[0].stat().st_mtime_ns == stamp
    assert len(list((out / ".parts").glob("*.parquet"))) == N_SHARDS


def test_names_shards_and_ensure_index(wds_shards: Path, tmp_path: Path) -> None:
    assert names_shards(str(wds_shards))  # a folder of .tar without an index
    assert names_shards("s3://bucket/train-{000..009}.tar")
    assert not names_shards(str(tmp_path))
    first = ensure_index(str(wds_shards), cache_dir=str(tmp_path / "cache"))
    assert ensure_index(str(wds_shards), cache_dir=str(tmp_path / "cache")) == first
    assert json.loads((first / "dataset.json").read_text())["source_type"] == "webdataset"


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "trainer.make_shards", "index", *args],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    missing = cli(str(tmp_path / "nope-{0..3}.tar"), str(tmp_path / "out"))
    assert missing.returncode == 2 and "nope-0.tar: no such shard" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    bad = cli(str(tmp_path), str(tmp_path / "out"), "--label", "colour")
    assert bad.returncode == 2 and "--label" in bad.stderr
