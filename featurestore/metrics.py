"""Feature store metrics through ``ray.util.metrics`` (``npid_*`` → Prometheus; README,
*Operations*).

# Ray: this module uses Ray's metrics API (recorded in the shard actors and the client;
# Ray's exporter adds a ``ray_`` prefix to the names).

Metrics:

* ``npid_store_requests_total`` (Counter; tags ``op``, ``shard``): calls served by a shard.
* ``npid_store_request_seconds`` (Histogram; tag ``op``): end-to-end latency of a store
  operation as seen by the client (``step``, ``get``, ``snapshot`` …).
* ``npid_store_rows`` (Gauge; tag ``shard``): rows held by a shard.
* ``npid_store_snapshot_seconds`` (Histogram): time to write one complete snapshot.
* ``npid_store_restarts_total`` (Counter; tag ``shard``): shard actor restarts.
* ``npid_store_snapshot_failures_total`` (Counter): snapshots that failed to commit (the
  previous one stays the latest).
* ``npid_store_snapshot_retries_total`` (Counter): snapshot file writes to object storage
  tried again after a transient error (:mod:`featurestore.write_retries`).

Metric objects are created lazily, once per process; recording never raises (a metrics
failure is logged once and ignored, the store keeps serving).

Ray drops a gauge from its exporter two export intervals (2 × 10 s by default) after it
was last set, so gauges that change rarely are re-set by a :class:`GaugeKeeper` thread.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from ray.util import metrics as ray_metrics

logger = logging.getLogger(__name__)

REQUESTS_TOTAL = "npid_store_requests_total"
REQUEST_SECONDS = "npid_store_request_seconds"
ROWS = "npid_store_rows"
SNAPSHOT_SECONDS = "npid_store_snapshot_seconds"
RESTARTS_TOTAL = "npid_store_restarts_total"
SNAPSHOT_FAILURES_TOTAL = "npid_store_snapshot_failures_total"
SNAPSHOT_RETRIES_TOTAL = "npid_store_snapshot_retries_total"

#: Histogram boundaries (seconds) for request latency: 0.5 ms … 60 s.
REQUEST_BOUNDARIES = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
]  # fmt: skip
#: Histogram boundaries (seconds) for snapshot duration: 0.1 s … 30 min.
SNAPSHOT_BOUNDARIES = [0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0]

#: name -> (kind, tag keys): the metric definitions, for dashboards and tests.
DEFINITIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    REQUESTS_TOTAL: ("counter", ("op", "shard")),
    REQUEST_SECONDS: ("histogram", ("op",)),
    ROWS: ("gauge", ("shard",)),
    SNAPSHOT_SECONDS: ("histogram", ()),
    RESTARTS_TOTAL: ("counter", ("shard",)),
    SNAPSHOT_FAILURES_TOTAL: ("counter", ()),
    SNAPSHOT_RETRIES_TOTAL: ("counter", ()),
}


@dataclass
class StoreMetrics:
    """The store's metric objects (one set per process)."""

    requests: Any
    request_seconds: Any
    rows: Any
    snapshot_seconds: Any
    restarts: Any
    snapshot_failures: Any
    snapshot_retries: Any

    def count_request(self, op: str, shard: int) -> None:
        """One call of ``op`` served by ``shard``."""
        _safe(self.requests.inc, 1.0, {"op": op, "shard": str(shard)})

    def observe_request(self, op: str, seconds: float) -> None:
        """End-to-end latency of one store operation."""
        _safe(self.request_seconds.observe, seconds, {"op": op})

    def set_rows(self, shard: int, rows: int) -> None:
        """Rows held by ``shard`` (kept exported by a :class:`GaugeKeeper`)."""
        _gauge_keeper().set(self.rows, float(rows), {"shard": str(shard)})

    def observe_snapshot(self, seconds: float) -> None:
        """Duration of one complete snapshot."""
        _safe(self.snapshot_seconds.observe, seconds, None)

    def count_restart(self, shard: int) -> None:
        """``shard`` restarted."""
        _safe(self.restarts.inc, 1.0, {"shard": str(shard)})

    def count_snapshot_failure(self) -> None:
        """A snapshot failed to commit."""
        _safe(self.snapshot_failures.inc, 1.0, None)

    def count_snapshot_retry(self) -> None:
        """A snapshot file write to object storage was tried again."""
        _safe(self.snapshot_retries.inc, 1.0, None)


