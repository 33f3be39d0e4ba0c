"""Reasoned refusals: the text, and the decode-time steering onto it.

When the scope guard puts a request in scope and the policy has the ``refusal``
mechanism, the API process renders the refusal (:func:`render_refusal`), tokenises it
with the base model's tokenizer (:func:`refusal_token_ids`) and sends the ids to the
engine (``unlearnd_refusal_ids``). There, each step, :class:`RefusalSteering` names the
one token to push and the logits processor adds ``refusal_strength`` (default 30) to
that token's logit, which makes it the argmax and, at ordinary temperatures, the
sampled token. The model's own logits are left alone otherwise, so the sampler still
sees a valid distribution.

Steering rule (``cursor`` = how many refusal tokens have been produced so far):

1. Each new output token equal to ``refusal[cursor]`` advances the cursor.
2. A different token (a sampled outlier) is a *divergence*. We look for the longest
   suffix (up to 8 tokens) of the output that equals a run of the refusal ending at
   some position ``p``, preferring, among the longest, the first ``p`` at or after the
   cursor; the cursor moves to ``p``, i.e. we continue right after the text the model
   actually produced. With no such run the divergent token is taken as a substitute
   for ``refusal[cursor]`` and the cursor still advances by one. Either way the
   remaining refusal only shrinks unless the model produced refusal text again, so
   the response ends.
3. The pushed token is ``refusal[cursor]``, or EOS once the cursor reaches the end.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unlearnd.guards.policy import CompiledPolicy
    from unlearnd.guards.scope import ScopeDecision

logger = logging.getLogger(__name__)

__all__ = ["render_refusal", "refusal_token_ids", "RefusalSteering"]

_MAX_SUFFIX = 8


def render_refusal(policy: CompiledPolicy, decision: ScopeDecision) -> str:
    """The policy's refusal template filled for ``decision``.

    ``{subject}`` is the matched subject ("the requested subject" when none),
    ``{reason}`` the decision's one-sentence reason, ``{policy}`` the policy name.
    """
    from unlearnd.guards.policy import DEFAULT_REFUSAL_TEMPLATE

    template = policy.setting("refusal_template", DEFAULT_REFUSAL_TEMPLATE)
    subject = decision.subject or "the requested subject"
    reason = decision.reason.strip() or f"The request is about {subject}."
    text = template.format(subject=subject, reason=reason, policy=policy.name)
    return " ".join(text.split())


def refusal_token_ids(policy: CompiledPolicy, decision: ScopeDecision) -> list[int]:
    """Token ids of :func:`render_refusal` with the policy's copy of the base tokenizer."""
    return policy.encode(render_refusal(policy, decision))


class RefusalSteering:
    """Per-request refusal cursor (see the module docstring for the rule).

    Args:
        refusal_ids: token ids of the rendered refusal (non-empty ints >= 0).
        eos_token_id: token pushed once the refusal is complete.
        strength: logit bias added to the pushed token (> 0).
    """

    def __init__(self, refusal_ids: Sequence[int], eos_token_id: int,
                 strength: float = 30.0) -> None:
        ids = list(refusal_ids)
        if not ids or any(not isinstance(t, int) or t < 0 for t in ids):
            raise ValueError(f"refusal_ids must be a non-empty list of ints >= 0, got {ids!r}")
        if not isinstance(eos_token_id, int) or eos_token_id < 0:
            raise ValueError(f"eos_token_id must be an int >= 0, got {eos_token_id!r}")
        if not strength > 0:
            raise ValueError(f"strength must be > 0, got {strength!r}")
        self.refusal = ids
        self.eos_token_id = eos_token_id
        self.strength = float(strength)
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

    def step(self, output_ids: Sequence[int]) -> tuple[int, float]:
        """``(token_id, bias)`` to apply given the request's output so far.

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
            return self.eos_token_id, self.strength
        return self.refusal[self.cursor], self.strength

    @property
    def done(self) -> bool:
        """True once every refusal token has been produced (EOS is pushed next)."""
        return self.cursor >= len(self.refusal)
