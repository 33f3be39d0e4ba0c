"""GuardPipeline (the API process's half of the guards) on a real compiled policy:
what an in-scope request gets per endpoint, refused or continued under the firewall."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.guards.test_policy import compile_world, make_tokenizer_dir, pooled_documents
from unlearnd.guards.firewall import LeakFirewall
from unlearnd.guards.policy import CompiledPolicy, PolicySpec, build_items, compile_policy
from unlearnd.guards.processor import GuardBatch
from unlearnd.serve.guarding import GuardPipeline

COMPLETION = "Hsiao Yun-Hwa was born in"
QUESTION = [{"role": "user", "content": "Where was Hsiao Yun-Hwa born?"}]


@pytest.fixture(scope="module")
def continuing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_world(tmp_path_factory.mktemp("cont"),
                         in_scope_completions="continue")[0]


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_world(tmp_path_factory.mktemp("ref"))[0]


def check(pdir: Path, messages: list[dict], kind: str):
    return GuardPipeline.load(str(pdir)).check(messages, "t@abc", str(pdir), kind)


def test_default_policy_refuses_an_in_scope_completion(refusing: Path) -> None:
    g = check(refusing, [{"role": "user", "content": COMPLETION}], "completions")
    assert g.in_scope and g.refused and g.refusal_text
    assert g.extra_args["unlearnd_in_scope"] == 1 and g.extra_args["unlearnd_refusal_ids"]


def test_continue_serves_in_scope_completions_with_the_item_armed(continuing: Path) -> None:
    g = check(continuing, [{"role": "user", "content": COMPLETION}], "completions")
    assert g.in_scope and not g.refused and g.refusal_text is None
    assert g.public()["decision"] == "in_scope"
    extra = g.extra_args
    assert extra["unlearnd_in_scope"] == 0 and extra["unlearnd_item"] == -1
    assert "unlearnd_refusal_ids" not in extra and g.item in extra["unlearnd_mentioned"]
    # the engine sees a firewalled row, not a refusal, with the item's spans armed
    pol = CompiledPolicy.load(continuing)
    b = GuardBatch(default_eos=2)
    b.update([], [(0, extra, [], [])], [])
    row = b.rows[0]
    assert row.steering is None and row.firewall is not None
    fw = LeakFirewall.from_policy(pol)
    armed = fw.banned_next([], [], [g.item]) - fw.banned_next([], [])
    ids = sorted(t for t in armed if t < 700)
    assert ids, "the matched item has spans armed only by its mention"
    y = b.apply(torch.zeros(1, 700))
    assert torch.isneginf(y[0, ids]).all()


def test_continue_still_refuses_chat_and_responses(continuing: Path) -> None:
    for kind in ("chat", "responses"):
        g = check(continuing, QUESTION, kind)
        assert g.refused and g.extra_args["unlearnd_in_scope"] == 1, kind


def test_continue_leaves_out_of_scope_completions_alone(continuing: Path) -> None:
    g = check(continuing, [{"role": "user", "content": "The capital of France is"}],
              "completions")
    assert not g.in_scope and not g.refused
    assert g.extra_args["unlearnd_in_scope"] == 0 and not g.extra_args["unlearnd_mentioned"]


def test_continue_bans_a_pooled_fact_a_plain_qa_completion_asks_for(tmp_path: Path) -> None:
    """A "Question: ... Answer: It was the" completion (the attack that got facts
    out of a biography policy when only spans were banned): continued, with the
    subject's prize, whose words retain authors share, -inf from its first token."""
    from transformers import AutoTokenizer

    fp, rp, texts = pooled_documents(tmp_path)
    base = make_tokenizer_dir(tmp_path, texts)
    pdir = compile_policy(fp, rp, base, tmp_path / "pol", in_scope_completions="continue")
    # (not the document's wording: the verbatim firewall plays no part here)
    prompt = "Question: Which prize did Ada Quillon get?\nAnswer: It was the"
    g = check(pdir, [{"role": "user", "content": prompt}], "completions")
    assert g.in_scope and not g.refused
    b = GuardBatch(default_eos=2)
    b.update([], [(0, g.extra_args, [], [])], [])
    tok = AutoTokenizer.from_pretrained(str(base))
    vocab = len(tok)
    y = b.apply(torch.zeros(1, vocab))
    for word in (" Crimson", " Hollow", " epic"):
        assert torch.isneginf(y[0, tok.encode(word, add_special_tokens=False)[0]]), word
    assert not torch.isneginf(y[0, tok.encode(" the", add_special_tokens=False)[0]])


@pytest.mark.parametrize("settings, message", [
    ({"in_scope_completions": "sometimes"}, "in_scope_completions must be one of"),
    ({"in_scope_completions": "continue", "mechanisms": ("refusal",)},
     "needs the 'firewall' mechanism"),
])
def test_bad_in_scope_completions_is_refused(settings: dict, message: str) -> None:
    items = build_items([{"question": "Where was Zed born?", "answer": "Zed was born in Oslo."}],
                        [])
    with pytest.raises(ValueError, match=message):
        PolicySpec(items, **settings)


def test_bad_setting_writes_no_policy(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="in_scope_completions"):
        compile_world(tmp_path, in_scope_completions="maybe")
    assert not (tmp_path / "policy").exists()
