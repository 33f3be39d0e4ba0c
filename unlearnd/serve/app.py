"""The server: vLLM's OpenAI app behind the tenant edge, and unlearnd's operator app.

`build_app(config, engine_factory)` returns one ASGI app (:class:`UnlearndApp`):

- the generating routes (`edge.GENERATE`: chat, completions, Responses) go through
  the tenant edge (auth, limits, lease, scope guard, body rewrite, response rewrite)
  to the engine's *frontend*: vLLM's own OpenAI app built around our AsyncLLM
  (`VllmEngine.frontend`), or a fake in unit tests;
- `/health`, `/metrics`, `/v1/models` (filtered to the tenant), `/admin/*` and the
  docs go to the operator app (FastAPI, below);
- every other path is 404.

The engine is created in the operator app's lifespan so tests can pass a fake engine
factory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from unlearnd.guards.policy import POLICY_CACHE_ENV
from unlearnd.guards.signing import ensure_key
from unlearnd.serve import admin, edge
from unlearnd.serve.artifacts import ArtifactError, BaseModelSpec
from unlearnd.serve.config import ServerConfig
from unlearnd.serve.engine import EngineClient, VllmEngine, make_identity_adapter
from unlearnd.serve.errors import APIError, error_body
from unlearnd.serve.limits import TenantLimiter
from unlearnd.serve.metrics import UnlearndMetrics
from unlearnd.serve.registry import Registry, RegistryError, SQLiteRegistry, Tenant
from unlearnd.serve.tenancy import GuardCache, ServingPolicy, TenantRouter

logger = logging.getLogger(__name__)


@dataclass
class AppState:
    config: ServerConfig
    registry: Registry
    engine: EngineClient
    router: TenantRouter
    frontend: Any
    tokenizer: Any
    metrics: UnlearndMetrics
    admin_key: str | None
    swap_lock: asyncio.Lock
    started: float
    limiter: TenantLimiter
    metrics_key: str | None
    sign_key: bytes = b""


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return None


def open_registry(config: ServerConfig) -> Registry:
    """SQLite in state_dir by default; PostgreSQL when `database_url` is set."""
    base = BaseModelSpec.from_model_dir(config.model)
    url = config.resolve_database_url()
    if url:
        from unlearnd.serve.registry_pg import PostgresRegistry

        return PostgresRegistry(url, config.state_dir, base=base,
                                max_lora_rank=config.engine.max_lora_rank)
    return SQLiteRegistry(config.state_dir, base=base, max_lora_rank=config.engine.max_lora_rank)


def apply_config_tenants(config: ServerConfig, registry: Registry) -> None:
    """Config-as-code: create declared tenants, register and activate declared versions.

    A declared version is activated when the tenant has none active or when its content
    is new to the registry (the file changed); otherwise the registry's active pointer
    wins, so swaps made through the admin API survive a restart.
    """
    for t in config.tenants:
        key = t.resolve_key()
        try:
            registry.get_tenant(t.name)
            if (found := registry.tenant_for_key(key)) is None or found.name != t.name:
                registry.rotate_key(t.name, key, actor="config")
        except RegistryError as e:
            if e.status != 404:
                raise
            try:
                registry.create_tenant(t.name, key, actor="config")
            except RegistryError as race:  # another replica created it first
                if race.status != 409:
                    raise
        if t.adapter is None and t.policy is None:
            continue
        known = {v.name for v in registry.list_versions(t.name)}
        version = registry.add_version(t.name, adapter=t.adapter, policy=t.policy,
                                       actor="config")
        if registry.active_version(t.name) is None or version.name not in known:
            registry.activate(t.name, version.name, actor="config")


def build_app(config: ServerConfig,
              engine_factory: Callable[[ServerConfig], EngineClient] = VllmEngine,
              metrics: UnlearndMetrics | None = None,
              registry: Registry | None = None) -> FastAPI:
    metrics = metrics or UnlearndMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # The scope guard's numpy work is tiny per request: multi-threaded BLAS only adds
        # contention with the engine (p99 8.9 ms -> 40 ms measured under load).
        from threadpoolctl import threadpool_limits
        from transformers import AutoTokenizer

        threadpool_limits(limits=1, user_api="blas")
        config.state_dir.mkdir(parents=True, exist_ok=True)
        sign_key = ensure_key()  # before the engine: its process inherits the key
        # The engine process keeps at most this many compiled policies loaded, as this
        # process keeps at most this many guard pipelines (GuardCache).
        os.environ[POLICY_CACHE_ENV] = str(config.policy_cache_size)
        reg = registry or open_registry(config)
        apply_config_tenants(config, reg)
        identity = make_identity_adapter(config.model, config.state_dir / "identity-adapter")
        tokenizer = AutoTokenizer.from_pretrained(str(config.model))
        engine = await asyncio.to_thread(engine_factory, config)
        async with AsyncExitStack() as stack:
            stack.callback(engine.shutdown)
            router = TenantRouter(reg, engine, metrics, identity,
                                  drain_timeout_s=config.drain_timeout_s,
                                  guard_cache=GuardCache(config.policy_cache_size),
                                  keep_previous=config.keep_previous_versions)
            await engine.load_adapter(router.identity)
            await router.sync_from_registry()
            frontend = await engine.frontend()
            lifespan_of = getattr(getattr(frontend, "router", None), "lifespan_context", None)
            if lifespan_of is not None:
                await stack.enter_async_context(lifespan_of(frontend))
            app.state.unlearnd = AppState(config, reg, engine, router, frontend, tokenizer,
                                          metrics, config.resolve_admin_key(), asyncio.Lock(),
                                          time.time(),
                                          TenantLimiter.from_config(config.limits,
                                                                    config.tenants),
                                          config.resolve_metrics_key(), sign_key)
            # Registry changes from other replicas: pushed where the storage can
            # (PostgreSQL LISTEN/NOTIFY), and polled every registry_poll_s regardless.
            changed = asyncio.Event()
            loop = asyncio.get_running_loop()
            stop_watch = reg.watch(lambda: loop.call_soon_threadsafe(changed.set)) \
                if config.registry_notify else None
            if stop_watch is not None:
                stack.callback(stop_watch)
            poller = asyncio.create_task(_poll_registry(app.state.unlearnd, changed))
            stack.callback(poller.cancel)
            logger.info("unlearnd serving %s with %d tenants", config.model_name,
                        len(reg.list_tenants()))
            yield

    app = FastAPI(title="unlearnd", version="0.1.0", lifespan=lifespan,
                  description="Inference-time unlearning, OpenAI-compatible.")

    # ------------------------------------------------------------ errors

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            msg = "the request body is not valid JSON"
            param = None
        else:
            msg = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(error_body(msg, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """FastAPI's own 404/405 (unknown admin route, wrong method) in the OpenAI shape."""
        types = {404: "not_found_error", 405: "invalid_request_error"}
        return JSONResponse(error_body(str(exc.detail), types.get(exc.status_code,
                                                                  "invalid_request_error")),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RegistryError)
    @app.exception_handler(ArtifactError)
    async def _registry_error(request: Request, exc: Any) -> JSONResponse:
        return JSONResponse(error_body(str(exc), code=exc.code), status_code=exc.status)

    # ------------------------------------------------------------ auth

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Response:
        path = request.url.path
        st: AppState | None = getattr(request.app.state, "unlearnd", None)
        if st is None or path in ("/health", "/docs", "/openapi.json"):
            return await call_next(request)
        key = _bearer(request)
        if path == "/metrics":
            if st.metrics_key is None or (
                    key and hmac.compare_digest(key.encode(), st.metrics_key.encode())):
                return await call_next(request)
            if key and st.registry.tenant_for_key(key) is not None:
                return JSONResponse(error_body("tenant keys cannot read /metrics",
                                               "permission_error"), status_code=403)
            return JSONResponse(error_body("/metrics needs the metrics key",
                                           "authentication_error", code="invalid_api_key"),
                                status_code=401)
        limit = st.config.limits.max_body_bytes
        length = request.headers.get("content-length")
        too_big = JSONResponse(error_body(
            f"request body exceeds the limit of {limit} bytes"), status_code=413)
        if length is not None:
            if length.isdigit() and int(length) > limit:
                return too_big
        elif request.method in ("POST", "PUT", "PATCH"):
            # Chunked: read up to the limit, never more, then hand the body on.
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    return too_big
            request._body = bytes(body)
        if path.startswith("/admin"):
            if key is None:
                return JSONResponse(error_body("missing API key (Authorization: Bearer ...)",
                                               "authentication_error", code="invalid_api_key"),
                                    status_code=401)
            if st.admin_key and hmac.compare_digest(key.encode(), st.admin_key.encode()):
                return await call_next(request)
            if st.registry.tenant_for_key(key) is not None:
                return JSONResponse(error_body("tenant keys cannot use the admin API",
                                               "permission_error"), status_code=403)
            return JSONResponse(error_body("invalid API key", "authentication_error",
                                           code="invalid_api_key"), status_code=401)
        if path.startswith("/v1"):
            try:
                tenant = st.router.tenant_for_key(key) if key else None
            except RegistryError as e:
                return JSONResponse(error_body(str(e), "service_unavailable", code=e.code),
                                    status_code=503)
            if tenant is None:
                return JSONResponse(error_body(
                    "missing API key (Authorization: Bearer ...)" if key is None
                    else "invalid API key", "authentication_error", code="invalid_api_key"),
                    status_code=401)
            request.state.tenant = tenant
        return await call_next(request)

    # ------------------------------------------------------------ models

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        """The served model, as this tenant sees it (never another tenant's adapter)."""
        st: AppState = request.app.state.unlearnd
        tenant: Tenant = request.state.tenant
        sp = st.router.current(tenant)
        return {"object": "list", "data": [{
            "id": st.config.model_name, "object": "model", "created": int(st.started),
            "owned_by": "unlearnd", "root": st.config.model_name, "parent": None,
            "max_model_len": st.engine.max_model_len,
            "unlearning": {"tenant": tenant.name, "policy_version": sp.version}}]}

    # ------------------------------------------------------------ ops

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        st: AppState | None = getattr(request.app.state, "unlearnd", None)
        if st is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        problems = []
        try:
            await asyncio.wait_for(st.engine.check_health(), 10)
        except Exception as e:  # noqa: BLE001
            problems.append(f"engine: {type(e).__name__}: {e}")
        try:
            st.registry.generation()
            probe = getattr(st.registry, "check_writable", None)
            if probe is not None:
                await asyncio.to_thread(probe)
        except Exception as e:  # noqa: BLE001
            problems.append(f"registry: {e}")
        broken = st.router.broken_tenants()
        if broken:  # those tenants get 503 (never unguarded); the others are served
            problems.append(f"{len(broken)} tenant policies cannot be loaded")
        body = {"status": "ok" if not problems else "unhealthy", "problems": problems}
        return JSONResponse(body, status_code=200 if not problems else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prom() -> Response:
        data = generate_latest(REGISTRY)
        if metrics.registry is not REGISTRY:
            data += generate_latest(metrics.registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    app.include_router(admin.router)
    return UnlearndApp(app)


_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "integer", "null"]}}}}}
_ERROR_RESPONSES = {str(code): {"description": why, "content": {
    "application/json": {"schema": _ERROR_SCHEMA}}} for code, why in (
    (400, "A field the server refuses or cannot accept (named in `param`)."),
    (401, "Missing or invalid API key."), (404, "Unknown model or route."),
    (413, "Body over the size limit."), (422, "An output constraint that cannot be met."),
    (429, "Tenant rate or concurrency limit (Retry-After)."),
    (500, "The engine failed."), (503, "The tenant's policy or guard is unavailable."))}
