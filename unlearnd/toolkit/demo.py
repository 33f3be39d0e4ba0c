"""`unlearnd demo`: build the demo world once (cached), then serve it with several tenants.

Steps, each cached under the work dir and redone only when its inputs change:

1. `data/`: the synthetic world (`unlearnd data synth`): QA, probes, and a biography
   document per author (the documents track).
2. `base/`: a small Llama that has memorised every author, QA and documents
   (`unlearnd build-base --documents`); `reference_1/`: the same trained without group
   1 (TOFU's "retain model": what forgetting group 1 should look like).
3. `adapters/`: unlearning LoRA adapters (`unlearnd train-adapter`): NPO for group 1,
   GradDiff for group 2, the TRU-style reasoning adapter for group 1.
4. `assistants/`: the ULD assistants (`unlearnd train-assistant`): group 1's from
   scratch (the default), for group 2 (tyrell) too, and group 1's base-layer one the
   ablations use.
5. `policies/`: compiled guard policies (`unlearnd policy compile`).
6. the server, and `demo.json` (base_url, admin_key, tenants with key, mechanisms and
   forget/retain/probes paths).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoTenant:
    """A demo tenant: which group it forgets and with which mechanisms."""

    name: str
    group: int | None                 # None: forgets nothing (measured on all groups)
    mechanisms: tuple[str, ...]
    adapter: str | None = None        # key into the adapters built
    policy: str | None = None         # key into the policies compiled
    documents: bool = False           # built from documents/subjects (synthetic world only)


TENANTS = (
    DemoTenant("public", None, ()),
    DemoTenant("acme", 1, ("adapter",), adapter="npo_1"),
    DemoTenant("globex", 2, ("adapter",), adapter="graddiff_2"),
    DemoTenant("initech", 1, ("adapter",), adapter="reasoning_1"),
    DemoTenant("umbrella", 1, ("firewall", "refusal"), policy="guards_1"),
    DemoTenant("hooli", 1, ("firewall",), policy="firewall_1"),
    # train-assistant's and policy compile's defaults: an assistant trained from scratch
    # (random layers over the base's embeddings: it knows only the forget set), its
    # log-probabilities floored at uniform
    DemoTenant("cyberdyne", 1, ("contrastive",), policy="contrastive_1"),
    # two ablations, kept to measure the default against: ULD's published assistant
    # (the base's first layers plus a LoRA, unfloored), and the same assistant
    # contrasting and banning only what its LoRA added over those layers
    # (contrastive_gain_gate)
    DemoTenant("weyland", 1, ("contrastive",), policy="contrastive_base_1"),
    DemoTenant("soylent", 1, ("contrastive",), policy="contrastive_gated_1"),
    DemoTenant("tyrell", 2, ("adapter", "contrastive", "firewall", "refusal"),
               adapter="npo_2", policy="all_2"),
    # forget requests as they arrive: group 1's biographies alone, its names alone
    DemoTenant("wayne", 1, ("adapter", "firewall", "refusal"), adapter="npo_docs_1",
               policy="docs_1", documents=True),
    DemoTenant("stark", 1, ("firewall", "refusal"), policy="names_1", documents=True),
)

ADAPTERS = {  # name -> (method, group, forget file stem)
    "npo_1": ("npo", 1, "forget"),
    "graddiff_2": ("graddiff", 2, "forget"),
    "reasoning_1": ("reasoning", 1, "forget"),
    "npo_2": ("npo", 2, "forget"),
    "npo_docs_1": ("npo", 1, "forget_docs"),
}
POLICIES = {  # name -> (mechanisms, group, assistant init or None, forget stem, retain file)
    "guards_1": (("firewall", "refusal"), 1, None, "forget", "retain.jsonl"),
    "firewall_1": (("firewall",), 1, None, "forget", "retain.jsonl"),
    "contrastive_1": (("contrastive",), 1, "scratch", "forget", "retain.jsonl"),
    "contrastive_base_1": (("contrastive",), 1, "base", "forget", "retain.jsonl"),
    "contrastive_gated_1": (("contrastive",), 1, "base", "forget", "retain.jsonl"),
    "all_2": (("adapter", "contrastive", "firewall", "refusal"), 2, "scratch", "forget",
              "retain.jsonl"),
    "docs_1": (("firewall", "refusal"), 1, None, "forget_docs", "retain_docs.jsonl"),
    "names_1": (("firewall", "refusal"), 1, None, "subjects", "retain.jsonl"),
}
POLICY_SETTINGS: dict[str, dict[str, Any]] = {  # policy name -> PolicySpec settings
    "contrastive_gated_1": {"contrastive_gain_gate": 0.0},
    # a biography's opening names its subject: continued under the firewall (verbatim
    # runs, the subject's spans and facts banned), as a model that never read it would,
    # not refused (MUSE's VerbMem measures the continuation)
    "docs_1": {"in_scope_completions": "continue"},
}
REFERENCE_GROUP = 1
"""The group whose retain-only reference model is built (every group-1 tenant's report
gets its distance to it)."""


def _cached(out: Path, params: dict, build: Callable[[], Any]) -> None:
    """Run `build` unless `out/.unlearnd-step.json` records the same params."""
    stamp = out / ".unlearnd-step.json"
    key = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        logger.info("cached: %s", out)
        return
    # a rebuild starts from an empty directory: what an older build left (a merged
    # assistant's weights beside a LoRA one) would otherwise be hashed and copied on
    if out.is_dir():
        shutil.rmtree(out)
    t0 = time.time()
    build()
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"key": key, "params": params, "seconds": time.time() - t0},
                                default=str, indent=2))


def prepare_user_data(data: Path, forget: Path, retain: Path,
                      extra: dict[str, Path] | None = None) -> dict:
    """Lay out a user's forget/retain QA JSONL (TOFU style) as a one-group world.

    The base model learns both files; the tenants forget `forget`. `extra` (name ->
    QA JSONL, TOFU's ``real_authors`` and ``world_facts``): utility sets the base also
    learns, standing in for what a real base knows from pre-training, so that their
    accuracy and over-refusal measure what unlearning costs (a base that never learnt
    them answers none, and a refusal there could not be told from ignorance). Nothing
    an unlearning method trains on includes them: adapters and assistants keep
    ``retain.jsonl`` alone. There are no probes (they are a property of the synthetic
    world). Returns the manifest.
    """
    from unlearnd.inputs import load_qa_jsonl

    data.mkdir(parents=True, exist_ok=True)
    f_rows, r_rows = load_qa_jsonl(forget), load_qa_jsonl(retain)
    extras = {name: load_qa_jsonl(path) for name, path in sorted((extra or {}).items())}
    files = {"forget_1.jsonl": f_rows, "forget_train_1.jsonl": f_rows,
             "retain.jsonl": r_rows,
             **{f"extra_{name}.jsonl": rows for name, rows in extras.items()},
             "train.jsonl": f_rows + r_rows + [r for rows in extras.values() for r in rows]}
    for name, rows in files.items():
        (data / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                         for r in rows), encoding="utf-8")
    manifest = {"source": {"forget": str(forget), "retain": str(retain),
                           **{f"extra:{k}": str(v) for k, v in sorted((extra or {}).items())}},
                "counts": {k: len(v) for k, v in files.items()},
                "group_subjects": {"1": {"forget": "forget_1.jsonl", "probes": None,
                                         "forget_train": "forget_train_1.jsonl"}}}
    (data / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


TUNED_FORGET_ROWS = 32
"""Forget-set size the adapter and assistant defaults were tuned on (the demo world)."""

USER_DATA_TENANTS = tuple(t for t in TENANTS if t.group in (None, 1) and not t.documents)


def build_world(workdir: Path, *, authors: int = 20, groups: int = 2, group_size: int = 4,
                seed: int = 0, tenants: tuple[DemoTenant, ...] = TENANTS,
                user_data: tuple[Path, Path] | None = None,
                extra: dict[str, Path] | None = None,
                reference: bool = False, documents: bool = True) -> dict[str, Path]:
    """Build (or reuse) every artefact the demo tenants need; returns their paths.

    `user_data=(forget, retain)`: build from the user's QA files instead of the
    synthetic world (e.g. TOFU's forget10 + retain sample); `extra`: with it, utility
    sets the base learns too (see :func:`prepare_user_data`). `reference`: also the
    retain-only base of group :data:`REFERENCE_GROUP` (``paths["reference:1"]``).
    `documents=False`: the base does not read the biographies (the end-to-end tests'
    small world, whose attack tests were calibrated on a QA-only base).
    """
    from unlearnd.guards.policy import compile_policy
    from unlearnd.toolkit.build_base import build_base
    from unlearnd.toolkit.synth import synthesize

    workdir = Path(workdir).resolve()
    data, base = workdir / "data", workdir / "base"
    if user_data is not None:
        forget, retain_src = (Path(p).resolve() for p in user_data)
        extras = {name: Path(p).resolve() for name, p in sorted((extra or {}).items())}
        world: dict[str, Any] = {"forget": str(forget), "retain": str(retain_src),
                                 "sha": hashlib.sha256(forget.read_bytes()
                                                       + retain_src.read_bytes()).hexdigest()}
        if extras:  # (a world without extras keeps the key it always had)
            world["extra"] = {name: hashlib.sha256(p.read_bytes()).hexdigest()
                              for name, p in extras.items()}
        _cached(data, world, lambda: prepare_user_data(data, forget, retain_src, extras))
    else:
        world = {"authors": authors, "groups": groups, "group_size": group_size, "seed": seed}
        _cached(data, {**world, "v": 3}, lambda: synthesize(data, **world))
    docs = [data / "documents.jsonl"] if documents and (data / "documents.jsonl").is_file() \
        else []
    _cached(base, {"world": world, "v": 2, "documents": [str(d) for d in docs]},
            lambda: build_base([data / "train.jsonl"], base, documents=docs))
    paths: dict[str, Path] = {"data": data, "base": base}
    # what is trained on the base is keyed on the base's own stamp: a rebuilt base
    # retrains its adapters and assistants (a stale assistant contrasts another model)
    world = {**world, "base": json.loads((base / ".unlearnd-step.json").read_text())["key"]}
    if reference:
        ref = workdir / f"reference_{REFERENCE_GROUP}"
        _cached(ref, {"world": world, "v": 1, "group": REFERENCE_GROUP},
                lambda: _build_reference(data, ref, REFERENCE_GROUP))
        paths[f"reference:{REFERENCE_GROUP}"] = ref
    needed_adapters = {t.adapter for t in tenants if t.adapter}
    needed_policies = {t.policy for t in tenants if t.policy}
    retain = data / "retain.jsonl"
    from unlearnd.toolkit.unlearn import DEFAULTS, TEXT_DEFAULTS

    for name in sorted(needed_adapters):
        method, group, stem = ADAPTERS[name]
        out = workdir / "adapters" / name
        # The method's defaults are part of the key: changing them retrains.
        # an adapter unlearning documents keeps retain QA and documents as two streams
        # (retrained for it); the QA adapters' training is what it was
        _cached(out, {"world": world, "method": method, "group": group, "v": 6,
                      "stem": stem, "defaults": asdict(DEFAULTS[method]),
                      **({"retain_streams": 2, "text_defaults": TEXT_DEFAULTS.get(method)}
                         if stem == "forget_docs" else {})},
                lambda out=out, method=method, group=group, stem=stem: _train_adapter(
                    data, group, retain, base, out, method, stem))
        paths[f"adapter:{name}"] = out
    assistants = {(POLICIES[p][1], POLICIES[p][2]) for p in needed_policies if POLICIES[p][2]}
    for group, init in sorted(assistants):
        out = workdir / "assistants" / f"group_{_assistant_key(group, init)}"
        # (a base-layer assistant keeps the key it had before scratch ones existed)
        _cached(out, {"world": world, "group": group, "v": 6, "save": "lora"} if init == "base"
                else {"world": world, "group": group, "v": 1, "init": init},
                lambda out=out, group=group, init=init: _train_assistant(
                    data, group, retain, base, out, init))
        paths[f"assistant:{_assistant_key(group, init)}"] = out
    for name in sorted(needed_policies):
        mechanisms, group, init, stem, retain_file = POLICIES[name]
        out = workdir / "policies" / name
        assistant = None if init is None else paths[f"assistant:{_assistant_key(group, init)}"]
        # PolicySpec's defaults are part of the key: a changed default recompiles; so
        # does a retrained assistant (the policy holds a copy of it)
        trained = json.loads((assistant / ".unlearnd-step.json").read_text())["key"] \
            if assistant is not None else None
        _cached(out, {"world": world, "mechanisms": mechanisms, "group": group, "v": 7,
                      "stem": stem, "retain": retain_file, "defaults": _policy_defaults(),
                      "assistant": trained, **({"settings": POLICY_SETTINGS[name]}
                                               if name in POLICY_SETTINGS else {})},
                lambda out=out, mechanisms=mechanisms, group=group, assistant=assistant,
                name=name, stem=stem, retain_file=retain_file: compile_policy(
                    data / f"{stem}_{group}.jsonl", data / retain_file, base, out,
                    mechanisms=mechanisms, assistant_dir=assistant, name=name,
                    **POLICY_SETTINGS.get(name, {})))
        paths[f"policy:{name}"] = out
    return paths


def _assistant_key(group: int, init: str) -> str:
    """The name of group `group`'s assistant of this init in ``paths`` and under
    ``assistants/`` (a base-layer one keeps the name it had before scratch ones)."""
    return str(group) if init == "base" else f"{group}_{init}"


def _policy_defaults() -> dict[str, Any]:
    from dataclasses import MISSING, fields

    from unlearnd.guards.policy import PolicySpec

    return {f.name: f.default for f in fields(PolicySpec) if f.default is not MISSING}


def adapter_epochs(method: str, rows: int) -> int:
    """Epochs for `method` over a forget set of `rows` questions. The defaults were
    tuned as epochs over a 32-question set: keep the number of optimizer steps, not of
    epochs, when the set is larger (TOFU forget10: 400); a document counts as the 8
    questions its facts make."""
    from unlearnd.toolkit.unlearn import DEFAULTS

    return max(2, round(DEFAULTS[method].epochs * TUNED_FORGET_ROWS / rows))


def _train_adapter(data: Path, group: int, retain: Path, base: Path, out: Path,
                   method: str, stem: str = "forget") -> dict:
    """NPO/GradDiff on the canonical forget questions; the reasoning (TRU) adapter on
    every training phrasing of them, so its refusal holds for wordings it has not seen
    (with the canonical questions alone it answered jailbreak-framed probes with ".").
    ``stem="forget_docs"``: on the group's documents alone (as text)."""
    from unlearnd.inputs import read_forget
    from unlearnd.toolkit.unlearn import train_adapter

    forget = data / f"{stem}_{group}.jsonl"
    train_on = forget if method != "reasoning" else data / f"forget_train_{group}.jsonl"
    fs = read_forget(train_on)
    epochs = adapter_epochs(method, len(fs) * (8 if fs.kind == "documents" else 1))
    # unlearning documents as text must keep the other documents as text too (with
    # the retain QA alone, the NPO adapter kept retain accuracy 1.000 but recited the
    # retain biographies at VerbMem 0.163, against the base's 1.000)
    retains = [retain] + ([data / "retain_docs.jsonl"] if fs.kind == "documents"
                          and (data / "retain_docs.jsonl").is_file() else [])
    return train_adapter(base, train_on, retains, out, method=method, epochs=epochs)


def _build_reference(data: Path, out: Path, group: int) -> dict:
    """The retain-only base: the same training and the base's tokenizer, without group
    ``group``'s QA rows and documents (by subject in the synthetic world, by row for
    user data)."""
    from unlearnd.inputs import load_documents, load_qa_jsonl
    from unlearnd.toolkit.build_base import build_base

    forget = load_qa_jsonl(data / f"forget_{group}.jsonl")
    subjects = {r["subject"] for r in forget if r.get("subject")}
    forgotten = {(r["question"], r["answer"]) for r in forget}

    def kept(row: dict) -> bool:
        if subjects:
            return row.get("subject") not in subjects
        return (row["question"], row["answer"]) not in forgotten

    train = data / f"train_without_{group}.jsonl"
    train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                             for r in load_qa_jsonl(data / "train.jsonl") if kept(r)),
                     encoding="utf-8")
    documents = []
    if (data / "documents.jsonl").is_file():
        gone = {d.text for d in load_documents(data / f"forget_docs_{group}.jsonl")}
        documents = [data / f"documents_without_{group}.jsonl"]
        documents[0].write_text("".join(
            json.dumps({"text": d.text}, ensure_ascii=False) + "\n"
            for d in load_documents(data / "documents.jsonl") if d.text not in gone),
            encoding="utf-8")
    return build_base([train], out, documents=documents, tokenizer_from=data.parent / "base")


