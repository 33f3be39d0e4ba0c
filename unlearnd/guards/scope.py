"""Scope guard: does a conversation ask about something the policy removed?

Runs in the API process, before the request reaches the engine. Three signals, each
scored in [0, 1] per forget item, combined with a noisy-or
(``1 - prod(1 - s)``); the best item's combined score is compared with the policy's
``scope_threshold`` (default 0.6):

- **alias** (the request names the subject): a word n-gram of the text equals an
  alias. Full (multi-word) names score 1.0, a distinctive surname alone 0.7, another
  single name part (a given name) 0.45 (not enough alone). Misspellings count at 0.9x:
  a word within one edit of an alias word (a deletion index, checked with rapidfuzz
  ``ratio >= fuzzy_ratio``; words of 5+ letters), or one word of a multi-word alias
  (8+ letters in all) one Levenshtein edit off while the others are exact
  ("Hsiao Yun-Hwq").
- **descriptors** (the request describes the subject without naming it): the
  subject's identifying spans (birthplace, dates, titles...) reduced at compile time
  to strong terms; a descriptor is hit when one of its terms is in the text, and hits
  are counted greedily so two descriptors sharing the same words count once.
  1 hit scores 0.3, 2 hits 0.7 (in scope), 3 or more 0.9.
- **embedding** (the request paraphrases a forget question): cosine similarity of
  each user message to the forget questions (one matrix product);
  ``clip((sim - (t - 0.2)) / 0.2, 0, 1)`` with ``t = embedding_similarity``, so a
  similarity at or above ``t`` alone puts the request in scope and a lower one can
  add to a descriptor hit.

Every text is *folded* first (:mod:`unlearnd.guards.normalize`): compatibility forms,
invisible characters, Cyrillic/Greek look-alikes, case, accents and punctuation no
longer hide a name; aliases and descriptor terms are folded the same way. Spelled-out
names are joined back: a run of one-character words ("H s i a o", "J.o.h.n") is read
as one word too, and a span of words whose letters, joined, are exactly an alias
matches it, on two conditions that keep ordinary text out of scope: every piece is a
single character (any alias), or the alias is a multi-word name of 8+ letters
("Hsi ao Yun Hwa"; a single-word alias is not matched across multi-letter pieces:
"fair weather" would refuse for a surname Fairweather). The embedder reads the user
texts with only the disguise undone (:func:`unlearnd.guards.normalize.unmask`).

The whole conversation is searched for names and descriptors: every message's string
content and text content parts (``text``, ``input_text``...), and the ``arguments``
of assistant tool calls (JSON strings decoded when they use ``\\u`` escapes); the
embedding signal looks at user messages only.

The decision's ``reason`` is public (it goes into the refusal and the API response)
and reveals nothing the conversation did not say: it quotes the user's own words for
the name or the details that matched, never the subject behind a nameless question
nor a detail the user did not write, and never text of system/developer messages
(the operator's words). ``internal_reason`` names the subject, for operators' logs.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rapidfuzz.distance import Indel, Levenshtein

from unlearnd.guards.embeddings import Embedder, get_embedder
from unlearnd.guards.normalize import fold, fold_tokens, unmask, visible
from unlearnd.guards.policy import CompiledPolicy
from unlearnd.guards.spans import FILLER, STOPWORDS, words

logger = logging.getLogger(__name__)

__all__ = ["ScopeDecision", "ScopeGuard", "messages_text"]

FULL_NAME_SCORE = 1.0
SURNAME_SCORE = 0.7
NAME_PART_SCORE = 0.45
FUZZY_FACTOR = 0.9
DESCRIPTOR_SCORES = (0.0, 0.3, 0.7, 0.9)
EMBEDDING_RAMP = 0.2
MIN_FUZZY_LEN = 5
SQUASH_MIN_LEN = 8
"""Letters a multi-word alias needs to be matched across arbitrary splits or with one
word one edit off (shorter full names are too easy to hit by accident)."""
MAX_SQUASH_PIECES = 48
"""At most this many words are joined to spell out one alias."""
_SQUASH_CHECKS = (4, 6, 8, 11, 14, 18, 23, 29, 36)
"""Lengths at which a joined span must still begin like some squashed alias."""
_FOLDED = re.compile(r"[a-z0-9]+(?: [a-z0-9]+)*")

# Where a text comes from, for choosing what to quote: the user's words first; the
# operator's (system, developer) are never quoted.
_ROLE_RANK = {"user": 0, "assistant": 1, "tool": 2, "function": 2}
_OPERATOR_RANK = 3
_MAX_QUOTES = 3


@dataclass(frozen=True)
class ScopeDecision:
    """The scope guard's verdict on one conversation.

    Attributes:
        in_scope: True when the request falls inside the policy's forget scope (the
            combined score reached the threshold); the request is then refused.
        score: combined score of the best-matching forget item, in [0, 1].
        item: index of that item in the policy, -1 when no signal fired at all.
            Internal, like ``subject``: for a nameless question they are the answer.
        subject: that item's subject, None when ``item == -1``. Internal.
        reason: the PUBLIC reason, one sentence: true, and revealing nothing the
            conversation did not say (it quotes only the user's own words; the
            subject of a nameless question is never in it). Shown in refusals.
        signals: per-signal detail for operators' logs (the item's descriptors among
            them: not for users).
        named: True only when the conversation's own words name the subject (an
            alias match, exact, misspelt or disguised, in any message).
        mention: how the conversation names it, exactly as written (the matched
            span, disguise included: may hold invisible characters; see
            :func:`unlearnd.guards.normalize.visible`); user, assistant and tool
            texts only, None when only an operator's message names it or when
            ``named`` is False.
        internal_reason: the full reason naming the subject, for operators' logs and
            audit; defaults to ``reason``.
        named_items: every item the conversation names (what :meth:`ScopeGuard.
            named_items` returns), sorted; internal (the firewall arms their spans).
    """

    in_scope: bool
    score: float
    item: int = -1
    subject: str | None = None
    reason: str = ""
    signals: dict[str, Any] = field(default_factory=dict)
    named: bool = False
    mention: str | None = None
    internal_reason: str = ""
    named_items: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.internal_reason:
            object.__setattr__(self, "internal_reason", self.reason)


def _argument_texts(args: Any) -> Iterator[str]:
    """The texts of a tool call's ``arguments``: the string itself, or, when it is
    JSON with ``\\u`` escapes (which would hide a name from the matcher), the decoded
    keys and string values; an already decoded dict/list is walked the same way."""
    if isinstance(args, str):
        if "\\u" not in args:
            yield args
            return
        try:
            args = json.loads(args)
        except ValueError:
            yield args
            return
    stack, seen = [args], 0
    while stack and seen < 10_000:
        node = stack.pop()
        seen += 1
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for k, v in reversed(node.items()):  # popped in order: key, value, next key
                stack.append(v)
                if isinstance(k, str):
                    stack.append(k)
        elif isinstance(node, list):
            stack.extend(reversed(node))


def _message_texts(messages: Iterable[dict]) -> Iterator[tuple[str, str]]:
    """``(role, text)`` of every text in chat ``messages``: str content, content parts
    with a ``text`` string (OpenAI ``text``/``input_text``/``output_text``), and the
    ``arguments`` of ``tool_calls`` (and the legacy ``function_call``)."""
    for m in messages:
        if not isinstance(m, dict):
            continue
        role = m.get("role") if isinstance(m.get("role"), str) else ""
        content = m.get("content")
        if isinstance(content, str):
            yield role, content
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    yield role, part["text"]
                elif isinstance(part, str):
                    yield role, part
        calls = m.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    for text in _argument_texts(fn.get("arguments")):
                        yield role, text
        legacy = m.get("function_call")
        if isinstance(legacy, dict):
            for text in _argument_texts(legacy.get("arguments")):
                yield role, text


def messages_text(messages: Iterable[dict], roles: Iterable[str] | None = None) -> list[str]:
    """The texts of chat ``messages`` (str content, OpenAI content parts, tool-call
    arguments), optionally only those of messages whose role is in ``roles``."""
    wanted = set(roles) if roles is not None else None
    return [t for r, t in _message_texts(messages) if wanted is None or r in wanted]


def _deletes(word: str) -> list[str]:
    return [word[:i] + word[i + 1:] for i in range(len(word))]


def _begins_an_alias(s: str, checked: int, prefixes: set[str]) -> int:
    """How many of :data:`_SQUASH_CHECKS` ``s`` has passed, given ``checked`` already
    passed: each length ``k <= len(s)`` whose prefix ``s[:k]`` begins some squashed
    alias. -1 when one does not (no alias can start with ``s``: stop joining)."""
    while checked < len(_SQUASH_CHECKS) and len(s) >= _SQUASH_CHECKS[checked]:
        if s[:_SQUASH_CHECKS[checked]] not in prefixes:
            return -1
        checked += 1
    return checked


def _folded_variants(text: str) -> list[str]:
    """Folded forms of a normalised alias or term as a request may write it (lower,
    upper, title case): the same for Latin text; a non-Latin name whose letters are all
    look-alikes folds differently by case (Greek ``να`` vs ``ΝΑ``)."""
    if _FOLDED.fullmatch(text):
        return [text]
    if text.isascii():
        return [fold(text)]
    out: list[str] = []
    for v in (text, text.upper(), text.title()):
        f = fold(v)
        if f and f not in out:
            out.append(f)
    return out


class _ScopeIndex:
    """Lookup structures built once per compiled policy (shared by all guards)."""

    def __init__(self, policy: CompiledPolicy) -> None:
        t0 = time.perf_counter()
        # first word -> [(alias words, item, base score)]
        self.phrases: dict[str, list[tuple[tuple[str, ...], int, float]]] = defaultdict(list)
        # any word of a multi-word alias -> [(alias words, position, item, base score)]
        self.near: dict[str, list[tuple[tuple[str, ...], int, int, float]]] = defaultdict(list)
        # alias without spaces -> [(item, base score, multi-word)]
        self.squashed: dict[str, list[tuple[int, float, bool]]] = defaultdict(list)
        # beginnings of squashed aliases, cut at the lengths of _SQUASH_CHECKS
        self.squash_prefixes: set[str] = set()
        self.max_squashed = 0
        self.alias_vocab: set[str] = set()
        self.deletes: dict[str, set[str]] = defaultdict(set)
        self.max_words = 1
        for i, item in enumerate(policy.items):
            subject_words = words(item.subject)
            surname = subject_words[-1] if subject_words else ""
            seen: set[str] = set()
            for alias in item.aliases:
                base = alias.split()
                if not base:
                    continue
                if len(base) >= 2:
                    score = FULL_NAME_SCORE
                elif base[0] == surname:
                    score = SURNAME_SCORE
                else:
                    score = NAME_PART_SCORE
                for variant in _folded_variants(alias):
                    if variant in seen:
                        continue
                    seen.add(variant)
                    self._add(tuple(variant.split()), i, score)
        self.squashed = dict(self.squashed)
        # folded strong term -> [(item, descriptor index)]
        self.terms: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for i, item in enumerate(policy.items):
            for d, terms in enumerate(item.descriptor_terms):
                for t in terms:
                    for v in _folded_variants(t):
                        if " " not in v:
                            self.terms[v].append((i, d))
        self.embeddings = policy.embeddings() if policy.embedding_info else None
        self.embedding_items = policy.embedding_items
        self.embedder_name = (policy.embedding_info or {}).get("embedder")
        logger.info("scope index for %s: %d alias words, %d descriptor terms in %.1f ms",
                    policy.dir, len(self.alias_vocab), len(self.terms),
                    (time.perf_counter() - t0) * 1e3)

    def _add(self, ws: tuple[str, ...], item: int, score: float) -> None:
        """Index one folded alias."""
        self.phrases[ws[0]].append((ws, item, score))
        self.max_words = max(self.max_words, len(ws))
        joined = "".join(ws)
        self.squashed[joined].append((item, score, len(ws) >= 2))
        self.max_squashed = max(self.max_squashed, len(joined))
        for k in _SQUASH_CHECKS:
            if k > len(joined):
                break
            self.squash_prefixes.add(joined[:k])
        if len(ws) >= 2 and len(joined) >= SQUASH_MIN_LEN:
            for k, w in enumerate(ws):
                self.near[w].append((ws, k, item, score))
        for w in ws:
            if w in self.alias_vocab:
                continue
            self.alias_vocab.add(w)
            if len(w) >= MIN_FUZZY_LEN:
                self.deletes[w].add(w)
                for d in _deletes(w):
                    self.deletes[d].add(w)


@dataclass
class _Conversation:
    """The folded words of a conversation and where each lies in which text."""

    texts: list[str]
    ranks: list[int]                     # per text: _ROLE_RANK of its message
    ws: list[str]                        # folded words, all texts in order
    where: list[tuple[int, int, int]]    # per word: (text index, start, end)

    @classmethod
    def of(cls, pairs: list[tuple[str, str]]) -> _Conversation:
        conv = cls([], [], [], [])
        for t, (role, text) in enumerate(pairs):
            conv.texts.append(text)
            conv.ranks.append(_ROLE_RANK.get(role, _OPERATOR_RANK))
            for w, s, e in fold_tokens(text):
                conv.ws.append(w)
                conv.where.append((t, s, e))
        return conv

    def rank(self, i: int) -> int:
        return self.ranks[self.where[i][0]]

    def original(self, i: int, j: int) -> str:
        """Words ``[i, j)`` as written (pieces in different texts joined by a space)."""
        pieces: list[str] = []
        t, start, end = self.where[i]
        for k in range(i + 1, j):
            tk, s, e = self.where[k]
            if tk != t:
                pieces.append(self.texts[t][start:end])
                t, start = tk, s
            end = e
        pieces.append(self.texts[t][start:end])
        return " ".join(pieces)


# An alias match: (item, score, first word, end word) in conversation word positions.
_Match = tuple[int, float, int, int]


class ScopeGuard:
    """Decides whether a conversation is inside a compiled policy's forget scope.

    Args:
        policy: the compiled policy.
        embedder: embedder for the semantic signal; default the one the policy was
            compiled with (:func:`get_embedder`). Must match the compile-time one.
    """

    def __init__(self, policy: CompiledPolicy, embedder: Embedder | None = None) -> None:
        if not isinstance(policy, CompiledPolicy):
            raise ValueError(f"policy must be a CompiledPolicy, got {type(policy).__name__}")
        self.policy = policy
        self.index: _ScopeIndex = policy.derived("scope_index", _ScopeIndex)
        self.threshold = float(policy.setting("scope_threshold", 0.6))
        self.fuzzy_ratio = float(policy.setting("fuzzy_ratio", 80.0))
        self.embedding_similarity = float(policy.setting("embedding_similarity") or 0.95)
        if embedder is None and self.index.embeddings is not None and self.index.embedder_name:
            embedder = get_embedder(self.index.embedder_name)
        self.embedder = embedder
        self._fuzzy_memo: dict[str, tuple[str, float] | None] = {}

    # ------------------------------------------------------------------ signals

    def _fuzzy(self, w: str) -> tuple[str, float] | None:
        """The alias word ``w`` is a misspelling of, with its ratio, or None."""
        if w in self._fuzzy_memo:
            return self._fuzzy_memo[w]
        cands: set[str] = set()
        for key in [w, *_deletes(w)]:
            hit = self.index.deletes.get(key)
            if hit:
                cands |= hit
        best: tuple[str, float] | None = None
        for c in cands:
            r = Indel.normalized_similarity(w, c) * 100.0
            if r >= self.fuzzy_ratio and (best is None or r > best[1]):
                best = (c, r)
        if len(self._fuzzy_memo) < 100_000:
            self._fuzzy_memo[w] = best
        return best

    def _alias_matches(self, ws: list[str]) -> list[tuple[int, float, int, int]]:
        """Alias n-grams of ``ws``: ``(item, score, first word, number of words)``."""
        canon: list[str] = []
        fuzzy: list[bool] = []
        for w in ws:
            if w in self.index.alias_vocab:
                canon.append(w)
                fuzzy.append(False)
            elif len(w) >= MIN_FUZZY_LEN and w not in STOPWORDS and w not in FILLER:
                hit = self._fuzzy(w)
                canon.append(hit[0] if hit else w)
                fuzzy.append(hit is not None)
            else:
                canon.append(w)
                fuzzy.append(False)
        out: list[tuple[int, float, int, int]] = []
        for i, w in enumerate(canon):
            for phrase, item, score in self.index.phrases.get(w, ()):
                n = len(phrase)
                if tuple(canon[i:i + n]) != phrase:
                    continue
                if any(fuzzy[i:i + n]):
                    score *= FUZZY_FACTOR
                out.append((item, score, i, n))
            if fuzzy[i]:
                continue
            # a multi-word alias with one other word one edit off ("Hsiao Yun-Hwq")
            for phrase, k, item, score in self.index.near.get(w, ()):
                s, n = i - k, len(phrase)
                if s < 0 or s + n > len(canon) or any(fuzzy[s:s + n]):
                    continue
                miss = -1
                for t in range(n):
                    if canon[s + t] != phrase[t]:
                        if miss >= 0:
                            miss = -2
                            break
                        miss = t
                if miss < 0:  # exact (found above) or two words off
                    continue
                a, b = ws[s + miss], phrase[miss]
                if min(len(a), len(b)) >= 3 and Levenshtein.distance(a, b, score_cutoff=1) <= 1:
                    out.append((item, score * FUZZY_FACTOR, s, n))
        return out

    def _spelled_matches(
            self, conv: _Conversation) -> tuple[list[_Match], dict[str, tuple[int, int]]]:
        """Aliases spelled out over several words, and the joined one-letter runs.

        Returns the matches (conversation word positions) and ``{joined run: (i, j)}``
        for the descriptor signal. Two passes: (1) the words of ``conv`` are joined
        span by span and compared with the squashed aliases (a span of one-character
        words matches any alias, a span with a longer piece only a multi-word alias of
        ``SQUASH_MIN_LEN``+ letters); (2) each run of one-character words becomes one
        word and the alias n-grams around it are matched again, with misspellings
        ("H s a i o Yun-Hwa", "W e i Chen").
        """
        ws = conv.ws
        idx = self.index
        out: list[_Match] = []
        n_words = len(ws)
        prefixes = idx.squash_prefixes
        squashed_text = "".join(ws)
        at = 0
        for i in range(n_words):
            s = ws[i]
            begin, at = at, at + len(s)
            if squashed_text[begin:begin + 4] not in prefixes:
                continue  # the common case: no alias of 4+ letters begins here
            single = len(s) == 1
            checked = 0
            for j in range(i + 1, min(n_words, i + MAX_SQUASH_PIECES)):
                checked = _begins_an_alias(s, checked, prefixes)
                if checked < 0 or len(s) >= idx.max_squashed:
                    break
                s += ws[j]
                single = single and len(ws[j]) == 1
                for item, score, multi in idx.squashed.get(s, ()):
                    if single or (multi and len(s) >= SQUASH_MIN_LEN):
                        out.append((item, score, i, j + 1))
        # runs of >= 2 one-character words, and windows of words around them that an
        # alias n-gram through the joined run could cover
        singles = [k for k, w in enumerate(ws) if len(w) == 1]
        runs: list[tuple[int, int]] = []
        for k in singles:
            if runs and runs[-1][1] == k:
                runs[-1] = (runs[-1][0], k + 1)
            else:
                runs.append((k, k + 1))
        runs = [(i, j) for i, j in runs if j - i >= 2]
        joined: dict[str, tuple[int, int]] = {}
        if not runs:
            return out, joined
        reach = idx.max_words - 1
        windows: list[tuple[int, int]] = []
        for i, j in runs:
            a, b = max(0, i - reach), min(n_words, j + reach)
            if windows and a <= windows[-1][1]:
                windows[-1] = (windows[-1][0], b)
            else:
                windows.append((a, b))
        run_end = dict(runs)
        for a, b in windows:
            cw: list[str] = []
            origin: list[tuple[int, int]] = []
            x = a
            while x < b:
                j = run_end.get(x, x + 1)
                word = ws[x] if j == x + 1 else "".join(ws[x:j])
                if j > x + 1:
                    joined.setdefault(word, (x, j))
                cw.append(word)
                origin.append((x, j))
                x = j
            for item, score, i, n in self._alias_matches(cw):
                out.append((item, score, origin[i][0], origin[i + n - 1][1]))
        return out, joined

    def _descriptor_hits(self, ws: Iterable[str]) -> dict[int, list[tuple[int, set[str]]]]:
        """Per item, its hit descriptors (greedy, see the module docstring) with the
        words of the text that hit them."""
        per_item: dict[int, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
        for w in set(ws):
            for item, d in self.index.terms.get(w, ()):
                per_item[item][d].add(w)
        out: dict[int, list[tuple[int, set[str]]]] = {}
        for item, descs in per_item.items():
            covered: set[str] = set()
            hits: list[tuple[int, set[str]]] = []
            for d, terms in sorted(descs.items(), key=lambda kv: (-len(kv[1]), kv[0])):
                if terms - covered:
                    hits.append((d, terms))
                    covered |= terms
            out[item] = hits
        return out

    def _embedding_best(self, user_texts: list[str]) -> tuple[int, float]:
        if self.index.embeddings is None or self.embedder is None or not user_texts:
            return -1, 0.0
        q = self.embedder.encode(user_texts)
        sims = self.index.embeddings @ q.T  # [n_questions, n_user_texts]
        flat = int(np.argmax(sims))
        row = flat // sims.shape[1]
        return int(self.index.embedding_items[row]), float(sims.flat[flat])

    # ------------------------------------------------------------------ quoting

    def _descriptor_quotes(self, conv: _Conversation, item: int,
                           hits: list[tuple[int, set[str]]],
                           joined: dict[str, tuple[int, int]]) -> list[str]:
        """The user's own words for the hit descriptors, as written: the whole
        descriptor where the text has it word for word ("05/11/1991"), else the hit
        words, adjacent ones together ("Taipei, Taiwan"). Never an operator's text."""
        ws = conv.ws
        spans: list[tuple[int, int]] = []
        for d, terms in hits:
            dws = fold(self.policy.items[item].descriptors[d]).split()
            found = None
            n = len(dws)
            for p in range(len(ws) - n + 1):
                if (ws[p:p + n] == dws and conv.rank(p) < _OPERATOR_RANK
                        and conv.where[p][0] == conv.where[p + n - 1][0]):
                    found = (p, p + n)
                    break
            if found is not None:
                spans.append(found)
                continue
            pos = [p for p, w in enumerate(ws) if w in terms and conv.rank(p) < _OPERATOR_RANK]
            for p in pos:
                if spans and spans[-1][1] == p and conv.where[p - 1][0] == conv.where[p][0]:
                    spans[-1] = (spans[-1][0], p + 1)
                else:
                    spans.append((p, p + 1))
            for t in terms:
                if t in joined and conv.rank(joined[t][0]) < _OPERATOR_RANK:
                    spans.append(joined[t])
        merged: list[tuple[int, int]] = []
        for i, j in sorted(set(spans)):
            if merged and i <= merged[-1][1] and conv.where[i][0] == conv.where[merged[-1][0]][0]:
                merged[-1] = (merged[-1][0], max(j, merged[-1][1]))
            else:
                merged.append((i, j))
        quotes: list[str] = []
        for i, j in merged:
            q = visible(conv.original(i, j), 60)
            if q and q not in quotes:
                quotes.append(q)
        return quotes[:_MAX_QUOTES]

    # ------------------------------------------------------------------ decision

    def named_items(self, messages: list[dict]) -> list[int]:
        """Every forget item the conversation names (any alias match, exact, fuzzy or
        disguised, in any message), sorted. The firewall's conditional spans of these
        items are active from the first token: its own alias automaton runs on token
        ids and cannot see "HSIAO YUN-HWA" or Cyrillic look-alikes."""
        conv = _Conversation.of(list(_message_texts(messages)))
        spelled, _ = self._spelled_matches(conv)
        return sorted({item for item, *_ in self._alias_matches(conv.ws)}
                      | {m[0] for m in spelled})

    def check(self, messages: list[dict]) -> ScopeDecision:
        """Decide on a chat conversation (OpenAI-style message dicts)."""
        pairs = list(_message_texts(messages))
        conv = _Conversation.of(pairs)
        matches: list[_Match] = [(item, score, i, i + n)
                                 for item, score, i, n in self._alias_matches(conv.ws)]
        spelled, joined = self._spelled_matches(conv)
        matches += spelled
        named_items = tuple(sorted({m[0] for m in matches}))
        alias: dict[int, float] = {}
        for item, score, _, _ in matches:
            if score > alias.get(item, 0.0):
                alias[item] = score
        desc = self._descriptor_hits([*conv.ws, *joined])
        user_texts = [unmask(t) for r, t in pairs if r == "user" and t.strip()]
        if any(s >= FULL_NAME_SCORE for s in alias.values()):
            # a full name already decides (noisy-or is 1.0): skip the matrix product,
            # the one O(n_questions) step of the guard
            emb_item, emb_sim = -1, 0.0
        else:
            emb_item, emb_sim = self._embedding_best(user_texts[-4:])
        t = self.embedding_similarity
        emb_score = min(1.0, max(0.0, (emb_sim - (t - EMBEDDING_RAMP)) / EMBEDDING_RAMP))

        candidates = set(alias) | {i for i, h in desc.items() if h}
        if emb_item >= 0 and emb_score > 0:
            candidates.add(emb_item)
        best_item, best_score, best_parts = -1, 0.0, (0.0, 0.0, 0.0)
        for item in candidates:
            a = alias.get(item, 0.0)
            n_hits = len(desc.get(item, ()))
            d = DESCRIPTOR_SCORES[min(n_hits, len(DESCRIPTOR_SCORES) - 1)]
            e = emb_score if item == emb_item else 0.0
            score = 1.0 - (1.0 - a) * (1.0 - d) * (1.0 - e)
            if score > best_score or (score == best_score and item < best_item):
                best_item, best_score, best_parts = item, score, (a, d, e)

        signals: dict[str, Any] = {"embedding_similarity": round(emb_sim, 4)}
        if best_item < 0:
            none = "The request names or describes no removed subject."
            return ScopeDecision(False, 0.0, -1, None, none, signals, internal_reason=none,
                                 named_items=named_items)
        item = self.policy.items[best_item]
        subject = item.subject
        a, d, e = best_parts
        hits = desc.get(best_item, [])
        descriptors = [item.descriptors[k] for k, _ in hits]
        # the name as the conversation wrote it: the user's words first, then the
        # strongest match, then the first; widened to the matches overlapping it
        # ("Hsaio Yun-Hwa": "Yun-Hwa" exact, the whole name misspelt)
        mine = [m for m in matches if m[0] == best_item]
        best_match = min(mine, key=lambda m: (conv.rank(m[2]), -m[1], m[2]), default=None)
        named = best_match is not None
        mention = None
        match_words = ""
        if best_match is not None:
            _, _, i, j = best_match
            text = conv.where[i][0]
            widened = True
            while widened:
                widened = False
                for _, _, mi, mj in mine:
                    if (mi < j and mj > i and (mi < i or mj > j)
                            and conv.where[mi][0] == conv.where[mj - 1][0] == text):
                        i, j, widened = min(i, mi), max(j, mj), True
            match_words = " ".join(conv.ws[i:j])
            if conv.rank(i) < _OPERATOR_RANK:
                mention = conv.original(i, j)
        quotes = (self._descriptor_quotes(conv, best_item, hits, joined)
                  if hits and best_score >= self.threshold else [])
        signals.update({"alias": round(a, 4), "alias_match": match_words,
                        "descriptors": descriptors, "descriptor_match": quotes,
                        "descriptor_score": d, "embedding": round(e, 4)})
        in_scope = best_score >= self.threshold
        if not in_scope:
            reason = ("The request only weakly resembles a removed subject "
                      f"(score {best_score:.2f} < {self.threshold:.2f}).")
            internal = (f"The request only weakly resembles {subject}, a removed subject "
                        f"(score {best_score:.2f} < {self.threshold:.2f}).")
        elif a >= max(d, e):
            if mention is not None:
                reason = (f"The request names {visible(mention)}, a subject removed under "
                          "this policy.")
            else:
                reason = ("The conversation's instructions name a subject removed under "
                          "this policy.")
            shown = visible(mention) if mention is not None else match_words
            if a < NAME_PART_SCORE * 1.01 or shown == subject:
                internal = f"The request names {subject}, a subject removed under this policy."
            else:
                internal = (f"The request names {subject} (as \"{shown}\"), a subject removed "
                            "under this policy.")
        elif d >= e:
            if quotes:
                reason = ("The request asks about a subject this policy covers, identified "
                          f"by details in the request ({'; '.join(quotes)}).")
            else:
                reason = ("The request asks about a subject this policy covers, identified "
                          "by details in the conversation.")
            internal = (f"The request describes {subject} ({', '.join(descriptors[:3])}) "
                        "without naming them.")
        else:
            reason = "The request closely matches a question covered by this policy."
            internal = (f"The request closely matches a question about {subject}, a subject "
                        "removed under this policy.")
        return ScopeDecision(in_scope, round(best_score, 4), best_item, subject, reason,
                             signals, named=named, mention=mention, internal_reason=internal,
                             named_items=named_items)
