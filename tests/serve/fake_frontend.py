"""A stand-in for vLLM's OpenAI app over a FakeEngine (unit tests only).

In production the tenant edge (unlearnd.serve.app / edge) forwards generating requests
to vLLM's own OpenAI frontend (`VllmEngine.frontend`). Here `FakeEngine.frontend()`
returns this app instead: it does what vLLM's frontend does with the (rewritten) body,
and nothing of the edge's job (no auth, no guard, no limits, no rewriting):

- reads the JSON body and resolves ``model`` against the adapters the engine has
  loaded (vLLM's LoRA table; 404 in vLLM's error shape when unknown);
- builds prompt ids: the tiny tokenizer's chat template for chat and Responses, the
  prompt for completions (text, token ids, or a list of those);
- builds vLLM ``SamplingParams`` (``extra_args`` = ``vllm_xargs``) and runs the
  unlearning logits processor's ``validate_params`` on them, as vLLM does at
  submission (unsigned guard arguments are a 400 while the edge's key is set);
- calls ``engine.generate(prompt_ids, params, request_id, adapter=..., cache_salt=...)``
  and answers in vLLM's OpenAI shapes: chat / completions JSON and SSE
  (``stream_options.include_usage``, ``return_token_ids``, logprobs with ``-inf``
  printed as -9999.0), and a minimal Responses API (JSON, and SSE events
  ``response.created`` ... ``response.completed``);
- request and engine errors as vLLM reports them (its ``create_error_response``:
  validation errors and ValueError -> 400, anything else -> 500, ``{"error":
  {"message": str(exc), "type": ..., "param": ..., "code": <int>}}``), in-band (an
  ``error`` SSE event, then ``[DONE]``) once a stream has started;
- a stream cancelled by its client aborts the engine request (what AsyncLLM does).

Every request body it receives is recorded in ``engine.requests`` (FrontendRequest).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

NEG = -9999.0  # how vLLM prints -inf logprobs


@dataclass
class FrontendRequest:
    """What the fake frontend received (the body as the edge rewrote it)."""

    kind: str
    body: dict[str, Any]
    headers: dict[str, str]
    request_ids: list[str] = field(default_factory=list)


class _NotFound(Exception):
    pass


def _error(status: int, message: str, type_: str | None = None,
           param: str | None = None) -> JSONResponse:
    """vLLM's ErrorResponse (`code` is the HTTP status, an int)."""
    kind = type_ or {400: "BadRequestError", 404: "NotFoundError",
                     500: "InternalServerError"}.get(status, "InternalServerError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": status}}, status_code=status)


def _exc_error(e: BaseException) -> tuple[int, dict]:
    """vLLM's own mapping of an exception to its error (create_error_response)."""
    from vllm.entrypoints.serve.exception_handling.error_response import (
        create_error_response,
    )

    body = create_error_response(e).model_dump()
    return body["error"]["code"], body


