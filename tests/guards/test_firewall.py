"""Leak firewall: token automaton, prefix allowance, conditioning, incrementality."""

from __future__ import annotations

import numpy as np
import pytest
from tests.guards.test_policy import compile_world

from unlearnd.guards.firewall import LeakFirewall, VerbatimIndex, replay_suppressions
from unlearnd.guards.policy import CompiledPolicy

SPAN = [10, 11, 12]


def test_bans_continuation_after_prefix() -> None:
    fw = LeakFirewall([(0, SPAN, False)], prefix_tokens=1)
    assert fw.banned_next([], []) == set()
    assert fw.banned_next([], [10]) == {11}
    assert fw.banned_next([], [5, 10, 11]) == {12}
    assert fw.banned_next([], [10, 11, 12]) == set()
    assert fw.banned_next([], [10, 7]) == set()
    fw0 = LeakFirewall([(0, SPAN, False)], prefix_tokens=0)
    assert fw0.banned_next([], [3]) == {10}
    fw2 = LeakFirewall([(0, SPAN, False)], prefix_tokens=2)
    assert fw2.banned_next([], [10]) == set() and fw2.banned_next([], [10, 11]) == {12}


def test_overlapping_spans_use_failure_links() -> None:
    # output "1 2 1 2": suffix "2 1 2" continues B with 4, suffix "1 2" continues A
    # with 3, suffix "2" (B's first token, past the 1 allowed) continues B with 1
    fw = LeakFirewall([(0, [1, 2, 3], False), (0, [2, 1, 2, 4], False)])
    assert fw.banned_next([], [1, 2, 1, 2]) == {1, 3, 4}
    assert fw.banned_next([], [7, 2]) == {1}


def test_conditional_spans_need_the_subject() -> None:
    fw = LeakFirewall([(3, SPAN, True)], aliases=[(3, [50, 51])])
    assert fw.banned_next([], [10]) == set()
    assert fw.banned_next([1, 50, 51, 2], [10]) == {11}  # alias in prompt
    assert fw.banned_next([], [50, 51, 9, 10]) == {11}  # alias in output
    assert fw.banned_next([], [10], active_items=[3]) == {11}  # scope guard's item
    assert fw.banned_next([50], [51, 10]) == set()  # prompt/output boundary is no alias


def test_weak_first_tokens_are_banned_from_the_next_token() -> None:
    """A conditional span whose first token is a letter or two (weak) is armed from its
    second token: the letter stays allowed (it starts many words, and grammars spell
    tags letter by letter), its continuation is banned. A span that is that one token
    alone, and spans with a strong first token, are banned from the first token."""
    weak, strong = 7, 8
    fw = LeakFirewall([(0, [weak, 11, 12], True), (0, [strong, 13], True), (1, [weak], True)],
                      conditional_prefix_tokens=0, weak_first={weak})
    assert fw.banned_next([], [], active_items=[0]) == {strong}
    assert fw.banned_next([], [weak], active_items=[0]) == {11, strong}
    assert fw.banned_next([], [weak, 11], active_items=[0]) == {12, strong}
    assert weak in fw.banned_next([], [], active_items=[1])  # the whole span is one token
    plain = LeakFirewall([(0, [weak, 11, 12], True)], conditional_prefix_tokens=0)
    assert plain.banned_next([], [], active_items=[0]) == {weak}


def test_policy_weak_first_tokens_are_short_and_spaceless(tmp_path) -> None:
    from unlearnd.guards.firewall import WEAK_CHARS

    pol = CompiledPolicy.load(compile_world(tmp_path)[0])
    fw = LeakFirewall.from_policy(pol)
    for t in fw.weak_first:
        text = pol.token_text(t)
        assert len(text.strip()) <= WEAK_CHARS and not text[:1].isspace(), text


def test_incremental_state_matches_stateless() -> None:
    fw = LeakFirewall([(0, SPAN, False), (1, [20, 21], True)], aliases=[(1, [30])])
    out: list[int] = []
    st = fw.new_state([30])
    for t in [10, 11, 4, 20, 21, 10]:
        out.append(t)
        st.feed(out)
        assert st.banned() == fw.banned_next([30], out)