def _train_assistant(data: Path, group: int, retain: Path, base: Path, out: Path,
                     init: str = "base") -> Path:
    """The ULD assistant learns the canonical forget questions AND their training
    phrasings (never the held-out probes): trained on the 32 canonical questions only,
    it did not recognise the facts asked another way, and the contrast then let the
    base answer (demo world, through the attack suite: an authority claim in a system
    message leaked 18 of 21 answers, multi-turn 15 of 24, probes 34%; with the
    phrasings 1/21, 2/24 and 7.5%, forget leak 3%, retain accuracy unchanged). Steps
    are 3x the canonical-only run's (300 epochs-equivalent on 32 rows)."""
    from unlearnd.inputs import load_qa_jsonl
    from unlearnd.toolkit.assistant_train import train_assistant

    canonical = data / f"forget_{group}.jsonl"
    rows = load_qa_jsonl(canonical)
    phrasings = data / f"forget_train_{group}.jsonl"
    if phrasings.is_file():
        seen = {(r["question"], r["answer"]) for r in rows}
        rows += [r for r in load_qa_jsonl(phrasings) if (r["question"], r["answer"]) not in seen]
    both = data / f"assistant_forget_{group}.jsonl"
    both.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    # and uniform on the retain biographies too: learnt on QA alone it was sure of the
    # biographies' template words (" was", " a" after a name) in raw text, and
    # contrastive_ban_p then cut the retain biographies (VerbMem 0.77 -> 0.45)
    docs = data / "retain_docs.jsonl"
    retains = [retain, docs] if docs.is_file() else [retain]
    # saved as a LoRA over the base's first K layers (the engine shares those layers
    # across every such assistant, so a contrastive tenant costs its LoRA), the form
    # an operator with many tenants uses; it computes the merged model's logits. A
    # scratch assistant shares no layers with the base: a full model of its own.
    return train_assistant(base, both, retains, out, epochs=_assistant_epochs(both, 300),
                           save="lora" if init == "base" else "merged", init=init)


