"""Tenant affinity through a real proxy: nginx from Debian's package, running the
committed deploy/nginx/unlearnd.conf (`hash $http_authorization consistent`), in front
of three real replicas on one PostgreSQL registry and one shared store.

The committed file is used as it is, included from a small main config in a temp dir;
only its `listen` and `access_log` lines are pointed at the test's port and directory,
and the replica list (its `include unlearnd-replicas.conf`) is written by the test, as
an operator would. Which replica served a request is read from the replicas' own
/metrics (`unlearnd_requests_total{tenant}`), so clients are told nothing about the
topology.

What nginx's ketama ring guarantees (ngx_http_upstream_hash_module.c): the key's CRC32
is looked up on a sorted ring of 160 points per server, each point
crc32(host "\\0" port prev_point); a failed or `down` server is skipped by walking on to
the next point. So a request goes to the first live server clockwise, whether the dead
one is still listed or was removed and nginx reloaded, and removing a server moves only
the keys whose first point was that server's. The test computes that ring itself and
asserts nginx routes exactly as it says; it picks ports so that every replica starts
with at least one tenant.

A replica that stops (SIGTERM) must cost no request at all. An nginx reload may drop a
client's idle keep-alive connection just as the client reuses it (nginx closes idle
connections when its old workers exit; measured with stub upstreams: 22 such resets in
20 reloads under 24 keep-alive clients, none without keep-alive). The load here retries
those once, before any response came back, as the OpenAI SDKs retry connection errors,
and asserts they happen only while nginx reloads.

Needs PostgreSQL (scripts/ci_services.sh) and the nginx binary (Debian's `nginx`
package, installed by ci_services.sh); skips without either.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import ADMIN_KEY, ServerProcess, free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "deploy" / "nginx" / "unlearnd.conf"
EXAMPLE_REPLICAS = ROOT / "deploy" / "nginx" / "unlearnd-replicas.conf"
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
TENANTS = {f"aff{i}": f"sk-aff{i}-e2e-0123456789abcdef" for i in range(8)}
PROMPTS = ["Tell me about the author.", "Who wrote the book?", "What is the capital?"]
PER_ROUND = 3  # requests per tenant in each attribution round

needs_nginx = pytest.mark.skipif(
    NGINX is None, reason="no nginx binary: run scripts/ci_services.sh (Debian's nginx package)")


# ------------------------------------------------------------------ nginx's ketama ring


def ketama(servers: list[str]) -> list[tuple[int, str]]:
    """nginx's consistent-hash ring for `server` names as written in the upstream."""
    points = []
    for server in servers:
        host, port = server.rsplit(":", 1)
        base = host.encode() + b"\0" + port.encode()
        prev = 0
        for _ in range(160):  # weight 1
            prev = zlib.crc32(base + struct.pack("<I", prev))
            points.append((prev, server))
    return sorted(points)


def owner(ring: list[tuple[int, str]], key: str) -> str:
    """The server nginx picks for a request whose Authorization header is `key`."""
    i = bisect.bisect_left(ring, (zlib.crc32(key.encode()), ""))
    return ring[i % len(ring)][1]


def auth(key: str) -> str:
    return f"Bearer {key}"


def addr(port: int) -> str:
    return f"127.0.0.1:{port}"


def pick_ports() -> list[int]:
    """Three free ports on whose ring every replica owns at least one tenant."""
    for _ in range(500):
        ports = [free_port() for _ in range(3)]
        ring = ketama([addr(p) for p in ports])
        if len(set(ports)) == 3 and \
                len({owner(ring, auth(k)) for k in TENANTS.values()}) == 3:
            return ports
    raise AssertionError("no ports found on whose ring all three replicas hold a tenant")


# ------------------------------------------------------------------------------ nginx


def render(conf: str, port: int, access_log: Path) -> str:
    """The committed config with its listen address and access log moved for the test."""
    out, n = re.subn(r"(?m)^(\s*)listen 8080;$", rf"\g<1>listen 127.0.0.1:{port};", conf)
    assert n == 1, f"{CONF}: expected exactly one `listen 8080;` line"
    out, n = re.subn(r"(?m)^(\s*)access_log /var/log/nginx/unlearnd\.access\.log (\w+);$",
                     rf"\g<1>access_log {access_log} \g<2>;", out)
    assert n == 1, f"{CONF}: expected exactly one unlearnd.access.log line"
    return out


