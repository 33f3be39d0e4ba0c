"""Chat and completion serving: tenant policy in, OpenAI response (or SSE stream) out.

Serving methods return a result or raise `APIError`; the router turns errors into
OpenAI error bodies. Each request holds a lease on the policy snapshot it started with.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from unlearnd.serve.engine import EngineClient
from unlearnd.serve.guarding import GuardResult
from unlearnd.serve.metrics import UnlearndMetrics
from unlearnd.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    new_id,
    now,
)
from unlearnd.serve.registry import Tenant
from unlearnd.serve.tenancy import ServingPolicy, TenantRouter

logger = logging.getLogger(__name__)
decisions_log = logging.getLogger("unlearnd.decisions")
"""In-scope decisions with the matched subject and the full reason: operators' record
(the response says only what the user said)."""

POLICY_HEADER = "x-unlearnd-policy-version"


@dataclass
class RequestContext:
    """One request's state across guard, engine and response."""

    tenant: Tenant
    policy: ServingPolicy
    endpoint: str
    guard: GuardResult | None
    prompt_ids: list[int]
    t0: float = field(default_factory=time.perf_counter)
    first_token_t: float | None = None
    output_ids: dict[int, list[int]] = field(default_factory=dict)
    _info: dict[str, Any] | None = None
    _suppressed: int | None = None

    def suppressed(self) -> int:
        """Decoding steps at which the firewall cut this request's outputs (replayed on
        the tokens; computed once, when output is final). Metrics and logs only: in a
        response it would confirm which guessed continuation is a removed fact."""
        if self._suppressed is None:
            g = self.guard
            n = 0
            if self.policy.guards is not None:
                item = g.item if g and g.in_scope else -1
                n = sum(self.policy.guards.suppressions(self.prompt_ids, ids, item)
                        for ids in self.output_ids.values())
            self._suppressed = n
        return self._suppressed

    def unlearning(self) -> dict[str, Any]:
        """The `unlearning` object of the response: no more than the text says."""
        if self._info is not None:
            return self._info
        g = self.guard
        decision = g.public() if g else {"decision": "unguarded", "reason": None,
                                         "matched_item": None, "subject": None}
        self._info = {
            "tenant": self.tenant.name,
            "policy_version": self.policy.version,
            "mechanisms": list(self.policy.mechanisms),
            **decision,
        }
        return self._info


