"""Serving overhead of unlearnd against vLLM's own OpenAI server, and hot-swap latency under load.

One run does, one server at a time (the servers would fight over the CPU cores;
``--interleave`` keeps both up but loads only one at a time, alternating rounds):

1. **vLLM baseline** — ``python -m vllm.entrypoints.openai.api_server`` with the adapter
   through ``--lora-modules bench=ADAPTER`` (what a user would run instead of unlearnd),
   the same engine settings unlearnd uses (dtype, KV cache bytes, eager, prefix
   caching, LoRA slots and rank, context length, max_num_seqs, seed). Requests select
   the adapter with ``model="bench"``.
2. **unlearnd** — ``unlearnd serve --config`` with one tenant whose active version is
   that adapter (no guards); requests carry the tenant's key.
3. The same request mix against both: ``--requests`` chat requests over
   ``--concurrency`` connections, fixed prompts, ``--max-tokens``, temperature 0,
   streamed (so time-to-first-token is measurable), repeated ``--rounds`` times.
   Table: output tokens/s (median over rounds), TTFT and request latency p50/p99
   (pooled over rounds), errors, and the throughput ratio unlearnd / vLLM
   (goal >= 0.95).
4. **Swap under load** — while the same load keeps running against unlearnd, the
   admin API alternately activates two registered versions ``--swaps`` times. For
   each activation: the admin call's wall time and the server-reported
   ``swap_seconds`` (p50/p99; goal p99 <= 1 s on CPU), and the requests that failed
   during the swaps (must be 0) or reported a version that is neither of the two.

Defaults build a tiny random Llama and two random LoRA adapters in a temp dir
(``unlearnd.toolkit.tiny``) and are small enough to finish in a few minutes on a busy
2-core machine; ``--model``/``--adapter``/``--adapter2`` and the load options scale it up::

    python benchmarks/bench_serving.py                               # tiny, defaults
    python benchmarks/bench_serving.py --requests 128 --concurrency 16 --max-tokens 64
    python benchmarks/bench_serving.py --model work/base --adapter work/adapters/npo \\
        --adapter2 work/adapters/graddiff --json out.json

Everything listens on 127.0.0.1; child servers run in their own process groups and are
killed (SIGINT, then SIGKILL) on exit, on error and on SIGTERM. Server logs are kept in
the work dir (printed at the end; ``--keep`` keeps the dir).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._servers import (  # noqa: E402
    ChildServer,
    add_engine_args,
    engine_config,
    free_port,
    on_sigterm,
)

logger = logging.getLogger(__name__)

ADAPTER_NAME = "bench"  # vLLM --lora-modules name; the model= of baseline requests
TENANT = "bench"
TENANT_KEY = "sk-bench-0123456789abcdef"
ADMIN_KEY = "adm-bench-0123456789abcdef"
PROMPTS = (
    "Tell me about the author.",
    "Who wrote the book?",
    "What is the capital of France?",
    "Summarise the story in two sentences.",
    "List five numbers and a date.",
    "Why did the fox jump over the dog?",
    "Where was the author born, and what does she write?",
    "Explain what was removed from this model.",
)


# ------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} is outside 0..100")
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class RequestResult:
    """One streamed chat request as the client saw it.

    ``ttft_s`` is the time from sending to the first chunk carrying text (NaN if none
    came); ``latency_s`` to the end of the stream; ``output_tokens`` the server's usage
    count (``stream_options.include_usage``), else the number of text chunks.
    ``version`` is unlearnd's ``unlearning.policy_version`` (None for vLLM).
    """

    ok: bool
    ttft_s: float
    latency_s: float
    output_tokens: int
    started_at: float
    prompt: str = ""
    text: str = ""
    version: str | None = None
    error: str | None = None


@dataclass
class LoadSummary:
    """What one server did with the request mix (see module docstring)."""

    server: str
    requests: int
    errors: int
    output_tokens: int
    tokens_per_s: float
    round_tokens_per_s: list[float]
    ttft_p50_s: float
    ttft_p99_s: float
    latency_p50_s: float
    latency_p99_s: float
    error_samples: list[str] = field(default_factory=list)
    outputs: dict[str, list[str]] = field(default_factory=dict)
    cpu_s_per_1k_tokens: dict[str, float] = field(default_factory=dict)
    """CPU seconds per 1000 output tokens during the measured rounds, per server process"""
    """prompt -> the distinct greedy texts it got (one each when the server is deterministic)"""

    @classmethod
    def from_rounds(cls, server: str, rounds: list[tuple[list[RequestResult], float]]
                    ) -> LoadSummary:
        results = [r for rs, _ in rounds for r in rs]
        ok = [r for r in results if r.ok]
        tps = [sum(r.output_tokens for r in rs if r.ok) / wall for rs, wall in rounds]
        return cls(
            server=server, requests=len(results), errors=len(results) - len(ok),
            output_tokens=sum(r.output_tokens for r in ok),
            tokens_per_s=statistics.median(tps) if tps else math.nan,
            round_tokens_per_s=tps,
            ttft_p50_s=percentile([r.ttft_s for r in ok], 50),
            ttft_p99_s=percentile([r.ttft_s for r in ok], 99),
            latency_p50_s=percentile([r.latency_s for r in ok], 50),
            latency_p99_s=percentile([r.latency_s for r in ok], 99),
            error_samples=[r.error or "" for r in results if not r.ok][:5],
            outputs={p: sorted({r.text for r in ok if r.prompt == p}) for p in PROMPTS
                     if any(r.prompt == p for r in ok)})


# ------------------------------------------------------------------ load generator


async def stream_chat(client: httpx.AsyncClient, url: str, key: str, model: str, prompt: str,
                      max_tokens: int) -> RequestResult:
    """One streamed chat completion, timed from send to first text and to end of stream."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, chunks, usage_tokens, version = math.nan, 0, None, None
    parts: list[str] = []
    try:
        async with client.stream("POST", url, json=body,
                                 headers={"Authorization": f"Bearer {key}"}) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:300]
                return RequestResult(False, math.nan, time.perf_counter() - t0, 0, t0,
                                     error=f"HTTP {resp.status_code}: {text}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    return RequestResult(False, math.nan, time.perf_counter() - t0, 0, t0,
                                         error=f"stream error: {obj['error']}")
                for choice in obj.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if chunks == 0:
                            ttft = time.perf_counter() - t0
                        chunks += 1
                        parts.append(content)
                if obj.get("usage"):
                    usage_tokens = obj["usage"].get("completion_tokens")
                if obj.get("unlearning"):
                    version = obj["unlearning"].get("policy_version")
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return RequestResult(False, math.nan, time.perf_counter() - t0, 0, t0,
                             error=f"{type(e).__name__}: {e}")
    latency = time.perf_counter() - t0
    tokens = usage_tokens if usage_tokens is not None else chunks
    return RequestResult(True, ttft, latency, tokens, t0, prompt=prompt, text="".join(parts),
                         version=version)


