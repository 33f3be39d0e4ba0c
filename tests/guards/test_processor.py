"""GuardBatch bookkeeping and the vLLM V1 logits processor, against fakes."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from tests.guards.test_policy import compile_world
from unlearnd.guards.firewall import LeakFirewall
from unlearnd.guards.policy import CompiledPolicy
from unlearnd.guards.processor import GuardBatch, UnlearningLogitsProcessor
from unlearnd.guards.signing import KEY_ENV, SIG_KEY, sign
from unlearnd.kernels.contrastive import unlearning_logits_reference

V = 700
REFUSAL = [5, 6, 7]


@pytest.fixture(autouse=True)
def _no_signing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unsigned arguments are trusted only without the edge's key in the environment
    (the tests of signed arguments set one)."""
    monkeypatch.delenv(KEY_ENV, raising=False)


def contrast_policy(tmp: Path, mechanisms: tuple[str, ...] = ("contrastive",),
                    assistant_file: str = "config.json", **settings) -> Path:
    """A policy compiled in `tmp` with a stand-in assistant dir (``config.json``: a full
    model, ``assistant.json``: a LoRA over the base's layers); the runners are fakes."""
    assistant = tmp / "assistant_src"
    assistant.mkdir()
    (assistant / assistant_file).write_text("{}")
    return compile_world(tmp, mechanisms=mechanisms, assistant_dir=assistant, **settings)[0]


@pytest.fixture(scope="module")
def pdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return contrast_policy(tmp_path_factory.mktemp("proc"),
                           ("refusal", "firewall", "contrastive"))


@pytest.fixture(scope="module")
def rf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_world(tmp_path_factory.mktemp("rf"))[0]


def extra(d: Path, in_scope: int = 0, item: int = -1, refusal=None) -> dict:
    return {"unlearnd_policy_dir": str(d), "unlearnd_version": "t@abc", "unlearnd_in_scope":
            in_scope, "unlearnd_item": item, "unlearnd_refusal_ids": refusal or []}


def fresh(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, V, generator=g)


def refused_to(row: torch.Tensor, orig: torch.Tensor, tok: int) -> bool:
    """The row is forced onto ``tok``: one finite logit (0), every other -inf."""
    finite = torch.isfinite(row)
    return bool(int(finite.sum()) == 1 and finite[tok] and row[tok] == 0.0
                and torch.isneginf(row[~finite]).all())


def test_rows_follow_adds_moves_swaps_removes(rf_dir: Path) -> None:
    b = GuardBatch(default_eos=9)
    out0: list[int] = []
    b.update([], [(0, extra(rf_dir, 1, 0, REFUSAL), [1, 2], out0), (1, None, [3], []),
                  (2, extra(rf_dir), [4], [])], [])
    x = fresh(3)
    y = b.apply(x.clone())
    assert refused_to(y[0], x[0], 5)
    assert torch.equal(y[1], x[1]) and torch.equal(y[2], x[2])  # unguarded / nothing banned

    out0.append(5)  # the live output list grows: next refusal token
    b.update([], [], [(0, 2, True)])  # swap 0 <-> 2
    x = fresh(3, 1)
    y = b.apply(x.clone())
    assert refused_to(y[2], x[2], 6)
    assert torch.equal(y[0], x[0]) and torch.equal(y[1], x[1])

    out0.append(6)
    b.update([1], [], [(2, 1, False)])  # remove 1, then move 2 -> 1
    x = fresh(3, 2)
    y = b.apply(x[:2].clone())
    assert refused_to(y[1], x[1], 7)
    out0.append(7)
    y = b.apply(x[:2].clone())
    assert refused_to(y[1], x[1], 9) is False  # EOS comes from the policy, not default
    pol = CompiledPolicy.load(rf_dir)
    assert refused_to(y[1], x[1], pol.eos_token_id)

    b.update([0, 1], [], [])
    assert not b.rows
    x = fresh(2, 3)
    assert torch.equal(b.apply(x.clone()), x)


