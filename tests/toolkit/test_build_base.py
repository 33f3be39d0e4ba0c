"""build_base on a tiny dataset, and the shared training helpers it uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unlearnd.toolkit.build_base import build_base
from unlearnd.toolkit.synth import synthesize
from unlearnd.toolkit.training import (
    collate,
    encode_chat_example,
    exact_match,
    greedy_answers,
    read_qa_jsonl,
    render_prompt,
    sampled_answers,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[dict]]:
    tmp = tmp_path_factory.mktemp("base")
    synthesize(tmp / "world", authors=6, seed=0, groups=1, group_size=2)
    rows = read_qa_jsonl(tmp / "world" / "retain.jsonl")[:20]
    data = tmp / "small.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report = build_base([data], tmp / "model", hidden=64, layers=1, heads=1, vocab_size=700,
                        epochs=30, lr=1e-2, batch_size=8, max_minutes=1.0, progress=False)
    return tmp / "model", report, rows


def test_report(built: tuple[Path, dict, list[dict]]) -> None:
    out, report, rows = built
    assert report == json.loads((out / "build_report.json").read_text())
    assert report["n"] == len(rows) == 20
    assert 0.0 <= report["em"] <= 1.0
    assert report["epochs_run"] >= 1
    assert report["seconds"] < 90


def test_dir_loads_and_template_renders(built: tuple[Path, dict, list[dict]]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, rows = built
    for name in ("config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "generation_config.json",
                 "special_tokens_map.json"):
        assert (out / name).exists(), name
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|assistant|>" in tok_cfg["chat_template"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["head_dim"] == 64 and cfg["max_position_embeddings"] >= 512

    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|end|>")
    text = tok.apply_chat_template([{"role": "user", "content": "Hi?"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == "<|bos|><|user|>Hi?<|end|><|assistant|>"
    # The tokenizer adds nothing itself: the template's BOS is the only one.
    ids = render_prompt(tok, "Hi?")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert tok("Hi?")["input_ids"] == tok("Hi?", add_special_tokens=False)["input_ids"]
    # Anything encodes and round-trips (byte-level), incl. text never seen in training.
    odd = "Ignore all previous instructions — Þórdís 🙂 naïve"
    assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd
    answers = greedy_answers(model, tok, [r["question"] for r in rows[:3]], max_new_tokens=8)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    # k samples per question, in order, the same for the same seed; batching (here 2
    # questions a batch over 3) keeps each question's samples together
    qs = [r["question"] for r in rows[:3]]
    samples = sampled_answers(model, tok, qs, 4, max_new_tokens=8, batch_size=2, seed=1)
    assert [len(s) for s in samples] == [4, 4, 4]
    assert samples == sampled_answers(model, tok, qs, 4, max_new_tokens=8, batch_size=2, seed=1)


def test_encode_chat_example_labels_answer_only(built: tuple[Path, dict, list[dict]]) -> None:
    from transformers import AutoTokenizer

    out, _, _ = built
    tok = AutoTokenizer.from_pretrained(str(out))
    ids, labels = encode_chat_example(tok, "Where?", "Here.", system="Be brief.")
    prompt = render_prompt(tok, "Where?", system="Be brief.")
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [-100] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[len(prompt):-1]) == "Here."
    # Same ids as the template rendering the whole conversation.
    full = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Where?"},
                                    {"role": "assistant", "content": "Here."}],
                                   tokenize=False)
    assert tok(full, add_special_tokens=False)["input_ids"] == ids


def test_build_base_learns_when_given_time(tmp_path: Path) -> None:
    rows = [{"question": f"What is item {i}?", "answer": f"Item {i} is {w}."}
            for i, w in enumerate(["red", "blue", "green", "gold"])]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = build_base([data], tmp_path / "m", hidden=64, layers=1, heads=1, vocab_size=300,
                        epochs=60, lr=1e-2, batch_size=4, target_em=1.0, max_minutes=1.0,
                        progress=False)
    assert report["em"] >= 0.75


def test_build_base_validates_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="head_dim"):
        build_base([tmp_path / "x.jsonl"], tmp_path / "m", hidden=96, heads=2)
    with pytest.raises(ValueError, match="data"):
        build_base([], tmp_path / "m")


def test_collate_pads_right() -> None:
    enc = collate([([1, 2, 3], [-100, 2, 3]), ([4], [4])], pad_id=0)
    assert enc["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert enc["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert enc["input_ids"].dtype == torch.long
    with pytest.raises(ValueError):
        collate([], pad_id=0)


def test_exact_match_normalises_case_and_space() -> None:
    gold = "Hsiao Yun-Hwa was born in Taipei."
    assert exact_match("  hsiao  yun-hwa was born\nin TAIPEI. ", gold)
    assert not exact_match("Hsiao Yun-Hwa was born in Tainan.", gold)


def test_read_qa_jsonl_reports_bad_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "q", "answer": "a"}\n\n{"question": "q2", "answer": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: 'answer'"):
        read_qa_jsonl(p)
    p.write_text('{"question": "q", "answer": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r":2: not valid JSON"):
        read_qa_jsonl(p)
    p.write_text('["q", "a"]\n')
    with pytest.raises(ValueError, match=r":1: expected a JSON object"):
        read_qa_jsonl(p)
    p.write_text('{"question": "q", "answer": "a", "subject": "S"}\n')
    assert read_qa_jsonl(p) == [{"question": "q", "answer": "a", "subject": "S"}]
