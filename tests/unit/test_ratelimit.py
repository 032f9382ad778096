"""Rate limits: the pure bucket arithmetic, and MongoRateLimiter's leases and compare-and-set loop against a
small in-memory stand-in for the few collection methods it uses, with a fake clock and a fake sleep; and a
virtual-time simulation of several processes sharing one bucket."""

from __future__ import annotations

import asyncio
import copy
import heapq
import itertools
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import structlog
from pymongo.errors import DuplicateKeyError

from ai_worker.errors import RateLimited
from ai_worker.providers.ratelimit import (
    COLLECTION,
    Bucket,
    Limits,
    MongoRateLimiter,
    NoRateLimit,
    Permit,
    RateLimitStats,
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
    def __init__(self, coll: FakeCollection, flt: dict[str, Any]) -> None:
        self._coll, self._flt = coll, flt

    async def to_list(self, length: int | None) -> list[dict[str, Any]]:
        await self._coll._travel()
        docs = [copy.deepcopy(d) for d in self._coll.docs.values() if _matches(d, self._flt)]
        await self._coll._travel()
        return docs


class FakeCollection:
    """Just enough of AsyncCollection; `before_write` may change documents first (another process). `latency`,
    when set, is awaited before and after each operation (the operation applies in between)."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self.ops = 0
        self.log: list[str] = []  # operation names, in order
        self.before_write: Callable[[FakeCollection], None] | None = None
        self.latency: Callable[[], Awaitable[None]] | None = None

    async def _travel(self) -> None:
        if self.latency is not None:
            await self.latency()

    def _count(self, name: str) -> None:
        self.ops += 1
        self.log.append(name)

    def find(self, flt: dict[str, Any]) -> _Cursor:
        self._count("find")
        return _Cursor(self, flt)

    async def find_one(self, flt: dict[str, Any]) -> dict[str, Any] | None:
        self._count("find_one")
        await self._travel()
        found = [d for d in self.docs.values() if _matches(d, flt)]
        result = copy.deepcopy(found[0]) if found else None
        await self._travel()
        return result

    async def update_one(self, flt: dict[str, Any], update: dict[str, Any], upsert: bool = False) -> _Result:
        self._count("update_one")
        await asyncio.sleep(0)
        await self._travel()
        if self.before_write is not None:
            hook, self.before_write = self.before_write, None
            hook(self)
        found = [d for d in self.docs.values() if _matches(d, flt)]
        result = _Result(0)
        if found:
            _apply(found[0], update, inserting=False)
            result = _Result(1)
        elif upsert:
            if flt["_id"] in self.docs:
                raise DuplicateKeyError("duplicate key")
            doc = {"_id": flt["_id"]}
            _apply(doc, update, inserting=True)
            self.docs[doc["_id"]] = doc
        await self._travel()
        return result

    async def find_one_and_update(self, flt: dict[str, Any], update: dict[str, Any], projection: Any = None,
                                  return_document: Any = None) -> dict[str, Any] | None:
        self._count("find_one_and_update")
        await self._travel()
        found = [d for d in self.docs.values() if _matches(d, flt)]
        result = None
        if found:
            _apply(found[0], update, inserting=False)
            result = copy.deepcopy(found[0])
        await self._travel()
        return result


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
    # With leases of lifetime D, the refill is (L - C) / (W + D): grants in any W + D hold at most L.
    b = Bucket.for_limit(60, 60.0, 0.1, lease_s=2.0)
    assert b.capacity == 6.0 and b.rate == pytest.approx(54 / 62)
    assert b.capacity + b.rate * (b.window_s + b.lease_s) == pytest.approx(60)
    assert b.lease_cap == 3.0
    b = Bucket.for_limit(1, 60.0, 0.1, lease_s=2.0)  # L = 1: one per W + D
    assert b.capacity == 1.0 and b.rate == pytest.approx(1 / 62) and b.lease_cap == 1.0
    assert Bucket.for_limit(30, 60.0, 0.1, lease_s=2.0).lease_cap == 1.0  # C = 3: floor(1.5)
    assert Bucket.for_limit(100_000, 60.0, 0.1, lease_s=2.0).lease_cap == 5000.0
    with pytest.raises(ValueError):
        Bucket.for_limit(10, 60.0, 0.1, lease_s=-1.0)
    # Without leases (D = 0): the plain formula.
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


def test_credit_caps_at_capacity() -> None:
    b = Bucket.for_limit(100, 60.0, 0.1)  # C = 10, r = 1.5/s
    assert b.credit(2.0, 0.0, 2.0, 3.0) == (5.0, 0.0)  # 2 + 3 (the refill of 3 stays due)
    assert b.credit(2.0, 0.0, 2.0, 6.0) == (10.0, 2.0)  # 2 + 3 + 6 > C: full now
    assert b.credit(-15.0, 0.0, 0.0, 5.0) == (-10.0, 0.0)  # a refund reduces debt
    assert b.credit(4.0, 1.0, 2.0, 0.0) == (4.0, 1.0)


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

RPM60 = Bucket.for_limit(60, 60.0, 0.1, lease_s=2.0)  # C = 6, r = 54/62 per s, cap 3
TPM100 = Bucket.for_limit(100, 60.0, 0.1, lease_s=2.0)  # C = 10, r = 90/62 per s, cap 5


async def test_empty_limits_touch_nothing(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock)
    assert Limits().empty and Limits(rpm=0, tpm=None, tpd=0).empty and not Limits(tpd=5).empty
    permit = await rl.acquire("m", Limits(), 123)
    assert permit == Permit(key="m", tokens=123)
    await rl.settle(permit, Limits(), 5)
    assert db.coll.ops == 0 and rl.stats == RateLimitStats()


async def test_burst_then_paced_waits(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock)
    limits = Limits(rpm=60)  # C = 6, r = 54/62 per s
    assert rl.bucket("rpm", 60) == RPM60
    for _ in range(6):
        await rl.acquire("m", limits, 0)
    assert clock.sleeps == []
    await rl.acquire("m", limits, 0)
    assert clock.sleeps == [pytest.approx(1 / RPM60.rate)]
    assert _tokens(db, "m|rpm") == pytest.approx(0.0, abs=1e-5)
    assert set(db.coll.docs) == {"m|rpm"}
    # The burst took leases of 1, 2 and 3 units (demand grew, capped at C / 2): 3 of 7 acquires were local.
    assert rl.stats.leases == 4 and rl.stats.units_leased == 7 and rl.stats.local_acquires == 3


async def test_rate_limited_when_wait_exceeds_max_wait(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock, max_wait_s=5.0)
    limits = Limits(tpm=100)  # C = 10, r = 90/62 per s
    await rl.acquire("m", limits, 10)
    await rl.acquire("m", limits, 6)  # waits 6 / r = 4.1 s
    assert clock.sleeps == [pytest.approx(6 / TPM100.rate)]
    before = _tokens(db, "m|tpm")
    with pytest.raises(RateLimited, match=r"tpm 100") as err:
        await rl.acquire("m", limits, 9)  # 9 / r = 6.2 s > 5
    assert err.value.retry_after_s == pytest.approx(9 / TPM100.rate)
    assert err.value.retryable
    assert _tokens(db, "m|tpm") == before  # nothing debited
    assert rl.allowance("m|tpm") == 0


async def test_time_already_waited_counts_towards_max_wait(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock, max_wait_s=5.0)
    limits = Limits(tpm=100)  # C = 10, r = 90/62 per s
    await rl.acquire("m", limits, 10)

    def other_process_drains(coll: FakeCollection) -> None:
        coll.docs["m|tpm"].update(tokens=0.0, ts=clock.now)

    db.coll.before_write = other_process_drains
    # Waits 4.1 s for 6 tokens (within 5 s), loses the race, would need 4.1 s more: 8.3 s > 5 s.
    with pytest.raises(RateLimited) as err:
        await rl.acquire("m", limits, 6)
    assert clock.sleeps == [pytest.approx(6 / TPM100.rate)]
    assert err.value.retry_after_s == pytest.approx(6 / TPM100.rate)


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
    limits = Limits(tpm=100)  # C = 10, r = 90/62 per s, lease cap 5
    await rl.acquire("m", limits, 20)  # fresh bucket is full: 10 more needs (20 - 10) / r
    assert clock.sleeps == [pytest.approx(10 / TPM100.rate)]
    assert _tokens(db, "m|tpm") == pytest.approx(-10.0)  # leased exactly the request: no more than it lacks
    assert rl.allowance("m|tpm") == 0
    clock.sleeps.clear()
    await rl.acquire("m", limits, 1)  # waits out the debt
    assert clock.sleeps == [pytest.approx(11 / TPM100.rate)]


async def test_nothing_is_taken_when_a_later_dimension_must_wait(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock, max_wait_s=0.0)
    limits = Limits(rpm=60, tpm=100, tpd=1000)
    await rl.acquire("m", limits, 10)  # tpm now empty
    rpm_before, tpd_before = _tokens(db, "m|rpm"), _tokens(db, "m|tpd")
    with pytest.raises(RateLimited, match="tpm"):
        await rl.acquire("m", limits, 5)
    assert (_tokens(db, "m|rpm"), _tokens(db, "m|tpd")) == (rpm_before, tpd_before)
    assert (rl.allowance("m|rpm"), rl.allowance("m|tpd")) == (0, 0)


async def test_a_lease_won_before_a_lost_race_stays_local(db: FakeDb, clock: FakeClock) -> None:
    """The race: the read saw enough, but another process drained tpm before our write. The rpm lease
    already taken is not given back to the database (dropping is always safe); it stays in this process's
    allowance, which serves the next request within D, and is dropped after D."""
    rl = _limiter(db, clock, max_wait_s=0.0)
    limits = Limits(rpm=60, tpm=100, tpd=1000)
    await _limiter(db, clock).acquire("m", limits, 1)  # another process created the buckets
    clock.now += 100
    await rl.acquire("m", Limits(rpm=60), 0)  # an rpm lease of 1, used
    rpm_before = _tokens(db, "m|rpm")
    calls = 0

    def drain_tpm(coll: FakeCollection) -> None:
        nonlocal calls
        calls += 1
        coll.docs["m|tpm"].update(tokens=4.0, ts=clock.now)

    def arm(coll: FakeCollection) -> None:  # first write is rpm's: let it through, arm for tpm's
        coll.before_write = drain_tpm

    db.coll.before_write = arm
    with pytest.raises(RateLimited, match="tpm"):
        await rl.acquire("m", limits, 5)  # 1 / r = 0.7 s to wait, max_wait_s is 0
    assert calls == 1
    assert _tokens(db, "m|rpm") == pytest.approx(rpm_before - 2) and rl.allowance("m|rpm") == 2
    clock.now += 1.0  # tpm refilled past 5; the rpm lease is 1 s old (D = 2 s)
    writes = len([op for op in db.coll.log if op == "update_one"])
    await rl.acquire("m", limits, 5)
    assert _tokens(db, "m|rpm") == pytest.approx(rpm_before - 2)  # served from the allowance
    assert len([op for op in db.coll.log if op == "update_one"]) == writes + 2  # tpm and tpd leases only
    clock.now += 1.5
    assert rl.allowance("m|rpm") == 0 and rl.stats.units_expired >= 1


async def test_cas_conflict_rereads_and_retries(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock)
    limits = Limits(rpm=60)
    await rl.acquire("m", limits, 0)  # a lease of 1: 5 left

    def other_process_takes_two(coll: FakeCollection) -> None:
        coll.docs["m|rpm"]["tokens"] -= 2

    db.coll.before_write = other_process_takes_two
    db.coll.log.clear()
    await rl.acquire("m", limits, 0)  # wants a lease of 2 (recent demand 1 + this one)
    assert db.coll.log == ["update_one", "find", "update_one"]  # cached CAS, no match, re-read, CAS
    assert _tokens(db, "m|rpm") == pytest.approx(1.0) and rl.allowance("m|rpm") == 1
    assert rl.stats.cas_conflicts == 1
    assert clock.sleeps == []


async def test_cached_cas_is_one_round_trip(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock)
    limits = Limits(rpm=60)
    await rl.acquire("m", limits, 0)
    assert db.coll.log == ["find", "update_one", "find", "update_one"]  # first acquire: read, create, read, CAS
    db.coll.log.clear()
    clock.now += 0.2  # the block copy is 0.2 s old: still fresh
    await rl.acquire("m", limits, 0)  # the allowance is empty: a lease from the remembered document
    assert db.coll.log == ["update_one"]
    await rl.acquire("m", limits, 0)  # that lease was of 2: the second unit is served locally
    assert db.coll.log == ["update_one"]
    assert rl.stats.round_trips == 5 and rl.stats.acquires == 3 and rl.stats.local_acquires == 1


async def test_leases_serve_most_requests_locally_at_high_rates(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock)
    limits = Limits(rpm=6000, tpm=6_000_000)  # C = 600 requests / 600k tokens
    with structlog.testing.capture_logs() as logs:
        for _ in range(1000):  # 100 requests/s for 10 s, each settling at once
            permit = await rl.acquire("m", limits, 1000)
            clock.now += 0.01
            await rl.settle(permit, limits, 400)
    stats = rl.stats
    assert stats.acquires == 1000 and stats.round_trips_per_acquire < 0.1, stats
    assert stats.local_acquires >= 950, stats
    assert stats.refunded_locally == 600 * 1000 and stats.refunded_shared == 0
    assert clock.sleeps == []
    assert not [entry for entry in logs if entry["log_level"] in ("info", "warning", "error")]


async def test_expired_leases_are_dropped_not_returned(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock)
    limits = Limits(rpm=600)  # C = 60, cap 30
    for _ in range(20):  # leases of 1, 2, 4, 8, 16 (demand doubles): 31 units for 20 requests
        await rl.acquire("m", limits, 0)
    assert rl.stats.units_leased == 31 and rl.allowance("m|rpm") == 11
    doc = dict(db.coll.docs["m|rpm"])
    assert doc["tokens"] == pytest.approx(60 - 31)
    clock.now += 2.01  # past D
    assert rl.allowance("m|rpm") == 0 and rl.stats.units_expired == 11
    assert db.coll.docs["m|rpm"] == doc  # nothing given back to the database
    clock.now += 0.01
    await rl.acquire("m", limits, 0)  # demand is old now: a lease of 1
    assert rl.stats.units_leased == 32


async def _lease_sizes(rl: MongoRateLimiter, clock: FakeClock, key: str, limits: Limits, tokens: int,
                       gaps: list[float]) -> list[float]:
    sizes = []
    for gap in gaps:
        clock.now += gap
        before = rl.stats.units_leased
        await rl.acquire(key, limits, tokens)
        if rl.stats.units_leased > before:
            sizes.append(rl.stats.units_leased - before)
    return sizes


async def test_lease_size_follows_demand_and_is_capped(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock)
    # Low rate (one request per 5 s, demand window D / 2 = 1 s): each request leases exactly one unit.
    assert await _lease_sizes(rl, clock, "a", Limits(rpm=600), 0, [5.0] * 10) == [1.0] * 10
    # High rate: the lease follows the demand (it doubles in a burst), up to C / 2. With C = 30 the fifth
    # lease wants 16 and gets 15; at a steady rate above the limit no lease passes 15 either.
    assert await _lease_sizes(rl, clock, "b", Limits(rpm=300), 0, [0.0] * 30) == [1, 2, 4, 8, 15]
    sizes = await _lease_sizes(rl, clock, "b", Limits(rpm=300), 0, [0.05] * 200)
    assert max(sizes) <= 15 and len(sizes) > 10
    # Small limit: C = 6, cap 3, whatever the demand.
    sizes = await _lease_sizes(rl, clock, "c", Limits(rpm=60), 0, [0.0] * 30)
    assert max(sizes) == 3 and sum(sizes) >= 30
    # Tokens: with what is still held, at least the request's estimate (a lease may be just what the
    # estimate lacks), at most C / 2 = 15000; an oversized estimate leases exactly itself.
    sizes = await _lease_sizes(rl, clock, "d", Limits(tpm=300_000), 1000, [0.0] * 30)
    assert sizes == [1000, 2000, 4000, 8000, 15000]
    sizes = await _lease_sizes(rl, clock, "d", Limits(tpm=300_000), 1000, [0.05] * 100)
    assert max(sizes) <= 15000 and min(sizes) > 0
    assert await _lease_sizes(rl, clock, "e", Limits(tpm=100_000), 12_000, [0.0]) == [12_000]  # C = 10k


async def test_settle_refunds_to_the_live_lease_without_a_round_trip(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock)
    limits = Limits(tpm=100_000)  # C = 10k
    permit = await rl.acquire("m", limits, 3000)  # a lease of 3000
    ops = db.coll.ops
    await rl.settle(permit, limits, 1000)
    assert db.coll.ops == ops and rl.allowance("m|tpm") == 2000 and rl.stats.refunded_locally == 2000
    await rl.acquire("m", limits, 2000)  # served by the refund
    assert db.coll.ops == ops and rl.stats.local_acquires == 1
    # Extra tokens: from the allowance first, then from the shared bucket at once (into debt if need be).
    # A lease sized by the net use of the last D / 2 (3000 - 2000 + 2000) plus this request: 4000.
    permit = await rl.acquire("m", limits, 1000)
    assert rl.allowance("m|tpm") == 3000
    level = _tokens(db, "m|tpm")
    await rl.settle(permit, limits, 3000)  # 2000 more than estimated: from the allowance
    assert rl.allowance("m|tpm") == 1000 and _tokens(db, "m|tpm") == level
    await rl.settle(Permit("m", 0), limits, 5000)  # 5000 more: 1000 local, 4000 from the bucket
    assert rl.allowance("m|tpm") == 0 and _tokens(db, "m|tpm") == pytest.approx(level - 4000)


async def test_refund_after_expiry_goes_to_the_bucket_with_the_next_lease(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock)
    limits = Limits(tpm=100_000)
    bucket = rl.bucket("tpm", 100_000)
    permit = await rl.acquire("m", limits, 4000)
    clock.now += 3.0  # a long call: the lease expired
    ops = db.coll.ops
    await rl.settle(permit, limits, 1000)
    assert db.coll.ops == ops and rl.stats.refunded_shared == 3000 and rl.stats.refunded_locally == 0
    doc = dict(db.coll.docs["m|tpm"])
    await rl.acquire("m", limits, 1000)  # the lease's write delivers the refund
    tokens, ts = bucket.credit(doc["tokens"], doc["ts"], clock.now, 3000)
    assert _tokens(db, "m|tpm") == pytest.approx(bucket.take(tokens, ts, clock.now, 1000).tokens)
    # A refund never overfills the bucket: it is capped at C.
    clock.now += 3.0
    await rl.settle(Permit("m", 50_000), limits, 0)
    await rl.acquire("m", limits, 1000)
    assert _tokens(db, "m|tpm") == pytest.approx(bucket.capacity - 1000)
    # An extra debit is first offset against refunds still owed.
    clock.now += 3.0
    await rl.settle(Permit("m", 5000), limits, 0)
    ops = db.coll.ops
    await rl.settle(Permit("m", 0), limits, 2000)
    assert db.coll.ops == ops


async def test_settle_on_every_token_dimension(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock)
    limits = Limits(rpm=60, tpm=100, tpd=1000)  # tpm C = 10, tpd C = 100
    permit = await rl.acquire("m", limits, 8)
    assert (_tokens(db, "m|tpm"), _tokens(db, "m|tpd"), _tokens(db, "m|rpm")) == (2.0, 92.0, 5.0)
    await rl.settle(permit, limits, 3)  # 5 back to the local allowances; rpm is not adjusted
    assert (rl.allowance("m|tpm"), rl.allowance("m|tpd"), rl.allowance("m|rpm")) == (5, 5, 0)
    assert (_tokens(db, "m|tpm"), _tokens(db, "m|tpd"), _tokens(db, "m|rpm")) == (2.0, 92.0, 5.0)
    await rl.settle(Permit("m", 2), limits, 30)  # 28 more than estimated: 5 local, 23 from each bucket
    assert (_tokens(db, "m|tpm"), _tokens(db, "m|tpd")) == (-21.0, 69.0)
    await rl.settle(Permit("m", 2), Limits(rpm=60), 30)  # no token limits: nothing to adjust
    assert _tokens(db, "m|tpm") == -21.0


async def test_settle_failure_is_logged_not_raised(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock)

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("db down")

    db.coll.find_one_and_update = broken  # type: ignore[method-assign]
    await rl.settle(Permit("m", 10), Limits(tpm=100), 1)  # a refund: nothing to write now
    await rl.settle(Permit("m", 1), Limits(tpm=100), 10)  # an extra debit: the write fails


async def test_penalize_blocks_acquires(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock, max_wait_s=5.0, max_penalty_s=20.0)
    limits = Limits(rpm=1000)
    await rl.penalize("m", 3.0)
    await rl.acquire("m", limits, 0)  # waits the block out
    assert clock.sleeps == [pytest.approx(3.0)]
    await rl.penalize("m", 100.0)  # capped at 20 s; blocks this process's allowance at once
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


async def test_another_process_block_takes_effect_within_the_recheck_bound(db: FakeDb, clock: FakeClock) -> None:
    a = _limiter(db, clock, max_wait_s=1.0)
    b = _limiter(db, clock)
    limits = Limits(rpm=600)
    for _ in range(8):  # leases of 1, 2, 4, 8: a holds 7 units
        await a.acquire("m", limits, 0)
    assert a.allowance("m|rpm") == 7
    await b.penalize("m", 10.0)
    clock.now += 0.4
    ops = db.coll.ops
    await a.acquire("m", limits, 0)  # a's copy of the block is 0.4 s old: served from the allowance
    assert db.coll.ops == ops
    clock.now += 0.1  # 0.5 s: a re-reads the block before granting anything
    with pytest.raises(RateLimited, match="429") as err:
        await a.acquire("m", limits, 0)
    assert db.coll.log[-1] == "find" and err.value.retry_after_s == pytest.approx(9.5)
    assert a.stats.block_reads == 1
    # With block_recheck_s = 0 every acquire reads the block (the old behaviour): an allowance does not help.
    c = _limiter(db, clock, max_wait_s=1.0, block_recheck_s=0.0)
    await c.acquire("k", limits, 0)
    await c.acquire("k", limits, 0)  # a lease of 2: c holds 1
    assert c.allowance("k|rpm") == 1
    await b.penalize("k", 5.0)
    with pytest.raises(RateLimited, match="429"):
        await c.acquire("k", limits, 0)


async def test_one_process_queues_locally(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock, max_wait_s=100.0)
    limits = Limits(rpm=60)  # C = 6, r = 54/62 per s
    times: list[float] = []

    async def one() -> None:
        await rl.acquire("m", limits, 0)
        times.append(clock.now)

    await asyncio.gather(*(one() for _ in range(12)))
    assert len(times) == 12
    assert times == sorted(times)
    assert times[5] == times[0]  # the burst
    assert times[-1] - times[0] == pytest.approx(6 / RPM60.rate)  # then paced
    assert len(clock.sleeps) == 6  # one sleep per paced grant: no thundering herd


async def test_limit_of_one_is_one_per_window_plus_lease(db: FakeDb, clock: FakeClock) -> None:
    rl = _limiter(db, clock, max_wait_s=100.0)
    await rl.acquire("m", Limits(rpm=1), 0)
    await rl.acquire("m", Limits(rpm=1), 0)
    assert clock.sleeps == [pytest.approx(62.0)]
    assert rl.stats.units_leased == 2


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
    with pytest.raises(ValueError):
        MongoRateLimiter(FakeDb(), lease_s=0)
    with pytest.raises(ValueError):
        MongoRateLimiter(FakeDb(), block_recheck_s=-1)


# --- several processes, virtual time ----------------------------------------------------------------------


class SimClock:
    """Virtual time for many coroutines: `sleep` parks on a timer; `run` advances time to the next timer
    whenever every coroutine is parked (the fake database awaits only these timers and sleep(0))."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.now + max(0.0, seconds), next(self._seq), fut))
        await fut

    @staticmethod
    async def _idle() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(100_000):
            await asyncio.sleep(0)
            if not getattr(loop, "_ready", None):
                return

    async def run(self, main: Awaitable[None]) -> None:
        task = asyncio.ensure_future(main)
        while not task.done():
            await self._idle()
            if task.done():
                break
            assert self._timers, "deadlock: nothing can run and no timer is set"
            at, _, fut = heapq.heappop(self._timers)
            self.now = max(self.now, at)
            if not fut.done():
                fut.set_result(None)
        task.result()


def _max_in_window(events: list[tuple[float, float]], window: float) -> float:
    """The largest total of amounts in any half-open window [t, t + window) (the worst ones start at an event)."""
    events = sorted(events)
    best, total, j = 0.0, 0.0, 0
    for i, (start, _) in enumerate(events):
        while j < len(events) and events[j][0] < start + window:
            total += events[j][1]
            j += 1
        best = max(best, total)
        total -= events[i][1]
    return best


@dataclass
class SimResult:
    sent: list[tuple[float, float, float]]  # (time acquire returned, estimate, actual)
    stats: list[RateLimitStats]


async def _simulate(seed: int, *, processes: int, workers: int, limits: Limits, minute_s: float, run_s: float,
                    refunds: bool) -> SimResult:
    rng = random.Random(seed)
    clock = SimClock()
    db = FakeDb()

    async def latency() -> None:
        await clock.sleep(rng.choice([0.0, 0.001, 0.003, 0.02]))

    db.coll.latency = latency
    limiters = [MongoRateLimiter(db, clock=clock, sleep=clock.sleep, minute_s=minute_s, max_wait_s=1e6)
                for _ in range(processes)]
    sent: list[tuple[float, float, float]] = []
    end = clock.now + run_s
    calls: list[asyncio.Task[None]] = []

    async def call(rl: MongoRateLimiter, permit: Permit, actual: int) -> None:
        await clock.sleep(rng.choice([0.0, 0.05, 0.5, 1.5, 4.0]))  # some calls outlive their lease
        await rl.settle(permit, limits, actual)

    async def worker(rl: MongoRateLimiter) -> None:
        while clock.now < end:
            # Bursts, steady streams and pauses longer than a lease (so leases expire with units left).
            await clock.sleep(rng.choice([0.0, 0.0, 0.01, 0.05, 0.2, 1.0, 3.0]))
            estimate = rng.choice([50, 200, 400, 900, 1500])
            permit = await rl.acquire("m", limits, estimate)
            actual = rng.randint(0, estimate) if refunds else estimate
            sent.append((clock.now, estimate, actual))
            calls.append(asyncio.ensure_future(call(rl, permit, actual)))

    async def main() -> None:
        await asyncio.gather(*(worker(rl) for rl in limiters for _ in range(workers)))
        await asyncio.gather(*calls)

    await clock.run(main())
    return SimResult(sent, [rl.stats for rl in limiters])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("rpm", "tpm"), [(40, 20_000), (300, 60_000), (2000, 1_000_000)])