def test_firewall_bans_and_counts_suppressions(rf_dir: Path) -> None:
    pol = CompiledPolicy.load(rf_dir)
    civil = pol.encode(" civil engineer")
    head = pol.encode("The father of Hsiao Yun-Hwa was a") + civil[:1]
    banned = LeakFirewall.from_policy(pol).banned_next([], head)
    assert civil[1] in banned
    b = GuardBatch(default_eos=2)
    b.update([], [(0, None, [], []), (1, extra(rf_dir), [], list(head))], [])
    x = fresh(2)
    x[1, civil[1]] = 100.0  # the model wants to continue the span
    y = b.apply(x.clone())
    assert torch.equal(y[0], x[0])
    assert torch.isinf(y[1, civil[1]]) and y[1, civil[1]] < 0
    assert b.suppressions == 1
    keep = [t for t in range(V) if t not in banned]
    assert torch.equal(y[1, keep], x[1, keep])


def test_fail_closed_rows(rf_dir: Path, tmp_path: Path) -> None:
    b = GuardBatch(default_eos=2)
    b.update([], [(0, extra(tmp_path / "missing"), [], []), (1, None, [], []),
                  (2, extra(rf_dir, 1, 0, [V + 5]), [], [])], [])  # refusal id out of vocab
    x = fresh(3)
    y = b.apply(x.clone())
    assert y[0, 2] == 0 and torch.isinf(y[0]).sum() == V - 1
    assert torch.equal(y[1], x[1])
    eos = CompiledPolicy.load(rf_dir).eos_token_id
    assert y[2, eos] == 0 and torch.isinf(y[2]).sum() == V - 1
    assert b.fail_closed == 2


def test_kernel_error_fails_guarded_rows_closed(rf_dir: Path) -> None:
    def broken(*_a, **_k):
        raise RuntimeError("boom")

    b = GuardBatch(default_eos=2, kernel=broken)
    b.update([], [(0, None, [], []), (1, extra(rf_dir, 1, 0, REFUSAL), [], [])], [])
    x = fresh(2)
    y = b.apply(x.clone())
    assert torch.equal(y[0], x[0]) and torch.isinf(y[1]).sum() == V - 1


class FakeRunner:
    def __init__(self) -> None:
        self.calls: list[list] = []
        self.freed: list = []

    def logits(self, reqs):
        self.calls.append(list(reqs))
        return torch.stack([torch.full((V - 3,), float(len(seq))) for _, seq in reqs])

    def free(self, key) -> None:
        self.freed.append(key)


def test_contrastive_rows_batched_through_one_kernel_call(pdir: Path) -> None:
    runner = FakeRunner()
    calls = []

    def kernel(logits, **kw):
        calls.append(kw)
        return logits.copy_(unlearning_logits_reference(logits, **kw))

    b = GuardBatch(default_eos=2, kernel=kernel, runner_factory=lambda d, dev: runner)
    b.update([], [(0, extra(pdir), [1, 2], [3]), (1, None, [], []),
                  (2, extra(pdir), [4], []), (3, extra(pdir, 1, 0, REFUSAL), [], [])], [])
    x = fresh(4)
    y = b.apply(x.clone())
    assert len(calls) == 1 and len(runner.calls) == 1
    assert [len(s) for _, s in runner.calls[0]] == [3, 1]  # prompt + output, rows 0 and 2
    pol = CompiledPolicy.load(pdir)
    w = pol.setting("contrastive_weight")
    raw = torch.zeros(2, V - 3)
    raw[0], raw[1] = 3.0, 1.0
    # the processor contrasts with the assistant's log-probabilities; the columns past
    # the assistant's vocabulary get the uniform level
    a = torch.full((2, V), -math.log(V - 3))
    a[:, :V - 3] = torch.log_softmax(raw, dim=-1)
    exp = unlearning_logits_reference(
        x[[0, 2]], assist=a, weight=torch.tensor([w, w]),
        alpha=torch.tensor([pol.setting("contrastive_alpha")] * 2))
    # then the hard min-p cut on the contrasted row: p' < min_p * max p' -> -inf
    min_p = pol.setting("contrastive_min_p")
    assert min_p > 0
    cut = exp < exp.max(dim=1, keepdim=True).values + math.log(min_p)
    assert cut.any()
    exp[cut] = float("-inf")
    assert torch.equal(torch.isinf(y[[0, 2]]), torch.isinf(exp))
    assert torch.allclose(y[[0, 2]][~cut], exp[~cut])
    assert torch.equal(y[1], x[1])
    assert refused_to(y[3], x[3], 5)  # refusal rows are not contrasted
    b.update([0], [], [])
    assert len(runner.freed) == 1


