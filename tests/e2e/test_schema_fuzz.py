"""Schema-driven fuzzing of the real server (real vLLM engine) with Schemathesis.

The schema is the server's own `GET /openapi.json` (`UnlearndApp.openapi()`: the
operator routes plus the generating routes' request schemas from vLLM's app). For
`POST /v1/chat/completions`, `/v1/completions` and `/v1/responses`, sent with a tenant
key:

- schema-valid bodies (POSITIVE) and schema-breaking ones (NEGATIVE), with integer
  fields replaced, part of the time, by values at and past the edges of their types
  (:data:`EDGES`);
- every integer field of each request schema at each edge value, one request each
  (`test_integer_edges`).

Every response must be non-5xx; every error response (4xx, and in-band errors of an
SSE stream) must have the OpenAI shape `{"error": {"message", "type", "param",
"code"}}`; every 200 must carry the `unlearning` object (it went through the edge) and
generate no more than the server's `limits.max_tokens` per choice.

Bounded: a dedicated tiny server (small limits), `UNLEARND_E2E_FUZZ_EXAMPLES` (default
60) examples per operation (2/3 POSITIVE, 1/3 NEGATIVE), derandomized Hypothesis, no
example database. Run under `flock /tmp/unlearnd-engine.lock`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.server import ServerProcess, free_port

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

pytestmark = pytest.mark.e2e

KEY = "sk-fuzz-e2e-0123456789abcdef"
ADMIN = "adm-fuzz-e2e-0123456789abcdef"
MAX_TOKENS = 16
MAX_N = 2
EXAMPLES = int(os.environ.get("UNLEARND_E2E_FUZZ_EXAMPLES", "60"))
OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
              "/v1/responses": "responses"}
EDGES = (-1, 0, 1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1)
"""Integers at and past the edges of int32 / int64 / uint64."""
ALWAYS_INT = {"seed", "max_tokens", "max_completion_tokens", "max_output_tokens", "n",
              "top_k", "logprobs", "top_logprobs", "min_tokens", "truncate_prompt_tokens"}
"""Fields edge values are tried on besides the schema's integer fields (`logprobs` is a
bool in chat: an integer there must be a clean 400)."""
ERROR_KEYS = {"message", "type", "param", "code"}
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1

# ---------------------------------------------------------------- regressions
# Bugs this fuzz found, each fixed; their minimal requests must stay clean 400s.

OVERFLOW_BUG = (
    "an integer vLLM leaves unbounded (top_k, stream_interval) past 2**64-1 passed vLLM's "
    "request validation and failed in the engine client's msgpack encoder; vLLM's error "
    "handler then read app.state.server (set only by vLLM's launcher): a 500. Fixed: the "
    "edge refuses integers outside [-2**63, 2**64-1] (400 naming the field) and "
    "VllmEngine.frontend sets app.state.server.")
RESPONSES_ITEM_BUG = (
    "vLLM 0.32 reads item.content[0].text of an assistant `message` input item: empty "
    "content or a refusal part was a 500. Fixed: the edge answers 400 for such items.")
KNOWN_500_MESSAGES: dict[str, str] = {}
KNOWN_LOG_SIGNATURES: tuple[str, ...] = ()
OVERFLOW_FIELDS = ("top_k", "stream_interval")
"""Where the edge matrix hit OVERFLOW_BUG (vLLM bounds the other integer fields)."""
_ASSISTANT_ITEM = {"type": "message", "role": "assistant", "id": "msg_1",
                   "status": "completed"}
KNOWN_BUG_CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "chat top_k=2**64": ("/v1/chat/completions", {"top_k": 2**64}, OVERFLOW_BUG),
    "chat top_k=2**64 stream": ("/v1/chat/completions", {"top_k": 2**64, "stream": True},
                                OVERFLOW_BUG),
    "chat stream_interval=2**64": ("/v1/chat/completions", {"stream_interval": 2**64},
                                   OVERFLOW_BUG),
    "completions top_k=2**64": ("/v1/completions", {"top_k": 2**64}, OVERFLOW_BUG),
    "completions stream_interval=2**64": ("/v1/completions", {"stream_interval": 2**64},
                                          OVERFLOW_BUG),
    "responses top_k=2**64": ("/v1/responses", {"top_k": 2**64}, OVERFLOW_BUG),
    "responses assistant item, empty content": (
        "/v1/responses", {"input": [_ASSISTANT_ITEM | {"content": []},
                                    {"role": "user", "content": "hi"}]}, RESPONSES_ITEM_BUG),
    "responses assistant item, refusal part": (
        "/v1/responses", {"input": [_ASSISTANT_ITEM | {"content": [
            {"type": "refusal", "refusal": "no"}]}, {"role": "user", "content": "hi"}]},
        RESPONSES_ITEM_BUG),
}
"""name -> (path, fields over the minimal body, bug): each must become a clean 400."""


def known_bug(status: int, content: bytes) -> str | None:
    """The known bug a 500 (or a 200 stream with an in-band 500) is, if any."""
    text = content.decode("utf-8", "replace")
    messages = []
    if status == 500:
        try:
            messages.append(json.loads(text)["error"]["message"])
        except (ValueError, KeyError, TypeError):
            return None
    elif status == 200 and '"code":500' in text.replace(" ", ""):
        for line in text.splitlines():
            if line.startswith("data:") and '"error"' in line:
                try:
                    messages.append(json.loads(line[5:])["error"]["message"])
                except (ValueError, KeyError, TypeError):
                    return None
    bugs = {KNOWN_500_MESSAGES.get(m) for m in messages}
    return bugs.pop() if len(bugs) == 1 and None not in bugs else None


TIMES: dict[str, float] = {}
STATUS: dict[str, dict[int, int]] = {}
REASONS: dict[str, dict[str, int]] = {}
"""Error messages of the fuzz's 4xx (first words), printed at the end of the module."""


