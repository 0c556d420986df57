"""featurestore.files: the one URL rule and the one atomic-write helper of all packages."""

from __future__ import annotations

from pathlib import Path

import pytest

from featurestore.files import is_url, write_atomic, write_text_atomic


@pytest.mark.parametrize(
    ("location", "url"),
    [
        ("s3://bucket/shards", True),
        ("gs://b/x", True),
        ("file:///data/shards", True),
        ("http://127.0.0.1:8000/shards", True),
        ("pipe:cat /data/{}", True),
        ("/data/shards", False),
        ("data/shards", False),
        ("runs/a:b", False),
        ("C:\\data\\shards", False),
        ("c:/data", False),
        (Path("/tmp/x"), False),
        ("", False),
    ],
)
def test_what_counts_as_a_url(location, url):
    assert is_url(location) is url


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "weights.pt"
    target.write_bytes(b"good")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half_then_fail, suffix=".partial")
    assert target.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pt"]


def test_temporary_dirs_and_files_get_the_users_umask_not_0700(tmp_path):
    import os
    import stat

    from featurestore.files import make_temp_dir, umask

    old = os.umask(0o027)
    try:
        assert umask() == 0o027
        made = make_temp_dir(tmp_path, ".x-")
        write_text_atomic(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(made.stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o640
