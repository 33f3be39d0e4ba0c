"""Tenants at serving time: who is calling, which policy version serves them, hot swaps.

A request takes an immutable `ServingPolicy` snapshot when it starts and holds a lease
on it until it ends, so a swap never changes the adapter or guards under a running
request. An operator's activation loads the new adapter into the engine *before* the
pointer moves (the activate call checks the store copy). A swap made through another
replica moves this replica's pointer as soon as the registry says so and loads the
adapter behind it: requests admitted meanwhile get the new version and wait for that
load before they reach the engine, so none is served by the version being replaced.
The old adapter is released once its last lease ends (or after `drain_timeout_s`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import OrderedDict, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearnd.serve.engine import IDENTITY_LORA_ID, IDENTITY_LORA_NAME, AdapterRef, EngineClient
from unlearnd.serve.errors import APIError
from unlearnd.serve.metrics import UnlearndMetrics
from unlearnd.serve.registry import PolicyVersion, Registry, RegistryError, Tenant

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingPolicy:
    """Everything needed to serve one tenant's request with one policy version."""

    tenant: str
    cache_salt: str
    version: str | None           # None: no policy (identity adapter, no guards)
    adapter: AdapterRef
    policy_dir: str | None = None
    guards: GuardRef | None = None  # this version's guard pipeline, loaded on demand
    mechanisms: tuple[str, ...] = ()
    error: str | None = None      # set: the version cannot be served; requests get 503
    # set: the adapter's load into the engine, still running or done (a synced swap);
    # `TenantRouter.ready` waits for it before a request reaches the engine
    loading: asyncio.Future | None = field(default=None, compare=False, repr=False)


@dataclass
class _Lease:
    count: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)


def load_guards(policy_dir: str) -> Any:
    """Load a compiled policy and its scope guard; raises ValueError naming the problem."""
    from unlearnd.serve.guarding import GuardPipeline

    return GuardPipeline.load(policy_dir)


class GuardCache:
    """The API process's loaded guard pipelines: an LRU of at most `size`, by policy dir.

    A version's pipeline is loaded when it is installed (so a policy that cannot load is
    rejected at activation), then kept while it is among the `size` most recently used;
    an evicted one is loaded again on the tenant's next request, in a worker thread.
    With hundreds of tenants the memory is bounded by the cache, not the tenant count;
    a request that got a pipeline keeps it until it ends, whatever is evicted meanwhile.
    """

    def __init__(self, size: int = 256) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"guard cache size must be an int >= 1, got {size!r}")
        self.size = size
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._loaded)

    def peek(self, policy_dir: str) -> Any | None:
        """The loaded pipeline (now most recently used), or None."""
        with self._lock:
            hit = self._loaded.get(policy_dir)
            if hit is not None:
                self._loaded.move_to_end(policy_dir)
            return hit

    def load(self, policy_dir: str, *, fresh: bool = False) -> Any:
        """The pipeline, loaded now when it is not cached or `fresh` (read from the store
        again: an operator's activation checks what is on disk). Blocking: run it in a
        thread. A failed load leaves the cache as it was."""
        hit = None if fresh else self.peek(policy_dir)
        if hit is not None:
            return hit
        pipeline = load_guards(policy_dir)
        with self._lock:
            self.loads += 1
            self._loaded[policy_dir] = pipeline
            self._loaded.move_to_end(policy_dir)
            while len(self._loaded) > self.size:
                self._loaded.popitem(last=False)
                self.evictions += 1
        return pipeline


@dataclass(frozen=True)
class GuardRef:
    """A version's guard pipeline by reference: `get()` returns it from the cache, or
    loads it again (in a thread) when it was evicted."""

    policy_dir: str
    cache: GuardCache = field(compare=False, repr=False)

    async def get(self) -> Any:
        hit = self.cache.peek(self.policy_dir)
        return hit if hit is not None else await asyncio.to_thread(
            self.cache.load, self.policy_dir)