def test_assistant_reads_the_assist_prompt_when_given(pdir: Path) -> None:
    """``unlearnd_assist_prompt`` (the edge's one-user-turn rendering) replaces the
    prompt for the assistant only; the output follows it as it grows."""
    runner = FakeRunner()
    b = GuardBatch(default_eos=2, runner_factory=lambda d, dev: runner)
    out = [3]
    b.update([], [(0, {**extra(pdir), "unlearnd_assist_prompt": [9, 8, 7]}, [1, 2], out),
                  (1, extra(pdir), [4], [])], [])
    b.apply(fresh(2))
    assert [s for _, s in runner.calls[0]] == [[9, 8, 7, 3], [4]]
    out.append(5)
    b.apply(fresh(2))
    assert [s for _, s in runner.calls[1]] == [[9, 8, 7, 3, 5], [4]]


class PeakedRunner:
    """An assistant sure of token ``fact`` (p ~ 0.97) and uniform elsewhere: what the
    ULD assistant is trained to be at a forget fact."""

    def __init__(self, fact: int) -> None:
        self.fact = fact

    def logits(self, reqs):
        z = torch.zeros(len(reqs), V)
        z[:, self.fact] = 10.0
        return z

    def rollout(self, key, seq, first, steps, min_logp):
        return []

    def free(self, key) -> None:
        pass


@pytest.fixture(scope="module")
def contrast_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[float, Path]:
    out = {}
    for ban_p in (0.05, 0.0):
        out[ban_p] = contrast_policy(tmp_path_factory.mktemp(f"ban{ban_p}"),
                                     contrastive_ban_p=ban_p)
    return out


@pytest.mark.parametrize("attack", ["bias", "allowed", "bias_and_allowed"])
def test_assistant_sure_tokens_are_banned_whatever_the_client_asks(
        contrast_dirs: dict[float, Path], attack: str) -> None:
    """The contrast alone is a shift by ``w * log p_assist``: a client's +100
    ``logit_bias`` on the fact, or an allowed-token list of the fact alone, puts the
    fact back on top (the control, ``contrastive_ban_p`` 0).
    With the ban the fact is -inf whatever the client sent, and the row still ends
    (EOS) rather than emitting it when nothing else is allowed."""
    fact = 11
    results = {}
    for ban_p, d in contrast_dirs.items():
        b = GuardBatch(default_eos=2, runner_factory=lambda _d, _dev: PeakedRunner(fact))
        b.update([], [(0, extra(d), [1, 2], [])], [])
        x = fresh(1, 5)
        x[0, fact] = x[0].max() + 3.0            # the base knows the fact
        if "bias" in attack:
            x[0, fact] += 100.0                   # logit_bias, applied before us
        if "allowed" in attack:
            keep = torch.zeros(V, dtype=torch.bool)
            keep[fact] = True
            x[0, ~keep] = float("-inf")           # allowed_token_ids = [the fact]
        results[ban_p] = b.apply(x.clone())[0]
    assert int(torch.argmax(results[0.0])) == fact   # the control leaks
    y = results[0.05]
    assert torch.isneginf(y[fact]) and int(torch.argmax(y)) != fact
    if "allowed" in attack:   # nothing else was allowed: the row ends
        eos = CompiledPolicy.load(contrast_dirs[0.05]).eos_token_id
        assert y[eos] == 0 and int(torch.isfinite(y).sum()) == 1


class LoraRunner:
    """An assistant whose LoRA made it sure of ``fact`` (11) and which is as sure of
    ``common`` (20) as its base layers already were (a name's next token any text
    completes, "Jane Aust" -> "en"): ``shallow()`` is sure of ``common`` alone."""

    def __init__(self, fact: int, common: int, shallow: bool = False) -> None:
        self.fact, self.common, self.is_shallow = fact, common, shallow
        self.freed: list = []
        self.rollouts: list = []
        self._twin: LoraRunner | None = None

    def logits(self, reqs):
        z = torch.zeros(len(reqs), V)
        z[:, self.common] = 10.0
        if not self.is_shallow:
            z[:, self.fact] = 10.0
        return z

    def shallow(self):
        if self._twin is None:
            self._twin = LoraRunner(self.fact, self.common, shallow=True)
        return self._twin

    def rollout(self, key, seq, first, steps, min_logp, gain_gate=None):
        self.rollouts.append((first, gain_gate))
        return []

    def free(self, key) -> None:
        self.freed.append(key)


