"""Tenants, policy versions, activation history and audit (unlearnd.serve.registry)."""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import torch

from unlearnd.serve.artifacts import ADAPTER_WEIGHTS, POLICY_FORMAT, ArtifactError, BaseModelSpec
from unlearnd.serve.registry import PolicyVersion, RegistryError, SQLiteRegistry

KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"


def _make_adapter(
    root: Path, *, hidden: int = 128, layers: int = 2, heads: int = 2, rank: int = 4, seed: int = 0
) -> tuple[Path, Path]:
    """Tiny random Llama config + PEFT LoRA (r=rank on q/v) saved as safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        vocab_size=300,
    )
    model = get_peft_model(
        LlamaForCausalLM(cfg), LoraConfig(r=rank, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    cfg.save_pretrained(root / "base")
    model.save_pretrained(root / "adapter", safe_serialization=True)
    return root / "base", root / "adapter"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("registry")
    base_dir, adapter = _make_adapter(root / "one", seed=0)
    _, adapter2 = _make_adapter(root / "two", seed=1)
    _, wide = _make_adapter(root / "wide", hidden=256, heads=4)
    _, deep = _make_adapter(root / "deep", layers=3)
    return {"base": base_dir, "adapter": adapter, "adapter2": adapter2, "wide": wide, "deep": deep}


@pytest.fixture()
def base(built: dict[str, Path]) -> BaseModelSpec:
    return BaseModelSpec.from_model_dir(built["base"])


@pytest.fixture()
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture()
def reg(state: Path, base: BaseModelSpec) -> SQLiteRegistry:
    registry = SQLiteRegistry(state, base=base, max_lora_rank=8)
    registry.create_tenant("acme", KEY_A, actor="op")
    registry.create_tenant("globex", KEY_B, actor="op")
    yield registry
    registry.close()


def make_policy(root: Path, n: int) -> Path:
    """A policy dir whose content depends on n."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "policy.json").write_text(json.dumps({"format": POLICY_FORMAT, "n": n}))
    (root / "embeddings.npy").write_bytes(bytes(range(n % 256)) * 3)
    return root


def store_entries(reg: SQLiteRegistry) -> set[str]:
    return {p.name for p in reg.store_dir.iterdir()}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- tenants and keys ----------------------------------------------------------------


def test_tenants_and_keys(reg: SQLiteRegistry, state: Path) -> None:
    assert [t.name for t in reg.list_tenants()] == ["acme", "globex"]
    acme = reg.tenant_for_key(KEY_A)
    assert acme is not None and acme.name == "acme"
    assert reg.tenant_for_key(KEY_B).name == "globex"
    assert reg.tenant_for_key(KEY_A + "x") is None
    assert reg.tenant_for_key("") is None
    assert acme.cache_salt != reg.get_tenant("globex").cache_salt
    reg.rotate_key("acme", "new-key-for-acme-123", actor="op")
    assert reg.tenant_for_key(KEY_A) is None
    assert reg.tenant_for_key("new-key-for-acme-123").name == "acme"
    # Keys are stored hashed only.
    raw = b"".join(p.read_bytes() for p in state.glob("registry.db*"))
    assert KEY_B.encode() not in raw and b"new-key-for-acme-123" not in raw


@pytest.mark.parametrize(
    ("name", "key", "status", "code"),
    [
        ("acme", "another-key-0123456789", 409, "tenant_exists"),
        ("Bad Name", "another-key-0123456789", 400, "invalid_tenant_name"),
        ("x" * 64, "another-key-0123456789", 400, "invalid_tenant_name"),
        ("new", "short", 400, "invalid_api_key"),
        ("new", KEY_B, 409, "api_key_in_use"),
    ],
)
def test_create_tenant_rejections(
    reg: SQLiteRegistry, name: str, key: str, status: int, code: str
) -> None:
    gen = reg.generation()
    with pytest.raises(RegistryError) as exc:
        reg.create_tenant(name, key, actor="op")
    assert (exc.value.status, exc.value.code) == (status, code)
    assert key not in str(exc.value)
    assert reg.generation() == gen


def test_unknown_tenant_404(reg: SQLiteRegistry) -> None:
    for call in (
        lambda: reg.get_tenant("nobody"),
        lambda: reg.list_versions("nobody"),
        lambda: reg.active_version("nobody"),
        lambda: reg.delete_tenant("nobody", actor="op"),
    ):
        with pytest.raises(RegistryError) as exc:
            call()
        assert exc.value.status == 404


# -- versions ------------------------------------------------------------------------


