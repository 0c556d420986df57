"""The kNN service's HTTP layer: an aiohttp application around a :class:`KnnService`.

Routes (JSON in and out; errors are ``{"error": "message"}`` with a 4xx status):

========================  ==============================================================
``POST /neighbors``       ``{"vectors": [[d floats], ...] | "image": b64 | "images": [b64],
                          "k": 10}`` -> ``{"results": [{"ids", "similarities", "labels",
                          "keys", "sources"}]}`` (best first)
``POST /classify``        same inputs + ``"temperature"`` (0.07) -> ``{"predictions":
                          [{"class", "class_name", "probabilities": [C] (sum 1),
                          "scores": [C] (raw Σ exp(s/σ))}]}`` (weighted vote)
``POST /refresh``         rebuild the index from the store now; answers when it is served
``GET /healthz``          ``{"status": "ok", "rows", "index_built_at", ...}`` (never needs a
                          token)
``GET /metrics``          Prometheus text: ``npid_knn_service_*``
========================  ==============================================================

Query vectors are L2-normalized before the search (see :mod:`knn_service.request_parsing`).
Bounds: the body size (413), ``k`` in ``[1, min(max_k, rows)]`` (400), the number of queries
per request (413), decoded image pixels (413); POST bodies must be ``application/json`` (415).
With an API token every route but ``/healthz`` needs ``Authorization: Bearer <token>``
(401 otherwise; the comparison is constant-time).

Work that blocks (JSON parsing, image decoding, encoding, search) runs in a small thread
pool so the event loop keeps answering; index rebuilds run in their own thread, one at a
time, and swap the index atomically (queries meanwhile use the old one). Any exception
that is not a request error is logged and answered with 500: such a response means a bug.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from knn_service.cli import DEFAULT_MAX_BODY_BYTES
from knn_service.query_engine import IndexState, KnnService
from knn_service.request_parsing import RequestError, parse_json, parse_query

__all__ = ["AppSettings", "ServiceMetrics", "build_app", "start_site"]

logger = logging.getLogger(__name__)

OPEN_ROUTES = frozenset({"/healthz"})
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_dumps = functools.partial(json.dumps, allow_nan=False, separators=(",", ":"))


@dataclass(frozen=True)
class AppSettings:
    """HTTP-level settings.

    Attributes:
        max_body_bytes: largest request body accepted (413 above).
        refresh_seconds: rebuild the index this often in the background (0: only on
            ``POST /refresh``).
        api_token: when set, the bearer token every route but ``/healthz`` requires.
        query_threads: threads answering queries.
    """

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    refresh_seconds: float = 0.0
    api_token: str | None = None
    query_threads: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.max_body_bytes, bool) or not isinstance(self.max_body_bytes, int):
            raise ValueError(f"max_body_bytes must be an int, got {self.max_body_bytes!r}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if not isinstance(self.refresh_seconds, (int, float)) or not self.refresh_seconds >= 0:
            raise ValueError(f"refresh_seconds must be >= 0, got {self.refresh_seconds!r}")
        if self.api_token is not None and not self.api_token:
            raise ValueError("api_token must be None or a non-empty string")
        if self.query_threads < 1:
            raise ValueError(f"query_threads must be >= 1, got {self.query_threads}")


class ServiceMetrics:
    """The service's Prometheus metrics (``npid_knn_service_*``) in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "npid_knn_service_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "npid_knn_service_request_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queries = Counter(
            "npid_knn_service_queries",
            "Query vectors/images answered by route",
            ["route"],
            registry=r,
        )
        self.index_rows = Gauge(
            "npid_knn_service_index_rows", "Rows in the served index", registry=r
        )
        self.last_refresh = Gauge(
            "npid_knn_service_last_refresh_timestamp_seconds",
            "Unix time the served index was built",
            registry=r,
        )
        self.build_seconds = Gauge(
            "npid_knn_service_index_build_seconds", "Duration of the last index build", registry=r
        )
        self.refreshes = Counter(
            "npid_knn_service_refreshes", "Index rebuilds by result", ["result"], registry=r
        )

    def observe_index(self, state: IndexState) -> None:
        """Record a newly served index."""
        self.index_rows.set(state.rows)
        self.last_refresh.set(state.built_at)
        self.build_seconds.set(state.build_seconds)


_SERVICE = web.AppKey("service", KnnService)
_SETTINGS = web.AppKey("settings", AppSettings)
_METRICS = web.AppKey("metrics", ServiceMetrics)


class _Runtime:
    """What the app holds while it runs (filled at startup: the app is frozen by then)."""

    def __init__(self) -> None:
        self.query_pool: ThreadPoolExecutor | None = None
        self.build_pool: ThreadPoolExecutor | None = None
        self.refresh_lock: asyncio.Lock | None = None


_RUNTIME = web.AppKey("runtime", _Runtime)


