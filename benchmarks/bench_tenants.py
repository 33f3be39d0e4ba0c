"""Many tenants on one engine: throughput, TTFT and memory at 1, 16, 64 and 256 tenants.

One run builds a world, then starts one ``unlearnd serve`` per tenant count (one at a
time: they would fight over the cores) and puts the same load on each:

- **World.** A tiny random Llama (``unlearnd.toolkit.tiny``; its byte-level BPE
  trained on the synthetic authors' text) and the demo generator's authors
  (``unlearnd.toolkit.synth``). Tenant ``i`` forgets author ``i``: its canonical QA
  rows, compiled into a guard policy (refusal + firewall) against the other authors'
  rows as the retain set, and/or a random LoRA adapter of its own.
- **Mix** (by tenant index ``i``): ``i % 4 == 0`` adapter only, ``i % 4 == 1`` adapter
  and guard policy, otherwise guard policy only. So half the tenants carry an adapter:
  8, 32 and 128 adapters at 16, 64 and 256 tenants, against ``--max-loras`` GPU slots
  and ``--max-cpu-loras`` CPU-cached adapters; vLLM reloads evicted ones from the
  store on demand.
- **Load.** ``--requests`` streamed chat requests over ``--concurrency`` connections
  (closed loop: the same offered load for every count), each for a tenant drawn with
  a fixed seed, **uniformly** and then **Zipf** (exponent ``--zipf``: a few hot tenants,
  a long cold tail). Every fourth request of a guard tenant asks its own forgotten
  author's question (in scope: a refusal), the rest are generic prompts.
- **Checked:** every response names its tenant's own active version (the
  ``x-unlearnd-policy-version`` header and the stream's ``unlearning`` object); a
  response from any other version, or any failed request, is counted and reported.
- **Memory:** resident memory of the API process and of the engine process after the
  load, and per tenant against the one-tenant server. A final ``--guard-only`` server
  (the largest count, every tenant guard-only, one request each so the engine has
  loaded every policy) gives the memory of a guard-only tenant in each process.

- **Baseline,** measured on the same server in the same run: rounds alternate the
  count's own request list with the same list mapped onto tenants 0, 1, 2 (one per
  kind: each request goes to the representative of its tenant's kind, an in-scope
  question becomes the representative's own). The same mechanisms do the same work
  per request on the same engine; only the number of versions the traffic spreads
  over differs (adapter slots and CPU cache, policy caches, prefix-cache salts). Two
  servers up at once would not do: an idle vLLM CPU worker keeps spinning on a core.
  Across counts the baseline rows also show what merely registering more tenants
  costs (each count is its own server, measured one after another).

Table: requests/s and output tokens/s, ratio against the baseline (same requests),
TTFT and latency p50/p99, adapters registered against the LoRA slots, wrong-version
responses, errors, RSS. ``--json`` writes everything.

    python benchmarks/bench_tenants.py                     # 1, 16, 64, 256 tenants
    python benchmarks/bench_tenants.py --counts 1,64 --requests 128 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
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
from benchmarks.bench_serving import PROMPTS, percentile  # noqa: E402

logger = logging.getLogger(__name__)

ADMIN_KEY = "adm-tenants-0123456789abcdef"


def tenant_name(i: int) -> str:
    return f"t{i:03d}"


def tenant_key(i: int) -> str:
    return f"sk-tenant-{i:03d}-0123456789abcdef"


def kind(i: int) -> str:
    """The tenant's mix: 'adapter', 'both' or 'guards' (see module docstring)."""
    return ("adapter", "both", "guards", "guards")[i % 4]


# ------------------------------------------------------------------ world


@dataclass
class World:
    base: Path
    adapters: dict[int, Path] = field(default_factory=dict)
    policies: dict[int, Path] = field(default_factory=dict)
    questions: dict[int, list[str]] = field(default_factory=dict)


