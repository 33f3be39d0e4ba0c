"""Guards, adapters and contrastive decoding on a small world the model really knows.

Builds (once, cached under `.cache/e2e-world` in the checkout) a small synthetic world,
a base model that memorised it, an NPO adapter, a ULD assistant and compiled policies,
then serves them with the real engine in one server:

- public    no policy (the base's knowledge: it leaks)
- acme      NPO adapter, group 1
- umbrella  firewall + refusal (scope guard on), group 1
- hooli     firewall only (scope guard off), group 1
- cyberdyne contrastive only (a scratch ULD assistant, floored at uniform), group 1
- soylent   a base-layer LoRA assistant behind contrastive_gain_gate, group 1

The world, the server and the `rows`/`ask` helpers live in tests/e2e/conftest.py
(tests/e2e/test_attacks.py uses them too).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import ask, rows

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

def test_refusal_names_subject_with_reason_and_streams(guard_server):
    from openai import OpenAI

    from unlearnd.toolkit.evaluate import is_gibberish, is_leak, is_refusal

    t = guard_server.doc["tenants"]["umbrella"]
    for row in rows(t["forget"], 6):
        text, info = ask(guard_server, "umbrella", row["question"])
        assert info["decision"] == "in_scope" and info["reason"], info
        assert row["subject"] in row["question"]  # the forget questions name the subject
        assert info["subject"] == row["subject"]  # ... so the response may say it
        assert is_refusal(text) and row["subject"] in text, text
        assert "guards_1" not in text  # the policy's internal name is not in the text
        assert not is_gibberish(text)
        assert not is_leak(text, row["answer"], row["question"])
    client = OpenAI(base_url=guard_server.base_url + "/v1", api_key=t["api_key"])
    q = rows(t["forget"], 1)[0]["question"]
    chunks = [c for c in client.chat.completions.create(
        model="m", temperature=0, max_tokens=96, stream=True,
        messages=[{"role": "user", "content": q}])]
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and
              c.choices[0].delta.content]
    assert len(pieces) > 5  # token by token, like any other output
    assert "".join(pieces) == ask(guard_server, "umbrella", q)[0]


def test_mixed_batch_guarded_and_unguarded(guard_server):
    from openai import AsyncOpenAI

    doc = guard_server.doc["tenants"]
    forget = rows(doc["umbrella"]["forget"], 4)
    retain = rows(doc["umbrella"]["retain"], 4)
    jobs = [(t, r["question"]) for r in forget + retain
            for t in ("public", "umbrella", "hooli", "acme")]
    alone = {job: ask(guard_server, *job)[0] for job in jobs}

    async def together():
        async def one(tenant, q):
            c = AsyncOpenAI(base_url=guard_server.base_url + "/v1",
                            api_key=doc[tenant]["api_key"], max_retries=0)
            r = await c.chat.completions.create(model="m", temperature=0, max_tokens=96,
                                                messages=[{"role": "user", "content": q}])
            return r.choices[0].message.content
        return await asyncio.gather(*(one(*job) for job in jobs))

    for job, text in zip(jobs, asyncio.run(together()), strict=True):
        assert text == alone[job], job
    # Out-of-scope traffic of a guarded tenant is served exactly as the base serves it.
    for r in retain:
        assert alone[("umbrella", r["question"])] == alone[("public", r["question"])]


def test_firewall_alone_blocks_leaks_keeps_retain(guard_server):
    from unlearnd.toolkit.evaluate import is_leak

    doc = guard_server.doc["tenants"]
    forget = rows(doc["hooli"]["forget"])
    background = [r["answer"] for r in rows(doc["hooli"]["retain"])]  # as `unlearnd eval`
    leaks_base = sum(is_leak(ask(guard_server, "public", r["question"])[0], r["answer"],
                             r["question"], background=background) for r in forget)
    leaks = []
    before = _suppressed(guard_server, "hooli")
    for r in forget:
        text, info = ask(guard_server, "hooli", r["question"])
        assert info["decision"] != "in_scope"  # the scope guard is off for this tenant
        assert "suppressed_tokens" not in info  # an oracle: operators' metric only
        if is_leak(text, r["answer"], r["question"], background=background):
            leaks.append((text, r["answer"]))
    assert leaks_base >= 0.8 * len(forget)
    assert len(leaks) <= 0.1 * len(forget), leaks
    assert _suppressed(guard_server, "hooli") > before
    for r in rows(doc["hooli"]["retain"], 10):
        assert ask(guard_server, "hooli", r["question"])[0] == \
            ask(guard_server, "public", r["question"])[0]


def _suppressed(server, tenant: str) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        if fam.name == "unlearnd_firewall_suppressed_tokens":
            return sum(s.value for s in fam.samples if s.labels.get("tenant") == tenant
                       and s.name.endswith("_total"))
    return 0.0


def test_eval_harness_through_server(guard_server, tmp_path):
    from unlearnd.toolkit.evaluate import evaluate

    doc = guard_server.doc["tenants"]
    reports = {}
    for tenant in ("public", "umbrella", "acme", "cyberdyne", "soylent"):
        t = doc[tenant]
        reports[tenant] = evaluate(
            guard_server.base_url + "/v1", t["api_key"],
            {"forget": (t["forget"], "forget"), "probes": (t["probes"], "probes"),
             "retain": (t["retain"], "retain")}, concurrency=8, samples=4,
            out=tmp_path / f"{tenant}.json")
    base = reports["public"]
    assert base["leak_rate"] >= 0.85 and base["retain_accuracy"] >= 0.85
    g = reports["umbrella"]
    assert g["leak_rate"] <= 0.05 and g["probe_leak_rate"] <= 0.15
    assert g["leak_at_k"] <= 0.05 and g["probe_leak_at_k"] <= 0.15
    assert g["over_refusal"] <= 0.05 and g["gibberish_rate"] == 0
    a = reports["acme"]
    assert a["leak_rate"] <= 0.2 and a["retain_accuracy"] >= 0.8 * base["retain_accuracy"]
    c = reports["cyberdyne"]
    assert c["leak_rate"] <= 0.3 and c["retain_accuracy"] >= 0.85 * base["retain_accuracy"]
    # the gated contrast runs the assistant's base layers without its LoRA in the engine
    # (a row that failed there would end at once: no retain answer); it keeps the
    # retain set and still contrasts away forget answers
    s = reports["soylent"]
    assert s["n_errors"] == 0 and s["retain_accuracy"] >= 0.85 * base["retain_accuracy"]
    assert s["leak_rate"] < base["leak_rate"]
    for name in ("public", "umbrella"):
        assert (tmp_path / f"{name}.md").is_file() and (tmp_path / f"{name}.png").is_file()
    report = json.loads((tmp_path / "umbrella.json").read_text())
    assert set(report) >= {"leak_rate", "probe_leak_rate", "retain_accuracy", "over_refusal",
                           "gibberish_rate", "sets"}


def test_guard_metrics_per_tenant(guard_server):
    text = httpx.get(guard_server.base_url + "/metrics").text
    values = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("tenant") == "umbrella":
                values[(s.name, s.labels.get("decision"))] = s.value
    assert values[("unlearnd_scope_decisions_total", "in_scope")] > 0
    assert values[("unlearnd_scope_decisions_total", "out_of_scope")] > 0
    assert values[("unlearnd_refusals_total", None)] > 0
    assert values[("unlearnd_guard_latency_seconds_count", None)] > 0
