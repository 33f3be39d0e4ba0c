"""Authenticated per-request guard arguments: only the tenant edge can issue them.

The edge (``unlearnd.serve.edge``) puts the guard's arguments into the request's
``vllm_xargs`` (vLLM's ``SamplingParams.extra_args``). Any other generating path
(a client's own ``vllm_xargs``, a route vLLM adds in an upgrade, beam search, which
builds its SamplingParams without extra_args) must not run unguarded or with
arguments of the client's choosing. So the edge signs the ``unlearnd_*`` values with
an HMAC-SHA256 under a per-process secret, and the logits processor serves only
requests whose signature checks: every other request is forced to EOS.

The secret is born in the serving process (``ensure_key``) and reaches vLLM's
engine-core process through the environment (the engine is spawned after it is set);
it is never written to disk and never leaves the two processes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from typing import Any

KEY_ENV = "UNLEARND_XARGS_KEY"
SIG_KEY = "unlearnd_sig"
PREFIX = "unlearnd_"


def ensure_key() -> bytes:
    """This process's signing key; created (and exported for child processes) once."""
    if not os.environ.get(KEY_ENV):
        os.environ[KEY_ENV] = secrets.token_hex(32)
    return bytes.fromhex(os.environ[KEY_ENV])


def env_key() -> bytes | None:
    """The key the serving process exported, or None (no edge: trust nothing signed)."""
    raw = os.environ.get(KEY_ENV)
    if not raw:
        return None
    try:
        return bytes.fromhex(raw)
    except ValueError:
        return None


def _canonical(extra: Mapping[str, Any]) -> bytes:
    items = {k: v for k, v in extra.items() if k.startswith(PREFIX) and k != SIG_KEY}
    return json.dumps(items, sort_keys=True, separators=(",", ":")).encode()


def sign(extra: Mapping[str, Any], key: bytes) -> dict[str, Any]:
    """``extra`` with its ``unlearnd_sig`` added (a new dict)."""
    out = {k: v for k, v in extra.items() if k != SIG_KEY}
    out[SIG_KEY] = hmac.new(key, _canonical(out), hashlib.sha256).hexdigest()
    return out


def verify(extra: Mapping[str, Any] | None, key: bytes) -> bool:
    """True when ``extra`` carries a valid signature over its ``unlearnd_*`` values,
    and nothing else (a client cannot add keys beside signed ones)."""
    if not extra or not isinstance(extra.get(SIG_KEY), str):
        return False
    if any(not k.startswith(PREFIX) for k in extra):
        return False
    want = hmac.new(key, _canonical(extra), hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, extra[SIG_KEY])
