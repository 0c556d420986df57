"""The Grafana dashboard queries only metrics that the code defines, under their exported names.

The set of defined metrics is read from the source (no Ray, no import of the metric
modules): every ``Counter(`` / ``Gauge(`` / ``Histogram(`` call in trainer/, featurestore/
and knn_service/ whose name is a ``"npid_..."`` literal or a module constant holding one,
plus ``trainer.metrics.METRIC_NAMES``. Exported names follow what Ray 2.60's Prometheus
exporter was seen to serve (a ``ray_`` prefix; counters end in ``_total``, added when the
name lacks it; histograms as ``_bucket``/``_sum``/``_count``); metrics of
``prometheus_client`` (no prefix) follow that library's rules.
"""

from __future__ import annotations

import ast
import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "npid-dashboard.json"
PACKAGES = ("trainer", "featurestore", "knn_service")
KINDS = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram", "Summary": "summary"}
METRIC_RE = re.compile(r"\b(?:ray_)?npid_[A-Za-z0-9_]+\b")

#: The names the monitoring stack is documented with (README, *Operations*; deploy/README.md).
DOCUMENTED = {
    "npid_train_loss",
    "npid_train_images_total",
    "npid_train_step_seconds",
    "npid_train_epoch",
    "npid_train_skipped_samples_total",
    "npid_knn_top1",
    "npid_knn_top5",
    "npid_store_requests_total",
    "npid_store_request_seconds",
    "npid_store_rows",
    "npid_store_snapshot_seconds",
    "npid_store_restarts_total",
    "npid_store_snapshot_failures_total",
    "npid_store_snapshot_retries_total",
}


# --- what the code defines -------------------------------------------------------------


def _metric_calls(tree: ast.Module, constants: dict[str, str]) -> list[tuple[str, str]]:
    """(name, kind) of every metric constructor call whose name resolves to ``npid_*``."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        ctor = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if ctor not in KINDS:
            continue
        args = list(node.args[:1]) + [k.value for k in node.keywords if k.arg == "name"]
        for arg in args:
            name = None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                name = arg.value
            elif isinstance(arg, ast.Name):
                name = constants.get(arg.id)
            if name and name.startswith("npid_"):
                found.append((name, KINDS[ctor]))
    return found


def _module_constants(tree: ast.Module) -> dict[str, str]:
    constants = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and isinstance(node.value.value, str):
                    constants[target.id] = node.value.value
    return constants


def _exporter(source: str) -> str:
    """``ray`` for ray.util.metrics, ``prometheus`` for prometheus_client."""
    if "prometheus_client" in source and "ray.util" not in source:
        return "prometheus"
    return "ray"


@functools.cache
def defined_metrics() -> dict[str, tuple[str, str]]:
    """name -> (kind, exporter) of every metric defined in the project's packages."""
    defined: dict[str, tuple[str, str]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            source = path.read_text(encoding="utf-8")
            if "npid_" not in source:
                continue
            tree = ast.parse(source, filename=str(path))
            for name, kind in _metric_calls(tree, _module_constants(tree)):
                defined[name] = (kind, _exporter(source))
    return defined


def metric_names_tuple() -> tuple[str, ...]:
    """``trainer.metrics.METRIC_NAMES`` read from the source."""
    tree = ast.parse((REPO / "trainer" / "metrics.py").read_text(encoding="utf-8"))
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == "METRIC_NAMES" for t in targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("trainer/metrics.py has no METRIC_NAMES")


def exported(name: str, kind: str, exporter: str) -> set[str]:
    """The series names a metric appears under in Prometheus."""
    if exporter == "ray":
        full = f"ray_{name}"
        if kind == "counter":
            return {full if full.endswith("_total") else f"{full}_total"}
        if kind == "histogram":
            return {f"{full}_bucket", f"{full}_sum", f"{full}_count"}
        return {full}
    base = name.removesuffix("_total") if kind == "counter" else name
    return {
        "counter": {f"{base}_total", f"{base}_created"},
        "histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"},
        "summary": {name, f"{name}_sum", f"{name}_count", f"{name}_created"},
    }.get(kind, {name})


def exported_names() -> dict[str, str]:
    """series name -> defining metric name."""
    return {
        series: name
        for name, (kind, exporter) in defined_metrics().items()
        for series in exported(name, kind, exporter)
    }


# --- the dashboard ---------------------------------------------------------------------


@functools.cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def query_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def exprs(panel: dict[str, Any]) -> list[str]:
    return [t["expr"] for t in panel["targets"]]


def all_exprs() -> list[str]:
    return [e for p in query_panels() for e in exprs(p)]


def panels_with(predicate) -> list[str]:
    return [p["title"] for p in query_panels() if predicate(" ".join(exprs(p)))]


# --- tests -----------------------------------------------------------------------------


def test_source_scan_finds_every_documented_metric():
    defined = defined_metrics()
    assert set(defined) >= DOCUMENTED, sorted(DOCUMENTED - set(defined))
    assert set(metric_names_tuple()) <= set(defined)
    assert defined["npid_store_request_seconds"] == ("histogram", "ray")
    assert defined["npid_train_images_total"] == ("counter", "ray")
    assert defined["npid_store_rows"] == ("gauge", "ray")


