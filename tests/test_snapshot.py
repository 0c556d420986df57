"""Snapshot files and manifests (plain pyarrow + fsspec, no Ray)."""

from __future__ import annotations

import itertools
import json
import uuid

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featurestore import snapshot
from featurestore.bank_shard import initial_rows

N, D = 50, 4


def write_snapshot(uri, rows, bounds, step=3, z=12.5, batch_rows=7, store_id="s1", created=None):
    """A complete snapshot of ``rows`` split at ``bounds`` (row groups of ``batch_rows``)."""
    num_shards = len(bounds) - 1
    files = [
        snapshot.write_shard_file(
            uri, s, num_shards, lo, rows[lo:hi], {"step": step}, batch_rows=batch_rows
        )
        for s, (lo, hi) in enumerate(itertools.pairwise(bounds))
    ]
    manifest = snapshot.Manifest(
        uri=uri,
        num_rows=rows.shape[0],
        dim=rows.shape[1],
        dtype=str(rows.dtype).replace("torch.", ""),
        momentum=0.5,
        seed=1,
        z=z,
        step=step,
        bounds=list(bounds),
        files=files,
        created=snapshot.wall_time() if created is None else created,
        store_id=store_id,
        name="bank",
    )
    snapshot.write_manifest(manifest)
    return manifest


@pytest.fixture
def rows():
    return initial_rows(0, 0, N, D, normalize=True)


@settings(max_examples=25, deadline=None)
@given(
    cuts=st.lists(st.integers(1, N - 1), max_size=4, unique=True),
    ranges=st.lists(st.tuples(st.integers(0, N), st.integers(0, N)), min_size=1, max_size=5),
)
def test_any_range_reads_back_from_any_split(tmp_path_factory, cuts, ranges):
    rows = initial_rows(1, 0, N, D)
    bounds = [0, *sorted(cuts), N]
    uri = str(tmp_path_factory.mktemp("snap") / "s")
    manifest = write_snapshot(uri, rows, bounds)
    for a, b in ranges:
        lo, hi = min(a, b), max(a, b)
        out = torch.full((hi - lo, D), float("nan"))
        snapshot.read_rows(manifest, lo, hi, out)
        assert torch.equal(out, rows[lo:hi])


def test_files_are_plain_parquet(tmp_path, rows):
    uri = str(tmp_path / "snap")
    write_snapshot(uri, rows, [0, 20, N], step=9, z=3.25)
    path = tmp_path / "snap" / "shard-00001-of-00002.parquet"
    table = pq.read_table(path)
    assert table.column_names == ["id", "vector"]
    assert table.column("id").to_pylist() == list(range(20, N))
    assert pq.ParquetFile(path).metadata.num_row_groups == 5  # 30 rows in groups of 7
    meta = {k.decode(): json.loads(v) for k, v in table.schema.metadata.items()}
    assert meta["dim"] == D and meta["step"] == 9 and (meta["lo"], meta["hi"]) == (20, N)
    frame = pd.read_parquet(tmp_path / "snap" / "shard-00000-of-00002.parquet")
    assert list(frame["id"]) == list(range(20))
    assert torch.equal(torch.tensor(np.stack(frame["vector"].to_list())), rows[:20])
    manifest = json.loads((tmp_path / "snap" / "manifest.json").read_text())
    assert manifest["z"] == 3.25 and manifest["bounds"] == [0, 20, N]
    assert [f["path"] for f in manifest["files"]] == [
        "shard-00000-of-00002.parquet",
        "shard-00001-of-00002.parquet",
    ]
    assert not [p for p in (tmp_path / "snap").iterdir() if ".tmp" in p.name]


def test_bfloat16_rows_round_trip_exactly(tmp_path):
    rows = initial_rows(2, 0, N, D, dtype=torch.bfloat16)
    manifest = write_snapshot(str(tmp_path / "bf"), rows, [0, N])
    out = torch.empty(N, D, dtype=torch.bfloat16)
    snapshot.read_rows(manifest, 0, N, out)
    assert torch.equal(out, rows)
    file = pq.ParquetFile(tmp_path / "bf" / "shard-00000-of-00001.parquet")
    assert file.metadata.row_group(0).column(1).compression == "LZ4"  # 16-bit: compressed


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_urls(tmp_path, rows, scheme):
    memory = f"memory://npid-{uuid.uuid4().hex[:8]}"
    base = memory if scheme == "memory" else f"file://{tmp_path}"
    write_snapshot(snapshot.join(base, "step-000000001"), rows, [0, 10, N], step=1, created=1.0)
    write_snapshot(snapshot.join(base, "step-000000002"), rows * 2, [0, N], step=2, created=2.0)
    latest = snapshot.latest_snapshot(base)
    assert latest == snapshot.join(base, "step-000000002")
    manifest = snapshot.read_manifest(latest)
    out = torch.empty(N, D)
    snapshot.read_rows(manifest, 0, N, out)
    assert torch.equal(out, rows * 2)
    batches = list(snapshot.iter_batches(snapshot.read_manifest(snapshot.resolve(base))))
    assert sum(b.num_rows for b in batches) == N
    if scheme == "memory":
        fsspec.filesystem("memory").rm(base.removeprefix("memory://"), recursive=True)


