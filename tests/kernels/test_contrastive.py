"""Fused contrastive-decoding op: Triton kernel vs torch reference vs numpy spec.

How the Triton path runs here without a GPU: triton 3.9 picks compiled or
interpreted code when `triton.jit` runs, reading `TRITON_INTERPRET` then
(`triton.knobs.runtime.interpret` reads the environment on every access).
`unlearnd.kernels.contrastive` jits its kernel lazily, once per mode, so the
`interpret` fixture below only sets the variable (monkeypatch) before the first
`backend="triton"` call, even after `import triton` (vLLM and other tests import it
first). No subprocess is needed, and the variable is restored after each test. One
trap, found here: triton's own `tl.max`/`tl.sum` are jitted at `import triton`, so
after a late switch the interpreter refuses them ("Cannot call @triton.jit'd outside
of the scope of a kernel"). The kernel therefore reduces with `tl.reduce` and
triton's standard combine functions, which the interpreter maps to numpy.

Budget: the interpreter runs each program's tl ops as numpy calls, about 0.3 s for
7 x 50257 with every feature on, ~10 s for 64 x 151936. The kernel-vs-reference grid
therefore covers every vocab size x dtype at rows 1 and 7, and rows 64 at vocab 50257
(fp32, bf16): per-row work is independent (one program per row), so 64 rows add
launch-grid coverage, not new code paths. The reference-vs-numpy test covers the
whole grid (4 vocabs x rows 1/7/64 x 3 dtypes), which is cheap.

Unwritten elements: the op is in place, so a kernel that skips an element leaves
the input there. Tests that claim full coverage first assert that the reference
differs from the input at EVERY element (assist magnitudes >= 0.5, or
drop_implausible), so any element the kernel forgot shows up; strided `logits`
views carry a NaN-poisoned tail that must stay bit-identical (no stray writes).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unlearnd.kernels import contrastive as C
from unlearnd.kernels.contrastive import (
    pack_banned,
    unlearning_logits_,
    unlearning_logits_reference,
)

triton_missing = pytest.mark.skipif(not C.triton_available(), reason="triton not installed")

VOCABS = (32000, 50257, 128256, 151936)
ROWS = (1, 7, 64)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# kernel vs reference: fp32 differs only by op order (1-2 ulp); bf16/fp16 may differ
# by one output ulp (triton's interpreter truncates fp32->bf16 instead of rounding).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}
K_BIAS = 6
PAD = 37  # extra poisoned columns after the vocabulary in strided views


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run backend='triton' on CPU tensors through triton's interpreter."""
    if not C.triton_available():
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert C._interpreting()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _away_from_zero(shape: tuple[int, ...], g: torch.Generator, lo: float = 0.5) -> torch.Tensor:
    """Random values with |x| in [lo, lo + 2): never zero, random sign."""
    mag = lo + 2 * torch.rand(shape, generator=g)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return mag * sign