def test_add_version_copies_into_store(reg: SQLiteRegistry, built: dict, tmp_path: Path) -> None:
    policy = make_policy(tmp_path / "pol", 1)
    v = reg.add_version(
        "acme", adapter=built["adapter"], policy=policy, actor="op", meta={"note": "x"}
    )
    assert v.name == f"acme@{v.content_hash[:12]}" and len(v.content_hash) == 64
    assert v.tenant == "acme" and v.lora_int_id > 0 and v.meta == {"note": "x"}
    assert Path(v.adapter_dir) == reg.store_dir / v.name / "adapter"
    assert tree_bytes(Path(v.adapter_dir)) == tree_bytes(built["adapter"])
    assert tree_bytes(Path(v.policy_dir)) == tree_bytes(policy)
    # Later changes to the source do not change what is stored.
    (policy / "policy.json").write_text(json.dumps({"format": POLICY_FORMAT, "n": 99}))
    assert json.loads((Path(v.policy_dir) / "policy.json").read_text())["n"] == 1
    assert reg.get_version("acme", v.name) == v
    assert reg.list_versions("acme") == [v]
    assert store_entries(reg) == {v.name}


def test_add_version_parts_and_ids(reg: SQLiteRegistry, built: dict, tmp_path: Path) -> None:
    only_adapter = reg.add_version("acme", adapter=built["adapter"], policy=None, actor="op")
    only_policy = reg.add_version(
        "acme", adapter=None, policy=make_policy(tmp_path / "p", 2), actor="op"
    )
    assert only_adapter.policy_dir is None and only_policy.adapter_dir is None
    assert only_adapter.lora_int_id != only_policy.lora_int_id
    with pytest.raises(RegistryError) as exc:
        reg.add_version("acme", adapter=None, policy=None, actor="op")
    assert exc.value.status == 400
    with pytest.raises(RegistryError) as exc:
        reg.add_version("nobody", adapter=built["adapter"], policy=None, actor="op")
    assert exc.value.status == 404
    with pytest.raises(RegistryError) as exc:
        reg.add_version(
            "acme", adapter=built["adapter"], policy=None, actor="op", meta={"x": object()}
        )
    assert exc.value.status == 400


def test_same_content_is_idempotent(reg: SQLiteRegistry, built: dict, tmp_path: Path) -> None:
    v1 = reg.add_version("acme", adapter=built["adapter"], policy=None, actor="op")
    gen, audit_len = reg.generation(), len(reg.audit())
    copy = tmp_path / "elsewhere"
    shutil.copytree(built["adapter"], copy)
    v2 = reg.add_version("acme", adapter=copy, policy=None, actor="op")
    assert v2 == v1
    assert reg.generation() == gen and len(reg.audit()) == audit_len
    assert len(reg.list_versions("acme")) == 1
    # Same content for another tenant is that tenant's own version.
    vb = reg.add_version("globex", adapter=built["adapter"], policy=None, actor="op")
    assert vb.name.startswith("globex@") and vb.content_hash == v1.content_hash
    assert vb.lora_int_id != v1.lora_int_id
    # An adapter and a policy are hashed apart from each other: a one-byte change differs.
    weights = copy / ADAPTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    v3 = reg.add_version("acme", adapter=copy, policy=None, actor="op")
    assert v3.name != v1.name


def _corrupt_cases(built: dict, tmp_path: Path) -> list[tuple[str, Path, int | None]]:
    """(label, adapter dir, max_lora_rank override) for each broken adapter."""
    cases = []

    def copy(label: str) -> Path:
        dst = tmp_path / label
        shutil.copytree(built["adapter"], dst)
        return dst

    d = copy("no_config")
    (d / "adapter_config.json").unlink()
    cases.append(("adapter_config.json", d, None))
    d = copy("no_weights")
    (d / ADAPTER_WEIGHTS).unlink()
    cases.append((ADAPTER_WEIGHTS, d, None))
    d = copy("truncated")
    data = (d / ADAPTER_WEIGHTS).read_bytes()
    (d / ADAPTER_WEIGHTS).write_bytes(data[: len(data) - 100])
    cases.append(("corrupt", d, None))
    d = copy("garbage")
    (d / ADAPTER_WEIGHTS).write_bytes(bytes(random.Random(0).randrange(256) for _ in range(2000)))
    cases.append(("corrupt", d, None))
    cases.append(("do not fit the base", built["wide"], None))
    cases.append(("layer 2", built["deep"], None))
    cases.append(("max_lora_rank 2", built["adapter"], 2))
    return cases