class Serving:
    """The logic behind /v1/chat/completions and /v1/completions."""

    def __init__(self, engine: EngineClient, router: TenantRouter, tokenizer: Any,
                 metrics: UnlearndMetrics, *, max_tokens_limit: int, max_messages: int,
                 max_n: int) -> None:
        self.engine = engine
        self.router = router
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_tokens_limit = max_tokens_limit
        self.max_messages = max_messages
        self.max_n = max_n

    # ------------------------------------------------------------ prompt building

    def _chat_prompt(self, req: ChatCompletionRequest) -> tuple[list[int], list[dict]]:
        if len(req.messages) > self.max_messages:
            raise APIError(400, f"messages has {len(req.messages)} entries; the limit is "
                           f"{self.max_messages}", param="messages")
        try:
            messages = [{"role": "system" if m.role == "developer" else m.role,
                         "content": m.text()} for m in req.messages]
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False), messages

    def _completion_prompt(self, req: CompletionRequest) -> list[int]:
        if isinstance(req.prompt, list):
            vocab = len(self.tokenizer)
            bad = [t for t in req.prompt if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary",
                               param="prompt")
            return list(req.prompt)
        return self.tokenizer.encode(req.prompt, add_special_tokens=False)

    def _max_tokens(self, requested: int | None, prompt_len: int, param: str) -> int:
        ctx = self.engine.max_model_len
        if prompt_len >= ctx:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context "
                           f"length is {ctx}", param=param)
        room = ctx - prompt_len
        if requested is None:
            return min(room, self.max_tokens_limit)
        if requested > self.max_tokens_limit:
            raise APIError(400, f"max_tokens {requested} exceeds the server limit "
                           f"{self.max_tokens_limit}", param="max_tokens")
        if requested > room:
            raise APIError(400, f"max_tokens {requested} plus the prompt's {prompt_len} "
                           f"tokens exceeds the context length {ctx}", param="max_tokens")
        return requested

    # ------------------------------------------------------------ entry points

    async def chat(self, req: ChatCompletionRequest, tenant: Tenant,
                   is_disconnected: Callable[[], Any]) -> tuple[Any, ServingPolicy]:
        prompt_ids, messages = self._chat_prompt(req)
        return await self._run(req, tenant, "chat", prompt_ids, messages, is_disconnected)

    async def completion(self, req: CompletionRequest, tenant: Tenant,
                         is_disconnected: Callable[[], Any]) -> tuple[Any, ServingPolicy]:
        prompt_ids = self._completion_prompt(req)
        text = req.prompt if isinstance(req.prompt, str) else self.tokenizer.decode(req.prompt)
        messages = [{"role": "user", "content": text}]
        return await self._run(req, tenant, "completions", prompt_ids, messages,
                               is_disconnected)

    async def _run(self, req: ChatCompletionRequest | CompletionRequest, tenant: Tenant,
                   endpoint: str, prompt_ids: list[int], messages: list[dict],
                   is_disconnected: Callable[[], Any]) -> tuple[Any, ServingPolicy]:
        if req.n > self.max_n:
            raise APIError(400, f"n={req.n} exceeds the server limit {self.max_n}", param="n")
        max_tokens = self._max_tokens(req.requested_max_tokens, len(prompt_ids),
                                      "messages" if endpoint == "chat" else "prompt")
        if (broken := self.router.current(tenant)).error:  # fail closed, never unguarded
            raise APIError(503, f"this tenant's policy cannot be served right now "
                           f"({broken.version}); the request was not served",
                           code="policy_unavailable")
        sp = self.router.acquire(tenant)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.router.release(sp)

        try:
            guard = None
            if sp.guards is not None:
                try:
                    guard = sp.guards.check(messages, sp.version, sp.policy_dir)
                except Exception as e:  # noqa: BLE001 - fail closed
                    logger.exception("scope guard failed for tenant %s", tenant.name)
                    self.metrics.guard_failures.labels(tenant.name).inc()
                    raise APIError(503, "the unlearning guard failed for this request; it was "
                                   "not served", code="guard_failed") from e
                self.metrics.guard_latency.labels(tenant.name).observe(guard.latency_s)
                self.metrics.scope_decisions.labels(tenant.name, guard.decision).inc()
                if guard.in_scope:  # the full decision, for operators only (never sent)
                    decisions_log.info(
                        "tenant=%s version=%s decision=in_scope item=%d subject=%r named=%s "
                        "score=%.3f reason=%r", tenant.name, sp.version, guard.item,
                        guard.subject, guard.named, guard.score, guard.internal_reason)
                withheld = not getattr(sp.guards, "top_logprobs_allowed", True)
                if withheld and req.top_alternatives > 0:
                    raise APIError(400, f"{req.top_alternatives_param} is not available for "
                                   "this tenant: its policy withholds top alternatives "
                                   "(use 0 for the sampled token's logprob only)",
                                   param=req.top_alternatives_param)
            else:
                self.metrics.scope_decisions.labels(tenant.name, "unguarded").inc()
            try:
                params = req.to_sampling_params(
                    max_tokens=max_tokens, logprobs=req.logprobs_k,
                    vocab_size=self.engine.vocab_size,
                    extra_args=guard.extra_args if guard else None, stream=req.stream)
            except ValueError as e:
                raise APIError(400, str(e)) from e
            ctx = RequestContext(tenant, sp, endpoint, guard, prompt_ids)
            request_id = new_id("chatcmpl" if endpoint == "chat" else "cmpl")
            gen = self.engine.generate(prompt_ids, params, request_id, adapter=sp.adapter,
                                       cache_salt=sp.cache_salt)
            if req.stream:
                def abandon() -> None:  # closed before its first chunk: no engine request
                    self._count(ctx, "aborted")
                    release()

                stream = LeasedStream(
                    self._stream(req, ctx, request_id, gen, is_disconnected, release), abandon)
                return stream, sp
            result = await self._collect(req, ctx, request_id, gen, is_disconnected)
            return result, sp
        except BaseException:
            release()
            raise
        finally:
            if not req.stream:
                release()

    # ------------------------------------------------------------ non-streaming

    async def _collect(self, req: Any, ctx: RequestContext, request_id: str,
                       gen: AsyncIterator[Any], is_disconnected: Callable[[], Any]) -> dict:
        final = None
        disconnected = False

        async def watch() -> None:  # non-streaming: poll the connection, not every token
            nonlocal disconnected
            while True:
                await asyncio.sleep(0.25)
                if await is_disconnected():
                    disconnected = True
                    await self.engine.abort(request_id)
                    return

        watcher = asyncio.create_task(watch())
        try:
            async for out in gen:
                final = out
            if disconnected:
                raise APIError(499, "client disconnected")
        except APIError:
            raise
        except ValueError as e:  # vLLM validation (e.g. VLLMValidationError) -> 400
            raise APIError(400, str(e)) from e
        except Exception as e:  # noqa: BLE001
            logger.exception("engine failed on %s", request_id)
            raise APIError(500, f"the engine failed: {type(e).__name__}") from e
        finally:
            watcher.cancel()
        if disconnected:
            raise APIError(499, "client disconnected")
        if final is None:
            raise APIError(500, "the engine returned no output")
        ctx.first_token_t = ctx.first_token_t or time.perf_counter()
        choices = []
        completion_tokens = 0
        for o in final.outputs:
            ctx.output_ids[o.index] = list(o.token_ids)
            completion_tokens += len(o.token_ids)
            choices.append(self._choice(req, ctx, o))
        usage = {"prompt_tokens": len(ctx.prompt_ids), "completion_tokens": completion_tokens,
                 "total_tokens": len(ctx.prompt_ids) + completion_tokens}
        self._finish(ctx, completion_tokens)
        body = {
            "id": request_id,
            "object": "chat.completion" if ctx.endpoint == "chat" else "text_completion",
            "created": now(),
            "model": self.engine.model_name,
            "choices": sorted(choices, key=lambda c: c["index"]),
            "usage": usage,
            "system_fingerprint": ctx.policy.version,
            "unlearning": ctx.unlearning(),
        }
        return body

    def _choice(self, req: Any, ctx: RequestContext, o: Any) -> dict:
        finish = o.finish_reason if o.finish_reason in ("stop", "length") else (
            o.finish_reason or "stop")
        if ctx.endpoint == "chat":
            choice = {"index": o.index, "message": {"role": "assistant", "content": o.text},
                      "logprobs": self._chat_logprobs(o.token_ids, o.logprobs,
                                                        req.top_logprobs or 0)
                      if req.logprobs else None,
                      "finish_reason": finish}
        else:
            choice = {"index": o.index, "text": o.text,
                      "logprobs": self._completion_logprobs(o.token_ids, o.logprobs)
                      if req.logprobs is not None else None,
                      "finish_reason": finish}
        return choice

    def _token_str(self, tok: int) -> str:
        return self.tokenizer.decode([tok])

    def _chat_logprobs(self, token_ids: Any, logprobs: Any, k: int) -> dict | None:
        if logprobs is None:
            return None
        content = []
        for tok, lp in zip(token_ids, logprobs, strict=False):
            chosen = lp.get(tok)
            s = self._token_str(tok)
            top = sorted(_informative(lp), key=lambda kv: -kv[1].logprob)[:k]
            content.append({
                "token": s, "logprob": max(chosen.logprob, -9999.0) if chosen else -9999.0,
                "bytes": list(s.encode()),
                "top_logprobs": [{"token": self._token_str(t), "logprob": max(v.logprob, -9999.0),
                                  "bytes": list(self._token_str(t).encode())} for t, v in top],
            })
        return {"content": content}

    def _completion_logprobs(self, token_ids: Any, logprobs: Any) -> dict | None:
        if logprobs is None:
            return None
        tokens, token_lps, tops, offsets = [], [], [], []
        offset = 0
        for tok, lp in zip(token_ids, logprobs, strict=False):
            s = self._token_str(tok)
            chosen = lp.get(tok)
            tokens.append(s)
            token_lps.append(chosen.logprob if chosen else None)
            tops.append({self._token_str(t): v.logprob for t, v in _informative(lp)})
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                "text_offset": offsets}

    # ------------------------------------------------------------ streaming

    async def _stream(self, req: Any, ctx: RequestContext, request_id: str,
                      gen: AsyncIterator[Any], is_disconnected: Callable[[], Any],
                      release: Callable[[], None]) -> AsyncIterator[str]:
        chat = ctx.endpoint == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        created = now()
        base = {"id": request_id, "object": obj, "created": created,
                "model": self.engine.model_name, "system_fingerprint": ctx.policy.version}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        completion_tokens = 0
        outcome = "ok"
        try:
            if chat:
                for i in range(req.n):
                    yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant",
                                                                          "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
            # No per-chunk disconnect poll: when the client goes away Starlette cancels
            # this generator, and closing `gen` aborts the engine request (AsyncLLM
            # handles CancelledError/GeneratorExit by aborting).
            async for out in gen:
                for o in out.outputs:
                    if ctx.first_token_t is None and o.token_ids:
                        ctx.first_token_t = time.perf_counter()
                    ctx.output_ids.setdefault(o.index, []).extend(o.token_ids)
                    completion_tokens += len(o.token_ids)
                    finish = o.finish_reason
                    if not o.text and not finish and not o.token_ids:
                        continue
                    if chat:
                        choice = {"index": o.index, "delta": {"content": o.text} if o.text
                                  else {}, "logprobs": self._chat_logprobs(
                                      o.token_ids, o.logprobs, req.top_logprobs or 0)
                                  if req.logprobs else None, "finish_reason": finish}
                    else:
                        choice = {"index": o.index, "text": o.text,
                                  "logprobs": self._completion_logprobs(o.token_ids, o.logprobs)
                                  if req.logprobs is not None else None,
                                  "finish_reason": finish}
                    yield _sse({**base, "choices": [choice]})
            final = {**base, "choices": [], "unlearning": ctx.unlearning()}
            if include_usage:
                final["usage"] = {"prompt_tokens": len(ctx.prompt_ids),
                                  "completion_tokens": completion_tokens,
                                  "total_tokens": len(ctx.prompt_ids) + completion_tokens}
            yield _sse(final)
            yield "data: [DONE]\n\n"
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "aborted"  # the client went away: Starlette cancelled or closed us
            raise
        except ValueError as e:
            outcome = "client_error"
            yield _sse({"error": {"message": str(e), "type": "invalid_request_error",
                                  "param": None, "code": None}})
            yield "data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 - report in-band: headers are already sent
            logger.exception("engine failed mid-stream on %s", request_id)
            outcome = "engine_error"
            yield _sse({"error": {"message": f"the engine failed: {type(e).__name__}",
                                  "type": "server_error", "param": None, "code": None}})
            yield "data: [DONE]\n\n"
        finally:
            if outcome == "ok" and completion_tokens == 0 and ctx.first_token_t is None:
                ctx.first_token_t = time.perf_counter()
            # GeneratorExit (client gone) lands here too: the engine request is aborted by
            # AsyncLLM.generate's own cancellation handling when `gen` is closed.
            with anyio.CancelScope(shield=True):  # anyio re-cancels every await otherwise
                await _aclose(gen)
                if outcome == "aborted":
                    await self.engine.abort(request_id)
            if outcome == "ok":
                self._finish(ctx, completion_tokens)
            else:
                self._count(ctx, outcome)
            release()

    # ------------------------------------------------------------ accounting

    def _count(self, ctx: RequestContext, outcome: str) -> None:
        self.metrics.requests.labels(ctx.tenant.name, ctx.endpoint, outcome).inc()

    def _finish(self, ctx: RequestContext, completion_tokens: int) -> None:
        name = ctx.tenant.name
        self._count(ctx, "ok")
        self.metrics.request_latency.labels(name).observe(time.perf_counter() - ctx.t0)
        if ctx.first_token_t is not None:
            self.metrics.ttft.labels(name).observe(ctx.first_token_t - ctx.t0)
        self.metrics.prompt_tokens.labels(name).inc(len(ctx.prompt_ids))
        self.metrics.generation_tokens.labels(name).inc(completion_tokens)
        if ctx.guard is not None and ctx.guard.in_scope and "refusal" in ctx.policy.mechanisms:
            self.metrics.refusals.labels(name).inc()
        suppressed = ctx.suppressed()
        if suppressed:
            self.metrics.suppressed_tokens.labels(name).inc(suppressed)


