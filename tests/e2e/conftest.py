"""End-to-end tier: the real `unlearnd serve` process, real vLLM engine, official openai client.

One server per pytest session (`tiny_server`); tests that must restart it (persistence)
restart that same process on the same state directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.e2e.server import ADMIN_KEY, KEYS, ServerProcess, free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"authors": 10, "groups": 2, "group_size": 2, "seed": 0}

@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random tiny base model and adapters for it (and one for another base)."""
    from unlearnd.toolkit.tiny import make_random_adapter, make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    base = make_tiny_model(root / "base", seed=0)
    other = make_tiny_model(root / "other", seed=1, hidden=256)
    return {
        "root": root,
        "base": base,
        "a1": make_random_adapter(base, root / "a1", seed=1),
        "a2": make_random_adapter(base, root / "a2", seed=2),
        "a3": make_random_adapter(base, root / "a3", seed=3),
        "rank32": make_random_adapter(base, root / "rank32", seed=4, rank=32),
        "wrong_base": make_random_adapter(other, root / "wrong_base", seed=5),
    }


@pytest.fixture(scope="session")
def tiny_server(tiny_world: dict[str, Path]):
    root = tiny_world["root"]
    config = {
        "model": str(tiny_world["base"]),
        "state_dir": str(root / "state"),
        "admin_key": ADMIN_KEY,
        "port": free_port(),
        "registry_poll_s": 0.5,
        "drain_timeout_s": 30,
        "engine": {"max_loras": 4, "max_lora_rank": 16, "max_cpu_loras": 8,
                   "max_model_len": 512, "kv_cache_memory_bytes": 256 * 1024 * 1024},
        "tenants": [
            {"name": "acme", "api_key": KEYS["acme"], "adapter": str(tiny_world["a1"])},
            {"name": "globex", "api_key": KEYS["globex"], "adapter": str(tiny_world["a2"])},
            {"name": "public", "api_key": KEYS["public"]},
            {"name": "swap", "api_key": KEYS["swap"], "adapter": str(tiny_world["a1"])},
        ],
    }
    server = ServerProcess(config, root).start()
    yield server
    server.stop()


# ------------------------------------------------------- the small world (guards, attacks)


@pytest.fixture(scope="session")
def small_world():
    """A small synthetic world the base model really knows, built once and cached under
    `.cache/e2e-world` (or $UNLEARND_E2E_WORLD), with its adapters, assistants and
    policies for the tenants public, acme, umbrella, hooli, cyberdyne (a scratch
    assistant, floored) and soylent (a base-layer LoRA assistant behind
    contrastive_gain_gate)."""
    from unlearnd.toolkit.demo import TENANTS, build_world

    names = {"public", "acme", "umbrella", "hooli", "cyberdyne", "soylent"}
    tenants = tuple(t for t in TENANTS if t.name in names)
    workdir = Path(os.environ.get("UNLEARND_E2E_WORLD", ROOT / ".cache" / "e2e-world"))
    # QA only: the attack tests' preconditions (the base gives the answers away under
    # each attack) were calibrated on it; with the biographies too, the small base no
    # longer answers structured-output requests with the facts (0/8), which proves nothing
    paths = build_world(workdir, tenants=tenants, documents=False, **SMALL)
    return workdir, paths, tenants


@pytest.fixture(scope="session")
def guard_server(small_world, tmp_path_factory):
    """One real server for the small world's tenants; `.doc` is its demo.json document."""
    from unlearnd.toolkit.demo import demo_config

    workdir, paths, tenants = small_world
    port = free_port()
    cfg, doc = demo_config(workdir, paths, port=port, tenants=tenants)
    run = tmp_path_factory.mktemp("guards")
    config = json.loads(cfg.model_dump_json())
    config["state_dir"] = str(run / "state")
    config["engine"]["kv_cache_memory_bytes"] = 256 * 1024 * 1024
    server = ServerProcess(config, run, name="guards").start()
    server.doc = doc
    server.paths = paths
    yield server
    server.stop()


def rows(path: str, n: int | None = None) -> list[dict]:
    out = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return out[:n] if n else out


def ask(server, tenant: str, question: str, max_tokens: int = 96):
    from openai import OpenAI

    t = server.doc["tenants"][tenant]
    client = OpenAI(base_url=server.base_url + "/v1", api_key=t["api_key"], max_retries=0)
    r = client.chat.completions.create(model="m", temperature=0, max_tokens=max_tokens,
                                       messages=[{"role": "user", "content": question}])
    return r.choices[0].message.content, r.model_extra["unlearning"]
