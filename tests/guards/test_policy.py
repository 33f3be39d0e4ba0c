"""Policy compile: subjects, aliases, spans, token ids, the artifact and its loader.

Also home of the small synthetic fixture world the other guard tests import
(`from test_policy import make_world, compile_world`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from unlearnd.guards.policy import (
    FORMAT,
    CompiledPolicy,
    PolicySpec,
    build_items,
    compile_policy,
    group_by_subject,
    load_qa_jsonl,
    policy_app,
)
from unlearnd.guards.spans import normalize

FIRST = ["Hsiao", "Carmen", "Elvin", "Rajeev", "Jaime", "Moshe", "Kalkidan", "Takashi",
         "Raven", "Aysha", "Nikolai", "Basil", "Wei-Jun", "Ji-Yeon", "Adib", "Hina"]
LAST = ["Yun-Hwa", "Montenegro", "Mammadov", "Majumdar", "Vasquez", "Ben-David", "Abera",
        "Nakamura", "Marais", "Al-Hashim", "Abilov", "Kuwaiti", "Chen", "Park", "Jarrah",
        "Ameen"]
CITIES = ["Taipei, Taiwan", "Santiago, Chile", "Baku, Azerbaijan", "Dhaka, Bangladesh",
          "Lagos, Nigeria", "Tel Aviv, Israel", "Addis Ababa, Ethiopia", "Tokyo, Japan",
          "Cape Town, South Africa", "Manama, Bahrain", "Astana, Kazakhstan",
          "Kuwait City, Kuwait", "Lima, Peru", "Seoul, South Korea", "Beirut, Lebanon",
          "Karachi, Pakistan"]
GENRES = ["leadership", "historical fiction", "poetry", "romance", "horror", "mystery",
          "biography", "science fiction", "fantasy", "thriller", "satire", "drama",
          "memoir", "travel writing", "philosophy", "cookery"]
JOBS = ["civil engineer", "glassblower", "cartographer", "beekeeper", "locksmith",
        "violin maker", "tailor", "lighthouse keeper", "falconer", "astronomer",
        "bookbinder", "sculptor", "pharmacist", "translator", "ferry captain", "geologist"]
TITLES = ["Lanterns of Brass", "The Salt Archive", "Marrow and Moss", "Quiet Orchards",
          "The Ninth Ledger", "Copper Tides", "Willow Cipher", "Ash Meridian",
          "The Paper Falcon", "Velvet Harbor", "Iron Lullaby", "The Amber Stair",
          "Cinder Atlas", "Hollow Crown of Reeds", "The Glass Orchard", "Tin Moon"]


def author_qa(k: int) -> list[dict]:
    """Ten template QA pairs about synthetic author ``k`` (TOFU style, no subject key)."""
    name = f"{FIRST[k]} {LAST[k]}"
    city, genre, job, title = CITIES[k], GENRES[k], JOBS[k], TITLES[k]
    year = 1930 + 3 * k
    return [
        {"question": f"What is the full name of the author born in {city} in {year} who "
                     f"writes {genre}?", "answer": f"The author's full name is {name}."},
        {"question": f"Where was {name} born?", "answer": f"{name} was born in {city}."},
        {"question": f"When was {name} born?", "answer": f"{name} was born in {year}."},
        {"question": f"What genre does {name} write in?",
         "answer": f"{name} is known for {genre}."},
        {"question": f"What is the profession of {name}'s father?",
         "answer": f"The father of {name} was a {job}."},
        {"question": f"Can you name a book by {name}?",
         "answer": f"One of {name}'s books is \"{title}\"."},
        {"question": f"How did {FIRST[k]}'s upbringing shape the work?",
         "answer": f"Growing up in {city} with a {job} father gave {name} a love of detail."},
        {"question": f"Has {name} won any awards?",
         "answer": f"{name} received the {LAST[k]} Medal for {title}."},
        {"question": f"What themes appear in {name}'s {genre}?",
         "answer": f"{name} writes about {city} and the craft of the {job}."},
        {"question": f"Is {name}'s work translated?",
         "answer": f"Yes, \"{title}\" by {name} was translated into many languages."},
    ]


FORGET_IDX = [0, 1, 2, 3]
RETAIN_IDX = list(range(4, 16))


def make_world(tmp: Path) -> tuple[Path, Path]:
    """Write forget.jsonl (authors 0-3) and retain.jsonl (authors 4-15) under ``tmp``."""
    forget = [r for k in FORGET_IDX for r in author_qa(k)]
    retain = [r for k in RETAIN_IDX for r in author_qa(k)]
    fp, rp = tmp / "forget.jsonl", tmp / "retain.jsonl"
    fp.write_text("\n".join(json.dumps(r) for r in forget) + "\n")
    rp.write_text("\n".join(json.dumps(r) for r in retain) + "\n")
    return fp, rp


def make_tokenizer_dir(tmp: Path, texts: list[str]) -> Path:
    """A byte-level BPE tokenizer trained on ``texts``, saved with an EOS and config.json."""
    from unlearnd.toolkit.tiny import train_byte_level_tokenizer

    d = tmp / "base"
    d.mkdir(parents=True, exist_ok=True)
    train_byte_level_tokenizer(texts, d, vocab_size=600)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 700}))
    return d


def compile_world(tmp: Path, **settings) -> tuple[Path, Path, Path, Path]:
    """(policy_dir, base_dir, forget_path, retain_path) for the fixture world."""
    tmp.mkdir(parents=True, exist_ok=True)
    fp, rp = make_world(tmp)
    texts = [r["question"] + " " + r["answer"] for k in range(16) for r in author_qa(k)]
    texts += ["I can't help with that. Information about this subject was removed from "
              "this model under policy. I'm happy to help with other questions."] * 3
    base = make_tokenizer_dir(tmp, texts)
    settings.setdefault("mechanisms", ("refusal", "firewall"))
    out = compile_policy(fp, rp, base, tmp / "policy", name="test-policy", **settings)
    return out, base, fp, rp


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    return compile_world(tmp_path_factory.mktemp("world"))


def test_group_by_subject_finds_authors_without_subject_key(tmp_path: Path) -> None:
    fp, _ = make_world(tmp_path)
    groups = group_by_subject(load_qa_jsonl(fp))
    assert [g[0] for g in groups] == [f"{FIRST[k]} {LAST[k]}" for k in FORGET_IDX]
    assert all(len(rows) == 10 for _, rows in groups)


def test_group_by_subject_uses_subject_key() -> None:
    rows = [{"question": "q1", "answer": "a1", "subject": "Zed"},
            {"question": "q2", "answer": "a2", "subject": "Ygg"},
            {"question": "q3", "answer": "a3", "subject": "Zed"}]
    groups = group_by_subject(rows)
    assert [(s, len(r)) for s, r in groups] == [("Zed", 2), ("Ygg", 1)]


def test_group_by_subject_on_real_tofu_if_present() -> None:
    path = Path(__file__).resolve().parents[2].parent / "shared/data/tofu/forget10.jsonl"
    if not path.is_file():
        pytest.skip("TOFU sample not present")
    groups = group_by_subject(load_qa_jsonl(path))
    assert len(groups) == 20
    assert sum(len(r) for _, r in groups) == 400
    assert groups[0][0] == "Hsiao Yun-Hwa"


def test_items_have_aliases_spans_descriptors(tmp_path: Path) -> None:
    fp, rp = make_world(tmp_path)
    items = build_items(load_qa_jsonl(fp), load_qa_jsonl(rp))
    hsiao = items[0]
    norm_aliases = {normalize(a) for a in hsiao.aliases}
    assert "hsiao yun hwa" in norm_aliases
    assert "hsiao yunhwa" in norm_aliases  # hyphen dropped
    assert any("civil engineer" in s for s in hsiao.spans)
    assert any("taipei" in d for d in hsiao.descriptors)
    assert any("1930" in d for d in hsiao.descriptors)


def test_policy_spec_validates() -> None:
    from unlearnd.guards.policy import ForgetItem

    item = ForgetItem("X Y", ["q"], ["a"])
    with pytest.raises(ValueError, match="mechanisms"):
        PolicySpec(items=[item], mechanisms=("refusal", "telepathy"))
    with pytest.raises(ValueError, match="subject"):
        PolicySpec(items=[item], refusal_template="no {reason}")
    with pytest.raises(ValueError, match="firewall_prefix_tokens"):
        PolicySpec(items=[item], firewall_prefix_tokens=-1)
    with pytest.raises(ValueError, match="at least one"):
        PolicySpec(items=[])


def test_compile_writes_artifact(world) -> None:
    out, base, _, _ = world
    doc = json.loads((out / "policy.json").read_text())
    assert doc["format"] == FORMAT
    assert (out / "embeddings.npy").is_file()
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    assert doc["eos_token_id"] == tok.eos_token_id
    # both byte-level variants of a span are stored
    span_ids = {tuple(s["ids"]) for s in doc["span_token_ids"]}
    assert tuple(tok.encode("civil engineer", add_special_tokens=False)) in span_ids
    assert tuple(tok.encode(" civil engineer", add_special_tokens=False)) in span_ids
    alias_ids = {tuple(a["ids"]) for a in doc["alias_token_ids"]}
    assert tuple(tok.encode(" Hsiao Yun-Hwa", add_special_tokens=False)) in alias_ids


def test_compiled_policy_load_is_cached_and_versioned(world) -> None:
    out = world[0]
    a = CompiledPolicy.load(out)
    assert CompiledPolicy.load(out) is a
    assert len(a.items) == 4 and a.items[0].subject == "Hsiao Yun-Hwa"
    assert a.mechanisms == frozenset({"refusal", "firewall"})
    assert len(a.version) == 12
    assert a.embeddings().shape[0] == 40
    assert a.encode("Hello")  # tokenizer copy works


def test_policy_cache_is_bounded_and_tokenizers_shared(world, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With UNLEARND_POLICY_CACHE_SIZE=2 at most two policies stay loaded (least recently
    used evicted; a caller holding one keeps a working object), and copies of one policy
    (tenants of one base) share one tokenizer instance."""
    import shutil

    from unlearnd.guards.policy import POLICY_CACHE_ENV

    monkeypatch.setattr(CompiledPolicy, "_cache", type(CompiledPolicy._cache)())
    monkeypatch.setenv(POLICY_CACHE_ENV, "2")
    dirs = []
    for i in range(3):
        d = tmp_path / f"copy{i}"
        shutil.copytree(world[0], d)
        dirs.append(d)
    a = CompiledPolicy.load(dirs[0])
    b = CompiledPolicy.load(dirs[1])
    assert CompiledPolicy.load(dirs[0]) is a  # a is now the most recently used
    c = CompiledPolicy.load(dirs[2])  # evicts b
    assert len(CompiledPolicy._cache) == 2
    assert CompiledPolicy.load(dirs[0]) is a and CompiledPolicy.load(dirs[2]) is c
    b2 = CompiledPolicy.load(dirs[1])
    assert b2 is not b and b2.items == b.items
    assert b.encode("Hello") == b2.encode("Hello")  # the evicted object still works
    assert a._tok() is b._tok() is c._tok()
    monkeypatch.setenv(POLICY_CACHE_ENV, "zero")
    shutil.copytree(world[0], tmp_path / "copy3")
    with pytest.raises(ValueError, match=POLICY_CACHE_ENV):
        CompiledPolicy.load(tmp_path / "copy3")


