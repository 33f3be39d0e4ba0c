"""AssistantRunner: incremental, batched logits equal a full forward pass over the same tokens."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from unlearnd.guards.assistant import AssistantRunner, get_runner

VOCAB = 300
ATOL = 1e-4


def _make_model(path: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init: logits differ visibly
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_model(tmp_path_factory.mktemp("assistant"))


@pytest.fixture(scope="module")
def reference(model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    def full(tokens: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=torch.tensor([tokens])).logits[0, -1].float()

    return full


def _check(runner: AssistantRunner, reference, reqs: list[tuple[str, list[int]]]) -> None:
    got = runner.logits(reqs)
    assert got.shape == (len(reqs), VOCAB)
    assert got.dtype == torch.float32
    for row, (key, tokens) in enumerate(reqs):
        want = reference(tokens)
        err = (got[row] - want).abs().max().item()
        assert err < ATOL, f"row {row} ({key}, len {len(tokens)}): max abs err {err}"


def test_single_request_prefill_then_decode(model_dir: Path, reference) -> None:
    runner = AssistantRunner(str(model_dir))
    assert runner.vocab_size == VOCAB
    seq = [5, 17, 42, 99, 3]
    _check(runner, reference, [("a", seq)])
    for tok in [7, 8, 250, 1]:
        seq = seq + [tok]
        _check(runner, reference, [("a", seq)])
    assert runner.active_keys() == ["a"]
    # the same sequence again: cached logits, still correct
    _check(runner, reference, [("a", seq)])


def test_persistent_batch_adds_removes_moves(model_dir: Path, reference) -> None:
    """Requests of different lengths join and leave, rows reorder, a key is freed and re-added,
    sequences that do not extend the cache are re-prefilled; every step is checked."""
    rng = random.Random(1234)
    runner = AssistantRunner(str(model_dir))
    live: dict[str, list[int]] = {}
    joins = {0: ["r0", "r1"], 1: ["r2"], 3: ["r3", "r4"], 6: ["r5"], 9: ["r1"]}
    leaves = {4: ["r1"], 7: ["r0", "r3"]}
    for step in range(12):
        for key in leaves.get(step, []):
            live.pop(key)
            runner.free(key)
        for key in joins.get(step, []):
            live[key] = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))]
        if step == 5:  # a preempted request recomputed with a different continuation
            live["r2"] = live["r2"][:-2] + [rng.randrange(VOCAB)]
        if step == 8:  # a sequence shorter than what was cached
            live["r4"] = live["r4"][:3]
        order = list(live)
        rng.shuffle(order)  # rows move between calls
        _check(runner, reference, [(k, live[k]) for k in order])
        assert sorted(runner.active_keys()) == sorted(live)
        for key in live:  # normally one token per step, sometimes two or three
            grow = rng.choice([1, 1, 1, 2, 3])
            live[key] = live[key] + [rng.randrange(VOCAB) for _ in range(grow)]
    assert "r1" in runner.active_keys()


def test_row_independent_of_batch(model_dir: Path) -> None:
    """A request's logits do not depend on which other requests share the batch."""
    runner_a = AssistantRunner(str(model_dir))
    runner_b = AssistantRunner(str(model_dir))
    seq = [3, 1, 4, 1, 5, 9, 2, 6]
    runner_a.logits([("x", seq)])
    runner_b.logits([("x", seq), ("y", list(range(40, 70)))])
    alone = runner_a.logits([("x", seq + [11])])
    batched = runner_b.logits([("y", list(range(40, 71))), ("x", seq + [11])])
    torch.testing.assert_close(alone[0], batched[1], atol=ATOL, rtol=0)
    assert not torch.allclose(batched[0], batched[1])  # the rows are really different


def test_invalid_inputs(model_dir: Path, tmp_path: Path) -> None:
    runner = AssistantRunner(str(model_dir))
    with pytest.raises(ValueError, match="duplicate"):
        runner.logits([("a", [1, 2]), ("a", [1, 2, 3])])
    with pytest.raises(ValueError, match="empty"):
        runner.logits([("a", [])])
    assert runner.logits([]).shape == (0, VOCAB)
    runner.free("never-seen")
    with pytest.raises(ValueError, match="not a directory"):
        AssistantRunner(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="dtype"):
        AssistantRunner(str(model_dir), dtype=torch.int32)


def test_get_runner_caches_per_dir_and_device(model_dir: Path) -> None:
    first = get_runner(str(model_dir))
    assert get_runner(model_dir, device="cpu") is first
    assert get_runner(str(model_dir) + "/") is first


