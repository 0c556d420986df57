"""The kNN HTTP service: a real server on 127.0.0.1 over a real ShardedStore.

Happy paths are checked against brute-force references; every bad input must give a 4xx
with ``{"error": ...}`` and leave the server answering.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from prometheus_client.parser import text_string_to_metric_families
from server_thread import ServerThread
from test_knn_cli import DIM, REPO_ROOT, features, make_tiny_data, make_tiny_encoder

from knn_service import serve
from knn_service.http_app import AppSettings, build_app
from knn_service.query_engine import KnnService
from knn_service.request_parsing import RequestError, parse_query
from trainer.model.encoders import EncoderConfig, build_encoder
from trainer.model.export import export_encoder

NAMESPACE = "npid-tests"
N = 30
MAX_BODY = 64 * 1024


# --------------------------------------------------------------------------- helpers


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]


def call(
    server: ServerThread | SimpleNamespace,
    method: str,
    path: str,
    payload: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    chunked: bool = False,
) -> Reply:
    """One HTTP request; JSON bodies are parsed, anything else returned as text."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = raw if raw is not None else (None if payload is None else json.dumps(payload).encode())
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    hdrs.update(headers or {})
    if chunked:
        conn.request(method, path, body=iter([body]), headers=hdrs, encode_chunked=True)
    else:
        conn.request(method, path, body=body, headers=hdrs)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    text = data.decode("utf-8")
    kind = response.getheader("Content-Type", "")
    parsed = json.loads(text) if kind.startswith("application/json") else text
    return Reply(response.status, parsed, {k.lower(): v for k, v in response.getheaders()})


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.double(), dim=1)


def brute_neighbors(bank: torch.Tensor, queries: torch.Tensor, k: int):
    """float64 top-k by cosine similarity: ``(sims, ids)``."""
    return (unit(queries) @ unit(bank).T).topk(k, dim=1)


def png_bytes(root: Path, cls: int, i: int) -> bytes:
    return (root / "src" / "train" / f"class{cls}" / f"{i:03d}.png").read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


# --------------------------------------------------------------------------- fixtures


@dataclass
class Env:
    root: Path
    store: Any
    service: KnnService
    server: ServerThread
    bank: torch.Tensor
    labels: torch.Tensor


@pytest.fixture(scope="module")
def env(ray_cluster, tmp_path_factory):
    """Store (rows = the encoder's train features), service with labels + encoder, server."""
    from featurestore import ShardedStore

    root = make_tiny_data(tmp_path_factory.mktemp("knn-serve"))
    model = make_tiny_encoder(root / "encoder")
    bank, labels = features(model, root / "train")
    store = ShardedStore(
        num_rows=N, dim=DIM, num_shards=2, name=f"knn-serve-{uuid.uuid4().hex[:8]}",
        namespace=NAMESPACE,
    )  # fmt: skip
    try:
        store.set(torch.arange(N), bank)
        args = serve.parser().parse_args(
            ["--store-name", store.name, "--namespace", NAMESPACE,
             "--train-data", str(root / "train"), "--checkpoint", str(root / "encoder"),
             "--max-k", "20", "--max-queries", "8"]
        )  # fmt: skip
        service, _ = serve.build_service(args)
        app = build_app(service, AppSettings(max_body_bytes=MAX_BODY))
        with ServerThread(app) as server:
            yield Env(root, store, service, server, bank, labels)
    finally:
        store.shutdown()


@pytest.fixture(scope="module")
def bare(ray_cluster):
    """A service without train data or encoder, refreshing every 0.3 s in the background."""
    from featurestore import ShardedStore

    store = ShardedStore(
        num_rows=25, dim=DIM, num_shards=1, name=f"knn-bare-{uuid.uuid4().hex[:8]}",
        namespace=NAMESPACE,
    )  # fmt: skip
    try:
        service = KnnService(store.export, dim=DIM)
        service.refresh()
        app = build_app(service, AppSettings(refresh_seconds=0.3))
        with ServerThread(app) as server:
            yield store, server
    finally:
        store.shutdown()


# --------------------------------------------------------------------------- happy paths


