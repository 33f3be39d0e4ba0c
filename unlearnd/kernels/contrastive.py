"""Fused contrastive-decoding logits op: contrast, plausibility mask, bias, ban.

One op turns a batch of base-model logits into the logits the sampler sees:

1. plausibility mask from the ORIGINAL base row (Li et al. 2022):
   ``m = p_base(x) >= alpha * max p_base``, which is ``z >= zmax + log(alpha)``
   (softmax shares one normaliser per row, so the log-sum-exp cancels);
   ``alpha = 0`` makes every token plausible, ``alpha = 1`` only the argmax (ties too);
2. contrast where ``m`` holds:
   ULD (arXiv 2406.08607) ``z' = z - w * assist``, or
   delta-unlearning (arXiv 2404.11045) ``z' = z + w * (assist - assist_neg)``;
   with ``drop_implausible=True`` tokens outside ``m`` become ``-inf``;
3. ``bias_vals`` added at ``bias_ids`` (refusal steering, leak firewall; ``-1`` pads,
   repeated ids add up);
4. tokens whose bit is set in ``banned`` become ``-inf``, and so do tokens the
   assistant is confident of: ``assist >= assist_ban`` (per row; ``+inf`` never bans).
   The ULD assistant is trained to be uniform everywhere but on the forget facts, so
   its confident tokens are the facts: a ban the client's ``logit_bias`` or masks
   cannot outweigh, unlike the contrast itself (a shift by ``w * assist``).

A row whose weight is 0 skips step 2 entirely: no mask, no contrast, no drop.
Without ``assist``, step 2 only drops implausible tokens, and only when
``drop_implausible`` is set. All arithmetic is fp32; the result is written back in
the input dtype, rounded once.

``unlearning_logits_reference`` is the spec (plain torch, new tensor, also the CPU
path). ``unlearning_logits_`` is the in-place dispatcher: the fused Triton kernel
on CUDA, the reference on CPU, or the Triton kernel on CPU tensors under
``TRITON_INTERPRET=1`` (tests). triton 3.9 picks compiled or interpreted code when
``triton.jit`` runs, reading the variable then. Our kernel is jitted lazily, on first
use, once per mode, so a test may set ``TRITON_INTERPRET=1`` any time before its first
``backend="triton"`` call, also after ``import triton``. triton's own
``tl.max``/``tl.sum`` are jitted at ``import triton``, and the interpreter rejects them
after a late switch, so the kernel reduces with ``tl.reduce`` (see pass 1).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

try:  # triton is optional: CPU deployments run the torch reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "pack_banned",
    "triton_available",
    "unlearning_logits_",
    "unlearning_logits_reference",
]

BACKENDS = ("auto", "triton", "torch")
"""Values accepted by ``unlearning_logits_(..., backend=...)``."""

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)

# Vocabulary chunk per loop iteration. On GPU 4096 elements over 8 warps is 16
# fp32 values per thread per stream (base, assist, assist_neg): enough bytes in
# flight per SM without spilling. Under the interpreter every tl op is a numpy
# call on the whole block, so big blocks cut the Python overhead (the op cost is
# per call, not per element): 16384 keeps a 64 x 151936 call near a second.
_GPU_BLOCK = 4096
_GPU_NUM_WARPS = 8
_INTERPRET_BLOCK = 16384


def triton_available() -> bool:
    """True when triton imports here (it may still lack a GPU to run on)."""
    return triton is not None


def _interpreting() -> bool:
    """True when triton would build interpreter kernels (``TRITON_INTERPRET=1`` now)."""
    if triton is None:
        return False
    return bool(triton.knobs.runtime.interpret)


# --------------------------------------------------------------------------- checks


def _check_inputs(
    logits: torch.Tensor,
    assist: torch.Tensor | None,
    assist_neg: torch.Tensor | None,
    weight: torch.Tensor | None,
    alpha: torch.Tensor | None,
    bias_ids: torch.Tensor | None,
    bias_vals: torch.Tensor | None,
    banned: torch.Tensor | None,
    assist_ban: torch.Tensor | None = None,
) -> None:
    """Raise ValueError naming the bad argument; shapes, dtypes and devices only.

    Values (alpha in [0, 1], ids < V) are checked too when the tensors are on the
    CPU; on an accelerator that would force a host sync every decode step, so there
    out-of-range values are the caller's bug (ids >= V are ignored by the kernel).
    """
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [rows, vocab], got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"logits dtype must be float32/bfloat16/float16, got {logits.dtype}")
    rows, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits has an empty vocabulary dimension (shape[1] == 0)")
    device = logits.device

    def same_device(name: str, t: torch.Tensor) -> None:
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but logits is on {device}")

    for name, t in (("assist", assist), ("assist_neg", assist_neg)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (rows, vocab):
            raise ValueError(
                f"{name} shape {tuple(t.shape)} does not match logits shape {(rows, vocab)}"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} dtype must be float32/bfloat16/float16, got {t.dtype}")
        same_device(name, t)
    if assist_neg is not None and assist is None:
        raise ValueError("assist_neg given without assist (delta-unlearning needs both)")

    if assist_ban is not None and assist is None:
        raise ValueError("assist_ban given without assist (it bans on the assistant's values)")
    for name, t in (("weight", weight), ("alpha", alpha), ("assist_ban", assist_ban)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (rows,):
            raise ValueError(f"{name} shape {tuple(t.shape)} must be ({rows},) (one per row)")
        if t.dtype != torch.float32:
            raise ValueError(f"{name} dtype must be float32, got {t.dtype}")
        same_device(name, t)
    if alpha is not None and alpha.device.type == "cpu" and rows > 0:
        bad = (alpha < 0) | (alpha > 1) | torch.isnan(alpha)
        if bool(bad.any()):
            raise ValueError(f"alpha values must lie in [0, 1], got {alpha[bad].tolist()}")

    if (bias_ids is None) != (bias_vals is None):
        raise ValueError("bias_ids and bias_vals must be given together")
    if bias_ids is not None and bias_vals is not None:
        if not isinstance(bias_ids, torch.Tensor) or not isinstance(bias_vals, torch.Tensor):
            raise ValueError("bias_ids and bias_vals must be torch.Tensors")
        if bias_ids.dim() != 2 or bias_ids.shape[0] != rows:
            raise ValueError(f"bias_ids shape {tuple(bias_ids.shape)} must be ({rows}, K)")
        if tuple(bias_vals.shape) != tuple(bias_ids.shape):
            raise ValueError(
                f"bias_vals shape {tuple(bias_vals.shape)} must equal bias_ids shape "
                f"{tuple(bias_ids.shape)}"
            )
        if bias_ids.dtype not in _INDEX_DTYPES:
            raise ValueError(f"bias_ids dtype must be int32 (or int64), got {bias_ids.dtype}")
        if bias_vals.dtype != torch.float32:
            raise ValueError(f"bias_vals dtype must be float32, got {bias_vals.dtype}")
        same_device("bias_ids", bias_ids)
        same_device("bias_vals", bias_vals)
        if bias_ids.device.type == "cpu" and bias_ids.numel() > 0:
            bad = (bias_ids < -1) | (bias_ids >= vocab)
            if bool(bad.any()):
                raise ValueError(
                    f"bias_ids must be -1 (padding) or in [0, {vocab}), got "
                    f"{bias_ids[bad].tolist()[:8]}"
                )

    if banned is not None:
        if not isinstance(banned, torch.Tensor):
            raise ValueError(f"banned must be a torch.Tensor, got {type(banned).__name__}")
        words = (vocab + 31) // 32
        if tuple(banned.shape) != (rows, words):
            raise ValueError(
                f"banned shape {tuple(banned.shape)} must be ({rows}, {words}) = "
                f"(rows, ceil(vocab / 32))"
            )
        if banned.dtype != torch.int32:
            raise ValueError(f"banned dtype must be int32 (bitmask words), got {banned.dtype}")
        same_device("banned", banned)


# ------------------------------------------------------------------------ reference


def _banned_dense(banned: torch.Tensor, vocab: int) -> torch.Tensor:
    """Unpack ``[R, ceil(V/32)]`` int32 words into a ``[R, V]`` bool mask (bit set = banned)."""
    shifts = torch.arange(32, dtype=torch.int32, device=banned.device)
    bits = (banned.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]; >> is arithmetic, & 1 fixes bit 31
    return bits.reshape(banned.shape[0], -1)[:, :vocab].bool()


def unlearning_logits_reference(
    logits: torch.Tensor,
    assist: torch.Tensor | None = None,
    assist_neg: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    bias_ids: torch.Tensor | None = None,
    bias_vals: torch.Tensor | None = None,
    banned: torch.Tensor | None = None,
    *,
    assist_ban: torch.Tensor | None = None,
    drop_implausible: bool = False,
) -> torch.Tensor:
    """The spec, in plain torch: return a NEW ``[R, V]`` tensor in ``logits.dtype``.

    ``logits``: ``[R, V]`` base logits. ``assist``: ``[R, V]`` assistant logits (ULD:
    ``z - w*m*assist``); with ``assist_neg`` also ``[R, V]``, delta-unlearning
    ``z + w*m*(assist - assist_neg)``. ``weight``: ``[R]`` fp32, ``None`` means 1 for
    every row, 0 switches the contrast (and ``drop_implausible``) off for that row.
    ``alpha``: ``[R]`` fp32 in [0, 1], ``None`` means 0 (every token plausible).
    ``bias_ids``/``bias_vals``: ``[R, K]`` int32 ids (``-1`` pads) and fp32 values
    added after the contrast. ``banned``: ``[R, ceil(V/32)]`` int32 bitmask, a set
    bit makes the token ``-inf`` (last, so no bias can revive it). ``assist_ban``:
    ``[R]`` fp32, tokens with ``assist >= assist_ban[r]`` become ``-inf`` too (last;
    ``+inf`` for a row that bans nothing; needs ``assist``).
    """
    operands = (logits, assist, assist_neg, weight, alpha, bias_ids, bias_vals, banned)
    _check_inputs(*operands, assist_ban)
    return _reference_math(*operands, drop_implausible, assist_ban)


def _reference_math(
    logits: torch.Tensor,
    assist: torch.Tensor | None,
    assist_neg: torch.Tensor | None,
    weight: torch.Tensor | None,
    alpha: torch.Tensor | None,
    bias_ids: torch.Tensor | None,
    bias_vals: torch.Tensor | None,
    banned: torch.Tensor | None,
    drop_implausible: bool,
    assist_ban: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference without input checks (no host syncs: torch.compile traces it whole)."""
    rows, vocab = logits.shape
    z = logits.float()  # the same tensor for fp32 input: never written below
    out = z
    contrast = assist is not None or drop_implausible
    if contrast and rows > 0:
        if weight is None:
            w = torch.ones(rows, 1, dtype=torch.float32, device=logits.device)
        else:
            w = weight.view(rows, 1)
        active = w != 0
        if alpha is None:
            plausible = torch.ones_like(z, dtype=torch.bool)
        else:
            # p >= alpha * pmax  <=>  z - lse >= log(alpha) + zmax - lse: lse cancels.
            thresh = z.amax(dim=1, keepdim=True) + torch.log(alpha).view(rows, 1)
            plausible = z >= thresh
        if assist is not None:
            a = assist.float()
            if assist_neg is not None:
                contrasted = z + w * (a - assist_neg.float())
            else:
                contrasted = z - w * a
            out = torch.where(plausible & active, contrasted, out)
        if drop_implausible:
            out = out.masked_fill(~plausible & active, float("-inf"))
    if bias_ids is not None and bias_vals is not None and bias_ids.numel() > 0:
        valid = bias_ids >= 0
        idx = torch.where(valid, bias_ids, torch.zeros_like(bias_ids)).long()
        vals = torch.where(valid, bias_vals, torch.zeros_like(bias_vals))
        out = out.scatter_add(1, idx, vals)
    if banned is not None:
        out = out.masked_fill(_banned_dense(banned, vocab), float("-inf"))
    if assist_ban is not None and assist is not None:
        out = out.masked_fill(assist.float() >= assist_ban.view(rows, 1), float("-inf"))
    result = out.to(logits.dtype)
    return result.clone() if result is logits else result


