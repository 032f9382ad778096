"""In-call retries of provider requests (LLM and image), one tenacity loop per call site.

A provider call that fails with a transient error (429, 5xx / connection error, timeout, an unusable
image) is tried again inside the same task attempt, with exponential backoff and jitter, before the error
reaches the engine's task-level retry. Permanent errors (ProviderRejected, bad parameters) are never
retried here. A 429's Retry-After is honoured, capped at the backoff ceiling.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from ai_worker.errors import InvalidImage, ProviderTimeout, ProviderUnavailable, RateLimited

if TYPE_CHECKING:
    from ai_worker.config import Settings

# Errors worth another HTTP attempt inside one call. InvalidOutput is not here: it has its own repair re-ask.
RETRYABLE_IN_CALL: tuple[type[BaseException], ...] = (RateLimited, ProviderUnavailable, ProviderTimeout, InvalidImage)

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class ProviderRetry:
    """How often and how patiently one provider request is retried.

    `max_retries` extra attempts (0 = a single attempt); the delay before retry n is drawn from
    [cap/2, cap] with cap = min(max_s, base_s * 2^(n-1)); a 429 waits at least its Retry-After (capped
    at max_s)."""

    max_retries: int = 3
    base_s: float = 0.5
    max_s: float = 10.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)
    sleep: Sleep = field(default=asyncio.sleep, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.base_s < 0 or self.max_s < 0:
            raise ValueError("retry delays must be >= 0")

    @classmethod
    def from_settings(cls, settings: Settings) -> ProviderRetry:
        return cls(
            max_retries=settings.provider_max_retries,
            base_s=settings.provider_retry_base_s,
            max_s=settings.provider_retry_max_s,
        )

    def delay(self, retry_number: int, exc: BaseException | None) -> float:
        """Seconds to wait before retry `retry_number` (1-based) after `exc`."""
        cap = min(self.max_s, self.base_s * float(2 ** max(0, retry_number - 1)))
        delay = cap * (0.5 + 0.5 * self.rng.random())
        if isinstance(exc, RateLimited) and exc.retry_after_s:
            delay = max(delay, min(exc.retry_after_s, self.max_s))
        return float(delay)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        return self.delay(state.attempt_number, exc)

    def retrying(self) -> AsyncRetrying:
        """A fresh tenacity loop: `async for attempt in policy.retrying(): with attempt: ...`."""
        return AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception_type(RETRYABLE_IN_CALL),
            sleep=self.sleep,
            reraise=True,
        )


NO_RETRY = ProviderRetry(max_retries=0)