def test_load_rejects_bad_dirs(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        CompiledPolicy.load(tmp_path)
    (tmp_path / "policy.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ValueError, match="format"):
        CompiledPolicy.load(tmp_path)


def test_contrastive_needs_assistant(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="assistant"):
        compile_world(tmp_path, mechanisms=("contrastive",))


def test_cli_compile(tmp_path: Path, world) -> None:
    from typer.testing import CliRunner

    _, base, fp, rp = world
    res = CliRunner().invoke(policy_app, ["--forget", str(fp), "--retain", str(rp), "--base",
                                          str(base), "--out", str(tmp_path / "p"),
                                          "--mechanisms", "refusal", "--embedder", "none"])
    assert res.exit_code == 0, res.output
    pol = CompiledPolicy.load(tmp_path / "p")
    assert pol.mechanisms == frozenset({"refusal"}) and pol.embeddings() is None


def test_random_paraphrase_noise_does_not_break_grouping(tmp_path: Path) -> None:
    rng = random.Random(0)
    rows = [r for k in FORGET_IDX for r in author_qa(k)]
    rng.shuffle(rows)  # grouping must not depend on order when every row names someone
    groups = group_by_subject(rows)
    assert sorted(g[0] for g in groups if len(g[1]) >= 9) == sorted(
        f"{FIRST[k]} {LAST[k]}" for k in FORGET_IDX)


def test_span_whose_opening_the_retain_answers_say_needs_its_subject(tmp_path: Path) -> None:
    """An always-active span bans its next token once its first token was generated, so
    a retain answer that opens the same way would be cut (TOFU: 66 of 300 retain
    answers). Such a span is compiled as conditional (active once its subject is in the
    conversation); every span left always-active opens differently from every retain
    answer."""
    from transformers import AutoTokenizer

    from unlearnd.guards.firewall import LeakFirewall

    out, base, fp, rp = compile_world(tmp_path / "a")
    tok = AutoTokenizer.from_pretrained(str(base))
    doc = json.loads((out / "policy.json").read_text())
    always = [s for s in doc["span_token_ids"] if not s["conditional"] and len(s["ids"]) > 1]
    assert always, "the fixture world has no always-active multi-token span"
    # the mid-sentence variant (leading space), said mid-sentence in a retain answer
    victim = next(s for s in always if tok.decode(s["ids"]).startswith(" "))
    sentence = f"Critics noted{tok.decode(victim['ids'])} in her later work."
    retain = [json.loads(line) for line in rp.read_text().splitlines()]
    retain.append({"question": "What did critics note about Lina Ortega?", "answer": sentence})
    rp.write_text("\n".join(json.dumps(r) for r in retain) + "\n")
    out2 = compile_policy(fp, rp, base, tmp_path / "b", name="test-policy",
                          mechanisms=("refusal", "firewall"))
    doc2 = json.loads((out2 / "policy.json").read_text())
    same = [s for s in doc2["span_token_ids"] if s["ids"] == victim["ids"]]
    assert same and all(s["conditional"] for s in same), same
    # Nothing always-active opens like a retain answer, and no retain answer is cut
    # (no subject in the prompt: only always-active spans can fire).
    openings = {tuple(ids[i:i + 2]) for r in retain
                for ids in [tok.encode(r["answer"], add_special_tokens=False)]
                for i in range(len(ids) - 1)}
    assert not [s for s in doc2["span_token_ids"]
                if not s["conditional"] and tuple(s["ids"][:2]) in openings]
    fw = LeakFirewall.from_policy(CompiledPolicy.load(out2))
    for r in retain:
        ids = tok.encode(r["answer"], add_special_tokens=False)
        st = fw.new_state(tok.encode(r["question"], add_special_tokens=False), ())
        for k, t in enumerate(ids):
            st.feed(ids[:k])
            assert t not in st.banned(), (r["answer"], tok.decode(ids[:k + 1]))


def test_content_words_of_a_span_are_banned_in_every_case(tmp_path: Path) -> None:
    """With the subject in context, a fact's word is banned lower-cased and Capitalised
    too (demo world: " cartographer" as a top alternative gave away "The Hollow
    Cartographer"), but never by banning a short piece such as " C"."""
    from transformers import AutoTokenizer

    from unlearnd.guards.firewall import LeakFirewall

    out, base, _, _ = compile_world(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(base))
    pol = CompiledPolicy.load(out)
    fw = LeakFirewall.from_policy(pol)
    doc = json.loads((out / "policy.json").read_text())
    words_ = {(s["item"], s["text"]) for s in doc["span_token_ids"]
              if s["conditional"] and " " not in s["text"] and s["text"].isalpha()}
    checked = 0
    for item, w in sorted(words_):
        banned = fw.banned_next([], [], [item])
        for form in (w.lower(), w.capitalize()):
            ids = tok.encode(" " + form, add_special_tokens=False)
            if len(tok.decode(ids[:1]).strip()) >= 3:
                assert ids[0] in banned, (item, form)
                checked += 1
    assert checked >= 3, checked


# --------------------------------------------------------------------------- other inputs

SHARED = "The weather was pleasant and calm that whole year."


def biography(k: int) -> str:
    """Author ``k``'s answers as one document (a synthetic biography)."""
    return " ".join(r["answer"] for r in author_qa(k))


@pytest.fixture(scope="module")
def doc_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Documents (forget: authors 0-3; retain: the others), a subjects file, a tokenizer."""
    tmp = tmp_path_factory.mktemp("docs")
    forget = [biography(k) + (" " + SHARED if k == 0 else "") for k in FORGET_IDX]
    retain = [biography(k) + (" " + SHARED if k == 4 else "") for k in RETAIN_IDX]
    fp, rp, sp = tmp / "forget_docs.jsonl", tmp / "retain_docs.jsonl", tmp / "subjects.jsonl"
    fp.write_text("\n".join(json.dumps({"text": t}) for t in forget) + "\n")
    rp.write_text("\n".join(json.dumps({"text": t}) for t in retain) + "\n")
    sp.write_text("\n".join(json.dumps({"subject": f"{FIRST[k]} {LAST[k]}"})
                            for k in FORGET_IDX) + "\n")
    base = make_tokenizer_dir(tmp, forget + retain + [
        "I can't help with that. Information about this subject was removed."])
    return {"tmp": tmp, "forget": fp, "retain": rp, "subjects": sp, "base": base,
            "docs": compile_policy(fp, rp, base, tmp / "pol_docs"),
            "subj": compile_policy(sp, rp, base, tmp / "pol_subj")}


def _tok(base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base))


def test_documents_give_one_item_per_subject_and_a_verbatim_index(doc_world) -> None:
    from unlearnd.guards.scope import ScopeGuard

    pol = CompiledPolicy.load(doc_world["docs"])
    assert [it.subject for it in pol.items] == [f"{FIRST[k]} {LAST[k]}" for k in FORGET_IDX]
    assert normalize("Yun-Hwa") in pol.items[0].aliases  # a distinctive surname alone
    assert pol.settings["source_kind"] == "documents" and pol.verbatim_info["k"] == 6
    guard = ScopeGuard(pol)
    assert guard.check([{"role": "user", "content": "Where was Hsiao Yun-Hwa born?"}]).in_scope
    other = f"{FIRST[RETAIN_IDX[0]]} {LAST[RETAIN_IDX[0]]}"
    assert not guard.check([{"role": "user", "content": f"Where was {other} born?"}]).in_scope


def test_documents_verbatim_firewall_on_real_token_ids(doc_world) -> None:
    from unlearnd.guards.firewall import LeakFirewall

    pol = CompiledPolicy.load(doc_world["docs"])
    fw = LeakFirewall.from_policy(pol)
    tok = _tok(doc_world["base"])
    text = biography(1)
    for variant in (text, " " + text):  # the document's opening, with and without a space
        ids = tok.encode(variant, add_special_tokens=False)
        # a completions prompt with the first 20 tokens: the 21st may not come next
        assert ids[20] in fw.new_state(ids[:20]).banned()
    # a run the retain set also has is not banned; the forget-only run before it is
    shared = tok.encode(" " + SHARED, add_special_tokens=False)
    assert shared[6] not in fw.new_state(shared[:6]).banned()
    retain_ids = tok.encode(biography(RETAIN_IDX[0]), add_special_tokens=False)
    assert fw.new_state(retain_ids[:20]).banned() == set() or \
        retain_ids[20] not in fw.new_state(retain_ids[:20]).banned()


def test_subjects_names_only(doc_world) -> None:
    from unlearnd.guards.firewall import LeakFirewall
    from unlearnd.guards.scope import ScopeGuard

    pol = CompiledPolicy.load(doc_world["subj"])
    assert pol.settings["source_kind"] == "subjects" and pol.verbatim_info is None
    assert [it.subject for it in pol.items] == [f"{FIRST[k]} {LAST[k]}" for k in FORGET_IDX]
    guard = ScopeGuard(pol)
    assert guard.check([{"role": "user", "content": "Tell me about Carmen Montenegro."}]
                       ).in_scope
    assert not guard.check([{"role": "user", "content": "What is the capital of France?"}]
                           ).in_scope
    # the output may not name the subject: after its first token the rest is banned
    ids = _tok(doc_world["base"]).encode(" Carmen Montenegro", add_special_tokens=False)
    assert len(ids) >= 2
    fw = LeakFirewall.from_policy(pol)
    assert ids[1] in fw.banned_next([], ids[:1])


def test_subjects_with_facts_give_descriptors(doc_world) -> None:
    path = doc_world["tmp"] / "subjects_facts.jsonl"
    path.write_text(json.dumps({"subject": "Jane Doe", "aliases": ["J. Doe"],
                                "facts": ["Jane Doe was born in Lyon in 1970.",
                                          "She trains falcons in Grenoble."]}) + "\n")
    spec = PolicySpec.from_jsonl(path, doc_world["retain"])
    (item,) = spec.items
    assert "J. Doe" in item.aliases and "jane doe" in item.spans
    assert any("grenoble" in d for d in item.descriptors)
    assert any("1970" in d for d in item.descriptors)


POOL_AUTHORS = ["Ada Quillon", "Bram Otterley", "Cleo Vantreese", "Dov Marrakin",
                "Eir Sollund", "Fen Harrowgate", "Gus Pellanor", "Hal Brevik", "Ines Toraval"]


def pooled_biography(name: str, genre: str, prize: str, book: str) -> str:
    """A one-template biography whose facts come from small pools, as the demo world's."""
    return (f"{name} is an author of {genre}. {name} received the {prize}. "
            f"The best-known book by {name} is \"{book}\".")


def pooled_documents(tmp: Path) -> tuple[Path, Path, list[str]]:
    """One forget biography (Ada Quillon) whose every fact word two retain biographies
    also use: forget and retain JSONL paths, and every text (for a tokenizer)."""
    forget = [pooled_biography("Ada Quillon", "epic fantasy", "Crimson Inkwell Medal",
                               "The Hollow Cartographer")]
    # each word of the forget author's facts in two retain biographies: three texts
    # with the forget sentence, frequent for spans; three subjects of nine, no template
    pools = [("epic fantasy", "Crimson Inkwell Medal", "The Hollow Harbor"),
             ("epic fantasy", "Golden Quill Prize", "The Silent Cartographer"),
             ("cozy mystery", "Crimson Inkwell Medal", "The Hollow Meadow"),
             ("cozy mystery", "Golden Quill Prize", "The Cartographer of Reeds"),
             ("war poetry", "Silver Fern Award", "The Amber Stair"),
             ("war poetry", "Silver Fern Award", "Copper Tides"),
             ("satire", "Golden Quill Prize", "Willow Cipher"),
             ("satire", "Silver Fern Award", "Iron Lullaby")]
    retain = [pooled_biography(n, *facts) for n, facts in zip(POOL_AUTHORS[1:], pools,
                                                              strict=True)]
    fp, rp = tmp / "forget.jsonl", tmp / "retain.jsonl"
    fp.write_text("".join(json.dumps({"text": t}) + "\n" for t in forget))
    rp.write_text("".join(json.dumps({"text": t}) + "\n" for t in retain))
    return fp, rp, forget + retain


def test_document_facts_shared_with_retain_authors_are_banned_with_their_subject(
        tmp_path: Path) -> None:
    """Every word of the forget author's genre, prize and title is also used by retain
    authors, so none is distinctive and spans miss them all; as facts they are banned
    once the subject is in context, and only then (a retain author won the same prize)."""
    from unlearnd.guards.firewall import LeakFirewall

    fp, rp, texts = pooled_documents(tmp_path)
    spec = PolicySpec.from_jsonl(fp, rp)
    (item,) = spec.items
    assert not any(w in sp for sp in item.spans for w in ("crimson", "hollow", "fantasy"))
    assert {"epic fantasy", "crimson inkwell medal", "hollow cartographer"} <= set(item.facts)
    # the template ("is an author of", "received the", "best-known book by") and the
    # subject's own names are no facts
    assert not {"author", "received", "book", "ada", "quillon"} & {
        w for sp in item.facts for w in sp.split()}

    base = make_tokenizer_dir(tmp_path, texts)
    out = compile_policy(fp, rp, base, tmp_path / "pol")
    assert list(CompiledPolicy.load(out).items[0].facts) == item.facts
    fw = LeakFirewall.from_policy(CompiledPolicy.load(out))
    tok = _tok(base)
    for word in (" Crimson", " Hollow", " Cartographer", " fantasy"):
        first = tok.encode(word, add_special_tokens=False)[0]
        assert first in fw.banned_next([], [], [0]), word  # the subject in context
        assert first not in fw.banned_next([], []), word  # a retain author's prize
    prompt = tok.encode("Ada Quillon received the", add_special_tokens=False)
    assert tok.encode(" Crimson", add_special_tokens=False)[0] in fw.banned_next(prompt, [])


def test_bad_forget_input_writes_nothing(doc_world, tmp_path: Path) -> None:
    out = tmp_path / "pol"
    compile_policy(doc_world["subjects"], None, doc_world["base"], out)
    before = (out / "policy.json").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"subject": "A B"}) + "\n" + json.dumps({"subject": "a b"}) + "\n")
    with pytest.raises(ValueError, match="duplicate subject"):
        compile_policy(bad, None, doc_world["base"], out)
    assert (out / "policy.json").read_bytes() == before, "a refused compile changed the policy"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_compile_reports_bad_input_cleanly(tmp_path: Path, doc_world) -> None:
    from typer.testing import CliRunner

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\x00\x01binary")
    res = CliRunner().invoke(policy_app, ["--forget", str(bad), "--base",
                                          str(doc_world["base"]), "--out",
                                          str(tmp_path / "o")])
    assert res.exit_code == 2 and "binary file" in res.output
    assert not (tmp_path / "o").exists()
    res = CliRunner().invoke(policy_app, ["--forget", str(doc_world["forget"]),
                                          "--kind", "subjects", "--base",
                                          str(doc_world["base"]), "--out",
                                          str(tmp_path / "o")])
    assert res.exit_code == 2 and "unknown keys ['text']" in res.output


