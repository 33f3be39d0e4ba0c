"""The demo's wiring that needs no engine: tenants, their input files, the reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from unlearnd.inputs import read_forget
from unlearnd.toolkit import demo
from unlearnd.toolkit.synth import synthesize


def test_every_tenant_input_exists_in_the_synthetic_world(tmp_path: Path) -> None:
    synthesize(tmp_path, authors=8, groups=2, group_size=2)
    kinds = {"forget": "qa", "forget_docs": "documents", "subjects": "subjects"}
    for name, (_, group, _assistant, stem, retain) in demo.POLICIES.items():
        assert read_forget(tmp_path / f"{stem}_{group}.jsonl").kind == kinds[stem], name
        assert (tmp_path / retain).is_file(), name
    for name, (_, group, stem) in demo.ADAPTERS.items():
        assert (tmp_path / f"{stem}_{group}.jsonl").is_file(), name
    # user data (TOFU) has no documents: those tenants are not offered there
    assert not any(t.documents for t in demo.USER_DATA_TENANTS)
    assert {t.name for t in demo.TENANTS if t.documents} == {"wayne", "stark"}


def test_distance_to_reference() -> None:
    ref = {"leak_rate": 0.0, "probe_leak_rate": 0.1, "retain_accuracy": 1.0,
           "over_refusal": 0.0, "verbmem_forget": 0.3, "verbmem_retain": 1.0}
    assert demo.distance_to_reference(dict(ref), ref) == 0.0
    tenant = {**ref, "leak_rate": 0.6, "verbmem_forget": None}  # None: not compared
    assert demo.distance_to_reference(tenant, ref) == pytest.approx(0.6 / 5)
    assert demo.distance_to_reference({"n": 3}, ref) is None


def test_cached_step_rebuilds_from_an_empty_directory(tmp_path: Path) -> None:
    """Same params: the step is skipped. New params: the directory is emptied first, so
    an older build's files (a merged assistant's weights beside the LoRA a new build
    saves) are not hashed and copied into every policy."""
    out = tmp_path / "step"
    calls = []

    def build(name: str) -> None:
        out.mkdir(exist_ok=True)
        (out / name).write_text("x")
        calls.append(name)

    demo._cached(out, {"v": 1}, lambda: build("model.safetensors"))
    demo._cached(out, {"v": 1}, lambda: build("again"))
    assert calls == ["model.safetensors"]
    demo._cached(out, {"v": 2}, lambda: build("adapter_model.safetensors"))
    assert sorted(p.name for p in out.iterdir()) == [".unlearnd-step.json",
                                                    "adapter_model.safetensors"]