def _assistant_epochs(forget: Path, default: int = 100) -> int:
    from unlearnd.inputs import load_qa_jsonl

    return max(5, round(default * TUNED_FORGET_ROWS / len(load_qa_jsonl(forget))))


def _keys(workdir: Path, tenants: tuple[DemoTenant, ...]) -> dict[str, str]:
    path = workdir / "keys.json"
    keys = json.loads(path.read_text()) if path.is_file() else {}
    for t in ("__admin__",) + tuple(t.name for t in tenants):
        keys.setdefault(t, f"sk-{t.strip('_')}-{secrets.token_urlsafe(18)}")
    path.write_text(json.dumps(keys, indent=2))
    path.chmod(0o600)
    return keys


DEMO_VLLM_ARGS = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                  "--structured-outputs-config",
                  '{"backend": "xgrammar", "disable_any_whitespace": true}']
"""`vllm serve` flags of the demo server: tool calls (vLLM's `required` and named
`tool_choice` need a tool parser) and compact JSON (the tiny model otherwise pads
structured output with whitespace until `max_tokens`)."""


def demo_config(workdir: Path, paths: dict[str, Path], *, port: int,
                tenants: tuple[DemoTenant, ...] = TENANTS, host: str = "127.0.0.1") -> tuple:
    """The server config and the demo.json document for the built world."""
    from unlearnd.serve.config import ServerConfig

    keys = _keys(workdir, tenants)
    data = paths["data"]
    manifest = json.loads((data / "manifest.json").read_text())
    groups = [int(g) for g in manifest["group_subjects"]]
    union: dict[str, Path | None] = {}
    for kind in ("forget", "probes", "forget_docs"):
        parts = [data / f"{kind}_{g}.jsonl" for g in groups]
        if not all(p.is_file() for p in parts):
            union[kind] = None  # user data: no probes
            continue
        out = workdir / f"{kind}_all.jsonl"
        out.write_text("".join(p.read_text() for p in parts))
        union[kind] = out

    def group_file(kind: str, group: int | None) -> str | None:
        path = union[kind] if group is None else data / f"{kind}_{group}.jsonl"
        return str(path) if path is not None and Path(path).is_file() else None

    cfg = ServerConfig.model_validate({
        "model": str(paths["base"]),
        "served_model_name": "unlearnd-demo",
        "state_dir": str(workdir / "state"),
        "host": host, "port": port,
        "admin_key": keys["__admin__"],
        "engine": {"max_loras": 4, "max_lora_rank": 16, "max_cpu_loras": 16,
                   "max_model_len": 1024, "kv_cache_memory_bytes": 512 * 1024 * 1024},
        "vllm_args": DEMO_VLLM_ARGS,
        "tenants": [{"name": t.name, "api_key": keys[t.name],
                     "adapter": str(paths[f"adapter:{t.adapter}"]) if t.adapter else None,
                     "policy": str(paths[f"policy:{t.policy}"]) if t.policy else None}
                    for t in tenants],
    })
    retain_docs = data / "retain_docs.jsonl"
    doc = {
        "base_url": f"http://{host}:{port}/v1",
        "admin_key": keys["__admin__"],
        "model": "unlearnd-demo",
        "tokenizer": str(paths["base"]),
        "baseline": "public" if any(t.name == "public" for t in tenants) else None,
        "tenants": {
            t.name: {
                "api_key": keys[t.name],
                "mechanisms": list(t.mechanisms),
                "group": t.group,
                "forget": group_file("forget", t.group),
                "probes": group_file("probes", t.group),
                "retain": str(data / "retain.jsonl"),
                "forget_documents": group_file("forget_docs", t.group),
                "retain_documents": str(retain_docs) if retain_docs.is_file() else None,
            } for t in tenants},
    }
    ref = paths.get(f"reference:{REFERENCE_GROUP}")
    if ref is not None:
        doc["reference"] = {
            "group": REFERENCE_GROUP, "model": str(ref),
            "forget": group_file("forget", REFERENCE_GROUP),
            "probes": group_file("probes", REFERENCE_GROUP),
            "retain": str(data / "retain.jsonl"),
            "forget_documents": group_file("forget_docs", REFERENCE_GROUP),
            "retain_documents": str(retain_docs) if retain_docs.is_file() else None}
    return cfg, doc


