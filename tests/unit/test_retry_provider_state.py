"""Task retries that respect the provider's state: an open breaker's next probe, a rate limit's reset,
and refusals that should not spend the task's attempts (errors.WorkerError.retry_after_s /
spends_attempt, tasks.retry.RetryPolicy.decide, the router's errors)."""

from __future__ import annotations

import random

import pytest

from ai_worker import errors
from ai_worker.providers.breaker import BreakerBoard
from ai_worker.providers.ratelimit import Limits, Permit
from ai_worker.providers.registry import ModelRegistry
from ai_worker.providers.routing import ModelRouter, Route
from ai_worker.tasks.retry import MAX_FREE_RETRIES, RETRY_AFTER_CAP_S, RetryPolicy

WORLD_STEP = 4  # attempts of a world-level task (generate_world_description)
POST = 2  # attempts of generate_post


def breaker_open(wait: float) -> errors.ProviderUnavailable:
    return errors.ProviderUnavailable("circuit open", retry_after_s=wait, spends_attempt=False)


def test_defaults_are_safe() -> None:
    exc = errors.ProviderUnavailable("503")
    assert exc.retry_after_s is None and exc.spends_attempt is True
    assert errors.RateLimited("429").spends_attempt is True
    assert errors.RateLimited("429", 3.0).retry_after_s == 3.0
    assert errors.InvalidParameters("bad", spends_attempt=False).spends_attempt is False
    assert str(errors.RateLimited("429 slow down", retry_after_s=1.0)) == "429 slow down"


def test_a_world_task_waits_for_the_breaker_probe_instead_of_burning_its_attempts() -> None:
    """The issue: retries 1.6-5.6 s apart while the breaker stayed open 30 s."""
    policy = RetryPolicy(base_delay_s=2.0, max_delay_s=60.0, rng=random.Random(1))
    for attempt in (1, 2, 3):
        d = policy.decide(breaker_open(30.0), attempt, WORLD_STEP)
        assert d.retry is True
        assert 30.0 <= d.delay_s <= 33.0
        assert d.spends_attempt is False
        assert d.error_type == "provider_unavailable"


def test_a_refusal_that_spends_no_attempt_is_retried_at_the_attempt_limit_but_not_forever() -> None:
    policy = RetryPolicy(rng=random.Random(2), max_free_retries=3)
    assert policy.decide(breaker_open(5.0), 4, WORLD_STEP).retry is True  # the 4th of 4
    assert policy.decide(errors.ProviderUnavailable("503"), 4, WORLD_STEP).retry is False
    # The engine counts the free retries: past max_free_retries the wait costs attempts again.
    d = policy.decide(breaker_open(5.0), 4, WORLD_STEP, 3)
    assert (d.retry, d.spends_attempt) == (False, True)
    d = policy.decide(breaker_open(5.0), 2, WORLD_STEP, 3)
    assert (d.retry, d.spends_attempt) == (True, True)
    assert RetryPolicy().max_free_retries == MAX_FREE_RETRIES


def test_our_rate_limiter_refusal_waits_for_the_reset_without_spending() -> None:
    policy = RetryPolicy(rng=random.Random(3))
    d = policy.decide(errors.RateLimited("wait too long", retry_after_s=45.0, spends_attempt=False), 2, POST)
    assert (d.retry, d.spends_attempt, d.error_type) == (True, False, "rate_limited")
    assert 45.0 <= d.delay_s <= 49.5


def test_a_provider_429_with_retry_after_spends_its_attempt_but_waits() -> None:
    policy = RetryPolicy(rng=random.Random(4))
    d = policy.decide(errors.RateLimited("HTTP 429", retry_after_s=20.0), 1, POST)
    assert (d.retry, d.spends_attempt) == (True, True) and 20.0 <= d.delay_s <= 22.0
    assert policy.decide(errors.RateLimited("HTTP 429", retry_after_s=20.0), 2, POST).retry is False


def test_the_wait_is_capped() -> None:
    policy = RetryPolicy(max_delay_s=60.0, rng=random.Random(5))
    assert policy.retry_after_cap_s == RETRY_AFTER_CAP_S == 300.0
    assert policy.decide(breaker_open(10_000.0), 1, WORLD_STEP).delay_s == 300.0
    assert RetryPolicy(max_delay_s=600.0).decide(breaker_open(10_000.0), 1, WORLD_STEP).delay_s == 600.0


def test_any_worker_error_may_carry_retry_after() -> None:
    policy = RetryPolicy(rng=random.Random(6))
    d = policy.decide(errors.PlatformUnavailable("down", retry_after_s=12.0), 1, POST)
    assert d.retry and 12.0 <= d.delay_s <= 13.2 and d.spends_attempt


def test_permanent_errors_ignore_provider_state() -> None:
    d = RetryPolicy().decide(errors.ProviderRejected("401", retry_after_s=5.0, spends_attempt=False), 1, WORLD_STEP)
    assert (d.retry, d.retryable) == (False, False)


# --- the router's refusals carry the provider state --------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_every_breaker_open_carries_the_next_probe_and_spends_nothing() -> None:
    clock = Clock()
    board = BreakerBoard(failure_threshold=1, cooldown_s=30.0, clock=clock)
    registry = ModelRegistry.single(base_url="http://x/v1", api_key=None, model="m")
    router = ModelRouter(registry, breakers=board)
    board.get("main", "m").record_failure()
    clock.now += 12.0

    async def never(route: Route) -> None:  # pragma: no cover - the router refuses before calling
        raise AssertionError("no request while the breaker is open")

    with pytest.raises(errors.ProviderUnavailable) as info:
        await router.attempt("post", "llm", set(), never)
    assert info.value.spends_attempt is False
    assert info.value.retry_after_s == pytest.approx(18.0)
    assert "next probe in 18.0s" in str(info.value)


class RefusingLimiter:
    async def acquire(self, key: str, limits: Limits, tokens: int) -> Permit:
        raise errors.RateLimited(f"rate limit of {key}: 40.0s to wait", retry_after_s=40.0)

    async def settle(self, permit: Permit, limits: Limits, actual_tokens: int) -> None:  # pragma: no cover
        return None

    async def penalize(self, key: str, retry_after_s: float | None) -> None:  # pragma: no cover
        return None


async def test_our_limiters_refusal_spends_no_attempt_and_does_not_touch_the_breaker() -> None:
    board = BreakerBoard(failure_threshold=1)
    registry = ModelRegistry.single(base_url="http://x/v1", api_key=None, model="m")
    router = ModelRouter(registry, limiter=RefusingLimiter(), breakers=board)

    async def never(route: Route) -> None:  # pragma: no cover
        raise AssertionError("no request without a permit")

    with pytest.raises(errors.RateLimited) as info:
        await router.attempt("post", "llm", set(), never)
    assert info.value.spends_attempt is False and info.value.retry_after_s == 40.0
    assert board.get("main", "m").allow()


async def test_a_provider_429_spends_its_attempt() -> None:
    registry = ModelRegistry.single(base_url="http://x/v1", api_key=None, model="m")
    router = ModelRouter(registry)

    async def limited(route: Route) -> None:
        raise errors.RateLimited("HTTP 429", retry_after_s=3.0)

    with pytest.raises(errors.RateLimited) as info:
        await router.attempt("post", "llm", set(), limited)
    assert info.value.spends_attempt is True
