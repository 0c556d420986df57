"""Serving a finished run in one command, as the README's quick start does: ``trainer.run``
→ ``knn_service.serve --run RUN_DIR`` → a query, with no cluster left running. Also
``--snapshot``, a run with an in-process bank (``--launcher local``), ``"ids"`` queries and
the one-line errors."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from generated_images import colour_class_folder

from featurestore import snapshot
from knn_service import serve
from knn_service.request_parsing import RequestError, parse_query
from trainer.shards.make import make_shards

REPO = Path(__file__).resolve().parent.parent
N = 48


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def _train(data: Path, name: str, *extra: str) -> Path:
    run = data / name
    result = _cli(
        "-m", "trainer.run", "--data", str(data / "shards"), "--val-data", str(data / "shards"),
        "--output", str(run), "--arch", "small", "--low-dim", "16", "--batch-size", "16",
        "--epochs", "2", *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("serve-run")
    colour_class_folder(tmp / "src", N, seed=0)
    make_shards(tmp / "src", tmp / "shards", shard_size=20, order="sorted", progress=False)
    return tmp


@pytest.fixture(scope="module")
def store_run(data) -> Path:
    """A run through Ray Train with the feature store (the default launcher)."""
    return _train(data, "ray-run")


def _post(port: int, route: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{route}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


@pytest.mark.ray
@pytest.mark.slow
def test_train_then_serve_the_run_then_query_without_a_cluster(data, store_run) -> None:
    record = json.loads((store_run / "run.json").read_text())
    assert record["train_data"] == str(data / "shards") and record["num_rows"] == N
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "knn_service.serve", "--run", str(store_run), "--port", "0"],
        cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        port = None
        for line in proc.stderr:
            if "kNN service on http://127.0.0.1:" in line:
                assert "labels on, images on" in line, line
                port = int(line.split("http://127.0.0.1:")[1].split()[0])
                break
        assert port is not None, "the service did not start"
        assert "ray" not in " ".join(psutil_children(proc.pid))  # no cluster was started
        listening = psutil_listening(proc.pid)
        assert (("127.0.0.1", port) in listening) and all(
            ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for ip, _ in listening
        ), listening  # a default serve opens no door beyond loopback
        neighbours = _post(port, "/neighbors", {"ids": [5], "k": 3})["results"][0]
        assert neighbours["ids"][0] == 5 and neighbours["similarities"][0] == pytest.approx(1.0)
        assert neighbours["labels"][0] == 5 // (N // 4)  # ids follow the sorted paths
        image = base64.b64encode((data / "src" / "c1" / "001.png").read_bytes()).decode()
        predicted = _post(port, "/classify", {"image": image, "k": 5})["predictions"][0]
        assert predicted["class_name"] in {"c0", "c1", "c2", "c3"}
        assert sum(predicted["probabilities"]) == pytest.approx(1.0)
        assert -1.0 <= predicted["nearest_similarity"] <= 1.0 and "note" in predicted
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as reply:
            scale = json.loads(reply.read())["nearest_similarity"]
        assert -1.0 <= scale["p01"] <= scale["median"] <= 1.0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def psutil_listening(pid: int) -> set[tuple[str, int]]:
    import psutil

    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


def psutil_children(pid: int) -> list[str]:
    import psutil

    return [" ".join(p.cmdline()[:2]) for p in psutil.Process(pid).children(recursive=True)]


@pytest.mark.ray
@pytest.mark.slow
def test_run_and_snapshot_serve_the_rows_of_the_newest_snapshot(store_run) -> None:
    newest = snapshot.read_manifest(snapshot.resolve(str(store_run / "snapshots")))
    rows = snapshot.read_rows(newest, 0, N, torch.empty(N, 16))
    for flag in (["--run", str(store_run)], ["--snapshot", str(store_run / "snapshots")]):
        service, bank = serve.build_service(serve.parser().parse_args(flag))
        assert (bank.num_rows, bank.dim) == (N, 16)
        assert torch.equal(bank.rows(torch.arange(N).numpy()), rows)
        vectors = service.query_vectors(parse_query({"ids": [0, 7]}, 16))
        assert torch.allclose(torch.from_numpy(vectors), rows[[0, 7]], atol=1e-6)


@pytest.mark.slow
def test_a_local_launcher_run_serves_its_checkpointed_bank(data) -> None:
    run = _train(data, "local-run", "--launcher", "local")
    service, bank = serve.build_service(serve.parser().parse_args(["--run", str(run)]))
    assert service.train is not None and service.encoder is not None
    reply = service.neighbors(parse_query({"ids": [3], "k": 1}, 16))
    assert reply["results"][0]["ids"] == [3] and bank.described["run"] == str(run)
    with pytest.raises(RequestError, match=f"ids\\[1\\] = {N} is not an instance id"):
        service.neighbors(parse_query({"ids": [0, N]}, 16))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--run", "/no/such/run"], "--run /no/such/run: "),
        (["--snapshot", "/no/such/snapshot"], "--snapshot /no/such/snapshot: "),
        (["--run", "x", "--store-name", "y"], "not allowed with argument"),
        ([], "one of the arguments --run --snapshot --store-name is required"),
    ],
)
def test_bad_bank_arguments_are_one_line_and_exit_2(argv, needle) -> None:
    result = _cli("-m", "knn_service.serve", *argv, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr


def test_an_empty_directory_is_not_a_run(tmp_path, capsys) -> None:
    assert serve.main(["--run", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("ids", "needle"),
    [([], "non-empty"), ([-1], "ids[0] must be an integer >= 0"), (["a"], "ids[0]"),
     ([True], "ids[0]")],
)  # fmt: skip
def test_bad_ids_are_rejected(ids, needle) -> None:
    with pytest.raises(RequestError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        parse_query({"ids": ids}, 16)