def _sse(obj: dict, event: str | None = None) -> str:
    data = json.dumps(obj, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {data}\n\n"


def _lp(v: float) -> float:
    return max(v, NEG) if not math.isnan(v) else NEG


# ---------------------------------------------------------------- request -> job


@dataclass
class _Prompt:
    ids: list[int]
    params: Any


@dataclass
class _Job:
    kind: str
    body: dict[str, Any]
    model: str
    adapter: Any
    cache_salt: str | None
    prompts: list[_Prompt]
    n: int
    stream: bool
    include_usage: bool
    token_ids: bool
    top_k: int | None  # top alternatives per token (None: no logprobs)


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for p in content:
            if isinstance(p, str):
                out.append(p)
            elif isinstance(p, dict) and isinstance(p.get("text"), str):
                out.append(p["text"])
            elif isinstance(p, dict) and p.get("type") not in ("text", "input_text",
                                                                 "output_text"):
                raise ValueError(f"content part type {p.get('type')!r} is not supported")
        return "".join(out)
    raise ValueError("content must be a string or a list of content parts")


def _chat_ids(tok: Any, messages: list[dict]) -> list[int]:
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


def _chat_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("messages: a non-empty list of messages is required")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError("messages: each message needs a role")
        out.append({"role": m["role"], "content": _text(m.get("content"))})
    return out


def _responses_messages(body: dict) -> list[dict]:
    out = []
    if isinstance(body.get("instructions"), str):
        out.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise ValueError("input: a string or a list of input items is required")
    for it in items:
        if not isinstance(it, dict):
            raise ValueError("input: each item must be an object")
        t = it.get("type")
        if t == "function_call":
            out.append({"role": "assistant", "content": ""})
        elif t == "function_call_output":
            out.append({"role": "tool", "content": _text(it.get("output"))})
        else:
            role = it.get("role") if isinstance(it.get("role"), str) else "user"
            out.append({"role": role, "content": _text(it.get("content"))})
    if not out:
        raise ValueError("input: empty")
    return out


def _completion_prompts(tok: Any, prompt: Any, vocab: int, special: bool) -> list[list[int]]:
    def one(p: Any) -> list[int]:
        if isinstance(p, str):
            return tok.encode(p, add_special_tokens=special)
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                             for t in p):
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"Token id {bad[0]} is out of vocabulary")
            return list(p)
        raise ValueError("prompt: a string, token ids, or a list of those is required")

    if isinstance(prompt, list) and prompt and all(isinstance(x, str | list) for x in prompt):
        return [one(x) for x in prompt]
    return [one(prompt)]


def _int(v: Any, name: str, default: int | None = None) -> int | None:
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name}: an integer is required")
    return v


def _resolve(engine: Any, model: Any) -> Any:
    if model in (None, engine.model_name):
        return None
    if isinstance(model, str) and model in engine.adapters:
        return engine.adapters[model]
    raise _NotFound(f"The model `{model}` does not exist.")


def _prepare(engine: Any, kind: str, body: dict) -> _Job:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    from tests.serve.fakes import tiny_tokenizer
    from unlearnd.guards.processor import UnlearningLogitsProcessor

    adapter = _resolve(engine, body.get("model"))
    tok = tiny_tokenizer()
    if kind == "chat":
        prompts = [_chat_ids(tok, _chat_messages(body))]
        requested = body.get("max_completion_tokens")
        requested = _int(requested if requested is not None else body.get("max_tokens"),
                         "max_tokens")
        top_k = (_int(body.get("top_logprobs"), "top_logprobs", 0)
                 if body.get("logprobs") else None)
    elif kind == "completions":
        prompts = _completion_prompts(tok, body.get("prompt"), engine.vocab_size,
                                      body.get("add_special_tokens", True) is not False)
        requested = _int(body.get("max_tokens", 16), "max_tokens")
        top_k = _int(body.get("logprobs"), "logprobs")
    else:
        prompts = [_chat_ids(tok, _responses_messages(body))]
        requested = _int(body.get("max_output_tokens"), "max_output_tokens")
        top_k = _int(body.get("top_logprobs"), "top_logprobs")
    n = _int(body.get("n"), "n", 1) if kind != "responses" else 1
    stream = body.get("stream") is True
    opts = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise ValueError("logit_bias: an object is required")
        bias = {int(k): float(v) for k, v in bias.items()}
        bad = [t for t in bias if not 0 <= t < engine.vocab_size]
        if bad:
            raise ValueError(f"token_id(s) {bad} in logit_bias contain out-of-vocab token ids")
    stop = body.get("stop")
    out: list[_Prompt] = []
    for ids in prompts:
        if len(ids) > engine.max_model_len:  # vLLM's get_max_tokens
            raise ValueError(f"Input length ({len(ids)}) exceeds model's maximum context "
                             f"length ({engine.max_model_len}).")
        room = engine.max_model_len - len(ids)
        max_tokens = min(room, requested) if requested is not None else room
        temperature = body.get("temperature")
        params = SamplingParams(
            n=n, temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if body.get("top_p") is None else body["top_p"], seed=body.get("seed"),
            presence_penalty=body.get("presence_penalty") or 0.0,
            frequency_penalty=body.get("frequency_penalty") or 0.0,
            stop=[stop] if isinstance(stop, str) else stop, max_tokens=max_tokens,
            logprobs=top_k, logit_bias=bias or None, extra_args=body.get("vllm_xargs"),
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)
        UnlearningLogitsProcessor.validate_params(params)  # vLLM: at submission
        out.append(_Prompt(ids, params))
    return _Job(kind, body, str(body.get("model") or engine.model_name), adapter,
                body.get("cache_salt"), out, n, stream, bool(opts.get("include_usage")),
                body.get("return_token_ids") is True, top_k)


