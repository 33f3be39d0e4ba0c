"""What users bring: forget and retain sets in the three forms a forget request takes.

A forget request arrives as one of

- **QA** (TOFU's format): JSONL, one ``{"question": str, "answer": str, ...}`` per line;
  extra keys are kept (``subject``, ``kind``...).
- **documents** (MUSE's setting: a book chapter, news articles): a UTF-8 text file
  (``.txt``/``.md``: the file is one document), a directory of them (sorted by name),
  or JSONL with ``{"text": str, "id"?: str, "title"?: str}`` per line.
- **subjects** (an erasure request, a topic): JSONL with ``{"subject": str,
  "aliases"?: [str], "description"?: str, "facts"?: [str]}`` per line; other keys are
  an error (a misspelt ``alias`` must not silently drop what it names).

:func:`read_forget` reads any of them into a :class:`ForgetSet` (the kind is detected
from the file, or given); :func:`read_retain` reads a retain set (QA or documents) into
one. ``unlearnd policy compile``, ``train-adapter``, ``train-assistant`` and
``unlearnd eval`` all take these. Every reader fails with a ValueError that names the
file (and the 1-based line) and what is wrong, before anything is written anywhere:
a missing, empty or binary file, invalid JSON, wrong or missing keys, wrong types,
empty text, duplicate subjects (the same name or alias twice).
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "KINDS",
    "Document",
    "Subject",
    "ForgetSet",
    "load_qa_jsonl",
    "load_documents",
    "load_subjects",
    "detect_kind",
    "read_forget",
    "read_retain",
    "read_retain_sets",
    "check_cli_inputs",
]

KINDS = ("qa", "documents", "subjects")
"""The forms of a forget set (``auto`` detects one of them)."""

TEXT_SUFFIXES = (".txt", ".md")
"""Files read as one document each (a directory: every such file in it)."""

SUBJECT_KEYS = frozenset({"subject", "aliases", "description", "facts"})


@dataclass(frozen=True)
class Document:
    """One text to forget (or to keep): ``source`` is ``path`` or ``path:line``."""

    text: str
    source: str
    title: str | None = None
    id: str | None = None


@dataclass(frozen=True)
class Subject:
    """A person or topic to forget, with the other names it goes by and what is known."""

    name: str
    source: str
    aliases: tuple[str, ...] = ()
    description: str = ""
    facts: tuple[str, ...] = ()

    def texts(self) -> list[str]:
        """The description and the facts, the text a policy can find spans in."""
        return [t for t in (self.description, *self.facts) if t.strip()]


@dataclass
class ForgetSet:
    """A forget (or retain) set in one of :data:`KINDS`; only that kind's list is filled."""

    kind: str
    source: str
    qa: list[dict] = field(default_factory=list)
    documents: list[Document] = field(default_factory=list)
    subjects: list[Subject] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.qa) + len(self.documents) + len(self.subjects)

    def texts(self) -> list[str]:
        """Plain texts of the set: answers, documents, subjects' descriptions and facts."""
        if self.kind == "qa":
            return [r["answer"] for r in self.qa]
        if self.kind == "documents":
            return [d.text for d in self.documents]
        return [t for s in self.subjects for t in s.texts()]


# --------------------------------------------------------------------------- reading


def _read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``; ValueError for a missing, unreadable or binary file."""
    if not path.is_file():
        raise ValueError(f"{what} file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} file {path}: {exc}") from exc
    if b"\x00" in raw:
        raise ValueError(f"{path}: binary file (NUL bytes), expected UTF-8 text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    # universal newlines, as read_text would
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _jsonl(path: Path, what: str) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) per non-blank line of a JSONL file."""
    text = _read_text(path, what)
    n = 0
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other separators
    # that splitlines() would cut at.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got "
                             f"{type(row).__name__}")
        n += 1
        yield lineno, row
    if n == 0:
        raise ValueError(f"{what} file is empty: {path}")


def load_qa_jsonl(path: str | Path) -> list[dict]:
    """Rows of a QA JSONL file: one object with str ``question`` and ``answer`` per line.

    The one QA reader of the package. Blank lines are skipped; extra keys are kept.
    Raises ValueError naming the file when it is missing, unreadable, binary or has no
    rows, or the file and 1-based line number of the first bad line (invalid JSON, not
    an object, missing or non-string ``question``/``answer``).
    """
    path = Path(path)
    rows: list[dict] = []
    for lineno, row in _jsonl(path, "QA"):
        for key in ("question", "answer"):
            if key not in row:
                raise ValueError(f"{path}:{lineno}: missing or non-string {key!r}: expected "
                                 "{'question': str, 'answer': str, ...}")
            if not isinstance(row[key], str):
                raise ValueError(f"{path}:{lineno}: {key!r} must be a string, got "
                                 f"{row[key]!r}")
        rows.append(row)
    return rows


def _text_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"documents directory {path} has no {'/'.join(TEXT_SUFFIXES)} files")
    return files


def load_documents(path: str | Path) -> list[Document]:
    """Documents from a text file, a directory of text files, or JSONL with ``text``.

    JSONL rows: ``text`` (non-empty str), optional ``id`` and ``title`` (str); other
    keys are kept out of the model but allowed. A text file (or each file of a
    directory) is one document and must not be empty.
    """
    path = Path(path)
    if path.is_dir():
        return [doc for f in _text_files(path) for doc in load_documents(f)]
    if path.suffix in TEXT_SUFFIXES:
        text = _read_text(path, "document")
        if not text.strip():
            raise ValueError(f"document file is empty: {path}")
        return [Document(text=text.strip(), source=str(path), title=path.stem)]
    docs: list[Document] = []
    for lineno, row in _jsonl(path, "documents"):
        where = f"{path}:{lineno}"
        if "text" not in row:
            raise ValueError(f"{where}: missing 'text': expected {{'text': str, 'id'?: str, "
                             f"'title'?: str}}, got keys {sorted(row)}")
        text = row["text"]
        if not isinstance(text, str):
            raise ValueError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{where}: 'text' is empty")
        for key in ("id", "title"):
            if key in row and not isinstance(row[key], str):
                raise ValueError(f"{where}: {key!r} must be a string, got {row[key]!r}")
        docs.append(Document(text=text.strip(), source=where, title=row.get("title"),
                             id=row.get("id")))
    return docs


