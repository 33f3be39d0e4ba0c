"""Deny by default: every route vLLM's OpenAI app registers has a decision, checked here.

vLLM's app (`vllm.entrypoints.launchers.app.build_app`, what `VllmEngine.frontend`
serves) registers many routes besides the three generating ones: tokenizers, render,
token-in/token-out generation, scale-out, SageMaker, pooling, speech, dev-mode RPC.
unlearnd's `UnlearndApp` forwards only `edge.GENERATE` (POST, through the tenant edge) and
sends `OPS_PATHS` / `/admin...` to its own operator app; everything else must be a 404
that never reaches vLLM.

:data:`KNOWN` is the checked-in table of every (method, path) vLLM registers, over the
task sets and flags listed in :data:`VARIANTS`, with unlearnd's decision for each.
`test_every_vllm_route_has_a_decision` fails when vLLM (an upgrade) registers a route
that is not in the table: decide, then add it. The other tests call the real
`UnlearndApp` (`build_app` over a FakeEngine whose `frontend()` is a recorder standing in
for vLLM's app) on each route and check the decision holds: EDGE routes reach the
frontend only through the edge (tenant key, body rewritten), OPS routes are answered by
unlearnd's own handlers, DENY routes answer 404 (405 for a wrong method on a generating
path) in the OpenAI error shape and never reach the frontend.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serve.fakes import (
    ADMIN_KEY,
    KEYS,
    FakeEngine,
    base_vocab_size,
    make_config,
    running_app,
)
from unlearnd.serve import edge
from unlearnd.serve.app import OPS_PATHS, UnlearndApp
from unlearnd.serve.engine import IDENTITY_LORA_NAME

EDGE = "edge"
"""Tenant edge (UnlearndApp -> _Generation): tenant key, limits, lease, scope guard,
refused fields, body rewrite (model = the tenant's adapter, signed vllm_xargs)."""
OPS = "ops"
"""unlearnd's operator app answers with its own handler (never vLLM's): /v1/models
filtered to the tenant (tenant key), /health, /metrics (metrics key when set), docs,
/openapi.json (UnlearndApp.openapi: operator routes + the generating routes only)."""
DENY = "deny"
"""UnlearndApp answers 404 (405 on a generating path) in the OpenAI error shape; vLLM
never sees the request."""
REFUSED_AT_START = "deny (refused at start)"
"""Only registered under an env var or flag `engine_namespace` refuses (FlagError),
so a server never has it; were it registered, UnlearndApp still answers 404."""

# Every route of vLLM's app over VARIANTS: (method, path) -> decision. A Mount is
# ("*", path) (any method, any sub-path), a WebSocket route ("WEBSOCKET", path).
KNOWN: dict[tuple[str, str], str] = {
    # generating routes: the tenant edge
    ("POST", "/v1/chat/completions"): EDGE,
    ("POST", "/v1/completions"): EDGE,
    ("POST", "/v1/responses"): EDGE,
    # answered by unlearnd's operator app
    ("GET", "/v1/models"): OPS,
    ("GET", "/health"): OPS,
    ("GET", "/metrics"): OPS,
    ("GET", "/docs"): OPS,
    ("HEAD", "/docs"): OPS,
    ("GET", "/docs/oauth2-redirect"): OPS,
    ("HEAD", "/docs/oauth2-redirect"): OPS,
    ("GET", "/openapi.json"): OPS,
    ("HEAD", "/openapi.json"): OPS,
    # vLLM's prometheus ASGI mount: GET /metrics is ours (above); other methods and
    # sub-paths never reach vLLM
    ("*", "/metrics"): DENY,
    # docs vLLM serves that unlearnd does not
    ("GET", "/redoc"): DENY,
    ("HEAD", "/redoc"): DENY,
    ("*", "/static"): DENY,  # --enable-offline-docs
    # generation around the edge: tokens in/out, render, batch, Anthropic, stored responses
    ("POST", "/v1/chat/completions/batch"): DENY,
    ("POST", "/v1/chat/completions/render"): DENY,
    ("POST", "/v1/chat/completions/derender"): DENY,
    ("POST", "/v1/completions/render"): DENY,
    ("POST", "/v1/completions/derender"): DENY,
    ("POST", "/v1/responses/render"): DENY,
    ("GET", "/v1/responses/{response_id}"): DENY,
    ("POST", "/v1/responses/{response_id}/cancel"): DENY,
    ("POST", "/v1/messages"): DENY,
    ("POST", "/v1/messages/count_tokens"): DENY,
    ("POST", "/v1/messages/render"): DENY,
    ("POST", "/v1/systemone"): DENY,
    ("POST", "/inference/v1/generate"): DENY,
    ("POST", "/inference/v1/abort_requests"): DENY,
    ("POST", "/abort_requests"): DENY,  # --tokens-only (and dev mode)
    ("POST", "/generative_scoring"): DENY,
    ("POST", "/tokenize"): DENY,
    ("POST", "/detokenize"): DENY,
    # SageMaker, load, version, KV events, elastic EP, fault tolerance
    ("POST", "/invocations"): DENY,
    ("GET", "/ping"): DENY,
    ("POST", "/ping"): DENY,
    ("GET", "/load"): DENY,
    ("GET", "/version"): DENY,
    ("GET", "/kv_event_sources"): DENY,
    ("POST", "/scale_elastic_ep"): DENY,
    ("POST", "/is_scaling_elastic_ep"): DENY,
    ("POST", "/fault_tolerance/apply"): DENY,  # --enable-fault-tolerance
    ("GET", "/fault_tolerance/status"): DENY,
    # speech (transcription / realtime models; never the generate task unlearnd serves)
    ("POST", "/v1/audio/transcriptions"): DENY,
    ("POST", "/v1/audio/translations"): DENY,
    ("WEBSOCKET", "/v1/realtime"): DENY,
    # pooling models
    ("POST", "/pooling"): DENY,
    ("POST", "/classify"): DENY,
    ("POST", "/v1/embeddings"): DENY,
    ("POST", "/v2/embed"): DENY,
    ("POST", "/score"): DENY,
    ("POST", "/v1/score"): DENY,
    ("POST", "/rerank"): DENY,
    ("POST", "/v1/rerank"): DENY,
    ("POST", "/v2/rerank"): DENY,
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING (FORBIDDEN_ENV)
    ("POST", "/v1/load_lora_adapter"): REFUSED_AT_START,
    ("POST", "/v1/unload_lora_adapter"): REFUSED_AT_START,
    ("POST", "/adapters"): REFUSED_AT_START,
    ("DELETE", "/adapters/{adapter_name}"): REFUSED_AT_START,
    # VLLM_SERVER_DEV_MODE (FORBIDDEN_ENV): engine control and RL weight sync
    ("POST", "/collective_rpc"): REFUSED_AT_START,
    ("POST", "/sleep"): REFUSED_AT_START,
    ("POST", "/wake_up"): REFUSED_AT_START,
    ("GET", "/is_sleeping"): REFUSED_AT_START,
    ("POST", "/pause"): REFUSED_AT_START,
    ("POST", "/resume"): REFUSED_AT_START,
    ("GET", "/is_paused"): REFUSED_AT_START,
    ("GET", "/server_info"): REFUSED_AT_START,
    ("POST", "/reset_prefix_cache"): REFUSED_AT_START,
    ("POST", "/reset_mm_cache"): REFUSED_AT_START,
    ("POST", "/reset_encoder_cache"): REFUSED_AT_START,
    ("POST", "/release_kv_cache_memory"): REFUSED_AT_START,
    ("GET", "/get_world_size"): REFUSED_AT_START,
    ("POST", "/init_weight_transfer_engine"): REFUSED_AT_START,
    ("POST", "/shutdown_weight_transfer_engine"): REFUSED_AT_START,
    ("POST", "/start_weight_update"): REFUSED_AT_START,
    ("POST", "/start_draft_weight_update"): REFUSED_AT_START,
    ("POST", "/finish_weight_update"): REFUSED_AT_START,
    ("POST", "/update_weights"): REFUSED_AT_START,
    ("POST", "/update_weight_version"): REFUSED_AT_START,
    ("POST", "/weight_checker"): REFUSED_AT_START,
    ("GET", "/weight_info"): REFUSED_AT_START,
}

VARIANTS: dict[str, dict[str, Any]] = {
    "generate": {"tasks": ("generate",)},
    "generate+render": {"tasks": ("generate", "render")},
    "--tokens-only": {"tasks": ("generate",), "flags": ["--tokens-only"]},
    "--enable-fault-tolerance": {"tasks": ("generate",), "flags": ["--enable-fault-tolerance"]},
    "--enable-offline-docs": {"tasks": ("generate",), "flags": ["--enable-offline-docs"]},
    "transcription": {"tasks": ("transcription",)},
    "realtime": {"tasks": ("realtime",)},
    **{f"pooling:{t}": {"tasks": (t,), "flags": ["--runner", "pooling", "--convert", "embed"],
                        "model_config": True}
       for t in ("embed", "classify", "token_embed", "token_classify", "plugin")},
    "VLLM_SERVER_DEV_MODE=1": {"tasks": ("generate",), "env": "VLLM_SERVER_DEV_MODE"},
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1": {"tasks": ("generate",),
                                           "env": "VLLM_ALLOW_RUNTIME_LORA_UPDATING"},
}
"""How vLLM's app is built for the enumeration: supported tasks, extra `vllm serve`
flags (through unlearnd's `engine_namespace`), a ModelConfig for pooling routes, and
env vars that add routes (those are refused at start; the enumeration sets them
anyway to see what they would add)."""

