"""A real Prometheus evaluates the dashboard's and the alerts' queries against a live server.

Debian's `prometheus` (scripts/ci_services.sh installs it) scrapes the session's
`tiny_server` every second, with the compose stack's scrape job (deploy/compose/
prometheus/prometheus.yml, retargeted) and a copy of alerts.yml as its rule file, while
a little traffic runs: chat completions (stream and not) and a completion for the four
config tenants, a 400 and a 401, and on a temporary tenant `promlive` (created here and
deleted afterwards, so no other test's tenant changes) two activations, a rollback and
two rejected registrations. Then every dashboard query (panels, the template variable,
the annotation) and every alert `expr` goes through Prometheus' HTTP query API: each
must succeed without warnings, and each has an explicit expectation of what this
traffic leaves in it (`PANELS`, `ALERTS`), so a panel that ought to show data and shows
none fails, and a panel added to the dashboard without an expectation fails too.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.deploy_files import (
    ALERT_RULES,
    PROMETHEUS_CONFIG,
    alert_exprs,
    dashboard,
    dashboard_exprs,
)
from tests.e2e.server import KEYS, free_port

PROMETHEUS = shutil.which("prometheus")
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian package prometheus; "
    "scripts/ci_services.sh installs it)")]
TENANTS = ("acme", "globex", "public", "swap")  # the config tenants of tiny_server
TEMP = "promlive"                              # created and deleted by this module
TRAFFIC_S = 16.0                               # seconds of load while Prometheus scrapes
# A system prompt longer than one KV block (128 tokens on CPU), so that repeats hit
# vLLM's prefix cache and the hit-rate panel has something to show.
SYSTEM = " ".join(["You are a careful assistant who answers questions about books."] * 12)
MSG = [{"role": "system", "content": SYSTEM},
       {"role": "user", "content": "Tell me about the author."}]

# Grafana's variables, as Grafana would expand them for this 1 s scrape interval.
# `tenant` is multi-value with includeAll and allValue ".*", always used as
# tenant=~"$tenant": "All" expands to `.*`, a selection to `(a|b)`.
ALL_TENANTS = ".*"
SOME_TENANTS = "(acme|globex)"
RATE_INTERVAL = "10s"   # $__rate_interval: >= 4 scrapes, like Grafana's own rule
RANGE = "5m"            # $__range: the dashboard's time range, longer than this run
INTERVAL = "2s"         # $__interval

# What this traffic must leave in each dashboard query ("panel title / refId"):
#   positive  some sample > 0 (traffic of that kind happened in the window)
#   finite    some finite sample (a ratio or gauge that may be 0 right now)
#   zero      series present and every sample 0: nothing of that kind happened, and the
#             label sets exist (init_tenant), so the panel reads 0 and not "No data"
#   nan       series present, every sample NaN: a quantile of a histogram that has no
#             observations in the window
# Every key of the dashboard must be here and nothing else (checked).
PANELS = {
    "variable tenant": "positive",  # label_values(): the tenants, checked by name
    "annotation Policy swaps": "positive",  # the activations/rollback of `promlive`
    "Requests/s by tenant / A": "positive",
    "Requests/s by outcome / A": "positive",
    "Server-side error ratio / A": "finite",  # 0: no engine_error / guard_error
    "Request latency p50 / p95 / A": "positive",
    "Request latency p50 / p95 / B": "positive",
    "Time to first token p50 / p95 (per tenant) / A": "positive",
    "Time to first token p50 / p95 (per tenant) / B": "positive",
    "Tokens/s by tenant / A": "positive",
    "Tokens/s by tenant / B": "positive",
    # Legitimately nothing: tiny_server's tenants have adapters only, no compiled
    # policy, so no refusal, no firewall and no scope guard runs (decisions are all
    # "unguarded", which the decisions panel does show).
    "Refusals/s / A": "zero",
    "Firewall suppressions (tokens/s) / A": "zero",
    "Scope guard decisions/s / A": "positive",  # decision="unguarded"
    "Guard failures (fail closed) / A": "zero",  # and must be: no guard failed
    "Guard latency p95 / A": "nan",  # no guard ran
    "Adapter / policy rejections / A": "positive",  # promlive's two rejections
    "Active policy version / A": "positive",  # checked against /admin/tenants
    "Swaps / A": "positive",
    "Swap duration and propagation p95 / A": "positive",  # promlive's swaps
    # Propagation is observed when a replica picks up a change made through another
    # one; this is a single replica (tests/e2e/test_replicas.py covers two).
    "Swap duration and propagation p95 / B": "nan",
    "Generation and prompt tokens/s / A": "positive",
    "Generation and prompt tokens/s / B": "positive",
    "KV-cache usage / A": "finite",  # 0 between requests
    "Requests running / waiting / A": "finite",
    "Requests running / waiting / B": "finite",  # 0: nothing queues at this load
    "Requests running / waiting / C": "finite",
    "Engine TTFT p50 / p95 / A": "positive",
    "Engine TTFT p50 / p95 / B": "positive",
    "Inter-token latency p50 / p95 / A": "positive",
    "Inter-token latency p50 / p95 / B": "positive",
    "Prefix-cache hit rate / A": "positive",  # the repeated long system prompt
}

# Every alert rule, by name: (what its expression without the final threshold must
# hold, whether the alert itself may be active). "finite": the quantity the rule
# compares has real values from this traffic, so an empty result of the rule means
# "below threshold", not "reads nothing". None of the "something is broken" alerts
# may fire: the 401 is not counted per tenant (no tenant) and the 400 is a
# client_error, neither of which is a server-side error.
ALERTS = {
    "UnlearndHighErrorRate": ("finite", False),
    "UnlearndHighLatencyP95": ("finite", False),
    "UnlearndSlowTimeToFirstToken": ("finite", False),
    "UnlearndDown": ("positive", False),  # up == 1
    "UnlearndGuardFailures": ("zero", False),
    # The one alert this traffic is meant to fire: promlive's rejected registrations.
    "UnlearndAdapterRejections": ("positive", True),
    # No tenant here has a scope guard (no in_scope decision), and the rule's daily
    # baseline `[1d] offset 10m` lies before this Prometheus existed: nothing to
    # compare, legitimately empty.
    "UnlearndScopeHitSpike": ("empty", False),
    "UnlearndSlowPolicyPropagation": ("nan", False),  # single replica, see above
    "UnlearndKVCacheFull": ("finite", False),
    "UnlearndRequestsQueueing": ("finite", False),
}

_THRESHOLD = re.compile(r"\s*(?:>|<|>=|<=|==|!=)\s*[0-9.eE+-]+\s*$")


def grafana(expr: str, tenant: str = ALL_TENANTS) -> str:
    for name, value in (("tenant", tenant), ("__rate_interval", RATE_INTERVAL),
                        ("__range", RANGE), ("__interval", INTERVAL)):
        expr = expr.replace(f"${{{name}}}", value).replace(f"[[{name}]]", value)
        expr = re.sub(rf"\${name}\b", lambda _m, v=value: v, expr)
    assert "$" not in expr, expr  # a variable this test does not know
    return expr


def all_exprs(node) -> list[str]:
    """Every `expr` anywhere in the dashboard JSON (panels at any depth, annotations)."""
    if isinstance(node, dict):
        own = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return own + [e for v in node.values() for e in all_exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in all_exprs(v)]
    return []


def values(result: list[dict]) -> list[float]:
    out = []
    for series in result:
        points = series.get("values") or [series["value"]]
        out.extend(float(v) for _, v in points)
    return out


def holds(kind: str, result: list[dict]) -> bool:
    vs = values(result)
    finite = [v for v in vs if math.isfinite(v)]
    return {"positive": any(v > 0 for v in finite),
            "finite": bool(finite),
            "zero": bool(vs) and all(v == 0 for v in vs),
            "nan": bool(vs) and all(math.isnan(v) for v in vs),
            "empty": not vs}[kind]


class Prometheus:
    def __init__(self, url: str, start: float) -> None:
        self.url = url
        self.start = start
        self.http = httpx.Client(base_url=url, timeout=30)

    def api(self, path: str, **params) -> dict:
        r = self.http.get("/api/v1/" + path, params=params)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (path, params, body)
        assert not body.get("warnings"), (path, params, body["warnings"])
        return body["data"]

    def instant(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def range(self, expr: str) -> list[dict]:
        return self.api("query_range", query=expr, start=self.start, end=time.time(),
                        step="1s")["result"]


def _wait(what: str, check, timeout: float = 60.0, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            got = check()
        except (httpx.HTTPError, ValueError, KeyError):
            got = None
        if got:
            return got
        time.sleep(0.25)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def _traffic(server, stop: threading.Event, errors: list, i: int) -> None:
    """One client thread: each config tenant in turn, stream and not, until `stop`."""
    k = 0
    while not stop.is_set():
        tenant = TENANTS[(i + k) % len(TENANTS)]
        try:
            client = server.openai(tenant)
            if k % 3 == 1:
                s = client.chat.completions.create(model="m", messages=MSG, max_tokens=8,
                                                   temperature=0, stream=True)
                assert "".join(c.choices[0].delta.content or "" for c in s if c.choices)
            elif k % 3 == 2:
                r = client.completions.create(model="m", prompt="The author", max_tokens=8,
                                              temperature=0)
                assert r.choices[0].text
            else:
                r = client.chat.completions.create(model="m", messages=MSG, max_tokens=8,
                                                   temperature=0)
                assert r.usage.completion_tokens == 8
        except Exception as e:  # noqa: BLE001 - collected, asserted by the fixture
            errors.append((tenant, k, repr(e)))
        k += 1


def _admin_swaps(server, world: dict[str, Path], tmp: Path) -> None:
    """On the temporary tenant: a rejection, activate a3, a rejection, activate a1, roll
    back to a3. Two rejections of one reason, scrapes apart: increase() only sees a
    counter move once its label set exists, and `init_tenant` does not pre-create
    unlearnd_adapter_rejections_total{tenant, reason}, so the first rejection of each
    reason creates the series at 1 and shows in neither the panel nor the alert."""
    admin = server.admin()
    r = admin.post("/admin/tenants", json={"name": TEMP, "api_key": f"sk-{TEMP}-0123456789"})
    assert r.status_code == 201, r.text
    missing = {"adapter": str(tmp / "no-such-adapter")}
    assert admin.post(f"/admin/tenants/{TEMP}/versions", json=missing).status_code == 400
    time.sleep(3)
    r = admin.post(f"/admin/tenants/{TEMP}/versions",
                   json={"adapter": str(world["a3"]), "activate": True})
    assert r.status_code == 201, r.text
    time.sleep(3)
    assert admin.post(f"/admin/tenants/{TEMP}/versions", json=missing).status_code == 400
    r = admin.post(f"/admin/tenants/{TEMP}/versions",
                   json={"adapter": str(world["a1"]), "activate": True})
    assert r.status_code == 201, r.text
    time.sleep(3)
    r = admin.post(f"/admin/tenants/{TEMP}/rollback")
    assert r.status_code == 200, r.text


def _remove_temp_tenant(server) -> None:
    admin = server.admin()
    if admin.get(f"/admin/tenants/{TEMP}/versions").status_code == 404:
        return
    # deactivate first: that drops its unlearnd_active_policy_info series
    admin.post(f"/admin/tenants/{TEMP}/deactivate")
    assert admin.delete(f"/admin/tenants/{TEMP}").status_code == 200


@pytest.fixture(scope="module")
def live(tiny_server, tiny_world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    # The compose stack's own config, retargeted at the session server, 1 s intervals.
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    shutil.copy(ALERT_RULES, tmp / "alerts.yml")
    config["rule_files"] = [str(tmp / "alerts.yml")]
    metrics_key = (tiny_server.config.get("metrics_key")
                   or os.environ.get("UNLEARND_METRICS_KEY"))
    for job in config["scrape_configs"]:
        if job["job_name"] == "unlearnd":
            job["scrape_interval"] = "1s"
            job["scrape_timeout"] = "1s"
            job["static_configs"][0]["targets"] = [f"127.0.0.1:{tiny_server.port}"]
            if metrics_key:
                job["authorization"] = {"credentials": metrics_key}
        else:
            job["static_configs"][0]["targets"] = [f"127.0.0.1:{port}"]
    assert {j["job_name"] for j in config["scrape_configs"]} >= {"unlearnd"}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = tmp / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        prom = Prometheus(f"http://127.0.0.1:{port}", start=time.time())

        def target_up():
            ts = prom.api("targets", state="active")["activeTargets"]
            ours = [t for t in ts if t["labels"]["job"] == "unlearnd"]
            return ours and ours[0]["health"] == "up" and ours[0]

        target = _wait("the unlearnd target to be up", target_up, log=log)
        assert target["labels"].get("service") == "unlearnd"  # the compose job's labels
        # two scrapes of the counters before any traffic: rate() sees every increase
        _wait("two scrapes", lambda: values(prom.instant(
            'count_over_time(up{job="unlearnd"}[1m])')) >= [2.0], log=log)
        prom.start = time.time() - 1
        stop, errors = threading.Event(), []
        workers = [threading.Thread(target=_traffic, args=(tiny_server, stop, errors, i))
                   for i in range(3)]
        for w in workers:
            w.start()
        try:
            t0 = time.time()
            _admin_swaps(tiny_server, tiny_world, tmp)
            bad = httpx.post(tiny_server.base_url + "/v1/chat/completions", timeout=30,
                             json={"messages": MSG}, headers={"Authorization": "Bearer no"})
            assert bad.status_code == 401
            bad = httpx.post(tiny_server.base_url + "/v1/chat/completions", timeout=30,
                             json={"messages": "hello"},
                             headers={"Authorization": f"Bearer {KEYS['acme']}"})
            assert bad.status_code == 400
            time.sleep(max(0.0, TRAFFIC_S - (time.time() - t0)))
        finally:
            stop.set()
            for w in workers:
                w.join(120)
        assert not errors, errors[:5]
        # a few more scrapes and rule evaluations after the last request
        time.sleep(3)
        prom.versions = {t["name"]: t["active_version"] for t in tiny_server.admin().get(
            "/admin/tenants").json()["data"]}
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        _remove_temp_tenant(tiny_server)


def test_every_dashboard_query_runs_and_shows_this_traffic(live) -> None:
    exprs = dashboard_exprs()
    dash = dashboard()
    # every query of the dashboard, whatever its nesting, is one the test runs ...
    n_vars = sum(1 for v in dash.get("templating", {}).get("list", []) if v.get("query"))
    assert len(exprs) == len(all_exprs(dash)) + n_vars
    # ... and has its expectation here (a new panel cannot be skipped silently)
    assert set(exprs) == set(PANELS), (set(exprs) ^ set(PANELS))
    failed = {}
    for where, raw in exprs.items():
        if where.startswith("variable "):
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", raw.strip())
            assert m, raw  # the only variable form this test knows
            got = live.api(f"label/{m[2]}/values", **{"match[]": m[1]},
                           start=live.start, end=time.time())
            assert set(TENANTS) | {TEMP} <= set(got), got
            continue
        expr = grafana(raw)
        instant, ranged = live.instant(expr), live.range(expr)
        if not holds(PANELS[where], ranged + instant):
            failed[where] = (PANELS[where], expr, values(ranged + instant)[:12])
        # the tenant filter: a selection of tenants gives only those tenants
        if "$tenant" in raw or "${tenant}" in raw:
            some = live.instant(grafana(raw, SOME_TENANTS))
            assert {s["metric"]["tenant"] for s in some
                    if "tenant" in s["metric"]} <= {"acme", "globex"}, (where, some)
    assert not failed, failed


def test_panels_show_the_right_series(live) -> None:
    """A few panels whose series this traffic determines exactly."""
    table = live.instant(grafana(dashboard_exprs()["Active policy version / A"]))
    shown = {s["metric"]["tenant"]: s["metric"]["version"] for s in table}
    want = {t: v for t, v in live.versions.items() if v}
    assert {t: shown.get(t) for t in want} == want, (shown, want)
    assert {"acme", "globex", "swap"} <= set(shown)
    assert not {t for t, v in live.versions.items() if v is None} & set(shown), shown
    outcomes = live.range(grafana(dashboard_exprs()["Requests/s by outcome / A"]))
    busy = {s["metric"]["outcome"] for s in outcomes if any(v > 0 for v in values([s]))}
    assert {"ok", "client_error"} <= busy, busy  # the 400; the 401 has no tenant
    assert not busy & {"engine_error", "guard_error"}, busy
    tenants = live.range(grafana(dashboard_exprs()["Requests/s by tenant / A"]))
    busy = {s["metric"]["tenant"] for s in tenants if any(v > 0 for v in values([s]))}
    assert set(TENANTS) <= busy, busy
    swaps = live.range(grafana(dashboard_exprs()["Swaps / A"]))
    kinds = {s["metric"]["kind"] for s in swaps
             if s["metric"]["tenant"] == TEMP and any(v > 0 for v in values([s]))}
    assert kinds == {"activate", "rollback"}, kinds


def test_every_alert_expr_runs(live) -> None:
    exprs = alert_exprs()
    assert set(exprs) == set(ALERTS), set(exprs) ^ set(ALERTS)
    failed = {}
    for name, expr in exprs.items():
        probe_kind, may_fire = ALERTS[name]
        result = live.instant(expr)
        if result and not may_fire:
            failed[name] = ("fires", result)
        probe = _THRESHOLD.sub("", expr.strip())
        got = live.instant(probe)
        if not holds(probe_kind, got):
            failed[name] = (probe_kind, probe, values(got)[:12])
    assert not failed, failed
    fired = live.instant(exprs["UnlearndAdapterRejections"])
    assert {(s["metric"]["tenant"], s["metric"]["reason"]) for s in fired} == {
        (TEMP, "adapter_not_found")}


def test_rules_are_healthy_and_only_the_expected_alert_is_active(live) -> None:
    groups = live.api("rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == set(alert_exprs())
    for name, rule in rules.items():
        assert rule["health"] == "ok" and not rule.get("lastError"), (name, rule)
        assert not rule["lastEvaluation"].startswith("0001-"), (name, rule)  # evaluated
    active = {a["labels"]["alertname"] for a in live.api("alerts")["alerts"]}
    assert active <= {n for n, (_, may_fire) in ALERTS.items() if may_fire}, active
    assert "UnlearndAdapterRejections" in active
