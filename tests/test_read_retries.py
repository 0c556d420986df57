"""Shard reads from storage that fails now and then (issue 25): retried with backoff and
counted, ending where an undisturbed read ends; a shard that stays unreachable stops the
read with a line naming it, within a bounded time.

The storage is a real fsspec filesystem (``flaky://``: the local one whose files raise
``ConnectionError`` on a schedule), so the whole read path runs as it does on S3."""

from __future__ import annotations

import time
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem
from test_data import UNEVEN, _epoch_ids, write_dataset

from trainer.data import eval_loader, retrying
from trainer.data.retrying import RetryingReader, RetryPolicy, ShardUnreachableError

N = sum(len(ids) for ids in UNEVEN)


class _FlakyFile:
    def __init__(self, f, fs: FlakyFileSystem):
        self._f, self._fs = f, fs

    def read(self, size: int = -1) -> bytes:
        self._fs.reads += 1
        if self._fs.fail_every and self._fs.reads % self._fs.fail_every == 0:
            raise ConnectionError("connection reset by peer (flaky://)")
        return self._f.read(size)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class FlakyFileSystem(LocalFileSystem):
    """The local filesystem under ``flaky://``; every ``fail_every``-th read fails, and
    with ``down`` every open does."""

    protocol = "flaky"
    fail_every = 0
    down = False
    reads = 0

    def _open(self, path, mode="rb", **kwargs):
        if FlakyFileSystem.down:
            raise ConnectionError("no route to host (flaky://)")
        return _FlakyFile(super()._open(path, mode, **kwargs), FlakyFileSystem)

    @classmethod
    def _strip_protocol(cls, path):
        return LocalFileSystem._strip_protocol(str(path).replace("flaky://", "", 1))


@pytest.fixture
def flaky(tmp_path, monkeypatch):
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    monkeypatch.setattr(retrying, "POLICY", RetryPolicy(attempts=4, first_delay=0.01))
    monkeypatch.setattr(FlakyFileSystem, "fail_every", 0)
    monkeypatch.setattr(FlakyFileSystem, "down", False)
    monkeypatch.setattr(FlakyFileSystem, "reads", 0)
    root = write_dataset(tmp_path / "ds", UNEVEN)
    return root, "flaky://" + root.as_posix()


def test_a_reader_reopens_and_seeks_back_after_a_failed_read(tmp_path, monkeypatch) -> None:
    data = bytes(range(256)) * 40
    (tmp_path / "blob").write_bytes(data)
    opens = []

    def open_fn():
        opens.append(1)
        return _FlakyFile(open(tmp_path / "blob", "rb"), FlakyFileSystem)

    monkeypatch.setattr(FlakyFileSystem, "fail_every", 2)  # raw reads 2, 4, 6 fail
    monkeypatch.setattr(FlakyFileSystem, "reads", 0)
    before = retrying.retries()
    reader = RetryingReader("x://blob", open_fn, RetryPolicy(attempts=3, first_delay=0.0))
    got = reader.read(100) + reader.read(100)  # reopened at 100
    reader.seek(1000)
    got += reader.read(50)  # reopened at 1000
    reader.seek(-10, 1)
    got += reader.read(10)  # reopened at 1040
    assert got == data[:200] + data[1000:1050] + data[1040:1050]
    assert reader.tell() == 1050 and len(opens) == 4
    assert retrying.retries() - before == 3


def test_permanent_errors_are_not_retried(tmp_path) -> None:
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("no such object")

    with pytest.raises(FileNotFoundError):
        RetryingReader("x://gone", missing, RetryPolicy(attempts=5, first_delay=0.0))
    assert len(calls) == 1


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(attempts=6, first_delay=0.5, factor=2.0, max_delay=3.0)
    assert [policy.delay(i) for i in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_flaky_store_reads_every_sample_like_an_undisturbed_one(flaky, workers) -> None:
    root, url = flaky
    want = [i for b in _epoch_ids(eval_loader(str(root), 8, num_workers=workers)) for i in b]
    FlakyFileSystem.fail_every = 7
    before = retrying.retries()
    loader = eval_loader(url, 8, num_workers=workers)
    got = [i for b in _epoch_ids(loader) for i in b]
    assert got == want == list(range(N)) and loader.skipped == 0
    if workers == 0:  # worker processes count in their own process
        assert retrying.retries() > before


def test_a_shard_that_stays_unreachable_stops_with_its_name_in_bounded_time(flaky) -> None:
    _, url = flaky
    loader = eval_loader(url, 8)  # the index is read while the store answers
    FlakyFileSystem.down = True
    start = time.monotonic()
    with pytest.raises(ShardUnreachableError) as err:
        _epoch_ids(loader)
    assert f"{url}/shard-000000.tar: open failed 4 times" in str(err.value)
    assert "no route to host" in str(err.value) and "\n" not in str(err.value)
    assert time.monotonic() - start < 10


def test_local_files_are_not_wrapped(tmp_path: Path) -> None:
    from trainer.data.shard_files import open_url

    (tmp_path / "f").write_bytes(b"abc")
    with open_url(str(tmp_path / "f")) as f:
        assert not isinstance(f, RetryingReader) and f.read() == b"abc"