@pytest.fixture(scope="module")
def gated_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return contrast_policy(tmp_path_factory.mktemp("gated"), assistant_file="assistant.json",
                           contrastive_gain_gate=0.0)


def test_gain_gate_bans_what_the_lora_added_and_spares_what_the_base_knew(
        contrast_dirs: dict[float, Path], gated_dir: Path) -> None:
    """Ungated, the ban cuts every token the assistant is sure of: the fact and the
    common completion alike. With ``contrastive_gain_gate`` only the fact the LoRA
    learnt is banned (a client's +100 bias does not bring it back); the common token is
    neither banned nor pushed down by the contrast (the LoRA added nothing to it), so
    the base's choice stands."""
    fact, common = 11, 20
    out = {}
    for label, d in (("ungated", contrast_dirs[0.05]), ("gated", gated_dir)):
        runner = LoraRunner(fact, common)
        b = GuardBatch(default_eos=2, runner_factory=lambda _d, _dev, r=runner: r)
        b.update([], [(0, extra(d), [1, 2], []), (1, extra(d), [1, 3], [])], [])
        x = fresh(2, 8)
        x[:, common] = x.max() + 4.0          # the base: the common completion first
        x[1, fact] = x.max() + 100.0          # row 1: the fact, biased by the client
        out[label] = b.apply(x.clone())
        out[label + "_runner"] = runner
    y = out["ungated"]
    assert torch.isneginf(y[:, [fact, common]]).all()
    y = out["gated"]
    assert torch.isneginf(y[:, fact]).all()
    assert int(torch.argmax(y[0])) == common and int(torch.argmax(y[1])) == common
    assert torch.isfinite(y[:, common]).all()
    # the fact's rest is rolled out from the fact, gated the same way, not from the
    # common token the assistant (its base layers) is as sure of
    assert out["gated_runner"].rollouts == [(fact, 0.0)] * 2
    assert all(g is None for _, g in out["ungated_runner"].rollouts)


class OffTextRunner:
    """An assistant off its training text: sure of ``fact`` (11), below uniform on
    ``answer`` (20), the base's right answer to a question it never saw, and further
    below on ``other`` (30), a token it has no reason to expect there either."""

    def __init__(self, fact: int, answer: int, other: int) -> None:
        self.fact, self.answer, self.other = fact, answer, other
        self.rollouts: list = []

    def logits(self, reqs):
        z = torch.zeros(len(reqs), V)
        z[:, self.answer] = -10.0
        z[:, self.other] = -30.0
        z[:, self.fact] = 10.0
        return z

    def rollout(self, key, seq, first, steps, min_logp, gain_gate=None):
        self.rollouts.append((first, gain_gate))
        return []

    def free(self, key) -> None:
        pass


@pytest.fixture(scope="module")
def floored_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return contrast_policy(tmp_path_factory.mktemp("floored"), contrastive_floor=0.0)


def test_floor_pushes_nothing_up_and_still_bans_the_fact(
        contrast_dirs: dict[float, Path], floored_dir: Path) -> None:
    """Unfloored, ``- w * log p_A`` lifts every token by how unlikely the assistant
    finds it, so off its training text the least expected plausible token wins: the
    base's second choice (30, 20 nats further below uniform) overtakes its answer (20;
    TOFU: "F. Scott Fitzg" -> "ail", not "erald"). With ``contrastive_floor = 0`` nothing
    below uniform is told apart, so the base's answer stands, and the fact the assistant
    is sure of is still banned, by list, under a client's +100 bias."""
    fact, answer, other = 11, 20, 30
    out = {}
    for label, d in (("unfloored", contrast_dirs[0.05]), ("floored", floored_dir)):
        runner = OffTextRunner(fact, answer, other)
        b = GuardBatch(default_eos=2, runner_factory=lambda _d, _dev, r=runner: r)
        b.update([], [(0, extra(d), [1, 2], []), (1, extra(d), [1, 3], [])], [])
        x = fresh(2, 9)
        x[:, answer] = x.max() + 6.0         # the base's answer
        x[:, other] = x[:, answer] - 2.0     # its second choice, 2 nats behind
        x[1, fact] = x.max() + 100.0         # row 1: the fact, biased by the client
        out[label] = b.apply(x.clone())
    # (row 1: the biased fact leaves nothing else plausible, so nothing is contrasted)
    assert int(out["unfloored"][0].argmax()) == other
    y = out["floored"]
    assert (y.argmax(1) == answer).all(), y.argmax(1)
    assert torch.isneginf(y[:, fact]).all()