def build_world(workdir: Path, n: int) -> World:
    """The tiny base, and per tenant its adapter / compiled policy (cached in workdir)."""
    import torch

    from unlearnd.guards.policy import compile_policy
    from unlearnd.toolkit.synth import build_world as synth_world
    from unlearnd.toolkit.tiny import make_random_adapter, make_tiny_model

    torch.set_num_threads(1)
    files = synth_world(authors=n + 20, seed=0, groups=1, group_size=1)
    by_subject: dict[str, list[dict]] = {}
    for row in files["retain.jsonl"]:
        by_subject.setdefault(row["subject"], []).append(row)
    subjects = list(by_subject)
    if len(subjects) < n + 1:
        raise RuntimeError(f"the synthetic world has {len(subjects)} authors, need {n + 1}")
    base = workdir / "base"
    if not (base / "config.json").is_file():
        texts = [r["answer"] for rows in by_subject.values() for r in rows]
        make_tiny_model(base, seed=0, texts=texts)
    world = World(base=base.resolve())
    # the retain set every policy is checked against: other authors' rows
    retain_path = workdir / "retain.jsonl"
    spare = subjects[n:]
    retain_path.write_text("".join(json.dumps(r) + "\n" for s in spare for r in by_subject[s]))
    t0 = time.perf_counter()
    for i in range(n):
        rows = by_subject[subjects[i]]
        world.questions[i] = [r["question"] for r in rows]
        if kind(i) in ("adapter", "both"):
            out = workdir / "adapters" / tenant_name(i)
            if not (out / "adapter_config.json").is_file():
                make_random_adapter(world.base, out, seed=1000 + i)
            world.adapters[i] = out.resolve()
        if kind(i) in ("both", "guards"):
            out = workdir / "policies" / tenant_name(i)
            if not (out / "policy.json").is_file():
                forget = workdir / "forget" / f"{tenant_name(i)}.jsonl"
                forget.parent.mkdir(parents=True, exist_ok=True)
                forget.write_text("".join(json.dumps(r) + "\n" for r in rows))
                compile_policy(forget, retain_path, world.base, out,
                               mechanisms=("refusal", "firewall"), name=tenant_name(i))
            world.policies[i] = out.resolve()
    logger.info("world for %d tenants ready in %.1f s", n, time.perf_counter() - t0)
    return world