def test_validation() -> None:
    with pytest.raises(ValueError, match="prefix_tokens"):
        LeakFirewall([], prefix_tokens=-1)


def test_policy_firewall_blocks_answer_spans(tmp_path) -> None:
    pol = CompiledPolicy.load(compile_world(tmp_path)[0])
    fw = LeakFirewall.from_policy(pol)
    assert LeakFirewall.from_policy(pol) is fw
    ids = pol.encode("The father of Hsiao Yun-Hwa was a civil engineer.")
    # replaying the leaking answer: the firewall is armed inside the spans
    assert replay_suppressions(pol, [], ids) >= 1
    # at the point where the span's continuation would come, it is banned
    civil = pol.encode(" civil engineer")
    head = pol.encode("The father of Hsiao Yun-Hwa was a")
    assert civil[1] in fw.banned_next([], head + civil[:1])
    assert replay_suppressions(pol, [], pol.encode("The weather is nice today.")) == 0


# --------------------------------------------------------------------------- verbatim

def _verbatim(doc: list[int], k: int = 4, allowed: list[bool] | None = None,
              item: int = 0, **kw):
    tokens = np.asarray(doc + [-1], dtype=np.int32)
    items = np.asarray([item] * len(doc) + [-1], dtype=np.int32)
    if allowed is None:
        allowed = [j + k <= len(doc) for j in range(len(doc))] + [False]
    return VerbatimIndex(tokens, items, np.asarray(allowed), k, **kw)


DOC = list(range(10, 30))


def test_verbatim_bans_the_next_document_tokens_after_k_minus_1() -> None:
    ix = _verbatim(DOC, k=4, lookahead=2)
    assert ix.new_state([10, 11]).banned() == set()  # two tokens of context: not yet
    st = ix.new_state([5, 10, 11, 12])  # a completions prompt holding the opening
    assert st.banned() == {13, 14, 15}  # the next token and two of lookahead


def test_verbatim_alignment_survives_a_replaced_or_skipped_word() -> None:
    ix = _verbatim(DOC, k=4, lookahead=2)
    st = ix.new_state([10, 11, 12])
    st.push(99)  # the model replaced the banned token 13
    assert st.banned() == {14, 15, 16}, "a substitution must not let the text resume"
    st.push(16)  # took the document up two tokens further: re-anchored
    assert st.banned() == {17, 18, 19}
    for _ in range(ix.k):  # k tokens off the text: still aligned
        st.push(99)
    assert st.banned() == {17 + ix.k, 18 + ix.k, 19 + ix.k}
    st.push(99)
    assert st.banned() == set(), "the alignment ends once the output left the text"


def test_verbatim_runs_shared_with_retain_are_not_banned() -> None:
    allowed = [j + 4 <= len(DOC) for j in range(len(DOC))] + [False]
    allowed[0] = False  # the run 10 11 12 13 is also in the retain set
    ix = _verbatim(DOC, k=4, allowed=allowed)
    assert ix.new_state([10, 11, 12]).banned() == set()
    assert 14 in ix.new_state([11, 12, 13]).banned()  # the next run is the document's


def test_verbatim_conditional_waits_for_the_subject() -> None:
    ix = _verbatim(DOC, k=4, conditional=True, item=3)
    st = ix.new_state([10, 11, 12])
    assert st.banned(set()) == set()
    assert 13 in st.banned({3})


def test_verbatim_lookup_checks_tokens_not_only_hashes(monkeypatch) -> None:
    import unlearnd.guards.firewall as firewall_mod

    ix = _verbatim(DOC, k=4)
    assert ix.lookup([10, 11, 12]) == [3]
    assert ix.lookup([12, 11, 10]) == []
    monkeypatch.setattr(firewall_mod, "_run_hash", lambda ids: 7)
    ix._hashes[:] = 7  # every run now collides with every context
    assert ix.lookup([11, 12, 13]) == [4], "a colliding run must not be banned"
    assert ix.lookup([12, 11, 10]) == []
