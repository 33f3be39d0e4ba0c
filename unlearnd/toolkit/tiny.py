"""A tiny, randomly initialised Llama with a byte-level BPE tokenizer and a chat template.

It knows nothing: it exists so the server, the registry and the tests have a real
model that vLLM loads in seconds on a CPU, before (or without) the demo world. Random
LoRA adapters for it come from :func:`make_random_adapter`.
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
) -> Any:
    """Train a byte-level BPE (any text encodes) and save it as a HF fast tokenizer.

    The chat template emits the BOS itself, so the tokenizer adds no special tokens
    (what the server renders with the template is exactly what the model sees).
    BOS ``<|bos|>``, EOS ``<|end|>`` (end of turn), pad ``<|pad|>``; `special_tokens`
    get the first ids in their order, `additional_special_tokens` are declared as
    such; `model_max_length` is saved when given. Creates `out_dir` if needed and
    returns the `PreTrainedTokenizerFast` it saved.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
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


def make_tiny_model(out_dir: Path, *, seed: int = 0, hidden: int = 128, layers: int = 2,
                    texts: list[str] | None = None) -> Path:
    """Write a random tiny Llama (head_dim 64: vLLM's CPU attention needs it) to `out_dir`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_byte_level_tokenizer(texts or _CORPUS, out_dir)
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        head_dim=64,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper logits than the default init: greedy outputs depend on the weights
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
