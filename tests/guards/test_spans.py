"""Tests for unlearnd.guards.spans: normalisation, distinctive spans, ROUGE-L."""

from __future__ import annotations

import pytest

from unlearnd.guards.spans import (
    contains_span,
    distinctive_spans,
    lcs_length,
    normalize,
    rouge_l_recall,
    words,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hsiao Yun-Hwa's Père, 3/3/1962!", "hsiao yun hwa pere 3 3 1962"),
        ("  Zoë   Ångström’s   BOOK  ", "zoe angstrom book"),
        ("LGBTQ+ community.", "lgbtq community"),
        ("", ""),
        ("...!?", ""),
        ("Born in São Paulo\nin 1970", "born in sao paulo in 1970"),
    ],
)
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


def test_normalize_rejects_non_str() -> None:
    with pytest.raises(ValueError, match="123"):
        normalize(123)  # type: ignore[arg-type]


def test_words() -> None:
    assert words("The author's  full-name.") == ["the", "author", "full", "name"]
    assert words("  ") == []


def test_spans_brief_examples() -> None:
    assert distinctive_spans(
        "The father of Hsiao Yun-Hwa is a civil engineer.",
        "What is the profession of Hsiao Yun-Hwa's father?",
    ) == ["civil engineer"]
    assert distinctive_spans(
        "Aiko Tanaka was born on 3 March 1962.", "When was Aiko Tanaka born?"
    ) == ["3 march 1962"]


def test_spans_month_that_is_a_stopword() -> None:
    # "may" is a stopword, but next to a number it is part of the date
    assert distinctive_spans(
        "Aiko Tanaka was born on 3 May 1962.", "When was Aiko Tanaka born?"
    ) == ["3 may 1962"]


def test_spans_name_is_the_fact_when_question_does_not_name() -> None:
    spans = distinctive_spans(
        "The author's full name is Hsiao Yun-Hwa.",
        "What is the full name of the author born in Taipei, Taiwan on 05/11/1991?",
    )
    assert spans == ["hsiao yun hwa"]


def test_spans_bridge_word_joins_title() -> None:
    spans = distinctive_spans(
        "Her best-known novel is The Tides of Memory.", "What is Ana Ruiz's best-known novel?"
    )
    assert spans == ["tides of memory"]


def test_spans_background_drops_frequent_words() -> None:
    answer = "Mira Dobrev writes gothic fiction."
    question = "What genre does Mira Dobrev write?"
    assert distinctive_spans(answer, question) == ["gothic fiction"]
    background = [
        f"Author {i} writes {g} fiction."
        for i, g in enumerate(["crime", "horror", "poetry", "sci", "war"] * 2)
    ]
    assert distinctive_spans(answer, question, background) == ["gothic"]


def test_spans_none_when_answer_only_echoes_question() -> None:
    assert distinctive_spans("Yes, she is an author.", "Is she an author?") == []


def test_spans_max_and_determinism() -> None:
    answer = (
        "Her books include Red Harbor, Silent Orchard, Glass Tundra, Copper Psalm, Ivory Lantern."
    )
    question = "Which books did Lena Moor write?"
    spans = distinctive_spans(answer, question, max_spans=3)
    assert len(spans) == 3
    assert spans == distinctive_spans(answer, question, max_spans=3)
    # answer order is kept among the kept spans
    positions = [normalize(answer).index(s) for s in spans]
    assert positions == sorted(positions)


def test_spans_long_answer_prefers_strong_spans() -> None:
    answer = (
        "Hsiao Yun-Hwa strongly utilizes the lessons from her father, a civil engineer, in her "
        "leadership books, providing practical examples that readers can put into action quickly."
    )
    spans = distinctive_spans(answer, "How did Hsiao Yun-Hwa's father influence her books?")
    assert "civil engineer" in spans
    assert "strongly" not in spans and "action" not in spans


@pytest.mark.parametrize(
    ("bad", "kwargs"), [("0", {"max_spans": 0}), ("1.5", {"background_fraction": 1.5})]
)
def test_spans_validation(bad: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=bad):
        distinctive_spans("a b c", **kwargs)


def test_contains_span_word_boundaries() -> None:
    assert contains_span("He is a Civil-Engineer.", "civil engineer")
    assert not contains_span("uncivil engineers", "civil engineer")
    assert not contains_span("anything", "")


def test_lcs_and_rouge() -> None:
    assert lcs_length(["a", "b", "c", "d"], ["a", "c", "d", "x"]) == 3
    assert lcs_length([], ["a"]) == 0
    assert rouge_l_recall("the cat sat on the mat", "the cat sat") == 1.0
    assert rouge_l_recall("sat the cat", "the cat sat") == pytest.approx(2 / 3)
    assert rouge_l_recall("anything", "") == 0.0
    assert rouge_l_recall("", "the cat") == 0.0