def test_corrupt_artifacts_leave_no_trace(
    reg: SQLiteRegistry, built: dict, tmp_path: Path, state: Path, base: BaseModelSpec
) -> None:
    good = reg.add_version("acme", adapter=built["adapter2"], policy=None, actor="op")
    reg.activate("acme", good.name, actor="op")
    gen = reg.generation()
    small_rank = SQLiteRegistry(state, base=base, max_lora_rank=2)
    for fragment, adapter, rank in _corrupt_cases(built, tmp_path):
        target = small_rank if rank is not None else reg
        with pytest.raises(ArtifactError) as exc:
            target.add_version("acme", adapter=adapter, policy=None, actor="op")
        assert 400 <= exc.value.status < 500, exc.value
        assert fragment in str(exc.value), (fragment, str(exc.value))
        assert reg.active_version("acme") == good
        assert store_entries(reg) == {good.name}
    # A bad policy next to a good adapter stores nothing either.
    bad_policy = tmp_path / "badpol"
    bad_policy.mkdir()
    (bad_policy / "policy.json").write_text("[]")
    with pytest.raises(ArtifactError) as exc:
        reg.add_version("acme", adapter=built["adapter"], policy=bad_policy, actor="op")
    assert exc.value.code == "policy_corrupt"
    assert store_entries(reg) == {good.name}
    assert reg.list_versions("acme") == [good]
    assert reg.generation() == gen
    small_rank.close()


# -- activation ----------------------------------------------------------------------


@pytest.fixture()
def three(reg: SQLiteRegistry, tmp_path: Path) -> list[PolicyVersion]:
    return [
        reg.add_version("acme", adapter=None, policy=make_policy(tmp_path / f"p{i}", i), actor="op")
        for i in range(3)
    ]


def test_activate_rollback_deactivate(reg: SQLiteRegistry, three: list[PolicyVersion]) -> None:
    a, b, c = three
    assert reg.active_version("acme") is None
    assert reg.activate("acme", a.name, actor="op") is None
    assert reg.activate("acme", b.name, actor="op") == a
    assert reg.activate("acme", c.name, actor="op") == b
    gen = reg.generation()
    assert reg.activate("acme", c.name, actor="op") == c  # no-op
    assert reg.generation() == gen
    assert reg.rollback("acme", actor="op") == b
    assert reg.active_version("acme") == b
    assert reg.rollback("acme", actor="op") == a
    with pytest.raises(RegistryError) as exc:
        reg.rollback("acme", actor="op")
    assert (exc.value.status, exc.value.code) == (409, "no_rollback_target")
    assert reg.active_version("acme") == a
    reg.deactivate("acme", actor="op")
    assert reg.active_version("acme") is None
    assert reg.rollback("acme", actor="op") == a  # undo the deactivation
    assert reg.active_version("globex") is None  # other tenant untouched


def test_pointer_changed_at(reg: SQLiteRegistry, three: list[PolicyVersion],
                            tmp_path: Path) -> None:
    """When the active pointer last moved (what replicas measure propagation from):
    activate, rollback and deactivate count; registering a version does not."""
    a, b, _ = three
    assert reg.pointer_changed_at("acme") is None  # versions registered, none activated
    before = time.time()
    reg.activate("acme", a.name, actor="op")
    t1 = reg.pointer_changed_at("acme")
    assert t1 is not None and before - 1 <= t1 <= time.time() + 1
    reg.add_version("acme", adapter=None, policy=make_policy(tmp_path / "p9", 9), actor="op")
    assert reg.pointer_changed_at("acme") == t1
    for move in (lambda: reg.activate("acme", b.name, actor="op"),
                 lambda: reg.rollback("acme", actor="op"),
                 lambda: reg.deactivate("acme", actor="op")):
        time.sleep(0.01)
        move()
        t2 = reg.pointer_changed_at("acme")
        assert t2 is not None and t2 > t1
        t1 = t2
    assert reg.pointer_changed_at("globex") is None


def test_snapshot_is_what_the_single_reads_say(reg: SQLiteRegistry,
                                                three: list[PolicyVersion]) -> None:
    """`snapshot` (what every replica mirrors, in a fixed number of queries) agrees with
    the one-tenant reads, and answers None while the generation is unchanged."""
    a, b, _ = three
    reg.activate("acme", a.name, actor="op")
    reg.activate("acme", b.name, actor="op")
    snap = reg.snapshot()
    assert snap is not None and snap.generation == reg.generation()
    assert snap.tenants == reg.list_tenants()
    assert snap.keys == reg.key_index()
    assert snap.active == {"acme": b, "globex": None}
    assert snap.changed_at == {"acme": reg.pointer_changed_at("acme"), "globex": None}
    assert reg.snapshot(seen=snap.generation) is None
    reg.deactivate("acme", actor="op")
    later = reg.snapshot(seen=snap.generation)
    assert later is not None and later.active == {"acme": None, "globex": None}
    assert later.changed_at["acme"] >= snap.changed_at["acme"]


