"""Admin API: tenants, policy versions, activation, rollback, audit (admin key only)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from unlearnd.serve.artifacts import ArtifactError
from unlearnd.serve.errors import APIError
from unlearnd.serve.registry import PolicyVersion, RegistryError

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/admin")


class CreateTenant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Tenant name, [a-z0-9][a-z0-9_-]{0,62}.")
    api_key: str | None = Field(None, description="Key to use; generated when omitted.")


class RegisterVersion(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str | None = Field(None, description="PEFT LoRA adapter directory.")
    policy: str | None = Field(None, description="Compiled policy directory.")
    activate: bool = Field(False, description="Activate right after registering.")


class Activate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(description="Version name, <tenant>@<hash12>.")


def version_json(v: PolicyVersion, active: str | None = None) -> dict[str, Any]:
    return {"name": v.name, "tenant": v.tenant, "content_hash": v.content_hash,
            "adapter": v.adapter_dir is not None, "policy": v.policy_dir is not None,
            "created_at": v.created_at, "meta": v.meta, "active": v.name == active}


def _state(request: Request) -> Any:
    return request.app.state.unlearnd


def _registry_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except (RegistryError, ArtifactError) as e:
        raise APIError(e.status, str(e), code=e.code) from e


def _check_path(state: Any, raw: str | None, what: str) -> Path | None:
    if raw is None:
        return None
    path = Path(raw).resolve()
    roots = state.config.artifact_roots
    if roots and not any(path.is_relative_to(Path(r).resolve()) for r in roots):
        raise APIError(403, f"{what} path is outside the configured artifact roots",
                       param=what, code="path_not_allowed")
    return path


@router.get("/tenants")
async def list_tenants(request: Request) -> dict:
    st = _state(request)
    active = st.router.active_versions()
    return {"data": [{"name": t.name, "created_at": t.created_at,
                      "active_version": active.get(t.name)}
                     for t in _registry_call(st.registry.list_tenants)]}


@router.post("/tenants", status_code=201)
async def create_tenant(body: CreateTenant, request: Request) -> dict:
    st = _state(request)
    key = body.api_key or f"sk-{body.name}-{secrets.token_urlsafe(24)}"
    tenant = _registry_call(st.registry.create_tenant, body.name, key, actor="admin")
    st.metrics.init_tenant(tenant.name)
    return {"name": tenant.name, "api_key": key}


@router.delete("/tenants/{tenant}")
async def delete_tenant(tenant: str, request: Request) -> dict:
    st = _state(request)
    _registry_call(st.registry.delete_tenant, tenant, actor="admin")
    st.limiter.forget(tenant)
    await st.router.sync_from_registry()
    return {"deleted": tenant}


@router.get("/tenants/{tenant}/versions")
async def list_versions(tenant: str, request: Request) -> dict:
    st = _state(request)
    _registry_call(st.registry.get_tenant, tenant)
    active = st.router.active_versions().get(tenant)
    return {"data": [version_json(v, active)
                     for v in _registry_call(st.registry.list_versions, tenant)]}


@router.post("/tenants/{tenant}/versions", status_code=201)
async def register_version(tenant: str, body: RegisterVersion, request: Request) -> dict:
    st = _state(request)
    _registry_call(st.registry.get_tenant, tenant)
    adapter = _check_path(st, body.adapter, "adapter")
    policy = _check_path(st, body.policy, "policy")
    try:
        version = await asyncio.to_thread(st.registry.add_version, tenant, adapter=adapter,
                                          policy=policy, actor="admin")
    except ArtifactError as e:
        st.metrics.adapter_rejections.labels(tenant, e.code).inc()
        raise APIError(e.status, str(e), code=e.code) from e
    except RegistryError as e:
        raise APIError(e.status, str(e), code=e.code) from e
    result = version_json(version)
    if body.activate:
        result = await _activate(st, tenant, version.name)
    return result


async def _activate(st: Any, tenant: str, name: str, kind: str = "activate") -> dict:
    """Load the version (adapter into the engine, guards into memory), then flip pointers.

    The in-memory pointer and the registry's move together: if loading fails, neither
    changes and the previous version keeps serving.
    """
    t0 = time.perf_counter()
    async with st.swap_lock:
        t = _registry_call(st.registry.get_tenant, tenant)
        if kind == "rollback":
            previous = _registry_call(st.registry.active_version, tenant)
            version = _registry_call(st.registry.rollback, tenant, actor="admin")
            try:
                built = await st.router.build(t, version)
            except Exception as e:  # noqa: BLE001 - put the registry back in step
                if previous is not None:
                    _registry_call(st.registry.activate, tenant, previous.name, actor="admin")
                else:
                    _registry_call(st.registry.deactivate, tenant, actor="admin")
                raise APIError(422, f"rolled-back version {version.name} cannot be served: "
                               f"{e}; the previous version stays active",
                               code="load_failed") from e
            await st.router.install(t, version, kind="rollback", built=built)
        else:
            version = _registry_call(st.registry.get_version, tenant, name)
            try:
                built = await st.router.build(t, version)  # adapter + guards; fails -> 422
            except Exception as e:  # noqa: BLE001
                st.metrics.adapter_rejections.labels(tenant, "load_failed").inc()
                raise APIError(422, f"version {name} cannot be served: {e}",
                               code="load_failed") from e
            _registry_call(st.registry.activate, tenant, name, actor="admin")
            await st.router.install(t, version, kind="activate", built=built)
    out = version_json(version, version.name)
    out["swap_seconds"] = time.perf_counter() - t0  # load + validate + switch
    return out


@router.post("/tenants/{tenant}/activate")
async def activate(tenant: str, body: Activate, request: Request) -> dict:
    return await _activate(_state(request), tenant, body.version)


@router.post("/tenants/{tenant}/rollback")
async def rollback(tenant: str, request: Request) -> dict:
    return await _activate(_state(request), tenant, "", kind="rollback")


@router.post("/tenants/{tenant}/deactivate")
async def deactivate(tenant: str, request: Request) -> dict:
    st = _state(request)
    async with st.swap_lock:
        t = _registry_call(st.registry.get_tenant, tenant)
        _registry_call(st.registry.deactivate, tenant, actor="admin")
        await st.router.install(t, None, kind="deactivate")
    return {"tenant": tenant, "active_version": None}


@router.delete("/tenants/{tenant}/versions/{version}")
async def delete_version(tenant: str, version: str, request: Request) -> dict:
    st = _state(request)
    _registry_call(st.registry.delete_version, tenant, version, actor="admin")
    return {"deleted": version}


@router.get("/audit")
async def audit(request: Request, tenant: str | None = None, limit: int = 100) -> dict:
    st = _state(request)
    if not 1 <= limit <= 10_000:
        raise APIError(400, "limit must be in 1..10000", param="limit")
    return {"data": [{"id": e.id, "ts": e.ts, "actor": e.actor, "action": e.action,
                      "tenant": e.tenant, "detail": e.detail}
                     for e in _registry_call(st.registry.audit, tenant=tenant, limit=limit)]}
