"""The app over a FakeEngine: the tenant edge in front of the (fake) vLLM frontend for
chat, completions and Responses; errors, auth, streaming, metrics, admin API.

The fake frontend (tests/serve/fake_frontend.py) does what vLLM's OpenAI app does with
the body the edge rewrote; these tests check what the edge adds: the tenant's adapter
and salt, the signed guard arguments, the ``unlearning`` block and policy header, the
server's limits, fail-closed errors, leases and metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.serve.fakes import (
    CHAT,
    COMP,
    HELLO,
    POLICY_HEADER,
    RESP,
    FakeEngine,
    asgi_request,
    base_vocab_size,
    fake_load_guards,
    make_config,
    make_policy_dir,
    parse_sse,
    running_app,
    sse_events,
    tiny_tokenizer,
    tiny_world,
    wait_until,
)
from unlearnd.guards.signing import SIG_KEY, verify

pytestmark = pytest.mark.usefixtures("fake_guards")


def chat_prompt(messages: list[dict]) -> list[int]:
    tok = tiny_tokenizer()
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


def register(app, tenant: str, *, activate: bool = True, **parts: Path) -> dict:
    body = {k: str(v) for k, v in parts.items()} | {"activate": activate}
    r = app.client.post(f"/admin/tenants/{tenant}/versions", json=body, headers=app.admin)
    assert r.status_code == 201, r.text
    return r.json()


def expect(ok: bool, message: str) -> None:
    """Fail with a plain message (no traceback): used by the xfail tests, because
    formatting their tracebacks intermittently hits a CPython 3.11.7 ast.parse
    SystemError ("AST constructor recursion depth mismatch") inside pytest."""
    if not ok:
        pytest.fail(message, pytrace=False)


def assert_openai_error(r, status: int, *, param: str | None = "any", needle: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param != "any":
        assert err["param"] == param
    assert needle in err["message"]
    return err


def active(app, tenant: str = "acme") -> float:
    return app.state.metrics.active_requests.labels(tenant)._value.get()


# ---------------------------------------------------------------- chat / completions


def test_chat_json_serves_tenant_adapter_and_reports_policy(app, tmp_path: Path) -> None:
    v = register(app, "acme", adapter=tiny_world()["a1"])
    r = app.client.post(CHAT, json={"messages": HELLO, "model": "globex@deadbeef0000"},
                        headers=app.auth("acme"))
    assert r.status_code == 200, r.text
    assert r.headers[POLICY_HEADER] == v["name"]
    call = app.engine.calls[-1]
    assert call.adapter.name == v["name"]  # the tenant's version, whatever `model` says
    assert call.cache_salt == app.state.registry.get_tenant("acme").cache_salt
    assert call.prompt_ids == chat_prompt(HELLO)
    sent = app.engine.requests[-1].body  # what vLLM's frontend was given
    assert sent["model"] == v["name"] and sent["cache_salt"] == call.cache_salt
    assert "authorization" not in app.engine.requests[-1].headers  # the tenant key stays
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == app.config.model_name  # the served name, not the adapter's
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == app.engine.expected(v["name"], call.prompt_ids)
    assert choice["finish_reason"] == "stop"
    # no token ids unless the client asks (the edge asks for them only under a firewall,
    # and strips them again): vLLM's own null fields at most
    assert choice.get("token_ids") is None and body.get("prompt_token_ids") is None
    assert body["usage"]["prompt_tokens"] == len(call.prompt_ids)
    assert body["usage"]["completion_tokens"] == app.engine.reply_tokens
    assert body["system_fingerprint"] == v["name"]
    info = body["unlearning"]
    assert info["tenant"] == "acme" and info["policy_version"] == v["name"]
    assert info["mechanisms"] == ["adapter"] and info["decision"] == "unguarded"
    assert app.counter("acme", "chat", "ok") == 1
    assert app.metrics.prompt_tokens.labels("acme")._value.get() == len(call.prompt_ids)
    assert app.metrics.generation_tokens.labels("acme")._value.get() == \
        app.engine.reply_tokens
    assert active(app) == 0


def test_tenants_get_different_adapters_and_salts(app) -> None:
    va = register(app, "acme", adapter=tiny_world()["a1"])
    vg = register(app, "globex", adapter=tiny_world()["a2"])
    texts = {}
    for tenant, v in (("acme", va), ("globex", vg)):
        r = app.client.post(CHAT, json={"messages": HELLO}, headers=app.auth(tenant))
        assert r.headers[POLICY_HEADER] == v["name"]
        texts[tenant] = r.json()["choices"][0]["message"]["content"]
    assert texts["acme"] != texts["globex"]
    assert app.engine.calls[0].cache_salt != app.engine.calls[1].cache_salt


def test_no_policy_uses_identity_adapter_and_header_none(app) -> None:
    r = app.client.post(CHAT, json={"messages": HELLO}, headers=app.auth("acme"))
    assert r.status_code == 200
    assert r.headers[POLICY_HEADER] == "none"
    assert app.engine.calls[-1].adapter.name == "__identity__"  # never the bare base
    assert r.json()["unlearning"]["policy_version"] is None
    extra = app.engine.calls[-1].params.extra_args  # signed even without a policy
    assert extra["unlearnd_version"] == "none" and verify(extra, app.state.sign_key)


def test_request_fields_reach_sampling_params(app) -> None:
    r = app.client.post(CHAT, json={
        "messages": HELLO, "max_tokens": 50, "max_completion_tokens": 3, "n": 2, "seed": 7,
        "stop": ["zz"], "temperature": 0.5, "presence_penalty": 1.0,
        "logit_bias": {"11": 5}, "logprobs": True, "top_logprobs": 2},
        headers=app.auth("acme"))
    assert r.status_code == 200, r.text
    sent = app.engine.requests[-1].body  # the edge passes the client's fields on as sent
    for k, v in (("max_tokens", 50), ("max_completion_tokens", 3), ("n", 2), ("seed", 7),
                 ("stop", ["zz"]), ("temperature", 0.5), ("logit_bias", {"11": 5}),
                 ("top_logprobs", 2)):
        assert sent[k] == v, k
    p = app.engine.calls[-1].params
    assert (p.max_tokens, p.n, p.seed, p.stop, p.logprobs) == (3, 2, 7, ["zz"], 2)
    assert p.logit_bias == {11: 5.0}
    assert p.temperature == pytest.approx(0.5) and p.presence_penalty == pytest.approx(1.0)
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["finish_reason"] == "length" for c in choices)  # 3 < reply_tokens
    content = choices[0]["logprobs"]["content"]
    assert len(content) == 3
    assert all(len(c["top_logprobs"]) == 2 for c in content)
    assert content[0]["logprob"] == pytest.approx(-0.25)


def test_default_max_tokens_is_room_left_capped_by_limit(app) -> None:
    """No max_tokens: the server limit still applies (vLLM's own default would be all
    the room the context leaves)."""
    app.client.post(CHAT, json={"messages": HELLO}, headers=app.auth("acme"))
    prompt_len = len(app.engine.calls[-1].prompt_ids)
    expected = min(app.engine.max_model_len - prompt_len, app.config.limits.max_tokens)
    assert app.engine.calls[-1].params.max_tokens == expected
    for body in ({"messages": HELLO, "max_tokens": None},
                 {"messages": HELLO, "max_completion_tokens": None}):
        app.client.post(CHAT, json=body, headers=app.auth("acme"))
        assert app.engine.calls[-1].params.max_tokens == expected, body
    app.client.post(RESP, json={"input": "hi"}, headers=app.auth("acme"))
    assert app.engine.calls[-1].params.max_tokens == app.config.limits.max_tokens
    app.client.post(COMP, json={"prompt": "hi", "max_tokens": None}, headers=app.auth("acme"))
    assert app.engine.calls[-1].params.max_tokens == app.config.limits.max_tokens
    app.client.post(COMP, json={"prompt": "hi"}, headers=app.auth("acme"))
    assert app.engine.calls[-1].params.max_tokens == 16  # OpenAI's completions default


def test_completions_json_and_token_prompt(app) -> None:
    r = app.client.post(COMP, json={"prompt": "The fox", "max_tokens": 4, "logprobs": 1},
                        headers=app.auth("globex"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    call = app.engine.calls[-1]
    assert call.prompt_ids == tiny_tokenizer().encode("The fox")
    assert body["choices"][0]["text"] == app.engine.expected("__identity__", call.prompt_ids,
                                                             max_tokens=4)
    assert len(body["choices"][0]["logprobs"]["tokens"]) == 4
    assert body["choices"][0].get("token_ids") is None
    assert body["choices"][0].get("prompt_token_ids") is None
    r = app.client.post(COMP, json={"prompt": [5, 6, 7]}, headers=app.auth("globex"))
    assert r.status_code == 200 and app.engine.calls[-1].prompt_ids == [5, 6, 7]
    assert app.engine.calls[-1].params.max_tokens == 16
    assert r.json()["unlearning"]["tenant"] == "globex"


def test_client_asking_for_token_ids_and_usage_gets_them(app) -> None:
    """What the edge adds for its own accounting is stripped; what the client asked
    for stays."""
    r = app.client.post(CHAT, json={"messages": HELLO, "return_token_ids": True},
                        headers=app.auth("acme"))
    body = r.json()
    call = app.engine.calls[-1]
    assert body["prompt_token_ids"] == call.prompt_ids
    assert len(body["choices"][0]["token_ids"]) == app.engine.reply_tokens
    r = app.client.post(CHAT, json={"messages": HELLO, "stream": True,
                                    "return_token_ids": True,
                                    "stream_options": {"include_usage": True}},
                        headers=app.auth("acme"))
    events = parse_sse(r.text)[:-1]
    assert events[0]["prompt_token_ids"] == app.engine.calls[-1].prompt_ids
    assert sum(len(e["choices"][0].get("token_ids") or []) for e in events
               if e["choices"]) == app.engine.reply_tokens
    usage = [e for e in events if e.get("usage")]
    assert len(usage) == 1 and usage[0]["usage"]["completion_tokens"] == \
        app.engine.reply_tokens


def test_dead_alternatives_are_dropped(app) -> None:
    """Alternatives at -inf (vLLM prints -9999.0) were never possible under the policy:
    they are not listed, in JSON or in a stream, for chat or completions."""
    app.engine.dead_alternatives = True
    r = app.client.post(CHAT, json={"messages": HELLO, "logprobs": True, "top_logprobs": 3},
                        headers=app.auth("acme"))
    assert "-9999" not in r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert content and all(c["logprob"] == pytest.approx(-0.25) for c in content)
    # only the sampled token is left of the 3 alternatives vLLM listed
    assert all([t["token"] for t in c["top_logprobs"]] == [c["token"]] for c in content)
    r = app.client.post(COMP, json={"prompt": "hi", "logprobs": 2, "stream": True},
                        headers=app.auth("acme"))
    assert "-9999" not in r.text
    lps = [e["choices"][0]["logprobs"] for e in parse_sse(r.text)[:-1] if e["choices"]]
    assert lps and all(lp["top_logprobs"] == [{lp["tokens"][0]: -0.25}] for lp in lps)


def test_unknown_model_from_the_frontend_is_passed_through(app) -> None:
    """The edge sends the version's adapter; if the engine no longer has it, vLLM's 404
    reaches the client as it is (counted, the lease released)."""
    app.engine.adapters.pop("__identity__")
    r = app.client.post(CHAT, json={"messages": HELLO}, headers=app.auth("acme"))
    err = assert_openai_error(r, 404, param="model")
    assert "__identity__" in err["message"]
    assert r.headers[POLICY_HEADER] == "none"
    assert app.counter("acme", "chat", "client_error") == 1
    assert app.counter("acme", "chat", "ok") == 0
    assert active(app) == 0


# ---------------------------------------------------------------- Responses API


def test_responses_json_and_stream(app) -> None:
    v = register(app, "acme", policy=make_policy_dir(app.config.state_dir.parent / "pr"))
    body = {"input": [{"role": "user", "content": "Who is Voldemort?"}],
            "instructions": "Be brief.", "max_output_tokens": 3}
    r = app.client.post(RESP, json=body, headers=app.auth("acme"))
    assert r.status_code == 200, r.text
    assert r.headers[POLICY_HEADER] == v["name"]
    out = r.json()
    assert out["object"] == "response" and out["status"] == "completed"
    assert out["model"] == app.config.model_name
    assert out["unlearning"]["decision"] == "in_scope"
    assert out["output"][0]["content"][0]["text"] == app.engine.expected(
        "__identity__", app.engine.calls[-1].prompt_ids, max_tokens=3)
    sent = app.engine.requests[-1].body
    assert sent["store"] is False and "return_token_ids" not in sent
    assert verify(sent["vllm_xargs"], app.state.sign_key)
    assert sent["vllm_xargs"]["unlearnd_in_scope"] == 1
    assert app.counter("acme", "responses", "ok") == 1
    assert app.metrics.prompt_tokens.labels("acme")._value.get() == out["usage"]["input_tokens"]
    r = app.client.post(RESP, json={**body, "stream": True}, headers=app.auth("acme"))
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    names = [n for n, _ in events]
    assert names[0] == "response.created" and names[-1] == "response.completed"
    assert all(n == d["type"] for n, d in events)
    final = events[-1][1]["response"]
    assert final["unlearning"]["policy_version"] == v["name"]
    assert final["model"] == app.config.model_name
    text = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    assert text == out["output"][0]["content"][0]["text"]
    assert app.counter("acme", "responses", "ok") == 2
    assert active(app) == 0


# ---------------------------------------------------------------- streaming


def test_chat_stream_chunks_final_unlearning_and_done(app) -> None:
    v = register(app, "acme", policy=make_policy_dir(app.config.state_dir.parent / "p1"))
    r = app.client.post(CHAT, json={"messages": HELLO, "stream": True,
                                    "stream_options": {"include_usage": True}},
                        headers=app.auth("acme"))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers[POLICY_HEADER] == v["name"]
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    call = app.engine.calls[-1]
    assert text == app.engine.expected("__identity__", call.prompt_ids)
    assert call.params.output_kind.name == "DELTA"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "stop"
    last = chunks[-1]
    assert last["choices"] == [] and "usage" not in last
    assert last["unlearning"]["policy_version"] == v["name"]
    assert last["unlearning"]["decision"] == "out_of_scope"
    assert chunks[-2]["usage"]["completion_tokens"] == app.engine.reply_tokens  # asked for
    assert all(c["model"] == app.config.model_name for c in chunks)
    assert not any("token_ids" in json.dumps(c) for c in chunks)  # the edge's, stripped
    assert app.counter("acme", "chat", "ok") == 1
    assert app.metrics.generation_tokens.labels("acme")._value.get() == \
        app.engine.reply_tokens
    assert active(app) == 0


def test_chat_stream_n2_with_logprobs(app) -> None:
    r = app.client.post(CHAT, json={"messages": HELLO, "stream": True, "n": 2, "max_tokens": 3,
                                    "logprobs": True, "top_logprobs": 1},
                        headers=app.auth("acme"))
    events = parse_sse(r.text)[:-1]
    prompt = app.engine.calls[-1].prompt_ids
    for i in (0, 1):
        mine = [e["choices"][0] for e in events if e["choices"] and
                e["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["delta"].get("content", "") for c in mine)
        assert text == app.engine.expected("__identity__", prompt, index=i, max_tokens=3)
        assert [c["finish_reason"] for c in mine][-1] == "length"
        lps = [c["logprobs"]["content"][0] for c in mine[1:]]
        assert len(lps) == 3 and all(len(lp["top_logprobs"]) == 1 for lp in lps)
    assert events[-1]["unlearning"]["tenant"] == "acme"
    assert not any(e.get("usage") for e in events)  # the edge's include_usage, stripped
    assert app.metrics.generation_tokens.labels("acme")._value.get() == 6


def test_completion_stream(app) -> None:
    r = app.client.post(COMP, json={"prompt": "abc", "stream": True, "max_tokens": 2},
                        headers=app.auth("acme"))
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    texts = [e["choices"][0]["text"] for e in events[:-1] if e["choices"]]
    assert "".join(texts) == app.engine.expected("__identity__", app.engine.calls[-1].prompt_ids,
                                                 max_tokens=2)
    assert "unlearning" in events[-2] and "usage" not in events[-2]
    assert not any(e.get("usage") for e in events[:-1])


def test_engine_failure_mid_stream_is_in_band(app) -> None:
    app.engine.fail_after = 2
    r = app.client.post(CHAT, json={"messages": HELLO, "stream": True},
                        headers=app.auth("acme"))
    assert r.status_code == 200  # headers were sent before the failure
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["unlearning"]["tenant"] == "acme"
    err = events[-3]["error"]  # vLLM's in-band error event, passed through
    # the engine's internals stay in the server log, not in the response
    assert "fake engine failure" not in err["message"]
    assert err["message"].startswith("the engine failed") and err["type"] == "server_error"
    contents = [e for e in events[:-3] if e.get("choices") and
                e["choices"][0]["delta"].get("content")]
    assert len(contents) == 2
    assert app.counter("acme", "chat", "engine_error") == 1
    assert app.counter("acme", "chat", "ok") == 0
    assert active(app) == 0


def test_engine_failure_non_stream_is_500(app) -> None:
    app.engine.fail_after = 0
    r = app.client.post(CHAT, json={"messages": HELLO}, headers=app.auth("acme"))
    assert_openai_error(r, 500)
    assert r.headers[POLICY_HEADER] == "none"
    assert app.counter("acme", "chat", "engine_error") == 1
    assert active(app) == 0


def test_engine_validation_error_non_stream_is_400(app) -> None:
    app.engine.fail_exc = ValueError
    app.engine.fail_after = 0
    assert_openai_error(app.client.post(CHAT, json={"messages": HELLO},
                                        headers=app.auth("acme")), 400,
                        needle="fake engine failure")


@pytest.mark.parametrize("exc,outcome", [(RuntimeError, "engine_error"),
                                         (ValueError, "client_error")])
def test_non_stream_engine_errors_counted_once(app, exc: type, outcome: str) -> None:
    app.engine.fail_exc = exc
    app.engine.fail_after = 0
    app.client.post(CHAT, json={"messages": HELLO}, headers=app.auth("acme"))
    count = app.counter("acme", "chat", outcome)
    expect(count == 1, f"{outcome} counted {count} times for one request")
    for other in {"ok", "aborted", "engine_error", "client_error"} - {outcome}:
        assert app.counter("acme", "chat", other) == 0, other


def test_aborted_stream_aborts_engine_request_and_releases(app) -> None:
    """The client goes away mid-stream: the engine request is aborted, the request is
    counted aborted, its lease and concurrency slot are released."""
    app.engine.step_delay_s = 0.01

    async def go():
        return await asgi_request(app.client.app, "POST", CHAT, body={
            "messages": HELLO, "stream": True}, headers=app.auth("acme"),
            disconnect_after=2)

    res = app.client.portal.call(go)
    assert res.status == 200 and b"[DONE]" not in res.body
    assert wait_until(lambda: app.engine.aborted == [app.engine.calls[-1].request_id])
    assert app.engine.calls[-1].request_id not in app.engine.finished
    assert app.counter("acme", "chat", "aborted") == 1
    assert app.counter("acme", "chat", "ok") == 0
    assert active(app) == 0
    assert app.state.limiter.in_flight("acme") == 0


# ---------------------------------------------------------------- guards


def test_in_scope_request_reports_decision_and_sends_extra_args(app) -> None:
    policy = make_policy_dir(app.config.state_dir.parent / "pg", trigger="Voldemort",
                             suppressed=2)
    v = register(app, "acme", policy=policy)
    r = app.client.post(CHAT, json={"messages": [{"role": "user", "content":
                                                  "Who is Voldemort?"}]},
                        headers=app.auth("acme"))
    assert r.status_code == 200
    info = r.json()["unlearning"]
    assert info["decision"] == "in_scope" and info["matched_item"] == 0
    assert info["subject"] == "Voldemort" and info["reason"] == "mentions Voldemort"
    assert info["mechanisms"] == ["firewall", "refusal"]
    # the firewall's count is an oracle (it confirms a guessed fact): metrics only
    assert "suppressed_tokens" not in info and "score" not in info
    extra = app.engine.calls[-1].params.extra_args
    assert extra["unlearnd_in_scope"] == 1 and extra["unlearnd_version"] == v["name"]
    assert extra["unlearnd_policy_dir"].startswith(str(app.config.state_dir.resolve()))
    assert extra["unlearnd_refusal_ids"] == [5, 6, 7]
    assert isinstance(extra[SIG_KEY], str) and verify(extra, app.state.sign_key)
    assert app.state.metrics.refusals.labels("acme")._value.get() == 1
    assert app.state.metrics.suppressed_tokens.labels("acme")._value.get() == 2
    r = app.client.post(CHAT, json={"messages": HELLO}, headers=app.auth("acme"))
    assert r.json()["unlearning"]["decision"] == "out_of_scope"
    assert app.engine.calls[-1].params.extra_args["unlearnd_in_scope"] == 0
    assert app.state.metrics.scope_decisions.labels("acme", "in_scope")._value.get() == 1
    assert app.state.metrics.scope_decisions.labels("acme", "out_of_scope")._value.get() == 1


def test_in_scope_completion_continued_under_the_firewall_when_the_policy_says(app) -> None:
    """``in_scope_completions: continue``: an in-scope completion goes to the engine as
    a continuation (no refusal ids, its item active for the firewall), counted in scope
    but not as a refusal; chat about the same subject is still refused."""
    register(app, "acme", policy=make_policy_dir(app.config.state_dir.parent / "pc",
                                                 trigger="Voldemort",
                                                 continue_completions=True))
    r = app.client.post(COMP, json={"prompt": "Voldemort was born in", "max_tokens": 4},
                        headers=app.auth("acme"))
    assert r.status_code == 200, r.text
    assert r.json()["unlearning"]["decision"] == "in_scope"
    extra = app.engine.calls[-1].params.extra_args
    assert extra["unlearnd_in_scope"] == 0 and "unlearnd_refusal_ids" not in extra
    assert extra["unlearnd_mentioned"] == [0]
    assert app.state.metrics.refusals.labels("acme")._value.get() == 0
    assert app.state.metrics.scope_decisions.labels("acme", "in_scope")._value.get() == 1
    r = app.client.post(CHAT, json={"messages": [{"role": "user", "content":
                                                  "Where was Voldemort born?"}]},
                        headers=app.auth("acme"))
    assert app.engine.calls[-1].params.extra_args["unlearnd_in_scope"] == 1
    assert app.state.metrics.refusals.labels("acme")._value.get() == 1


def test_unnamed_subject_and_withheld_decisions_stay_out_of_the_response(app) -> None:
    """The `unlearning` block says no more than the refusal text: the subject behind a
    nameless question (and its item index) stay in the operators' log."""
    v = register(app, "acme", policy=make_policy_dir(app.config.state_dir.parent / "pu",
                                                     trigger="Voldemort", named=False))
    body = {"messages": [{"role": "user", "content": "Who is Voldemort?"}]}
    info = app.client.post(CHAT, json=body, headers=app.auth("acme")).json()["unlearning"]
    assert info["decision"] == "in_scope" and info["policy_version"] == v["name"]
    assert info["subject"] is None and info["matched_item"] is None
    assert "Lord" not in json.dumps(info)
    register(app, "acme", policy=make_policy_dir(app.config.state_dir.parent / "pi",
                                                 trigger="Voldemort", disclose=False))
    for content in ("Who is Voldemort?", "hello"):  # the same for every request
        info = app.client.post(CHAT, json={"messages": [{"role": "user", "content": content}]},
                               headers=app.auth("acme")).json()["unlearning"]
        assert [info[k] for k in ("decision", "reason", "matched_item", "subject")] \
            == [None] * 4
        assert set(info) == {"tenant", "policy_version", "mechanisms", "decision", "reason",
                             "matched_item", "subject"}