def test_latest_skips_incomplete_and_prune_keeps_last(tmp_path, rows):
    base = str(tmp_path)
    assert snapshot.latest_snapshot(base) is None
    assert snapshot.latest_snapshot(str(tmp_path / "missing")) is None
    for step in (1, 2, 3):
        write_snapshot(snapshot.join(base, f"step-{step:09d}"), rows, [0, N], step=step)
    # an interrupted snapshot: shard files written, manifest never committed
    partial = snapshot.join(base, "step-000000004")
    snapshot.write_shard_file(partial, 0, 1, 0, rows, {})
    assert snapshot.latest_snapshot(base) == snapshot.join(base, "step-000000003")
    assert snapshot.resolve(base) == snapshot.join(base, "step-000000003")
    with pytest.raises(FileNotFoundError, match="step-000000004"):
        snapshot.resolve(partial)
    assert snapshot.new_snapshot_uri(base, 3) == snapshot.join(base, "step-000000003-1")
    assert snapshot.new_snapshot_uri(base, 5) == snapshot.join(base, "step-000000005")
    # another store's snapshot is neither picked for store s1 nor pruned by it
    write_snapshot(snapshot.join(base, "step-000000009"), rows, [0, N], step=9, store_id="s2")
    assert snapshot.latest_snapshot(base, store_id="s1").endswith("step-000000003")
    snapshot.prune_snapshots(base, keep=2, store_id="s1")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["step-000000002", "step-000000003", "step-000000004", "step-000000009"]
    write_snapshot(snapshot.join(base, "step-000000005"), rows, [0, N], step=5)
    snapshot.prune_snapshots(base, keep=2, store_id="s1")  # the stale partial goes too
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["step-000000003", "step-000000005", "step-000000009"]


def test_missing_half_written_and_corrupt_snapshots(tmp_path, rows):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        snapshot.read_manifest(str(tmp_path / "nowhere"))
    uri = str(tmp_path / "snap")
    manifest = write_snapshot(uri, rows, [0, 25, N])
    assert snapshot.read_manifest(snapshot.join(uri, "manifest.json")).uri == uri
    snapshot.check_files(manifest)
    second = tmp_path / "snap" / "shard-00001-of-00002.parquet"
    data = second.read_bytes()

    second.unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001-of-00002"):
        snapshot.check_files(manifest)
    out = torch.empty(N, D)
    snapshot.read_rows(manifest, 0, 25, out[:25])  # rows of the intact file still read
    with pytest.raises(FileNotFoundError, match="shard-00001-of-00002"):
        snapshot.read_rows(manifest, 0, N, out)

    second.write_bytes(b"garbage" * 100)
    with pytest.raises(ValueError, match=r"shard-00001-of-00002.*corrupt"):
        snapshot.check_files(manifest)
    second.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="corrupt"):
        snapshot.check_files(manifest)

    other = str(tmp_path / "other")
    write_snapshot(other, rows[:30], [0, 30])
    second.write_bytes((tmp_path / "other" / "shard-00000-of-00001.parquet").read_bytes())
    with pytest.raises(ValueError, match="has 30 rows, the manifest says 25"):
        snapshot.check_files(manifest)

    (tmp_path / "snap" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        snapshot.read_manifest(uri)
    (tmp_path / "snap" / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="does not hold"):
        snapshot.read_manifest(uri)
    with pytest.raises(ValueError, match="inside"):
        snapshot.read_rows(manifest, 10, N + 1, torch.empty(N + 1 - 10, D))


def test_manifest_validation(tmp_path, rows):
    files = [snapshot.ShardFile("a", 0, 10), snapshot.ShardFile("b", 11, N)]
    manifest = snapshot.Manifest(str(tmp_path), N, D, "float32", 0.5, 0, None, 0, [0, 10, N], files)
    with pytest.raises(ValueError, match="do not cover"):
        manifest.validate()
    manifest.files = [snapshot.ShardFile("a", 0, 10)]
    with pytest.raises(ValueError, match="cover"):
        manifest.validate()
    manifest.files = [snapshot.ShardFile("a", 0, N)]
    with pytest.raises(FileNotFoundError, match="shard file missing"):
        snapshot.write_manifest(manifest)  # refuses to commit without its files
    assert not (tmp_path / "manifest.json").exists()
