"""The API-process half of the guards: scope decision, refusal tokens, extra_args.

The engine half (refusal steering, firewall, contrastive decoding) runs in
`unlearnd.guards.processor` inside the engine process; the two meet through
`SamplingParams.extra_args` (docs/ARCHITECTURE.md has the keys).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

OUT_OF_SCOPE_REASON = "The request is outside this policy's scope."
"""The public reason of every out-of-scope decision (the internal one stays in logs)."""


@dataclass(frozen=True)
class GuardResult:
    """What the scope guard decided for one request, and what to send to the engine."""

    decision: str                  # "in_scope" | "out_of_scope" | "unguarded"
    reason: str                    # public: reveals nothing the user did not say
    score: float
    item: int                      # internal: the matched forget item (-1: none)
    subject: str | None            # internal: that item's subject
    extra_args: dict[str, Any]
    latency_s: float
    named: bool = False            # the conversation itself names the subject
    mention: str | None = None     # ... in these words (the user's own)
    internal_reason: str = ""      # for logs: may name the subject behind the question
    disclose: bool = True          # False: refusal_style "ignorant", no per-request detail
    refusal_text: str | None = None  # refused: the rendered refusal (its ids are in extra)

    @property
    def in_scope(self) -> bool:
        return self.decision == "in_scope"

    @property
    def refused(self) -> bool:
        """In scope and answered with the refusal (not an in-scope completion the policy
        continues under the firewall: ``in_scope_completions: continue``)."""
        return self.in_scope and self.refusal_text is not None

    def public(self) -> dict[str, Any]:
        """What the response's ``unlearning`` block may say about the decision: no more
        than the text does. In scope: the public reason and the subject only as the
        user named it. Out of scope: a fixed sentence, no score (a score or a "weakly
        resembles" reason would be an oracle: it tells which guessed details belong to
        a removed subject). Nothing at all for a policy whose refusals must be
        indistinguishable from not knowing (``refusal_style: ignorant``)."""
        if not self.disclose:
            return {"decision": None, "reason": None, "matched_item": None, "subject": None}
        if not self.in_scope:
            return {"decision": self.decision, "reason": OUT_OF_SCOPE_REASON
                    if self.decision == "out_of_scope" else None,
                    "matched_item": None, "subject": None}
        return {"decision": self.decision, "reason": self.reason,
                "matched_item": self.item if self.named and self.item >= 0 else None,
                "subject": self.mention if self.named else None}


class GuardPipeline:
    """A compiled policy loaded in the API process, with its scope guard."""

    def __init__(self, policy: Any, scope: Any, mentions: Any = None) -> None:
        self.policy = policy
        self.scope = scope
        self.mentions = mentions if mentions is not None else scope
        """Names subjects for the firewall (a ScopeGuard; the scope guard itself when on)."""
        self.mechanisms = tuple(sorted(policy.mechanisms))

    @classmethod
    def load(cls, policy_dir: str) -> GuardPipeline:
        from unlearnd.guards.firewall import LeakFirewall
        from unlearnd.guards.policy import CompiledPolicy
        from unlearnd.guards.scope import ScopeGuard

        try:
            policy = CompiledPolicy.load(policy_dir)
            scope = ScopeGuard(policy) if "refusal" in policy.mechanisms else None
            mentions = None
            if "firewall" in policy.mechanisms:  # build it now: fail at activation, not later
                LeakFirewall.from_policy(policy)
                mentions = scope or ScopeGuard(policy)
        except Exception as e:  # noqa: BLE001 - any load failure rejects the version
            raise ValueError(f"policy at {policy_dir} cannot be loaded: {e}") from e
        return cls(policy, scope, mentions)

    def check(self, messages: list[dict], version: str, policy_dir: str,
              kind: str = "chat") -> GuardResult:
        """Decide scope for the whole conversation and build the engine's extra_args.

        ``kind`` is the endpoint ("chat", "completions", "responses"): an in-scope
        completion is continued, not refused, under ``in_scope_completions: continue``
        (the engine gets ``unlearnd_in_scope`` 0 and the matched item among the
        mentioned ones, so the firewall bans its spans whatever the context)."""
        from unlearnd.guards.refusal import render_refusal

        t0 = time.perf_counter()
        extra: dict[str, Any] = {
            "unlearnd_policy_dir": policy_dir,
            "unlearnd_version": version,
            "unlearnd_in_scope": 0,
            "unlearnd_item": -1,
        }
        disclose = self.policy.setting("refusal_style", "explained") != "ignorant"
        firewall = self.mentions is not None and "firewall" in self.mechanisms
        if self.scope is None:
            if firewall:
                extra["unlearnd_mentioned"] = self.mentions.named_items(messages)
            return GuardResult("unguarded" if not self.mechanisms else "out_of_scope",
                               "The scope guard is off for this policy.", 0.0, -1, None, extra,
                               time.perf_counter() - t0, disclose=disclose)
        d = self.scope.check(messages)
        if firewall:  # the same alias matches, found once by the decision
            extra["unlearnd_mentioned"] = list(d.named_items)
        refusal = None
        if d.in_scope and kind == "completions" and firewall and \
                self.policy.setting("in_scope_completions", "refuse") == "continue":
            if int(d.item) >= 0:
                extra["unlearnd_mentioned"] = sorted({*extra["unlearnd_mentioned"],
                                                      int(d.item)})
        elif d.in_scope:
            extra["unlearnd_in_scope"] = 1
            extra["unlearnd_item"] = int(d.item)
            refusal = render_refusal(self.policy, d)
            extra["unlearnd_refusal_ids"] = self.policy.encode_reply(refusal)
        return GuardResult("in_scope" if d.in_scope else "out_of_scope", d.reason,
                           float(d.score), int(d.item), d.subject, extra,
                           time.perf_counter() - t0, named=d.named, mention=d.mention,
                           internal_reason=d.internal_reason, disclose=disclose,
                           refusal_text=refusal)

    @property
    def top_logprobs_allowed(self) -> bool:
        """False when the policy withholds top alternatives (``top_logprobs: deny``)."""
        return self.policy.setting("top_logprobs", "allow") != "deny"

    def suppressions(self, prompt_ids: Sequence[int], output_ids: Sequence[int],
                     item: int = -1) -> int:
        """Decoding steps at which the firewall blocked a forget span (replayed on tokens)."""
        if "firewall" not in self.mechanisms:
            return 0
        from unlearnd.guards.firewall import replay_suppressions

        return int(replay_suppressions(self.policy, list(prompt_ids), list(output_ids), item))