def test_exported_names_follow_what_ray_serves():
    # Seen on Ray 2.60's exporter: Counter("npid_probe_requests") was served as
    # ray_npid_probe_requests_total, Counter("..._total") without a second suffix.
    assert exported("npid_store_requests_total", "counter", "ray") == {
        "ray_npid_store_requests_total"
    }
    assert exported("npid_probe_requests", "counter", "ray") == {"ray_npid_probe_requests_total"}
    assert exported("npid_train_loss", "gauge", "ray") == {"ray_npid_train_loss"}
    assert exported("npid_train_step_seconds", "histogram", "ray") == {
        "ray_npid_train_step_seconds_bucket",
        "ray_npid_train_step_seconds_sum",
        "ray_npid_train_step_seconds_count",
    }
    assert "npid_knn_requests_total" in exported("npid_knn_requests", "counter", "prometheus")


def test_every_expr_names_only_metrics_the_code_defines():
    known = exported_names()
    used = {m for e in all_exprs() for m in METRIC_RE.findall(e)}
    assert used, "no npid metric in the dashboard"
    unknown = sorted(used - set(known))
    assert not unknown, f"not defined in {PACKAGES}: {unknown}"
    # and every documented metric is on the dashboard
    shown = {known[m] for m in used}
    assert shown >= DOCUMENTED, sorted(DOCUMENTED - shown)


def test_every_selector_is_scoped_to_the_session_variable():
    names = {v["name"] for v in dashboard()["templating"]["list"]}
    assert "session" in names
    for expr in all_exprs():
        for match in re.finditer(r"\b(ray_npid_[A-Za-z0-9_]+)(\{[^}]*\})?", expr):
            assert match.group(2) and 'SessionName=~"$session"' in match.group(2), expr


def test_histogram_quantiles_use_buckets_by_le():
    quantile_exprs = [e for e in all_exprs() if "histogram_quantile(" in e]
    assert quantile_exprs
    for expr in quantile_exprs:
        assert "_bucket" in expr, expr
        by = re.search(r"by \(([^)]*)\)", expr)
        assert by and "le" in [s.strip() for s in by.group(1).split(",")], expr


def test_required_panels_exist():
    def quantiles(metric: str, by: str = "") -> Any:
        def check(text: str) -> bool:
            pattern = r"histogram_quantile\({q}, sum by \(le{by}\) \(\w+\({m}_bucket"
            return all(
                re.search(pattern.format(q=q, by=by, m=metric), text) for q in ("0.5", "0.99")
            )

        return check

    required = {
        "training loss": lambda t: "ray_npid_train_loss" in t,
        "images/s": lambda t: re.search(r"rate\(ray_npid_train_images_total", t),
        "step time p50/p99": quantiles("ray_npid_train_step_seconds"),
        "store latency p50/p99 by op": quantiles("ray_npid_store_request_seconds", ", op"),
        "store request rate by op and shard": lambda t: re.search(
            r"sum by \(op, shard\) \(rate\(ray_npid_store_requests_total", t
        ),
        "store rows": lambda t: re.search(r"by \(shard\) \(ray_npid_store_rows", t),
        "store restarts": lambda t: "ray_npid_store_restarts_total" in t,
        "snapshot seconds": lambda t: "ray_npid_store_snapshot_seconds" in t,
        "skipped samples": lambda t: "ray_npid_train_skipped_samples_total" in t,
        "kNN top-1/top-5": lambda t: "ray_npid_knn_top1" in t and "ray_npid_knn_top5" in t,
        "epoch": lambda t: "ray_npid_train_epoch" in t,
    }
    missing = [name for name, check in required.items() if not panels_with(check)]
    assert not missing, missing


def test_dashboard_is_valid_grafana_json():
    board = dashboard()
    assert board["uid"] and board["title"]
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    (ds_var,) = [v for v in variables.values() if v["type"] == "datasource"]
    assert ds_var["query"] == "prometheus"
    ds_uid = "${" + ds_var["name"] + "}"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in query_panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": ds_uid}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip()
            assert target["datasource"]["uid"] == ds_uid
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"]["uid"] == ds_uid


def test_panels_fit_the_grid_without_overlapping():
    boxes = []
    for panel in dashboard()["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, panel["title"]
        boxes.append((panel["title"], g))
    for i, (a_title, a) in enumerate(boxes):
        for b_title, b in boxes[i + 1 :]:
            apart = (
                a["x"] + a["w"] <= b["x"]
                or b["x"] + b["w"] <= a["x"]
                or a["y"] + a["h"] <= b["y"]
                or b["y"] + b["h"] <= a["y"]
            )
            assert apart, (a_title, b_title)


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum(rate(ray_npid_train_images_total{op="x"}[1m]))', ["ray_npid_train_images_total"]),
        ("histogram_quantile(0.5, sum by (le) (rate(npid_x_bucket[1m])))", ["npid_x_bucket"]),
        ("sum by (op) (up)", []),
    ],
)
def test_metric_regex(expr, names):
    assert METRIC_RE.findall(expr) == names