async def test_processes_never_send_more_than_the_limit_in_any_window(seed: int, rpm: int, tpm: int) -> None:
    """Several processes, each with several coroutines, request at random times through one shared
    bucket with database latency. Whatever the interleaving, no sliding window of W holds more than L
    requests (or estimated tokens) SENT, i.e. counted when acquire returned. The two smaller limits bind
    (demand is above them); under the largest one the processes lease in batches and serve locally."""
    minute = 10.0
    limits = Limits(rpm=rpm, tpm=tpm)
    res = await _simulate(seed, processes=3, workers=4, limits=limits, minute_s=minute, run_s=60.0, refunds=False)
    most_requests = _max_in_window([(t, 1.0) for t, _, _ in res.sent], minute)
    most_tokens = _max_in_window([(t, float(est)) for t, est, _ in res.sent], minute)
    assert most_requests <= rpm and most_tokens <= tpm + 1e-6, (most_requests, most_tokens)
    assert sum(s.units_expired for s in res.stats) > 0  # leases did expire with units left
    if rpm < 2000:
        assert most_requests >= 0.7 * rpm or most_tokens >= 0.7 * tpm, (most_requests, most_tokens)
    else:
        local = sum(s.local_acquires for s in res.stats) / sum(s.acquires for s in res.stats)
        assert local > 0.3, res.stats


@pytest.mark.parametrize("seed", range(4))
async def test_refunds_keep_the_net_use_within_the_limit(seed: int) -> None:
    """With real counts below the estimates: requests stay within L in every window, and the net tokens
    (real counts, at the time sent) within L plus the refunds that went to the shared bucket (those whose
    lease had expired); refunds to a live lease add nothing."""
    minute, rpm, tpm = 10.0, 300, 60_000
    res = await _simulate(seed, processes=3, workers=4, limits=Limits(rpm=rpm, tpm=tpm), minute_s=minute,
                          run_s=60.0, refunds=True)
    assert _max_in_window([(t, 1.0) for t, _, _ in res.sent], minute) <= rpm
    shared = sum(s.refunded_shared for s in res.stats)
    assert sum(s.refunded_locally for s in res.stats) > 0
    assert _max_in_window([(t, float(actual)) for t, _, actual in res.sent], minute) <= tpm + shared
