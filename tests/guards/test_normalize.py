"""Input folding for the scope guard: disguised names fold to the plain name, real text
in other scripts is left alone, offsets point back at the text as written."""

from __future__ import annotations

import unicodedata

import pytest

from unlearnd.guards.normalize import CONFUSABLES, fold, fold_tokens, squash, unmask, visible
from unlearnd.guards.spans import normalize

NAME = "hsiao yun hwa"


def test_plain_text_folds_like_normalize() -> None:
    for text in ["Hsiao Yun-Hwa's Père, 3/3/1962!", "What is the capital of France?",
                 "  Tabs\tand\nnewlines  ", "Dvořák, Łódź and Gdańsk", "", "...",
                 "Кто написал Войну и мир?", "東京 is in 日本"]:
        assert fold(text) == normalize(text), text


@pytest.mark.parametrize("text", [
    "Hsi\u200bao Yun-Hwa",             # zero-width space
    "Hsi\u200cao Yun\u200d-Hwa",       # zero-width non-joiner / joiner
    "Hs\u2060iao Yun-H\ufeffwa",       # word joiner, BOM
    "Hsi\u00adao Yun-Hw\u00ada",       # soft hyphens
    "Hs\u202eia\u202co Yun-H\u2066wa\u2069",  # bidi override / isolate
    "Hsi\u180eao Yun-Hwa",             # Mongolian vowel separator (Cf)
    "Hs\u034fiao Yun-Hwa\ufe0f",       # combining grapheme joiner, variation selector
    "Hsi\u3164ao Yun-Hwa",             # Hangul filler (renders as nothing)
    "Hsi\U000e0041ao Yun-Hwa",         # tag character
])
def test_invisible_characters_are_deleted_not_split(text: str) -> None:
    assert fold(text) == NAME
    assert normalize(text) != NAME  # what the guard saw before


@pytest.mark.parametrize("text", [
    "Ｈｓｉａｏ Ｙｕｎ－Ｈｗａ",           # fullwidth
    "𝐇𝐬𝐢𝐚𝐨 𝐘𝐮𝐧-𝐇𝐰𝐚",                 # mathematical bold
    "𝐻𝑠𝑖𝑎𝑜 𝑌𝑢𝑛-𝐻𝑤𝑎",                 # mathematical italic
    "𝕳𝖘𝖎𝖆𝖔 𝖄𝖚𝖓-𝕳𝖜𝖆",                 # bold fraktur
    "ℍ𝕤𝕚𝕒𝕠 𝕐𝕦𝕟-ℍ𝕨𝕒",                 # double-struck
    "𝙷𝚜𝚒𝚊𝚘 𝚈𝚞𝚗-𝙷𝚠𝚊",                 # monospace
    "ⒽⓈⒾⒶⓄ ⓎⓊⓃ-ⒽⓌⒶ",                 # circled
])
def test_compatibility_forms(text: str) -> None:
    assert fold(text) == NAME


@pytest.mark.parametrize("text", [
    "Hѕіао Yun-Hwа",                   # Cyrillic dze, i, a, o
    "Нѕіао Үun-Нwа",                   # Cyrillic capitals EN, STRAIGHT U too
    "НЅІАО ҮUN-НWА",                   # all caps, Cyrillic
    "hsіаo yun-һwа",                   # Cyrillic shha
    "Ηsiαo Υun-Ηwα",                   # Greek capital eta, upsilon, alpha
    "ΗSΙΑΟ ΥUΝ-ΗWΑ",                   # Greek capitals incl. iota, omicron, nu
    "Hsıɑo Yun-Hwɑ",                   # Latin dotless i, alpha
    "ʜꜱɪᴀᴏ ʏᴜɴ-ʜᴡᴀ",                   # Latin small capitals
    "Hsiաo Yսn-Hwa".replace("ա", "a"),  # Armenian seh as u
    "Ꮋsiao Yun-Ꮋwa",                   # Cherokee MI as H
])
def test_look_alikes_fold_to_latin(text: str) -> None:
    assert fold(text) == NAME
    assert normalize(text) != NAME