@pytest.mark.ray
def test_healthz(env: Env) -> None:
    reply = call(env.server, "GET", "/healthz")
    assert reply.status == 200
    assert reply.body["status"] == "ok" and reply.body["rows"] == N
    assert reply.body["index_built_at"] <= time.time()
    assert reply.body["labels"] is True and reply.body["images"] is True


@pytest.mark.ray
def test_neighbors_vectors_match_brute_force(env: Env) -> None:
    queries = torch.randn(5, DIM, generator=torch.Generator().manual_seed(1))
    reply = call(env.server, "POST", "/neighbors", {"vectors": queries.tolist(), "k": 7})
    assert reply.status == 200, reply.body
    sims, ids = brute_neighbors(env.bank, queries, 7)
    assert len(reply.body["results"]) == 5
    for result, row_sims, row_ids in zip(reply.body["results"], sims, ids):
        assert result["ids"] == row_ids.tolist()
        np.testing.assert_allclose(result["similarities"], row_sims.numpy(), atol=1e-6)
        assert result["labels"] == env.labels[row_ids].tolist()
        assert result["keys"] == [f"{i:09d}" for i in row_ids.tolist()]
        assert all(s.endswith(".png") for s in result["sources"])


@pytest.mark.ray
def test_vectors_are_l2_normalized(env: Env) -> None:
    row = env.bank[13]
    for scale in (3.0, 1e-3, 1e300):
        vector = [float(x) * scale for x in row.double()]
        reply = call(env.server, "POST", "/neighbors", {"vectors": [vector], "k": 1})
        assert reply.status == 200, reply.body
        assert reply.body["results"][0]["ids"] == [13]
        assert reply.body["results"][0]["similarities"][0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.ray
def test_neighbors_image_finds_itself(env: Env) -> None:
    # ids follow sorted paths: class1/004.png is id 14, class2/009.png id 29
    reply = call(
        env.server, "POST", "/neighbors", {"image": b64(png_bytes(env.root, 1, 4)), "k": 3}
    )
    assert reply.status == 200, reply.body
    top = reply.body["results"][0]
    assert top["ids"][0] == 14 and top["similarities"][0] == pytest.approx(1.0, abs=1e-5)
    assert top["sources"][0] == "class1/004.png" and top["labels"][0] == 1
    images = [b64(png_bytes(env.root, 1, 4)), b64(png_bytes(env.root, 2, 9))]
    reply = call(env.server, "POST", "/neighbors", {"images": images, "k": 1})
    assert [r["ids"] for r in reply.body["results"]] == [[14], [29]]


@pytest.mark.ray
def test_classify_matches_reference_vote(env: Env) -> None:
    queries = torch.randn(4, DIM, generator=torch.Generator().manual_seed(2))
    for temperature in (0.07, 0.5):
        reply = call(
            env.server, "POST", "/classify",
            {"vectors": queries.tolist(), "k": 9, "temperature": temperature},
        )  # fmt: skip
        assert reply.status == 200, reply.body
        sims, ids = brute_neighbors(env.bank, queries, 9)
        scores = torch.zeros(4, 3, dtype=torch.float64)
        scores.scatter_add_(1, env.labels[ids], (sims / temperature).exp())
        for prediction, expected in zip(reply.body["predictions"], scores):
            np.testing.assert_allclose(prediction["scores"], expected.numpy(), rtol=1e-4)
            probs = np.asarray(prediction["probabilities"])
            np.testing.assert_allclose(probs, (expected / expected.sum()).numpy(), rtol=1e-4)
            assert abs(probs.sum() - 1) < 1e-9
            assert prediction["class"] == int(expected.argmax())
            assert prediction["class_name"] == f"class{prediction['class']}"
    reply = call(env.server, "POST", "/classify", {"image": b64(png_bytes(env.root, 2, 3))})
    assert reply.status == 200 and len(reply.body["predictions"][0]["scores"]) == 3


@pytest.mark.ray
def test_refresh_makes_changed_rows_visible(env: Env) -> None:
    target = F.normalize(torch.randn(1, DIM, generator=torch.Generator().manual_seed(5)), dim=1)
    query = {"vectors": target.tolist(), "k": 1}
    before = call(env.server, "GET", "/healthz").body["index_built_at"]
    assert call(env.server, "POST", "/neighbors", query).body["results"][0]["ids"] != [5]
    env.store.set(torch.tensor([5]), target)
    try:
        stale = call(env.server, "POST", "/neighbors", query).body["results"][0]
        assert stale["ids"] != [5]  # no refresh yet: the old index answers
        reply = call(env.server, "POST", "/refresh")
        assert reply.status == 200 and reply.body["rows"] == N
        fresh = call(env.server, "POST", "/neighbors", query).body["results"][0]
        assert fresh["ids"] == [5] and fresh["similarities"][0] == pytest.approx(1.0, abs=1e-6)
        assert call(env.server, "GET", "/healthz").body["index_built_at"] > before
    finally:
        env.store.set(torch.tensor([5]), env.bank[5:6])
        assert call(env.server, "POST", "/refresh").status == 200


@pytest.mark.ray
def test_metrics(env: Env) -> None:
    call(env.server, "POST", "/neighbors", {"vectors": [[1.0] * DIM], "k": 2})
    call(env.server, "POST", "/neighbors", {"vectors": [[1.0] * DIM], "k": 0})
    reply = call(env.server, "GET", "/metrics")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain")
    samples = metric_samples(reply.body)
    ok = ("npid_knn_service_requests_total",
          (("method", "POST"), ("route", "/neighbors"), ("status", "200")))  # fmt: skip
    bad = ("npid_knn_service_requests_total",
           (("method", "POST"), ("route", "/neighbors"), ("status", "400")))  # fmt: skip
    assert samples[ok] >= 1 and samples[bad] >= 1
    assert samples[("npid_knn_service_index_rows", ())] == N
    assert samples[("npid_knn_service_last_refresh_timestamp_seconds", ())] <= time.time()
    count = samples[("npid_knn_service_request_seconds_count", (("route", "/neighbors"),))]
    assert count >= 2
    assert samples[("npid_knn_service_queries_total", (("route", "/neighbors"),))] >= 1


# --------------------------------------------------------------------------- bad input

GOOD = [0.25] * DIM
BAD_REQUESTS = [
    # (name, path, raw body or payload, headers, status, message fragment)
    ("malformed JSON", "/neighbors", b'{"vectors": [[1, 2', None, 400, "malformed JSON"),
    ("not UTF-8", "/neighbors", b"\xff\xfe{}", None, 400, "not UTF-8"),
    ("empty body", "/neighbors", b"", None, 400, "empty request body"),
    ("not an object", "/neighbors", [[1.0] * DIM], None, 400, "must be a JSON object"),
    ("no query", "/neighbors", {"k": 3}, None, 400, "exactly one of"),
    ("two queries", "/neighbors", {"vectors": [GOOD], "image": "aGk="}, None, 400, "exactly one"),
    ("unknown field", "/neighbors", {"vectors": [GOOD], "kk": 3}, None, 400, "unknown field"),
    ("temperature on neighbors", "/neighbors", {"vectors": [GOOD], "temperature": 1}, None, 400,
     "unknown field"),
    ("wrong dims", "/neighbors", {"vectors": [[1.0] * (DIM + 1)]}, None, 400, "dimension is 16"),
    ("ragged", "/neighbors", {"vectors": [GOOD, [1.0] * 3]}, None, 400, "vectors[1] has 3"),
    ("flat vector", "/neighbors", {"vectors": GOOD}, None, 400, "vectors[0] must be a list"),
    ("empty vectors", "/neighbors", {"vectors": []}, None, 400, "non-empty list"),
    ("vectors not a list", "/neighbors", {"vectors": "1,2"}, None, 400, "non-empty list"),
    ("string number", "/neighbors", {"vectors": [["1.0"] * DIM]}, None, 400, "must be a number"),
    ("bool number", "/neighbors", {"vectors": [[True] * DIM]}, None, 400, "must be a number"),
    ("null number", "/neighbors", {"vectors": [[None] * DIM]}, None, 400, "must be a number"),
    ("NaN", "/neighbors", b'{"vectors": [[NaN' + b", 1" * (DIM - 1) + b"]]}", None, 400,
     "NaN or infinity"),
    ("Infinity", "/neighbors", b'{"vectors": [[Infinity' + b", 1" * (DIM - 1) + b"]]}", None,
     400, "NaN or infinity"),
    ("overflowing literal", "/neighbors", b'{"vectors": [[1e999' + b", 1" * (DIM - 1) + b"]]}",
     None, 400, "NaN or infinity"),
    ("huge int", "/neighbors", {"vectors": [[10**400] + [1] * (DIM - 1)]}, None, 400,
     "too large"),
    ("zero vector", "/neighbors", {"vectors": [[0.0] * DIM]}, None, 400, "all zeros"),
    ("k = 0", "/neighbors", {"vectors": [GOOD], "k": 0}, None, 400, "'k' must be in [1, 20]"),
    ("k < 0", "/neighbors", {"vectors": [GOOD], "k": -3}, None, 400, "'k' must be in"),
    ("k > max_k", "/neighbors", {"vectors": [GOOD], "k": 21}, None, 400, "max_k=20"),
    ("k float", "/neighbors", {"vectors": [GOOD], "k": 2.5}, None, 400, "must be an integer"),
    ("k string", "/neighbors", {"vectors": [GOOD], "k": "3"}, None, 400, "must be an integer"),
    ("k bool", "/neighbors", {"vectors": [GOOD], "k": True}, None, 400, "must be an integer"),
    ("too many vectors", "/neighbors", {"vectors": [GOOD] * 9}, None, 413, "too many vectors"),
    ("bad base64", "/neighbors", {"image": "not base64!!"}, None, 400, "not valid base64"),
    ("undecodable image", "/neighbors", {"image": b64(b"GIF89a-but-not-really" * 4)}, None, 400,
     "not a readable image"),
    ("truncated png", "/neighbors", {"image": "TRUNCATED"}, None, 400, "does not decode"),
    ("image not a string", "/neighbors", {"image": 12}, None, 400, "base64 string"),
    ("empty images", "/neighbors", {"images": []}, None, 400, "non-empty list"),
    ("too many images", "/neighbors", {"images": ["aGk="] * 9}, None, 413, "too many images"),
    ("temperature 0", "/classify", {"vectors": [GOOD], "temperature": 0}, None, 400,
     "'temperature' must be"),
    ("temperature string", "/classify", {"vectors": [GOOD], "temperature": "hot"}, None, 400,
     "'temperature' must be"),
    ("temperature overflow", "/classify", {"vectors": [GOOD], "temperature": 1e-5}, None, 400,
     "too small"),
    ("wrong content type", "/neighbors", {"vectors": [GOOD]}, {"Content-Type": "text/plain"},
     415, "application/json"),
    ("form content type", "/classify", b"k=3",
     {"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    ("oversized body", "/neighbors", b"[" + b"0," * MAX_BODY + b"0]", None, 413, "too large"),
    ("unknown route", "/nope", {"vectors": [GOOD]}, None, 404, "no such route"),
]  # fmt: skip


@pytest.mark.ray
@pytest.mark.parametrize(
    "name,path,body,headers,status,fragment", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS]
)
def test_bad_input_gives_4xx_and_server_keeps_answering(
    env: Env, name, path, body, headers, status, fragment
) -> None:
    if body == {"image": "TRUNCATED"}:
        body = {"image": b64(png_bytes(env.root, 0, 0)[:60])}
    raw = body if isinstance(body, bytes) else None
    reply = call(env.server, "POST", path, None if raw is not None else body, raw=raw,
                 headers=headers)  # fmt: skip
    assert reply.status == status, reply.body
    assert isinstance(reply.body, dict) and fragment in reply.body["error"], reply.body
    assert call(env.server, "GET", "/healthz").status == 200


@pytest.mark.ray
def test_oversized_chunked_body_and_wrong_method(env: Env) -> None:
    reply = call(env.server, "POST", "/neighbors", raw=b" " * (MAX_BODY + 10), chunked=True)
    assert reply.status == 413 and "too large" in reply.body["error"]
    reply = call(env.server, "GET", "/neighbors")
    assert reply.status == 405 and "not allowed" in reply.body["error"]
    assert "POST" in reply.headers.get("allow", "")
    assert call(env.server, "GET", "/healthz").status == 200


@pytest.mark.ray
def test_no_internal_errors_were_answered(env: Env) -> None:
    samples = metric_samples(call(env.server, "GET", "/metrics").body)
    statuses = {dict(labels)["status"] for (name, labels) in samples
                if name == "npid_knn_service_requests_total"}  # fmt: skip
    assert "400" in statuses and not any(s.startswith("5") for s in statuses)


@pytest.mark.ray
def test_bare_service_without_labels_or_encoder(bare) -> None:
    _store, server = bare
    reply = call(server, "POST", "/neighbors", {"vectors": [GOOD], "k": 25})
    assert reply.status == 200
    assert reply.body["results"][0]["labels"] is None and reply.body["results"][0]["keys"] is None
    reply = call(server, "POST", "/neighbors", {"vectors": [GOOD], "k": 26})
    assert reply.status == 400 and "25 rows" in reply.body["error"]
    reply = call(server, "POST", "/neighbors", {"image": b64(b"\x89PNG not really")})
    assert reply.status == 400 and "--checkpoint" in reply.body["error"]
    reply = call(server, "POST", "/classify", {"vectors": [GOOD]})
    assert reply.status == 400 and "--train-data" in reply.body["error"]
    assert call(server, "GET", "/healthz").body["labels"] is False


@pytest.mark.ray
def test_background_refresh_picks_up_changed_rows(bare) -> None:
    store, server = bare
    target = F.normalize(torch.randn(1, DIM, generator=torch.Generator().manual_seed(9)), dim=1)
    store.set(torch.tensor([7]), target)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        reply = call(server, "POST", "/neighbors", {"vectors": target.tolist(), "k": 1})
        if reply.body["results"][0]["ids"] == [7]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the background refresh never served the changed row")
    samples = metric_samples(call(server, "GET", "/metrics").body)
    assert samples[("npid_knn_service_refreshes_total", (("result", "ok"),))] >= 1


# --------------------------------------------------------------------------- token


@pytest.mark.ray
def test_api_token(env: Env) -> None:
    token = "s3cret-token"
    app = build_app(env.service, AppSettings(api_token=token))
    query = {"vectors": [GOOD], "k": 2}
    with ServerThread(app) as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token},
                        {"Authorization": f"Basic {token}"}):  # fmt: skip
            for method, path, body in (("POST", "/neighbors", query), ("GET", "/metrics", None),
                                       ("POST", "/refresh", None)):  # fmt: skip
                reply = call(server, method, path, body, headers=headers)
                assert reply.status == 401, (headers, path)
                assert "API token" in reply.body["error"]
                assert reply.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": f"Bearer {token}"}
        assert call(server, "POST", "/neighbors", query, headers=good).status == 200
        assert call(server, "GET", "/metrics", headers=good).status == 200
        assert call(server, "GET", "/healthz").status == 200  # open without a token


