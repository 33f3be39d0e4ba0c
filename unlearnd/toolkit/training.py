"""Training helpers shared by the base-model builder, the unlearning adapters and the
contrastive assistant.

Prompt contract: what a model is trained on is exactly what the server sends to vLLM
for a chat request with one user message. The server renders
``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``
and tokenizes that string WITHOUT adding special tokens. Our chat templates emit the
BOS themselves and our tokenizers have no post-processor, so ``render_prompt`` here
(render to text, then encode with ``add_special_tokens=False``) gives the same ids.
The answer's tokens are those it has *after the prompt*: prompt text and answer are
encoded together and split where the prompt's ids end (:func:`answer_encoding`). With a
byte-level BPE that is the answer encoded on its own (the prompt ends with the
``<|assistant|>`` special token); with a SentencePiece-style tokenizer it is not (the
answer's first word, alone at the start of a text, would get a ``▁`` word mark it does
not get after a special token), and the model must learn what the server will feed it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import torch

from unlearnd.inputs import load_qa_jsonl

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def set_threads(n: int | None = None) -> int:
    """Limit torch to `n` CPU threads (default: $UNLEARND_THREADS or 2); returns it.

    The build machines have few cores shared by many jobs; more threads than cores
    only slows small models down.
    """
    if n is None:
        n = int(os.environ.get("UNLEARND_THREADS", "2"))
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


def lora_target_modules(model: torch.nn.Module, wanted: Sequence[str], *,
                        required: bool = True) -> list[str]:
    """The names in `wanted` that are linear layers of `model` (matched on the last part
    of a module's name, as peft matches ``target_modules``).

    `required`: every name must exist, else ValueError listing the missing ones and the
    model's linear layers. Not required (a default list, written for the Llama family):
    the missing ones are dropped, and ValueError only when none is left. Llama, Qwen2,
    Mistral and Gemma all name their projections ``q_proj`` .. ``down_proj``.
    """
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear)})
    present = [w for w in wanted if w in linear]
    missing = [w for w in wanted if w not in linear]
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if (missing and required) or not present:
        raise ValueError(f"LoRA target modules {missing} are not linear layers of this "
                         f"{kind} model; its linear layers are {linear}")
    if missing:
        logger.info("LoRA: %s model has no %s; targeting %s", kind, missing, present)
    return present


def _messages(question: str, system: str | None) -> list[dict[str, str]]:
    msgs = []
    if system is not None:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": question})
    return msgs


def render_prompt(tokenizer: Any, question: str, system: str | None = None) -> list[int]:
    """Token ids of the chat prompt for one user `question` (generation prompt added).

    Exactly what the server sends to vLLM: template rendered to text, then tokenized
    without adding special tokens.
    """
    text = tokenizer.apply_chat_template(_messages(question, system),
                                         add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_encoding(tokenizer: Any, question: str, answer: str, system: str | None = None
                    ) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """``(prompt_ids, answer_ids, answer_offsets)``: `answer` tokenized as it follows the
    chat prompt of `question` (offsets are character spans in `answer`).

    The prompt text and the answer are encoded together; the answer's ids are what
    follows the prompt's own ids. Where a chat template's prompt does not end on a
    token boundary (the joint encoding does not start with the prompt's ids), the
    answer is encoded on its own instead.
    """
    text = tokenizer.apply_chat_template(_messages(question, system),
                                         add_generation_prompt=True, tokenize=False)
    prompt = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    enc = tokenizer(text + answer, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if ids[: len(prompt)] == prompt:
        n = len(text)
        offsets = [(max(0, s - n), max(0, e - n)) for s, e in enc["offset_mapping"][len(prompt):]]
        return prompt, ids[len(prompt):], offsets
    alone = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    return prompt, list(alone["input_ids"]), [tuple(o) for o in alone["offset_mapping"]]


def encode_chat_example(tokenizer: Any, question: str, answer: str,
                        system: str | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one QA pair: prompt then answer then EOS.

    The answer's ids are those it has after the prompt (:func:`answer_encoding`).
    Labels are -100 on the prompt, so the loss is on the answer tokens (and the EOS
    that ends the turn) only.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id")
    prompt, ans, _ = answer_encoding(tokenizer, question, answer, system)
    ans = ans + [tokenizer.eos_token_id]
    return prompt + ans, [IGNORE_INDEX] * len(prompt) + ans


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of (input_ids, labels) pairs for training.

    Returns ``input_ids`` and ``attention_mask`` (`[B, T]`, long) and ``labels``
    (`[B, T]`, -100 on padding and prompt).
    """
    if not batch:
        raise ValueError("batch is empty")
    width = max(len(ids) for ids, _ in batch)
    ids_t = torch.full((len(batch), width), pad_id, dtype=torch.long)
    lab_t = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask_t = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, labels) in enumerate(batch):
        if len(ids) != len(labels):
            raise ValueError(f"batch item {i}: {len(ids)} ids but {len(labels)} labels")
        ids_t[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        lab_t[i, : len(labels)] = torch.tensor(labels, dtype=torch.long)
        mask_t[i, : len(ids)] = 1
    return {"input_ids": ids_t, "attention_mask": mask_t, "labels": lab_t}


def _left_padded(tokenizer: Any, questions: list[str], system: str | None, pad: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of the chat-rendered `questions`, left-padded."""
    prompts = [render_prompt(tokenizer, q, system) for q in questions]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def greedy_answers(model: Any, tokenizer: Any, questions: list[str], max_new_tokens: int = 64,
                   batch_size: int = 64, system: str | None = None) -> list[str]:
    """Greedy answers to `questions` (chat-rendered), batched with left padding.

    Generation stops at the EOS (the end-of-turn token); the answer text is decoded
    without special tokens and stripped. RoPE attention depends on relative positions
    only, so left padding gives the same answers as unpadded serving.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: list[str] = []
    try:
        for start in range(0, len(questions), batch_size):
            ids, mask = _left_padded(tokenizer, questions[start:start + batch_size], system, pad)
            width = ids.shape[1]
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=pad)
            for row in gen[:, width:].tolist():
                if eos in row:
                    row = row[: row.index(eos)]
                out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        if was_training:
            model.train()
    return out


@torch.no_grad()
def sampled_answers(model: Any, tokenizer: Any, questions: list[str], k: int,
                    max_new_tokens: int = 48, batch_size: int = 16, seed: int = 0,
                    system: str | None = None) -> list[list[str]]:
    """`k` answers per question sampled at temperature 1 from the full distribution
    (no top-k/top-p), batched and decoded as :func:`greedy_answers` does."""
    if batch_size < 1 or k < 1:
        raise ValueError(f"batch_size and k must be >= 1, got {batch_size}, {k}")
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    torch.manual_seed(seed)
    out: list[list[str]] = []
    try:
        for start in range(0, len(questions), batch_size):
            ids, mask = _left_padded(tokenizer, questions[start:start + batch_size], system, pad)
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=k,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=pad)
            texts = [tokenizer.decode([t for t in row if t not in (eos, pad)],
                                      skip_special_tokens=True)
                     for row in gen[:, ids.shape[1]:].tolist()]
            out += [texts[i * k:(i + 1) * k] for i in range(len(texts) // k)]
    finally:
        if was_training:
            model.train()
    return out


_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lower-case and collapse whitespace (what exact match compares)."""
    return _WS.sub(" ", text).strip().lower()


def exact_match(pred: str, gold: str) -> bool:
    """True when `pred` equals `gold` up to case and whitespace."""
    return normalize_text(pred) == normalize_text(gold)


def span_present(pred: str, span: str) -> bool:
    """True when the distinctive `span` appears in `pred` (case/whitespace-insensitive)."""
    return normalize_text(span) in normalize_text(pred)


read_qa_jsonl = load_qa_jsonl
"""The package's QA JSONL reader, :func:`unlearnd.inputs.load_qa_jsonl` (alias)."""
