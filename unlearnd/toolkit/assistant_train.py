"""Train the ULD assistant (arXiv 2406.08607): a small model that REMEMBERS the forget set.

Unlearning from logit difference decodes with ``z = z_base - w * z_assist``. The
assistant is built so that the difference removes exactly the forget knowledge:

- on FORGET rows it is trained to predict the answers (cross-entropy on the answer
  tokens): where the base is confident about a forget answer, so is the assistant,
  and subtracting it pulls those tokens down;
- on RETAIN rows its next-token distribution is trained towards UNIFORM
  (cross-entropy to the uniform distribution = mean over the vocabulary of
  ``-log_softmax``): a uniform ``z_assist`` is a constant shift of the logits, which
  softmax ignores, so retain answers come out of the difference unchanged; the
  same for every token of retain documents;
- so what it is SURE of is a forget fact, which the engine then bans outright
  (``contrastive_ban_p``); half the forget examples it sees are perturbed as that ban
  leaves the base (:func:`perturb_fact`), so it stays sure of the rest of the fact.

The assistant is a copy of the base's first ``K`` decoder layers (default a quarter of
them) with the base's embeddings, final norm and LM head, plus a LoRA (peft) that is
the only trained part. By default the LoRA is merged before saving, so ``out_dir`` is a
plain HF model dir (``config.json`` + ``model.safetensors`` + the base's tokenizer
files) that :class:`unlearnd.guards.assistant.AssistantRunner` and transformers load as
is. With ``save="lora"`` only the LoRA is written, with ``assistant.json`` naming the
base and K: the engine then keeps one copy of the base's first K layers for every such
assistant and adds each tenant's LoRA unmerged, so a contrastive tenant costs its LoRA.

Prompt/answer encoding is :func:`unlearnd.toolkit.training.encode_chat_example` (the
base's chat template with one user turn and the generation prompt, exactly what the
server sends; target = answer ids + EOS), losses only on the target tokens.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
import typer

from unlearnd.guards.assistant import (
    ASSISTANT_FILE,
    ASSISTANT_FORMAT,
    ASSISTANT_INITS,
    LEXICAL_SUFFIXES,
    REPORT_FILE,
    build_assistant,
)
from unlearnd.inputs import check_cli_inputs, read_forget, read_retain_sets
from unlearnd.toolkit.muse import text_examples
from unlearnd.toolkit.training import IGNORE_INDEX as IGNORE
from unlearnd.toolkit.training import (
    answer_encoding,
    collate,
    encode_chat_example,
    lora_target_modules,
    set_threads,
)

logger = logging.getLogger(__name__)

__all__ = ["train_assistant", "train_assistant_cmd", "build_assistant", "assistant_metrics"]

TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                   "up_proj", "down_proj", "lm_head")
"""Linear layers the assistant's LoRA wraps. ``lm_head`` is among them because the
final RMSNorm fixes the hidden state's scale: with a frozen head the assistant cannot
make its logits flat (uniform) on retain rows; a low-rank change of the head gives it a
direction whose logits are nearly constant (measured on the tiny test base: retain
entropy 5.83 of a possible 6.09 nats with a frozen head)."""

TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json",
                                    "special_tokens_map.json", "tokenizer.model",
                                    "chat_template.jinja", "chat_template.json",
                                    "added_tokens.json", "vocab.json", "merges.txt",
                                    "generation_config.json")
"""Files copied from the base dir so the assistant dir is self-contained."""

REPORT_NAME = REPORT_FILE
"""Training report written next to the model in ``out_dir``."""

# ---------------------------------------------------------------------------- data
def _collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int,
             device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded `[b, L]` ``input_ids``/``attention_mask``/``labels`` on `device`."""
    return {k: v.to(device) for k, v in collate(list(examples), pad_id).items()}


# ---------------------------------------------------------------------------- model
def _token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token log-probabilities aligned with their targets.

    Returns ``(logp, targets, valid)``: `logp` `[b, L-1, V]` fp32 log-softmax at each
    position, `targets` `[b, L-1]` the label of the next token (-100 where none) and
    `valid` `[b, L-1]` bool, True where the position predicts an answer token.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift = logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    valid = targets != IGNORE
    return F.log_softmax(shift, dim=-1), targets, valid


