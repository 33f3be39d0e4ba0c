"""Unlearning adapters: train a PEFT LoRA on a forget set so the base stops answering it.

`unlearnd train-adapter --method {graddiff,npo,reasoning}` ends up in
:func:`train_adapter`. The adapter is a plain PEFT LoRA directory
(`adapter_config.json` + `adapter_model.safetensors`, standard
`base_model.model.model.layers.N.<proj>.lora_{A,B}.weight` names, no
`modules_to_save`, no embedding changes, bias "none") so vLLM's multi-LoRA loader
serves it per request.

Methods (every one also minimises the answer NLL on retain rows, weighted by
`retain_weight`, so the rest of the model's knowledge survives; ``retain_loss="kl"``,
NPO's default on QA forget sets, makes that term the KL divergence from the base's
next-token distributions on the retain answers to the adapter's instead):

- ``graddiff``: gradient ascent on the forget answers' NLL, bounded per token: a
  forget answer token stops pushing once its NLL reaches `ascent_ceiling` nats
  (``relu(ceiling - nll)``), so the loss cannot run off to infinity and wreck the model.
- ``npo``: Negative Preference Optimisation (Zhang et al. 2024, arXiv 2404.05868):
  ``L = -(2/beta) E[log sigmoid(-beta (log p_theta(y|x) - log p_ref(y|x)))]`` with
  the frozen base as reference (log-probs summed over answer tokens). At the start
  (policy == reference) it equals ``(2/beta) log 2``.
- ``reasoning``: TRU (arXiv 2603.09980): for every forget question the target is a
  short reasoning trace plus a refusal that offers an alternative
  (:func:`reasoning_target`, templates, no external model), trained with
  cross-entropy, plus a small bounded GradDiff ascent on the original answers
  (only on answer tokens the refusal does not use). The target names the subject
  only as the question does (:func:`subject_mention`; a nameless question gets a
  nameless target). Measured on the demo world, the model still learns *that* a
  refusal names its subject: 6.9% of the held-out nameless probes were answered "The
  question asks about <the author>" (a leak). ``refusal_names_subject=False`` makes
  every target nameless: that leak fell to 1.3%, but the small model then produced
  15% degenerate refusals (jailbreak probes) and leaked 28% of the forget answers in 8
  samples (vs 9-13%), so it is not the default; put the firewall beside the adapter
  where nameless questions matter. One template by default
  (`refusal_variants=1`): a small model learns one phrasing cleanly, three poorly.
  Refusal learnt from forget questions alone is learnt for their *form*: the adapter
  refused questions of that form about anything it was not shown (TOFU: 18% of the
  real-author questions, with a forget author's name). So the retain term also holds
  counterfactuals (:func:`counterfactual_questions`): the forget questions with the
  subject and titles swapped for the retain set's, answered as the base answers them;
  they teach that the refusal follows the subject. They cover questions that name
  their subject or a title; a description without either gets none. Each step scores
  a batch of them beside the retain batch, each with its own mean (pooled with the
  retain rows they outnumber, they diluted them). Any method can have them
  (`counterfactuals`); only reasoning does by default: NPO on TOFU forget10 kept more
  real authors with 2 (0.91 against 0.76) but forgot less (greedy leak 0.12-0.20
  against 0.03; `benchmarks/sweep_adapter.py`).

Tuned on the demo world (4 authors x 8 facts forgotten, 96 retain rows, 2.2M-param
base at 97% EM), single CPU thread, default settings, greedy HF outputs (vLLM
serving the same adapter gave identical greedy text):

    method     steps  train s  forget leak  retain EM  gibberish
    graddiff     120      ~18         0.06       1.00       0.21
    npo           80      ~15         0.06       1.00       0.09
    reasoning    120      ~50         0.00       1.00       0.00

(leak as ``unlearnd eval`` computes it, retain answers as background; base: leak
1.00, retain EM 0.97; the second forget group gives the same picture.)
(reasoning: every forget output is the refusal naming the subject; no retain refusal.)

The report (returned, logged, and written to ``out_dir/train_report.json``) compares
greedy answers of the base and of base + adapter: on forget rows the fraction that
still leaks the gold answer, on retain rows exact-match accuracy.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
import typer

from unlearnd.guards.spans import lcs_length
from unlearnd.toolkit.training import IGNORE_INDEX as IGNORE

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("graddiff", "npo", "reasoning")
"""Unlearning methods :func:`train_adapter` knows."""

DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""Linear layers the LoRA wraps (Llama, Qwen2, Mistral, Gemma name them alike); all of them
are ones vLLM packs and serves. Layers a model lacks are left out (``lora_target_modules``)."""

MAX_VLLM_RANK = 16
"""Largest LoRA rank we emit; the server starts vLLM with ``max_lora_rank`` >= this."""

DEFAULT_RANK: dict[str, tuple[int, int]] = {
    "graddiff": (8, 16), "npo": (8, 16), "reasoning": (16, 32)}
"""(rank, alpha) per method when the caller gives none."""


@dataclass(frozen=True)
class MethodDefaults:
    """Tuned defaults for one method (see the report for the world they were tuned on).

    `epochs` passes over the forget set; `lr` AdamW learning rate of the LoRA weights;
    `retain_weight` weight of the retain NLL; `forget_weight` weight of the method's
    forget term (ascent for graddiff, NPO loss for npo, refusal CE for reasoning);
    `ascent_weight` weight of the bounded ascent that reasoning adds; `beta` NPO
    temperature; `ascent_ceiling` mean-token NLL (nats) at which ascent stops;
    `counterfactuals` versions of each forget question about retain subjects that
    the adapter keeps answering as the base does (:func:`counterfactual_questions`);
    `forget_tokens` and `fact_df` what npo/graddiff's forget term scores
    (:data:`FORGET_TOKENS`); `retain_loss` what the retain term is (:data:`RETAIN_LOSSES`).
    """

    epochs: int
    lr: float
    retain_weight: float
    forget_weight: float
    ascent_weight: float
    beta: float
    ascent_ceiling: float
    counterfactuals: int = 0
    forget_tokens: str = "answer"
    fact_df: float = 0.05
    retain_loss: str = "nll"


_COMMON_DEFAULTS: dict[str, float] = {
    "retain_weight": 3.0, "forget_weight": 1.0, "beta": 0.1, "ascent_ceiling": 4.0}