class LeasedStream:
    """The SSE chunks of one streamed request, holding its policy lease.

    Iterating runs the request; `aclose()` ends it however far it got. A stream closed
    before its first chunk (the client left before the response started, so nothing
    ever iterated it) never reaches the generator's own clean-up, so `aclose()` then
    runs `abandon` (count it aborted, release the lease) itself. Idempotent.
    """

    def __init__(self, chunks: AsyncIterator[str], abandon: Callable[[], None]) -> None:
        self._chunks = chunks
        self._abandon = abandon
        self._started = False
        self._closed = False

    def __aiter__(self) -> LeasedStream:
        return self

    async def __anext__(self) -> str:
        if self._closed:
            raise StopAsyncIteration
        self._started = True
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._started:
            await self._chunks.aclose()  # the generator's finally: abort, count, release
        else:
            self._abandon()


def _informative(lp: dict) -> list:
    """Alternatives with a finite logprob: under a policy the others were never
    possible (banned, or a forced refusal token's every alternative); which ids vLLM
    lists among equal ``-inf`` values is arbitrary and says nothing."""
    return [(t, v) for t, v in lp.items() if v.logprob > float("-inf")]


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _aclose(gen: Any) -> None:
    close = getattr(gen, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:  # noqa: BLE001
            pass
