"""How fast a swap made through one replica reaches another: LISTEN/NOTIFY against polling.

Two ``unlearnd serve`` replicas share one PostgreSQL registry and one store (as in
tests/e2e/test_replicas.py), each vLLM CPU worker pinned to its own core. One tenant has
two registered adapter versions. While ``--clients`` connections per replica keep
sending chat requests to both, replica A's admin API activates the two versions in
turn ``--swaps`` times; after each, the benchmark polls replica B's ``/metrics`` (every
20 ms) until B's routing pointer names the new version. *Propagation* is the time from
the activation (its time in the registry's audit row) to B routing every new request to
the version: the notification (or the next poll) and B's registry read. B measures it
itself (``unlearnd_policy_propagation_seconds``); the benchmark takes each swap's value
from the growth of that histogram's sum, and also reports the lag seen from outside
(A's activate call returning to B's ``/metrics`` naming the version, which adds a
``/metrics`` round trip on a busy B). A version B has not served routes at once and
loads its adapter behind the pointer, so the requests B's clients send meanwhile wait
for that load: their latency is in the table too.

The pair runs three times in one go, at ``registry_poll_s`` = ``--poll-s`` (default 2,
the server's default): with ``registry_notify: true`` (the default) swapping between two
versions (after the first swap B holds both: ``keep_previous_versions: 1`` makes each
swap a pointer move, what a rollback costs); with notify and a new version every swap
(each one an adapter load on B, the worst case); and polling alone between two
versions. Table: propagation p50/p99/max per mode (B's own and from outside), request
latency on B, requests served and failed under the load, and the p99 ratio notify /
polling.

Needs a PostgreSQL server whose user may CREATE DATABASE: ``--database-url``, else
``UNLEARND_TEST_DATABASE_URL``, else the URL ``scripts/ci_services.sh`` wrote to
``.cache/database_url``. A fresh database is made for each mode and dropped after.

    python benchmarks/bench_propagation.py                 # 20 swaps per mode
    python benchmarks/bench_propagation.py --swaps 50 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._servers import (  # noqa: E402
    ChildServer,
    add_engine_args,
    engine_config,
    free_port,
    on_sigterm,
)
from benchmarks.bench_serving import percentile  # noqa: E402

logger = logging.getLogger(__name__)

ADMIN_KEY = "adm-prop-0123456789abcdef"
TENANT = "swap"
TENANT_KEY = "sk-swap-prop-0123456789abcdef"
PROMPTS = ("Tell me about the author.", "Who wrote the book?", "What is the capital?")


def database_url(arg: str | None) -> str:
    url = arg or os.environ.get("UNLEARND_TEST_DATABASE_URL")
    path = REPO / ".cache" / "database_url"
    if not url and path.is_file():
        url = path.read_text().strip()
    if not url:
        raise SystemExit("no PostgreSQL: pass --database-url or run scripts/ci_services.sh")
    return url


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    import psycopg

    name = f"unlearnd_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(admin_url)._replace(path="/" + name))
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def active_version(text: str) -> tuple[str | None, float, float]:
    """B's routing pointer for the tenant, and the count and sum of its own propagation
    histogram (the sync that moves the pointer observes it without yielding to the event
    loop, so the /metrics text that names a new version already counts its lag)."""
    from prometheus_client.parser import text_string_to_metric_families

    version, count, total = None, 0.0, 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "unlearnd_active_policy_info":
            for s in family.samples:
                if s.labels.get("tenant") == TENANT and s.value == 1:
                    version = s.labels.get("version")
        elif family.name == "unlearnd_policy_propagation_seconds":
            for s in family.samples:
                if s.labels.get("tenant") == TENANT and s.name.endswith("_count"):
                    count = s.value
                elif s.labels.get("tenant") == TENANT and s.name.endswith("_sum"):
                    total = s.value
    return version, count, total


def replica_envs() -> list[dict[str, str]]:
    """Each replica's vLLM CPU worker on its own core (see deploy/README.md)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return [{}, {}]
    return [{"VLLM_CPU_OMP_THREADS_BIND": str(cores[0])},
            {"VLLM_CPU_OMP_THREADS_BIND": str(cores[1])}]


def config(args: argparse.Namespace, base: Path, adapter: Path, state: Path, url: str,
           port: int, notify: bool, declare: bool) -> dict[str, Any]:
    return {
        "model": str(base), "state_dir": str(state), "database_url": url,
        "admin_key": ADMIN_KEY, "port": port, "host": "127.0.0.1",
        "registry_poll_s": args.poll_s, "registry_notify": notify, "drain_timeout_s": 30,
        "engine": engine_config(args),
        "tenants": [{"name": TENANT, "api_key": TENANT_KEY, "adapter": str(adapter)}]
        if declare else [],
    }


