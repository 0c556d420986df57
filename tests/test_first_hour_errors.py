"""The error paths a new user met in the first hour (issue 26): one line naming the input and
exit 2, never a traceback or 30 lines of usage; help that shows each default once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _cli(
    *args: str, timeout: int = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env=env,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("where", "reason"),
    [("/proc/npid-nope", "No such file or directory"), ("FILE/sub", "Not a directory")],
)
def test_an_output_that_cannot_be_written_is_one_line_and_exit_2(tmp_path, where, reason):
    afile = tmp_path / "a-file"
    afile.write_text("not a directory")
    where = where.replace("FILE", str(afile))
    result = _cli("-m", "trainer.run", "--output", where, "--launcher", "local", "--epochs", "1")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == f"error: --output {where}: cannot write there ({reason})"


@pytest.mark.parametrize(
    ("module", "args", "needle"),
    [
        ("trainer.run", ["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
        ("trainer.run", ["--bogus"], "unrecognized arguments: --bogus"),
        ("trainer.make_shards", [], "the following arguments are required: src, out"),
        ("knn_service.serve", ["--run", "r", "--port", "x"], "--port"),
        ("featurestore", ["start"], "--name"),
    ],
)
def test_a_usage_error_is_one_line_with_a_pointer_to_help(module, args, needle):
    result = _cli("-m", module, *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert lines[0].endswith("--help)"), lines[0]


def test_help_shows_each_default_once_and_none_for_required_or_unset_options():
    start = " ".join(_cli("-m", "featurestore", "start", "--help").stdout.split())
    assert "(default: None)" not in start
    options = start.split("options:")[1].split(" --")
    assert all(text.count("default") <= 1 for text in options), options
    assert "--name NAME the store's name --namespace" in start
    assert "--seed SEED seed of the initial rows (default: 0)" in start
    serve = " ".join(_cli("-m", "knn_service.serve", "--help").stdout.split())
    for expected in ("port (0: any free port) (default: 8000)",
                     "largest k per query (default: 1000)",
                     "body limit (default: 8388608)",
                     "/refresh) (default: 0.0)"):  # fmt: skip
        assert expected in serve
    shards = " ".join(_cli("-m", "trainer.make_shards", "--help").stdout.split())
    assert "decode-verification threads (default min(8, cores))" in shards


def test_a_folder_of_images_as_data_is_told_to_write_shards_beside_it(tmp_path):
    images = tmp_path / "photos"
    (images / "cat").mkdir(parents=True)
    (images / "cat" / "0.jpg").write_bytes(b"\xff\xd8")
    result = _cli("-m", "trainer.run", "--data", str(images), "--output", str(tmp_path / "o"))
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip()
    assert line.count("\n") == 0 and "no index.parquet" in line
    assert f"python -m trainer.make_shards {images} {images}-shards" in line  # never into it
    assert f"--data {images}-shards" in line


def test_serve_names_a_missing_run_before_loading_anything(tmp_path):
    result = _cli("-X", "importtime", "-m", "knn_service.serve", "--run", str(tmp_path / "nope"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "import time:" not in line]
    assert lines == [f"python -m knn_service.serve: --run {tmp_path / 'nope'}: no such directory"]
    assert " torch" not in result.stderr and " faiss" not in result.stderr  # nothing loaded


def test_serve_reports_a_busy_port_before_loading_the_bank(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _cli("-m", "knn_service.serve", "--snapshot", str(tmp_path), "--port", str(port))
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"python -m knn_service.serve: cannot listen on 127.0.0.1:{port}:")
    ), result.stderr  # an empty snapshot folder would fail later, once loading began


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7", "::"])
def test_serve_refuses_a_non_loopback_address_without_a_token(tmp_path, host):
    env = {k: v for k, v in os.environ.items() if k != "NPID_API_TOKEN"}
    result = _cli("-m", "knn_service.serve", "--snapshot", str(tmp_path), "--host", host, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"python -m knn_service.serve: --host {host} is not loopback: set NPID_API_TOKEN "
        "(clients then send 'Authorization: Bearer <token>') or pass --insecure to serve it open"
    ]


def test_serve_with_a_token_or_insecure_gets_past_the_open_door_check(tmp_path):
    """Both pass the check and fail later, at the empty snapshot folder, never printing
    the token."""
    for env_extra, flags in (({"NPID_API_TOKEN": "s3cret-token"}, []), ({}, ["--insecure"])):
        env = {**{k: v for k, v in os.environ.items() if k != "NPID_API_TOKEN"}, **env_extra}
        result = _cli("-m", "knn_service.serve", "--snapshot", str(tmp_path), "--host",
                      "0.0.0.0", "--port", "0", *flags, env=env)  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert "is not loopback" not in result.stderr and "s3cret-token" not in result.stderr
