"""Retry policy: error classification, per-type attempt limits (the jobs' policy), backoff bounds and decide()."""

from __future__ import annotations

import inspect
import random

import httpx
import pytest
from pydantic import BaseModel, ValidationError
from pymongo import errors as pymongo_errors
from pymongo.errors import AutoReconnect

from ai_worker import errors
from ai_worker.jobs import build_registry
from ai_worker.messaging.events import TaskType
from ai_worker.tasks.retry import RetryPolicy, classify, spends_attempt

RETRYABLE: dict[type[errors.WorkerError], str] = {
    errors.RetryableError: "retryable",
    errors.ProviderTimeout: "provider_timeout",
    errors.ProviderUnavailable: "provider_unavailable",
    errors.RateLimited: "rate_limited",
    errors.InvalidOutput: "invalid_output",
    errors.OutputTruncated: "output_truncated",
    errors.InvalidImage: "invalid_image",
    errors.PlatformUnavailable: "platform_unavailable",
    errors.UploadFailed: "upload_failed",
}
PERMANENT: dict[type[errors.WorkerError], str] = {
    errors.WorkerError: "worker_error",
    errors.PermanentError: "permanent",
    errors.InvalidParameters: "invalid_parameters",
    errors.UnknownTaskType: "unknown_task_type",
    errors.TaskCancelled: "cancelled",
    errors.ProviderRejected: "provider_rejected",
    errors.StructuredOutputUnsupported: "structured_output_unsupported",
    errors.PlatformRejected: "platform_rejected",
    errors.BudgetExceeded: "budget_exceeded",
}


def test_every_error_class_is_covered_here() -> None:
    """A new class in ai_worker.errors must be added to one of the tables above."""
    defined = {
        obj for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, errors.WorkerError) and obj.__module__ == errors.__name__
    }
    assert defined == set(RETRYABLE) | set(PERMANENT)


@pytest.mark.parametrize(("cls", "name"), list(RETRYABLE.items()), ids=list(RETRYABLE.values()))
def test_retryable_worker_errors(cls: type[errors.WorkerError], name: str) -> None:
    assert classify(cls("boom")) == (name, True)


@pytest.mark.parametrize(("cls", "name"), list(PERMANENT.items()), ids=list(PERMANENT.values()))
def test_permanent_worker_errors(cls: type[errors.WorkerError], name: str) -> None:
    assert classify(cls("boom")) == (name, False)


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ReadTimeout("slow"),
        httpx.ConnectTimeout("slow"),
        httpx.PoolTimeout("slow"),
        TimeoutError(),
    ],
)
def test_timeouts_are_retryable(exc: BaseException) -> None:
    assert classify(exc) == ("timeout", True)


@pytest.mark.parametrize(
    "exc",
    [httpx.ConnectError("refused"), httpx.RemoteProtocolError("eof"), ConnectionResetError(), ConnectionRefusedError()],
)
def test_connection_errors_are_retryable(exc: BaseException) -> None:
    error_type, retryable = classify(exc)
    assert retryable is True
    assert error_type == "connection_error"


@pytest.mark.parametrize(
    "exc",
    [pymongo_errors.AutoReconnect("connection refused"), pymongo_errors.ServerSelectionTimeoutError("no server"),
     pymongo_errors.NetworkTimeout("slow"), pymongo_errors.WriteConcernError("w", 64, {}),
     pymongo_errors.PyMongoError("other")],
    ids=["auto-reconnect", "server-selection", "network-timeout", "write-concern", "other"],
)
def test_database_errors_are_retryable(exc: BaseException) -> None:
    """A database outage is transient: the task must be retried, not failed for good."""
    assert classify(exc) == ("database_error", True)
    assert RetryPolicy().decide(exc, attempt=1, max_attempts=2).retry is True


def test_pydantic_validation_error_is_permanent() -> None:
    class M(BaseModel):
        x: int

    with pytest.raises(ValidationError) as info:
        M.model_validate({"x": "not a number"})
    assert classify(info.value) == ("invalid_parameters", False)


@pytest.mark.parametrize("exc", [ValueError("x"), KeyError("k"), RuntimeError("r"), ZeroDivisionError()])
def test_unknown_exceptions_are_permanent(exc: BaseException) -> None:
    assert classify(exc) == (type(exc).__name__, False)


LONG = {
    TaskType.INIT_WORLD_CREATION,
    TaskType.GENERATE_WORLD_DESCRIPTION,
    TaskType.GENERATE_WORLD_IMAGE,
    TaskType.GENERATE_CHARACTER_BATCH,
}


@pytest.mark.parametrize("task_type", list(TaskType))
def test_default_attempt_limits(task_type: TaskType) -> None:
    expected = 4 if task_type in LONG else 2
    assert build_registry().policy(task_type.value).max_attempts == expected


def test_exactly_five_short_task_types() -> None:
    assert len([t for t in TaskType if t not in LONG]) == 5


def test_overrides() -> None:
    registry = build_registry(max_attempts={"generate_post": 7, "init_world_creation": 1, "generate_character": 0})
    assert registry.policy("generate_post").max_attempts == 7
    assert registry.policy("init_world_creation").max_attempts == 1
    assert registry.policy("generate_character").max_attempts == 1  # clamped: at least one attempt
    assert registry.policy("generate_world_image").max_attempts == 4  # untouched


def test_an_override_of_an_unknown_type_is_refused() -> None:
    with pytest.raises(ValueError, match="generate_pots"):
        build_registry(max_attempts={"generate_pots": 3})


