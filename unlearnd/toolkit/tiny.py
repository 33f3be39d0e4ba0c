"""A tiny, randomly initialised causal LM with a trained tokenizer and a chat template.

It knows nothing: it exists so the server, the registry and the tests have a real
model that vLLM loads in seconds on a CPU, before (or without) the demo world. Random
LoRA adapters for it come from :func:`make_random_adapter`.

Base models come the ways users bring them (:data:`ARCHITECTURES`, :data:`TOKENIZERS`):

- ``llama`` (the default) or ``qwen2`` (biases on q/k/v), head_dim 64 (vLLM's CPU
  attention needs it), tied or untied embeddings (:func:`causal_lm_config`);
- a ``bpe`` tokenizer (byte-level BPE, Llama-3/Qwen style, the default:
  :func:`train_byte_level_tokenizer`) or a ``sentencepiece`` one (Llama-2/Mistral/Gemma
  style: a Metaspace pre-tokenizer marking word starts with ``▁``, BPE pieces and
  ``<0x00>``..``<0xFF>`` byte-fallback tokens: :func:`train_sentencepiece_tokenizer`).

Both tokenizers have the same special tokens and chat template, and neither adds
special tokens itself (the template emits the BOS).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|end|>", "<|system|>", "<|user|>",
                  "<|assistant|>"]
ADDITIONAL_SPECIAL_TOKENS = ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2")
"""Model architectures :func:`make_tiny_model` and ``unlearnd build-base`` write."""
TOKENIZERS: tuple[str, ...] = ("bpe", "sentencepiece")
"""Tokenizer kinds: byte-level BPE, or SentencePiece style (``▁`` word marks, bytes)."""
BYTE_TOKENS: tuple[str, ...] = tuple(f"<0x{b:02X}>" for b in range(256))
"""The byte-fallback tokens of a ``sentencepiece`` tokenizer (as Llama-2 spells them)."""


QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
"""Qwen2's pre-tokenizer split (transformers' ``models/qwen2/tokenization_qwen2.py``)."""


def check_choice(option: str, value: str, allowed: Sequence[str]) -> str:
    """`value` when it is one of `allowed`, else ValueError naming the option and choices."""
    if value not in allowed:
        raise ValueError(f"{option} must be one of {', '.join(allowed)}; got {value!r}")
    return value


_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Who wrote the book? The author was born in a small town and writes novels.",
    "I can't help with that. Information about this subject was removed from this model.",
    "What is the capital of France? Paris is the capital of France.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and dates like 12 March 1970.",
]


def train_byte_level_tokenizer(
    texts: list[str],
    out_dir: Path,
    vocab_size: int = 512,
    *,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    additional_special_tokens: Sequence[str] = ADDITIONAL_SPECIAL_TOKENS,
    model_max_length: int | None = None,
    style: str = "gpt2",
) -> Any:
    """Train a byte-level BPE (any text encodes) and save it as a HF fast tokenizer.

    `style` ``gpt2`` (the default): GPT-2's byte-level pre-tokenizer; ``qwen2``: Qwen2's
    (NFC, its split regex, then bytes), the pipeline transformers' ``Qwen2Tokenizer``
    rebuilds for every qwen2 checkpoint, so the file and every loader agree.

    The chat template emits the BOS itself, so the tokenizer adds no special tokens
    (what the server renders with the template is exactly what the model sees).
    BOS ``<|bos|>``, EOS ``<|end|>`` (end of turn), pad ``<|pad|>``; `special_tokens`
    get the first ids in their order, `additional_special_tokens` are declared as
    such; `model_max_length` is saved when given. Creates `out_dir` if needed and
    returns the `PreTrainedTokenizerFast` it saved.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    check_choice("style", style, ("gpt2", "qwen2"))
    tok = Tokenizer(models.BPE())
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated",
                                 invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _save_fast(tok, out_dir, additional_special_tokens, model_max_length)