def test_every_look_alike_maps_to_its_latin_letter() -> None:
    for ch, latin in CONFUSABLES.items():
        assert len(ch) == 1 and not ch.isascii() and ch.isalpha(), hex(ord(ch))
        assert len(latin) == 1 and latin.isascii() and latin.isalpha(), hex(ord(ch))
        assert fold(ch) == latin.lower(), (hex(ord(ch)), unicodedata.name(ch))
        assert fold(f"x{ch}x") == f"x{latin.lower()}x"  # mixed with Latin letters


def test_case_of_the_look_alike_decides() -> None:
    # Greek capital eta looks like H, small eta like n; Cyrillic EN like H
    assert fold("Η") == "h" and fold("η") == "n" and fold("Н") == "h"


def test_real_words_in_other_scripts_are_left_alone() -> None:
    for text in ["Кто написал Войну и мир?", "Расскажи о Москве и Санкт-Петербурге.",
                 "Что такое мир?", "Ποιος έγραψε την Οδύσσεια;", "Νίκος Καζαντζάκης"]:
        folded = fold(text)
        # each word with a letter that has no Latin look-alike keeps its script
        for w in text.split():
            if any(ch.isalpha() and ch not in CONFUSABLES and not ch.isascii()
                   and ch.casefold() not in CONFUSABLES for ch in w):
                assert normalize(w).casefold() in folded, (w, folded)
    assert fold("Кто написал Войну и мир?") == "кто написал воину и мир"
    assert fold("ΝΙΚΟΣ") == fold("Νίκος") == "νικοσ"  # case-independent when not disguised


def test_case_and_punctuation() -> None:
    for text in ["HSIAO YUN-HWA", "hSiAo yUn-HwA", "Hsiao, Yun--Hwa!!", "(Hsiao) [Yun]/Hwa",
                 "Hsiao Yun-Hwa's", "HSIAO YUN-HWA'S"]:
        assert fold(text) == NAME, text
    assert fold("Straße") == "strasse"  # casefold
    assert fold("İstanbul") == "istanbul"  # no stray combining dot


def test_spaced_letters_fold_to_single_letter_words_and_squash() -> None:
    assert fold("H s i a o  Y u n - H w a") == "h s i a o y u n h w a"
    assert fold("J.o.h.n") == "j o h n"
    assert squash("H s i a o  Y u n - H w a") == "hsiaoyunhwa"
    assert squash("H.ѕ.і.а.о") == "hsiao"


def test_tokens_point_at_the_original_spelling() -> None:
    text = "Who is Нѕі\u200bао Yun-Hwa's, ＨＷＡ?"
    toks = fold_tokens(text)
    assert [w for w, _, _ in toks] == ["who", "is", "hsiao", "yun", "hwa", "hwa"]
    assert [text[s:e] for _, s, e in toks] == ["Who", "is", "Нѕі\u200bао", "Yun", "Hwa", "ＨＷＡ"]
    ascii_text = "Mr Hsiao's car"
    assert [(w, ascii_text[s:e]) for w, s, e in fold_tokens(ascii_text)] == [
        ("mr", "Mr"), ("hsiao", "Hsiao"), ("car", "car")]
    assert fold_tokens("") == []
    with pytest.raises(ValueError):
        fold_tokens(None)  # type: ignore[arg-type]


def test_unmask_keeps_what_a_reader_sees() -> None:
    assert unmask("Who is Нѕі\u200bао Үun-Нwа?") == "Who is Hsiao Yun-Hwa?"
    assert unmask("Ｈｅｌｌｏ, Dvořák!") == "Hello, Dvořák!"
    assert unmask("Кто написал Войну и мир?") == "Кто написал Войну и мир?"
    plain = "Plain ASCII, kept: as-is."
    assert unmask(plain) is plain


def test_visible_removes_invisible_and_control_characters() -> None:
    assert visible("Hs\u200biao \u202eYun\u202c-Hwa\n\t x") == "Hsiao Yun-Hwa x"
    assert visible("a" * 100, limit=10) == "a" * 9 + "…"
    with pytest.raises(ValueError):
        visible("x", limit=1)