@pytest.mark.parametrize(("base", "max_delay"), [(2.0, 60.0), (0.5, 5.0), (1.0, 1000.0)])
def test_backoff_bounds(base: float, max_delay: float) -> None:
    policy = RetryPolicy(base_delay_s=base, max_delay_s=max_delay, rng=random.Random(1234))
    for attempt in range(1, 11):
        cap = min(max_delay, base * 2 ** (attempt - 1))
        for _ in range(50):
            delay = policy.backoff(attempt)
            assert cap / 2 <= delay <= cap, (attempt, delay, cap)


def test_backoff_is_jittered_and_grows() -> None:
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=1000.0, rng=random.Random(7))
    samples = {policy.backoff(3) for _ in range(20)}
    assert len(samples) > 1  # jitter, not a constant
    assert min(policy.backoff(6) for _ in range(20)) > max(policy.backoff(2) for _ in range(20))


def test_decide_retries_until_the_last_attempt() -> None:
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=10.0, rng=random.Random(0))
    exc = errors.ProviderUnavailable("503")
    for attempt in (1, 2, 3):
        d = policy.decide(exc, attempt, 4)
        assert d.retry is True
        assert d.retryable is True
        assert d.error_type == "provider_unavailable"
        cap = min(10.0, 2.0 ** (attempt - 1))
        assert cap / 2 <= d.delay_s <= cap
    last = policy.decide(exc, 4, 4)
    assert last.retry is False
    assert last.retryable is True
    assert last.delay_s == 0.0

    assert policy.decide(exc, 1, 2).retry is True
    assert policy.decide(exc, 2, 2).retry is False


def test_decide_never_retries_permanent_errors() -> None:
    d = RetryPolicy().decide(errors.InvalidParameters("bad"), 1, 4)
    assert (d.retry, d.retryable, d.error_type, d.delay_s) == (False, False, "invalid_parameters", 0.0)


def test_rate_limited_retry_after_raises_the_delay_capped() -> None:
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=60.0, rng=random.Random(3))
    d = policy.decide(errors.RateLimited("429", retry_after_s=30.0), 1, 2)
    assert d.retry is True
    assert 30.0 <= d.delay_s <= 33.0  # Retry-After plus up to 10 % jitter

    # Capped at max(RETRY_MAX_DELAY_S, 300 s): an open breaker's cooldown grows to 300 s.
    d = policy.decide(errors.RateLimited("429", retry_after_s=5000.0), 1, 2)
    assert d.delay_s == 300.0
    d = RetryPolicy(max_delay_s=900.0).decide(errors.RateLimited("429", retry_after_s=5000.0), 1, 2)
    assert d.delay_s == 900.0

    # A short Retry-After never lowers the backoff.
    d = policy.decide(errors.RateLimited("429", retry_after_s=0.01), 3, 4)
    assert 2.0 <= d.delay_s <= 4.0

    d = policy.decide(errors.RateLimited("429"), 1, 4)
    assert 0.5 <= d.delay_s <= 1.0


def test_rate_limited_at_last_attempt_does_not_retry() -> None:
    d = RetryPolicy().decide(errors.RateLimited("429", retry_after_s=5.0), 2, 2)
    assert d.retry is False


class _Refused(Exception):
    """Not a WorkerError, but says it spent no attempt (as any exception may)."""

    spends_attempt = False


def test_which_failures_spend_an_attempt() -> None:
    assert spends_attempt(AutoReconnect("connection closed")) is False  # the database dropped the connection
    assert spends_attempt(errors.ProviderUnavailable("every breaker open", spends_attempt=False)) is False
    assert spends_attempt(_Refused()) is False
    assert spends_attempt(errors.ProviderUnavailable("HTTP 503")) is True
    assert spends_attempt(RuntimeError("boom")) is True  # no attribute: it spends one


def test_a_failure_that_spent_no_attempt_is_retried_at_the_limit_a_bounded_number_of_times() -> None:
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=8.0, rng=random.Random(1), max_free_retries=2)
    refused = errors.ProviderUnavailable("every breaker open", spends_attempt=False)
    below = policy.decide(refused, attempt=1, max_attempts=3)
    assert below.retry and below.spends_attempt is False
    at_limit = policy.decide(refused, attempt=3, max_attempts=3, free_retries=1)
    assert at_limit.retry and at_limit.spends_attempt is False and at_limit.error_type == "provider_unavailable"
    assert not policy.decide(refused, attempt=3, max_attempts=3, free_retries=2).retry  # the cap
    assert not policy.decide(AutoReconnect("gone"), attempt=2, max_attempts=2, free_retries=2).retry
    # Ordinary retryable failures spend their attempt and stop at the limit.
    spent = policy.decide(errors.ProviderUnavailable("HTTP 503"), attempt=1, max_attempts=3, free_retries=0)
    assert spent.retry and spent.spends_attempt is True
    assert not policy.decide(errors.ProviderUnavailable("HTTP 503"), attempt=3, max_attempts=3).retry
    # A permanent failure is never retried, whether or not it says it spent an attempt.
    assert not policy.decide(errors.InvalidParameters("bad", spends_attempt=False), attempt=1, max_attempts=3).retry


def test_free_retries_default_to_none_used_so_far() -> None:
    policy = RetryPolicy(rng=random.Random(2), max_free_retries=1)
    decision = policy.decide(AutoReconnect("gone"), attempt=2, max_attempts=2)
    assert decision.retry and decision.spends_attempt is False
