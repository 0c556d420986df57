"""Snapshots to object storage that fails transiently: moto's S3 server behind a proxy on
127.0.0.1 that answers the next ``n`` PUTs with HTTP 500 (botocore's own retries off, so
every failure reaches npid). Each file write is retried after 0.5, 1, 2 s and counted; a
store that keeps failing fails the write in one error naming the file, and the previous
snapshot stays the latest, whole and loadable. No Ray: the snapshot functions the shards
and the coordinator call."""

from __future__ import annotations

import http.client
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fsspec
import pytest
import torch

from featurestore import snapshot, write_retries

D = 8
ROWS = torch.nn.functional.normalize(torch.randn(30, D, generator=torch.Generator().manual_seed(0)))


class FlakyProxy:
    """Forwards every request to ``upstream``; the next ``fail_writes`` PUT requests (the
    uploads and copies a snapshot makes) get ``500 InternalError`` instead."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.fail_writes = 0
        self.failed = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if "chunked" not in self.headers.get("Transfer-Encoding", ""):
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                out = b""
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    out += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()  # the blank line after the last chunk
                return out

            def _forward(self) -> None:
                body = self._body()
                with proxy.lock:
                    fail = self.command == "PUT" and proxy.fail_writes > 0
                    if fail:
                        proxy.fail_writes -= 1
                        proxy.failed += 1
                if fail:
                    reply = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError"
                             b"</Code><Message>injected</Message></Error>")  # fmt: skip
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                    return
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                skip = ("expect", "transfer-encoding", "content-length")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                length = answer.getheader("Content-Length", "0")  # a HEAD: the object's size
                self.send_header(
                    "Content-Length", length if self.command == "HEAD" else str(len(data))
                )
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky_s3(s3_server):
    """``(proxy, snapshot dir URL)``: ``s3://`` through the proxy for this test."""
    proxy = FlakyProxy(s3_server["AWS_ENDPOINT_URL"])
    saved = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {
        "client_kwargs": {"endpoint_url": proxy.url},
        "config_kwargs": {"retries": {"total_max_attempts": 1}},  # botocore: no retries of its own
        "skip_instance_cache": True,
    }
    try:
        yield proxy, f"s3://npid/snaps-{uuid.uuid4().hex[:8]}"
    finally:
        if saved is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved
        proxy.close()


def write_snapshot(directory: str, step: int, rows: torch.Tensor, on_retry=None) -> str:
    """Two shard files and the manifest, as the shards and the coordinator write them."""
    uri = snapshot.new_snapshot_uri(directory, step)
    half = len(rows) // 2
    fields = {"num_rows": len(rows), "dim": D, "dtype": "float32", "momentum": 0.5, "seed": 0,
              "z": None, "step": step, "bounds": [0, half, len(rows)], "store_id": "s",
              "name": "s"}  # fmt: skip
    files = [
        snapshot.write_shard_file(uri, s, 2, lo, rows[lo:hi], fields, on_retry=on_retry)
        for s, (lo, hi) in enumerate([(0, half), (half, len(rows))])
    ]
    manifest = snapshot.Manifest(uri=uri, files=files, created=snapshot.wall_time(), **fields)
    snapshot.write_manifest(manifest, on_retry=on_retry)
    return uri


def read_back(uri: str) -> torch.Tensor:
    manifest = snapshot.read_manifest(uri)
    return snapshot.read_rows(manifest, 0, manifest.num_rows, torch.empty(manifest.num_rows, D))


def test_transient_write_failures_are_retried_with_backoff_and_counted(flaky_s3, caplog):
    proxy, directory = flaky_s3
    retries = []
    proxy.fail_writes = 3
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="featurestore.write_retries"):
        uri = write_snapshot(directory, 1, ROWS, on_retry=lambda: retries.append(1))
    took = time.monotonic() - start
    assert proxy.failed == 3 and len(retries) == 3
    assert took >= 0.5 + 1.0 + 2.0 - 0.1  # three consecutive failures of one write: backoff
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split("; ")[-1] for line in lines] == [
        "retry 1/3 in 0.5 s", "retry 2/3 in 1.0 s", "retry 3/3 in 2.0 s"
    ]  # fmt: skip
    assert all("shard-00000-of-00002.parquet" in line for line in lines), lines
    assert snapshot.latest_snapshot(directory) == snapshot.resolve(uri)
    torch.testing.assert_close(read_back(uri), ROWS, rtol=0, atol=0)


def test_a_store_that_keeps_failing_fails_one_write_and_keeps_the_previous(flaky_s3):
    proxy, directory = flaky_s3
    first = write_snapshot(directory, 1, ROWS)
    proxy.fail_writes = 1000
    retries = []
    with pytest.raises(OSError) as err:
        write_snapshot(directory, 2, ROWS * 0, on_retry=lambda: retries.append(1))
    message = str(err.value)
    assert "\n" not in message and "shard-00000-of-00002.parquet" in message, message
    assert f"failed {write_retries.ATTEMPTS} times" in message
    assert len(retries) == write_retries.ATTEMPTS - 1
    proxy.fail_writes = 0
    assert [m.step for m in snapshot.list_snapshots(directory)] == [1]
    torch.testing.assert_close(read_back(first), ROWS, rtol=0, atol=0)


def test_permanent_and_local_errors_are_not_retried(tmp_path):
    calls = []

    def denied():
        calls.append(1)
        raise PermissionError("denied")

    with pytest.raises(PermissionError):
        write_retries.retrying("x", denied, remote=True, backoff_s=0)
    with pytest.raises(OSError, match="No space"):
        write_retries.retrying(
            "y", lambda: calls.append(2) or (_ for _ in ()).throw(OSError(28, "No space")),
            remote=False, backoff_s=0,
        )  # fmt: skip
    assert calls == [1, 2]
    assert write_retries.transient(OSError(121, "remote")) and write_retries.transient(
        TimeoutError()
    )
    assert not write_retries.transient(FileNotFoundError()) and not write_retries.transient(
        ValueError()
    )
