"""Fakes for unit-testing the serving layer without vLLM's engine.

`FakeEngine` implements `unlearnd.serve.engine.EngineClient`: its `generate` yields
objects shaped like vLLM's `RequestOutput` (`.outputs`: `index`, `text`, `token_ids`,
`logprobs`, `finish_reason`), token by token when `params.output_kind` is DELTA and
once at the end when it is FINAL_ONLY. The text is a deterministic function of
(adapter name, prompt ids, choice index), so a test can tell which adapter served a
request without hard-coding any output (`FakeEngine.expected`). Its `frontend()` is
the stand-in for vLLM's OpenAI app (tests/serve/fake_frontend.py) that the tenant edge
forwards generating requests to; it records every body it got in `engine.requests`.

`FakeGuards` stands in for `unlearnd.serve.guarding.GuardPipeline`; `fake_load_guards`
replaces `unlearnd.serve.tenancy.load_guards` and builds one from a policy dir written
by `make_policy_dir` (a `policy.json` that passes the registry's format check).

`tiny_world()` builds, once per test process, a tiny random base model (its tokenizer
and config are what the app loads) and two random LoRA adapters for it.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from unlearnd.serve.artifacts import POLICY_FORMAT
from unlearnd.serve.edge import POLICY_HEADER  # noqa: F401 - re-exported for the tests
from unlearnd.serve.engine import AdapterRef
from unlearnd.serve.guarding import GuardResult
from unlearnd.serve.metrics import UnlearndMetrics

logger = logging.getLogger(__name__)

ADMIN_KEY = "admin-key-0123456789abcdef"
KEYS = {"acme": "sk-acme-0123456789abcdef", "globex": "sk-globex-0123456789abcdef"}
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")


# ---------------------------------------------------------------- tiny model + adapters


@functools.lru_cache(maxsize=1)
def tiny_world() -> dict[str, Path]:
    """A tiny random Llama (`base`) and two random adapters for it (`a1`, `a2`).

    Built once per test process in a temp dir removed at exit (about 3 s on one core).
    """
    import torch

    from unlearnd.toolkit.tiny import make_random_adapter, make_tiny_model

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="unlearnd-serve-tests-"))
    atexit.register(shutil.rmtree, root, True)
    base = make_tiny_model(root / "base", seed=0)
    return {
        "root": root,
        "base": base,
        "a1": make_random_adapter(base, root / "a1", seed=1, rank=4),
        "a2": make_random_adapter(base, root / "a2", seed=2, rank=4),
    }


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> Any:
    """The tiny base model's tokenizer (loaded once)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_world()["base"]))


def base_vocab_size() -> int:
    return int(json.loads((tiny_world()["base"] / "config.json").read_text())["vocab_size"])


# ---------------------------------------------------------------- RequestOutput look-alikes


@dataclass
class FakeLogprob:
    """vLLM's `Logprob`: only `.logprob` is read by the serving layer."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FakeCompletionOutput:
    """vLLM's `CompletionOutput`: one choice (a delta in DELTA mode, all of it in FINAL_ONLY)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, FakeLogprob]] | None
    finish_reason: str | None


@dataclass
class FakeRequestOutput:
    """vLLM's `RequestOutput`: `outputs` holds one entry per choice that moved this step."""

    request_id: str
    outputs: list[FakeCompletionOutput]
    finished: bool


@dataclass
class GenerateCall:
    """What one `FakeEngine.generate` call was given."""

    prompt_ids: list[int]
    params: Any
    request_id: str
    adapter: AdapterRef
    cache_salt: str


class EngineFailure(RuntimeError):
    """What the fake engine raises when told to fail."""