class Nginx:
    """nginx in the foreground with every path (pid, logs, temp files) under `root`."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.url = f"http://127.0.0.1:{port}"
        self.conf = root / "nginx.conf"
        self.replicas = root / "unlearnd-replicas.conf"  # the committed file's include
        self.access_log = root / "access.log"
        self.error_log = root / "error.log"
        self.out = root / "nginx.out"
        self.proc: subprocess.Popen | None = None
        (root / "unlearnd.conf").write_text(render(CONF.read_text(), port, self.access_log))
        temps = "".join(f"    {kind}_temp_path {root / kind};\n"
                        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        # As root the workers would run as `nobody`, who cannot use this temp dir.
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.conf.write_text(
            f"{user}worker_processes 1;\npid {root / 'nginx.pid'};\n"
            f"error_log {self.error_log} notice;\nevents {{ worker_connections 1024; }}\n"
            f"http {{\n{temps}    include {root / 'unlearnd.conf'};\n}}\n")

    def cmd(self, *extra: str) -> list[str]:
        return [str(NGINX), "-p", f"{self.root}/", "-c", str(self.conf),
                "-e", str(self.error_log), *extra]

    def set_replicas(self, servers: list[str]) -> None:
        self.replicas.write_text("".join(f"server {s} max_fails=1 fail_timeout=10s;\n"
                                         for s in servers))
        test = subprocess.run(self.cmd("-t"), capture_output=True, text=True)
        assert test.returncode == 0, test.stderr

    def start(self, servers: list[str]) -> None:
        self.set_replicas(servers)
        self._out = open(self.out, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.cmd("-g", "daemon off;"), stdout=self._out,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            assert self.proc.poll() is None, self.out.read_text() + self.error_log.read_text()
            try:
                if httpx.get(self.url + "/", timeout=2).status_code == 404:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "nginx did not come up"
            time.sleep(0.1)

    def workers(self) -> set[int]:
        import psutil

        return {p.pid for p in psutil.Process(self.proc.pid).children()
                if p.status() != psutil.STATUS_ZOMBIE}

    def reload(self, servers: list[str]) -> None:
        """The operator's step: rewrite the replica list, `nginx -t`, `nginx -s reload`,
        and wait until the old workers have finished their requests and exited."""
        old = self.workers()
        self.set_replicas(servers)
        subprocess.run(self.cmd("-s", "reload"), check=True, capture_output=True)
        deadline = time.monotonic() + 60
        while (now := self.workers()) & old or not now:
            assert time.monotonic() < deadline, "old nginx workers did not exit"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()
        self.proc = None


@needs_nginx
def test_committed_config_is_valid(tmp_path: Path) -> None:
    """Without replicas: nginx accepts the committed files, its body limit is the
    server's, and its own errors have the server's OpenAI error shape."""
    from unlearnd.serve.config import LimitsConfig

    limit = int(re.search(r"client_max_body_size (\d+);", CONF.read_text()).group(1))
    assert limit == LimitsConfig().max_body_bytes
    nginx = Nginx(tmp_path, free_port())
    nginx.replicas.write_text(EXAMPLE_REPLICAS.read_text())
    test = subprocess.run(nginx.cmd("-t"), capture_output=True, text=True)
    assert test.returncode == 0, test.stderr
    try:
        nginx.start([addr(free_port())])  # nothing listens there: connection refused
        too_big = httpx.post(nginx.url + "/v1/chat/completions", content=b"x" * (limit + 1),
                             headers={"Authorization": auth("k")}, timeout=10)
        assert too_big.status_code == 413
        assert too_big.json()["error"]["type"] == "invalid_request_error"
        down = httpx.post(nginx.url + "/v1/chat/completions", json={"model": "m"},
                          headers={"Authorization": auth("k")}, timeout=10)
        assert down.status_code == 503 and down.json()["error"]["code"] == "no_replica"
        assert httpx.get(nginx.url + "/admin/tenants", timeout=10).status_code == 404
    finally:
        nginx.stop()


# --------------------------------------------------------------------------- replicas


def replica_env(i: int) -> dict[str, str]:
    """Pin replica i's vLLM CPU worker to a core of its own where there are enough
    (tests/e2e/test_replicas.py explains why); 3 replicas on 2 cores: 0, 1, 0."""
    cores = sorted(os.sched_getaffinity(0))
    return {"VLLM_CPU_OMP_THREADS_BIND": str(cores[i % len(cores)])} if len(cores) > 1 else {}


def metric(server: ServerProcess, name: str) -> dict[str, float]:
    """Per tenant, the sum of sample `name` over its other labels, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(server.base_url + "/metrics", timeout=10)
    r.raise_for_status()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name == name and "tenant" in s.labels:
                out[s.labels["tenant"]] = out.get(s.labels["tenant"], 0.0) + s.value
    return out


