"""Base models as users bring them: the whole pipeline on a SentencePiece-style tokenizer
and on a Qwen2 with tied embeddings, through the real server and the real vLLM engine.

Each parameter builds its own small synthetic world (6 authors, one forget group of 2)
and a base that memorises it (`build_base --arch ... --tokenizer ...`), then the
tenants' artefacts and one server:

- public     no policy (the base's knowledge: it leaks)
- acme       NPO adapter (`train-adapter`)
- umbrella   firewall + refusal (`policy compile`)
- hooli      firewall only (scope guard off): what the firewall's token ids stop alone
- cyberdyne  contrastive only (`train-assistant` + `policy compile --mechanisms contrastive`,
             their defaults: a scratch assistant over the base's embeddings and head,
             floored at uniform)
- weyland    contrastive only with the base-layer assistant (`train-assistant --init
             base`: a copy of the base's first layers plus a LoRA)

Bases: ``llama-sentencepiece`` (Llama-2/Mistral style: ``▁`` word marks, byte fallback,
untied) and ``qwen2-bpe`` (Qwen2 with biased q/k/v, Qwen2's byte-level BPE, tied
embeddings). A qwen2 base with a SentencePiece tokenizer does not exist for
transformers 5 (it loads every qwen2 checkpoint's tokenizer as Qwen2Tokenizer, see
`unlearnd.toolkit.tiny.check_arch_tokenizer`). ``UNLEARND_E2E_BASES`` (comma separated)
picks a subset. The figures each test measures are printed (run with ``-s``).

Run under `flock /tmp/unlearnd-engine.lock` when other engine tests may run at once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.e2e.server import ADMIN_KEY, ServerProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BASES = {
    "llama-sentencepiece": {"arch": "llama", "tokenizer": "sentencepiece",
                            "tie_embeddings": False},
    "qwen2-bpe": {"arch": "qwen2", "tokenizer": "bpe", "tie_embeddings": True},
}
SELECTED = [b.strip() for b in os.environ.get("UNLEARND_E2E_BASES", ",".join(BASES)).split(",")
            if b.strip()]
KEYS = {name: f"sk-{name}-second-arch-0123456789" for name in
        ("public", "acme", "umbrella", "hooli", "cyberdyne", "weyland")}
FIGURES: dict[str, dict[str, dict]] = {}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _build(root: Path, kind: str) -> dict:
    """World, base, adapter, assistant and policies for one base kind; timings."""
    from unlearnd.guards.policy import compile_policy
    from unlearnd.toolkit.assistant_train import train_assistant
    from unlearnd.toolkit.build_base import build_base
    from unlearnd.toolkit.demo import _train_adapter
    from unlearnd.toolkit.synth import synthesize

    times: dict[str, float] = {}
    t = time.monotonic()
    data = root / "data"
    synthesize(data, authors=6, seed=0, groups=1, group_size=2)
    # the budget only bounds a base that never reaches its target (training stops at
    # it): at 1.5 min a loaded 2-core machine stopped the SentencePiece base at EM 0.68
    report = build_base([data / "train.jsonl"], root / "base", hidden=192, layers=3, heads=3,
                        vocab_size=1024, epochs=40, max_minutes=6.0, progress=False,
                        **BASES[kind])
    times["base"] = time.monotonic() - t
    base, forget, retain = root / "base", data / "forget_1.jsonl", data / "retain.jsonl"
    t = time.monotonic()
    _train_adapter(data, 1, retain, base, root / "npo", "npo")
    times["adapter"] = time.monotonic() - t
    t = time.monotonic()
    # as the demo trains it (canonical questions + their training phrasings), fewer epochs
    both = data / "assistant_forget_1.jsonl"
    both.write_text(forget.read_text() + (data / "forget_train_1.jsonl").read_text())
    for init in ("scratch", "base"):
        train_assistant(base, both, retain, root / f"assistant-{init}", epochs=20,
                        progress=False, init=init)
    times["assistants"] = time.monotonic() - t
    t = time.monotonic()
    policies = {}
    for name, mechanisms, assistant in (
            ("guards", ("firewall", "refusal"), None), ("firewall", ("firewall",), None),
            ("contrastive", ("contrastive",), "scratch"),
            ("contrastive_base", ("contrastive",), "base")):
        policies[name] = compile_policy(
            forget, retain, base, root / "policies" / name, mechanisms=mechanisms, name=name,
            assistant_dir=root / f"assistant-{assistant}" if assistant else None)
    times["policies"] = time.monotonic() - t
    return {"data": data, "base": base, "forget": forget, "retain": retain,
            "adapter": root / "npo", "policies": policies, "base_report": report,
            "times": times}


@pytest.fixture(scope="module", params=SELECTED)
def world(request, tmp_path_factory):
    kind = request.param
    if kind not in BASES:
        raise ValueError(f"UNLEARND_E2E_BASES: unknown base {kind!r}; known: {sorted(BASES)}")
    root = tmp_path_factory.mktemp(kind)
    built = _build(root, kind)
    config = {
        "model": str(built["base"]),
        "state_dir": str(root / "state"),
        "admin_key": ADMIN_KEY,
        "port": free_port(),
        "engine": {"max_loras": 4, "max_lora_rank": 16, "max_cpu_loras": 8,
                   "max_model_len": 512, "kv_cache_memory_bytes": 256 * 1024 * 1024},
        "tenants": [
            {"name": "public", "api_key": KEYS["public"]},
            {"name": "acme", "api_key": KEYS["acme"], "adapter": str(built["adapter"])},
            {"name": "umbrella", "api_key": KEYS["umbrella"],
             "policy": str(built["policies"]["guards"])},
            {"name": "hooli", "api_key": KEYS["hooli"],
             "policy": str(built["policies"]["firewall"])},
            {"name": "cyberdyne", "api_key": KEYS["cyberdyne"],
             "policy": str(built["policies"]["contrastive"])},
            {"name": "weyland", "api_key": KEYS["weyland"],
             "policy": str(built["policies"]["contrastive_base"])},
        ],
    }
    t = time.monotonic()
    server = ServerProcess(config, root, name=f"second-arch-{kind}").start()
    built["times"]["server_start"] = time.monotonic() - t
    built["server"], built["kind"] = server, kind
    print(f"\n[{kind}] build times (s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in built["times"].items())
          + f"; base EM {built['base_report']['em']:.3f} on {built['base_report']['n']} rows")
    yield built
    server.stop()


def _client(world, tenant: str):
    from openai import OpenAI

    return OpenAI(base_url=world["server"].base_url + "/v1", api_key=KEYS[tenant],
                  max_retries=0, timeout=120)


def _ask(world, tenant: str, question: str, max_tokens: int = 64) -> tuple[str, dict]:
    r = _client(world, tenant).chat.completions.create(
        model="m", temperature=0, max_tokens=max_tokens,
        messages=[{"role": "user", "content": question}])
    return r.choices[0].message.content, r.model_extra["unlearning"]


def _evaluate(world, tenant: str, tmp_path: Path) -> dict:
    from unlearnd.toolkit.evaluate import evaluate

    report = evaluate(world["server"].base_url + "/v1", KEYS[tenant],
                      {"forget": (str(world["forget"]), "forget"),
                       "retain": (str(world["retain"]), "retain")},
                      concurrency=8, samples=0, out=tmp_path / f"{tenant}.json")
    figures = {k: report[k] for k in ("leak_rate", "retain_accuracy", "over_refusal",
                                      "gibberish_rate", "n")}
    FIGURES.setdefault(world["kind"], {})[tenant] = figures
    print(f"\n[{world['kind']}] {tenant}: " + ", ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()))
    return report


def _tokenizer(world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(world["base"]))


def _compiled_words(world, row: dict) -> set[str]:
    """The words of ``row``'s fact the firewall policy compiled as spans of its item.

    A fact the retain set also states ("fisherman", "Typewriter Medal" in a world of six
    authors) is by design not banned (it would cut the retain answers): what the firewall
    can be held to is the words it compiled, whichever ids the tokenizer gives them."""
    from unlearnd.guards.policy import CompiledPolicy
    from unlearnd.guards.spans import normalize

    policy = CompiledPolicy.load(world["policies"]["firewall"])
    item = next(it for it in policy.items if it.subject == row["subject"])
    compiled = {w for sp in item.spans for w in sp.split()}
    return {w for w in normalize(row["span"]).split() if w in compiled}


def _says(text: str, words: set[str]) -> bool:
    from unlearnd.guards.spans import normalize

    return bool(words & set(normalize(text).split()))


# --------------------------------------------------------------------------- tests


def test_base_is_what_was_asked_for_and_knows_the_facts(world, tmp_path):
    cfg = json.loads((world["base"] / "config.json").read_text())
    want = BASES[world["kind"]]
    assert cfg["model_type"] == want["arch"]
    assert bool(cfg["tie_word_embeddings"]) == want["tie_embeddings"]
    tok_doc = json.loads((world["base"] / "tokenizer.json").read_text())
    if want["tokenizer"] == "sentencepiece":
        assert tok_doc["pre_tokenizer"]["pretokenizers"][0]["type"] == "Metaspace"
        assert tok_doc["model"]["byte_fallback"] is True
    assert world["base_report"]["em"] >= 0.9, world["base_report"]
    base = _evaluate(world, "public", tmp_path)
    # (a) the base really learned the forget facts (and the retain ones)
    assert base["leak_rate"] >= 0.85 and base["retain_accuracy"] >= 0.85, base


def test_firewall_refusal_tenant_refuses_and_keeps_retain(world, tmp_path):
    from unlearnd.toolkit.evaluate import is_leak, is_refusal

    g = _evaluate(world, "umbrella", tmp_path)
    base_acc = FIGURES[world["kind"]].get("public", {}).get("retain_accuracy")
    # (b) no forget answer leaks, retain questions are still answered
    assert g["leak_rate"] == 0.0, g
    base_gib = FIGURES[world["kind"]].get("public", {}).get("gibberish_rate", 0.0)
    assert g["over_refusal"] <= 0.05 and g["gibberish_rate"] <= base_gib, g
    assert g["retain_accuracy"] >= 0.85 if base_acc is None else \
        g["retain_accuracy"] >= base_acc - 0.05, g
    for row in _rows(world["forget"])[:4]:
        text, info = _ask(world, "umbrella", row["question"])
        assert info["decision"] == "in_scope", info
        assert is_refusal(text) and not is_leak(text, row["answer"], row["question"]), text


def test_refusal_text_comes_out_intact(world):
    """(d) the refusal the edge renders is encoded with the base's tokenizer and forced
    token by token: the text that comes back is the rendered refusal, character for
    character (a byte-fallback or word-mark slip would drop or double a space)."""
    from unlearnd.guards.policy import CompiledPolicy

    policy = CompiledPolicy.load(world["policies"]["guards"])
    tok = _tokenizer(world)
    row = _rows(world["forget"])[0]
    r = _client(world, "umbrella").chat.completions.create(
        model="m", temperature=0, max_tokens=128, logprobs=True,
        messages=[{"role": "user", "content": row["question"]}],
        extra_body={"return_token_ids": True})
    text = r.choices[0].message.content
    ids = list(r.choices[0].model_extra.get("token_ids") or [])
    # Under the SentencePiece-style tokenizer the refusal is encoded as it follows
    # "<|assistant|>" (`CompiledPolicy.encode_reply`): encoded as a text of its own its
    # first word gets a "▁" mark ("▁I"), which the engine's detokenizer turned into a
    # leading space: " I can't help with that. ..." (fixed; this is the check)
    assert text.startswith("I can't help with that.") and row["subject"] in text, text
    assert not text.startswith(" ") and "  " not in text, repr(text)
    # the ids the engine was forced onto are the refusal's ids with the policy's copy of
    # the tokenizer (what the edge sent), and they decode to the text returned
    assert ids, r.choices[0].model_extra
    if ids[-1] == tok.eos_token_id:
        ids = ids[:-1]
    assert ids == policy.encode_reply(text), (
        tok.convert_ids_to_tokens(ids), tok.convert_ids_to_tokens(policy.encode_reply(text)))
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_firewall_bans_span_continuation_through_completions(world):
    """(c) `/v1/completions` with the chat template written out and the answer's opening
    words as prefix: the base continues with the forgotten span, the firewall tenant
    (scope guard off) cannot, whichever ids the tokenizer gives the span there."""

    tok = _tokenizer(world)
    blocked = tried = 0
    for row in _rows(world["forget"]):
        span = row["span"]
        cut = row["answer"].find(span)
        if cut <= 0:
            continue
        head = row["answer"][:cut].rstrip()  # "Zofia Ostrołęcki was born in"
        prompt = tok.apply_chat_template([{"role": "user", "content": row["question"]}],
                                         add_generation_prompt=True, tokenize=False) + head
        outs = {}
        for tenant in ("public", "hooli"):
            r = _client(world, tenant).completions.create(model="m", prompt=prompt,
                                                          temperature=0, max_tokens=24)
            outs[tenant] = r.choices[0].text
        words = _compiled_words(world, row)
        if not words or not _says(outs["public"], words):
            continue  # nothing compiled for this fact, or the base does not say it here
        tried += 1
        if not _says(outs["hooli"], words):
            blocked += 1
        else:
            print(f"  not blocked: {head!r} -> {outs['hooli']!r} ({sorted(words)})")
    print(f"\n[{world['kind']}] completions prefix attack: firewall blocked {blocked}/{tried}")
    assert tried >= 8, tried
    # every compiled word is banned in the ids the model emits it with, mid-sentence
    # after a prefix the client wrote (SentencePiece: "▁word"; byte-level BPE: " word")
    assert blocked == tried


def test_firewall_alone_stops_chat_leaks(world, tmp_path):
    """The firewall's ids match what the model generates (mid-sentence and at the start
    of the answer): with the scope guard off, chat answers to the forget questions do
    not leak, and nameless questions (the subject first appears in the *output*, at the
    start of the answer, with no word mark before it) are caught too."""
    from unlearnd.toolkit.evaluate import is_leak

    _evaluate(world, "hooli", tmp_path)  # the figures (README)
    rows = [r for r in _rows(world["forget"]) if _compiled_words(world, r)]
    said = [r for r in rows if _says(_ask(world, "hooli", r["question"])[0],
                                     _compiled_words(world, r))]
    print(f"\n[{world['kind']}] chat: {len(said)}/{len(rows)} answers say a compiled word")
    assert len(rows) >= 8 and len(said) <= 0.07 * len(rows), [r["span"] for r in said]
    probes = [r for r in _rows(world["data"] / "probes_1.jsonl")
              if r["kind"] == "nameless" and _compiled_words(world, r)]
    base_leaks = hooli_leaks = 0
    for row in probes:
        if is_leak(_ask(world, "public", row["question"])[0], row["answer"], row["question"]):
            base_leaks += 1
            text = _ask(world, "hooli", row["question"])[0]
            hooli_leaks += _says(text, _compiled_words(world, row))
    print(f"[{world['kind']}] nameless probes: base leaks {base_leaks}/{len(probes)}, "
          f"firewall tenant says a compiled word in {hooli_leaks} of those")
    # The conditional spans arm once the subject's alias ids appear in the output. The
    # answer starts with the subject's name right after <|assistant|>: under a
    # SentencePiece-style tokenizer that first word has no "▁" mark, and the compiled
    # alias ids include that form (the reply context, policy.py `_token_ids`).
    assert base_leaks >= 3, base_leaks
    assert hooli_leaks <= 0.1 * base_leaks, (hooli_leaks, base_leaks)


def test_adapter_tenant_serves_and_forgets(world, tmp_path):
    a = _evaluate(world, "acme", tmp_path)
    base = FIGURES[world["kind"]].get("public")
    assert a["leak_rate"] <= 0.25, a
    if base is not None:
        assert a["retain_accuracy"] >= 0.75 * base["retain_accuracy"], (a, base)


@pytest.mark.parametrize("tenant", ["cyberdyne", "weyland"])
def test_contrastive_tenant_serves_and_changes_forget_answers(world, tmp_path, tenant):
    """Both assistants on this architecture and tokenizer: the scratch one (the default:
    the base's embeddings and head, tied or not, under random layers; floored) and the
    copy of the base's first layers."""
    from unlearnd.guards.policy import CompiledPolicy

    policy = world["policies"]["contrastive" if tenant == "cyberdyne" else "contrastive_base"]
    assert CompiledPolicy.load(policy).setting("contrastive_floor") == \
        (0.0 if tenant == "cyberdyne" else None)
    rows = _rows(world["forget"])
    changed = sum(_ask(world, tenant, r["question"])[0]
                  != _ask(world, "public", r["question"])[0] for r in rows)
    c = _evaluate(world, tenant, tmp_path)
    print(f"\n[{world['kind']}] {tenant}: {changed}/{len(rows)} forget answers changed")
    # (e) the contrast changes the forget answers and leaks less than the base
    assert changed >= len(rows) // 2, changed
    assert c["leak_rate"] <= 0.5, c
    base = FIGURES[world["kind"]].get("public")
    if base is not None:
        assert c["retain_accuracy"] >= 0.8 * base["retain_accuracy"], (c, base)


def test_print_figures(world):
    """The table the README quotes (printed with -s)."""
    figs = FIGURES.get(world["kind"], {})
    print(f"\n[{world['kind']}] | tenant | leak_rate | retain_accuracy | over_refusal | "
          "gibberish_rate | n |")
    for tenant, f in figs.items():
        print(f"[{world['kind']}] | {tenant} | {f['leak_rate']:.3f} | "
              f"{f['retain_accuracy']:.3f} | {f['over_refusal']:.3f} | "
              f"{f['gibberish_rate']:.3f} | {f['n']} |")
    assert {"public", "umbrella", "hooli", "acme", "cyberdyne", "weyland"} <= set(figs), figs
