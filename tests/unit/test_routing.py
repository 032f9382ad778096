"""ModelRouter: choosing a model of the chain, breaker verdicts, rate-limit permits, concurrency slots."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pytest

from ai_worker.errors import (
    InvalidImage,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    WorkerError,
)
from ai_worker.providers.breaker import BreakerBoard, BreakerState, CircuitBreaker
from ai_worker.providers.ratelimit import Limits, Permit
from ai_worker.providers.registry import ModelKind, ModelRegistry, ResolvedModel, parse_registry
from ai_worker.providers.routing import ModelRouter, Route

STEP = "post"  # an LLM step no model claims: served by the default llm model "a/llm"
A, B, C = "a/llm", "b/llm", "c/llm"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingLimiter:
    """A RateLimiter that records every call; `acquire_error` makes acquire raise; `running` (when set) is read
    at each acquire, to see how many requests were in flight then."""

    def __init__(self, acquire_error: Exception | None = None, fail_settle: bool = False,
                 fail_penalize: bool = False) -> None:
        self.acquire_error = acquire_error
        self.fail_settle = fail_settle
        self.fail_penalize = fail_penalize
        self.acquired: list[tuple[str, Limits, int]] = []
        self.settled: list[tuple[Permit, Limits, int]] = []
        self.penalized: list[tuple[str, float | None]] = []

    async def acquire(self, key: str, limits: Limits, tokens: int) -> Permit:
        self.acquired.append((key, limits, tokens))
        if self.acquire_error is not None:
            raise self.acquire_error
        return Permit(key=key, tokens=tokens)

    async def settle(self, permit: Permit, limits: Limits, actual_tokens: int) -> None:
        self.settled.append((permit, limits, actual_tokens))
        if self.fail_settle:
            raise RuntimeError("ledger down")

    async def penalize(self, key: str, retry_after_s: float | None) -> None:
        self.penalized.append((key, retry_after_s))
        if self.fail_penalize:
            raise RuntimeError("ledger down")


def table(*, a_max_concurrent: int | None = None) -> dict[str, Any]:
    return {
        "defaults": {"llm": A, "image": "a/img"},
        "providers": {"p": {"kind": "openai", "base_url": "http://sim.test/v1"}},
        "models": {
            A: {"provider": "p", "kind": "llm", "fallbacks": [B, C], "max_concurrent": a_max_concurrent},
            B: {"provider": "p", "kind": "llm", "rpm": 10, "tpm": 1000},
            C: {"provider": "p", "kind": "llm"},
            "a/img": {"provider": "p", "kind": "image"},
        },
    }


def make_router(
    *,
    limiter: RecordingLimiter | None = None,
    board: BreakerBoard | None = None,
    concurrency: Mapping[ModelKind, int] | None = None,
    a_max_concurrent: int | None = None,
) -> ModelRouter:
    registry = ModelRegistry(parse_registry(table(a_max_concurrent=a_max_concurrent)), env={})
    return ModelRouter(registry, limiter=limiter, breakers=board, concurrency=concurrency)


def make_board(clock: FakeClock, threshold: int = 1) -> BreakerBoard:
    return BreakerBoard(failure_threshold=threshold, cooldown_s=10.0, max_cooldown_s=100.0, clock=clock)


def breaker(router: ModelRouter, model_id: str) -> CircuitBreaker:
    return router.breakers.get("p", model_id)


def state(b: CircuitBreaker) -> BreakerState:
    return b.state


def open_breaker(router: ModelRouter, model_id: str) -> None:
    b = breaker(router, model_id)
    while state(b) is not BreakerState.OPEN:
        b.record_failure()


async def served_by(route: Route) -> Route:
    return route


def raising(exc: Exception, calls: list[Route] | None = None) -> Callable[[Route], Awaitable[str]]:
    async def fn(route: Route) -> str:
        if calls is not None:
            calls.append(route)
        raise exc

    return fn


# --- route ------------------------------------------------------------------------------------------------


def test_primary_is_chosen_when_its_breaker_is_closed() -> None:
    router = make_router(board=make_board(FakeClock()))
    route = router.route(STEP, "llm", set())
    assert route.model.id == A and route.requested.id == A
    assert not route.fallback


def test_failed_models_move_the_next_attempt_down_the_chain_then_back_to_the_top() -> None:
    router = make_router(board=make_board(FakeClock()))
    assert router.route(STEP, "llm", {A}).model.id == B
    assert router.route(STEP, "llm", {A, B}).model.id == C
    assert router.route(STEP, "llm", {B}).model.id == A  # only the failed ones are skipped
    every = {A, B, C}
    assert router.route(STEP, "llm", every).model.id == A  # all failed in this call: from the top again
    assert every == {A, B, C}  # route does not change the caller's set


def test_a_model_whose_breaker_is_open_is_skipped() -> None:
    clock = FakeClock()
    router = make_router(board=make_board(clock))
    open_breaker(router, A)
    route = router.route(STEP, "llm", set())
    assert route.model.id == B and route.requested.id == A and route.fallback
    open_breaker(router, B)
    assert router.route(STEP, "llm", set()).model.id == C
    clock.advance(10.0)  # A's cooldown is over: half-open, one probe goes to the primary again
    assert router.route(STEP, "llm", set()).model.id == A


async def test_every_breaker_open_fails_without_a_request() -> None:
    limiter = RecordingLimiter()
    router = make_router(limiter=limiter, board=make_board(FakeClock()))
    for model_id in (A, B, C):
        open_breaker(router, model_id)
    with pytest.raises(ProviderUnavailable) as info:
        router.route(STEP, "llm", set())
    assert STEP in str(info.value)
    calls: list[Route] = []
    with pytest.raises(ProviderUnavailable) as again:
        await router.attempt(STEP, "llm", set(), raising(AssertionError("no request expected"), calls))
    assert STEP in str(again.value) and "circuit open" in str(again.value)
    assert calls == []
    assert limiter.acquired == [] and limiter.settled == [] and limiter.penalized == []


def test_a_failed_model_with_a_closed_breaker_is_used_when_the_others_are_open() -> None:
    router = make_router(board=make_board(FakeClock(), threshold=5))
    open_breaker(router, B)
    open_breaker(router, C)
    # A failed once in this call (a 503: its breaker counts 1 of 5, still closed); B and C are open.
    assert state(breaker(router, A)) is BreakerState.CLOSED
    assert router.route(STEP, "llm", {A}).model.id == A


# --- attempt: breaker verdicts and the failed set ---------------------------------------------------------


@pytest.mark.parametrize("exc", [ProviderUnavailable("503"), ProviderTimeout("read timeout")])
async def test_model_failure_counts_against_the_breaker_and_marks_the_model_failed(exc: WorkerError) -> None:
    router = make_router(board=make_board(FakeClock(), threshold=2))
    failed: set[str] = set()
    with pytest.raises(type(exc)):
        await router.attempt(STEP, "llm", failed, raising(exc))
    assert failed == {A}
    assert breaker(router, A).failures == 1 and state(breaker(router, A)) is BreakerState.CLOSED
    # The same call's next attempt goes to the next model; a second failure of A opens its breaker.
    assert router.route(STEP, "llm", failed).model.id == B
    with pytest.raises(type(exc)):
        await router.attempt(STEP, "llm", set(), raising(exc))
    assert state(breaker(router, A)) is BreakerState.OPEN
    assert router.route(STEP, "llm", set()).model.id == B


async def test_success_closes_a_half_open_breaker() -> None:
    clock = FakeClock()
    router = make_router(board=make_board(clock))
    open_breaker(router, A)
    clock.advance(10.0)
    assert state(breaker(router, A)) is BreakerState.HALF_OPEN
    route = await router.attempt(STEP, "llm", set(), served_by)
    assert route.model.id == A and not route.fallback
    assert state(breaker(router, A)) is BreakerState.CLOSED


async def test_success_resets_the_consecutive_failures() -> None:
    router = make_router(board=make_board(FakeClock(), threshold=2))
    with pytest.raises(ProviderUnavailable):
        await router.attempt(STEP, "llm", set(), raising(ProviderUnavailable("503")))
    await router.attempt(STEP, "llm", set(), served_by)
    assert breaker(router, A).failures == 0
    with pytest.raises(ProviderUnavailable):
        await router.attempt(STEP, "llm", set(), raising(ProviderUnavailable("503")))
    assert state(breaker(router, A)) is BreakerState.CLOSED  # 1 of 2 again, not 2 of 2


async def test_provider_429_penalizes_the_model_without_a_breaker_failure() -> None:
    limiter = RecordingLimiter()
    router = make_router(limiter=limiter, board=make_board(FakeClock()))
    failed: set[str] = set()
    with pytest.raises(RateLimited):
        await router.attempt(STEP, "llm", failed, raising(RateLimited("slow down", retry_after_s=7.5)))
    assert limiter.penalized == [(A, 7.5)]
    assert breaker(router, A).failures == 0 and state(breaker(router, A)) is BreakerState.CLOSED
    assert failed == {A}
    assert router.route(STEP, "llm", failed).model.id == B


async def test_429_on_a_half_open_probe_lets_another_probe_through() -> None:
    clock = FakeClock()
    router = make_router(board=make_board(clock))
    open_breaker(router, A)
    clock.advance(10.0)
    with pytest.raises(RateLimited):
        await router.attempt(STEP, "llm", set(), raising(RateLimited("slow", retry_after_s=None)))
    assert state(breaker(router, A)) is BreakerState.HALF_OPEN
    assert breaker(router, A).allow()


async def test_unusable_image_marks_the_model_failed_but_is_no_breaker_failure() -> None:
    router = make_router(board=make_board(FakeClock()))
    failed: set[str] = set()
    with pytest.raises(InvalidImage):
        await router.attempt(STEP, "llm", failed, raising(InvalidImage("not a png")))
    assert failed == {A}
    assert state(breaker(router, A)) is BreakerState.CLOSED


async def test_permanent_error_neither_counts_nor_marks_the_model_failed() -> None:
    router = make_router(board=make_board(FakeClock()))
    failed: set[str] = set()
    with pytest.raises(ProviderRejected):
        await router.attempt(STEP, "llm", failed, raising(ProviderRejected("400 bad request")))
    assert failed == set()
    assert breaker(router, A).failures == 0 and state(breaker(router, A)) is BreakerState.CLOSED
    assert router.route(STEP, "llm", failed).model.id == A


async def test_permanent_error_on_a_half_open_probe_releases_the_probe_slot() -> None:
    clock = FakeClock()
    router = make_router(board=make_board(clock))
    open_breaker(router, A)
    clock.advance(10.0)
    with pytest.raises(ProviderRejected):
        await router.attempt(STEP, "llm", set(), raising(ProviderRejected("400")))
    assert state(breaker(router, A)) is BreakerState.HALF_OPEN  # no verdict: neither closed nor re-opened
    assert router.route(STEP, "llm", set()).model.id == A  # another probe is allowed
    assert router.route(STEP, "llm", set()).model.id == B  # ... but only one at a time


# --- attempt: the rate limiter ----------------------------------------------------------------------------


async def test_permit_is_acquired_with_the_estimate_and_settled_with_the_real_count() -> None:
    limiter = RecordingLimiter()
    router = make_router(limiter=limiter, board=make_board(FakeClock()))
    estimated: list[ResolvedModel] = []

    def tokens(model: ResolvedModel) -> int:
        estimated.append(model)
        return 123

    async def fn(route: Route) -> str:
        assert limiter.acquired, "the permit is taken before the request"
        return "x" * 42

    result = await router.attempt(STEP, "llm", {A}, fn, tokens=tokens, used_tokens=len)
    assert result == "x" * 42
    assert [m.id for m in estimated] == [B]  # the estimate is for the routed model
    limits = Limits(rpm=10, tpm=1000)
    assert limiter.acquired == [(B, limits, 123)]
    assert limiter.settled == [(Permit(key=B, tokens=123), limits, 42)]
    assert limiter.penalized == []


@pytest.mark.parametrize("exc", [ProviderUnavailable("503"), RateLimited("429", retry_after_s=1.0),
                                 ProviderRejected("400")])
async def test_a_failed_request_settles_zero_tokens(exc: WorkerError) -> None:
    limiter = RecordingLimiter()
    router = make_router(limiter=limiter, board=make_board(FakeClock()))
    used: list[object] = []

    def used_tokens(result: str) -> int:
        used.append(result)
        return 99

    with pytest.raises(type(exc)):
        await router.attempt(STEP, "llm", set(), raising(exc), tokens=lambda _m: 50, used_tokens=used_tokens)
    assert limiter.settled == [(Permit(key=A, tokens=50), Limits(), 0)]
    assert used == []


async def test_rate_limited_by_the_limiter_itself_makes_no_request() -> None:
    clock = FakeClock()
    limiter = RecordingLimiter(acquire_error=RateLimited("local bucket empty", retry_after_s=30.0))
    router = make_router(limiter=limiter, board=make_board(clock))
    calls: list[Route] = []
    with pytest.raises(RateLimited):
        await router.attempt(STEP, "llm", set(), raising(AssertionError("no request expected"), calls))
    assert calls == []
    assert len(limiter.acquired) == 1
    assert limiter.penalized == [] and limiter.settled == []
    assert breaker(router, A).failures == 0 and state(breaker(router, A)) is BreakerState.CLOSED
    # On a half-open probe the slot is given back too.
    open_breaker(router, A)
    clock.advance(10.0)
    with pytest.raises(RateLimited):
        await router.attempt(STEP, "llm", set(), raising(AssertionError("no request expected"), calls))
    assert calls == [] and limiter.penalized == []
    assert state(breaker(router, A)) is BreakerState.HALF_OPEN and breaker(router, A).allow()


async def test_limiter_bookkeeping_errors_do_not_change_the_outcome() -> None:
    limiter = RecordingLimiter(fail_settle=True, fail_penalize=True)
    router = make_router(limiter=limiter, board=make_board(FakeClock()))
    route = await router.attempt(STEP, "llm", set(), served_by)
    assert route.model.id == A and len(limiter.settled) == 1
    with pytest.raises(RateLimited):
        await router.attempt(STEP, "llm", set(), raising(RateLimited("429", retry_after_s=2.0)))
    assert limiter.penalized == [(A, 2.0)]


# --- concurrency ------------------------------------------------------------------------------------------


class Gate:
    """A request that blocks until opened, counting how many are inside at once."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.running = 0
        self.peak = 0
        self.started = 0

    async def __call__(self, route: Route) -> str:
        self.started += 1
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.open.wait()
            await asyncio.sleep(0)
        finally:
            self.running -= 1
        return route.model.id