async def run_mix(base_url: str, key: str, model: str, n_requests: int, concurrency: int,
                  max_tokens: int, stop: asyncio.Event | None = None,
                  timeout_s: float = 300.0) -> tuple[list[RequestResult], float]:
    """Send request i with prompt ``PROMPTS[i % len]`` over `concurrency` workers.

    Runs all `n_requests`, or, with `stop`, keeps cycling until `stop` is set (at most
    `n_requests`). Returns the results and the wall time of the whole mix.
    """
    if n_requests < 1 or concurrency < 1 or max_tokens < 1:
        raise ValueError(f"need requests, concurrency, max_tokens >= 1 (got {n_requests}, "
                         f"{concurrency}, {max_tokens})")
    url = base_url + "/v1/chat/completions"
    results: list[RequestResult] = []
    counter = iter(range(n_requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            for i in counter:
                if stop is not None and stop.is_set():
                    return
                results.append(await stream_chat(client, url, key, model,
                                                 PROMPTS[i % len(PROMPTS)], max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return results, wall


@dataclass(frozen=True)
class Target:
    """A running server and how the mix addresses it (key; model = adapter name for vLLM)."""

    name: str
    server: ChildServer
    key: str
    model: str


async def measure(targets: list[Target], args: argparse.Namespace
                  ) -> tuple[list[LoadSummary], dict[str, float]]:
    """Warm each target up (one request per connection), then run `args.rounds` rounds.

    With several targets (``--interleave``) the rounds alternate between them, in
    A B, B A, ... order, so slow drift in the machine's background load hits both
    alike. Also returns, per target, the CPU seconds its processes used while another
    target's round ran (what an idle server costs the one being measured).
    """
    for t in targets:
        await run_mix(t.server.base_url, t.key, t.model, args.concurrency, args.concurrency,
                      args.max_tokens)
    rounds: dict[str, list[tuple[list[RequestResult], float]]] = {t.name: [] for t in targets}
    idle_cpu = {t.name: 0.0 for t in targets}
    busy_cpu: dict[str, dict[str, float]] = {t.name: {} for t in targets}
    for r in range(args.rounds):
        for t in (targets if r % 2 == 0 else targets[::-1]):
            others = [o for o in targets if o is not t]
            cpu0 = [o.server.cpu_seconds() for o in others]
            own0 = t.server.cpu_by_process()
            results, wall = await run_mix(t.server.base_url, t.key, t.model, args.requests,
                                          args.concurrency, args.max_tokens)
            for name, sec in t.server.cpu_by_process().items():
                busy = busy_cpu[t.name]
                busy[name] = busy.get(name, 0.0) + sec - own0.get(name, 0.0)
            for o, c0 in zip(others, cpu0, strict=True):
                idle_cpu[o.name] += o.server.cpu_seconds() - c0
            tokens = sum(x.output_tokens for x in results if x.ok)
            logger.info("%s round %d: %d requests, %d tokens in %.2f s (%.1f tok/s)", t.name,
                        r, len(results), tokens, wall, tokens / wall)
            rounds[t.name].append((results, wall))
    summaries = []
    for t in targets:
        summary = LoadSummary.from_rounds(t.name, rounds[t.name])
        summary.cpu_s_per_1k_tokens = {k: 1000 * v / max(summary.output_tokens, 1)
                                       for k, v in sorted(busy_cpu[t.name].items())}
        summaries.append(summary)
    return summaries, idle_cpu


@dataclass
class SwapSummary:
    """Activations made while load ran, and what the load saw meanwhile."""

    swaps: int
    swap_errors: int
    admin_wall_p50_s: float
    admin_wall_p99_s: float
    admin_wall_max_s: float
    server_swap_p50_s: float
    server_swap_p99_s: float
    requests_during: int
    failed_during: int
    foreign_versions: int
    tokens_per_s_during: float
    error_samples: list[str] = field(default_factory=list)
    admin_wall_s: list[float] = field(default_factory=list)
    server_swap_s: list[float] = field(default_factory=list)


async def swap_under_load(server: ChildServer, versions: tuple[str, str],
                          args: argparse.Namespace) -> SwapSummary:
    """Alternately activate `versions` `args.swaps` times while the mix keeps running."""
    stop = asyncio.Event()
    load = asyncio.create_task(run_mix(server.base_url, TENANT_KEY, "any", 1_000_000,
                                       args.concurrency, args.max_tokens, stop=stop))
    walls, reported, errors = [], [], []
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        async with httpx.AsyncClient(base_url=server.base_url, headers=headers,
                                     timeout=120) as admin:
            await asyncio.sleep(args.swap_gap_s)  # let the load reach steady state
            for k in range(args.swaps):
                target = versions[(k + 1) % 2]  # versions[0] is active: v1, v0, v1, ...
                t0 = time.perf_counter()
                r = await admin.post(f"/admin/tenants/{TENANT}/activate",
                                     json={"version": target})
                walls.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(f"activate {target}: HTTP {r.status_code} {r.text[:200]}")
                else:
                    reported.append(float(r.json()["swap_seconds"]))
                await asyncio.sleep(args.swap_gap_s)
    finally:
        stop.set()
        results, wall = await load
    failed = [r for r in results if not r.ok]
    foreign = [r for r in results if r.ok and r.version not in versions]
    tokens = sum(r.output_tokens for r in results if r.ok)
    return SwapSummary(
        swaps=len(walls), swap_errors=len(errors),
        admin_wall_p50_s=percentile(walls, 50), admin_wall_p99_s=percentile(walls, 99),
        admin_wall_max_s=max(walls) if walls else math.nan,
        server_swap_p50_s=percentile(reported, 50), server_swap_p99_s=percentile(reported, 99),
        requests_during=len(results), failed_during=len(failed),
        foreign_versions=len(foreign), tokens_per_s_during=tokens / wall,
        error_samples=(errors + [r.error or "" for r in failed])[:5],
        admin_wall_s=walls, server_swap_s=reported)


# ------------------------------------------------------------------ the two servers


def chat_template_file(model_dir: Path) -> Path | None:
    """The model's ``chat_template.jinja`` (vLLM's --chat-template), if it has one.

    None when there is none: vLLM then takes ``tokenizer_config.json``'s template.
    """
    jinja = model_dir / "chat_template.jinja"
    return jinja if jinja.is_file() else None


def vllm_argv(args: argparse.Namespace, port: int) -> list[str]:
    """vLLM's own OpenAI server with the engine settings unlearnd passes to AsyncLLM."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(args.model), "--served-model-name", "base",
            "--host", "127.0.0.1", "--port", str(port),
            "--enable-lora", "--lora-modules", f"{ADAPTER_NAME}={args.adapter}",
            "--max-loras", str(args.max_loras), "--max-lora-rank", str(args.max_lora_rank),
            "--max-cpu-loras", str(args.max_cpu_loras),
            "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
            "--dtype", "float32", "--enforce-eager", "--enable-prefix-caching",
            "--kv-cache-memory-bytes", str(args.kv_cache_bytes), "--seed", "0",
            "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]
    template = chat_template_file(args.model)
    if template is not None:
        argv += ["--chat-template", str(template)]
    return argv


def unlearnd_config(args: argparse.Namespace, port: int, state_dir: Path) -> dict[str, Any]:
    """An unlearnd config with one tenant serving the adapter (no guards)."""
    return {
        "model": str(args.model), "served_model_name": "base", "state_dir": str(state_dir),
        "admin_key": ADMIN_KEY, "port": port, "host": "127.0.0.1",
        "engine": engine_config(args),
        "tenants": [{"name": TENANT, "api_key": TENANT_KEY, "adapter": str(args.adapter)}],
    }


def register_versions(server: ChildServer, adapter2: Path) -> tuple[str, str]:
    """(active version from the config, a newly registered version of `adapter2`)."""
    with httpx.Client(base_url=server.base_url, timeout=120,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        r = admin.get(f"/admin/tenants/{TENANT}/versions")
        r.raise_for_status()
        active = [v["name"] for v in r.json()["data"] if v["active"]]
        if len(active) != 1:
            raise RuntimeError(f"expected one active version, got {r.json()}")
        r = admin.post(f"/admin/tenants/{TENANT}/versions", json={"adapter": str(adapter2)})
        if r.status_code != 201:
            raise RuntimeError(f"registering {adapter2}: HTTP {r.status_code} {r.text}")
        return active[0], r.json()["name"]


# ------------------------------------------------------------------ report


def _ms(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x * 1000:.0f}"


def load_table(rows: list[LoadSummary]) -> str:
    head = ("| server | requests | errors | output tok | tok/s (median of rounds) | "
            "TTFT p50 ms | TTFT p99 ms | latency p50 ms | latency p99 ms |")
    lines = [head, "|" + " --- |" * 9]
    for s in rows:
        per_round = ", ".join(f"{x:.1f}" for x in s.round_tokens_per_s)
        lines.append(f"| {s.server} | {s.requests} | {s.errors} | {s.output_tokens} | "
                     f"{s.tokens_per_s:.1f} ({per_round}) "
                     f"| {_ms(s.ttft_p50_s)} | {_ms(s.ttft_p99_s)} | {_ms(s.latency_p50_s)} | "
                     f"{_ms(s.latency_p99_s)} |")
    return "\n".join(lines)


def swap_table(s: SwapSummary) -> str:
    return "\n".join([
        "| swaps | failed swaps | admin call p50 ms | p99 ms | max ms | server swap_seconds "
        "p50 ms | p99 ms | requests during | failed | other version | tok/s during |",
        "|" + " --- |" * 11,
        f"| {s.swaps} | {s.swap_errors} | {_ms(s.admin_wall_p50_s)} | {_ms(s.admin_wall_p99_s)} "
        f"| {_ms(s.admin_wall_max_s)} | {_ms(s.server_swap_p50_s)} | {_ms(s.server_swap_p99_s)} "
        f"| {s.requests_during} | {s.failed_during} | {s.foreign_versions} "
        f"| {s.tokens_per_s_during:.1f} |"])


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="base model dir (default: tiny random Llama)")
    p.add_argument("--adapter", type=Path, help="LoRA adapter served by both (default: random)")
    p.add_argument("--adapter2", type=Path, help="second adapter for the swap phase "
                   "(default: random)")
    p.add_argument("--requests", type=int, default=64, help="requests per round (default 64)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent streams (default 8)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens (default 32)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the mix per server "
                   "(default 3; tok/s is the median round)")
    p.add_argument("--swaps", type=int, default=20, help="activations under load (default 20)")
    p.add_argument("--swap-gap-s", type=float, default=0.25,
                   help="pause between activations (default 0.25 s)")
    add_engine_args(p)
    p.add_argument("--start-timeout-s", type=float, default=300.0)
    p.add_argument("--interleave", action="store_true", help="start both servers (one after "
                   "the other), then alternate rounds between them (A B B A ...): background "
                   "load on a shared machine hits both alike; the idle one's CPU is reported")
    p.add_argument("--skip-vllm", action="store_true", help="only unlearnd (no ratio)")
    p.add_argument("--skip-swap", action="store_true", help="no swap-under-load phase")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--workdir", type=Path, help="where models, state and logs go "
                   "(default: a temp dir, removed unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    args = p.parse_args(argv)
    for name in ("requests", "concurrency", "max_tokens", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.swaps < 0:
        p.error(f"--swaps must be >= 0 (got {args.swaps})")
    for name in ("model", "adapter", "adapter2"):
        path = getattr(args, name)
        if path is not None and not path.is_dir():
            p.error(f"--{name} {path} is not a directory")
    if args.adapter is not None and args.model is None:
        p.error("--adapter needs --model (an adapter belongs to its base model)")
    return args


def prepare_world(args: argparse.Namespace, workdir: Path) -> None:
    """Fill in the tiny model and random adapters the user did not give."""
    import torch

    from unlearnd.toolkit.tiny import make_random_adapter, make_tiny_model

    torch.set_num_threads(1)
    if args.model is None:
        args.model = make_tiny_model(workdir / "base", seed=0)
    if args.adapter is None:
        args.adapter = make_random_adapter(args.model, workdir / "adapter1", seed=1)
    if args.adapter2 is None and not args.skip_swap:
        args.adapter2 = make_random_adapter(args.model, workdir / "adapter2", seed=2)
    args.model, args.adapter = args.model.resolve(), args.adapter.resolve()
    if args.adapter2 is not None:
        args.adapter2 = args.adapter2.resolve()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-serving-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    try:
        prepare_world(args, workdir)
        print(f"model {args.model}\nadapter {args.adapter}\nrequests {args.requests} x "
              f"{args.rounds} rounds, concurrency {args.concurrency}, max_tokens "
              f"{args.max_tokens}, work dir {workdir}", flush=True)
        vllm_port, ours_port = free_port(), free_port()
        vllm = ChildServer("vllm", vllm_argv(args, vllm_port), vllm_port, workdir / "vllm.log")
        cfg_path = workdir / "unlearnd.yaml"
        cfg_path.write_text(yaml.safe_dump(unlearnd_config(args, ours_port, workdir / "state")))
        ours = ChildServer("unlearnd", [sys.executable, "-m", "unlearnd.cli", "serve",
                                        "--config", str(cfg_path), "--log-level", "warning"],
                           ours_port, workdir / "unlearnd.log")
        t_vllm = Target("vllm", vllm, "none", ADAPTER_NAME)
        t_ours = Target("unlearnd", ours, TENANT_KEY, "any")
        rows: list[LoadSummary] = []
        swap: SwapSummary | None = None
        try:
            if args.interleave and not args.skip_vllm:
                vllm.start(args.start_timeout_s)
                ours.start(args.start_timeout_s)
                rows, idle_cpu = asyncio.run(measure([t_vllm, t_ours], args))
                results["idle_server_cpu_s"] = idle_cpu
                vllm.stop()
            else:
                if not args.skip_vllm:
                    vllm.start(args.start_timeout_s)
                    rows += asyncio.run(measure([t_vllm], args))[0]
                    vllm.stop()
                ours.start(args.start_timeout_s)
                rows += asyncio.run(measure([t_ours], args))[0]
            if not args.skip_swap and args.swaps > 0:
                versions = register_versions(ours, args.adapter2)
                swap = asyncio.run(swap_under_load(ours, versions, args))
        finally:
            vllm.stop()
            ours.stop()
        results["vllm_start_s"], results["unlearnd_start_s"] = vllm.start_s, ours.start_s

        print("\n## Request mix\n")
        print(load_table(rows))
        ratio = math.nan
        if len(rows) == 2 and rows[0].tokens_per_s > 0:
            ratio = rows[1].tokens_per_s / rows[0].tokens_per_s
            print(f"\nthroughput ratio unlearnd / vLLM: {ratio:.3f} (goal >= 0.95: "
                  f"{'met' if ratio >= 0.95 else 'NOT met'})")
            pairs = [o / v for v, o in zip(rows[0].round_tokens_per_s,
                                           rows[1].round_tokens_per_s, strict=True)]
            results["round_ratios"] = pairs
            print(f"per-round ratios ({'interleaved' if args.interleave else 'sequential'}): "
                  + ", ".join(f"{x:.3f}" for x in pairs)
                  + f"; median {statistics.median(pairs):.3f}")
        for row in rows:
            print(f"{row.server} CPU s per 1000 output tokens: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in row.cpu_s_per_1k_tokens.items())
                  + f" (total {sum(row.cpu_s_per_1k_tokens.values()):.2f})")
        if "idle_server_cpu_s" in results:
            print("CPU seconds each server used while the other was measured: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in results["idle_server_cpu_s"].items()))
        if len(rows) == 2:
            same = [p for p in rows[0].outputs if rows[0].outputs[p] == rows[1].outputs.get(p)]
            print(f"greedy outputs identical on both servers for {len(same)}/"
                  f"{len(rows[0].outputs)} prompts (same weights, same adapter, same work)")
            results["identical_outputs"] = f"{len(same)}/{len(rows[0].outputs)}"
        for s in rows:
            if s.error_samples:
                print(f"{s.server} errors, first ones: {s.error_samples}")
        if swap is not None:
            print("\n## Swap under load\n")
            print(swap_table(swap))
            p99 = max(swap.admin_wall_p99_s, swap.server_swap_p99_s)
            print(f"\nswap p99 (admin call) {_ms(swap.admin_wall_p99_s)} ms (goal <= 1000: "
                  f"{'met' if p99 <= 1.0 else 'NOT met'}); failed requests during swaps: "
                  f"{swap.failed_during} (must be 0)")
            if swap.error_samples:
                print(f"swap-phase errors, first ones: {swap.error_samples}")
        results.update(args={k: str(v) for k, v in vars(args).items()},
                       load=[asdict(r) for r in rows], ratio=ratio,
                       swap=asdict(swap) if swap else None)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        failed = (any(r.errors for r in rows)
                  or (swap is not None and (swap.failed_during or swap.swap_errors
                                            or swap.foreign_versions)))
        return 1 if failed else 0
    finally:
        ChildServer.stop_all()
        if args.keep or args.workdir:
            print(f"logs: {workdir}/vllm.log {workdir}/unlearnd.log")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
