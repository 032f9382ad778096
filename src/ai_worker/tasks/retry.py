"""Retry policy: per-type attempt limits, error classification and exponential backoff with jitter."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx
from pydantic import ValidationError
from pymongo.errors import PyMongoError

from ai_worker.errors import RateLimited, WorkerError
from ai_worker.messaging.events import TaskType

DEFAULT_MAX_ATTEMPTS: dict[str, int] = {
    TaskType.INIT_WORLD_CREATION.value: 4,
    TaskType.GENERATE_WORLD_DESCRIPTION.value: 4,
    TaskType.GENERATE_WORLD_IMAGE.value: 4,
    TaskType.GENERATE_CHARACTER_BATCH.value: 4,
}
OTHER_MAX_ATTEMPTS = 2


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
    max_attempts_overrides: Mapping[str, int] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)

    def max_attempts(self, task_type: str) -> int:
        if task_type in self.max_attempts_overrides:
            return max(1, self.max_attempts_overrides[task_type])
        return DEFAULT_MAX_ATTEMPTS.get(task_type, OTHER_MAX_ATTEMPTS)

    def backoff(self, attempt: int) -> float:
        """Full-jitter-ish: a random delay in [cap/2, cap], cap = min(max, base * 2^(attempt-1))."""
        cap = min(self.max_delay_s, self.base_delay_s * float(2 ** max(0, attempt - 1)))
        return float(cap * (0.5 + 0.5 * self.rng.random()))

    def decide(self, exc: BaseException, task_type: str, attempt: int) -> Decision:
        error_type, retryable = classify(exc)
        if not retryable or attempt >= self.max_attempts(task_type):
            return Decision(False, 0.0, error_type, retryable)
        delay = self.backoff(attempt)
        if isinstance(exc, RateLimited) and exc.retry_after_s:
            delay = max(delay, min(exc.retry_after_s, self.max_delay_s))
        return Decision(True, delay, error_type, retryable)
