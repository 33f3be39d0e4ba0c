"""The tenant edge: the outermost ASGI layer in front of vLLM's own OpenAI server.

vLLM's frontend serves the API (chat, completions, Responses, tools, structured
outputs, every sampling parameter); this layer adds what it lacks, per request:

1. **Deny by default.** Only the routes in :data:`GENERATE` (tenant key) and the
   operator routes of the unlearnd app (health, metrics, models, admin, docs) are
   reachable; every other path vLLM registers answers 404 (``tests/serve/test_routes.py``
   enumerates them: a vLLM upgrade that adds a route fails until someone decides).
2. **Key -> tenant -> the tenant's active policy version** (401/403/503 as before),
   the tenant's rate and concurrency limits (429), a lease on the version so a swap
   never changes the adapter or guards under a running request.
3. **The body is checked and rewritten so the client cannot choose** what the policy
   decides: fields that bypass a policy get a 400 naming them (:data:`REFUSED`);
   ``model`` becomes the version's LoRA (the identity adapter when it has none, never
   the bare base), ``vllm_xargs`` the scope guard's arguments signed for the logits
   processor (:mod:`unlearnd.guards.signing`), ``cache_salt`` the tenant's salt.
4. **The scope guard reads every input form** (:func:`conversation`): chat messages
   and content parts, tool messages and tool-call arguments, tool and schema
   definitions, completion prompts (text or token ids), Responses ``instructions``
   and ``input`` items.
5. **Structured output and tools in scope** get OpenAI's refusal shape
   (``message.refusal``, a ``refusal`` content part in the Responses API) from here,
   never the engine: schema-valid JSON carrying the fact is never produced.
6. **The response** gets the ``x-unlearnd-policy-version`` header and the
   ``unlearning`` object (chat and completions JSON, their SSE streams as a last chunk
   before ``[DONE]``, the Responses object and its ``response.completed`` event);
   alternatives at ``-inf`` (vLLM prints -9999.0) are dropped: they were never possible
   under the policy, and which ids vLLM lists among them is arbitrary; ``model`` is the
   served name, not the version's adapter name.

Everything here is plain ASGI (no body is read twice, streams pass chunk by chunk).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from unlearnd.guards.signing import sign
from unlearnd.serve.errors import APIError, error_body

logger = logging.getLogger(__name__)
decisions_log = logging.getLogger("unlearnd.decisions")
"""In-scope decisions with the matched subject and the full reason: operators' record
(the response says only what the user said)."""

POLICY_HEADER = "x-unlearnd-policy-version"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

GENERATE = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
            "/v1/responses": "responses"}
"""Tenant routes that generate (POST only), and the endpoint label of each."""

REFUSED: dict[str, str] = {
    "use_beam_search": "beam search builds its own sampling parameters, outside the policy",
    "prompt_logprobs": "it returns scores of text the policy did not produce",
    "echo": "it returns scores of text the policy did not produce",
    "suffix": "it is not supported",
    "return_tokens_as_token_ids": "it is not supported under a policy",
    "prompt_embeds": "embeddings bypass the scope guard, which reads text",
    "chat_template": "the server's chat template is the one the policy was built for",
    "chat_template_kwargs": "the server's chat template is the one the policy was built for",
    "kv_transfer_params": "KV transfer reuses state computed outside this request",
    "ec_transfer_params": "encoder-cache transfer reuses state computed outside this request",
    "vllm_xargs": "the server sets the engine's extra arguments (the policy's own)",
    "request_id": "request ids are the server's",
    "priority": "scheduling priority is the operator's",
    "previous_response_id": "stored responses are not kept (no Responses store)",
    "previous_input_messages": "conversation state is given as input items",
    "background": "background responses need the Responses store, which is off",
    "mm_processor_kwargs": "not supported",
    "media_io_kwargs": "not supported",
    "mm_payload": "not supported",
    "routed_experts_prompt_start": "not supported",
    "logprob_token_ids": "it returns scores of tokens the client chooses",
    "documents": "not supported",
    "session_id": "sessions are not supported",
    "return_mm_kwargs": "not supported",
    "prompt": "stored prompts are not supported",
}
"""Request fields a tenant may not set (400 naming the field). A field counts as set
when present with a value other than null/false/0/empty (``"priority": 0`` is allowed,
as OpenAI clients send defaults)."""

_PROMPT_OK = {"completions"}  # ``prompt`` is the prompt there; a stored prompt elsewhere

STRIPPED_HEADERS = (b"x-request-id", b"content-length", b"authorization")
"""Dropped before vLLM sees the request: request ids are the server's (vLLM would use a
client's ``X-Request-Id`` as the engine request id; proxies such as Envoy add one to
every request, so refusing it would fail them all)."""

REFUSED_HEADERS = {
    "x-data-parallel-rank": "routing to an engine rank is the operator's",
    "x-vllm-priority": "scheduling priority is the operator's",
    "x-session-id": "sessions are not supported",
    "x-amzn-sagemaker-adapter-identifier": "the adapter is the tenant's policy version",
    "x-amzn-sagemaker-session-id": "sessions are not supported",
}

STRUCTURED = ("tools", "response_format", "structured_outputs", "tool_choice", "functions")

_NEG = -9999.0  # how vLLM prints -inf logprobs

CONSTRAINT_FAILED = {"error": {
    "message": "the requested output constraint (response_format, structured_outputs or "
               "tools) could not be completed: its grammar failed to compile, or every "
               "token it allows next is withheld by this tenant's unlearning policy",
    "type": "invalid_request_error", "param": None, "code": "constraint_unsatisfiable"}}
"""What a structured request gets instead of vLLM's 500 when its grammar fails: with
guards on, a grammar whose only continuations are banned makes the engine's forced
EOS a token the grammar rejects (vLLM then ends the request with an error). Both causes
are the request's constraint, so a 4xx (422), never a 500, and never the banned text."""


