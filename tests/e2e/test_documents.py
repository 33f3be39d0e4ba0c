"""Documents and subjects as forget requests, through the real server and engine.

A tiny base reads eight synthetic biographies as plain text until it recites them
(VerbMem 1.0 on its own). Two are forgotten:

- ``docs``: a policy compiled from the two documents alone (firewall + refusal; the
  verbatim firewall bans continuing any 6-token run of them);
- ``names``: a policy compiled from the two subjects' names alone.

VerbMem (MUSE: the first 16 tokens as a ``/v1/completions`` prompt, ROUGE-L F1 of the
greedy continuation against the true one) is measured per tenant on the forget and the
retain documents.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.server import ADMIN_KEY, ServerProcess, free_port
from tests.guards.test_policy import FIRST, LAST, biography

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FORGET, RETAIN = [0, 1], [2, 3, 4, 5, 6, 7]
KEYS = {"public": "sk-documents-public", "docs": "sk-documents-docs00",
        "names": "sk-documents-names0"}
PREFIX, CONTINUATION = 16, 48


def _train_on_texts(base: Path, texts: list[str], max_steps: int = 300) -> None:
    """Full-batch language modelling on ``texts`` until the loss is ~0 (memorised)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unlearnd.toolkit.muse import text_examples

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    ex = text_examples(tok, texts, max_len=256)
    pad = torch.nn.utils.rnn.pad_sequence
    ids = pad([torch.tensor(e[0]) for e in ex], batch_first=True,
              padding_value=tok.pad_token_id)
    labels = pad([torch.tensor(e[1]) for e in ex], batch_first=True, padding_value=-100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(max_steps):
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02:
            break
    model.save_pretrained(str(base), safe_serialization=True)


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory):
    from unlearnd.guards.policy import compile_policy
    from unlearnd.toolkit.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("documents")
    docs = {k: biography(k) for k in FORGET + RETAIN}
    base = make_tiny_model(root / "base", texts=list(docs.values()) + [
        "I can't help with that. Information about this subject was removed from this "
        "model. I'm happy to help with other questions."] * 3)
    _train_on_texts(base, list(docs.values()))
    forget = root / "forget_docs.jsonl"
    forget.write_text("".join(json.dumps({"text": docs[k]}) + "\n" for k in FORGET))
    retain = root / "retain_docs.jsonl"
    retain.write_text("".join(json.dumps({"text": docs[k]}) + "\n" for k in RETAIN))
    names = root / "subjects.jsonl"
    names.write_text("".join(json.dumps({"subject": f"{FIRST[k]} {LAST[k]}"}) + "\n"
                             for k in FORGET))
    pol_docs = compile_policy(forget, retain, base, root / "pol_docs")
    pol_names = compile_policy(names, retain, base, root / "pol_names")
    config = {
        "model": str(base), "state_dir": str(root / "state"), "admin_key": ADMIN_KEY,
        "port": free_port(),
        "engine": {"max_model_len": 512, "kv_cache_memory_bytes": 128 * 1024 * 1024},
        "tenants": [
            {"name": "public", "api_key": KEYS["public"]},
            {"name": "docs", "api_key": KEYS["docs"], "policy": str(pol_docs)},
            {"name": "names", "api_key": KEYS["names"], "policy": str(pol_names)},
        ],
    }
    server = ServerProcess(config, root, name="documents").start()
    server.base = base
    server.docs = docs
    yield server
    server.stop()


def _verbmem(server, tenant: str, keys: list[int]) -> float:
    from transformers import AutoTokenizer

    from unlearnd.toolkit.muse import verbmem_api, verbmem_cases, verbmem_score

    tok = AutoTokenizer.from_pretrained(str(server.base))
    cases = verbmem_cases(tok, [server.docs[k] for k in keys], prefix_tokens=PREFIX,
                          continuation_tokens=CONTINUATION)
    assert len(cases) == len(keys)
    outputs = verbmem_api(server.base_url, KEYS[tenant], cases, max_tokens=CONTINUATION)
    return verbmem_score(cases, outputs)


