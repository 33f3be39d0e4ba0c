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


@dataclass(frozen=True)
class GuardResult:
    """What the scope guard decided for one request, and what to send to the engine."""

    decision: str                  # "in_scope" | "out_of_scope" | "unguarded"
    reason: str
    score: float
    item: int
    subject: str | None
    extra_args: dict[str, Any]
    latency_s: float

    @property
    def in_scope(self) -> bool:
        return self.decision == "in_scope"


class GuardPipeline:
    """A compiled policy loaded in the API process, with its scope guard."""

    def __init__(self, policy: Any, scope: Any) -> None:
        self.policy = policy
        self.scope = scope
        self.mechanisms = tuple(sorted(policy.mechanisms))

    @classmethod
    def load(cls, policy_dir: str) -> GuardPipeline:
        from unlearnd.guards.firewall import LeakFirewall
        from unlearnd.guards.policy import CompiledPolicy
        from unlearnd.guards.scope import ScopeGuard

        try:
            policy = CompiledPolicy.load(policy_dir)
            scope = ScopeGuard(policy) if "refusal" in policy.mechanisms else None
            if "firewall" in policy.mechanisms:  # build it now: fail at activation, not later
                LeakFirewall.from_policy(policy)
        except Exception as e:  # noqa: BLE001 - any load failure rejects the version
            raise ValueError(f"policy at {policy_dir} cannot be loaded: {e}") from e
        return cls(policy, scope)

    def check(self, messages: list[dict], version: str, policy_dir: str) -> GuardResult:
        """Decide scope for the whole conversation and build the engine's extra_args."""
        from unlearnd.guards.refusal import render_refusal

        t0 = time.perf_counter()
        extra: dict[str, Any] = {
            "unlearnd_policy_dir": policy_dir,
            "unlearnd_version": version,
            "unlearnd_in_scope": 0,
            "unlearnd_item": -1,
        }
        if self.scope is None:
            return GuardResult("unguarded" if not self.mechanisms else "out_of_scope",
                               "The scope guard is off for this policy.", 0.0, -1, None, extra,
                               time.perf_counter() - t0)
        d = self.scope.check(messages)
        if d.in_scope:
            extra["unlearnd_in_scope"] = 1
            extra["unlearnd_item"] = int(d.item)
            extra["unlearnd_refusal_ids"] = self.policy.encode(render_refusal(self.policy, d))
        return GuardResult("in_scope" if d.in_scope else "out_of_scope", d.reason,
                           float(d.score), int(d.item), d.subject, extra,
                           time.perf_counter() - t0)

    def suppressions(self, prompt_ids: Sequence[int], output_ids: Sequence[int],
                     item: int = -1) -> int:
        """Decoding steps at which the firewall blocked a forget span (replayed on tokens)."""
        if "firewall" not in self.mechanisms:
            return 0
        from unlearnd.guards.firewall import replay_suppressions

        return int(replay_suppressions(self.policy, list(prompt_ids), list(output_ids), item))
