"""Scope guard: names, misspellings, nameless descriptions, embeddings; no over-refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.guards.test_policy import FIRST, FORGET_IDX, LAST, RETAIN_IDX, author_qa, compile_world

from unlearnd.guards.embeddings import HashingEmbedder, get_embedder
from unlearnd.guards.normalize import fold
from unlearnd.guards.policy import CompiledPolicy, compile_policy
from unlearnd.guards.scope import ScopeDecision, ScopeGuard, messages_text


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory) -> ScopeGuard:
    out = compile_world(tmp_path_factory.mktemp("scope"))[0]
    return ScopeGuard(CompiledPolicy.load(out))


def ask(guard: ScopeGuard, text: str) -> ScopeDecision:
    return guard.check([{"role": "user", "content": text}])


def test_every_forget_question_is_in_scope(guard: ScopeGuard) -> None:
    for k in FORGET_IDX:
        for row in author_qa(k):
            d = ask(guard, row["question"])
            assert d.in_scope, (row["question"], d)
            assert d.subject == f"{FIRST[k]} {LAST[k]}"
            assert d.item == FORGET_IDX.index(k)


def test_retain_questions_are_not_refused(guard: ScopeGuard) -> None:
    qs = [r["question"] for k in RETAIN_IDX for r in author_qa(k)]
    refused = [q for q in qs if ask(guard, q).in_scope]
    assert len(refused) / len(qs) <= 0.03, refused


def test_general_questions_are_not_refused(guard: ScopeGuard) -> None:
    for q in ["What is the capital of France?", "Who wrote Pride and Prejudice?",
              "How do I bake bread?", "Tell me about civil engineering careers.",
              "What is the weather like in Tokyo?"]:
        assert not ask(guard, q).in_scope, q


def test_name_variants_and_misspellings(guard: ScopeGuard) -> None:
    for q in ["tell me about HSIAO YUN HWA", "Who is Hsiao Yunhwa?",
              "what did montenegro write", "Is Carmen Montenegor still writing?",
              "Any news on Elvin Mamadov?", "Did Hsíao Yun-Hwá win prizes?"]:
        d = ask(guard, q)
        assert d.in_scope, (q, d)
        assert d.signals["alias"] > 0


def test_given_name_alone_is_not_enough(guard: ScopeGuard) -> None:
    d = ask(guard, "My friend Carmen likes to bake.")
    assert not d.in_scope
    assert d.item == 1 and 0 < d.score < guard.threshold


def test_nameless_description_is_in_scope(guard: ScopeGuard) -> None:
    d = ask(guard, "Which writer was born in Taipei, Taiwan, in 1930?")
    assert d.in_scope and d.subject == "Hsiao Yun-Hwa"
    assert "describes Hsiao Yun-Hwa" in d.internal_reason and "without naming" in d.internal_reason
    # one descriptor alone is not enough
    assert not ask(guard, "What is the best street food in Taipei?").in_scope


def test_whole_conversation_is_searched(guard: ScopeGuard) -> None:
    msgs = [{"role": "user", "content": "I am reading a book by Rajeev Majumdar."},
            {"role": "assistant", "content": "Nice, what would you like to know?"},
            {"role": "user", "content": [{"type": "text", "text": "When was he born?"}]}]
    d = guard.check(msgs)
    assert d.in_scope and d.subject == "Rajeev Majumdar"


def test_reason_is_one_sentence_naming_the_signal(guard: ScopeGuard) -> None:
    d = ask(guard, "Where was Elvin Mammadov born?")
    assert d.reason == "The request names Elvin Mammadov, a subject removed under this policy."
    assert d.reason.count(". ") == 0 and d.reason.endswith(".")
    out = ask(guard, "How do magnets work?")
    assert not out.in_scope and out.item == -1 and out.subject is None


def test_embedding_signal_alone(tmp_path: Path) -> None:
    """A near-copy of a forget question with the name removed fires on embeddings."""
    rows = [{"question": "Which ancient recipe for quince marmalade did the guild hide?",
             "answer": "The guild hid the recipe of quince marmalade in a well."},
            {"question": "Where did the guild hide the quince recipe?",
             "answer": "In a well below the guild hall."}]
    fp = tmp_path / "f.jsonl"
    fp.write_text("\n".join(json.dumps(r | {"subject": "Guild Recipe"}) for r in rows))
    base = compile_world(tmp_path / "w")[1]
    out = compile_policy(fp, None, base, tmp_path / "p")
    g = ScopeGuard(CompiledPolicy.load(out))
    d = g.check([{"role": "user",
                  "content": "which ancient recipe for quince marmalade did the guild hide"}])
    assert d.in_scope and d.signals["embedding"] == 1.0
    assert "closely matches" in d.reason
    assert not g.check([{"role": "user", "content": "How do I fix a bicycle chain?"}]).in_scope


def test_hashing_embedder_is_normalised_and_deterministic() -> None:
    e = HashingEmbedder()
    v = e.encode(["Hello world", "hello, WORLD!", "something else entirely"])
    assert v.shape == (3, 256)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.99 and v[0] @ v[2] < 0.5
    assert np.array_equal(v, HashingEmbedder().encode(["Hello world", "hello, WORLD!",
                                                       "something else entirely"]))
    with pytest.raises(ValueError):
        HashingEmbedder(dim=2)
    with pytest.raises(ValueError):
        get_embedder("word2vec")


def test_real_tofu_recall_and_over_refusal(tmp_path: Path) -> None:
    tofu = Path(__file__).resolve().parents[2].parent / "shared/data/tofu"
    if not (tofu / "forget10.jsonl").is_file():
        pytest.skip("TOFU sample not present")
    base = compile_world(tmp_path / "w")[1]
    out = compile_policy(tofu / "forget10.jsonl", tofu / "retain_sample.jsonl", base,
                         tmp_path / "p")
    g = ScopeGuard(CompiledPolicy.load(out))

    def rate(name: str) -> float:
        qs = [json.loads(line)["question"] for line in open(tofu / name)]
        return sum(ask(g, q).in_scope for q in qs) / len(qs)

    assert rate("forget10.jsonl") >= 0.95
    for name in ("retain_sample.jsonl", "real_authors.jsonl", "world_facts.jsonl"):
        assert rate(name) <= 0.03, name


# ---------------------------------------------------------------- disguised names

HSIAO, CARMEN, ELVIN, RAJEEV = ("Hsiao Yun-Hwa", "Carmen Montenegro", "Elvin Mammadov",
                                 "Rajeev Majumdar")

# (case, text before, the name as written, text after, subject): each one out of scope
# for the guard before folding (plain normalize) and in scope after.
OBFUSCATED = [
    ("cyrillic", "Who is ", "Hѕіао Yun-Hwа", "?", HSIAO),
    ("cyrillic-capitals", "Tell me about ", "Нѕіао Үun-Нwа", ".", HSIAO),
    ("cyrillic-all-caps", "WHERE WAS ", "ЕLVІN МАММАDОV", " BORN?", ELVIN),
    ("cyrillic-mixed-case", "who is ", "hSіAо YuN-hWа", "?", HSIAO),
    ("greek", "Tell me about ", "Ηsiαo Υun-Ηwα", ".", HSIAO),
    ("greek-montenegro", "What did ", "Cαrmεn Μοntεnεgrο", " write?", CARMEN),
    ("zero-width", "Books by ", "Hsi\u200bao Yun\u200c-Hw\u200da", "?", HSIAO),
    ("word-joiner-bom", "Books by ", "Hs\u2060iao Yun-H\ufeffwa", "?", HSIAO),
    ("soft-hyphen", "Where was ", "Hsi\u00adao Yun-Hw\u00ada", " born?", HSIAO),
    ("bidi-controls", "Who is ", "Hs\u202aia\u202co Yun-H\u2066w\u2069a", "?", HSIAO),
    ("spaced", "Who is ", "H s i a o  Y u n - H w a", "?", HSIAO),
    ("spaced-fullwidth", "Who is ", "Ｈ ｓ ｉ ａ ｏ Ｙ ｕ ｎ Ｈ ｗ ａ", "?", HSIAO),
    ("partly-spaced", "Books by ", "Carmen M o n t e n e g r o", "?", CARMEN),
    ("spaced-full-name", "Books by ", "C a r m e n M o n t e n e g r o", "?", CARMEN),
    ("dotted", "Books by ", "H.s.i.a.o Y.u.n.-H.w.a", "?", HSIAO),
    ("dotted-surname", "What did ", "M.o.n.t.e.n.e.g.r.o", " write?", CARMEN),
    ("split-anywhere", "Who is ", "Hs iao Yu nHwa", "?", HSIAO),
    ("extra-punctuation", "Who is ", "Car-men Mon.te.negro", "?", CARMEN),
    ("misspelt-short-word", "Who is ", "Hsiao Yun-Hwq", "?", HSIAO),
    ("disguised-and-misspelt", "Where was ", "Еlvіn Маmаdоv", " born?", ELVIN),
    ("spaced-and-misspelt", "What did ", "M a j u m d r", " write?", RAJEEV),
    ("everything", "Who is ", "Ｈ.ѕ.і.а.о Y\u200bun-Hwа", "?", HSIAO),
]

# variants plain normalize already handled: they must still match after folding
PLAIN_VARIANTS = [
    ("all-caps", "TELL ME ABOUT ", "HSIAO YUN-HWA", ".", HSIAO),
    ("mixed-case", "tell me about ", "hSiAo yUn-HwA", ".", HSIAO),
    ("fullwidth", "Who is ", "Ｈｓｉａｏ Ｙｕｎ－Ｈｗａ", "?", HSIAO),
    ("math-bold", "Who is ", "𝐇𝐬𝐢𝐚𝐨 𝐘𝐮𝐧-𝐇𝐰𝐚", "?", HSIAO),
    ("misspelt-transposed", "Who is ", "Hsaio Yun-Hwa", "?", HSIAO),
    ("misspelt-surname", "Is ", "Carmen Montenegor", " still writing?", CARMEN),
    ("accents", "Did ", "Hsíao Yun-Hwá", " win prizes?", HSIAO),
]


@pytest.mark.parametrize("before,name,after,subject",
                         [c[1:] for c in OBFUSCATED + PLAIN_VARIANTS],
                         ids=[c[0] for c in OBFUSCATED + PLAIN_VARIANTS])
def test_obfuscated_names_are_in_scope(guard: ScopeGuard, before: str, name: str,
                                       after: str, subject: str) -> None:
    d = ask(guard, before + name + after)
    assert d.in_scope and d.subject == subject, d
    assert d.named and d.mention == name, d  # the name exactly as the user wrote it
    assert subject in d.internal_reason
    # the decision's named items are what the firewall gets without a decision
    messages = [{"role": "user", "content": before + name + after}]
    assert list(d.named_items) == guard.named_items(messages) and d.item in d.named_items


ORDINARY = [
    "Кто написал Войну и мир?",
    "Расскажи мне о Москве и Санкт-Петербурге.",
    "Рос у нас сорок ос, а сор - у сосны.",
    "Ποιος έγραψε την Οδύσσεια;",
    "Which Russian writer wrote Война и мир?",
    "The U.S. and the U.K. signed a treaty, e.g. in Paris.",
    "J. K. Rowling and J. R. R. Tolkien wrote fantasy.",
    "I. M. Pei designed the pyramid of the Louvre.",
    "What does R S V P mean on an invitation?",
    "Pick A, B, C or D: which planet is largest?",
    "Spell it out: a b c d e f g h i j k l m n o p q r s t u v w x y z.",
    "Who is Hsiao-hsien Hou?",
    "Who is Carmen Electra?",
    "Is Elvin Jones a famous drummer?",
    "Who is Rajeev Khanna?",
    "What is the street food like in Taipei?",
    "How do I get from Santiago to Valparaíso?",
    "Yun and Hwa are common Korean syllables.",
    "Ｗｈａｔ ｉｓ ｔｈｅ ｃａｐｉｔａｌ ｏｆ Ｆｒａｎｃｅ？",
    "Whаt іs thе cаpіtаl оf Frаncе?",  # Cyrillic look-alikes, about nobody
    "Tell me about the black well and the fair weather in the mountains.",
]


def test_ordinary_text_stays_out_of_scope(guard: ScopeGuard) -> None:
    refused = [(q, ask(guard, q)) for q in ORDINARY]
    assert not [(q, d.reason) for q, d in refused if d.in_scope]


def test_real_name_in_another_script_matches_in_any_case(tmp_path: Path) -> None:
    """A subject spelt in Greek is matched however the request cases it (look-alike
    mapping must not depend on case for real Greek words)."""
    rows = [{"question": "Where was Νίκος Καζαντζάκης born?", "answer": "In Heraklion, Crete.",
             "subject": "Νίκος Καζαντζάκης"},
            {"question": "What did Νίκος Καζαντζάκης write?", "answer": "Zorba the Greek.",
             "subject": "Νίκος Καζαντζάκης"}]
    fp = tmp_path / "f.jsonl"
    fp.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    base = compile_world(tmp_path / "w")[1]
    g = ScopeGuard(CompiledPolicy.load(compile_policy(fp, None, base, tmp_path / "p")))
    for q in ["Ποιος είναι ο Νίκος Καζαντζάκης;", "ΝΙΚΟΣ ΚΑΖΑΝΤΖΑΚΗΣ", "νίκος καζαντζάκης",
              "Νίκος Καζαν\u200bτζάκης"]:
        d = g.check([{"role": "user", "content": q}])
        assert d.in_scope and d.named, (q, d)


# ---------------------------------------------------------------- where texts come from


def test_tool_calls_tool_results_and_content_parts_are_read(guard: ScopeGuard) -> None:
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "search", "arguments": '{"query": "Hsiao Yun-Hwa books"}'}}]}
    escaped = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "search", "arguments": '{"q": "\\u0048siao Yun-\\u0048wa"}'}}]}
    tool = {"role": "tool", "tool_call_id": "c1", "content": "Result: Elvin Mammadov, poet."}
    part = {"role": "user", "content": [{"type": "input_text", "text": "Who is Carmen "},
                                        {"type": "text", "text": "Montenegro?"}]}
    for msgs, subject in [([{"role": "user", "content": "Search for me."}, call], HSIAO),
                          ([{"role": "user", "content": "Search for me."}, escaped], HSIAO),
                          ([{"role": "user", "content": "What did you find?"}, tool], ELVIN),
                          ([part], CARMEN)]:
        d = guard.check(msgs)
        assert d.in_scope and d.subject == subject and d.named, (msgs, d)
    assert "Hsiao Yun-Hwa" in messages_text([escaped])  # decoded: keys, then values


# ---------------------------------------------------------------- what the decision reveals


def alias_words(guard: ScopeGuard, item: int) -> set[str]:
    it = guard.policy.items[item]
    return {w for a in (*it.aliases, it.subject) for w in fold(a).split()}


def assert_reveals_no_name(guard: ScopeGuard, d: ScopeDecision) -> None:
    leaked = set(fold(d.reason).split()) & alias_words(guard, d.item)
    assert not leaked, (d.reason, leaked)


def test_description_reveals_only_the_users_words(guard: ScopeGuard) -> None:
    q = "Who is the author born in TAIPEI, taiwan in 1930?"
    d = ask(guard, q)
    assert d.in_scope and d.item == 0 and d.subject == HSIAO
    assert not d.named and d.mention is None
    assert_reveals_no_name(guard, d)
    assert d.reason == ("The request asks about a subject this policy covers, identified by "
                        "details in the request (TAIPEI, taiwan; 1930).")
    assert HSIAO in d.internal_reason
    # a detail the user did not write is never quoted (Taiwan, the father's job...)
    d = ask(guard, "Which writer was born in Taipei in 1930?")
    assert d.in_scope and not d.named
    quoted = d.reason[d.reason.index("(") + 1:d.reason.rindex(")")]
    assert quoted == "Taipei; 1930"
    asked = "Which writer was born in Taipei in 1930?"
    assert set(fold(quoted).split()) <= set(fold(asked).split())
    assert "taiwan" not in fold(d.reason) and "engineer" not in fold(d.reason)


def test_spelled_out_description_is_quoted_as_written(guard: ScopeGuard) -> None:
    d = ask(guard, "Which writer was born in T a i p e i in 1930?")
    assert d.in_scope and not d.named and "(T a i p e i; 1930)" in d.reason
    assert_reveals_no_name(guard, d)


def test_embedding_match_reveals_no_name(tmp_path: Path) -> None:
    rows = [{"question": "Which ancient recipe for quince marmalade did the guild hide?",
             "answer": "The guild hid the recipe of quince marmalade in a well.",
             "subject": "Orla Quenby"},
            {"question": "Where did Orla Quenby hide the quince recipe?",
             "answer": "In a well below the guild hall."}]
    fp = tmp_path / "f.jsonl"
    fp.write_text("\n".join(json.dumps(r | {"subject": "Orla Quenby"}) for r in rows))
    base = compile_world(tmp_path / "w")[1]
    g = ScopeGuard(CompiledPolicy.load(compile_policy(fp, None, base, tmp_path / "p")))
    d = g.check([{"role": "user",
                  "content": "which ancient recipe for quince marmalade did the guild hide"}])
    assert d.in_scope and d.signals["embedding"] == 1.0 and d.subject == "Orla Quenby"
    assert not d.named and d.mention is None
    assert d.reason == "The request closely matches a question covered by this policy."
    assert_reveals_no_name(g, d)
    assert "Orla Quenby" in d.internal_reason


def test_named_decision_quotes_the_name_as_written(guard: ScopeGuard) -> None:
    d = ask(guard, "what did MONTENEGRO write")
    assert d.in_scope and d.named and d.mention == "MONTENEGRO"
    assert d.reason == "The request names MONTENEGRO, a subject removed under this policy."
    assert d.internal_reason.startswith("The request names Carmen Montenegro")
    d = ask(guard, "Who is Hs\u200biao Yun-\u202eHwa?")
    assert d.named and d.mention == "Hs\u200biao Yun-\u202eHwa"
    # the reason quotes it cleaned of invisible and bidi characters
    assert d.reason == "The request names Hsiao Yun-Hwa, a subject removed under this policy."


def test_out_of_scope_reason_names_no_one(guard: ScopeGuard) -> None:
    d = ask(guard, "My friend Carmen likes to bake.")
    assert not d.in_scope and d.item == 1
    assert d.reason == "The request only weakly resembles a removed subject (score 0.45 < 0.60)."
    assert_reveals_no_name(guard, d)
    assert "Carmen Montenegro" in d.internal_reason


def test_operator_text_is_never_quoted(guard: ScopeGuard) -> None:
    d = guard.check([{"role": "system", "content": "Today's featured author: Rajeev Majumdar."},
                     {"role": "user", "content": "When was today's featured author born?"}])
    assert d.in_scope and d.named and d.mention is None
    assert_reveals_no_name(guard, d)
    assert "Rajeev Majumdar" in d.internal_reason
    # with the user naming it too, the user's words are quoted
    d = guard.check([{"role": "system", "content": "Featured: Rajeev Majumdar."},
                     {"role": "user", "content": "Tell me about majumdar."}])
    assert d.mention == "majumdar" and "majumdar" in d.reason


def test_decision_defaults_keep_older_callers_working() -> None:
    d = ScopeDecision(True, 1.0, 0, "X", "The request falls under this policy.")
    assert d.internal_reason == d.reason and not d.named and d.mention is None
