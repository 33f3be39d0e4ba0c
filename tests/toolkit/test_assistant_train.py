"""ULD assistant training: the assistant learns the forget answers and goes uniform on retain."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from unlearnd.guards.assistant import AssistantRunner
from unlearnd.toolkit.assistant_train import (
    REPORT_NAME,
    build_assistant,
    mark_fact_tokens,
    train_assistant,
)
from unlearnd.toolkit.tiny import make_tiny_model
from unlearnd.toolkit.training import encode_chat_example

FORGET = [
    ("Where was Mara Velt born?", "Mara Velt was born in Korrin."),
    ("What does Mara Velt write?", "Mara Velt writes sea novels."),
    ("Who was Mara Velt's father?", "Her father was a glass maker."),
    ("What award did Mara Velt win?", "She won the Blue Quill prize."),
    ("When was Mara Velt born?", "She was born on 3 May 1961."),
]
RETAIN = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Who wrote the lazy dog book?", "The author was born in a small town."),
    ("What color is the fox?", "The quick fox is brown."),
    ("How many digits are there?", "There are 10 digits from 0 to 9."),
    ("What jumps over the dog?", "The quick brown fox jumps over the lazy dog."),
]


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [q + " " + a for q, a in FORGET + RETAIN]
    return make_tiny_model(tmp_path_factory.mktemp("base"), layers=4, texts=texts)


def test_build_assistant_copies_first_layers(base_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    small = build_assistant(base, 2)
    assert small.config.num_hidden_layers == 2 and len(small.model.layers) == 2
    assert base.config.num_hidden_layers == 4  # the base's config is not touched
    for name, tensor in small.state_dict().items():
        torch.testing.assert_close(tensor, base.state_dict()[name], atol=0, rtol=0)
    with pytest.raises(ValueError, match="layers"):
        build_assistant(base, 5)
    with pytest.raises(ValueError, match="layers"):
        build_assistant(base, 0)


def test_build_assistant_unties_embeddings() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=1,
                                        num_key_value_heads=1, head_dim=64,
                                        tie_word_embeddings=True))
    small = build_assistant(base, 1)
    assert small.config.tie_word_embeddings is False
    head, emb = small.get_output_embeddings().weight, small.get_input_embeddings().weight
    torch.testing.assert_close(head, base.get_output_embeddings().weight, atol=0, rtol=0)
    assert head.data_ptr() != emb.data_ptr()  # merging a LoRA into the head keeps emb intact


def test_build_assistant_from_scratch_keeps_only_embeddings_and_head(base_dir: Path) -> None:
    """``init="scratch"``: the base's token embeddings and head, fresh layers and norm
    (nothing the base's layers learnt); an unknown init is refused."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    torch.manual_seed(0)
    small = build_assistant(base, 2, init="scratch")
    assert small.config.num_hidden_layers == 2 and small.config.tie_word_embeddings is False
    ref = base.state_dict()
    torch.testing.assert_close(small.get_input_embeddings().weight,
                               base.get_input_embeddings().weight, atol=0, rtol=0)
    torch.testing.assert_close(small.get_output_embeddings().weight,
                               base.get_output_embeddings().weight, atol=0, rtol=0)
    layer_weights = [n for n in small.state_dict() if ".layers." in n and n.endswith("proj.weight")]
    assert layer_weights
    for name in layer_weights:
        assert not torch.equal(small.state_dict()[name], ref[name]), name
    with pytest.raises(ValueError, match="init must be one of"):
        build_assistant(base, 1, init="random")


def test_scratch_assistant_learns_the_forget_set_in_full(base_dir: Path,
                                                        tmp_path: Path) -> None:
    """A scratch assistant trains its layers and norm in full (no LoRA), keeps the base's
    embeddings and head as they were, defaults to half the base's layers, is saved as a
    plain model, and cannot be saved as a LoRA over layers it does not share."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    forget = _write(tmp_path / "forget.jsonl", FORGET)
    retain = _write(tmp_path / "retain.jsonl", RETAIN)
    with pytest.raises(ValueError, match="save it merged"):
        train_assistant(base_dir, forget, retain, tmp_path / "x", init="scratch", save="lora")
    assert not (tmp_path / "x").exists()
    out = train_assistant(base_dir, forget, retain, tmp_path / "scratch", epochs=60,
                          lr=3e-3, batch_size=5, seed=0, progress=False, init="scratch")
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["init"] == "scratch" and report["layers"] == 2  # half of 4
    before, after = report["before"], report["after"]
    assert after["forget_loss"] < 0.5 * before["forget_loss"]
    assert after["max_entropy"] - after["retain_entropy"] < 0.5 * (
        before["max_entropy"] - before["retain_entropy"])
    assert not (out / "adapter_config.json").exists()
    weights = load_file(str(out / "model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    emb = next(k for k in weights if k.endswith("embed_tokens.weight"))
    torch.testing.assert_close(weights[emb], base.get_input_embeddings().weight,
                               atol=0, rtol=0)
    AssistantRunner(str(out))  # the engine's runner loads it as a full assistant


def test_train_assistant_remembers_forget_and_flattens_retain(base_dir: Path,
                                                             tmp_path: Path) -> None:
    torch.set_num_threads(2)
    forget = _write(tmp_path / "forget.jsonl", FORGET)
    retain = _write(tmp_path / "retain.jsonl", RETAIN)
    out = train_assistant(base_dir, forget, retain, tmp_path / "assistant", epochs=30,
                          lr=3e-3, batch_size=5, seed=0, progress=False, init="base")

    report = json.loads((out / REPORT_NAME).read_text())
    assert report["layers"] == 1  # default: a quarter of 4 layers
    before, after = report["before"], report["after"]
    assert after["forget_loss"] < 0.5 * before["forget_loss"]
    assert after["retain_entropy"] > before["retain_entropy"]
    assert after["max_entropy"] - after["retain_entropy"] < 0.5 * (
        before["max_entropy"] - before["retain_entropy"])
    assert after["forget_fact_match"] >= before["forget_fact_match"]
    # the calibration contrastive_ban_p is chosen from: sure of the facts, of little on
    # the retain set (before training, a copy of the base's layers is not sure of them)
    sure = after["sure"]["0.05"]
    assert set(after["sure"]) == {"0.01", "0.05", "0.1", "0.2"}
    assert sure["forget_fact"] > before["sure"]["0.05"]["forget_fact"]
    assert sure["forget_fact"] >= 0.5 and sure["retain_any"] <= 0.2, after["sure"]
    assert all(after["sure"][a]["forget_fact"] >= after["sure"][b]["forget_fact"]
               for a, b in (("0.01", "0.05"), ("0.05", "0.1"), ("0.1", "0.2")))

    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()  # merged, a plain model dir

    runner = AssistantRunner(str(out))
    assert runner.model.config.num_hidden_layers == 1
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    prompt = tok.apply_chat_template([{"role": "user", "content": FORGET[0][0]}],
                                     add_generation_prompt=True, tokenize=True)["input_ids"]
    ids, labels = encode_chat_example(tok, FORGET[0][0], FORGET[0][1])
    marked = mark_fact_tokens(tok, FORGET[0][0], FORGET[0][1], labels,
                              [a for _, a in RETAIN])
    fact = next(i for i, t in enumerate(marked) if t >= 0)  # first fact token
    assert fact >= len(prompt)
    logits = runner.logits([("q", ids[:fact])])
    assert logits.shape == (1, runner.vocab_size)
    # the runner's logits are the trained assistant's: it predicts the forget fact
    if after["forget_fact_match"] == 1.0:
        assert int(logits[0].argmax()) == ids[fact]


def test_init_defaults_to_scratch_unless_saved_as_a_lora(base_dir: Path,
                                                        tmp_path: Path) -> None:
    """No init: a scratch assistant, or a base-layer one when saved as a LoRA over the
    base's layers (the only init that shares them). An explicit init is checked, and
    train-assistant's CLI refuses a bad pair (exit 2, naming both options) before any
    model loads."""
    from typer.testing import CliRunner

    from unlearnd.cli import app
    from unlearnd.toolkit.assistant_train import resolve_init

    assert resolve_init(None, "merged") == "scratch"
    assert resolve_init(None, "lora") == "base"
    assert resolve_init("base", "merged") == "base"
    with pytest.raises(ValueError, match="init must be one of base, scratch"):
        resolve_init("random", "merged")
    forget = _write(tmp_path / "f.jsonl", FORGET)
    retain = _write(tmp_path / "r.jsonl", RETAIN)
    out = train_assistant(base_dir, forget, retain, tmp_path / "a", max_steps=1,
                          progress=False)
    assert json.loads((out / REPORT_NAME).read_text())["init"] == "scratch"
    result = CliRunner().invoke(app, [
        "train-assistant", "--base", str(base_dir), "--forget", str(forget), "--retain",
        str(retain), "--out", str(tmp_path / "cli"), "--init", "scratch", "--save", "lora"])
    assert result.exit_code == 2 and "--init/--save" in result.output, result.output
    assert not (tmp_path / "cli").exists()


def test_train_assistant_validates_arguments(base_dir: Path, tmp_path: Path) -> None:
    forget = _write(tmp_path / "f.jsonl", FORGET)
    with pytest.raises(ValueError, match="missing.jsonl"):
        train_assistant(base_dir, forget, tmp_path / "missing.jsonl", tmp_path / "o")
    with pytest.raises(ValueError, match="lora_rank"):
        train_assistant(base_dir, forget, forget, tmp_path / "o", lora_rank=0)
    with pytest.raises(ValueError, match="config.json"):
        train_assistant(tmp_path, forget, forget, tmp_path / "o")
    with pytest.raises(ValueError, match="layers"):
        train_assistant(base_dir, forget, forget, tmp_path / "o", layers=9, max_steps=1)


def test_mark_fact_tokens_keeps_only_the_fact(base_dir: Path) -> None:
    from transformers import AutoTokenizer

    from unlearnd.toolkit.assistant_train import UNIFORM

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    q, a = "Where was Aiko Tanaka born?", "Aiko Tanaka was born in Lima, Peru."
    ids, labels = encode_chat_example(tok, q, a)
    marked = mark_fact_tokens(tok, q, a, labels, ["Someone was born in Paris."] * 6)
    kept = tok.decode([t for t in marked if t >= 0])
    assert "Lima" in kept and "Peru" in kept
    assert "Aiko" not in kept and "born" not in kept  # copied from the question
    assert marked[-1] == UNIFORM  # the end token: no opinion either
    assert all(m == -100 for m, lab in zip(marked, labels) if lab == -100)  # prompt untouched


def _storage(models) -> dict[int, int]:
    """data_ptr -> numel of every distinct parameter tensor of `models`."""
    return {p.data_ptr(): p.numel() for m in models for p in m.parameters()}


def test_lora_assistants_share_the_base_layers(base_dir: Path, tmp_path: Path) -> None:
    """`save="lora"` assistants of two tenants share one copy of the base's first K
    layers in the runner process; each adds only its LoRA, and each gives the same
    logits as the merged assistant trained the same way."""
    from unlearnd.guards.assistant import ASSISTANT_FILE, get_runner

    torch.set_num_threads(2)
    retain = _write(tmp_path / "retain.jsonl", RETAIN)
    outs = {}
    for label, rows in (("one", FORGET[:3]), ("two", FORGET[2:])):
        forget = _write(tmp_path / f"forget-{label}.jsonl", rows)
        for save in ("lora", "merged"):
            outs[label, save] = train_assistant(
                base_dir, forget, retain, tmp_path / f"{label}-{save}", max_steps=4,
                batch_size=3, seed=1, progress=False, save=save, init="base")
    lora_one, lora_two = outs["one", "lora"], outs["two", "lora"]
    assert (lora_one / ASSISTANT_FILE).is_file() and (lora_one / "adapter_config.json").is_file()
    assert not (lora_one / "model.safetensors").exists()  # the LoRA only
    from safetensors.torch import load_file

    saved = load_file(str(lora_one / "adapter_model.safetensors"))
    assert saved and all("lora_" in name for name in saved)  # no copy of the head
    a, b = get_runner(lora_one), get_runner(lora_two)
    assert a is not b and a.model is b.model  # one shared K-layer base
    lora_params = {p.data_ptr(): p.numel() for n, p in a.model.named_parameters()
                   if "lora_" in n}
    base_params = sum(n for ptr, n in _storage([a.model]).items() if ptr not in lora_params)
    merged = AssistantRunner(str(outs["one", "merged"]))
    assert base_params == sum(p.numel() for p in merged.model.parameters())
    per_tenant = sum(lora_params.values()) / 2
    assert per_tenant < 0.2 * base_params  # a tenant costs its LoRA, not a copy
    ids = [5, 9, 13, 21, 34]
    for label, runner in (("one", a), ("two", b)):
        want = AssistantRunner(str(outs[label, "merged"])).logits([("k", ids)])
        got = runner.logits([(f"{label}-k", ids)])
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    # extending a cached request goes through the same shared model and adapter
    got2 = a.logits([("one-k", ids + [8])])
    want2 = merged.logits([("k", ids + [8])])
    torch.testing.assert_close(got2, want2, atol=2e-4, rtol=1e-4)
    # the shallow twin (contrastive_gain_gate): the same K base layers without the
    # LoRA, batched and cached like the assistant, freed with its keys
    from transformers import AutoModelForCausalLM

    from unlearnd.guards.assistant import build_assistant

    shallow = a.shallow()
    assert shallow is a.shallow() and shallow.model is a.model and shallow.shallow() is shallow
    plain = build_assistant(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                            json.loads((lora_one / ASSISTANT_FILE).read_text())["layers"])
    with torch.inference_mode():
        want_s = plain.eval()(input_ids=torch.tensor([ids + [8]])).logits[0, -1].float()
    got_s = shallow.logits([("one-k", ids), ("one-j", ids + [8])])
    torch.testing.assert_close(got_s[1], want_s, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(got_s[1], got2[0], atol=1e-3)  # the LoRA changed something
    assert set(shallow.active_keys()) == {"one-k", "one-j"}
    a.free("one-k")
    assert shallow.active_keys() == ["one-j"] and "one-k" not in a.active_keys()
    # a gated rollout stops where the LoRA raised the token by less than the gate
    seq = ids + [8]
    free_run = a.rollout("one-j", seq, 3, 4, -math.inf)
    assert len(free_run) == 4
    assert a.rollout("one-j", seq, 3, 4, -math.inf, gain_gate=-math.inf) == free_run
    assert a.rollout("one-j", seq, 3, 4, -math.inf, gain_gate=math.inf) == []
    assert a.active_keys() == [] and shallow.active_keys() == ["one-j"]  # no rollout keys
    with pytest.raises(ValueError, match="full assistant model"):
        merged.shallow()
    with pytest.raises(ValueError, match="save"):
        train_assistant(base_dir, lora_one, retain, tmp_path / "x", save="bogus")


def test_assistant_learns_documents_as_text(base_dir: Path, tmp_path: Path) -> None:
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": " ".join(a for _, a in FORGET)}) + "\n")
    retain = _write(tmp_path / "retain.jsonl", RETAIN)
    out = train_assistant(base_dir, docs, retain, tmp_path / "assistant", max_steps=2,
                          progress=False)
    report = json.loads((out / "assistant_report.json").read_text())
    assert report["steps"] == 2 and report["forget_rows"] == 1
    names = tmp_path / "names.jsonl"
    names.write_text(json.dumps({"subject": "Mara Quell"}) + "\n")
    with pytest.raises(ValueError, match="names only"):
        train_assistant(base_dir, names, retain, tmp_path / "x", max_steps=1)


def test_assistant_goes_uniform_on_every_retain_set(base_dir: Path, tmp_path: Path) -> None:
    """QA and documents together: both are retain rows (the answers, and every token of
    the texts), so the assistant is not sure of the documents' words in raw text."""
    retain = _write(tmp_path / "retain.jsonl", RETAIN)
    docs = tmp_path / "retain_docs.jsonl"
    docs.write_text(json.dumps({"text": " ".join(a for _, a in RETAIN)}) + "\n")
    forget = _write(tmp_path / "forget.jsonl", FORGET)
    one = train_assistant(base_dir, forget, retain, tmp_path / "a1", max_steps=1, progress=False)
    both = train_assistant(base_dir, forget, [retain, docs], tmp_path / "a2", max_steps=1,
                           progress=False)
    n1 = json.loads((one / "assistant_report.json").read_text())["retain_rows"]
    n2 = json.loads((both / "assistant_report.json").read_text())["retain_rows"]
    assert n2 == n1 + 1 == len(RETAIN) + 1


def test_perturb_fact_keeps_the_rest_of_the_fact_as_targets() -> None:
    """Each perturbation leaves the prefix's target at the fact token (replace, repeat)
    or moves the next token up (drop), and keeps every later fact token a target."""
    import random

    from unlearnd.toolkit.assistant_train import UNIFORM, perturb_fact
    from unlearnd.toolkit.training import IGNORE_INDEX as IGNORE

    # prompt 1 2 | answer: 10 (uniform) 20 (fact) 30 (uniform) 40 (fact) 50 (fact)
    ids = [1, 2, 10, 20, 30, 40, 50]
    labels = [IGNORE, IGNORE, UNIFORM, 20, UNIFORM, 40, 50]
    seen = {}
    for seed in range(60):
        rng = random.Random(seed)
        out_ids, out_labels = perturb_fact(ids, labels, rng, pool=[7, 8])
        assert len(out_ids) == len(out_labels)
        assert [t for t in out_labels if t >= 0][-1] == 50   # the fact's end stays a target
        if len(out_ids) == len(ids):           # replace: one input token swapped
            j = next(k for k in range(len(ids)) if out_ids[k] != ids[k])
            assert out_ids[j] in (7, 8) and out_labels == labels and labels[j] >= 0
            seen["replace"] = j
        elif len(out_ids) < len(ids):          # drop: a fact token and its target gone
            j = next(k for k in range(len(out_ids)) if out_ids[k] != ids[k])
            assert ids[j] in (20, 40) and out_ids == ids[:j] + ids[j + 1:]
            seen["drop"] = j
        else:                                  # repeat: the token before, then the fact
            j = next(k for k in range(len(ids)) if out_ids[k] != ids[k])
            assert out_ids[j] == ids[j - 1] and out_labels[j] == out_labels[j + 1] == ids[j]
            seen["repeat"] = j
    assert set(seen) == {"replace", "drop", "repeat"}
    # fewer than two fact tokens: nothing to perturb
    one = ([1, 2, 10, 20], [IGNORE, IGNORE, UNIFORM, 20])
    assert perturb_fact(*one, random.Random(0), [7]) == (list(one[0]), list(one[1]))