"""The error responses of the generating routes: the OpenAI error shape, whoever answers
(the edge's codes are strings or null, vLLM's are the status)."""

OPS_PATHS = {"/health", "/metrics", "/v1/models", "/docs", "/openapi.json",
             "/docs/oauth2-redirect"}
"""Operator-app paths (besides ``/admin/...``); everything else but edge.GENERATE is 404."""


class UnlearndApp:
    """The ASGI app `unlearnd serve` runs: see the module docstring."""

    def __init__(self, ops: FastAPI) -> None:
        self.ops = ops

    @property
    def state(self) -> Any:
        return self.ops.state

    def openapi(self) -> dict:
        """The operator app's schema plus the frontend's generating routes."""
        spec = self.ops.openapi()
        st: AppState | None = getattr(self.ops.state, "unlearnd", None)
        fe = getattr(st, "frontend", None) if st else None
        if fe is not None and hasattr(fe, "openapi"):
            other = fe.openapi()
            for path in edge.GENERATE:
                if path in other.get("paths", {}):
                    op = dict(other["paths"][path]["post"])
                    op["responses"] = {**{k: v for k, v in op.get("responses", {}).items()
                                          if k.startswith("2")}, **_ERROR_RESPONSES}
                    spec["paths"][path] = {"post": op}
            spec.setdefault("components", {}).setdefault("schemas", {}).update(
                other.get("components", {}).get("schemas", {}))
        return spec

    async def __call__(self, scope: edge.Scope, receive: edge.Receive,
                       send: edge.Send) -> None:
        if scope["type"] != "http":
            await self.ops(scope, receive, send)
            return
        path = scope.get("path", "")
        st: AppState | None = getattr(self.ops.state, "unlearnd", None)
        if path in edge.GENERATE:
            if scope.get("method") != "POST":
                await edge.send_json(send, 405, error_body(
                    f"{path} takes POST", code="method_not_allowed"), {"allow": "POST"})
                return
            if st is None:
                await edge.send_json(send, 503, error_body("the server is starting",
                                                           "service_unavailable"))
                return
            await _Generation(st, edge.GENERATE[path]).run(scope, receive, send)
            return
        if path == "/openapi.json" and scope.get("method") in ("GET", "HEAD"):
            await edge.send_json(send, 200, self.openapi())
            return
        if path in OPS_PATHS or path == "/admin" or path.startswith("/admin/"):
            await self.ops(scope, receive, send)
            return
        await edge.send_json(send, 404, error_body(f"no route {path}", "not_found_error",
                                                   code="not_found"))


