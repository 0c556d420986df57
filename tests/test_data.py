"""trainer.data: epoch plans, equal steps, exactly-once eval, corrupt samples, decoding."""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision import transforms as T

from trainer.data import eval_loader, train_loader
from trainer.data.decode import _TensorTail, decode_image, to_rgb
from trainer.data.index import ShardIndex
from trainer.data.order import (
    _worker_share,
    epoch_order,
    plan_epoch,
    steps_per_epoch,
    take_segments,
)
from trainer.data.shard_files import _TarReader
from trainer.data.transforms import build_transform
from trainer.shards.make import make_shards

# torchvision 0.29 deprecates its image decoders (used for JPEG, see decode_image).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision.io.image")

# --------------------------------------------------------------------------- test datasets


def _png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    image = Image.fromarray(pixels) if mode is None else Image.fromarray(pixels, mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _color(iid: int) -> np.ndarray:
    """A 4x4 RGB image whose pixels encode the id (checked after loading)."""
    return np.full((4, 4, 3), [iid % 256, iid // 256, 7], dtype=np.uint8)


def write_dataset(
    root: Path,
    layout: list[list[int]],
    labels=lambda iid: iid % 3,
    sample=None,
) -> Path:
    """Shards written by webdataset's own TarWriter; ``layout[s]`` = ids of shard ``s``."""
    root.mkdir(parents=True)
    rows = {"id": [], "label": [], "key": [], "shard": [], "source": []}
    names = []
    for s, ids in enumerate(layout):
        name = f"shard-{s:06d}.tar"
        names.append(name)
        with wds.TarWriter(str(root / name)) as sink:
            for iid in sorted(ids):
                key = f"{iid:09d}"
                record = {"__key__": key, "png": _png(_color(iid)), "cls": labels(iid)}
                if sample is not None:
                    record = sample(iid, record)
                sink.write(record)
                rows["id"].append(iid)
                rows["label"].append(labels(iid))
                rows["key"].append(key)
                rows["shard"].append(name)
                rows["source"].append(f"gen:{iid}")
    n = len(rows["id"])
    table = pa.table(
        {
            "id": pa.array(rows["id"], pa.int64()),
            "label": pa.array(rows["label"], pa.int32()),
            "key": rows["key"],
            "shard": rows["shard"],
            "source": rows["source"],
        }
    ).sort_by("id")
    pq.write_table(table, root / "index.parquet")
    meta = {"num_instances": n, "classes": ["a", "b", "c"], "shards": names}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


# Uneven, contiguous shards: 30, 3, 1 and 11 samples.
UNEVEN = [list(range(0, 30)), list(range(30, 33)), [33], list(range(34, 45))]
N_UNEVEN = 45


@pytest.fixture()
def uneven(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "uneven", UNEVEN)


def _epoch_ids(loader) -> list[list[int]]:
    return [ids.tolist() for _, ids, _ in loader]


# --------------------------------------------------------------------------- plans


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=8).filter(lambda s: sum(s) > 0),
    world=st.integers(1, 6),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 100),
)
def test_plan_epoch_partitions_samples_evenly(sizes, world, seed, epoch) -> None:
    plan = plan_epoch(sizes, world, seed, epoch)
    n = sum(sizes)
    seen = Counter()
    for segments in plan:
        for shard, lo, hi in segments:
            assert 0 <= lo < hi <= sizes[shard]
            seen.update((shard, p) for p in range(lo, hi))
    assert seen == Counter((s, p) for s, k in enumerate(sizes) for p in range(k))
    counts = [sum(hi - lo for _, lo, hi in segs) for segs in plan]
    assert set(counts) <= {n // world, math.ceil(n / world)}
    assert plan == plan_epoch(sizes, world, seed, epoch)  # deterministic


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 300),
    batch=st.integers(1, 50),
    workers=st.integers(1, 5),
    world=st.integers(1, 4),
)
def test_worker_shares_cover_rank(n, batch, workers, world) -> None:
    steps = steps_per_epoch(n * world, world, batch)
    assert steps == math.ceil(n / batch)
    rank = [(0, 0, n)]
    shares = [_worker_share(rank, steps, batch, workers, k) for k in range(workers)]
    assert sum(t for _, t in shares) == steps * batch
    covered = [p for segs, _ in shares for _, lo, hi in segs for p in range(lo, hi)]
    assert covered == list(range(n))
    for (segs, target), k in zip(shares, range(workers), strict=True):
        assert target == len(range(k, steps, workers)) * batch
        assert sum(hi - lo for _, lo, hi in segs) <= target


