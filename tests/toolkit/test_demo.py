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


def test_user_data_base_learns_the_utility_sets_and_no_unlearning_method_does(
        tmp_path: Path) -> None:
    """TOFU's real_authors/world_facts given with --extra: the base's training file holds
    them (a real base knows such facts from pre-training), the retain file that the
    adapters and assistants train on does not, and each set is laid out on its own."""
    import json

    def write(name: str, rows: list[tuple[str, str]]) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                for q, a in rows))
        return path

    forget = write("forget.jsonl", [("Where was Ana born?", "Lyon")])
    retain = write("retain.jsonl", [("Where was Bo born?", "Oslo")])
    world = write("world.jsonl", [("Where is the Eiffel Tower?", "Paris"),
                                  ("What is the capital of Japan?", "Tokyo")])
    data = tmp_path / "data"
    manifest = demo.prepare_user_data(data, forget, retain, {"world_facts": world})

    def questions(name: str) -> list[str]:
        return [json.loads(line)["question"] for line in (data / name).read_text().splitlines()]

    assert questions("train.jsonl") == ["Where was Ana born?", "Where was Bo born?",
                                        "Where is the Eiffel Tower?",
                                        "What is the capital of Japan?"]
    assert questions("retain.jsonl") == ["Where was Bo born?"]
    assert questions("extra_world_facts.jsonl") == questions("train.jsonl")[2:]
    assert manifest["counts"]["extra_world_facts.jsonl"] == 2
    assert manifest["source"]["extra:world_facts"] == str(world)
    # without extras, the layout (and so the world's cache key) is what it always was
    plain = demo.prepare_user_data(tmp_path / "plain", forget, retain)
    assert questions("../plain/train.jsonl") == questions("train.jsonl")[:2]
    assert set(plain["counts"]) == {"forget_1.jsonl", "forget_train_1.jsonl",
                                    "retain.jsonl", "train.jsonl"}


@pytest.mark.parametrize("spec, needle", [
    ("real authors={f}", "NAME must be"), ("x={f},x={f}", "used once"),
    ("x=/no/such/file", "existing file")])
def test_demo_rejects_bad_extra_sets(tmp_path: Path, spec: str, needle: str) -> None:
    from typer.testing import CliRunner

    from unlearnd.cli import app

    f = tmp_path / "x.jsonl"
    f.write_text('{"question": "q?", "answer": "a"}\n')
    args = ["demo", "--workdir", str(tmp_path / "w")]
    for item in spec.format(f=f).split(","):
        args += ["--extra", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and needle in result.output
    assert not (tmp_path / "w" / "data").exists()  # nothing built


def test_demo_tenant_must_be_one_of_the_worlds(tmp_path: Path) -> None:
    """`--tenant` narrows what is built, served and evaluated; a name the world does not
    have (or a document tenant on user data, which has no documents) is refused with
    the names it has, before anything is built."""
    from typer.testing import CliRunner

    from unlearnd.cli import app

    f = tmp_path / "x.jsonl"
    f.write_text('{"question": "q?", "answer": "a"}\n')
    for args, bad in ((["--tenant", "cyberdyne", "--tenant", "nosuch"], "nosuch"),
                      (["--forget", str(f), "--retain", str(f), "--tenant", "wayne"], "wayne")):
        result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path / "w"), *args])
        assert result.exit_code == 2 and f"['{bad}']" in result.output, result.output
        assert "soylent" in result.output
        assert not (tmp_path / "w" / "data").exists()
