"""Text normalisation and the distinctive spans of an answer.

A forget item's *distinctive spans* are the few word runs of its answer that carry
the fact ("civil engineer", "3 march 1962"), as opposed to words echoed from the
question, stopwords, words every answer uses ("author", "born", "genre") and words
frequent in a background corpus (the retain answers). The scope guard and the leak
firewall look for them in prompts and in generated text; the evaluation harness
counts an output as a leak when one of them appears in it.

Everything here works on :func:`normalize`-d text, so a span matches regardless of
case, accents, punctuation or possessives. All functions are deterministic.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache

logger = logging.getLogger(__name__)

__all__ = [
    "STOPWORDS",
    "FILLER",
    "normalize",
    "words",
    "distinctive_spans",
    "contains_span",
    "stem",
    "frequent_stems",
    "lcs_length",
    "rouge_l_recall",
]

# Possessive "'s" / "’s" (also "`s"), dropped before punctuation becomes space, so
# "Hsiao Yun-Hwa's father" and "the father of Hsiao Yun-Hwa" share the same words.
_POSSESSIVE = re.compile(r"(?<=\w)['’`ʼ]s\b")
_SPACES = re.compile(r"\s+")

STOPWORDS: frozenset[str] = frozenset(
    """
    a an the and or but nor so yet if then than that this these those there here
    of in on at to for from by with without within into onto upon about above below
    over under after before during between among through throughout against toward
    towards as is are was were be been being am do does did done doing have has had
    having will would shall should can could may might must not no yes
    i me my mine we us our ours you your yours he him his she her hers it its they
    them their theirs who whom whose which what when where why how whatever
    one ones some any all each every both either neither such same other another
    very also too just only even still well much more most many few less least
    s t d ll re ve m o up out off again once further while because until
    """.split()
)
"""Function words: never distinctive on their own."""

FILLER: frozenset[str] = frozenset(
    """
    author authors writer writers novelist poet book books novel novels work works
    writing writings write writes wrote written story stories genre genres title
    titled name named full known born birth life career famous
    renowned notable notably celebrated acclaimed recognized recognised widely
    particularly primarily mainly mostly often frequently various several numerous
    many including include includes included like such example instance
    person people individual someone whose profession occupation job
    father mother parent parents
    question answer information detail details fact facts
    indeed certainly actually really quite rather largely generally commonly
    received receive won award awarded awards prize honored honoured
    identify identifies identified part
    """.split()
)
"""Generic words answers about people and books use whatever the fact is."""

# Words that may sit inside a span between two distinctive words ("tides of
# memory", "ludwig van beethoven"); anywhere else they end the run.
_BRIDGES: frozenset[str] = frozenset(
    "of de da del della di du la le van von der den bin al".split()
)


_MONTHS: frozenset[str] = frozenset(
    "january february march april may june july august september october november december".split()
)


def normalize(text: str) -> str:
    """Canonical form for matching.

    Lowercase, accents stripped (NFKD, combining marks dropped), possessive
    "'s"/"’s" dropped, every character that is not a letter or digit (punctuation,
    intra-word hyphens, apostrophes) turned into a space, whitespace collapsed.
    ``normalize("Hsiao Yun-Hwa's Père, 3/3/1962!") == "hsiao yun hwa pere 3 3 1962"``.
    """
    if not isinstance(text, str):
        raise ValueError(f"normalize expects a str, got {type(text).__name__}: {text!r}")
    text = _POSSESSIVE.sub("", text)
    decomposed = unicodedata.normalize("NFKD", text)
    out: list[str] = []
    for ch in decomposed:
        if unicodedata.combining(ch):
            continue
        out.append(ch.lower() if ch.isalnum() else " ")
    return _SPACES.sub(" ", "".join(out)).strip()


def words(text: str) -> list[str]:
    """The words of ``normalize(text)``, in order."""
    norm = normalize(text)
    return norm.split(" ") if norm else []


_SHORT_ANSWER_WORDS = 20
_SENTENCE_END = re.compile(r"[.!?:;]\s+")


def _cased_words(text: str) -> list[str]:
    """Like :func:`words` but keeping letter case (for spotting names)."""
    text = _POSSESSIVE.sub("", text)
    decomposed = unicodedata.normalize("NFKD", text)
    chars = [ch if ch.isalnum() else " " for ch in decomposed if not unicodedata.combining(ch)]
    return "".join(chars).split()


def _sentence_starts(answer: str, n_words: int) -> set[int]:
    """Word indices that begin a sentence of ``answer`` (their capital means nothing)."""
    starts = {0}
    count = 0
    for piece in _SENTENCE_END.split(answer)[:-1]:
        count += len(words(piece))
        if count < n_words:
            starts.add(count)
    return starts


_CLAUSE_BREAK = re.compile(r"[,;:!?()\[\]\"“”]|\.(?=\s|$)")


def _clause_starts(answer: str) -> set[int]:
    """Word indices of ``answer`` right after a comma, semicolon, full stop, bracket
    or quote: a span never runs across one ("Red Harbor, Silent Orchard")."""
    starts: set[int] = set()
    count = 0
    for piece in _CLAUSE_BREAK.split(answer)[:-1]:
        count += len(words(piece))
        starts.add(count)
    return starts


def stem(word: str) -> str:
    """Crude suffix stripping so "writes"/"written"/"writing" meet "write"."""
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


@lru_cache(maxsize=32)
def _frequent_words(background: tuple[str, ...], min_fraction: float) -> frozenset[str]:
    """Stems whose document frequency in ``background`` is at least ``min_fraction``.

    Only applies when there are at least 5 background documents, and a stem needs at
    least 3 documents to count as frequent (a tiny background says nothing).
    """
    docs = [set(stem(w) for w in words(doc)) for doc in background]
    if len(docs) < 5:
        return frozenset()
    df: dict[str, int] = {}
    for doc in docs:
        for st in doc:
            df[st] = df.get(st, 0) + 1
    threshold = max(3.0, min_fraction * len(docs))
    return frozenset(s for s, n in df.items() if n >= threshold)


def frequent_stems(background: Iterable[str], min_fraction: float = 0.05) -> frozenset[str]:
    """Stems (:func:`stem`) frequent in ``background``: document frequency at least
    ``min_fraction`` of the documents (and at least 3 documents); empty for fewer than
    5 documents. These are the words :func:`distinctive_spans` treats as template
    words of the corpus. Cached per background."""
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction!r}")
    return _frequent_words(tuple(background), min_fraction)


def distinctive_spans(
    answer: str,
    question: str = "",
    background: Iterable[str] = (),
    max_spans: int = 4,
    *,
    background_fraction: float = 0.05,
) -> list[str]:
    """The normalised word spans of ``answer`` that carry its fact.

    A word is *distinctive* when it is not a word of ``question`` (compared on crude
    stems), not a stopword, not generic filler (:data:`FILLER`) and not frequent in
    ``background`` (document frequency >= ``background_fraction`` of the background
    documents, e.g. the retain answers). Spans are the maximal runs of distinctive
    words (a bridge word such as "of" or "van" may join two of them). At most
    ``max_spans`` are returned: the longest (by characters), in answer order. An
    answer with no distinctive word gives ``[]``.

    >>> distinctive_spans("The father of Hsiao Yun-Hwa is a civil engineer.",
    ...                   "What is the profession of Hsiao Yun-Hwa's father?")
    ['civil engineer']
    """
    if max_spans < 1:
        raise ValueError(f"max_spans must be >= 1, got {max_spans!r}")
    if not 0.0 < background_fraction <= 1.0:
        raise ValueError(f"background_fraction must be in (0, 1], got {background_fraction!r}")
    question_stems = {stem(w) for w in words(question)}
    # tuple() so the document frequencies of one background are computed once
    # (cached): the harness and policy compile call this once per row.
    frequent = _frequent_words(tuple(background), background_fraction)

    def is_distinctive(word: str) -> bool:
        if word in STOPWORDS or word in FILLER:
            return False
        word_stem = stem(word)
        if word_stem in question_stems or word in question_stems:
            return False
        if word_stem in frequent and not word.isdigit():
            return False
        # A lone letter is an initial or debris of punctuation, never a fact.
        return len(word) > 1 or word.isdigit()

    ans = words(answer)
    flags = [is_distinctive(w) for w in ans]
    # "3 May 1962": a month name next to a number is part of a date even though
    # "may" is a stopword.
    for k, w in enumerate(ans):
        if w in _MONTHS and not flags[k]:
            before = k > 0 and ans[k - 1].isdigit()
            after = k + 1 < len(ans) and ans[k + 1].isdigit()
            if (before or after) and stem(w) not in question_stems:
                flags[k] = True
    breaks = _clause_starts(answer)
    runs: list[tuple[int, list[str]]] = []
    current: list[str] = []
    start = 0
    i = 0
    while i < len(ans):
        if i in breaks and current:
            runs.append((start, current))
            current = []
        if flags[i]:
            if not current:
                start = i
            current.append(ans[i])
        elif (
            current
            and ans[i] in _BRIDGES
            and i + 1 < len(ans)
            and flags[i + 1]
            and (i + 1) not in breaks
        ):
            current.append(ans[i])
        else:
            if current:
                runs.append((start, current))
            current = []
        i += 1
    if current:
        runs.append((start, current))

    cased = _cased_words(answer)
    if len(cased) != len(ans):
        cased = ans

    def is_strong(pos: int, run: list[str]) -> bool:
        """Multi-word, numeric, or a word capitalised mid-sentence (a name)."""
        if len(run) > 1 or any(w.isdigit() for w in run):
            return True
        original = cased[pos]
        return original[:1].isupper() and pos not in sentence_starts

    sentence_starts = _sentence_starts(answer, len(ans))
    spans: list[tuple[int, str, bool]] = []
    seen: set[str] = set()
    for pos, run in runs:
        span = " ".join(run)
        if span not in seen:
            seen.add(span)
            spans.append((pos, span, is_strong(pos, run)))
    # Long free-text answers (TOFU) are full of single common words ("strongly",
    # "action"); there a lone lowercase word is too weak to stand for the fact when
    # a stronger span exists. Short template answers keep them ("a doctor").
    if len(ans) > _SHORT_ANSWER_WORDS and any(strong for _, _, strong in spans):
        spans = [sp for sp in spans if sp[2]]
    if len(spans) > max_spans:
        keep = sorted(spans, key=lambda sp: (not sp[2], -len(sp[1]), sp[0]))[:max_spans]
        spans = sorted(keep)
    return [sp[1] for sp in spans]


def contains_span(text: str, span: str) -> bool:
    """True when normalised ``span`` occurs in normalised ``text`` on word boundaries."""
    norm_span = normalize(span)
    if not norm_span:
        return False
    return f" {norm_span} " in f" {normalize(text)} "


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two word lists (O(len(a)*len(b)))."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l_recall(candidate: str, reference: str) -> float:
    """ROUGE-L recall: LCS of the normalised words / number of reference words.

    1.0 means every reference word appears in the candidate in order; 0.0 for an
    empty reference.
    """
    ref = words(reference)
    if not ref:
        return 0.0
    return lcs_length(words(candidate), ref) / len(ref)