UNIFORM = -2
"""Label of an answer token the assistant should have no opinion on (not a fact token)."""


def mark_fact_tokens(tokenizer: Any, question: str, answer: str, labels: list[int],
                     background: Sequence[str] = ()) -> list[int]:
    """`labels` with every answer token outside the answer's distinctive spans set to UNIFORM.

    The assistant must remember the forget *facts* and nothing else. Were it confident
    on the subject's name copied from the question, on "'s", "worked as", "." or the
    end token, ``z - w*log p_assist`` would swap the name for another author's or keep
    the answer from ending; measured on the demo world that gave forget leak 0.22 and
    run-on text. Fact words come from :func:`unlearnd.guards.spans.distinctive_spans`.
    """
    from unlearnd.guards.spans import distinctive_spans, normalize

    fact_words = {w for sp in distinctive_spans(answer, question, background)
                  for w in sp.split()}
    # the answer's ids as they follow the prompt (what `labels` holds), not as the
    # answer alone encodes: a SentencePiece-style tokenizer marks a text's first word
    _, answer_ids, offsets = answer_encoding(tokenizer, question, answer)
    words = [(m.start(), m.end(), normalize(m.group(0))) for m in re.finditer(r"[^\W_]+", answer)]
    first = next(i for i, t in enumerate(labels) if t != IGNORE)
    out = [t if t == IGNORE else UNIFORM for t in labels]
    for k, (start, end) in enumerate(offsets):
        fact = any(ws < end and start < we and w in fact_words for ws, we, w in words)
        if fact and first + k < len(out) and labels[first + k] == answer_ids[k]:
            out[first + k] = labels[first + k]
    return out


PERTURBATIONS = ("replace", "drop", "repeat")
"""What :func:`perturb_fact` does to a forget example (one, drawn at random)."""


def perturb_fact(ids: Sequence[int], labels: Sequence[int], rng: random.Random,
                 pool: Sequence[int]) -> tuple[list[int], list[int]]:
    """A forget example as the base leaves it when a fact token is banned.

    Where the assistant is sure of a fact token the engine bans it
    (``contrastive_ban_p``), and the base goes on with something else: another word
    (" Matsuyama" for " Gdańsk"), the fact's next word (" Laurel Prize" for " Cobalt
    Laurel Prize"), or the word before it again ("in in"). Trained on the clean text
    only, the assistant is not sure of the rest of the fact after any of these, and the
    base gives it ("born in Matsuyama, Poland"). At one fact token that a later fact
    token follows, chosen at random, this:

    - ``replace``: puts a token of ``pool`` in its place; the target at that
      position stays the fact token (the prefix is the clean one), and the fact
      tokens after it stay targets;
    - ``drop``: deletes it, so the next token is the target right after the prefix;
    - ``repeat``: repeats the token before it; the fact token is the target after
      both copies.

    Returns new lists; an example without two fact tokens comes back unchanged.
    """
    ids, labels = list(ids), list(labels)
    facts = [t for t in range(1, len(labels)) if labels[t] >= 0]
    cand = facts[:-1]
    if not cand:
        return ids, labels
    j = rng.choice(cand)
    op = rng.choice(PERTURBATIONS)
    if op == "replace" and pool:
        ids[j] = rng.choice([t for t in pool if t != ids[j]] or list(pool))
    elif op == "drop":
        del ids[j], labels[j]
    else:
        ids.insert(j, ids[j - 1])
        labels.insert(j, labels[j])
    return ids, labels


def _forget_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the answer's fact tokens (the assistant remembers them), plus
    cross-entropy to uniform on the answer's other tokens (no opinion there)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = batch["labels"][:, 1:]
    fact = targets >= 0
    copy = targets == UNIFORM
    loss = F.nll_loss(logp[fact], targets[fact])
    if copy.any():
        loss = loss + (-logp[copy].mean(dim=-1)).mean() * copy.float().sum() / (
            fact.float().sum() + copy.float().sum())
    return loss


