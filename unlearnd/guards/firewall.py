"""Leak firewall: never let the output continue a forget answer's distinctive span.

Compiled from a policy's span token ids (both byte-level BPE variants, with and without
a leading space) into an Aho-Corasick automaton over token ids. Each decode step the
automaton state is the longest suffix of the output that is a prefix of some span;
the tokens that would extend a span whose first ``prefix_tokens`` tokens are already
out are *banned* (their logits become -inf in the kernel). The first
``prefix_tokens`` tokens stay allowed because they are usually ordinary words
(" Taipei" may be fine, " Taipei, Taiwan on 05/11/1991" is the leak); a one-token span
can therefore only be blocked with ``prefix_tokens = 0``.

Spans marked *conditional* are active only once their subject is mentioned: one of the
subject's alias token sequences occurs in the prompt or in the output so far, or the
scope guard matched that item. A second automaton over alias ids tracks that.

Per request the state is two automaton states and a set of active items; each step
feeds only the new output tokens (O(new tokens)); the banned set comes from a memo per
automaton state.

Documents add a *verbatim* firewall (:class:`VerbatimIndex`): once the last ``k - 1``
tokens of prompt and output are a run of a forget document (over token ids, each
document indexed as a whole and per paragraph, with and without a leading space), the
output is *aligned* to the document and the document's next token is banned. The
alignment then follows the output for up to ``k`` tokens off the text: it bans the
document's next ``1 + lookahead`` tokens that are *rare* (not used twice by the retain
text), and re-anchors when the output takes up the document again with a rare token a
few tokens further, so replacing or skipping the banned word does not resume the
document's facts. Common tokens (a template's "was born in", punctuation) are neither
banned nor re-anchored on once off the text: a retain document that shares the forget
documents' phrasing is not cut (measured: tests/e2e/test_documents.py). A run the
retain set also contains is not indexed (text the model must keep saying). What it does
not cover: a paraphrase, or the text in another tokenisation than the two indexed (say,
spelled letter by letter); those are the spans' and the scope guard's. Without a
retain set every token is rare: strictest, and it may cut ordinary phrasing.

Suppression counts. The engine counts a *suppression* when the firewall banned the
token the model ranked first (argmax of the row's logits as they reach the logits
processor): without the firewall greedy decoding would have continued the span. The
API process has no logits; :func:`replay_suppressions` replays the tokens and counts
*armed steps*: steps at which the firewall banned at least one token (the output was
inside a forbidden span past its allowed prefix). Every suppression happens at an
armed step, so the replay count is an upper bound of the engine's count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from unlearnd.guards.policy import CompiledPolicy

logger = logging.getLogger(__name__)

__all__ = ["LeakFirewall", "FirewallState", "VerbatimIndex", "VerbatimState",
           "replay_suppressions"]


class _Automaton:
    """Aho-Corasick over int sequences. Node 0 is the root."""

    def __init__(self) -> None:
        self.goto: list[dict[int, int]] = [{}]
        self.fail: list[int] = [0]
        self.depth: list[int] = [0]

    def insert(self, seq: Sequence[int]) -> list[int]:
        """Insert ``seq``; return the nodes along its path (excluding the root)."""
        node, path = 0, []
        for t in seq:
            nxt = self.goto[node].get(t)
            if nxt is None:
                nxt = len(self.goto)
                self.goto.append({})
                self.fail.append(0)
                self.depth.append(self.depth[node] + 1)
                self.goto[node][t] = nxt
            node = nxt
            path.append(node)
        return path

    def build(self) -> list[int]:
        """Compute failure links (BFS); returns nodes in BFS order."""
        order: list[int] = []
        queue = list(self.goto[0].values())
        for c in queue:
            self.fail[c] = 0
        head = 0
        while head < len(queue):
            s = queue[head]
            head += 1
            order.append(s)
            for t, c in self.goto[s].items():
                f = self.fail[s]
                while f and t not in self.goto[f]:
                    f = self.fail[f]
                self.fail[c] = self.goto[f].get(t, 0) if self.goto[f].get(t, 0) != c else 0
                queue.append(c)
        return order

    def step(self, s: int, t: int) -> int:
        goto = self.goto
        while s and t not in goto[s]:
            s = self.fail[s]
        return goto[s].get(t, 0)


WEAK_CHARS = 2
"""A span's first token of at most this many characters (spaces aside) is weak."""


