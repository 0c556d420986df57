"""Bad data in a long shard list (issue 25): every kind a large collection meets, in one
dataset, each skipped and counted exactly (per epoch, by both loaders, with and without
worker processes, and in ``run.json``) or refused at once with a line naming it."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image
from test_data import _epoch_ids, _png, write_dataset
from torchvision import transforms as T

from trainer.data import eval_loader, train_loader
from trainer.data.index import ShardIndex

REPO = Path(__file__).resolve().parent.parent
SHARDS, PER_SHARD = 12, 10
N = SHARDS * PER_SHARD
TRUNCATED, EMPTY = 4, 7  # shard numbers: cut inside a member's header, an empty tar
KEPT = 6  # samples of the truncated shard before the cut
NOT_AN_IMAGE, BOMB, TINY, TWICE = 13, 26, 51, 95  # ids


def _bomb() -> bytes:
    """A 20,000 × 20,000 1-bit PNG (48 KB): 400 M pixels, above twice PIL's limit."""
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> tuple[Path, set[int]]:
    """The dataset and the ids that cannot be read."""
    bomb = _bomb()

    def sample(iid: int, record: dict) -> dict:
        if iid == NOT_AN_IMAGE:
            return {"__key__": record["__key__"], "txt": b"a caption", "cls": record["cls"]}
        if iid == BOMB:
            record["png"] = bomb
        elif iid == TINY:
            record["png"] = _png(np.full((1, 1, 3), 200, np.uint8))
        return record

    layout = [list(range(s * PER_SHARD, (s + 1) * PER_SHARD)) for s in range(SHARDS)]
    root = write_dataset(tmp_path_factory.mktemp("bad") / "ds", layout, sample=sample)
    truncated = root / f"shard-{TRUNCATED:06d}.tar"
    cut = _member_offset(truncated, f"{TRUNCATED * PER_SHARD + KEPT:09d}") + 100  # mid-header
    truncated.write_bytes(truncated.read_bytes()[:cut])
    (root / f"shard-{EMPTY:06d}.tar").write_bytes(b"\0" * 1024)  # a tar with no member
    twice = root / f"shard-{TWICE // PER_SHARD:06d}.tar"  # one member written twice
    with wds.TarWriter(str(twice)) as sink:
        for iid in layout[TWICE // PER_SHARD]:
            record = {"__key__": f"{iid:09d}", "png": _png(np.full((4, 4, 3), iid, np.uint8)),
                      "cls": iid % 3}  # fmt: skip
            sink.write(record)
            if iid == TWICE:
                sink.write(dict(record))
    # the sample before the cut is whole, but a reader cannot know that no member of it
    # followed: it goes with the damaged rest
    lost = set(range(TRUNCATED * PER_SHARD + KEPT - 1, (TRUNCATED + 1) * PER_SHARD))
    lost |= set(range(EMPTY * PER_SHARD, (EMPTY + 1) * PER_SHARD)) | {NOT_AN_IMAGE, BOMB}
    return root, lost


def _member_offset(tar: Path, key: str) -> int:
    """Where the first member of sample ``key`` starts in ``tar`` (its header's offset)."""
    import tarfile

    with tarfile.open(tar) as f:
        return next(m.offset for m in f if m.name.startswith(key + "."))


RESIZE = T.Compose([T.Resize((4, 4)), T.ToTensor()])
CROP = T.Compose([T.RandomResizedCrop(4), T.ToTensor()])


@pytest.mark.parametrize("workers", [0, 2])
def test_every_kind_of_bad_sample_is_skipped_and_counted_exactly(bad, workers) -> None:
    root, lost = bad
    assert 0 < len(lost) < N
    ev = eval_loader(str(root), 8, RESIZE, num_workers=workers)
    ids = [i for b in _epoch_ids(ev) for i in b]
    assert ids == [i for i in range(N) if i not in lost]  # the 1×1 image and the twice-written
    assert ev.epoch_skipped == ev.skipped == len(lost)  # member are read, each once
    tl = train_loader(str(root), 8, CROP, num_workers=workers, seed=0)
    for epoch in range(2):
        tl.set_epoch(epoch)
        seen = {i for b in _epoch_ids(tl) for i in b}
        assert seen == set(range(N)) - lost
        assert tl.epoch_skipped == len(lost)
    assert tl.skipped == 2 * len(lost)


def _rewrite_index(root: Path, **columns) -> None:
    table = pq.read_table(root / "index.parquet")
    for name, values in columns.items():
        table = table.set_column(table.column_names.index(name), name, pa.array(values))
    pq.write_table(table, root / "index.parquet")


def test_a_label_outside_the_class_list_names_the_sample(tmp_path) -> None:
    root = write_dataset(tmp_path / "ds", [list(range(10)), list(range(10, 20))])
    labels = [i % 3 for i in range(20)]
    labels[12] = 7  # dataset.json names 3 classes
    _rewrite_index(root, label=pa.array(labels, pa.int32()))
    with pytest.raises(ValueError) as err:
        ShardIndex.load(root)
    assert str(err.value) == (
        f"index.parquet in {root}: 1 label(s) outside the classes, the first id 12 "
        "(key '000000012' in shard-000001.tar) with label 7 (dataset.json names 3 classes: "
        "0..2, or -1 for unknown)"
    )
    result = subprocess.run(
        [sys.executable, "-m", "trainer.run", "--data", str(root), "--launcher", "local",
         "--output", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "id 12 (key '000000012'" in result.stderr


def test_labels_below_minus_one_are_refused_without_named_classes(tmp_path) -> None:
    root = write_dataset(tmp_path / "ds", [list(range(6))])
    meta = json.loads((root / "dataset.json").read_text())
    meta["classes"] = []
    (root / "dataset.json").write_text(json.dumps(meta))
    _rewrite_index(root, label=pa.array([0, 1, 9, -1, -2, 0], pa.int32()))
    with pytest.raises(ValueError, match=r"the first id 4 .* with label -2 \(a label is >= 0"):
        ShardIndex.load(root)


def test_two_ids_with_one_key_in_a_shard_are_refused(tmp_path) -> None:
    root = write_dataset(tmp_path / "ds", [list(range(5)), list(range(5, 10))])
    keys = [f"{i:09d}" for i in range(10)]
    keys[3] = keys[1]
    _rewrite_index(root, key=keys)
    with pytest.raises(ValueError, match=r"1 key.* the first '000000001' in shard-000000\.tar"):
        ShardIndex.load(root)


@pytest.mark.slow
def test_a_run_reports_the_skips_per_epoch_and_in_run_json(bad, tmp_path) -> None:
    root, lost = bad
    result = subprocess.run(
        [sys.executable, "-m", "trainer.run", "--data", str(root), "--launcher", "local",
         "--arch", "small", "--low-dim", "16", "--batch-size", "16", "--epochs", "2",
         "--output", str(tmp_path / "run"), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["skipped_samples"] == {
        "total": 2 * len(lost),
        "by_epoch": {"1": len(lost), "2": len(lost)},
    }
    assert f"skipped {2 * len(lost)} corrupt or missing samples in all" in result.stdout