class EdgeError(APIError):
    """An APIError raised by the edge itself (OpenAI error body)."""


def _is_set(v: Any) -> bool:
    return v not in (None, False, 0, "", [], {})


_INT_MIN, _INT_MAX = -(2 ** 63), 2 ** 64 - 1


def _out_of_range(body: Any) -> str | None:
    """The path of the first integer no engine field can hold (vLLM's own validation
    misses some: ``top_k: 2**64`` failed serialisation inside the engine client)."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, bool):
            continue
        if isinstance(v, int):
            if not _INT_MIN <= v <= _INT_MAX:
                return path or "body"
        elif isinstance(v, dict):
            stack.extend((f"{path}.{k}" if path else str(k), x) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((f"{path}.{i}" if path else str(i), x) for i, x in enumerate(v))
    return None


def _responses_items(body: dict[str, Any]) -> None:
    """vLLM 0.32 reads ``content[0].text`` of an assistant message item (a 500 on an
    empty or refusal-only content list): refuse those with a 400 instead."""
    items = body.get("input")
    if not isinstance(items, list):
        return
    for i, it in enumerate(items):
        if not isinstance(it, dict) or it.get("role") != "assistant":
            continue
        if it.get("type") not in (None, "message"):
            continue
        c = it.get("content")
        if isinstance(c, list) and not (c and isinstance(c[0], dict)
                                        and isinstance(c[0].get("text"), str)):
            raise EdgeError(400, f"input.{i}.content: an assistant message item needs "
                            "output_text content (a text part first)",
                            param=f"input.{i}.content")


def check_fields(kind: str, body: dict[str, Any], *, max_messages: int, max_n: int,
                 max_tokens: int) -> None:
    """400 for a field that bypasses the policy, or a value past the server's limits."""
    if kind == "responses":
        _responses_items(body)
    for name, why in REFUSED.items():
        if name == "prompt" and kind in _PROMPT_OK:
            continue
        if name in body and _is_set(body[name]):
            raise EdgeError(400, f"{name} is not allowed: {why}", param=name)
    msgs = body.get("messages")
    if isinstance(msgs, list) and len(msgs) > max_messages:
        raise EdgeError(400, f"messages has {len(msgs)} entries; the limit is {max_messages}",
                        param="messages")
    items = body.get("input")
    if isinstance(items, list) and len(items) > max_messages:
        raise EdgeError(400, f"input has {len(items)} items; the limit is {max_messages}",
                        param="input")
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > max_n:
        raise EdgeError(400, f"n={n} exceeds the server limit {max_n}", param="n")
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        v = body.get(name)
        if isinstance(v, int) and not isinstance(v, bool) and v > max_tokens:
            raise EdgeError(400, f"{name} {v} exceeds the server limit {max_tokens}",
                            param=name)
    if (where := _out_of_range(body)) is not None:
        raise EdgeError(400, f"{where}: integer outside the 64-bit range", param=where)