def build_app(
    service: KnnService, settings: AppSettings, metrics: ServiceMetrics | None = None
) -> web.Application:
    """The aiohttp application serving ``service`` (build its index first: ``refresh()``)."""
    metrics = metrics if metrics is not None else ServiceMetrics()
    app = web.Application(
        middlewares=[_metrics_middleware, _error_middleware, _auth_middleware],
        client_max_size=settings.max_body_bytes,
    )
    app[_SERVICE] = service
    app[_SETTINGS] = settings
    app[_METRICS] = metrics
    app[_RUNTIME] = _Runtime()
    app.router.add_post("/neighbors", _neighbors)
    app.router.add_post("/classify", _classify)
    app.router.add_post("/refresh", _refresh)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.cleanup_ctx.append(_lifecycle)
    with contextlib.suppress(RuntimeError):  # not built yet: recorded at the first refresh
        metrics.observe_index(service.state)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Thread pools, the refresh lock and the background refresher, for the app's lifetime."""
    settings, runtime = app[_SETTINGS], app[_RUNTIME]
    runtime.query_pool = ThreadPoolExecutor(settings.query_threads, thread_name_prefix="knn-query")
    runtime.build_pool = ThreadPoolExecutor(1, thread_name_prefix="knn-build")
    runtime.refresh_lock = asyncio.Lock()
    task = None
    if settings.refresh_seconds > 0:
        task = asyncio.create_task(_refresh_periodically(app, settings.refresh_seconds))
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for pool in (runtime.query_pool, runtime.build_pool):
        pool.shutdown(wait=False, cancel_futures=True)


async def _rebuild(app: web.Application) -> IndexState:
    """One rebuild in the build thread (serialized); updates the metrics."""
    metrics, runtime = app[_METRICS], app[_RUNTIME]
    assert runtime.refresh_lock is not None, "the app is not running"
    async with runtime.refresh_lock:
        loop = asyncio.get_running_loop()
        try:
            state = await loop.run_in_executor(runtime.build_pool, app[_SERVICE].refresh)
        except Exception:
            metrics.refreshes.labels(result="error").inc()
            raise
    metrics.refreshes.labels(result="ok").inc()
    metrics.observe_index(state)
    return state


async def _refresh_periodically(app: web.Application, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await _rebuild(app)
        except Exception:
            logger.exception("background index refresh failed; still serving the previous index")


# ---------------------------------------------------------------------- middlewares

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def _metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    start = time.perf_counter()
    response = await handler(request)
    metrics = request.app[_METRICS]
    route = _route(request)
    metrics.requests.labels(route=route, method=request.method, status=str(response.status)).inc()
    metrics.latency.labels(route=route).observe(time.perf_counter() - start)
    return response


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """``{"error": message}`` with ``status``."""
    return web.Response(
        status=status,
        body=_dumps({"error": message}).encode(),
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RequestError as exc:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.message, headers)
    except web.HTTPException as exc:  # aiohttp's own: 404, 405, 413 from reading the body
        if exc.status < 400:
            raise
        return error_response(exc.status, _http_error_message(request, exc), _allow(exc))
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("internal error answering %s %s", request.method, request.path)
        return error_response(500, "internal error (logged by the service)")


def _http_error_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no such route: {request.method} {request.path}"
    if exc.status == 405:
        return f"method {request.method} not allowed on {request.path}"
    if exc.status == 413:
        limit = request.app[_SETTINGS].max_body_bytes
        return f"request body too large: at most {limit} bytes"
    return exc.reason


def _allow(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None


@web.middleware
async def _auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[_SETTINGS].api_token
    if token is not None and request.path not in OPEN_ROUTES:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("utf-8"), token.encode("utf-8")
        )
        if not ok:
            raise RequestError(
                401, "missing or wrong API token: send 'Authorization: Bearer <token>'"
            )
    return await handler(request)


# ---------------------------------------------------------------------- handlers


async def _read_body(request: web.Request) -> bytes:
    if request.content_type != "application/json":
        raise RequestError(
            415, f"Content-Type must be application/json, got {request.content_type or 'none'}"
        )
    limit = request.app[_SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise RequestError(413, f"request body too large: at most {limit} bytes")
    return await request.read()  # aiohttp enforces client_max_size (413) for chunked bodies


async def _answer_query(request: web.Request, classify: bool) -> web.Response:
    body = await _read_body(request)
    service = request.app[_SERVICE]

    def work() -> tuple[bytes, int]:
        query = parse_query(
            parse_json(body), service.dim, classify=classify, max_queries=service.max_queries
        )
        result = service.classify(query) if classify else service.neighbors(query)
        return _dumps(result).encode(), query.num_queries

    loop = asyncio.get_running_loop()
    payload, count = await loop.run_in_executor(request.app[_RUNTIME].query_pool, work)
    request.app[_METRICS].queries.labels(route=request.path).inc(count)
    return web.Response(body=payload, content_type="application/json")


async def _neighbors(request: web.Request) -> web.Response:
    return await _answer_query(request, classify=False)


async def _classify(request: web.Request) -> web.Response:
    return await _answer_query(request, classify=True)


async def _refresh(request: web.Request) -> web.Response:
    try:
        state = await _rebuild(request.app)
    except Exception as exc:
        logger.exception("index refresh failed; still serving the previous index")
        return error_response(503, f"refresh failed, previous index kept: {exc}")
    return _json(
        {
            "status": "ok",
            "rows": state.rows,
            "index_built_at": state.built_at,
            "build_seconds": state.build_seconds,
        }
    )


async def _healthz(request: web.Request) -> web.Response:
    health = request.app[_SERVICE].health()
    return _json(health, status=200 if health["status"] == "ok" else 503)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[_METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_dumps(data).encode(), content_type="application/json")


# ---------------------------------------------------------------------- running


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host:port`` (``port=0``: a free one); returns the runner and port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    return runner, int(bound)