def test_take_segments_and_order() -> None:
    segs = [(2, 0, 3), (0, 5, 7), (1, 0, 4)]
    assert take_segments(segs, 2, 6) == [(2, 2, 3), (0, 5, 7), (1, 0, 1)]
    assert take_segments(segs, 0, 0) == []
    assert epoch_order([3, 0, 2], shuffle=False) == [(0, 0, 3), (2, 0, 2)]
    orders = {tuple(epoch_order([4, 4, 4], 0, e)) for e in range(10)}
    assert len(orders) > 1


def test_steps_per_epoch_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        steps_per_epoch(10, 1, 0)


# --------------------------------------------------------------------------- eval loader


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_eval_every_id_once_in_order(uneven: Path, world: int, workers: int) -> None:
    all_ids = []
    for rank in range(world):
        loader = eval_loader(uneven, 4, rank=rank, world_size=world, num_workers=workers)
        rank_ids = []
        for images, ids, labels in loader:
            assert images.dtype == torch.float32 and images.shape[1:] == (3, 4, 4)
            assert labels.tolist() == [i % 3 for i in ids.tolist()]
            expected = torch.stack([T.ToTensor()(_color(i)) for i in ids.tolist()])
            assert torch.equal(images, expected)
            rank_ids += ids.tolist()
        assert len(_epoch_ids(loader)) == len(loader)
        assert rank_ids == list(range(rank * N_UNEVEN // world, (rank + 1) * N_UNEVEN // world))
        all_ids += rank_ids
    assert all_ids == list(range(N_UNEVEN))


def test_eval_in_id_order_with_interleaved_shards(tmp_path: Path) -> None:
    """make_shards puts id i in shard i % S; eval still delivers ids in order."""
    src = tmp_path / "src" / "only"
    src.mkdir(parents=True)
    for i in range(23):
        (src / f"{i:03d}.png").write_bytes(_png(_color(i)))
    out = tmp_path / "shards"
    make_shards(tmp_path / "src", out, shard_size=5)
    ids = [i for batch in _epoch_ids(eval_loader(out, 6, num_workers=2)) for i in batch]
    assert ids == list(range(23))


# --------------------------------------------------------------------------- train loader


@pytest.mark.parametrize("world,batch,workers", [(1, 8, 0), (2, 8, 2), (3, 4, 2), (4, 16, 0)])
def test_train_equal_steps_and_every_id_visited(uneven, world, batch, workers) -> None:
    index = ShardIndex.load(uneven)
    steps = steps_per_epoch(N_UNEVEN, world, batch)
    for epoch in range(2):
        visits = Counter()
        for rank in range(world):
            loader = train_loader(
                index, batch, rank=rank, world_size=world, num_workers=workers, seed=3
            )
            loader.set_epoch(epoch)
            batches = _epoch_ids(loader)
            assert len(batches) == steps == len(loader)
            assert all(len(b) == batch for b in batches)
            rank_visits = Counter(i for b in batches for i in b)
            own = N_UNEVEN // world + 1
            assert sum(rank_visits.values()) - len(rank_visits) <= steps * batch - own + 1
            visits.update(rank_visits)
        assert set(visits) == set(range(N_UNEVEN))


def test_train_shuffle_deterministic_per_seed_and_epoch(uneven: Path) -> None:
    def order(seed: int, epoch: int, workers: int = 0) -> list[list[int]]:
        loader = train_loader(uneven, 8, seed=seed, num_workers=workers, shuffle_buffer=16)
        loader.set_epoch(epoch)
        return _epoch_ids(loader)

    first = order(0, 0)
    assert first == order(0, 0)
    assert first != order(0, 1)
    assert first != order(1, 0)
    assert order(5, 2, workers=2) == order(5, 2, workers=2)
    flat = [i for b in first for i in b]
    assert flat[:N_UNEVEN] != sorted(flat[:N_UNEVEN])  # shuffled within the epoch


def test_train_augmentation_seeded_in_workers(uneven: Path) -> None:
    tf = T.Compose([T.RandomResizedCrop(4, scale=(0.2, 1.0)), T.ToTensor()])
    runs = []
    for _ in range(2):
        loader = train_loader(uneven, 8, tf, num_workers=2, seed=1)
        runs.append(torch.cat([x for x, _, _ in loader]))
    assert torch.equal(runs[0], runs[1])


def test_tiny_dataset_many_ranks(tmp_path: Path) -> None:
    """Fewer instances than ranks x batch: every rank still yields the same full batches."""
    root = write_dataset(tmp_path / "tiny", [[0, 1, 2]])
    for rank in range(4):
        loader = train_loader(root, 5, rank=rank, world_size=4, num_workers=2)
        batches = _epoch_ids(loader)
        assert len(batches) == 1 and len(batches[0]) == 5
        assert set(batches[0]) <= {0, 1, 2}


# --------------------------------------------------------------------------- corrupt samples


def _corrupt(iid: int, record: dict) -> dict:
    if iid == 3:
        record["png"] = b"\x89PNG\r\n\x1a\n garbage"
    elif iid == 17:  # truncated image (a missing cls is fine: labels come from the index)
        record["png"] = record["png"][:24]
    elif iid == 31:
        record = {"__key__": record["__key__"], "cls": record["cls"]}
    return record


CORRUPT = {3, 17, 31}


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_samples_skipped_and_counted(tmp_path: Path, workers: int) -> None:
    root = write_dataset(tmp_path / "bad", UNEVEN, sample=_corrupt)
    loader = train_loader(root, 8, num_workers=workers, world_size=2, rank=1)
    other = train_loader(root, 8, num_workers=workers, world_size=2, rank=0)
    total = 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        other.set_epoch(epoch)
        ids = [i for b in _epoch_ids(loader) + _epoch_ids(other) for i in b]
        assert not CORRUPT & set(ids)
        assert set(ids) == set(range(N_UNEVEN)) - CORRUPT
        assert loader.epoch_skipped + other.epoch_skipped == len(CORRUPT)
        total += loader.epoch_skipped
    assert loader.skipped == total

    ev = eval_loader(root, 8, num_workers=workers)
    ids = [i for b in _epoch_ids(ev) for i in b]
    assert ids == [i for i in range(N_UNEVEN) if i not in CORRUPT]
    assert ev.epoch_skipped == ev.skipped == len(CORRUPT)


def test_truncated_shard_counts_missing_samples(uneven: Path) -> None:
    shard = uneven / "shard-000000.tar"  # ids 0..29
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    loader = eval_loader(uneven, 8)
    ids = [i for b in _epoch_ids(loader) for i in b]
    lost = set(range(N_UNEVEN)) - set(ids)
    assert lost and lost <= set(range(30))
    assert loader.skipped == len(lost)
    tl = train_loader(uneven, 8, num_workers=2)
    assert len(_epoch_ids(tl)) == len(tl)
    assert tl.epoch_skipped == len(lost)


def test_missing_shard_is_an_error(uneven: Path) -> None:
    (uneven / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="shard-000001"):
        _epoch_ids(eval_loader(uneven, 8))


# --------------------------------------------------------------------------- locations


def test_file_url_and_pipe_locations(uneven: Path) -> None:
    for location in (uneven.as_uri(), f"pipe:cat {uneven}/{{}}"):
        loader = eval_loader(location, 10)
        assert [i for b in _epoch_ids(loader) for i in b] == list(range(N_UNEVEN))


def test_index_errors_name_the_input(tmp_path: Path, uneven: Path) -> None:
    with pytest.raises(ValueError, match="nowhere"):
        ShardIndex.load(tmp_path / "nowhere")
    table = pq.read_table(uneven / "index.parquet")
    pq.write_table(table.slice(1), uneven / "index.parquet")
    with pytest.raises(ValueError, match="dense"):
        ShardIndex.load(uneven)
    with pytest.raises(ValueError, match="placeholder"):
        ShardIndex.load("pipe:cat index.parquet")


def test_index_contents(uneven: Path) -> None:
    index = ShardIndex.load(uneven)
    assert index.num_instances == N_UNEVEN
    assert index.shard_sizes == [30, 3, 1, 11]
    assert index.labels.tolist() == [i % 3 for i in range(N_UNEVEN)]
    assert index.id_shard[33] == 2 and index.id_pos[40] == 6
    assert index.classes == ("a", "b", "c")


def test_not_parquet_index_names_the_dataset(uneven: Path) -> None:
    (uneven / "index.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=f"bad index.parquet in {uneven}"):
        ShardIndex.load(uneven)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts Linux threads")
def test_loading_an_index_starts_no_thread(uneven: Path) -> None:
    """Arrow pools alive at exit can abort a CLI (apache/arrow#34314): start none."""
    code = (
        "import os, sys, pyarrow, torch\n"
        "from trainer.data import ShardIndex\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "ShardIndex.load(sys.argv[1])\n"
        "print(len(os.listdir('/proc/self/task')) - before)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(uneven)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


# --------------------------------------------------------------------------- decoding


def _saved(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_all_modes_become_rgb(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    wide = (np.arange(30, dtype=np.uint16).reshape(5, 6) * 2000).astype(np.uint16)
    encoded = {
        "L": _saved(base.convert("L"), "PNG"),
        "LA": _saved(base.convert("LA"), "PNG"),
        "RGBA": _saved(base.convert("RGBA"), "PNG"),
        "CMYK": _saved(base.convert("CMYK"), "JPEG"),
        "P": _saved(base.convert("P"), "PNG"),
        "P+transparency": _saved(base.convert("P"), "PNG", transparency=0),
        "1": _saved(base.convert("1"), "PNG"),
        "I;16": _saved(Image.fromarray(wide), "PNG"),
        "RGB": _saved(base, "PNG"),
    }
    for mode, data in encoded.items():
        image = decode_image(data)
        assert image.mode == "RGB", mode
        assert image.size == (6, 5), mode
    sixteen = np.asarray(decode_image(encoded["I;16"]))
    assert np.array_equal(sixteen[..., 0], (wide >> 8).astype(np.uint8))
    assert np.array_equal(sixteen[..., 0], sixteen[..., 2])
    assert to_rgb(Image.fromarray(wide.astype(np.int32), "I")).mode == "RGB"

    # Through the loader too: every mode ends as 3 channels.
    names = list(encoded)
    root = write_dataset(
        tmp_path / "modes",
        [list(range(len(names)))],
        sample=lambda iid, rec: {"__key__": rec["__key__"], "png": encoded[names[iid]], "cls": 0},
    )
    batches = list(eval_loader(root, len(names)))
    assert batches[0][0].shape == (len(names), 3, 5, 6)


def test_fast_jpeg_matches_pil() -> None:
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 51, 3), dtype=np.uint8))
    variants = [
        _saved(rgb, "JPEG", subsampling=0),
        _saved(rgb, "JPEG", subsampling=1),
        _saved(rgb, "JPEG", subsampling=2, quality=50),
        _saved(rgb, "JPEG", progressive=True),
        _saved(rgb.convert("L"), "JPEG"),
        _saved(rgb.convert("CMYK"), "JPEG"),
    ]
    for data in variants:
        reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert np.array_equal(np.asarray(decode_image(data)), reference)
        assert np.array_equal(np.asarray(decode_image(data, fast_jpeg=False)), reference)
    with pytest.raises(OSError):
        decode_image(variants[0][: len(variants[0]) // 2])


def test_batched_tensor_tail_is_bit_identical() -> None:
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)) for _ in range(6)]
    transform = build_transform("cifar", train=True)
    pil_part, tail = _TensorTail.split(transform)
    assert tail is not None
    torch.manual_seed(0)
    reference = torch.stack([transform(im) for im in images])
    torch.manual_seed(0)
    batched = tail([np.asarray(pil_part(im)) for im in images])
    assert torch.equal(batched, reference)
    assert _TensorTail.split(T.Compose([T.ToTensor(), T.Lambda(lambda x: x)]))[1] is None


def test_copy_of_dataset_is_readable_elsewhere(uneven: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(uneven, moved)
    assert [i for b in _epoch_ids(eval_loader(moved, 45)) for i in b] == list(range(N_UNEVEN))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile(tmp_path: Path, fmt: int) -> None:
    """Long names (GNU/pax), ustar prefixes, directories: same members as the stdlib."""
    path = tmp_path / "x.tar"
    members = {
        "000000001.png": b"a" * 700,
        "000000001.cls": b"1",
        "d" * 60 + "/" + "e" * 60 + "/000000002.png": b"b" * 512,
        "f" * 120 + "/000000003.jpg": b"",
    }
    with tarfile.open(path, "w", format=fmt) as tar:
        directory = tarfile.TarInfo("somedir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    got = []
    with open(path, "rb") as f:
        reader = _TarReader(f)
        while (member := reader.next_member()) is not None:
            got.append((member[0], reader.read_data(member[1])))
    assert got == expected


def test_builtin_prefix_beats_a_directory_of_that_name(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "digits").mkdir()
    monkeypatch.chdir(tmp_path)
    summary = make_shards("builtin:digits", tmp_path / "out", split="test")
    assert summary.num_instances == 360


def _index(labels, classes=(), meta=None):
    from trainer.data.index import DatasetLocation, ShardIndex

    labels = np.asarray(labels, dtype=np.int64)
    return ShardIndex(
        DatasetLocation("/nowhere"),
        ("shard-000000.tar",),
        (np.arange(len(labels)),),
        labels,
        np.zeros(len(labels), np.int32),
        np.arange(len(labels)),
        tuple(classes),
        meta or {},
    )


def test_the_number_of_classes_rule_lives_on_the_index():
    from trainer.data.index import ShardIndex

    assert _index([0, 1, 1], classes=("a", "b", "c")).num_classes == 3  # a class never seen
    assert _index([0, 4, -1]).num_classes == 5  # unnamed: one past the largest label
    assert _index([-1, -1]).num_classes == 1
    assert _index([]).num_classes == 1
    train, val = _index([0, 1]), _index([0, 6])
    assert ShardIndex.classes_of(train, val) == 7
    assert ShardIndex.classes_of(train, None) == 2


@pytest.mark.parametrize(
    ("meta", "preset"),
    [
        ({"source_type": "digits"}, "digits"),
        ({"source_type": "cifar10"}, "cifar"),
        ({"source_type": "imagefolder", "image_size_max": 32}, "cifar"),
        ({"source_type": "imagefolder", "image_size_max": 64}, "cifar"),
        ({"source_type": "imagefolder", "image_size_max": 65}, "imagenet"),
        ({}, "imagenet"),
    ],
)
def test_the_augmentation_preset_follows_the_images(meta, preset):
    assert _index([0], meta=meta).preset == preset


def test_read_image_bytes_returns_the_stored_files_of_any_ids(uneven):
    from trainer.data.segments import read_image_bytes

    index = ShardIndex.load(uneven)
    got = read_image_bytes(index, [44, 0, 31, 33, 31])
    assert sorted(got) == [0, 31, 33, 44]
    for i, data in got.items():
        assert data == _png(_color(i))  # the bytes TarWriter stored, not re-encoded
    assert read_image_bytes(index, []) == {}
    with pytest.raises(ValueError, match=r"ids \[45\] are outside \[0, 45\)"):
        read_image_bytes(index, [3, 45])


def test_read_image_bytes_names_a_damaged_or_mismatched_shard(uneven):
    from trainer.data.segments import read_image_bytes

    index = ShardIndex.load(uneven)
    last = uneven / "shard-000003.tar"
    last.write_bytes(last.read_bytes()[:4096])  # truncated after its first sample
    with pytest.raises(ValueError, match=r"shard-000003\.tar"):
        read_image_bytes(index, [44])
    assert read_image_bytes(index, [34]).keys() == {34}  # its first sample is intact
