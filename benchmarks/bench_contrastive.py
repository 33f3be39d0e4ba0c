"""Benchmark the fused contrastive-decoding op against its torch reference.

Prints one table: rows x (kernel, torch eager, torch.compile) with the median time,
the bytes the fused kernel must move, the achieved GB/s (those bytes / time, the
same byte count for every method so the columns compare), the share of this
machine's copy bandwidth measured in the same run (a large ``dst.copy_(src)``:
read + write), and the speed-up over eager.

Workload per row (what the serving path runs): ULD ``z - w*m*assist`` with a
plausibility alpha, 8 bias tokens, a banned bitmask. Fused-kernel bytes per row:
pass 1 reads the base row (E*V), pass 2 reads base + assist (2*E*V) and the ban
words (V/8), writes the row (E*V), plus the bias (K*(4+4)) and weight/alpha (8):
about 4*E*V. E = 4 (fp32) or 2 (bf16).

On CUDA the kernel is the Triton kernel and timings come from
``triton.testing.do_bench`` (median). On CPU the "kernel" column is the torch
reference path of ``unlearning_logits_`` (there is no compiled Triton on CPU) and
timings are the median of ``time.perf_counter`` over repeats.

    python benchmarks/bench_contrastive.py --device cuda            # H100, fp32
    python benchmarks/bench_contrastive.py --device cuda --dtype bf16
    python benchmarks/bench_contrastive.py --device cpu --rows 1 8 32 --threads 2

The in-place kernel is timed on the same buffer call after call (values drift; the
work per call does not depend on them).

End to end (`--e2e DEMO_JSON`, against a running `unlearnd demo`): the same concurrent
chat mix (the contrastive tenant's forget + retain questions, greedy, non-streaming)
sent to a contrastive tenant and to the no-policy tenant in alternating rounds
(A B B A ...); prints output tokens/s of each and their ratio (goal >= 0.7 with an
assistant of a quarter of the base's layers):

    python benchmarks/bench_contrastive.py --e2e work/demo/demo.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unlearnd.kernels.contrastive import (  # noqa: E402
    _reference_math,
    pack_banned,
    unlearning_logits_,
    unlearning_logits_reference,
)

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
K_BIAS = 8
_OPERANDS = ("assist", "assist_neg", "weight", "alpha", "bias_ids", "bias_vals", "banned")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda or cpu (default: cuda when available)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument(
        "--reps",
        type=int,
        default=0,
        help="CPU repeats per point (default: enough for ~1 s, at least 3)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--e2e", metavar="DEMO_JSON", help="end-to-end mode against a running demo")
    p.add_argument("--e2e-tenant", default="cyberdyne", help="contrastive tenant")
    p.add_argument("--e2e-baseline", default="public", help="no-policy tenant")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument(
        "--copy-mib",
        type=int,
        default=1024,
        help="size of the tensor copied to measure bandwidth (MiB)",
    )
    args = p.parse_args(argv)
    for r in args.rows:
        if r <= 0:
            p.error(f"--rows values must be positive, got {r}")
    if args.vocab <= 0:
        p.error(f"--vocab must be positive, got {args.vocab}")
    if args.device not in ("cuda", "cpu"):
        p.error(f"--device must be cuda or cpu, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    return args


def make_inputs(rows: int, vocab: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """Random serving-like inputs for `rows` rows of `vocab` logits."""
    g = torch.Generator().manual_seed(rows)
    ids = torch.randint(0, vocab, (rows, K_BIAS), generator=g, dtype=torch.int32)
    banned_lists = [torch.randint(0, vocab, (64,), generator=g).tolist() for _ in range(rows)]
    inp = dict(
        logits=4 * torch.randn(rows, vocab, generator=g),
        assist=torch.randn(rows, vocab, generator=g),
        weight=0.5 + torch.rand(rows, generator=g),
        alpha=torch.full((rows,), 0.1),
        bias_ids=ids,
        bias_vals=torch.randn(rows, K_BIAS, generator=g),
        banned=pack_banned(banned_lists, vocab),
    )
    out = {}
    for k, v in inp.items():
        v = v.to(device)
        out[k] = v.to(dtype) if k in ("logits", "assist") else v
    return out


def kernel_bytes(rows: int, vocab: int, elem: int) -> int:
    """Bytes the fused kernel reads and writes for `rows` rows (see module doc)."""
    per_row = 4 * elem * vocab + (vocab + 31) // 32 * 4 + K_BIAS * 8 + 8
    return rows * per_row


def bench(fn: Callable[[], object], device: str, reps: int) -> float:
    """Median seconds per call of `fn`."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    fn()  # warm-up (and compile)
    if reps <= 0:
        t0 = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t0, 1e-6)
        reps = max(3, min(50, int(1.0 / one)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: str, mib: int, reps: int) -> float:
    """Measured copy bandwidth in bytes/s (bytes read + bytes written)."""
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * 4 / t


def bench_rows(
    rows: int,
    args: argparse.Namespace,
    dtype: torch.dtype,
    elem: int,
    copy_bw: float,
    compiled: Callable[..., torch.Tensor] | None,
) -> Callable[..., torch.Tensor] | None:
    """Time the three methods at `rows` rows and print one table line.

    Returns `compiled`, or None once torch.compile failed (later rows skip it).
    """
    dev = args.device
    inp = make_inputs(rows, args.vocab, dtype, dev)
    base = inp.pop("logits")
    work = base.clone()
    nbytes = kernel_bytes(rows, args.vocab, elem)
    t_kernel = bench(lambda: unlearning_logits_(work, **inp), dev, args.reps)
    t_eager = bench(lambda: unlearning_logits_reference(base, **inp), dev, args.reps)
    t_comp = float("nan")
    if compiled is not None:
        fn = compiled
        try:
            ordered = [inp.get(k) for k in _OPERANDS]
            t_comp = bench(lambda: fn(base, *ordered, False), dev, args.reps)
        except Exception as exc:  # report and go on (e.g. no C++ compiler on a CPU box)
            print(f"torch.compile failed at rows={rows}: {exc!r}"[:300])
            compiled = None

    def gbs(t: float) -> float:
        return nbytes / t / 1e9

    print(
        f"{rows:>5} {nbytes / 1e6:>9.1f} | {t_kernel * 1e3:>9.3f} {gbs(t_kernel):>7.1f} "
        f"{100 * nbytes / t_kernel / copy_bw:>5.1f}% | "
        f"{t_eager * 1e3:>9.3f} {gbs(t_eager):>7.1f} | "
        f"{t_comp * 1e3:>10.3f} {gbs(t_comp):>7.1f} | "
        f"{t_eager / t_kernel:>9.2f}x {t_eager / t_comp:>9.2f}x"
    )
    return compiled


def e2e(args: argparse.Namespace) -> int:
    """Tokens/s of a contrastive tenant as a ratio to a no-policy tenant, same run."""
    import asyncio
    import json

    from openai import AsyncOpenAI

    doc = json.loads(Path(args.e2e).read_text())
    tenants = doc["tenants"]
    tenant, baseline = args.e2e_tenant, args.e2e_baseline
    if "contrastive" not in tenants[tenant]["mechanisms"]:
        raise SystemExit(f"tenant {tenant} is not in contrastive mode: "
                         f"{tenants[tenant]['mechanisms']}")
    qs = []
    for key in ("forget", "retain"):
        lines = Path(tenants[tenant][key]).read_text().splitlines()
        qs += [json.loads(line)["question"] for line in lines if line.strip()]
    qs = (qs * (args.requests // max(len(qs), 1) + 1))[: args.requests]

    async def round_(name: str) -> tuple[float, int]:
        client = AsyncOpenAI(base_url=doc["base_url"], api_key=tenants[name]["api_key"],
                             max_retries=0, timeout=600)
        sem = asyncio.Semaphore(args.concurrency)

        async def one(q: str) -> int:
            async with sem:
                r = await client.chat.completions.create(
                    model=doc.get("model", "m"), temperature=0, max_tokens=args.max_tokens,
                    messages=[{"role": "user", "content": q}])
                return r.usage.completion_tokens

        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(q) for q in qs)))
        elapsed = time.perf_counter() - t0
        await client.close()
        return elapsed, tokens

    results: dict[str, list[float]] = {tenant: [], baseline: []}
    order = [baseline, tenant]
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            secs, tokens = asyncio.run(round_(name))
            results[name].append(tokens / secs)
            print(f"round {r + 1} {name:12s} {tokens:6d} tokens {secs:7.2f} s "
                  f"{tokens / secs:8.1f} tok/s")
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\n{'tenant':12s} {'mechanisms':28s} {'tok/s (median)':>15s}")
    for name in (baseline, tenant):
        print(f"{name:12s} {'+'.join(tenants[name]['mechanisms']) or 'none':28s} "
              f"{med[name]:15.1f}")
    ratio = med[tenant] / med[baseline]
    print(f"ratio contrastive / no-policy: {ratio:.2f} (goal >= 0.7)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.e2e:
        return e2e(args)
    logging.basicConfig(level=logging.WARNING)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    dev = args.device
    if dev == "cuda":
        name = torch.cuda.get_device_name()
        kernel_label = "triton"
    else:
        name = f"CPU ({torch.get_num_threads()} torch threads)"
        kernel_label = "reference (CPU: no triton)"
    copy_bw = copy_bandwidth(dev, args.copy_mib, args.reps)
    print(f"device: {name}   dtype: {args.dtype}   vocab: {args.vocab}")
    print(f"kernel column: {kernel_label}")
    print(
        f"measured copy bandwidth ({args.copy_mib} MiB copy_, read+write): {copy_bw / 1e9:.1f} GB/s"
    )
    print(
        "workload: ULD + alpha=0.1 + 8 bias tokens + banned bitmask; "
        "GB/s = fused-kernel bytes / time for every column"
    )

    compiled = None
    if not args.no_compile:
        # the checks' host syncs (alpha range on CPU) would break the graph: compile
        # the math alone, on the same operands (valid by construction).
        compiled = torch.compile(_reference_math, dynamic=False)

    header = (
        f"{'rows':>5} {'MB moved':>9} | {'kernel ms':>9} {'GB/s':>7} {'%copy':>6} | "
        f"{'eager ms':>9} {'GB/s':>7} | {'compile ms':>10} {'GB/s':>7} | "
        f"{'kern/eager':>10} {'comp/eager':>10}"
    )
    print(header)
    print("-" * len(header))
    for rows in args.rows:
        compiled = bench_rows(rows, args, dtype, elem, copy_bw, compiled)
    print("target: kernel >= 70% of copy bandwidth at rows 256, vocab 128256, fp32 (on GPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
