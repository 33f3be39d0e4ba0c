"""Reading the deploy/ artefacts for the tests: PromQL expressions, metric names, manifests."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose"
PROMETHEUS_CONFIG = COMPOSE / "prometheus" / "prometheus.yml"
ALERT_RULES = COMPOSE / "prometheus" / "alerts.yml"
ALERT_TESTS = COMPOSE / "prometheus" / "alerts_test.yml"
DASHBOARD = COMPOSE / "grafana" / "dashboards" / "unlearnd.json"
DATASOURCES = COMPOSE / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
KUBERNETES = DEPLOY / "kubernetes"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_OUR_METRIC = re.compile(r"\b(unlearnd_[A-Za-z0-9_]+|vllm:[A-Za-z0-9_:]+)")
_TYPE_LINE = re.compile(r"^# TYPE (\S+) (\w+)$", re.MULTILINE)
_SAMPLE_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)[{ ]", re.MULTILINE)


def metric_names(expr: str) -> set[str]:
    """The unlearnd_* and vllm:* series names a PromQL expression reads (string literals,
    such as label values, are ignored)."""
    return set(_OUR_METRIC.findall(_STRING.sub('""', expr)))


_SELECTOR = re.compile(r"(?:unlearnd_[A-Za-z0-9_]+|vllm:[A-Za-z0-9_:]+)\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
# Labels Prometheus itself puts on every scraped series (target labels), and `le` which
# histogram_quantile reads from the _bucket series.
SCRAPE_LABELS = {"instance", "job", "le"}


def label_names(expr: str) -> set[str]:
    """Label names a PromQL expression matches on or groups by (`{x=...}`, `by (x)`)."""
    expr = _STRING.sub('""', expr)
    names: set[str] = set()
    for matchers in _SELECTOR.findall(expr):
        names.update(_MATCHER.findall(matchers))
    for grouping in _GROUPING.findall(expr):
        names.update(n.strip() for n in grouping.split(",") if n.strip())
    return names


def defined_labels() -> dict[str, set[str]]:
    """Series name -> label names, for every unlearnd_* series our metrics module defines
    (whether or not a sample exists yet)."""
    from prometheus_client import CollectorRegistry

    from unlearnd.serve.metrics import UnlearndMetrics

    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("", "_sum", "_count")}
    labels: dict[str, set[str]] = {}
    for metric in vars(UnlearndMetrics(CollectorRegistry())).values():
        if hasattr(metric, "_labelnames") and hasattr(metric, "_type"):
            for suffix in suffixes[metric._type]:
                labels[metric._name + suffix] = set(metric._labelnames)
    return labels


def unknown_labels(expr: str, carried: dict[str, set[str]]) -> set[str]:
    """Labels `expr` selects or groups by that none of its metrics carry (per `carried`)."""
    have = set().union(*(carried.get(n, set()) for n in metric_names(expr)))
    return label_names(expr) - have - SCRAPE_LABELS


def exported_labels(exposition: str) -> dict[str, set[str]]:
    """Series name -> the label names its samples carry, from a Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def exported_names(exposition: str) -> set[str]:
    """Every series name a Prometheus text exposition can yield: the samples present,
    plus what each `# TYPE` declares (a histogram's _bucket/_sum/_count even before its
    first label set exists)."""
    names = set(_SAMPLE_LINE.findall(exposition))
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count"),
                "counter": ("",), "gauge": ("",), "untyped": ("",), "info": ("",)}
    for name, kind in _TYPE_LINE.findall(exposition):
        names.update(name + s for s in suffixes.get(kind, ("",)))
    return names


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> Iterator[dict]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> dict[str, str]:
    """`panel title / refId` -> PromQL, for every query the dashboard runs (panels,
    template variables, annotations)."""
    dash = dashboard()
    exprs = {f"{p['title']} / {t['refId']}": t["expr"]
             for p in dashboard_panels() for t in p.get("targets", [])}
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if query:
            exprs[f"variable {var['name']}"] = query
    for ann in dash.get("annotations", {}).get("list", []):
        if ann.get("expr"):
            exprs[f"annotation {ann['name']}"] = ann["expr"]
    return exprs


def alert_exprs() -> dict[str, str]:
    """alert name -> PromQL of every rule in alerts.yml."""
    rules = yaml.safe_load(ALERT_RULES.read_text())
    return {r.get("alert") or r.get("record"): r["expr"]
            for group in rules["groups"] for r in group["rules"]}


def manifests() -> list[tuple[str, dict]]:
    """(file name, object) for every Kubernetes object under deploy/kubernetes
    (kustomization.yaml is a kustomize file, not an object, and is left out)."""
    out = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out.extend((path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return out