# ---------------------------------------------------------------- vLLM's shapes


def _piece(engine: Any, tok: int) -> str:
    return engine.piece(tok)


def _top(lp: dict, k: int) -> list[tuple[int, Any]]:
    return sorted(lp.items(), key=lambda kv: -kv[1].logprob)[:k]


def _chat_logprobs(engine: Any, token_ids: list[int], logprobs: Any, k: int) -> dict | None:
    if logprobs is None:
        return None
    content = []
    for tok, lp in zip(token_ids, logprobs, strict=False):
        s = _piece(engine, tok)
        chosen = lp.get(tok)
        content.append({
            "token": s, "logprob": _lp(chosen.logprob) if chosen else NEG,
            "bytes": list(s.encode()),
            "top_logprobs": [{"token": _piece(engine, t), "logprob": _lp(v.logprob),
                              "bytes": list(_piece(engine, t).encode())}
                             for t, v in _top(lp, k)]})
    return {"content": content}


def _completion_logprobs(engine: Any, token_ids: list[int], logprobs: Any, k: int,
                         offset: int = 0) -> dict | None:
    if logprobs is None:
        return None
    tokens, lps, tops, offsets = [], [], [], []
    for tok, lp in zip(token_ids, logprobs, strict=False):
        s = _piece(engine, tok)
        chosen = lp.get(tok)
        tokens.append(s)
        lps.append(_lp(chosen.logprob) if chosen else NEG)
        tops.append({_piece(engine, t): _lp(v.logprob) for t, v in _top(lp, k)})
        offsets.append(offset)
        offset += len(s)
    return {"text_offset": offsets, "token_logprobs": lps, "tokens": tokens,
            "top_logprobs": tops}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion,
            "completion_tokens": completion, "prompt_tokens_details": None}


def _responses_usage(prompt: int, completion: int) -> dict:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def _response_obj(job: _Job, rid: str, created: int, status: str, output: list,
                  usage: dict | None) -> dict:
    b = job.body
    return {"id": rid, "created_at": created, "incomplete_details": None,
            "instructions": b.get("instructions"), "metadata": b.get("metadata"),
            "model": job.model, "object": "response", "output": output,
            "parallel_tool_calls": b.get("parallel_tool_calls", True),
            "temperature": b.get("temperature"), "tool_choice": b.get("tool_choice", "auto"),
            "tools": b.get("tools") or [], "top_p": b.get("top_p"), "background": False,
            "max_output_tokens": b.get("max_output_tokens"), "previous_response_id": None,
            "reasoning": None, "service_tier": "auto", "status": status,
            "text": b.get("text"), "top_logprobs": b.get("top_logprobs"),
            "truncation": "disabled", "usage": usage, "user": None}


