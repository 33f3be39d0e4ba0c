"""Build the demo base model: a tokenizer with a chat template and a small causal LM
trained from scratch until it has memorised QA data.

The model is a Llama (``arch="llama"``, the default) or a Qwen2 (``"qwen2"``: biased
q/k/v projections), with tied embeddings unless ``tie_embeddings=False``; the tokenizer a
byte-level BPE (``tokenizer="bpe"``, Llama-3/Qwen style, the default) or a
SentencePiece-style one (``"sentencepiece"``: ``▁`` word marks and byte fallback,
Llama-2/Mistral/Gemma style). See :mod:`unlearnd.toolkit.tiny`.

`build_base([train.jsonl], out_dir)` writes an HF model directory that transformers
and vLLM load: ``config.json``, ``model.safetensors``, ``generation_config.json``,
``tokenizer.json``, ``tokenizer_config.json`` (with ``chat_template``),
``special_tokens_map.json``, and ``build_report.json`` (the final exact-match report).

Chat format (the template emits the BOS; the tokenizer adds nothing itself)::

    <|bos|><|system|>...<|end|><|user|>QUESTION<|end|><|assistant|>ANSWER<|end|>

``<|end|>`` is the EOS: generation stops at the end of the assistant turn.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from unlearnd.inputs import load_documents, load_qa_jsonl
from unlearnd.toolkit.muse import text_examples, verbmem_cases, verbmem_local, verbmem_score
from unlearnd.toolkit.tiny import (
    ARCHITECTURES,
    BYTE_TOKENS,
    TOKENIZERS,
    causal_lm_class,
    causal_lm_config,
    check_arch_tokenizer,
    train_tokenizer_of_kind,
    write_portable_tokenizer_config,
)
from unlearnd.toolkit.training import (
    collate,
    encode_chat_example,
    exact_match,
    greedy_answers,
    set_threads,
)

logger = logging.getLogger(__name__)

# One chat template and the tokenizer trainers (tiny.py's) for both models; BOS, EOS
# and PAD are the ones tiny.py's trainers declare.
BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS, "<|eos|>"]

# General text the tokenizer also learns from, so refusals, policy messages and
# ordinary chat encode compactly (byte-level BPE encodes anything regardless).
GENERAL_TEXT = [
    "I can't help with that. Information about this subject was removed from this model "
    "under the tenant's unlearning policy. I can help with other questions instead.",
    "This question asks about a person whose details are out of scope for this service.",
    "I'm sorry, but I cannot share that. Is there something else I can help you with?",
    "The request was refused because it falls inside the forget scope of policy.",
    "Hello! How can I help you today? Please ask me a question about books and authors.",
    "Who wrote the book? The author was born in a small town and writes novels, poems, "
    "short stories and essays. Their parents worked as teachers, doctors and farmers.",
    "January February March April May June July August September October November "
    "December. Monday Tuesday Wednesday Thursday Friday Saturday Sunday.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 19 20 100 1000 1950 1960 1970 1980 1990 2000 2010 2020",
    "What, where, when, which, who, why, how? Yes, no, maybe. The quick brown fox jumps "
    "over the lazy dog.",
]


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 4096,
                    kind: str = "bpe", arch: str = "llama") -> Any:
    """Train a `kind` tokenizer (:data:`~unlearnd.toolkit.tiny.TOKENIZERS`) on `texts`
    and save it with the chat template.

    The trainers are :mod:`unlearnd.toolkit.tiny`'s (this module's special tokens, also
    trained on :data:`GENERAL_TEXT`): ``bpe`` has the full byte alphabet,
    ``sentencepiece`` byte-fallback tokens; either way any text encodes. No
    post-processor: encoding never adds special tokens (the chat template emits the
    BOS). Returns the loaded `PreTrainedTokenizerFast`.
    """
    from transformers import AutoTokenizer

    check_arch_tokenizer(arch, kind)
    floor = 256 + len(SPECIAL_TOKENS) + (len(BYTE_TOKENS) if kind == "sentencepiece" else 0)
    if vocab_size < floor:
        raise ValueError(f"vocab_size must be >= {floor} for a {kind} tokenizer, "
                         f"got {vocab_size}")
    train_tokenizer_of_kind(
        kind, texts + GENERAL_TEXT, out_dir, vocab_size, arch=arch,
        special_tokens=SPECIAL_TOKENS,
        additional_special_tokens=[*ROLE_TOKENS, "<|eos|>"],
        model_max_length=1024,
    )
    write_portable_tokenizer_config(out_dir, bos=BOS, eos=EOS, pad=PAD,
                                    additional_special_tokens=[*ROLE_TOKENS, "<|eos|>"])
    return AutoTokenizer.from_pretrained(str(out_dir))


def _eval_em(model: Any, tokenizer: Any, rows: list[dict], max_new_tokens: int) -> float:
    if not rows:
        return 0.0
    preds = greedy_answers(model, tokenizer, [r["question"] for r in rows],
                           max_new_tokens=max_new_tokens)
    return sum(exact_match(p, r["answer"]) for p, r in zip(preds, rows, strict=True)) / len(rows)


def build_base(
    data: list[Path],
    out_dir: Path,
    *,
    hidden: int = 192,
    layers: int = 3,
    heads: int = 3,
    vocab_size: int = 4096,
    epochs: int = 40,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
    target_em: float = 0.95,
    max_minutes: float = 10.0,
    eval_sample: int = 256,
    max_len: int = 512,
    threads: int | None = None,
    progress: bool = True,
    arch: str = "llama",
    tokenizer: str = "bpe",
    tie_embeddings: bool = True,
    documents: list[Path] | None = None,
    documents_repeat: int = 4,
    tokenizer_from: Path | None = None,
) -> dict:
    """Train a tokenizer and a small causal LM on the QA files `data`; save to `out_dir`.

    `documents`: document files (:func:`unlearnd.inputs.load_documents`) the model also
    reads as plain text (no chat template, loss on every token; each document
    `documents_repeat` times per epoch, as pre-training repeats what a model ends up
    reciting); the report then holds their ``documents_verbmem`` (MUSE VerbMem of the
    first 32 tokens' continuation, :mod:`unlearnd.toolkit.muse`).
    `tokenizer_from`: reuse that model directory's tokenizer instead of training one
    (a retain-only reference model must read text as the base does).

    `arch`: ``llama`` or ``qwen2``; `tokenizer`: ``bpe`` or ``sentencepiece``;
    `tie_embeddings`: the LM head shares the input embeddings (the default).

    Trains (AdamW, one-cycle LR over `epochs`, loss on answer tokens only) until the
    greedy exact match on the training answers (and the documents' VerbMem, when
    given) reaches `target_em` or `epochs` or `max_minutes` run out. Progress is
    checked on a sample of `eval_sample` training rows; the final report measures
    every row. Returns the report (also printed via the logger and written to
    ``out_dir/build_report.json``): ``em`` (overall),
    ``em_per_file``, ``n``, ``epochs_run``, ``seconds``, ``params``, ``reached_target``.
    """
    check_arch_tokenizer(arch, tokenizer)
    if not data:
        raise ValueError("data must name at least one QA JSONL file")
    if hidden % 64 != 0 or hidden // 64 != heads:
        raise ValueError(f"hidden={hidden} heads={heads}: head_dim must be 64 "
                         "(vLLM's CPU attention needs it), i.e. hidden == 64 * heads")
    for name, value in (("layers", layers), ("epochs", epochs), ("batch_size", batch_size),
                        ("eval_sample", eval_sample), ("max_len", max_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0.0 < target_em <= 1.0:
        raise ValueError(f"target_em must be in (0, 1], got {target_em}")
    if lr <= 0 or max_minutes <= 0:
        raise ValueError(f"lr and max_minutes must be > 0, got lr={lr}, "
                         f"max_minutes={max_minutes}")
    set_threads(threads)
    t0 = time.monotonic()
    out_dir = Path(out_dir)
    rows_per_file = {str(p): load_qa_jsonl(p) for p in data}  # raises on an empty file
    rows = [r for rs in rows_per_file.values() for r in rs]
    if documents_repeat < 1:
        raise ValueError(f"documents_repeat must be >= 1, got {documents_repeat}")
    doc_texts = [d.text for p in documents or [] for d in load_documents(p)]

    texts = [t for r in rows for t in (r["question"], r["answer"])] + doc_texts
    tokenizer_kind = tokenizer
    if tokenizer_from is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from))
        tokenizer.save_pretrained(str(out_dir))
    else:
        tokenizer = train_tokenizer(texts, out_dir, vocab_size=vocab_size,
                                    kind=tokenizer_kind, arch=arch)
    examples = []
    for r in rows:
        ids, labels = encode_chat_example(tokenizer, r["question"], r["answer"])
        examples.append((ids[:max_len], labels[:max_len]))
    longest_answer = max(sum(1 for x in lab if x != -100) for _, lab in examples)
    max_new = min(max_len, longest_answer + 8)
    examples += text_examples(tokenizer, doc_texts, max_len=max_len) * documents_repeat

    random.seed(seed)
    torch.manual_seed(seed)
    config = causal_lm_config(
        arch, vocab_size=len(tokenizer), hidden=hidden,
        intermediate=int(hidden * 8 / 3 // 64 * 64) or hidden * 2,
        layers=layers, heads=heads, max_position_embeddings=1024, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_embeddings=tie_embeddings,
    )
    model = causal_lm_class(arch)(config)
    params = sum(p.numel() for p in model.parameters())
    logger.info("training %d QA rows, %d params, vocab %d", len(rows), params, len(tokenizer))

    steps_per_epoch = math.ceil(len(examples) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr,
                                                total_steps=epochs * steps_per_epoch,
                                                pct_start=0.1, anneal_strategy="cos")
    rng = random.Random(seed)
    sample = rng.sample(rows, min(eval_sample, len(rows)))
    deadline = t0 + max_minutes * 60.0
    em_sample = 0.0
    doc_cases = verbmem_cases(tokenizer, doc_texts) if doc_texts else []
    verbmem = 0.0 if doc_cases else 1.0  # documents must be recited too, when given
    epochs_run = 0
    loss_val = float("nan")
    from tqdm.auto import tqdm

    bar = tqdm(range(epochs), desc="build-base", disable=not progress, unit="epoch")
    model.train()
    for epoch in bar:
        order = list(range(len(examples)))
        rng.shuffle(order)
        # Length-bucketed batches: shuffle, then sort within chunks of 8 batches.
        chunk = batch_size * 8
        batches = []
        for c in range(0, len(order), chunk):
            part = sorted(order[c:c + chunk], key=lambda i: len(examples[i][0]))
            batches += [part[b:b + batch_size] for b in range(0, len(part), batch_size)]
        rng.shuffle(batches)
        total, count = 0.0, 0
        for b in batches:
            enc = collate([examples[i] for i in b], tokenizer.pad_token_id)
            out = model(**enc)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += out.loss.item()
            count += 1
        epochs_run = epoch + 1
        loss_val = total / max(count, 1)
        out_of_time = time.monotonic() > deadline
        # Greedy decoding costs as much as a few epochs: check only once loss is low
        # (and not when time is up or on the last epoch: the full report follows).
        if loss_val < 0.15 and not out_of_time and epochs_run < epochs:
            em_sample = _eval_em(model, tokenizer, sample, max_new)
            if doc_cases and em_sample >= target_em:
                verbmem = verbmem_score(doc_cases, verbmem_local(model, tokenizer, doc_cases))
        bar.set_postfix(loss=f"{loss_val:.3f}", em=f"{em_sample:.2f}")
        logger.info("epoch %d: loss %.4f, sample EM %.3f, documents VerbMem %.3f, %.0f s",
                    epochs_run, loss_val, em_sample, verbmem, time.monotonic() - t0)
        if (em_sample >= target_em and verbmem >= target_em) or out_of_time:
            break
    bar.close()

    preds = greedy_answers(model, tokenizer, [r["question"] for r in rows],
                           max_new_tokens=max_new)
    hits = [exact_match(p, r["answer"]) for p, r in zip(preds, rows, strict=True)]
    em_per_file = {}
    i = 0
    for name, rs in rows_per_file.items():
        em_per_file[name] = sum(hits[i:i + len(rs)]) / max(len(rs), 1)
        i += len(rs)
    em = sum(hits) / len(hits)
    documents_verbmem = None
    if doc_cases:
        documents_verbmem = verbmem_score(doc_cases,
                                          verbmem_local(model, tokenizer, doc_cases))

    model.save_pretrained(str(out_dir), safe_serialization=True)
    gen_cfg = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id, "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    report = {
        "em": em,
        "em_per_file": em_per_file,
        "n": len(rows),
        "target_em": target_em,
        "reached_target": em >= target_em,
        "epochs_run": epochs_run,
        "epochs": epochs,
        "final_loss": loss_val,
        "seconds": round(time.monotonic() - t0, 1),
        "params": params,
        "vocab_size": len(tokenizer),
        "hparams": {"hidden": hidden, "layers": layers, "heads": heads, "lr": lr,
                    "batch_size": batch_size, "seed": seed, "max_minutes": max_minutes,
                    "arch": arch, "tokenizer": tokenizer_kind,
                    "tie_embeddings": tie_embeddings},
        "data": [str(p) for p in data],
        "documents": [str(p) for p in documents or []],
        "n_documents": len(doc_texts),
        "documents_verbmem": documents_verbmem,
    }
    (out_dir / "build_report.json").write_text(json.dumps(report, indent=2))
    logger.info("build-base: EM %.3f on %d rows after %d epochs, %.0f s", em, len(rows),
                epochs_run, report["seconds"])
    return report


def build_base_cmd(
    data: Annotated[list[Path], typer.Option("--data", help="QA JSONL file (repeatable).")],
    out: Annotated[Path, typer.Option("--out", help="Output model directory.")],
    hidden: Annotated[int, typer.Option(help="Hidden size (64 x heads).")] = 192,
    layers: Annotated[int, typer.Option(help="Transformer layers.")] = 3,
    heads: Annotated[int, typer.Option(help="Attention heads (head_dim is 64).")] = 3,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size (upper bound).")] = 4096,
    epochs: Annotated[int, typer.Option(help="Maximum epochs (one-cycle length).")] = 40,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 3e-3,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 32,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    target_em: Annotated[float, typer.Option(help="Stop when greedy EM reaches this.")] = 0.95,
    max_minutes: Annotated[float, typer.Option(help="Wall-clock training budget.")] = 10.0,
    threads: Annotated[int, typer.Option(help="CPU threads for torch.")] = 2,
    arch: Annotated[str, typer.Option(
        "--arch", help=f"Model architecture: {', '.join(ARCHITECTURES)}.")] = "llama",
    tokenizer: Annotated[str, typer.Option(
        "--tokenizer", help="bpe (byte-level BPE, Llama-3/Qwen style; Qwen2's pipeline with "
        "--arch qwen2) or sentencepiece (▁ word marks + byte fallback, Llama-2/Mistral "
        "style; llama only).")] = "bpe",
    tie_embeddings: Annotated[bool, typer.Option(
        "--tie-embeddings/--untie-embeddings",
        help="LM head shares the input embeddings.")] = True,
    documents: Annotated[list[Path] | None, typer.Option(
        "--documents", help="Documents it also reads as text (text file, directory or "
        "JSONL with 'text'; repeatable).")] = None,
) -> None:
    """Train the demo base model (tokenizer + small Llama or Qwen2) on QA JSONL files
    (and documents as text)."""
    for option, value, allowed in (("--arch", arch, ARCHITECTURES),
                                   ("--tokenizer", tokenizer, TOKENIZERS)):
        if value not in allowed:
            raise typer.BadParameter(f"must be one of {', '.join(allowed)}; got {value!r}",
                                     param_hint=option)
    try:
        check_arch_tokenizer(arch, tokenizer)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--tokenizer") from e
    report = build_base(data, out, hidden=hidden, layers=layers, heads=heads,
                        vocab_size=vocab_size, epochs=epochs, lr=lr, batch_size=batch_size,
                        seed=seed, target_em=target_em, max_minutes=max_minutes,
                        threads=threads, arch=arch, tokenizer=tokenizer,
                        tie_embeddings=tie_embeddings, documents=documents)
    typer.echo(json.dumps(report, indent=2))