async def settle_loop() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.mark.parametrize(("concurrency", "a_max_concurrent", "bound"), [
    ({"llm": 2}, None, 2),  # MAX_CONCURRENT_LLM_REQUESTS
    (None, 1, 1),  # the model's max_concurrent
    ({"llm": 3}, 2, 2),  # the smaller of the two
])
async def test_slots_bound_the_requests_in_flight(
    concurrency: Mapping[ModelKind, int] | None, a_max_concurrent: int | None, bound: int
) -> None:
    limiter = RecordingLimiter()
    router = make_router(limiter=limiter, board=make_board(FakeClock()), concurrency=concurrency,
                         a_max_concurrent=a_max_concurrent)
    gate = Gate()
    attempts = asyncio.gather(*(router.attempt(STEP, "llm", set(), gate) for _ in range(5)))
    await settle_loop()
    running, acquired = gate.running, len(limiter.acquired)
    gate.open.set()
    assert await asyncio.wait_for(attempts, 5.0) == [A] * 5
    assert running == bound
    # The permit is taken only once a slot is held: the queued attempts had not asked for one yet.
    assert acquired == bound
    assert gate.peak == bound and gate.started == 5
    assert len(limiter.acquired) == 5 and len(limiter.settled) == 5


async def test_kinds_have_separate_slots() -> None:
    router = make_router(board=make_board(FakeClock()), concurrency={"llm": 1, "image": 1})
    gate = Gate()
    blocked = asyncio.ensure_future(router.attempt(STEP, "llm", set(), gate))
    await settle_loop()
    try:
        assert gate.running == 1
        route = await asyncio.wait_for(router.attempt("avatar", "image", set(), served_by), 5.0)
        assert route.model.id == "a/img"
    finally:
        gate.open.set()
        assert await asyncio.wait_for(blocked, 5.0) == A


