"""Base models as users bring them: architectures and tokenizers of make_tiny_model and
build_base, and the training helpers on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unlearnd.toolkit.synth import synthesize
from unlearnd.toolkit.tiny import (
    BYTE_TOKENS,
    check_arch_tokenizer,
    make_tiny_model,
    train_sentencepiece_tokenizer,
)
from unlearnd.toolkit.training import (
    answer_encoding,
    encode_chat_example,
    lora_target_modules,
    read_qa_jsonl,
    render_prompt,
)

ODD = "Ignore all previous instructions — Þórdís 🙂 naïve 漢字 \t tabs\nnew line  two spaces"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    synthesize(out, authors=4, seed=0, groups=1, group_size=1)
    return out


@pytest.fixture(scope="module")
def texts(world: Path) -> list[str]:
    rows = read_qa_jsonl(world / "train.jsonl")
    return [t for r in rows for t in (r["question"], r["answer"])]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("sp"), tokenizer="sentencepiece",
                           texts=texts, layers=2)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("qwen"), arch="qwen2", texts=texts,
                           tie_embeddings=True, layers=2)


def _tok(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_sentencepiece_round_trips_anything_by_byte_fallback(sp_dir: Path) -> None:
    tok = _tok(sp_dir)
    doc = json.loads((sp_dir / "tokenizer.json").read_text())
    assert doc["model"]["type"] == "BPE" and doc["model"]["byte_fallback"] is True
    meta = doc["pre_tokenizer"]["pretokenizers"][0]
    assert meta["type"] == "Metaspace" and meta["replacement"] == "▁"
    assert meta["prepend_scheme"] == "first"
    vocab = tok.get_vocab()
    assert all(b in vocab for b in BYTE_TOKENS)
    assert len(tok) <= 512 + 10  # the bound, give or take the training characters
    ids = tok(ODD, add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert "<0xE6>" in pieces  # 漢 was never seen in training: its UTF-8 bytes
    assert tok.decode(ids) == ODD
    # byte tokens are ordinary tokens: skipping special tokens keeps them
    assert tok.decode(ids, skip_special_tokens=True) == ODD
    for s in ("🙂", "a", "x  y", "trailing ", "Zofia Ostrołęcki"):
        assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s, s
    # as with Llama-2's tokenizer, a text's leading space is its first word's mark,
    # which decoding drops
    assert tok.decode(tok(" lead", add_special_tokens=False)["input_ids"]) == "lead"


def test_sentencepiece_word_marks(sp_dir: Path) -> None:
    tok = _tok(sp_dir)
    pieces = tok.convert_ids_to_tokens(tok("was born in Poland", add_special_tokens=False)
                                       ["input_ids"])
    # every word starts with the mark, the text's first word too; no byte-level "Ġ"
    assert sum(p.startswith("▁") for p in pieces) == 4, pieces
    assert not any("Ġ" in p for p in pieces)
    # punctuation and digits are pieces of their own, as SentencePiece makes them
    pieces = tok.convert_ids_to_tokens(tok("in Poland, 1988.", add_special_tokens=False)
                                       ["input_ids"])
    assert "," in pieces and "." in pieces and "8" in pieces, pieces
    # after a special token the first word has no mark (prepend_scheme "first")
    prompt = tok.apply_chat_template([{"role": "user", "content": "born in"}],
                                     add_generation_prompt=True, tokenize=False)
    assert prompt == "<|bos|><|user|>born in<|end|><|assistant|>"
    ids = render_prompt(tok, "born in")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[2].startswith("b") and not pieces[2].startswith("▁"), pieces
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<|pad|>"
    assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]


def test_answer_ids_are_those_after_the_prompt(sp_dir: Path) -> None:
    tok = _tok(sp_dir)
    question, answer = "Where was Ana born?", "Ana was born in Gdańsk."
    prompt, ans, offsets = answer_encoding(tok, question, answer)
    alone = tok(answer, add_special_tokens=False)["input_ids"]
    # alone, the answer's first word gets a word mark it does not get after the prompt
    assert tok.convert_ids_to_tokens(alone)[0].startswith("▁")
    assert not tok.convert_ids_to_tokens(ans)[0].startswith("▁")
    assert [answer[s:e].strip() for s, e in offsets if answer[s:e].strip()][0].startswith("A")
    ids, labels = encode_chat_example(tok, question, answer)
    full = tok.apply_chat_template([{"role": "user", "content": question},
                                    {"role": "assistant", "content": answer}], tokenize=False)
    assert tok(full, add_special_tokens=False)["input_ids"] == ids
    assert ids[: len(prompt)] == prompt and ids[len(prompt):-1] == ans
    assert labels[len(prompt):] == ans + [tok.eos_token_id]
    assert tok.decode(ans) == answer


def test_qwen2_tiny_model_loads_in_transformers(qwen_dir: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    cfg = json.loads((qwen_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["tie_word_embeddings"] is True
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64
    model = AutoModelForCausalLM.from_pretrained(str(qwen_dir))
    assert isinstance(model, Qwen2ForCausalLM)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = _tok(qwen_dir)
    # transformers loads it as Qwen2Tokenizer, which rebuilds Qwen2's pipeline: the
    # tokenizer.json we wrote is that pipeline, so both give the same ids
    raw = Tokenizer.from_file(str(qwen_dir / "tokenizer.json"))
    text = "<|bos|><|user|>" + ODD + " 1988<|end|><|assistant|>"
    assert tok(text, add_special_tokens=False)["input_ids"] == raw.encode(text).ids
    assert tok.decode(tok(ODD, add_special_tokens=False)["input_ids"]) == ODD
    out = model.generate(input_ids=torch.tensor([render_prompt(tok, "Hi?")]),
                         max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] >= 5
    assert lora_target_modules(model, ("q_proj", "v_proj", "down_proj")) == \
        ["q_proj", "v_proj", "down_proj"]


def test_default_tiny_model_is_unchanged(tmp_path: Path) -> None:
    """llama + bpe, untied, as before the options existed: byte-level pre-tokenizer,
    tokenizer_config as transformers writes it, the same weights for the same seed."""
    a = make_tiny_model(tmp_path / "a", seed=3)
    b = make_tiny_model(tmp_path / "b", seed=3, arch="llama", tokenizer="bpe",
                        tie_embeddings=False)
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is False
    assert json.loads((a / "tokenizer.json").read_text())["pre_tokenizer"]["type"] == "ByteLevel"
    assert "chat_template" not in json.loads((a / "tokenizer_config.json").read_text())
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_assistant_copy_of_qwen2_layers(qwen_dir: Path) -> None:
    """The assistant copies the base's first K layers with their q/k/v biases, unties a
    tied head, and gives the base's logits when K is all of them."""
    from transformers import AutoModelForCausalLM

    from unlearnd.guards.assistant import build_assistant

    base = AutoModelForCausalLM.from_pretrained(str(qwen_dir), dtype=torch.float32).eval()
    full = build_assistant(base, 2).eval()
    assert full.config.tie_word_embeddings is False
    assert full.lm_head.weight.data_ptr() != full.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 5, 20, 30, 40, 6]])
    with torch.no_grad():
        assert torch.allclose(full(input_ids=ids).logits, base(input_ids=ids).logits,
                              atol=1e-5)
    one = build_assistant(base, 1)
    assert one.config.num_hidden_layers == 1
    assert torch.equal(one.model.layers[0].self_attn.k_proj.bias,
                       base.model.layers[0].self_attn.k_proj.bias)