# --------------------------------------------------------------------------- kernel

if triton is not None:

    def _unlearning_logits_kernel(
        logits_ptr,
        assist_ptr,
        neg_ptr,
        weight_ptr,
        log_alpha_ptr,
        bias_ids_ptr,
        bias_vals_ptr,
        banned_ptr,
        aban_ptr,
        V,
        K,
        stride_logits,
        stride_assist,
        stride_neg,
        stride_bias_ids,
        stride_bias_vals,
        stride_banned,
        HAS_ASSIST: tl.constexpr,
        HAS_NEG: tl.constexpr,
        CONTRAST: tl.constexpr,
        NEED_MAX: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_BANNED: tl.constexpr,
        HAS_ABAN: tl.constexpr,
        DROP_IMPLAUSIBLE: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """One program per row, two passes over the vocabulary in BLOCK chunks.

        Bytes per row (fp32, ULD, alpha set, V = 128256): pass 1 reads the base row
        (4V = 513 KB) for its max; pass 2 reads base + assist (8V) and writes the
        result (4V); the banned bitmask adds V/8 (16 KB) and the bias K*8 + 3*K*4
        bytes. 16V + V/8 = 2.07 MB per row, against 12V for an ideal one-pass op
        (which would need the row max before reading it): the extra 4V is the price
        of a mask relative to the max, paid only when alpha is given. The
        plausibility mask needs the max alone, not the log-sum-exp (which would be a
        second reduction over the same 4V bytes plus V exps): p >= alpha*pmax is
        z >= zmax + log(alpha) in logit space. The eager torch reference makes
        about ten full [R, V] temporaries (max, mask, where, scatter, ban unpack,
        masked_fill, cast): by count about 3x these bytes.
        Rows with weight 0 skip both passes unless banned tokens must be written.
        ``assist_ban`` reads the assist row in pass 2 for every row (its threshold, not
        the weight, says whether a row bans), no extra pass.
        """
        row = tl.program_id(0).to(tl.int64)
        z_row = logits_ptr + row * stride_logits
        a_row = assist_ptr + row * stride_assist
        n_row = neg_ptr + row * stride_neg
        ban_row = banned_ptr + row * stride_banned
        # CONTRAST = assist given or drop_implausible; NEED_MAX = CONTRAST and alpha given.
        w = tl.load(weight_ptr + row)  # the launcher passes ones when weight is None
        active = w != 0.0
        # vocab span each pass walks: 0 when this row has nothing to do in it.
        # Masks below test `offs < span1` rather than `inb & active`: same meaning,
        # and triton 3.9's interpreter rejects `tensor & scalar-bool`.
        if CONTRAST:
            span1 = tl.where(active, V, 0)
        else:
            span1 = 0
        if HAS_BANNED or HAS_ABAN:
            span2 = V
        else:
            span2 = span1
        if HAS_ABAN:
            aban = tl.load(aban_ptr + row)

        # ---- pass 1: row max of the base logits (read 4V bytes at fp32).
        thresh = float("-inf")
        if NEED_MAX:
            acc = tl.full([BLOCK], float("-inf"), tl.float32)
            for start in range(0, span1, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                z = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                acc = tl.maximum(acc, z)
            # tl.reduce with standard's combine fns, not tl.max / tl.sum: those are
            # @triton.jit functions jitted when triton is imported, so after a late
            # TRITON_INTERPRET=1 they stay compiled-mode and the interpreter refuses
            # them; it recognises these combine fns and reduces with numpy.
            thresh = tl.reduce(acc, 0, tl.standard._elementwise_max)
            thresh = thresh + tl.load(log_alpha_ptr + row)

        # ---- bias tokens: computed from the ORIGINAL base before pass 2 overwrites
        # them, held in registers, stored after pass 2, so bf16/fp16 round once.
        if HAS_BIAS:
            koffs = tl.arange(0, BLOCK_K)
            kin = koffs < K
            ids = tl.load(bias_ids_ptr + row * stride_bias_ids + koffs, mask=kin, other=-1)
            ids = ids.to(tl.int32)
            vals = tl.load(bias_vals_ptr + row * stride_bias_vals + koffs, mask=kin, other=0.0)
            valid = (ids >= 0) & (ids < V)
            vals = tl.where(valid, vals, 0.0)
            # repeated ids add up: total[i] = sum_j vals[j] * (ids[j] == ids[i]).
            same = ids[:, None] == ids[None, :]
            total = tl.reduce(tl.where(same, vals[None, :], 0.0), 1, tl.standard._sum_combine)
            safe = tl.where(valid, ids, 0)
            zb = tl.load(z_row + safe, mask=valid, other=0.0).to(tl.float32)
            ob = zb
            if CONTRAST:
                if NEED_MAX:
                    pb = zb >= thresh
                else:
                    pb = valid
                on = valid & (ids < span1)
                if HAS_ASSIST:
                    ab = tl.load(a_row + safe, mask=on, other=0.0).to(tl.float32)
                    if HAS_NEG:
                        nb = tl.load(n_row + safe, mask=on, other=0.0)
                        cb = zb + w * (ab - nb.to(tl.float32))
                    else:
                        cb = zb - w * ab
                    ob = tl.where(pb & on, cb, ob)
                if DROP_IMPLAUSIBLE:
                    ob = tl.where((pb == 0) & on, float("-inf"), ob)
            ob = ob + total
            if HAS_BANNED:
                wb = tl.load(ban_row + safe // 32, mask=valid, other=0)
                ob = tl.where(((wb >> (safe % 32)) & 1) != 0, float("-inf"), ob)
            if HAS_ABAN:
                abb = tl.load(a_row + safe, mask=valid, other=float("-inf")).to(tl.float32)
                ob = tl.where(abb >= aban, float("-inf"), ob)
            # every warp must have read its bias tokens before any warp overwrites them.
            tl.debug_barrier()

        # ---- pass 2: read base + assist (+ assist_neg) + ban words, write once.
        for start in range(0, span2, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inb = offs < V
            z = tl.load(z_row + offs, mask=inb, other=0.0).to(tl.float32)
            out = z
            if CONTRAST:
                if NEED_MAX:
                    plaus = z >= thresh
                else:
                    plaus = inb
                on = offs < span1
                if HAS_ASSIST:
                    if HAS_ABAN:  # the ban needs the assist row also where w == 0
                        a = tl.load(a_row + offs, mask=inb, other=0.0).to(tl.float32)
                    else:
                        a = tl.load(a_row + offs, mask=on, other=0.0).to(tl.float32)
                    if HAS_NEG:
                        n = tl.load(n_row + offs, mask=on, other=0.0)
                        c = z + w * (a - n.to(tl.float32))
                    else:
                        c = z - w * a
                    out = tl.where(plaus & on, c, out)
                if DROP_IMPLAUSIBLE:
                    out = tl.where((plaus == 0) & on, float("-inf"), out)
            if HAS_BANNED:
                # 4 bytes per 32 tokens; neighbouring lanes share a word (cache hit).
                words = tl.load(ban_row + offs // 32, mask=inb, other=0)
                out = tl.where(((words >> (offs % 32)) & 1) != 0, float("-inf"), out)
            if HAS_ABAN:  # HAS_ABAN implies HAS_ASSIST: `a` is the whole row's
                out = tl.where(a >= aban, float("-inf"), out)
            tl.store(z_row + offs, out.to(logits_ptr.dtype.element_ty), mask=inb)

        if HAS_BIAS:
            # pass-2 stores of every warp land before the bias tokens overwrite them.
            tl.debug_barrier()
            tl.store(z_row + safe, ob.to(logits_ptr.dtype.element_ty), mask=valid)

else:  # pragma: no cover
    _unlearning_logits_kernel = None

_JITTED: dict[bool, Any] = {}


def _jitted_kernel() -> Any:
    """The jitted kernel for the current TRITON_INTERPRET mode (built on first use)."""
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    interpret = _interpreting()
    kernel = _JITTED.get(interpret)
    if kernel is None:
        kernel = triton.jit(_unlearning_logits_kernel)
        _JITTED[interpret] = kernel
        logger.debug("jitted unlearning_logits kernel (interpret=%s)", interpret)
    return kernel


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along its last dim (read-only inputs may be copied)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_triton(
    logits: torch.Tensor,
    assist: torch.Tensor | None,
    assist_neg: torch.Tensor | None,
    weight: torch.Tensor | None,
    alpha: torch.Tensor | None,
    bias_ids: torch.Tensor | None,
    bias_vals: torch.Tensor | None,
    banned: torch.Tensor | None,
    drop_implausible: bool,
    assist_ban: torch.Tensor | None = None,
) -> None:
    """Launch the fused kernel, one program per row, on ``logits`` in place."""
    if logits.stride(-1) != 1:
        raise ValueError(
            f"logits must have unit stride along the vocabulary for the triton backend, "
            f"got strides {tuple(logits.stride())}"
        )
    if not logits.is_cuda and not _interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (logits is on {logits.device}); "
            "on CPU set TRITON_INTERPRET=1 before the first triton call, or use "
            "backend='torch'"
        )
    rows, vocab = logits.shape
    if rows == 0:
        return
    kernel = _jitted_kernel()
    dummy = logits  # pointer for absent operands: never dereferenced (constexpr-off).
    assist_t = _row_major(assist) if assist is not None else dummy
    neg_t = _row_major(assist_neg) if assist_neg is not None else dummy
    # log(alpha) on the host side of the launch (R floats) with the same torch.log
    # the reference uses, so both compare against bit-identical thresholds.
    log_alpha = torch.log(alpha) if alpha is not None else dummy
    has_bias = bias_ids is not None and bias_vals is not None and bias_ids.shape[1] > 0
    ids_t = _row_major(bias_ids) if has_bias else dummy
    vals_t = _row_major(bias_vals) if has_bias else dummy
    k = bias_ids.shape[1] if has_bias else 0
    ban_t = _row_major(banned) if banned is not None else dummy
    aban_t = assist_ban if assist_ban is not None else dummy
    if weight is None:
        weight_t = torch.ones(rows, dtype=torch.float32, device=logits.device)
    else:
        weight_t = weight
    contrast = assist is not None or drop_implausible
    interpret = not logits.is_cuda
    block = _INTERPRET_BLOCK if interpret else _GPU_BLOCK
    block = min(block, triton.next_power_of_2(vocab))
    extra = {} if interpret else {"num_warps": _GPU_NUM_WARPS}
    kernel[(rows,)](
        logits,
        assist_t,
        neg_t,
        weight_t,
        log_alpha,
        ids_t,
        vals_t,
        ban_t,
        aban_t,
        vocab,
        k,
        logits.stride(0),
        assist_t.stride(0) if assist is not None else 0,
        neg_t.stride(0) if assist_neg is not None else 0,
        ids_t.stride(0) if has_bias else 0,
        vals_t.stride(0) if has_bias else 0,
        ban_t.stride(0) if banned is not None else 0,
        HAS_ASSIST=assist is not None,
        HAS_NEG=assist_neg is not None,
        CONTRAST=contrast,
        NEED_MAX=contrast and alpha is not None,
        HAS_BIAS=has_bias,
        HAS_BANNED=banned is not None,
        HAS_ABAN=assist_ban is not None,
        DROP_IMPLAUSIBLE=drop_implausible,
        BLOCK=block,
        BLOCK_K=triton.next_power_of_2(max(k, 1)),
        **extra,
    )


# ----------------------------------------------------------------------- dispatcher


def unlearning_logits_(
    logits: torch.Tensor,
    assist: torch.Tensor | None = None,
    assist_neg: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    bias_ids: torch.Tensor | None = None,
    bias_vals: torch.Tensor | None = None,
    banned: torch.Tensor | None = None,
    *,
    assist_ban: torch.Tensor | None = None,
    backend: str = "auto",
    drop_implausible: bool = False,
) -> torch.Tensor:
    """Apply contrast, plausibility mask, bias and ban to ``logits`` IN PLACE; return it.

    Same arguments and meaning as :func:`unlearning_logits_reference` (the spec).
    ``backend``: ``"auto"`` runs the fused Triton kernel on CUDA tensors when triton
    is installed and the torch reference otherwise; ``"triton"`` forces the kernel
    (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); ``"torch"`` forces
    the reference (its result copied back into ``logits``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    operands = (logits, assist, assist_neg, weight, alpha, bias_ids, bias_vals, banned)
    # checked once here for both backends: the torch path calls the reference's
    # math directly, so the CPU value checks (host syncs) do not run a second time.
    _check_inputs(*operands, assist_ban)
    use_triton = backend == "triton" or (
        backend == "auto" and logits.is_cuda and triton is not None
    )
    if use_triton:
        _launch_triton(*operands, drop_implausible, assist_ban)
    else:
        logits.copy_(_reference_math(*operands, drop_implausible, assist_ban))
    return logits


# ---------------------------------------------------------------------------- utils


def pack_banned(
    token_ids_per_row: Sequence[Sequence[int]],
    vocab_size: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Pack per-row banned token ids into the ``[R, ceil(V/32)]`` int32 bitmask.

    Token ``t`` of row ``r`` is banned when bit ``t % 32`` of word ``t // 32`` is
    set (bit 31 makes the int32 word negative; that is expected).
    """
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    words = (vocab_size + 31) // 32
    rows = len(token_ids_per_row)
    packed = torch.zeros(rows, words, dtype=torch.int64)
    for r, ids in enumerate(token_ids_per_row):
        ids_list = [int(t) for t in ids]
        if not ids_list:
            continue
        bad = [t for t in ids_list if t < 0 or t >= vocab_size]
        if bad:
            raise ValueError(
                f"banned token ids of row {r} must lie in [0, {vocab_size}), got {bad[:8]}"
            )
        tok = torch.tensor(sorted(set(ids_list)), dtype=torch.int64)
        bits = torch.bitwise_left_shift(torch.ones_like(tok), tok % 32)
        packed[r].index_add_(0, tok // 32, bits)  # distinct ids: add == or
    # reinterpret the low 32 bits as signed int32 (two's complement).
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.to(device) if device is not None else packed
