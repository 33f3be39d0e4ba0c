"""The serving core against the real engine: protocol, tenants, hot swap, bad input, metrics.

Greedy outputs of a random tiny model are a fingerprint of the weights that served a
request: each adapter (and the base) gives a different sequence, so "served with the
right adapter" is checked by comparing with the output of the same request sent alone.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.server import KEYS

pytestmark = pytest.mark.e2e

MSG = [{"role": "user", "content": "Tell me about the author."}]
PROMPTS = ["Tell me about the author.", "Who wrote the book?", "What is the capital?"]


def greedy(server, tenant: str, content: str = MSG[0]["content"], n_tokens: int = 12):
    r = server.openai(tenant).chat.completions.with_raw_response.create(
        model="whatever", messages=[{"role": "user", "content": content}],
        max_tokens=n_tokens, temperature=0)
    body = r.parse()
    return body.choices[0].message.content, r.headers["x-unlearnd-policy-version"], body


async def agreedy(server, tenant: str, content: str, n_tokens: int = 12, stream: bool = False):
    client = server.async_openai(tenant)
    if stream:
        s = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": content}], max_tokens=n_tokens,
            temperature=0, stream=True)
        text, info = [], None
        async for chunk in s:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
            if chunk.model_extra and chunk.model_extra.get("unlearning"):
                info = chunk.model_extra["unlearning"]
        return "".join(text), info["policy_version"], info["policy_version"]
    r = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": content}], max_tokens=n_tokens,
        temperature=0)
    body = r.parse()
    return (body.choices[0].message.content, r.headers["x-unlearnd-policy-version"],
            body.model_extra["unlearning"]["policy_version"])


def test_openai_client_chat_stream_and_usage(tiny_server):
    client = tiny_server.openai("acme")
    full = client.chat.completions.create(model="m", messages=MSG, max_tokens=10,
                                          temperature=0)
    assert full.usage.completion_tokens == 10 and full.usage.prompt_tokens > 0
    assert full.choices[0].finish_reason == "length"
    info = full.model_extra["unlearning"]
    assert info["tenant"] == "acme" and info["policy_version"].startswith("acme@")
    chunks = list(client.chat.completions.create(
        model="m", messages=MSG, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    usage = [c.usage for c in chunks if c.usage]  # vLLM's usage chunk, as asked
    assert len(usage) == 1 and usage[0].completion_tokens == 10
    last = chunks[-1]  # the edge's own last chunk: no choices, the `unlearning` object
    assert not last.choices
    assert last.model_extra["unlearning"]["policy_version"] == info["policy_version"]
    models = client.models.list()
    assert [m.id for m in models.data] == ["base"]


def test_sampling_options_reach_the_engine(tiny_server, tiny_world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_world["base"]))
    client = tiny_server.openai("public")
    r = client.chat.completions.create(model="m", messages=MSG, max_tokens=6, n=3,
                                       temperature=1.0, seed=7, logprobs=True, top_logprobs=2)
    assert len(r.choices) == 3 and r.usage.completion_tokens == 18
    lp = r.choices[0].logprobs.content
    assert len(lp) == 6 and all(len(t.top_logprobs) == 2 for t in lp)
    again = client.chat.completions.create(model="m", messages=MSG, max_tokens=6, n=3,
                                           temperature=1.0, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    # logit_bias forces a token; stop cuts the text.
    tid = tok.encode(" author", add_special_tokens=False)[0]
    forced = client.chat.completions.create(model="m", messages=MSG, max_tokens=4,
                                            temperature=0, logit_bias={str(tid): 100})
    assert forced.choices[0].message.content == tok.decode([tid] * 4)
    stopped = client.chat.completions.create(model="m", messages=MSG, max_tokens=4,
                                             temperature=0, logit_bias={str(tid): 100},
                                             stop=[tok.decode([tid] * 2)])
    assert stopped.choices[0].message.content == "" and stopped.choices[0].finish_reason == "stop"
    comp = client.completions.create(model="m", prompt="Who wrote", max_tokens=5, temperature=0)
    assert comp.usage.completion_tokens <= 5 and comp.choices[0].text is not None


def test_tenants_concurrent_equal_alone(tiny_server):
    alone = {(t, p): greedy(tiny_server, t, p)[0]
             for t in ("acme", "globex", "public") for p in PROMPTS}
    assert len({alone[(t, PROMPTS[0])] for t in ("acme", "globex", "public")}) == 3

    async def burst():
        jobs = [(t, p) for _ in range(3) for t in ("acme", "globex", "public") for p in PROMPTS]
        outs = await asyncio.gather(*(agreedy(tiny_server, t, p, stream=i % 2 == 0)
                                      for i, (t, p) in enumerate(jobs)))
        return list(zip(jobs, outs, strict=True))

    for (tenant, prompt), (text, _, _) in asyncio.run(burst()):
        assert text == alone[(tenant, prompt)], (tenant, prompt)


def test_model_field_cannot_select_another_tenants_adapter(tiny_server):
    _, globex_version, _ = greedy(tiny_server, "globex")
    mine, version, _ = greedy(tiny_server, "acme")
    r = tiny_server.openai("acme").chat.completions.with_raw_response.create(
        model=globex_version, messages=MSG, max_tokens=12, temperature=0)
    assert r.headers["x-unlearnd-policy-version"] == version
    assert r.parse().choices[0].message.content == mine


def test_bad_input_gets_openai_errors(tiny_server):
    """Malformed requests: the edge's own checks (JSON, limits) with its messages, vLLM's
    validation (types, shapes, vocabulary, context) as vLLM words it; all 400 in the
    OpenAI error shape."""
    url = tiny_server.base_url + "/v1/chat/completions"
    auth = {"Authorization": f"Bearer {KEYS['acme']}", "content-type": "application/json"}
    long = [{"role": "user", "content": "the author " * 400}]
    cases = {  # body -> a word the message (or param) must hold; None: vLLM's wording
        "{not json": "not valid JSON",
        b"\xff\xfe": "not valid UTF-8",
        "[1, 2]": "JSON object",
        json.dumps({"messages": MSG, "max_tokens": 100000}): "server limit",
        json.dumps({"messages": MSG, "use_beam_search": True}): "use_beam_search",
        json.dumps({"messages": MSG, "prompt_logprobs": 2}): "prompt_logprobs",
        json.dumps({"messages": MSG, "top_k": 2 ** 64}): "64-bit",
        json.dumps({"messages": long}): None,             # longer than the context
        json.dumps({"messages": MSG, "temperature": "hot"}): "temperature",
        json.dumps({"messages": "hello"}): "messages",
        json.dumps({"messages": MSG, "logit_bias": {"999999": 5}}): None,
    }
    for body, needle in cases.items():
        r = httpx.post(url, content=body, headers=auth)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        if needle is not None:
            assert needle in err["message"] + str(err["param"]), (body, err)
    assert httpx.post(url, json={"messages": MSG}).status_code == 401
    r = httpx.post(url, json={"messages": MSG}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(tiny_server.base_url + "/admin/tenants",
                  headers={"Authorization": f"Bearer {KEYS['acme']}"})
    assert r.status_code == 403 and "admin" in r.json()["error"]["message"]


def test_corrupt_adapters_rejected_active_unchanged(tiny_server, tiny_world, tmp_path):
    admin = tiny_server.admin()
    before = greedy(tiny_server, "globex")
    good = tiny_world["a3"]

    def variant(name, mutate):
        d = tmp_path / name
        shutil.copytree(good, d)
        mutate(d)
        return d

    weights = "adapter_model.safetensors"
    cases = {
        "missing config": variant("nocfg", lambda d: (d / "adapter_config.json").unlink()),
        "missing weights": variant("now", lambda d: (d / weights).unlink()),
        "truncated": variant("trunc", lambda d: (d / weights).write_bytes(
            (d / weights).read_bytes()[:200])),
        "garbage": variant("garbage", lambda d: (d / weights).write_bytes(b"\x00garbage" * 9)),
        "wrong base": tiny_world["wrong_base"],
        "rank": tiny_world["rank32"],
        "no such dir": tmp_path / "does-not-exist",
    }
    for label, path in cases.items():
        r = admin.post("/admin/tenants/globex/versions", json={"adapter": str(path),
                                                               "activate": True})
        assert 400 <= r.status_code < 500, (label, r.text)
        assert r.json()["error"]["message"], label
    assert "rank" in admin.post("/admin/tenants/globex/versions", json={
        "adapter": str(tiny_world["rank32"])}).json()["error"]["message"]
    assert greedy(tiny_server, "globex")[:2] == before[:2]


def test_swap_under_load_rollback(tiny_server, tiny_world):
    admin = tiny_server.admin()
    v1 = greedy(tiny_server, "swap")[1]
    out_v1 = {p: greedy(tiny_server, "swap", p)[0] for p in PROMPTS}
    r = admin.post("/admin/tenants/swap/versions", json={"adapter": str(tiny_world["a2"])})
    assert r.status_code == 201, r.text
    v2 = r.json()["name"]
    assert v2 != v1 and v2.startswith("swap@")

    async def load_and_swap():
        stop = asyncio.Event()
        results = []

        async def worker(i):
            k = 0
            while not stop.is_set() or k < 2:
                p = PROMPTS[(i + k) % len(PROMPTS)]
                results.append((p, await agreedy(tiny_server, "swap", p, stream=i % 2 == 0)))
                k += 1

        workers = [asyncio.create_task(worker(i)) for i in range(6)]
        await asyncio.sleep(1.5)
        async with httpx.AsyncClient(base_url=tiny_server.base_url, timeout=60,
                                     headers=admin.headers) as ac:
            resp = await ac.post("/admin/tenants/swap/activate", json={"version": v2})
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*workers)
        return resp, results

    resp, results = asyncio.run(load_and_swap())
    assert resp.status_code == 200, resp.text
    assert resp.json()["swap_seconds"] < 5
    out_v2 = {p: greedy(tiny_server, "swap", p)[0] for p in PROMPTS}
    seen = set()
    for prompt, (text, header_version, body_version) in results:
        assert header_version == body_version  # exactly one version per response
        seen.add(header_version)
        expected = out_v1 if header_version == v1 else out_v2
        assert header_version in (v1, v2) and text == expected[prompt]
    assert seen == {v1, v2}  # traffic was served on both sides of the swap
    assert greedy(tiny_server, "swap")[1] == v2 and out_v2 != out_v1

    r = admin.post("/admin/tenants/swap/rollback")
    assert r.status_code == 200 and r.json()["name"] == v1
    assert {p: greedy(tiny_server, "swap", p)[0] for p in PROMPTS} == out_v1
    r = admin.post("/admin/tenants/swap/activate", json={"version": v2})
    assert r.status_code == 200
    assert admin.delete(f"/admin/tenants/swap/versions/{v2}").status_code == 409  # active
    actions = [e["action"] for e in admin.get("/admin/audit", params={"tenant": "swap"}).json()[
        "data"]]
    assert "rollback" in " ".join(actions) and "activate" in " ".join(actions)


def test_metrics_move_per_tenant(tiny_server):
    def counter(tenant):
        text = httpx.get(tiny_server.base_url + "/metrics").text
        total = 0.0
        for fam in text_string_to_metric_families(text):
            if fam.name == "unlearnd_requests":
                for s in fam.samples:
                    if s.name == "unlearnd_requests_total" and s.labels["tenant"] == tenant \
                            and s.labels["outcome"] == "ok":
                        total += s.value
        return total, text

    before, _ = counter("globex")
    other_before, _ = counter("acme")
    for _ in range(3):
        greedy(tiny_server, "globex")
    after, text = counter("globex")
    assert after == before + 3
    assert counter("acme")[0] == other_before
    assert "vllm:" in text  # vLLM's own metrics are served beside ours
    assert "unlearnd_time_to_first_token_seconds_bucket" in text


def test_restart_keeps_active_versions(tiny_server):
    before = {t: greedy(tiny_server, t)[:2] for t in ("acme", "globex", "public", "swap")}
    assert before["swap"][1] != before["acme"][1]
    tiny_server.restart()
    after = {t: greedy(tiny_server, t)[:2] for t in ("acme", "globex", "public", "swap")}
    assert after == before
