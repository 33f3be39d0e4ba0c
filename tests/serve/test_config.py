"""Server config validation and config-as-code (unlearnd.serve.config, app.apply_config_tenants)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from pydantic import ValidationError

from tests.serve.fakes import (
    KEYS,
    FakeEngine,
    fake_load_guards,
    fresh_metrics,
    make_config,
    make_policy_dir,
    running_app,
    tiny_world,
)
from unlearnd.serve.app import apply_config_tenants, build_app
from unlearnd.serve.artifacts import BaseModelSpec
from unlearnd.serve.config import EngineConfig, ServerConfig, TenantConfig
from unlearnd.serve.edge import POLICY_HEADER
from unlearnd.serve.registry import SQLiteRegistry

HELLO = {"messages": [{"role": "user", "content": "hello"}]}


def base() -> str:
    return str(tiny_world()["base"])


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("name", ["Acme", "acme corp", "-acme", "a" * 64, "", "acme!"])
def test_bad_tenant_name_is_named(name: str) -> None:
    with pytest.raises(ValidationError) as info:
        ServerConfig(model=base(), tenants=[{"name": name, "api_key": "k" * 20}])
    err = info.value.errors()[0]
    assert err["loc"] == ("tenants", 0, "name") and err["input"] == name
    if len(name) < 20:
        assert repr(name) in str(info.value)


def test_good_tenant_names() -> None:
    cfg = ServerConfig(model=base(), tenants=[{"name": n, "api_key": f"k-{n}" * 8}
                                              for n in ("acme", "a", "0x_y-z", "b" * 63)])
    assert [t.name for t in cfg.tenants][-1] == "b" * 63


def test_duplicate_tenants_are_named() -> None:
    with pytest.raises(ValidationError, match=r"duplicate tenant names: \['acme'\]"):
        ServerConfig(model=base(), tenants=[{"name": "acme", "api_key": "k" * 20},
                                            {"name": "globex", "api_key": "g" * 20},
                                            {"name": "acme", "api_key": "j" * 20}])


def test_missing_model_dir_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValidationError, match=f"model directory {missing} has no config.json"):
        ServerConfig(model=missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValidationError, match="empty has no config.json"):
        ServerConfig(model=tmp_path / "empty")


def test_model_path_is_resolved_and_names_the_model() -> None:
    cfg = ServerConfig(model=base())
    assert cfg.model.is_absolute() and cfg.model_name == Path(base()).name
    assert ServerConfig(model=base(), served_model_name="m").model_name == "m"


def test_max_cpu_loras_below_max_loras_is_named() -> None:
    with pytest.raises(ValidationError, match=r"max_cpu_loras \(2\) must be >= max_loras \(3\)"):
        EngineConfig(max_loras=3, max_cpu_loras=2)
    assert EngineConfig(max_loras=3, max_cpu_loras=3).max_cpu_loras == 3


@pytest.mark.parametrize("field,value", [("max_loras", 0), ("max_lora_rank", 513),
                                         ("max_model_len", 8), ("gpu_memory_utilization", 0)])
def test_engine_ranges(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        EngineConfig(**{field: value})


def test_unknown_keys_are_rejected() -> None:
    with pytest.raises(ValidationError, match="tenats"):
        ServerConfig(model=base(), tenats=[])
    with pytest.raises(ValidationError, match="max_lora"):
        ServerConfig(model=base(), engine={"max_lora": 2})


def test_api_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    t = TenantConfig(name="acme", api_key_env="UNLEARND_TEST_ACME_KEY")
    monkeypatch.delenv("UNLEARND_TEST_ACME_KEY", raising=False)
    with pytest.raises(ValueError, match="'acme'.*UNLEARND_TEST_ACME_KEY is not set"):
        t.resolve_key()
    monkeypatch.setenv("UNLEARND_TEST_ACME_KEY", "from-env-0123456789")
    assert t.resolve_key() == "from-env-0123456789"
    assert TenantConfig(name="acme", api_key="lit" * 6, api_key_env="X").resolve_key() == \
        "lit" * 6
    with pytest.raises(ValueError, match="'acme': needs api_key or api_key_env"):
        TenantConfig(name="acme").resolve_key()


def test_unset_key_env_stops_the_server_before_the_engine(tmp_path: Path,
                                                          monkeypatch) -> None:
    monkeypatch.delenv("UNLEARND_TEST_UNSET", raising=False)
    config = make_config(tmp_path / "state", tenants=[
        {"name": "acme", "api_key_env": "UNLEARND_TEST_UNSET"}])
    engine = FakeEngine()
    started = []
    app = build_app(config, engine_factory=lambda c: started.append(c) or engine,
                    metrics=fresh_metrics())
    with pytest.raises(ValueError, match="UNLEARND_TEST_UNSET"), TestClient(app):
        pass
    assert started == []


def test_admin_key_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNLEARND_TEST_ADMIN_KEY", "env-admin")
    assert ServerConfig(model=base(), admin_key="lit",
                        admin_key_env="UNLEARND_TEST_ADMIN_KEY").resolve_admin_key() == "lit"
    assert ServerConfig(model=base(), admin_key_env="UNLEARND_TEST_ADMIN_KEY"
                        ).resolve_admin_key() == "env-admin"
    monkeypatch.setenv("UNLEARND_TEST_ADMIN_KEY", "")
    assert ServerConfig(model=base(), admin_key_env="UNLEARND_TEST_ADMIN_KEY"
                        ).resolve_admin_key() is None
    assert ServerConfig(model=base(), admin_key_env=None).resolve_admin_key() is None


# ---------------------------------------------------------------- YAML


def test_from_yaml_resolves_relative_paths(tmp_path: Path) -> None:
    root = tmp_path / "deploy"
    shutil.copytree(tiny_world()["base"], root / "models" / "base")
    (root / "config.yaml").write_text(yaml.safe_dump({
        "model": "models/base", "state_dir": "state",
        "engine": {"max_loras": 2, "max_cpu_loras": 4},
        "tenants": [{"name": "acme", "api_key": "k" * 20, "adapter": "adapters/a",
                     "policy": "/abs/policy"}]}))
    cfg = ServerConfig.from_yaml(root / "config.yaml", port=9001, host=None)
    assert cfg.model == (root / "models" / "base").resolve()
    assert cfg.state_dir == root / "state"
    assert cfg.tenants[0].adapter == root / "adapters" / "a"
    assert cfg.tenants[0].policy == Path("/abs/policy")
    assert cfg.port == 9001 and cfg.host == "127.0.0.1"  # None overrides are ignored
    assert cfg.engine.max_loras == 2


def test_from_yaml_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nope.yaml not found"):
        ServerConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ValueError, match="bad.yaml is not valid YAML"):
        ServerConfig.from_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="list.yaml must hold a mapping"):
        ServerConfig.from_yaml(listy)


# ---------------------------------------------------------------- config as code


def _registry(state: Path) -> SQLiteRegistry:
    return SQLiteRegistry(state, base=BaseModelSpec.from_model_dir(base()), max_lora_rank=16)


def _cfg(state: Path, tenants: list[dict]) -> ServerConfig:
    return ServerConfig(model=base(), state_dir=state, tenants=tenants)


def test_declared_version_activated_on_first_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cfg = _cfg(state, [{"name": "acme", "api_key": KEYS["acme"],
                        "adapter": str(tiny_world()["a1"])},
                       {"name": "globex", "api_key": KEYS["globex"]}])
    reg = _registry(state)
    apply_config_tenants(cfg, reg)
    active = reg.active_version("acme")
    assert active is not None and active.adapter_dir is not None
    assert reg.tenant_for_key(KEYS["acme"]).name == "acme"
    assert reg.active_version("globex") is None
    actions = {(e.actor, e.action) for e in reg.audit(tenant="acme")}
    assert {("config", "create_tenant"), ("config", "add_version"),
            ("config", "activate")} <= actions
    assert all(actor == "config" for actor, _ in actions)
    apply_config_tenants(cfg, reg)  # idempotent
    assert [v.name for v in reg.list_versions("acme")] == [active.name]
    reg.close()


def test_admin_swap_survives_restart_with_unchanged_config(tmp_path: Path) -> None:
    state = tmp_path / "state"
    declared = make_policy_dir(tmp_path / "declared", trigger="A")
    cfg = _cfg(state, [{"name": "acme", "api_key": KEYS["acme"], "policy": str(declared)}])
    reg = _registry(state)
    apply_config_tenants(cfg, reg)
    v1 = reg.active_version("acme").name
    v2 = reg.add_version("acme", adapter=None, policy=make_policy_dir(tmp_path / "admin",
                                                                        trigger="B"),
                         actor="admin")
    reg.activate("acme", v2.name, actor="admin")
    reg.close()
    reg = _registry(state)  # restart
    apply_config_tenants(cfg, reg)
    assert reg.active_version("acme").name == v2.name != v1
    reg.close()


def test_changed_config_content_activates_new_version(tmp_path: Path) -> None:
    state = tmp_path / "state"
    declared = make_policy_dir(tmp_path / "declared", trigger="A")
    cfg = _cfg(state, [{"name": "acme", "api_key": KEYS["acme"], "policy": str(declared)}])
    reg = _registry(state)
    apply_config_tenants(cfg, reg)
    v1 = reg.active_version("acme").name
    make_policy_dir(declared, trigger="B")  # the file behind the same path changed
    reg.close()
    reg = _registry(state)
    apply_config_tenants(cfg, reg)
    v2 = reg.active_version("acme").name
    assert v2 != v1 and {v.name for v in reg.list_versions("acme")} == {v1, v2}
    reg.rollback("acme", actor="admin")  # the old one is still there to roll back to
    assert reg.active_version("acme").name == v1
    reg.close()


def test_config_key_change_rotates_the_key(tmp_path: Path) -> None:
    state = tmp_path / "state"
    reg = _registry(state)
    apply_config_tenants(_cfg(state, [{"name": "acme", "api_key": KEYS["acme"]}]), reg)
    new_key = "sk-acme-rotated-0123456789"
    apply_config_tenants(_cfg(state, [{"name": "acme", "api_key": new_key}]), reg)
    assert reg.tenant_for_key(KEYS["acme"]) is None
    assert reg.tenant_for_key(new_key).name == "acme"
    reg.close()


def test_config_as_code_through_app_restarts(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("unlearnd.serve.tenancy.load_guards", fake_load_guards)
    declared = make_policy_dir(tmp_path / "declared", trigger="A")
    tenants = [{"name": "acme", "api_key": KEYS["acme"], "policy": str(declared)},
               {"name": "globex", "api_key": KEYS["globex"]}]
    config = make_config(tmp_path / "state", tenants=tenants)

    def served(app) -> str:
        r = app.client.post("/v1/chat/completions", json=HELLO, headers=app.auth("acme"))
        assert r.status_code == 200, r.text
        return r.headers[POLICY_HEADER]

    with running_app(config) as app:
        v1 = served(app)
        assert v1.startswith("acme@")
        r = app.client.post("/admin/tenants/acme/versions", headers=app.admin, json={
            "policy": str(make_policy_dir(tmp_path / "admin", trigger="B")), "activate": True})
        v2 = r.json()["name"]
        assert served(app) == v2
    with running_app(config) as app:  # restart, config unchanged: the admin swap stays
        assert served(app) == v2
    make_policy_dir(declared, trigger="C")
    with running_app(config) as app:  # restart, declared content changed: it wins
        v3 = served(app)
        assert v3 not in (v1, v2) and v3.startswith("acme@")
        assert app.state.router.active_versions() == {"acme": v3, "globex": None}
