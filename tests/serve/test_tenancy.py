"""Hot swaps and draining in TenantRouter, and request snapshots across a swap (through
the app: the tenant edge holds a lease on the version a request started with)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.serve.fakes import (
    CHAT,
    HELLO,
    KEYS,
    POLICY_HEADER,
    FakeEngine,
    asgi_request,
    fake_load_guards,
    fresh_metrics,
    make_policy_dir,
    parse_sse,
    tiny_world,
    wait_until,
)
from unlearnd.serve.engine import IDENTITY_LORA_NAME
from unlearnd.serve.registry import PolicyVersion, RegistrySnapshot, Tenant
from unlearnd.serve.tenancy import TenantRouter

ACME = Tenant("acme", "salt-acme", 0.0)
GLOBEX = Tenant("globex", "salt-globex", 0.0)


def version(name: str, int_id: int, *, adapter: bool = True,
            policy_dir: str | None = None) -> PolicyVersion:
    tenant = name.split("@")[0]
    return PolicyVersion(name, tenant, name.split("@")[1] * 4, f"/store/{name}/adapter"
                         if adapter else None, policy_dir, int_id, 0.0)


class MiniRegistry:
    """The slice of the Registry protocol TenantRouter reads."""

    def __init__(self) -> None:
        self.tenants: dict[str, Tenant] = {}
        self.active: dict[str, PolicyVersion | None] = {}
        self.changed_at: dict[str, float] = {}
        self.gen = 0

    def set(self, tenant: Tenant, v: PolicyVersion | None) -> None:
        self.tenants[tenant.name] = tenant
        self.active[tenant.name] = v
        self.gen += 1

    def drop(self, name: str) -> None:
        del self.tenants[name], self.active[name]
        self.gen += 1

    def tenant_for_key(self, key: str) -> Tenant | None:
        return self.tenants.get(key)

    def generation(self) -> int:
        return self.gen

    def list_tenants(self) -> list[Tenant]:
        return sorted(self.tenants.values(), key=lambda t: t.name)

    def active_version(self, name: str) -> PolicyVersion | None:
        return self.active[name]

    def pointer_changed_at(self, name: str) -> float | None:
        return self.changed_at.get(name)

    def snapshot(self, seen: int | None = None) -> RegistrySnapshot | None:
        if self.gen == seen:
            return None
        tenants = self.list_tenants()
        return RegistrySnapshot(self.gen, tenants, {},
                                {t.name: self.active[t.name] for t in tenants},
                                {t.name: self.changed_at.get(t.name) for t in tenants})


def make_router(drain_timeout_s: float = 5.0, keep_previous: int = 0
                ) -> tuple[TenantRouter, FakeEngine, MiniRegistry]:
    """keep_previous=0 by default: the release tests watch every swapped-out adapter go."""
    engine = FakeEngine()
    reg = MiniRegistry()
    router = TenantRouter(reg, engine, fresh_metrics(), Path("/identity"),
                          drain_timeout_s=drain_timeout_s, keep_previous=keep_previous)
    return router, engine, reg


async def settle(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def test_current_without_policy_is_identity() -> None:
    router, _, _ = make_router()
    sp = router.current(ACME)
    assert sp.version is None and sp.adapter.name == IDENTITY_LORA_NAME
    assert sp.cache_salt == "salt-acme"
    assert router.current(ACME) is sp


def test_install_loads_adapter_before_pointer_moves() -> None:
    async def run() -> None:
        router, engine, _ = make_router()
        v1 = version("acme@aaa", 1)
        engine.fail_load.add("acme@aaa")
        with pytest.raises(Exception, match="cannot load"):
            await router.install(ACME, v1)
        assert router.current(ACME).version is None
        engine.fail_load.clear()
        sp, elapsed = await router.install(ACME, v1)
        assert engine.loaded == ["acme@aaa"] and router.current(ACME) is sp
        assert sp.adapter.int_id == 1 and sp.mechanisms == ("adapter",)
        assert elapsed >= 0
        assert router.metrics.swaps.labels("acme", "activate")._value.get() == 1

    asyncio.run(run())


def test_old_adapter_released_only_after_its_lease_ends() -> None:
    async def run() -> None:
        router, engine, _ = make_router()
        await router.install(ACME, version("acme@aaa", 1))
        held = router.acquire(ACME)
        await router.install(ACME, version("acme@bbb", 2))
        await settle()
        assert router.current(ACME).version == "acme@bbb"
        assert held.version == "acme@aaa"  # the running request keeps its snapshot
        assert engine.released == []
        second = router.acquire(ACME)
        assert second.version == "acme@bbb"
        router.release(held)
        await settle()
        assert engine.released == ["acme@aaa"]
        router.release(second)
        await settle()
        assert engine.released == ["acme@aaa"]  # the active one stays

    asyncio.run(run())


def test_release_waits_for_every_lease() -> None:
    async def run() -> None:
        router, engine, _ = make_router()
        await router.install(ACME, version("acme@aaa", 1))
        a, b = router.acquire(ACME), router.acquire(ACME)
        await router.install(ACME, version("acme@bbb", 2))
        router.release(a)
        await settle()
        assert engine.released == []
        router.release(b)
        await settle()
        assert engine.released == ["acme@aaa"]
        assert router.metrics.active_requests.labels("acme")._value.get() == 0

    asyncio.run(run())


def test_idle_old_adapter_released_at_once() -> None:
    async def run() -> None:
        router, engine, _ = make_router()
        await router.install(ACME, version("acme@aaa", 1))
        sp = router.acquire(ACME)
        router.release(sp)  # finished before the swap
        await router.install(ACME, version("acme@bbb", 2))
        await settle()
        assert engine.released == ["acme@aaa"]

    asyncio.run(run())


def test_drain_timeout_releases_anyway() -> None:
    async def run() -> None:
        router, engine, _ = make_router(drain_timeout_s=0.05)
        await router.install(ACME, version("acme@aaa", 1))
        router.acquire(ACME)  # never released (a stuck request)
        await router.install(ACME, version("acme@bbb", 2))
        await asyncio.sleep(0.02)
        assert engine.released == []
        await asyncio.sleep(0.1)
        assert engine.released == ["acme@aaa"]

    asyncio.run(run())


def test_reactivated_meanwhile_is_not_released() -> None:
    async def run() -> None:
        router, engine, _ = make_router()
        v1 = version("acme@aaa", 1)
        await router.install(ACME, v1)
        held = router.acquire(ACME)
        await router.install(ACME, version("acme@bbb", 2))
        await router.install(ACME, v1)  # swapped back while the request still runs
        router.release(held)
        await settle()
        assert "acme@aaa" not in engine.released
        assert engine.released == ["acme@bbb"]

    asyncio.run(run())


def test_identity_adapter_never_released_and_tenants_independent() -> None:
    async def run() -> None:
        router, engine, _ = make_router()
        await router.install(ACME, version("acme@aaa", 1, adapter=False,
                                           policy_dir=None))
        await router.install(GLOBEX, version("globex@ccc", 3))
        held = router.acquire(GLOBEX)
        await router.install(ACME, None, kind="deactivate")
        await router.install(ACME, version("acme@bbb", 2))
        await settle()
        assert IDENTITY_LORA_NAME not in engine.released
        assert engine.released == []
        assert router.current(GLOBEX).version == "globex@ccc"
        router.release(held)

    asyncio.run(run())


def test_deactivate_releases_old_adapter_after_drain() -> None:
    async def run() -> None:
        router, engine, _ = make_router()
        await router.install(ACME, version("acme@aaa", 1))
        held = router.acquire(ACME)
        await router.install(ACME, None, kind="deactivate")
        assert router.current(ACME).adapter.name == IDENTITY_LORA_NAME
        await settle()
        assert engine.released == []
        router.release(held)
        await settle()
        assert engine.released == ["acme@aaa"]

    asyncio.run(run())


def test_sync_from_registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("unlearnd.serve.tenancy.load_guards", fake_load_guards)
    policy = make_policy_dir(tmp_path / "p", trigger="Gandalf")

    async def run() -> None:
        router, engine, reg = make_router()
        reg.set(ACME, version("acme@aaa", 1, policy_dir=str(policy)))
        reg.set(GLOBEX, None)
        await router.sync_from_registry()
        assert router.active_versions() == {"acme": "acme@aaa", "globex": None}
        sp = router.current(ACME)
        assert (await sp.guards.get()).trigger == "Gandalf"
        assert sp.mechanisms == ("adapter", "firewall", "refusal")
        await router.ready(sp)  # the adapter's load, behind the pointer
        loads = list(engine.loaded)
        assert loads == ["acme@aaa"]
        await router.sync_from_registry()  # same generation: nothing to do
        assert engine.loaded == loads
        reg.set(ACME, version("acme@bbb", 2))
        await router.sync_from_registry()
        await settle()
        assert router.current(ACME).version == "acme@bbb"
        assert engine.released == ["acme@aaa"]
        assert router.metrics.swaps.labels("acme", "sync")._value.get() == 2
        reg.drop("globex")
        await router.sync_from_registry()
        assert "globex" not in router.active_versions()
        reg.drop("acme")  # a deleted tenant leaves the active-version panel too
        await router.sync_from_registry()
        assert router.metrics.registry.get_sample_value(
            "unlearnd_active_policy_info", {"tenant": "acme", "version": "acme@bbb"}) is None

    asyncio.run(run())


def test_sync_records_propagation_of_changes_made_elsewhere() -> None:
    """A version activated elsewhere 3 s ago is observed as ~3 s of propagation; the
    versions found at start-up are not (this replica was not running)."""
    import threading
    import time

    async def run() -> None:
        router, _, reg = make_router()
        reg.set(ACME, version("acme@aaa", 1))
        reg.changed_at["acme"] = time.time() - 100
        await router.sync_from_registry()

        def count() -> float | None:
            return router.metrics.registry.get_sample_value(
                "unlearnd_policy_propagation_seconds_count", {"tenant": "acme"})

        assert count() == 0
        reg.set(ACME, version("acme@bbb", 2))
        reg.changed_at["acme"] = time.time() - 3
        readers: list[str] = []
        snapshot = reg.snapshot

        def snapshot_in_a_thread(seen: int | None = None) -> RegistrySnapshot | None:
            readers.append(threading.current_thread().name)
            return snapshot(seen)

        reg.snapshot = snapshot_in_a_thread  # type: ignore[method-assign]
        await router.sync_from_registry()
        assert router.current(ACME).version == "acme@bbb"
        assert count() == 1
        total = router.metrics.registry.get_sample_value(
            "unlearnd_policy_propagation_seconds_sum", {"tenant": "acme"})
        assert 3 <= total < 10
        # The database was read off the event loop's thread.
        assert readers and threading.main_thread().name not in readers

    asyncio.run(run())


def test_synced_swap_routes_at_once_and_loads_behind_the_pointer() -> None:
    """A version activated through another replica: this replica's pointer moves at the
    sync, before the adapter is in its engine (no request admitted after the sync gets
    the version being replaced); `ready` holds a request until the load is done."""
    async def run() -> None:
        router, engine, reg = make_router(keep_previous=1)
        reg.set(ACME, version("acme@aaa", 1))
        await router.sync_from_registry()
        await router.ready(router.current(ACME))
        assert engine.loaded == ["acme@aaa"]
        engine.loads_paused = True
        reg.set(ACME, version("acme@bbb", 2))
        await router.sync_from_registry()
        sp = router.acquire(ACME)
        assert sp.version == "acme@bbb" and engine.loaded == ["acme@aaa"]  # not loaded yet
        waiter = asyncio.create_task(router.ready(sp))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        engine.loads_paused = False
        await asyncio.wait_for(waiter, 5)
        assert engine.loaded == ["acme@aaa", "acme@bbb"]
        router.release(sp)
        await router.sync_from_registry()  # same generation, already held: no second load
        reg.set(ACME, version("acme@bbb", 2))
        await router.sync_from_registry()
        await router.ready(router.current(ACME))
        assert engine.loaded == ["acme@aaa", "acme@bbb"]

    asyncio.run(run())


def test_synced_swap_whose_load_fails_gets_503_never_the_old_version() -> None:
    """The load behind a synced pointer fails: requests already waiting get a 503 that
    names the version, later ones are refused at admission (`error`), and a rollback
    made elsewhere onto the kept version serves again with no load."""
    from unlearnd.serve.errors import APIError

    async def run() -> None:
        router, engine, reg = make_router(keep_previous=1)
        reg.set(ACME, version("acme@aaa", 1))
        await router.sync_from_registry()
        await router.ready(router.current(ACME))
        engine.fail_load.add("acme@bbb")
        engine.loads_paused = True
        reg.set(ACME, version("acme@bbb", 2))
        await router.sync_from_registry()
        sp = router.acquire(ACME)
        assert sp.version == "acme@bbb"
        engine.loads_paused = False
        with pytest.raises(APIError) as e:
            await router.ready(sp)
        assert e.value.status == 503 and e.value.code == "policy_unavailable"
        assert "acme@bbb" in e.value.message and "cannot load adapter" in e.value.message
        router.release(sp)
        broken = router.current(ACME)
        assert broken.version == "acme@bbb" and "cannot be loaded" in broken.error
        assert router.broken_tenants() == ["acme"]
        reg.set(ACME, version("acme@aaa", 1))  # rolled back through another replica
        await router.sync_from_registry()
        fixed = router.current(ACME)
        assert fixed.version == "acme@aaa" and fixed.error is None
        await router.ready(fixed)
        assert engine.loaded == ["acme@aaa"]  # kept: a pointer move, nothing reloaded

    asyncio.run(run())


# ---------------------------------------------------------------- requests across a swap


def _register(app, tenant: str, adapter: Path, *, activate: bool) -> str:
    r = app.client.post(f"/admin/tenants/{tenant}/versions", json={
        "adapter": str(adapter), "activate": activate}, headers=app.admin)
    assert r.status_code == 201, r.text
    return r.json()["name"]


def _two_versions(app) -> tuple[str, str]:
    v1 = _register(app, "acme", tiny_world()["a1"], activate=True)
    v2 = _register(app, "acme", tiny_world()["a2"], activate=False)
    return v1, v2


def _active(app) -> float:
    return app.metrics.active_requests.labels("acme")._value.get()


def test_request_during_a_synced_load_waits_and_gets_the_new_version(app) -> None:
    """Through the app: a swap made in the shared registry (as another replica makes it)
    and read by this replica's sync while its engine is still loading the adapter. A
    request that arrives then is held at the edge, not sent to the engine, and answered
    by the new version once the load is done; when the load fails it gets a 503 that
    names the version (counted as an engine error), never the old version's answer."""
    v1, v2 = _two_versions(app)
    acme = app.auth("acme")
    v3 = _register(app, "acme", tiny_world()["a1"], activate=False)
    st = app.state

    async def scenario(target: str) -> tuple:
        app.engine.loads_paused = True
        st.registry.activate("acme", target, actor="replica-b")
        await st.router.sync_from_registry()
        calls = len(app.engine.calls)
        task = asyncio.create_task(asgi_request(app.client.app, "POST", CHAT,
                                                body={"messages": HELLO}, headers=acme))
        await asyncio.sleep(0.1)
        held = (task.done(), len(app.engine.calls) - calls, st.router.current(
            st.registry.get_tenant("acme")).version)
        app.engine.loads_paused = False
        return held, await task

    held, r = app.client.portal.call(scenario, v2)
    assert held == (False, 0, v2)  # routed to v2 at once, held until its adapter loads
    assert r.status == 200 and r.headers[POLICY_HEADER] == v2
    assert app.engine.calls[-1].adapter.name == v2 and v2 in app.engine.loaded
    app.engine.fail_load.add(v3)
    held, r = app.client.portal.call(scenario, v3)
    assert held == (False, 0, v3)
    err = r.json()["error"]
    assert r.status == 503 and err["code"] == "policy_unavailable" and v3 in err["message"]
    assert app.engine.calls[-1].adapter.name == v2  # nothing reached the engine for v3
    assert app.metrics.requests.labels("acme", "chat", "engine_error")._value.get() == 1
    after = app.client.post(CHAT, json={"messages": HELLO}, headers=acme)
    assert after.status_code == 503 and "cannot be served" in after.json()["error"]["message"]


