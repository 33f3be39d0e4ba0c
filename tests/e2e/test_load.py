"""A small version of benchmarks/load.py against the session's real server.

60 streaming chat requests, 12 at a time, over three tenants with different policy
versions (acme: adapter a1, globex: adapter a2, public: none); a quarter hang up after
two chunks. Outcome: no error apart from the deliberate disconnects, every finished
response reports its own tenant's version (header and final chunk), vLLM and unlearnd
hold no request afterwards, and the server's memory settles.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

from tests.e2e.server import KEYS

pytestmark = pytest.mark.e2e

_LOAD = Path(__file__).resolve().parents[2] / "benchmarks" / "load.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("unlearnd_bench_load", _LOAD)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_mixed_tenant_streaming_load_with_disconnects(tiny_server) -> None:
    load = _load_module()
    keys = {t: KEYS[t] for t in ("acme", "globex", "public")}
    url = tiny_server.base_url
    before = load.settle(url, timeout_s=60)
    assert before["settled"], before
    # a short warm-up so first-use allocations are not counted as growth
    asyncio.run(load.run_load(url, keys, requests=6, concurrency=3, disconnect_frac=0))
    load.settle(url, timeout_s=60)
    rss_before = load.rss_bytes(tiny_server.proc.pid)
    api_before = load.rss_breakdown_mb(tiny_server.proc.pid)

    report = asyncio.run(load.run_load(url, keys, requests=60, concurrency=12,
                                       disconnect_frac=0.25, disconnect_after=2,
                                       max_tokens=16, time_limit_s=240))
    s = report.summary()
    print("\nload:", s)
    after = load.settle(url, timeout_s=60)
    rss_after = load.rss_bytes(tiny_server.proc.pid)
    api_after = load.rss_breakdown_mb(tiny_server.proc.pid)
    print("rss by process before/after:", api_before, api_after)
    print("after:", after, f"rss {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MB")

    assert s["requests_sent"] == 60, s  # nothing cut by the time limit
    assert s["errors"] == 0 and s["isolation_violations"] == 0, s["error_details"]
    assert s["disconnected"] + s["ok"] == 60
    assert s["disconnected"] >= 1  # the disconnect path was exercised
    versions = report.expected_versions
    assert versions["acme"] and versions["globex"] and versions["acme"] != versions["globex"]
    assert versions["public"] is None
    for r in report.completed:  # checked per request in run_load; re-assert the count
        assert r.tenant in keys
    assert {r.tenant for r in report.completed} == set(keys)
    assert after["settled"], after["gauges"]  # no orphaned engine requests or leases
    # memory settled: our API process (the server pid itself) must stay flat; the whole
    # tree (vLLM's worker pages in its KV cache as blocks are first used) within 15 %
    api = f"{tiny_server.proc.pid} "
    own_before = next(v for k, v in api_before.items() if k.startswith(api))
    own_after = next(v for k, v in api_after.items() if k.startswith(api))
    assert own_after - own_before < 32, (own_before, own_after)
    assert rss_after < rss_before * 1.15, (rss_before, rss_after)