def test_token_comes_from_the_environment(monkeypatch) -> None:
    args = serve.parser().parse_args(["--store-name", "x"])
    monkeypatch.setenv("NPID_API_TOKEN", "abc")
    assert serve.settings_from_args(args).api_token == "abc"
    monkeypatch.setenv("NPID_API_TOKEN", "")
    assert serve.settings_from_args(args).api_token is None
    monkeypatch.delenv("NPID_API_TOKEN")
    settings = serve.settings_from_args(args)
    assert settings.api_token is None and settings.refresh_seconds == 0
    assert args.host == "127.0.0.1" and args.port == 8000


# --------------------------------------------------------------------------- core, no HTTP


def _batches(rows: torch.Tensor) -> list[pa.RecordBatch]:
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(rows.flatten().numpy()), rows.shape[1])
    return [pa.RecordBatch.from_arrays([pa.array(np.arange(len(rows))), vectors], ["id", "vector"])]


def test_queries_use_the_old_index_during_a_rebuild() -> None:
    """A rebuild in progress does not block queries; the swap is atomic."""
    old = F.normalize(torch.randn(12, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    new = -old
    entered, release = threading.Event(), threading.Event()
    calls = {"n": 0}

    def source():
        calls["n"] += 1
        if calls["n"] == 1:
            yield from _batches(old)
            return
        entered.set()
        assert release.wait(10)
        yield from _batches(new)

    service = KnnService(source, dim=4)
    service.refresh()
    query = parse_query({"vectors": old[:1].tolist(), "k": 1}, 4)
    worker = threading.Thread(target=service.refresh)
    worker.start()
    assert entered.wait(10)
    answer = service.neighbors(query)["results"][0]  # the rebuild is blocked mid-stream
    assert answer["ids"] == [0] and answer["similarities"][0] == pytest.approx(1.0, abs=1e-6)
    release.set()
    worker.join(10)
    answer = service.neighbors(query)["results"][0]
    assert answer["similarities"][0] < 0.99  # the new index: row 0 is now -old[0]


def test_failed_rebuild_keeps_the_old_index() -> None:
    rows = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    fail = {"now": False}

    def source():
        if fail["now"]:
            raise RuntimeError("store unreachable")
        return _batches(rows)

    service = KnnService(source, dim=4)
    first = service.refresh()
    fail["now"] = True
    with pytest.raises(RuntimeError, match="unreachable"):
        service.refresh()
    assert service.state is first


def test_parse_query_errors_name_the_field() -> None:
    with pytest.raises(RequestError, match=r"vectors\[0\]\[2\] must be a number"):
        parse_query({"vectors": [[1, 2, "x", 4]]}, 4)
    with pytest.raises(RequestError, match="all zeros"):
        parse_query({"vectors": [[0, 0, 0, 0]]}, 4)
    q = parse_query({"vectors": [[3, 0, 4, 0]], "k": 2, "temperature": 1}, 4, classify=True)
    np.testing.assert_allclose(q.vectors, [[0.6, 0, 0.8, 0]], rtol=1e-6)
    assert (q.k, q.temperature, q.num_queries) == (2, 1.0, 1)


# --------------------------------------------------------------------------- CLI


@pytest.mark.ray
def test_cli_bad_input_exits_2(env: Env, tmp_path: Path, capsys) -> None:
    export_encoder(build_encoder("small", 8), EncoderConfig("small", 8), tmp_path / "enc8",
                   metadata={"preset": "cifar", "image_size": 32})  # fmt: skip
    base = ["--store-name", env.store.name, "--namespace", NAMESPACE, "--port", "0"]
    cases = [
        (["--store-name", "no-such-knn-store", "--namespace", NAMESPACE], "no-such-knn-store"),
        ([*base, "--train-data", str(env.root / "val")], "12 instances"),
        ([*base, "--train-data", str(tmp_path / "none")], "--train-data"),
        ([*base, "--checkpoint", str(tmp_path / "none")], "--checkpoint"),
        ([*base, "--checkpoint", str(tmp_path / "enc8")], "embeds in 8 dims"),
        ([*base, "--port", "70000"], "--port"),
        ([*base, "--kind", "hnsw"], "--kind"),
        ([*base, "--max-k", "0"], "--max-k"),
        ([*base, "--refresh-seconds", "-1"], "--refresh-seconds"),
    ]
    for argv, needle in cases:
        try:
            code = serve.main(argv)
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err
        lines = [line for line in err.strip().splitlines() if "WARNING" not in line]
        assert code == 2, argv
        assert len(lines) == 1 and needle in lines[0], err
    with socket.socket() as taken:  # a port in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code = serve.main([*base[:-1], str(taken.getsockname()[1])])
        assert code == 2 and "cannot listen" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_cli_serves_until_sigterm(env: Env, ray_cluster) -> None:
    """``python -m knn_service.serve`` in its own process, attached to this Ray cluster."""
    environ = dict(
        os.environ,
        RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address,
        NPID_API_TOKEN="tok",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "knn_service.serve", "--store-name", env.store.name,
         "--namespace", NAMESPACE, "--port", "0", "--train-data", str(env.root / "train"),
         "--checkpoint", str(env.root / "encoder")],
        cwd=REPO_ROOT, env=environ, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        port = None
        for line in proc.stderr:
            if "kNN service on http://127.0.0.1:" in line:
                port = int(line.split("http://127.0.0.1:")[1].split()[0])
                break
        assert port is not None, "the service did not start"
        server = SimpleNamespace(port=port)
        assert call(server, "GET", "/healthz").body["rows"] == N
        assert call(server, "POST", "/neighbors", {"vectors": [GOOD]}).status == 401
        reply = call(server, "POST", "/classify", {"image": b64(png_bytes(env.root, 0, 2)), "k": 1},
                     headers={"Authorization": "Bearer tok"})  # fmt: skip
        assert reply.status == 200 and reply.body["predictions"][0]["class_name"] == "class0"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