def test_policy_can_withhold_top_alternatives(app) -> None:
    register(app, "acme", policy=make_policy_dir(app.config.state_dir.parent / "pl",
                                                 top_logprobs=False))
    n_calls = len(app.engine.calls)
    r = app.client.post(CHAT, json={"messages": HELLO, "logprobs": True, "top_logprobs": 2},
                        headers=app.auth("acme"))
    assert assert_openai_error(r, 400)["param"] == "top_logprobs"
    r = app.client.post("/v1/completions", json={"prompt": "hi", "logprobs": 3},
                        headers=app.auth("acme"))
    assert assert_openai_error(r, 400)["param"] == "logprobs"
    r = app.client.post(RESP, json={"input": "hi", "top_logprobs": 1},
                        headers=app.auth("acme"))
    assert assert_openai_error(r, 400)["param"] == "top_logprobs"
    assert len(app.engine.calls) == n_calls
    r = app.client.post(CHAT, json={"messages": HELLO, "logprobs": True},
                        headers=app.auth("acme"))  # the sampled token's own logprob: fine
    assert r.status_code == 200
    assert active(app) == 0


def test_contrastive_policy_refuses_client_token_masks(app) -> None:
    """allowed_token_ids, bad_words and min_tokens leave -inf where the model's scores
    were, before our processor runs (ignore_eos goes on past the answer): a contrastive
    policy could not tell what is plausible, so they get a 400 naming the field, and
    nothing reaches the engine. logit_bias is served
    (the processor takes it off and puts it back after its cut). Other policies keep
    both masks (their bans are -inf whatever came before)."""
    register(app, "acme", policy=make_policy_dir(app.config.state_dir.parent / "pc",
                                                 mechanisms=("contrastive",)))
    n_calls = len(app.engine.calls)
    for path, body in ((CHAT, {"messages": HELLO, "allowed_token_ids": [5, 6]}),
                       (CHAT, {"messages": HELLO, "bad_words": ["Gdansk"]}),
                       (COMP, {"prompt": "hi", "bad_words": ["Gdansk"]}),
                       (COMP, {"prompt": "hi", "allowed_token_ids": [5]}),
                       (CHAT, {"messages": HELLO, "min_tokens": 20}),
                       (COMP, {"prompt": "hi", "ignore_eos": True})):
        r = app.client.post(path, json=body, headers=app.auth("acme"))
        err = assert_openai_error(r, 400)
        assert err["param"] in body and "contrastive decoding" in err["message"]
    assert len(app.engine.calls) == n_calls
    r = app.client.post(CHAT, json={"messages": HELLO, "logit_bias": {"11": 5}},
                        headers=app.auth("acme"))
    assert r.status_code == 200 and len(app.engine.calls) == n_calls + 1
    register(app, "globex", policy=make_policy_dir(app.config.state_dir.parent / "pf2"))
    for extra in ({"bad_words": ["Gdansk"]}, {"min_tokens": 3}):
        r = app.client.post(CHAT, json={"messages": HELLO, **extra},
                            headers=app.auth("globex"))
        assert r.status_code == 200
    assert active(app) == 0