def _make(rows: int, vocab: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Fresh random inputs; every optional operand present and non-trivial."""
    g = _gen(seed)
    logits = (4 * torch.randn(rows, vocab, generator=g)).to(dtype)
    assist = _away_from_zero((rows, vocab), g).to(dtype)
    # assist - assist_neg stays >= ~0.5 in magnitude after rounding (never cancels).
    assist_neg = (assist.float() - _away_from_zero((rows, vocab), g)).to(dtype)
    weight = 0.5 + torch.rand(rows, generator=g)
    alpha = 0.05 + 0.5 * torch.rand(rows, generator=g)
    if rows > 1:
        weight[1] = 0.0  # contrast off on this row
        alpha[0] = 0.0  # every token plausible
    if rows > 2:
        alpha[2] = 1.0  # only the argmax
    bias_ids = torch.randint(0, vocab, (rows, K_BIAS), generator=g, dtype=torch.int32)
    bias_ids[:, -1] = -1  # padding
    bias_ids[:, 1] = bias_ids[:, 0]  # repeated id: values add up
    bias_ids[0, 2] = vocab - 1  # last token (tail block)
    bias_vals = 3 * torch.randn(rows, K_BIAS, generator=g)
    banned_lists = []
    for r in range(rows):
        ids = torch.randint(0, vocab, (50,), generator=g).tolist()
        ids += [31, vocab - 1] if r % 2 == 0 else [0, 32]
        ids.append(int(bias_ids[r, 3]))  # a banned token that also gets a bias
        banned_lists.append(ids)
    banned = pack_banned(banned_lists, vocab)
    return dict(
        logits=logits,
        assist=assist,
        assist_neg=assist_neg,
        weight=weight,
        alpha=alpha,
        bias_ids=bias_ids,
        bias_vals=bias_vals,
        banned=banned,
    )


def _poisoned_view(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of `logits` inside a wider NaN-filled buffer: (view, buffer)."""
    rows, vocab = logits.shape
    buf = torch.full((rows, vocab + PAD), float("nan"), dtype=logits.dtype)
    view = buf[:, :vocab]
    view.copy_(logits)
    return view, buf


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Same -inf positions, then values within the dtype's tolerance."""
    got32, want32 = got.float(), want.float()
    assert torch.equal(torch.isneginf(got32), torch.isneginf(want32))
    assert not torch.isnan(got32).any()
    fin = torch.isfinite(want32)
    torch.testing.assert_close(got32[fin], want32[fin], **TOL[dtype])


def _run_kernel_vs_reference(inp: dict[str, torch.Tensor], **kw: object) -> None:
    logits = inp["logits"]
    dtype = logits.dtype
    args = {k: v for k, v in inp.items() if k != "logits"}
    want = unlearning_logits_reference(logits, **args, **kw)
    view, buf = _poisoned_view(logits)
    tail_before = buf[:, logits.shape[1] :].clone()
    out = unlearning_logits_(view, **args, backend="triton", **kw)
    assert out is view
    _assert_close(view, want, dtype)
    # nothing written past the vocabulary (the tail stays NaN, bit for bit).
    assert torch.equal(
        buf[:, logits.shape[1] :].view(torch.int16 if dtype != torch.float32 else torch.int32),
        tail_before.view(torch.int16 if dtype != torch.float32 else torch.int32),
    )


# ----------------------------------------------------------- kernel vs reference

KERNEL_GRID = [(v, r, d) for v in VOCABS for r in (1, 7) for d in DTYPES] + [
    (50257, 64, d) for d in (torch.float32, torch.bfloat16)
]


@triton_missing
@pytest.mark.parametrize(
    "vocab,rows,dtype", KERNEL_GRID, ids=[f"V{v}-R{r}-{str(d)[6:]}" for v, r, d in KERNEL_GRID]
)
def test_kernel_matches_reference_all_features(
    interpret: None, vocab: int, rows: int, dtype: torch.dtype
) -> None:
    inp = _make(rows, vocab, dtype, seed=vocab + rows)
    del inp["assist_neg"]  # ULD here, delta below
    _run_kernel_vs_reference(inp)


@triton_missing
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("vocab,rows", [(32000, 7), (151936, 1)])
def test_kernel_delta_drop_implausible_writes_every_element(
    interpret: None, vocab: int, rows: int, dtype: torch.dtype
) -> None:
    inp = _make(rows, vocab, dtype, seed=11 * vocab + rows)
    inp["weight"] = 0.5 + torch.rand(rows, generator=_gen(3))  # no weight-0 row
    inp["alpha"] = torch.full((rows,), 0.2)
    want = unlearning_logits_reference(**inp, drop_implausible=True)
    # every element moves: plausible ones by w*(a-b) != 0, the others to -inf.
    changed = want.float() != inp["logits"].float()
    assert changed.all(), "test inputs leave elements unchanged; cannot detect skips"
    _run_kernel_vs_reference(inp, drop_implausible=True)


@triton_missing
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_kernel_uld_alpha0_writes_every_element(interpret: None, dtype: torch.dtype) -> None:
    rows, vocab = 7, 128256
    g = _gen(5)
    logits = (4 * torch.randn(rows, vocab, generator=g)).to(dtype)
    assist = _away_from_zero((rows, vocab), g).to(dtype)
    weight = 0.5 + torch.rand(rows, generator=g)
    alpha = torch.zeros(rows)
    want = unlearning_logits_reference(logits, assist, weight=weight, alpha=alpha)
    assert (want.float() != logits.float()).all()
    _run_kernel_vs_reference(dict(logits=logits, assist=assist, weight=weight, alpha=alpha))


@triton_missing
@pytest.mark.parametrize("drop", [False, True], ids=["keep", "drop"])
@pytest.mark.parametrize(
    "present",
    [
        ("assist",),
        ("assist", "assist_neg"),
        ("assist", "alpha"),
        ("assist", "weight", "bias_ids", "bias_vals"),
        ("banned",),
        ("bias_ids", "bias_vals"),
        ("alpha", "banned"),
        (),
    ],
    ids=lambda p: "+".join(p) or "none",
)
def test_kernel_operand_subsets(interpret: None, present: tuple[str, ...], drop: bool) -> None:
    inp = _make(7, 50257, torch.float32, seed=len(present) * 7 + int(drop))
    args = {k: v for k, v in inp.items() if k in present}
    _run_kernel_vs_reference(dict(logits=inp["logits"], **args), drop_implausible=drop)


@triton_missing
@pytest.mark.parametrize("vocab", [32000, 50257])
def test_kernel_row_max_found_at_block_edges(interpret: None, vocab: int) -> None:
    # argmax at the first token, the last token (partial tail block) and either side
    # of a 4096/16384 block boundary; alpha=1 contrasts only the argmax, so a pass 1
    # that misses any position picks the wrong threshold.
    positions = [0, vocab - 1, 4095, 4096, 16383, 16384]
    rows = len(positions)
    g = _gen(vocab)
    logits = torch.randn(rows, vocab, generator=g)
    for r, pos in enumerate(positions):
        logits[r, pos] = logits[r].max() + 1.0
    assist = _away_from_zero((rows, vocab), g)
    alpha = torch.tensor([1.0, 1.0, 1.0, 0.9, 1.0, 0.9])
    want = unlearning_logits_reference(logits, assist, alpha=alpha)
    assert torch.equal((want != logits).nonzero()[:, 1], torch.tensor(positions))
    _run_kernel_vs_reference(dict(logits=logits, assist=assist, alpha=alpha))


@triton_missing
def test_kernel_int64_bias_ids_and_strided_inputs(interpret: None) -> None:
    inp = _make(7, 32000, torch.float32, seed=99)
    inp["bias_ids"] = inp["bias_ids"].long()
    # assist as a column slice of a wider tensor (row stride != vocab).
    wide = torch.randn(7, 32000 + 5, generator=_gen(1))
    wide[:, :32000] = inp["assist"]
    inp["assist"] = wide[:, :32000]
    _run_kernel_vs_reference(inp)


# -------------------------------------------------------- semantics of the spec


def test_alpha_one_contrasts_only_the_argmax() -> None:
    g = _gen(7)
    logits = torch.randn(5, 1000, generator=g)
    assist = _away_from_zero((5, 1000), g)
    out = unlearning_logits_reference(logits, assist, weight=torch.ones(5), alpha=torch.ones(5))
    arg = logits.argmax(dim=1)
    rows = torch.arange(5)
    torch.testing.assert_close(out[rows, arg], logits[rows, arg] - assist[rows, arg])
    keep = torch.ones_like(logits, dtype=torch.bool)
    keep[rows, arg] = False
    assert torch.equal(out[keep], logits[keep])


def test_alpha_zero_contrasts_everything_including_neg_inf() -> None:
    g = _gen(8)
    logits = torch.randn(3, 500, generator=g)
    logits[0, :10] = float("-inf")
    assist = _away_from_zero((3, 500), g)
    w = torch.tensor([0.5, 1.0, 2.0])
    out = unlearning_logits_reference(logits, assist, weight=w, alpha=torch.zeros(3))
    torch.testing.assert_close(out, logits - w[:, None] * assist)
    assert torch.isneginf(out[0, :10]).all()


def test_plausibility_mask_matches_probability_definition() -> None:
    g = _gen(9)
    logits = 3 * torch.randn(4, 2000, generator=g)
    assist = _away_from_zero((4, 2000), g)
    alpha = torch.tensor([0.01, 0.1, 0.5, 0.9])
    out = unlearning_logits_reference(logits, assist, alpha=alpha)
    p = torch.softmax(logits.double(), dim=1)
    plausible = p >= alpha.double()[:, None] * p.max(dim=1, keepdim=True).values
    changed = out != logits
    assert torch.equal(changed, plausible)


def test_weight_zero_row_is_untouched_even_with_drop() -> None:
    inp = _make(4, 3000, torch.float32, seed=10)
    w = torch.tensor([1.0, 0.0, 1.0, 0.0])
    out = unlearning_logits_reference(
        inp["logits"], inp["assist"], weight=w, alpha=inp["alpha"], drop_implausible=True
    )
    assert torch.equal(out[1], inp["logits"][1])
    assert torch.equal(out[3], inp["logits"][3])
    assert not torch.equal(out[0], inp["logits"][0])


def test_bias_adds_repeats_ignores_padding_and_ban_wins() -> None:
    vocab = 100
    logits = torch.randn(2, vocab, generator=_gen(11))
    bias_ids = torch.tensor([[5, 5, -1, 40], [-1, -1, -1, 99]], dtype=torch.int32)
    bias_vals = torch.tensor([[1.5, 2.0, 100.0, 7.0], [9.0, 9.0, 9.0, -3.0]])
    banned = pack_banned([[40], []], vocab)
    out = unlearning_logits_reference(logits, bias_ids=bias_ids, bias_vals=bias_vals, banned=banned)
    want = logits.clone()
    want[0, 5] += 3.5
    want[0, 40] = float("-inf")
    want[1, 99] -= 3.0
    torch.testing.assert_close(out, want)


def _assist_ban(assist: torch.Tensor, frac: float, g: torch.Generator) -> torch.Tensor:
    """Per-row thresholds that ban about ``frac`` of each row's assist values; row 1
    (weight 0 in `_make`) bans too, and the last row bans nothing (``+inf``)."""
    rows = assist.shape[0]
    q = torch.quantile(assist.float(), 1 - frac, dim=1)
    q = q + 0.01 * torch.rand(rows, generator=g)
    if rows > 2:
        q[-1] = float("inf")
    return q.float()


def test_assist_ban_is_hard_and_last() -> None:
    """A token the assistant is confident of is -inf whatever the contrast, the bias or
    the weight say: a client's +100 on it (here, through bias_vals) cannot revive it."""
    vocab = 64
    logits = torch.zeros(3, vocab)
    assist = torch.full((3, vocab), -8.0)
    assist[:, 7] = -0.1                    # the fact: p_assist ~ 0.9
    bias_ids = torch.tensor([[7], [7], [7]], dtype=torch.int32)
    bias_vals = torch.full((3, 1), 100.0)
    out = unlearning_logits_reference(
        logits, assist, weight=torch.tensor([1.5, 0.0, 1.5]), bias_ids=bias_ids,
        bias_vals=bias_vals, assist_ban=torch.tensor([-3.0, -3.0, float("inf")]))
    assert torch.isneginf(out[0, 7]) and torch.isneginf(out[1, 7])  # weight 0 bans too
    assert out[2, 7] == 100.0 - 1.5 * -0.1 and torch.isfinite(out).sum() == vocab + 2 * (vocab - 1)
    with pytest.raises(ValueError, match="assist_ban given without assist"):
        unlearning_logits_reference(logits, assist_ban=torch.zeros(3))
    with pytest.raises(ValueError, match="assist_ban shape"):
        unlearning_logits_reference(logits, assist, assist_ban=torch.zeros(2))


@triton_missing
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("drop", [False, True], ids=["keep", "drop"])
def test_kernel_assist_ban_matches_reference(interpret: None, dtype: torch.dtype,
                                             drop: bool) -> None:
    inp = _make(7, 50257, dtype, seed=97 + int(drop))
    del inp["assist_neg"]
    inp["assist_ban"] = _assist_ban(inp["assist"], 0.02, _gen(4))
    # the ban hits bias tokens too (they are written after pass 2)
    inp["bias_ids"][:, 4] = torch.argmax(inp["assist"].float(), dim=1).to(torch.int32)
    want = unlearning_logits_reference(**inp, drop_implausible=drop)
    hit = inp["assist"].float() >= inp["assist_ban"].view(-1, 1)
    assert hit[:-1].any(dim=1).all() and not hit[-1].any()
    assert torch.isneginf(want.float()[hit]).all()
    _run_kernel_vs_reference(inp, drop_implausible=drop)


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 50257])
def test_pack_banned_bits(vocab: int) -> None:
    g = _gen(vocab)
    lists = [torch.randint(0, vocab, (7,), generator=g).tolist() + [vocab - 1], []]
    packed = pack_banned(lists, vocab)
    assert packed.dtype == torch.int32
    assert packed.shape == (2, (vocab + 31) // 32)
    dense = C._banned_dense(packed, vocab)
    for r, ids in enumerate(lists):
        want = torch.zeros(vocab, dtype=torch.bool)
        want[ids] = True
        assert torch.equal(dense[r], want)
    # bit 31 of word 0 is the sign bit: a negative word, still token 31.
    if vocab > 31:
        assert pack_banned([[31]], vocab)[0, 0].item() < 0


# ------------------------------------------------- reference vs independent numpy


def _numpy_spec(inp: dict[str, torch.Tensor], drop: bool) -> tuple[np.ndarray, np.ndarray]:
    """The spec written again in float64 numpy; returns (expected, ambiguous mask).

    `ambiguous` marks tokens within 1e-4 of the plausibility threshold, where fp32
    and fp64 may disagree on the mask; they are left out of the comparison.
    """
    z = inp["logits"].float().numpy().astype(np.float64)
    a = inp["assist"].float().numpy().astype(np.float64)
    n = inp["assist_neg"].float().numpy().astype(np.float64) if "assist_neg" in inp else None
    w = inp["weight"].numpy().astype(np.float64)[:, None]
    alpha = inp["alpha"].numpy().astype(np.float64)[:, None]
    rows, vocab = z.shape
    with np.errstate(divide="ignore"):
        thresh = z.max(axis=1, keepdims=True) + np.log(alpha)
    plausible = z >= thresh
    ambiguous = np.abs(z - thresh) < 1e-4
    active = w != 0
    contrasted = z + w * (a - n) if n is not None else z - w * a
    out = np.where(plausible & active, contrasted, z)
    if drop:
        out = np.where(~plausible & active, -np.inf, out)
    ids = inp["bias_ids"].numpy()
    vals = inp["bias_vals"].numpy().astype(np.float64)
    for r in range(rows):
        for k in range(ids.shape[1]):
            if ids[r, k] >= 0:
                out[r, ids[r, k]] += vals[r, k]
    words = inp["banned"].numpy().view(np.uint32)
    tok = np.arange(vocab)
    bits = (words[:, tok // 32] >> (tok % 32).astype(np.uint32)) & 1
    out[bits.astype(bool)] = -np.inf
    return out, ambiguous


SPEC_GRID = [(v, r, d) for v in VOCABS for r in ROWS for d in DTYPES]


@pytest.mark.parametrize(
    "vocab,rows,dtype", SPEC_GRID, ids=[f"V{v}-R{r}-{str(d)[6:]}" for v, r, d in SPEC_GRID]
)
def test_reference_matches_numpy_spec(vocab: int, rows: int, dtype: torch.dtype) -> None:
    inp = _make(rows, vocab, dtype, seed=3 * vocab + rows)
    drop = rows == 7
    if rows == 64:
        del inp["assist_neg"]
    got = unlearning_logits_reference(**inp, drop_implausible=drop).float().numpy()
    want, ambiguous = _numpy_spec(inp, drop)
    ok = ~ambiguous
    assert np.array_equal(np.isneginf(got)[ok], np.isneginf(want)[ok])
    fin = np.isfinite(want) & ok
    # the reference rounds once to `dtype`; numpy stays in float64.
    eps = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    np.testing.assert_allclose(got[fin], want[fin], rtol=eps, atol=eps)


# --------------------------------------------------------- dispatcher and errors


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("present", [(), ("assist",), ("banned", "bias_ids", "bias_vals")])
def test_reference_returns_new_tensor_and_keeps_inputs(
    dtype: torch.dtype, present: tuple[str, ...]
) -> None:
    inp = _make(3, 1000, dtype, seed=13)
    before = {k: v.clone() for k, v in inp.items()}
    out = unlearning_logits_reference(inp["logits"], **{k: inp[k] for k in present})
    assert out is not inp["logits"]
    assert out.data_ptr() != inp["logits"].data_ptr()
    assert out.dtype == dtype
    for k, v in inp.items():
        assert torch.equal(v, before[k]), k


def test_auto_backend_on_cpu_runs_reference_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inp = _make(3, 4000, torch.bfloat16, seed=12)
    want = unlearning_logits_reference(**inp)
    x = inp.pop("logits").clone()
    out = unlearning_logits_(x, **inp)
    assert out is x
    assert torch.equal(x, want)


@triton_missing
def test_triton_backend_on_cpu_without_interpreter_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        unlearning_logits_(torch.randn(2, 64), torch.randn(2, 64), backend="triton")


def _bad_cases() -> list[tuple[str, dict[str, object], str]]:
    R, V = 3, 70
    z = torch.randn(R, V)
    ok = dict(logits=z)
    return [
        ("1d logits", dict(logits=torch.randn(V)), "2-D"),
        ("int logits", dict(logits=torch.zeros(R, V, dtype=torch.int32)), "logits dtype"),
        ("empty vocab", dict(logits=torch.randn(R, 0)), "empty vocabulary"),
        ("assist shape", dict(ok, assist=torch.randn(R, V + 1)), "assist shape"),
        ("assist dtype", dict(ok, assist=torch.randn(R, V).double()), "assist dtype"),
        ("neg without assist", dict(ok, assist_neg=torch.randn(R, V)), "assist_neg given"),
        ("weight shape", dict(ok, weight=torch.ones(R + 1)), "weight shape"),
        ("weight dtype", dict(ok, weight=torch.ones(R).double()), "weight dtype"),
        ("alpha range", dict(ok, alpha=torch.tensor([0.1, 1.5, 0.0])), "alpha values"),
        ("alpha nan", dict(ok, alpha=torch.tensor([0.1, float("nan"), 0.0])), "alpha values"),
        ("bias half", dict(ok, bias_ids=torch.zeros(R, 2, dtype=torch.int32)), "together"),
        (
            "bias ids dtype",
            dict(ok, bias_ids=torch.zeros(R, 2), bias_vals=torch.zeros(R, 2)),
            "bias_ids dtype",
        ),
        (
            "bias ids range",
            dict(
                ok,
                bias_ids=torch.tensor([[0, V]] * R, dtype=torch.int32),
                bias_vals=torch.zeros(R, 2),
            ),
            "bias_ids must be",
        ),
        (
            "bias vals shape",
            dict(ok, bias_ids=torch.zeros(R, 2, dtype=torch.int32), bias_vals=torch.zeros(R, 3)),
            "bias_vals shape",
        ),
        ("banned shape", dict(ok, banned=torch.zeros(R, V // 32, dtype=torch.int32)), "ceil"),
        ("banned dtype", dict(ok, banned=torch.zeros(R, 3, dtype=torch.int64)), "banned dtype"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs_raise_value_error(case: tuple[str, dict[str, object], str]) -> None:
    _, kwargs, match = case
    with pytest.raises(ValueError, match=match):
        unlearning_logits_reference(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        unlearning_logits_(**kwargs)  # type: ignore[arg-type]


def test_bad_backend_and_device_mismatch() -> None:
    with pytest.raises(ValueError, match="backend"):
        unlearning_logits_(torch.randn(2, 8), backend="cuda")
    with pytest.raises(ValueError, match="is on meta"):
        unlearning_logits_reference(torch.randn(2, 8), torch.randn(2, 8, device="meta"))


@pytest.mark.parametrize(
    "lists,vocab,match",
    [([[5]], 0, "vocab_size"), ([[5, 10]], 10, r"\[0, 10\)"), ([[-1]], 10, r"\[0, 10\)")],
)
def test_pack_banned_rejects_bad_ids(lists: list[list[int]], vocab: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pack_banned(lists, vocab)