async def _aclose(gen: Any) -> None:
    close = getattr(gen, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:  # noqa: BLE001
            pass


async def _collect(engine: Any, job: _Job, rec: FrontendRequest) -> JSONResponse:
    created = int(time.time())
    prefix = {"chat": "chatcmpl", "completions": "cmpl", "responses": "resp"}[job.kind]
    rid = f"{prefix}-{uuid.uuid4().hex}"
    choices: list[dict] = []
    n_prompt = n_completion = 0
    for p_idx, prompt in enumerate(job.prompts):
        request_id = f"{rid}-{p_idx}"
        rec.request_ids.append(request_id)
        gen = engine.generate(prompt.ids, prompt.params, request_id, adapter=job.adapter,
                              cache_salt=job.cache_salt)
        final = None
        try:
            async for out in gen:
                final = out
        except asyncio.CancelledError:
            with anyio.CancelScope(shield=True):
                await engine.abort(request_id)
            raise
        except Exception as e:  # noqa: BLE001 - vLLM's create_error_response
            status, body = _exc_error(e)
            return JSONResponse(body, status_code=status)
        finally:
            await _aclose(gen)
        n_prompt += len(prompt.ids)
        for o in sorted(final.outputs if final else [], key=lambda o: o.index):
            n_completion += len(o.token_ids)
            idx = p_idx * job.n + o.index
            if job.kind == "chat":
                choices.append({
                    "index": idx, "message": {
                        "role": "assistant", "content": o.text, "refusal": None,
                        "annotations": None, "audio": None, "function_call": None,
                        "tool_calls": [], "reasoning": None},
                    "logprobs": _chat_logprobs(engine, o.token_ids, o.logprobs,
                                               job.top_k or 0)
                    if job.top_k is not None else None,
                    "finish_reason": o.finish_reason, "stop_reason": None,
                    "token_ids": list(o.token_ids) if job.token_ids else None})
            elif job.kind == "completions":
                choices.append({
                    "index": idx, "text": o.text,
                    "logprobs": _completion_logprobs(engine, o.token_ids, o.logprobs,
                                                     job.top_k or 0)
                    if job.top_k is not None else None,
                    "finish_reason": o.finish_reason, "stop_reason": None,
                    "prompt_logprobs": None,
                    "prompt_token_ids": list(prompt.ids) if job.token_ids else None,
                    "token_ids": list(o.token_ids) if job.token_ids else None})
            else:
                choices.append({
                    "type": "message", "id": f"msg_{uuid.uuid4().hex}", "role": "assistant",
                    "status": "completed", "content": [{
                        "type": "output_text", "text": o.text, "annotations": [],
                        "logprobs": _chat_logprobs(engine, o.token_ids, o.logprobs,
                                                   job.top_k or 0)["content"]
                        if o.logprobs is not None and job.top_k is not None else None}]})
    if job.kind == "responses":
        return JSONResponse(_response_obj(job, rid, created, "completed", choices,
                                          _responses_usage(n_prompt, n_completion)))
    body = {"id": rid, "object": "chat.completion" if job.kind == "chat"
            else "text_completion", "created": created, "model": job.model,
            "choices": choices, "service_tier": None, "system_fingerprint": None,
            "usage": _usage(n_prompt, n_completion), "prompt_logprobs": None,
            "kv_transfer_params": None}
    if job.kind == "chat":
        body["prompt_token_ids"] = job.prompts[0].ids if job.token_ids else None
    return JSONResponse(body)


async def _stream(engine: Any, job: _Job, rec: FrontendRequest) -> AsyncIterator[str]:
    if job.kind == "responses":
        async for chunk in _stream_responses(engine, job, rec):
            yield chunk
        return
    created = int(time.time())
    chat = job.kind == "chat"
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    obj = "chat.completion.chunk" if chat else "text_completion"
    base = {"id": rid, "object": obj, "created": created, "model": job.model}
    n_prompt = n_completion = 0
    request_id = None
    gen = None
    try:
        if chat:
            for i in range(job.n):
                first = {**base, "choices": [{"index": i, "delta": {
                    "role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}]}
                if job.token_ids and i == 0:
                    first["prompt_token_ids"] = job.prompts[0].ids
                yield _sse(first)
        for p_idx, prompt in enumerate(job.prompts):
            request_id = f"{rid}-{p_idx}"
            rec.request_ids.append(request_id)
            n_prompt += len(prompt.ids)
            offsets: dict[int, int] = {}
            sent_prompt: set[int] = set()
            gen = engine.generate(prompt.ids, prompt.params, request_id,
                                  adapter=job.adapter, cache_salt=job.cache_salt)
            async for out in gen:
                for o in out.outputs:
                    n_completion += len(o.token_ids)
                    idx = p_idx * job.n + o.index
                    lp = None
                    if job.top_k is not None:
                        lp = (_chat_logprobs(engine, o.token_ids, o.logprobs, job.top_k)
                              if chat else _completion_logprobs(
                                  engine, o.token_ids, o.logprobs, job.top_k,
                                  offsets.get(idx, 0)))
                    if chat:
                        choice = {"index": idx, "delta": {"content": o.text} if o.text
                                  else {}, "logprobs": lp, "finish_reason": o.finish_reason}
                    else:
                        choice = {"index": idx, "text": o.text, "logprobs": lp,
                                  "finish_reason": o.finish_reason}
                        offsets[idx] = offsets.get(idx, 0) + len(o.text)
                        if job.token_ids and idx not in sent_prompt:
                            sent_prompt.add(idx)
                            choice["prompt_token_ids"] = list(prompt.ids)
                    if o.finish_reason:
                        choice["stop_reason"] = None
                    if job.token_ids:
                        choice["token_ids"] = list(o.token_ids)
                    yield _sse({**base, "choices": [choice]})
            await _aclose(gen)
            gen = None
        if job.include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(n_prompt, n_completion)})
        yield "data: [DONE]\n\n"
    except (GeneratorExit, asyncio.CancelledError):
        with anyio.CancelScope(shield=True):  # AsyncLLM aborts a cancelled request
            await _aclose(gen)
            if request_id is not None:
                await engine.abort(request_id)
        raise
    except Exception as e:  # noqa: BLE001 - headers are out: in-band, like vLLM
        _, body = _exc_error(e)
        yield _sse(body)
        yield "data: [DONE]\n\n"


async def _stream_responses(engine: Any, job: _Job, rec: FrontendRequest
                            ) -> AsyncIterator[str]:
    created = int(time.time())
    rid = f"resp_{uuid.uuid4().hex}"
    mid = f"msg_{uuid.uuid4().hex}"
    seq = 0

    def ev(name: str, data: dict) -> str:
        nonlocal seq
        out = _sse({"type": name, "sequence_number": seq, **data}, name)
        seq += 1
        return out

    prompt = job.prompts[0]
    request_id = f"{rid}-0"
    rec.request_ids.append(request_id)
    gen = None
    text = ""
    n_completion = 0
    try:
        pending = _response_obj(job, rid, created, "in_progress", [], None)
        yield ev("response.created", {"response": pending})
        yield ev("response.in_progress", {"response": pending})
        item = {"type": "message", "id": mid, "role": "assistant", "status": "in_progress",
                "content": []}
        yield ev("response.output_item.added", {"output_index": 0, "item": item})
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield ev("response.content_part.added", {"output_index": 0, "item_id": mid,
                                                 "content_index": 0, "part": part})
        gen = engine.generate(prompt.ids, prompt.params, request_id, adapter=job.adapter,
                              cache_salt=job.cache_salt)
        async for out in gen:
            for o in out.outputs:
                n_completion += len(o.token_ids)
                text += o.text
                lp = (_chat_logprobs(engine, o.token_ids, o.logprobs, job.top_k)["content"]
                      if job.top_k is not None and o.logprobs is not None else [])
                yield ev("response.output_text.delta", {
                    "output_index": 0, "item_id": mid, "content_index": 0, "delta": o.text,
                    "logprobs": lp})
        await _aclose(gen)
        gen = None
        done_part = {**part, "text": text}
        yield ev("response.output_text.done", {"output_index": 0, "item_id": mid,
                                               "content_index": 0, "text": text,
                                               "logprobs": []})
        yield ev("response.content_part.done", {"output_index": 0, "item_id": mid,
                                                "content_index": 0, "part": done_part})
        item = {**item, "status": "completed", "content": [done_part]}
        yield ev("response.output_item.done", {"output_index": 0, "item": item})
        yield ev("response.completed", {"response": _response_obj(
            job, rid, created, "completed", [item],
            _responses_usage(len(prompt.ids), n_completion))})
    except (GeneratorExit, asyncio.CancelledError):
        with anyio.CancelScope(shield=True):
            await _aclose(gen)
            await engine.abort(request_id)
        raise
    except Exception as e:  # noqa: BLE001
        _, body = _exc_error(e)
        yield ev("error", {"code": str(body["error"]["code"]),
                           "message": body["error"]["message"], "param": None})


# ---------------------------------------------------------------- the app

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]},
        # vLLM's ErrorResponse says `code: integer`; the edge's own errors carry a
        # string or null code, so the fake documents both (see the report).
        "code": {"type": ["integer", "string", "null"]}}}}}
