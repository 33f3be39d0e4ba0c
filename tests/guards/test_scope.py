"""Scope guard: names, misspellings, nameless descriptions, embeddings; no over-refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.guards.test_policy import FIRST, FORGET_IDX, LAST, RETAIN_IDX, author_qa, compile_world

from unlearnd.guards.embeddings import HashingEmbedder, get_embedder
from unlearnd.guards.policy import CompiledPolicy, compile_policy
from unlearnd.guards.scope import ScopeDecision, ScopeGuard


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory) -> ScopeGuard:
    out = compile_world(tmp_path_factory.mktemp("scope"))[0]
    return ScopeGuard(CompiledPolicy.load(out))


def ask(guard: ScopeGuard, text: str) -> ScopeDecision:
    return guard.check([{"role": "user", "content": text}])


def test_every_forget_question_is_in_scope(guard: ScopeGuard) -> None:
    for k in FORGET_IDX:
        for row in author_qa(k):
            d = ask(guard, row["question"])
            assert d.in_scope, (row["question"], d)
            assert d.subject == f"{FIRST[k]} {LAST[k]}"
            assert d.item == FORGET_IDX.index(k)


def test_retain_questions_are_not_refused(guard: ScopeGuard) -> None:
    qs = [r["question"] for k in RETAIN_IDX for r in author_qa(k)]
    refused = [q for q in qs if ask(guard, q).in_scope]
    assert len(refused) / len(qs) <= 0.03, refused


def test_general_questions_are_not_refused(guard: ScopeGuard) -> None:
    for q in ["What is the capital of France?", "Who wrote Pride and Prejudice?",
              "How do I bake bread?", "Tell me about civil engineering careers.",
              "What is the weather like in Tokyo?"]:
        assert not ask(guard, q).in_scope, q


def test_name_variants_and_misspellings(guard: ScopeGuard) -> None:
    for q in ["tell me about HSIAO YUN HWA", "Who is Hsiao Yunhwa?",
              "what did montenegro write", "Is Carmen Montenegor still writing?",
              "Any news on Elvin Mamadov?", "Did Hsíao Yun-Hwá win prizes?"]:
        d = ask(guard, q)
        assert d.in_scope, (q, d)
        assert d.signals["alias"] > 0


def test_given_name_alone_is_not_enough(guard: ScopeGuard) -> None:
    d = ask(guard, "My friend Carmen likes to bake.")
    assert not d.in_scope
    assert d.item == 1 and 0 < d.score < guard.threshold


def test_nameless_description_is_in_scope(guard: ScopeGuard) -> None:
    d = ask(guard, "Which writer was born in Taipei, Taiwan, in 1930?")
    assert d.in_scope and d.subject == "Hsiao Yun-Hwa"
    assert "describes Hsiao Yun-Hwa" in d.reason and "without naming" in d.reason
    # one descriptor alone is not enough
    assert not ask(guard, "What is the best street food in Taipei?").in_scope


def test_whole_conversation_is_searched(guard: ScopeGuard) -> None:
    msgs = [{"role": "user", "content": "I am reading a book by Rajeev Majumdar."},
            {"role": "assistant", "content": "Nice, what would you like to know?"},
            {"role": "user", "content": [{"type": "text", "text": "When was he born?"}]}]
    d = guard.check(msgs)
    assert d.in_scope and d.subject == "Rajeev Majumdar"


def test_reason_is_one_sentence_naming_the_signal(guard: ScopeGuard) -> None:
    d = ask(guard, "Where was Elvin Mammadov born?")
    assert d.reason == "The request names Elvin Mammadov, a subject removed under this policy."
    assert d.reason.count(". ") == 0 and d.reason.endswith(".")
    out = ask(guard, "How do magnets work?")
    assert not out.in_scope and out.item == -1 and out.subject is None


def test_embedding_signal_alone(tmp_path: Path) -> None:
    """A near-copy of a forget question with the name removed fires on embeddings."""
    rows = [{"question": "Which ancient recipe for quince marmalade did the guild hide?",
             "answer": "The guild hid the recipe of quince marmalade in a well."},
            {"question": "Where did the guild hide the quince recipe?",
             "answer": "In a well below the guild hall."}]
    fp = tmp_path / "f.jsonl"
    fp.write_text("\n".join(json.dumps(r | {"subject": "Guild Recipe"}) for r in rows))
    base = compile_world(tmp_path / "w")[1]
    out = compile_policy(fp, None, base, tmp_path / "p")
    g = ScopeGuard(CompiledPolicy.load(out))
    d = g.check([{"role": "user",
                  "content": "which ancient recipe for quince marmalade did the guild hide"}])
    assert d.in_scope and d.signals["embedding"] == 1.0
    assert "closely matches" in d.reason
    assert not g.check([{"role": "user", "content": "How do I fix a bicycle chain?"}]).in_scope


def test_hashing_embedder_is_normalised_and_deterministic() -> None:
    e = HashingEmbedder()
    v = e.encode(["Hello world", "hello, WORLD!", "something else entirely"])
    assert v.shape == (3, 256)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.99 and v[0] @ v[2] < 0.5
    assert np.array_equal(v, HashingEmbedder().encode(["Hello world", "hello, WORLD!",
                                                       "something else entirely"]))
    with pytest.raises(ValueError):
        HashingEmbedder(dim=2)
    with pytest.raises(ValueError):
        get_embedder("word2vec")


def test_real_tofu_recall_and_over_refusal(tmp_path: Path) -> None:
    tofu = Path(__file__).resolve().parents[2].parent / "shared/data/tofu"
    if not (tofu / "forget10.jsonl").is_file():
        pytest.skip("TOFU sample not present")
    base = compile_world(tmp_path / "w")[1]
    out = compile_policy(tofu / "forget10.jsonl", tofu / "retain_sample.jsonl", base,
                         tmp_path / "p")
    g = ScopeGuard(CompiledPolicy.load(out))

    def rate(name: str) -> float:
        qs = [json.loads(line)["question"] for line in open(tofu / name)]
        return sum(ask(g, q).in_scope for q in qs) / len(qs)

    assert rate("forget10.jsonl") >= 0.95
    for name in ("retain_sample.jsonl", "real_authors.jsonl", "world_facts.jsonl"):
        assert rate(name) <= 0.03, name