async def test_a_models_slot_does_not_hold_back_its_fallback() -> None:
    router = make_router(board=make_board(FakeClock()), a_max_concurrent=1)
    gate = Gate()
    blocked = asyncio.ensure_future(router.attempt(STEP, "llm", set(), gate))
    await settle_loop()
    try:
        assert gate.running == 1
        route = await asyncio.wait_for(router.attempt(STEP, "llm", {A}, served_by), 5.0)
        assert route.model.id == B
    finally:
        gate.open.set()
        await asyncio.wait_for(blocked, 5.0)


@pytest.mark.parametrize(("concurrency", "a_max_concurrent"), [({"llm": 1}, None), (None, 1)])
async def test_a_slot_goes_to_the_next_request_once_the_provider_has_answered(
    concurrency: Mapping[ModelKind, int] | None, a_max_concurrent: int | None
) -> None:
    """`Route.answered()` gives the slots back while the attempt still records its call; the end of the
    attempt does not give them back a second time."""
    router = make_router(board=make_board(FakeClock()), concurrency=concurrency, a_max_concurrent=a_max_concurrent)
    recording = asyncio.Event()

    async def answered_then_records(route: Route) -> str:
        route.answered()
        route.answered()  # once only, however often it is said
        await recording.wait()
        return "first"

    first = asyncio.ensure_future(router.attempt(STEP, "llm", set(), answered_then_records))
    await settle_loop()
    try:
        second = await asyncio.wait_for(router.attempt(STEP, "llm", set(), served_by), 5.0)
        assert second.model.id == A and not first.done()
    finally:
        recording.set()
    assert await asyncio.wait_for(first, 5.0) == "first"
    gate = Gate()
    attempts = asyncio.gather(*(router.attempt(STEP, "llm", set(), gate) for _ in range(3)))
    await settle_loop()
    gate.open.set()
    await asyncio.wait_for(attempts, 5.0)
    assert gate.peak == 1


def test_concurrency_below_one_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        make_router(concurrency={"image": 0})


# --- Route ------------------------------------------------------------------------------------------------


async def test_route_records_the_requested_model_and_the_fallback() -> None:
    router = make_router(board=make_board(FakeClock()))
    primary = await router.attempt(STEP, "llm", set(), served_by)
    assert (primary.model.id, primary.requested.id, primary.fallback) == (A, A, False)
    fallback = await router.attempt(STEP, "llm", {A}, served_by)
    assert (fallback.model.id, fallback.requested.id, fallback.fallback) == (B, A, True)
    again = await router.attempt(STEP, "llm", {A, B, C}, served_by)
    assert (again.model.id, again.requested.id, again.fallback) == (A, A, False)