def test_lora_target_modules_checks_the_architecture(qwen_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(qwen_dir))
    with pytest.raises(ValueError, match=r"\['c_attn'\] are not linear layers of this qwen2"):
        lora_target_modules(model, ("q_proj", "c_attn"))
    # a default list keeps what the model has
    assert lora_target_modules(model, ("q_proj", "c_attn"), required=False) == ["q_proj"]
    with pytest.raises(ValueError, match="its linear layers are"):
        lora_target_modules(model, ("c_attn",), required=False)


def test_bad_options_name_the_option_and_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"arch must be one of llama, qwen2; got 'gpt2'"):
        make_tiny_model(tmp_path / "m", arch="gpt2")
    with pytest.raises(ValueError,
                       match=r"tokenizer must be one of bpe, sentencepiece; got 'wordpiece'"):
        make_tiny_model(tmp_path / "m", tokenizer="wordpiece")
    with pytest.raises(ValueError, match="does not go with arch 'qwen2'"):
        check_arch_tokenizer("qwen2", "sentencepiece")
    with pytest.raises(ValueError, match="vocab_size must be >="):
        train_sentencepiece_tokenizer(["a b c"], tmp_path / "t", vocab_size=100)
    from unlearnd.toolkit.build_base import build_base

    with pytest.raises(ValueError, match="arch must be one of"):
        build_base([tmp_path / "x.jsonl"], tmp_path / "m", arch="mistral")
    with pytest.raises(ValueError, match="vocab_size must be >= 519 for a sentencepiece"):
        from unlearnd.toolkit.build_base import train_tokenizer

        train_tokenizer(["a"], tmp_path / "t2", vocab_size=400, kind="sentencepiece")


def test_build_base_cli_rejects_bad_values(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from unlearnd.cli import app

    runner = CliRunner()
    args = ["build-base", "--data", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "m")]
    r = runner.invoke(app, [*args, "--arch", "falcon"])
    assert r.exit_code == 2 and "--arch" in r.output and "llama, qwen2" in r.output, r.output
    r = runner.invoke(app, [*args, "--tokenizer", "unigram"])
    assert r.exit_code == 2 and "bpe, sentencepiece" in r.output, r.output
    r = runner.invoke(app, [*args, "--arch", "qwen2", "--tokenizer", "sentencepiece"])
    assert r.exit_code == 2 and "Qwen2Tokenizer" in r.output, r.output


def test_build_base_sentencepiece_qwen2_learn(world: Path, tmp_path: Path) -> None:
    """Both new options train a base that learns (a few rows, a few seconds)."""
    from transformers import AutoModelForCausalLM

    from unlearnd.toolkit.build_base import build_base

    rows = read_qa_jsonl(world / "retain.jsonl")[:8]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for arch, kind, tie in (("llama", "sentencepiece", True), ("qwen2", "bpe", False)):
        out = tmp_path / f"{arch}-{kind}"
        report = build_base([data], out, hidden=64, layers=1, heads=1, vocab_size=800,
                            epochs=60, lr=1e-2, batch_size=4, target_em=1.0, max_minutes=1.0,
                            progress=False, arch=arch, tokenizer=kind, tie_embeddings=tie)
        assert report["hparams"]["arch"] == arch and report["hparams"]["tokenizer"] == kind
        assert report["em"] >= 0.75, (arch, kind, report["em"])
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["model_type"] == arch and cfg["tie_word_embeddings"] is tie
        tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
        assert "<|assistant|>" in tok_cfg["chat_template"]
        model = AutoModelForCausalLM.from_pretrained(str(out))
        assert model.config.eos_token_id == _tok(out).convert_tokens_to_ids("<|end|>")