def _weak_first(policy: CompiledPolicy, spans: Sequence[tuple[int, Sequence[int], bool]]
                ) -> set[int]:
    """First tokens of the policy's spans that are a letter or two (see LeakFirewall)."""
    firsts = {int(ids[0]) for _, ids, _ in spans if len(ids) > 1}
    weak: set[int] = set()
    for t in firsts:
        try:
            text = policy.token_text(t)
        except Exception:  # noqa: BLE001 - no tokenizer: ban as before
            return set()
        if len(text.strip()) <= WEAK_CHARS and text == text.lstrip():
            weak.add(t)
    return weak


_HASH_MUL = np.uint64(0x100000001B3)
_MASK64 = (1 << 64) - 1
MAX_ALIGNMENTS = 32
"""Document alignments one request tracks at most (the freshest are kept)."""


def _run_hash(ids: Sequence[int]) -> int:
    """The polynomial hash (mod 2**64) :class:`VerbatimIndex` keys its runs by."""
    h = 0
    for t in ids:
        h = (h * 0x100000001B3 + int(t) + 1) & _MASK64
    return h


class VerbatimIndex:
    """The forget documents' token runs, looked up by their first ``k - 1`` tokens.

    Args:
        tokens: int32 token ids of every indexed variant, each followed by -1.
        items: the forget item of each token (-1 at separators).
        allowed: per position, whether the ``k``-run starting there may be banned.
        k: run length; ``k - 1`` tokens of context arm the ban of the ``k``-th.
        lookahead: extra document tokens banned while aligned (see the module doc).
        conditional: the runs are active only once their item is mentioned.
        common: token ids the retain text uses often (see the module docstring).

    Memory is O(tokens): the runs are keyed by a 64-bit hash in one sorted array and
    checked against the tokens on a hit (no false ban from a hash collision).
    """

    def __init__(self, tokens: np.ndarray, items: np.ndarray, allowed: np.ndarray, k: int,
                 lookahead: int = 2, conditional: bool = False,
                 common: Iterable[int] = ()) -> None:
        if k < 2:
            raise ValueError(f"k must be >= 2, got {k!r}")
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.items = np.asarray(items, dtype=np.int64)
        self.k = int(k)
        self.lookahead = int(lookahead)
        self.conditional = bool(conditional)
        self.max_misses = self.k
        self.common = frozenset(int(t) for t in common)
        n, m = len(self.tokens), self.k - 1
        self._allowed = np.asarray(allowed, dtype=bool).tolist()
        starts = np.flatnonzero(np.asarray(allowed, dtype=bool)[:max(0, n - m)])
        h = np.zeros(len(starts), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(m):
                h = h * _HASH_MUL + (self.tokens[starts + j] + 1).astype(np.uint64)
        order = np.argsort(h, kind="stable")
        self._hashes = h[order]
        self._next = (starts + m)[order]  # position of the token a run's context arms
        self._list = self.tokens.tolist()

    @classmethod
    def from_policy(cls, policy: CompiledPolicy) -> VerbatimIndex | None:
        info = policy.verbatim_info
        arrays = policy.verbatim()
        if not info or arrays is None:
            return None
        return cls(arrays["tokens"], arrays["items"], arrays["allowed"], int(info["k"]),
                   int(info.get("lookahead", 2)), bool(info.get("conditional", False)),
                   arrays["common"].tolist())

    def __len__(self) -> int:
        return len(self._next)

    def lookup(self, context: Sequence[int]) -> list[int]:
        """Positions of the tokens that follow ``context`` (``k - 1`` ids) in a run."""
        h = np.uint64(_run_hash(context))
        lo = int(np.searchsorted(self._hashes, h, side="left"))
        hi = int(np.searchsorted(self._hashes, h, side="right"))
        m, toks, out = self.k - 1, self._list, []
        want = [int(t) for t in context]
        for p in self._next[lo:hi].tolist():
            if toks[p - m:p] == want:
                out.append(p)
        return out

    def new_state(self, prompt_ids: Sequence[int] = ()) -> VerbatimState:
        return VerbatimState(self, prompt_ids)


class VerbatimState:
    """Per-request alignments to the forget documents (see :class:`VerbatimIndex`)."""

    __slots__ = ("index", "window", "aligned")

    PROMPT_TAIL = 66
    """Prompt tokens fed at the start: an alignment needs ``k - 1`` of them and lives
    ``k`` tokens off the text, so older ones cannot matter for k <= 32 (2k + 2)."""

    def __init__(self, index: VerbatimIndex, prompt_ids: Sequence[int] = ()) -> None:
        self.index = index
        self.window: list[int] = []
        self.aligned: dict[int, int] = {}  # position of the next document token -> misses
        for t in list(prompt_ids)[-self.PROMPT_TAIL:]:
            self.push(int(t))

    def push(self, t: int) -> None:
        """The next token of the text (prompt, then output)."""
        ix = self.index
        toks, common = ix._list, ix.common
        moved: dict[int, int] = {}
        reach = ix.lookahead + 2
        for p, misses in self.aligned.items():
            if toks[p] == t:  # the output follows the document
                p, misses = p + 1, 0
            else:
                for q in range(p + 1, min(p + reach, len(toks))):
                    if toks[q] < 0:
                        break
                    if toks[q] == t and t not in common:  # takes the text up again at q
                        p, misses = q + 1, 0
                        break
                else:
                    p, misses = p + 1, misses + 1
            if misses <= ix.max_misses and p < len(toks) and toks[p] >= 0:
                moved[p] = min(misses, moved.get(p, misses))
        self.window.append(t)
        if len(self.window) >= ix.k:
            del self.window[0]
        if len(self.window) == ix.k - 1:
            for p in ix.lookup(self.window):
                moved[p] = 0
        if len(moved) > MAX_ALIGNMENTS:
            moved = dict(sorted(moved.items(), key=lambda kv: (kv[1], -kv[0]))[:MAX_ALIGNMENTS])
        self.aligned = moved

    def banned(self, active: set[int] | frozenset[int] = frozenset()) -> set[int]:
        """The document tokens that may not come next: right after a run of ``k - 1``
        document tokens, the next one; and the rare ones of the next ``1 + lookahead``."""
        ix = self.index
        toks, items, common = ix._list, ix.items, ix.common
        out: set[int] = set()
        for p, misses in self.aligned.items():
            if ix.conditional and int(items[p]) not in active:
                continue
            if misses == 0 and self._on_run(p):
                out.add(toks[p])
            for q in range(p, min(p + 1 + ix.lookahead, len(toks))):
                if toks[q] < 0:
                    break
                if toks[q] not in common:
                    out.add(toks[q])
        return out

    def _on_run(self, p: int) -> bool:
        """The last ``k - 1`` tokens are the document's before ``p``, and the ``k``-run
        they start with ``p`` may be banned (not shared with the retain text)."""
        ix = self.index
        m = ix.k - 1
        return len(self.window) == m and p >= m and ix._allowed[p - m] and \
            ix._list[p - m:p] == self.window


class LeakFirewall:
    """Token-level automaton over a policy's distinctive spans.

    Args:
        spans: ``(item, token_ids, conditional)`` per span variant.
        aliases: ``(item, token_ids)`` per alias variant (activate conditional spans).
        prefix_tokens: span tokens allowed before the continuation is banned (>= 0).
        weak_first: token ids too short to ban as a span's *first* token (a letter or
            two: the space-less variant of "literary fiction" starts with "l"): with a
            prefix of 0, a span that starts with one is banned from its second token,
            unless the span is that one token. Banning them would block every word
            starting with that letter where a word starts without a space (the start of
            a JSON string, a tool-call tag the grammar spells letter by letter).
        conditional_prefix_tokens: the same for conditional spans (None: as
            ``prefix_tokens``); they are armed only once their subject is mentioned, so
            0 is safe there and is what stops one-token spans.
        verbatim: the forget documents' runs (:class:`VerbatimIndex`), or None.
    """

    def __init__(self, spans: Iterable[tuple[int, Sequence[int], bool]],
                 aliases: Iterable[tuple[int, Sequence[int]]] = (),
                 prefix_tokens: int = 1, conditional_prefix_tokens: int | None = None,
                 weak_first: Iterable[int] = (),
                 verbatim: VerbatimIndex | None = None) -> None:
        self.verbatim = verbatim
        self.weak_first = frozenset(int(t) for t in weak_first)
        if conditional_prefix_tokens is None:
            conditional_prefix_tokens = prefix_tokens
        for name, v in (("prefix_tokens", prefix_tokens),
                        ("conditional_prefix_tokens", conditional_prefix_tokens)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        self.prefix_tokens = prefix_tokens
        self.conditional_prefix_tokens = conditional_prefix_tokens
        self.spans = _Automaton()
        # per node: True when an unconditional span passes through the edge into it;
        # items whose conditional spans pass through it
        self._uncond: list[bool] = [False]
        self._cond: list[set[int]] = [set()]
        self._end_uncond: set[int] = set()  # nodes where an unconditional span ends
        self._end_cond: dict[int, set[int]] = {}  # node -> items whose spans end there
        n_spans = 0
        for item, ids, conditional in spans:
            ids = list(ids)
            if not ids:
                continue
            n_spans += 1
            path = self.spans.insert(ids)
            if conditional:
                self._end_cond.setdefault(path[-1], set()).add(int(item))
            else:
                self._end_uncond.add(path[-1])
            for node in path:
                while len(self._uncond) <= node:
                    self._uncond.append(False)
                    self._cond.append(set())
                if conditional:
                    self._cond[node].add(int(item))
                else:
                    self._uncond[node] = True
        self.spans.build()
        self.aliases = _Automaton()
        self._alias_out: list[set[int]] = [set()]
        for item, ids in aliases:
            ids = list(ids)
            if not ids:
                continue
            path = self.aliases.insert(ids)
            while len(self._alias_out) < len(self.aliases.goto):
                self._alias_out.append(set())
            self._alias_out[path[-1]].add(int(item))
        while len(self._alias_out) < len(self.aliases.goto):
            self._alias_out.append(set())
        for s in self.aliases.build():  # outputs include the failure chain's
            self._alias_out[s] |= self._alias_out[self.aliases.fail[s]]
        self._cands: dict[int, tuple[frozenset[int], dict[int, frozenset[int]]]] = {}
        self.n_spans = n_spans
        logger.debug("firewall: %d span seqs, %d nodes", n_spans, len(self.spans.goto))

    @classmethod
    def from_policy(cls, policy: CompiledPolicy) -> LeakFirewall:
        """The (memoised) firewall of a compiled policy."""
        def build(p: CompiledPolicy) -> LeakFirewall:
            spans = list(p.span_token_ids)
            return cls(spans, p.alias_token_ids,
                       int(p.setting("firewall_prefix_tokens", 1)),
                       int(p.setting("firewall_conditional_prefix_tokens",
                                     p.setting("firewall_prefix_tokens", 1))),
                       weak_first=_weak_first(p, spans),
                       verbatim=VerbatimIndex.from_policy(p))

        return policy.derived("firewall", build)

    def _candidates(self, s: int) -> tuple[frozenset[int], dict[int, frozenset[int]]]:
        """(always-banned tokens, token -> items that ban it conditionally) at state s."""
        hit = self._cands.get(s)
        if hit is not None:
            return hit
        always: set[int] = set()
        cond: dict[int, set[int]] = {}
        u = s
        while True:
            depth = self.spans.depth[u]
            armed_uncond = depth >= self.prefix_tokens
            armed_cond = depth >= self.conditional_prefix_tokens
            if armed_uncond or armed_cond:
                for t, c in self.spans.goto[u].items():
                    uncond, items = self._uncond[c], self._cond[c]
                    if u == 0 and t in self.weak_first:
                        # a letter or two: banned from the span's next token, unless a
                        # span is that one token
                        uncond, items = c in self._end_uncond, self._end_cond.get(c, set())
                    if armed_uncond and uncond:
                        always.add(t)
                    elif armed_cond and items:
                        cond.setdefault(t, set()).update(items)
            if u == 0:
                break
            u = self.spans.fail[u]
        for t in always:
            cond.pop(t, None)
        hit = (frozenset(always), {t: frozenset(v) for t, v in cond.items()})
        if len(self._cands) < 1_000_000:
            self._cands[s] = hit
        return hit

    def new_state(self, prompt_ids: Sequence[int] = (),
                  active_items: Iterable[int] = ()) -> FirewallState:
        """A per-request state; the prompt only activates subjects."""
        return FirewallState(self, prompt_ids, active_items)

    def banned_next(self, context_ids: Sequence[int], output_ids: Sequence[int],
                    active_items: Iterable[int] = ()) -> set[int]:
        """Tokens banned after ``output_ids`` given the prompt ``context_ids`` (stateless)."""
        st = self.new_state(context_ids, active_items)
        st.feed(output_ids)
        return st.banned()


class FirewallState:
    """Incremental firewall state of one request (feed new output tokens each step)."""

    __slots__ = ("fw", "span_state", "alias_state", "active", "seen", "verbatim", "prompt")

    def __init__(self, fw: LeakFirewall, prompt_ids: Sequence[int] = (),
                 active_items: Iterable[int] = ()) -> None:
        self.fw = fw
        self.span_state = 0
        self.alias_state = 0
        self.active: set[int] = {int(i) for i in active_items if int(i) >= 0}
        self.seen = 0
        for t in prompt_ids:
            self._alias(t)
        self.alias_state = 0  # prompt and output are separate texts
        # the verbatim firewall reads prompt and output as one text: a completions
        # prompt holding a document's opening must not be continued
        self.prompt = tuple(int(t) for t in prompt_ids[-VerbatimState.PROMPT_TAIL:]) \
            if fw.verbatim is not None else ()
        self.verbatim = fw.verbatim.new_state(self.prompt) if fw.verbatim is not None \
            else None

    def _alias(self, t: int) -> None:
        fw = self.fw
        self.alias_state = fw.aliases.step(self.alias_state, t)
        out = fw._alias_out[self.alias_state]
        if out:
            self.active |= out

    def feed(self, output_ids: Sequence[int]) -> None:
        """Consume the tokens of ``output_ids`` not seen yet (the live output list)."""
        if len(output_ids) < self.seen:  # restarted request
            self.span_state, self.seen = 0, 0
            if self.verbatim is not None:
                self.verbatim = self.fw.verbatim.new_state(self.prompt)
        fw = self.fw
        verbatim = self.verbatim
        for k in range(self.seen, len(output_ids)):
            t = output_ids[k]
            self.span_state = fw.spans.step(self.span_state, t)
            self._alias(t)
            if verbatim is not None:
                verbatim.push(int(t))
        self.seen = len(output_ids)

    def banned(self) -> set[int]:
        """Tokens that may not come next."""
        always, cond = self.fw._candidates(self.span_state)
        out = set(always)
        if self.verbatim is not None:
            out |= self.verbatim.banned(self.active)
        if not cond:
            return out
        active = self.active
        if active:
            for t, items in cond.items():
                if not items.isdisjoint(active):
                    out.add(t)
        return out


def replay_suppressions(policy: CompiledPolicy, prompt_ids: Sequence[int],
                        output_ids: Sequence[int], item: int = -1) -> int:
    """Armed steps of the firewall over a finished output (see the module docstring).

    Counts the steps ``i`` (0..len(output)) at which the firewall, having seen
    ``output_ids[:i]``, banned at least one token. ``item`` is the scope guard's
    matched item (activates its conditional spans), -1 for none.
    """
    fw = LeakFirewall.from_policy(policy)
    st = fw.new_state(prompt_ids, [item] if item >= 0 else ())
    count = 0
    out: list[int] = []
    for i in range(len(output_ids) + 1):
        st.feed(out)
        if st.banned():
            count += 1
        if i < len(output_ids):
            out.append(int(output_ids[i]))
    return count
