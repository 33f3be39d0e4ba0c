"""Every unlearnd Prometheus metric, defined once.

Prefix `unlearnd_`; labels are bounded (tenant names come from the registry, outcome
and mode from fixed sets), never request ids. The word "vllm" never appears in our
names: vLLM unregisters collectors whose names contain it. vLLM's own metrics live in
the same default registry, so `/metrics` serves both.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from unlearnd.serve.artifacts import REJECTION_CODES

OUTCOMES = ("ok", "client_error", "auth_error", "engine_error", "aborted", "guard_error",
            "rate_limited")
DECISIONS = ("in_scope", "out_of_scope", "unguarded")

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_GUARD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class UnlearndMetrics:
    """All our metrics, registered into one registry (the default one in production)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.requests = Counter(
            "unlearnd_requests_total", "Requests by tenant, endpoint and outcome.",
            ["tenant", "endpoint", "outcome"], registry=registry)
        self.request_latency = Histogram(
            "unlearnd_request_latency_seconds", "End-to-end request latency.",
            ["tenant"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram(
            "unlearnd_time_to_first_token_seconds", "Time to the first generated token.",
            ["tenant"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter(
            "unlearnd_prompt_tokens_total", "Prompt tokens.", ["tenant"], registry=registry)
        self.generation_tokens = Counter(
            "unlearnd_generation_tokens_total", "Generated tokens.", ["tenant"],
            registry=registry)
        self.swaps = Counter(
            "unlearnd_policy_swaps_total", "Policy activations and rollbacks.",
            ["tenant", "kind"], registry=registry)
        self.swap_duration = Histogram(
            "unlearnd_policy_swap_duration_seconds",
            "Time from an activation request to the new version serving.", ["tenant"],
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.propagation = Histogram(
            "unlearnd_policy_propagation_seconds",
            "Time from a version's activation in the shared registry (through any replica) "
            "to this replica routing every new request to it (a request that arrives "
            "while the version's adapter is still loading here waits for the load); wall "
            "clocks, so replicas' clocks must agree.",
            ["tenant"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.adapter_rejections = Counter(
            "unlearnd_adapter_rejections_total", "Artifacts rejected at registration.",
            ["tenant", "reason"], registry=registry)
        self.scope_decisions = Counter(
            "unlearnd_scope_decisions_total", "Scope guard decisions.",
            ["tenant", "decision"], registry=registry)
        self.refusals = Counter(
            "unlearnd_refusals_total", "Requests answered with the policy's refusal.",
            ["tenant"], registry=registry)
        self.suppressed_tokens = Counter(
            "unlearnd_firewall_suppressed_tokens_total",
            "Decoding steps at which the leak firewall blocked a forget span.",
            ["tenant"], registry=registry)
        self.guard_latency = Histogram(
            "unlearnd_guard_latency_seconds", "Scope guard latency per request.",
            ["tenant"], buckets=_GUARD_BUCKETS, registry=registry)
        self.guard_failures = Counter(
            "unlearnd_guard_failures_total", "Requests refused because a guard failed.",
            ["tenant"], registry=registry)
        self.active_requests = Gauge(
            "unlearnd_active_requests", "Requests in flight.", ["tenant"], registry=registry)
        self.policy_info = Gauge(
            "unlearnd_active_policy_info", "1 for the active policy version of a tenant.",
            ["tenant", "version"], registry=registry)

    def init_tenant(self, tenant: str) -> None:
        """Create every label set of a tenant at zero so dashboards see it at once."""
        for outcome in OUTCOMES:
            for endpoint in ("chat", "completions"):
                self.requests.labels(tenant, endpoint, outcome)
        for decision in DECISIONS:
            self.scope_decisions.labels(tenant, decision)
        for m in (self.request_latency, self.ttft, self.prompt_tokens, self.generation_tokens,
                  self.refusals, self.suppressed_tokens, self.guard_latency,
                  self.guard_failures, self.active_requests, self.swap_duration,
                  self.propagation):
            m.labels(tenant)
        for kind in ("activate", "rollback", "deactivate", "sync"):
            self.swaps.labels(tenant, kind)
        # every rejection reason at zero: a tenant's first rejection is then a rise that
        # increase() and the alert see (a series born at 1 shows no increase)
        for code in (*REJECTION_CODES, "load_failed"):
            self.adapter_rejections.labels(tenant, code)

    def set_active(self, tenant: str, version: str | None, previous: str | None) -> None:
        if previous:
            try:
                self.policy_info.remove(tenant, previous)
            except KeyError:
                pass
        if version:
            self.policy_info.labels(tenant, version).set(1)