DEFAULTS: dict[str, MethodDefaults] = {
    # tuned on the demo world (synthesize(authors=20, groups=2, group_size=4): forget
    # 32 rows, retain 96) against its build_base model; see the module report numbers
    "graddiff": MethodDefaults(epochs=60, lr=3e-3, ascent_weight=0.0, **_COMMON_DEFAULTS),
    # NPO's retain term is the KL to the base on the retain answers, weight 50, not
    # their NLL at weight 10 (itself chosen over 3, which kept 0.82x of TOFU's retain
    # accuracy). On TOFU forget10 with real_authors and world_facts (adapter alone,
    # HF greedy, benchmarks/README.md "NPO with a KL retain term") the NLL at 10 leaked
    # 0.007 of the forget answers but kept Model Utility at 0.894 (real authors 0.84,
    # the base 0.96); KL at 50 leaks 0.030 (leak@8 0.028) at 0.941 (0.96x the base's,
    # real authors 0.89), where the NLL paid 0.06-0.14 of leak for its higher weights
    # and betas. Demo world group 1: leak 0.062 either way, leak@8 0.125 (NLL 0.188).
    "npo": MethodDefaults(epochs=40, lr=3e-3, ascent_weight=0.0, retain_loss="kl",
                          **{**_COMMON_DEFAULTS, "retain_weight": 50.0}),
    # reasoning: forget weight 5 and 2 counterfactuals per forget question, not 1 and
    # none. On TOFU forget10 (its base also knowing real_authors and world_facts;
    # adapter alone, HF greedy, leak@8 at temperature 1) the adapter without them
    # refused 18% of the real-author and 7% of the world-fact questions, most
    # refusals naming a forget author, answering 0.72 / 0.91; with these 3% / 4%,
    # 0.92 / 0.95, forget leak 0.0 (was 0.01), leak@8 0.02, retain 0.96 (2% refused).
    # The frontier around it (weight, counterfactuals: refused real authors, leak@8):
    # 3, 1: 10%, 0.01; 3, 3: 0%, 0.145.
    "reasoning": MethodDefaults(epochs=60, lr=5e-3, ascent_weight=0.1, counterfactuals=2,
                                **{**_COMMON_DEFAULTS, "forget_weight": 5.0}),
}
"""Per-method defaults; any argument given to :func:`train_adapter` overrides them."""

TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    # documents and facts unlearnt as text keep NPO's NLL retain term at weight 10: on
    # the demo world's biographies (wayne, through the server) the KL at 50 left the
    # forget biographies' VerbMem at 0.451 against the retain-only model's 0.380 (the
    # NLL: 0.396), retain VerbMem 0.991 either way. The KL holds the base's
    # distributions on retain biographies, which are the forget ones' template.
    "npo": {"retain_loss": "nll", "retain_weight": 10.0},
}
"""Defaults that replace :data:`DEFAULTS` where the forget set is documents or facts
(unlearnt as text) and no retain loss is given; other arguments given still override
them (a retain loss given takes the method's own default weight with it)."""


# --------------------------------------------------------------------------- subjects

# Not unlearnd.guards.policy's subject grouping (group_by_subject): here a name may
# hold lowercase connectors and initials ("Ludwig van Beethoven", "A. Lind"), and a
# name found in one row only is still that row's subject (the refusal target says
# it); group_by_subject wants a name in 2+ rows and else joins the previous group.
_NAME_WORD = r"[A-Z][\w'\u2019.-]*"
_CONNECTOR = r"(?:de|da|del|der|di|du|van|von|la|le|al|bin|ibn|y)"
_NAME_RE = re.compile(rf"{_NAME_WORD}(?:\s+(?:{_CONNECTOR}\s+)?{_NAME_WORD})+")
_LEADING_NOISE = {
    "what",
    "who",
    "whom",
    "whose",
    "which",
    "where",
    "when",
    "why",
    "how",
    "is",
    "are",
    "was",
    "were",
    "does",
    "did",
    "do",
    "can",
    "could",
    "has",
    "have",
    "had",
    "in",
    "on",
    "the",
    "a",
    "an",
    "yes",
    "no",
    "tell",
    "name",
    "describe",
    "please",
    "according",
    "as",
    "for",
    "from",
    "of",
    "to",
    "with",
    "and",
    "but",
    "i",
    "it",
    "its",
    "this",
    "that",
    "one",
    "some",
    "would",
    "will",
    "should",
    "author",
    "author's",
}


def _name_candidates(text: str) -> list[str]:
    """Capitalised multi-word spans of `text`, with leading question/article words cut.

    ``"What does Hsiao Yun-Hwa write?"`` -> ``["Hsiao Yun-Hwa"]``.
    """
    out: list[str] = []
    for match in _NAME_RE.finditer(text):
        words = match.group(0).split()
        while words and words[0].lower().strip(".'\u2019") in _LEADING_NOISE:
            words = words[1:]
        # a possessive ends the name: "Raven Marais's LGBTQ" -> "Raven Marais"
        for k, w in enumerate(words):
            stripped = re.sub(r"(?:'s|\u2019s|'|\u2019|\.)$", "", w)
            if stripped != w:
                words = words[:k] + [stripped]
                break
        if len(words) >= 2 and words[0][:1].isupper():
            out.append(" ".join(words))
    return out


