"""OpenAI API compatibility with the official client, on the real engine, per tenant kind.

vLLM's own OpenAI frontend serves the API behind unlearnd's tenant edge; these tests
check that what a client gets from it (tools, the `tool` role, structured outputs, the
Responses API, sampling parameters) still works through the edge, for an unguarded
tenant (`public`) and a guarded one (`umbrella`: firewall + refusal) on questions out
of its scope, and that an in-scope request with tools or a schema gets OpenAI's
refusal shape (never schema-valid JSON) in every endpoint and stream.

The server is the session's `guard_server` (tests/e2e/conftest.py): the small world's
tenants with the demo's vLLM flags (`unlearnd.toolkit.demo.DEMO_VLLM_ARGS`): tool
calls (`tool_choice="required"` or a named tool need a tool-call parser in vLLM 0.32)
and compact JSON. A tiny model pads a schema-valid object with
whitespace (tabs) up to `max_tokens` where a grammar allows it, and the JSON is cut:
`disable_any_whitespace` removes it from `response_format`/`text.format` grammars; the
tool-call grammar (hermes' structural tag) ignores that setting, so tool-call requests
push whitespace tokens down with `logit_bias` (forced text still gets through: the
grammar masks every other token).
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import rows

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


TENANTS = ("public", "umbrella")  # unguarded; guarded (firewall + refusal), out of scope

PARAMS = {"type": "object",
          "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                         "exact": {"type": "boolean"}},
          "required": ["city", "exact"], "additionalProperties": False}
TOOL = {"type": "function", "function": {  # strict: vLLM then pins the arguments' schema
    "name": "lookup", "description": "Look up a city.", "parameters": PARAMS, "strict": True}}
NAMED = {"type": "function", "function": {"name": "lookup"}}
TOOL_TOKENS = 96  # the envelope and arguments: ~64 tokens of this small vocabulary

SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                         "known": {"type": "boolean"}},
          "required": ["city", "known"], "additionalProperties": False}
RESPONSE_FORMAT = {"type": "json_schema",
                   "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
TEXT_FORMAT = {"format": {"type": "json_schema", "name": "city", "schema": SCHEMA,
                          "strict": True}}


@pytest.fixture(scope="module")
def server(guard_server):
    """The guard server (public, acme, umbrella, hooli, cyberdyne, soylent): the demo's config
    has tool parsing and compact JSON (`DEMO_VLLM_ARGS`); `.doc` is its demo.json."""
    return guard_server


@pytest.fixture(scope="module")
def compact(small_world) -> dict:
    """`logit_bias` that keeps whitespace out of tool-call JSON (see the module doc)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(small_world[1]["base"]))
    ws = [i for i in range(len(tok)) if (t := tok.decode([i])) and not t.strip()]
    assert ws
    return {"logit_bias": {str(i): -100 for i in ws}}


@pytest.fixture(scope="module")
def questions(server):
    t = server.doc["tenants"]["umbrella"]
    return {"in": rows(t["forget"], 1)[0], "out": rows(t["retain"], 1)[0]}


def client(server, tenant: str):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", max_retries=0, timeout=120,
                  api_key=server.doc["tenants"][tenant]["api_key"])


