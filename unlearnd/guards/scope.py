"""Scope guard: does a conversation ask about something the policy removed?

Runs in the API process, before the request reaches the engine. Three signals, each
scored in [0, 1] per forget item, combined with a noisy-or
(``1 - prod(1 - s)``); the best item's combined score is compared with the policy's
``scope_threshold`` (default 0.6):

- **alias** (the request names the subject): a normalised word n-gram of the text
  equals a normalised alias. Full (multi-word) names score 1.0, a distinctive surname
  alone 0.7, another single name part (a given name) 0.45 (not enough alone). Words
  within one edit of an alias word (a deletion index, checked with rapidfuzz
  ``ratio >= fuzzy_ratio``) count too, at 0.9x.
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

The whole conversation (system, user and assistant texts) is searched for names and
descriptors; the embedding signal looks at user messages only.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rapidfuzz.distance import Indel

from unlearnd.guards.embeddings import Embedder, get_embedder
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


@dataclass(frozen=True)
class ScopeDecision:
    """The scope guard's verdict on one conversation.

    Attributes:
        in_scope: True when the request falls inside the policy's forget scope (the
            combined score reached the threshold); the request is then refused.
        score: combined score of the best-matching forget item, in [0, 1].
        item: index of that item in the policy, -1 when no signal fired at all.
        subject: that item's subject, None when ``item == -1``.
        reason: one sentence naming the strongest signal.
        signals: per-signal detail for logs and the API's ``unlearning`` block.
    """

    in_scope: bool
    score: float
    item: int = -1
    subject: str | None = None
    reason: str = ""
    signals: dict[str, Any] = field(default_factory=dict)


def messages_text(messages: Iterable[dict], roles: Iterable[str] | None = None) -> list[str]:
    """The texts of chat ``messages`` (str content or OpenAI content parts)."""
    wanted = set(roles) if roles is not None else None
    out: list[str] = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        if wanted is not None and m.get("role") not in wanted:
            continue
        content = m.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    out.append(part["text"])
    return out


def _deletes(word: str) -> list[str]:
    return [word[:i] + word[i + 1:] for i in range(len(word))]


class _ScopeIndex:
    """Lookup structures built once per compiled policy (shared by all guards)."""

    def __init__(self, policy: CompiledPolicy) -> None:
        t0 = time.perf_counter()
        # first word -> [(alias words, item, base score)]
        self.phrases: dict[str, list[tuple[tuple[str, ...], int, float]]] = defaultdict(list)
        self.alias_vocab: set[str] = set()
        self.deletes: dict[str, set[str]] = defaultdict(set)
        for i, item in enumerate(policy.items):
            subject_words = words(item.subject)
            surname = subject_words[-1] if subject_words else ""
            for alias in item.aliases:
                ws = tuple(alias.split())
                if not ws:
                    continue
                if len(ws) >= 2:
                    score = FULL_NAME_SCORE
                elif ws[0] == surname:
                    score = SURNAME_SCORE
                else:
                    score = NAME_PART_SCORE
                self.phrases[ws[0]].append((ws, i, score))
                for w in ws:
                    if w in self.alias_vocab:
                        continue
                    self.alias_vocab.add(w)
                    if len(w) >= MIN_FUZZY_LEN:
                        self.deletes[w].add(w)
                        for d in _deletes(w):
                            self.deletes[d].add(w)
        # strong term -> [(item, descriptor index)]
        self.terms: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for i, item in enumerate(policy.items):
            for d, terms in enumerate(item.descriptor_terms):
                for t in terms:
                    self.terms[t].append((i, d))
        self.embeddings = policy.embeddings() if policy.embedding_info else None
        self.embedding_items = policy.embedding_items
        self.embedder_name = (policy.embedding_info or {}).get("embedder")
        logger.info("scope index for %s: %d alias words, %d descriptor terms in %.1f ms",
                    policy.dir, len(self.alias_vocab), len(self.terms),
                    (time.perf_counter() - t0) * 1e3)


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

    def _alias_scores(self, ws: list[str]) -> dict[int, tuple[float, str]]:
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
        best: dict[int, tuple[float, str]] = {}
        for i, w in enumerate(canon):
            for phrase, item, score in self.index.phrases.get(w, ()):
                n = len(phrase)
                if tuple(canon[i:i + n]) != phrase:
                    continue
                if any(fuzzy[i:i + n]):
                    score *= FUZZY_FACTOR
                if score > best.get(item, (0.0, ""))[0]:
                    best[item] = (score, " ".join(ws[i:i + n]))
        return best

    def _descriptor_hits(self, ws: list[str]) -> dict[int, list[int]]:
        per_item: dict[int, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
        for w in set(ws):
            for item, d in self.index.terms.get(w, ()):
                per_item[item][d].add(w)
        out: dict[int, list[int]] = {}
        for item, descs in per_item.items():
            covered: set[str] = set()
            hits: list[int] = []
            for d, terms in sorted(descs.items(), key=lambda kv: (-len(kv[1]), kv[0])):
                if terms - covered:
                    hits.append(d)
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

    # ------------------------------------------------------------------ decision

    def check(self, messages: list[dict]) -> ScopeDecision:
        """Decide on a chat conversation (OpenAI-style message dicts)."""
        texts = messages_text(messages)
        ws = words(" ".join(texts))
        alias = self._alias_scores(ws)
        desc = self._descriptor_hits(ws)
        user_texts = [t for t in messages_text(messages, roles=("user",)) if t.strip()]
        if any(s >= FULL_NAME_SCORE for s, _ in alias.values()):
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
            a = alias.get(item, (0.0, ""))[0]
            n_hits = len(desc.get(item, ()))
            d = DESCRIPTOR_SCORES[min(n_hits, len(DESCRIPTOR_SCORES) - 1)]
            e = emb_score if item == emb_item else 0.0
            score = 1.0 - (1.0 - a) * (1.0 - d) * (1.0 - e)
            if score > best_score or (score == best_score and item < best_item):
                best_item, best_score, best_parts = item, score, (a, d, e)

        signals: dict[str, Any] = {"embedding_similarity": round(emb_sim, 4)}
        if best_item < 0:
            return ScopeDecision(False, 0.0, -1, None,
                                 "The request names or describes no removed subject.", signals)
        item = self.policy.items[best_item]
        a, d, e = best_parts
        descriptors = [item.descriptors[k] for k in desc.get(best_item, ())]
        signals.update({"alias": round(a, 4), "alias_match": alias.get(best_item, (0, ""))[1],
                        "descriptors": descriptors, "descriptor_score": d,
                        "embedding": round(e, 4)})
        in_scope = best_score >= self.threshold
        subject = item.subject
        if not in_scope:
            reason = (f"The request only weakly resembles {subject}, a removed subject "
                      f"(score {best_score:.2f} < {self.threshold:.2f}).")
        elif a >= max(d, e):
            match = alias[best_item][1]
            if a < NAME_PART_SCORE * 1.01 or words(subject) == match.split():
                reason = f"The request names {subject}, a subject removed under this policy."
            else:
                reason = (f"The request names {subject} (as \"{match}\"), a subject removed "
                          "under this policy.")
        elif d >= e:
            reason = (f"The request describes {subject} ({', '.join(descriptors[:3])}) "
                      "without naming them.")
        else:
            reason = (f"The request closely matches a question about {subject}, a subject "
                      "removed under this policy.")
        return ScopeDecision(in_scope, round(best_score, 4), best_item, subject, reason, signals)