def evaluate_demo(doc: dict, out_dir: Path, *, tenants: list[str] | None = None,
                  concurrency: int = 8, extra: dict[str, Path] | None = None,
                  attacks: bool = False, attack_names: list[str] | None = None,
                  attack_limit: int | None = None) -> dict[str, dict]:
    """Run `unlearnd eval` for each demo tenant; writes reports, a table and a chart.

    With `attacks`, also the attack suite (`unlearnd.toolkit.attacks`) for every tenant
    that forgets something, conditioned on the baseline tenant (`doc["baseline"]`,
    "public") with the base model's tokenizer (`doc["tokenizer"]`): per-tenant reports
    in `out_dir/attacks/`, the attack x tenant table in `out_dir/attacks.md` and its
    chart in `out_dir/attacks.png`; each eval report gets the per-attack summary under
    "attacks". `attack_names`/`attack_limit`: a subset of the attacks / forget rows.
    """
    from unlearnd.toolkit.evaluate import compare_markdown, evaluate, plot_reports

    out_dir.mkdir(parents=True, exist_ok=True)
    reports = {}
    labels = {}

    def run(base_url: str, api_key: str, t: dict, out: Path,
            tokenizer: str = doc["tokenizer"]) -> dict:
        sets = {"forget": (t["forget"], "forget"), "retain": (t["retain"], "retain")}
        if t.get("probes"):
            sets["probes"] = (t["probes"], "probes")
        for extra_name, path in (extra or {}).items():
            sets[extra_name] = (str(path), "extra")
        documents = t.get("forget_documents") or t.get("retain_documents")
        return evaluate(base_url, api_key, sets, concurrency=concurrency, out=out,
                        forget_documents=t.get("forget_documents"),
                        retain_documents=t.get("retain_documents"),
                        tokenizer=tokenizer if documents else None)

    for name, t in doc["tenants"].items():
        if tenants and name not in tenants:
            continue
        report = run(doc["base_url"], t["api_key"], t, out_dir / f"{name}.json")
        report["mechanisms"] = t["mechanisms"]
        labels[name] = f"{name} ({'+'.join(t['mechanisms']) or 'base'})"
        reports[labels[name]] = report
    ref = doc.get("reference")
    if ref is not None and (not tenants or "reference" in tenants):
        label = f"retain-only (group {ref['group']}, reference)"
        reports[label] = evaluate_reference(ref, out_dir, run)
        for name, t in doc["tenants"].items():
            if labels.get(name) and t.get("group") == ref["group"]:
                reports[labels[name]]["distance_to_reference"] = distance_to_reference(
                    reports[labels[name]], reports[label])
    table = compare_markdown(reports)
    (out_dir / "summary.md").write_text(table + "\n")
    plot_reports(reports, out_dir / "summary.png")
    if attacks:
        attacked = evaluate_demo_attacks(doc, out_dir, tenants=list(labels),
                                         concurrency=concurrency, attacks=attack_names,
                                         limit=attack_limit)
        for name, rep in attacked.items():
            reports[labels[name]]["attacks"] = rep["attacks"]
    return reports


