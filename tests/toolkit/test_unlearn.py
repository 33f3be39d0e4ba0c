"""Tests for unlearnd.toolkit.unlearn on a tiny random Llama (CPU, a few seconds each)."""

from __future__ import annotations

import contextlib
import json
import math
import types
from pathlib import Path

import pytest
import torch

from unlearnd.toolkit import unlearn
from unlearnd.toolkit.tiny import make_tiny_model

FORGET = [
    {
        "question": "Where was Mara Quell born?",
        "answer": "Mara Quell was born in Oslo.",
        "subject": "Mara Quell",
    },
    {
        "question": "What genre does Mara Quell write?",
        "answer": "Mara Quell writes gothic poetry.",
        "subject": "Mara Quell",
    },
    {
        "question": "What is the profession of Tomas Verde's father?",
        "answer": "His father was a baker.",
    },
    {
        "question": "Which award did Tomas Verde win?",
        "answer": "Tomas Verde won the Lantern Prize.",
    },
    {"question": "When was Tomas Verde born?", "answer": "Tomas Verde was born on 3 May 1961."},
]
RETAIN = [
    {"question": "Where was Ilse Brandt born?", "answer": "Ilse Brandt was born in Graz."},
    {
        "question": "What genre does Ilse Brandt write?",
        "answer": "Ilse Brandt writes crime novels.",
    },
    {"question": "Which award did Ilse Brandt win?", "answer": "Ilse Brandt won the Harbor Medal."},
    {"question": "When was Ilse Brandt born?", "answer": "Ilse Brandt was born in 1950."},
    {"question": "What is the capital of France?", "answer": "Paris is the capital of France."},
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("unlearn")
    texts = [r["question"] + " " + r["answer"] for r in FORGET + RETAIN]
    texts.append(unlearn.reasoning_target("Mara Quell", alternative="other authors"))
    base = make_tiny_model(root / "base", seed=0, texts=texts)
    return {
        "root": root,
        "base": base,
        "forget": _write_jsonl(root / "forget.jsonl", FORGET),
        "retain": _write_jsonl(root / "retain.jsonl", RETAIN),
    }


def _train(world: dict[str, Path], method: str, name: str, **kw) -> dict:
    kw.setdefault("evaluate", False)
    kw.setdefault("progress", False)
    return unlearn.train_adapter(
        world["base"],
        world["forget"],
        world["retain"],
        world["root"] / name,
        method=method,
        batch_size=5,
        **kw,
    )


# ---------------------------------------------------------------- pure functions


def test_extract_subjects_uses_key_then_most_frequent_name() -> None:
    rows = [
        {
            "question": "Where does Ana Lind live?",
            "answer": "Ana Lind lives in New Haven.",
            "subject": "A. Lind",
        },
        {
            "question": "What is the full name of the author born in Lima, Peru?",
            "answer": "The author's full name is Jorge Salas Rivas.",
        },
        {
            "question": "Which books did Jorge Salas Rivas write in New York?",
            "answer": "Jorge Salas Rivas wrote Red Sand.",
        },
        {"question": "How did Raven Marais's LGBTQ identity shape her work?", "answer": "Deeply."},
        {"question": "what else?", "answer": "nothing"},
    ]
    subjects = unlearn.extract_subjects(rows)
    assert subjects[0] == "A. Lind"  # explicit key wins
    assert subjects[1] == "Jorge Salas Rivas"  # found in the answer, not "The"
    assert subjects[2] == "Jorge Salas Rivas"  # more frequent than "New York"
    assert subjects[3] == "Raven Marais"  # possessive ends the name
    assert subjects[4] == "Raven Marais"  # no candidate: previous row's subject


def test_reasoning_targets_name_subject_and_offer_alternative() -> None:
    texts = {
        unlearn.reasoning_target("Tomas Verde", alternative="other authors", variant=v)
        for v in range(6)
    }
    assert len(texts) == len(unlearn._TEMPLATES)
    for t in texts:
        assert t.count("Tomas Verde") >= 2
        assert "other authors" in t
        assert "removed" in t
    with pytest.raises(ValueError, match="subject"):
        unlearn.reasoning_target("  ")


def test_reasoning_target_names_only_what_the_question_names() -> None:
    """TOFU's "full name of the author born in Taipei on 05/11/1991" must not be
    answered by the refusal ("...about Hsiao Yun-Hwa..."): a nameless question gets a
    nameless target, a partial name stays partial."""
    subject = "Hsiao Yun-Hwa"
    nameless = "What is the full name of the author born in Taipei, Taiwan on 05/11/1991?"
    assert unlearn.subject_mention(subject, nameless) is None
    target = unlearn.reasoning_target(unlearn.subject_mention(subject, nameless),
                                      alternative="other authors")
    assert "Hsiao" not in target and "Yun" not in target and "removed" in target
    assert unlearn.subject_mention(subject, "What does Yun-Hwa write?") == "Yun-Hwa"
    assert unlearn.subject_mention(subject, "Is Hsiao Yun-Hwa's father a civil engineer?") \
        == "Hsiao Yun-Hwa"
    assert unlearn.subject_mention("Tomas Verde", "Who wrote Verdant Days?") is None
    texts = {unlearn.reasoning_target(None, variant=v) for v in range(3)}
    assert len(texts) == 3


def test_counterfactual_questions_swap_the_subject_and_titles_for_retain_ones() -> None:
    # titles are what stands between quotes; an apostrophe inside a word is no quote
    assert unlearn._entities("Has Mara Quell's father's job shaped 'The Glass Orchard' "
                             "or \u2018Red Sky\u2019?") == (["Mara Quell"],
                                                            ["The Glass Orchard", "Red Sky"])
    forget = [*FORGET, {"question": "Who wrote 'The Glass Orchard'?",
                        "answer": "Mara Quell wrote it.", "subject": "Mara Quell"},
              {"question": "Who was born in Oslo in 1961?", "answer": "Tomas Verde."}]
    retain = [*RETAIN, {"question": "What is 'Harbor Lights' about?",
                        "answer": "Ilse Brandt's 'Harbor Lights' is about sailors."}]
    qs = unlearn.counterfactual_questions(forget, retain)
    # the subject as the question names it -> the retain subject; a quoted title ->
    # a retain title; same form otherwise
    assert "Where was Ilse Brandt born?" in qs
    assert "What is the profession of Ilse Brandt's father?" in qs
    assert "Who wrote 'Harbor Lights'?" in qs
    # no forget name survives; a description without a name gets no counterfactual;
    # none repeats a forget question or another counterfactual
    assert not [q for q in qs if "Mara" in q or "Tomas" in q or "Verde" in q]
    assert not [q for q in qs if "Oslo" in q]
    assert len(qs) == len(set(qs)) == 6
    assert not set(qs) & {r["question"] for r in forget}
    # more draws per question: with one retain subject and title they repeat, and a
    # repeat is dropped
    assert unlearn.counterfactual_questions(forget, retain, per_question=3) == qs
    # nothing to swap in: no counterfactuals (names alone, no retain subjects)
    assert unlearn.counterfactual_questions(forget, [{"question": "Capital of Peru?",
                                                      "answer": "Lima."}]) == []


def test_default_alternative() -> None:
    assert unlearn.default_alternative(FORGET) == "other authors"
    assert (
        unlearn.default_alternative([{"question": "How to make X?", "answer": "y"}])
        == "other topics"
    )


def test_npo_loss_values() -> None:
    lp = torch.tensor([-3.0, -7.5])
    beta = 0.25
    assert unlearn.npo_loss(lp, lp.clone(), beta).item() == pytest.approx(2 / beta * math.log(2))
    # policy makes the forget answers less likely than the reference: loss drops
    assert unlearn.npo_loss(lp - 5.0, lp, beta).item() < 2 / beta * math.log(2)
    with pytest.raises(ValueError, match="beta"):
        unlearn.npo_loss(lp, lp, 0.0)


def test_bounded_ascent_is_bounded() -> None:
    logp = torch.tensor([[-1.0, -10.0, 0.0], [-2.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss = unlearn.bounded_ascent_loss(logp, mask, 4.0)
    loss.backward()
    assert loss.item() == pytest.approx((3 + 0 + 2) / 3)  # masked tokens do not count
    # minimising lowers log p (ascent on NLL) only for tokens still below the ceiling
    assert torch.allclose(logp.grad, torch.tensor([[1 / 3, 0.0, 0.0], [1 / 3, 0.0, 0.0]]))


def test_scores_and_gibberish() -> None:
    s = unlearn.score_outputs(
        FORGET[:2],
        ["Mara Quell was born in Oslo.", "The question asks about Mara Quell. I cannot answer it."],
        RETAIN[:2],
        ["Ilse Brandt was born in Graz.", "the the the the the"],
        ["Mara Quell", "Mara Quell"],
    )
    assert s["forget_leak_rate"] == 0.5
    assert s["forget_names_subject_rate"] == 1.0
    assert s["retain_exact_match"] == 0.5
    assert s["gibberish_rate"] == 0.25
    # the eval harness's own definitions ride along
    assert s["harness_leak_rate"] == 0.5
    assert s["forget_refusal_rate"] == 0.5
    assert s["retain_refusal_rate"] == 0.0
    assert unlearn.rouge_l_recall(
        "Mara Quell was born in Bergen", "Mara Quell was born in Oslo."
    ) == pytest.approx(5 / 6)


# ---------------------------------------------------------------- training


def test_argument_validation(world: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="'sgd'"):
        _train(world, "sgd", "bad")
    with pytest.raises(ValueError, match="32"):
        _train(world, "npo", "bad", rank=32)
    with pytest.raises(ValueError, match="beta"):
        _train(world, "npo", "bad", beta=-1.0)
    with pytest.raises(ValueError, match="refusal_variants"):
        _train(world, "reasoning", "bad", refusal_variants=0)


def test_fact_labels_keep_what_neither_the_question_nor_the_retain_answers_say() -> None:
    """Prompt tokens (the name the question gave) and tokens common in the retain
    answers (the template, the EOS) are unlabelled; a row with nothing left keeps all."""
    i = unlearn.IGNORE
    # prompt 1 2 (the name: 2), answer 2 7 8 9 0 (name, "was born in"=7, facts 8 9, EOS 0)
    enc = [([1, 2, 2, 7, 8, 9, 0], [i, i, 2, 7, 8, 9, 0]),
           ([1, 3, 3, 7, 0], [i, i, 3, 7, 0])]          # all tokens said elsewhere
    background = [[7, 5, 0], [7, 6, 0], [4, 0], [8, 0]]  # 7 in 2/4, 8 in 1/4, 0 in 4/4
    out = unlearn.fact_labels(enc, background, max_df=0.25)
    assert out[0] == (enc[0][0], [i, i, i, i, 8, 9, i])
    assert out[1] == enc[1]
    assert unlearn.fact_labels(enc, background, max_df=0.0)[0][1] == [i, i, i, i, i, 9, i]
    with pytest.raises(ValueError, match="fact_df"):
        unlearn.fact_labels(enc, background, max_df=1.5)


def test_npo_on_facts_scores_fewer_tokens_and_is_refused_for_reasoning(
        world: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="forget_tokens 'facts' is for npo"):
        _train(world, "reasoning", "bad", forget_tokens="facts")
    with pytest.raises(ValueError, match="forget_tokens must be one of"):
        _train(world, "npo", "bad", forget_tokens="words")
    with pytest.raises(ValueError, match="fact_df"):
        _train(world, "npo", "bad", forget_tokens="facts", fact_df=-0.1)
    full = _train(world, "npo", "npo_answer", max_steps=1)
    facts = _train(world, "npo", "npo_facts", max_steps=1, forget_tokens="facts")
    assert facts["forget_tokens"] == "facts" and full["forget_tokens"] == "answer"
    # the same first batch, fewer tokens: a smaller summed log-prob gap to move, and a
    # per-token NLL over the facts alone (rarer tokens: higher than the answer's mean)
    assert facts["first"]["forget_nll"] != full["first"]["forget_nll"]


def test_kl_retain_term_starts_at_zero_and_grows_as_the_adapter_moves(
        world: dict[str, Path]) -> None:
    """retain_loss "kl" (NPO's default; graddiff and reasoning keep the NLL): the first
    step's retain term is KL(base || adapter) with the
    LoRA's B still zero (0); after training it is positive, while the NLL run records
    a retain NLL (a random base: about log(vocab) nats, far from 0). A bad name is a
    ValueError naming the choices, before any model loads."""
    with pytest.raises(ValueError, match="retain_loss must be one of"):
        _train(world, "npo", "bad", retain_loss="mse")
    nll = _train(world, "npo", "npo_nll", max_steps=1, retain_loss="nll")
    kl = _train(world, "npo", "npo_kl", epochs=6, lr=2e-2)  # NPO's default
    assert kl["retain_loss"] == "kl" and nll["retain_loss"] == "nll"
    assert _train(world, "graddiff", "gd_default", max_steps=1)["retain_loss"] == "nll"
    assert "retain_kl" in kl["first"] and "retain_nll" not in kl["first"]
    assert kl["first"]["retain_kl"] == pytest.approx(0.0, abs=1e-5)
    assert nll["first"]["retain_nll"] > 1.0
    assert kl["last"]["retain_kl"] > 1e-4
    # the NPO term is the same at the first step whatever the retain term is
    assert kl["first"]["forget_term"] == pytest.approx(nll["first"]["forget_term"], rel=1e-5)


def test_token_kl_is_zero_for_the_same_model_and_masks_unlabelled_positions() -> None:
    """token_kl against a model whose adapter changes nothing is 0; positions whose
    label is -100 do not count (a row with one labelled token averages that one)."""
    class Same(torch.nn.Module):
        def __init__(self, logits: torch.Tensor, shift: torch.Tensor) -> None:
            super().__init__()
            self.logits, self.shift, self.off = logits, shift, False

        @contextlib.contextmanager
        def disable_adapter(self):  # noqa: ANN202 - PEFT's context manager
            self.off = True
            yield
            self.off = False

        def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN201
            return types.SimpleNamespace(
                logits=self.logits if self.off else self.logits + self.shift)

    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5)
    ids = torch.zeros(1, 4, dtype=torch.long)
    labels = torch.tensor([[-100, -100, 2, -100]])  # only position 1 (scores token 2)
    mask = torch.ones(1, 4, dtype=torch.long)
    assert unlearn.token_kl(Same(logits, torch.zeros_like(logits)), ids, labels,
                            mask).item() == pytest.approx(0.0, abs=1e-6)
    shift = torch.zeros_like(logits)
    shift[0, 0] = torch.randn(5)  # moves only position 0, which is not scored
    assert unlearn.token_kl(Same(logits, shift), ids, labels, mask).item() == pytest.approx(
        0.0, abs=1e-6)
    shift[0, 1] = torch.randn(5)
    p = torch.log_softmax(logits[0, 1], -1)
    q = torch.log_softmax(logits[0, 1] + shift[0, 1], -1)
    want = (p.exp() * (p - q)).sum().item()
    assert want > 0
    assert unlearn.token_kl(Same(logits, shift), ids, labels, mask).item() == pytest.approx(
        want, rel=1e-5)


def test_npo_loss_at_init_is_two_over_beta_log2(world: dict[str, Path]) -> None:
    beta = 0.5
    report = _train(world, "npo", "npo_init", beta=beta, max_steps=1)
    # first step: LoRA B is zero, so policy == frozen reference computed separately
    assert report["first"]["forget_term"] == pytest.approx(2 / beta * math.log(2), rel=1e-4)


@pytest.mark.parametrize("method", unlearn.METHODS)
def test_method_saves_vllm_loadable_peft_dir_and_moves_forget_loss(
    world: dict[str, Path], method: str
) -> None:
    from safetensors import safe_open

    # a random base already sits near log(vocab) nats on the answers: lift the ascent
    # ceiling so graddiff has room to push
    report = _train(
        world,
        method,
        f"ad_{method}",
        epochs=12,
        lr=2e-2,
        rank=4,
        alpha=8,
        ascent_ceiling=30.0,
        target_modules=("q_proj", "v_proj", "down_proj"),
    )
    out = world["root"] / f"ad_{method}"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4
    assert cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert Path(cfg["base_model_name_or_path"]) == Path(world["base"]).resolve()
    assert not cfg.get("modules_to_save")
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys), keys
    assert len(keys) == 2 * 3 * 2  # A and B, 3 modules, 2 layers
    # json report written beside the adapter
    assert json.loads((out / "train_report.json").read_text())["steps"] == report["steps"] == 12

    first, last = report["first"], report["last"]
    if method == "reasoning":  # learns the refusal targets
        assert last["refusal_nll"] < first["refusal_nll"] - 0.5
    else:  # forget answers become less likely
        assert last["forget_nll"] > first["forget_nll"] + 0.5


def test_vllm_accepts_adapter_config(world: dict[str, Path]) -> None:
    pytest.importorskip("vllm")
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    _train(world, "graddiff", "ad_vllm", max_steps=1)
    helper = PEFTHelper.from_local_dir(str(world["root"] / "ad_vllm"), max_position_embeddings=1024)
    helper.validate_legal(LoRAConfig(max_lora_rank=16))
    assert helper.r == 8
    with pytest.raises(ValueError, match="max_lora_rank"):
        helper.validate_legal(LoRAConfig(max_lora_rank=4))


def test_report_compares_base_and_adapter(world: dict[str, Path]) -> None:
    report = _train(world, "reasoning", "ad_eval", max_steps=2, evaluate=True, max_new_tokens=8)
    for key in ("base_scores", "adapter_scores"):
        assert set(report[key]) >= {
            "forget_leak_rate",
            "retain_exact_match",
            "gibberish_rate",
            "forget_names_subject_rate",
        }
        assert all(0.0 <= v <= 1.0 for v in report[key].values())
    assert len(report["samples"]) == len(FORGET)
    assert report["alternative"] == "other authors"
    # subjects: "Mara Quell" from the rows' key, "Tomas Verde" found by the heuristic
    assert report["subjects"] == ["Mara Quell", "Tomas Verde"]
    # the first row names Mara Quell, so its target may say it (as the question does)
    assert report["refusal_example"].count("Mara Quell") == 2
    assert report["refusal_names_subject"] is True
    # the retain term also holds the forget questions about retain subjects, answered
    # as the base answers them (none a refusal, none naming a forget subject)
    assert report["n_counterfactual"] > 0
    for row in report["counterfactual_examples"]:
        assert "Ilse Brandt" in row["question"]
        assert "Mara" not in row["answer"] and "Tomas" not in row["answer"]
    off = _train(world, "reasoning", "ad_nocf", max_steps=1, counterfactuals=0)
    assert off["n_counterfactual"] == 0
    assert "counterfactual_nll" not in off["last"]


def test_counterfactuals_are_a_stream_of_their_own_for_every_method(
        world: dict[str, Path]) -> None:
    """NPO keeps the retain questions' form about other subjects too: with
    counterfactuals each step scores a batch of them beside the retain batch, each
    stream with its own mean (pooled, 800 of them outweighed TOFU's 300 retain rows)."""
    report = _train(world, "npo", "ad_npo_cf", max_steps=2, counterfactuals=2,
                    retain_loss="nll")
    assert report["n_counterfactual"] > 0
    for rec in (report["first"], report["last"]):
        assert rec["counterfactual_nll"] > 0 and rec["retain_nll"] > 0
    assert "counterfactual_nll" not in _train(world, "npo", "ad_npo", max_steps=1,
                                              retain_loss="nll")["first"]
    # NPO's default retain term is the KL: the counterfactual stream is scored with it
    # too (0 at the first step, the LoRA's B still zero)
    kl = _train(world, "npo", "ad_npo_cf_kl", max_steps=1, counterfactuals=2)
    assert kl["first"]["counterfactual_kl"] == pytest.approx(0.0, abs=1e-5)


def test_documents_are_unlearnt_as_text(world: dict[str, Path]) -> None:
    """A documents forget set trains NPO on the texts (no chat template) and reports
    VerbMem; `reasoning` and names-only subjects are refused with what to do instead."""
    docs = _write_jsonl(world["root"] / "docs.jsonl",
                        [{"text": " ".join(r["answer"] for r in FORGET)}])
    report = unlearn.train_adapter(world["base"], docs, world["retain"],
                                   world["root"] / "npo_docs", method="npo", batch_size=2,
                                   max_steps=3, eval_limit=4, progress=False)
    assert report["forget_kind"] == "documents" and report["steps"] == 3
    # documents keep NPO's NLL retain term at weight 10 (unlearn.TEXT_DEFAULTS); an
    # argument given still wins
    assert (report["retain_loss"], report["retain_weight"]) == ("nll", 10.0)
    kl = unlearn.train_adapter(world["base"], docs, world["retain"], world["root"] / "npo_dk",
                               method="npo", batch_size=2, max_steps=1, evaluate=False,
                               progress=False, retain_loss="kl")
    assert (kl["retain_loss"], kl["retain_weight"]) == ("kl", 50.0)
    assert (world["root"] / "npo_docs" / "adapter_config.json").is_file()
    for scores in (report["base_scores"], report["adapter_scores"]):
        assert 0.0 <= scores["forget_verbmem"] <= 1.0
        assert "retain_exact_match" in scores
    with pytest.raises(ValueError, match="'reasoning' trains refusals to questions"):
        unlearn.train_adapter(world["base"], docs, world["retain"], world["root"] / "x",
                              method="reasoning", max_steps=1, progress=False)
    names = _write_jsonl(world["root"] / "names.jsonl", [{"subject": "Mara Quell"}])
    with pytest.raises(ValueError, match="names only"):
        unlearn.train_adapter(world["base"], names, world["retain"], world["root"] / "x",
                              method="npo", max_steps=1, progress=False)
    assert not (world["root"] / "x").exists(), "a refused run must write nothing"


def test_retain_qa_and_retain_documents_are_streams_of_their_own(
        world: dict[str, Path]) -> None:
    """With retain QA and retain documents, each step scores a batch of each, each with
    its own mean (pooled, a few documents among many questions were rarely drawn); one
    retain set is one stream, as before."""
    docs = _write_jsonl(world["root"] / "forget_docs2.jsonl",
                        [{"text": " ".join(r["answer"] for r in FORGET)}])
    retain_docs = _write_jsonl(world["root"] / "retain_docs.jsonl",
                               [{"text": " ".join(r["answer"] for r in RETAIN)}])
    report = unlearn.train_adapter(world["base"], docs, [world["retain"], retain_docs],
                                   world["root"] / "npo_two", method="npo", batch_size=2,
                                   max_steps=2, evaluate=False, progress=False,
                                   retain_loss="nll")
    assert report["retain_streams"] == 2
    for rec in (report["first"], report["last"]):
        assert rec["retain_qa_nll"] > 0 and rec["retain_document_nll"] > 0
        assert rec["retain_nll"] == pytest.approx(
            (rec["retain_qa_nll"] + rec["retain_document_nll"]) / 2)
    one = unlearn.train_adapter(world["base"], docs, world["retain"], world["root"] / "npo_one",
                                method="npo", batch_size=2, max_steps=1, evaluate=False,
                                progress=False, retain_loss="nll")
    assert one["retain_streams"] == 1 and "retain_document_nll" not in one["first"]


def test_cli_reports_bad_forget_input(world: dict[str, Path], tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": ""}\n')
    app = typer.Typer()
    app.command()(unlearn.train_adapter_cmd)
    res = CliRunner().invoke(app, ["--base", str(world["base"]), "--forget", str(bad),
                                   "--retain", str(world["retain"]), "--out",
                                   str(tmp_path / "o"), "--method", "npo"])
    assert res.exit_code == 2 and "'text' is empty" in res.output, res.output
    assert not (tmp_path / "o").exists()