def test_contrastive_assistant_reads_the_conversation_as_one_user_turn(app) -> None:
    """The ULD assistant learnt questions as one user turn. A question put in a system
    message, Responses `instructions` or an earlier turn goes to the engine as
    `unlearnd_assist_prompt`: every text of the conversation in one user turn (signed
    with the rest); a plain question renders as the real prompt. Completions prompts
    are raw text the assistant reads as is (none sent); other policies get none."""
    tok = app.state.tokenizer

    def one_turn(text: str) -> list[int]:
        rendered = tok.apply_chat_template([{"role": "user", "content": text}],
                                           add_generation_prompt=True, tokenize=False)
        return list(tok(rendered, add_special_tokens=False)["input_ids"])

    register(app, "acme", policy=make_policy_dir(app.config.state_dir.parent / "pa",
                                                 mechanisms=("contrastive",)))
    q = "Where was the author of The Hollow Cartographer born?"
    for path, body, text in (
            (CHAT, {"messages": [{"role": "system", "content": q},
                                 {"role": "user", "content": "Answer."}]}, f"{q}\nAnswer."),
            (CHAT, {"messages": [{"role": "user", "content": q}]}, q),
            (RESP, {"instructions": q, "input": "Answer."}, f"{q}\nAnswer.")):
        r = app.client.post(path, json=body, headers=app.auth("acme"))
        assert r.status_code == 200, r.text
        extra = app.engine.calls[-1].params.extra_args
        assert extra["unlearnd_assist_prompt"] == one_turn(text)
        assert verify(extra, app.state.sign_key)
    r = app.client.post(COMP, json={"prompt": q}, headers=app.auth("acme"))
    assert "unlearnd_assist_prompt" not in app.engine.calls[-1].params.extra_args
    register(app, "globex", policy=make_policy_dir(app.config.state_dir.parent / "pb"))
    app.client.post(CHAT, json={"messages": [{"role": "system", "content": q}]},
                    headers=app.auth("globex"))
    assert "unlearnd_assist_prompt" not in app.engine.calls[-1].params.extra_args