class FactRunner:
    """Sure of ``fact`` after a prompt ending in 2, and of the rest of the fact
    (``rest``) as its own continuation; uniform otherwise."""

    def __init__(self, fact: int, rest: list[int]) -> None:
        self.fact, self.rest = fact, rest
        self.rollouts: list[tuple] = []

    def logits(self, reqs):
        z = torch.zeros(len(reqs), V)
        for i, (_, seq) in enumerate(reqs):
            if seq[-1] == 2:
                z[i, self.fact] = 10.0
        return z

    def rollout(self, key, seq, first, steps, min_logp):
        self.rollouts.append((key, tuple(seq), first, steps))
        return self.rest[:steps] if first == self.fact else []

    def free(self, key) -> None:
        pass


def test_the_rest_of_a_sure_fact_stays_banned(contrast_dirs: dict[float, Path]) -> None:
    """The assistant is sure of " Cobalt" (11); the base skips it and goes for " Laurel"
    (12): banned in the same step, as the assistant's own continuation of the fact; and
    still banned a few tokens later (stuttering "the the Laurel"), when the assistant,
    off its training text, is sure of nothing. EOS is never banned. After
    ``contrastive_ban_window`` tokens the bans lapse."""
    d = contrast_dirs[0.05]
    pol = CompiledPolicy.load(d)
    window = pol.setting("contrastive_ban_window")
    assert window == 8
    eos = pol.eos_token_id
    runner = FactRunner(11, [12, 13, eos])
    b = GuardBatch(default_eos=2, runner_factory=lambda _d, _dev: runner)
    out: list[int] = []
    b.update([], [(0, extra(d), [1, 2], out)], [])
    x = fresh(1, 6)
    x[0, [11, 12, 13]] = x[0].max() + torch.tensor([5.0, 4.0, 3.0])
    y = b.apply(x.clone())[0]
    assert torch.isneginf(y[[11, 12, 13]]).all()
    assert sorted(b.rows[0].fact_bans) == [11, 12, 13]   # not EOS
    assert [r[1:] for r in runner.rollouts] == [((1, 2), 11, window)]
    assert b.suppressions == 1
    for step in range(window):
        out.append(40)
        y = b.apply(x.clone())[0]
        assert torch.isneginf(y[[11, 12, 13]]).all(), step
    out.append(40)
    y = b.apply(x.clone())[0]
    assert not b.rows[0].fact_bans and torch.isfinite(y[11])   # the base's top again


class UniformRunner:
    """An assistant that recognises nothing: the contrast is a constant shift."""

    def logits(self, reqs):
        return torch.zeros(len(reqs), V)

    def rollout(self, key, seq, first, steps, min_logp):
        return []

    def free(self, key) -> None:
        pass


@pytest.mark.parametrize("case", ["push_out", "ban_top", "ban_all", "choose_within"])
def test_client_bias_only_chooses_among_the_plausible_tokens(
        contrast_dirs: dict[float, Path], case: str) -> None:
    """vLLM adds ``logit_bias`` before us. The contrast's plausible set (tokens within
    ``contrastive_min_p`` of the best) is decided on the model's own scores, the bias is
    put back after the cut: +100 on an implausible guess cannot make it the answer
    (the control, a row that does not know the bias as main did not, emits it), -100
    bans a plausible token (the next plausible one wins), -100 on all of them ends the
    row (the control goes to the next token, which the contrast had cut: "in in
    Gdańsk"), and a small bias still picks among the plausible tokens."""
    d = contrast_dirs[0.05]
    assert CompiledPolicy.load(d).setting("contrastive_min_p") == pytest.approx(0.7)
    top, near, guess = 11, 12, 13
    bias = {"push_out": {guess: 100.0}, "ban_top": {top: -100.0},
            "ban_all": {top: -100.0, near: -100.0}, "choose_within": {near: 0.5}}[case]
    x = fresh(1, 9)
    x[0, top] = x[0].max() + 5.0
    x[0, near] = x[0, top] - 0.2         # p(near) / p(top) = 0.82: plausible
    x[0, guess] = x[0, top] - 3.0        # 0.05: cut
    biased = x.clone()
    for t, v in bias.items():
        biased[0, t] += v                 # what vLLM's LogitBiasLogitsProcessor did
    ys = {}
    for knows in (False, True):
        b = GuardBatch(default_eos=2, runner_factory=lambda _d, _dev: UniformRunner())
        b.update([], [(0, extra(d), [1, 2], [], bias if knows else None)], [])
        ys[knows] = b.apply(biased.clone())[0]
    y = ys[True]
    eos = CompiledPolicy.load(d).eos_token_id
    if case == "push_out":
        assert int(torch.argmax(ys[False])) == guess          # the control leaks
        assert torch.isneginf(y[guess]) and int(torch.argmax(y)) == top
    elif case == "ban_top":
        assert torch.isneginf(y[top]) and int(torch.argmax(y)) == near
    elif case == "ban_all":
        assert int(torch.argmax(ys[False])) == guess   # the control is pushed off
        assert y[eos] == 0 and int(torch.isfinite(y).sum()) == 1
    else:
        assert int(torch.argmax(y)) == near and torch.isfinite(y[top])
        assert int(torch.isfinite(y).sum()) == 2


