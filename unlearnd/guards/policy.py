"""Unlearning policy: what a tenant's traffic must no longer get, compiled for the guards.

A *policy spec* (:class:`PolicySpec`) is built from a forget set and a retain set in the
TOFU QA JSONL format: the forget QA pairs are grouped into *forget items*, one per
subject (an author, a person, a topic). Each item carries

- ``aliases``: the ways a request can name the subject (full name, surname, given name
  when distinctive, the name without hyphens or accents), normalised;
- ``spans``: the distinctive spans of its answers (``spans.distinctive_spans``), i.e.
  the words that carry the facts to forget; the leak firewall blocks them;
- ``descriptors``: identifying context (birthplace, dates, genre, titles...) taken from
  those spans and from the questions that do not name the subject; the scope guard
  uses them to recognise a subject described without its name.

:func:`compile_policy` turns a spec into a directory the guards load cheaply in both
processes (the API process and the engine process)::

    DIR/policy.json      format "unlearnd.policy/1": settings, items, token ids of aliases
                         and spans with the base model's tokenizer (each as it reads
                         at a text's start, after a space, after punctuation and at a
                         reply's start: byte-level BPE and SentencePiece alike), the EOS
                         id, the chat template's reply context
    DIR/tokenizer/       the base model's tokenizer files (to render refusals)
    DIR/embeddings.npy   forget-question embeddings (when the embedding signal is on)
    DIR/assistant/       the contrastive assistant model (when given)

:meth:`CompiledPolicy.load` reads it, cached by (path, mtime) in a process-wide LRU of
``UNLEARND_POLICY_CACHE_SIZE`` policies (default 256): hundreds of tenants' policies
stay bounded in memory, and a policy evicted while requests still use it lives on in
their references until they end. Tokenizers are shared between policies by the sha256
of their ``tokenizer.json`` (every tenant of one base has the same one).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import unicodedata
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import typer

from unlearnd.guards import spans as spans_mod
from unlearnd.guards.spans import FILLER, STOPWORDS, distinctive_spans, normalize, words
from unlearnd.inputs import (
    KINDS,
    ForgetSet,
    Subject,
    as_background,
    load_qa_jsonl,
    read_forget,
    read_retain,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "MECHANISMS",
    "DEFAULT_REFUSAL_TEMPLATE",
    "DEFAULT_UNNAMED_SUBJECT",
    "DEFAULT_IGNORANT_TEMPLATE",
    "ForgetItem",
    "PolicySpec",
    "CompiledItem",
    "CompiledPolicy",
    "compile_policy",
    "load_qa_jsonl",
    "policy_app",
]

FORMAT = "unlearnd.policy/1"
"""Value of ``policy.json["format"]``; :meth:`CompiledPolicy.load` refuses anything else."""

MECHANISMS: frozenset[str] = frozenset({"adapter", "contrastive", "refusal", "firewall"})
"""Mechanisms a policy can combine. ``adapter`` is served by vLLM multi-LoRA (registry),
the other three by the guards."""

DEFAULT_REFUSAL_TEMPLATE = (
    "I can't help with that. {reason} Information about {subject} was removed from this "
    "model. I'm happy to help with other questions."
)
"""Explained refusal; ``{reason}`` is the scope guard's public one-sentence reason,
``{subject}`` the subject as the user named it (or :data:`DEFAULT_UNNAMED_SUBJECT`),
``{policy}`` (optional, not in the default: an internal name) the policy name."""

DEFAULT_UNNAMED_SUBJECT = "the person you describe"
"""What a refusal calls a subject the conversation did not name."""

DEFAULT_IGNORANT_TEMPLATE = "I don't know. I have no reliable information about {subject}."
"""``refusal_style = "ignorant"``: the reply of a model that never knew; it confirms
nothing was removed. ``{subject}`` as in :data:`DEFAULT_REFUSAL_TEMPLATE`."""

REFUSAL_STYLES = ("explained", "ignorant")
TOP_LOGPROBS = ("allow", "deny")
IN_SCOPE_COMPLETIONS = ("refuse", "continue")

DEFAULT_EMBEDDING_SIMILARITY = {"hashing": 0.95, "minilm": 0.85}
"""Per-embedder default of ``PolicySpec.embedding_similarity``."""

FIREWALL_CONDITIONING = ("auto", "always", "subject")
VERBATIM_CONDITIONING = ("always", "subject")
EMBEDDERS = ("hashing", "minilm", "none")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


# --------------------------------------------------------------------------- spec


@dataclass
class ForgetItem:
    """One subject to forget, with its QA pairs and what identifies it.

    ``aliases`` are display forms ("Hsiao Yun-Hwa", "Yun-Hwa"); matching uses their
    :func:`normalize`-d forms. ``spans`` and ``descriptors`` are normalised.
    """

    subject: str
    questions: list[str]
    answers: list[str]
    aliases: list[str] = field(default_factory=list)
    spans: list[str] = field(default_factory=list)
    descriptors: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    """Spans of a text item's facts that its spans miss because other subjects share
    their words (:func:`_text_item`); the firewall bans them only with the subject in
    context, whatever ``firewall_conditioning`` says."""


@dataclass
class PolicySpec:
    """Everything a policy is made of, before tokenisation.

    Attributes:
        items: the forget items (one per subject).
        retain: retain QA dicts (``question``/``answer``); background for distinctiveness.
        name: policy name (logs, audit; in refusals only if the template has ``{policy}``).
        refusal_template: see :data:`DEFAULT_REFUSAL_TEMPLATE`; must contain
            ``{subject}`` and ``{reason}``.
        refusal_style: "explained" (default: the refusal states its reason, so a user
            knows why and that the rest of the model works) or "ignorant" (the reply of
            a model that never knew, :data:`DEFAULT_IGNORANT_TEMPLATE`, and no decision
            in the response's ``unlearning`` block: for erasure requests where the fact
            that someone asked to be forgotten is itself the secret).
        refusal_unnamed_subject: how a refusal refers to a subject the user did not name.
        ignorant_template: the "ignorant" reply; may contain ``{subject}`` only.
        top_logprobs: "allow" or "deny": whether clients may ask this policy's tenant for
            top alternatives (chat ``top_logprobs`` > 0, completions ``logprobs`` > 0).
            Adapter unlearning is shallow: the alternatives of an adapter tenant can
            still carry forgotten answers (README, "Security").
        in_scope_completions: "refuse" (default) or "continue": what an in-scope raw
            ``/v1/completions`` prompt gets (chat and Responses requests in scope are
            refused either way). "continue" (needs the firewall): the text is continued,
            the matched subject's fact spans (and, for documents and subjects' facts,
            its ``facts``: the facts' words other subjects share) banned whatever the
            context says and the forget documents' runs banned by the verbatim
            firewall, as a model that never read them would continue it, instead of a
            refusal a model that never knew would not write (MUSE's VerbMem: a
            biography's opening names its subject, so a refusing tenant scores the
            refusal). What it gives up: in-scope completions are no longer refused, so
            there a fact said in words the subject's texts do not hold is stopped only
            by what the weights forgot (an adapter), as for a firewall-only tenant;
            and a completion that names nothing the scope guard knows is out of scope,
            as it is refusing. Measured (demo world, a policy from biographies, with
            an NPO adapter): no fact out under the attack suite, a chat turn or plain
            Q/A written into a completions prompt included (before ``facts``, from
            spans alone: prefix_injection got 8 of 32). Off by default.
        mechanisms: subset of :data:`MECHANISMS`.
        scope_threshold: combined scope score at or above which a request is in scope.
        fuzzy_ratio: rapidfuzz ratio (0-100) at or above which a misspelt word counts as
            an alias word.
        embedding_similarity: cosine similarity to a forget question at or above which
            the embedding signal alone puts a request in scope; None picks the
            embedder's default (:data:`DEFAULT_EMBEDDING_SIMILARITY`: hashing 0.95, a
            near-copy, since template questions about another person reach 0.85;
            minilm 0.85).
        embedder: "hashing" (char n-gram hashing, pure numpy, default), "minilm"
            (all-MiniLM-L6-v2, offline) or "none" (no embedding signal).
        contrastive_weight: ``w`` in ``z = z_base - w * z_assist``.
        contrastive_alpha: plausibility cut in (0, 1]: only tokens with
            ``p_base >= alpha * max p_base`` stay candidates (see the kernel).
        contrastive_min_p: after the contrast, tokens with
            ``p' < contrastive_min_p * max p'`` become ``-inf`` (0 disables). A hard cut
            the client's temperature cannot undo: without it, sampling at temperature 1
            from the contrasted distribution still draws the forgotten fact (demo world,
            worst of 8 samples: 28% of forget questions leak at 0.1, 22% at 0.3, 6% at
            0.5, none at 0.6-0.9: default 0.7; sampling then only chooses among
            near-ties of the contrasted best token).
        contrastive_ban_p: tokens the assistant itself gives probability
            ``>= contrastive_ban_p`` become ``-inf`` (0 disables). The assistant is
            trained uniform everywhere but on the forget facts (retain answers, the
            answers' other words), so what it is sure of is a fact; the contrast is a
            shift a client's ``logit_bias`` or allowed-token list can outweigh, this ban
            is not (demo world, teacher-forced: 0.05 or more on the fact token at 58 of 60
            forget fact positions and 261 of 362 probe ones, on any token at 1 of
            1009 retain answer positions; default 0.05).
        contrastive_ban_window: once the assistant is sure of a token, that token and the
            assistant's own greedy continuation of it (the rest of the fact, while it
            stays sure, at most this many tokens) stay banned for this many output
            tokens, so skipping the fact's first word or repeating the word before it
            does not bring the rest back (0: only the sure token, only now).
        contrastive_gain_gate: None (default) or a number of nats: contrast and ban only
            what the assistant's LoRA added over the base's first K layers it is built on
            (needs an assistant saved as such a LoRA, ``train-assistant --save lora``).
            The contrast subtracts ``max(0, log p_A - log p_S)`` (``S``: those layers
            without the LoRA) instead of ``log p_A``, and a token is banned only where
            ``p_A >= contrastive_ban_p`` and ``log p_A - log p_S >= gate``. Without it,
            what the shallow copy already predicts of any text ("Jane Aust" -> "en") is
            banned wherever the assistant is as sure (TOFU: real authors 0.14 answered);
            with it (gate 0, HF simulation) 0.93, at the cost of forget leak 0.12
            instead of 0.03: the shallow copy's sureness is also most of what forgets.
        contrastive_floor: None (default) or C >= 0 nats: the assistant's
            log-probabilities are floored C nats below uniform (``-log V - C``) before
            the contrast, so a token the assistant finds less likely than that is not
            pushed up. The ULD assistant is trained uniform where there is nothing to
            forget; off its training text (a question about someone else) it can be
            far below uniform on the base's answer, and ``- w * log p_A`` then lifts
            arbitrary plausible tokens over it (TOFU's real authors: 0.59 right with a
            scratch assistant, 0.91 floored). Sure tokens of a floored row are banned by
            list, not by the kernel's ``assist_ban``. Not with the gain gate (which
            already never pushes a token up). :func:`compile_policy` sets it to 0 by
            default when the assistant is a scratch one (``train-assistant --init
            scratch``, the default; ``contrastive_floor="auto"``), and leaves it None
            for a base-layer assistant (floored, TOFU Model Utility 0.31 against 0.29:
            what breaks its utility is the ban, not the lift).
        firewall_prefix_tokens: how many first tokens of an always-active distinctive
            span may be generated before the firewall bans its continuation (>= 0).
        firewall_conditional_prefix_tokens: the same for spans active only once their
            subject is mentioned (default 0: with the subject in the conversation even
            the span's first token is banned; with a BPE trained on the facts many
            spans are one token, " Gdańsk", which a prefix of 1 could never stop).
        firewall_conditioning: "auto" (spans naming the subject or of >= 3 words are
            always active unless the retain answers also contain their opening tokens, the
            others only when the subject is mentioned), "always" or "subject" (every span only when the
            subject is mentioned).
        max_spans: spans kept per answer.
        verbatim_k: the verbatim firewall (documents) bans continuing any ``k``-token
            sequence of the forget documents: once the last ``k - 1`` tokens (prompt and
            output) are a run of a document, its next tokens are banned.
        verbatim_lookahead: while the output is aligned to a document, the next
            ``1 + lookahead`` document tokens are banned (skipping a word does not
            resume the text) and the alignment survives ``k`` tokens off the text.
        verbatim_conditioning: "always" (default: a document run is specific enough)
            or "subject" (only once the document's subject is mentioned).
        source_kind: what the forget set was ("qa", "documents", "subjects").
        documents: the forget documents' texts (not a setting; the verbatim firewall's).
        document_items: the item of each document (not a setting).
    """

    items: list[ForgetItem]
    retain: list[dict] = field(default_factory=list)
    name: str = "policy"
    refusal_template: str = DEFAULT_REFUSAL_TEMPLATE
    refusal_style: str = "explained"
    refusal_unnamed_subject: str = DEFAULT_UNNAMED_SUBJECT
    ignorant_template: str = DEFAULT_IGNORANT_TEMPLATE
    top_logprobs: str = "allow"
    in_scope_completions: str = "refuse"
    mechanisms: tuple[str, ...] = ("refusal", "firewall")
    scope_threshold: float = 0.6
    fuzzy_ratio: float = 80.0
    embedding_similarity: float | None = None
    embedder: str = "hashing"
    contrastive_weight: float = 1.5
    contrastive_alpha: float = 1e-5
    contrastive_min_p: float = 0.7
    contrastive_ban_p: float = 0.05
    contrastive_ban_window: int = 8
    contrastive_gain_gate: float | None = None
    contrastive_floor: float | None = None
    firewall_prefix_tokens: int = 1
    firewall_conditional_prefix_tokens: int = 0
    firewall_conditioning: str = "auto"
    max_spans: int = 4
    verbatim_k: int = 6
    verbatim_lookahead: int = 2
    verbatim_conditioning: str = "always"
    source_kind: str = "qa"
    documents: list[str] = field(default_factory=list)
    document_items: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mechanisms = tuple(sorted(set(self.mechanisms)))
        bad = set(self.mechanisms) - MECHANISMS
        if bad:
            raise ValueError(f"unknown mechanisms {sorted(bad)!r}; allowed {sorted(MECHANISMS)}")
        if not self.items:
            raise ValueError("a policy needs at least one forget item, got none")
        for key in ("{subject}", "{reason}"):
            if key not in self.refusal_template:
                raise ValueError(f"refusal_template must contain {key}: {self.refusal_template!r}")
        try:
            self.refusal_template.format(subject="s", reason="r", policy="p")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"refusal_template {self.refusal_template!r} is invalid: {exc}") from exc
        if not 0.0 < self.scope_threshold <= 1.0:
            raise ValueError(f"scope_threshold must be in (0, 1], got {self.scope_threshold!r}")
        if not 50.0 <= self.fuzzy_ratio <= 100.0:
            raise ValueError(f"fuzzy_ratio must be in [50, 100], got {self.fuzzy_ratio!r}")
        if self.embedding_similarity is None:
            self.embedding_similarity = DEFAULT_EMBEDDING_SIMILARITY.get(self.embedder, 0.95)
        if not 0.0 < self.embedding_similarity <= 1.0:
            raise ValueError(
                f"embedding_similarity must be in (0, 1], got {self.embedding_similarity!r}")
        if self.embedder not in EMBEDDERS:
            raise ValueError(f"embedder must be one of {EMBEDDERS}, got {self.embedder!r}")
        if self.refusal_style not in REFUSAL_STYLES:
            raise ValueError(f"refusal_style must be one of {REFUSAL_STYLES}, "
                             f"got {self.refusal_style!r}")
        if self.top_logprobs not in TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be one of {TOP_LOGPROBS}, "
                             f"got {self.top_logprobs!r}")
        if self.in_scope_completions not in IN_SCOPE_COMPLETIONS:
            raise ValueError(f"in_scope_completions must be one of {IN_SCOPE_COMPLETIONS}, "
                             f"got {self.in_scope_completions!r}")
        if self.in_scope_completions == "continue" and "firewall" not in self.mechanisms:
            raise ValueError("in_scope_completions 'continue' needs the 'firewall' "
                             "mechanism: without it an in-scope completion would be served "
                             f"with nothing banned (mechanisms {list(self.mechanisms)})")
        if not self.refusal_unnamed_subject.strip():
            raise ValueError("refusal_unnamed_subject must be non-empty")
        try:
            self.ignorant_template.format(subject="s")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"ignorant_template {self.ignorant_template!r} is invalid "
                             f"(only {{subject}} may be used): {exc}") from exc
        if not 0.0 <= self.contrastive_min_p < 1.0:
            raise ValueError(
                f"contrastive_min_p must be in [0, 1), got {self.contrastive_min_p!r}")
        if not 0.0 <= self.contrastive_ban_p < 1.0:
            raise ValueError(
                f"contrastive_ban_p must be in [0, 1), got {self.contrastive_ban_p!r}")
        gate = self.contrastive_gain_gate
        if gate is not None and (isinstance(gate, bool) or not isinstance(gate, int | float)
                                 or not math.isfinite(gate)):
            raise ValueError(f"contrastive_gain_gate must be a finite number or None, "
                             f"got {gate!r}")
        floor = self.contrastive_floor
        if floor is not None and (isinstance(floor, bool) or not isinstance(floor, int | float)
                                  or not math.isfinite(floor) or floor < 0):
            raise ValueError(f"contrastive_floor must be a finite number >= 0 or None, "
                             f"got {floor!r}")
        if floor is not None and gate is not None:
            raise ValueError("contrastive_floor and contrastive_gain_gate do not combine: "
                             "the gain gate's contrast is never below 0 already")
        if not self.contrastive_weight >= 0:
            raise ValueError(f"contrastive_weight must be >= 0, got {self.contrastive_weight!r}")
        if not 0.0 < self.contrastive_alpha <= 1.0:
            raise ValueError(f"contrastive_alpha must be in (0, 1], got {self.contrastive_alpha!r}")
        for name in ("firewall_prefix_tokens", "firewall_conditional_prefix_tokens",
                     "contrastive_ban_window"):
            v = getattr(self, name)
            if int(v) != v or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.firewall_conditioning not in FIREWALL_CONDITIONING:
            raise ValueError(f"firewall_conditioning must be one of {FIREWALL_CONDITIONING}, "
                             f"got {self.firewall_conditioning!r}")
        if self.max_spans < 1:
            raise ValueError(f"max_spans must be >= 1, got {self.max_spans!r}")
        if int(self.verbatim_k) != self.verbatim_k or not 2 <= self.verbatim_k <= 32:
            raise ValueError(f"verbatim_k must be an int in 2..32, got {self.verbatim_k!r}")
        if int(self.verbatim_lookahead) != self.verbatim_lookahead or \
                not 0 <= self.verbatim_lookahead <= 8:
            raise ValueError(f"verbatim_lookahead must be an int in 0..8, "
                             f"got {self.verbatim_lookahead!r}")
        if self.verbatim_conditioning not in VERBATIM_CONDITIONING:
            raise ValueError(f"verbatim_conditioning must be one of {VERBATIM_CONDITIONING}, "
                             f"got {self.verbatim_conditioning!r}")
        if self.documents and len(self.document_items) != len(self.documents):
            raise ValueError(f"document_items must give the item of each of the "
                             f"{len(self.documents)} documents, got {self.document_items!r}")
        if self.source_kind not in KINDS:
            raise ValueError(f"source_kind must be one of {KINDS}, got {self.source_kind!r}")

    def settings(self) -> dict[str, Any]:
        """The scalar settings (everything but items and retain), JSON-ready."""
        out = {k: v for k, v in asdict(self).items()
               if k not in ("items", "retain", "documents", "document_items")}
        out["mechanisms"] = list(self.mechanisms)
        return out

    @classmethod
    def from_inputs(cls, forget: ForgetSet, retain: ForgetSet | None = None,
                    **settings: Any) -> PolicySpec:
        """Build a spec from a forget set of any kind (:mod:`unlearnd.inputs`): QA rows
        (:func:`build_items`), subjects (:func:`items_from_subjects`) or documents
        (:func:`items_from_documents`; their text also feeds the verbatim firewall)."""
        background = as_background(retain) if retain is not None else []
        max_spans = int(settings.get("max_spans", 4))
        doc_items: list[int] = []
        if forget.kind == "qa":
            items = build_items(forget.qa, background, max_spans=max_spans)
        elif forget.kind == "subjects":
            items = items_from_subjects(forget.subjects, background, max_spans=max_spans)
        else:
            items, doc_items = items_from_documents([d.text for d in forget.documents],
                                                    background, max_spans=max_spans)
        documents = [d.text for d in forget.documents]
        return cls(items=items, retain=background, source_kind=forget.kind,
                   documents=documents, document_items=doc_items, **settings)

    @classmethod
    def from_jsonl(cls, forget_path: str | Path, retain_path: str | Path | None = None,
                   kind: str = "auto", **settings: Any) -> PolicySpec:
        """Build a spec from files (:func:`unlearnd.inputs.read_forget`: QA JSONL,
        documents or subjects; the retain set QA or documents)."""
        return cls.from_inputs(read_forget(forget_path, kind), read_retain(retain_path),
                               **settings)


# --------------------------------------------------------------------------- subjects

# A capitalised word: letters, with inner hyphens/apostrophes ("Yun-Hwa", "O'Brien").
_CAP_WORD = re.compile(r"[^\W\d_][\w\-'’]*")
_POSSESSIVE_END = re.compile(r"['’]s?$")


def _strip_accents(text: str) -> str:
    return "".join(ch for ch in unicodedata.normalize("NFKD", text)
                   if not unicodedata.combining(ch))


def _name_candidates(text: str) -> list[str]:
    """Runs of >= 2 capitalised words separated by single spaces, display form.

    Leading function/filler words ("What", "The", "Author") are dropped, a run is cut at
    a lowercase word or punctuation, possessive endings are stripped.
    """
    out: list[str] = []
    run: list[str] = []
    last_end = -1

    def flush() -> None:
        while run and (run[0].lower() in STOPWORDS or run[0].lower() in FILLER):
            run.pop(0)
        while run and (run[-1].lower() in STOPWORDS or run[-1].lower() in FILLER):
            run.pop()
        if len(run) >= 2:
            out.append(" ".join(run))
        run.clear()

    for m in _CAP_WORD.finditer(text):
        word = _POSSESSIVE_END.sub("", m.group(0)).strip("-'’")
        gap = text[last_end:m.start()] if last_end >= 0 else " "
        capital = bool(word) and word[0].isupper()
        if run and (gap != " " or not capital):
            flush()
        if capital:
            run.append(word)
            if word != m.group(0).rstrip("-'’"):  # possessive ends the name
                last_end = -2
                flush()
                continue
        else:
            flush()
        last_end = m.end()
    flush()
    return out


def _row_subject_candidates(row: dict) -> list[str]:
    seen: dict[str, str] = {}
    for text in (row["question"], row["answer"]):
        for cand in _name_candidates(text):
            seen.setdefault(normalize(cand), cand)
    return list(seen.values())


def group_by_subject(forget: Sequence[dict]) -> list[tuple[str, list[dict]]]:
    """Group forget QA rows by subject, in order of first appearance.

    A row's subject is its ``subject`` key when present. Otherwise it is the
    capitalised multi-word name of the row that occurs in the most rows of the whole
    file (an author is named in most of their ~20 TOFU questions, a book title in one
    or two); a row naming nobody that occurs in 2+ rows (TOFU's "the author born in
    Taipei...") joins the previous row's subject, as TOFU files are grouped.
    """
    per_row = [_row_subject_candidates(r) if not r.get("subject") else [] for r in forget]
    df: Counter[str] = Counter()
    display: dict[str, str] = {}
    for cands in per_row:
        for c in cands:
            key = normalize(c)
            df[key] += 1
            display.setdefault(key, c)
    groups: dict[str, list[dict]] = {}
    names: dict[str, str] = {}
    previous: str | None = None
    for row, cands in zip(forget, per_row, strict=True):
        if row.get("subject"):
            key = normalize(str(row["subject"]))
            names.setdefault(key, str(row["subject"]))
        else:
            scored = [(df[normalize(c)], len(c), normalize(c)) for c in cands]
            scored = [s for s in scored if s[0] >= 2]
            if scored and previous is not None and max(scored)[0] < df[previous]:
                # "Majumdar's contemporary romance...": a part of the previous subject's
                # name beats a rarer capitalised phrase (a genre, a title).
                row_words = set(words(row["question"] + " " + row["answer"]))
                if any(len(p) >= 4 and p not in STOPWORDS and p in row_words
                       for p in previous.split()):
                    scored = []
            if scored:
                key = max(scored)[2]
                names.setdefault(key, display[key])
            elif previous is not None:
                key = previous
            else:
                first = _name_candidates(row["question"] + " " + row["answer"])
                key = normalize(first[0]) if first else normalize(row["question"])[:40]
                names.setdefault(key, first[0] if first else row["question"][:40])
        groups.setdefault(key, []).append(row)
        previous = key
    return [(names[k], rows) for k, rows in groups.items()]


def _alias_forms(subject: str, distinct_ok: set[str]) -> list[str]:
    """Display aliases of a subject name (normalised matching is done later).

    ``distinct_ok``: normalised single words allowed as aliases on their own (not common
    words, not in the retain set, not shared with another subject).
    """
    aliases = [subject]
    plain = _strip_accents(subject)
    if plain != subject:
        aliases.append(plain)
    if "-" in subject:
        aliases.append(subject.replace("-", ""))
        aliases.append(subject.replace("-", " "))
    parts = subject.split()
    if len(parts) >= 2:
        for part in (parts[-1], parts[0]) + tuple(parts[1:-1]):
            norm = normalize(part)
            if len(norm.replace(" ", "")) >= 4 and norm in distinct_ok:
                aliases.append(part)
    seen: set[str] = set()
    out = []
    for a in aliases:
        if a not in seen:
            seen.add(a)
            out.append(a)
    return out


def _stem(word: str) -> str:
    """spans.py's crude stemmer (public ``stem`` in newer versions, ``_stem`` before)."""
    fn = getattr(spans_mod, "stem", None) or spans_mod._stem
    return fn(word)


def _frequent_background_words(background: Iterable[str], fraction: float = 0.05) -> list[str]:
    """Representative words whose stems are frequent in ``background``.

    ``distinctive_spans`` recomputes document frequencies on every call; for a forget set
    of N answers and a background of M docs that is O(N*M). We compute them once and
    pass a 5-document proxy background whose frequent stems are the same.
    """
    docs = [words(doc) for doc in background]
    if len(docs) < 5:
        return []
    df: Counter[str] = Counter()
    rep: dict[str, str] = {}
    for doc in docs:
        stems = set()
        for w in doc:
            s = _stem(w)
            stems.add(s)
            rep.setdefault(s, w)
        df.update(stems)
    threshold = max(3.0, fraction * len(docs))
    return sorted(rep[s] for s, n in df.items() if n >= threshold)


def build_items(forget: Sequence[dict], retain: Sequence[dict] = (),
                max_spans: int = 4) -> list[ForgetItem]:
    """Forget items from forget QA rows: subjects, aliases, spans, descriptors."""
    groups = group_by_subject(forget)
    retain_words: Counter[str] = Counter()
    for r in retain:
        retain_words.update(set(words(r["question"] + " " + r["answer"])))
    # Single-word aliases must not be shared between subjects nor appear in the retain set.
    part_owner: Counter[str] = Counter()
    for subject, _ in groups:
        part_owner.update({normalize(p) for p in subject.split()})
    distinct_ok = {p for p, n in part_owner.items()
                   if n == 1 and p not in STOPWORDS and p not in FILLER and p not in retain_words}

    frequent = _frequent_background_words(
        [r["answer"] for r in retain] + [r["answer"] for _, rows in groups for r in rows])
    proxy = [" ".join(frequent)] * 5 if frequent else []

    items: list[ForgetItem] = []
    for subject, rows in groups:
        aliases = _alias_forms(subject, distinct_ok)
        alias_words = {w for a in aliases for w in words(a)}
        item_spans: list[str] = []
        descriptors: list[str] = []
        for row in rows:
            for sp in distinctive_spans(row["answer"], row["question"], proxy, max_spans):
                if sp not in item_spans:
                    item_spans.append(sp)
            qwords = set(words(row["question"]))
            if not (qwords & alias_words):  # a nameless question describes the subject
                for sp in distinctive_spans(row["question"], "", proxy, max_spans):
                    if sp not in descriptors:
                        descriptors.append(sp)
        for sp in item_spans:
            if set(sp.split()) - alias_words and sp not in descriptors:
                descriptors.append(sp)
        items.append(ForgetItem(subject=subject, questions=[r["question"] for r in rows],
                                answers=[r["answer"] for r in rows], aliases=aliases,
                                spans=item_spans, descriptors=descriptors))
    logger.info("policy: %d forget rows -> %d items", len(forget), len(items))
    return items


def _unique(values: Iterable[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        if v and v not in out:
            out.append(v)
    return out


def _distinct_name_parts(names: Sequence[str], retain: Sequence[dict]) -> set[str]:
    """Normalised single name words that may be aliases on their own: owned by one
    subject, not a common word, not in the retain set."""
    retain_words: set[str] = set()
    for r in retain:
        retain_words.update(words(r["question"] + " " + r["answer"]))
    owner: Counter[str] = Counter()
    for name in names:
        owner.update({normalize(p) for p in name.split()})
    return {p for p, n in owner.items()
            if n == 1 and p not in STOPWORDS and p not in FILLER and p not in retain_words}


def _text_item(subject: str, aliases: list[str], texts: Sequence[str], proxy: list[str],
               max_spans: int, questions: Sequence[str] = (),
               template: Sequence[str] = ()) -> ForgetItem:
    """A forget item whose facts are plain texts (subjects' facts, document sentences):
    spans are the texts' distinctive spans, descriptors those not naming the subject
    (they recognise it described without its name), and each multi-word name is a span
    too (the output may not name the subject).

    ``facts`` are what a sentence states that its spans miss: the runs of its words
    that are neither the subject's names nor the corpus's template (``template``: a
    proxy background of the words most subjects' texts use, :data:`TEMPLATE_FRACTION`).
    Where facts are drawn from a shared pool (a genre, a profession, a prize two authors
    won) no word of them is distinctive against the retain set, so spans drop them;
    but once the subject is in context they are its facts all the same."""
    alias_words = {w for a in aliases for w in words(a)}
    item_spans: list[str] = []
    for text in texts:
        for sp in distinctive_spans(text, "", proxy, max_spans):
            if sp not in item_spans:
                item_spans.append(sp)
    descriptors = [sp for sp in item_spans if set(sp.split()) - alias_words]
    for a in aliases:
        norm = normalize(a)
        if len(norm.split()) >= 2 and norm not in item_spans:
            item_spans.append(norm)
    names = " ".join(sorted(alias_words))
    facts = _unique(sp for text in texts
                    for sp in distinctive_spans(text, names, template, MAX_FACT_SPANS)
                    if sp not in item_spans)
    return ForgetItem(subject=subject, questions=list(questions), answers=list(texts),
                      aliases=aliases, spans=item_spans, descriptors=descriptors,
                      facts=facts)


TEMPLATE_FRACTION = 0.5
"""A word at least this share of the subjects' texts use (each retain row and each
forget item one text) is the corpus's template ("was born on", "worked as"), not a fact."""
MAX_FACT_SPANS = 16
"""Fact spans kept per sentence (:func:`_text_item`)."""


def _proxy_background(texts: Iterable[str], fraction: float = 0.05) -> list[str]:
    frequent = _frequent_background_words(texts, fraction)
    return [" ".join(frequent)] * 5 if frequent else []


def _template_background(retain: Sequence[dict], item_texts: Iterable[Sequence[str]]
                         ) -> list[str]:
    """The proxy background of :data:`TEMPLATE_FRACTION`: one text per retain row and
    one per forget item (its texts joined), so a word one subject repeats counts once."""
    units = [(r.get("question", "") + " " + r["answer"]).strip() for r in retain]
    units += [" ".join(texts) for texts in item_texts]
    return _proxy_background(units, TEMPLATE_FRACTION)


def items_from_subjects(subjects: Sequence[Subject], retain: Sequence[dict] = (),
                        max_spans: int = 4) -> list[ForgetItem]:
    """Forget items from subjects (an erasure request, a topic): one item per subject;
    aliases are its name's forms (:func:`_alias_forms`) and the aliases given; its
    description and facts give spans and descriptors; with a name only the item is
    its names (the scope guard refuses requests naming it, the firewall bans the
    multi-word names in any output)."""
    distinct_ok = _distinct_name_parts([s.name for s in subjects], retain)
    proxy = _proxy_background([r["answer"] for r in retain]
                              + [t for s in subjects for t in s.texts()])
    template = _template_background(retain, [s.texts() for s in subjects])
    items = []
    for s in subjects:
        aliases = _unique(_alias_forms(s.name, distinct_ok) + list(s.aliases))
        items.append(_text_item(s.name, aliases, s.texts(), proxy, max_spans,
                                template=template))
    logger.info("policy: %d subjects -> %d items", len(subjects), len(items))
    return items


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
MAX_DOCUMENT_NAMES = 5
"""Names (beyond the subject's own) a document's item takes as aliases."""


def sentences(text: str) -> list[str]:
    """``text`` cut after ``.``/``!``/``?`` and at line breaks; empty pieces dropped."""
    return [p.strip() for p in _SENTENCE_END.split(text) if p.strip()]


def items_from_documents(documents: Sequence[str], retain: Sequence[dict] = (),
                         max_spans: int = 4) -> tuple[list[ForgetItem], list[int]]:
    """Forget items from documents, by rules (no model); returns the items and, per
    document, the index of its item:

    - a document's *names* are the capitalised multi-word runs (:func:`_name_candidates`)
      it mentions at least twice and the retain set never mentions (a name the retain
      set also uses is not what this document is about);
    - its *subject* is the most frequent of them; documents with the same subject make
      one item; a document with no such name is an item of its own, named by its first
      words, with no alias (the scope guard then recognises it only by descriptors);
    - spans and descriptors come from its sentences as for subjects' facts
      (:func:`_text_item`): the words the retain text does not make frequent.
    """
    retain_names = {normalize(c) for r in retain
                    for c in _name_candidates(r["question"] + " " + r["answer"])}
    per_doc: list[tuple[str | None, list[str]]] = []
    display: dict[str, str] = {}
    for text in documents:
        counts: Counter[str] = Counter()
        for cand in _name_candidates(text):
            key = normalize(cand)
            counts[key] += 1
            display.setdefault(key, cand)
        names = [k for k, n in counts.most_common() if n >= 2 and k not in retain_names]
        per_doc.append((names[0] if names else None, names[1:1 + MAX_DOCUMENT_NAMES]))
    distinct_ok = _distinct_name_parts([display[k] for k, _ in per_doc if k], retain)
    proxy = _proxy_background([r["answer"] for r in retain]
                              + [s for t in documents for s in sentences(t)])
    groups: dict[str, tuple[str, list[str], list[str]]] = {}
    doc_group: list[str] = []
    for i, (text, (key, others)) in enumerate(zip(documents, per_doc, strict=True)):
        if key is None:
            key = f"#doc{i}"
            groups[key] = (" ".join(text.split()[:6]), [], sentences(text))
            doc_group.append(key)
            continue
        subject, aliases, texts = groups.setdefault(
            key, (display[key], _alias_forms(display[key], distinct_ok), []))
        aliases.extend(display[o] for o in others if display[o] not in aliases)
        texts.extend(sentences(text))
        doc_group.append(key)
    order = {key: i for i, key in enumerate(groups)}
    template = _template_background(retain, [texts for _, _, texts in groups.values()])
    items = [_text_item(subject, aliases, texts, proxy, max_spans, template=template)
             for subject, aliases, texts in groups.values()]
    logger.info("policy: %d documents -> %d items", len(documents), len(items))
    return items, [order[key] for key in doc_group]


# --------------------------------------------------------------------------- compile


@functools.lru_cache(maxsize=4096)
def _word_offsets(text: str) -> list[tuple[str, int, int]]:
    """(normalised word, start, end) for each word of ``text`` as ``normalize`` splits it."""
    out: list[tuple[str, int, int]] = []
    for m in re.finditer(r"[^\W_]+", text):
        tok = m.group(0)
        if tok.lower() == "s" and m.start() > 0 and text[m.start() - 1] in "'’`ʼ":
            continue  # possessive, dropped by normalize
        for w in normalize(tok).split():
            out.append((w, m.start(), m.end()))
    return out


def surface_forms(span: str, texts: Iterable[str]) -> list[str]:
    """The original spellings of normalised ``span`` in ``texts`` (case, accents, '/')."""
    target = span.split()
    found: list[str] = []
    if not target:
        return found
    for text in texts:
        offs = _word_offsets(text)
        ws = [o[0] for o in offs]
        for i in range(len(ws) - len(target) + 1):
            if ws[i:i + len(target)] == target:
                surf = text[offs[i][1]:offs[i + len(target) - 1][2]]
                if surf not in found:
                    found.append(surf)
    return found


def _variants(surfaces: Iterable[str], lower: bool = False) -> list[str]:
    """The surfaces; with ``lower`` also lower-cased and Capitalised (a fact's word is
    the same fact in either case). :func:`_token_ids` adds the tokenisation contexts."""
    out: list[str] = []
    for s in surfaces:
        for f in ([s, s.lower(), s[:1].upper() + s[1:]] if lower else [s]):
            if f not in out:
                out.append(f)
    return out


_CONTEXTS = (("", ""), ("x", " "), ('"', ""))
"""(context, joiner) pairs a text is tokenised after (:func:`ids_after`): the start of a
text, after a word and a space, glued to punctuation. Byte-level BPE (Llama-3, Qwen)
marks a word start with the space itself, SentencePiece (Llama-2, Mistral, Gemma) with
``▁`` and adds one at a text's start: the three cover both without knowing which."""


def ids_after(tokenizer: Any, context: str, text: str, joiner: str = "") -> list[int] | None:
    """Token ids of ``joiner + text`` as they follow ``context`` (``context`` encoded
    with and without it, the common prefix dropped); None when the context's ids are
    not a prefix (the two merged into one token)."""
    if not context:
        return list(tokenizer.encode(joiner + text, add_special_tokens=False))
    head = list(tokenizer.encode(context, add_special_tokens=False))
    full = list(tokenizer.encode(context + joiner + text, add_special_tokens=False))
    if full[:len(head)] != head:
        return None
    return full[len(head):]


def reply_context(tokenizer: Any) -> str:
    """What the chat template puts between a user's message and the reply (the
    generation prompt, e.g. ``<|end|><|assistant|>``): a reply's first word is
    tokenised after it. "" when the tokenizer has no chat template."""
    marker = "\u2063unlearnd\u2063"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}],
                                             add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - no or a broken template: no reply context
        return ""
    return text[text.rindex(marker) + len(marker):] if marker in text else ""


def _token_ids(tokenizer: Any, texts: Iterable[str], reply: str = "") -> list[list[int]]:
    """Each text's ids in every context of :data:`_CONTEXTS` and after ``reply`` (the
    start of a reply), deduplicated: what the text is as the model would emit it."""
    contexts = _CONTEXTS + (((reply, ""),) if reply else ())
    out: list[list[int]] = []
    for t in texts:
        for context, joiner in contexts:
            ids = ids_after(tokenizer, context, t, joiner)
            if ids and ids not in out:
                out.append(ids)
    return out


def _conditional(span: str, alias_words: set[str], mode: str) -> bool:
    if mode == "always":
        return False
    if mode == "subject":
        return True
    ws = span.split()
    return not (set(ws) & alias_words or len(ws) >= 3)


def _descriptor_terms(item: ForgetItem, texts: list[str], background_vocab: Counter[str],
                      term_df: Counter[str], n_items: int,
                      alias_words: set[str]) -> list[list[str]]:
    """Per descriptor, its *strong* terms: the words the scope guard looks for.

    A term is strong when it is not a function/filler word, has >= 3 characters (or is
    a number), is absent from the retain set and is not shared by many forget items
    (> max(2, 5%)). A descriptor keeps its terms only when it is specific: several
    words, a number, or a capitalised (proper-noun) spelling in the source text.
    Descriptors with no strong term get ``[]``.
    """
    max_df = max(2, int(0.05 * n_items))
    out: list[list[str]] = []
    for desc in item.descriptors:
        ws = desc.split()
        specific = len(ws) >= 2 or any(w.isdigit() for w in ws) or any(
            any(ch.isupper() for ch in surf) for surf in surface_forms(desc, texts))
        terms: list[str] = []
        if specific:
            for w in ws:
                if w in STOPWORDS or w in FILLER or w in alias_words or w in terms:
                    continue
                if len(w) < 3 and not (w.isdigit() and len(w) >= 4):
                    continue
                if w.isdigit() and len(w) < 4:
                    continue  # "05", "11": day/month numbers say nothing alone
                if background_vocab[w] >= 1 or term_df[w] > max_df:
                    continue
                terms.append(w)
        out.append(terms)
    return out


CALIBRATION_MIN_FACT = 0.8
CALIBRATION_MAX_RETAIN = 0.02
"""Below / above these, policy compile warns that the assistant's ban is weak (it is
sure of too few forget fact tokens) or costly (sure of some token at too many retain
positions: the ban cuts retain text there)."""


def assistant_calibration(assistant_dir: Path, settings: dict[str, Any]) -> dict | None:
    """How sure the assistant is at the policy's ``contrastive_ban_p``, from its
    ``train-assistant`` report (``after.sure``): the share of forget fact tokens the ban
    removes and the share of retain positions where it would cut something, teacher
    forced on the assistant's own training rows. Logged as a warning past
    :data:`CALIBRATION_MIN_FACT` / :data:`CALIBRATION_MAX_RETAIN`; None when the
    assistant has no report or none at that probability (an assistant trained
    elsewhere)."""
    from unlearnd.guards.assistant import REPORT_FILE

    ban_p = float(settings.get("contrastive_ban_p") or 0.0)
    try:
        sure = json.loads((assistant_dir / REPORT_FILE).read_text())["after"]["sure"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    row = sure.get(f"{ban_p:g}") if ban_p > 0 else None
    if not isinstance(row, dict):
        logger.info("assistant %s has no calibration at contrastive_ban_p=%g", assistant_dir,
                    ban_p)
        return None
    out = {"contrastive_ban_p": ban_p, "forget_fact_sure": float(row["forget_fact"]),
           "retain_any_sure": float(row["retain_any"]), "warnings": []}
    if out["forget_fact_sure"] < CALIBRATION_MIN_FACT:
        out["warnings"].append(
            f"the assistant gives the fact token {ban_p:g} or more at only "
            f"{out['forget_fact_sure']:.0%} of forget fact positions: the ban misses the "
            "rest (train it longer, or add the firewall)")
    if out["retain_any_sure"] > CALIBRATION_MAX_RETAIN:
        out["warnings"].append(
            f"the assistant is that sure of some token at {out['retain_any_sure']:.1%} of "
            "retain positions: the ban cuts retain text there (retrain it uniform on the "
            "retain set, or raise contrastive_ban_p)")
    for w in out["warnings"]:
        logger.warning("policy compile: %s", w)
    return out


FLOOR_AUTO = "auto"
"""``contrastive_floor``'s default in :func:`compile_policy`: 0 for a scratch assistant,
None otherwise (:func:`auto_contrastive_floor`)."""


def auto_contrastive_floor(floor: Any, mechanisms: tuple[str, ...],
                           assistant_dir: str | Path | None,
                           gain_gate: Any) -> Any:
    """``floor`` itself unless it is :data:`FLOOR_AUTO`; then 0.0 where the policy
    contrasts with a scratch assistant (its ``train-assistant`` report says ``init:
    scratch``) and has no gain gate, else None. Off its training text a scratch
    assistant is far below uniform on arbitrary tokens; unfloored, ``- w * log p_A``
    lifts them over the base's answer (TOFU's Model Utility 0.88 unfloored, 0.95
    floored). An assistant trained elsewhere (no report) is not floored: set it
    explicitly."""
    from unlearnd.guards.assistant import REPORT_FILE

    if not (isinstance(floor, str) and floor == FLOOR_AUTO):
        return floor
    if "contrastive" not in mechanisms or assistant_dir is None or gain_gate is not None:
        return None
    try:
        init = json.loads((Path(assistant_dir) / REPORT_FILE).read_text()).get("init")
    except (OSError, ValueError, AttributeError):
        return None
    return 0.0 if init == "scratch" else None


def compile_policy(forget_path: str | Path, retain_path: str | Path | None,
                   base_model_dir: str | Path, out_dir: str | Path, *,
                   mechanisms: Iterable[str] = ("refusal", "firewall"),
                   assistant_dir: str | Path | None = None, kind: str = "auto",
                   **settings: Any) -> Path:
    """Compile a forget/retain pair into a policy directory; returns ``out_dir``.

    ``forget_path`` is QA JSONL, documents or subjects (``kind``, detected by default;
    :func:`unlearnd.inputs.read_forget`), ``retain_path`` QA or documents. ``settings``
    are :class:`PolicySpec` fields (``name``, ``scope_threshold``, ...; ``contrastive_floor``
    defaults to :data:`FLOOR_AUTO`, :func:`auto_contrastive_floor`). Token ids are
    computed with ``AutoTokenizer.from_pretrained(base_model_dir)``. Every input is
    read and checked before anything is written; the directory is built beside
    ``out_dir`` and moved into place, so a failure leaves what was there untouched.
    """
    from transformers import AutoTokenizer

    settings["contrastive_floor"] = auto_contrastive_floor(
        settings.get("contrastive_floor", FLOOR_AUTO), tuple(mechanisms), assistant_dir,
        settings.get("contrastive_gain_gate"))
    spec = PolicySpec.from_jsonl(forget_path, retain_path, kind=kind,
                                 mechanisms=tuple(mechanisms), **settings)
    if "contrastive" in spec.mechanisms and assistant_dir is None:
        raise ValueError("mechanism 'contrastive' needs assistant_dir, got None")
    if assistant_dir is not None and not Path(assistant_dir).is_dir():
        raise ValueError(f"assistant_dir {str(assistant_dir)!r} is not a directory")
    if spec.contrastive_gain_gate is not None and "contrastive" in spec.mechanisms:
        from unlearnd.guards.assistant import is_shared_base_assistant

        if not is_shared_base_assistant(assistant_dir):
            raise ValueError(f"contrastive_gain_gate needs an assistant saved as a LoRA over "
                             f"the base's first layers (train-assistant --save lora); "
                             f"{assistant_dir} is a full model")
    base_model_dir = Path(base_model_dir)
    if not base_model_dir.is_dir():
        raise ValueError(f"base_model_dir {str(base_model_dir)!r} is not a directory")
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer of {base_model_dir} has no eos token")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.compiling-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_compiled(spec, tokenizer, tmp, base_model_dir,
                        Path(assistant_dir) if assistant_dir else None)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.replace(old)
        tmp.replace(out)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_compiled(spec: PolicySpec, tokenizer: Any, out: Path, base_model_dir: Path,
                    assistant_dir: Path | None) -> Path:
    background_vocab: Counter[str] = Counter()
    for r in spec.retain:
        background_vocab.update(set(words(r["question"] + " " + r["answer"])))
    # What the firewall would block in the retain answers: an always-active span bans
    # its next token once its first `firewall_prefix_tokens` tokens were generated, so
    # a retain answer holding the span's first prefix+1 tokens gets cut there.
    arm = spec.firewall_prefix_tokens + 1
    reply = reply_context(tokenizer)
    retain_openings = {tuple(ids[i:i + arm])
                       for ids in (ids_after(tokenizer, reply, r["answer"]) or []
                                   for r in spec.retain)
                       for i in range(len(ids) - arm + 1)}
    term_df: Counter[str] = Counter()
    for item in spec.items:
        term_df.update({w for d in item.descriptors for w in d.split()})
    items_json: list[dict] = []
    alias_ids: list[dict] = []
    span_ids: list[dict] = []
    for i, item in enumerate(spec.items):
        texts = item.questions + item.answers
        alias_words = {w for a in item.aliases for w in words(a)}
        descriptor_terms = _descriptor_terms(item, texts, background_vocab, term_df,
                                             len(spec.items), alias_words)
        items_json.append({
            "subject": item.subject,
            "aliases": [normalize(a) for a in item.aliases],
            "alias_display": item.aliases,
            "questions": item.questions,
            "answers": item.answers,
            "spans": item.spans,
            "descriptors": item.descriptors,
            "descriptor_terms": descriptor_terms,
            "facts": item.facts,
        })
        for ids in _token_ids(tokenizer, _variants(item.aliases, lower=True), reply):
            alias_ids.append({"item": i, "ids": ids})
        for sp, fact in [(sp, False) for sp in item.spans] + [(sp, True) for sp in item.facts]:
            surfaces = surface_forms(sp, texts) or [sp]
            # a fact is only its subject's: active once the subject is in context
            cond = fact or _conditional(sp, alias_words, spec.firewall_conditioning)
            for ids in _token_ids(tokenizer, _variants(surfaces), reply):
                # A span whose opening the retain answers also say ("through social
                # media", "in the face of") is only active with its subject in
                # context: always active, such spans cut 66 of TOFU's 300 retain
                # answers; with the subject mentioned they still stop forget answers.
                shared = spec.firewall_conditioning == "auto" and \
                    tuple(ids[:arm]) in retain_openings
                span_ids.append({"item": i, "text": sp, "ids": ids,
                                 "conditional": cond or shared})
            # Each content word of a multi-word span is also a conditional span of its
            # own: once the subject is in the conversation, "23 April 1979" for
            # "23 October 1979" or "Golden Compass" for "Evergreen Compass" still leaks
            # most of the fact (measured: firewall-alone leak 0.22 -> see README).
            span_words = sp.split()
            if len(span_words) > 1 and (fact or spec.firewall_conditioning != "always"):
                for w in span_words:
                    if w in STOPWORDS or (len(w) < 2 and not w.isdigit()):
                        continue
                    own = _token_ids(tokenizer, _variants(surface_forms(w, texts) or [w]),
                                     reply)
                    # the other case too (" cartographer" gives away "The Hollow
                    # Cartographer"), unless its first token is a short piece (" C"):
                    # banning that would cut every word it starts
                    cased = [ids for ids in _token_ids(tokenizer, _variants(
                        surface_forms(w, texts) or [w], lower=True), reply) if ids not in own
                        and len(tokenizer.decode(ids[:1]).strip()) >= 3]
                    for ids in own + cased:
                        span_ids.append({"item": i, "text": w, "ids": ids,
                                         "conditional": True})

    embedding: dict[str, Any] | None = None
    # subjects and documents have no forget questions to compare requests with
    if spec.embedder != "none" and any(item.questions for item in spec.items):
        from unlearnd.guards.embeddings import get_embedder

        embedder = get_embedder(spec.embedder)
        questions = [q for item in spec.items for q in item.questions]
        rows = [i for i, item in enumerate(spec.items) for _ in item.questions]
        matrix = np.asarray(embedder.encode(questions), dtype=np.float32)
        np.save(out / "embeddings.npy", matrix)
        embedding = {"embedder": spec.embedder, "dim": int(matrix.shape[1]), "items": rows}

    verbatim: dict[str, Any] | None = None
    if spec.documents and "firewall" in spec.mechanisms:
        verbatim = _write_verbatim(spec, tokenizer, out)

    tok_dir = out / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    for name in _TOKENIZER_FILES:
        if (base_model_dir / name).is_file():
            shutil.copy2(base_model_dir / name, tok_dir / name)
    if not (tok_dir / "tokenizer.json").is_file():
        tokenizer.save_pretrained(str(tok_dir))

    assistant_rel: str | None = None
    if assistant_dir is not None:
        if not assistant_dir.is_dir():
            raise ValueError(f"assistant_dir {str(assistant_dir)!r} is not a directory")
        target = out / "assistant"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(assistant_dir, target)
        assistant_rel = "assistant"

    calibration = assistant_calibration(assistant_dir, spec.settings()) \
        if assistant_dir is not None and "contrastive" in spec.mechanisms else None
    doc = {
        "format": FORMAT,
        "settings": spec.settings(),
        "eos_token_id": int(tokenizer.eos_token_id),
        "reply_context": reply,
        "vocab_size": int(len(tokenizer)),
        "items": items_json,
        "alias_token_ids": alias_ids,
        "span_token_ids": span_ids,
        "embedding": embedding,
        "verbatim": verbatim,
        "assistant": assistant_rel,
        "assistant_calibration": calibration,
    }
    tmp = out / "policy.json.tmp"
    tmp.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    tmp.replace(out / "policy.json")
    logger.info("compiled policy %r: %d items, %d span token seqs -> %s", spec.name,
                len(items_json), len(span_ids), out)
    return out


VERBATIM_FILE = "verbatim.npz"


def _paragraph_variants(text: str) -> list[str]:
    """The texts whose token ids the verbatim firewall indexes for one document: the
    document as a whole, and each paragraph alone, each with and without a leading
    space (a text's first word tokenises differently from the same word mid-text)."""
    pieces = [text] + [p for p in text.split("\n") if p.strip() and p != text]
    return _unique(v for p in pieces for v in (p.strip(), " " + p.strip()))


def _write_verbatim(spec: PolicySpec, tokenizer: Any, out: Path) -> dict[str, Any]:
    """Token runs of the forget documents for the verbatim firewall, ``verbatim.npz``:

    ``tokens`` (int32, each variant's ids followed by -1), ``items`` (the forget item of
    each token, -1 at separators), ``allowed`` (bool: the ``k``-token run starting
    here may be banned) and ``common`` (the token ids the retain text uses twice or
    more). A run the retain set also contains (its QA answers or documents, either
    tokenisation) is not banned: text the model must keep saying.
    """
    k = int(spec.verbatim_k)
    retain_runs: set[tuple[int, ...]] = set()
    retain_counts: Counter[int] = Counter()
    for r in spec.retain:
        retain_counts.update(tokenizer.encode(r["answer"], add_special_tokens=False))
        for variant in _paragraph_variants(r["answer"]):
            ids = tokenizer.encode(variant, add_special_tokens=False)
            retain_runs.update(tuple(ids[j:j + k]) for j in range(len(ids) - k + 1))
    # tokens the retain text uses more than once ("was", ",", a template's words): an
    # alignment that has left the document does not ban them nor re-anchor on them
    common = sorted(t for t, n in retain_counts.items() if n >= 2)
    tokens: list[int] = []
    items: list[int] = []
    allowed: list[bool] = []
    for text, item in zip(spec.documents, spec.document_items, strict=True):
        for variant in _paragraph_variants(text):
            ids = [int(t) for t in tokenizer.encode(variant, add_special_tokens=False)]
            for j in range(len(ids)):
                tokens.append(ids[j])
                items.append(item)
                allowed.append(j + k <= len(ids) and tuple(ids[j:j + k]) not in retain_runs)
            tokens.append(-1)
            items.append(-1)
            allowed.append(False)
    np.savez(out / VERBATIM_FILE, tokens=np.asarray(tokens, dtype=np.int32),
             items=np.asarray(items, dtype=np.int32), allowed=np.asarray(allowed, dtype=bool),
             common=np.asarray(common, dtype=np.int32))
    n_runs = int(sum(allowed))
    logger.info("verbatim firewall: %d documents, %d token runs of %d (%d shared with "
                "the retain set)", len(spec.documents), n_runs, k,
                sum(1 for a, t in zip(allowed, tokens, strict=True) if t >= 0 and not a))
    return {"file": VERBATIM_FILE, "k": k, "lookahead": int(spec.verbatim_lookahead),
            "conditional": spec.verbatim_conditioning == "subject", "runs": n_runs}


# --------------------------------------------------------------------------- load


@dataclass(frozen=True)
class CompiledItem:
    """A forget item as the guards see it (all text normalised except ``subject``)."""

    subject: str
    aliases: tuple[str, ...]
    questions: tuple[str, ...]
    spans: tuple[str, ...]
    descriptors: tuple[str, ...]
    descriptor_terms: tuple[tuple[str, ...], ...] = ()
    facts: tuple[str, ...] = ()


POLICY_CACHE_ENV = "UNLEARND_POLICY_CACHE_SIZE"
_TOKENIZERS: OrderedDict[str, Any] = OrderedDict()
_TOKENIZERS_LOCK = threading.Lock()
_TOKENIZER_CACHE_SIZE = 8


def policy_cache_size() -> int:
    """How many compiled policies a process keeps loaded (``UNLEARND_POLICY_CACHE_SIZE``,
    default 256; a bad value is an error, not a silent default)."""
    raw = os.environ.get(POLICY_CACHE_ENV, "256")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{POLICY_CACHE_ENV} must be an int >= 1, got {raw!r}")
    return n


def shared_tokenizer(path: Path) -> Any:
    """The ``tokenizers.Tokenizer`` of ``path``, one instance per distinct file content
    (sha256) in this process: policies of one base model share it."""
    from tokenizers import Tokenizer

    raw = Path(path).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    with _TOKENIZERS_LOCK:
        tok = _TOKENIZERS.get(digest)
        if tok is not None:
            _TOKENIZERS.move_to_end(digest)
            return tok
    tok = Tokenizer.from_str(raw.decode("utf-8"))
    with _TOKENIZERS_LOCK:
        tok = _TOKENIZERS.setdefault(digest, tok)
        while len(_TOKENIZERS) > _TOKENIZER_CACHE_SIZE:
            _TOKENIZERS.popitem(last=False)
    return tok


def _word_anchor(policy: CompiledPolicy) -> tuple[list[int], str]:
    """A one-word token and its text: what :meth:`CompiledPolicy.token_text` decodes a
    token after (computed once per policy)."""
    ids = policy.encode("x")[-1:]
    return ids, str(policy._tok().decode(ids, skip_special_tokens=False))


class CompiledPolicy:
    """A loaded policy directory. Use :meth:`load` (cached) rather than the constructor.

    Attributes: ``dir``, ``version`` (sha256[:12] of policy.json), ``settings``
    (:class:`PolicySpec` scalar fields), ``name``, ``mechanisms`` (frozenset),
    ``items`` (list of :class:`CompiledItem`), ``eos_token_id``, ``vocab_size``,
    ``alias_token_ids`` (list of ``(item, ids)``), ``span_token_ids`` (list of
    ``(item, ids, conditional)``), ``assistant_dir`` (Path or None).
    """

    _cache: OrderedDict[tuple[str, int], CompiledPolicy] = OrderedDict()
    _lock = threading.Lock()

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        path = self.dir / "policy.json"
        if not path.is_file():
            raise ValueError(f"policy dir {str(self.dir)!r} has no policy.json")
        raw = path.read_bytes()
        doc = json.loads(raw)
        if doc.get("format") != FORMAT:
            raise ValueError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
        self.version = hashlib.sha256(raw).hexdigest()[:12]
        self.settings: dict[str, Any] = doc["settings"]
        self.name: str = self.settings.get("name", "policy")
        self.mechanisms = frozenset(self.settings.get("mechanisms", ()))
        self.eos_token_id = int(doc["eos_token_id"])
        self.vocab_size = int(doc["vocab_size"])
        self.items = [CompiledItem(subject=it["subject"], aliases=tuple(it["aliases"]),
                                   questions=tuple(it["questions"]), spans=tuple(it["spans"]),
                                   descriptors=tuple(it["descriptors"]),
                                   descriptor_terms=tuple(tuple(t) for t in
                                                          it.get("descriptor_terms", ())),
                                   facts=tuple(it.get("facts", ())))
                      for it in doc["items"]]
        self.alias_token_ids = [(int(a["item"]), tuple(a["ids"])) for a in doc["alias_token_ids"]]
        self.span_token_ids = [(int(s["item"]), tuple(s["ids"]), bool(s["conditional"]))
                               for s in doc["span_token_ids"]]
        self.embedding_info: dict[str, Any] | None = doc.get("embedding")
        self.verbatim_info: dict[str, Any] | None = doc.get("verbatim")
        self.reply_context: str = doc.get("reply_context", "")
        self.assistant_dir = self.dir / doc["assistant"] if doc.get("assistant") else None
        self.calibration: dict | None = doc.get("assistant_calibration")
        """The assistant's sureness at ``contrastive_ban_p`` (:func:`assistant_calibration`)."""
        self._embeddings: np.ndarray | None = None
        self._tokenizer: Any = None
        self._derived: dict[str, Any] = {}
        self._derived_lock = threading.RLock()

    @classmethod
    def load(cls, directory: str | Path) -> CompiledPolicy:
        """Load (or reuse) the policy in ``directory``; cached by (path, policy.json mtime)."""
        d = Path(directory).resolve()
        try:
            mtime = (d / "policy.json").stat().st_mtime_ns
        except OSError as exc:
            raise ValueError(f"policy dir {str(d)!r} has no readable policy.json: {exc}") from exc
        key = (str(d), mtime)
        with cls._lock:
            hit = cls._cache.get(key)
            if hit is not None:
                cls._cache.move_to_end(key)
                return hit
        pol = cls(d)
        with cls._lock:
            for k in [k for k in cls._cache if k[0] == key[0]]:
                del cls._cache[k]
            cls._cache[key] = pol
            while len(cls._cache) > policy_cache_size():
                cls._cache.popitem(last=False)
        return pol

    def setting(self, key: str, default: Any = None) -> Any:
        return self.settings.get(key, default)

    @property
    def embedding_items(self) -> np.ndarray:
        """`[n_questions]` int item index of each embeddings row."""
        info = self.embedding_info or {}
        return np.asarray(info.get("items", []), dtype=np.int64)

    def embeddings(self) -> np.ndarray | None:
        """`[n_questions, dim]` fp32 normalised embeddings of forget questions, or None."""
        if self.embedding_info is None:
            return None
        if self._embeddings is None:
            self._embeddings = np.load(self.dir / "embeddings.npy").astype(np.float32)
        return self._embeddings

    def verbatim(self) -> dict[str, np.ndarray] | None:
        """The verbatim firewall's arrays (``tokens``, ``items``, ``allowed``,
        ``common``), or None."""
        if not self.verbatim_info:
            return None
        with np.load(self.dir / self.verbatim_info["file"]) as z:
            out = {key: z[key] for key in ("tokens", "items", "allowed")}
            out["common"] = z["common"] if "common" in z.files else np.zeros(0, np.int32)
            return out

    def _tok(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = shared_tokenizer(self.dir / "tokenizer" / "tokenizer.json")
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the base model's tokenizer (no special tokens)."""
        return list(self._tok().encode(text, add_special_tokens=False).ids)

    def encode_reply(self, text: str) -> list[int]:
        """Token ids of ``text`` as the start of a reply: after the chat template's
        generation prompt (``reply_context``), as the model emits it (a SentencePiece
        tokenizer marks a text's first word with ``▁``, a reply's first word not)."""
        if self.reply_context:
            head = self.derived("reply_head", lambda p: p.encode(p.reply_context))
            full = self.encode(self.reply_context + text)
            if full[:len(head)] == head and len(full) > len(head):
                return full[len(head):]
        return self.encode(text)

    def token_text(self, token_id: int) -> str:
        """The text of one token id as it reads after a word: " word" for a token that
        starts a word (byte-level BPE's space, SentencePiece's ``▁``; decoded alone, a
        SentencePiece decoder drops a first token's mark), "ing" for one that does not."""
        tok = self._tok()
        anchor, alone = self.derived("word_anchor", _word_anchor)
        both = str(tok.decode(anchor + [int(token_id)], skip_special_tokens=False))
        if anchor and both.startswith(alone):
            return both[len(alone):]
        return str(tok.decode([int(token_id)], skip_special_tokens=False))

    def derived(self, key: str, build: Any) -> Any:
        """Per-policy memo for structures the guards build once (firewall, scope index)."""
        with self._derived_lock:
            if key not in self._derived:
                self._derived[key] = build(self)
            return self._derived[key]


# --------------------------------------------------------------------------- CLI

policy_app = typer.Typer(help="Compile unlearning policies.", no_args_is_help=True)


def _floor_option(value: str) -> Any:
    """``--contrastive-floor``: 'auto', 'off' (None) or a number of nats (ValueError)."""
    if value == "off":
        return None
    if value == FLOOR_AUTO:
        return value
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--contrastive-floor must be 'auto', 'off' or a number of nats "
                         f">= 0, got {value!r}") from None


@policy_app.command("compile")
def policy_compile(
    forget: Path = typer.Option(..., "--forget",
                                help="forget set: QA JSONL, documents or subjects"),
    retain: Path | None = typer.Option(None, "--retain", help="retain set, QA or documents"),
    kind: str = typer.Option("auto", "--kind",
                             help="forget set kind: auto, qa, documents or subjects"),
    base: Path = typer.Option(..., "--base", help="base model dir (for its tokenizer)"),
    out: Path = typer.Option(..., "--out", help="output policy directory"),
    mechanisms: str = typer.Option("refusal,firewall", "--mechanisms",
                                   help="comma list of adapter,contrastive,refusal,firewall"),
    assistant: Path | None = typer.Option(None, "--assistant",
                                          help="assistant model dir (contrastive)"),
    name: str = typer.Option("policy", "--name", help="policy name shown in refusals"),
    embedder: str = typer.Option("hashing", "--embedder", help="hashing, minilm or none"),
    scope_threshold: float = typer.Option(0.6, "--scope-threshold"),
    refusal_style: str = typer.Option("explained", "--refusal-style",
                                      help="explained or ignorant"),
    top_logprobs: str = typer.Option("allow", "--top-logprobs", help="allow or deny"),
    in_scope_completions: str = typer.Option(
        "refuse", "--in-scope-completions",
        help="refuse, or continue an in-scope /v1/completions prompt under the firewall "
        "(needs it) instead of refusing; chat is refused either way"),
    contrastive_min_p: float = typer.Option(0.7, "--contrastive-min-p"),
    contrastive_ban_p: float = typer.Option(
        0.05, "--contrastive-ban-p",
        help="ban tokens the assistant gives at least this probability (0: off)"),
    contrastive_ban_window: int = typer.Option(
        8, "--contrastive-ban-window",
        help="keep a sure fact and the assistant's continuation banned this many tokens"),
    contrastive_gain_gate: float | None = typer.Option(
        None, "--contrastive-gain-gate",
        help="contrast and ban only what the assistant's LoRA added over the base's "
        "layers, banning where it added at least this many nats (LoRA assistants)"),
    contrastive_floor: str = typer.Option(
        FLOOR_AUTO, "--contrastive-floor",
        help="floor the assistant's log-probabilities this many nats below uniform, so "
        "the contrast pushes down what it is sure of and pushes nothing up; 'auto': 0 "
        "for a scratch assistant (train-assistant's default), off for a base-layer one; "
        "'off': never"),
    contrastive_weight: float = typer.Option(1.5, "--contrastive-weight"),
    contrastive_alpha: float = typer.Option(1e-5, "--contrastive-alpha"),
    firewall_prefix_tokens: int = typer.Option(1, "--firewall-prefix-tokens"),
    firewall_conditional_prefix_tokens: int = typer.Option(
        0, "--firewall-conditional-prefix-tokens"),
    firewall_conditioning: str = typer.Option("auto", "--firewall-conditioning"),
    verbatim_k: int = typer.Option(6, "--verbatim-k",
                                   help="documents: ban continuing any run of k tokens"),
    verbatim_lookahead: int = typer.Option(2, "--verbatim-lookahead"),
    verbatim_conditioning: str = typer.Option("always", "--verbatim-conditioning",
                                              help="always or subject"),
) -> None:
    """Compile FORGET (+ RETAIN) into a policy directory for the guards."""
    mech = [m.strip() for m in mechanisms.split(",") if m.strip()]
    try:
        floor = _floor_option(contrastive_floor)
        path = compile_policy(
            forget, retain, base, out, mechanisms=mech, assistant_dir=assistant, kind=kind,
            name=name, embedder=embedder, scope_threshold=scope_threshold,
            refusal_style=refusal_style, top_logprobs=top_logprobs,
            in_scope_completions=in_scope_completions,
            contrastive_min_p=contrastive_min_p, contrastive_ban_p=contrastive_ban_p,
            contrastive_ban_window=contrastive_ban_window,
            contrastive_gain_gate=contrastive_gain_gate,
            contrastive_floor=floor,
            contrastive_weight=contrastive_weight,
            contrastive_alpha=contrastive_alpha, firewall_prefix_tokens=firewall_prefix_tokens,
            firewall_conditional_prefix_tokens=firewall_conditional_prefix_tokens,
            firewall_conditioning=firewall_conditioning, verbatim_k=verbatim_k,
            verbatim_lookahead=verbatim_lookahead,
            verbatim_conditioning=verbatim_conditioning)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    pol = CompiledPolicy.load(path)
    typer.echo(f"compiled {len(pol.items)} forget items -> {path} (version {pol.version})")
    cal = pol.calibration
    if cal:
        typer.echo(f"assistant at contrastive_ban_p={cal['contrastive_ban_p']:g}: sure of "
                   f"{cal['forget_fact_sure']:.3f} of the forget fact tokens, of some token "
                   f"at {cal['retain_any_sure']:.3f} of the retain positions")
        for w in cal["warnings"]:
            typer.echo(f"warning: {w}", err=True)
