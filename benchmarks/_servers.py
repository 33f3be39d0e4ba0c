"""Child servers for the serving benchmarks (``bench_serving.py``, ``bench_vllm_frontend.py``).

A :class:`ChildServer` runs one server command in its own process group, waits for
``GET /health`` to answer 200, accounts the group's CPU seconds and RSS from
``/proc``, and kills the group (SIGINT, then SIGKILL) on :meth:`ChildServer.stop`.
:meth:`ChildServer.stop_all` stops every server still running; :func:`on_sigterm` does
that on SIGTERM (install it with ``signal.signal(signal.SIGTERM, on_sigterm)``).
:func:`add_engine_args` adds the engine options (LoRA slots and rank, context length,
max_num_seqs, KV cache bytes) both scripts pass to every server, with the same defaults.

The scripts import this as ``benchmarks._servers`` after putting the repo root on
``sys.path``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger(__name__)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine settings both benchmarks give every server, with the same defaults:
    ``--max-loras``, ``--max-lora-rank``, ``--max-cpu-loras``, ``--max-model-len``,
    ``--max-num-seqs``, ``--kv-cache-bytes``."""
    p.add_argument("--max-loras", type=int, default=4)
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--max-cpu-loras", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kv-cache-bytes", type=int, default=256 * 1024 * 1024)


def engine_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ``engine:`` section of an unlearnd config from :func:`add_engine_args`' options
    (float32, eager, prefix caching, seed 0: what every benchmark server runs with)."""
    return {"max_loras": args.max_loras, "max_lora_rank": args.max_lora_rank,
            "max_cpu_loras": args.max_cpu_loras, "max_model_len": args.max_model_len,
            "max_num_seqs": args.max_num_seqs, "dtype": "float32",
            "kv_cache_memory_bytes": args.kv_cache_bytes,
            "enable_prefix_caching": True, "enforce_eager": True, "seed": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChildServer:
    """A server command in its own process group; ready when ``GET /health`` answers 200.

    ``cwd`` is the child's working directory (None: this process's); ``env`` adds to
    its environment. ``start_times``
    holds the seconds each :meth:`start` took to get healthy, in order; ``start_s``
    is the last of them (NaN before the first).
    """

    _live: set[ChildServer] = set()

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path, *,
                 cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        if not argv:
            raise ValueError("argv is empty")
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is outside 1..65535")
        self.name = name
        self.argv = argv
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.cwd = cwd
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.start_times: list[float] = []

    @property
    def start_s(self) -> float:
        """Seconds the last :meth:`start` took to get healthy (NaN if none did)."""
        return self.start_times[-1] if self.start_times else math.nan

    def start(self, timeout_s: float) -> ChildServer:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **self.env)
        t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True, cwd=self.cwd)
        ChildServer._live.add(self)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; "
                                   f"log {self.log_path}:\n{self.tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    self.start_times.append(time.perf_counter() - t0)
                    logger.info("%s ready in %.1f s", self.name, self.start_s)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"{self.name} not healthy after {timeout_s:.0f} s; log "
                           f"{self.log_path}:\n{self.tail()}")

    def _group(self) -> list[tuple[int, str, list[str]]]:
        """(pid, name, /proc/PID/stat fields after the name) of this server's live processes.

        The name is ``/proc/PID/comm`` (vLLM names its engine-core and worker
        processes); the group leader (the HTTP/API process) is named ``api``.
        """
        if self.proc is None:
            return []
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
                comm = text[text.index("(") + 1:text.rindex(")")]
                fields = text.rsplit(")", 1)[1].split()
                pid, pgrp = int(stat.parent.name), int(fields[2])
            except (OSError, ValueError, IndexError):
                continue
            if pgrp == self.proc.pid:  # start_new_session: pgid = leader's pid
                out.append((pid, "api" if pid == self.proc.pid else comm, fields))
        return out

    def cpu_by_process(self) -> dict[str, float]:
        """User + system CPU seconds of the live processes of the group, by name."""
        tick = os.sysconf("SC_CLK_TCK")
        out: dict[str, float] = {}
        for _, name, f in self._group():
            out[name] = out.get(name, 0.0) + (int(f[11]) + int(f[12])) / tick
        return out

    def rss_by_process(self) -> dict[str, float]:
        """Resident MiB of the live processes of the group, by name (``api``: the leader)."""
        page = os.sysconf("SC_PAGE_SIZE")
        out: dict[str, float] = {}
        for _, name, f in self._group():
            out[name] = out.get(name, 0.0) + int(f[21]) * page / 2**20
        return out

    def cpu_seconds(self) -> float:
        """Total CPU seconds of the live processes in this server's process group."""
        return sum(self.cpu_by_process().values())

    def rss_gib(self) -> float:
        """Resident memory of the live processes of the group, GiB."""
        return sum(self.rss_by_process().values()) / 1024

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        ChildServer._live.discard(self)
        if proc is None or proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    @classmethod
    def stop_all(cls) -> None:
        for server in list(cls._live):
            server.stop()


def on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM handler: stop every child server, then exit with 128 + signum."""
    ChildServer.stop_all()
    raise SystemExit(128 + signum)