def tame(kind: str, body: dict[str, Any]) -> None:
    """Drop the fields the edge refuses and clamp the limited ones, so the case
    reaches vLLM (the edge's own refusals are covered by the other half)."""
    from unlearnd.serve import edge

    for name in edge.REFUSED:
        if not (name == "prompt" and kind == "completions"):
            body.pop(name, None)
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if isinstance(body.get(name), int) and body[name] > MAX_TOKENS:
            body[name] = MAX_TOKENS
    if isinstance(body.get("n"), int) and body["n"] > MAX_N:
        body["n"] = MAX_N
    if isinstance(body.get("messages"), list):
        del body["messages"][8:]
    if isinstance(body.get("input"), list):
        del body["input"][8:]
    need = {"completions": ("prompt", "Hello there"), "responses": ("input", "Hello there"),
            "chat": ("messages", [{"role": "user", "content": "Hello there"}])}[kind]
    if not body.get(need[0]):
        body[need[0]] = need[1]


def _reason(content: bytes) -> str:
    try:
        msg = str(json.loads(content)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return "(not an OpenAI error)"
    return " ".join(msg.split()[:5])[:60]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory):
    """A tiny real server with small limits and one tenant holding a LoRA adapter."""
    from unlearnd.toolkit.tiny import make_random_adapter, make_tiny_model

    root = tmp_path_factory.mktemp("fuzz")
    base = make_tiny_model(root / "base", seed=0)
    adapter = make_random_adapter(base, root / "a1", seed=1, rank=4)
    config = {
        "model": str(base), "state_dir": str(root / "state"), "admin_key": ADMIN,
        "port": free_port(), "registry_poll_s": 1.0, "drain_timeout_s": 10,
        "engine": {"max_loras": 2, "max_lora_rank": 8, "max_cpu_loras": 2,
                   "max_model_len": 256, "max_num_seqs": 8,
                   "kv_cache_memory_bytes": 64 * 1024 * 1024},
        "limits": {"max_tokens": MAX_TOKENS, "max_n": MAX_N, "max_messages": 8,
                   "max_body_bytes": 64 * 1024},
        "tenants": [{"name": "acme", "api_key": KEY, "adapter": str(adapter)}],
    }
    t0 = time.perf_counter()
    server = ServerProcess(config, root, name="fuzz").start()
    TIMES["server start"] = time.perf_counter() - t0
    try:
        yield server
    finally:
        server.stop()
        print("\nfuzz times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in TIMES.items()))
        print("fuzz statuses: " + json.dumps(STATUS, sort_keys=True))
        for op, rs in sorted(REASONS.items()):
            top = sorted(rs.items(), key=lambda kv: -kv[1])[:8]
            print(f"fuzz 4xx reasons {op}: " + "; ".join(f"{n}x {r}" for r, n in top))


@pytest.fixture(scope="module")
def spec(fuzz_server) -> dict:
    r = httpx.get(fuzz_server.base_url + "/openapi.json", timeout=60)
    assert r.status_code == 200, r.text[:500]
    return r.json()


@pytest.fixture(scope="module")
def schema(spec: dict):
    """Schemathesis over the server's spec: whole SSE streams, a request timeout."""
    from schemathesis.config import SchemathesisConfig

    config = SchemathesisConfig.from_dict({"max-stream-events": 100_000,
                                           "request-timeout": 120})
    return schemathesis.openapi.from_dict(spec, config=config)


def _operation(schema: Any, path: str) -> Any:
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path == path and op.method.upper() == "POST":
            return op
    raise AssertionError(f"the server's OpenAPI has no POST {path}")


def _request_schema(spec: dict, path: str) -> dict:
    body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return _resolve(spec, body)


def _resolve(spec: dict, node: dict) -> dict:
    while "$ref" in node:
        node = spec["components"]["schemas"][node["$ref"].split("/")[-1]]
    return node


def _is_int(spec: dict, node: dict) -> bool:
    node = _resolve(spec, node)
    if node.get("type") == "integer":
        return True
    return any(_is_int(spec, n) for n in node.get("anyOf", []) + node.get("oneOf", []))


def int_fields(spec: dict, path: str) -> list[str]:
    """Top-level integer fields of the operation's request body (schema), plus ALWAYS_INT."""
    props = _request_schema(spec, path).get("properties", {})
    return sorted({name for name, node in props.items() if _is_int(spec, node)}
                  | (ALWAYS_INT & set(props)))


def minimal_body(kind: str) -> dict[str, Any]:
    if kind == "completions":
        return {"model": "m", "prompt": "Hello there", "max_tokens": 4}
    if kind == "responses":
        return {"model": "m", "input": "Hello there", "max_output_tokens": 4}
    return {"model": "m", "messages": [{"role": "user", "content": "Hello there"}],
            "max_tokens": 4}


# ---------------------------------------------------------------- checks


def check_response(status: int, headers: Any, content: bytes, body: Any, where: str) -> None:
    """No 5xx; errors in the OpenAI shape; a 200 went through the edge within the limits."""
    text = content.decode("utf-8", "replace")
    assert status < 500, f"{where}: {status} {text[:1000]}"
    ctype = (headers.get("content-type") or "").split(";")[0].strip()
    if status >= 400:
        assert ctype == "application/json", f"{where}: {status} {ctype} {text[:500]}"
        data = json.loads(content)
        assert isinstance(data, dict) and set(data) == {"error"}, f"{where}: {text[:800]}"
        assert set(data["error"]) == ERROR_KEYS, f"{where}: {text[:800]}"
        assert isinstance(data["error"]["message"], str), f"{where}: {text[:800]}"
        return
    assert status == 200, f"{where}: {status} {text[:500]}"
    assert headers.get("x-unlearnd-policy-version"), f"{where}: no policy header"
    if ctype == "text/event-stream":
        _check_sse(text, where)
        return
    assert ctype == "application/json", f"{where}: {ctype}"
    data = json.loads(content)
    assert "unlearning" in data, f"{where}: {text[:500]}"
    _check_tokens(data, body, where)


def _check_sse(text: str, where: str) -> None:
    events = []
    for block in text.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("data:")]
        if not lines:
            continue
        payload = lines[-1][5:].strip()
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events, f"{where}: empty stream"
    for ev in events:
        if isinstance(ev, dict) and "error" in ev and "choices" not in ev:
            err = ev["error"]
            assert isinstance(err, dict) and ERROR_KEYS <= set(err), f"{where}: {ev}"
            code = err.get("code")
            assert not (isinstance(code, int) and code >= 500), f"{where}: in-band 5xx {ev}"
    finals = [ev for ev in events if isinstance(ev, dict) and (
        "unlearning" in ev or "unlearning" in (ev.get("response") or {}))]
    errored = any(isinstance(ev, dict) and "error" in ev for ev in events)
    assert finals or errored, f"{where}: stream without unlearning: {text[-600:]}"