def served(server: ServerProcess) -> dict[str, float]:
    return metric(server, "unlearnd_requests_total")


def sigterm(server: ServerProcess) -> int:
    """What Kubernetes and systemd do: SIGTERM to the server's main process only (its
    engine process is left to it). uvicorn stops listening, drains, shuts down."""
    os.kill(server.proc.pid, signal.SIGTERM)
    code = server.proc.wait(120)
    server.stop()  # closes its log
    return code


def stop_replica(server: ServerProcess) -> None:
    pid = server.proc.pid if server.proc is not None else None
    server.stop()
    if pid is not None:
        try:  # anything of its process group left behind (the engine process)
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture(scope="module")
def cluster(tiny_world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """Three replicas (replica-0 declares the tenants, the others learn them from the
    registry), started at once on a fresh database, and nginx in front of them."""
    if NGINX is None:
        pytest.skip("no nginx binary: run scripts/ci_services.sh (Debian's nginx package)")
    from tests.serve.test_registry_pg import fresh_database, require_postgres
    from unlearnd.serve.engine import make_identity_adapter
    from unlearnd.toolkit.tiny import make_random_adapter

    admin_url = require_postgres()
    root = tmp_path_factory.mktemp("proxy")
    state_dir = root / "shared-state"
    make_identity_adapter(tiny_world["base"], state_dir / "identity-adapter")
    adapters = [tiny_world["a1"], tiny_world["a2"], tiny_world["a3"]] + [
        make_random_adapter(tiny_world["base"], root / f"adapter{i}", seed=100 + i)
        for i in range(3, len(TENANTS))]
    tenants = [{"name": name, "api_key": key, "adapter": str(adapter)}
               for (name, key), adapter in zip(TENANTS.items(), adapters, strict=True)]
    timings: dict[str, float] = {}
    with fresh_database(admin_url) as url:
        replicas = [ServerProcess({
            "model": str(tiny_world["base"]), "state_dir": str(state_dir),
            "database_url": url, "admin_key": ADMIN_KEY, "port": port,
            "registry_poll_s": 2.0, "drain_timeout_s": 30,
            # max_loras = the tenant count: vLLM batches at most max_loras adapters and
            # skips a waiting request whose adapter would exceed that, so with more
            # tenants busy on one replica than slots the extra ones can starve under
            # back-to-back load (seen with max_loras 4: requests held 11-35 s, and a
            # stopping replica's 10 s drain cut four). A replica must fit the tenants
            # it inherits when another leaves.
            "engine": {"max_loras": len(TENANTS), "max_lora_rank": 16, "max_cpu_loras": 10,
                       "max_model_len": 512, "max_num_seqs": 8,
                       "kv_cache_memory_bytes": 128 * 1024 * 1024},
            "tenants": tenants if i == 0 else [],
        }, root, name=f"replica-{i}", env=replica_env(i)) for i, port in enumerate(pick_ports())]
        (root / "nginx").mkdir()
        nginx = Nginx(root / "nginx", free_port())
        try:
            t0 = time.monotonic()
            with ThreadPoolExecutor(len(replicas)) as pool:
                for started in [pool.submit(r.start) for r in replicas]:
                    started.result()
            timings["replicas healthy"] = time.monotonic() - t0
            deadline = time.monotonic() + 120
            for r in replicas:  # every replica serves every tenant's version
                while set(metric(r, "unlearnd_active_policy_info")) != set(TENANTS):
                    assert time.monotonic() < deadline, f"{r.name} did not learn all tenants"
                    time.sleep(0.2)
            timings["tenants on all replicas"] = time.monotonic() - t0
            t1 = time.monotonic()
            nginx.start([addr(r.port) for r in replicas])
            timings["nginx up"] = time.monotonic() - t1
            yield replicas, nginx, timings
        finally:
            nginx.stop()
            for r in replicas:
                stop_replica(r)


# ----------------------------------------------------------------------------- traffic


class RequestFailed(Exception):
    pass


class Dropped(Exception):
    """The connection to nginx closed before any response came back. nginx's reload
    does this: the old workers close their idle keep-alive connections, and a client
    that reuses one at that instant sees a reset; nginx never read that request."""


async def ask(client: httpx.AsyncClient, key: str, i: int) -> None:
    """One chat completion through nginx, streamed every other time; raises unless it
    is a 200 with a whole answer (a stream must end with `data: [DONE]`)."""
    stream = bool(i % 2)
    request = client.build_request("POST", "/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": 8, "temperature": 0, "stream": stream},
        headers={"Authorization": auth(key)})
    try:
        r = await client.send(request, stream=True)
    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as exc:
        raise Dropped(f"{type(exc).__name__}: {exc}") from exc
    try:  # from here on any failure is a failed request
        if r.status_code != 200:
            raise RequestFailed(f"{r.status_code}: {(await r.aread())[:300]!r}")
        if stream:
            lines = [line async for line in r.aiter_lines() if line.strip()]
            if not lines or lines[-1] != "data: [DONE]":
                raise RequestFailed(f"stream ended without [DONE]: {lines[-2:]}")
        else:
            json.loads(await r.aread())["choices"][0]["message"]
    finally:
        await r.aclose()