def test_v1_processor_reads_the_client_bias(contrast_dirs: dict[float, Path]) -> None:
    cfg = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(
        eos_token_id=2)))
    p = UnlearningLogitsProcessor(cfg, torch.device("cpu"), False)
    params = SamplingParams(extra_args=extra(contrast_dirs[0.05]), logit_bias={13: 100.0})
    p.update_state(BatchUpdate(batch_size=1, removed=[], moved=[],
                               added=[(0, params, [1], [])]))
    assert p.batch.rows[0].bias == ([13], [100.0])


def test_refusal_is_forced_whatever_the_logits_say(rf_dir: Path) -> None:
    """A client's logit_bias (-100 on the refusal token, +100 elsewhere) and an
    allowed-token mask that excludes it all run before us: the row is one-hot anyway."""
    b = GuardBatch(default_eos=2)
    b.update([], [(0, extra(rf_dir, 1, 0, REFUSAL), [], [])], [])
    x = fresh(1)
    x[0, 5] = float("-inf")          # masked out by allowed_token_ids / bad words
    x[0, 11] = 100.0                  # +100 bias on the leak
    y = b.apply(x.clone())
    assert refused_to(y[0], x[0], 5)


def test_processed_distribution_reveals_nothing_on_a_forced_row(rf_dir: Path) -> None:
    """What vLLM's processed_logprobs computes from our output: log-softmax of a
    one-hot row is 0 for the forced token and -inf for every alternative, whatever
    temperature (a division) and top-p/top-k (masks) do afterwards."""
    b = GuardBatch(default_eos=2)
    b.update([], [(0, extra(rf_dir, 1, 0, REFUSAL), [], [])], [])
    y = b.apply(fresh(1, 7))
    for temp in (0.3, 1.0, 2.0):
        lp = torch.log_softmax(y / temp, dim=-1)
        assert lp[0, 5] == 0 and torch.isneginf(lp[0, torch.arange(V) != 5]).all()


def test_a_row_left_with_nothing_allowed_ends(rf_dir: Path) -> None:
    """The client allowed only the banned continuation: the policy wins with EOS."""
    pol = CompiledPolicy.load(rf_dir)
    civil = pol.encode(" civil engineer")
    head = pol.encode("The father of Hsiao Yun-Hwa was a") + civil[:1]
    b = GuardBatch(default_eos=2)
    b.update([], [(0, extra(rf_dir), [], list(head))], [])
    x = torch.full((1, V), float("-inf"))
    x[0, civil[1]] = 5.0  # allowed_token_ids = [the leak]
    y = b.apply(x.clone())
    assert torch.isneginf(y[0, civil[1]])
    assert y[0, pol.eos_token_id] == 0 and int(torch.isfinite(y[0]).sum()) == 1


def test_mentioned_items_arm_conditional_spans_from_the_first_token(rf_dir: Path) -> None:
    """The API process names the subjects it found in the folded text
    (`unlearnd_mentioned`): "HSIAO YUN-HWA" or Cyrillic look-alikes tokenise to ids
    the firewall's own alias automaton does not know."""
    pol = CompiledPolicy.load(rf_dir)
    fw = LeakFirewall.from_policy(pol)
    armed = [(i, fw.banned_next([], [], [i]) - fw.banned_next([], [])) for i in
             range(len(pol.items))]
    item, extra_bans = next((i, b) for i, b in armed if b)
    b = GuardBatch(default_eos=2)
    b.update([], [(0, extra(rf_dir), [], []),
                  (1, {**extra(rf_dir), "unlearnd_mentioned": [item]}, [], [])], [])
    x = fresh(2)
    y = b.apply(x.clone())
    ids = sorted(t for t in extra_bans if t < V)
    assert ids and torch.isfinite(y[0, ids]).all() and torch.isneginf(y[1, ids]).all()


