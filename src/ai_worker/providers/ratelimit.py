"""Token-bucket rate limits per model, shared by all worker processes through MongoDB.

Each model key has up to three limits (`Limits`): requests per minute (`rpm`, cost 1 per request), tokens
per minute (`tpm`) and tokens per day (`tpd`, cost = the call's token estimate). A limit that is None or 0
is not enforced; a key whose limits are all unset never touches the database.

The buckets
-----------
One bucket per (key, dimension). For a limit L over a window W (W = `minute_s`, 60 s, for rpm and tpm;
W = 1440 * `minute_s`, a day, for tpd) the bucket holds at most C = max(1, floor(L * burst_fraction))
units and refills continuously at r = (L - C) / W units per second. For L = 1 (the only case where C
would reach L with burst_fraction < 1) we use C = 1, r = 1 / W: one request per W.

The guarantee
-------------
The units granted in any window [t, t + W) are at most C + r * W = L: at most C can be taken from the
bucket as it stands at t, and at most r * W flows in during the window. This holds over EVERY sliding
window (not just aligned minutes) and across all processes, because every grant is one compare-and-set
on the shared bucket document. (For L = 1 the bound C + r * W = 2 is never reached within a half-open
window, so at most 1 request is granted in any [t, t + W).) The price of that guarantee is throughput:
sustained, a bucket grants r * W = L - C per window, i.e. 90% of the limit with the default
burst_fraction of 0.1; the remaining 10% is the burst allowance that makes the guarantee hold for
windows that start with a full bucket.

Clocks: each process uses its own clock (`time.time`). A bucket's `ts` only moves forward
(`ts = max(now, old ts)`), so the refill credited over any stretch of time is at most the time elapsed
plus the clock skew s between the hosts involved: the bound becomes L + r * s (e.g. 100 ms of skew on
a 100k tpm limit: +150 tokens). Keep the hosts NTP-synchronised.

Requests larger than the bucket: a cost X > C (a 20k-token prompt with C = 10k) could never be granted
by a bucket that holds at most C. Such a request is granted once the bucket has been full long enough
for the refill to have covered X (tokens + elapsed * r >= X, without the cap: full, plus (X - C) / r of
quiet); the bucket then goes into debt (C - X < 0), which later requests wait out. Requiring the extra
quiet time (rather than granting on a merely full bucket) is what keeps the window bound at L for such
requests too; it costs throughput when most requests are larger than C (raise burst_fraction then). A
single request larger than L itself can of course not fit any window: it is granted after the same
wait, and the bound for the window holding it is its own cost. An oversized request competes badly with
small ones from other processes (they keep the bucket from filling): it may hit `max_wait_s` and be
retried later.

Estimates and settle: `acquire` debits the caller's token estimate (an upper bound: prompt + max
output); `settle` replaces it by the real count once the call is done (a refund when the call used
fewer tokens, capped at C; an extra debit, possibly into debt, when it used more). The guarantee is
about these net debits; a refund credited during a window for a call acquired before it can let the
real usage of that window exceed L by at most the refunded amount.

Waiting: when the bucket lacks tokens, acquire computes the wait (cost - available) / r and sleeps it
(all dimensions are checked first and nothing is debited while waiting, so the debits of one request
happen together just before the call). If the time already waited plus the wait would exceed
`max_wait_s`, acquire raises RateLimited(retry_after_s=wait) instead, so the task is retried later
rather than holding a worker slot. Within one process the coroutines of a bucket queue on an
asyncio.Lock (FIFO), so only one of them polls the database; the time spent in that queue counts
towards max_wait_s too.

Provider 429s: `penalize(key, retry_after_s)` blocks new acquires of the key in all processes until
now + min(retry_after_s or 1.0, max_penalty_s); acquire waits the block out like a bucket wait.

State: collection `rate_limits`, one document per bucket, `_id = "<key>|<dimension>"`, with `tokens`
(float, may be negative: debt) and `ts` (epoch seconds of the last debit); one per key,
`_id = "<key>|block"`, with `blocked_until` (epoch seconds). A missing bucket is created full.
Deleting the documents resets the limits (at worst one extra burst of C, plus any debt forgiven).
`minute_s` (default 60) shrinks time for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

import structlog
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from ai_worker.errors import RateLimited
from ai_worker.mongo import Database

log = structlog.get_logger(__name__)

COLLECTION = "rate_limits"
Dimension = Literal["rpm", "tpm", "tpd"]
DIMENSIONS: Final[tuple[Dimension, ...]] = ("rpm", "tpm", "tpd")
MINUTES_PER_DAY: Final = 1440
_EPS = 1e-9  # float tolerance when comparing token counts
_EARLY_S = 1e-5  # a grant may come this early: epoch-second floats only resolve ~0.2 us, sleeps wake late anyway
_MIN_SLEEP_S = 0.001  # never spin on a wait that rounds to zero

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class Limits:
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens per minute
    tpd: int | None = None  # tokens per day

    @property
    def empty(self) -> bool:
        """No limit set (None or 0 everywhere)."""
        return all(limit_of(self, dim) is None for dim in DIMENSIONS)


def limit_of(limits: Limits, dimension: Dimension) -> int | None:
    """The enforced limit of one dimension, None when unset (None, 0 or negative)."""
    value: int | None = getattr(limits, dimension)
    return value if value is not None and value > 0 else None


@dataclass
class Permit:
    key: str
    tokens: int  # tokens debited at acquire (the estimate)


class RateLimiter(Protocol):
    async def acquire(self, key: str, limits: Limits, tokens: int) -> Permit: ...
    async def settle(self, permit: Permit, limits: Limits, actual_tokens: int) -> None: ...
    async def penalize(self, key: str, retry_after_s: float | None) -> None: ...


class NoRateLimit:
    """No limits (unit tests, tools): every acquire succeeds at once."""

    async def acquire(self, key: str, limits: Limits, tokens: int) -> Permit:
        return Permit(key=key, tokens=max(0, int(tokens)))

    async def settle(self, permit: Permit, limits: Limits, actual_tokens: int) -> None:
        return None

    async def penalize(self, key: str, retry_after_s: float | None) -> None:
        return None


# --- the bucket arithmetic (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class Take:
    """The outcome of trying to take `cost` from a bucket at one instant."""

    granted: bool
    tokens: float  # the bucket's new level when granted (unchanged otherwise)
    ts: float  # the bucket's new timestamp when granted (unchanged otherwise)
    wait_s: float  # when not granted: seconds until the refill covers the cost (if nobody else takes)


@dataclass(frozen=True)
class Bucket:
    """One token bucket: capacity C, refill rate r per second, for a limit L per window W."""

    limit: int
    window_s: float
    capacity: float
    rate: float

    @classmethod
    def for_limit(cls, limit: int, window_s: float, burst_fraction: float) -> Bucket:
        if limit < 1 or window_s <= 0:
            raise ValueError("a bucket needs limit >= 1 and window_s > 0")
        capacity = max(1, math.floor(limit * burst_fraction + _EPS))
        if capacity < limit:
            return cls(limit, window_s, float(capacity), (limit - capacity) / window_s)
        return cls(limit, window_s, 1.0, 1.0 / window_s)  # L = 1: one per window (see the module docstring)

    def available(self, tokens: float, ts: float, now: float) -> float:
        """The level refilled up to `now`, WITHOUT the cap (an oversized cost is granted when it covers it)."""
        return tokens + max(0.0, now - ts) * self.rate

    def level(self, tokens: float, ts: float, now: float) -> float:
        """The level at `now`: refilled and capped at the capacity."""
        return min(self.capacity, self.available(tokens, ts, now))

    def take(self, tokens: float, ts: float, now: float, cost: float) -> Take:
        """Take `cost` from a bucket stored as (tokens, ts), at `now`.

        Granted when the uncapped refill covers the cost: for cost <= C that is the usual level >= cost;
        for cost > C it means full plus (cost - C) / r of quiet. The new level is the capped level minus
        the cost (negative for an oversized cost: debt)."""
        avail = self.available(tokens, ts, now)
        if avail + _EPS + self.rate * _EARLY_S >= cost:
            return Take(True, min(self.capacity, avail) - cost, max(now, ts), 0.0)
        return Take(False, tokens, ts, (cost - avail) / self.rate)


# --- the shared limiter ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Need:
    dimension: Dimension
    bucket_id: str
    bucket: Bucket
    cost: int


class MongoRateLimiter:
    """Rate limits shared through MongoDB (see the module docstring for the guarantee)."""

    def __init__(self, db: Database, *, max_wait_s: float = 30.0, burst_fraction: float = 0.1,
                 max_penalty_s: float = 60.0, minute_s: float = 60.0, clock: Clock = time.time,
                 sleep: Sleep = asyncio.sleep) -> None:
        if not 0 <= burst_fraction < 1:
            raise ValueError("burst_fraction must be in [0, 1)")
        if max_wait_s < 0 or max_penalty_s < 0 or minute_s <= 0:
            raise ValueError("max_wait_s and max_penalty_s must be >= 0, minute_s > 0")
        self._coll = db[COLLECTION]
        self._max_wait_s = max_wait_s
        self._burst_fraction = burst_fraction
        self._max_penalty_s = max_penalty_s
        self._windows: dict[Dimension, float] = {"rpm": minute_s, "tpm": minute_s, "tpd": minute_s * MINUTES_PER_DAY}
        self._clock = clock
        self._sleep = sleep
        self._locks: dict[str, asyncio.Lock] = {}

    def bucket(self, dimension: Dimension, limit: int) -> Bucket:
        return Bucket.for_limit(limit, self._windows[dimension], self._burst_fraction)

    def _needs(self, key: str, limits: Limits, tokens: int) -> list[_Need]:
        needs = []
        for dim in DIMENSIONS:
            limit = limit_of(limits, dim)
            if limit is not None:
                needs.append(_Need(dim, f"{key}|{dim}", self.bucket(dim, limit), 1 if dim == "rpm" else tokens))
        return needs

    # acquire ----------------------------------------------------------------------------------------------

    async def acquire(self, key: str, limits: Limits, tokens: int) -> Permit:
        """Debit one request and `tokens` (the estimate) from the key's buckets, waiting if needed.

        Raises RateLimited when the wait would exceed max_wait_s (nothing is debited then)."""
        permit = Permit(key=key, tokens=max(0, int(tokens)))
        if limits.empty:
            return permit
        needs = self._needs(key, limits, permit.tokens)
        start = self._clock()
        async with contextlib.AsyncExitStack() as held:
            for need in needs:  # always in DIMENSIONS order: no lock-order deadlock
                lock = self._locks.setdefault(need.bucket_id, asyncio.Lock())
                if lock.locked():
                    await self._queue(lock, key, start)
                else:
                    await lock.acquire()
                held.callback(lock.release)
            await self._acquire_locked(key, needs, start)
        return permit

    async def _queue(self, lock: asyncio.Lock, key: str, start: float) -> None:
        """Wait for this process's earlier requests of the bucket, within the remaining max_wait_s."""
        remaining = max(0.0, self._max_wait_s - (self._clock() - start))
        try:
            async with asyncio.timeout(remaining):
                await lock.acquire()
        except TimeoutError:
            log.info("rate_limited", key=key, reason="local_queue", retry_after_s=self._max_wait_s)
            raise RateLimited(f"rate limit of {key}: this worker's queue for it is longer than "
                              f"{self._max_wait_s:.1f}s", retry_after_s=self._max_wait_s) from None

    async def _acquire_locked(self, key: str, needs: Sequence[_Need], start: float) -> None:
        block_id = f"{key}|block"
        while True:
            now = self._clock()
            docs = {doc["_id"]: doc for doc in await self._coll.find(
                {"_id": {"$in": [n.bucket_id for n in needs] + [block_id]}}).to_list(None)}
            missing = [n for n in needs if n.bucket_id not in docs]
            if missing:
                await self._create(missing, now)
                continue
            wait = max(0.0, float(docs.get(block_id, {}).get("blocked_until", 0.0)) - now)
            reason = f"blocked after a provider 429 for {wait:.1f}s more" if wait > 0 else ""
            for need in needs:
                doc = docs[need.bucket_id]
                take = need.bucket.take(float(doc["tokens"]), float(doc["ts"]), now, need.cost)
                if not take.granted and take.wait_s > wait:
                    wait, reason = take.wait_s, self._reason(need)
            if wait <= 0:
                short = await self._take_all(needs, docs)
                if short is None:
                    return
                wait, reason = short[0], self._reason(short[1])
            elapsed = max(0.0, self._clock() - start)
            if elapsed + wait > self._max_wait_s:
                log.info("rate_limited", key=key, reason=reason, retry_after_s=round(wait, 3),
                         waited_s=round(elapsed, 3))
                raise RateLimited(f"rate limit of {key} ({reason}): {wait:.1f}s to wait, more than "
                                  f"{self._max_wait_s - elapsed:.1f}s left of max_wait_s", retry_after_s=wait)
            log.debug("rate_limit_wait", key=key, reason=reason, wait_s=round(wait, 3))
            await self._sleep(max(wait, _MIN_SLEEP_S))

    @staticmethod
    def _reason(need: _Need) -> str:
        return f"{need.dimension} {need.bucket.limit}"

    async def _create(self, needs: Sequence[_Need], now: float) -> None:
        """Create missing buckets full; a concurrent creation by another process is as good."""
        for need in needs:
            with contextlib.suppress(DuplicateKeyError):
                await self._coll.update_one(
                    {"_id": need.bucket_id},
                    {"$setOnInsert": {"tokens": need.bucket.capacity, "ts": now}}, upsert=True)

    async def _take_all(self, needs: Sequence[_Need], docs: dict[str, dict[str, Any]]) -> tuple[float, _Need] | None:
        """Debit every bucket; if one turns out short (another process was faster), give back the ones
        already debited and return (wait, that need)."""
        taken: list[_Need] = []
        try:
            for need in needs:
                wait = await self._take_one(need, docs[need.bucket_id])
                if wait > 0:
                    give_back, taken = taken, []
                    await self._refund(give_back)
                    return wait, need
                taken.append(need)
        except BaseException:
            await asyncio.shield(self._refund(taken))
            raise
        return None

    async def _take_one(self, need: _Need, doc: dict[str, Any]) -> float:
        """Compare-and-set loop on one bucket: 0 once debited, else the wait."""
        while True:
            take = need.bucket.take(float(doc["tokens"]), float(doc["ts"]), self._clock(), need.cost)
            if not take.granted:
                return take.wait_s
            if need.cost == 0:  # nothing to debit (a zero-token estimate on a bucket out of debt)
                return 0.0
            res = await self._coll.update_one({"_id": need.bucket_id, "ts": doc["ts"], "tokens": doc["tokens"]},
                                              {"$set": {"tokens": take.tokens, "ts": take.ts}})
            if res.matched_count:
                return 0.0
            fresh = await self._coll.find_one({"_id": need.bucket_id})
            if fresh is None:  # deleted meanwhile: start over full
                await self._create([need], self._clock())
                fresh = await self._coll.find_one({"_id": need.bucket_id})
                if fresh is None:
                    raise RuntimeError(f"rate limit bucket {need.bucket_id} vanished")
            doc = fresh

    async def _refund(self, needs: Sequence[_Need]) -> None:
        for need in needs:
            await self._credit(need, float(need.cost))

    async def _credit(self, need: _Need, amount: float) -> None:
        """Add `amount` (negative: debit) to a bucket atomically; clamp a refund at the capacity."""
        if amount == 0:
            return
        doc = await self._coll.find_one_and_update({"_id": need.bucket_id}, {"$inc": {"tokens": amount}},
                                                   projection={"tokens": 1}, return_document=ReturnDocument.AFTER)
        cap = need.bucket.capacity
        if amount > 0 and doc is not None and float(doc["tokens"]) > cap:
            # The level at now is exactly C; moving ts to now also drops refill credit from before (safe).
            await self._coll.update_one({"_id": need.bucket_id, "tokens": {"$gt": cap}},
                                        {"$set": {"tokens": cap}, "$max": {"ts": self._clock()}})

    # settle / penalize ------------------------------------------------------------------------------------

    async def settle(self, permit: Permit, limits: Limits, actual_tokens: int) -> None:
        """Replace the token estimate by the real count on the tpm/tpd buckets (rpm is not adjusted).

        A failure is logged, not raised: the call is done and its result matters more than the ledger."""
        delta = permit.tokens - max(0, int(actual_tokens))
        if delta == 0 or limits.empty:
            return
        for need in self._needs(permit.key, limits, permit.tokens):
            if need.dimension == "rpm":
                continue
            try:
                await self._credit(need, float(delta))
            except Exception as exc:
                log.warning("rate_limit_settle_failed", key=permit.key, dimension=need.dimension, error=str(exc))

    async def penalize(self, key: str, retry_after_s: float | None) -> None:
        """After a provider 429: block new acquires of `key` in all processes for a while."""
        delay = retry_after_s if retry_after_s is not None and retry_after_s > 0 else 1.0
        delay = min(delay, self._max_penalty_s)
        until = self._clock() + delay
        flt, update = {"_id": f"{key}|block"}, {"$max": {"blocked_until": until}}
        try:
            await self._coll.update_one(flt, update, upsert=True)
        except DuplicateKeyError:  # created concurrently by another process: it exists now
            await self._coll.update_one(flt, update)
        log.info("rate_limit_penalized", key=key, block_s=round(delay, 3))