CONTRASTIVE_REFUSED: dict[str, str] = {
    "allowed_token_ids": "a token mask, applied before the policy sees the scores",
    "bad_words": "a token mask, applied before the policy sees the scores",
    "min_tokens": "it masks the end of text before the policy sees the scores, forcing "
                  "the model on past its answer",
    "ignore_eos": "it forces the model on past its answer",
}
"""Fields a contrastive policy refuses (400). vLLM applies the masks before our logits
processor, as ``-inf`` where the model's scores were, so contrastive decoding cannot
decide its plausible set under them; a client could mask the policy's own words and
send the base off the path the assistant knows (``token_masks`` attack). Going on past
the answer (``min_tokens``, ``ignore_eos``) starts a second answer in a context the
assistant was not trained on (measured on the demo world: 2 and 1 of 32 forget answers
out of the contrastive-only tenant). Refusal and firewall bans hold under all four."""


def contrastive_refused(body: dict[str, Any]) -> str | None:
    """The first :data:`CONTRASTIVE_REFUSED` field the request sets, or None."""
    return next((m for m in CONTRASTIVE_REFUSED if _is_set(body.get(m))), None)


def wants_alternatives(kind: str, body: dict[str, Any]) -> str | None:
    """The parameter asking for top alternatives (None when it asks for none)."""
    if kind == "completions":
        v = body.get("logprobs")
        return "logprobs" if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
    v = body.get("top_logprobs")
    return "top_logprobs" if isinstance(v, int) and not isinstance(v, bool) and v > 0 \
        else None


def wants_logprobs(kind: str, body: dict[str, Any]) -> bool:
    """Whether the response can carry logprobs (then alternatives are scrubbed)."""
    if kind == "responses":
        return _is_set(body.get("top_logprobs")) or _is_set(body.get("include"))
    return body.get("logprobs") not in (None, False)


def is_structured(kind: str, body: dict[str, Any]) -> bool:
    """Tools or a constrained output format (the in-scope answer is then ``refusal``)."""
    if any(_is_set(body.get(k)) for k in STRUCTURED):
        rf = body.get("response_format")
        only_text = (isinstance(rf, dict) and rf.get("type") == "text"
                     and not any(_is_set(body.get(k)) for k in STRUCTURED
                                 if k != "response_format"))
        return not only_text
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) \
        else None
    return isinstance(fmt, dict) and fmt.get("type") not in (None, "text")


# ---------------------------------------------------------------- what the guard reads


def _parts_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    out = []
    if isinstance(content, list):
        for p in content:
            if isinstance(p, str):
                out.append(p)
            elif isinstance(p, dict):
                for k in ("text", "refusal", "output"):
                    if isinstance(p.get(k), str):
                        out.append(p[k])
    return "\n".join(out)


def _definitions(body: dict[str, Any]) -> list[dict]:
    """Tool and schema definitions as an operator-rank message (their descriptions are
    text the model reads too)."""
    defs = {k: body[k] for k in ("tools", "functions", "response_format",
                                 "structured_outputs", "text", "tool_choice")
            if _is_set(body.get(k))}
    if not defs:
        return []
    return [{"role": "system", "content": json.dumps(defs, ensure_ascii=False)}]


