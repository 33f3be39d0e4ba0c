"""unlearnd.inputs: the three forget forms, kind detection, and what bad input says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unlearnd.inputs import (
    detect_kind,
    load_documents,
    load_qa_jsonl,
    load_subjects,
    read_forget,
    read_retain,
)


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_three_kinds_are_detected_and_read(tmp_path: Path) -> None:
    qa = _jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": "A.", "subject": "S"}])
    docs = _jsonl(tmp_path / "docs.jsonl", [{"text": " Jane Doe was born in Lyon. ",
                                             "title": "Jane"}, {"text": "Second."}])
    subj = _jsonl(tmp_path / "subjects.jsonl", [
        {"subject": "Jane Doe", "aliases": ["J. Doe"], "facts": ["born 1970 in Lyon"]},
        {"subject": "Moshe Ben-David"}])
    text = tmp_path / "chapter.txt"
    text.write_text("Once upon a time.\n\nThe end.\n", encoding="utf-8")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.md").write_text("Bee.", encoding="utf-8")
    (folder / "a.txt").write_text("Ay.", encoding="utf-8")
    (folder / "skip.json").write_text("{}", encoding="utf-8")

    assert [detect_kind(p) for p in (qa, docs, subj, text, folder)] == [
        "qa", "documents", "subjects", "documents", "documents"]
    fs = read_forget(qa)
    assert fs.kind == "qa" and fs.qa[0]["subject"] == "S"  # QA first: rows may carry 'subject'
    fs = read_forget(docs)
    assert [d.text for d in fs.documents] == ["Jane Doe was born in Lyon.", "Second."]
    assert fs.documents[0].title == "Jane" and fs.documents[1].source.endswith(":2")
    fs = read_forget(subj)
    assert fs.subjects[0].aliases == ("J. Doe",) and fs.subjects[0].texts() == [
        "born 1970 in Lyon"]
    assert fs.subjects[1].texts() == [] and len(fs) == 2
    assert [d.text for d in load_documents(text)] == ["Once upon a time.\n\nThe end."]
    assert [d.text for d in load_documents(folder)] == ["Ay.", "Bee."]  # sorted, .txt/.md only
    assert read_retain(docs).kind == "documents" and len(read_retain(None)) == 0


@pytest.mark.parametrize(("content", "message"), [
    (b"", "file is empty"),
    (b"\n  \n", "file is empty"),
    (b"\x00\x01\x02binary", "binary file"),
    (b"\xff\xfe\xfa not utf-8", "not UTF-8"),
    (b'{"question": "q"', "1: not valid JSON"),
    (b'["a list"]\n', "expected a JSON object"),
    (b'{"prompt": "p", "completion": "c"}\n', "cannot tell the kind"),
])
def test_bad_forget_files_name_the_problem(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "forget.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as exc:
        read_forget(path)
    assert str(path) in str(exc.value)


def test_missing_file_and_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        read_forget(tmp_path / "nope.jsonl")
    path = _jsonl(tmp_path / "f.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="kind must be"):
        read_forget(path, kind="books")
    with pytest.raises(ValueError, match="missing 'text'"):  # a QA file read as documents
        read_forget(path, kind="documents")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="has no .txt/.md files"):
        read_forget(empty_dir)
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="document file is empty"):
        load_documents(blank)


@pytest.mark.parametrize(("rows", "message"), [
    ([{"question": "q"}], "2: missing or non-string 'answer'"),
    ([{"question": "q", "answer": 3}], "2: 'answer' must be a string"),
])
def test_bad_qa_rows(tmp_path: Path, rows: list, message: str) -> None:
    path = _jsonl(tmp_path / "qa.jsonl", [{"question": "ok", "answer": "ok"}, *rows])
    with pytest.raises(ValueError, match=message):
        load_qa_jsonl(path)


@pytest.mark.parametrize(("rows", "message"), [
    ([{"text": 5}], "2: 'text' must be a string"),
    ([{"text": "   "}], "2: 'text' is empty"),
    ([{"text": "t", "title": ["x"]}], "2: 'title' must be a string"),
    ([{"body": "t"}], "2: missing 'text'"),
])
def test_bad_document_rows(tmp_path: Path, rows: list, message: str) -> None:
    path = _jsonl(tmp_path / "docs.jsonl", [{"text": "fine"}, *rows])
    with pytest.raises(ValueError, match=message):
        load_documents(path)


@pytest.mark.parametrize(("rows", "message"), [
    ([{"subject": "Jane Doe"}, {"subject": "jane  DOE"}], "2: duplicate subject 'jane  DOE': "
                                                          "line 1 already names 'Jane Doe'"),
    ([{"subject": "Jane Doe"}, {"subject": "John Roe", "aliases": ["Jané Doe"]}],
     "duplicate subject 'Jané Doe'"),
    ([{"subject": "Jane Doe", "aliases": ["Jane Doe"]}], "1: duplicate subject"),
    ([{"subject": "Jane Doe", "alias": ["JD"]}], r"unknown keys \['alias'\]"),
    ([{"subject": ""}], "'subject' must be a non-empty string"),
    ([{"subject": "X Y", "aliases": "XY"}], "'aliases' must be a list of non-empty strings"),
    ([{"subject": "X Y", "facts": ["ok", ""]}], "'facts' must be a list of non-empty strings"),
    ([{"subject": "X Y", "description": 7}], "'description' must be a string"),
])
def test_bad_subject_rows(tmp_path: Path, rows: list, message: str) -> None:
    path = _jsonl(tmp_path / "subjects.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        load_subjects(path)


def test_subjects_are_not_a_retain_set(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "s.jsonl", [{"subject": "Jane Doe"}])
    with pytest.raises(ValueError, match="retain set is QA or documents"):
        read_retain(path)