def test_get_runner_shares_one_model_between_equal_assistants(model_dir: Path,
                                                              tmp_path: Path) -> None:
    """Two policies' copies of one assistant (two tenants forgetting the same set: the
    store holds a copy per version) share a runner; an assistant that differs in any
    byte gets its own."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    assert get_runner(copy) is get_runner(model_dir)
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    cfg = other / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    assert get_runner(other) is not get_runner(model_dir)


def test_scratch_assistants_share_one_copy_of_the_base_embeddings_and_head(
        model_dir: Path, tmp_path: Path) -> None:
    """Scratch assistants of one base differ in their layers and hold the base's
    embeddings and head unchanged: two runners of them keep one copy of those weights
    (same storage), and each still gives its own model's logits. An assistant whose head
    differs (trained) keeps its own head and shares the embeddings only."""
    from transformers import AutoModelForCausalLM

    from unlearnd.guards.assistant import build_assistant, load_causal_lm

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    dirs = []
    for i in range(3):
        torch.manual_seed(10 + i)
        a = build_assistant(base, 1, init="scratch")
        if i == 2:
            with torch.no_grad():
                a.get_output_embeddings().weight.add_(0.01)
        a.save_pretrained(str(tmp_path / f"a{i}"))
        dirs.append(tmp_path / f"a{i}")
    runners = [AssistantRunner(d) for d in dirs]
    emb = [r.model.get_input_embeddings().weight for r in runners]
    head = [r.model.get_output_embeddings().weight for r in runners]
    assert emb[1].data_ptr() == emb[0].data_ptr() == emb[2].data_ptr()
    assert head[1].data_ptr() == head[0].data_ptr() != head[2].data_ptr()
    seq = [1, 5, 9, 2, 7]
    for d, r in zip(dirs, runners, strict=True):
        alone = load_causal_lm(d)
        with torch.no_grad():
            want = alone(torch.tensor([seq])).logits[0, -1].float()
        torch.testing.assert_close(r.logits([("k", seq)])[0], want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", ["adapter_dir", "adapter_subdir"])
def test_peft_adapter_is_merged(model_dir: Path, tmp_path: Path, layout: str) -> None:
    import json
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=4,
                                                 target_modules=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    if layout == "adapter_dir":
        target = tmp_path / "adapter"
        peft_model.save_pretrained(str(target))
        cfg_path = target / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = str(model_dir)
        cfg_path.write_text(json.dumps(cfg))
    else:
        target = tmp_path / "full"
        shutil.copytree(model_dir, target)
        peft_model.save_pretrained(str(target / "adapter"))
    merged = peft_model.merge_and_unload().eval()

    runner = AssistantRunner(str(target))
    seq = [10, 20, 30, 40]
    got = runner.logits([("a", seq)])
    got2 = runner.logits([("a", seq + [50])])
    with torch.inference_mode():
        want = merged(input_ids=torch.tensor([seq])).logits[0, -1]
        want2 = merged(input_ids=torch.tensor([seq + [50]])).logits[0, -1]
        plain = AutoModelForCausalLM.from_pretrained(str(model_dir))(
            input_ids=torch.tensor([seq])).logits[0, -1]
    torch.testing.assert_close(got[0], want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got2[0], want2, atol=ATOL, rtol=0)
    assert (got[0] - plain).abs().max().item() > 1e-2  # the adapter really changed the model


def test_rollout_is_the_greedy_continuation_and_leaves_the_cache(model_dir: Path,
                                                                 reference) -> None:
    """rollout(key, seq, first) = greedy argmax steps after seq + [first], stopping when
    the top log-probability falls under the bound; the key's own cache still extends
    from seq afterwards (the continuation ran on a copy)."""
    runner = AssistantRunner(str(model_dir))
    seq = [5, 17, 42, 99, 3]
    runner.logits([("a", seq)])
    cont = runner.rollout("a", seq, 7, steps=4, min_logp=float("-inf"))
    want, cur = [], [*seq, 7]
    for _ in range(4):
        tok = int(torch.argmax(reference(cur)))
        want.append(tok)
        cur.append(tok)
    assert cont == want
    assert runner.active_keys() == ["a"]
    _check(runner, reference, [("a", [*seq, 250])])   # the cache is seq's, not the rollout's
    # a bound no distribution over 300 tokens of a random model reaches: nothing
    assert runner.rollout("a", [*seq, 250], 7, steps=4, min_logp=-1e-3) == []
    assert runner.rollout("a", seq, 7, steps=0, min_logp=float("-inf")) == []
    # an unknown key: prefilled on the copy, nothing left behind
    assert runner.rollout("b", seq, 7, steps=2, min_logp=float("-inf")) == want[:2]
    assert runner.active_keys() == ["a"]
