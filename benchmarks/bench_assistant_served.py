"""What a contrastive tenant costs in a running server: merged assistants against LoRAs
over one shared copy of the base's first K layers, measured through ``unlearnd serve``.

``bench_assistant_memory.py`` loads the assistants in one plain process; this one goes
the way a deployment does. Per kind, one ``unlearnd serve`` with ``--tenants`` tenants,
each with its own contrastive-only policy (``policy compile --mechanisms contrastive``)
whose assistant is a different random LoRA over the base's first K layers:

- **merged**: each assistant a full copy of the K layers with its LoRA merged in (what
  ``train-assistant`` writes by default);
- **lora**: the same LoRAs as ``train-assistant --save lora`` writes them (the engine
  builds the K layers once and attaches each LoRA unmerged).

After start-up, tenant 0 gets one chat request, then each other tenant one, in turn;
the engine loads a policy's assistant on its first contrasted step
(``assistant.get_runner``). Resident memory of the API process and of the engine
processes is read after tenant 0's request and after the last one. Table: both, the
engine's growth per extra tenant, one LoRA's size, and the ratio growth / LoRA (goal:
about 1 for lora). Every response is checked to carry its tenant's policy version.

    python benchmarks/bench_assistant_served.py                  # 8 tenants
    python benchmarks/bench_assistant_served.py --tenants 16 --hidden 1024
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._servers import ChildServer, add_engine_args, engine_config, free_port  # noqa: E402
from benchmarks.bench_assistant_memory import add_assistant_args, make_assistants  # noqa: E402

logger = logging.getLogger("bench_assistant_served")
ADMIN_KEY = "sk-admin-bench-assistant-served"


def tenant(i: int) -> str:
    return f"t{i:03d}"


def key(i: int) -> str:
    return f"sk-bench-served-{tenant(i)}"


def policies(root: Path, base: Path, assistants: list[str], rows: dict[str, list[dict]],
             retain: Path, kind: str) -> list[Path]:
    """One contrastive-only policy per assistant, forgetting author ``i``."""
    from unlearnd.guards.policy import compile_policy

    out = []
    for i, (assistant, subject) in enumerate(zip(assistants, rows, strict=False)):
        forget = root / "forget" / f"{tenant(i)}.jsonl"
        forget.parent.mkdir(parents=True, exist_ok=True)
        forget.write_text("".join(json.dumps(r) + "\n" for r in rows[subject]))
        out.append(compile_policy(forget, retain, base, root / f"policies-{kind}" / tenant(i),
                                  mechanisms=("contrastive",), assistant_dir=assistant,
                                  name=tenant(i)))
    return out


def measure(args: argparse.Namespace, root: Path, base: Path, kind: str,
            dirs: list[Path], questions: list[str]) -> dict:
    port = free_port()
    state = root / f"state-{kind}"
    shutil.rmtree(state, ignore_errors=True)
    cfg = {"model": str(base), "served_model_name": "base", "state_dir": str(state),
           "admin_key": ADMIN_KEY, "port": port, "host": "127.0.0.1",
           "engine": engine_config(args),
           "tenants": [{"name": tenant(i), "api_key": key(i), "policy": str(d)}
                       for i, d in enumerate(dirs)]}
    path = root / f"unlearnd-{kind}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    server = ChildServer(f"unlearnd-{kind}", [sys.executable, "-m", "unlearnd.cli", "serve",
                                              "--config", str(path), "--log-level",
                                              "warning"], port, root / f"unlearnd-{kind}.log")
    server.start(args.start_timeout_s)
    try:
        after: list[tuple[float, float]] = []
        wrong = 0
        with httpx.Client(base_url=server.base_url, timeout=300) as client:
            for i in range(len(dirs)):
                r = client.post("/v1/chat/completions", headers={
                    "Authorization": f"Bearer {key(i)}"}, json={
                    "model": "base", "max_tokens": args.max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": questions[i]}]})
                r.raise_for_status()
                version = r.headers.get("x-unlearnd-policy-version", "")
                wrong += not version.startswith(f"{tenant(i)}@")
                rss = server.rss_by_process()
                api = rss.pop("api", 0.0)
                after.append((api, sum(rss.values())))
        return {"after": after, "wrong_version": wrong}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_assistant_args(p)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--start-timeout-s", type=float, default=600.0)
    add_engine_args(p)
    args = p.parse_args(argv)
    if args.tenants < 2:
        p.error("--tenants must be >= 2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from unlearnd.toolkit.synth import build_world
    from unlearnd.toolkit.tiny import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="bench-assistant-served-"))
    files = build_world(authors=args.tenants + 10, seed=0, groups=1, group_size=1)
    rows: dict[str, list[dict]] = {}
    for row in files["retain.jsonl"]:
        rows.setdefault(row["subject"], []).append(row)
    subjects = list(rows)
    forget_rows = {s: rows[s] for s in subjects[:args.tenants]}
    retain = root / "retain.jsonl"
    retain.write_text("".join(json.dumps(r) + "\n" for s in subjects[args.tenants:]
                              for r in rows[s]))
    base = make_tiny_model(root / "base", seed=0, hidden=args.hidden, layers=args.layers,
                           texts=[r["answer"] for rs in rows.values() for r in rs])
    made = make_assistants(base, root, args.tenants, args.assistant_layers, args.rank)
    questions = [forget_rows[s][0]["question"] for s in forget_rows]
    results = {}
    for kind in ("merged", "lora"):
        dirs = policies(root, base, made[kind], forget_rows, retain, kind)
        results[kind] = measure(args, root, base, kind, dirs, questions)
    lora_mib = made["lora_bytes"] / 2**20
    print(f"\n## A contrastive tenant's memory through `unlearnd serve` ({args.tenants} "
          f"tenants, one contrastive policy each; base hidden {args.hidden}, {args.layers} "
          f"layers; assistant K = {args.assistant_layers}; LoRA rank {args.rank})\n")
    print("| assistants as | engine RSS after 1 MiB | engine RSS after all MiB | engine per "
          "extra tenant MiB | API per extra tenant MiB | one LoRA MiB | engine per tenant / "
          "LoRA | wrong version |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind, label in (("merged", "merged copies (default)"),
                        ("lora", "LoRAs over a shared base (`--save lora`)")):
        after = results[kind]["after"]
        n = len(after) - 1
        engine = (after[-1][1] - after[0][1]) / n
        api = (after[-1][0] - after[0][0]) / n
        print(f"| {label} | {after[0][1]:.0f} | {after[-1][1]:.0f} | {engine:.2f} | "
              f"{api:.2f} | {lora_mib:.2f} | {engine / lora_mib:.2f} | "
              f"{results[kind]['wrong_version']} |")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