def _check_tokens(data: dict, body: Any, where: str) -> None:
    usage = data.get("usage") or {}
    out = usage.get("completion_tokens", usage.get("output_tokens"))
    if out is None:
        return
    n = body.get("n") if isinstance(body, dict) else None
    choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    assert out <= MAX_TOKENS * choices, (
        f"{where}: {out} completion tokens for {choices} choice(s) past the server limit "
        f"{MAX_TOKENS}: body {json.dumps(body)[:400]}")


# ---------------------------------------------------------------- tests


def test_openapi_documents_the_generating_routes(spec: dict) -> None:
    missing = [p for p in OPERATIONS if "post" not in spec["paths"].get(p, {})]
    assert not missing, f"no schema for {missing} in the server's /openapi.json"
    for path in OPERATIONS:
        props = _request_schema(spec, path).get("properties", {})
        assert props, f"{path}: request schema has no properties"
        assert int_fields(spec, path), path


def _edge_requests(spec: dict, path: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, body): every integer field at every edge value on a minimal valid body,
    as a JSON response and as a stream."""
    kind = OPERATIONS[path]
    out = []
    for field in int_fields(spec, path):
        for value in EDGES:
            for stream in (False, True):
                body = minimal_body(kind) | {field: value}
                if stream:
                    body["stream"] = True
                out.append((f"POST {path} {field}={value}{' stream' if stream else ''}", body))
    return out


def _post_all(server: ServerProcess, path: str,
              requests: list[tuple[str, dict[str, Any]]], counts: dict[int, int]
              ) -> list[tuple[str, dict[str, Any], str | None]]:
    """Send each body; (label, body, failure or None)."""
    out = []
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        for label, body in requests:
            r = client.post(server.base_url + path, content=json.dumps(body),
                            headers={"content-type": "application/json"})
            counts[r.status_code] = counts.get(r.status_code, 0) + 1
            try:
                check_response(r.status_code, r.headers, r.content, body, label)
                out.append((label, body, None))
            except (AssertionError, ValueError) as e:
                out.append((label, body, str(e)[:1200]))
    return out


@pytest.mark.parametrize("path", list(OPERATIONS))
def test_integer_edges(fuzz_server, spec: dict, path: str) -> None:
    """Every integer field at every edge value, alone on a minimal valid body (the
    OVERFLOW_BUG cases among them)."""
    t0 = time.perf_counter()
    requests = list(_edge_requests(spec, path))
    results = _post_all(fuzz_server, path, requests, STATUS.setdefault(f"edges {path}", {}))
    TIMES[f"edges {path}"] = time.perf_counter() - t0
    failures = [f for _, _, f in results if f]
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:20])


def _runner(op: Any, spec: dict, path: str, mode: GenerationMode, n: int, base_url: str,
            failures: list[str], known: list[str]):
    fields = int_fields(spec, path)
    kind = OPERATIONS[path]
    counts = STATUS.setdefault(f"{mode.value} {path}", {})
    reasons = REASONS.setdefault(f"{mode.value} {path}", {})

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode), data=st.data())
    def run(case: Any, data: Any) -> None:
        if isinstance(case.body, dict):
            # Hypothesis leans to the simplest choice (False, 0): make that the common case
            if mode == GenerationMode.POSITIVE and not data.draw(st.booleans(),
                                                                 label="keep refused"):
                tame(kind, case.body)  # most valid cases get past the edge's checks
            for name in fields:  # an edge value on some integer fields
                if data.draw(st.integers(0, 5), label=f"edge {name}?") == 5:
                    case.body[name] = data.draw(st.sampled_from(EDGES), label=name)
        if case.headers:
            for h in [h for h in case.headers if h.lower() in ("authorization",
                                                              "content-length")]:
                del case.headers[h]
        response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"})
        counts[response.status_code] = counts.get(response.status_code, 0) + 1
        if response.status_code >= 400:
            reason = _reason(response.content)
            reasons[reason] = reasons.get(reason, 0) + 1
        where = f"{mode.value} POST {path} body={json.dumps(case.body, default=str)[:600]}"
        headers = {k.lower(): v[0] for k, v in response.headers.items() if v}
        try:
            assert not response.stream_cut_short, f"{where}: stream cut short"
            check_response(response.status_code, headers, response.content, case.body, where)
        except (AssertionError, ValueError) as e:  # collect, keep fuzzing
            if known_bug(response.status_code, response.content):
                known.append(where)  # a known bug (test_known_bug_reproducers)
            else:
                failures.append(str(e)[:1500])

    return run


@pytest.mark.parametrize("path", list(OPERATIONS))
def test_fuzz_generating_route(fuzz_server, spec: dict, schema: Any, path: str) -> None:
    """POSITIVE and NEGATIVE cases from the server's own schema, with edge integers."""
    op = _operation(schema, path)
    failures: list[str] = []
    known: list[str] = []
    positive = max(1, EXAMPLES * 2 // 3)
    plan = [(GenerationMode.POSITIVE, positive), (GenerationMode.NEGATIVE, EXAMPLES - positive)]
    for mode, n in plan:
        if n <= 0:
            continue
        t0 = time.perf_counter()
        try:
            _runner(op, spec, path, mode, n, fuzz_server.base_url, failures, known)()
        except Unsatisfiable:
            pass
        finally:
            TIMES[f"{mode.value} {path}"] = time.perf_counter() - t0
    assert httpx.get(fuzz_server.base_url + "/health", timeout=30).status_code == 200
    if known:
        print(f"\n{path}: {len(known)} cases hit known bugs (test_known_bug_reproducers)")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:20])