@pytest.mark.usefixtures("fake_guards")
@pytest.mark.parametrize("stream", [True, False])
def test_request_holds_its_snapshot_across_a_swap(app, stream: bool) -> None:
    """A swap while a request runs: the request finishes on its version (adapter,
    header, `unlearning`), which is released only after it; the next one gets the new."""
    v1, v2 = _two_versions(app)
    acme, adm = app.auth("acme"), app.admin

    async def scenario() -> tuple:
        app.engine.paused = True
        task = asyncio.create_task(asgi_request(
            app.client.app, "POST", CHAT, body={"messages": HELLO, "stream": stream},
            headers=acme))
        for _ in range(500):
            if app.engine.calls:
                break
            await asyncio.sleep(0.01)
        swap = await asgi_request(app.client.app, "POST", "/admin/tenants/acme/activate",
                                  body={"version": v2}, headers=adm)
        await asyncio.sleep(0.05)
        held = (list(app.engine.released), _active(app), task.done())
        app.engine.paused = False
        first = await task
        after = await asgi_request(app.client.app, "POST", CHAT,
                                   body={"messages": HELLO}, headers=acme)
        return swap, held, first, after

    swap, held, first, after = app.client.portal.call(scenario)
    assert swap.status == 200, swap.body
    assert held == ([], 1, False)  # v1 still leased by the running request
    assert first.status == 200 and first.headers[POLICY_HEADER] == v1
    if stream:
        events = parse_sse(first.body.decode())
        assert events[-1] == "[DONE]"
        assert events[-2]["unlearning"]["policy_version"] == v1
    else:
        assert first.json()["unlearning"]["policy_version"] == v1
    assert app.engine.calls[0].adapter.name == v1
    assert after.headers[POLICY_HEADER] == v2 and app.engine.calls[-1].adapter.name == v2
    assert wait_until(lambda: app.engine.released == [v1])
    assert _active(app) == 0


