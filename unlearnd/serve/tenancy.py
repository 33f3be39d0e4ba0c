"""Tenants at serving time: who is calling, which policy version serves them, hot swaps.

A request takes an immutable `ServingPolicy` snapshot when it starts and holds a lease
on it until it ends, so a swap never changes the adapter or guards under a running
request. Activation loads the new adapter into the engine *before* the pointer moves;
the old adapter is released once its last lease ends (or after `drain_timeout_s`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearnd.serve.engine import IDENTITY_LORA_ID, IDENTITY_LORA_NAME, AdapterRef, EngineClient
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
    guards: Any = None            # unlearnd.guards pipeline for this version (or None)
    mechanisms: tuple[str, ...] = ()
    error: str | None = None      # set: the version cannot be served; requests get 503


@dataclass
class _Lease:
    count: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)


def load_guards(policy_dir: str) -> Any:
    """Load a compiled policy and its scope guard; raises ValueError naming the problem."""
    from unlearnd.serve.guarding import GuardPipeline

    return GuardPipeline.load(policy_dir)


class TenantRouter:
    """API key -> tenant -> active ServingPolicy, with atomic swaps and draining."""

    def __init__(self, registry: Registry, engine: EngineClient, metrics: UnlearndMetrics,
                 identity_adapter: Path, *, drain_timeout_s: float = 60.0) -> None:
        self.registry = registry
        self.engine = engine
        self.metrics = metrics
        self.identity = AdapterRef(IDENTITY_LORA_NAME, IDENTITY_LORA_ID, str(identity_adapter))
        self.drain_timeout_s = drain_timeout_s
        self._active: dict[str, ServingPolicy] = {}
        self._leases: dict[tuple[str, str | None], _Lease] = defaultdict(_Lease)
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._release_tasks: set[asyncio.Task] = set()
        self._keys: dict[str, str] = {}          # sha256(key) -> tenant (last good state)
        self._tenants: dict[str, Tenant] = {}
        self.generation_seen = -1

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

    async def build(self, tenant: Tenant, version: PolicyVersion | None) -> ServingPolicy:
        """Make a ServingPolicy and load its adapter into the engine (before routing to it)."""
        if version is None:
            return ServingPolicy(tenant.name, tenant.cache_salt, None, self.identity)
        adapter = (AdapterRef(version.name, version.lora_int_id, version.adapter_dir)
                   if version.adapter_dir else self.identity)
        guards = None
        mechanisms: tuple[str, ...] = ("adapter",) if version.adapter_dir else ()
        if version.policy_dir:
            guards = await asyncio.to_thread(load_guards, version.policy_dir)
            mechanisms = tuple(sorted(set(mechanisms) | set(guards.mechanisms)))
        if adapter is not self.identity:
            await self.engine.load_adapter(adapter)
        return ServingPolicy(tenant.name, tenant.cache_salt, version.name, adapter,
                             version.policy_dir, guards, mechanisms)

    async def install(self, tenant: Tenant, version: PolicyVersion | None,
                      kind: str = "activate", built: ServingPolicy | None = None
                      ) -> tuple[ServingPolicy, float]:
        """Switch the in-memory pointer to `version` (already active in the registry).

        `built`: the result of `build(tenant, version)` when the caller already has it.
        """
        t0 = time.perf_counter()
        async with self._locks[tenant.name]:
            new = built if built is not None else await self.build(tenant, version)
            old = self._active.get(tenant.name)
            self._active[tenant.name] = new
            elapsed = time.perf_counter() - t0
            self.metrics.swaps.labels(tenant.name, kind).inc()
            self.metrics.swap_duration.labels(tenant.name).observe(elapsed)
            self.metrics.set_active(tenant.name, new.version, old.version if old else None)
        if old is not None and old.version != new.version:
            self._schedule_release(old)
        return new, elapsed

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
        if self._active.get(old.tenant) is not None and \
                self._active[old.tenant].version == old.version:
            return  # re-activated meanwhile
        try:
            await self.engine.release_adapter(old.adapter)
        except Exception:  # noqa: BLE001 - release is best effort; vLLM's LRU evicts anyway
            logger.exception("releasing adapter %s failed", old.version)

    async def sync_from_registry(self) -> None:
        """Make every tenant's in-memory pointer equal the registry's (start-up, polling).

        The registry is read in a worker thread, so a slow database never stalls the
        requests this process is serving. A tenant whose version changed is installed
        (adapter loaded first) and `unlearnd_policy_propagation_seconds` records how
        long after the registry's pointer moved this replica started serving it.
        """
        view = await asyncio.to_thread(self.registry.snapshot, self.generation_seen)
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
                self._schedule_release(self._active.pop(name))
        self.generation_seen = view.generation

    def broken_tenants(self) -> list[str]:
        return [name for name, sp in self._active.items() if sp.error]

    def active_versions(self) -> dict[str, str | None]:
        return {name: sp.version for name, sp in self._active.items()}