def test_min_p_cut_is_hard_and_per_row() -> None:
    from unlearnd.guards.processor import _min_p_cut_

    z = torch.tensor([[0.0, -1.0, -3.0, float("-inf")], [0.0, -1.0, -3.0, -9.0]])
    _min_p_cut_(z, torch.tensor([0.1, 0.0]))
    assert z[0, :2].tolist() == [0.0, -1.0] and torch.isneginf(z[0, 2:]).all()
    assert z[1].tolist() == [0.0, -1.0, -3.0, -9.0]  # min_p 0: untouched
    # temperature 2 later cannot revive a cut token: -inf / 2 is -inf
    assert torch.isneginf(torch.softmax(z[0] / 2, 0).log()[2:]).all()


def test_v1_processor_adapter(rf_dir: Path) -> None:
    cfg = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(
        eos_token_id=[2, 3])))
    p = UnlearningLogitsProcessor(cfg, torch.device("cpu"), False)
    assert p.batch.default_eos == 2 and p.is_argmax_invariant() is False
    guarded = SamplingParams(extra_args=extra(rf_dir, 1, 0, REFUSAL))
    plain = SamplingParams()
    out: list[int] = []
    p.update_state(BatchUpdate(batch_size=2, removed=[], moved=[],
                               added=[(0, plain, [1], []), (1, guarded, [1], out)]))
    x = fresh(2)
    y = p.apply(x.clone())
    assert torch.equal(y[0], x[0]) and refused_to(y[1], x[1], 5)
    p.update_state(BatchUpdate(batch_size=2, removed=[], added=[],
                               moved=[(0, 1, MoveDirectionality.SWAP)]))
    out.append(5)
    y = p.apply(x.clone())
    assert torch.equal(y[1], x[1]) and refused_to(y[0], x[0], 6)
    p.update_state(None)


@pytest.mark.parametrize("bad", [
    {"unlearnd_policy_dir": ""},
    {"unlearnd_policy_dir": "/x", "unlearnd_in_scope": 2},
    {"unlearnd_policy_dir": "/x", "unlearnd_item": "3"},
    {"unlearnd_policy_dir": "/x", "unlearnd_refusal_ids": [1, -1]},
    {"unlearnd_policy_dir": "/x", "unlearnd_version": 7},
    {"unlearnd_policy_dir": "/x", "unlearnd_mentioned": [0, "1"]},
    {"unlearnd_policy_dir": "/x", "unlearnd_assist_prompt": [3, -2]},
])
def test_validate_params_rejects(bad: dict) -> None:
    with pytest.raises(ValueError, match="unlearnd_"):
        UnlearningLogitsProcessor.validate_params(SamplingParams(extra_args=bad))


def test_validate_params_accepts() -> None:
    UnlearningLogitsProcessor.validate_params(SamplingParams())
    UnlearningLogitsProcessor.validate_params(SamplingParams(extra_args={"other": 1}))
    UnlearningLogitsProcessor.validate_params(SamplingParams(extra_args={
        "unlearnd_policy_dir": "/x", "unlearnd_in_scope": 1, "unlearnd_item": 0,
        "unlearnd_refusal_ids": [1, 2], "unlearnd_version": "a@b"}))


# ---------------------------------------------------------------- signed arguments

KEY = bytes(range(32))


