"""Hot swaps and draining in TenantRouter, and request snapshots across a swap (Serving)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.serve.fakes import FakeEngine, fake_load_guards, fresh_metrics, make_policy_dir
from unlearnd.serve.engine import IDENTITY_LORA_NAME
from unlearnd.serve.protocol import ChatCompletionRequest
from unlearnd.serve.registry import PolicyVersion, Tenant
from unlearnd.serve.serving import Serving
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


def make_router(drain_timeout_s: float = 5.0) -> tuple[TenantRouter, FakeEngine, MiniRegistry]:
    engine = FakeEngine()
    reg = MiniRegistry()
    router = TenantRouter(reg, engine, fresh_metrics(), Path("/identity"),
                          drain_timeout_s=drain_timeout_s)
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
        assert sp.guards.trigger == "Gandalf"
        assert sp.mechanisms == ("adapter", "firewall", "refusal")
        loads = list(engine.loaded)
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
        generation = reg.generation

        def generation_in_a_thread() -> int:
            readers.append(threading.current_thread().name)
            return generation()

        reg.generation = generation_in_a_thread  # type: ignore[method-assign]
        await router.sync_from_registry()
        assert router.current(ACME).version == "acme@bbb"
        assert count() == 1
        total = router.metrics.registry.get_sample_value(
            "unlearnd_policy_propagation_seconds_sum", {"tenant": "acme"})
        assert 3 <= total < 10
        # The database was read off the event loop's thread.
        assert readers and threading.main_thread().name not in readers

    asyncio.run(run())


# ---------------------------------------------------------------- Serving across a swap


def _serving(router: TenantRouter, engine: FakeEngine) -> Serving:
    from tests.serve.fakes import tiny_tokenizer

    return Serving(engine, router, tiny_tokenizer(), router.metrics, max_tokens_limit=64,
                   max_messages=8, max_n=4)


async def _never() -> bool:
    return False


def test_stream_holds_its_snapshot_across_a_swap() -> None:
    async def run() -> None:
        router, engine, _ = make_router()
        serving = _serving(router, engine)
        await router.install(ACME, version("acme@aaa", 1))
        req = ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi"}], "stream": True})
        stream, sp = await serving.chat(req, ACME, _never)
        assert sp.version == "acme@aaa"
        chunks = [await stream.__anext__(), await stream.__anext__()]  # role + first token
        assert len(chunks) == 2
        await router.install(ACME, version("acme@bbb", 2))
        await settle()
        assert engine.released == []  # the stream still holds acme@aaa
        rest = [c async for c in stream]
        assert rest[-1] == "data: [DONE]\n\n"
        assert '"policy_version":"acme@aaa"' in rest[-2]
        assert engine.calls[0].adapter.name == "acme@aaa"
        await settle()
        assert engine.released == ["acme@aaa"]
        _, sp2 = await serving.chat(req.model_copy(update={"stream": False}), ACME, _never)
        assert sp2.version == "acme@bbb" and engine.calls[-1].adapter.name == "acme@bbb"

    asyncio.run(run())


def test_non_stream_request_holds_snapshot_while_engine_runs() -> None:
    async def run() -> None:
        router, engine, _ = make_router()
        serving = _serving(router, engine)
        await router.install(ACME, version("acme@aaa", 1))
        engine.paused = True
        req = ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi"}]})
        task = asyncio.create_task(serving.chat(req, ACME, _never))
        await asyncio.sleep(0.02)
        await router.install(ACME, version("acme@bbb", 2))
        await asyncio.sleep(0.02)
        assert engine.released == [] and not task.done()
        engine.paused = False
        body, sp = await task
        assert body["unlearning"]["policy_version"] == "acme@aaa"
        await settle()
        assert engine.released == ["acme@aaa"]

    asyncio.run(run())


def test_abandoned_stream_releases_lease_and_closes_engine_request() -> None:
    async def run() -> None:
        router, engine, _ = make_router()
        serving = _serving(router, engine)
        await router.install(ACME, version("acme@aaa", 1))
        req = ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi"}], "stream": True})
        stream, _ = await serving.chat(req, ACME, _never)
        await stream.__anext__()
        await stream.__anext__()
        await stream.aclose()  # client went away
        assert engine.closed == [engine.calls[0].request_id]
        assert router.metrics.active_requests.labels("acme")._value.get() == 0
        await router.install(ACME, version("acme@bbb", 2))
        await settle()
        assert engine.released == ["acme@aaa"]

    asyncio.run(run())


def test_disconnect_aborts_engine_request() -> None:
    async def run() -> None:
        router, engine, _ = make_router()
        serving = _serving(router, engine)

        async def connected() -> bool:
            return False

        req = ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi"}], "stream": True})
        stream, _ = await serving.chat(req, ACME, connected)
        # A client that goes away: Starlette stops iterating and closes the generator.
        chunks = [await stream.__anext__(), await stream.__anext__()]
        await stream.aclose()
        assert "[DONE]" not in "".join(chunks)
        assert engine.aborted == [engine.calls[0].request_id]
        assert router.metrics.requests.labels("acme", "chat", "aborted")._value.get() == 1
        assert router.metrics.active_requests.labels("acme")._value.get() == 0

    asyncio.run(run())


def test_leased_stream_closed_before_or_after_its_first_chunk() -> None:
    """Closed unstarted: `abandon` runs once (the generator's own clean-up never would).
    Closed after a chunk: the generator's finally runs instead, and `abandon` does not."""
    from unlearnd.serve.serving import LeasedStream

    events: list[str] = []

    async def chunks():
        try:
            yield "a"
            yield "b"
        finally:
            events.append("generator cleaned up")

    async def run() -> None:
        unstarted = LeasedStream(chunks(), lambda: events.append("abandoned"))
        await unstarted.aclose()
        await unstarted.aclose()
        assert events == ["abandoned"]
        assert [c async for c in unstarted] == []  # closed: yields nothing
        events.clear()
        started = LeasedStream(chunks(), lambda: events.append("abandoned"))
        assert await started.__anext__() == "a"
        await started.aclose()
        await started.aclose()
        assert events == ["generator cleaned up"]

    asyncio.run(run())