def server_config(args: argparse.Namespace, world: World, n: int, port: int,
                  state_dir: Path, *, guard_only: bool = False) -> dict[str, Any]:
    tenants = []
    for i in range(n):
        t: dict[str, Any] = {"name": tenant_name(i), "api_key": tenant_key(i)}
        if guard_only:
            t["policy"] = str(world.policies.get(i) or world.policies[2 + 4 * (i // 4)])
        else:
            if i in world.adapters:
                t["adapter"] = str(world.adapters[i])
            if i in world.policies:
                t["policy"] = str(world.policies[i])
        tenants.append(t)
    return {
        "model": str(world.base), "served_model_name": "base", "state_dir": str(state_dir),
        "admin_key": ADMIN_KEY, "port": port, "host": "127.0.0.1",
        "engine": engine_config(args),
        "tenants": tenants,
    }


def active_versions(server: ChildServer, n: int) -> dict[str, str]:
    """tenant -> its active version name, from the admin API."""
    out: dict[str, str] = {}
    with httpx.Client(base_url=server.base_url, timeout=60,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        for i in range(n):
            r = admin.get(f"/admin/tenants/{tenant_name(i)}/versions")
            r.raise_for_status()
            active = [v["name"] for v in r.json()["data"] if v["active"]]
            if len(active) != 1:
                raise RuntimeError(f"{tenant_name(i)}: expected one active version: {r.text}")
            out[tenant_name(i)] = active[0]
    return out


# ------------------------------------------------------------------ load


@dataclass
class Result:
    tenant: str
    ok: bool
    ttft_s: float
    latency_s: float
    tokens: int
    header_version: str | None = None
    body_version: str | None = None
    error: str | None = None


async def one_request(client: httpx.AsyncClient, i: int, prompt: str,
                      max_tokens: int) -> Result:
    body = {"model": "base", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    name = tenant_name(i)
    t0 = time.perf_counter()
    ttft, tokens, version = math.nan, 0, None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {tenant_key(i)}"}) as resp:
            header = resp.headers.get("x-unlearnd-policy-version")
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:200]
                return Result(name, False, math.nan, time.perf_counter() - t0, 0, header,
                              error=f"HTTP {resp.status_code}: {text}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    return Result(name, False, math.nan, time.perf_counter() - t0, 0, header,
                                  error=f"stream error: {obj['error']}")
                for choice in obj.get("choices") or []:
                    if (choice.get("delta") or {}).get("content") and math.isnan(ttft):
                        ttft = time.perf_counter() - t0
                if obj.get("usage"):
                    tokens = int(obj["usage"].get("completion_tokens") or 0)
                if obj.get("unlearning"):
                    version = obj["unlearning"].get("policy_version")
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return Result(name, False, math.nan, time.perf_counter() - t0, 0,
                      error=f"{type(e).__name__}: {e}")
    return Result(name, True, ttft, time.perf_counter() - t0, tokens, header, version)


def draw_tenants(n: int, count: int, dist: str, zipf_s: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    if dist == "uniform" or n == 1:
        return [rng.randrange(n) for _ in range(count)]
    weights = [1.0 / (k + 1) ** zipf_s for k in range(n)]
    order = list(range(n))
    rng.shuffle(order)  # the hot tenants are not just the first indices (all one kind)
    return [order[k] for k in rng.choices(range(n), weights=weights, k=count)]


def make_jobs(world: World, tenants: list[int]) -> list[tuple[int, str]]:
    """(tenant, prompt) per request: every fourth request of a guard tenant asks its own
    forgotten author's question (in scope), the others generic prompts."""
    jobs = []
    for k, i in enumerate(tenants):
        own = world.questions.get(i) if i in world.policies and k % 4 == 3 else None
        jobs.append((i, own[(k // 4) % len(own)] if own else PROMPTS[k % len(PROMPTS)]))
    return jobs


def representatives(world: World, jobs: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The same requests for tenants 0, 1, 2 (one per kind): the baseline's work.

    Tenant i's request goes to the representative of kind(i), an in-scope question
    becomes the representative's own question, a generic prompt stays as it is; so the
    baseline does the same mechanisms' work per request with only three versions.
    """
    rep = {"adapter": 0, "both": 1, "guards": 2}
    out = []
    for i, prompt in jobs:
        r = rep[kind(i)]
        if i in world.questions and prompt in world.questions[i]:
            prompt = world.questions[r][world.questions[i].index(prompt)
                                        % len(world.questions[r])]
        out.append((r, prompt))
    return out


async def run_load(server: ChildServer, jobs: list[tuple[int, str]], concurrency: int,
                   max_tokens: int) -> tuple[list[Result], float]:
    queue = iter(jobs)
    results: list[Result] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=600, limits=limits) as c:

        async def worker() -> None:
            for i, prompt in queue:
                results.append(await one_request(c, i, prompt, max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return results, wall


@dataclass
class Row:
    tenants: str
    dist: str
    requests: int
    errors: int
    wrong_version: int
    req_per_s: float
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    latency_p50_s: float
    latency_p99_s: float
    distinct_tenants: int
    distinct_adapters: int
    start_s: float
    api_rss_mib: float
    engine_rss_mib: float
    error_samples: list[str] = field(default_factory=list)
    ratio: float = math.nan


def rss_by_role(server: ChildServer) -> tuple[float, float]:
    """(API process, engine processes) resident MiB of the server's process group."""
    rss = server.rss_by_process()
    api = rss.pop("api", 0.0)
    return api, sum(rss.values())


def summarise(n: str, dist: str, runs: list[tuple[list[Result], float]],
              expected: dict[str, str], world: World, server: ChildServer) -> Row:
    results = [r for rs, _ in runs for r in rs]
    wall = sum(w for _, w in runs)
    ok = [r for r in results if r.ok]
    wrong = [r for r in results if r.header_version is not None and (
        r.header_version != expected[r.tenant]
        or (r.ok and r.body_version != expected[r.tenant]))]
    used = {r.tenant for r in results}
    adapters = {tenant_name(i) for i in world.adapters} & used
    api, engine = rss_by_role(server)
    ttfts = [r.ttft_s for r in ok if not math.isnan(r.ttft_s)]
    return Row(tenants=n, dist=dist, requests=len(results), errors=len(results) - len(ok),
               wrong_version=len(wrong), req_per_s=len(ok) / wall,
               tokens_per_s=sum(r.tokens for r in ok) / wall,
               ttft_p50_s=percentile(ttfts, 50), ttft_p99_s=percentile(ttfts, 99),
               latency_p50_s=percentile([r.latency_s for r in ok], 50),
               latency_p99_s=percentile([r.latency_s for r in ok], 99),
               distinct_tenants=len(used), distinct_adapters=len(adapters),
               start_s=server.start_s, api_rss_mib=api, engine_rss_mib=engine,
               error_samples=[r.error or "" for r in results if not r.ok][:3])


def start_server(args: argparse.Namespace, world: World, n: int, workdir: Path, label: str,
                 **kw: Any) -> ChildServer:
    port = free_port()
    state = workdir / f"state-{label}"
    shutil.rmtree(state, ignore_errors=True)
    cfg = workdir / f"unlearnd-{label}.yaml"
    cfg.write_text(yaml.safe_dump(server_config(args, world, n, port, state, **kw)))
    server = ChildServer(f"unlearnd-{label}", [sys.executable, "-m", "unlearnd.cli", "serve",
                                                "--config", str(cfg), "--log-level",
                                                "warning"],
                         port, workdir / f"unlearnd-{label}.log")
    return server.start(args.start_timeout_s)


def warm_up(server: ChildServer, args: argparse.Namespace) -> None:
    """The engine's first steps (one tenant), so neither side pays them."""
    asyncio.run(run_load(server, [(0, PROMPTS[0])] * args.concurrency, args.concurrency,
                         args.max_tokens))


def plans(args: argparse.Namespace, world: World) -> dict[tuple[int, str], list]:
    """(count, traffic) -> the request list, drawn once with a fixed seed."""
    return {(n, dist): make_jobs(world, draw_tenants(n, args.requests, dist, args.zipf, n))
            for n in args.counts for dist in ("uniform", "zipf")}


def measure(args: argparse.Namespace, world: World, workdir: Path) -> list[Row]:
    """Per count, one server and `--rounds` rounds alternating the two plans (B N, N B,
    ...): the count's own requests, and the same requests mapped onto tenants 0-2 (the
    baseline: three versions, one per kind). Same engine, same requests, only the
    number of versions the traffic spreads over differs. Rows pool the rounds; the
    ratio is the median of the per-round ratios."""
    todo = plans(args, world)
    rows = []
    for n in args.counts:
        server = start_server(args, world, n, workdir, str(n))
        try:
            expected = active_versions(server, n)
            warm_up(server, args)
            for dist in ("uniform", "zipf"):
                jobs = todo[(n, dist)]
                mapped = representatives(world, jobs) if n >= 3 else jobs
                runs: dict[str, list[tuple[list[Result], float]]] = {"b": [], "n": []}
                for k in range(args.rounds):
                    for side in (("b", "n") if k % 2 == 0 else ("n", "b")):
                        runs[side].append(asyncio.run(run_load(
                            server, mapped if side == "b" else jobs, args.concurrency,
                            args.max_tokens)))
                base = summarise(f"{n}: baseline", dist, runs["b"], expected, world, server)
                row = summarise(str(n), dist, runs["n"], expected, world, server)
                row.ratio = statistics.median(
                    _tps(rn) / _tps(rb) for rb, rn in zip(runs["b"], runs["n"], strict=True))
                logger.info("%d tenants %s: %.2f req/s (ratio %.3f), %d errors, %d wrong",
                            n, dist, row.req_per_s, row.ratio, row.errors, row.wrong_version)
                rows += [base, row]
        finally:
            server.stop()
    return rows


def _tps(run: tuple[list[Result], float]) -> float:
    results, wall = run
    return sum(r.tokens for r in results if r.ok) / wall


def measure_guard_only(args: argparse.Namespace, world: World, n: int, workdir: Path
                       ) -> dict[str, float]:
    """RSS of a server whose n tenants are all guard-only, after one request each."""
    out: dict[str, float] = {}
    for count in (1, n):
        server = start_server(args, world, count, workdir, f"guards-{count}",
                              guard_only=True)
        try:
            every = [i for i in range(count) for _ in range(2)]
            results, _ = asyncio.run(run_load(server, make_jobs(world, every),
                                              args.concurrency, args.max_tokens))
            failed = [r.error for r in results if not r.ok]
            if failed:
                raise RuntimeError(f"guard-only server: {len(failed)} failed: {failed[:3]}")
            out[f"api_rss_mib_{count}"], out[f"engine_rss_mib_{count}"] = rss_by_role(server)
        finally:
            server.stop()
    out["api_mib_per_tenant"] = (out[f"api_rss_mib_{n}"] - out["api_rss_mib_1"]) / (n - 1)
    out["engine_mib_per_tenant"] = (out[f"engine_rss_mib_{n}"] - out["engine_rss_mib_1"]) / (
        n - 1)
    return out


# ------------------------------------------------------------------ report


def _ms(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x * 1000:.0f}"


def table(rows: list[Row], args: argparse.Namespace) -> str:
    head = ("| tenants | traffic | requests | errors | wrong version | req/s | tok/s | "
            "ratio vs baseline | TTFT p50 ms | TTFT p99 ms | latency p50 ms | "
            "latency p99 ms | tenants hit | adapters hit (slots "
            f"{args.max_loras}, CPU cache {args.max_cpu_loras}) | start s | API RSS MiB | "
            "engine RSS MiB |")
    lines = [head, "|" + "|".join([" --- "] * (head.count("|") - 1)) + "|"]
    for r in rows:
        lines.append(
            f"| {r.tenants} | {r.dist} | {r.requests} | {r.errors} | {r.wrong_version} | "
            f"{r.req_per_s:.2f} | {r.tokens_per_s:.1f} | "
            f"{'' if math.isnan(r.ratio) else f'{r.ratio:.3f}'} | {_ms(r.ttft_p50_s)} | "
            f"{_ms(r.ttft_p99_s)} | {_ms(r.latency_p50_s)} | {_ms(r.latency_p99_s)} | "
            f"{r.distinct_tenants} | {r.distinct_adapters} | {r.start_s:.0f} | "
            f"{r.api_rss_mib:.0f} | {r.engine_rss_mib:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", default="1,16,64,256", help="comma-separated tenant counts")
    p.add_argument("--requests", type=int, default=256, help="requests per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the hot tail")
    p.add_argument("--no-guard-only", action="store_true",
                   help="skip the guard-only memory servers")
    p.add_argument("--start-timeout-s", type=float, default=900)
    p.add_argument("--workdir", type=Path, default=None,
                   help="reuse a work dir (the world is cached there)")
    p.add_argument("--json", type=Path, default=None)
    add_engine_args(p)
    args = p.parse_args(argv)
    args.counts = [int(c) for c in args.counts.split(",")]
    if not args.counts or min(args.counts) < 1:
        p.error("--counts must hold positive counts")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-tenants-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    n_max = max(args.counts)
    world = build_world(workdir, n_max)
    print(f"work dir {workdir}; {args.requests} requests per traffic, concurrency "
          f"{args.concurrency}, max_tokens {args.max_tokens}, zipf {args.zipf}", flush=True)
    try:
        rows = measure(args, world, workdir)
        guard_mem = {} if args.no_guard_only or n_max < 2 else measure_guard_only(
            args, world, n_max, workdir)
    finally:
        ChildServer.stop_all()
    print("\n## Tenants on one engine\n")
    print(table(rows, args))
    print(f"\nratio: median over {args.rounds} alternating rounds of output tokens/s "
          "against the baseline rows: the same server serving the same requests mapped "
          "onto tenants 0-2 (one per kind)")
    if guard_mem:
        print(f"\nguard-only tenants ({n_max} against 1, every policy used): API "
              f"{guard_mem['api_mib_per_tenant']:.2f} MiB per tenant, engine "
              f"{guard_mem['engine_mib_per_tenant']:.2f} MiB per tenant (goal <= 5 MB each)")
    worst = min((r.ratio for r in rows if r.tenants == str(n_max)), default=math.nan)
    wrong = sum(r.wrong_version for r in rows)
    errors = sum(r.errors for r in rows)
    print(f"\n{n_max} tenants vs 1: worst throughput ratio {worst:.3f} (goal >= 0.8: "
          f"{'met' if worst >= 0.8 else 'NOT met'}); {wrong} responses from another "
          f"version; {errors} failed requests")
    for r in rows:
        for e in r.error_samples:
            print(f"  error ({r.tenants}, {r.dist}): {e}")
    if args.json:
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows],
                                         "guard_only": guard_mem,
                                         "args": {k: v for k, v in vars(args).items()
                                                  if k not in ("workdir", "json")}},
                                        indent=2, default=str))
    return 0 if wrong == 0 and errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