def train_sentencepiece_tokenizer(
    texts: list[str],
    out_dir: Path,
    vocab_size: int = 512,
    *,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    additional_special_tokens: Sequence[str] = ADDITIONAL_SPECIAL_TOKENS,
    model_max_length: int | None = None,
) -> Any:
    """Train a SentencePiece-style tokenizer and save it as a HF fast tokenizer.

    Llama-2/Mistral/Gemma style, with the HF ``tokenizers`` library: spaces become
    ``▁`` word marks (``pre_tokenizers.Metaspace(replacement="▁",
    prepend_scheme="first")``: the text's first word gets one too, a word right after a
    special token does not), BPE pieces over characters, and ``<0x00>``..``<0xFF>``
    byte-fallback tokens, so text with characters never seen in training still encodes
    (as its UTF-8 bytes) and decodes back. Ids: `special_tokens` first (in their
    order), then the 256 byte tokens, then the learned pieces; the whole vocabulary is
    at most `vocab_size` (plus any training characters that do not fit: every
    character of `texts` is kept). Same special tokens, BOS/EOS/PAD and chat template as
    :func:`train_byte_level_tokenizer`; no post-processor. Returns the
    `PreTrainedTokenizerFast` it saved in `out_dir`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(special_tokens)
    if vocab_size < len(specials) + len(BYTE_TOKENS) + 1:
        raise ValueError(f"vocab_size must be >= {len(specials) + len(BYTE_TOKENS) + 1} for "
                         f"a sentencepiece tokenizer (special + 256 byte tokens), got "
                         f"{vocab_size}")
    # Like SentencePiece's defaults for Llama-2 (split_by_unicode_script, split_digits):
    # punctuation and digits are pieces of their own ("▁Poland", "."; "▁1", "9"), so a
    # word is the same pieces wherever it stands before a comma or a full stop.
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True)])
    # ByteFallback turns runs of <0xNN> back into characters, then Metaspace turns
    # "▁" back into spaces (and drops the mark the pre-tokenizer put on the first word).
    decoder = decoders.Sequence([decoders.ByteFallback(),
                                 decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    draft = Tokenizer(models.BPE(byte_fallback=True))
    draft.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(BYTE_TOKENS),
                                  special_tokens=specials, show_progress=False)
    draft.train_from_iterator(texts, trainer=trainer)
    # The trainer has no way to add the byte tokens as ordinary (non-special) tokens:
    # rebuild the model with them after the special tokens.
    model_doc = json.loads(draft.to_str())["model"]
    learned = sorted(model_doc["vocab"].items(), key=lambda kv: kv[1])
    vocab: dict[str, int] = {t: i for i, t in enumerate(specials)}
    for t in (*BYTE_TOKENS, *(t for t, _ in learned)):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in model_doc["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoder
    tok.add_special_tokens(specials)
    return _save_fast(tok, out_dir, additional_special_tokens, model_max_length)


def _save_fast(tok: Any, out_dir: Path, additional_special_tokens: Sequence[str],
               model_max_length: int | None) -> Any:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=list(additional_special_tokens),
    )
    fast.chat_template = CHAT_TEMPLATE
    if model_max_length is not None:
        fast.model_max_length = model_max_length
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def check_arch_tokenizer(arch: str, tokenizer: str) -> None:
    """ValueError unless `arch` and `tokenizer` are known and can go together.

    A ``qwen2`` model cannot have a ``sentencepiece`` tokenizer: transformers (5.x)
    loads every qwen2 checkpoint's tokenizer as ``Qwen2Tokenizer``, which rebuilds
    Qwen2's byte-level pipeline from the vocabulary and ignores the pre-tokenizer and
    decoder in tokenizer.json (word marks and byte fallback are lost: spaces and unseen
    characters vanish), and vLLM loads tokenizers through transformers' AutoTokenizer.
    """
    check_choice("arch", arch, ARCHITECTURES)
    check_choice("tokenizer", tokenizer, TOKENIZERS)
    if arch == "qwen2" and tokenizer == "sentencepiece":
        raise ValueError("tokenizer 'sentencepiece' does not go with arch 'qwen2': "
                         "transformers loads every qwen2 checkpoint's tokenizer as "
                         "Qwen2Tokenizer (byte-level BPE), whatever tokenizer.json says; "
                         "use --tokenizer bpe with qwen2, or sentencepiece with llama")


def train_tokenizer_of_kind(kind: str, texts: list[str], out_dir: Path, vocab_size: int = 512,
                            *, arch: str = "llama", **kw: Any) -> Any:
    """:func:`train_byte_level_tokenizer` (``bpe``; Qwen2's pipeline for ``arch="qwen2"``)
    or :func:`train_sentencepiece_tokenizer` (``sentencepiece``); ValueError naming the
    option for an unknown `kind` or a pair :func:`check_arch_tokenizer` refuses."""
    check_arch_tokenizer(arch, kind)
    if kind == "bpe":
        return train_byte_level_tokenizer(texts, out_dir, vocab_size,
                                          style="qwen2" if arch == "qwen2" else "gpt2", **kw)
    return train_sentencepiece_tokenizer(texts, out_dir, vocab_size, **kw)


def write_portable_tokenizer_config(out_dir: Path, *, bos: str = "<|bos|>",
                                    eos: str = "<|end|>", pad: str = "<|pad|>",
                                    additional_special_tokens: Sequence[str] = (
                                        ADDITIONAL_SPECIAL_TOKENS)) -> None:
    """Rewrite `out_dir`'s tokenizer_config.json (and special_tokens_map.json) so every
    loader reads the same tokenizer: the chat template inline (vLLM and older
    transformers read it there; transformers 5 may write chat_template.jinja only),
    ``tokenizer_class: PreTrainedTokenizerFast`` (transformers 4.x and 5.x load the same;
    and AutoTokenizer must not swap in the architecture's own class: given a qwen2
    config.json it loads Qwen2Tokenizer, whose pre-tokenizer is not the one trained),
    no added BOS/EOS."""
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("extra_special_tokens", None)
    cfg["additional_special_tokens"] = list(additional_special_tokens)
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    special_map = {"bos_token": bos, "eos_token": eos, "pad_token": pad,
                   "additional_special_tokens": list(additional_special_tokens)}
    (Path(out_dir) / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2),
                                                           encoding="utf-8")


def causal_lm_config(arch: str, *, vocab_size: int, hidden: int, intermediate: int,
                     layers: int, heads: int, tie_embeddings: bool, bos_token_id: int,
                     eos_token_id: int, pad_token_id: int,
                     max_position_embeddings: int = 1024, **extra: Any) -> Any:
    """The transformers config of a small `arch` model (LlamaConfig or Qwen2Config).

    head_dim is 64 (vLLM's CPU attention needs it): `hidden` must be ``64 * heads``.
    Qwen2 gets its biased q/k/v projections and no sliding window. `extra` goes to the
    config as is (``rms_norm_eps``, ``dtype``).
    """
    from transformers import LlamaConfig, Qwen2Config

    check_choice("arch", arch, ARCHITECTURES)
    if heads < 1 or hidden != 64 * heads:
        raise ValueError(f"hidden={hidden} heads={heads}: head_dim must be 64 "
                         "(vLLM's CPU attention needs it), i.e. hidden == 64 * heads")
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        tie_word_embeddings=tie_embeddings, **extra)
    if arch == "llama":
        return LlamaConfig(head_dim=64, **common)
    # Qwen2 has no head_dim field: it is hidden // heads, 64 by the check above
    return Qwen2Config(use_sliding_window=False, max_window_layers=layers, **common)


def causal_lm_class(arch: str) -> Any:
    """LlamaForCausalLM or Qwen2ForCausalLM."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    check_choice("arch", arch, ARCHITECTURES)
    return LlamaForCausalLM if arch == "llama" else Qwen2ForCausalLM


def make_tiny_model(out_dir: Path, *, seed: int = 0, hidden: int = 128, layers: int = 2,
                    texts: list[str] | None = None, arch: str = "llama",
                    tokenizer: str = "bpe", tie_embeddings: bool = False) -> Path:
    """Write a random tiny model to `out_dir`: `arch` (:data:`ARCHITECTURES`, head_dim
    64: vLLM's CPU attention needs it) with a `tokenizer` (:data:`TOKENIZERS`) trained
    on `texts`; untied embeddings unless `tie_embeddings`."""
    import torch
    from transformers import AutoTokenizer

    check_arch_tokenizer(arch, tokenizer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer_of_kind(tokenizer, texts or _CORPUS, out_dir, arch=arch)
    if (arch, tokenizer) != ("llama", "bpe"):  # the default's files stay as they were
        write_portable_tokenizer_config(out_dir)
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    torch.manual_seed(seed)
    config = causal_lm_config(
        arch, vocab_size=len(tok), hidden=hidden, intermediate=hidden * 2, layers=layers,
        heads=hidden // 64, tie_embeddings=tie_embeddings, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype="float32")
    model = causal_lm_class(arch)(config)
    # sharper logits than the default init: greedy outputs depend on the weights
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / "generation_config.json").write_text(json.dumps({
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id}))
    return out_dir


def make_random_adapter(base_dir: Path, out_dir: Path, *, seed: int, rank: int = 8,
                        scale: float = 0.3,
                        target_modules: tuple[str, ...] = ("q_proj", "v_proj", "o_proj",
                                                           "down_proj")) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B: changes greedy outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank,
                                                  target_modules=list(target_modules)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    cfg_path = Path(out_dir) / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return Path(out_dir)