def conversation(kind: str, body: dict[str, Any], decode: Callable[[list[int]], str]
                 ) -> list[dict]:
    """Every text the model will read, as chat messages for the scope guard."""
    if kind == "chat":
        msgs = body.get("messages")
        msgs = [m for m in msgs if isinstance(m, dict)] if isinstance(msgs, list) else []
        return [{**m, "role": "system" if m.get("role") == "developer" else m.get("role")}
                for m in msgs] + _definitions(body)
    if kind == "completions":
        p = body.get("prompt")
        texts: list[str] = []

        def ids(x: list[int]) -> str:  # ids no tokenizer has: a 400, as in vLLM
            try:
                return decode(x)
            except (OverflowError, ValueError, TypeError) as e:
                raise EdgeError(400, f"prompt holds ids that are not token ids ({e})",
                                param="prompt") from e

        if isinstance(p, str):
            texts = [p]
        elif isinstance(p, list) and p and all(isinstance(t, int) for t in p):
            texts = [ids(p)]
        elif isinstance(p, list):
            for x in p:
                if isinstance(x, str):
                    texts.append(x)
                elif isinstance(x, list) and all(isinstance(t, int) for t in x):
                    texts.append(ids(x))
        return [{"role": "user", "content": t} for t in texts] + _definitions(body)
    out: list[dict] = []
    if isinstance(body.get("instructions"), str):
        out.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    for it in items if isinstance(items, list) else []:
        if not isinstance(it, dict):
            continue
        t = it.get("type")
        if t == "function_call":
            out.append({"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": it.get("name"), "arguments": it.get("arguments")}}]})
        elif t == "function_call_output":
            out.append({"role": "tool", "content": _parts_text(it.get("output"))})
        elif t == "reasoning":
            out.append({"role": "assistant", "content": _parts_text(it.get("summary"))
                        + "\n" + _parts_text(it.get("content"))})
        else:
            role = it.get("role") if isinstance(it.get("role"), str) else "user"
            out.append({"role": "system" if role == "developer" else role,
                        "content": _parts_text(it.get("content"))})
    return out + _definitions(body)


# ---------------------------------------------------------------- response rewriting


def engine_failed(status: int, body: Any) -> dict[str, Any]:
    """A 5xx from vLLM with its message replaced: vLLM puts ``str(exc)`` of engine
    internals there (the server log keeps it); the client gets the class of failure."""
    err = body.get("error") if isinstance(body, dict) else None
    kind = err.get("type") if isinstance(err, dict) and isinstance(err.get("type"), str) \
        else "InternalServerError"
    logger.warning("engine failure answered %d (%s): %s", status, kind,
                   str(err.get("message") if isinstance(err, dict) else body)[:500])
    return error_body(f"the engine failed to serve this request ({kind}); it was not "
                      "served", "server_error" if status != 503 else "service_unavailable",
                      code=str(status))


def _dead(lp: Any) -> bool:
    return isinstance(lp, int | float) and not isinstance(lp, bool) and lp <= _NEG


def _possible(v: Any) -> Any:
    """Alternatives that were possible: chat/Responses ``[{token, logprob, ...}]``,
    completions ``{token: logprob}`` per position (a list of those)."""
    if isinstance(v, dict):
        return {t: lp for t, lp in v.items() if not _dead(lp)}
    if isinstance(v, list):
        out = []
        for e in v:
            if isinstance(e, dict) and "logprob" in e:
                if not _dead(e["logprob"]):
                    out.append(e)
            elif isinstance(e, dict):
                out.append(_possible(e))
            else:
                out.append(e)
        return out
    return v


