"""The tenant edge (unlearnd.serve.edge, and its use in unlearnd.serve.app): refused
fields and headers, limits, what the scope guard reads, response rewriting (JSON and
SSE), the refusal shape, the rewritten body, and the OpenAI error body (serve.errors).

Request-model validation that the hand-written protocol models used to do (ranges of
temperature / top_p / penalties / n, stop lists, logit_bias keys, roles, empty message
lists, SamplingParams conversion, the context-length check) is vLLM's own frontend's
now, on the real server (tests/e2e); the fake frontend does not stand in for it. What
is left at the edge is tested here.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest

from tests.serve.fakes import (
    CHAT,
    COMP,
    HELLO,
    POLICY_HEADER,
    RESP,
    make_config,
    make_policy_dir,
    parse_sse,
    running_app,
    sse_events,
    tiny_tokenizer,
)
from unlearnd.guards.signing import SIG_KEY, sign, verify
from unlearnd.serve import edge
from unlearnd.serve.errors import APIError, error_body

pytestmark = pytest.mark.usefixtures("fake_guards")

KEY = b"k" * 32
INFO = {"tenant": "acme", "policy_version": "acme@abc", "mechanisms": ["refusal"],
        "decision": "in_scope", "reason": "r", "matched_item": None, "subject": None}


def openai_error(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


# ================================================================ refused fields, headers

_REFUSED_PATH = {name: (CHAT, {"messages": HELLO}) for name in edge.REFUSED}
_REFUSED_PATH["prompt"] = (CHAT, {"messages": HELLO})  # a stored prompt outside completions
_REFUSED_PATH["previous_response_id"] = (RESP, {"input": "hi"})
_REFUSED_PATH["background"] = (RESP, {"input": "hi"})
_REFUSED_PATH["suffix"] = (COMP, {"prompt": "hi"})
_REFUSED_PATH["echo"] = (COMP, {"prompt": "hi"})


@pytest.mark.parametrize("name", sorted(edge.REFUSED))
def test_every_refused_field_is_400_naming_it(app, name: str) -> None:
    path, body = _REFUSED_PATH[name]
    value: Any = {"unlearnd_in_scope": 0} if name == "vllm_xargs" else "x"
    r = app.client.post(path, json={**body, name: value}, headers=app.auth("acme"))
    err = openai_error(r, 400)
    assert err["param"] == name and name in err["message"]
    assert err["type"] == "invalid_request_error"
    assert not app.engine.requests and not app.engine.calls
    kind = edge.GENERATE[path]
    assert app.counter("acme", kind, "client_error") == 1
    assert app.state.metrics.active_requests.labels("acme")._value.get() == 0


def test_refused_fields_on_every_generating_route(app) -> None:
    for path, body in ((CHAT, {"messages": HELLO}), (COMP, {"prompt": "hi"}),
                       (RESP, {"input": "hi"})):
        for name in ("vllm_xargs", "use_beam_search", "prompt_embeds", "request_id"):
            r = app.client.post(path, json={**body, name: {"a": 1}},
                                headers=app.auth("acme"))
            assert openai_error(r, 400)["param"] == name, (path, name)
    assert not app.engine.requests


def test_unset_values_of_refused_fields_pass(app) -> None:
    """OpenAI clients send defaults: null / false / 0 / empty count as not set."""
    r = app.client.post(CHAT, json={"messages": HELLO, "priority": 0, "echo": False,
                                    "prompt_logprobs": None, "vllm_xargs": {},
                                    "chat_template_kwargs": {}, "request_id": ""},
                        headers=app.auth("acme"))
    assert r.status_code == 200, r.text
    sent = app.engine.requests[-1].body
    assert verify(sent["vllm_xargs"], app.state.sign_key)  # the edge's, not the client's
    r = app.client.post(COMP, json={"prompt": "a completion prompt"},
                        headers=app.auth("acme"))
    assert r.status_code == 200  # `prompt` is the prompt there


@pytest.mark.parametrize("header", sorted(edge.REFUSED_HEADERS))
def test_every_refused_header_is_400_naming_it(app, header: str) -> None:
    r = app.client.post(CHAT, json={"messages": HELLO},
                        headers={**app.auth("acme"), header: "1"})
    err = openai_error(r, 400)
    assert err["param"] == header and header in err["message"]
    assert not app.engine.requests


def test_check_fields_limits() -> None:
    lim = {"max_messages": 2, "max_n": 3, "max_tokens": 10}
    edge.check_fields("chat", {"messages": [{}, {}], "n": 3, "max_tokens": 10}, **lim)
    edge.check_fields("chat", {"n": True, "max_tokens": "many", "messages": "x"}, **lim)
    for kind, body, param in [
            ("chat", {"messages": [{}] * 3}, "messages"),
            ("responses", {"input": [{}] * 3}, "input"),
            ("chat", {"n": 4}, "n"), ("completions", {"n": 4}, "n"),
            ("chat", {"max_tokens": 11}, "max_tokens"),
            ("chat", {"max_completion_tokens": 11}, "max_completion_tokens"),
            ("chat", {"max_completion_tokens": 10**30}, "max_completion_tokens"),
            ("responses", {"max_output_tokens": 11}, "max_output_tokens"),
            ("chat", {"prompt": "stored"}, "prompt"),
            ("responses", {"prompt": {"id": "p"}}, "prompt")]:
        with pytest.raises(APIError) as exc:
            edge.check_fields(kind, body, **lim)
        assert exc.value.status == 400 and exc.value.param == param, (kind, body)
    edge.check_fields("completions", {"prompt": "text"}, **lim)


def test_wants_alternatives_and_is_structured() -> None:
    assert edge.wants_alternatives("chat", {"logprobs": True, "top_logprobs": 2}) == \
        "top_logprobs"
    assert edge.wants_alternatives("chat", {"logprobs": True, "top_logprobs": 0}) is None
    assert edge.wants_alternatives("responses", {"top_logprobs": 1}) == "top_logprobs"
    assert edge.wants_alternatives("completions", {"logprobs": 1}) == "logprobs"
    assert edge.wants_alternatives("completions", {"logprobs": True}) is None
    assert edge.wants_alternatives("completions", {"logprobs": 0}) is None
    tools = [{"type": "function", "function": {"name": "f"}}]
    for body in ({"tools": tools}, {"response_format": {"type": "json_object"}},
                 {"response_format": {"type": "json_schema", "json_schema": {}}},
                 {"structured_outputs": {"regex": "a+"}}, {"tool_choice": "required"},
                 {"functions": tools}, {"response_format": {"type": "text"}, "tools": tools},
                 {"text": {"format": {"type": "json_schema", "schema": {}}}}):
        assert edge.is_structured("chat", body), body
    for body in ({}, {"response_format": {"type": "text"}}, {"tools": []},
                 {"text": {"format": {"type": "text"}}}, {"tool_choice": None}):
        assert not edge.is_structured("chat", body), body


# ================================================================ bodies the edge refuses


@pytest.fixture()
def roomy(tmp_path):
    """An app with room for a large body (64 KiB)."""
    with running_app(make_config(tmp_path / "state", limits={"max_body_bytes": 65536})) as a:
        yield a


def test_invalid_utf8_is_400(roomy) -> None:
    r = roomy.client.post(CHAT, content=b'{"messages": "\xff\xfe"}', headers={
        **roomy.auth("acme"), "content-type": "application/json"})
    err = openai_error(r, 400)
    assert "UTF-8" in err["message"] and err["type"] == "invalid_request_error"
    assert not roomy.engine.requests


def test_deeply_nested_json_is_400(roomy) -> None:
    deep = b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    r = roomy.client.post(CHAT, content=deep, headers={
        **roomy.auth("acme"), "content-type": "application/json"})
    err = openai_error(r, 400)
    assert "nests too deeply" in err["message"]
    assert not roomy.engine.requests
    assert roomy.client.post(CHAT, json={"messages": HELLO},
                             headers=roomy.auth("acme")).status_code == 200


def test_body_must_be_an_object(app) -> None:
    for raw in (b"[]", b'"x"', b"3", b"null", b""):
        r = app.client.post(COMP, content=raw, headers={
            **app.auth("acme"), "content-type": "application/json"})
        openai_error(r, 400)
    assert not app.engine.requests


# ================================================================ routes


@pytest.mark.parametrize("method,path", [
    ("POST", "/tokenize"), ("POST", "/detokenize"), ("POST", "/invocations"),
    ("POST", "/v1/messages"), ("POST", "/v1/chat/completions/batch"),
    ("POST", "/v1/chat/completions/render"), ("GET", "/v1/responses/resp_1"),
    ("POST", "/inference/v1/generate"), ("GET", "/version"), ("GET", "/ping"),
    ("POST", "/v1/embeddings"), ("GET", "/nowhere")])
def test_unknown_paths_are_404(app, method: str, path: str) -> None:
    for headers in (app.auth("acme"), {}):
        r = app.client.request(method, path, json={"prompt": "x"}, headers=headers)
        err = openai_error(r, 404)
        assert err["type"] == "not_found_error"
    assert not app.engine.requests


@pytest.mark.parametrize("path", sorted(edge.GENERATE))
def test_get_on_a_generating_route_is_405(app, path: str) -> None:
    r = app.client.get(path, headers=app.auth("acme"))
    err = openai_error(r, 405)
    assert r.headers["allow"] == "POST" and path in err["message"]
    assert not app.engine.requests


# ================================================================ what the guard reads


def _decode(ids: list[int]) -> str:
    return "<" + ",".join(map(str, ids)) + ">"


def test_conversation_chat() -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "description":
                                              "find the Dark Lord"}}]
    body = {"messages": [
        {"role": "developer", "content": "dev"},
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "image_url", "image_url": {"url": "u"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "lookup",
                                                         "arguments": '{"q": "x"}'}}]},
        {"role": "tool", "tool_call_id": "c", "content": "tool said"}, "junk"],
        "tools": tools, "response_format": {"type": "json_object"}}
    conv = edge.conversation("chat", body, _decode)
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "tool", "system"]
    assert conv[1]["content"][0]["text"] == "a"  # parts are left for the guard to read
    assert conv[2]["tool_calls"][0]["function"]["arguments"] == '{"q": "x"}'
    assert conv[3]["content"] == "tool said"
    defs = json.loads(conv[-1]["content"])
    assert defs == {"tools": tools, "response_format": {"type": "json_object"}}
    assert edge.conversation("chat", {"messages": HELLO}, _decode) == HELLO
    for bad in ("hello", 5, None, True, {"role": "user"}):  # vLLM refuses these later
        assert edge.conversation("chat", {"messages": bad}, _decode) == []


def test_conversation_completions() -> None:
    def texts(prompt: Any) -> list[str]:
        return [m["content"] for m in edge.conversation("completions", {"prompt": prompt},
                                                        _decode)]

    assert texts("plain") == ["plain"]
    assert texts([1, 2, 3]) == ["<1,2,3>"]
    assert texts(["a", "b"]) == ["a", "b"]
    assert texts([[1, 2], [3]]) == ["<1,2>", "<3>"]
    assert texts(["a", [4], 5]) == ["a", "<4>"]
    assert texts(5) == [] and texts(None) == []
    conv = edge.conversation("completions", {"prompt": "p", "response_format": {
        "type": "json_schema", "json_schema": {"description": "secret"}}}, _decode)
    assert conv[0] == {"role": "user", "content": "p"}
    assert conv[1]["role"] == "system" and "secret" in conv[1]["content"]
    assert all(m["role"] == "user" for m in edge.conversation(
        "completions", {"prompt": ["a", "b"]}, _decode))


def test_conversation_completions_decodes_with_the_tokenizer() -> None:
    tok = tiny_tokenizer()
    ids = tok.encode("the fox", add_special_tokens=False)
    conv = edge.conversation("completions", {"prompt": ids}, tok.decode)
    assert conv == [{"role": "user", "content": "the fox"}]
    for bad in ([-1], [2**40], [[3], [-2]]):  # no tokenizer has these: a 400, not a 503
        with pytest.raises(APIError) as exc:
            edge.conversation("completions", {"prompt": bad}, tok.decode)
        assert exc.value.status == 400 and exc.value.param == "prompt"


def test_conversation_responses() -> None:
    body = {"instructions": "be terse", "input": [
        {"role": "user", "content": "q1"},
        {"type": "message", "role": "developer", "content": [
            {"type": "input_text", "text": "dev part"}]},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "a1"}, {"type": "refusal", "refusal": "no"}]},
        {"type": "function_call", "call_id": "c", "name": "lookup", "arguments": '{"q": 1}'},
        {"type": "function_call_output", "call_id": "c", "output": "result"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "thought"}]},
        7],
        "text": {"format": {"type": "json_schema", "name": "n", "schema": {}}}}
    conv = edge.conversation("responses", body, _decode)
    assert conv[0] == {"role": "system", "content": "be terse"}
    assert conv[1] == {"role": "user", "content": "q1"}
    assert conv[2] == {"role": "system", "content": "dev part"}
    assert conv[3] == {"role": "assistant", "content": "a1\nno"}
    assert conv[4]["role"] == "assistant" and conv[4]["tool_calls"] == [
        {"function": {"name": "lookup", "arguments": '{"q": 1}'}}]
    assert conv[5] == {"role": "tool", "content": "result"}
    assert conv[6]["role"] == "assistant" and "thought" in conv[6]["content"]
    assert conv[7]["role"] == "system" and "json_schema" in conv[7]["content"]
    assert edge.conversation("responses", {"input": "just text"}, _decode) == [
        {"role": "user", "content": "just text"}]
    for bad in (5, True, None, 7.5, {"role": "user"}):
        assert edge.conversation("responses", {"input": bad}, _decode) == []


# ================================================================ scrub


def test_scrub_chat_list_form() -> None:
    body = {"model": "acme@abc", "choices": [{"logprobs": {"content": [
        {"token": "a", "logprob": -0.1, "top_logprobs": [
            {"token": "a", "logprob": -0.1}, {"token": "b", "logprob": -9999.0},
            {"token": "c", "logprob": -10000.0}, {"token": "d", "logprob": -3.0}]}]}}]}
    out = edge.scrub(body, "served")
    assert out is body and body["model"] == "served"
    top = body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert [t["token"] for t in top] == ["a", "d"]
    assert body["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.1


def test_scrub_completions_dict_form_and_nested_models() -> None:
    body = {"model": "acme@abc", "choices": [{"logprobs": {
        "tokens": ["a"], "token_logprobs": [-9999.0],
        "top_logprobs": [{"a": -0.5, "b": -9999.0}, {"c": -9999.0}]}}],
        "response": {"model": "x", "output": [{"model": 3}]}}
    edge.scrub(body, "served")
    lp = body["choices"][0]["logprobs"]
    assert lp["top_logprobs"] == [{"a": -0.5}, {}]
    assert lp["token_logprobs"] == [-9999.0]  # the sampled token's own: left as is
    assert body["response"]["model"] == "served"
    assert body["response"]["output"][0]["model"] == 3  # not a name: untouched
    assert edge.scrub([{"model": "m"}], "s") == [{"model": "s"}]


# ================================================================ ResponseTap


class Sink:
    def __init__(self) -> None:
        self.messages: list[dict] = []

    async def __call__(self, message: dict) -> None:
        self.messages.append(message)

    @property
    def start(self) -> dict:
        return next(m for m in self.messages if m["type"] == "http.response.start")

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.start["headers"]}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages
                        if m["type"] == "http.response.body")


def run_tap(chunks: list[bytes], *, kind: str = "chat", status: int = 200,
            ctype: bytes = b"text/event-stream", strip_usage: bool = False,
            strip_ids: bool = False) -> tuple[edge.ResponseTap, Sink]:
    sink = Sink()
    tap = edge.ResponseTap(sink, kind=kind, model_name="served", version="acme@abc",
                           unlearning=INFO, strip_usage=strip_usage, strip_ids=strip_ids)

    async def go() -> None:
        await tap({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", ctype), (b"content-length", b"999")]})
        for i, c in enumerate(chunks):
            await tap({"type": "http.response.body", "body": c,
                       "more_body": i < len(chunks) - 1})

    asyncio.run(go())
    return tap, sink


def _chat_sse(usage_chunk: bool = True) -> bytes:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "acme@abc"}
    events = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}],
         "prompt_token_ids": [1, 2, 3]},
        {**base, "choices": [{"index": 0, "delta": {"content": " héllo"}, "logprobs": {
            "content": [{"token": "h", "logprob": -0.1, "top_logprobs": [
                {"token": "h", "logprob": -0.1}, {"token": "x", "logprob": -9999.0}]}]},
            "finish_reason": None, "token_ids": [7]}]},
        {**base, "choices": [{"index": 0, "delta": {"content": " wörld"}, "logprobs": None,
                              "finish_reason": "stop", "token_ids": [8]}]}]
    if usage_chunk:
        events.append({**base, "choices": [], "usage": {
            "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
    return b"".join(edge.sse(e) for e in events) + b"data: [DONE]\n\n"


def _check_chat_stream(tap: edge.ResponseTap, sink: Sink, *, stripped: bool) -> None:
    assert tap.finished and not tap.stream_error
    assert sink.headers[POLICY_HEADER] == "acme@abc"
    assert "content-length" not in sink.headers
    events = parse_sse(sink.body.decode())
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["unlearning"] == INFO and last["choices"] == []
    assert last["id"] == "chatcmpl-1" and last["model"] == "served"
    assert all(e["model"] == "served" for e in events[:-1])
    assert "-9999" not in sink.body.decode()
    body_text = sink.body.decode()
    assert ("token_ids" in body_text) is not stripped
    assert any("usage" in e for e in events[:-1]) is not stripped
    assert tap.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert tap.prompt_ids == [1, 2, 3] and tap.output_ids == {0: [7, 8]}
    assert tap.first_token_t is not None
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]
                   if e["choices"]) == " héllo wörld"


@pytest.mark.parametrize("stripped", [True, False])
def test_tap_sse_split_at_every_byte_boundary(stripped: bool) -> None:
    data = _chat_sse()
    whole_tap, whole = run_tap([data], strip_usage=stripped, strip_ids=stripped)
    _check_chat_stream(whole_tap, whole, stripped=stripped)
    for cut in range(1, len(data)):  # two chunks, cut anywhere (inside UTF-8 too)
        tap, sink = run_tap([data[:cut], data[cut:]], strip_usage=stripped,
                            strip_ids=stripped)
        assert sink.body == whole.body, cut
    rng = random.Random(0)
    for _ in range(50):  # many chunks, random sizes, empty ones included
        cuts = sorted(rng.sample(range(len(data)), rng.randint(2, 30)))
        parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        tap, sink = run_tap(parts, strip_usage=stripped, strip_ids=stripped)
        assert sink.body == whole.body
        _check_chat_stream(tap, sink, stripped=stripped)
    tap, sink = run_tap([data[i:i + 1] for i in range(len(data))], strip_usage=stripped,
                        strip_ids=stripped)
    assert sink.body == whole.body


def test_tap_sse_error_event_and_keepalive() -> None:
    err = {"error": {"message": "boom", "type": "InternalServerError", "param": None,
                     "code": 500}}
    data = b": keep-alive\n\n" + edge.sse(err) + b"data: [DONE]\n\n"
    tap, sink = run_tap([data])
    assert tap.stream_error and tap.finished
    assert b": keep-alive\n\n" in sink.body
    events = parse_sse(sink.body.decode().replace(": keep-alive\n\n", ""))
    # the engine's own message (its internals) stays in the server log
    assert events[0] == edge.engine_failed(500, err) and "boom" not in sink.body.decode()
    assert events[0]["error"]["type"] == "server_error"
    assert events[1]["unlearning"] == INFO and events[2] == "[DONE]"


def test_tap_json() -> None:
    body = {"id": "c", "object": "chat.completion", "model": "acme@abc",
            "system_fingerprint": None, "prompt_token_ids": [1, 2],
            "choices": [{"index": 0, "message": {"content": "hi"}, "token_ids": [5, 6],
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}}
    data = json.dumps(body).encode()
    for strip in (True, False):
        tap, sink = run_tap([data[:7], data[7:20], data[20:]], ctype=b"application/json",
                            strip_ids=strip)
        out = json.loads(sink.body)
        assert out["unlearning"] == INFO and out["model"] == "served"
        assert out["system_fingerprint"] == "acme@abc"
        assert ("prompt_token_ids" in out) is not strip
        assert ("token_ids" in out["choices"][0]) is not strip
        assert int(sink.headers["content-length"]) == len(sink.body)
        assert sink.headers[POLICY_HEADER] == "acme@abc"
        assert tap.usage == body["usage"] and tap.prompt_ids == [1, 2]
        assert tap.output_ids == {0: [5, 6]} and tap.finished
        # the start goes out once, with the body (its length is known only then)
        assert [m["type"] for m in sink.messages] == ["http.response.start",
                                                      "http.response.body"]


def test_tap_passes_errors_and_other_bodies_through() -> None:
    err = json.dumps({"error": {"message": "no", "type": "BadRequestError",
                                "param": None, "code": 400}}).encode()
    tap, sink = run_tap([err[:5], err[5:]], status=400, ctype=b"application/json")
    assert sink.body == err and sink.headers["content-length"] == "999"  # untouched
    assert sink.headers[POLICY_HEADER] == "acme@abc"
    assert tap.status == 400 and tap.finished
    tap, sink = run_tap([b"plain"], ctype=b"text/plain")
    assert sink.body == b"plain" and tap.finished
    tap, sink = run_tap([b"not json"], ctype=b"application/json")
    assert sink.body == b"not json" and tap.finished


def test_tap_responses_stream_and_json() -> None:
    created = {"type": "response.created", "sequence_number": 0, "response": {
        "id": "r", "model": "acme@abc", "status": "in_progress", "output": []}}
    delta = {"type": "response.output_text.delta", "sequence_number": 1, "delta": "hi",
             "logprobs": [{"token": "hi", "logprob": -0.2, "top_logprobs": [
                 {"token": "ho", "logprob": -9999.0}]}]}
    done = {"type": "response.completed", "sequence_number": 2, "response": {
        "id": "r", "model": "acme@abc", "status": "completed", "output": [],
        "usage": {"input_tokens": 4, "output_tokens": 1, "total_tokens": 5}}}
    data = b"".join(edge.sse(e, e["type"]) for e in (created, delta, done))
    for parts in ([data], [data[i:i + 3] for i in range(0, len(data), 3)]):
        tap, sink = run_tap(parts, kind="responses")
        events = sse_events(sink.body.decode())
        assert [n for n, _ in events] == ["response.created", "response.output_text.delta",
                                          "response.completed"]
        final = events[-1][1]["response"]
        assert final["unlearning"] == INFO and final["model"] == "served"
        assert "unlearning" not in events[0][1]["response"]
        assert events[1][1]["logprobs"][0]["top_logprobs"] == []
        assert tap.usage == done["response"]["usage"] and tap.first_token_t is not None
        assert tap.finished and not tap.stream_error
    failed = {"type": "response.failed", "sequence_number": 1, "response": {"id": "r"}}
    tap, sink = run_tap([edge.sse(failed, failed["type"])], kind="responses")
    assert tap.stream_error
    assert sse_events(sink.body.decode())[0][1]["response"]["unlearning"] == INFO
    body = {"id": "r", "object": "response", "model": "acme@abc", "output": []}
    tap, sink = run_tap([json.dumps(body).encode()], kind="responses",
                        ctype=b"application/json")
    out = json.loads(sink.body)
    assert out["unlearning"] == INFO and out["model"] == "served"
    assert "system_fingerprint" not in out  # not a Responses field


# ================================================================ the refusal shape


def _refusal(kind: str, **body: Any) -> tuple[bytes, str]:
    return edge.refusal_response(kind, body, "I can't discuss that.", "served", INFO, 10, 4)


def test_refusal_chat_json_and_stream_parse_with_the_openai_client() -> None:
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    data, ctype = _refusal("chat", n=2)
    assert ctype == "application/json"
    raw = json.loads(data)
    cc = ChatCompletion.model_validate(raw)
    assert len(cc.choices) == 2
    for c in cc.choices:
        assert c.message.content is None and c.message.refusal == "I can't discuss that."
        assert c.finish_reason == "stop"
    assert cc.model == "served" and cc.usage.completion_tokens == 8
    assert raw["unlearning"] == INFO
    data, ctype = _refusal("chat", stream=True, stream_options={"include_usage": True})
    assert ctype == "text/event-stream"
    events = parse_sse(data.decode())
    assert events[-1] == "[DONE]" and events[-2]["unlearning"] == INFO
    chunks = [ChatCompletionChunk.model_validate(e) for e in events[:-1]]
    assert "".join(c.choices[0].delta.refusal or "" for c in chunks if c.choices) == \
        "I can't discuss that."
    assert all(c.choices[0].delta.content is None for c in chunks if c.choices)
    assert [c.usage.total_tokens for c in chunks if c.usage] == [14]
    events = parse_sse(_refusal("chat", stream=True)[0].decode())
    assert not any("usage" in e for e in events[:-1])


def test_refusal_completions_json_and_stream() -> None:
    from openai.types import Completion

    data, _ = _refusal("completions")
    c = Completion.model_validate(json.loads(data))
    assert c.choices[0].text == "I can't discuss that." and c.object == "text_completion"
    events = parse_sse(_refusal("completions", stream=True)[0].decode())
    assert [Completion.model_validate(e).choices[0].text for e in events[:-2]] == [
        "I can't discuss that."]
    assert events[-2]["unlearning"] == INFO and events[-1] == "[DONE]"


def _no_usage(obj: dict) -> dict:
    if "response" in obj:
        return {**obj, "response": _no_usage(obj["response"])}
    return {**obj, "usage": None} if "usage" in obj else obj


def test_refusal_responses_json_and_stream() -> None:
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    tools = [{"type": "function", "name": "f", "parameters": {}, "strict": True}]
    data, ctype = _refusal("responses", tools=tools, instructions="i")
    assert ctype == "application/json"
    raw = json.loads(data)
    # strict validation, but of usage: openai-python >= 3.x requires
    # input_tokens_details.cache_write_tokens, which the shape lacks (its default,
    # lenient parsing accepts that; see the report)
    resp = Response.model_validate(_no_usage(raw))
    part = resp.output[0].content[0]
    assert part.type == "refusal" and part.refusal == "I can't discuss that."
    assert raw["usage"]["input_tokens"] == 10 and raw["usage"]["output_tokens"] == 4
    assert raw["unlearning"] == INFO and resp.status == "completed"
    data, ctype = _refusal("responses", stream=True, tools=tools)
    assert ctype == "text/event-stream"
    events = sse_events(data.decode())
    adapter = TypeAdapter(ResponseStreamEvent)
    parsed = [adapter.validate_python(_no_usage(d)) for _, d in events]
    assert [p.type for p in parsed] == [n for n, _ in events]
    assert parsed[0].type == "response.created" and parsed[-1].type == "response.completed"
    assert [p.sequence_number for p in parsed] == list(range(len(parsed)))
    assert "".join(p.delta for p in parsed if p.type == "response.refusal.delta") == \
        "I can't discuss that."
    assert events[-1][1]["response"]["unlearning"] == INFO


# ================================================================ rewrite_body


def test_rewrite_body_chat() -> None:
    body = {"messages": HELLO, "model": "gpt-4", "temperature": 0.3}
    extra = {"unlearnd_version": "acme@abc", "unlearnd_in_scope": 1}
    new, strip_usage, strip_ids = edge.rewrite_body(
        "chat", body, adapter="acme@abc", extra=extra, key=KEY, cache_salt="salt")
    assert body == {"messages": HELLO, "model": "gpt-4", "temperature": 0.3}  # a copy
    assert new["model"] == "acme@abc" and new["cache_salt"] == "salt"
    assert new["temperature"] == 0.3 and new["messages"] == HELLO
    assert verify(new["vllm_xargs"], KEY) and not verify(new["vllm_xargs"], b"other" * 8)
    assert {k: v for k, v in new["vllm_xargs"].items() if k != SIG_KEY} == extra
    assert new["return_token_ids"] is True and strip_ids and not strip_usage
    assert "stream_options" not in new and "max_tokens" not in new
    new, strip_usage, strip_ids = edge.rewrite_body(
        "chat", {**body, "stream": True, "return_token_ids": True}, adapter="a",
        extra=extra, key=KEY, cache_salt="s", max_tokens=64)
    assert new["stream_options"] == {"include_usage": True} and strip_usage
    assert not strip_ids and new["max_tokens"] == 64
    new, strip_usage, _ = edge.rewrite_body(
        "chat", {**body, "stream": True, "stream_options": {"include_usage": True},
                 "max_completion_tokens": 5}, adapter="a", extra=extra, key=KEY,
        cache_salt="s", max_tokens=64)
    assert not strip_usage and new["max_completion_tokens"] == 5 and "max_tokens" not in new


def test_rewrite_body_completions_and_responses() -> None:
    extra = {"unlearnd_version": "none"}
    new, _, strip_ids = edge.rewrite_body("completions", {"prompt": "p"}, adapter="a",
                                          extra=extra, key=KEY, cache_salt="s",
                                          max_tokens=64)
    assert strip_ids and new["max_tokens"] == 16  # OpenAI's default, under the limit
    new, _, _ = edge.rewrite_body("completions", {"prompt": "p", "max_tokens": None},
                                  adapter="a", extra=extra, key=KEY, cache_salt="s",
                                  max_tokens=64)
    assert new["max_tokens"] == 64
    new, _, _ = edge.rewrite_body("completions", {"prompt": "p"}, adapter="a",
                                  extra=extra, key=KEY, cache_salt="s", max_tokens=8)
    assert new["max_tokens"] == 8
    new, strip_usage, strip_ids = edge.rewrite_body(
        "responses", {"input": "x", "stream": True, "store": True}, adapter="a",
        extra=extra, key=KEY, cache_salt="s", max_tokens=64)
    assert new["store"] is False and new["model"] == "a" and new["cache_salt"] == "s"
    assert not strip_usage and not strip_ids
    assert "return_token_ids" not in new and "stream_options" not in new
    assert new["max_output_tokens"] == 64 and verify(new["vllm_xargs"], KEY)


def test_rewrite_body_signature_covers_the_values() -> None:
    extra = {"unlearnd_version": "acme@abc", "unlearnd_in_scope": 0}
    new, _, _ = edge.rewrite_body("chat", {"messages": HELLO}, adapter="a", extra=extra,
                                  key=KEY, cache_salt="s")
    forged = {**new["vllm_xargs"], "unlearnd_in_scope": 1}
    assert not verify(forged, KEY)
    assert new["vllm_xargs"] == sign(extra, KEY)


# ================================================================ the OpenAI error body


def test_error_body_shape_and_types() -> None:
    assert error_body("bad", param="n") == {"error": {
        "message": "bad", "type": "invalid_request_error", "param": "n", "code": None}}
    for status, kind in [(400, "invalid_request_error"), (401, "authentication_error"),
                         (403, "permission_error"), (404, "not_found_error"),
                         (409, "conflict_error"), (413, "invalid_request_error"),
                         (429, "rate_limit_error"), (500, "server_error"),
                         (503, "service_unavailable")]:
        e = APIError(status, "m", code="c")
        assert e.body()["error"]["type"] == kind
        assert e.body()["error"]["code"] == "c"
    assert APIError(400, "m", type="custom").body()["error"]["type"] == "custom"


def test_send_json_and_sse_helpers() -> None:
    sink = Sink()
    asyncio.run(edge.send_json(sink, 418, {"a": 1}, {"X-Thing": "v"}))
    assert sink.start["status"] == 418 and sink.headers["x-thing"] == "v"
    assert json.loads(sink.body) == {"a": 1}
    assert int(sink.headers["content-length"]) == len(sink.body)
    assert edge.sse({"a": 1}) == b'data: {"a":1}\n\n'
    assert edge.sse({"a": 1}, "ev") == b'event: ev\ndata: {"a":1}\n\n'


def test_guarded_tenant_policy_header_on_every_answer(app) -> None:
    """The header is on JSON, SSE, refusal shapes and errors passed on from vLLM."""
    v = app.client.post("/admin/tenants/acme/versions", json={
        "policy": str(make_policy_dir(app.config.state_dir.parent / "ph")),
        "activate": True}, headers=app.admin).json()["name"]
    secret = [{"role": "user", "content": "Who is Voldemort?"}]
    for path, body in ((CHAT, {"messages": HELLO}), (CHAT, {"messages": HELLO,
                                                            "stream": True}),
                       (CHAT, {"messages": secret, "tools": [{"type": "function",
                                                             "function": {"name": "f"}}]}),
                       (COMP, {"prompt": "hi", "logit_bias": {"999999": 1}}),
                       (RESP, {"input": "hi"})):
        r = app.client.post(path, json=body, headers=app.auth("acme"))
        assert r.headers[POLICY_HEADER] == v, (path, body, r.status_code)


def test_client_request_id_header_never_reaches_vllm(app) -> None:
    r = app.client.post(CHAT, json={"messages": HELLO},
                        headers={**app.auth("acme"), "X-Request-Id": "client-chosen"})
    assert r.status_code == 200
    seen = app.engine.requests[-1].headers
    assert "x-request-id" not in seen and "authorization" not in seen
    assert int(seen["content-length"]) == len(json.dumps(app.engine.requests[-1].body))
    assert "client-chosen" not in app.engine.calls[-1].request_id


def test_structured_request_failing_in_the_engine_is_a_4xx(app) -> None:
    """vLLM's 500 for a structured request (its grammar failed, or every token it allows
    is withheld) becomes the edge's 422, never a 500 carrying engine detail."""
    tools = [{"type": "function", "function": {"name": "f"}}]
    app.engine.fail_after = 0
    r = app.client.post(CHAT, json={"messages": HELLO, "tools": tools},
                        headers=app.auth("acme"))
    err = openai_error(r, 422)
    assert err["code"] == "constraint_unsatisfiable"
    assert "fake engine failure" not in r.text
    assert app.counter("acme", "chat", "client_error") == 1
    r = app.client.post(CHAT, json={"messages": HELLO}, headers=app.auth("acme"))
    assert r.status_code == 500  # unstructured: vLLM's error as it is
