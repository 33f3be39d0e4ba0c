"""Matching form of untrusted text: undo the disguises used to slip a name past a guard.

The scope guard compares a request with the policy's aliases and descriptor terms on
*folded* text (:func:`fold`, :func:`fold_tokens`). Folding extends :func:`spans.normalize`
(case, accents, punctuation) with what an attacker can do to a name without making it
unreadable to the model:

1. **Compatibility forms** (NFKD, a superset of NFKC's compatibility mapping):
   fullwidth ``Ｈｓｉａｏ``, mathematical alphanumerics ``𝐇𝐬𝐢𝐚𝐨``, circled and
   squared letters, ligatures ``ﬁ``, superscripts.
2. **Invisible characters** are deleted, not turned into spaces, so they cannot split a
   word: every format character (category Cf: zero-width space/joiners U+200B..U+200D,
   word joiner U+2060, BOM U+FEFF, soft hyphen U+00AD, bidi controls, tag characters),
   every non-spacing or enclosing mark (Mn, Me: accents after NFKD, variation
   selectors, the combining grapheme joiner) and the Hangul fillers (letters that
   render as nothing).
3. **Confusables skeleton**: letters of other scripts that look like Latin letters
   (Cyrillic ``а е о р с у х і ј ѕ ԁ һ``, Greek ``ο α ρ ν τ ι κ``, some Armenian and
   Cherokee, Latin small capitals and IPA forms such as ``ɡ ɑ ı``) are mapped to the
   Latin letter, upper and lower case separately (Greek ``Η`` looks like ``H``, ``η``
   like ``n``). Only inside a *disguised* word: one that mixes them with Latin letters
   (``Hѕiаo``), or one made entirely of look-alikes and digits (``Нѕіао``). A word with a
   letter that has no Latin look-alike is real foreign text and is left alone, so
   ``Кто написал Войну и мир?`` stays Cyrillic and cannot turn into Latin words.
4. **Case folding** (``str.casefold``: ``ß`` -> ``ss``), possessive ``'s`` dropped, every
   other non-alphanumeric character a word boundary.

Spaced-out names (``H s i a o``, ``J.o.h.n``) fold to runs of one-letter words; the
scope guard joins them back (see :mod:`unlearnd.guards.scope`). :func:`squash` is the
joined form of a text.

:func:`fold_tokens` also returns where each folded word lies in the original text, so
a match can be quoted back to the user exactly as they wrote it. :func:`unmask` is the
same repair keeping case, accents and punctuation (for embedders that read cased text)
and :func:`visible` cleans a quote of invisible and control characters for display.

Not covered: transliteration (``Сяо Юнь-Хва`` is another spelling, not a disguise),
digits used as letters (``Hs1ao``; one of them is left to the fuzzy matcher), look-alikes
missing from :data:`CONFUSABLES`, and anything semantic (translation, homophones,
descriptions, a name split across messages in pieces that are not whole words).
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["CONFUSABLES", "fold", "fold_tokens", "squash", "unmask", "visible"]

CONFUSABLES: dict[str, str] = {
    # Cyrillic
    "\u0430": "a",  # а CYRILLIC SMALL LETTER A
    "\u0435": "e",  # е CYRILLIC SMALL LETTER IE
    "\u043e": "o",  # о CYRILLIC SMALL LETTER O
    "\u0440": "p",  # р CYRILLIC SMALL LETTER ER
    "\u0441": "c",  # с CYRILLIC SMALL LETTER ES
    "\u0443": "y",  # у CYRILLIC SMALL LETTER U
    "\u0445": "x",  # х CYRILLIC SMALL LETTER HA
    "\u0456": "i",  # і CYRILLIC SMALL LETTER BYELORUSSIAN-UKRAINIAN I
    "\u0458": "j",  # ј CYRILLIC SMALL LETTER JE
    "\u0455": "s",  # ѕ CYRILLIC SMALL LETTER DZE
    "\u0501": "d",  # ԁ CYRILLIC SMALL LETTER KOMI DE
    "\u04bb": "h",  # һ CYRILLIC SMALL LETTER SHHA
    "\u04cf": "l",  # ӏ CYRILLIC SMALL LETTER PALOCHKA
    "\u04af": "y",  # ү CYRILLIC SMALL LETTER STRAIGHT U
    "\u051b": "q",  # ԛ CYRILLIC SMALL LETTER QA
    "\u051d": "w",  # ԝ CYRILLIC SMALL LETTER WE
    "\u043a": "k",  # к CYRILLIC SMALL LETTER KA
    "\u0475": "v",  # ѵ CYRILLIC SMALL LETTER IZHITSA
    "\u04bd": "e",  # ҽ CYRILLIC SMALL LETTER ABKHASIAN CHE
    "\u0410": "A",  # А CYRILLIC CAPITAL LETTER A
    "\u0412": "B",  # В CYRILLIC CAPITAL LETTER VE
    "\u0415": "E",  # Е CYRILLIC CAPITAL LETTER IE
    "\u041a": "K",  # К CYRILLIC CAPITAL LETTER KA
    "\u041c": "M",  # М CYRILLIC CAPITAL LETTER EM
    "\u041d": "H",  # Н CYRILLIC CAPITAL LETTER EN
    "\u041e": "O",  # О CYRILLIC CAPITAL LETTER O
    "\u0420": "P",  # Р CYRILLIC CAPITAL LETTER ER
    "\u0421": "C",  # С CYRILLIC CAPITAL LETTER ES
    "\u0422": "T",  # Т CYRILLIC CAPITAL LETTER TE
    "\u0423": "Y",  # У CYRILLIC CAPITAL LETTER U
    "\u0425": "X",  # Х CYRILLIC CAPITAL LETTER HA
    "\u0406": "I",  # І CYRILLIC CAPITAL LETTER BYELORUSSIAN-UKRAINIAN I
    "\u0408": "J",  # Ј CYRILLIC CAPITAL LETTER JE
    "\u0405": "S",  # Ѕ CYRILLIC CAPITAL LETTER DZE
    "\u0500": "D",  # Ԁ CYRILLIC CAPITAL LETTER KOMI DE
    "\u04ba": "H",  # Һ CYRILLIC CAPITAL LETTER SHHA
    "\u04c0": "I",  # Ӏ CYRILLIC LETTER PALOCHKA
    "\u04ae": "Y",  # Ү CYRILLIC CAPITAL LETTER STRAIGHT U
    "\u051a": "Q",  # Ԛ CYRILLIC CAPITAL LETTER QA
    "\u051c": "W",  # Ԝ CYRILLIC CAPITAL LETTER WE
    "\u0474": "V",  # Ѵ CYRILLIC CAPITAL LETTER IZHITSA
    # Greek
    "\u03b1": "a",  # α GREEK SMALL LETTER ALPHA
    "\u03b3": "y",  # γ GREEK SMALL LETTER GAMMA
    "\u03b5": "e",  # ε GREEK SMALL LETTER EPSILON
    "\u03b9": "i",  # ι GREEK SMALL LETTER IOTA
    "\u03ba": "k",  # κ GREEK SMALL LETTER KAPPA
    "\u03bd": "v",  # ν GREEK SMALL LETTER NU
    "\u03bf": "o",  # ο GREEK SMALL LETTER OMICRON
    "\u03c1": "p",  # ρ GREEK SMALL LETTER RHO
    "\u03c4": "t",  # τ GREEK SMALL LETTER TAU
    "\u03c5": "u",  # υ GREEK SMALL LETTER UPSILON
    "\u03c7": "x",  # χ GREEK SMALL LETTER CHI
    "\u03f2": "c",  # ϲ GREEK LUNATE SIGMA SYMBOL
    "\u03f3": "j",  # ϳ GREEK LETTER YOT
    "\u03b7": "n",  # η GREEK SMALL LETTER ETA
    "\u03c9": "w",  # ω GREEK SMALL LETTER OMEGA
    "\u03bc": "u",  # μ GREEK SMALL LETTER MU
    "\u0391": "A",  # Α GREEK CAPITAL LETTER ALPHA
    "\u0392": "B",  # Β GREEK CAPITAL LETTER BETA
    "\u0395": "E",  # Ε GREEK CAPITAL LETTER EPSILON
    "\u0396": "Z",  # Ζ GREEK CAPITAL LETTER ZETA
    "\u0397": "H",  # Η GREEK CAPITAL LETTER ETA
    "\u0399": "I",  # Ι GREEK CAPITAL LETTER IOTA
    "\u039a": "K",  # Κ GREEK CAPITAL LETTER KAPPA
    "\u039c": "M",  # Μ GREEK CAPITAL LETTER MU
    "\u039d": "N",  # Ν GREEK CAPITAL LETTER NU
    "\u039f": "O",  # Ο GREEK CAPITAL LETTER OMICRON
    "\u03a1": "P",  # Ρ GREEK CAPITAL LETTER RHO
    "\u03a4": "T",  # Τ GREEK CAPITAL LETTER TAU
    "\u03a5": "Y",  # Υ GREEK CAPITAL LETTER UPSILON
    "\u03a7": "X",  # Χ GREEK CAPITAL LETTER CHI
    "\u03f9": "C",  # Ϲ GREEK CAPITAL LUNATE SIGMA SYMBOL
    "\u037f": "J",  # Ϳ GREEK CAPITAL LETTER YOT
    "\u03dc": "F",  # Ϝ GREEK LETTER DIGAMMA
    # Armenian
    "\u0585": "o",  # օ ARMENIAN SMALL LETTER OH
    "\u057d": "u",  # ս ARMENIAN SMALL LETTER SEH
    "\u0570": "h",  # հ ARMENIAN SMALL LETTER HO
    "\u0578": "n",  # ո ARMENIAN SMALL LETTER VO
    "\u0581": "g",  # ց ARMENIAN SMALL LETTER CO
    "\u0566": "q",  # զ ARMENIAN SMALL LETTER ZA
    "\u054f": "S",  # Տ ARMENIAN CAPITAL LETTER TIWN
    "\u0555": "O",  # Օ ARMENIAN CAPITAL LETTER OH
    "\u054d": "U",  # Ս ARMENIAN CAPITAL LETTER SEH
    "\u053c": "L",  # Լ ARMENIAN CAPITAL LETTER LIWN
    # Cherokee (capital forms; small ones are looked up through casefold)
    "\u13aa": "A",  # Ꭺ CHEROKEE LETTER GO
    "\u13f4": "B",  # Ᏼ CHEROKEE LETTER YV
    "\u13df": "C",  # Ꮯ CHEROKEE LETTER TLI
    "\u13ac": "E",  # Ꭼ CHEROKEE LETTER GV
    "\u13c0": "G",  # Ꮐ CHEROKEE LETTER NAH
    "\u13bb": "H",  # Ꮋ CHEROKEE LETTER MI
    "\u13ab": "J",  # Ꭻ CHEROKEE LETTER GU
    "\u13e6": "K",  # Ꮶ CHEROKEE LETTER TSO
    "\u13de": "L",  # Ꮮ CHEROKEE LETTER TLE
    "\u13b7": "M",  # Ꮇ CHEROKEE LETTER LU
    "\u13e2": "P",  # Ꮲ CHEROKEE LETTER TLV
    "\u13da": "S",  # Ꮪ CHEROKEE LETTER DU
    "\u13a2": "T",  # Ꭲ CHEROKEE LETTER I
    "\u13d9": "V",  # Ꮩ CHEROKEE LETTER DO
    "\u13d4": "W",  # Ꮤ CHEROKEE LETTER TA
    "\u13c3": "Z",  # Ꮓ CHEROKEE LETTER NO
    # Latin look-alikes outside ASCII (IPA, small capitals)
    "\u0251": "a",  # ɑ LATIN SMALL LETTER ALPHA
    "\u0261": "g",  # ɡ LATIN SMALL LETTER SCRIPT G
    "\u0131": "i",  # ı LATIN SMALL LETTER DOTLESS I
    "\u0237": "j",  # ȷ LATIN SMALL LETTER DOTLESS J
    "\u0269": "i",  # ɩ LATIN SMALL LETTER IOTA
    "\u1d00": "a",  # ᴀ LATIN LETTER SMALL CAPITAL A
    "\u0299": "b",  # ʙ LATIN LETTER SMALL CAPITAL B
    "\u1d04": "c",  # ᴄ LATIN LETTER SMALL CAPITAL C
    "\u1d05": "d",  # ᴅ LATIN LETTER SMALL CAPITAL D
    "\u1d07": "e",  # ᴇ LATIN LETTER SMALL CAPITAL E
    "\ua730": "f",  # ꜰ LATIN LETTER SMALL CAPITAL F
    "\u0262": "g",  # ɢ LATIN LETTER SMALL CAPITAL G
    "\u029c": "h",  # ʜ LATIN LETTER SMALL CAPITAL H
    "\u026a": "i",  # ɪ LATIN LETTER SMALL CAPITAL I
    "\u1d0a": "j",  # ᴊ LATIN LETTER SMALL CAPITAL J
    "\u1d0b": "k",  # ᴋ LATIN LETTER SMALL CAPITAL K
    "\u029f": "l",  # ʟ LATIN LETTER SMALL CAPITAL L
    "\u1d0d": "m",  # ᴍ LATIN LETTER SMALL CAPITAL M
    "\u0274": "n",  # ɴ LATIN LETTER SMALL CAPITAL N
    "\u1d0f": "o",  # ᴏ LATIN LETTER SMALL CAPITAL O
    "\u1d18": "p",  # ᴘ LATIN LETTER SMALL CAPITAL P
    "\u0280": "r",  # ʀ LATIN LETTER SMALL CAPITAL R
    "\ua731": "s",  # ꜱ LATIN LETTER SMALL CAPITAL S
    "\u1d1b": "t",  # ᴛ LATIN LETTER SMALL CAPITAL T
    "\u1d1c": "u",  # ᴜ LATIN LETTER SMALL CAPITAL U
    "\u1d20": "v",  # ᴠ LATIN LETTER SMALL CAPITAL V
    "\u1d21": "w",  # ᴡ LATIN LETTER SMALL CAPITAL W
    "\u028f": "y",  # ʏ LATIN LETTER SMALL CAPITAL Y
    "\u1d22": "z",  # ᴢ LATIN LETTER SMALL CAPITAL Z
}
"""Letters of other scripts (and non-ASCII Latin forms) drawn like a Latin letter, by
case: the key's own case decides (Cyrillic ``Н`` is ``H``, ``н`` has no entry). A small
letter without its own entry is looked up through its casefold (Cherokee). Applied only
inside disguised words (module docstring, point 3)."""

# Letters that render as nothing (Hangul fillers): deleted like format characters.
_INVISIBLE_LETTERS = frozenset("\u115f\u1160\u3164\uffa0")
_POSSESSIVE = re.compile(r"(?<=\w)['’`ʼ][sS]\b")
_ASCII_WORD = re.compile(r"[A-Za-z0-9]+")
_WORD = re.compile(r"[^\W_]+")
_SPACES = re.compile(r"\s+")

# per-character cache: original char -> its base characters after NFKD with
# invisible characters and marks removed ("" for an invisible one)
_BASE: dict[str, str] = {}
# base char -> (class, folded, folded look-alike); class: 0 Latin letter,
# 1 confusable, 2 other letter (another script), 3 digit or other alphanumeric
_INFO: dict[str, tuple[int, str, str]] = {}
_LATIN, _CONFUSABLE, _FOREIGN, _NEUTRAL = 0, 1, 2, 3


def _dropped(ch: str) -> bool:
    """Invisible: a format character, a non-spacing/enclosing mark or a filler letter."""
    return unicodedata.category(ch) in ("Cf", "Mn", "Me") or ch in _INVISIBLE_LETTERS


def _base(ch: str) -> str:
    hit = _BASE.get(ch)
    if hit is None:
        if ch in CONFUSABLES:  # before NFKD: lunate sigma "ϲ" would become "ς"
            hit = ch
        else:
            hit = "".join(c for c in unicodedata.normalize("NFKD", ch) if not _dropped(c))
        if len(_BASE) < 200_000:
            _BASE[ch] = hit
    return hit


def _casefold(ch: str) -> str:
    """casefold without the marks it can add (``İ`` -> ``i``, not ``i̇``)."""
    return "".join(c for c in unicodedata.normalize("NFKD", ch.casefold()) if not _dropped(c))


def _look_alike(ch: str) -> str | None:
    hit = CONFUSABLES.get(ch)
    if hit is None:
        cf = ch.casefold()
        if cf != ch:
            hit = CONFUSABLES.get(cf)
    return hit


def _info(ch: str) -> tuple[int, str, str]:
    """(class, folded, folded look-alike) of a base alphanumeric character."""
    hit = _INFO.get(ch)
    if hit is None:
        folded = _casefold(ch)
        alike = _look_alike(ch)
        if alike is not None:
            hit = (_CONFUSABLE, folded, alike.lower())
        elif not ch.isalpha():
            hit = (_NEUTRAL, folded, folded)
        elif ch.isascii() or unicodedata.name(ch, "").startswith("LATIN"):
            hit = (_LATIN, folded, folded)
        else:
            hit = (_FOREIGN, folded, folded)
        if len(_INFO) < 200_000:
            _INFO[ch] = hit
    return hit


def _disguised(classes: list[int]) -> bool:
    """A word with look-alikes that either mixes them with Latin letters or has no
    letter of another script: read it as Latin (module docstring, point 3)."""
    return _CONFUSABLE in classes and (_LATIN in classes or _FOREIGN not in classes)


def _fold_word(chars: list[str]) -> str:
    infos = [_info(c) for c in chars]
    k = 2 if _disguised([i[0] for i in infos]) else 1
    return "".join(i[k] for i in infos)


def _mask_possessives(text: str) -> str:
    """``'s`` after a word replaced by spaces of the same length (offsets kept)."""
    if "s" not in text and "S" not in text:
        return text
    return _POSSESSIVE.sub(lambda m: " " * len(m.group(0)), text)


