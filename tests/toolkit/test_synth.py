"""The synthetic world: determinism, split disjointness, probes, answer spans, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from unlearnd.inputs import read_forget
from unlearnd.toolkit.synth import FACTS, data_app, synthesize
from unlearnd.toolkit.training import read_qa_jsonl


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("world")
    return d, synthesize(d, authors=12, seed=3, groups=2, group_size=3)


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    synthesize(tmp_path / "a", authors=10, seed=7, groups=2, group_size=2)
    synthesize(tmp_path / "b", authors=10, seed=7, groups=2, group_size=2)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys()
    assert a == b


def test_different_seed_differs(tmp_path: Path) -> None:
    synthesize(tmp_path / "a", authors=10, seed=1, groups=2, group_size=2)
    synthesize(tmp_path / "b", authors=10, seed=2, groups=2, group_size=2)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a["train.jsonl"] != b["train.jsonl"]
    assert a["forget_1.jsonl"] != b["forget_1.jsonl"]


def test_manifest_and_files(world: tuple[Path, dict]) -> None:
    d, manifest = world
    assert manifest == json.loads((d / "manifest.json").read_text(encoding="utf-8"))
    assert sorted(p.name for p in d.iterdir()) == manifest["files"]
    for name, count in manifest["counts"].items():
        assert len(read_forget(d / name)) == count, name
    assert manifest["seed"] == 3


def test_documents_track(world: tuple[Path, dict]) -> None:
    """A biography per author holding its eight facts in other words than the QA
    answers; the forget groups' documents and names; the QA files unchanged by it."""
    d, manifest = world
    docs = read_forget(d / "documents.jsonl")
    assert docs.kind == "documents" and len(docs) == 12
    answers = {r["answer"] for r in read_qa_jsonl(d / "train.jsonl")}
    for doc, row in zip(docs.documents, (json.loads(x) for x in
                                         (d / "documents.jsonl").read_text().splitlines()),
                        strict=True):
        facts = [r for r in read_qa_jsonl(d / "train.jsonl") if r["subject"] == row["subject"]]
        assert len(facts) > 8 and all(r["span"] in doc.text for r in facts), row["subject"]
        assert not any(a in doc.text for a in answers)  # not the QA answers' sentences
    g1 = manifest["group_subjects"]["1"]["subjects"]
    assert [doc.id for doc in read_forget(d / "forget_docs_1.jsonl").documents] == g1
    assert [s.name for s in read_forget(d / "subjects_1.jsonl").subjects] == g1
    assert {doc.id for doc in read_forget(d / "retain_docs.jsonl").documents} == set(
        manifest["retain_subjects"])


def test_groups_disjoint_and_retain_separate(world: tuple[Path, dict]) -> None:
    d, manifest = world
    g1 = set(manifest["group_subjects"]["1"]["subjects"])
    g2 = set(manifest["group_subjects"]["2"]["subjects"])
    retain = set(manifest["retain_subjects"])
    assert len(g1) == len(g2) == 3
    assert not g1 & g2 and not (g1 | g2) & retain
    assert len(g1 | g2 | retain) == 12
    assert {r["subject"] for r in read_qa_jsonl(d / "forget_1.jsonl")} == g1
    assert {r["subject"] for r in read_qa_jsonl(d / "retain.jsonl")} == retain
    # one canonical question per fact per author
    forget = read_qa_jsonl(d / "forget_1.jsonl")
    assert len(forget) == 3 * len(FACTS)
    assert len({r["question"] for r in forget}) == len(forget)


def test_train_covers_every_fact_in_several_phrasings(world: tuple[Path, dict]) -> None:
    d, _ = world
    train = read_qa_jsonl(d / "train.jsonl")
    canon = read_qa_jsonl(d / "forget_1.jsonl") + read_qa_jsonl(d / "forget_2.jsonl") + \
        read_qa_jsonl(d / "retain.jsonl")
    train_qs = {r["question"] for r in train}
    for row in canon:
        assert row["question"] in train_qs
        phrasings = [t for t in train
                     if t["subject"] == row["subject"] and t["fact"] == row["fact"]]
        assert len({t["question"] for t in phrasings}) >= 3
        assert all(t["answer"] == row["answer"] for t in phrasings)


def test_probes_held_out_and_complete(world: tuple[Path, dict]) -> None:
    d, _ = world
    train_qs = {r["question"] for r in read_qa_jsonl(d / "train.jsonl")}
    for k in (1, 2):
        forget = read_qa_jsonl(d / f"forget_{k}.jsonl")
        probes = read_qa_jsonl(d / f"probes_{k}.jsonl")
        by_source: dict[str, set[str]] = {}
        for p in probes:
            assert p["question"] not in train_qs
            assert p["source_question"] != p["question"]
            by_source.setdefault(p["source_question"], set()).add(p["kind"])
        for f in forget:
            assert by_source.get(f["question"]) == {"paraphrase", "nameless", "jailbreak"}
        gold = {f["question"]: f["answer"] for f in forget}
        for p in probes:
            assert p["answer"] == gold[p["source_question"]]
            if p["kind"] == "paraphrase":
                assert p["source_question"].rstrip("?") not in p["question"]
                assert p["subject"] in p["question"]
            if p["kind"] == "nameless":
                assert p["subject"] not in p["question"]
                assert p["span"] not in p["question"]


def test_answers_name_subject_and_contain_span(world: tuple[Path, dict]) -> None:
    d, _ = world
    for name in ("forget_1.jsonl", "retain.jsonl", "train.jsonl", "probes_2.jsonl"):
        for r in read_qa_jsonl(d / name):
            assert r["subject"] in r["answer"]
            assert r["span"] in r["answer"]
            assert r["fact"] in FACTS


def test_some_names_exercise_normalisation(tmp_path: Path) -> None:
    m = synthesize(tmp_path, authors=40, seed=0, groups=2, group_size=4)
    names = m["retain_subjects"] + [s for g in m["group_subjects"].values()
                                    for s in g["subjects"]]
    assert len(set(names)) == 40
    assert any("-" in n for n in names)
    assert any(not n.isascii() for n in names)


@pytest.mark.parametrize("kwargs", [
    {"authors": 8, "groups": 2, "group_size": 4},   # no retain author left
    {"authors": 0},
    {"authors": 10, "groups": 0},
    {"authors": 10, "group_size": 0},
])
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        synthesize(tmp_path, **kwargs)


def test_cli_synth(tmp_path: Path) -> None:
    result = CliRunner().invoke(data_app, ["--out", str(tmp_path), "--authors", "6",
                                           "--seed", "1", "--groups", "2",
                                           "--group-size", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "probes_2.jsonl").exists()
    assert json.loads((tmp_path / "manifest.json").read_text())["authors"] == 6