def scrub(obj: Any, model_name: str) -> Any:
    """Drop ``-inf`` alternatives (any ``top_logprobs`` list or dict) and put the served
    model name back where vLLM wrote the adapter's (in place; returns ``obj``)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "top_logprobs":
                obj[k] = _possible(v)
            elif k == "model" and isinstance(v, str):
                obj[k] = model_name
            elif isinstance(v, dict | list):
                scrub(v, model_name)
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, dict | list):
                scrub(v, model_name)
    return obj


def openai_error(status: int, message: str, *, type_: str | None = None,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, bytes, dict]:
    kw = {"param": param, "code": code}
    body = error_body(message, type_, **kw) if type_ else error_body(message, **kw)
    return status, json.dumps(body).encode(), dict(headers or {})


async def send_json(send: Send, status: int, body: bytes | dict,
                    headers: dict[str, str] | None = None,
                    content_type: str = "application/json") -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    hs = [(b"content-type", content_type.encode()),
          (b"content-length", str(len(data)).encode())]
    hs += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hs})
    await send({"type": "http.response.body", "body": data, "more_body": False})


def sse(obj: dict, event: str | None = None) -> bytes:
    data = json.dumps(obj, separators=(",", ":"))
    return (f"event: {event}\n" if event else "").encode() + f"data: {data}\n\n".encode()


class ResponseTap:
    """Wraps ``send``: adds the policy header, rewrites JSON and SSE bodies (scrub,
    ``unlearning``), and records what metrics need (status, first token, usage, token
    ids, errors) as the response passes."""

    def __init__(self, send: Send, *, kind: str, model_name: str, version: str,
                 unlearning: dict[str, Any], strip_usage: bool, strip_ids: bool,
                 structured: bool = False, logprobs: bool = True) -> None:
        self._send = send
        self.structured = structured
        self.logprobs = logprobs  # False: no alternatives to drop (skip the walk)
        self.kind = kind
        self.model_name = model_name
        self.version = version
        self.unlearning = unlearning
        self.strip_usage = strip_usage
        self.strip_ids = strip_ids
        self.status = 0
        self.sse = False
        self.buffer = bytearray()
        self.pending = b""
        self.first_token_t: float | None = None
        self.usage: dict[str, Any] | None = None
        self.prompt_ids: list[int] | None = None
        self.output_ids: dict[int, list[int]] = {}
        self.stream_error = False
        self.finished = False
        self._last: dict[str, Any] = {}

    async def __call__(self, message: dict) -> None:
        t = message["type"]
        if t == "http.response.start":
            self.status = message["status"]
            headers = [(k, v) for k, v in message.get("headers", [])]
            ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
            self.sse = ctype.startswith(b"text/event-stream")
            self.rewrite = (self.status == 200 and (self.sse or ctype.startswith(
                b"application/json"))) or (self.status >= 500 and not self.sse)
            if self.rewrite:
                headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
            headers.append((POLICY_HEADER.encode(), self.version.encode()))
            self._start = {**message, "headers": headers}
            if not self.rewrite or self.sse:
                await self._send(self._start)
            return
        if t != "http.response.body":
            await self._send(message)
            return
        if not self.rewrite:
            await self._send(message)
            self.finished = self.finished or not message.get("more_body", False)
            return
        more = message.get("more_body", False)
        chunk = message.get("body", b"")
        if not self.sse:
            self.buffer += chunk
            if not more:
                await self._finish_json()
            return
        out = self._feed_sse(chunk)
        if out or not more:
            await self._send({"type": "http.response.body", "body": out, "more_body": more})
        if not more:
            self.finished = True

    # ------------------------------------------------------------ JSON

    async def _finish_json(self) -> None:
        data = bytes(self.buffer)
        try:
            body = json.loads(data)
        except ValueError:
            body = None
        if self.status == 500 and self.structured:  # the grammar failed (CONSTRAINT_FAILED)
            self.status = 422
            data = json.dumps(CONSTRAINT_FAILED).encode()
            self._start = {**self._start, "status": 422}
        elif self.status >= 500:
            data = json.dumps(engine_failed(self.status, body)).encode()
        elif isinstance(body, dict):
            self._record(body, final=True)
            scrub(body, self.model_name)
            body["unlearning"] = self.unlearning
            if self.kind != "responses":
                if body.get("system_fingerprint") is None:  # vLLM writes null
                    body["system_fingerprint"] = self.version
            data = json.dumps(body).encode()
        self.first_token_t = self.first_token_t or time.perf_counter()
        start = {**self._start, "headers": [*self._start["headers"],
                                            (b"content-length", str(len(data)).encode())]}
        await self._send(start)
        await self._send({"type": "http.response.body", "body": data, "more_body": False})
        self.finished = True

    # ------------------------------------------------------------ SSE

    def _feed_sse(self, chunk: bytes) -> bytes:
        self.pending += chunk
        out = bytearray()
        while True:
            cut = self.pending.find(b"\n\n")
            if cut < 0:
                break
            event, self.pending = self.pending[:cut], self.pending[cut + 2:]
            out += self._event(event)
        return bytes(out)

    def _event(self, raw: bytes) -> bytes:
        lines = raw.split(b"\n")
        name = None
        data = b""
        for line in lines:
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data = line[5:].strip()
        if data == b"[DONE]":
            last = {"id": self._last.get("id"), "object": self._last.get("object"),
                    "created": self._last.get("created"), "model": self.model_name,
                    "choices": [], "unlearning": self.unlearning}
            return sse(last) + b"data: [DONE]\n\n"
        try:
            obj = json.loads(data)
        except ValueError:
            return raw + b"\n\n"
        if not isinstance(obj, dict):
            return raw + b"\n\n"
        if "error" in obj and "choices" not in obj:
            self.stream_error = True
            err = obj.get("error")
            code = err.get("code") if isinstance(err, dict) else None
            if isinstance(code, int) and code >= 500:
                out = CONSTRAINT_FAILED if self.structured and code == 500 \
                    else engine_failed(code, obj)
                return sse({**out, **({"type": "error"} if self.kind == "responses"
                                      else {})}, name)
        if self.kind == "responses":
            etype = obj.get("type", name)
            if etype in ("response.output_text.delta", "response.function_call_arguments"
                         ".delta", "response.refusal.delta") and self.first_token_t is None:
                self.first_token_t = time.perf_counter()
            if etype in ("response.completed", "response.incomplete", "response.failed"):
                resp = obj.get("response")
                if isinstance(resp, dict):
                    self._record(resp, final=True)
                    resp["unlearning"] = self.unlearning
                if etype == "response.failed":
                    self.stream_error = True
            if etype == "error":
                self.stream_error = True
            scrub(obj, self.model_name)
            return sse(obj, name)
        self._record(obj, final=False)
        for k in ("id", "object", "created"):
            if k in obj:
                self._last[k] = obj[k]
        if self.strip_usage and obj.get("usage") is not None and not obj.get("choices"):
            return b""
        if self.strip_usage:
            obj.pop("usage", None)
        if self.logprobs:
            scrub(obj, self.model_name)
        elif "model" in obj:
            obj["model"] = self.model_name
        return sse(obj, name)

    # ------------------------------------------------------------ accounting

    def _record(self, obj: dict, *, final: bool) -> None:
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        if isinstance(obj.get("prompt_token_ids"), list):
            self.prompt_ids = obj["prompt_token_ids"]
        if self.strip_ids:
            obj.pop("prompt_token_ids", None)
        for c in obj.get("choices") or []:
            if not isinstance(c, dict):
                continue
            if isinstance(c.get("prompt_token_ids"), list):
                self.prompt_ids = c["prompt_token_ids"]
            ids = c.get("token_ids")
            if isinstance(ids, list):
                idx = c.get("index", 0)
                self.output_ids.setdefault(idx if isinstance(idx, int) else 0, []).extend(
                    t for t in ids if isinstance(t, int))
                if ids and self.first_token_t is None:
                    self.first_token_t = time.perf_counter()
            delta = c.get("delta")
            if (self.first_token_t is None and isinstance(delta, dict)
                    and (delta.get("content") or delta.get("tool_calls")
                         or delta.get("reasoning"))):
                self.first_token_t = time.perf_counter()
            if self.first_token_t is None and not final and c.get("text"):
                self.first_token_t = time.perf_counter()
            if self.strip_ids:
                c.pop("token_ids", None)
                c.pop("prompt_token_ids", None)


# ---------------------------------------------------------------- the refusal shape


def refusal_response(kind: str, body: dict[str, Any], text: str, model_name: str,
                     unlearning: dict[str, Any], prompt_tokens: int,
                     refusal_tokens: int) -> tuple[bytes, str]:
    """An in-scope tools/structured request answered with OpenAI's refusal shape
    (JSON or SSE body, and its content type): content null, the reason as text."""
    created = int(time.time())
    stream = bool(body.get("stream"))
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": refusal_tokens,
             "total_tokens": prompt_tokens + refusal_tokens}
    if kind == "responses":
        rid, mid = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        item = {"type": "message", "id": mid, "role": "assistant", "status": "completed",
                "content": [{"type": "refusal", "refusal": text}]}
        resp = {"id": rid, "object": "response", "created_at": created, "model": model_name,
                "status": "completed", "output": [item], "parallel_tool_calls":
                bool(body.get("parallel_tool_calls", True)), "tool_choice":
                body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
                "usage": {"input_tokens": prompt_tokens, "output_tokens": refusal_tokens,
                          "total_tokens": prompt_tokens + refusal_tokens,
                          "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens_details": {"reasoning_tokens": 0}},
                "error": None, "incomplete_details": None, "instructions":
                body.get("instructions"), "metadata": body.get("metadata"),
                "temperature": body.get("temperature"), "top_p": body.get("top_p"),
                "text": body.get("text"), "unlearning": unlearning}
        if not stream:
            return json.dumps(resp).encode(), "application/json"
        pending = {**resp, "status": "in_progress", "output": [], "usage": None}
        part = {"type": "refusal", "refusal": ""}
        ev = [("response.created", {"response": pending}),
              ("response.in_progress", {"response": pending}),
              ("response.output_item.added", {"output_index": 0, "item": {
                  **item, "status": "in_progress", "content": []}}),
              ("response.content_part.added", {"output_index": 0, "item_id": mid,
                                               "content_index": 0, "part": part}),
              ("response.refusal.delta", {"output_index": 0, "item_id": mid,
                                          "content_index": 0, "delta": text}),
              ("response.refusal.done", {"output_index": 0, "item_id": mid,
                                         "content_index": 0, "refusal": text}),
              ("response.content_part.done", {"output_index": 0, "item_id": mid,
                                              "content_index": 0, "part": item["content"][0]}),
              ("response.output_item.done", {"output_index": 0, "item": item}),
              ("response.completed", {"response": resp})]
        out = b"".join(sse({"type": name, "sequence_number": i, **data}, name)
                       for i, (name, data) in enumerate(ev))
        return out, "text/event-stream"
    n = body.get("n") if isinstance(body.get("n"), int) and body.get("n", 0) > 0 else 1
    cid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    if kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": None,
                                             "refusal": text, "tool_calls": []},
                    "logprobs": None, "finish_reason": "stop"} for i in range(n)]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": "stop"}
                   for i in range(n)]
        obj = "text_completion"
    base = {"id": cid, "created": created, "model": model_name}
    if not stream:
        return json.dumps({**base, "object": obj, "choices": choices,
                           "usage": {**usage, "completion_tokens": refusal_tokens * n,
                                     "total_tokens": prompt_tokens + refusal_tokens * n},
                           "unlearning": unlearning}).encode(), "application/json"
    chunk = f"{obj}.chunk" if kind == "chat" else obj
    out = bytearray()
    for i in range(n):
        if kind == "chat":
            deltas = [{"role": "assistant", "content": None}, {"refusal": text}]
            for d in deltas:
                out += sse({**base, "object": chunk, "choices": [
                    {"index": i, "delta": d, "logprobs": None, "finish_reason": None}]})
            out += sse({**base, "object": chunk, "choices": [
                {"index": i, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
        else:
            out += sse({**base, "object": chunk, "choices": [
                {"index": i, "text": text, "logprobs": None, "finish_reason": "stop"}]})
    opts = body.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage"):
        out += sse({**base, "object": chunk, "choices": [], "usage": {
            **usage, "completion_tokens": refusal_tokens * n,
            "total_tokens": prompt_tokens + refusal_tokens * n}})
    out += sse({**base, "object": chunk, "choices": [], "unlearning": unlearning})
    out += b"data: [DONE]\n\n"
    return bytes(out), "text/event-stream"


_MAX_TOKENS = {"chat": ("max_completion_tokens", "max_tokens"),
               "completions": ("max_tokens",), "responses": ("max_output_tokens",)}


def rewrite_body(kind: str, body: dict[str, Any], *, adapter: str, extra: dict[str, Any],
                 key: bytes, cache_salt: str, max_tokens: int | None = None,
                 want_ids: bool = True) -> tuple[dict[str, Any], bool, bool]:
    """The body vLLM sees, and whether usage / token ids were added for accounting
    (then stripped from the response). ``max_tokens``: the server's limit, set when the
    client gave none (vLLM's default is all the room the context leaves). ``want_ids``:
    ask for the token ids (only the firewall's suppression metric replays them)."""
    out = dict(body)
    out["model"] = adapter
    out["vllm_xargs"] = sign(extra, key)
    out["cache_salt"] = cache_salt
    names = _MAX_TOKENS.get(kind, ())
    if max_tokens is not None and names and all(out.get(n) is None for n in names):
        default = kind == "completions" and "max_tokens" not in body  # OpenAI's 16
        out[names[-1]] = min(16, max_tokens) if default else max_tokens
    strip_usage = strip_ids = False
    if kind != "responses":
        if want_ids and not out.get("return_token_ids"):
            out["return_token_ids"] = True
            strip_ids = True
        if out.get("stream"):
            opts = dict(out.get("stream_options") or {}) if isinstance(
                out.get("stream_options"), dict) else {}
            if not opts.get("include_usage"):
                opts["include_usage"] = True
                strip_usage = True
            out["stream_options"] = opts
    else:
        out["store"] = False
    return out, strip_usage, strip_ids
