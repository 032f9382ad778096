"""Retry policy: error classification, per-type attempt limits, backoff bounds and decide()."""

from __future__ import annotations

import inspect
import random

import httpx
import pytest
from pydantic import BaseModel, ValidationError

from ai_worker import errors
from ai_worker.messaging.events import TaskType
from ai_worker.tasks.retry import OTHER_MAX_ATTEMPTS, RetryPolicy, classify

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
    assert RetryPolicy().max_attempts(task_type.value) == expected


def test_exactly_five_short_task_types() -> None:
    assert OTHER_MAX_ATTEMPTS == 2
    assert len([t for t in TaskType if t not in LONG]) == 5


def test_unknown_task_type_uses_the_short_limit() -> None:
    assert RetryPolicy().max_attempts("something_else") == 2


def test_overrides() -> None:
    policy = RetryPolicy(max_attempts_overrides={"generate_post": 7, "init_world_creation": 1, "generate_character": 0})
    assert policy.max_attempts("generate_post") == 7
    assert policy.max_attempts("init_world_creation") == 1
    assert policy.max_attempts("generate_character") == 1  # clamped: at least one attempt
    assert policy.max_attempts("generate_world_image") == 4  # untouched


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
        d = policy.decide(exc, "init_world_creation", attempt)
        assert d.retry is True
        assert d.retryable is True
        assert d.error_type == "provider_unavailable"
        cap = min(10.0, 2.0 ** (attempt - 1))
        assert cap / 2 <= d.delay_s <= cap
    last = policy.decide(exc, "init_world_creation", 4)
    assert last.retry is False
    assert last.retryable is True
    assert last.delay_s == 0.0

    assert policy.decide(exc, "generate_post", 1).retry is True
    assert policy.decide(exc, "generate_post", 2).retry is False


def test_decide_never_retries_permanent_errors() -> None:
    d = RetryPolicy().decide(errors.InvalidParameters("bad"), "init_world_creation", 1)
    assert (d.retry, d.retryable, d.error_type, d.delay_s) == (False, False, "invalid_parameters", 0.0)


def test_rate_limited_retry_after_raises_the_delay_capped() -> None:
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=60.0, rng=random.Random(3))
    d = policy.decide(errors.RateLimited("429", retry_after_s=30.0), "generate_post", 1)
    assert d.retry is True
    assert 30.0 <= d.delay_s <= 33.0  # Retry-After plus up to 10 % jitter

    # Capped at max(RETRY_MAX_DELAY_S, 300 s): an open breaker's cooldown grows to 300 s.
    d = policy.decide(errors.RateLimited("429", retry_after_s=5000.0), "generate_post", 1)
    assert d.delay_s == 300.0
    d = RetryPolicy(max_delay_s=900.0).decide(errors.RateLimited("429", retry_after_s=5000.0), "generate_post", 1)
    assert d.delay_s == 900.0

    # A short Retry-After never lowers the backoff.
    d = policy.decide(errors.RateLimited("429", retry_after_s=0.01), "init_world_creation", 3)
    assert 2.0 <= d.delay_s <= 4.0

    d = policy.decide(errors.RateLimited("429"), "init_world_creation", 1)
    assert 0.5 <= d.delay_s <= 1.0


def test_rate_limited_at_last_attempt_does_not_retry() -> None:
    d = RetryPolicy().decide(errors.RateLimited("429", retry_after_s=5.0), "generate_post", 2)
    assert d.retry is False