def fold_tokens(text: str) -> list[tuple[str, int, int]]:
    """The words of ``fold(text)`` with their places in ``text``.

    Returns ``(word, start, end)`` triples: ``text[start:end]`` is the original
    spelling of ``word``, invisible characters and look-alikes included
    (``fold_tokens("Mr Hs\\u200biao's") == [("mr", 0, 2), ("hsiao", 3, 9)]``).
    ASCII text takes a regular-expression fast path.
    """
    if not isinstance(text, str):
        raise ValueError(f"fold_tokens expects a str, got {type(text).__name__}: {text!r}")
    text = _mask_possessives(text)
    if text.isascii():
        return [(m.group(0).lower(), m.start(), m.end()) for m in _ASCII_WORD.finditer(text)]
    out: list[tuple[str, int, int]] = []
    chars: list[str] = []
    start = end = 0
    for k, ch in enumerate(text):
        for b in _base(ch):
            if b.isalnum():
                if not chars:
                    start = k
                chars.append(b)
                end = k + 1
            elif chars:
                out.append((_fold_word(chars), start, end))
                chars = []
    if chars:
        out.append((_fold_word(chars), start, end))
    return out


def fold(text: str) -> str:
    """Matching form of ``text``: its folded words joined by single spaces.

    ``fold("Ｈsіа\\u00ado Yun-HWA's") == "hsiao yun hwa"`` (fullwidth H, Cyrillic і and
    а, a soft hyphen that joins rather than splits). On plain text it agrees with
    :func:`unlearnd.guards.spans.normalize` (except ``casefold``: ``ß`` -> ``ss``).
    """
    return " ".join(w for w, _, _ in fold_tokens(text))