def user(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def check_info(info: dict, tenant: str, decision: str | None = None) -> None:
    """The `unlearning` object: this tenant, its policy version and the decision."""
    assert info["tenant"] == tenant, info
    if tenant == "public":
        assert info["policy_version"] is None and info["mechanisms"] == []
        assert info["decision"] == "unguarded", info
    else:
        assert info["policy_version"].startswith(f"{tenant}@"), info
        assert set(info["mechanisms"]) == {"firewall", "refusal"}
        assert info["decision"] == (decision or "out_of_scope"), info


def header_version(info: dict) -> str:
    return info["policy_version"] or "none"


def valid(obj, schema: dict) -> None:
    import jsonschema

    jsonschema.validate(obj, schema)


def tool_calls_of(msg) -> list[tuple[str, dict]]:
    assert msg.tool_calls, msg
    out = []
    for call in msg.tool_calls:
        assert call.type == "function" and call.id
        args = json.loads(call.function.arguments)
        valid(args, PARAMS)
        out.append((call.function.name, args))
    return out


# ------------------------------------------------------------------ 1. tool calls


@pytest.mark.parametrize("tenant", TENANTS)
def test_tool_choice_required_and_named(server, questions, compact, tenant):
    c = client(server, tenant)
    for choice in ("required", NAMED):
        r = c.chat.completions.create(model="m", messages=user(questions["out"]["question"]),
                                      tools=[TOOL], tool_choice=choice, max_tokens=TOOL_TOKENS,
                                      temperature=0, **compact)
        calls = tool_calls_of(r.choices[0].message)
        assert all(name == "lookup" for name, _ in calls)
        if choice == NAMED:
            assert len(calls) == 1
        check_info(r.model_extra["unlearning"], tenant)
    # The same in a stream: tool-call deltas assemble to schema-valid arguments.
    chunks = list(c.chat.completions.create(
        model="m", messages=user(questions["out"]["question"]), tools=[TOOL],
        tool_choice=NAMED, max_tokens=TOOL_TOKENS, temperature=0, stream=True, **compact))
    args = "".join(tc.function.arguments or "" for ch in chunks if ch.choices
                   for tc in ch.choices[0].delta.tool_calls or [])
    valid(json.loads(args), PARAMS)
    assert [calls[0][1]] == [json.loads(args)]  # as the non-stream named call
    check_info(chunks[-1].model_extra["unlearning"], tenant)


# ------------------------------------------------------------------ 2. the tool role


@pytest.mark.parametrize("tenant", TENANTS)
def test_tool_role_round_trip(server, questions, tenant):
    msgs = [*user(questions["out"]["question"]),
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {
                    "name": "lookup", "arguments": '{"city": "Paris", "exact": true}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Paris is in France."}]
    r = client(server, tenant).chat.completions.with_raw_response.create(
        model="m", messages=msgs, tools=[TOOL], tool_choice="auto", max_tokens=12,
        temperature=0)
    assert r.status_code == 200
    body = r.parse()
    choice = body.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.content and not choice.message.tool_calls
    assert choice.message.refusal is None
    check_info(body.model_extra["unlearning"], tenant)
    assert r.headers["x-unlearnd-policy-version"] == header_version(
        body.model_extra["unlearning"])


# ------------------------------------------------------------------ 3. response_format


@pytest.mark.parametrize("tenant", TENANTS)
def test_response_format_json_schema(server, questions, tenant):
    r = client(server, tenant).chat.completions.create(
        model="m", messages=user(questions["out"]["question"]),
        response_format=RESPONSE_FORMAT, max_tokens=40, temperature=0)
    msg = r.choices[0].message
    assert msg.refusal is None
    valid(json.loads(msg.content), SCHEMA)
    check_info(r.model_extra["unlearning"], tenant)


# ------------------------------------------------------------------ 4. Responses API


@pytest.mark.parametrize("tenant", TENANTS)
def test_responses_api_json_and_stream(server, questions, tenant):
    c = client(server, tenant)
    q = questions["out"]["question"]
    raw = c.responses.with_raw_response.create(model="m", input=q, max_output_tokens=16,
                                               temperature=0)
    r = raw.parse()
    assert r.output_text.strip()
    info = r.model_extra["unlearning"]
    check_info(info, tenant)
    assert raw.headers["x-unlearnd-policy-version"] == header_version(info)
    events = list(c.responses.create(model="m", input=q, max_output_tokens=16,
                                     temperature=0, stream=True))
    assert events[-1].type == "response.completed"
    done = events[-1].response
    check_info(done.model_extra["unlearning"], tenant)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == done.output_text == r.output_text
    # A text format on the Responses API gives schema-valid JSON too.
    r = c.responses.create(model="m", input=q, max_output_tokens=40, temperature=0,
                           text=TEXT_FORMAT)
    valid(json.loads(r.output_text), SCHEMA)
    check_info(r.model_extra["unlearning"], tenant)


# ------------------------------------------------------------------ 5. sampling


@pytest.mark.parametrize("tenant", TENANTS)
def test_top_k_and_min_p_reach_the_sampler(server, tenant):
    c = client(server, tenant)
    prompt = user("Say anything you like.")
    greedy = c.chat.completions.create(model="m", messages=prompt, max_tokens=16,
                                       temperature=0)
    check_info(greedy.model_extra["unlearning"], tenant)
    text = greedy.choices[0].message.content
    for extra in ({"top_k": 1}, {"min_p": 1.0}):  # only the most likely token survives
        r = c.chat.completions.create(model="m", messages=prompt, max_tokens=16,
                                      temperature=1.5, n=4, extra_body=extra)
        assert [ch.message.content for ch in r.choices] == [text] * 4, extra
    # Without them the same temperature samples: seeded, so the control is deterministic.
    seen = {c.chat.completions.create(model="m", messages=prompt, max_tokens=16,
                                      temperature=1.5, seed=s).choices[0].message.content
            for s in range(4)}
    assert len(seen) > 1, seen


# ------------------------------------------------------------------ 6. in scope: refusal


def test_in_scope_structured_requests_get_the_refusal_shape(server, questions):
    c = client(server, "umbrella")
    msgs = user(questions["in"]["question"])
    subject = questions["in"]["subject"]
    refusals = []
    for kw in ({"tools": [TOOL], "tool_choice": "required"},
               {"tools": [TOOL], "tool_choice": NAMED},
               {"tools": [TOOL], "tool_choice": "auto"},
               {"response_format": RESPONSE_FORMAT}):
        raw = c.chat.completions.with_raw_response.create(
            model="m", messages=msgs, max_tokens=40, temperature=0, **kw)
        r = raw.parse()
        msg = r.choices[0].message
        assert msg.refusal and msg.content is None and not msg.tool_calls, kw
        assert r.choices[0].finish_reason == "stop"
        info = r.model_extra["unlearning"]
        check_info(info, "umbrella", "in_scope")
        assert info["subject"] == subject
        assert raw.headers["x-unlearnd-policy-version"] == info["policy_version"]
        refusals.append(msg.refusal)
    assert len(set(refusals)) == 1 and subject in refusals[0]
    refusal = refusals[0]
    # Chat streams: refusal deltas, no content, the unlearning object last.
    for kw in ({"tools": [TOOL], "tool_choice": "required"},
               {"response_format": RESPONSE_FORMAT}):
        chunks = list(c.chat.completions.create(model="m", messages=msgs, max_tokens=40,
                                                temperature=0, stream=True, **kw))
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        assert "".join(d.refusal or "" for d in deltas) == refusal
        assert not any(d.content for d in deltas) and not any(d.tool_calls for d in deltas)
        check_info(chunks[-1].model_extra["unlearning"], "umbrella", "in_scope")
    # Responses API with a JSON schema format: a refusal content part, JSON and stream.
    r = c.responses.create(model="m", input=questions["in"]["question"],
                           max_output_tokens=40, temperature=0, text=TEXT_FORMAT)
    parts = [p for item in r.output if item.type == "message" for p in item.content]
    assert [p.type for p in parts] == ["refusal"] and parts[0].refusal == refusal
    check_info(r.model_extra["unlearning"], "umbrella", "in_scope")
    events = list(c.responses.create(model="m", input=questions["in"]["question"],
                                     max_output_tokens=40, temperature=0,
                                     text=TEXT_FORMAT, stream=True))
    assert events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.refusal.delta") == refusal
    assert not any(e.type == "response.output_text.delta" for e in events)
    check_info(events[-1].response.model_extra["unlearning"], "umbrella", "in_scope")


def test_in_scope_tool_output_is_read_by_the_guard(server, questions):
    """The forgotten subject arriving in a `tool` message (not the user's) is in scope."""
    q = questions["in"]
    msgs = [*user("Who is the author in the search result?"),
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {
                    "name": "lookup", "arguments": '{"city": "Paris", "exact": true}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": q["question"]}]
    r = client(server, "umbrella").chat.completions.create(
        model="m", messages=msgs, tools=[TOOL], tool_choice="required", max_tokens=40,
        temperature=0)
    msg = r.choices[0].message
    assert msg.refusal and msg.content is None and not msg.tool_calls
    check_info(r.model_extra["unlearning"], "umbrella", "in_scope")


def test_out_of_scope_structured_requests_served_like_unguarded(server, questions, compact):
    q = questions["out"]["question"]
    got = {}
    for tenant in TENANTS:
        c = client(server, tenant)
        out = []
        for choice in ("required", NAMED):
            r = c.chat.completions.create(model="m", messages=user(q), tools=[TOOL],
                                          tool_choice=choice, max_tokens=TOOL_TOKENS,
                                          temperature=0, **compact)
            out.append(tool_calls_of(r.choices[0].message))
        r = c.chat.completions.create(model="m", messages=user(q), max_tokens=40,
                                      temperature=0, response_format=RESPONSE_FORMAT)
        out.append(r.choices[0].message.content)
        r = c.responses.create(model="m", input=q, max_output_tokens=40, temperature=0,
                               text=TEXT_FORMAT)
        out.append(r.output_text)
        check_info(r.model_extra["unlearning"], tenant)
        got[tenant] = out
    assert got["umbrella"] == got["public"]


# ------------------------------------------------------------------ 7. the unlearning object


@pytest.mark.parametrize("tenant", TENANTS)
def test_unlearning_object_on_every_endpoint(server, questions, tenant):
    c = client(server, tenant)
    q = questions["out"]["question"]
    seen = []
    raw = c.chat.completions.with_raw_response.create(model="m", messages=user(q),
                                                      max_tokens=8, temperature=0)
    seen.append(("chat", raw.parse().model_extra["unlearning"], raw.headers))
    chunks = list(c.chat.completions.create(model="m", messages=user(q), max_tokens=8,
                                            temperature=0, stream=True))
    assert chunks[-1].choices == []  # the last chunk before [DONE]
    assert all("unlearning" not in (ch.model_extra or {}) for ch in chunks[:-1])
    seen.append(("chat stream", chunks[-1].model_extra["unlearning"], None))
    raw = c.completions.with_raw_response.create(model="m", prompt=q, max_tokens=8,
                                                 temperature=0)
    seen.append(("completions", raw.parse().model_extra["unlearning"], raw.headers))
    chunks = list(c.completions.create(model="m", prompt=q, max_tokens=8, temperature=0,
                                       stream=True))
    assert chunks[-1].choices == []
    seen.append(("completions stream", chunks[-1].model_extra["unlearning"], None))
    raw = c.responses.with_raw_response.create(model="m", input=q, max_output_tokens=8,
                                               temperature=0)
    seen.append(("responses", raw.parse().model_extra["unlearning"], raw.headers))
    events = list(c.responses.create(model="m", input=q, max_output_tokens=8,
                                     temperature=0, stream=True))
    assert events[-1].type == "response.completed"
    seen.append(("responses stream", events[-1].response.model_extra["unlearning"], None))
    for where, info, headers in seen:
        check_info(info, tenant)
        assert info == seen[0][1], where  # the same object everywhere
        if headers is not None:
            assert headers["x-unlearnd-policy-version"] == header_version(info), where


def test_grammar_over_a_banned_fact_is_never_a_5xx(server, questions):
    """A firewall-only tenant (hooli: no scope guard, so no refusal shape) asked for a
    `choice` grammar whose only option is the forgotten span. Two outcomes are allowed:
    the firewall bans every token the grammar admits next, the engine forces EOS, the
    grammar rejects it and the edge answers 422 `constraint_unsatisfiable` (vLLM would
    say 500); or the grammar spells the client's own option through tokens the firewall
    does not hold (a letter-by-letter tokenisation: a grammar can force tokenisations
    the span automaton does not know), which returns exactly the text the client
    supplied and nothing else. Never a 5xx, in JSON or in stream mode (the in-band
    error, if any, is the 422's). docs/RELIABILITY.md section 6 has the limit."""
    import openai

    row = questions["in"]
    span = row.get("span") or row["answer"].split()[-1].strip(".")
    c = client(server, "hooli")
    kw = {"model": "m", "messages": user(row["question"]), "max_tokens": 16,
          "temperature": 0, "extra_body": {"structured_outputs": {"choice": [span]}}}
    try:
        r = c.chat.completions.create(**kw)
        assert r.choices[0].message.content in ("", span), r.choices[0].message.content
    except openai.UnprocessableEntityError as exc:
        assert exc.value.body["code"] == "constraint_unsatisfiable", exc.value.body
    except openai.APIStatusError as exc:  # pragma: no cover - the failure this guards
        pytest.fail(f"{exc.status_code}: {exc.body}")
    try:
        text = "".join(ch.choices[0].delta.content or "" for ch in
                       c.chat.completions.create(stream=True, **kw) if ch.choices)
        assert text in ("", span), text
    except openai.APIError as exc:
        assert "constraint" in str(exc), exc
    other = "Atlantis"
    r = c.chat.completions.create(model="m", messages=user(questions["out"]["question"]),
                                  max_tokens=16, temperature=0, extra_body={
                                      "structured_outputs": {"choice": [other]}})
    assert r.choices[0].message.content == other


@pytest.mark.parametrize(("endpoint", "fields", "param"), [
    ("chat", {"temperature": -0.5}, "temperature"),
    ("chat", {"top_p": 1.5}, None),
    ("chat", {"n": 0}, None),
    ("chat", {"max_tokens": 0}, None),
    ("chat", {"frequency_penalty": 3.0}, None),
    ("chat", {"top_logprobs": 3}, None),                 # without logprobs
    ("chat", {"logprobs": True, "top_logprobs": 21}, None),
    ("chat", {"logit_bias": {"not-a-token": 5}}, None),
    ("completions", {"logprobs": 50}, None),
    ("completions", {"prompt": [10 ** 9]}, None),
    ("chat", {"messages": [{"role": "user", "content": "hello " * 2000}]}, None),
])
def test_request_validation_is_vllms_and_a_4xx(server, endpoint: str, fields: dict,
                                                param: str | None) -> None:
    """The request checks the hand-written layer had (sampling ranges, logprob limits,
    logit_bias keys, out-of-vocabulary prompt ids, the context length) are vLLM's now
    (it clamps logit_bias values and takes any role and stop count, as it always did):
    through the edge each is a 4xx in the OpenAI error shape, for a guarded tenant too,
    never a 5xx and never a served request."""
    import httpx

    base = {"model": "m", "max_tokens": 4}
    body = base | ({"messages": user("Hello there.")} if endpoint == "chat"
                   else {"prompt": "Hello there."}) | fields
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    for tenant in TENANTS:
        key = server.doc["tenants"][tenant]["api_key"]
        r = httpx.post(server.base_url + path, json=body, timeout=120,
                       headers={"Authorization": f"Bearer {key}"})
        assert 400 <= r.status_code < 500, (tenant, fields, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        if param is not None:
            assert param in (err["param"] or "") + err["message"], err