_warned = False
_lock = threading.Lock()
_instance: StoreMetrics | None = None


def _safe(record, value: float, tags: dict[str, str] | None) -> None:
    global _warned
    try:
        record(value, tags=tags)
    except Exception as err:  # metrics must never break the store
        if not _warned:
            _warned = True
            logger.warning("could not record feature store metrics: %s", err)


def build_metrics() -> StoreMetrics:
    """Create fresh metric objects (normally use :func:`store_metrics`)."""
    return StoreMetrics(
        requests=ray_metrics.Counter(
            REQUESTS_TOTAL,
            description="Calls served by a feature store shard.",
            tag_keys=DEFINITIONS[REQUESTS_TOTAL][1],
        ),
        request_seconds=ray_metrics.Histogram(
            REQUEST_SECONDS,
            description="End-to-end latency of a feature store operation (client side).",
            boundaries=REQUEST_BOUNDARIES,
            tag_keys=DEFINITIONS[REQUEST_SECONDS][1],
        ),
        rows=ray_metrics.Gauge(
            ROWS,
            description="Bank rows held by a feature store shard.",
            tag_keys=DEFINITIONS[ROWS][1],
        ),
        snapshot_seconds=ray_metrics.Histogram(
            SNAPSHOT_SECONDS,
            description="Seconds to write one complete feature store snapshot.",
            boundaries=SNAPSHOT_BOUNDARIES,
            tag_keys=DEFINITIONS[SNAPSHOT_SECONDS][1],
        ),
        restarts=ray_metrics.Counter(
            RESTARTS_TOTAL,
            description="Feature store shard actor restarts.",
            tag_keys=DEFINITIONS[RESTARTS_TOTAL][1],
        ),
        snapshot_failures=ray_metrics.Counter(
            SNAPSHOT_FAILURES_TOTAL,
            description="Feature store snapshots that failed to commit.",
            tag_keys=DEFINITIONS[SNAPSHOT_FAILURES_TOTAL][1],
        ),
        snapshot_retries=ray_metrics.Counter(
            SNAPSHOT_RETRIES_TOTAL,
            description="Snapshot file writes to object storage tried again after an error.",
            tag_keys=DEFINITIONS[SNAPSHOT_RETRIES_TOTAL][1],
        ),
    )


def store_metrics() -> StoreMetrics:
    """This process's metric objects, created on first use."""
    global _instance
    with _lock:
        if _instance is None:
            _instance = build_metrics()
        return _instance


__all__ = [
    "DEFINITIONS",
    "REQUESTS_TOTAL",
    "REQUEST_SECONDS",
    "RESTARTS_TOTAL",
    "ROWS",
    "SNAPSHOT_SECONDS",
    "StoreMetrics",
    "build_metrics",
    "store_metrics",
]


class GaugeKeeper:
    """Keeps gauges exported by setting them again every ``period_s`` seconds.

    Ray's exporter forgets a gauge two export intervals after its last ``set``; a gauge
    that changes once an epoch (or never, like a shard's row count) would vanish from
    Prometheus in between. ``set`` records the value and sets it now; a daemon thread
    re-sets every recorded value.
    """

    def __init__(self, period_s: float = 5.0) -> None:
        self.period_s = period_s
        self._values: dict[tuple[int, tuple], tuple[Any, float, dict[str, str] | None]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def set(self, gauge: Any, value: float, tags: dict[str, str] | None = None) -> None:
        """Set ``gauge`` to ``value`` (with ``tags``) now and keep it set."""
        key = (id(gauge), tuple(sorted((tags or {}).items())))
        with self._lock:
            self._values[key] = (gauge, float(value), tags)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="npid-gauge-keeper", daemon=True
                )
                self._thread.start()
        _safe(gauge.set, float(value), tags)

    def _run(self) -> None:
        stop = threading.Event()
        while not stop.wait(self.period_s):
            with self._lock:
                values = list(self._values.values())
            for gauge, value, tags in values:
                _safe(gauge.set, value, tags)


_KEEPER: GaugeKeeper | None = None


def _gauge_keeper() -> GaugeKeeper:
    """This process's :class:`GaugeKeeper`."""
    global _KEEPER
    if _KEEPER is None:
        _KEEPER = GaugeKeeper()
    return _KEEPER