def where(nginx: Nginx, alive: list[ServerProcess]) -> dict[str, str]:
    """Send PER_ROUND requests per tenant through nginx; the replica that served each
    tenant, from the replicas' /metrics (all of a tenant's requests on exactly one)."""
    before = {r.name: served(r) for r in alive}

    async def go() -> None:
        async with httpx.AsyncClient(base_url=nginx.url, timeout=60) as c:
            async def tenant(key: str) -> None:
                for i in range(PER_ROUND):
                    await ask(c, key, i)
            await asyncio.gather(*(tenant(key) for key in TENANTS.values()))

    asyncio.run(go())
    deadline = time.monotonic() + 15
    while True:  # a request is counted as its response ends: wait for the last ones
        now = {r.name: served(r) for r in alive}
        delta = {t: {name: now[name].get(t, 0.0) - before[name].get(t, 0.0) for name in now}
                 for t in TENANTS}
        if all(sum(d.values()) >= PER_ROUND for d in delta.values()) or \
                time.monotonic() > deadline:
            break
        time.sleep(0.1)
    out = {}
    for t, d in delta.items():
        hosts = {name: n for name, n in d.items() if n}
        assert list(hosts.values()) == [PER_ROUND], f"{t}: served {hosts}"
        out[t] = next(iter(hosts))
    return out


class Load:
    """What one `under_load` saw: answered requests, failures, and the drops (as
    seconds after the event began), each retried once on another connection."""

    def __init__(self) -> None:
        self.ok = 0
        self.errors: list[str] = []
        self.dropped: list[float] = []
        self.slowest = 0.0  # seconds, the longest answered request
        self.event_s = 0.0
        self.result: object = None


def under_load(nginx: Nginx, event: Callable[[], object]) -> Load:
    """Every tenant sends requests through nginx back to back (mixed streaming and not)
    while `event` runs in a thread. A dropped connection (`Dropped`) is retried once, as
    the OpenAI SDKs retry connection errors; any other failure is recorded."""
    load = Load()

    async def go() -> None:
        stop = asyncio.Event()
        t_event = float("inf")

        async def worker(name: str, key: str, i: int) -> None:
            async with httpx.AsyncClient(base_url=nginx.url, timeout=60) as c:
                while not stop.is_set():
                    t_sent = time.monotonic()
                    try:
                        try:
                            await ask(c, key, i)
                        except Dropped:
                            load.dropped.append(time.monotonic() - t_event)
                            await ask(c, key, i)
                    except Exception as exc:  # noqa: BLE001 - every failure is reported
                        load.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                    else:
                        load.ok += 1
                        load.slowest = max(load.slowest, time.monotonic() - t_sent)
                    i += 1

        workers = [asyncio.create_task(worker(n, k, i))
                   for i, (n, k) in enumerate(TENANTS.items())]
        await asyncio.sleep(1.0)
        t_event = time.monotonic()
        load.result = await asyncio.to_thread(event)
        load.event_s = time.monotonic() - t_event
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*workers)

    asyncio.run(go())
    return load


