"""Progress bars on a terminal, under both launchers, and a quiet Ray run.

A run is started on a real pseudo-terminal (``pty``), as a user's shell would: the local
launcher on one that reports 0 x 0 (what ``script`` and some CI ptys give, where tqdm alone
drew nothing), the Ray launcher on a 120 x 30 one, where the worker's bar is drawn by the
driver. A default Ray run must not print Ray Train's per-epoch lines.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from trainer.launch.progress import is_terminal, terminal_bar, terminal_shape

REPO = Path(__file__).resolve().parent.parent


def _run_on_a_terminal(args: list[str], size: tuple[int, int], timeout: float) -> tuple[int, str]:
    """Run ``python args`` with stdin/stdout/stderr on a new pty of ``(rows, cols)``; returns
    the exit code and everything it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=REPO, stdin=slave, stdout=slave, stderr=slave, env=env,
        start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the pty
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def test_terminal_shape_is_never_zero(monkeypatch):
    monkeypatch.setenv("COLUMNS", "0")
    monkeypatch.setenv("LINES", "0")
    columns, lines = terminal_shape()
    assert columns > 0 and lines > 0


def test_a_bar_off_a_terminal_is_silent_and_passes_every_item(capsys):
    assert not is_terminal()  # pytest captures stderr
    bar = terminal_bar(range(7), desc="x", unit="it")
    assert list(bar) == list(range(7))
    bar.set_postfix(loss="1.0")
    bar.close()
    assert capsys.readouterr().err == ""


def test_the_local_launcher_shows_a_bar_on_a_terminal_that_reports_no_size(tmp_path):
    code, out = _run_on_a_terminal(
        ["-m", "trainer.run", "--launcher", "local", "--epochs", "2",
         "--output", str(tmp_path / "run")],
        size=(0, 0), timeout=300,
    )  # fmt: skip
    assert code == 0, out[-3000:]
    assert re.search(r"epoch 1/2: +\d+%\|", out), out[-3000:]
    assert "batch/s" in out and "loss=" in out


def test_a_ray_run_draws_the_workers_bar_on_the_drivers_terminal_and_no_ray_train_lines(
    tmp_path,
):
    code, out = _run_on_a_terminal(
        ["-m", "trainer.run", "--epochs", "2", "--output", str(tmp_path / "run")],
        size=(30, 120), timeout=400,
    )  # fmt: skip
    assert code == 0, out[-3000:]
    assert re.search(r"epoch [12]/2.*\d+%\|", out), out[-3000:]
    for noise in (
        "Reporting training result",  # Ray Train, twice an epoch before
        "Checkpoint successfully created",
        "Requesting resources",
        "snapshot at step",  # the store, once an epoch
    ):
        assert noise not in out, noise
    # tqdm_ray's own state print reached the console as an empty worker line
    assert not re.search(r"\(RayTrainWorker pid=\d+\)\x1b\[0m *\r?\n", out)
    epochs = re.findall(r"npid \{'epoch': (\d+)", out)
    assert epochs[:3] == ["0", "1", "2"], out[-3000:]
