"""HMAC signing of the per-request guard arguments (unlearnd.guards.signing)."""

from __future__ import annotations

import os

import pytest

from unlearnd.guards.signing import KEY_ENV, SIG_KEY, ensure_key, env_key, sign, verify

KEY = bytes(range(32))
EXTRA = {"unlearnd_policy_dir": "/store/acme@abc/policy", "unlearnd_version": "acme@abc",
         "unlearnd_in_scope": 1, "unlearnd_item": 0, "unlearnd_refusal_ids": [5, 6, 7],
         "unlearnd_mentioned": [0]}


def test_ensure_key_creates_exports_and_reuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    key = ensure_key()
    assert len(key) == 32 and bytes.fromhex(os.environ[KEY_ENV]) == key
    assert ensure_key() == key and env_key() == key  # once per process
    monkeypatch.setenv(KEY_ENV, KEY.hex())
    assert ensure_key() == KEY and env_key() == KEY


def test_env_key_absent_or_bad_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert env_key() is None
    for raw in ("", "not-hex"):
        monkeypatch.setenv(KEY_ENV, raw)
        assert env_key() is None


def test_sign_adds_a_signature_and_copies() -> None:
    signed = sign(EXTRA, KEY)
    assert SIG_KEY not in EXTRA and signed is not EXTRA
    assert {k: v for k, v in signed.items() if k != SIG_KEY} == EXTRA
    assert isinstance(signed[SIG_KEY], str) and len(signed[SIG_KEY]) == 64
    assert verify(signed, KEY)
    assert sign(signed, KEY) == signed  # re-signing replaces the old signature
    assert sign({**signed, SIG_KEY: "junk"}, KEY) == signed
    assert verify(sign({}, KEY), KEY)  # an empty set of arguments can be signed too


def test_signature_does_not_depend_on_key_order() -> None:
    reordered = dict(reversed(list(EXTRA.items())))
    assert sign(reordered, KEY)[SIG_KEY] == sign(EXTRA, KEY)[SIG_KEY]


@pytest.mark.parametrize("change", [
    {"unlearnd_in_scope": 0}, {"unlearnd_item": -1}, {"unlearnd_refusal_ids": [5, 6]},
    {"unlearnd_policy_dir": "/elsewhere"}, {"unlearnd_version": "globex@abc"},
    {"unlearnd_mentioned": []}, {"unlearnd_new": 1}])
def test_any_changed_or_added_value_breaks_the_signature(change: dict) -> None:
    assert not verify({**sign(EXTRA, KEY), **change}, KEY)


def test_removed_value_breaks_the_signature() -> None:
    signed = sign(EXTRA, KEY)
    del signed["unlearnd_item"]
    assert not verify(signed, KEY)


def test_other_keys_are_refused_even_beside_a_valid_signature() -> None:
    """A client cannot add keys of its own beside signed ones (they are not covered)."""
    signed = sign(EXTRA, KEY)
    assert not verify({**signed, "temperature_hint": 1}, KEY)
    assert not verify(sign({**EXTRA, "other": 1}, KEY), KEY)


@pytest.mark.parametrize("extra", [None, {}, dict(EXTRA), {SIG_KEY: 123, **EXTRA},
                                   {SIG_KEY: None}, {SIG_KEY: ""}])
def test_missing_or_malformed_signature_is_refused(extra) -> None:
    assert not verify(extra, KEY)


def test_wrong_key_is_refused() -> None:
    assert not verify(sign(EXTRA, KEY), b"\x00" * 32)
    assert not verify(sign(EXTRA, b"\x00" * 32), KEY)
