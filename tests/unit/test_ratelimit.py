"""Rate limits: the pure bucket arithmetic, and MongoRateLimiter's compare-and-set loop against a small
in-memory stand-in for the few collection methods it uses, with a fake clock and a fake sleep."""

from __future__ import annotations

import asyncio
import copy
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from pymongo.errors import DuplicateKeyError

from ai_worker.errors import RateLimited
from ai_worker.providers.ratelimit import (
    COLLECTION,
    Bucket,
    Limits,
    MongoRateLimiter,
    NoRateLimit,
    Permit,
)

# --- fakes ------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@dataclass
class _Result:
    matched_count: int


def _matches(doc: dict[str, Any], flt: dict[str, Any]) -> bool:
    for field, want in flt.items():
        have = doc.get(field)
        if isinstance(want, dict):
            if "$in" in want and have not in want["$in"]:
                return False
            if "$gt" in want and not (have is not None and have > want["$gt"]):
                return False
        elif have != want:
            return False
    return True


def _apply(doc: dict[str, Any], update: dict[str, Any], inserting: bool) -> None:
    for op, fields in update.items():
        for field, value in fields.items():
            if op == "$set" or (op == "$setOnInsert" and inserting):
                doc[field] = value
            elif op == "$inc":
                doc[field] = doc.get(field, 0) + value
            elif op == "$max":
                doc[field] = value if field not in doc else max(doc[field], value)
            elif op != "$setOnInsert":
                raise NotImplementedError(op)


class _Cursor:
    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self._docs = docs

    async def to_list(self, length: int | None) -> list[dict[str, Any]]:
        return self._docs


