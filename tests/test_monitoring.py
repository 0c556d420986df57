"""Monitoring end to end: a real Prometheus scrapes a short local training run.

``python -m trainer.run`` (2 workers, 2 store shards, tiny generated shards) starts its own
Ray instance in a private temp dir (``RAY_TMPDIR``); a Prometheus server, configured from
the shipped ``deploy/prometheus/prometheus.yml`` with only the dashboard address, the token
file and the intervals rewritten, finds it through Ray's HTTP service discovery (the
dashboard of the session running now, whatever its temp dir). While the run
goes on, the test polls Prometheus's HTTP API (instant queries, i.e. what a dashboard shows
now) until every check has held once, then stops everything. All on 127.0.0.1, ports chosen
at runtime. Needs the ``prometheus`` binary (Debian's package; ``.ci/run`` installs it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from generated_images import colour_class_folder

REPO = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
SD_URL = "http://127.0.0.1:8265/api/prometheus/sd"  # the dashboard's default address
DASHBOARD_RE = re.compile(r"http://127\.0\.0\.1:(\d+)")  # in ray.init's "View the dashboard"
NUM_TRAIN = 64  # training instances = bank rows
POLL_SECONDS = 90.0  # bound on polling from the trainer's start (Ray + Ray Train start: ~40 s)
GRACE_SECONDS = 30.0  # once training shows up in Prometheus, the time every check gets
EPOCHS = 25  # an upper bound: the run is stopped as soon as every check has held

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="no `prometheus` binary on PATH (Debian: apt-get install prometheus; "
        ".ci/run installs it)",
    ),
]

Result = list[dict[str, Any]]  # a Prometheus instant vector: [{"metric": {...}, "value": [t, v]}]


@dataclass
class Check:
    """One PromQL instant query and what its result must satisfy at least once."""

    name: str
    query: str
    ok: Callable[[Result], bool]
    passed: bool = False
    passed_at: float | None = None  # seconds after the trainer started
    last: Result | None = field(default=None, repr=False)


def _values(result: Result) -> list[float]:
    return [float(series["value"][1]) for series in result]


def _by(label: str, result: Result) -> dict[str, float]:
    return {series["metric"].get(label, ""): float(series["value"][1]) for series in result}


def _checks() -> list[Check]:
    """The plausibility checks of the issue, on Ray's exported names (``ray_`` prefix)."""
    return [
        Check("ray targets up", 'up{job="ray"}', lambda r: bool(r) and min(_values(r)) == 1),
        Check(
            "images trained",
            "sum(ray_npid_train_images_total)",
            lambda r: bool(r) and _values(r)[0] > 0,
        ),
        Check(
            "loss finite and positive",
            "ray_npid_train_loss",
            lambda r: bool(r) and all(math.isfinite(v) and v > 0 for v in _values(r)),
        ),
        Check(
            "step time histogram",
            "sum(ray_npid_train_step_seconds_count)",
            lambda r: bool(r) and _values(r)[0] > 0,
        ),
        Check("epoch gauge", "max(ray_npid_train_epoch)", lambda r: bool(r) and _values(r)[0] >= 1),
        Check(
            "kNN top-1 is a fraction",
            "ray_npid_knn_top1",
            lambda r: bool(r) and all(0 <= v <= 1 for v in _values(r)),
        ),
        Check(
            "store step requests on both shards",
            'sum by (shard) (ray_npid_store_requests_total{op="step"})',
            lambda r: set(_by("shard", r)) == {"0", "1"} and min(_by("shard", r).values()) > 0,
        ),
        Check(
            "store rows add up to the training set",
            "sum by (shard) (ray_npid_store_rows)",
            lambda r: set(_by("shard", r)) == {"0", "1"} and sum(_values(r)) == NUM_TRAIN,
        ),
    ]