def test_documents_policy_stops_verbatim_continuation(docs_server) -> None:
    public_forget = _verbmem(docs_server, "public", FORGET)
    public_retain = _verbmem(docs_server, "public", RETAIN)
    docs_forget = _verbmem(docs_server, "docs", FORGET)
    docs_retain = _verbmem(docs_server, "docs", RETAIN)
    print(f"VerbMem forget/retain: public {public_forget:.3f}/{public_retain:.3f}, "
          f"docs {docs_forget:.3f}/{docs_retain:.3f}")
    assert public_forget >= 0.9, "the base must recite its documents for this to mean much"
    assert docs_forget <= 0.3, docs_forget
    assert docs_retain >= 0.98 * public_retain, (docs_retain, public_retain)


def test_chat_asking_for_the_text_does_not_get_it(docs_server) -> None:
    from openai import OpenAI

    from unlearnd.toolkit.muse import rouge_l_f1

    text = docs_server.docs[FORGET[0]]
    head, tail = " ".join(text.split()[:8]), " ".join(text.split()[8:40])
    client = OpenAI(base_url=docs_server.base_url + "/v1", api_key=KEYS["docs"],
                    max_retries=0)
    r = client.chat.completions.create(
        model="m", temperature=0, max_tokens=64,
        messages=[{"role": "user", "content": f"Continue this text: {head}"}])
    out = r.choices[0].message.content
    assert rouge_l_f1(out, tail) < 0.3, out
    assert r.model_extra["unlearning"]["decision"] == "in_scope"  # it names the subject


def test_subject_names_alone_refuse_named_requests(docs_server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=docs_server.base_url + "/v1", api_key=KEYS["names"],
                    max_retries=0)

    def ask(content: str):
        r = client.chat.completions.create(model="m", temperature=0, max_tokens=48,
                                           messages=[{"role": "user", "content": content}])
        return r.choices[0].message.content, r.model_extra["unlearning"]

    name = f"{FIRST[FORGET[1]]} {LAST[FORGET[1]]}"
    text, info = ask(f"Tell me everything about {name}.")
    assert info["decision"] == "in_scope" and name in text, (text, info)
    other = f"{FIRST[RETAIN[0]]} {LAST[RETAIN[0]]}"
    _, info = ask(f"Tell me everything about {other}.")
    assert info["decision"] != "in_scope", info
    # completions: a forget document's opening names the subject, so it is refused; a
    # retain document's is served exactly as the base serves it
    from transformers import AutoTokenizer

    from unlearnd.toolkit.evaluate import is_refusal

    tok = AutoTokenizer.from_pretrained(str(docs_server.base))

    def complete(key: str, k: int):
        ids = [tok.bos_token_id] + tok.encode(docs_server.docs[k],
                                              add_special_tokens=False)[:PREFIX]
        return OpenAI(base_url=docs_server.base_url + "/v1", api_key=KEYS[key],
                      max_retries=0).completions.create(model="m", prompt=ids, max_tokens=48,
                                                        temperature=0)

    r = complete("names", FORGET[1])
    assert r.model_extra["unlearning"]["decision"] == "in_scope"
    assert is_refusal(r.choices[0].text), r.choices[0].text
    assert complete("names", RETAIN[1]).choices[0].text == \
        complete("public", RETAIN[1]).choices[0].text


def test_eval_reports_verbmem(docs_server, tmp_path: Path) -> None:
    """`unlearnd eval --forget-documents/--retain-documents`: VerbMem beside the QA
    metrics, in the report and its Markdown."""
    from tests.guards.test_policy import author_qa
    from unlearnd.toolkit.evaluate import evaluate, report_paths

    forget_qa, retain_qa = tmp_path / "f.jsonl", tmp_path / "r.jsonl"
    forget_qa.write_text("".join(json.dumps(r) + "\n" for r in author_qa(FORGET[0])[:3]))
    retain_qa.write_text("".join(json.dumps(r) + "\n" for r in author_qa(RETAIN[0])[:3]))
    root = docs_server.base.parent
    report = evaluate(docs_server.base_url, KEYS["docs"],
                      {"forget": (forget_qa, "forget"), "retain": (retain_qa, "retain")},
                      samples=0, max_tokens=16, out=tmp_path / "report.json",
                      forget_documents=root / "forget_docs.jsonl",
                      retain_documents=root / "retain_docs.jsonl",
                      tokenizer=docs_server.base)
    assert report["verbmem"]["forget"]["n"] == len(FORGET)
    assert report["verbmem"]["retain"]["n"] == len(RETAIN)
    assert report["verbmem_forget"] <= 0.3 and report["verbmem_retain"] >= 0.95
    md = report_paths(tmp_path / "report.json")["md"].read_text()
    assert "verbmem_forget" in md and "verbmem_retain" in md