def test_server_still_serves(fuzz_server) -> None:
    """After the fuzz: healthy, and an ordinary request is served."""
    r = httpx.post(fuzz_server.base_url + "/v1/chat/completions",
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                   json=minimal_body("chat"))
    assert r.status_code == 200, r.text
    assert r.json()["unlearning"]["tenant"] == "acme"
    log = Path(fuzz_server.log_path).read_text(errors="replace")
    crashes = [c.split("\nERROR:")[0] for c in log.split("Exception in ASGI application")[1:]]
    other = [c[:3000] for c in crashes if not any(sig in c for sig in KNOWN_LOG_SIGNATURES)]
    assert not other, "unhandled exceptions in the server log:\n" + "\n---\n".join(other[:3])


@pytest.mark.parametrize("name", list(KNOWN_BUG_CASES))
def test_known_bug_reproducers(fuzz_server, name: str) -> None:
    """Each fixed bug's minimal request is a clean 400 in the OpenAI error shape."""
    path, fields, _ = KNOWN_BUG_CASES[name]
    body = minimal_body(OPERATIONS[path]) | fields
    r = httpx.post(fuzz_server.base_url + path, json=body, timeout=120,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, f"{name}: {r.status_code} {r.text[:600]}"
    check_response(r.status_code, r.headers, r.content, body, name)