async def swap_under_load(a: ChildServer, b: ChildServer, versions: list[str],
                          args: argparse.Namespace) -> dict[str, Any]:
    stop = asyncio.Event()
    served, failed = 0, []
    latency: dict[str, list[float]] = {"a": [], "b": []}

    async def client(server: ChildServer, i: int) -> None:
        nonlocal served
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120, headers={
                "Authorization": f"Bearer {TENANT_KEY}"}) as c:
            k = 0
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    r = await c.post("/v1/chat/completions", json={
                        "model": "m", "max_tokens": 12, "temperature": 0, "messages": [
                            {"role": "user", "content": PROMPTS[(i + k) % len(PROMPTS)]}]})
                    if r.status_code == 200:
                        served += 1
                        latency["a" if server is a else "b"].append(time.perf_counter() - t)
                    else:
                        failed.append(f"HTTP {r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as e:
                    failed.append(f"{type(e).__name__}: {e}")
                k += 1

    workers = [asyncio.create_task(client(s, i)) for i in range(args.clients) for s in (a, b)]
    lags: list[float] = []
    own: list[float] = []  # per swap, B's own lag: the growth of its histogram's sum
    missed = 0
    try:
        await asyncio.sleep(1.0)
        async with httpx.AsyncClient(base_url=a.base_url, timeout=120, headers={
                "Authorization": f"Bearer {ADMIN_KEY}"}) as admin, \
                httpx.AsyncClient(base_url=b.base_url, timeout=30) as metrics:
            _, seen, total = active_version((await metrics.get("/metrics")).text)
            for k in range(args.swaps):
                # two versions: alternate (B holds the previous one: a pointer move);
                # more: each swap is to a version B has never served (an adapter load)
                target = versions[(k + 1) % 2] if len(versions) == 2 else versions[k + 1]
                r = await admin.post(f"/admin/tenants/{TENANT}/activate",
                                     json={"version": target})
                r.raise_for_status()
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < args.poll_s + 30:
                    version, count, now = active_version((await metrics.get("/metrics")).text)
                    if version == target:
                        lags.append(time.perf_counter() - t0)
                        if count == seen + 1:
                            own.append(now - total)
                        seen, total = count, now
                        break
                    await asyncio.sleep(0.02)
                else:
                    missed += 1
                await asyncio.sleep(args.gap_s)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    return {"lags_s": lags, "own_lags_s": own, "missed": missed, "served": served,
            "failed": len(failed), "failed_samples": failed[:3],
            "b_propagation": b_histogram(b),
            "latency_p50_s": {k: percentile(v, 50) for k, v in latency.items()},
            "latency_p99_s": {k: percentile(v, 99) for k, v in latency.items()}}


def b_histogram(b: ChildServer) -> dict[str, float]:
    """B's own `unlearnd_policy_propagation_seconds` (from the registry's activation
    time to B serving it; no /metrics round trip in it): count, mean and the share of
    observations at most 1 s."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(b.base_url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "unlearnd_policy_propagation_seconds":
            continue
        for s in family.samples:
            if s.labels.get("tenant") != TENANT:
                continue
            if s.name.endswith("_count"):
                out["count"] = s.value
            elif s.name.endswith("_sum"):
                out["sum"] = s.value
            elif s.name.endswith("_bucket") and float(s.labels["le"]) == 1.0:
                out["le_1s"] = s.value
    if out.get("count"):
        out["mean_s"] = out["sum"] / out["count"]
        out["share_le_1s"] = out.get("le_1s", math.nan) / out["count"]
    return out


def run_mode(args: argparse.Namespace, base: Path, adapters: list[Path],
             workdir: Path, notify: bool, label: str) -> dict[str, Any]:
    slug = "".join(c if c.isalnum() else "-" for c in label)
    with fresh_database(args.database_url) as url:
        state = workdir / f"state-{slug}"
        envs = replica_envs()
        servers = []
        for name, declare, env in (("a", True, envs[0]), ("b", False, envs[1])):
            port = free_port()
            cfg = workdir / f"{slug}-{name}.yaml"
            cfg.write_text(yaml.safe_dump(config(args, base, adapters[0], state, url, port,
                                                 notify, declare)))
            servers.append(ChildServer(f"{slug}-{name}", [
                sys.executable, "-m", "unlearnd.cli", "serve", "--config", str(cfg),
                "--log-level", "warning"], port, workdir / f"{slug}-{name}.log", env=env))
        a, b = servers
        try:
            a.start(args.start_timeout_s)  # A registers the tenant; B reads it on start
            b.start(args.start_timeout_s)
            with httpx.Client(base_url=a.base_url, timeout=120, headers={
                    "Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
                r = admin.get(f"/admin/tenants/{TENANT}/versions")
                r.raise_for_status()
                names = [next(v["name"] for v in r.json()["data"] if v["active"])]
                for adapter in adapters[1:]:
                    r = admin.post(f"/admin/tenants/{TENANT}/versions",
                                   json={"adapter": str(adapter)})
                    r.raise_for_status()
                    names.append(r.json()["name"])
            out = asyncio.run(swap_under_load(a, b, names, args))
        finally:
            b.stop()
            a.stop()
    lags, own = out["lags_s"], out["own_lags_s"]
    out.update(mode=label, p50_s=percentile(lags, 50), p99_s=percentile(lags, 99),
               max_s=max(lags) if lags else math.nan, own_p50_s=percentile(own, 50),
               own_p99_s=percentile(own, 99), own_max_s=max(own) if own else math.nan)
    logger.info("%s: p50 %.3f s, p99 %.3f s, %d failed", label, out["p50_s"], out["p99_s"],
                out["failed"])
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--swaps", type=int, default=20)
    p.add_argument("--clients", type=int, default=2, help="connections per replica")
    p.add_argument("--poll-s", type=float, default=2.0, help="registry_poll_s of both modes")
    p.add_argument("--gap-s", type=float, default=0.5, help="pause between swaps")
    p.add_argument("--database-url", default=None)
    p.add_argument("--start-timeout-s", type=float, default=600)
    p.add_argument("--json", type=Path, default=None)
    add_engine_args(p)
    args = p.parse_args(argv)
    args.database_url = database_url(args.database_url)
    if args.swaps < 1:
        p.error("--swaps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    from unlearnd.toolkit.tiny import make_random_adapter, make_tiny_model

    workdir = Path(tempfile.mkdtemp(prefix="bench-propagation-"))
    base = make_tiny_model(workdir / "base", seed=0)
    two = [make_random_adapter(base, workdir / f"a{i}", seed=i) for i in (1, 2)]
    fresh = two + [make_random_adapter(base, workdir / f"a{i}", seed=i)
                   for i in range(3, args.swaps + 2)]
    try:
        rows = [run_mode(args, base, two, workdir, True, "notify, 2 versions"),
                run_mode(args, base, fresh, workdir, True, "notify, a new version each swap"),
                run_mode(args, base, two, workdir, False, "poll, 2 versions")]
    finally:
        ChildServer.stop_all()
    print(f"\n## Swap propagation across two replicas ({args.swaps} swaps under load, "
          f"{args.clients} clients per replica, registry_poll_s {args.poll_s})\n")
    print("| mode | swaps seen | B's own p50 / p99 / max ms | seen from outside p50 / p99 / "
          "max ms | request latency on B p50 / p99 ms | requests served | failed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        own = f"{r['own_p50_s'] * 1000:.0f} / {r['own_p99_s'] * 1000:.0f} / " \
              f"{r['own_max_s'] * 1000:.0f}"
        seen = f"{r['p50_s'] * 1000:.0f} / {r['p99_s'] * 1000:.0f} / {r['max_s'] * 1000:.0f}"
        lat = f"{r['latency_p50_s']['b'] * 1000:.0f} / {r['latency_p99_s']['b'] * 1000:.0f}"
        print(f"| {r['mode']} | {len(r['lags_s'])}/{args.swaps} | {own} | {seen} | {lat} | "
              f"{r['served']} | {r['failed']} |")
    print("\n(B's own: per swap, the growth of B's unlearnd_policy_propagation_seconds sum, "
          "from the registry's activation time to B routing every new request to the "
          "version, wall clocks; seen from outside: from A's activate call returning to "
          "B's /metrics naming the version, polled every 20 ms, so it adds a /metrics round "
          "trip on a busy B; request latency: B's clients' chat requests, 12 tokens, "
          "over the whole mode)")
    ratio = rows[0]["own_p99_s"] / rows[2]["own_p99_s"]
    worst = max(rows[0]["own_p99_s"], rows[1]["own_p99_s"])
    seen = max(rows[0]["p99_s"], rows[1]["p99_s"])
    print(f"\np99 notify / poll (2 versions, B's own): {ratio:.3f}; worst notify p99 "
          f"{worst:.3f} s by B's own clock, {seen:.3f} s from outside (goal <= 1 s: "
          f"{'met' if worst <= 1.0 else 'NOT met'} by B's own)")
    for r in rows:
        for e in r["failed_samples"]:
            print(f"  failed ({r['mode']}): {e}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "args": {
            k: v for k, v in vars(args).items() if k not in ("json", "database_url")}},
            indent=2, default=str))
    ok = all(r["failed"] == 0 and r["missed"] == 0 for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