def test_delete_version(reg: SQLiteRegistry, three: list[PolicyVersion]) -> None:
    a, b, c = three
    reg.activate("acme", a.name, actor="op")
    reg.activate("acme", b.name, actor="op")
    with pytest.raises(RegistryError) as exc:
        reg.delete_version("acme", b.name, actor="op")
    assert (exc.value.status, exc.value.code) == (409, "version_active")
    assert (reg.store_dir / b.name).is_dir()
    reg.delete_version("acme", a.name, actor="op")
    assert not (reg.store_dir / a.name).exists()
    with pytest.raises(RegistryError) as exc:
        reg.get_version("acme", a.name)
    assert exc.value.status == 404
    # a was the rollback target; it is gone, so there is none.
    with pytest.raises(RegistryError) as exc:
        reg.rollback("acme", actor="op")
    assert exc.value.status == 409
    # lora_int_id is never reused.
    ids = {v.lora_int_id for v in three}
    new = reg.add_version(
        "acme", adapter=None, policy=make_policy(reg.state_dir.parent / "pn", 7), actor="op"
    )
    assert new.lora_int_id > max(ids)


def test_lora_id_not_reused_after_readding(
    reg: SQLiteRegistry, three: list[PolicyVersion], tmp_path: Path
) -> None:
    a = three[0]
    reg.delete_version("acme", a.name, actor="op")
    again = reg.add_version(
        "acme", adapter=None, policy=make_policy(tmp_path / "again", 0), actor="op"
    )
    assert again.name == a.name  # same content, same name
    assert again.lora_int_id > max(v.lora_int_id for v in three)


def test_versions_are_private_to_their_tenant(
    reg: SQLiteRegistry, three: list[PolicyVersion]
) -> None:
    a = three[0]
    for call in (
        lambda: reg.get_version("globex", a.name),
        lambda: reg.activate("globex", a.name, actor="op"),
        lambda: reg.delete_version("globex", a.name, actor="op"),
    ):
        with pytest.raises(RegistryError) as exc:
            call()
        assert exc.value.status == 404
    assert reg.list_versions("globex") == []
    assert reg.active_version("globex") is None
    assert reg.get_version("acme", a.name) == a


def test_delete_tenant(reg: SQLiteRegistry, three: list[PolicyVersion]) -> None:
    reg.activate("acme", three[0].name, actor="op")
    reg.delete_tenant("acme", actor="op")
    assert reg.tenant_for_key(KEY_A) is None
    assert all(not (reg.store_dir / v.name).exists() for v in three)
    assert [t.name for t in reg.list_tenants()] == ["globex"]


# -- persistence, audit, generation ----------------------------------------------------


def test_restart_keeps_state(
    reg: SQLiteRegistry, three: list[PolicyVersion], state: Path, base: BaseModelSpec
) -> None:
    a, b, _ = three
    reg.activate("acme", a.name, actor="op")
    reg.activate("acme", b.name, actor="op")
    gen = reg.generation()
    audit = reg.audit()
    acme_salt = reg.get_tenant("acme").cache_salt
    reg.close()
    again = SQLiteRegistry(state, base=base, max_lora_rank=8)
    assert again.active_version("acme") == b
    assert again.list_versions("acme") == three
    assert again.tenant_for_key(KEY_A).name == "acme"
    assert again.get_tenant("acme").cache_salt == acme_salt
    assert again.generation() == gen
    assert again.audit() == audit
    assert again.rollback("acme", actor="op") == a  # history survived too
    again.close()


