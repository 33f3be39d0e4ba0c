"""The compose stack's Prometheus config and alert rules, checked by promtool itself.

promtool comes from Debian's prometheus package (scripts/ci_services.sh installs it);
without it the promtool tests skip. The metric-name test needs nothing external.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.deploy.deploy_files import (
    ALERT_RULES,
    ALERT_TESTS,
    PROMETHEUS_CONFIG,
    alert_exprs,
    defined_labels,
    exported_names,
    metric_names,
    unknown_labels,
)
from unlearnd.serve.metrics import UnlearndMetrics


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package prometheus; "
                    "scripts/ci_services.sh installs it)")
    return path


def run(promtool: str, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_prometheus_config_is_valid(promtool: str) -> None:
    out = run(promtool, "check", "config", PROMETHEUS_CONFIG)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout + out.stderr  # alerts.yml is really loaded


def test_alert_rules_are_valid(promtool: str) -> None:
    out = run(promtool, "check", "rules", ALERT_RULES)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(alert_exprs())} rules found" in out.stdout + out.stderr


def test_alerts_fire_on_synthetic_series(promtool: str) -> None:
    """alerts_test.yml: error rate, guard failures, adapter rejections, scope-hit spike."""
    out = run(promtool, "test", "rules", ALERT_TESTS)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_rejects_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    broken = tmp_path / "alerts.yml"
    broken.write_text(ALERT_RULES.read_text().replace("> 0.05", "> > 0.05", 1))
    assert run(promtool, "check", "rules", broken).returncode != 0


def test_alerts_name_only_metrics_that_exist() -> None:
    """Our names against the metrics module; vLLM's are checked against a live server in
    tests/e2e/test_deploy_metrics.py."""
    registry = CollectorRegistry()
    UnlearndMetrics(registry).init_tenant("t")
    ours = exported_names(generate_latest(registry).decode())
    needed = {"UnlearndHighErrorRate", "UnlearndHighLatencyP95", "UnlearndGuardFailures",
              "UnlearndAdapterRejections", "UnlearndScopeHitSpike"}
    assert needed <= set(alert_exprs())
    for name, expr in alert_exprs().items():
        names = metric_names(expr)
        assert names or "up{" in expr, name
        missing = {n for n in names if n.startswith("unlearnd_")} - ours
        assert not missing, (name, missing)


def test_alerts_use_only_labels_our_metrics_carry() -> None:
    """A rule grouping by a label the server never sets fires with that label empty
    (UnlearndAdapterRejections once grouped by `code`; the metric's label is `reason`).
    Rules on vLLM's metrics are checked against a live server in the e2e tier."""
    carried = defined_labels()
    ours = {name: expr for name, expr in alert_exprs().items()
            if not any(n.startswith("vllm:") for n in metric_names(expr))}
    assert "UnlearndAdapterRejections" in ours
    wrong = {name: unknown_labels(expr, carried) for name, expr in ours.items()
             if unknown_labels(expr, carried)}
    assert not wrong, wrong
    assert unknown_labels('sum by (tenant, code) (unlearnd_adapter_rejections_total)',
                          carried) == {"code"}