PATH_PARAMS = {"response_id": "resp_0123456789", "adapter_name": "some-adapter"}
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
KEY_KINDS = {"none": None, "tenant": KEYS["acme"], "admin": ADMIN_KEY}


def _concrete(path: str) -> str:
    return path.format(**PATH_PARAMS)


def _denied_status(method: str, path: str) -> int:
    """What UnlearndApp answers a request that must not reach vLLM."""
    if path in edge.GENERATE:
        return 405
    if path in OPS_PATHS:  # the operator app: wrong method on one of its paths
        return 405
    return 404


# ---------------------------------------------------------------- vLLM's routes


def _route_keys(app: Any) -> set[tuple[str, str]]:
    from fastapi.routing import APIRoute, APIWebSocketRoute
    from starlette.routing import Mount, Route, WebSocketRoute

    keys: set[tuple[str, str]] = set()
    for r in app.routes:
        if isinstance(r, (APIRoute, Route)):
            keys |= {(m, r.path) for m in r.methods or ()}
        elif isinstance(r, Mount):
            keys.add(("*", r.path))
        elif isinstance(r, (APIWebSocketRoute, WebSocketRoute)):
            keys.add(("WEBSOCKET", r.path))
        else:  # a kind of route this test cannot classify: decide how to enumerate it
            keys.add((type(r).__name__, getattr(r, "path", repr(r))))
    return keys