def test_tenants_stick_to_their_replica_and_move_only_when_it_leaves(cluster, capsys):
    replicas, nginx, timings = cluster
    by_addr = {addr(r.port): r.name for r in replicas}
    names = [r.name for r in replicas]

    def predicted(alive: list[str]) -> dict[str, str]:
        ring = ketama([a for a, n in by_addr.items() if n in alive])
        return {t: by_addr[owner(ring, auth(k))] for t, k in TENANTS.items()}

    # 1. Affinity: each tenant's requests all land on one replica, the one nginx's ring
    #    names; the tenants spread over all three.
    t0 = time.monotonic()
    placed = where(nginx, replicas)
    assert placed == predicted(names)
    assert set(placed.values()) == set(names)
    assert where(nginx, replicas) == placed  # and stay there

    # 2. A replica stops without the proxy being told (SIGTERM: it stops listening,
    #    drains, exits): nginx retries what it refuses on the next replica of the ring.
    #    The one with most tenants goes. Not one request fails or is even dropped.
    gone = max(names, key=lambda n: sum(1 for v in placed.values() if v == n))
    victim = next(r for r in replicas if r.name == gone)
    stopped = under_load(nginx, lambda: sigterm(victim))
    assert not stopped.errors and not stopped.dropped, (stopped.errors[:5], stopped.dropped)
    alive = [r for r in replicas if r.name != gone]
    after = where(nginx, alive)
    moved = {t for t, n in placed.items() if n == gone}
    assert moved and all(after[t] == placed[t] for t in TENANTS if t not in moved)
    assert all(after[t] != gone for t in moved)
    assert after == predicted([r.name for r in alive])

    # 3. The operator then drops it from the upstream and reloads, under load: the ring
    #    without it sends every tenant where the failover already did.
    reloaded = under_load(nginx, lambda: nginx.reload([addr(r.port) for r in alive]))
    assert not reloaded.errors, reloaded.errors[:5]
    assert where(nginx, alive) == after

    # 4. The documented planned removal, under load: out of the upstream, reload, wait for
    #    the old workers to finish; nothing reaches the replica any more; then stop it.
    leaving = max(alive, key=lambda r: sum(1 for v in after.values() if v == r.name))
    last = next(r for r in alive if r is not leaving)

    def planned_removal() -> tuple[float, float, int]:
        nginx.reload([addr(last.port)])
        time.sleep(0.5)  # a response just sent is counted right after
        count = sum(served(leaving).values())
        time.sleep(1.0)
        return count, sum(served(leaving).values()), sigterm(leaving)

    planned = under_load(nginx, planned_removal)
    assert not planned.errors, planned.errors[:5]
    drained, later, code = planned.result
    assert later == drained  # no request reached it after the reload
    assert set(where(nginx, [last]).values()) == {last.name}
    phases = time.monotonic() - t0
    # Connections dropped by nginx (each retried once, successfully) only while it
    # reloaded, never because a replica stopped.
    for load in (reloaded, planned):
        assert all(0 <= t <= load.event_s + 0.5 for t in load.dropped), load.dropped

    # The key never reaches nginx's logs; count the requests nginx retried.
    logs = "".join(p.read_text(errors="replace")
                   for p in (nginx.access_log, nginx.error_log, nginx.out) if p.exists())
    assert not [k for k in TENANTS.values() if k in logs]
    lines = nginx.access_log.read_text().splitlines()
    retried = [line for line in lines if re.search(r"upstream=\S+, ", line)]
    failed = [line for line in lines if not re.search(r'" (200|404) ', line)]
    assert not failed, failed[:5]
    with capsys.disabled():
        print(f"\nproxy affinity: {len(TENANTS)} tenants on {len(replicas)} replicas "
              f"{sorted(placed.items())}; "
              + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
              + f"; phases {phases:.1f} s"
              f"\n  {gone} stopped under load (SIGTERM, exit {stopped.result}, "
              f"{stopped.event_s:.1f} s): {stopped.ok} requests, {len(stopped.errors)} "
              f"failed, {len(stopped.dropped)} dropped, slowest {stopped.slowest:.1f} s; "
              f"{sorted(moved)} moved to "
              f"{sorted({after[t] for t in moved})}"
              f"\n  reload without it: {reloaded.ok} requests, {len(reloaded.errors)} failed, "
              f"{len(reloaded.dropped)} dropped by the reload and retried, slowest "
              f"{reloaded.slowest:.1f} s"
              f"\n  {leaving.name} removed by the operator procedure (exit {code}, "
              f"{planned.event_s:.1f} s): {planned.ok} requests, {len(planned.errors)} "
              f"failed, {len(planned.dropped)} dropped by the reload and retried, slowest "
              f"{planned.slowest:.1f} s"
              f"\n  nginx logged {len(lines)} requests, {len(retried)} retried on another "
              "replica by nginx")
