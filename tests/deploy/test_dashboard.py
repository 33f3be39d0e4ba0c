"""The Grafana dashboard and its provisioning: well-formed, and querying our metrics.

Names are checked here against the metrics module; tests/e2e/test_deploy_metrics.py
checks every name (ours and vLLM's) against a live server's /metrics.
"""

from __future__ import annotations

import yaml
from prometheus_client import CollectorRegistry, generate_latest

from tests.deploy.deploy_files import (
    DATASOURCES,
    dashboard,
    dashboard_exprs,
    dashboard_panels,
    defined_labels,
    exported_names,
    metric_names,
    unknown_labels,
)
from unlearnd.serve.metrics import UnlearndMetrics


def test_dashboard_is_well_formed() -> None:
    dash = dashboard()
    panels = list(dashboard_panels())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    provisioned = {d["uid"] for d in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] in provisioned, p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] in provisioned and t["expr"].strip(), p["title"]
    assert dash["uid"] and dash["title"] == "unlearnd"


def test_dashboard_covers_what_operators_watch() -> None:
    used = set().union(*map(metric_names, dashboard_exprs().values()))
    for needed in ("unlearnd_requests_total",                  # per-tenant traffic
                   "unlearnd_refusals_total",                   # refusals
                   "unlearnd_firewall_suppressed_tokens_total", # firewall suppressions
                   "unlearnd_policy_swaps_total",               # swaps
                   "unlearnd_time_to_first_token_seconds_bucket",
                   "vllm:time_to_first_token_seconds_bucket",   # TTFT
                   "vllm:generation_tokens_total",              # tokens/s
                   "vllm:kv_cache_usage_perc"):                 # KV-cache use
        assert needed in used, needed


def test_dashboard_names_only_our_real_metrics() -> None:
    registry = CollectorRegistry()
    UnlearndMetrics(registry).init_tenant("t")
    ours = exported_names(generate_latest(registry).decode())
    for where, expr in dashboard_exprs().items():
        names = metric_names(expr)
        assert names, (where, expr)  # every query reads one of our or vLLM's series
        missing = {n for n in names if n.startswith("unlearnd_")} - ours
        assert not missing, (where, missing)


def test_metric_name_extraction() -> None:
    expr = ('sum by (tenant) (rate(unlearnd_requests_total{outcome=~"engine_error",'
            'job="unlearnd_x"}[5m])) / vllm:kv_cache_usage_perc')
    assert metric_names(expr) == {"unlearnd_requests_total", "vllm:kv_cache_usage_perc"}
    text = ("# TYPE unlearnd_h_seconds histogram\n# TYPE vllm:g gauge\nvllm:g{a=\"1\"} 1.0\n")
    assert exported_names(text) == {"unlearnd_h_seconds_bucket", "unlearnd_h_seconds_sum",
                                    "unlearnd_h_seconds_count", "vllm:g"}


def test_dashboard_uses_only_labels_our_metrics_carry() -> None:
    carried = defined_labels()
    ours = {name: expr for name, expr in dashboard_exprs().items()
            if not any(n.startswith("vllm:") for n in metric_names(expr))}
    wrong = {name: unknown_labels(expr, carried) for name, expr in ours.items()
             if unknown_labels(expr, carried)}
    assert not wrong, wrong
