"""Per-tenant rate and concurrency limits: a token bucket and a counter per tenant.

One tenant's burst must not starve the others in a shared batch, so every OpenAI
request passes `TenantLimiter.check_and_acquire(tenant)` before it touches the guard
or the engine. Over the limit the call raises `LimitExceeded` (an `APIError` with
status 429, OpenAI type `rate_limit_error`, and a `Retry-After` in seconds); under it
the call returns a release callable that the caller runs exactly once when the
request ends (non-streaming: after the body is built; streaming: when the SSE
generator finishes, fails or is closed by a disconnect; `wrap_stream` does that).

Rate: a token bucket holding at most `burst` tokens, refilled at `requests_per_s`;
one request takes one token. Concurrency: at most `max_concurrent` requests of a
tenant in flight. Either may be None (no limit). Messages name only the caller's own
limit, never another tenant, so a 429 tells a tenant nothing about anyone else.

Everything is in memory and per process: with several replicas each enforces its own
share (set the limits per replica).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from unlearnd.serve.errors import APIError

logger = logging.getLogger(__name__)

Release = Callable[[], None]


@dataclass(frozen=True)
class TenantLimits:
    """Limits of one tenant.

    `requests_per_s`: sustained request rate (None: no rate limit). `burst`: requests
    that may arrive at once after an idle spell (bucket size; None: `max(1,
    ceil(requests_per_s))`). `max_concurrent`: requests in flight at once (None: no
    limit).
    """

    requests_per_s: float | None = None
    burst: int | None = None
    max_concurrent: int | None = None

    def __post_init__(self) -> None:
        r = self.requests_per_s
        if r is not None and (isinstance(r, bool) or not isinstance(r, int | float)
                              or not math.isfinite(r) or r <= 0):
            raise ValueError(f"requests_per_s must be a positive number or None, got {r!r}")
        b = self.burst
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"burst must be an int >= 1 or None, got {b!r}")
        if b is not None and r is None:
            raise ValueError(f"burst={b!r} needs requests_per_s")
        c = self.max_concurrent
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"max_concurrent must be an int >= 1 or None, got {c!r}")

    @property
    def bucket_size(self) -> float:
        """Tokens the bucket holds when full (only meaningful with a rate)."""
        if self.burst is not None:
            return float(self.burst)
        return float(max(1, math.ceil(self.requests_per_s or 1)))

    @property
    def unlimited(self) -> bool:
        return self.requests_per_s is None and self.max_concurrent is None


class LimitExceeded(APIError):
    """429 for one tenant's request: over its rate or its concurrency limit.

    `retry_after_s`: seconds after which a retry can succeed (rate: exact, from the
    bucket; concurrency: a hint, 1 s). `headers` is what the response must carry.
    """

    def __init__(self, message: str, *, code: str, retry_after_s: float) -> None:
        super().__init__(429, message, type="rate_limit_error", code=code)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        # Retry-After takes whole seconds (RFC 9110); round up so a retry is never early.
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


@dataclass
class _TenantState:
    tokens: float
    stamp: float
    in_flight: int = 0


class TenantLimiter:
    """Token bucket + in-flight counter per tenant.

    `default`: limits of a tenant without its own entry in `per_tenant`. `clock`: a
    monotonic clock in seconds (tests pass a fake). Thread-safe (one lock; each call is
    a few arithmetic operations).
    """

    def __init__(self, default: TenantLimits | None = None,
                 per_tenant: Mapping[str, TenantLimits] | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        default = default if default is not None else TenantLimits()
        if not isinstance(default, TenantLimits):
            raise ValueError(f"default must be a TenantLimits, got {default!r}")
        per_tenant = dict(per_tenant or {})
        for name, lim in per_tenant.items():
            if not isinstance(lim, TenantLimits):
                raise ValueError(f"limits of tenant {name!r} must be a TenantLimits, "
                                 f"got {lim!r}")
        if not callable(clock):
            raise ValueError(f"clock must be callable, got {clock!r}")
        self.default = default
        self.per_tenant = per_tenant
        self._clock = clock
        self._lock = threading.Lock()
        self._state: dict[str, _TenantState] = {}

    @classmethod
    def from_config(cls, limits: Any, tenants: Iterable[Any] = ()) -> TenantLimiter:
        """Build from a `LimitsConfig` and `TenantConfig`s (fields read with defaults).

        Proposed config fields (absent fields mean "no limit"):
        `LimitsConfig.tenant_requests_per_s`, `.tenant_burst`, `.tenant_max_concurrent`
        (defaults for every tenant), and per tenant `TenantConfig.requests_per_s`,
        `.burst`, `.max_concurrent` (override the defaults for that tenant).
        """
        default = TenantLimits(getattr(limits, "tenant_requests_per_s", None),
                               getattr(limits, "tenant_burst", None),
                               getattr(limits, "tenant_max_concurrent", None))
        per: dict[str, TenantLimits] = {}
        for t in tenants:
            own = {k: getattr(t, k, None) for k in ("requests_per_s", "burst", "max_concurrent")}
            if any(v is not None for v in own.values()):
                per[t.name] = TenantLimits(
                    own["requests_per_s"] if own["requests_per_s"] is not None
                    else default.requests_per_s,
                    own["burst"] if own["burst"] is not None else (
                        default.burst if own["requests_per_s"] is None else None),
                    own["max_concurrent"] if own["max_concurrent"] is not None
                    else default.max_concurrent)
        return cls(default, per)

    def limits_for(self, tenant: str) -> TenantLimits:
        return self.per_tenant.get(tenant, self.default)

    def in_flight(self, tenant: str) -> int:
        """Requests of `tenant` holding a slot now."""
        with self._lock:
            st = self._state.get(tenant)
            return st.in_flight if st else 0

    def forget(self, tenant: str) -> None:
        """Drop a deleted tenant's state (in-flight releases stay harmless)."""
        with self._lock:
            self._state.pop(tenant, None)

    def check_and_acquire(self, tenant: str) -> Release:
        """Admit one request of `tenant` or raise `LimitExceeded` (429, Retry-After).

        Returns a release callable; calling it more than once is a no-op, so it is safe
        in both a `finally` and a disconnect handler. A rejected request takes neither
        a token nor a slot.
        """
        lim = self.limits_for(tenant)
        if lim.unlimited:
            return _noop
        with self._lock:
            now = self._clock()
            st = self._state.get(tenant)
            if st is None:
                st = self._state[tenant] = _TenantState(lim.bucket_size, now)
            if lim.max_concurrent is not None and st.in_flight >= lim.max_concurrent:
                raise LimitExceeded(
                    f"too many concurrent requests for this API key: the limit is "
                    f"{lim.max_concurrent} in flight", code="concurrency_limit_exceeded",
                    retry_after_s=1.0)
            if lim.requests_per_s is not None:
                size = lim.bucket_size
                st.tokens = min(size, st.tokens + (now - st.stamp) * lim.requests_per_s)
                st.stamp = now
                if st.tokens < 1.0:
                    wait = (1.0 - st.tokens) / lim.requests_per_s
                    raise LimitExceeded(
                        f"rate limit exceeded for this API key: {lim.requests_per_s:g} "
                        f"requests/s (burst {size:g}); retry in {wait:.2f} s",
                        code="rate_limit_exceeded", retry_after_s=wait)
                st.tokens -= 1.0
            st.in_flight += 1
        done = False

        def release() -> None:
            nonlocal done
            with self._lock:
                if done:
                    return
                done = True
                cur = self._state.get(tenant)
                if cur is st and st.in_flight > 0:
                    st.in_flight -= 1

        return release


def _noop() -> None:
    return None


async def wrap_stream(stream: AsyncIterator[Any], release: Release) -> AsyncIterator[Any]:
    """Yield from `stream`, running `release` once it ends however it ends (done,
    failed, or closed by a client disconnect)."""
    try:
        async for item in stream:
            yield item
    finally:
        release()
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()