@pytest.mark.usefixtures("fake_guards")
def test_abandoned_stream_releases_lease_and_aborts_engine_request(app) -> None:
    """The client goes away mid-stream: the engine request is aborted and closed, the
    lease is released at once (a swap then frees the old adapter without waiting for the
    drain timeout), the request is counted aborted."""
    v1, v2 = _two_versions(app)
    app.engine.step_delay_s = 0.01  # the client leaves while tokens are still coming

    async def go():
        return await asgi_request(app.client.app, "POST", CHAT, body={
            "messages": HELLO, "stream": True}, headers=app.auth("acme"),
            disconnect_after=2)

    res = app.client.portal.call(go)
    assert res.status == 200 and b"[DONE]" not in res.body
    rid = app.engine.calls[0].request_id
    assert wait_until(lambda: app.engine.aborted == [rid] and rid in app.engine.closed)
    assert rid not in app.engine.finished
    assert _active(app) == 0
    assert app.metrics.requests.labels("acme", "chat", "aborted")._value.get() == 1
    assert app.metrics.requests.labels("acme", "chat", "ok")._value.get() == 0
    r = app.client.post("/admin/tenants/acme/activate", json={"version": v2},
                        headers=app.admin)
    assert r.status_code == 200
    assert wait_until(lambda: app.engine.released == [v1], 1.0)  # not the 5 s drain