async def _read_body(receive: edge.Receive, limit: int) -> bytes:
    body = bytearray()
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise APIError(499, "client disconnected")
        body += msg.get("body", b"")
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes")
        if not msg.get("more_body"):
            return bytes(body)


def _parse(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from e
    try:
        obj = json.loads(text)
    except RecursionError as e:
        raise APIError(400, "the request body nests too deeply") from e
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise APIError(400, "the request body must be a JSON object")
    return obj


class _Generation:
    """One generating request through the edge (see unlearnd.serve.edge)."""

    def __init__(self, st: AppState, kind: str) -> None:
        self.st = st
        self.kind = kind
        self.t0 = time.perf_counter()
        self.pipeline: Any = None  # the version's guard pipeline, held for this request
        self.tenant: Tenant | None = None

    def _count(self, outcome: str) -> None:
        if self.tenant is not None:
            self.st.metrics.requests.labels(self.tenant.name, self.kind, outcome).inc()

    async def run(self, scope: edge.Scope, receive: edge.Receive, send: edge.Send) -> None:
        st = self.st
        try:
            self._admit(scope)
            body = _parse(await _read_body(receive, st.config.limits.max_body_bytes))
            lim = st.config.limits
            edge.check_fields(self.kind, body, max_messages=lim.max_messages,
                              max_n=lim.max_n, max_tokens=lim.max_tokens)
            assert self.tenant is not None
            if (broken := st.router.current(self.tenant)).error:  # fail closed
                raise APIError(503, f"this tenant's policy cannot be served right now "
                               f"({broken.version}); the request was not served",
                               code="policy_unavailable")
            release = st.limiter.check_and_acquire(self.tenant.name)  # 429 before work
        except APIError as e:
            outcome = ("rate_limited" if e.status == 429 else "auth_error"
                       if e.status in (401, 403) else "aborted" if e.status == 499
                       else "client_error" if e.status < 500 else "engine_error")
            self._count(outcome)
            if e.status != 499:
                await edge.send_json(send, e.status, e.body(), getattr(e, "headers", None))
            return
        try:
            sp = st.router.acquire(self.tenant)
        except BaseException:
            release()
            raise
        try:
            await self._serve(sp, body, scope, receive, send)
        finally:
            st.router.release(sp)
            release()

    def _admit(self, scope: edge.Scope) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        auth = headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        try:
            tenant = self.st.router.tenant_for_key(key) if key else None
        except RegistryError as e:
            raise APIError(503, str(e), type="service_unavailable", code=e.code) from e
        if tenant is None:
            raise APIError(401, "missing API key (Authorization: Bearer ...)" if key is None
                           else "invalid API key", type="authentication_error",
                           code="invalid_api_key")
        self.tenant = tenant
        for name, why in edge.REFUSED_HEADERS.items():
            if name in headers:
                raise APIError(400, f"header {name} is not allowed: {why}", param=name)

    async def _serve(self, sp: ServingPolicy, body: dict[str, Any], scope: edge.Scope,
                     outer_receive: edge.Receive, send: edge.Send) -> None:
        st, tenant, kind = self.st, self.tenant, self.kind
        assert tenant is not None
        try:
            await st.router.ready(sp)  # a swap synced from elsewhere: its adapter's load
        except APIError as e:
            self._count("engine_error")
            await edge.send_json(send, e.status, e.body())
            return
        guard = None
        conv: list[dict] = []
        try:
            if sp.guards is not None:
                try:
                    conv = edge.conversation(kind, body, st.tokenizer.decode)
                    self.pipeline = await sp.guards.get()
                    guard = self.pipeline.check(conv, sp.version, sp.policy_dir, kind)
                except APIError:  # the request's own fault (edge.conversation): a 4xx
                    raise
                except Exception as e:  # noqa: BLE001 - fail closed
                    logger.exception("scope guard failed for tenant %s", tenant.name)
                    st.metrics.guard_failures.labels(tenant.name).inc()
                    raise APIError(503, "the unlearning guard failed for this request; it "
                                   "was not served", code="guard_failed") from e
                st.metrics.guard_latency.labels(tenant.name).observe(guard.latency_s)
                st.metrics.scope_decisions.labels(tenant.name, guard.decision).inc()
                if guard.in_scope:
                    edge.decisions_log.info(
                        "tenant=%s version=%s decision=in_scope item=%d subject=%r named=%s "
                        "score=%.3f reason=%r", tenant.name, sp.version, guard.item,
                        guard.subject, guard.named, guard.score, guard.internal_reason)
                param = edge.wants_alternatives(kind, body)
                if param and not getattr(self.pipeline, "top_logprobs_allowed", True):
                    raise APIError(400, f"{param} is not available for this tenant: its "
                                   "policy withholds top alternatives (use 0 for the sampled "
                                   "token's logprob only)", param=param)
                field = edge.contrastive_refused(body) \
                    if "contrastive" in sp.mechanisms else None
                if field is not None:
                    raise APIError(400, f"{field} is not available for this tenant: its "
                                   "policy uses contrastive decoding, which decides what is "
                                   "plausible on the model's own scores, and "
                                   f"{field} undoes that: {edge.CONTRASTIVE_REFUSED[field]} "
                                   "(logit_bias is honoured among the plausible tokens)",
                                   param=field)
            else:
                st.metrics.scope_decisions.labels(tenant.name, "unguarded").inc()
        except APIError as e:
            self._count("guard_error" if e.code == "guard_failed" else "client_error")
            await edge.send_json(send, e.status, e.body())
            return
        info = _unlearning(tenant, sp, guard)
        version = sp.version or "none"
        structured = edge.is_structured(kind, body)
        if guard is not None and guard.refused and structured:
            text = guard.refusal_text or ""
            n_ref = len(guard.extra_args.get("unlearnd_refusal_ids") or ())
            n_prompt = self._prompt_tokens(conv)
            data, ctype = edge.refusal_response(
                kind, body, text, st.config.model_name, info, n_prompt, n_ref)
            await edge.send_json(send, 200, data, {edge.POLICY_HEADER: version}, ctype)
            self._finish(sp, guard, {"prompt_tokens": n_prompt,
                                     "completion_tokens": n_ref}, None, {})
            return
        extra = dict(guard.extra_args) if guard else {"unlearnd_version": version}
        if guard is not None and "contrastive" in sp.mechanisms and kind != "completions":
            ids = self._assistant_prompt(conv)
            if ids:
                extra["unlearnd_assist_prompt"] = ids
        new, strip_usage, strip_ids = edge.rewrite_body(
            kind, body, adapter=sp.adapter.name, extra=extra, key=st.sign_key,
            cache_salt=sp.cache_salt, max_tokens=st.config.limits.max_tokens,
            want_ids="firewall" in sp.mechanisms)
        data = json.dumps(new).encode()
        sent = False

        async def receive() -> dict:  # the body once, then the client's own channel
            nonlocal sent  # (vLLM keeps reading it to notice a disconnect)
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await outer_receive()

        headers = [(k, v) for k, v in scope.get("headers", [])
                   if k.lower() not in edge.STRIPPED_HEADERS]
        headers.append((b"content-length", str(len(data)).encode()))
        inner = {**scope, "headers": headers}
        tap = edge.ResponseTap(send, kind=kind, model_name=st.config.model_name,
                               version=version, unlearning=info, strip_usage=strip_usage,
                               strip_ids=strip_ids, structured=structured,
                               logprobs=edge.wants_logprobs(kind, body))
        try:
            await st.frontend(inner, receive, tap)
        except BaseException:
            self._count("aborted")
            raise
        if not tap.finished:
            self._count("aborted")
        elif tap.status >= 400 or tap.stream_error:
            self._count("client_error" if 400 <= tap.status < 500 else "engine_error")
        else:
            self._finish(sp, guard, tap.usage, tap.prompt_ids, tap.output_ids,
                         tap.first_token_t)

    def _assistant_prompt(self, conv: list[dict]) -> list[int] | None:
        """The conversation as the ULD assistant was trained to read it: every text in
        it (every role, content part, tool call and definition, in order) as ONE user
        turn, with the generation prompt (``training.answer_encoding``'s prompt). A
        question in a system message, Responses ``instructions`` or an earlier turn is
        then the question the assistant knows; one plain user message renders as the
        real prompt. None when the template cannot render it (the real prompt then)."""
        from unlearnd.guards.scope import messages_text

        tok = self.st.tokenizer
        try:
            text = "\n".join(t for t in messages_text(conv) if t.strip())
            rendered = tok.apply_chat_template([{"role": "user", "content": text}],
                                               add_generation_prompt=True, tokenize=False)
            return list(tok(rendered, add_special_tokens=False)["input_ids"])
        except Exception:  # noqa: BLE001 - no or a broken template: the real prompt
            logger.debug("no assistant prompt for this conversation", exc_info=True)
            return None

    def _prompt_tokens(self, conv: list[dict]) -> int:
        """Prompt tokens of a request answered here (usage of a refusal shape)."""
        tok = self.st.tokenizer
        try:
            msgs = [{"role": m.get("role") or "user", "content": edge._parts_text(
                m.get("content"))} for m in conv]
            return len(tok.apply_chat_template(msgs, add_generation_prompt=True,
                                               tokenize=True, return_dict=False))
        except Exception:  # noqa: BLE001 - a template that refuses these roles
            return sum(len(tok.encode(edge._parts_text(m.get("content")),
                                      add_special_tokens=False)) for m in conv)

    def _finish(self, sp: ServingPolicy, guard: Any, usage: dict | None,
                prompt_ids: list[int] | None, output_ids: dict[int, list[int]],
                first_token_t: float | None = None) -> None:
        st, name = self.st, sp.tenant
        m = st.metrics
        self._count("ok")
        now = time.perf_counter()
        m.request_latency.labels(name).observe(now - self.t0)
        m.ttft.labels(name).observe((first_token_t or now) - self.t0)
        if usage:
            m.prompt_tokens.labels(name).inc(int(usage.get("prompt_tokens")
                                                 or usage.get("input_tokens") or 0))
            m.generation_tokens.labels(name).inc(int(usage.get("completion_tokens")
                                                     or usage.get("output_tokens") or 0))
        if guard is not None and guard.refused and "refusal" in sp.mechanisms:
            m.refusals.labels(name).inc()
        if self.pipeline is not None and prompt_ids is not None and output_ids:
            item = guard.item if guard and guard.in_scope else -1
            try:
                n = sum(self.pipeline.suppressions(prompt_ids, ids, item)
                        for ids in output_ids.values())
            except Exception:  # noqa: BLE001 - a metric, never a failed request
                logger.exception("replaying firewall suppressions")
                n = 0
            if n:
                m.suppressed_tokens.labels(name).inc(n)


def _unlearning(tenant: Tenant, sp: ServingPolicy, guard: Any) -> dict[str, Any]:
    """The response's ``unlearning`` object: no more than the text says."""
    decision = guard.public() if guard else {"decision": "unguarded", "reason": None,
                                             "matched_item": None, "subject": None}
    return {"tenant": tenant.name, "policy_version": sp.version,
            "mechanisms": list(sp.mechanisms), **decision}


async def _poll_registry(st: AppState, changed: asyncio.Event) -> None:
    """Pick up changes made through other replicas (or other processes) on the registry:
    as soon as `changed` is set (a pushed notification), else every registry_poll_s."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout=st.config.registry_poll_s)
        changed.clear()  # before reading: a change during the read triggers another
        try:
            async with st.swap_lock:
                await st.router.sync_from_registry()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - keep serving the last good state
            logger.exception("registry poll failed; keeping the current policies")


def dump_openapi(app: FastAPI) -> str:
    return json.dumps(app.openapi(), indent=2)