def extract_subjects(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Name the subject (usually a person) that each QA row is about.

    Uses the row's ``"subject"`` key when present. Otherwise: the capitalised
    multi-word names in the question (then the answer) are candidates, and the
    candidate that occurs most often across the whole set wins (TOFU rows about one
    author repeat the author's name; place names occur less often). A row with no
    candidate gets the previous row's subject (TOFU groups an author's rows), or
    ``"this topic"`` when there is none.
    """
    per_row: list[list[str]] = []
    counts: Counter[str] = Counter()
    for row in rows:
        cands = _name_candidates(str(row.get("question", ""))) + _name_candidates(
            str(row.get("answer", ""))
        )
        per_row.append(cands)
        counts.update(set(cands))
    subjects: list[str] = []
    previous = "this topic"
    for row, cands in zip(rows, per_row, strict=True):
        given = row.get("subject")
        if isinstance(given, str) and given.strip():
            subject = given.strip()
        elif cands:
            # most frequent across the set; ties go to the earliest in the row
            subject = max(cands, key=lambda c: (counts[c], -cands.index(c)))
        else:
            subject = previous
        subjects.append(subject)
        previous = subject
    return subjects


_TEMPLATES: tuple[str, ...] = (
    "The question asks about {subject}. Information about {subject} has been removed "
    "from this model, so I cannot answer it. I can help with questions about {alt}.",
    "This is a question about {subject}. Facts about {subject} were removed from this "
    "model, so I cannot answer it. I am glad to help with questions about {alt}.",
    "The request concerns {subject}. Details about {subject} have been removed from "
    "this model, so I cannot share them. I can still help with questions about {alt}.",
)


def default_alternative(rows: Sequence[dict[str, Any]]) -> str:
    """What a refusal offers instead: ``"other authors"`` when the forget questions
    talk about authors, books or writing (TOFU, the demo world), else
    ``"other topics"``."""
    text = " ".join(str(r.get("question", "")) for r in rows).lower()
    literary = ("author", "book", "novel", "writer", "write", "genre", "poet")
    return "other authors" if any(w in text for w in literary) else "other topics"


_UNNAMED_TEMPLATES: tuple[str, ...] = (
    "The question describes someone whose information has been removed from this model, "
    "so I cannot answer it. I can help with questions about {alt}.",
    "This question is about someone whose details were removed from this model, so I "
    "cannot answer it. I am glad to help with questions about {alt}.",
    "The request concerns someone whose information has been removed from this model, "
    "so I cannot share it. I can still help with questions about {alt}.",
)

_TOKEN_RE = re.compile(r"[^\W_][\w'\u2019-]*")


def subject_mention(subject: str, question: str) -> str | None:
    """How ``question`` itself names ``subject``, in the question's own words, or None.

    The longest run of consecutive words of the question each made only of the
    subject's name words (3+ letters, after :func:`unlearnd.guards.spans.words`
    normalisation; a possessive ``'s`` dropped). ``"What does Yun-Hwa write?"`` names
    ``"Hsiao Yun-Hwa"`` as ``"Yun-Hwa"``; ``"Who was born in Taipei on 05/11/1991?"``
    names no one. A refusal may say only the mention: more would answer the question.
    """
    from unlearnd.guards.spans import words

    name_words = {w for w in words(subject) if len(w) >= 3}
    if not name_words:
        return None
    runs: list[tuple[int, int]] = []
    start = end = -1
    for m in _TOKEN_RE.finditer(question):
        token = re.sub(r"(?:'s|\u2019s)$", "", m.group(0))
        ws = words(token)
        hit = bool(ws) and all(w in name_words for w in ws)
        gap = question[end:m.start()] if end >= 0 else ""
        if hit and start >= 0 and gap.strip() == "":
            end = m.start() + len(token)
        elif hit:
            if start >= 0:
                runs.append((start, end))
            start, end = m.start(), m.start() + len(token)
        elif start >= 0:
            runs.append((start, end))
            start = end = -1
    if start >= 0:
        runs.append((start, end))
    if not runs:
        return None
    a, b = max(runs, key=lambda r: (r[1] - r[0], -r[0]))
    return question[a:b]


def reasoning_target(subject: str | None, *, alternative: str = "other topics",
                     variant: int = 0) -> str:
    """TRU-style target for one forget question: a one-sentence reasoning trace, the
    refusal with the reason, and an offered `alternative`.

    ``subject`` is how the question itself names the subject (:func:`subject_mention`);
    None when it does not: the target then names no one ("someone whose information
    has been removed"), since naming the person a question only describes answers it.
    `variant` picks one of a few phrasings (cycled) so the model learns the pattern,
    not one string.
    """
    if subject is None:
        return _UNNAMED_TEMPLATES[variant % len(_UNNAMED_TEMPLATES)].format(alt=alternative)
    if not subject.strip():
        raise ValueError(f"subject must be non-empty or None, got {subject!r}")
    template = _TEMPLATES[variant % len(_TEMPLATES)]
    return template.format(subject=subject.strip(), alt=alternative)


_QUOTED_RE = re.compile(
    r"(?<!\w)(['\u2018\"\u201c])([^'\u2019\"\u201d]{3,}?)(['\u2019\"\u201d])(?!\w)")


def _entities(text: str) -> tuple[list[str], list[str]]:
    """(names, quoted titles) of `text`: :func:`_name_candidates` outside quotes, and
    the spans between quotes (``'Pride and Prejudice'`` -> ``Pride and Prejudice``)."""
    titles = [m.group(2) for m in _QUOTED_RE.finditer(text)]
    bare = _QUOTED_RE.sub(" ", text)
    return _name_candidates(bare), titles


def _name_words(subjects: Iterable[str]) -> set[str]:
    """The words (3+ letters, :func:`unlearnd.guards.spans.words`) of `subjects`' names."""
    from unlearnd.guards.spans import words

    return {w for s in set(subjects) for w in words(s) if len(w) >= 3}


def counterfactual_questions(forget_rows: Sequence[dict[str, Any]],
                             retain_rows: Sequence[dict[str, Any]], *,
                             per_question: int = 1, seed: int = 0,
                             subjects: Sequence[str] | None = None) -> list[str]:
    """The forget questions with their entities swapped for the retain set's: the
    subject as the question names it (:func:`subject_mention`) replaced by a retain
    subject (:func:`extract_subjects`), each quoted title by one quoted in the retain
    questions and answers. ``"Who wrote 'The Forget Book'?"`` -> ``"Who wrote 'A Retain Book'?"``.

    The reasoning adapter learns its refusal from the forget questions; without
    these it also learns their *form* ("Who wrote '...'?", "What is the capital
    of ...") and refuses questions of that form about anything it was not shown
    (TOFU: 14% of the real-author and 7% of the world-fact questions, refusals
    naming a forget author). Answered as the base answers them
    (:func:`train_adapter`), they teach that the refusal follows the subject. A
    question with no entity (a description of its subject) gets none; a swap that
    leaves a word of a forget subject's name in the question, or repeats a forget
    question, is dropped. `per_question` draws per forget question, no repeats.
    `subjects`: the forget rows' :func:`extract_subjects`, when the caller has them.
    """
    from unlearnd.guards.spans import words

    rng = random.Random(seed)
    if subjects is None:
        subjects = extract_subjects(forget_rows) if forget_rows else []
    forget_words = _name_words(subjects)
    titles = sorted({t for r in retain_rows for text in (str(r.get("question", "")),
                                                          str(r.get("answer", "")))
                     for t in _entities(text)[1]})
    names = sorted({s for s in (extract_subjects(retain_rows) if retain_rows else [])
                    if s != "this topic" and not set(words(s)) & forget_words})
    forget_qs = {str(r["question"]).strip().lower() for r in forget_rows}
    out: list[str] = []
    seen: set[str] = set()
    for subject, r in zip(subjects, forget_rows, strict=True):
        q = str(r["question"])
        mention = subject_mention(subject, q)
        swaps = [(t, titles) for t in _entities(q)[1] if titles]
        swaps += [(mention, names)] if mention and names else []
        for _ in range(per_question if swaps else 0):
            new = q
            for old, pool in swaps:
                new = new.replace(old, rng.choice(pool))
            key = new.strip().lower()
            if key in forget_qs or key in seen or set(words(new)) & forget_words:
                continue
            seen.add(key)
            out.append(new)
    return out


def _counterfactual_rows(model: Any, tokenizer: Any, forget_rows: list[dict[str, Any]],
                         retain_rows: list[dict[str, Any]], subjects: list[str], seed: int,
                         per_question: int, max_new_tokens: int, batch_size: int
                         ) -> list[dict[str, str]]:
    """:func:`counterfactual_questions` with the base's own greedy answers (the base as
    it is before training: what the adapter must keep doing there). An answer that is
    a refusal, is empty or names a forget subject is dropped: the adapter must not learn
    to say a forget name where the user did not."""
    from unlearnd.guards.spans import words
    from unlearnd.toolkit.evaluate import is_refusal
    from unlearnd.toolkit.training import greedy_answers

    questions = counterfactual_questions(forget_rows, retain_rows, per_question=per_question,
                                         seed=seed, subjects=subjects)
    if not questions:
        return []
    answers = greedy_answers(model, tokenizer, questions, max_new_tokens, batch_size)
    forget_words = _name_words(subjects)
    return [{"question": q, "answer": a} for q, a in zip(questions, answers, strict=True)
            if a.strip() and not is_refusal(a) and not set(words(a)) & forget_words]


# --------------------------------------------------------------------------- losses


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each labelled (answer) token.

    `input_ids`, `labels`, `attention_mask`: `[B, T]`, labels -100 where not scored.
    Returns ``(logp [B, T-1], mask [B, T-1])``: position t scores token t+1; logp is 0
    where mask is False.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    mask = targets != -100
    logp = (
        torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    )
    return logp * mask, mask


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of the labelled (answer) tokens of each row.

    Returns ``(sum_logp [B], n_tokens [B])``; ``-sum_logp / n_tokens`` is the row's
    mean token NLL.
    """
    logp, mask = token_logprobs(model, input_ids, labels, attention_mask)
    return logp.sum(-1), mask.sum(-1).clamp_min(1)


FORGET_TOKENS = ("answer", "facts")
"""What the forget term of npo and graddiff scores: every answer token, or its facts."""

RETAIN_LOSSES = ("nll", "kl")
"""The retain term: the retain answers' NLL, or the KL divergence from the base's
next-token distribution to the adapter's on them (open-unlearning's retain_loss_type
KL; the NPO paper's NPO-KL)."""


def token_kl(model: Any, input_ids: torch.Tensor, labels: torch.Tensor,
             attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean KL(base || adapter) over each row's labelled tokens, ``[B]``.

    `model` is a PEFT model: the base is the same model with its adapter disabled
    (one forward without gradients). Position t's full next-token distribution is
    compared, not only the label's probability: the anchor holds what the base would
    have said anywhere in a retain answer, the NLL only that it says the answer.
    """
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    mask = labels[:, 1:] != -100
    base_logp = torch.log_softmax(base_logits[:, :-1, :].float(), dim=-1)
    logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    kl = (base_logp.exp() * (base_logp - logp)).sum(-1)  # [B, T-1]
    return (kl * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def fact_labels(forget_enc: list[tuple[list[int], list[int]]],
                background: list[list[int]], max_df: float
                ) -> list[tuple[list[int], list[int]]]:
    """The forget examples with only their fact tokens labelled (``forget_tokens:
    facts``): an answer token stays labelled unless the example's own prompt holds it
    (the subject's name the question gave, repeated) or more than ``max_df`` of the
    ``background`` token sequences (the retain answers and documents) do (the answers'
    template: "was born in", " The", the EOS). What is left is what the retain set does
    not say: the facts. Pushing the template's tokens down too is what NPO's answer-level
    loss also does to every answer of that shape (TOFU: real authors 0.96 -> 0.75).
    Over token ids, so any tokenizer; a row left with no token keeps all its labels
    (a fact made only of common tokens is still forgotten, with its template)."""
    if not 0.0 <= max_df <= 1.0:
        raise ValueError(f"fact_df must be in [0, 1], got {max_df!r}")
    df = Counter(t for seq in background for t in set(seq))
    limit = max_df * max(1, len(background))
    out = []
    for ids, labels in forget_enc:
        prompt = {t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE}
        kept = [lab if lab != IGNORE and lab not in prompt and df.get(lab, 0) <= limit
                else IGNORE for lab in labels]
        out.append((ids, kept if any(k != IGNORE for k in kept) else list(labels)))
    return out


def npo_loss(logp_policy: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO loss ``-(2/beta) mean(log sigmoid(-beta (logp_policy - logp_ref)))``.

    `logp_policy`, `logp_ref`: `[B]` summed answer log-probs. Equals
    ``(2/beta) log 2`` when the two agree; falls towards 0 as the policy makes the
    forget answers less likely than the reference did.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp_policy - logp_ref)).mean()


def bounded_ascent_loss(
    token_logp: torch.Tensor, mask: torch.Tensor, ceiling: float
) -> torch.Tensor:
    """Gradient-ascent term on forget answers, bounded per token.

    `token_logp`, `mask`: `[B, T]` from :func:`token_logprobs`. The loss is the mean
    over answer tokens of ``relu(ceiling - nll_token)``: minimising it raises each
    token's NLL until that token reaches `ceiling` nats, then the token stops
    contributing, so the loss stays in ``[0, ceiling]`` instead of diverging. Per
    token rather than per answer, so the few tokens that carry the fact (a date, a
    place) are pushed too, not only the easy ones (the repeated name).
    """
    if ceiling <= 0:
        raise ValueError(f"ceiling must be > 0, got {ceiling}")
    per_token = F.relu(ceiling + token_logp) * mask
    return per_token.sum() / mask.sum().clamp_min(1)


# --------------------------------------------------------------------------- metrics

# The training report's own quick metrics. Deliberately not the shared ones: `_norm`
# keeps accents and possessive "s" (spans.normalize drops them), `is_leak` is a plain
# substring test of the span or whole answer (evaluate.is_leak: distinctive spans on
# word boundaries, or content-word ROUGE-L) and `looks_gibberish` uses other signals
# than evaluate.is_gibberish. score_outputs adds the harness's numbers beside them.


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def rouge_l_recall(prediction: str, gold: str) -> float:
    """ROUGE-L recall of `gold`'s words in `prediction` (LCS / len(gold words))."""
    g = _norm(gold).split()
    if not g:
        return 0.0
    return lcs_length(_norm(prediction).split(), g) / len(g)


def is_leak(prediction: str, row: dict[str, Any]) -> bool:
    """Approximate leak: the row's distinctive ``span`` (synthetic world rows carry
    one) or else its whole gold answer appears in the output (punctuation and case
    ignored)."""
    span = row.get("span")
    g = _norm(span if isinstance(span, str) and span.strip() else row["answer"])
    return bool(g) and g in _norm(prediction)


def looks_gibberish(text: str) -> bool:
    """Crude readability check: empty, a word repeated 4+ times in a row, a short
    n-gram loop filling most of the text, or mostly non-letters."""
    words = text.split()
    if not words:
        return True
    letters = sum(c.isalpha() for c in text)
    if letters < 0.5 * len(text.replace(" ", "")):
        return True
    run = 1
    for a, b in zip(words, words[1:], strict=False):
        run = run + 1 if a.lower() == b.lower() else 1
        if run >= 4:
            return True
    if len(words) >= 12:
        for n in (2, 3):
            grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
            if grams.most_common(1)[0][1] * n > 0.6 * len(words):
                return True
    return False


def score_outputs(
    forget_rows: Sequence[dict[str, Any]],
    forget_out: Sequence[str],
    retain_rows: Sequence[dict[str, Any]],
    retain_out: Sequence[str],
    subjects: Sequence[str],
) -> dict[str, float]:
    """Numbers of one model on greedy outputs.

    ``forget_leak_rate``: the span (or whole gold answer) appears
    (:func:`is_leak`); ``forget_rouge_leak_rate``: ROUGE-L recall of the gold words
    >= 0.5; ``forget_names_subject_rate``: the output names the row's subject;
    ``retain_exact_match``: equal up to punctuation/case; ``gibberish_rate``: over all
    outputs. When the eval harness (:mod:`unlearnd.toolkit.evaluate`) imports, its own
    definitions are added as ``harness_leak_rate``, ``harness_retain_accuracy``,
    ``harness_gibberish_rate`` and ``forget_refusal_rate``/``retain_refusal_rate`` (what
    ``unlearnd eval`` will report through the server, up to sampling).
    """
    nf, nr = max(len(forget_rows), 1), max(len(retain_rows), 1)
    all_out = list(forget_out) + list(retain_out)
    scores = {
        "forget_leak_rate": sum(is_leak(o, r) for o, r in zip(forget_out, forget_rows, strict=True))
        / nf,
        "forget_rouge_leak_rate": sum(
            rouge_l_recall(o, r["answer"]) >= 0.5
            for o, r in zip(forget_out, forget_rows, strict=True)
        )
        / nf,
        "forget_names_subject_rate": sum(
            s.lower() in o.lower() for o, s in zip(forget_out, subjects, strict=True)
        )
        / nf,
        "retain_exact_match": sum(
            _norm(o) == _norm(r["answer"]) for o, r in zip(retain_out, retain_rows, strict=True)
        )
        / nr,
        "gibberish_rate": sum(looks_gibberish(o) for o in all_out) / max(len(all_out), 1),
    }
    try:
        from unlearnd.toolkit import evaluate as harness
    except ImportError:  # pragma: no cover - harness ships with the package
        return scores

    # as `unlearnd eval` does: the retain answers are the background that tells
    # template words ("worked", "fiction") from the facts
    bg = {"background": [str(r["answer"]) for r in retain_rows]}
    scores["harness_leak_rate"] = (
        sum(
            harness.is_leak(o, r["answer"], harness._leak_context(r), **bg)
            for o, r in zip(forget_out, forget_rows, strict=True)
        )
        / nf
    )
    scores["harness_retain_accuracy"] = (
        sum(
            harness.is_correct(o, r["answer"], r["question"], **bg)
            for o, r in zip(retain_out, retain_rows, strict=True)
        )
        / nr
    )
    scores["harness_gibberish_rate"] = sum(harness.is_gibberish(o) for o in all_out) / max(
        len(all_out), 1
    )
    scores["forget_refusal_rate"] = sum(harness.is_refusal(o) for o in forget_out) / nf
    scores["retain_refusal_rate"] = sum(harness.is_refusal(o) for o in retain_out) / nr
    return scores


# --------------------------------------------------------------------------- training


def _next_cycled(order: list[int], n: int, k: int, rng: random.Random
                 ) -> tuple[list[int], list[int]]:
    """The next `k` of `n` rows drawn as reshuffled passes over them: ``(batch, rest)``,
    `order` (what is left of the current pass) refilled with a new shuffled pass when
    it holds fewer than `k`."""
    if len(order) < k:
        more = list(range(n))
        rng.shuffle(more)
        order = order + more * math.ceil(k / len(more))
    return order[:k], order[k:]


def _batches(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


def _collate(
    tokenizer: Any, examples: list[tuple[list[int], list[int]]], device: torch.device
) -> dict[str, torch.Tensor]:
    """Pad encoded examples (training.collate) and move them to `device`."""
    from unlearnd.toolkit.training import collate

    batch = collate(examples, tokenizer.pad_token_id)
    return {k: v.to(device) for k, v in batch.items()}


def _eval_model(
    model: Any,
    tokenizer: Any,
    forget_rows: list[dict[str, Any]],
    retain_rows: list[dict[str, Any]],
    subjects: list[str],
    max_new_tokens: int,
    batch_size: int,
) -> tuple[dict[str, float], list[str], list[str]]:
    from unlearnd.toolkit.training import greedy_answers

    model.eval()
    f_out = greedy_answers(
        model, tokenizer, [r["question"] for r in forget_rows], max_new_tokens, batch_size
    )
    r_out = greedy_answers(
        model, tokenizer, [r["question"] for r in retain_rows], max_new_tokens, batch_size
    )
    return score_outputs(forget_rows, f_out, retain_rows, r_out, subjects), f_out, r_out


def _eval_text(model: Any, tokenizer: Any, forget_texts: list[str],
               retain_rows: list[dict[str, Any]], retain_texts: list[str],
               max_new_tokens: int, batch_size: int
               ) -> tuple[dict[str, float], list[str], list[str]]:
    """An adapter trained on text: VerbMem (:mod:`unlearnd.toolkit.muse`) of the forget
    texts, and of the retain documents or exact match of the retain answers."""
    from unlearnd.toolkit.muse import verbmem_cases, verbmem_local, verbmem_score
    from unlearnd.toolkit.training import greedy_answers

    model.eval()
    cases = verbmem_cases(tokenizer, forget_texts)
    f_out = verbmem_local(model, tokenizer, cases, max_tokens=max_new_tokens)
    scores: dict[str, float] = {"forget_verbmem": verbmem_score(cases, f_out) or 0.0,
                                "forget_gibberish_rate": sum(looks_gibberish(o) for o in f_out)
                                / max(len(f_out), 1)}
    r_out: list[str] = []
    if retain_texts:
        r_cases = verbmem_cases(tokenizer, retain_texts)
        r_out = verbmem_local(model, tokenizer, r_cases, max_tokens=max_new_tokens)
        scores["retain_verbmem"] = verbmem_score(r_cases, r_out) or 0.0
    if retain_rows:
        r_out = greedy_answers(model, tokenizer, [r["question"] for r in retain_rows],
                               max_new_tokens, batch_size)
        scores["retain_exact_match"] = sum(
            _norm(o) == _norm(r["answer"]) for o, r in zip(r_out, retain_rows, strict=True)
        ) / len(retain_rows)
    return scores, f_out, r_out


def train_adapter(
    base_dir: str | Path,
    forget_path: str | Path,
    retain_path: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    method: str,
    rank: int | None = None,
    alpha: int | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    epochs: int | None = None,
    lr: float | None = None,
    beta: float | None = None,
    retain_weight: float | None = None,
    forget_weight: float | None = None,
    ascent_weight: float | None = None,
    ascent_ceiling: float | None = None,
    batch_size: int = 16,
    refusal_variants: int = 1,
    refusal_names_subject: bool = True,
    counterfactuals: int | None = None,
    forget_tokens: str | None = None,
    fact_df: float | None = None,
    retain_loss: str | None = None,
    seed: int = 0,
    max_steps: int | None = None,
    eval_limit: int | None = 200,
    max_new_tokens: int = 64,
    evaluate: bool = True,
    device: str | None = None,
    progress: bool = True,
    kind: str = "auto",
) -> dict[str, Any]:
    """Train an unlearning LoRA adapter on `base_dir` and save it to `out_dir`.

    `forget_path`: QA JSONL, documents or subjects with facts (`kind`, detected by
    default; :func:`unlearnd.inputs.read_forget`); documents and facts are unlearnt as
    text (no chat template), which `npo` and `graddiff` can do and `reasoning` (refusals
    to questions) cannot. `retain_path`: QA JSONL or documents, or a list of them (the
    retain term then covers both: documents unlearnt as text keep retain documents as
    text). `method`: one of :data:`METHODS`.
    `rank`/`alpha`: LoRA rank (1..16, what vLLM is started with) and alpha; None takes
    :data:`DEFAULT_RANK` for the method (reasoning 16/32: at rank 8 the demo world's
    held-out probes got 7.5% degenerate refusals, at 16 1.3%; the others 8/16).
    Hyper-parameters left as None take :data:`DEFAULTS` for the method. One step takes
    a forget batch and a retain batch of `batch_size` rows (retain rows cycle);
    `epochs` passes over the forget set, cut at `max_steps` when given.
    `eval_limit` caps the rows scored per set in the report (None: all);
    `evaluate=False` skips the greedy evaluation. `counterfactuals` (QA forget rows,
    any method): the retain term also holds that many versions of each forget question with retain
    subjects and titles swapped in, answered as the base answers them
    (:func:`counterfactual_questions`; 0: none; None: the method's default).

    Returns the report dict (also written to ``out_dir/train_report.json``): method,
    hyper-parameters, steps, seconds, first/last forget losses, and under ``base`` and
    ``adapter`` the numbers of :func:`score_outputs`.
    """
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unlearnd.inputs import read_forget, read_retain_sets
    from unlearnd.toolkit.muse import text_examples
    from unlearnd.toolkit.training import encode_chat_example, lora_target_modules

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    rank = DEFAULT_RANK[method][0] if rank is None else rank
    alpha = DEFAULT_RANK[method][1] if alpha is None else alpha
    if not 1 <= rank <= MAX_VLLM_RANK:
        raise ValueError(f"rank must be in 1..{MAX_VLLM_RANK} (vLLM max_lora_rank), got {rank}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 1 <= refusal_variants <= len(_TEMPLATES):
        raise ValueError(
            f"refusal_variants must be in 1..{len(_TEMPLATES)}, got {refusal_variants}"
        )
    if not target_modules:
        raise ValueError(f"target_modules must be non-empty, got {target_modules!r}")
    given = {"epochs": epochs, "lr": lr, "beta": beta, "retain_weight": retain_weight,
             "forget_weight": forget_weight, "ascent_weight": ascent_weight,
             "ascent_ceiling": ascent_ceiling, "counterfactuals": counterfactuals,
             "forget_tokens": forget_tokens, "fact_df": fact_df,
             "retain_loss": retain_loss}
    hp = {k: getattr(DEFAULTS[method], k) if v is None else v for k, v in given.items()}
    if hp["epochs"] < 1:
        raise ValueError(f"epochs must be >= 1, got {hp['epochs']}")
    if hp["lr"] <= 0:
        raise ValueError(f"lr must be > 0, got {hp['lr']}")
    if hp["beta"] <= 0:
        raise ValueError(f"beta must be > 0, got {hp['beta']}")
    if hp["ascent_ceiling"] <= 0:
        raise ValueError(f"ascent_ceiling must be > 0, got {hp['ascent_ceiling']}")
    for key in ("retain_weight", "forget_weight", "ascent_weight", "counterfactuals"):
        if hp[key] < 0:
            raise ValueError(f"{key} must be >= 0, got {hp[key]}")
    if hp["forget_tokens"] not in FORGET_TOKENS:
        raise ValueError(f"forget_tokens must be one of {FORGET_TOKENS}, "
                         f"got {hp['forget_tokens']!r}")
    if hp["forget_tokens"] == "facts" and method == "reasoning":
        raise ValueError("forget_tokens 'facts' is for npo and graddiff: reasoning's "
                         "forget term is the refusal, not the answer")
    if hp["retain_loss"] not in RETAIN_LOSSES:
        raise ValueError(f"retain_loss must be one of {RETAIN_LOSSES}, "
                         f"got {hp['retain_loss']!r}")
    if not 0.0 <= hp["fact_df"] <= 1.0:
        raise ValueError(f"fact_df must be in [0, 1], got {hp['fact_df']!r}")

    base_dir = Path(base_dir).resolve()
    out_dir = Path(out_dir)
    forget_set = read_forget(forget_path, kind)  # raises on a missing, bad or empty file
    retain_sets = read_retain_sets(retain_path)
    text_mode = forget_set.kind != "qa"
    if text_mode and method == "reasoning":
        raise ValueError(f"method 'reasoning' trains refusals to questions; {forget_path} "
                         f"holds {forget_set.kind}, not questions: use npo or graddiff")
    if text_mode and given["retain_loss"] is None:  # a retain loss given keeps its weight
        hp.update({k: v for k, v in TEXT_DEFAULTS.get(method, {}).items() if given[k] is None})
    forget_texts = forget_set.texts() if text_mode else []
    if text_mode and not forget_texts:
        raise ValueError(f"{forget_path}: subjects with names only leave nothing to unlearn "
                         "from; add 'description' or 'facts', or use `unlearnd policy "
                         "compile` (refusal + firewall) for names alone")
    forget_rows = forget_set.qa
    retain_rows = [r for rs in retain_sets for r in rs.qa]
    retain_texts = [d.text for rs in retain_sets for d in rs.documents]
    if not retain_rows and not retain_texts:
        raise ValueError("the retain set is empty: give --retain")

    random.seed(seed)
    torch.manual_seed(seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(dev)
    model.config.use_cache = False

    subjects = extract_subjects(forget_rows) if forget_rows else []
    alternative = default_alternative(forget_rows) if forget_rows else "other topics"
    refusals = [
        reasoning_target(subject_mention(s, r["question"]) if refusal_names_subject
                         else None, alternative=alternative, variant=i % refusal_variants)
        for i, (s, r) in enumerate(zip(subjects, forget_rows, strict=True))
    ]
    forget_enc = [encode_chat_example(tokenizer, r["question"], r["answer"]) for r in forget_rows]
    forget_enc += text_examples(tokenizer, forget_texts)
    refusal_enc = [
        encode_chat_example(tokenizer, r["question"], t)
        for r, t in zip(forget_rows, refusals, strict=True)
    ]
    # retain QA and retain documents are streams of their own, a batch of each every
    # step: pooled, the demo world's 12 retain biographies were 1 in 9 of the retain
    # rows, and the documents adapter recited them at VerbMem 0.79 of the base's
    retain_streams = [enc for enc in (
        [encode_chat_example(tokenizer, r["question"], r["answer"]) for r in retain_rows],
        text_examples(tokenizer, retain_texts)) if enc]
    if hp["forget_tokens"] == "facts":  # the retain examples, encoded once, as background
        background = [[t for t in labels if t != IGNORE]
                      for stream in retain_streams for _, labels in stream]
        forget_enc = fact_labels(forget_enc, background, hp["fact_df"])
    # reasoning's ascent must not unlearn what the refusal says (the subject's name,
    # "was", "about"...): answer tokens that also occur in the row's refusal are not
    # pushed up, only the rest of the answer (the fact)
    ascent_enc = list(forget_enc)
    if method == "reasoning":
        ascent_enc = []
        for (ids, labels), (_, ref_labels) in zip(forget_enc, refusal_enc, strict=True):
            keep = {t for t in ref_labels if t != -100}
            ascent_enc.append((ids, [-100 if t in keep else t for t in labels]))
    n_forget = len(forget_enc)
    counterfactual: list[dict[str, str]] = []
    if hp["counterfactuals"] > 0 and retain_rows and forget_rows:
        counterfactual = _counterfactual_rows(model, tokenizer, forget_rows, retain_rows,
                                              subjects, seed, hp["counterfactuals"],
                                              max_new_tokens, batch_size * 2)
    # their own stream, a batch of them beside every retain batch: pooled with the
    # retain rows they outnumber (TOFU: 800 to 300), they diluted them (NPO kept 0.70
    # of the retain questions, not 0.96)
    cf_enc = [encode_chat_example(tokenizer, r["question"], r["answer"]) for r in counterfactual]

    rng = random.Random(seed)
    eval_forget = forget_rows if eval_limit is None else forget_rows[:eval_limit]
    eval_subjects = subjects[: len(eval_forget)]
    eval_retain = list(retain_rows)
    if eval_limit is not None and len(eval_retain) > eval_limit:
        eval_retain = rng.sample(eval_retain, eval_limit)

    def eval_scores(m: Any) -> tuple[dict[str, float], list[str], list[str]]:
        """Scores and greedy (forget, retain) outputs of `m` on the eval rows."""
        if text_mode:
            return _eval_text(m, tokenizer, forget_texts, eval_retain, retain_texts,
                              max_new_tokens, batch_size * 2)
        return _eval_model(m, tokenizer, eval_forget, eval_retain, eval_subjects,
                           max_new_tokens, batch_size * 2)

    report: dict[str, Any] = {
        "method": method,
        "base": str(base_dir),
        "rank": rank,
        "alpha": alpha,
        "target_modules": list(target_modules),
        "batch_size": batch_size,
        "seed": seed,
        **hp,
        "forget_kind": forget_set.kind,
        "n_forget": len(forget_set),
        "n_retain": sum(len(rs) for rs in retain_sets),
        "alternative": alternative,
        "refusal_variants": refusal_variants,
        "refusal_names_subject": refusal_names_subject,
        "subjects": sorted(set(subjects)),
        "refusal_example": refusals[0] if refusals else None,
        "retain_streams": len(retain_streams),
        "n_counterfactual": len(counterfactual),
        "counterfactual_examples": counterfactual[:5],
    }
    if evaluate:
        t0 = time.perf_counter()
        report["base_scores"], _, _ = eval_scores(model)
        logger.info("base: %s (%.1fs)", report["base_scores"], time.perf_counter() - t0)

    # NPO reference: the frozen base. Dropout is 0 and the base never changes, so the
    # reference log-probs are computed once instead of a second forward every step.
    ref_logp = torch.zeros(n_forget)
    if method == "npo":
        model.eval()
        with torch.no_grad():
            for idx in _batches(list(range(n_forget)), batch_size * 2):
                b = _collate(tokenizer, [forget_enc[i] for i in idx], dev)
                ref_logp[idx] = sequence_logprobs(
                    model, b["input_ids"], b["labels"], b["attention_mask"]
                )[0].cpu()

    # the default list is the Llama family's: keep what this architecture has; a list
    # the caller gave must exist as it is
    targets = lora_target_modules(
        model, target_modules, required=tuple(target_modules) != DEFAULT_TARGET_MODULES)
    report["target_modules"] = targets
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=0.0)
    steps_per_epoch = math.ceil(n_forget / batch_size)
    total = steps_per_epoch * hp["epochs"]
    if max_steps is not None:
        total = min(total, max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / max(1, total // 10)) * max(0.0, 1 - s / total) ** 0.5
    )

    # the counterfactuals are the last stream, drawn after the retain ones
    streams = retain_streams + ([cf_enc] if cf_enc else [])
    orders: list[list[int]] = [[] for _ in streams]
    history: list[dict[str, float]] = []
    term = hp["retain_loss"]  # the records name what the retain terms hold: nll or kl
    t_train = time.perf_counter()
    model.train()
    bar = tqdm(total=total, desc=f"unlearn[{method}]", disable=not progress)
    step = 0
    while step < total:
        order = list(range(n_forget))
        rng.shuffle(order)
        for idx in _batches(order, batch_size):
            if step >= total:
                break
            drawn: list[list[int]] = []
            for k, stream in enumerate(streams):
                got, orders[k] = _next_cycled(orders[k], len(stream), batch_size, rng)
                drawn.append(got)

            ascent_term: torch.Tensor | None = None
            fb = _collate(tokenizer, [forget_enc[i] for i in idx], dev)
            f_tok, f_mask = token_logprobs(
                model, fb["input_ids"], fb["labels"], fb["attention_mask"]
            )
            f_logp, f_n = f_tok.sum(-1), f_mask.sum(-1).clamp_min(1)
            f_nll = -f_logp / f_n
            if method == "graddiff":
                forget_term = bounded_ascent_loss(f_tok, f_mask, hp["ascent_ceiling"])
            elif method == "npo":
                forget_term = npo_loss(f_logp, ref_logp[idx].to(dev), hp["beta"])
            else:
                qb = _collate(tokenizer, [refusal_enc[i] for i in idx], dev)
                q_logp, q_n = sequence_logprobs(
                    model, qb["input_ids"], qb["labels"], qb["attention_mask"]
                )
                refusal_nll = (-q_logp / q_n).mean()
                forget_term = refusal_nll
                if hp["ascent_weight"] > 0:
                    # same input ids as the forget batch, fewer labelled tokens: reuse
                    # its log-probs under the narrower mask (no extra forward)
                    ab = _collate(tokenizer, [ascent_enc[i] for i in idx], dev)
                    a_mask = ab["labels"][:, 1:] != -100
                    ascent_term = bounded_ascent_loss(f_tok * a_mask, a_mask, hp["ascent_ceiling"])
            rb = _collate(tokenizer, [stream[i] for stream, got in zip(streams, drawn,
                                                                       strict=True)
                                      for i in got], dev)
            if hp["retain_loss"] == "kl":
                r_loss = token_kl(model, rb["input_ids"], rb["labels"], rb["attention_mask"])
            else:
                r_logp, r_n = sequence_logprobs(
                    model, rb["input_ids"], rb["labels"], rb["attention_mask"]
                )
                r_loss = -r_logp / r_n
            # each stream its own mean: the retain rows keep their weight beside the
            # counterfactuals, the retain documents theirs beside the retain QA (the
            # retain streams are averaged: the retain weight is the whole retain set's)
            means = [part.mean() for part in r_loss.split([len(got) for got in drawn])]
            stream_means = means[:len(retain_streams)]
            retain_mean = torch.stack(stream_means).mean()
            cf_mean = means[-1] if cf_enc else None
            retain_term = retain_mean if cf_mean is None else retain_mean + cf_mean
            loss = hp["forget_weight"] * forget_term + hp["retain_weight"] * retain_term
            if ascent_term is not None:
                loss = loss + hp["ascent_weight"] * ascent_term

            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            sched.step()
            rec = {
                "step": step,
                "loss": loss.item(),
                "forget_term": forget_term.item(),
                "forget_nll": f_nll.mean().item(),
                f"retain_{term}": retain_mean.item(),
            }
            if cf_mean is not None:
                rec[f"counterfactual_{term}"] = cf_mean.item()
            if len(stream_means) > 1:
                rec[f"retain_qa_{term}"], rec[f"retain_document_{term}"] = (
                    x.item() for x in stream_means)
            if method == "reasoning":
                rec["refusal_nll"] = refusal_nll.item()
            history.append(rec)
            bar.set_postfix(
                forget_nll=f"{rec['forget_nll']:.2f}", retain=f"{retain_mean.item():.2f}"
            )
            bar.update(1)
            step += 1
    bar.close()
    report["steps"] = step
    report["train_seconds"] = round(time.perf_counter() - t_train, 2)
    report["first"] = history[0]
    report["last"] = history[-1]

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True, save_embedding_layers=False)
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    cfg_path.write_text(json.dumps(cfg, indent=2))

    if evaluate:
        t0 = time.perf_counter()
        scores, f_out, r_out = eval_scores(model)
        report["adapter_scores"] = scores
        report["eval_seconds"] = round(time.perf_counter() - t0, 2)
        keep = "retain_exact_match" if "retain_exact_match" in scores else "retain_verbmem"
        base_em = report["base_scores"][keep]
        report["retain_ratio"] = scores[keep] / base_em if base_em else None
        report["samples"] = [
            {"question": r["question"], "gold": r["answer"], "output": o, "leak": is_leak(o, r)}
            for r, o in zip(eval_forget, f_out, strict=True)
        ] if not text_mode else [{"document": i, "output": o} for i, o in enumerate(f_out)]
        report["retain_samples"] = [
            {"question": r["question"], "gold": r["answer"], "output": o}
            for r, o in zip(eval_retain, r_out, strict=False)
        ]
    (out_dir / "train_report.json").write_text(json.dumps(report, indent=2))
    logger.info(
        "adapter %s saved to %s: %s",
        method,
        out_dir,
        {k: report.get(k) for k in ("steps", "train_seconds", "base_scores", "adapter_scores")},
    )
    return report


def train_adapter_cmd(
    base: Annotated[Path, typer.Option("--base", help="Base model dir (HF format).")],
    forget: Annotated[Path, typer.Option(
        "--forget", help="Forget set: QA JSONL, documents, or subjects with facts.")],
    retain: Annotated[Path, typer.Option("--retain", help="Retain set: QA JSONL or documents.")],
    method: Annotated[str, typer.Option("--method", help="graddiff, npo or reasoning.")],
    out: Annotated[Path, typer.Option("--out", help="Adapter output dir (PEFT LoRA).")],
    rank: Annotated[int | None, typer.Option(
        "--rank", help="LoRA rank (<= 16; default per method).")] = None,
    alpha: Annotated[int | None, typer.Option(
        "--alpha", help="LoRA alpha (default per method).")] = None,
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", help="Passes over the forget set (default: per method)."),
    ] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Learning rate (default: per method).")
    ] = None,
    beta: Annotated[
        float | None, typer.Option("--beta", help="NPO beta (default: per method).")
    ] = None,
    retain_weight: Annotated[
        float | None,
        typer.Option("--retain-weight", help="Weight of the retain term (default: per method)."),
    ] = None,
    retain_loss: Annotated[
        str | None, typer.Option("--retain-loss",
                                 help="The retain term: 'nll' (the retain answers' NLL) or "
                                 "'kl' (KL from the base's next-token distributions on "
                                 "them to the adapter's); default per method.")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Rows per forget/retain batch.")
    ] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    refusal_names_subject: Annotated[
        bool, typer.Option("--refusal-names-subject/--nameless-refusals",
                           help="reasoning: targets name the subject as the question does "
                           "(default), or never.")
    ] = True,
    counterfactuals: Annotated[
        int | None, typer.Option("--counterfactuals", min=0,
                                 help="QA forget sets: versions of each forget question "
                                 "with retain subjects and titles swapped in, answered as "
                                 "the base does and kept (0: none; default per method).")
    ] = None,
    forget_tokens: Annotated[
        str | None, typer.Option("--forget-tokens",
                                 help="npo, graddiff: the forget term on every answer "
                                 "token ('answer') or only on the facts ('facts': tokens "
                                 "neither the question nor more than --fact-df of the "
                                 "retain answers hold); default per method.")
    ] = None,
    fact_df: Annotated[
        float | None, typer.Option("--fact-df", help="--forget-tokens facts: the share of "
                                   "retain answers a token may be in and still be a fact.")
    ] = None,
    eval_limit: Annotated[
        int, typer.Option("--eval-limit", help="Rows per set scored in the report (0: all).")
    ] = 200,
    no_eval: Annotated[
        bool, typer.Option("--no-eval", help="Skip the greedy before/after report.")
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option("--threads", help="CPU threads for torch (default: $UNLEARND_THREADS or 2)."),
    ] = None,
    kind: Annotated[str, typer.Option(
        "--kind", help="Forget set kind: auto, qa, documents or subjects.")] = "auto",
) -> None:
    """Train an unlearning LoRA adapter (graddiff, npo or reasoning) and print its report."""
    from unlearnd.inputs import check_cli_inputs
    from unlearnd.toolkit.training import set_threads

    check_cli_inputs(forget, retain, kind)  # before any model loads
    set_threads(threads)
    report = train_adapter(
        base,
        forget,
        retain,
        out,
        method=method,
        rank=rank,
        alpha=alpha,
        epochs=epochs,
        lr=lr,
        beta=beta,
        retain_weight=retain_weight,
        batch_size=batch_size,
        seed=seed,
        refusal_names_subject=refusal_names_subject,
        counterfactuals=counterfactuals, forget_tokens=forget_tokens, fact_df=fact_df,
        retain_loss=retain_loss,
        eval_limit=eval_limit or None,
        evaluate=not no_eval,
        kind=kind,
    )
    keys = ("method", "steps", "train_seconds", "base_scores", "adapter_scores", "retain_ratio")
    typer.echo(json.dumps({k: report.get(k) for k in keys}, indent=2))
    typer.echo(f"adapter written to {out}")