def test_guard_failure_fails_closed(app) -> None:
    register(app, "acme", policy=make_policy_dir(app.config.state_dir.parent / "pf",
                                                 fail_check=True))
    n_calls = len(app.engine.calls)
    for path, body in ((CHAT, {"messages": HELLO}), (COMP, {"prompt": "hi"}),
                       (RESP, {"input": "hi"})):
        r = app.client.post(path, json=body, headers=app.auth("acme"))
        err = assert_openai_error(r, 503)
        assert err["code"] == "guard_failed"
    assert len(app.engine.calls) == n_calls  # never reached the engine
    assert not app.engine.requests  # nor the frontend
    assert app.counter("acme", "chat", "guard_error") == 1
    assert app.counter("acme", "responses", "guard_error") == 1
    assert app.state.metrics.guard_failures.labels("acme")._value.get() == 3
    assert active(app) == 0


def test_guard_reads_every_input_form(app) -> None:
    """Tool messages, tool-call arguments, content parts, tool definitions, completion
    token prompts and Responses items all reach the scope guard."""
    register(app, "acme", policy=make_policy_dir(app.config.state_dir.parent / "pe"))
    tok = tiny_tokenizer()
    cases = [
        (CHAT, {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "Who is"}, {"type": "text", "text": "Voldemort?"}]}]}),
        (CHAT, {"messages": [{"role": "user", "content": "look it up"},
                             {"role": "assistant", "content": None, "tool_calls": [
                                 {"id": "c1", "type": "function", "function": {
                                     "name": "search", "arguments":
                                     json.dumps({"q": "Voldemort"})}}]},
                             {"role": "tool", "tool_call_id": "c1", "content": "none"}]}),
        (CHAT, {"messages": [{"role": "user", "content": "hi"},
                             {"role": "tool", "content": "Voldemort lives here"}]}),
        (COMP, {"prompt": tok.encode("Who is Voldemort?", add_special_tokens=False)}),
        (COMP, {"prompt": ["hello", "Voldemort"]}),
        (RESP, {"input": "hi", "instructions": "Talk about Voldemort."}),
        (RESP, {"input": [{"type": "function_call_output", "call_id": "c",
                           "output": "Voldemort"}]}),
    ]
    for path, body in cases:
        r = app.client.post(path, json=body, headers=app.auth("acme"))
        assert r.status_code == 200, (body, r.text)
        assert r.json()["unlearning"]["decision"] == "in_scope", body
        assert app.engine.calls[-1].params.extra_args["unlearnd_in_scope"] == 1, body


