"""A real `unlearnd serve` process for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

ADMIN_KEY = "adm-e2e-0123456789abcdef"
KEYS = {
    "acme": "sk-acme-e2e-0123456789abcdef",
    "globex": "sk-globex-e2e-0123456789abcdef",
    "public": "sk-public-e2e-0123456789abcdef",
    "swap": "sk-swap-e2e-0123456789abcdef",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`unlearnd serve --config FILE` in a child process, stopped with SIGINT."""

    def __init__(self, config: dict, workdir: Path, name: str = "server",
                 env: dict[str, str] | None = None) -> None:
        self.config = dict(config)
        self.env = dict(env or {})
        self.workdir = workdir
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.port = int(config["port"])
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}.log"

    def start(self, timeout: float = 240.0) -> ServerProcess:
        cfg = self.workdir / f"{self.name}.yaml"
        cfg.write_text(yaml.safe_dump(self.config))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **self.env)
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "unlearnd.cli", "serve", "--config", str(cfg),
             "--log-level", "warning"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                   + self.log_path.read_text()[-4000:])
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError("server did not become healthy:\n" + self.log_path.read_text()[-4000:])

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url,
                            headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)

    def openai(self, tenant: str):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url + "/v1", api_key=KEYS[tenant], max_retries=0,
                      timeout=120)

    def async_openai(self, tenant: str):
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=self.base_url + "/v1", api_key=KEYS[tenant],
                           max_retries=0, timeout=120)