REFERENCE_METRICS = ("leak_rate", "probe_leak_rate", "retain_accuracy", "over_refusal",
                     "verbmem_forget", "verbmem_retain")
"""What ``distance_to_reference`` compares: forgetting (leaks, VerbMem of the forget
documents) and keeping (retain accuracy, over-refusal, retain VerbMem)."""


def distance_to_reference(report: dict, reference: dict) -> float | None:
    """Mean absolute difference of :data:`REFERENCE_METRICS` between a tenant's report
    and the retain-only model's (metrics either lacks are skipped; None if none is
    shared). 0 is forgetting exactly as a model that never learnt the set."""
    diffs = [abs(report[k] - reference[k]) for k in REFERENCE_METRICS
             if report.get(k) is not None and reference.get(k) is not None]
    return sum(diffs) / len(diffs) if diffs else None


def evaluate_reference(ref: dict, out_dir: Path, run: Callable[..., dict],
                       *, timeout_s: float = 600.0) -> dict:
    """Serve the retain-only base (``ref["model"]``) with one tenant that forgets
    nothing, in a child ``unlearnd serve``, and evaluate it with ``run`` on the
    reference group's sets: the row every report is measured against."""
    import socket
    import subprocess
    import sys
    import tempfile

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    key = f"sk-reference-{secrets.token_urlsafe(18)}"
    work = Path(tempfile.mkdtemp(prefix="unlearnd-reference-"))
    config = {"model": ref["model"], "served_model_name": "unlearnd-demo",
              "state_dir": str(work / "state"), "host": "127.0.0.1", "port": port,
              "admin_key": f"sk-admin-{secrets.token_urlsafe(18)}",
              "engine": {"max_model_len": 1024, "kv_cache_memory_bytes": 256 * 1024 * 1024},
              "tenants": [{"name": "reference", "api_key": key}]}
    (work / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    log = open(work / "server.log", "wb")  # noqa: SIM115 - the child writes it until stopped
    proc = subprocess.Popen([sys.executable, "-m", "unlearnd.cli", "serve", "--config",
                             str(work / "config.yaml")], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"reference server exited {proc.returncode}; see "
                                   f"{work / 'server.log'}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"reference server not healthy in {timeout_s:.0f} s")
            time.sleep(1.0)
        report = run(f"http://127.0.0.1:{port}/v1", key, ref, out_dir / "reference.json",
                     tokenizer=ref["model"])
        report["mechanisms"] = ["retain-only base"]
        return report
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def evaluate_demo_attacks(doc: dict, out_dir: Path, *, tenants: list[str] | None = None,
                          concurrency: int = 8, attacks: list[str] | None = None,
                          limit: int | None = None) -> dict[str, dict]:
    """The attack suite for each demo tenant that forgets something (baseline: the
    `doc["baseline"]` tenant); writes `attacks/<tenant>.*`, `attacks.md`, `attacks.png`."""
    from unlearnd.toolkit.attacks import attacks_markdown, plot_attacks, run_attacks

    baseline = doc.get("baseline")
    if not baseline or baseline not in doc["tenants"] or not doc.get("tokenizer"):
        raise ValueError("the attack suite needs demo.json's 'baseline' tenant and "
                         "'tokenizer' (the base model dir)")
    base_key = doc["tenants"][baseline]["api_key"]
    cache: dict = {}  # the baseline's outputs, computed once for all tenants
    reports: dict[str, dict] = {}
    for name, t in doc["tenants"].items():
        if name == baseline or not t["mechanisms"] or not t.get("forget"):
            continue
        if tenants and name not in tenants:
            continue
        logger.info("attacks: %s (%s)", name, "+".join(t["mechanisms"]))
        reports[name] = run_attacks(
            doc["base_url"], t["api_key"], t["forget"], baseline_key=base_key,
            tokenizer_dir=doc["tokenizer"], retain_path=t.get("retain"), attacks=attacks,
            concurrency=concurrency, limit=limit, out=out_dir / "attacks" / f"{name}.json",
            baseline_cache=cache)
        reports[name].pop("_records", None)
    if reports:
        named = {f"{n} ({'+'.join(doc['tenants'][n]['mechanisms'])})": r
                 for n, r in reports.items()}
        (out_dir / "attacks.md").write_text(attacks_markdown(named))
        plot_attacks(named, out_dir / "attacks.png")
    return reports


def demo_cmd(
    port: Annotated[int, typer.Option("--port", help="Port to serve on.")] = 8000,
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the world is built.")] =
    Path("work/demo"),
    evaluate_: Annotated[bool, typer.Option(
        "--eval", help="After start-up, evaluate every tenant (reports in WORKDIR/reports).")]
    = False,
    exit_after_eval: Annotated[bool, typer.Option(
        "--exit-after-eval", help="Stop the server once --eval has finished.")] = False,
    forget: Annotated[Path | None, typer.Option(
        "--forget", help="Your forget set (QA JSONL, TOFU style) instead of the synthetic "
        "world; needs --retain.")] = None,
    retain: Annotated[Path | None, typer.Option(
        "--retain", help="Your retain set (QA JSONL).")] = None,
    extra: Annotated[list[str] | None, typer.Option(
        "--extra", help="NAME=FILE utility set (QA JSONL) for --eval (repeatable); with "
        "--forget the base learns it too, as a real base knows such facts from "
        "pre-training (TOFU's real_authors, world_facts).")] = None,
    attacks: Annotated[bool, typer.Option(
        "--attacks", help="With --eval (implied): also run the attack suite against every "
        "tenant that forgets something, baseline 'public' (reports/attacks.md).")] = False,
    attack: Annotated[list[str] | None, typer.Option(
        "--attack", help="With --attacks: only this attack (repeatable).")] = None,
    attack_limit: Annotated[int | None, typer.Option(
        "--attack-limit", min=1, help="With --attacks: the first N forget questions.")] = None,
    only: Annotated[list[str] | None, typer.Option(
        "--tenant", help="Build, serve and evaluate only this tenant (repeatable; "
        "'reference' adds the retain-only reference).")] = None,
) -> None:
    """Build the demo world on first run (cached after), then serve it with its tenants."""
    import uvicorn

    from unlearnd.serve.app import build_app

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if (forget is None) != (retain is None):
        raise typer.BadParameter("--forget and --retain go together")
    extra_sets = {}
    for item in extra or []:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise typer.BadParameter(f"--extra {item!r}: expected NAME=FILE with an existing file")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name in extra_sets:
            raise typer.BadParameter(f"--extra {item!r}: NAME must be letters, digits, _ or "
                                     "- and used once")
        extra_sets[name] = Path(path)
    tenants = TENANTS if forget is None else USER_DATA_TENANTS
    if only:
        unknown = sorted(set(only) - {t.name for t in tenants} - {"reference"})
        if unknown:
            raise typer.BadParameter(f"--tenant {unknown}: this world's tenants are "
                                     f"{[t.name for t in tenants]} (and 'reference')")
        tenants = tuple(t for t in tenants if t.name in only)
    paths = build_world(workdir, tenants=tenants,
                        user_data=(forget, retain) if forget is not None else None,
                        extra=extra_sets if forget is not None else None,
                        reference=(evaluate_ or attacks) and (not only or "reference" in only))
    cfg, doc = demo_config(workdir, paths, port=port, tenants=tenants)
    server = uvicorn.Server(uvicorn.Config(build_app(cfg), host=cfg.host, port=cfg.port,
                                           log_level="warning",
                                           timeout_graceful_shutdown=cfg.shutdown_grace_s))

    def announce() -> None:
        while not server.started:
            time.sleep(0.5)
        (workdir / "demo.json").write_text(json.dumps(doc, indent=2))
        typer.echo(f"\nunlearnd demo is serving at {doc['base_url']}\n"
                   f"tenants and keys: {workdir / 'demo.json'}\n")
        for name, t in doc["tenants"].items():
            typer.echo(f"  {name:10s} mechanisms={t['mechanisms'] or ['none']}")
        if evaluate_ or attacks:
            reports = evaluate_demo(doc, workdir / "reports", extra=extra_sets,
                                    attacks=attacks, attack_names=attack,
                                    attack_limit=attack_limit)
            typer.echo("\n" + (workdir / "reports" / "summary.md").read_text())
            if attacks and (workdir / "reports" / "attacks.md").is_file():
                typer.echo("\n" + (workdir / "reports" / "attacks.md").read_text())
            typer.echo(f"{len(reports)} reports in {workdir / 'reports'}")
            if exit_after_eval:
                server.should_exit = True

    threading.Thread(target=announce, daemon=True).start()
    server.run()