def test_audit_and_generation(reg: SQLiteRegistry, built: dict, tmp_path: Path) -> None:
    g0 = reg.generation()
    v1 = reg.add_version("acme", adapter=built["adapter"], policy=None, actor="alice")
    v2 = reg.add_version("acme", adapter=None, policy=make_policy(tmp_path / "p", 5), actor="alice")
    reg.activate("acme", v1.name, actor="bob")
    reg.activate("acme", v2.name, actor="bob")
    reg.rollback("acme", actor="bob")
    reg.deactivate("acme", actor="bob")
    reg.delete_version("acme", v2.name, actor="carol")
    reg.rotate_key("acme", "rotated-key-0123456789", actor="carol")
    steps = [
        "add_version",
        "add_version",
        "activate",
        "activate",
        "rollback",
        "deactivate",
        "delete_version",
        "rotate_key",
    ]
    assert reg.generation() == g0 + len(steps)
    entries = reg.audit(tenant="acme", limit=len(steps))
    assert [e.action for e in reversed(entries)] == steps
    assert [e.actor for e in reversed(entries)] == ["alice"] * 2 + ["bob"] * 4 + ["carol"] * 2
    assert entries[-3].detail == {"version": v1.name, "previous": None}
    assert all(e.tenant == "acme" for e in entries)
    assert [e.id for e in entries] == sorted((e.id for e in entries), reverse=True)
    everything = reg.audit(limit=1000)
    assert {e.action for e in everything} >= {"create_tenant"}
    assert not any("rotated-key" in json.dumps(e.detail) for e in everything)
    with pytest.raises(RegistryError):
        reg.audit(limit=0)


def test_locked_database_is_503_and_changes_nothing(
    state: Path, base: BaseModelSpec, built: dict
) -> None:
    reg = SQLiteRegistry(state, base=base, max_lora_rank=8, busy_timeout_s=0.2)
    reg.create_tenant("acme", KEY_A, actor="op")
    v = reg.add_version("acme", adapter=built["adapter"], policy=None, actor="op")
    gen = reg.generation()
    blocker = sqlite3.connect(state / "registry.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(RegistryError) as exc:
            reg.activate("acme", v.name, actor="op")
        assert (exc.value.status, exc.value.code) == (503, "registry_unavailable")
        with pytest.raises(RegistryError) as exc:
            reg.add_version("acme", adapter=built["adapter2"], policy=None, actor="op")
        assert exc.value.status == 503
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert reg.active_version("acme") is None
    assert reg.generation() == gen
    assert store_entries(reg) == {v.name}  # the refused copy was cleaned up
    assert reg.activate("acme", v.name, actor="op") is None  # works again once unlocked
    reg.close()


def test_constructor_validation(state: Path, base: BaseModelSpec) -> None:
    with pytest.raises(ValueError, match="max_lora_rank"):
        SQLiteRegistry(state, base=base, max_lora_rank=0)
    with pytest.raises(ValueError, match="base"):
        SQLiteRegistry(state, base="llama", max_lora_rank=8)  # type: ignore[arg-type]


# -- concurrency ---------------------------------------------------------------------


def test_concurrent_activations_stay_consistent(
    state: Path, base: BaseModelSpec, tmp_path: Path
) -> None:
    """Threads on two registry instances (two connections, like two replicas) flip the
    active version; the audit trail must read as one serial history."""
    first = SQLiteRegistry(state, base=base, max_lora_rank=8)
    second = SQLiteRegistry(state, base=base, max_lora_rank=8)
    first.create_tenant("acme", KEY_A, actor="op")
    versions = [
        first.add_version(
            "acme", adapter=None, policy=make_policy(tmp_path / f"c{i}", i), actor="op"
        ).name
        for i in range(4)
    ]
    switches = [0] * 6
    errors: list[BaseException] = []

    def worker(idx: int) -> None:
        rng = random.Random(idx)
        registry = first if idx % 2 else second
        try:
            for _ in range(20):
                target = rng.choice(versions)
                previous = registry.activate("acme", target, actor=f"t{idx}")
                if previous is None or previous.name != target:
                    switches[idx] += 1
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(switches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    entries = [
        e for e in reversed(first.audit(tenant="acme", limit=1000)) if e.action == "activate"
    ]
    assert len(entries) == sum(switches)
    for before, after in zip(entries, entries[1:], strict=False):
        assert after.detail["previous"] == before.detail["version"]
    assert first.active_version("acme").name == entries[-1].detail["version"]
    assert second.active_version("acme") == first.active_version("acme")
    # Every switch but the first pushed a history entry; rollbacks walk them back.
    history = [first.rollback("acme", actor="op").name for _ in range(len(entries) - 1)]
    assert history == [e.detail["previous"] for e in reversed(entries[1:])]
    first.close()
    second.close()


def test_key_index_and_write_probe(reg: SQLiteRegistry) -> None:
    import hashlib

    index = reg.key_index()
    assert index[hashlib.sha256(KEY_A.encode()).hexdigest()] == "acme"
    assert index[hashlib.sha256(KEY_B.encode()).hexdigest()] == "globex"
    assert KEY_A not in index and KEY_A not in str(index)  # only hashes
    gen = reg.generation()
    reg.check_writable()  # a write transaction that changes nothing
    assert reg.generation() == gen and reg.audit(limit=1000) == reg.audit(limit=1000)