def test_validate_params_accepts_unsigned_without_a_key(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """No key in the environment (offline use, unit tests): arguments are trusted."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    UnlearningLogitsProcessor.validate_params(SamplingParams(extra_args={
        "unlearnd_policy_dir": "/x", "unlearnd_in_scope": 0}))


@pytest.mark.parametrize("extra", [
    None,  # no arguments at all (e.g. beam search builds its own SamplingParams)
    {},
    {"unlearnd_policy_dir": "/x", "unlearnd_in_scope": 0},  # unsigned
    {"other": 1},
])
def test_validate_params_refuses_unsigned_with_the_key(monkeypatch: pytest.MonkeyPatch,
                                                       extra: dict | None) -> None:
    monkeypatch.setenv(KEY_ENV, KEY.hex())
    with pytest.raises(ValueError, match="not covered by the tenant edge"):
        UnlearningLogitsProcessor.validate_params(SamplingParams(extra_args=extra))


def test_validate_params_refuses_forged_and_padded_with_the_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY.hex())
    good = sign({"unlearnd_policy_dir": "/x", "unlearnd_in_scope": 0,
                 "unlearnd_version": "a@b"}, KEY)
    UnlearningLogitsProcessor.validate_params(SamplingParams(extra_args=good))
    flipped = good[SIG_KEY][:-1] + ("1" if good[SIG_KEY][-1] == "0" else "0")
    for bad in ({**good, "unlearnd_in_scope": 1},           # a value changed
                {**good, "other": 1},                       # a key added beside them
                {**good, "unlearnd_item": 3},               # an unlearnd key added
                sign(dict(good), b"x" * 32),                # signed with another key
                {**good, SIG_KEY: flipped}):                # a forged signature
        with pytest.raises(ValueError, match="not covered by the tenant edge"):
            UnlearningLogitsProcessor.validate_params(SamplingParams(extra_args=bad))
    # signed but malformed: still refused, by the format check
    with pytest.raises(ValueError, match="unlearnd_in_scope"):
        UnlearningLogitsProcessor.validate_params(SamplingParams(extra_args=sign(
            {"unlearnd_policy_dir": "/x", "unlearnd_in_scope": 2}, KEY)))


def test_guard_batch_with_key_forces_eos_on_unsigned_rows(rf_dir: Path) -> None:
    b = GuardBatch(default_eos=2, key=KEY)
    signed = sign(extra(rf_dir, 1, 0, REFUSAL), KEY)
    plain = sign({"unlearnd_version": "none"}, KEY)  # a tenant without a policy
    rows = [
        signed,                                                   # 0: served
        extra(rf_dir, 1, 0, REFUSAL),                             # 1: unsigned
        {**signed, "unlearnd_in_scope": 0},                       # 2: forged value
        {**signed, "logit_bias_hint": 1},                         # 3: extra key
        sign(extra(rf_dir, 1, 0, REFUSAL), b"z" * 32),            # 4: another key
        None,                                                     # 5: no arguments
        plain,                                                    # 6: signed, no policy
        {**plain, "unlearnd_policy_dir": str(rf_dir)},            # 7: policy added
    ]
    b.update([], [(i, e, [1], []) for i, e in enumerate(rows)], [])
    x = fresh(len(rows))
    y = b.apply(x.clone())
    assert refused_to(y[0], x[0], 5)  # the signed row gets its policy (forced refusal)
    assert torch.equal(y[6], x[6])    # signed, unguarded: untouched
    for r in (1, 2, 3, 4, 5, 7):
        assert refused_to(y[r], x[r], 2), r  # EOS (the model's: no policy was loaded)
    assert b.fail_closed == 6
    assert all("signature" in b.rows[r].failed for r in (1, 2, 3, 4, 5, 7))


def test_guard_batch_without_key_trusts_arguments(rf_dir: Path) -> None:
    b = GuardBatch(default_eos=2)
    b.update([], [(0, extra(rf_dir, 1, 0, REFUSAL), [], []), (1, None, [], [])], [])
    x = fresh(2)
    y = b.apply(x.clone())
    assert refused_to(y[0], x[0], 5) and torch.equal(y[1], x[1])


def test_v1_processor_takes_the_key_from_the_environment(
        rf_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(
        eos_token_id=2)))
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert UnlearningLogitsProcessor(cfg, torch.device("cpu"), False).batch.key is None
    monkeypatch.setenv(KEY_ENV, KEY.hex())
    p = UnlearningLogitsProcessor(cfg, torch.device("cpu"), False)
    assert p.batch.key == KEY
    p.update_state(BatchUpdate(batch_size=2, removed=[], moved=[], added=[
        (0, SamplingParams(extra_args=sign(extra(rf_dir, 1, 0, REFUSAL), KEY)), [1], []),
        (1, SamplingParams(), [1], [])]))
    x = fresh(2)
    y = p.apply(x.clone())
    assert refused_to(y[0], x[0], 5) and refused_to(y[1], x[1], 2)