@pytest.mark.usefixtures("fake_guards")
def test_stream_closed_before_its_first_chunk_releases_everything(app) -> None:
    """The connection is gone before the response starts (send raises at once)."""
    _two_versions(app)

    async def go():
        scope_app = app.client.app
        data = json.dumps({"messages": HELLO, "stream": True}).encode()
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
                 "http_version": "1.1", "method": "POST", "scheme": "http", "path": CHAT,
                 "raw_path": CHAT.encode(), "root_path": "", "query_string": b"",
                 "headers": [(b"content-type", b"application/json"),
                             (b"content-length", str(len(data)).encode()),
                             (b"authorization", f"Bearer {KEYS['acme']}".encode())],
                 "client": ("127.0.0.1", 1), "server": ("testserver", 80), "state": {}}
        sent = []

        async def receive() -> dict:
            if not sent:
                sent.append(1)
                return {"type": "http.request", "body": data, "more_body": False}
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            raise OSError("client disconnected")

        try:
            await scope_app(scope, receive, send)
        except Exception:  # noqa: BLE001 - ClientDisconnect / OSError propagate
            pass

    app.client.portal.call(go)
    assert _active(app) == 0 and app.state.limiter.in_flight("acme") == 0
    assert app.metrics.requests.labels("acme", "chat", "aborted")._value.get() == 1
    assert app.client.post(CHAT, json={"messages": HELLO},
                           headers=app.auth("acme")).status_code == 200