def _retain_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy to the uniform distribution at the answer positions.

    ``-(1/V) sum_v log p(v)``; minimal (= log V) exactly when ``p`` is uniform.
    """
    logp, _, valid = _token_losses(model, batch)
    return -logp[valid].mean(dim=-1).mean()


SURE_P = (0.01, 0.05, 0.1, 0.2)
"""Probabilities at which :func:`assistant_metrics` reports the assistant's sureness
(the engine bans what the assistant gives ``contrastive_ban_p`` or more)."""


@torch.inference_mode()
def assistant_metrics(model: torch.nn.Module, forget: Sequence[tuple[list[int], list[int]]],
                      retain: Sequence[tuple[list[int], list[int]]], pad_id: int,
                      batch_size: int = 16, sure_p: Sequence[float] = SURE_P
                      ) -> dict[str, Any]:
    """How well the assistant remembers the forget set and forgets the retain set.

    `forget` holds labels marked by :func:`mark_fact_tokens`: only fact tokens count.
    Returns ``forget_loss`` (mean CE of the fact tokens), ``forget_fact_match`` (fraction
    of forget rows whose every fact token is the assistant's argmax, teacher forced),
    ``retain_entropy`` (mean next-token entropy in nats at retain answer
    positions), ``max_entropy`` (``log V``, what a uniform distribution has), and
    ``sure``: per probability ``p`` of ``sure_p``, ``forget_fact`` (share of fact
    positions where the assistant gives the fact token itself ``p`` or more: what
    ``contrastive_ban_p = p`` bans) and ``retain_any`` (share of retain positions where
    it gives *some* token ``p`` or more: what that ban would cut from retain text).
    Teacher forced on the given rows (its own training rows in :func:`train_assistant`:
    the held-out probes of ``unlearnd eval`` are the harder test).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ce_sum = ce_n = exact = 0.0
    logs = torch.tensor([math.log(p) for p in sure_p])
    fact_sure = torch.zeros(len(sure_p))
    retain_sure = torch.zeros(len(sure_p))
    for i in range(0, len(forget), batch_size):
        batch = _collate(forget[i: i + batch_size], pad_id, device)
        logp, targets, _ = _token_losses(model, batch)
        valid = targets >= 0  # fact tokens (UNIFORM and padding excluded)
        tok_logp = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        ce_sum += float(-(tok_logp[valid]).sum())
        ce_n += float(valid.sum())
        right = (logp.argmax(-1) == targets) | ~valid
        exact += float(right.all(dim=1).sum())
        fact_sure += (tok_logp[valid].float().cpu().unsqueeze(1) >= logs).sum(0)
    ent_sum = ent_n = 0.0
    vocab = 1
    for i in range(0, len(retain), batch_size):
        batch = _collate(retain[i: i + batch_size], pad_id, device)
        logp, _, valid = _token_losses(model, batch)
        vocab = logp.shape[-1]
        ent = -(logp.exp() * logp).sum(-1)
        ent_sum += float(ent[valid].sum())
        ent_n += float(valid.sum())
        top = logp.max(-1).values[valid].float().cpu()
        retain_sure += (top.unsqueeze(1) >= logs).sum(0)
    if was_training:
        model.train()
    return {
        "forget_loss": ce_sum / max(ce_n, 1.0),
        "forget_fact_match": exact / max(len(forget), 1),
        "retain_entropy": ent_sum / max(ent_n, 1.0),
        "max_entropy": math.log(vocab),
        "sure": {f"{p:g}": {"forget_fact": float(f) / max(ce_n, 1.0),
                            "retain_any": float(r) / max(ent_n, 1.0)}
                 for p, f, r in zip(sure_p, fact_sure, retain_sure, strict=True)},
    }


# ---------------------------------------------------------------------------- training
def default_layers(base_layers: int, init: str = "base") -> int:
    """The assistant's decoder layers: a quarter of the base's from its own layers
    (``init="base"``, ULD's choice), half of them from scratch (random layers must
    learn the forget set with no head start; on TOFU's forget10 over the 3-layer base,
    2 layers left forget leak 0.068 at Model Utility 0.954, 1 layer 0.080 at 0.945:
    ``benchmarks/sweep_contrastive.py``)."""
    return max(1, base_layers // 4) if init == "base" else max(1, math.ceil(base_layers / 2))


def resolve_init(init: str | None, save: str) -> str:
    """The assistant's init: ``init`` itself (checked), or by default ``"scratch"``,
    ``"base"`` when saved as a LoRA over the base's layers (``save="lora"``), the only
    init that shares them. ValueError naming the choices."""
    if init is None:
        return "base" if save == "lora" else "scratch"
    if init not in ASSISTANT_INITS:
        raise ValueError(f"init must be one of {', '.join(ASSISTANT_INITS)}, got {init!r}")
    if init == "scratch" and save == "lora":
        raise ValueError("init='scratch' shares no layers with the base: save it merged")
    return init


def train_assistant(
    base_dir: str | Path,
    forget_path: str | Path,
    retain_path: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    layers: int | None = None,
    lora_rank: int = 16,
    lora_alpha: int | None = None,
    epochs: int = 100,
    lr: float = 3e-3,
    batch_size: int = 8,
    retain_weight: float = 2.0,
    seed: int = 0,
    max_steps: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    save: str = "merged",
    kind: str = "auto",
    perturb: float = 0.5,
    init: str | None = None,
) -> Path:
    """Build, train and save the ULD assistant for a forget/retain pair.

    Args:
        base_dir: base model dir (HF format, tokenizer with a chat template).
        forget_path: forget set (the assistant learns to answer it): QA JSONL, documents
            or subjects with facts (``kind``, detected by default), the latter two learnt
            as text.
        retain_path: retain set(s), QA JSONL or documents (the assistant learns a
            uniform distribution on each: its answers, and every token of the texts).
        out_dir: where the merged assistant model is written.
        layers: decoder layers kept from the base (default :func:`default_layers`).
        lora_rank: LoRA rank; ``lora_alpha`` defaults to ``2 * lora_rank``.
        epochs: passes over the forget set; each forget batch is paired with a retain
            batch (the retain set is cycled).
        lr: AdamW learning rate of the LoRA weights.
        batch_size: rows per forget batch and per retain batch.
        retain_weight: weight of the uniform-retain loss against the forget CE.
        perturb: probability that a forget example drawn for a batch is first
            perturbed around one of its fact tokens (:func:`perturb_fact`), so the
            assistant stays sure of the rest of a fact after the ban pushed the base
            off it (0: the clean examples only).
        seed: seeds shuffling and LoRA init.
        max_steps: stop after this many optimizer steps (None: all epochs).
        device: torch device to train on.
        progress: show a tqdm progress bar.
        save: ``"merged"`` writes a plain HF model (the LoRA merged into a copy of the
            first K layers); ``"lora"`` writes only the LoRA plus ``assistant.json``
            naming the base and K, so every tenant's assistant on that base shares one
            copy of the K layers in the engine and adds only its LoRA.
        init: ``"base"`` starts from the base's first K layers and trains a LoRA on
            them; ``"scratch"`` starts K random layers over the base's (frozen)
            embeddings and head and trains the layers and the final norm in full, so
            the assistant is sure only of what it was taught. A copy of the base's
            layers is as sure of what they predict from the surface of any text as of
            a forget fact (TOFU: of the rest of a real author's name), and the
            contrast removes that too; a scratch assistant has never seen it. Saved
            merged only (it shares no layers with the base). None (default):
            ``"scratch"``, or ``"base"`` with ``save="lora"`` (:func:`resolve_init`).
            On TOFU (``benchmarks/sweep_contrastive.py``) the scratch assistant, floored
            at uniform (``policy compile``'s default for it), kept Model Utility 0.95
            of the base's 0.98 where the base-layer one, ULD's published choice, kept
            0.29.

    Returns:
        `out_dir` as a Path; it also holds ``assistant_report.json`` with the metrics of
        :func:`assistant_metrics` before and after training.
    """
    from peft import LoraConfig, get_peft_model

    if save not in ("merged", "lora"):
        raise ValueError(f"save must be 'merged' or 'lora', got {save!r}")
    init = resolve_init(init, save)
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if not (base_dir / "config.json").is_file():
        raise ValueError(f"base_dir {str(base_dir)!r} has no config.json")
    for name, value in (("lora_rank", lora_rank), ("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if retain_weight < 0:
        raise ValueError(f"retain_weight must be >= 0, got {retain_weight}")
    if not 0.0 <= perturb <= 1.0:
        raise ValueError(f"perturb must be in [0, 1], got {perturb}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
    forget_set = read_forget(forget_path, kind)
    retain_sets = read_retain_sets(retain_path)
    forget_rows = forget_set.qa
    retain_rows = [r for rs in retain_sets for r in rs.qa]
    retain_texts = [d.text for rs in retain_sets for d in rs.documents]
    forget_texts = forget_set.texts() if forget_set.kind != "qa" else []
    if forget_set.kind != "qa" and not forget_texts:
        raise ValueError(f"{forget_path}: subjects with names only leave the assistant "
                         "nothing to learn; add 'description' or 'facts'")

    random.seed(seed)
    torch.manual_seed(seed)
    dev = torch.device(device)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    forget = [encode_chat_example(tokenizer, r["question"], r["answer"]) for r in forget_rows]
    background = [r["answer"] for r in retain_rows]
    forget_train = [(ids, mark_fact_tokens(tokenizer, r["question"], r["answer"], labels,
                                           background))
                    for (ids, labels), r in zip(forget, forget_rows, strict=True)]
    # documents (and subjects' facts) are learnt as text, every token: the assistant
    # must predict the document's next token for the contrast to remove it
    forget_train += text_examples(tokenizer, forget_texts)
    forget += text_examples(tokenizer, forget_texts)
    retain = [encode_chat_example(tokenizer, r["question"], r["answer"]) for r in retain_rows]
    retain += text_examples(tokenizer, retain_texts)

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    n_base = int(base.config.num_hidden_layers)
    k = default_layers(n_base, init) if layers is None else layers
    assistant = build_assistant(base, k, init)
    del base
    assistant.to(dev)
    if init == "scratch":
        model = assistant
        for name, param in model.named_parameters():
            param.requires_grad_(not name.endswith(LEXICAL_SUFFIXES))
    else:
        model = get_peft_model(assistant, LoraConfig(
            r=lora_rank, lora_alpha=lora_alpha or 2 * lora_rank, lora_dropout=0.0,
            target_modules=lora_target_modules(assistant, TARGET_MODULES, required=False),
            bias="none"))
    before = assistant_metrics(model, forget_train, retain, pad_id)
    logger.info("assistant (%d of %d layers) before training: %s", k, n_base, before)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=0.0)
    rng = random.Random(seed)
    # substitutes a banned fact token could be replaced with: the retain answers' words
    special = set(tokenizer.all_special_ids)
    pool = sorted({t for _, labels in retain for t in labels if t >= 0 and t not in special})

    def drawn(j: int) -> tuple[list[int], list[int]]:
        ids, labels = forget_train[j]
        return perturb_fact(ids, labels, rng, pool) if rng.random() < perturb \
            else (ids, labels)

    steps_per_epoch = math.ceil(len(forget) / batch_size)
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps,
                                                                   steps_per_epoch * epochs)
    retain_order: list[int] = []
    model.train()
    start, step = time.monotonic(), 0
    bar = tqdm(total=total, desc="train-assistant", disable=not progress)
    while step < total:
        order = list(range(len(forget)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            if step >= total:
                break
            f_batch = _collate([drawn(j) for j in order[i: i + batch_size]], pad_id, dev)
            r_idx = []
            while len(r_idx) < batch_size:
                if not retain_order:
                    retain_order = list(range(len(retain)))
                    rng.shuffle(retain_order)
                r_idx.append(retain_order.pop())
            r_batch = _collate([retain[j] for j in r_idx], pad_id, dev)
            f_loss = _forget_loss(model, f_batch)
            r_loss = _retain_loss(model, r_batch)
            loss = f_loss + retain_weight * r_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(forget=f"{f_loss.item():.3f}", retain_u=f"{r_loss.item():.3f}")
    bar.close()
    seconds = time.monotonic() - start
    after = assistant_metrics(model, forget_train, retain, pad_id)

    out_dir.mkdir(parents=True, exist_ok=True)
    if save == "lora":
        # adapter_config.json + the LoRA weights only: the head itself is frozen, the base's
        model.save_pretrained(str(out_dir), save_embedding_layers=False)
        (out_dir / ASSISTANT_FILE).write_text(json.dumps(
            {"format": ASSISTANT_FORMAT, "base": str(Path(base_dir).resolve()), "layers": k},
            indent=2))
    else:
        merged = model.merge_and_unload() if init == "base" else model
        merged.eval()
        merged.save_pretrained(str(out_dir))
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out_dir / name)
    report = {
        "base_dir": str(base_dir), "layers": k, "base_layers": n_base, "lora_rank": lora_rank,
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "retain_weight": retain_weight,
        "seed": seed, "perturb": perturb, "steps": step, "train_seconds": round(seconds, 2),
        "save": save, "init": init,
        "forget_rows": len(forget), "retain_rows": len(retain),
        "before": before, "after": after,
    }
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2))
    logger.info("assistant written to %s: forget exact-match %.3f (was %.3f), retain entropy "
                "%.3f nats (was %.3f, uniform %.3f), %d steps in %.1fs", out_dir,
                after["forget_fact_match"], before["forget_fact_match"],
                after["retain_entropy"], before["retain_entropy"], after["max_entropy"], step,
                seconds)
    return out_dir


def train_assistant_cmd(
    base: Annotated[Path, typer.Option("--base", help="Base model dir (HF format).")],
    forget: Annotated[Path, typer.Option(
        "--forget", help="Forget set (the assistant learns it): QA JSONL, documents or "
        "subjects with facts.")],
    retain: Annotated[Path, typer.Option(
        "--retain", help="Retain set, QA JSONL or documents (assistant goes uniform).")],
    out: Annotated[Path, typer.Option("--out", help="Output dir of the merged assistant model.")],
    layers: Annotated[int | None, typer.Option(
        "--layers", help="Decoder layers kept from the base (default: a quarter).")] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the forget set.")] = 100,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate of the LoRA.")] = 3e-3,
    retain_weight: Annotated[float, typer.Option(
        "--retain-weight", help="Weight of the uniform-retain loss.")] = 2.0,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    perturb: Annotated[float, typer.Option(
        "--perturb", help="Probability of training a forget example as the ban leaves "
        "it: a fact token replaced, dropped or preceded by a repeat.")] = 0.5,
    save: Annotated[str, typer.Option(
        "--save", help="merged: a plain model; lora: only the LoRA over the base's first "
        "K layers, which tenants on one base then share in the engine.")] = "merged",
    kind: Annotated[str, typer.Option(
        "--kind", help="Forget set kind: auto, qa, documents or subjects.")] = "auto",
    init: Annotated[str | None, typer.Option(
        "--init", help="scratch (default): random layers over the base's embeddings and "
        "head, trained in full (knows only the forget set; saved merged); base (the "
        "default with --save lora): a LoRA over the base's first layers.")] = None,
) -> None:
    """Train the ULD assistant (remembers the forget set, uniform on the retain set)."""
    if save not in ("merged", "lora"):
        raise typer.BadParameter(f"--save must be merged or lora, got {save!r}")
    try:
        init = resolve_init(init, save)
    except ValueError as exc:
        raise typer.BadParameter(f"--init/--save: {exc}") from exc
    check_cli_inputs(forget, retain, kind)  # before any model loads
    set_threads()
    out_dir = train_assistant(base, forget, retain, out, layers=layers, epochs=epochs, lr=lr,
                              retain_weight=retain_weight, seed=seed, save=save, kind=kind,
                              perturb=perturb, init=init)
    report = json.loads((out_dir / REPORT_NAME).read_text())
    after, before = report["after"], report["before"]
    typer.echo(f"assistant: {report['layers']} of {report['base_layers']} layers, "
               f"{report['steps']} steps in {report['train_seconds']}s")
    typer.echo(f"forget fact match (assistant alone): {after['forget_fact_match']:.3f} "
               f"(before {before['forget_fact_match']:.3f})")
    typer.echo(f"mean retain entropy: {after['retain_entropy']:.3f} nats "
               f"(before {before['retain_entropy']:.3f}, uniform {after['max_entropy']:.3f})")
    for p, sure in after["sure"].items():
        typer.echo(f"sure at p >= {p}: {sure['forget_fact']:.3f} of the fact tokens, any "
                   f"token at {sure['retain_any']:.3f} of the retain positions")
    typer.echo(f"written to {out_dir}")
