"""A default Ray run, as a user starts it on a terminal (a real pty of 120 x 30).

- A local Ray that npid starts listens on loopback only, and so does the training workers'
  torch rendezvous: every listening socket of the run (the driver and every process under
  it: GCS, raylet, agents, dashboard, the store's shard actor, the Ray Train workers) is
  sampled while it trains.
- Its log has no error-level line (Ray Train's preemption watcher logged one on a
  one-machine Ray) and none of Ray Train's per-epoch lines.
- The worker's progress bar is drawn by the driver on that terminal.
- Another Ray runs on the machine (a token-authenticated head): the run starts its own and
  is not confused by the other (Ray Train's placement-group cleaner asked the state API for
  "the" cluster and printed "Found multiple active Ray instances").

One run checks all four (a Ray run costs about a minute on 2 cores)."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import psutil
import pytest
from ray_head import token_head
from terminal import run_on_a_terminal

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listening(root: psutil.Process) -> set[tuple[str, int, str]]:
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = " ".join(proc.cmdline()[:3])[:120]
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port, name))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture(scope="module")
def other_ray(tmp_path_factory):
    """Another Ray on this machine: a token-authenticated head on loopback."""
    with token_head(tmp_path_factory.mktemp("other-ray-cache")) as running:
        yield running


@pytest.mark.ray
def test_a_default_run_on_a_terminal_listens_on_loopback_only_and_draws_a_quiet_bar(
    other_ray, tmp_path
):
    env = {  # a user's shell: none of the test session's Ray settings, no token
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")
        and not k.startswith("RAY_AUTH")
    }
    seen: set[tuple[str, int, str]] = set()

    def sample(pid: int) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            seen.update(_listening(psutil.Process(pid)))

    args = ["-m", "trainer.run", "--epochs", "3", "--num-workers", "2",
            "--output", str(tmp_path / "run")]  # fmt: skip
    code, out = run_on_a_terminal(args, (30, 120), timeout=400, env=env, while_running=sample)
    assert code == 0, out[-3000:]
    names = " ".join(name for _, _, name in seen)
    assert "gcs_server" in names and "raylet" in names, sorted(seen)
    assert "RayTrainWorker" in names, sorted(seen)  # sampled while the workers trained
    exposed = sorted(s for s in seen if s[0] not in LOOPBACK)
    assert not exposed, f"listening beyond loopback: {exposed}"
    errors = [line for line in out.splitlines() if re.search(r"\d E \d+ \d+\]|\bERROR\b", line)]
    assert not errors, errors  # a default run logs no error-level line
    # beside the other Ray: its own instance, not confused by the other one
    assert "started a local Ray instance on 127.0.0.1" in out, out[-3000:]
    assert "Found multiple active Ray instances" not in out and "Traceback" not in out
    # the worker's bar, on the driver's terminal
    assert re.search(r"epoch [123]/3.*\d+%\|", out), out[-3000:]
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
    assert epochs[:4] == ["0", "1", "2", "3"], out[-3000:]


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:6379", True),
        ("127.1.2.3:10001", True),
        ("localhost:6379", True),
        ("[::1]:6379", True),
        ("ray://127.0.0.1:10001", True),
        ("192.0.2.2:6379", False),
        ("head.example:6379", False),
        ("auto", False),
        ("127.0.0.1", False),  # no port: left to Ray
    ],
)
def test_is_loopback_names_only_this_machines_loopback(address, expected) -> None:
    from featurestore.ray_connect import is_loopback

    assert is_loopback(address) is expected