def _fold(name: str) -> str:
    """Case-, accent- and spacing-folded form of a name (duplicate detection)."""
    text = unicodedata.normalize("NFKD", name)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return " ".join(text.casefold().replace("-", " ").split())


def load_subjects(path: str | Path) -> list[Subject]:
    """Subjects from JSONL: ``subject`` (str), optional ``aliases`` ([str]),
    ``description`` (str), ``facts`` ([str]). Unknown keys, wrong types, empty names and
    a name or alias given twice (in one row or across rows, case/accent/spacing folded)
    are errors naming both lines."""
    path = Path(path)
    out: list[Subject] = []
    owner: dict[str, tuple[int, str]] = {}
    for lineno, row in _jsonl(path, "subjects"):
        where = f"{path}:{lineno}"
        extra = sorted(set(row) - SUBJECT_KEYS)
        if extra:
            raise ValueError(f"{where}: unknown keys {extra}; a subject row has "
                             f"{sorted(SUBJECT_KEYS)}")
        name = row.get("subject")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: 'subject' must be a non-empty string, got {name!r}")
        lists: dict[str, tuple[str, ...]] = {}
        for key in ("aliases", "facts"):
            value = row.get(key, [])
            if not isinstance(value, list) or not all(
                    isinstance(v, str) and v.strip() for v in value):
                raise ValueError(f"{where}: {key!r} must be a list of non-empty strings, "
                                 f"got {value!r}")
            lists[key] = tuple(v.strip() for v in value)
        description = row.get("description", "")
        if not isinstance(description, str):
            raise ValueError(f"{where}: 'description' must be a string, got {description!r}")
        for form in (name.strip(), *lists["aliases"]):
            key = _fold(form)
            if key in owner:
                first_line, first = owner[key]
                raise ValueError(f"{where}: duplicate subject {form!r}: line {first_line} "
                                 f"already names {first!r}")
            owner[key] = (lineno, form)
        out.append(Subject(name=name.strip(), source=where, aliases=lists["aliases"],
                           description=description.strip(), facts=lists["facts"]))
    return out


def detect_kind(path: str | Path) -> str:
    """The kind of a forget file: a directory or text file holds documents; JSONL is
    told by its first object's keys (``question`` QA, ``text`` documents, ``subject``
    subjects; QA first, since QA rows may carry a ``subject`` key)."""
    path = Path(path)
    if path.is_dir() or path.suffix in TEXT_SUFFIXES:
        return "documents"
    for lineno, row in _jsonl(path, "forget"):
        if "question" in row or "answer" in row:
            return "qa"
        if "text" in row:
            return "documents"
        if "subject" in row:
            return "subjects"
        raise ValueError(f"{path}:{lineno}: cannot tell the kind of this file from keys "
                         f"{sorted(row)}: expected 'question'/'answer' (QA), 'text' "
                         "(documents) or 'subject' (subjects)")
    raise AssertionError("unreachable: _jsonl raises on an empty file")


def read_forget(path: str | Path, kind: str = "auto") -> ForgetSet:
    """Read a forget set of ``kind`` (one of :data:`KINDS`, or ``auto``)."""
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"kind must be 'auto' or one of {KINDS}, got {kind!r}")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"forget file not found: {path}")
    kind = detect_kind(path) if kind == "auto" else kind
    if kind == "qa":
        return ForgetSet(kind, str(path), qa=load_qa_jsonl(path))
    if kind == "documents":
        return ForgetSet(kind, str(path), documents=load_documents(path))
    return ForgetSet(kind, str(path), subjects=load_subjects(path))


def read_retain(path: str | Path | None) -> ForgetSet:
    """Read a retain set (QA or documents; None: an empty QA set). Subjects are not a
    retain set: what to keep is text the model should still produce."""
    if path is None:
        return ForgetSet("qa", "")
    fs = read_forget(path)
    if fs.kind == "subjects":
        raise ValueError(f"{path}: a retain set is QA or documents, not subjects")
    return fs


def read_retain_sets(paths: str | Path | Sequence[str | Path] | None) -> list[ForgetSet]:
    """One retain set or several (QA and documents together), each read as
    :func:`read_retain` reads it."""
    if paths is None or isinstance(paths, (str, Path)):
        return [read_retain(paths)]
    return [read_retain(p) for p in paths]


def as_background(retain: ForgetSet) -> list[dict[str, Any]]:
    """A retain set as QA-shaped rows (documents become ``{"question": "", "answer":
    text}``): what the policy compiler uses as the distinctiveness background."""
    if retain.kind == "qa":
        return list(retain.qa)
    return [{"question": "", "answer": d.text, "source": d.source} for d in retain.documents]


def check_cli_inputs(forget: str | Path, retain: str | Path | None, kind: str = "auto") -> None:
    """For commands: read the forget and retain sets once before any model loads, and
    turn a bad one into ``error: <what is wrong>`` and exit status 2."""
    import typer

    try:
        read_forget(forget, kind)
        read_retain(retain)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
