"""Circuit breakers per (provider, model), in one worker process.

A breaker stops a worker from sending requests to a model that is failing: after `failure_threshold`
consecutive failures it OPENS and refuses calls (`allow()` is False) for `cooldown_s`; then it turns
HALF_OPEN and lets exactly one probe call through at a time. The probe's verdict decides: a success CLOSES
the breaker (failures and cooldown reset); a failure re-OPENS it with the cooldown doubled (capped at
`max_cooldown_s`). A probe that ends without a verdict calls `release()` so the next caller may probe.

What counts as a failure is the caller's decision; the intended rule:

- failures (`record_failure`): HTTP 5xx, connection errors, timeouts (ProviderUnavailable, ProviderTimeout):
  the provider or model is unhealthy;
- successes (`record_success`): the provider answered with a usable response; invalid model output (JSON
  that fails the schema) counts as an answer too;
- no verdict (`release`): 429 (RateLimited: the rate limiter and its `penalize` handle it), permanent 4xx
  (ProviderRejected: the request was bad, the model may be fine), a cancelled call or a local error before
  the request went out. `release()` neither counts nor closes; if the call was the half-open probe it lets
  another probe through. (In CLOSED state it is a no-op: the consecutive-failure run is not reset.)

Breakers are in-process on purpose: each worker learns a provider's health from its own calls, and a
shared breaker would need a database round trip on the hot path for little gain. `BreakerBoard.snapshot`
exposes the states for the health endpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

import structlog

log = structlog.get_logger(__name__)

Clock = Callable[[], float]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, name: str, *, failure_threshold: int = 5, cooldown_s: float = 30.0,
                 max_cooldown_s: float = 300.0, clock: Clock = time.monotonic) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if cooldown_s < 0 or max_cooldown_s < cooldown_s:
            raise ValueError("need 0 <= cooldown_s <= max_cooldown_s")
        self.name = name
        self._threshold = failure_threshold
        self._base_cooldown = cooldown_s
        self._max_cooldown = max_cooldown_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._cooldown = cooldown_s
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        """The current state; an OPEN breaker whose cooldown has passed turns HALF_OPEN here."""
        if self._state is BreakerState.OPEN and self._clock() >= self._opened_at + self._cooldown:
            self._state = BreakerState.HALF_OPEN
            self._probing = False
            log.info("circuit_breaker_half_open", breaker=self.name, cooldown_s=self._cooldown)
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures counted while closed."""
        return self._failures

    def allow(self) -> bool:
        """May a call be made now? In HALF_OPEN only one caller (the probe) gets True until it reports."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN or self._probing:
            return False
        self._probing = True
        return True

    def record_success(self) -> None:
        if self._state is not BreakerState.CLOSED:
            log.info("circuit_breaker_closed", breaker=self.name, previous=self._state.value)
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._cooldown = self._base_cooldown
        self._probing = False

    def record_failure(self) -> None:
        state = self.state
        if state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self._threshold:
                self._open(self._base_cooldown)
        elif state is BreakerState.HALF_OPEN:
            self._open(min(self._max_cooldown, self._cooldown * 2))
        # OPEN: a call that started before the breaker opened; the breaker already knows.

    def release(self) -> None:
        """The half-open probe ended without a verdict: let another probe through."""
        if self._state is BreakerState.HALF_OPEN:
            self._probing = False

    def retry_after_s(self) -> float:
        """Seconds until `allow()` may return True again (0 when it would now).

        While a half-open probe is in flight the answer is unknown (0 if the probe succeeds, a doubled
        cooldown if it fails); the current cooldown is returned as a conservative estimate."""
        state = self.state
        if state is BreakerState.CLOSED:
            return 0.0
        if state is BreakerState.OPEN:
            return max(0.0, self._opened_at + self._cooldown - self._clock())
        return self._cooldown if self._probing else 0.0

    def _open(self, cooldown: float) -> None:
        self._state = BreakerState.OPEN
        self._cooldown = cooldown
        self._opened_at = self._clock()
        self._probing = False
        log.warning("circuit_breaker_opened", breaker=self.name, failures=self._failures, cooldown_s=cooldown)


class BreakerBoard:
    """All breakers of one worker process, keyed by (provider, model)."""

    def __init__(self, *, failure_threshold: int = 5, cooldown_s: float = 30.0, max_cooldown_s: float = 300.0,
                 clock: Clock = time.monotonic) -> None:
        CircuitBreaker("check", failure_threshold=failure_threshold, cooldown_s=cooldown_s,
                       max_cooldown_s=max_cooldown_s)  # validate the settings now, not at the first call
        self._threshold = failure_threshold
        self._cooldown = cooldown_s
        self._max_cooldown = max_cooldown_s
        self._clock = clock
        self._breakers: dict[tuple[str, str], CircuitBreaker] = {}

    def get(self, provider: str, model: str) -> CircuitBreaker:
        breaker = self._breakers.get((provider, model))
        if breaker is None:
            breaker = CircuitBreaker(f"{provider}/{model}", failure_threshold=self._threshold,
                                     cooldown_s=self._cooldown, max_cooldown_s=self._max_cooldown, clock=self._clock)
            self._breakers[(provider, model)] = breaker
        return breaker

    def snapshot(self) -> dict[str, str]:
        """Map "provider/model" to its state's value, for the health endpoint."""
        return {breaker.name: breaker.state.value for breaker in self._breakers.values()}