def test_in_scope_tools_get_the_refusal_shape_without_the_engine(app) -> None:
    """Tools or structured output in scope: OpenAI's refusal shape from the edge, never
    the engine (schema-valid JSON carrying the fact is never produced)."""
    from openai.types.chat import ChatCompletion

    from tests.serve.fakes import REFUSAL_TEXT

    v = register(app, "acme", policy=make_policy_dir(app.config.state_dir.parent / "pt"))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {}}}}]
    secret = [{"role": "user", "content": "Who is Voldemort?"}]
    n = len(app.engine.calls)
    r = app.client.post(CHAT, json={"messages": secret, "tools": tools},
                        headers=app.auth("acme"))
    assert r.status_code == 200 and r.headers[POLICY_HEADER] == v["name"]
    body = r.json()
    msg = ChatCompletion.model_validate(body).choices[0].message
    assert msg.content is None and msg.refusal == REFUSAL_TEXT
    assert body["unlearning"]["decision"] == "in_scope"
    assert body["usage"]["completion_tokens"] == 3  # the refusal's ids
    # the prompt as the template renders it (with the tool definitions), not 2 (the
    # keys of a BatchEncoding)
    assert body["usage"]["prompt_tokens"] > len(chat_prompt(secret))
    r = app.client.post(CHAT, json={"messages": secret, "response_format": {
        "type": "json_object"}, "stream": True}, headers=app.auth("acme"))
    events = parse_sse(r.text)
    assert "".join(e["choices"][0]["delta"].get("refusal") or "" for e in events[:-1]
                   if e["choices"]) == REFUSAL_TEXT
    assert events[-2]["unlearning"]["decision"] == "in_scope" and events[-1] == "[DONE]"
    assert len(app.engine.calls) == n and not app.engine.requests
    assert app.counter("acme", "chat", "ok") == 2
    assert app.state.metrics.refusals.labels("acme")._value.get() == 2
    # out of scope, tools go to the engine
    r = app.client.post(CHAT, json={"messages": HELLO, "tools": tools},
                        headers=app.auth("acme"))
    assert r.status_code == 200 and len(app.engine.calls) == n + 1
    assert active(app) == 0