def squash(text: str) -> str:
    """``fold(text)`` with the spaces removed: ``squash("H s i a o  Y.u.n") == "hsiaoyun"``."""
    return "".join(w for w, _, _ in fold_tokens(text))


def unmask(text: str) -> str:
    """``text`` without its disguise, still readable: NFKC, invisible characters deleted,
    look-alikes in disguised words replaced by their Latin letter (in its case). Case,
    accents and punctuation are kept. For inputs of models that read the cased text
    (the scope guard's embedder). ASCII text is returned unchanged."""
    if not isinstance(text, str):
        raise ValueError(f"unmask expects a str, got {type(text).__name__}: {text!r}")
    if text.isascii():
        return text
    # NFKC character by character, look-alikes excepted ("ϲ" would become "ς"), then
    # NFC to compose what was split
    text = "".join(c if c in CONFUSABLES else unicodedata.normalize("NFKC", c) for c in text)
    text = unicodedata.normalize("NFC", text)
    text = "".join(c for c in text if not (unicodedata.category(c) == "Cf"
                                           or c in _INVISIBLE_LETTERS
                                           or "\ufe00" <= c <= "\ufe0f" or c == "\u034f"))

    def repair(m: re.Match[str]) -> str:
        word = m.group(0)
        bases = [unicodedata.normalize("NFD", c) for c in word]
        classes = [_info(b[0])[0] if b[0].isalnum() else _NEUTRAL for b in bases]
        if not _disguised(classes):
            return word
        out = []
        for b in bases:
            alike = _look_alike(b[0])
            out.append((alike + b[1:]) if alike is not None else b)
        return unicodedata.normalize("NFC", "".join(out))

    return _WORD.sub(repair, text)


def visible(text: str, limit: int = 80) -> str:
    """``text`` fit to quote in a message: format and control characters (bidi
    overrides, zero-width characters) removed, whitespace collapsed to single spaces,
    cut to ``limit`` characters with an ellipsis."""
    if limit < 2:
        raise ValueError(f"limit must be >= 2, got {limit!r}")
    kept = "".join(" " if c.isspace() else c for c in text
                   if c.isspace() or unicodedata.category(c) not in ("Cf", "Cc", "Co", "Cn"))
    out = _SPACES.sub(" ", kept).strip()
    return out if len(out) <= limit else out[:limit - 1].rstrip() + "…"