# ---------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str, timeout: float = 3.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def _query(base: str, promql: str) -> Result:
    body = _get_json(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
    if body.get("status") != "success":
        raise RuntimeError(f"query {promql!r} failed: {body}")
    return body["data"]["result"]


def _training_under_way(base: str) -> bool:
    """Whether Prometheus has scraped a positive image count yet."""
    images = _values(_query(base, "sum(ray_npid_train_images_total)"))
    return bool(images) and images[0] > 0


def _make_shards(root: Path) -> dict[str, Path]:
    """64 train / 24 test images (16×16 RGB, 4 classes), 2 webdataset shards for training."""
    from trainer.shards.make import make_shards

    out = {}
    for split, n, seed in (("train", NUM_TRAIN, 0), ("test", 24, 1)):
        src = colour_class_folder(root / f"src-{split}", n, seed)
        make_shards(src, root / split, shard_size=NUM_TRAIN // 2, progress=False)
        out[split] = root / split
    return out


def prometheus_config(dashboard: str, token_file: Path, interval: str = "1s") -> dict[str, Any]:
    """The shipped config, discovering the Ray instance whose dashboard is at ``dashboard``
    (``host:port``) with the token in ``token_file``, scraping every ``interval``.

    Only the ``ray`` job is kept (the kNN service is not part of this test); its discovery
    URL must be Ray's default dashboard address and is moved to ``dashboard``.
    """
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "ray"]
    assert len(jobs) == 1, "deploy/prometheus/prometheus.yml: no single `ray` scrape job"
    (sd,) = jobs[0]["http_sd_configs"]
    assert sd["url"] == SD_URL, sd
    sd["url"] = f"http://{dashboard}/api/prometheus/sd"
    sd["authorization"]["credentials_file"] = str(token_file)
    sd["refresh_interval"] = interval
    config["global"].update(
        scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval
    )
    config["scrape_configs"] = jobs
    return config


def _dashboard_of(trainer_log: Path, trainer: subprocess.Popen, timeout: float = 90) -> str:
    """``127.0.0.1:port`` of the dashboard the trainer's Ray logged it started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and trainer.poll() is None:
        found = DASHBOARD_RE.search(trainer_log.read_text())
        if found:
            return f"127.0.0.1:{found.group(1)}"
        time.sleep(0.5)
    raise RuntimeError(f"no dashboard address in the trainer log:\n{trainer_log.read_text()}")


def _ray_token(path: Path) -> Path:
    """The token a new local Ray uses (Ray writes ``~/.ray/auth_token`` on first use), in a
    file for Prometheus; empty when there is none (no token authentication)."""
    source = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    path.write_text(source.read_text().strip() if source.is_file() else "")
    return path


def _start_prometheus(config_file: Path, data: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """Start Prometheus on a free loopback port; returns the process and its base URL."""
    for _attempt in range(3):
        port = _free_port()
        with log.open("a") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={data}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return proc, base
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        _stop(proc)  # the port was taken in between, or it never became ready: try again
    raise RuntimeError(f"prometheus did not start:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def _stop_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Interrupt the trainer's process group (a clean Ray shutdown), then kill it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=timeout)


def _kill_leftovers(marker: str) -> None:
    """Kill Ray processes of this test's instance (their command lines name its temp dir)."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and marker in " ".join(p.info["cmdline"] or []):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


@dataclass
class Observed:
    """What the polling saw: the checks (passed or not) and logs for failure messages."""

    checks: dict[str, Check]
    seconds: float
    trainer_log: Path
    prometheus_log: Path
    targets: Any

    def explain(self, name: str) -> str:
        check = self.checks[name]
        held = {c.name: round(c.passed_at or 0, 1) for c in self.checks.values() if c.passed}
        return (
            f"{name}: never held in {self.seconds:.0f} s; query {check.query!r}, "
            f"last result {json.dumps(check.last)}\nchecks that held (s after start): {held}"
            f"\ntargets: {json.dumps(self.targets)[:2000]}"
            f"\n--- trainer log (tail) ---\n{self.trainer_log.read_text()[-3000:]}"
            f"\n--- prometheus log (tail) ---\n{self.prometheus_log.read_text()[-2000:]}"
        )


# ---------------------------------------------------------------------------- the run


def _poll(base: str, trainer: subprocess.Popen, checks: dict[str, Check]) -> None:
    """Query every check once a second until all held, the run ended or time ran out.

    Checks count only once training is under way (images counted), so a value seen only
    at start-up does not pass for one that is kept current; from then on they get
    ``GRACE_SECONDS``.
    """
    started, under_way = time.monotonic(), None
    deadline = started + POLL_SECONDS
    while time.monotonic() < deadline and not all(c.passed for c in checks.values()):
        running = trainer.poll() is None
        try:
            if _training_under_way(base):
                if under_way is None:
                    under_way = time.monotonic()
                    deadline = min(deadline, under_way + GRACE_SECONDS)
                for check in checks.values():
                    if not check.passed:
                        check.last = _query(base, check.query)
                        check.passed = check.ok(check.last)
                        if check.passed:
                            check.passed_at = time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # Prometheus busy for a moment; poll again
        if not running:
            return  # the run is over (its Ray instance is gone): nothing new to scrape
        time.sleep(1.0)


def _trainer_command(shards: dict[str, Path], output: Path) -> list[str]:
    return [
        sys.executable, "-m", "trainer.run",
        "--data", str(shards["train"]), "--val-data", str(shards["test"]),
        "--output", str(output), "--arch", "small", "--low-dim", "16", "--nce-k", "8",
        "--batch-size", "16", "--num-workers", "2", "--num-shards", "2",
        "--epochs", str(EPOCHS), "--no-progress",
    ]  # fmt: skip


def _trainer_env(ray_tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a new local Ray
    env.update(
        RAY_TMPDIR=str(ray_tmp),  # Ray's temp dir: <RAY_TMPDIR>/ray
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        # export every 1 s (default 10 s); a gauge then lives 2 s without a new value
        RAY_metrics_report_interval_ms="1000",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> Observed:
    """Train under Prometheus and poll it; every process is stopped before the tests look."""
    root = tmp_path_factory.mktemp("monitoring")
    shards = _make_shards(root)
    # Ray's socket paths must stay short (< 108 bytes): a short private dir under /tmp.
    ray_tmp = Path(tempfile.mkdtemp(prefix="npid-mon-", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    config_file = root / "prometheus.yml"
    prom_log, trainer_log = root / "prometheus.log", root / "trainer.log"
    checks = {check.name: check for check in _checks()}
    prometheus = trainer = None
    targets: Any = None
    start = time.monotonic()
    with trainer_log.open("w") as trainer_out:
        try:
            trainer = subprocess.Popen(
                _trainer_command(shards, root / "run"),
                stdout=trainer_out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=_trainer_env(ray_tmp),
                start_new_session=True,
            )
            dashboard = _dashboard_of(trainer_log, trainer)
            token = _ray_token(root / "ray_auth_token")
            config_file.write_text(yaml.safe_dump(prometheus_config(dashboard, token)))
            prometheus, base = _start_prometheus(config_file, root / "tsdb", prom_log)
            _poll(base, trainer, checks)
            try:
                targets = _get_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
            except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError) as exc:
                targets = f"unavailable: {exc}"
        finally:
            if trainer is not None:
                _stop_group(trainer)
            _kill_leftovers(str(ray_tmp))
            if prometheus is not None:
                _stop(prometheus)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    return Observed(checks, time.monotonic() - start, trainer_log, prom_log, targets)


def test_shipped_config_is_rewritten_only_in_address_token_and_intervals(tmp_path):
    token = tmp_path / "token"
    token.write_text("")  # promtool wants the file to exist
    config = prometheus_config("127.0.0.1:9999", token)
    shipped = yaml.safe_load(SHIPPED_CONFIG.read_text())
    (job,) = config["scrape_configs"]
    shipped_job = next(j for j in shipped["scrape_configs"] if j["job_name"] == "ray")
    (sd,) = job["http_sd_configs"]
    assert sd["url"] == "http://127.0.0.1:9999/api/prometheus/sd"
    assert sd["authorization"] == {"type": "Bearer", "credentials_file": str(token)}
    assert {k: v for k, v in job.items() if k != "http_sd_configs"} == {
        k: v for k, v in shipped_job.items() if k != "http_sd_configs"
    }
    assert config["global"]["scrape_interval"] == "1s"
    promtool = shutil.which("promtool")
    if promtool is not None:
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        check = subprocess.run(
            [promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0, check.stdout + check.stderr


def test_ray_exporters_are_scraped(observed):
    assert observed.checks["ray targets up"].passed, observed.explain("ray targets up")


@pytest.mark.parametrize(
    "name",
    [
        "images trained",
        "loss finite and positive",
        "step time histogram",
        "epoch gauge",
        "kNN top-1 is a fraction",
    ],
)
def test_training_metrics_are_scraped(observed, name):
    assert observed.checks[name].passed, observed.explain(name)


def test_store_requests_are_scraped_per_shard(observed):
    name = "store step requests on both shards"
    assert observed.checks[name].passed, observed.explain(name)


def test_store_rows_gauge_stays_current(observed):
    """``ray_npid_store_rows`` must still be exported while the run trains."""
    name = "store rows add up to the training set"
    assert observed.checks[name].passed, observed.explain(name)
