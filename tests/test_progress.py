"""Progress bars on a terminal.

A run is started on a real pseudo-terminal (``pty``), as a user's shell would: the local
launcher on one that reports 0 x 0 (what ``script`` and some CI ptys give, where tqdm alone
drew nothing). The Ray launcher's bar, drawn by the driver for the worker, is checked on the
default Ray run of ``test_loopback.py`` (one Ray run for both).
"""

from __future__ import annotations

import re

from terminal import run_on_a_terminal

from trainer.launch.progress import is_terminal, terminal_bar, terminal_shape


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
    code, out = run_on_a_terminal(
        ["-m", "trainer.run", "--launcher", "local", "--epochs", "2",
         "--output", str(tmp_path / "run")],
        size=(0, 0), timeout=300,
    )  # fmt: skip
    assert code == 0, out[-3000:]
    assert re.search(r"epoch 1/2: +\d+%\|", out), out[-3000:]
    assert "batch/s" in out and "loss=" in out