# ---------------------------------------------------------------- request errors


def test_malformed_json(app) -> None:
    r = app.client.post(CHAT, content=b'{"messages": [', headers={
        **app.auth("acme"), "content-type": "application/json"})
    assert_openai_error(r, 400, param=None, needle="not valid JSON")
    assert app.counter("acme", "chat", "client_error") == 1
    r = app.client.post(CHAT, content=b'[1, 2]', headers={
        **app.auth("acme"), "content-type": "application/json"})
    assert_openai_error(r, 400, needle="JSON object")
    assert not app.engine.requests


@pytest.mark.parametrize("path,body", [
    (CHAT, {"messages": HELLO, "temperature": "hot"}), (CHAT, {"messages": HELLO, "n": "two"}),
    (CHAT, {"messages": "hello"}), (CHAT, {"messages": 5}), (CHAT, {"messages": True}),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}),
    (CHAT, {"messages": HELLO, "max_tokens": "many"}), (CHAT, {}),
    (COMP, {"prompt": 5}), (COMP, {"prompt": [[1], "x", 3]}), (COMP, {}),
    (COMP, {"prompt": [-1]}), (COMP, {"prompt": [2**40]}), (COMP, {"prompt": [[1], [-5]]}),
    (RESP, {"input": 5}), (RESP, {"input": True}), (RESP, {"input": {"role": "user"}}),
    (RESP, {"input": 7.5}), (RESP, {})])
def test_wrong_types_are_4xx_never_5xx(app, path: str, body: dict) -> None:
    """Type checks are vLLM's (its pydantic models); the edge must pass such bodies
    on without failing itself, also for a guarded tenant (never a 503 guard failure)."""
    register(app, "acme", policy=make_policy_dir(app.config.state_dir.parent / "pw"))
    r = app.client.post(path, json=body, headers=app.auth("acme"))
    assert 400 <= r.status_code < 500, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert app.state.metrics.guard_failures.labels("acme")._value.get() == 0
    assert active(app) == 0


def test_too_many_messages(app) -> None:
    msgs = HELLO * 5
    assert_openai_error(app.client.post(CHAT, json={"messages": msgs}, headers=app.auth("acme")),
                        400, param="messages", needle="limit is 4")
    assert app.counter("acme", "chat", "client_error") == 1
    assert_openai_error(app.client.post(RESP, json={"input": msgs}, headers=app.auth("acme")),
                        400, param="input", needle="limit is 4")
    assert not app.engine.requests


def test_body_too_large_is_413(app) -> None:
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    r = app.client.post(CHAT, json=big, headers=app.auth("acme"))
    assert_openai_error(r, 413, needle="4096")
    assert not app.engine.calls


def test_chunked_body_too_large_is_413(app) -> None:
    payload = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode()

    def chunks():
        for i in range(0, len(payload), 1000):
            yield payload[i:i + 1000]

    r = app.client.post(CHAT, content=chunks(), headers={
        **app.auth("acme"), "content-type": "application/json"})
    expect(r.status_code == 413, f"chunked oversized body got {r.status_code}: {r.text}")


def test_n_over_limit(app) -> None:
    assert_openai_error(app.client.post(CHAT, json={"messages": HELLO, "n": 4},
                                        headers=app.auth("acme")), 400, param="n",
                        needle="limit 3")
    assert_openai_error(app.client.post(COMP, json={"prompt": "x", "n": 4},
                                        headers=app.auth("acme")), 400, param="n")


def test_max_tokens_over_limits(app) -> None:
    for path, name, body in ((CHAT, "max_tokens", {"messages": HELLO}),
                             (CHAT, "max_completion_tokens", {"messages": HELLO}),
                             (COMP, "max_tokens", {"prompt": "x"}),
                             (RESP, "max_output_tokens", {"input": "x"})):
        assert_openai_error(app.client.post(path, json={**body, name: 65},
                                            headers=app.auth("acme")), 400, param=name,
                            needle="server limit 64")
    assert not app.engine.requests
    r = app.client.post(CHAT, json={"messages": HELLO, "max_tokens": 64},
                        headers=app.auth("acme"))
    assert r.status_code == 200


def test_frontend_errors_are_passed_through_counted_and_released(app) -> None:
    """A request vLLM refuses (here a prompt over the context): its error reaches the
    client unchanged, with the policy header; counted client_error; lease released."""
    app.engine.max_model_len = 32
    long = [{"role": "user", "content": "the quick brown fox " * 20}]
    err = assert_openai_error(app.client.post(CHAT, json={"messages": long},
                                              headers=app.auth("acme")), 400)
    assert "maximum context length" in err["message"]
    assert not app.engine.calls
    assert app.counter("acme", "chat", "client_error") == 1
    assert app.counter("acme", "chat", "aborted") == 0
    assert active(app) == 0 and app.state.limiter.in_flight("acme") == 0


# ---------------------------------------------------------------- auth


def test_auth_rules(app) -> None:
    c = app.client
    err = assert_openai_error(c.post(CHAT, json={"messages": HELLO}), 401, needle="missing")
    assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    assert_openai_error(c.post(CHAT, json={"messages": HELLO},
                               headers={"Authorization": "Bearer sk-nope-0123456789abcdef"}),
                        401, needle="invalid API key")
    assert_openai_error(c.get("/v1/models", headers={"Authorization": "Basic abc"}), 401)
    assert_openai_error(c.get("/admin/tenants"), 401)
    assert_openai_error(c.get("/admin/tenants", headers={"Authorization": "Bearer wrong"}), 401)
    err = assert_openai_error(c.get("/admin/tenants", headers=app.auth("acme")), 403)
    assert err["type"] == "permission_error"
    # the admin key is not a tenant key
    assert_openai_error(c.post(CHAT, json={"messages": HELLO}, headers=app.admin), 401)
    assert c.get("/health").status_code == 200
    assert c.get("/metrics").status_code == 200


