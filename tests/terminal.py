"""Running a command on a real pseudo-terminal (``pty``), as a user's shell would."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_on_a_terminal(
    args: list[str],
    size: tuple[int, int],
    timeout: float,
    env: dict[str, str] | None = None,
    while_running: Callable[[int], None] | None = None,
) -> tuple[int, str]:
    """Run ``python args`` with stdin/stdout/stderr on a new pty of ``(rows, cols)``; returns
    the exit code and everything it wrote. ``env`` defaults to this process's with Ray on
    loopback; ``while_running(pid)`` is called about every 0.3 s until the output ends."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    if env is None:
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
               "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    env = {k: v for k, v in env.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=REPO, stdin=slave, stdout=slave, stderr=slave, env=env,
        start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    called = 0.0
    try:
        while time.monotonic() < deadline:
            if while_running is not None and time.monotonic() - called >= 0.3:
                while_running(proc.pid)
                called = time.monotonic()
            ready, _, _ = select.select([master], [], [], 0.3)
            if not ready:
                continue
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