@pytest.fixture(scope="module")
def vllm_routes(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], set[str]]:
    """Every (method, path) of vLLM's app over VARIANTS -> the variants registering it."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.app import build_app as vllm_build_app

    from unlearnd.serve.vllm_args import engine_namespace

    state = tmp_path_factory.mktemp("routes-state")
    found: dict[tuple[str, str], set[str]] = {}
    for name, v in VARIANTS.items():
        config = make_config(state, vllm_args=list(v.get("flags", ())))
        args = engine_namespace(config, env={})
        model_config = (AsyncEngineArgs.from_cli_args(args).create_model_config()
                        if v.get("model_config") else None)
        with pytest.MonkeyPatch.context() as mp:
            if v.get("env"):
                mp.setenv(v["env"], "1")
            app = vllm_build_app(args, v["tasks"], model_config)
        for key in _route_keys(app):
            found.setdefault(key, set()).add(name)
    return found


def test_every_vllm_route_has_a_decision(vllm_routes) -> None:
    unknown = {k: sorted(v) for k, v in vllm_routes.items() if k not in KNOWN}
    stale = sorted(k for k in KNOWN if k not in vllm_routes)
    msg = []
    if unknown:
        msg.append(
            "vLLM's OpenAI app registers routes unlearnd has not decided on:\n"
            + "\n".join(f"  {m} {p}   (built with: {', '.join(v)})"
                        for (m, p), v in sorted(unknown.items()))
            + "\nDecide for each, then add it to KNOWN in tests/serve/test_routes.py: DENY "
              "if tenants must not reach it (UnlearndApp already answers 404 for any path "
              "outside edge.GENERATE / OPS_PATHS / /admin), EDGE only after routing it "
              "through the tenant edge (edge.GENERATE, with its body checked and "
              "rewritten), OPS only if unlearnd's operator app serves that path itself.")
    if stale:
        msg.append("KNOWN lists routes vLLM no longer registers (remove them): "
                   + ", ".join(f"{m} {p}" for m, p in stale))
    assert not msg, "\n\n".join(msg)


def test_decisions_agree_with_the_app() -> None:
    """EDGE is exactly edge.GENERATE (POST); OPS entries are operator paths."""
    assert {k for k, d in KNOWN.items() if d == EDGE} == {("POST", p) for p in edge.GENERATE}
    for (method, path), d in KNOWN.items():
        if d == OPS:
            assert path in OPS_PATHS, (method, path)
        elif d != EDGE and path in edge.GENERATE:
            assert method != "POST", (method, path)


def test_the_served_app_has_no_refused_at_start_route(vllm_routes) -> None:
    """The default build (what `unlearnd serve` gets) has none of them."""
    refused = {k for k, d in KNOWN.items() if d == REFUSED_AT_START}
    assert not {k for k, v in vllm_routes.items() if "generate" in v} & refused


# ---------------------------------------------------------------- the app under test


class RecordingFrontend:
    """Stands in for vLLM's app behind the edge: records every request that reaches it
    and answers a minimal JSON body. `openapi()` is vLLM's real app's schema."""

    def __init__(self, vllm_app: Any) -> None:
        self._vllm_app = vllm_app
        self.calls: list[dict[str, Any]] = []

    def openapi(self) -> dict:
        return self._vllm_app.openapi()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        body = b""
        if scope["type"] == "http":
            while True:
                msg = await receive()
                body += msg.get("body", b"")
                if not msg.get("more_body"):
                    break
        self.calls.append({"type": scope["type"], "method": scope.get("method"),
                           "path": scope.get("path"), "headers": dict(scope.get("headers", [])),
                           "body": body})
        if scope["type"] != "http":
            return
        data = json.dumps({"id": "recorded", "object": "recorded", "model": "x",
                           "choices": []}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


class FrontendEngine(FakeEngine):
    """A FakeEngine whose `frontend()` is the recorder."""

    def __init__(self, frontend: RecordingFrontend, **kw: Any) -> None:
        super().__init__(**kw)
        self._frontend = frontend

    async def frontend(self) -> RecordingFrontend:
        return self._frontend


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, RecordingFrontend]]:
    """The real UnlearndApp (lifespan entered) over the recorder; tenants acme, globex
    without policies (identity adapter)."""
    from vllm.entrypoints.launchers.app import build_app as vllm_build_app

    from unlearnd.serve.vllm_args import engine_namespace

    root = tmp_path_factory.mktemp("routes-app")
    config = make_config(root / "state")
    recorder = RecordingFrontend(vllm_build_app(engine_namespace(config, env={}),
                                                ("generate",), None))
    engine = FrontendEngine(recorder, vocab_size=base_vocab_size())
    with running_app(config, engine) as running:
        yield running, recorder


def _headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def assert_openai_error(r: Any, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    try:
        body = r.json()
    except ValueError as e:
        raise AssertionError(f"not JSON: {r.text[:300]!r}") from e
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    return err


def _send(client: Any, method: str, path: str, key: str | None, body: dict | None = None):
    kw: dict[str, Any] = {"headers": _headers(key)}
    if method in ("POST", "PUT", "PATCH"):
        kw["json"] = body if body is not None else {"model": "x", "prompt": "hi"}
    return client.request(method, path, **kw)


# ---------------------------------------------------------------- DENY


def _deny_cases() -> list[Any]:
    cases = []
    for (method, path), d in sorted(KNOWN.items()):
        if d not in (DENY, REFUSED_AT_START) or method in ("*", "WEBSOCKET"):
            continue
        cases.append(pytest.param(method, path, id=f"{method} {path}"))
    return cases


@pytest.mark.parametrize(("method", "path"), _deny_cases())
@pytest.mark.parametrize("who", list(KEY_KINDS))
def test_denied_route_is_404_and_never_reaches_vllm(served, method: str, path: str,
                                                    who: str) -> None:
    running, recorder = served
    before = len(recorder.calls)
    r = _send(running.client, method, _concrete(path), KEY_KINDS[who])
    if method == "HEAD":  # no body on HEAD: the status says it
        assert r.status_code == _denied_status(method, path), r.status_code
    else:
        err = assert_openai_error(r, _denied_status(method, path))
        assert err["type"] == "not_found_error"
    assert len(recorder.calls) == before, recorder.calls[before:]


@pytest.mark.parametrize("path", sorted({p for (m, p), d in KNOWN.items() if m == "*"}))
def test_denied_mount_never_reaches_vllm(served, path: str) -> None:
    """A Mount answers any method and sub-path in vLLM; here none of them reach it."""
    running, recorder = served
    before = len(recorder.calls)
    for sub in (path, path + "/", path + "/x", path + "/metrics"):
        for method in METHODS:
            if (method, sub) in KNOWN and KNOWN[(method, sub)] != DENY:
                continue  # GET /metrics: unlearnd's own (test_ops_routes)
            r = _send(running.client, method, sub, KEYS["acme"])
            assert r.status_code in (404, 405), (method, sub, r.status_code, r.text[:200])
    assert len(recorder.calls) == before, recorder.calls[before:]


@pytest.mark.parametrize("path", sorted({p for (m, p), d in KNOWN.items() if m == "WEBSOCKET"}
                                        | set(edge.GENERATE)))
def test_websockets_never_reach_vllm(served, path: str) -> None:
    from starlette.websockets import WebSocketDisconnect

    running, recorder = served
    before = len(recorder.calls)
    with pytest.raises(WebSocketDisconnect):
        with running.client.websocket_connect(path, headers=_headers(KEYS["acme"])) as ws:
            ws.receive_text()
    assert len(recorder.calls) == before, recorder.calls[before:]


# ---------------------------------------------------------------- EDGE


def _body(path: str) -> dict[str, Any]:
    """A small valid body for a generating path (any JSON object for the others)."""
    kind = edge.GENERATE.get(path, "chat")
    if kind == "completions":
        return {"model": "globex", "prompt": "hi", "max_tokens": 2}
    if kind == "responses":
        return {"model": "globex", "input": "hi", "max_output_tokens": 2}
    return {"model": "globex", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2}


@pytest.mark.parametrize("path", sorted(edge.GENERATE))
def test_generating_route_reaches_vllm_only_through_the_edge(served, path: str) -> None:
    running, recorder = served
    body = _body(path)
    before = len(recorder.calls)
    for key, status in ((None, 401), ("sk-wrong-0123456789abcdef", 401), (ADMIN_KEY, 401)):
        err = assert_openai_error(_send(running.client, "POST", path, key, body), status)
        assert err["type"] == "authentication_error"
    assert len(recorder.calls) == before, "reached vLLM without a tenant key"
    r = _send(running.client, "POST", path, KEYS["acme"], body)
    assert r.status_code == 200, r.text
    assert r.headers[edge.POLICY_HEADER] == "none"
    assert len(recorder.calls) == before + 1
    call = recorder.calls[-1]
    assert (call["method"], call["path"]) == ("POST", path)
    assert b"authorization" not in call["headers"]  # the tenant key stays at the edge
    seen = json.loads(call["body"])
    assert seen["model"] == IDENTITY_LORA_NAME  # the tenant's adapter, not the client's
    assert isinstance(seen["vllm_xargs"], dict) and seen["vllm_xargs"]  # signed by the edge
    assert seen["cache_salt"] == running.state.registry.get_tenant("acme").cache_salt
    # a field that bypasses the policy stops at the edge
    refused = _send(running.client, "POST", path, KEYS["acme"], body | {"priority": 5})
    assert assert_openai_error(refused, 400)["param"] == "priority"
    assert len(recorder.calls) == before + 1


@pytest.mark.parametrize("method", [m for m in METHODS if m != "POST"])
@pytest.mark.parametrize("path", sorted(edge.GENERATE))
def test_generating_route_wrong_method_is_405(served, path: str, method: str) -> None:
    running, recorder = served
    before = len(recorder.calls)
    r = _send(running.client, method, path, KEYS["acme"])
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    if method != "HEAD":
        assert assert_openai_error(r, 405)["code"] == "method_not_allowed"
    assert len(recorder.calls) == before


# ---------------------------------------------------------------- OPS


def test_ops_routes_are_unlearnds_own(served) -> None:
    running, recorder = served
    c = running.client
    before = len(recorder.calls)
    assert_openai_error(c.get("/v1/models"), 401)
    models = c.get("/v1/models", headers=_headers(KEYS["acme"]))
    assert models.status_code == 200, models.text
    assert models.json()["data"][0]["unlearning"]["tenant"] == "acme"
    health = c.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    metrics = c.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "unlearnd_" in metrics.text
    for path in ("/docs", "/docs/oauth2-redirect"):
        for method in ("GET", "HEAD"):
            r = c.request(method, path)
            assert r.status_code == 200, (method, path, r.status_code)
            assert r.headers["content-type"].startswith("text/html")
    assert c.head("/openapi.json").status_code == 200
    assert len(recorder.calls) == before


def test_openapi_lists_only_reachable_routes(served, vllm_routes) -> None:
    """`/openapi.json` = the operator routes + the generating routes (vLLM's schemas);
    none of vLLM's other routes, whose schemas vLLM's own app would advertise."""
    running, _ = served
    r = running.client.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    paths = set(spec["paths"])
    for path in paths:
        assert path in edge.GENERATE or path in OPS_PATHS or path.startswith("/admin/"), path
    for path in edge.GENERATE:
        assert set(spec["paths"][path]) == {"post"}, spec["paths"][path]
        ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"][
            "schema"]["$ref"]
        assert ref.split("/")[-1] in spec["components"]["schemas"], ref
    vllm_only = {p for (_, p) in KNOWN if p not in edge.GENERATE and p not in OPS_PATHS}
    assert not paths & vllm_only, paths & vllm_only
    # /v1/models is unlearnd's (tenant-filtered), not vLLM's
    assert spec["paths"]["/v1/models"]["get"]["operationId"] == "models_v1_models_get"


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", sorted(OPS_PATHS))
def test_wrong_method_on_an_ops_path(served, path: str, method: str) -> None:
    """Never vLLM; a 405 (or the 401 of the key check in front of it)."""
    running, recorder = served
    before = len(recorder.calls)
    r = _send(running.client, method, path, KEYS["acme"])
    assert r.status_code in (401, 405), (r.status_code, r.text[:200])
    assert len(recorder.calls) == before


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", "/health", 405), ("DELETE", "/metrics", 405), ("PUT", "/openapi.json", 405),
    ("POST", "/docs", 405), ("GET", "/admin/no-such-route", 404)])
def test_operator_app_errors_have_the_openai_shape(served, method: str, path: str,
                                                   status: int) -> None:
    """FastAPI's own 404/405 of the operator app (found by this file: they were
    `{"detail": ...}` before the app's HTTPException handler)."""
    running, _ = served
    key = ADMIN_KEY if path.startswith("/admin") else KEYS["acme"]
    assert_openai_error(_send(running.client, method, path, key), status)


def test_redoc_is_not_served(served) -> None:
    running, _ = served
    assert_openai_error(running.client.get("/redoc"), 404)


# ---------------------------------------------------------------- path tricks

TRICKS = [
    # (raw path as sent on the wire, method)
    "/v1/chat/completions/",
    "//v1/chat/completions",
    "/v1//chat/completions",
    "/v1/chat//completions",
    "/v1/chat/completions//",
    "/v1/chat/completions/render",
    "/v1/chat/completions/batch",
    "/v1/chat/completions/derender",
    "/v1/completions/render",
    "/v1/responses/render",
    "/v1/responses/resp_0123456789",
    "/v1/responses/resp_0123456789/cancel",
    "/v1/chat/completions/.",
    "/v1/./chat/completions",
    "/v1/x/../chat/completions",
    "/./v1/chat/completions",
    "/V1/chat/completions",
    "/v1/Chat/Completions",
    "/V1/COMPLETIONS",
    "/v1/chat/completions%2F",
    "/v1/chat/completions%2Frender",
    "/v1/chat/completions%2fbatch",
    "/v1/chat%2Fcompletions",
    "/v1%2Fchat%2Fcompletions",
    "%2Fv1/chat/completions",
    "/%76%31/chat/completions",
    "/v1/chat/completions%00",
    "/v1/chat/completions%20",
    "/v1/chat/completions;x=1",
    "/v1/chat/completions%3Bx",
    "/v1/chat/completions%3F",
    "/v1/chat/completions%2E",
    "/v1/chat/completions/%2E%2E/render",
    "/v1/chat/completions\\",
    "/v1/chat/completions%5Crender",
    "/v1/completions/../chat/completions/render",
    "/inference/v1/generate",
    "/v1/messages",
    "/tokenize",
    "/invocations",
    "/metrics/",
    "/health/",
    "/v1/models/",
    "/v1/models/x",
    "/admin/../tokenize",
]


async def _raw(app: UnlearndApp, method: str, raw_path: str, key: str | None,
               body: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request as uvicorn delivers it: `path` is the percent-decoded raw path
    (no dot-segment or slash normalisation)."""
    raw = raw_path.encode("latin-1")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": urllib.parse.unquote(raw_path),
             "raw_path": raw, "root_path": "", "query_string": b"",
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]
             + ([(b"authorization", f"Bearer {key}".encode())] if key else []),
             "client": ("127.0.0.1", 5000), "server": ("testserver", 80), "state": {}}
    sent = False
    out: dict[str, Any] = {"status": 0, "headers": {}, "body": b""}

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(msg: dict) -> None:
        if msg["type"] == "http.response.start":
            out["status"] = msg["status"]
            out["headers"] = {k.decode().lower(): v.decode() for k, v in msg["headers"]}
        elif msg["type"] == "http.response.body":
            out["body"] += msg.get("body", b"")

    await app(scope, receive, send)
    return out["status"], out["headers"], out["body"]


@pytest.mark.parametrize("raw_path", TRICKS)
def test_path_tricks_do_not_reach_vllm_unguarded(served, raw_path: str) -> None:
    """Each trick is either denied (404/405, never the frontend) or its decoded path is
    exactly a generating route, and then it went through the edge (401 without a
    tenant key; with one, the frontend saw the rewritten body)."""
    running, recorder = served
    app = running.client.app
    decoded = urllib.parse.unquote(raw_path)
    body = json.dumps(_body(decoded)).encode()
    for method in ("POST", "GET"):
        for who, key in KEY_KINDS.items():
            before = len(recorder.calls)
            status, headers, data = running.client.portal.call(_raw, app, method, raw_path,
                                                               key, body)
            reached = recorder.calls[before:]
            where = f"{method} {raw_path!r} (path {decoded!r}) with {who} key"
            if decoded in edge.GENERATE and method == "POST":
                if who == "tenant":
                    assert status == 200 and len(reached) == 1, (where, status, data[:200])
                    assert json.loads(reached[0]["body"])["model"] == IDENTITY_LORA_NAME
                    assert headers[edge.POLICY_HEADER] == "none"
                else:
                    assert status == 401 and not reached, (where, status, data[:200])
                continue
            assert not reached, f"{where} reached the frontend: {reached}"
            if decoded in OPS_PATHS and method == "GET":
                continue  # an operator route (test_ops_routes_are_unlearnds_own)
            if decoded.startswith("/admin/"):  # the admin API's key check (never vLLM)
                assert status in (401, 403, 404), (where, status, data[:200])
                continue
            assert status in (401, 404, 405), (where, status, data[:200])
            if status != 401 and decoded not in OPS_PATHS and not decoded.startswith(
                    "/admin"):
                err = json.loads(data)["error"]
                assert set(err) == {"message", "type", "param", "code"}, (where, err)


# ---------------------------------------------------------------- before the lifespan


def test_app_before_startup_denies_and_never_serves(tmp_path: Path) -> None:
    """No lifespan (no state yet): denied routes are still 404, generating ones 503."""
    from fastapi.testclient import TestClient

    from unlearnd.serve.app import build_app

    recorder = RecordingFrontend(None)
    engine = FrontendEngine(recorder, vocab_size=base_vocab_size())
    app = build_app(make_config(tmp_path / "state"), engine_factory=lambda _c: engine)
    assert isinstance(app, UnlearndApp)
    client = TestClient(app)  # not entered: no lifespan
    for (method, path), d in KNOWN.items():
        if d in (DENY, REFUSED_AT_START) and method not in ("*", "WEBSOCKET") \
                and path not in OPS_PATHS:
            r = _send(client, method, _concrete(path), KEYS["acme"])
            assert r.status_code == (405 if path in edge.GENERATE else 404), (method, path)
    for path in edge.GENERATE:
        err = assert_openai_error(_send(client, "POST", path, KEYS["acme"]), 503)
        assert err["type"] == "service_unavailable"
    assert client.get("/health").status_code == 503
    assert not recorder.calls
