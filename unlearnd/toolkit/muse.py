"""Documents as the field measures them (MUSE): verbatim memorisation, and text training.

MUSE (Shi et al., 2024) unlearns documents (books, news) and reports

- **VerbMem**: prompt the model with a document's first ``l`` tokens and score its
  greedy continuation against the document's true continuation with ROUGE-L F1
  (here over normalised words: lower case, punctuation dropped);
- **KnowMem**: QA about the documents' facts, scored against the gold answers (in
  unlearnd that is ``unlearnd eval`` with the facts' QA as the forget set).

:func:`verbmem_cases` cuts the prompts, :func:`verbmem_api` sends them through a
running server's ``/v1/completions`` (the prompt as token ids, so exactly the first
``l`` tokens reach the model; :func:`verbmem_report_async` does it for a tenant's
forget and retain documents, what ``unlearnd eval --forget-documents`` reports),
:func:`verbmem_local` runs them on a transformers model
(trainers' reports), :func:`verbmem_score` averages. :func:`text_examples` turns
documents into plain language-modelling examples (no chat template) for training.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearnd.guards.spans import lcs_length

__all__ = ["VerbMemCase", "rouge_l_f1", "verbmem_cases", "verbmem_score", "verbmem_api",
           "verbmem_api_async", "verbmem_local", "verbmem_report_async", "text_examples"]

DEFAULT_PREFIX_TOKENS = 32
DEFAULT_CONTINUATION_TOKENS = 64


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def rouge_l_f1(prediction: str, gold: str) -> float:
    """ROUGE-L F1 of ``prediction`` against ``gold`` over normalised words (0 for an
    empty side)."""
    p, g = _words(prediction), _words(gold)
    if not p or not g:
        return 0.0
    lcs = lcs_length(p, g)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(g)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class VerbMemCase:
    """One VerbMem prompt: the first tokens of a document and what truly follows."""

    source: int  # index of the document
    prompt_ids: tuple[int, ...]
    prompt: str
    gold: str


def verbmem_cases(tokenizer: Any, documents: Sequence[str], *,
                  prefix_tokens: int = DEFAULT_PREFIX_TOKENS,
                  continuation_tokens: int = DEFAULT_CONTINUATION_TOKENS,
                  bos: bool = True) -> list[VerbMemCase]:
    """One case per document long enough to have ``prefix_tokens`` and at least a
    quarter of ``continuation_tokens`` after them (shorter documents are skipped).
    ``bos``: start the prompt with the tokenizer's BOS (what a model trained on text
    saw at a document's start)."""
    if prefix_tokens < 1 or continuation_tokens < 1:
        raise ValueError(f"prefix_tokens and continuation_tokens must be >= 1, got "
                         f"{prefix_tokens}, {continuation_tokens}")
    start = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
    cases = []
    for i, text in enumerate(documents):
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        if len(ids) < prefix_tokens + max(1, continuation_tokens // 4):
            continue
        head, tail = ids[:prefix_tokens], ids[prefix_tokens:prefix_tokens + continuation_tokens]
        cases.append(VerbMemCase(i, tuple(start + head), tokenizer.decode(head),
                                 tokenizer.decode(tail)))
    return cases


def verbmem_score(cases: Sequence[VerbMemCase], outputs: Sequence[str]) -> float | None:
    """Mean ROUGE-L F1 of ``outputs`` against the cases' continuations (None: no case)."""
    if len(cases) != len(outputs):
        raise ValueError(f"{len(cases)} cases but {len(outputs)} outputs")
    if not cases:
        return None
    return sum(rouge_l_f1(o, c.gold) for c, o in zip(cases, outputs, strict=True)) / len(cases)


async def verbmem_api_async(base_url: str, api_key: str, cases: Sequence[VerbMemCase], *,
                            model: str | None = None,
                            max_tokens: int = DEFAULT_CONTINUATION_TOKENS,
                            concurrency: int = 8) -> list[str]:
    """Greedy continuations of ``cases`` from a server's ``/v1/completions`` (prompts
    as token ids). A failed request raises (the caller decides what a 4xx means)."""
    from openai import AsyncOpenAI

    url = base_url.rstrip("/")
    url = url if url.endswith("/v1") else url + "/v1"
    client = AsyncOpenAI(base_url=url, api_key=api_key, max_retries=2)
    try:
        name = model or (await client.models.list()).data[0].id
        sem = asyncio.Semaphore(concurrency)

        async def one(case: VerbMemCase) -> str:
            async with sem:
                r = await client.completions.create(
                    model=name, prompt=list(case.prompt_ids), max_tokens=max_tokens,
                    temperature=0.0)
            return r.choices[0].text or ""

        return list(await asyncio.gather(*(one(c) for c in cases)))
    finally:
        await client.close()


def verbmem_api(base_url: str, api_key: str, cases: Sequence[VerbMemCase],
                **options: Any) -> list[str]:
    """:func:`verbmem_api_async` from synchronous code."""
    return asyncio.run(verbmem_api_async(base_url, api_key, cases, **options))


def verbmem_local(model: Any, tokenizer: Any, cases: Sequence[VerbMemCase], *,
                  max_tokens: int = DEFAULT_CONTINUATION_TOKENS) -> list[str]:
    """Greedy continuations of ``cases`` from a transformers causal LM (one at a time:
    prompts differ in length and the models here are small)."""
    import torch

    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for case in cases:
                ids = torch.tensor([list(case.prompt_ids)], device=dev)
                gen = model.generate(ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=max_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id
                                     if tokenizer.pad_token_id is not None
                                     else tokenizer.eos_token_id)
                out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


def text_examples(tokenizer: Any, texts: Sequence[str], *, max_len: int = 256,
                  stride: int | None = None, bos: bool = True, eos: bool = True
                  ) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` language-modelling examples of ``texts``: each text's
    tokens (after a BOS, before an EOS: the model learns where a document ends) in
    windows of ``max_len`` every ``stride`` tokens (default: ``max_len``, no overlap),
    every token labelled. No chat template: a document is text, as a base model reads
    it in pre-training."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    stride = stride or max_len
    start = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
    end = [tokenizer.eos_token_id] if eos and tokenizer.eos_token_id is not None else []
    out = []
    for text in texts:
        ids = start + list(tokenizer.encode(text, add_special_tokens=False)) + end
        for lo in range(0, max(1, len(ids) - 1), stride):
            window = ids[lo:lo + max_len]
            if len(window) >= 2:
                out.append((window, list(window)))
            if lo + max_len >= len(ids):
                break
    return out


async def verbmem_report_async(base_url: str, api_key: str, tokenizer_dir: str | Path, *,
                               forget_documents: str | Path | None = None,
                               retain_documents: str | Path | None = None,
                               model: str | None = None,
                               prefix_tokens: int = DEFAULT_PREFIX_TOKENS,
                               continuation_tokens: int = DEFAULT_CONTINUATION_TOKENS,
                               concurrency: int = 8) -> dict[str, Any]:
    """VerbMem of one tenant through the server on the forget and retain documents
    (document files as :func:`unlearnd.inputs.load_documents` reads them):
    ``verbmem_forget``, ``verbmem_retain`` (None for a set not given) and ``verbmem``
    (per set: n, prefix/continuation tokens, and each document's score and output)."""
    from transformers import AutoTokenizer

    from unlearnd.inputs import load_documents

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    out: dict[str, Any] = {"verbmem_forget": None, "verbmem_retain": None, "verbmem": {}}
    for name, path in (("forget", forget_documents), ("retain", retain_documents)):
        if path is None:
            continue
        docs = [d.text for d in load_documents(path)]
        cases = verbmem_cases(tok, docs, prefix_tokens=prefix_tokens,
                              continuation_tokens=continuation_tokens)
        outputs = await verbmem_api_async(base_url, api_key, cases, model=model,
                                          max_tokens=continuation_tokens,
                                          concurrency=concurrency)
        out[f"verbmem_{name}"] = verbmem_score(cases, outputs)
        out["verbmem"][name] = {
            "n": len(cases), "prefix_tokens": prefix_tokens,
            "continuation_tokens": continuation_tokens,
            "cases": [{"document": c.source, "prompt": c.prompt, "gold": c.gold,
                       "output": o, "rouge_l_f1": rouge_l_f1(o, c.gold)}
                      for c, o in zip(cases, outputs, strict=True)]}
    return out
