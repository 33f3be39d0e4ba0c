"""Faults with a defined outcome: artifacts changed after activation, the registry locked,
read-only or gone, the engine failing mid-stream, a guard failing.

Each test states the outcome it asserts: a clear error for that request or admin call,
the previous good state kept, /health telling the truth, nothing served unguarded and
nothing lost from the registry. Runs over the FakeEngine (tests/serve/fakes.py).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.serve.fakes import (
    CHAT,
    HELLO,
    FakeEngine,
    RunningApp,
    base_vocab_size,
    fresh_metrics,
    make_config,
    make_policy_dir,
    parse_sse,
    running_app,
    tiny_world,
)
from unlearnd.serve.artifacts import BaseModelSpec
from unlearnd.serve.registry import SQLiteRegistry

pytestmark = pytest.mark.usefixtures("fake_guards")

SECRET = [{"role": "user", "content": "Where does Voldemort live?"}]


def fail(message: str) -> None:
    pytest.fail(message, pytrace=False)


@contextmanager
def app_with_registry(config, busy_timeout_s: float = 0.2) -> Iterator[RunningApp]:
    """Like `running_app`, with a registry whose lock wait is short (locked -> 503 fast)."""
    from fastapi.testclient import TestClient

    from unlearnd.serve.app import build_app

    engine = FakeEngine(vocab_size=base_vocab_size())
    metrics = fresh_metrics()
    config.state_dir.mkdir(parents=True, exist_ok=True)
    registry = SQLiteRegistry(config.state_dir, base=BaseModelSpec.from_model_dir(config.model),
                              max_lora_rank=config.engine.max_lora_rank,
                              busy_timeout_s=busy_timeout_s)
    app = build_app(config, engine_factory=lambda _c: engine, metrics=metrics,
                    registry=registry)
    with TestClient(app) as client:
        yield RunningApp(client, engine, metrics, config, app.state.unlearnd)
    registry.close()


def register(app: RunningApp, tenant: str, **parts: Path) -> dict:
    body = {k: str(v) for k, v in parts.items()} | {"activate": True}
    r = app.client.post(f"/admin/tenants/{tenant}/versions", json=body, headers=app.admin)
    assert r.status_code == 201, r.text
    return r.json()


def chat(app: RunningApp, tenant: str, messages=HELLO, **extra):
    return app.client.post(CHAT, json={"messages": messages, **extra},
                           headers=app.auth(tenant))


def snapshot(app: RunningApp) -> dict:
    """Everything the registry holds, through the admin API."""
    c = app.client
    tenants = c.get("/admin/tenants", headers=app.admin).json()["data"]
    out = {"tenants": sorted((t["name"], t["active_version"]) for t in tenants)}
    for t in tenants:
        out[t["name"]] = sorted(v["name"] for v in c.get(
            f"/admin/tenants/{t['name']}/versions", headers=app.admin).json()["data"])
    out["audit"] = len(c.get("/admin/audit?limit=10000", headers=app.admin).json()["data"])
    return out


# ================================================================ artifacts after activation


def test_source_artifacts_removed_or_corrupted_after_activation(tmp_path: Path) -> None:
    """Outcome: nothing changes. Registration copied adapter and policy into the store,
    so requests keep the version, re-activation of that version still works, and the
    served adapter path is the store copy, never the source."""
    import shutil

    src_adapter = tmp_path / "src-adapter"
    shutil.copytree(tiny_world()["a1"], src_adapter)
    src_policy = make_policy_dir(tmp_path / "src-policy")
    with running_app(make_config(tmp_path / "state")) as app:
        v = register(app, "acme", adapter=src_adapter, policy=src_policy)["name"]
        assert chat(app, "acme", SECRET).json()["unlearning"]["decision"] == "in_scope"
        shutil.rmtree(src_adapter)
        (src_policy / "policy.json").write_text("{corrupt")
        r = chat(app, "acme", SECRET)
        assert r.status_code == 200 and r.headers["x-unlearnd-policy-version"] == v
        assert r.json()["unlearning"]["decision"] == "in_scope"
        served = Path(app.engine.calls[-1].adapter.path)
        assert served.is_relative_to(app.config.state_dir) and served.exists()
        r = app.client.post("/admin/tenants/acme/deactivate", headers=app.admin)
        assert r.status_code == 200
        r = app.client.post("/admin/tenants/acme/activate", json={"version": v},
                            headers=app.admin)
        assert r.status_code == 200, r.text
        assert chat(app, "acme", SECRET).json()["unlearning"]["policy_version"] == v


def test_store_policy_corrupted_after_activation(tmp_path: Path) -> None:
    """Outcome: the loaded guards keep serving the version (in memory); re-activating it
    reloads from the store, fails with 422 naming the problem, and leaves the version
    active and guarded (never unguarded). Other tenants are unaffected."""
    with running_app(make_config(tmp_path / "state")) as app:
        v = register(app, "acme", policy=make_policy_dir(tmp_path / "p"))["name"]
        store_policy = app.config.state_dir / "store" / v / "policy" / "policy.json"
        assert store_policy.is_file()
        store_policy.write_text("{corrupt")
        r = chat(app, "acme", SECRET)
        assert r.status_code == 200 and r.json()["unlearning"]["decision"] == "in_scope"
        r = app.client.post("/admin/tenants/acme/activate", json={"version": v},
                            headers=app.admin)
        assert r.status_code == 422 and r.json()["error"]["code"] == "load_failed", r.text
        assert app.state.router.active_versions()["acme"] == v
        r = chat(app, "acme", SECRET)
        assert r.json()["unlearning"]["decision"] == "in_scope"
        assert chat(app, "globex").status_code == 200


def test_store_adapter_removed_then_reactivation_is_refused(tmp_path: Path) -> None:
    """Outcome: when the engine cannot load a version's adapter (store copy gone), the
    activation is a 422 and the previously active version keeps serving."""
    with running_app(make_config(tmp_path / "state")) as app:
        v1 = register(app, "acme", adapter=tiny_world()["a1"])["name"]
        v2 = register(app, "acme", adapter=tiny_world()["a2"])["name"]
        app.engine.fail_load.add(v1)  # vLLM fails to load a missing/corrupt adapter
        import shutil

        shutil.rmtree(app.config.state_dir / "store" / v1 / "adapter")
        r = app.client.post("/admin/tenants/acme/activate", json={"version": v1},
                            headers=app.admin)
        assert r.status_code == 422 and v1 in r.json()["error"]["message"]
        r = chat(app, "acme")
        assert r.status_code == 200 and r.headers["x-unlearnd-policy-version"] == v2
        assert app.engine.calls[-1].adapter.name == v2


def test_restart_with_corrupt_store_policy_fails_closed_for_that_tenant(tmp_path: Path) -> None:
    config = make_config(tmp_path / "state")
    with running_app(config) as app:
        v = register(app, "acme", policy=make_policy_dir(tmp_path / "p"))["name"]
    (config.state_dir / "store" / v / "policy" / "policy.json").write_text("{corrupt")
    try:
        with running_app(config) as app:
            assert chat(app, "globex").status_code == 200
            r = chat(app, "acme", SECRET)
            assert r.status_code == 503, r.text
            assert not [c for c in app.engine.calls if c.cache_salt ==
                        app.state.registry.get_tenant("acme").cache_salt]
            h = app.client.get("/health").json()
            # unauthenticated /health names no tenant (test_security), only the count
            assert h["status"] != "ok" and any("1 tenant policies cannot be loaded" in p
                                               for p in h["problems"])
    except Exception as e:  # noqa: BLE001
        fail(f"restart with a corrupt store policy: {type(e).__name__}: {str(e)[:300]}")


# ================================================================ registry faults


@contextmanager
def locked(db: Path) -> Iterator[None]:
    """Another process's write transaction holding the database's write lock."""
    other = sqlite3.connect(db, timeout=0.1, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_registry_locked_admin_503_serving_continues_nothing_lost(tmp_path: Path) -> None:
    """Outcome: while another writer holds the lock, admin writes answer 503
    `registry_unavailable` naming the lock, reads and serving continue with the current
    state; after the lock is released the same calls succeed and nothing was lost."""
    with app_with_registry(make_config(tmp_path / "state")) as app:
        v = register(app, "acme", adapter=tiny_world()["a1"])["name"]
        before = snapshot(app)
        with locked(app.config.state_dir / "registry.db"):
            for method, path, body in (
                    ("POST", "/admin/tenants", {"name": "initech"}),
                    ("POST", "/admin/tenants/acme/versions",
                     {"adapter": str(tiny_world()["a2"])}),
                    ("POST", "/admin/tenants/acme/deactivate", None)):
                r = app.client.request(method, path, json=body, headers=app.admin)
                assert r.status_code == 503, (path, r.text)
                err = r.json()["error"]
                assert err["code"] == "registry_unavailable" and "locked" in err["message"]
            r = chat(app, "acme")
            assert r.status_code == 200 and r.headers["x-unlearnd-policy-version"] == v
            assert chat(app, "globex").status_code == 200
            assert app.state.router.active_versions()["acme"] == v
        assert snapshot(app) == before
        assert not list((app.config.state_dir / "store").glob(".tmp-*"))  # no debris
        r = app.client.post("/admin/tenants", json={"name": "initech"}, headers=app.admin)
        assert r.status_code == 201


def test_registry_read_only_admin_503_serving_continues(tmp_path: Path) -> None:
    """Outcome: a registry that can no longer be written (read-only volume, simulated
    with `PRAGMA query_only`: the tests run as root, so file modes do not stop writes)
    gives 503 on admin writes, keeps serving, and loses nothing."""
    with app_with_registry(make_config(tmp_path / "state")) as app:
        v = register(app, "acme", adapter=tiny_world()["a1"])["name"]
        before = snapshot(app)
        app.state.registry._conn.execute("PRAGMA query_only=1")
        r = app.client.post("/admin/tenants/acme/deactivate", headers=app.admin)
        assert r.status_code == 503 and r.json()["error"]["code"] == "registry_unavailable"
        assert "readonly" in r.json()["error"]["message"].replace("-", "").replace(" ", "")
        assert chat(app, "acme").headers["x-unlearnd-policy-version"] == v
        app.state.registry._conn.execute("PRAGMA query_only=0")
        assert snapshot(app) == before


def test_health_reports_unwritable_registry(tmp_path: Path) -> None:
    with app_with_registry(make_config(tmp_path / "state")) as app:
        app.state.registry._conn.execute("PRAGMA query_only=1")
        app.client.post("/admin/tenants/acme/deactivate", headers=app.admin)  # 503
        h = app.client.get("/health")
        app.state.registry._conn.execute("PRAGMA query_only=0")
        if h.status_code == 200:
            fail(f"/health says ok while the registry cannot be written: {h.json()}")


def test_registry_unreadable_serving_continues_with_last_good_state(tmp_path: Path) -> None:
    with app_with_registry(make_config(tmp_path / "state")) as app:
        v = register(app, "acme", adapter=tiny_world()["a1"])["name"]
        real = app.state.registry._conn
        broken = sqlite3.connect(":memory:", check_same_thread=False)
        broken.close()  # every call on it raises sqlite3.ProgrammingError
        app.state.registry._conn = broken
        try:
            h = app.client.get("/health")
            assert h.status_code == 503 and "registry" in h.json()["problems"][0]
            r = app.client.post("/admin/tenants", json={"name": "x"}, headers=app.admin)
            assert r.status_code == 503
            r = chat(app, "acme")
        except Exception as e:  # noqa: BLE001
            r = None
            err = f"{type(e).__name__}: {e}"
        finally:
            app.state.registry._conn = real
        if r is None or r.status_code != 200:
            fail(f"registry unreadable: chat got {r.status_code if r else err}")
        assert r.headers["x-unlearnd-policy-version"] == v


def test_health_reports_unreadable_registry(tmp_path: Path) -> None:
    with app_with_registry(make_config(tmp_path / "state")) as app:
        real = app.state.registry._conn
        broken = sqlite3.connect(":memory:", check_same_thread=False)
        broken.close()
        app.state.registry._conn = broken
        try:
            h = app.client.get("/health")
        finally:
            app.state.registry._conn = real
        assert h.status_code == 503
        assert any(p.startswith("registry:") for p in h.json()["problems"])
        assert app.client.get("/health").status_code == 200


# ================================================================ engine faults


def test_engine_failure_mid_stream_in_band_counted_released(tmp_path: Path) -> None:
    """Outcome: headers are sent, so the error goes in-band (vLLM's SSE `error` event,
    passed on, then the `unlearning` chunk and [DONE]); it is counted as engine_error,
    the tenant's in-flight gauge goes back to 0 and the next request is served
    normally."""
    with running_app(make_config(tmp_path / "state")) as app:
        app.engine.fail_after = 2
        r = chat(app, "acme", stream=True)
        assert r.status_code == 200
        events = parse_sse(r.text)
        assert events[-1] == "[DONE]"
        assert events[-2]["unlearning"]["tenant"] == "acme"
        assert events[-3]["error"]["code"] == "500"  # vLLM's 500, its message replaced
        assert sum(1 for e in events[:-3] if e["choices"] and e["choices"][0].get(
            "delta", {}).get("content")) == 2  # what was generated before the failure
        assert app.counter("acme", "chat", "engine_error") == 1
        assert app.counter("acme", "chat", "ok") == 0
        assert app.metrics.active_requests.labels("acme")._value.get() == 0
        app.engine.fail_after = None
        assert chat(app, "acme").status_code == 200
        assert app.counter("acme", "chat", "ok") == 1


def test_engine_failure_before_first_token_non_stream_is_500(tmp_path: Path) -> None:
    with running_app(make_config(tmp_path / "state")) as app:
        app.engine.fail_after = 0
        r = chat(app, "acme")
        assert r.status_code == 500 and set(r.json()["error"]) == {
            "message", "type", "param", "code"}  # vLLM's error, passed on
        assert r.headers["x-unlearnd-policy-version"] == "none"
        assert app.counter("acme", "chat", "engine_error") == 1
        assert app.counter("acme", "chat", "aborted") == 0
        assert app.metrics.active_requests.labels("acme")._value.get() == 0


def test_engine_dead_health_says_so(tmp_path: Path) -> None:
    with running_app(make_config(tmp_path / "state")) as app:
        app.engine.healthy = False
        h = app.client.get("/health")
        assert h.status_code == 503 and h.json()["problems"][0].startswith("engine:")


# ================================================================ guard faults


def test_guard_failure_503_never_reaches_engine(tmp_path: Path) -> None:
    """Outcome: fail closed. A request whose scope guard raises is answered 503
    `guard_failed`, never sent to the engine (so never served unguarded), counted; the
    other tenant is unaffected."""
    with running_app(make_config(tmp_path / "state")) as app:
        register(app, "acme", policy=make_policy_dir(tmp_path / "p", fail_check=True))
        for stream in (False, True):
            n = len(app.engine.calls)
            r = chat(app, "acme", SECRET, stream=stream)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "guard_failed"
            assert len(app.engine.calls) == n
        assert app.counter("acme", "chat", "guard_error") == 2
        assert app.metrics.guard_failures.labels("acme")._value.get() == 2
        assert app.metrics.active_requests.labels("acme")._value.get() == 0
        assert chat(app, "globex").status_code == 200


def test_guard_that_cannot_load_is_never_activated(tmp_path: Path) -> None:
    """Outcome: a policy whose guards fail to load is refused at activation (422) and
    the previous version keeps serving with its guards."""
    with running_app(make_config(tmp_path / "state")) as app:
        good = register(app, "acme", policy=make_policy_dir(tmp_path / "good"))["name"]
        r = app.client.post("/admin/tenants/acme/versions", json={
            "policy": str(make_policy_dir(tmp_path / "bad", fail_load=True)),
            "activate": True}, headers=app.admin)
        assert r.status_code == 422 and r.json()["error"]["code"] == "load_failed"
        r = chat(app, "acme", SECRET)
        assert r.headers["x-unlearnd-policy-version"] == good
        assert r.json()["unlearning"]["decision"] == "in_scope"
        extra = app.engine.calls[-1].params.extra_args
        assert extra["unlearnd_version"] == good and extra["unlearnd_in_scope"] == 1


def test_registry_audit_records_every_change(tmp_path: Path) -> None:
    """Nothing lost: each successful admin change leaves one audit entry; failed ones
    (422, 503) leave none."""
    with app_with_registry(make_config(tmp_path / "state")) as app:
        n0 = snapshot(app)["audit"]
        register(app, "acme", policy=make_policy_dir(tmp_path / "p"))  # add + activate
        app.client.post("/admin/tenants/acme/versions", json={
            "policy": str(make_policy_dir(tmp_path / "bad", fail_load=True)),
            "activate": True}, headers=app.admin)  # add ok, activation 422
        with locked(app.config.state_dir / "registry.db"):
            app.client.post("/admin/tenants/acme/deactivate", headers=app.admin)  # 503
        entries = app.client.get("/admin/audit?limit=10000", headers=app.admin).json()["data"]
        actions = [e["action"] for e in entries[: len(entries) - n0]]
        assert len(actions) == 3, actions
        assert json.dumps(entries)  # serialisable
