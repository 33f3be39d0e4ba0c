"""Reasoned refusals: the text, and the decode-time forcing onto it.

When the scope guard puts a request in scope and the policy has the ``refusal``
mechanism, the API process renders the refusal (:func:`render_refusal`), tokenises it
with the base model's tokenizer (:func:`refusal_token_ids`) and sends the ids to the
engine (``unlearnd_refusal_ids``). There, each step, :class:`RefusalSteering` names the
one token the row must produce and the logits processor *forces* it: every other
logit becomes ``-inf`` and that one ``0``. It is a hard constraint, not a bias: the
processor runs after vLLM's allowed-token mask, bad words, min-tokens and the client's
``logit_bias``, and what runs after it (penalties, temperature, min-p, top-k/top-p)
cannot revive a ``-inf`` logit nor demote the only finite one. Returned logprobs
(vLLM ``processed_logprobs``) are then 0 for the forced token and ``-inf`` for every
alternative: a refused request shows nothing of the model's own distribution.

What a refusal says (:func:`render_refusal`) reveals only what the user said: the
subject is named only when the conversation names it (``decision.named``; the user's
own words, ``decision.mention``), else the policy's ``refusal_unnamed_subject`` ("the
person you describe"); ``{reason}`` is the scope guard's public reason (never the
subject behind a nameless question); the policy's internal name appears only when the
template asks for ``{policy}``. With ``refusal_style = "ignorant"`` the refusal is the
policy's ``ignorant_template`` instead: the answer of a model that never knew (no
reason, no confirmation that anything was removed).

Steering rule (``cursor`` = how many refusal tokens have been produced so far):

1. Each new output token equal to ``refusal[cursor]`` advances the cursor.
2. A different token (only possible when the engine did not apply our forcing, e.g.
   a preempted request recomputed elsewhere) is a *divergence*. We look for the
   longest suffix (up to 8 tokens) of the output that equals a run of the refusal
   ending at some position ``p``, preferring, among the longest, the first ``p`` at or
   after the cursor; the cursor moves to ``p``. With no such run the divergent token
   is taken as a substitute for ``refusal[cursor]`` and the cursor still advances by
   one. Either way the response ends.
3. The forced token is ``refusal[cursor]``, or EOS once the cursor reaches the end.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unlearnd.guards.policy import CompiledPolicy
    from unlearnd.guards.scope import ScopeDecision

logger = logging.getLogger(__name__)

__all__ = ["render_refusal", "refusal_subject", "refusal_token_ids", "RefusalSteering"]

_MAX_SUFFIX = 8


def refusal_subject(policy: CompiledPolicy, decision: ScopeDecision) -> str:
    """How a refusal may refer to the subject: the user's own words when the
    conversation names it, else the policy's ``refusal_unnamed_subject``."""
    from unlearnd.guards.policy import DEFAULT_UNNAMED_SUBJECT

    mention = getattr(decision, "mention", None) if getattr(decision, "named", False) else None
    if isinstance(mention, str) and mention.strip():
        from unlearnd.guards.normalize import visible

        # the user's words, without bidi overrides or zero-width characters that
        # could reorder or hide parts of our text
        return " ".join(visible(mention).split())
    return str(policy.setting("refusal_unnamed_subject", DEFAULT_UNNAMED_SUBJECT))


def render_refusal(policy: CompiledPolicy, decision: ScopeDecision) -> str:
    """The policy's refusal filled for ``decision``, revealing only what the user said.

    ``refusal_style = "explained"`` (default): ``refusal_template`` with ``{subject}``
    = :func:`refusal_subject`, ``{reason}`` = the decision's public reason and
    ``{policy}`` = the policy name (the default template does not use it).
    ``"ignorant"``: ``ignorant_template`` with ``{subject}`` only.
    """
    from unlearnd.guards.policy import DEFAULT_IGNORANT_TEMPLATE, DEFAULT_REFUSAL_TEMPLATE

    subject = refusal_subject(policy, decision)
    if policy.setting("refusal_style", "explained") == "ignorant":
        template = policy.setting("ignorant_template", DEFAULT_IGNORANT_TEMPLATE)
        return " ".join(template.format(subject=subject).split())
    template = policy.setting("refusal_template", DEFAULT_REFUSAL_TEMPLATE)
    reason = decision.reason.strip() or "The request falls under this policy."
    text = template.format(subject=subject, reason=reason, policy=policy.name)
    return " ".join(text.split())


def refusal_token_ids(policy: CompiledPolicy, decision: ScopeDecision) -> list[int]:
    """Token ids of :func:`render_refusal` with the policy's copy of the base tokenizer."""
    return policy.encode_reply(render_refusal(policy, decision))


class RefusalSteering:
    """Per-request refusal cursor (see the module docstring for the rule).

    Args:
        refusal_ids: token ids of the rendered refusal (non-empty ints >= 0).
        eos_token_id: token forced once the refusal is complete.
    """

    def __init__(self, refusal_ids: Sequence[int], eos_token_id: int) -> None:
        ids = list(refusal_ids)
        if not ids or any(not isinstance(t, int) or t < 0 for t in ids):
            raise ValueError(f"refusal_ids must be a non-empty list of ints >= 0, got {ids!r}")
        if not isinstance(eos_token_id, int) or eos_token_id < 0:
            raise ValueError(f"eos_token_id must be an int >= 0, got {eos_token_id!r}")
        self.refusal = ids
        self.eos_token_id = eos_token_id
        self.cursor = 0
        self._seen = 0
        self.divergences = 0

    def _resync(self, output: Sequence[int]) -> None:
        """After a divergence, move the cursor to just after the longest matching run."""
        ref = self.refusal
        n = len(output)
        for m in range(min(_MAX_SUFFIX, n, len(ref)), 0, -1):
            tail = list(output[n - m:])
            ends = [p for p in range(m, len(ref) + 1) if ref[p - m:p] == tail]
            if ends:
                ahead = [p for p in ends if p >= self.cursor]
                self.cursor = ahead[0] if ahead else ends[0]
                return
        self.cursor = min(self.cursor + 1, len(ref))

    def step(self, output_ids: Sequence[int]) -> int:
        """The token id to force given the request's output so far.

        ``output_ids`` is the request's full output list; only tokens appended since
        the previous call are examined (O(new tokens) when the model follows).
        """
        if len(output_ids) < self._seen:  # preempted and restarted: start over
            self.cursor, self._seen = 0, 0
        for k in range(self._seen, len(output_ids)):
            tok = output_ids[k]
            if self.cursor >= len(self.refusal):
                continue  # complete: keep pushing EOS whatever was sampled
            if tok == self.refusal[self.cursor]:
                self.cursor += 1
            else:
                self.divergences += 1
                self._resync(output_ids[:k + 1])
        self._seen = len(output_ids)
        if self.cursor >= len(self.refusal):
            return self.eos_token_id
        return self.refusal[self.cursor]

    @property
    def done(self) -> bool:
        """True once every refusal token has been produced (EOS is pushed next)."""
        return self.cursor >= len(self.refusal)