class TenantRouter:
    """API key -> tenant -> active ServingPolicy, with atomic swaps and draining."""

    def __init__(self, registry: Registry, engine: EngineClient, metrics: UnlearndMetrics,
                 identity_adapter: Path, *, drain_timeout_s: float = 60.0,
                 guard_cache: GuardCache | None = None, keep_previous: int = 1) -> None:
        """`keep_previous`: how many of a tenant's previously active versions stay loaded
        (their adapters in the engine), so that swapping back to one (a rollback, here or
        through another replica) is a pointer move, with no adapter load in the engine's
        queue. Older ones are released once their requests drain."""
        if isinstance(keep_previous, bool) or not isinstance(keep_previous, int) \
                or keep_previous < 0:
            raise ValueError(f"keep_previous must be an int >= 0, got {keep_previous!r}")
        self.keep_previous = keep_previous
        self._previous: dict[str, list[ServingPolicy]] = {}  # newest first, none active
        self.registry = registry
        self.engine = engine
        self.metrics = metrics
        self.identity = AdapterRef(IDENTITY_LORA_NAME, IDENTITY_LORA_ID, str(identity_adapter))
        self.drain_timeout_s = drain_timeout_s
        self.guard_cache = guard_cache if guard_cache is not None else GuardCache()
        self._active: dict[str, ServingPolicy] = {}
        self._leases: dict[tuple[str, str | None], _Lease] = defaultdict(_Lease)
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._release_tasks: set[asyncio.Future] = set()
        self._keys: dict[str, str] = {}          # sha256(key) -> tenant (last good state)
        self._tenants: dict[str, Tenant] = {}
        self.generation_seen = -1
        # Registry reads get their own thread: in the default pool they would queue
        # behind whatever else the process runs there under load.
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="unlearnd-registry")

    # ------------------------------------------------------------ lookup

    def tenant_for_key(self, api_key: str) -> Tenant | None:
        """The key's tenant; from memory when the registry cannot be read right now.

        Raises RegistryError 503 only when the registry is down *and* the key is unknown
        to the last good state (never a 500, never another tenant).
        """
        try:
            return self.registry.tenant_for_key(api_key)
        except RegistryError:
            name = self._keys.get(hashlib.sha256(api_key.encode("utf-8")).hexdigest())
            if name is None or name not in self._tenants:
                raise
            logger.warning("registry unreadable: tenant %s served from the last good state",
                           name)
            return self._tenants[name]

    def current(self, tenant: Tenant) -> ServingPolicy:
        sp = self._active.get(tenant.name)
        if sp is None:
            sp = ServingPolicy(tenant.name, tenant.cache_salt, None, self.identity)
            self._active[tenant.name] = sp
        return sp

    def acquire(self, tenant: Tenant) -> ServingPolicy:
        """Snapshot the tenant's policy and hold it until `release`."""
        sp = self.current(tenant)
        self._leases[(sp.tenant, sp.version)].count += 1
        self.metrics.active_requests.labels(sp.tenant).inc()
        return sp

    def release(self, sp: ServingPolicy) -> None:
        lease = self._leases[(sp.tenant, sp.version)]
        lease.count -= 1
        self.metrics.active_requests.labels(sp.tenant).dec()
        if lease.count <= 0:
            lease.drained.set()

    # ------------------------------------------------------------ swaps

    async def build(self, tenant: Tenant, version: PolicyVersion | None, *,
                    fresh: bool = True) -> ServingPolicy:
        """Make a ServingPolicy and load its adapter into the engine (before routing to it).

        `fresh`: load the guard pipeline from the store even when it is cached, and the
        adapter even when it is held (the admin API's activations); a registry sync reuses
        both."""
        if version is None:
            return ServingPolicy(tenant.name, tenant.cache_salt, None, self.identity)
        adapter = (AdapterRef(version.name, version.lora_int_id, version.adapter_dir)
                   if version.adapter_dir else self.identity)
        guards = None
        mechanisms: tuple[str, ...] = ("adapter",) if version.adapter_dir else ()
        if version.policy_dir:
            loaded = await asyncio.to_thread(self.guard_cache.load, version.policy_dir,
                                             fresh=fresh)
            mechanisms = tuple(sorted(set(mechanisms) | set(loaded.mechanisms)))
            guards = GuardRef(version.policy_dir, self.guard_cache)
        # An operator's activation here loads the adapter (again) before it routes, so a
        # store copy that went missing is found now, by the activate call. A sync onto a
        # version this replica still holds (a rollback made elsewhere) is a pointer move;
        # onto one it does not hold, the pointer moves now and the load runs behind it
        # (another replica already loaded it from the same store): requests wait for it
        # in `ready`, and a load that fails turns the tenant's requests into 503s.
        loading = None
        if adapter is not self.identity:
            if fresh:
                await self.engine.load_adapter(adapter)
            elif not self._holds(tenant.name, version.name):
                loading = self._load_behind(tenant.name, version.name, adapter)
        return ServingPolicy(tenant.name, tenant.cache_salt, version.name, adapter,
                             version.policy_dir, guards, mechanisms, loading=loading)

    def _load_behind(self, tenant: str, version: str, adapter: AdapterRef) -> asyncio.Future:
        task = asyncio.ensure_future(self.engine.load_adapter(adapter))
        self._release_tasks.add(task)

        def done(t: asyncio.Future) -> None:
            self._release_tasks.discard(t)
            if t.cancelled() or (e := t.exception()) is None:
                return
            logger.error("tenant %s: adapter of version %s cannot be loaded (%s); its "
                         "requests get 503 until it is fixed or swapped", tenant, version, e)
            cur = self._active.get(tenant)
            if cur is not None and cur.loading is t:
                self._active[tenant] = ServingPolicy(
                    tenant, cur.cache_salt, version, self.identity,
                    error=f"the active policy version cannot be loaded: {e}")
            self._previous[tenant] = [sp for sp in self._previous.get(tenant, ())
                                      if sp.loading is not t]

        task.add_done_callback(done)
        return task

    @staticmethod
    async def ready(sp: ServingPolicy) -> None:
        """Return once `sp`'s adapter is in the engine (at once, unless a synced swap's
        load is still running); APIError 503 when that load failed."""
        if sp.loading is None:
            return
        try:
            await asyncio.shield(sp.loading)
        except Exception as e:  # noqa: BLE001 - the load's failure, named to the client
            raise APIError(503, f"this tenant's policy version {sp.version} cannot be "
                           f"served right now: its adapter did not load ({e}); the request "
                           "was not served", code="policy_unavailable") from e

    async def install(self, tenant: Tenant, version: PolicyVersion | None,
                      kind: str = "activate", built: ServingPolicy | None = None
                      ) -> tuple[ServingPolicy, float]:
        """Switch the in-memory pointer to `version` (already active in the registry).

        `built`: the result of `build(tenant, version)` when the caller already has it.
        """
        t0 = time.perf_counter()
        async with self._locks[tenant.name]:
            new = built if built is not None else await self.build(
                tenant, version, fresh=kind != "sync")
            old = self._active.get(tenant.name)
            self._active[tenant.name] = new
            elapsed = time.perf_counter() - t0
            self.metrics.swaps.labels(tenant.name, kind).inc()
            self.metrics.swap_duration.labels(tenant.name).observe(elapsed)
            self.metrics.set_active(tenant.name, new.version, old.version if old else None)
        self._retire(tenant.name, new, old)
        return new, elapsed

    def _holds(self, tenant: str, version: str) -> bool:
        """True when the version's adapter is loaded for the tenant: it is active or one
        of the kept previous versions (vLLM may still have moved it out of its CPU
        cache; a request then reloads it from the store)."""
        cur = self._active.get(tenant)
        if cur is not None and cur.version == version and not cur.error:
            return True
        return any(sp.version == version for sp in self._previous.get(tenant, ()))

    def _retire(self, tenant: str, new: ServingPolicy, old: ServingPolicy | None) -> None:
        """`old` (just swapped out) joins the tenant's kept versions; what falls off the
        end of `keep_previous` is released after its requests drain."""
        kept = [sp for sp in self._previous.get(tenant, ()) if sp.version != new.version]
        if old is not None and old.version != new.version and not old.error:
            kept = [old, *[sp for sp in kept if sp.version != old.version]]
        self._previous[tenant] = kept[:self.keep_previous]
        for sp in kept[self.keep_previous:]:
            self._schedule_release(sp)

    def _schedule_release(self, old: ServingPolicy) -> None:
        if old.adapter is self.identity:
            return
        task = asyncio.create_task(self._release_after_drain(old))
        self._release_tasks.add(task)
        task.add_done_callback(self._release_tasks.discard)

    async def _release_after_drain(self, old: ServingPolicy) -> None:
        lease = self._leases[(old.tenant, old.version)]
        if lease.count > 0:
            lease.drained.clear()
            try:
                await asyncio.wait_for(lease.drained.wait(), self.drain_timeout_s)
            except TimeoutError:
                logger.warning("adapter %s still had %d requests after %.0fs; releasing",
                               old.version, lease.count, self.drain_timeout_s)
        if self._holds(old.tenant, old.version):
            return  # re-activated (or kept again) meanwhile
        try:
            await self.engine.release_adapter(old.adapter)
        except Exception:  # noqa: BLE001 - release is best effort; vLLM's LRU evicts anyway
            logger.exception("releasing adapter %s failed", old.version)

    async def sync_from_registry(self) -> None:
        """Make every tenant's in-memory pointer equal the registry's (start-up, polling).

        The registry is read in a worker thread, so a slow database never stalls the
        requests this process is serving. A tenant whose version changed is installed
        (a version this replica does not hold routes at once, its adapter loading
        behind the pointer: see `build`) and `unlearnd_policy_propagation_seconds`
        records how long after the registry's pointer moved this replica routed to it.
        """
        view = await asyncio.get_running_loop().run_in_executor(
            self._reader, self.registry.snapshot, self.generation_seen)
        if view is None:
            return
        self._tenants = {t.name: t for t in view.tenants}
        self._keys = view.keys
        for tenant in view.tenants:
            self.metrics.init_tenant(tenant.name)
            version = view.active[tenant.name]
            cur = self._active.get(tenant.name)
            want = version.name if version else None
            if cur is None or cur.version != want or cur.error:
                try:
                    await self.install(tenant, version, kind="sync")
                except Exception as e:  # noqa: BLE001 - one tenant's artifact, not the server
                    logger.error("tenant %s: active version %s cannot be served (%s); its "
                                 "requests get 503 until it is fixed or swapped",
                                 tenant.name, want, e)
                    self._active[tenant.name] = ServingPolicy(
                        tenant.name, tenant.cache_salt, want, self.identity,
                        error=f"the active policy version cannot be loaded: {e}")
                    continue
                moved = view.changed_at.get(tenant.name)
                if cur is not None and moved is not None:  # not at start-up
                    self.metrics.propagation.labels(tenant.name).observe(
                        max(0.0, time.time() - moved))
        known = set(self._tenants)
        for name in list(self._active):
            if name not in known:
                gone = self._active.pop(name)
                self.metrics.set_active(name, None, gone.version)  # off the dashboard
                for sp in (gone, *self._previous.pop(name, ())):
                    self._schedule_release(sp)
        self.generation_seen = view.generation

    def broken_tenants(self) -> list[str]:
        return [name for name, sp in self._active.items() if sp.error]

    def active_versions(self) -> dict[str, str | None]:
        return {name: sp.version for name, sp in self._active.items()}
