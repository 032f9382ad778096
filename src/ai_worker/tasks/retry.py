"""Retry policy: error classification and exponential backoff with jitter. How many attempts a task gets is
its job's policy (`Job.max_attempts`, TASK_MAX_ATTEMPTS), passed in by the engine.

Provider state: a `WorkerError` may carry `retry_after_s` (an open breaker's next probe, a rate limit's
reset, a provider's Retry-After): the retry is not scheduled before it (delay = max(backoff,
retry_after), with up to 10 % jitter so waiting tasks do not all come back in the same instant, capped
at `retry_after_cap_s` = max(max_delay_s, 300 s)). A failure may also not spend an attempt: the call was
refused before any request (every breaker open, our own rate limiter's wait too long: the error says
`spends_attempt=False`) or the database connection dropped. Such a failure is retried even at the
attempt limit, at most `max_free_retries` times per task, and the `Decision` says so, so the engine gives
the attempt back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import httpx
from pydantic import ValidationError
from pymongo.errors import ConnectionFailure, PyMongoError

from ai_worker.errors import WorkerError

RETRY_AFTER_CAP_S = 300.0  # an open breaker's cooldown reaches 300 s
# Retries that do not spend an attempt are capped per task, so a task can never loop forever on them.
MAX_FREE_RETRIES = 20


@dataclass(frozen=True)
class Decision:
    retry: bool
    delay_s: float
    error_type: str
    retryable: bool
    spends_attempt: bool = True


def spends_attempt(exc: BaseException) -> bool:
    """Whether a failure counts against the task's attempts. It does not when the task was never given a
    fair try: the database connection dropped (a server restart: the first write on each pooled connection
    fails once) or a provider refused to be called yet (an open circuit breaker, our own rate limit: the
    error says so with `spends_attempt = False`)."""
    if isinstance(exc, ConnectionFailure):
        return False
    return bool(getattr(exc, "spends_attempt", True))


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
    max_free_retries: int = MAX_FREE_RETRIES

    @property
    def retry_after_cap_s(self) -> float:
        """The longest a provider's state may delay a retry (an open breaker's cooldown reaches 300 s)."""
        return max(self.max_delay_s, RETRY_AFTER_CAP_S)

    def backoff(self, attempt: int) -> float:
        """Full-jitter-ish: a random delay in [cap/2, cap], cap = min(max, base * 2^(attempt-1))."""
        cap = min(self.max_delay_s, self.base_delay_s * float(2 ** max(0, attempt - 1)))
        return float(cap * (0.5 + 0.5 * self.rng.random()))

    def decide(self, exc: BaseException, attempt: int, max_attempts: int, free_retries: int = 0) -> Decision:
        """Retry (after how long) or fail, for attempt number `attempt` of at most `max_attempts`;
        `free_retries` is how many retries of this task already did not spend an attempt."""
        error_type, retryable = classify(exc)
        free = retryable and not spends_attempt(exc) and free_retries < self.max_free_retries
        if not retryable or (attempt >= max_attempts and not free):
            return Decision(False, 0.0, error_type, retryable)
        delay = self.backoff(min(attempt, max_attempts))
        retry_after = exc.retry_after_s if isinstance(exc, WorkerError) else None
        if retry_after:
            wait = min(self.retry_after_cap_s, retry_after * (1.0 + 0.1 * self.rng.random()))
            delay = max(delay, wait)
        return Decision(True, delay, error_type, retryable, spends_attempt=not free)