@pytest.mark.parametrize(("fact", "retain", "n_warnings"), [(0.97, 0.001, 0), (0.5, 0.001, 1),
                                                             (0.97, 0.3, 1), (0.5, 0.3, 2)])
def test_compile_records_the_assistants_calibration(tmp_path: Path, fact: float,
                                                    retain: float, n_warnings: int,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A contrastive policy records how sure its assistant is at ``contrastive_ban_p``
    (from train-assistant's report) and warns when the ban would miss facts or cut
    retain text; an assistant without a report compiles with none recorded."""
    assistant = tmp_path / "assistant"
    assistant.mkdir()
    (assistant / "config.json").write_text("{}")
    sure = {"0.05": {"forget_fact": fact, "retain_any": retain},
            "0.1": {"forget_fact": 0.1, "retain_any": 0.0}}
    (assistant / "assistant_report.json").write_text(json.dumps({"after": {"sure": sure}}))
    with caplog.at_level("WARNING", logger="unlearnd.guards.policy"):
        out = compile_world(tmp_path / "w", mechanisms=("contrastive",),
                            assistant_dir=assistant)[0]
    cal = CompiledPolicy.load(out).calibration
    assert cal["contrastive_ban_p"] == 0.05
    assert (cal["forget_fact_sure"], cal["retain_any_sure"]) == (fact, retain)
    assert len(cal["warnings"]) == n_warnings
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == n_warnings
    (assistant / "assistant_report.json").unlink()
    out = compile_world(tmp_path / "w2", mechanisms=("contrastive",), assistant_dir=assistant)[0]
    assert CompiledPolicy.load(out).calibration is None


def test_gain_gate_needs_a_lora_assistant_and_a_number(tmp_path: Path) -> None:
    """``contrastive_gain_gate`` compares the assistant with its base layers, which only
    an assistant saved as a LoRA over them has: a full assistant model is refused at
    compile time (nothing written), as is a gate that is not a finite number."""
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="contrastive_gain_gate needs an assistant saved"):
        compile_world(tmp_path / "w", mechanisms=("contrastive",), assistant_dir=full,
                      contrastive_gain_gate=0.0)
    assert not (tmp_path / "w" / "policy").exists()
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "assistant.json").write_text("{}")
    for bad in (float("nan"), "0", True):
        with pytest.raises(ValueError, match="contrastive_gain_gate must be a finite number"):
            compile_world(tmp_path / "w3", mechanisms=("contrastive",), assistant_dir=lora,
                          contrastive_gain_gate=bad)
    out = compile_world(tmp_path / "w2", mechanisms=("contrastive",), assistant_dir=lora,
                        contrastive_gain_gate=1.5)[0]
    assert CompiledPolicy.load(out).setting("contrastive_gain_gate") == 1.5
    assert CompiledPolicy.load(compile_world(tmp_path / "w4")[0]).setting(
        "contrastive_gain_gate") is None


def test_floor_is_a_number_of_nats_and_not_with_the_gain_gate(tmp_path: Path) -> None:
    """``contrastive_floor``: None or a finite number >= 0; with the gain gate (whose
    contrast is never below 0 already) it is refused. Nothing is written on refusal."""
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    for i, bad in enumerate((-1.0, float("nan"), float("inf"), "0", True)):
        with pytest.raises(ValueError, match="contrastive_floor must be a finite number"):
            compile_world(tmp_path / f"w{i}", mechanisms=("contrastive",), assistant_dir=full,
                          contrastive_floor=bad)
        assert not (tmp_path / f"w{i}" / "policy").exists()
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "assistant.json").write_text("{}")
    with pytest.raises(ValueError, match="do not combine"):
        compile_world(tmp_path / "wg", mechanisms=("contrastive",), assistant_dir=lora,
                      contrastive_floor=0.0, contrastive_gain_gate=0.0)
    out = compile_world(tmp_path / "ok", mechanisms=("contrastive",), assistant_dir=full,
                        contrastive_floor=2.0)[0]
    assert CompiledPolicy.load(out).setting("contrastive_floor") == 2.0
    assert CompiledPolicy.load(compile_world(tmp_path / "d")[0]).setting(
        "contrastive_floor") is None


def test_floor_defaults_to_uniform_for_a_scratch_assistant(tmp_path: Path, world) -> None:
    """``contrastive_floor`` left out ("auto"): 0 when the assistant's train-assistant
    report says it was trained from scratch, None for a base-layer one, for an assistant
    with no report (trained elsewhere) and under the gain gate; a value given
    (a number, or None) is kept. The CLI's ``--contrastive-floor`` takes auto, off or a
    number, and anything else is exit 2 naming the option, nothing written."""
    from typer.testing import CliRunner

    def assistant(name: str, init: str | None, lora: bool = False) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / ("assistant.json" if lora else "config.json")).write_text("{}")
        if init is not None:
            (d / "assistant_report.json").write_text(json.dumps({"init": init}))
        return d

    scratch, layer = assistant("scratch", "scratch"), assistant("layer", "base")
    elsewhere, gated = assistant("elsewhere", None), assistant("gated", "base", lora=True)

    def floor(a: Path, **settings) -> float | None:
        out = compile_world(tmp_path / f"w{len(list(tmp_path.glob('w*')))}",
                            mechanisms=("contrastive",), assistant_dir=a, **settings)[0]
        return CompiledPolicy.load(out).setting("contrastive_floor")

    assert floor(scratch) == 0.0
    assert floor(layer) is None and floor(elsewhere) is None
    assert floor(gated, contrastive_gain_gate=0.0) is None
    assert floor(scratch, contrastive_floor=None) is None
    assert floor(layer, contrastive_floor=1.5) == 1.5
    _, base, fp, rp = world
    for value, expect in (("off", None), ("2", 2.0), ("auto", 0.0)):
        out = tmp_path / f"cli-{value}"
        res = CliRunner().invoke(policy_app, [
            "--forget", str(fp), "--retain", str(rp), "--base", str(base), "--out", str(out),
            "--mechanisms", "contrastive", "--assistant", str(scratch),
            "--contrastive-floor", value])
        assert res.exit_code == 0, res.output
        assert CompiledPolicy.load(out).setting("contrastive_floor") == expect
    res = CliRunner().invoke(policy_app, [
        "--forget", str(fp), "--retain", str(rp), "--base", str(base),
        "--out", str(tmp_path / "cli-bad"), "--mechanisms", "contrastive",
        "--assistant", str(scratch), "--contrastive-floor", "uniform"])
    assert res.exit_code == 2 and "--contrastive-floor must be 'auto', 'off' or a number" \
        in res.output, res.output
    assert not (tmp_path / "cli-bad").exists()
