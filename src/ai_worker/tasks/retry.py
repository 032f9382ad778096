"""Retry policy: per-type attempt limits, error classification and exponential backoff with jitter.

Provider state: a `WorkerError` may carry `retry_after_s` (an open breaker's next probe, a rate limit's
reset, a provider's Retry-After): the retry is not scheduled before it (delay = max(backoff,
retry_after), with up to 10 % jitter so waiting tasks do not all come back in the same instant, capped
at `retry_after_cap_s` = max(max_delay_s, 300 s)). It may also say `spends_attempt=False` (the call was
refused before any request: every breaker open, our own rate limiter's wait too long): the `Decision`
carries the flag so the engine can give the attempt back, and such a failure is retried even at the
attempt limit, at most `max_free_retries` times (the engine passes how many it already had; without that
count the attempt number itself is the bound: max attempts + max_free_retries).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx
from pydantic import ValidationError
from pymongo.errors import PyMongoError

from ai_worker.errors import WorkerError
from ai_worker.messaging.events import TaskType

DEFAULT_MAX_ATTEMPTS: dict[str, int] = {
    TaskType.INIT_WORLD_CREATION.value: 4,
    TaskType.GENERATE_WORLD_DESCRIPTION.value: 4,
    TaskType.GENERATE_WORLD_IMAGE.value: 4,
    TaskType.GENERATE_CHARACTER_BATCH.value: 4,
}
OTHER_MAX_ATTEMPTS = 2


RETRY_AFTER_CAP_S = 300.0
MAX_FREE_RETRIES = 20


@dataclass(frozen=True)
class Decision:
    retry: bool
    delay_s: float
    error_type: str
    retryable: bool
    # False: the failure was the provider's state, not this attempt's (no request was made); the engine
    # should give the attempt back when it reschedules the task.
    spends_attempt: bool = True


def classify(exc: BaseException) -> tuple[str, bool]:
    """(error_type, retryable) for any exception a job can raise."""
    if isinstance(exc, WorkerError):
        return exc.error_type, exc.retryable
    if isinstance(exc, ValidationError):
        return "invalid_parameters", False
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timeout", True
    if isinstance(exc, httpx.TransportError | ConnectionError | OSError):
        return "connection_error", True
    if isinstance(exc, PyMongoError):
        return "database_error", True
    return type(exc).__name__, False


@dataclass
class RetryPolicy:
    base_delay_s: float = 2.0
    max_delay_s: float = 60.0
    max_attempts_overrides: Mapping[str, int] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)
    max_free_retries: int = MAX_FREE_RETRIES

    @property
    def retry_after_cap_s(self) -> float:
        """The longest a provider's state may delay a retry (an open breaker's cooldown reaches 300 s)."""
        return max(self.max_delay_s, RETRY_AFTER_CAP_S)

    def max_attempts(self, task_type: str) -> int:
        if task_type in self.max_attempts_overrides:
            return max(1, self.max_attempts_overrides[task_type])
        return DEFAULT_MAX_ATTEMPTS.get(task_type, OTHER_MAX_ATTEMPTS)

    def backoff(self, attempt: int) -> float:
        """Full-jitter-ish: a random delay in [cap/2, cap], cap = min(max, base * 2^(attempt-1))."""
        cap = min(self.max_delay_s, self.base_delay_s * float(2 ** max(0, attempt - 1)))
        return float(cap * (0.5 + 0.5 * self.rng.random()))

    def decide(self, exc: BaseException, task_type: str, attempt: int, *, free_retries: int = 0) -> Decision:
        """Retry or fail after attempt number `attempt` failed with `exc`. `free_retries`: how many times
        this task was already rescheduled without spending an attempt (when the engine counts them)."""
        error_type, retryable = classify(exc)
        if not retryable:
            return Decision(False, 0.0, error_type, retryable)
        limit = self.max_attempts(task_type)
        spends = not isinstance(exc, WorkerError) or exc.spends_attempt
        if not spends and (free_retries >= self.max_free_retries or attempt >= limit + self.max_free_retries):
            spends = True  # waited long enough for free: from now on the wait costs attempts
        if spends and attempt >= limit:
            return Decision(False, 0.0, error_type, retryable)
        delay = self.backoff(min(attempt, limit))
        retry_after = exc.retry_after_s if isinstance(exc, WorkerError) else None
        if retry_after:
            wait = min(self.retry_after_cap_s, retry_after * (1.0 + 0.1 * self.rng.random()))
            delay = max(delay, wait)
        return Decision(True, delay, error_type, retryable, spends_attempt=spends)
