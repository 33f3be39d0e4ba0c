"""Refusal text and the steering cursor."""

from __future__ import annotations

import pytest
from tests.guards.test_policy import compile_world

from unlearnd.guards.policy import CompiledPolicy
from unlearnd.guards.refusal import RefusalSteering, refusal_token_ids, render_refusal
from unlearnd.guards.scope import ScopeGuard

EOS = 99


def run(steer: RefusalSteering, choose) -> list[int]:
    """Decode with ``choose(step, pushed_token) -> emitted token`` until EOS."""
    out: list[int] = []
    for step in range(50):
        tok = steer.step(out)
        emitted = choose(step, tok)
        if emitted == EOS:
            return out
        out.append(emitted)
    raise AssertionError("steering did not terminate")


def test_follows_refusal_then_eos() -> None:
    s = RefusalSteering([5, 6, 7], EOS)
    assert run(s, lambda _i, t: t) == [5, 6, 7]
    assert s.done and s.divergences == 0


def test_divergence_continues_from_longest_matching_run() -> None:
    ref = [1, 2, 3, 4, 5, 6]
    s = RefusalSteering(ref, EOS)
    # step 1 samples 42 instead of 2: treated as a substitute, refusal resumes at 3
    out = run(s, lambda i, t: 42 if i == 1 else t)
    assert out == [1, 42, 3, 4, 5, 6] and s.divergences == 1
    # a sampled token that jumps ahead in the refusal resyncs after it
    s = RefusalSteering(ref, EOS)
    out = run(s, lambda i, t: 4 if i == 1 else t)
    assert out == [1, 4, 5, 6]


def test_after_completion_only_eos_is_pushed() -> None:
    s = RefusalSteering([1, 2], EOS)
    assert s.step([1, 2]) == EOS
    assert s.step([1, 2, 1]) == EOS


def test_validation() -> None:
    with pytest.raises(ValueError, match="refusal_ids"):
        RefusalSteering([], EOS)
    with pytest.raises(ValueError, match="refusal_ids"):
        RefusalSteering([1, -2], EOS)
    with pytest.raises(ValueError, match="eos"):
        RefusalSteering([1], -1)


def test_render_names_the_subject_the_user_named_and_not_the_policy(tmp_path) -> None:
    pol = CompiledPolicy.load(compile_world(tmp_path)[0])
    d = ScopeGuard(pol).check([{"role": "user", "content": "Where was Elvin Mammadov born?"}])
    assert d.in_scope and d.named
    text = render_refusal(pol, d)
    assert "Elvin Mammadov" in text and d.reason in text
    assert "test-policy" not in text  # the internal name only with {policy} in the template
    ids = refusal_token_ids(pol, d)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pol.dir / "tokenizer"))
    assert tok.decode(ids) == text


def _alias_words(pol: CompiledPolicy, item: int) -> set[str]:
    from unlearnd.guards.spans import words

    return {w for a in pol.items[item].aliases for w in words(a)} | set(
        words(pol.items[item].subject))


def test_refusal_to_a_nameless_question_names_no_one(tmp_path) -> None:
    """Asked who was born in a place on a date, "I can't discuss <name>" is the answer."""
    from unlearnd.guards.scope import ScopeDecision
    from unlearnd.guards.spans import words

    pol = CompiledPolicy.load(compile_world(tmp_path)[0])
    d = ScopeDecision(True, 0.9, 0, pol.items[0].subject,
                      "The request closely matches a question covered by this policy.",
                      named=False, mention=None)
    text = render_refusal(pol, d)
    assert "the person you describe" in text
    assert not set(words(text)) & _alias_words(pol, 0), text


def test_ignorant_style_says_only_it_does_not_know(tmp_path) -> None:
    from unlearnd.guards.scope import ScopeDecision

    pol = CompiledPolicy.load(compile_world(tmp_path, refusal_style="ignorant")[0])
    d = ScopeGuard(pol).check([{"role": "user", "content": "Where was Elvin Mammadov born?"}])
    text = render_refusal(pol, d)
    assert text.startswith("I don't know.") and "removed" not in text and d.reason not in text
    d2 = ScopeDecision(True, 0.9, 0, pol.items[0].subject, "r", named=False, mention=None)
    assert "Mammadov" not in render_refusal(pol, d2)