class FakeEngine:
    """An `EngineClient` with deterministic output and switches for failure and slowness.

    `reply_tokens`: tokens a choice produces before finishing with "stop" (fewer when
    `params.max_tokens` is lower; then the reason is "length"). `fail_after`: raise
    `fail_exc` (default `EngineFailure`) after yielding that many outputs (0: before the
    first). `step_delay_s`: sleep between tokens. `paused`: while True, generation
    waits before each token (set it from any thread). `fail_load`: adapter names whose
    `load_adapter` raises. `loads_paused`: while True, `load_adapter` waits (set it from
    any thread). `dead_alternatives`: the top alternatives of every token have
    logprob -inf (what a forced or banned row gives; vLLM prints them as -9999.0).
    `adapters`: what is loaded (name -> AdapterRef), what the frontend resolves
    `model` against.
    """

    def __init__(self, *, model_name: str = "tiny", max_model_len: int = 256,
                 vocab_size: int = 512, reply_tokens: int = 5) -> None:
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
        if vocab_size < len(WORDS):
            raise ValueError(f"vocab_size must be >= {len(WORDS)}, got {vocab_size}")
        if reply_tokens < 1:
            raise ValueError(f"reply_tokens must be >= 1, got {reply_tokens}")
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.reply_tokens = reply_tokens
        self.fail_after: int | None = None
        self.fail_exc: type[Exception] = EngineFailure
        self.step_delay_s = 0.0
        self.paused = False
        self.healthy = True
        self.fail_load: set[str] = set()
        self.loads_paused = False
        self.dead_alternatives = False
        self.adapters: dict[str, AdapterRef] = {}
        self.requests: list[Any] = []
        """FrontendRequest per request the fake frontend received (rewritten bodies)."""
        self.calls: list[GenerateCall] = []
        self.loaded: list[str] = []
        self.released: list[str] = []
        self.aborted: list[str] = []
        self.closed: list[str] = []
        self.finished: list[str] = []
        self.shut_down = False

    # ------------------------------------------------------------ determinism

    def token(self, adapter: str, prompt_ids: list[int], index: int, step: int) -> int:
        """The token id of step `step` of choice `index` (never 0, so never a pad id)."""
        digest = hashlib.sha256(
            f"{adapter}|{','.join(map(str, prompt_ids))}|{index}|{step}".encode()).digest()
        return 1 + int.from_bytes(digest[:4], "big") % (self.vocab_size - 1)

    @staticmethod
    def piece(tok: int) -> str:
        return " " + WORDS[tok % len(WORDS)]

    def expected(self, adapter: str, prompt_ids: list[int], *, index: int = 0,
                 max_tokens: int | None = None) -> str:
        """The text choice `index` gets for this adapter and prompt."""
        n = min(self.reply_tokens, max_tokens or self.reply_tokens)
        return "".join(self.piece(self.token(adapter, prompt_ids, index, s)) for s in range(n))

    # ------------------------------------------------------------ EngineClient

    def generate(self, prompt_ids: list[int], params: Any, request_id: str, *,
                 adapter: AdapterRef | None, cache_salt: str) -> AsyncIterator[Any]:
        self.calls.append(GenerateCall(list(prompt_ids), params, request_id, adapter,
                                       cache_salt))
        return self._generate(list(prompt_ids), params, request_id, adapter)

    async def _generate(self, prompt_ids: list[int], params: Any, request_id: str,
                        adapter: AdapterRef) -> AsyncIterator[Any]:
        from vllm.sampling_params import RequestOutputKind

        delta = params.output_kind == RequestOutputKind.DELTA
        n_tokens = min(self.reply_tokens, params.max_tokens or self.reply_tokens)
        finish = "length" if n_tokens < self.reply_tokens else "stop"
        k = params.logprobs
        full: dict[int, FakeCompletionOutput] = {
            i: FakeCompletionOutput(i, "", [], [] if k is not None else None, None)
            for i in range(params.n)}
        yielded = 0
        try:
            for step in range(n_tokens):
                while self.paused:
                    await asyncio.sleep(0.005)
                if self.step_delay_s:
                    await asyncio.sleep(self.step_delay_s)
                if self.fail_after is not None and yielded >= self.fail_after:
                    raise self.fail_exc(f"fake engine failure in {request_id}")
                last = step == n_tokens - 1
                outs = []
                for i in range(params.n):
                    tok = self.token(adapter.name if adapter else "", prompt_ids, i, step)
                    lp = ({tok: FakeLogprob(-0.25, 1)} | {
                        (tok + j) % self.vocab_size: FakeLogprob(
                            float("-inf") if self.dead_alternatives else -1.0 - j, 1 + j)
                        for j in range(1, k + 1)} if k is not None else None)
                    out = full[i]
                    out.text += self.piece(tok)
                    out.token_ids.append(tok)
                    if lp is not None:
                        out.logprobs.append(lp)
                    out.finish_reason = finish if last else None
                    outs.append(FakeCompletionOutput(
                        i, self.piece(tok), [tok], [lp] if lp is not None else None,
                        out.finish_reason))
                if delta:
                    yielded += 1
                    yield FakeRequestOutput(request_id, outs, last)
                else:
                    await asyncio.sleep(0)
            if not delta:
                if self.fail_after is not None and yielded >= self.fail_after:
                    raise self.fail_exc(f"fake engine failure in {request_id}")
                yield FakeRequestOutput(request_id, list(full.values()), True)
            self.finished.append(request_id)
        finally:
            self.closed.append(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def load_adapter(self, adapter: AdapterRef) -> None:
        while self.loads_paused:
            await asyncio.sleep(0.005)
        if adapter.name in self.fail_load:
            raise EngineFailure(f"cannot load adapter {adapter.name}")
        self.loaded.append(adapter.name)
        self.adapters[adapter.name] = adapter

    async def release_adapter(self, adapter: AdapterRef) -> None:
        self.released.append(adapter.name)
        self.adapters.pop(adapter.name, None)

    async def frontend(self) -> Any:
        """The fake vLLM OpenAI app over this engine (tests/serve/fake_frontend.py)."""
        from tests.serve.fake_frontend import build_fake_frontend

        return build_fake_frontend(self)

    async def check_health(self) -> None:
        if not self.healthy:
            raise EngineFailure("engine core is dead")

    def shutdown(self) -> None:
        self.shut_down = True


# ---------------------------------------------------------------- guards


REFUSAL_TEXT = "I can't help with that: it falls under this service's unlearning policy."
"""The rendered refusal of an in-scope FakeGuards decision (ids [5, 6, 7] in extra)."""


class FakeGuards:
    """A `GuardPipeline` look-alike: in scope when a user message contains `trigger`.

    `fail_check`: `check` raises (the server must fail closed). `suppressed`: what
    `suppressions` reports per choice. `named`: whether a hit counts as the user naming
    the subject (False: a nameless description, the subject stays internal).
    `disclose`: False for a policy whose refusals must look like not knowing.
    `top_logprobs`: False when the policy withholds top alternatives.
    `continue_completions`: an in-scope completion is continued, not refused (the real
    pipeline's ``in_scope_completions: continue``).
    """

    def __init__(self, *, trigger: str = "Voldemort", mechanisms: tuple[str, ...] = (
            "firewall", "refusal"), fail_check: bool = False, suppressed: int = 0,
                 named: bool = True, disclose: bool = True,
                 top_logprobs: bool = True, continue_completions: bool = False) -> None:
        if not trigger:
            raise ValueError(f"trigger must be non-empty, got {trigger!r}")
        self.trigger = trigger
        self.mechanisms = tuple(sorted(mechanisms))
        self.fail_check = fail_check
        self.suppressed = suppressed
        self.named = named
        self.disclose = disclose
        self.top_logprobs_allowed = top_logprobs
        self.continue_completions = continue_completions
        self.checked: list[list[dict]] = []

    def check(self, messages: list[dict], version: str, policy_dir: str,
              kind: str = "chat") -> GuardResult:
        from unlearnd.guards.scope import messages_text

        self.checked.append(messages)
        if self.fail_check:
            raise RuntimeError("scope guard exploded")
        # every text the real guard reads: str content, content parts, tool-call args
        hit = any(self.trigger in t for t in messages_text(messages))
        refuse = hit and not (self.continue_completions and kind == "completions")
        extra = {"unlearnd_policy_dir": policy_dir, "unlearnd_version": version,
                 "unlearnd_in_scope": int(refuse), "unlearnd_item": 0 if refuse else -1}
        if hit and not refuse:  # continued: the firewall bans the item's spans
            extra["unlearnd_mentioned"] = [0]
        if refuse:
            extra["unlearnd_refusal_ids"] = [5, 6, 7]
        return GuardResult("in_scope" if hit else "out_of_scope",
                           f"mentions {self.trigger}" if hit else "no forget subject",
                           0.9 if hit else 0.1, 0 if hit else -1,
                           "Lord Voldemort" if hit else None, extra, 0.0001,
                           named=hit and self.named,
                           mention=self.trigger if hit and self.named else None,
                           internal_reason="describes Lord Voldemort" if hit else "",
                           disclose=self.disclose,
                           refusal_text=REFUSAL_TEXT if refuse else None)

    def suppressions(self, prompt_ids: Any, output_ids: Any, item: int = -1) -> int:
        return self.suppressed


def make_policy_dir(path: Path, **spec: Any) -> Path:
    """A policy dir the registry accepts; `spec` (FakeGuards kwargs, plus `fail_load`)
    is what `fake_load_guards` builds from it. Different specs hash differently."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "policy.json").write_text(json.dumps({"format": POLICY_FORMAT, "fake": spec},
                                                 sort_keys=True))
    return path


def fake_load_guards(policy_dir: str) -> FakeGuards:
    """Replacement for `unlearnd.serve.tenancy.load_guards` (monkeypatch it)."""
    spec = dict(json.loads((Path(policy_dir) / "policy.json").read_text())["fake"])
    if spec.pop("fail_load", False):
        raise ValueError(f"policy at {policy_dir} cannot be loaded: told to fail")
    if "mechanisms" in spec:
        spec["mechanisms"] = tuple(spec["mechanisms"])
    return FakeGuards(**spec)


# ---------------------------------------------------------------- app harness


def fresh_metrics() -> UnlearndMetrics:
    """Metrics in their own registry (the default one would reject a second app)."""
    return UnlearndMetrics(registry=CollectorRegistry())


def make_config(state_dir: Path, **overrides: Any) -> Any:
    """A ServerConfig on the tiny base with tenants acme and globex (no policies)."""
    from unlearnd.serve.config import ServerConfig

    data: dict[str, Any] = {
        "model": str(tiny_world()["base"]),
        "state_dir": str(state_dir),
        "admin_key": ADMIN_KEY,
        "registry_poll_s": 0.2,
        "drain_timeout_s": 5.0,
        # swapped-out adapters are released once drained, as the swap tests watch
        # (keeping previous versions loaded: tests/serve/test_tenancy.py)
        "keep_previous_versions": 0,
        "tenants": [{"name": name, "api_key": key} for name, key in KEYS.items()],
    }
    data.update(overrides)
    return ServerConfig.model_validate(data)


@dataclass
class RunningApp:
    """A started app (lifespan entered) and what it runs on."""

    client: Any
    engine: FakeEngine
    metrics: UnlearndMetrics
    config: Any
    state: Any = None
    extra: dict = field(default_factory=dict)

    def auth(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEYS[tenant]}"}

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    def counter(self, tenant: str, endpoint: str, outcome: str) -> float:
        return self.metrics.requests.labels(tenant, endpoint, outcome)._value.get()


@contextmanager
def running_app(config: Any, engine: FakeEngine | None = None) -> Iterator[RunningApp]:
    """Build the app on a FakeEngine and enter its lifespan with FastAPI's TestClient."""
    from fastapi.testclient import TestClient

    from unlearnd.serve.app import build_app

    engine = engine or FakeEngine(vocab_size=base_vocab_size())
    metrics = fresh_metrics()
    app = build_app(config, engine_factory=lambda _cfg: engine, metrics=metrics)
    with TestClient(app) as client:
        yield RunningApp(client, engine, metrics, config, app.state.unlearnd)


def parse_sse(text: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded except the final "[DONE]"."""
    return [data for _, data in sse_events(text)]


def sse_events(text: str) -> list[tuple[str | None, Any]]:
    """`(event name or None, data)` of each SSE event (data JSON-decoded but "[DONE]")."""
    events = []
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        name = None
        lines = block.split("\n")
        if lines[0].startswith("event: "):
            name = lines.pop(0)[len("event: "):]
        assert len(lines) == 1 and lines[0].startswith("data: "), block
        payload = lines[0][len("data: "):]
        events.append((name, payload if payload == "[DONE]" else json.loads(payload)))
    return events


@dataclass
class AsgiResult:
    """What a hand-driven ASGI request got back."""

    status: int
    headers: dict[str, str]
    body: bytes
    chunks: list[bytes]

    def json(self) -> Any:
        return json.loads(self.body)


async def asgi_request(app: Any, method: str, path: str, *, body: Any = None,
                       raw: bytes | None = None, headers: dict[str, str] | None = None,
                       disconnect_after: int | None = None, spec_version: str = "2.3",
                       on_chunk: Any = None) -> AsgiResult:
    """Drive one request through the ASGI `app` by hand (in the running loop: call it
    through `app.client.portal`). `disconnect_after`: the client goes away after that
    many non-empty body chunks (its `receive` then answers `http.disconnect`).
    `on_chunk(n, chunk)`: awaited after each non-empty body chunk."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                        else b"")
    hs = [(b"host", b"testserver"), (b"content-type", b"application/json"),
          (b"content-length", str(len(data)).encode())]
    hs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version},
             "http_version": "1.1", "method": method, "scheme": "http", "path": path,
             "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": hs, "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
             "state": {}}
    gone = asyncio.Event()
    sent_body = False
    out = AsgiResult(0, {}, b"", [])

    async def receive() -> dict:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": data, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if gone.is_set():
            raise OSError("client disconnected")
        if message["type"] == "http.response.start":
            out.status = message["status"]
            out.headers = {k.decode().lower(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            out.body += chunk
            if chunk:
                out.chunks.append(chunk)
                if on_chunk is not None:
                    await on_chunk(len(out.chunks), chunk)
                if disconnect_after is not None and len(out.chunks) >= disconnect_after:
                    gone.set()
            if not message.get("more_body", False):
                gone.set()

    try:
        await app(scope, receive, send)
    except OSError:  # what a server's send raises for a closed connection
        pass
    return out


def wait_until(pred: Any, timeout_s: float = 5.0) -> bool:
    """Poll `pred` until true or timeout (for effects the app runs in background tasks)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return bool(pred())


# ---------------------------------------------------------------- shared test pieces

HELLO = [{"role": "user", "content": "Tell me about the fox."}]
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
RESP = "/v1/responses"


# Fixtures, registered for every test module by tests/conftest.py. `fake_guards` is not
# autouse: a module opts in with `pytestmark = pytest.mark.usefixtures("fake_guards")`.

@pytest.fixture()
def fake_guards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace the server's policy loading with `fake_load_guards`."""
    monkeypatch.setattr("unlearnd.serve.tenancy.load_guards", fake_load_guards)


@pytest.fixture()
def app(tmp_path: Path) -> Iterator[RunningApp]:
    """A running app with small request limits (4 messages, n 3, 64 tokens, 4 KiB)."""
    config = make_config(tmp_path / "state", limits={"max_messages": 4, "max_n": 3,
                                                     "max_tokens": 64, "max_body_bytes": 4096})
    with running_app(config) as running:
        yield running