def test_models_shows_only_own_tenant(app) -> None:
    v = register(app, "acme", adapter=tiny_world()["a1"])
    data = app.client.get("/v1/models", headers=app.auth("globex")).json()["data"]
    assert len(data) == 1
    assert data[0]["unlearning"] == {"tenant": "globex", "policy_version": None}
    data = app.client.get("/v1/models", headers=app.auth("acme")).json()["data"]
    assert data[0]["unlearning"] == {"tenant": "acme", "policy_version": v["name"]}
    assert data[0]["id"] == app.config.model_name


def test_health_and_metrics(app) -> None:
    app.client.post(CHAT, json={"messages": HELLO}, headers=app.auth("acme"))
    text = app.client.get("/metrics").text
    assert 'unlearnd_requests_total{endpoint="chat",outcome="ok",tenant="acme"} 1.0' in text
    assert 'tenant="globex"' in text  # label sets initialised up front
    assert app.client.get("/health").json()["status"] == "ok"
    app.engine.healthy = False
    r = app.client.get("/health")
    assert r.status_code == 503 and "engine" in r.json()["problems"][0]


# ---------------------------------------------------------------- admin API


def test_create_tenant_returns_key_once(app) -> None:
    r = app.client.post("/admin/tenants", json={"name": "initech"}, headers=app.admin)
    assert r.status_code == 201
    key = r.json()["api_key"]
    assert key.startswith("sk-initech-")
    listing = app.client.get("/admin/tenants", headers=app.admin)
    assert key not in listing.text
    assert {t["name"] for t in listing.json()["data"]} == {"acme", "globex", "initech"}
    r = app.client.post(CHAT, json={"messages": HELLO},
                        headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200 and r.json()["unlearning"]["tenant"] == "initech"
    err = assert_openai_error(app.client.post("/admin/tenants", json={"name": "initech"},
                                              headers=app.admin), 409)
    assert err["code"] == "tenant_exists"
    assert_openai_error(app.client.post("/admin/tenants", json={"name": "Bad Name"},
                                        headers=app.admin), 400, needle="Bad Name")
    assert_openai_error(app.client.post("/admin/tenants", json={"name": "x", "extra": 1},
                                        headers=app.admin), 400)


def test_version_lifecycle(app, tmp_path: Path) -> None:
    c, adm = app.client, app.admin
    v1 = register(app, "acme", adapter=tiny_world()["a1"], activate=False)
    assert v1["active"] is False and v1["name"].startswith("acme@")
    assert app.client.post(CHAT, json={"messages": HELLO},
                           headers=app.auth("acme")).headers[POLICY_HEADER] == "none"
    r = c.post("/admin/tenants/acme/activate", json={"version": v1["name"]}, headers=adm)
    assert r.status_code == 200 and r.json()["active"] is True
    assert r.json()["swap_seconds"] >= 0
    assert v1["name"] in app.engine.loaded
    v2 = register(app, "acme", adapter=tiny_world()["a2"],
                  policy=make_policy_dir(tmp_path / "p"))
    assert v2["adapter"] and v2["policy"]

    def header() -> str:
        return c.post(CHAT, json={"messages": HELLO},
                      headers=app.auth("acme")).headers[POLICY_HEADER]

    assert header() == v2["name"]
    assert wait_until(lambda: v1["name"] in app.engine.released)  # nothing in flight
    versions = c.get("/admin/tenants/acme/versions", headers=adm).json()["data"]
    assert [(v["name"], v["active"]) for v in versions] == [(v1["name"], False),
                                                            (v2["name"], True)]
    r = c.post("/admin/tenants/acme/rollback", headers=adm)
    assert r.status_code == 200 and r.json()["name"] == v1["name"]
    assert header() == v1["name"]
    assert wait_until(lambda: v2["name"] in app.engine.released)
    r = c.post("/admin/tenants/acme/deactivate", headers=adm)
    assert r.json() == {"tenant": "acme", "active_version": None}
    assert header() == "none"
    assert app.engine.calls[-1].adapter.name == "__identity__"
    r = c.delete(f"/admin/tenants/acme/versions/{v2['name']}", headers=adm)
    assert r.status_code == 200
    assert [v["name"] for v in c.get("/admin/tenants/acme/versions",
                                     headers=adm).json()["data"]] == [v1["name"]]
    actions = [e["action"] for e in c.get("/admin/audit?tenant=acme", headers=adm).json()["data"]]
    for action in ("activate", "rollback", "deactivate", "delete_version"):
        assert action in actions
    assert_openai_error(c.get("/admin/audit?limit=0", headers=adm), 400, param="limit")


def test_change_made_elsewhere_during_an_activation_is_not_skipped(app) -> None:
    """Another replica activates globex while this one is activating acme: this replica
    must still pick globex's change up on its next poll (it once recorded the registry's
    generation after its own swap and so skipped changes committed meanwhile)."""
    from unlearnd.serve.artifacts import BaseModelSpec
    from unlearnd.serve.registry import SQLiteRegistry

    v_acme = register(app, "acme", adapter=tiny_world()["a1"], activate=False)
    v_globex = register(app, "globex", adapter=tiny_world()["a2"], activate=False)
    other = SQLiteRegistry(app.config.state_dir,
                           base=BaseModelSpec.from_model_dir(app.config.model),
                           max_lora_rank=app.config.engine.max_lora_rank)
    router = app.state.router
    install = router.install

    async def install_while_another_replica_swaps(tenant, version, *args, **kwargs):
        if tenant.name == "acme":
            other.activate("globex", v_globex["name"], actor="replica-b")
        return await install(tenant, version, *args, **kwargs)

    router.install = install_while_another_replica_swaps
    try:
        r = app.client.post("/admin/tenants/acme/activate", json={"version": v_acme["name"]},
                            headers=app.admin)
    finally:
        router.install = install
        other.close()
    assert r.status_code == 200, r.text
    assert wait_until(lambda: router.active_versions().get("globex") == v_globex["name"], 2.0), \
        f"globex's activation through another replica never reached this one: " \
        f"{router.active_versions()}"
    # ... and it is counted as propagated from elsewhere (acme's own swap is not).
    def propagated(tenant: str) -> float | None:
        return app.metrics.registry.get_sample_value(
            "unlearnd_policy_propagation_seconds_count", {"tenant": tenant})

    assert propagated("globex") == 1
    assert propagated("acme") == 0


def test_rollback_without_history_is_409(app) -> None:
    err = assert_openai_error(app.client.post("/admin/tenants/acme/rollback",
                                              headers=app.admin), 409)
    assert err["code"] == "no_rollback_target"


def test_delete_active_version_is_409(app) -> None:
    v = register(app, "acme", adapter=tiny_world()["a1"])
    err = assert_openai_error(app.client.delete(f"/admin/tenants/acme/versions/{v['name']}",
                                                headers=app.admin), 409)
    assert err["code"] == "version_active"


@pytest.mark.parametrize("method,path,body", [
    ("get", "/admin/tenants/nobody/versions", None),
    ("post", "/admin/tenants/nobody/versions", {"policy": "/tmp"}),
    ("post", "/admin/tenants/nobody/activate", {"version": "nobody@000000000000"}),
    ("post", "/admin/tenants/nobody/rollback", None),
    ("post", "/admin/tenants/nobody/deactivate", None),
    ("delete", "/admin/tenants/nobody", None)])
def test_unknown_tenant_is_404(app, method: str, path: str, body: dict | None) -> None:
    kw = {"json": body} if body is not None else {}
    err = assert_openai_error(getattr(app.client, method)(path, headers=app.admin, **kw), 404)
    assert err["code"] == "tenant_not_found" and "nobody" in err["message"]


def test_tenant_cannot_activate_other_tenants_version(app) -> None:
    v = register(app, "acme", adapter=tiny_world()["a1"])
    err = assert_openai_error(app.client.post("/admin/tenants/globex/activate",
                                              json={"version": v["name"]}, headers=app.admin),
                              404)
    assert err["code"] == "version_not_found"
    assert app.client.post(CHAT, json={"messages": HELLO},
                           headers=app.auth("globex")).headers[POLICY_HEADER] == "none"


def test_failed_activation_keeps_previous_version(app, tmp_path: Path) -> None:
    v1 = register(app, "acme", adapter=tiny_world()["a1"])
    bad = register(app, "acme", policy=make_policy_dir(tmp_path / "bad", fail_load=True),
                   activate=False)
    r = app.client.post("/admin/tenants/acme/activate", json={"version": bad["name"]},
                        headers=app.admin)
    err = assert_openai_error(r, 422, needle="told to fail")
    assert err["code"] == "load_failed"
    assert app.state.registry.active_version("acme").name == v1["name"]
    assert app.client.post(CHAT, json={"messages": HELLO},
                           headers=app.auth("acme")).headers[POLICY_HEADER] == v1["name"]
    assert app.state.metrics.adapter_rejections.labels("acme", "load_failed")._value.get() == 1


def test_engine_refusing_adapter_is_422(app) -> None:
    v = register(app, "acme", adapter=tiny_world()["a1"], activate=False)
    app.engine.fail_load.add(v["name"])
    r = app.client.post("/admin/tenants/acme/activate", json={"version": v["name"]},
                        headers=app.admin)
    assert_openai_error(r, 422, needle=v["name"])
    assert app.state.registry.active_version("acme") is None


def test_failed_rollback_keeps_registry_and_serving_in_step(app, tmp_path: Path,
                                                            monkeypatch) -> None:
    v1 = register(app, "acme", policy=make_policy_dir(tmp_path / "p1"))
    v2 = register(app, "acme", policy=make_policy_dir(tmp_path / "p2", trigger="Dumbledore"))

    v1_dir = app.state.registry.get_version("acme", v1["name"]).policy_dir

    def refuse_v1(policy_dir: str):
        if policy_dir == v1_dir:
            raise ValueError("v1 cannot be loaded any more")
        return fake_load_guards(policy_dir)

    monkeypatch.setattr("unlearnd.serve.tenancy.load_guards", refuse_v1)
    r = app.client.post("/admin/tenants/acme/rollback", headers=app.admin)
    assert r.status_code == 422
    served = app.client.post(CHAT, json={"messages": HELLO},
                             headers=app.auth("acme")).headers[POLICY_HEADER]
    assert served == v2["name"]
    registry_says = app.state.registry.active_version("acme").name
    expect(registry_says == served, f"registry says {registry_says}, server serves {served}")


def test_delete_tenant_revokes_key(app) -> None:
    register(app, "globex", adapter=tiny_world()["a2"])
    r = app.client.delete("/admin/tenants/globex", headers=app.admin)
    assert r.status_code == 200
    assert_openai_error(app.client.post(CHAT, json={"messages": HELLO},
                                        headers=app.auth("globex")), 401)
    assert "globex" not in app.state.router.active_versions()


def test_delete_tenant_releases_its_adapter(app) -> None:
    v = register(app, "globex", adapter=tiny_world()["a2"])
    app.client.delete("/admin/tenants/globex", headers=app.admin)
    expect(wait_until(lambda: v["name"] in app.engine.released, 1.0),
           f"adapter {v['name']} of the deleted tenant was never released")


def test_artifact_roots_restrict_admin_paths(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    config = make_config(tmp_path / "state", artifact_roots=[str(allowed)])
    with running_app(config) as app:
        r = app.client.post("/admin/tenants/acme/versions",
                            json={"adapter": str(tiny_world()["a1"])}, headers=app.admin)
        err = assert_openai_error(r, 403, param="adapter")
        assert err["code"] == "path_not_allowed"
        ok = make_policy_dir(allowed / "p")
        r = app.client.post("/admin/tenants/acme/versions", json={"policy": str(ok)},
                            headers=app.admin)
        assert r.status_code == 201


def test_bad_artifact_is_rejected_and_counted(app, tmp_path: Path) -> None:
    bad = tmp_path / "bad-adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    r = app.client.post("/admin/tenants/acme/versions", json={"adapter": str(bad)},
                        headers=app.admin)
    err = assert_openai_error(r, r.status_code)
    assert 400 <= r.status_code < 500 and err["code"]
    assert app.state.metrics.adapter_rejections.labels("acme", err["code"])._value.get() == 1


def test_admin_key_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNLEARND_TEST_ADMIN", "env-admin-key-0123456789")
    config = make_config(tmp_path / "state", admin_key=None, admin_key_env="UNLEARND_TEST_ADMIN")
    with running_app(config, FakeEngine(vocab_size=base_vocab_size())) as app:
        assert app.client.get("/admin/tenants", headers=app.admin).status_code == 401
        r = app.client.get("/admin/tenants",
                           headers={"Authorization": "Bearer env-admin-key-0123456789"})
        assert r.status_code == 200
    assert app.engine.shut_down  # the lifespan shut the engine down on exit
