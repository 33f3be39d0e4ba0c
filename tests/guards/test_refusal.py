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
        tok, bias = steer.step(out)
        assert bias == steer.strength
        emitted = choose(step, tok)
        if emitted == EOS:
            return out
        out.append(emitted)
    raise AssertionError("steering did not terminate")


def test_follows_refusal_then_eos() -> None:
    s = RefusalSteering([5, 6, 7], EOS, 30.0)
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
    assert s.step([1, 2]) == (EOS, 30.0)
    assert s.step([1, 2, 1]) == (EOS, 30.0)


def test_validation() -> None:
    with pytest.raises(ValueError, match="refusal_ids"):
        RefusalSteering([], EOS)
    with pytest.raises(ValueError, match="refusal_ids"):
        RefusalSteering([1, -2], EOS)
    with pytest.raises(ValueError, match="strength"):
        RefusalSteering([1], EOS, strength=0)
    with pytest.raises(ValueError, match="eos"):
        RefusalSteering([1], -1)


def test_render_names_subject_reason_and_policy(tmp_path) -> None:
    pol = CompiledPolicy.load(compile_world(tmp_path)[0])
    d = ScopeGuard(pol).check([{"role": "user", "content": "Where was Elvin Mammadov born?"}])
    text = render_refusal(pol, d)
    assert "Elvin Mammadov" in text and d.reason in text and "test-policy" in text
    ids = refusal_token_ids(pol, d)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pol.dir / "tokenizer"))
    assert tok.decode(ids) == text