class FakeCollection:
    """Just enough of AsyncCollection; `before_write` may change documents first (another process)."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self.ops = 0
        self.before_write: Callable[[FakeCollection], None] | None = None

    def find(self, flt: dict[str, Any]) -> _Cursor:
        self.ops += 1
        return _Cursor([copy.deepcopy(d) for d in self.docs.values() if _matches(d, flt)])

    async def find_one(self, flt: dict[str, Any]) -> dict[str, Any] | None:
        self.ops += 1
        found = [d for d in self.docs.values() if _matches(d, flt)]
        return copy.deepcopy(found[0]) if found else None

    async def update_one(self, flt: dict[str, Any], update: dict[str, Any], upsert: bool = False) -> _Result:
        self.ops += 1
        await asyncio.sleep(0)
        if self.before_write is not None:
            hook, self.before_write = self.before_write, None
            hook(self)
        found = [d for d in self.docs.values() if _matches(d, flt)]
        if found:
            _apply(found[0], update, inserting=False)
            return _Result(1)
        if upsert:
            if flt["_id"] in self.docs:
                raise DuplicateKeyError("duplicate key")
            doc = {"_id": flt["_id"]}
            _apply(doc, update, inserting=True)
            self.docs[doc["_id"]] = doc
        return _Result(0)

    async def find_one_and_update(self, flt: dict[str, Any], update: dict[str, Any], projection: Any = None,
                                  return_document: Any = None) -> dict[str, Any] | None:
        self.ops += 1
        found = [d for d in self.docs.values() if _matches(d, flt)]
        if not found:
            return None
        _apply(found[0], update, inserting=False)
        return copy.deepcopy(found[0])


class FakeDb:
    def __init__(self) -> None:
        self.coll = FakeCollection()

    def __getitem__(self, name: str) -> FakeCollection:
        assert name == COLLECTION
        return self.coll


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db() -> FakeDb:
    return FakeDb()


def _limiter(db: FakeDb, clock: FakeClock, **kw: Any) -> MongoRateLimiter:
    return MongoRateLimiter(db, clock=clock, sleep=clock.sleep, **kw)


def _tokens(db: FakeDb, bucket_id: str) -> float:
    return float(db.coll.docs[bucket_id]["tokens"])


# --- pure arithmetic --------------------------------------------------------------------------------------


def test_capacity_and_refill_formula() -> None:
    b = Bucket.for_limit(60, 60.0, 0.1)
    assert b.capacity == 6.0 and b.rate == pytest.approx(54 / 60)
    assert b.capacity + b.rate * b.window_s == pytest.approx(60)
    b = Bucket.for_limit(100_000, 60.0, 0.1)
    assert b.capacity == 10_000.0 and b.rate == pytest.approx(1500.0)
    b = Bucket.for_limit(30, 60.0, 0.1)  # floor(3.0000000000000004)
    assert b.capacity == 3.0
    b = Bucket.for_limit(5, 60.0, 0.1)  # at least 1
    assert b.capacity == 1.0 and b.rate == pytest.approx(4 / 60)
    b = Bucket.for_limit(1, 60.0, 0.1)  # tiny: one per window
    assert b.capacity == 1.0 and b.rate == pytest.approx(1 / 60)
    b = Bucket.for_limit(1_000_000, 86_400.0, 0.1)
    assert b.rate == pytest.approx(900_000 / 86_400)
    with pytest.raises(ValueError):
        Bucket.for_limit(0, 60.0, 0.1)


def test_take_refills_caps_and_computes_wait() -> None:
    b = Bucket.for_limit(100, 60.0, 0.1)  # C = 10, r = 1.5/s
    t = b.take(10.0, 0.0, 0.0, 4)
    assert t.granted and t.tokens == 6.0 and t.ts == 0.0
    t = b.take(2.0, 0.0, 2.0, 4)  # 2 + 2 * 1.5 = 5 >= 4
    assert t.granted and t.tokens == pytest.approx(1.0) and t.ts == 2.0
    t = b.take(2.0, 0.0, 100.0, 4)  # refill capped at C
    assert t.granted and t.tokens == 6.0
    t = b.take(1.0, 0.0, 1.0, 7)  # 2.5 available: (7 - 2.5) / 1.5 = 3 s
    assert not t.granted and t.wait_s == pytest.approx(3.0)
    assert (t.tokens, t.ts) == (1.0, 0.0)
    # Another host's clock behind the stored ts: no refill, ts never moves back.
    t = b.take(5.0, 10.0, 9.0, 1)
    assert t.granted and t.tokens == 4.0 and t.ts == 10.0


def test_oversized_cost_needs_full_bucket_plus_quiet_and_leaves_debt() -> None:
    b = Bucket.for_limit(100, 60.0, 0.1)  # C = 10, r = 1.5/s
    t = b.take(10.0, 0.0, 0.0, 25)  # full, but 25 > C: (25 - 10) / 1.5 = 10 s more
    assert not t.granted and t.wait_s == pytest.approx(10.0)
    t = b.take(10.0, 0.0, 10.0, 25)
    assert t.granted and t.tokens == pytest.approx(-15.0)
    t = b.take(-15.0, 10.0, 10.0, 1)  # the debt is waited out by the next request
    assert not t.granted and t.wait_s == pytest.approx(16 / 1.5)
    # A zero cost only waits out debt.
    assert not b.take(-15.0, 10.0, 10.0, 0).granted
    assert b.take(0.0, 10.0, 10.0, 0).granted


@pytest.mark.parametrize("seed", range(6))
def test_greedy_consumers_never_exceed_the_limit_in_any_window(seed: int) -> None:
    """Simulate greedy takers with mixed costs (some larger than C) and irregular arrival: every sliding
    window [t, t + W) holds at most L; and the long-run rate is close to the sustained rate."""
    rng = random.Random(seed)
    limit, window = 1000, 60.0
    b = Bucket.for_limit(limit, window, rng.choice([0.0, 0.05, 0.1, 0.3]))
    tokens, ts, now = b.capacity, 0.0, 0.0
    grants: list[tuple[float, int]] = []
    while now < 20 * window:
        cost = rng.choice([1, 5, 20, 50, int(b.capacity) + 1, 2 * int(b.capacity) + 3, 400])
        cost = min(cost, limit)
        take = b.take(tokens, ts, now, cost)
        while not take.granted:
            now += take.wait_s + rng.choice([0.0, 0.0, 0.01, 0.5, 3.0])
            take = b.take(tokens, ts, now, cost)
        tokens, ts = take.tokens, take.ts
        grants.append((now, cost))
        now += rng.choice([0.0, 0.0, 0.001, 0.2, 2.0])
    times = [g[0] for g in grants]
    j, total = 0, 0
    for i, (start, _) in enumerate(grants):  # windows starting at each grant are the worst ones
        while j < len(grants) and times[j] < start + window:
            total += grants[j][1]
            j += 1
        assert total <= limit + 1e-6, f"window at {start}: {total}"
        total -= grants[i][1]


# --- the Mongo limiter with fakes -------------------------------------------------------------------------


async def test_empty_limits_touch_nothing(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock)
    assert Limits().empty and Limits(rpm=0, tpm=None, tpd=0).empty and not Limits(tpd=5).empty
    permit = await rl.acquire("m", Limits(), 123)
    assert permit == Permit(key="m", tokens=123)
    await rl.settle(permit, Limits(), 5)
    assert db.coll.ops == 0


async def test_burst_then_paced_waits(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock)
    limits = Limits(rpm=60)  # C = 6, r = 0.9/s
    for _ in range(6):
        await rl.acquire("m", limits, 0)
    assert clock.sleeps == []
    await rl.acquire("m", limits, 0)
    assert clock.sleeps == [pytest.approx(1 / 0.9)]
    assert _tokens(db, "m|rpm") == pytest.approx(0.0, abs=1e-5)
    assert set(db.coll.docs) == {"m|rpm"}


async def test_rate_limited_when_wait_exceeds_max_wait(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock, max_wait_s=5.0)
    limits = Limits(tpm=100)  # C = 10, r = 1.5/s
    await rl.acquire("m", limits, 10)
    await rl.acquire("m", limits, 6)  # waits 4 s
    assert clock.sleeps == [pytest.approx(4.0)]
    before = _tokens(db, "m|tpm")
    with pytest.raises(RateLimited, match=r"tpm 100") as err:
        await rl.acquire("m", limits, 9)  # 9 / 1.5 = 6 s > 5
    assert err.value.retry_after_s == pytest.approx(6.0)
    assert err.value.retryable
    assert _tokens(db, "m|tpm") == before  # nothing debited


async def test_time_already_waited_counts_towards_max_wait(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock, max_wait_s=5.0)
    limits = Limits(tpm=100)  # C = 10, r = 1.5/s
    await rl.acquire("m", limits, 10)

    def other_process_drains(coll: FakeCollection) -> None:
        coll.docs["m|tpm"].update(tokens=0.0, ts=clock.now)

    db.coll.before_write = other_process_drains
    # Waits 4 s for 6 tokens (within 5 s), loses the race, would need 4 s more: 8 s > 5 s.
    with pytest.raises(RateLimited) as err:
        await rl.acquire("m", limits, 6)
    assert clock.sleeps == [pytest.approx(4.0)]
    assert err.value.retry_after_s == pytest.approx(4.0)


async def test_local_queue_wait_counts_towards_max_wait(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock, max_wait_s=0.05)
    lock = rl._locks.setdefault("m|rpm", asyncio.Lock())  # another coroutine of this process holds the bucket
    await lock.acquire()
    with pytest.raises(RateLimited, match="queue") as err:
        await rl.acquire("m", Limits(rpm=60), 0)
    assert err.value.retry_after_s == pytest.approx(0.05)
    lock.release()
    await rl.acquire("m", Limits(rpm=60), 0)


async def test_oversized_request_is_granted_on_a_full_bucket_and_leaves_debt(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock)
    limits = Limits(tpm=100)  # C = 10, r = 1.5/s
    await rl.acquire("m", limits, 20)  # fresh bucket is full: 10 more needs (20 - 10) / 1.5 s
    assert clock.sleeps == [pytest.approx(10 / 1.5)]
    assert _tokens(db, "m|tpm") == pytest.approx(-10.0)
    clock.sleeps.clear()
    await rl.acquire("m", limits, 1)  # waits out the debt
    assert clock.sleeps == [pytest.approx(11 / 1.5)]


async def test_refunds_earlier_dimensions_when_a_later_one_fails(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock, max_wait_s=0.0)
    limits = Limits(rpm=60, tpm=100, tpd=1000)
    await rl.acquire("m", limits, 10)  # tpm now empty
    rpm_before, tpd_before = _tokens(db, "m|rpm"), _tokens(db, "m|tpd")
    with pytest.raises(RateLimited, match="tpm"):
        await rl.acquire("m", limits, 5)
    assert (_tokens(db, "m|rpm"), _tokens(db, "m|tpd")) == (rpm_before, tpd_before)

    # The race: the read saw enough, but another process drained tpm before our write; rpm (already
    # debited) is given back.
    clock.now += 100
    rl = _limiter(db, clock, max_wait_s=0.0)
    await rl.acquire("m", Limits(rpm=60), 0)  # an rpm write, so the hook fires on the tpm write below
    rpm_before = _tokens(db, "m|rpm")
    calls = 0

    def drain_tpm(coll: FakeCollection) -> None:
        nonlocal calls
        calls += 1
        coll.docs["m|tpm"].update(tokens=0.0, ts=clock.now)

    def arm(coll: FakeCollection) -> None:  # first write is rpm's: let it through, arm for tpm's
        coll.before_write = drain_tpm

    db.coll.before_write = arm
    with pytest.raises(RateLimited, match="tpm"):
        await rl.acquire("m", limits, 5)
    assert calls == 1
    assert _tokens(db, "m|rpm") == pytest.approx(rpm_before)


async def test_cas_conflict_rereads_and_retries(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock)
    limits = Limits(rpm=60)
    await rl.acquire("m", limits, 0)  # 5 left

    def other_process_takes_two(coll: FakeCollection) -> None:
        coll.docs["m|rpm"]["tokens"] -= 2

    db.coll.before_write = other_process_takes_two
    await rl.acquire("m", limits, 0)
    assert _tokens(db, "m|rpm") == pytest.approx(2.0)
    assert clock.sleeps == []


async def test_settle_refunds_capped_and_debits_extra(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock)
    limits = Limits(rpm=60, tpm=100, tpd=1000)  # tpm C = 10, tpd C = 100
    permit = await rl.acquire("m", limits, 8)
    assert (_tokens(db, "m|tpm"), _tokens(db, "m|tpd"), _tokens(db, "m|rpm")) == (2.0, 92.0, 5.0)
    await rl.settle(permit, limits, 3)  # refund 5
    assert (_tokens(db, "m|tpm"), _tokens(db, "m|tpd"), _tokens(db, "m|rpm")) == (7.0, 97.0, 5.0)
    await rl.settle(Permit("m", 50), limits, 0)  # a refund never overfills
    assert (_tokens(db, "m|tpm"), _tokens(db, "m|tpd")) == (10.0, 100.0)
    await rl.settle(Permit("m", 2), limits, 30)  # used more than estimated: debt
    assert (_tokens(db, "m|tpm"), _tokens(db, "m|tpd")) == (-18.0, 72.0)
    await rl.settle(Permit("m", 2), Limits(rpm=60), 30)  # no token limits: nothing to adjust
    assert _tokens(db, "m|tpm") == -18.0


async def test_settle_failure_is_logged_not_raised(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock)

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("db down")

    db.coll.find_one_and_update = broken  # type: ignore[method-assign]
    await rl.settle(Permit("m", 10), Limits(tpm=100), 1)


async def test_penalize_blocks_acquires(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock, max_wait_s=5.0, max_penalty_s=20.0)
    limits = Limits(rpm=1000)
    await rl.penalize("m", 3.0)
    await rl.acquire("m", limits, 0)  # waits the block out
    assert clock.sleeps == [pytest.approx(3.0)]
    await rl.penalize("m", 100.0)  # capped at 20 s
    with pytest.raises(RateLimited, match="429") as err:
        await rl.acquire("m", limits, 0)
    assert err.value.retry_after_s == pytest.approx(20.0)
    await rl.penalize("m", 1.0)  # $max: a shorter block does not shorten the current one
    assert db.coll.docs["m|block"]["blocked_until"] == pytest.approx(clock.now + 20.0)
    clock.now += 20.0
    clock.sleeps.clear()
    await rl.penalize("m", None)  # no Retry-After: 1 s
    await rl.acquire("m", limits, 0)
    assert clock.sleeps == [pytest.approx(1.0)]
    await rl.acquire("other", limits, 0)  # other keys are not blocked
    assert clock.sleeps == [pytest.approx(1.0)]


async def test_one_process_queues_locally(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock, max_wait_s=100.0)
    limits = Limits(rpm=60)  # C = 6, r = 0.9/s
    times: list[float] = []

    async def one() -> None:
        await rl.acquire("m", limits, 0)
        times.append(clock.now)

    await asyncio.gather(*(one() for _ in range(12)))
    assert len(times) == 12
    assert times == sorted(times)
    assert times[5] == times[0]  # the burst
    assert times[-1] - times[0] == pytest.approx(6 / 0.9)  # then paced
    assert len(clock.sleeps) == 6  # one sleep per paced grant: no thundering herd


async def test_no_rate_limit() -> None:
    rl = NoRateLimit()
    permit = await rl.acquire("m", Limits(rpm=1), 7)
    assert permit == Permit("m", 7)
    await rl.settle(permit, Limits(rpm=1), 3)
    await rl.penalize("m", 5)


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        MongoRateLimiter(FakeDb(), burst_fraction=1.0)
    with pytest.raises(ValueError):
        MongoRateLimiter(FakeDb(), minute_s=0)
