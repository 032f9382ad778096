"""Circuit breakers: opening at the threshold, cooldown, half-open probing, doubling, the board."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from ai_worker.providers.breaker import BreakerBoard, BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _breaker(clock: FakeClock, **kw: float) -> CircuitBreaker:
    return CircuitBreaker("p/m", failure_threshold=int(kw.get("threshold", 3)), cooldown_s=kw.get("cooldown", 10.0),
                          max_cooldown_s=kw.get("max_cooldown", 35.0), clock=clock)


def _state(breaker: CircuitBreaker) -> BreakerState:
    """Read the property through a call, so the type checker does not keep a narrowed value across calls."""
    return breaker.state


def _open(breaker: CircuitBreaker) -> None:
    while _state(breaker) is BreakerState.CLOSED:
        breaker.record_failure()


def test_opens_at_threshold_of_consecutive_failures(clock: FakeClock) -> None:
    b = _breaker(clock)
    b.record_failure()
    b.record_failure()
    b.record_success()  # a success ends the run
    b.record_failure()
    b.record_failure()
    assert _state(b) is BreakerState.CLOSED
    assert b.allow()
    assert b.retry_after_s() == 0.0
    b.record_failure()
    assert _state(b) is BreakerState.OPEN
    assert not b.allow()
    assert b.retry_after_s() == pytest.approx(10.0)


def test_open_refuses_until_cooldown_then_half_open(clock: FakeClock) -> None:
    b = _breaker(clock)
    _open(b)
    clock.advance(9.9)
    assert not b.allow()
    assert _state(b) is BreakerState.OPEN
    assert b.retry_after_s() == pytest.approx(0.1)
    b.record_failure()  # a late failure of a call started before opening: no effect
    assert b.retry_after_s() == pytest.approx(0.1)
    clock.advance(0.1)
    assert _state(b) is BreakerState.HALF_OPEN
    assert b.retry_after_s() == 0.0


def test_half_open_lets_one_probe_at_a_time(clock: FakeClock) -> None:
    b = _breaker(clock)
    _open(b)
    clock.advance(10)
    assert b.allow()  # the probe
    assert not b.allow()
    assert not b.allow()
    assert b.retry_after_s() > 0
    b.release()  # the probe ended without a verdict
    assert b.allow()
    assert not b.allow()


def test_probe_success_closes_and_resets(clock: FakeClock) -> None:
    b = _breaker(clock)
    _open(b)
    clock.advance(10)
    assert b.allow()
    b.record_success()
    assert _state(b) is BreakerState.CLOSED
    assert b.failures == 0
    assert all(b.allow() for _ in range(5))
    # The cooldown is back to its base after a success.
    _open(b)
    assert b.retry_after_s() == pytest.approx(10.0)


def test_probe_failure_reopens_with_doubled_capped_cooldown(clock: FakeClock) -> None:
    b = _breaker(clock)
    _open(b)
    expected = [20.0, 35.0, 35.0]  # 10 -> 20 -> 40 capped at 35 -> stays 35
    cooldown = 10.0
    for want in expected:
        clock.advance(cooldown)
        assert b.allow()
        b.record_failure()
        assert _state(b) is BreakerState.OPEN
        assert b.retry_after_s() == pytest.approx(want)
        clock.advance(want - 0.01)
        assert not b.allow()
        clock.advance(0.01)
        cooldown = 0.0
    assert b.allow()
    b.record_success()
    _open(b)
    assert b.retry_after_s() == pytest.approx(10.0)


def test_release_when_closed_is_harmless(clock: FakeClock) -> None:
    b = _breaker(clock)
    b.record_failure()
    b.release()
    assert b.failures == 1
    assert _state(b) is BreakerState.CLOSED


def test_invalid_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("x", failure_threshold=0)
    with pytest.raises(ValueError):
        BreakerBoard(cooldown_s=10, max_cooldown_s=5)


def test_board_keys_breakers_per_provider_and_model(clock: FakeClock) -> None:
    board = BreakerBoard(failure_threshold=2, cooldown_s=5, max_cooldown_s=60, clock=clock)
    a = board.get("openai", "gpt-x")
    assert board.get("openai", "gpt-x") is a
    b = board.get("openai", "gpt-y")
    c = board.get("other", "gpt-x")
    assert len({id(a), id(b), id(c)}) == 3
    a.record_failure()
    a.record_failure()
    assert _state(a) is BreakerState.OPEN
    assert b.allow() and c.allow()
    assert board.snapshot() == {"openai/gpt-x": "open", "openai/gpt-y": "closed", "other/gpt-x": "closed"}
    clock.advance(5)
    assert board.snapshot()["openai/gpt-x"] == "half_open"


# --- defaults, validation, counting and logs (each kills a surviving mutant) ----------------------------------


def _cooldowns(breaker: CircuitBreaker, clock: FakeClock, probes: int) -> list[float]:
    """Open the breaker, then fail `probes` half-open probes in a row; the cooldown after each opening."""
    _open(breaker)
    seen = [breaker.retry_after_s()]
    for _ in range(probes):
        clock.advance(seen[-1])
        assert breaker.allow()
        breaker.record_failure()
        seen.append(breaker.retry_after_s())
    return seen


def test_defaults_open_after_five_failures_for_30s_doubling_up_to_300s(clock: FakeClock) -> None:
    breaker = CircuitBreaker("p/m", clock=clock)
    for _ in range(4):
        breaker.record_failure()
    assert _state(breaker) is BreakerState.CLOSED and breaker.failures == 4
    breaker.record_failure()
    assert _state(breaker) is BreakerState.OPEN, "the fifth consecutive failure opens it"
    assert _cooldowns(breaker, clock, 5) == [30.0, 60.0, 120.0, 240.0, 300.0, 300.0]


def test_board_defaults_are_the_breaker_defaults(clock: FakeClock) -> None:
    breaker = BreakerBoard(clock=clock).get("p", "m")
    for _ in range(4):
        breaker.record_failure()
    assert _state(breaker) is BreakerState.CLOSED
    breaker.record_failure()
    assert _state(breaker) is BreakerState.OPEN
    assert _cooldowns(breaker, clock, 5) == [30.0, 60.0, 120.0, 240.0, 300.0, 300.0]


def test_board_passes_every_setting_to_its_breakers(clock: FakeClock) -> None:
    breaker = BreakerBoard(failure_threshold=2, cooldown_s=10.0, max_cooldown_s=25.0, clock=clock).get("p", "m")
    breaker.record_failure()
    assert _state(breaker) is BreakerState.CLOSED
    assert _cooldowns(breaker, clock, 2) == [10.0, 20.0, 25.0]


def test_failures_are_counted_one_by_one(clock: FakeClock) -> None:
    breaker = _breaker(clock, threshold=5)
    for n in range(1, 5):
        breaker.record_failure()
        assert breaker.failures == n


@pytest.mark.parametrize("kw", [{"failure_threshold": 1}, {"cooldown_s": 0.0, "max_cooldown_s": 0.0},
                                {"cooldown_s": 7.0, "max_cooldown_s": 7.0}], ids=["threshold-1", "zero", "equal"])
def test_boundary_settings_are_accepted(kw: dict[str, float]) -> None:
    CircuitBreaker("p/m", **kw)  # type: ignore[arg-type]
    BreakerBoard(**kw)  # type: ignore[arg-type]


def test_threshold_of_one_opens_at_the_first_failure(clock: FakeClock) -> None:
    breaker = CircuitBreaker("p/m", failure_threshold=1, cooldown_s=0.5, max_cooldown_s=1.0, clock=clock)
    breaker.record_failure()
    assert _state(breaker) is BreakerState.OPEN


@pytest.mark.parametrize(("kw", "message"), [
    ({"failure_threshold": 0}, "failure_threshold must be >= 1"),
    ({"cooldown_s": -1.0}, "need 0 <= cooldown_s <= max_cooldown_s"),
    ({"cooldown_s": 10.0, "max_cooldown_s": 5.0}, "need 0 <= cooldown_s <= max_cooldown_s"),
], ids=["threshold-0", "negative-cooldown", "max-below-cooldown"])
def test_bad_settings_are_refused_by_the_breaker_and_by_the_board_at_once(kw: dict[str, float],
                                                                          message: str) -> None:
    with pytest.raises(ValueError) as refused:
        CircuitBreaker("p/m", **kw)  # type: ignore[arg-type]
    assert str(refused.value) == message
    with pytest.raises(ValueError) as refused:
        BreakerBoard(**kw)  # type: ignore[arg-type]
    assert str(refused.value) == message


def test_opening_and_closing_are_logged(clock: FakeClock) -> None:
    breaker = _breaker(clock, threshold=2, cooldown=10.0)
    with capture_logs() as logs:
        breaker.record_success()  # closed already: nothing to say
        breaker.record_failure()
        breaker.record_failure()
        clock.advance(10.0)
        assert breaker.allow()
        breaker.record_success()
    events = [{k: v for k, v in e.items() if k != "log_level"} for e in logs]
    assert events == [
        {"event": "circuit_breaker_opened", "breaker": "p/m", "failures": 2, "cooldown_s": 10.0},
        {"event": "circuit_breaker_half_open", "breaker": "p/m", "cooldown_s": 10.0},
        {"event": "circuit_breaker_closed", "breaker": "p/m", "previous": "half_open"},
    ]
    assert [e["log_level"] for e in logs] == ["warning", "info", "info"]
