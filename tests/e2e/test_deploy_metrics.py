"""Every metric the Grafana dashboard and the alert rules query is one a live unlearnd
/metrics really exports: ours (unlearnd_*) and vLLM's (vllm:*), on the session server."""

from __future__ import annotations

import httpx
import pytest

from tests.deploy.deploy_files import (
    alert_exprs,
    dashboard_exprs,
    defined_labels,
    exported_labels,
    exported_names,
    metric_names,
    unknown_labels,
)

pytestmark = pytest.mark.e2e


def test_dashboard_and_alerts_query_exported_metrics(tiny_server) -> None:
    text = httpx.get(tiny_server.base_url + "/metrics", timeout=30).text
    live = exported_names(text)
    assert any(n.startswith("vllm:") for n in live) and any(n.startswith("unlearnd_") for n in live)
    queried = {**{f"dashboard {k}": v for k, v in dashboard_exprs().items()},
               **{f"alert {k}": v for k, v in alert_exprs().items()}}
    missing = {where: sorted(metric_names(expr) - live) for where, expr in queried.items()
               if metric_names(expr) - live}
    assert not missing, missing
    # ... and every label they select or group by is one those metrics carry (a rule
    # grouping by a label the server never sets fires with that label empty).
    # Ours from their definitions (a counter has no sample before its first increment).
    carried = exported_labels(text) | defined_labels()
    wrong = {where: sorted(unknown_labels(expr, carried)) for where, expr in queried.items()
             if unknown_labels(expr, carried)}
    assert not wrong, wrong
