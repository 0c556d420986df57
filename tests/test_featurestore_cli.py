"""``python -m featurestore {start,status,snapshot,stop}`` as a user runs it against a
token-authenticated ``ray start --head`` on loopback: a named store outlives the command,
a training run with ``--store-name`` uses it and leaves it running, a snapshot restores
into another shard count, and a client without the token (or with another one, or with no
cluster at all) gets one line and exit 2 at once instead of Ray's 20-second retry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from generated_images import colour_class_folder
from ray_head import free_port, token_head

from trainer.shards.make import make_shards

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.ray, pytest.mark.slow]
N = 40


def _cli(env: dict[str, str], *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _store(env: dict[str, str], *args: str) -> dict:
    result = _cli(env, "-m", "featurestore", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    with token_head(tmp_path_factory.mktemp("fs-cache")) as running:
        yield running


def test_start_status_train_snapshot_restore_stop(head, tmp_path) -> None:
    env = head.env
    snaps = tmp_path / "snaps"
    started = _store(env, "start", "--name", "bank", "--rows", str(N), "--dim", "16",
                     "--snapshot-dir", str(snaps))  # fmt: skip
    assert started["num_rows"] == N and started["steps"] == 0 and started["num_shards"] == 1
    memory = started["shards"][0]["memory"]
    assert memory["rows_bytes"] == N * 16 * 4
    assert memory["process_peak_rss_bytes"] >= memory["process_rss_bytes"] > memory["rows_bytes"]
    taken = _cli(env, "-m", "featurestore", "start", "--name", "bank", "--rows", str(N))
    assert taken.returncode == 2 and "is running" in taken.stderr

    colour_class_folder(tmp_path / "src", N, seed=0)
    make_shards(tmp_path / "src", tmp_path / "shards", shard_size=20, progress=False)
    run = _cli(
        env, "-m", "trainer.run", "--store-name", "bank", "--data", str(tmp_path / "shards"),
        "--val-data", str(tmp_path / "shards"), "--output", str(tmp_path / "run"),
        "--arch", "small", "--low-dim", "16", "--batch-size", "8", "--epochs", "1",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert env["RAY_AUTH_TOKEN"] not in run.stdout + run.stderr  # the trainer never prints it
    status = _store(env, "status", "--name", "bank")  # still running after the run
    assert status["steps"] == N // 8 and status["last_snapshot_step"] == N // 8
    assert status["snapshot_dir"] == str(snaps)
    assert list((tmp_path / "run" / "snapshots").iterdir())  # the run's own copy

    snapshot = _store(env, "snapshot", "--name", "bank")
    assert snapshot["step"] == N // 8 and snapshot["snapshot"].startswith(str(snaps))
    restored = _store(env, "start", "--name", "bank2", "--restore", str(snaps), "--shards", "2")
    assert restored["num_shards"] == 2 and restored["steps"] == N // 8
    assert [s["rows"] for s in restored["shards"]] == [N // 2, N // 2]
    for name in ("bank", "bank2"):
        assert _store(env, "stop", "--name", name) == {"stopped": name}
    gone = _cli(env, "-m", "featurestore", "status", "--name", "bank")
    assert gone.returncode == 2 and "no feature store named 'bank'" in gone.stderr


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"RAY_AUTH_MODE": "", "RAY_AUTH_TOKEN": ""}, "uses token authentication"),
        ({"RAY_AUTH_TOKEN": "not-the-token"}, "refused this client's token"),
        ({"RAY_ADDRESS": f"127.0.0.1:{free_port()}"}, "no Ray cluster answers there"),
    ],
)
def test_a_client_without_the_cluster_or_its_token_gets_one_line_at_once(
    head, override, needle
) -> None:
    start = time.monotonic()
    result = _cli({**head.env, **override}, "-m", "featurestore", "status", "--name", "x")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr
    assert time.monotonic() - start < 15  # Ray alone retries for 20 s, then a traceback


def test_a_client_without_the_loopback_switch_reaches_a_loopback_head(head) -> None:
    """The head listens on 127.0.0.1 only; a client shell without
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 used to dial the host's IP and hang past 180 s."""
    env = {k: v for k, v in head.env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    start = time.monotonic()
    result = _cli(env, "-m", "featurestore", "status", "--name", "x", timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "no feature store named 'x'" in result.stderr
    assert time.monotonic() - start < 30


def test_a_snapshot_that_cannot_be_written_is_one_line_and_keeps_the_store(head) -> None:
    env = head.env
    _store(env, "start", "--name", "snapfail", "--rows", str(N), "--dim", "8", "--shards", "2")
    try:
        result = _cli(env, "-m", "featurestore", "snapshot", "--name", "snapfail", "--to",
                      "/proc/nope")  # fmt: skip
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1, result.stderr  # no Ray "Unhandled error"
        assert "snapshot of snapfail" in result.stderr and "/proc/nope" in result.stderr
        assert _store(env, "status", "--name", "snapfail")["num_rows"] == N
    finally:
        _store(env, "stop", "--name", "snapfail")


def test_help_loads_neither_torch_nor_ray() -> None:
    code = "import sys, featurestore.cli; print([m for m in ('torch', 'ray') if m in sys.modules])"
    assert _cli(dict(os.environ), "-c", code).stdout.strip() == "[]"
    result = _cli(dict(os.environ), "-m", "featurestore", "start", "--help")
    assert result.returncode == 0 and "--restore URI" in result.stdout


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["start", "--name", "b"], "exactly one of --rows N"),
        (["start", "--name", "b", "--rows", "0"], "must be an integer >= 1"),
        (["status"], "--name"),
        (["launch", "--name", "b"], "invalid choice"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(head, argv, needle) -> None:
    result = _cli(head.env, "-m", "featurestore", *argv)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and needle in result.stderr


def test_an_address_where_something_else_listens_is_one_line_in_seconds(head) -> None:
    """A web server at RAY_ADDRESS (a wrong port): Ray's own connect retried past 120 s."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        start = time.monotonic()
        result = _cli({**head.env, "RAY_ADDRESS": address}, "-m", "featurestore", "status",
                      "--name", "x", timeout=60)  # fmt: skip
    finally:
        server.shutdown()
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"RAY_ADDRESS={address}: something listens there but does not speak" in result.stderr
    assert time.monotonic() - start < 30


def test_a_started_store_listens_on_loopback_only_and_no_output_shows_the_token(head) -> None:
    """Every listening socket of the head's processes (GCS, raylet, agents, the workers
    that host the store's shard actors) while a 2-shard store runs; and neither the CLI nor
    a training run against it prints the cluster's token."""
    import psutil

    token = head.env["RAY_AUTH_TOKEN"]
    started = _cli(head.env, "-m", "featurestore", "start", "--name", "scan", "--rows", str(N),
                   "--dim", "8", "--shards", "2")  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        status = _cli(head.env, "-m", "featurestore", "status", "--name", "scan")
        listening = set()
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if head.temp_dir not in " ".join(proc.info["cmdline"] or []):
                    continue
                for p in [proc, *proc.children(recursive=True)]:
                    for conn in p.net_connections(kind="inet"):
                        if conn.status == psutil.CONN_LISTEN:
                            name = " ".join(p.cmdline()[:3])[:120]
                            listening.add((conn.laddr.ip, conn.laddr.port, name))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        names = " ".join(name for _, _, name in listening)
        assert "gcs_server" in names and "raylet" in names, sorted(listening)
        assert "ray::" in names, sorted(listening)  # the workers hosting the actors
        exposed = sorted(
            s for s in listening if s[0] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")
        )
        assert not exposed, f"listening beyond loopback: {exposed}"
        for result in (started, status):
            assert token not in result.stdout + result.stderr
    finally:
        _store(head.env, "stop", "--name", "scan")