_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string", "enum": ["system", "developer", "user", "assistant",
                                        "tool"]},
    "content": {"anyOf": [{"type": "string"}, {"type": "null"}, {"type": "array", "items": {
        "type": "object", "required": ["type", "text"], "properties": {
            "type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}}]}}}
_SAMPLING = {
    "model": {"type": "string"}, "max_tokens": {"type": "integer", "minimum": 1},
    "n": {"type": "integer", "minimum": 1}, "seed": {"type": "integer"},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {
        "include_usage": {"type": "boolean"}}},
}
_SCHEMAS = {
    "chat": {"type": "object", "required": ["messages"], "properties": {
        **_SAMPLING, "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20}}},
    "completions": {"type": "object", "required": ["prompt"], "properties": {
        **_SAMPLING, "prompt": {"anyOf": [{"type": "string"}, {
            "type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0,
                                                      "maximum": 100}}]},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 5}}},
    "responses": {"type": "object", "required": ["input"], "properties": {
        "model": {"type": "string"}, "instructions": {"type": "string"},
        "input": {"anyOf": [{"type": "string", "minLength": 1}, {
            "type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["role", "content"], "properties": {
                    "role": {"type": "string", "enum": ["user", "assistant", "system"]},
                    "content": {"type": "string"}}}}]},
        "max_output_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "stream": {"type": "boolean"}}},
}


def build_fake_frontend(engine: Any) -> FastAPI:
    """The fake vLLM OpenAI app over ``engine`` (a FakeEngine)."""
    app = FastAPI(title="fake vLLM OpenAI frontend")

    async def handle(request: Request, kind: str) -> Any:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            return _error(400, "the body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        rec = FrontendRequest(kind, body, dict(request.headers))
        engine.requests.append(rec)
        try:
            job = _prepare(engine, kind, body)
        except _NotFound as e:
            return _error(404, str(e), param="model")
        except (KeyError, AttributeError) as e:  # a body the fake cannot read
            return _error(400, f"{type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 - vLLM's validation errors
            status, err = _exc_error(e)
            return JSONResponse(err, status_code=status)
        if job.stream:
            return StreamingResponse(_stream(engine, job, rec), media_type="text/event-stream")
        return await _collect(engine, job, rec)

    def route(path: str, kind: str) -> None:
        async def endpoint(request: Request) -> Any:
            return await handle(request, kind)

        app.add_api_route(path, endpoint, methods=["POST"], name=f"create_{kind}",
                          responses={200: {"content": {
                              "application/json": {"schema": {"type": "object"}},
                              "text/event-stream": {}}},
                              400: {"content": {"application/json": {"schema": _ERROR}}},
                              404: {"content": {"application/json": {"schema": _ERROR}}}},
                          openapi_extra={"requestBody": {"required": True, "content": {
                              "application/json": {"schema": _SCHEMAS[kind]}}}})

    route("/v1/chat/completions", "chat")
    route("/v1/completions", "completions")
    route("/v1/responses", "responses")
    return app