# -- the guard cache: bounded memory with hundreds of tenants -------------------------------


def test_guard_cache_evicts_least_recently_used_and_reloads(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    """At most `size` pipelines stay loaded; an evicted one is loaded again on its next
    use (a request already holding it keeps it); a failed load changes nothing."""
    from unlearnd.serve.tenancy import GuardCache, GuardRef

    loads: list[str] = []

    def counting_load(policy_dir: str):
        loads.append(policy_dir)
        return fake_load_guards(policy_dir)

    monkeypatch.setattr("unlearnd.serve.tenancy.load_guards", counting_load)
    dirs = [str(make_policy_dir(tmp_path / f"p{i}", trigger=f"T{i}")) for i in range(3)]
    cache = GuardCache(size=2)
    refs = [GuardRef(d, cache) for d in dirs]

    async def run() -> None:
        held = await refs[0].get()
        await refs[1].get()
        assert await refs[0].get() is held and len(loads) == 2  # cached: 0 is now newest
        await refs[2].get()  # evicts 1, the least recently used
        assert len(cache) == 2 and cache.evictions == 1
        assert cache.peek(dirs[1]) is None and cache.peek(dirs[0]) is held
        again = await refs[1].get()
        assert loads == [dirs[0], dirs[1], dirs[2], dirs[1]]
        assert again.trigger == "T1" and held.trigger == "T0"  # the holder keeps its own
        # fresh: read from the store even when cached (an operator's activation)
        assert cache.load(dirs[1], fresh=True) is not again and loads[-1] == dirs[1]

    asyncio.run(run())

    def broken(policy_dir: str):
        raise ValueError("policy cannot be loaded")

    monkeypatch.setattr("unlearnd.serve.tenancy.load_guards", broken)
    before = {d: cache.peek(d) for d in dirs}
    with pytest.raises(ValueError, match="cannot be loaded"):
        cache.load(dirs[0], fresh=True)
    assert {d: cache.peek(d) for d in dirs} == before


@pytest.mark.parametrize("size", [0, -1, True, 2.5, "3"])
def test_guard_cache_size_must_be_a_positive_int(size) -> None:
    from unlearnd.serve.tenancy import GuardCache

    with pytest.raises(ValueError, match="guard cache size"):
        GuardCache(size=size)


def test_many_tenants_hold_at_most_the_cache(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    """40 guard tenants synced with a cache of 8: every version is validated at install
    (40 loads), only 8 stay loaded, and each tenant's guards still answer."""
    from unlearnd.serve.tenancy import GuardCache

    monkeypatch.setattr("unlearnd.serve.tenancy.load_guards", fake_load_guards)
    engine = FakeEngine()
    reg = MiniRegistry()
    cache = GuardCache(size=8)
    router = TenantRouter(reg, engine, fresh_metrics(), Path("/identity"), guard_cache=cache)
    tenants = [Tenant(f"t{i:02d}", f"salt-{i}", 0.0) for i in range(40)]
    for i, t in enumerate(tenants):
        reg.set(t, version(f"t{i:02d}@{i:03d}", i + 1, policy_dir=str(
            make_policy_dir(tmp_path / f"p{i}", trigger=f"T{i}")), adapter=False))

    async def run() -> None:
        await router.sync_from_registry()
        assert cache.loads == 40 and len(cache) == 8
        for i, t in enumerate(tenants):
            assert (await router.current(t).guards.get()).trigger == f"T{i}"
            assert len(cache) <= 8

    asyncio.run(run())


def test_kept_previous_version_makes_a_synced_rollback_a_pointer_move() -> None:
    """keep_previous=1: the version swapped out stays loaded, so a rollback that reaches
    this replica through the registry loads nothing; the one before it is released
    once drained; an operator's activation here still loads (checks the store copy)."""
    async def run() -> None:
        router, engine, reg = make_router(keep_previous=1)
        v1, v2, v3 = (version(f"acme@{c * 3}", i + 1) for i, c in enumerate("abc"))
        for v in (v1, v2):
            reg.set(ACME, v)
            await router.sync_from_registry()
        await settle()
        assert engine.released == []  # v1 kept
        loads = list(engine.loaded)
        reg.set(ACME, v1)  # rolled back through another replica
        await router.sync_from_registry()
        await settle()
        assert router.current(ACME).version == "acme@aaa"
        assert engine.loaded == loads and engine.released == []  # no load, v2 kept
        reg.set(ACME, v3)
        await router.sync_from_registry()
        await settle()
        assert engine.released == ["acme@bbb"]  # fell off the end: v1 is the kept one
        await router.install(ACME, v1)  # an operator's activation: loads again
        assert engine.loaded.count("acme@aaa") == loads.count("acme@aaa") + 1
        reg.drop("acme")
        await router.sync_from_registry()
        await settle()
        assert sorted(engine.released) == ["acme@aaa", "acme@bbb", "acme@ccc"]

    asyncio.run(run())


@pytest.mark.parametrize("bad", [-1, True, 1.5])
def test_keep_previous_must_be_a_count(bad) -> None:
    with pytest.raises(ValueError, match="keep_previous"):
        TenantRouter(MiniRegistry(), FakeEngine(), fresh_metrics(), Path("/identity"),
                     keep_previous=bad)
