"""Retry policy: error classification and exponential backoff with jitter. How many attempts a task gets is
its job's policy (`Job.max_attempts`, TASK_MAX_ATTEMPTS), passed in by the engine."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import httpx
from pydantic import ValidationError
from pymongo.errors import PyMongoError

from ai_worker.errors import RateLimited, WorkerError


@dataclass(frozen=True)
class Decision:
    retry: bool
    delay_s: float
    error_type: str
    retryable: bool


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
    rng: random.Random = field(default_factory=random.Random)

    def backoff(self, attempt: int) -> float:
        """Full-jitter-ish: a random delay in [cap/2, cap], cap = min(max, base * 2^(attempt-1))."""
        cap = min(self.max_delay_s, self.base_delay_s * float(2 ** max(0, attempt - 1)))
        return float(cap * (0.5 + 0.5 * self.rng.random()))

    def decide(self, exc: BaseException, attempt: int, max_attempts: int) -> Decision:
        """Retry (after how long) or fail, for attempt number `attempt` of at most `max_attempts`."""
        error_type, retryable = classify(exc)
        if not retryable or attempt >= max_attempts:
            return Decision(False, 0.0, error_type, retryable)
        delay = self.backoff(attempt)
        if isinstance(exc, RateLimited) and exc.retry_after_s:
            delay = max(delay, min(exc.retry_after_s, self.max_delay_s))
        return Decision(True, delay, error_type, retryable)
