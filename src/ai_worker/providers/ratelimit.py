"""Token-bucket rate limits per model, shared by all worker processes through MongoDB, with permits leased
in small batches so that most requests need no database round trip.

Each model key has up to three limits (`Limits`): requests per minute (`rpm`, cost 1 per request), tokens
per minute (`tpm`) and tokens per day (`tpd`, cost = the call's token estimate). A limit that is None or 0
is not enforced; a key whose limits are all unset never touches the database.

The buckets
-----------
One bucket per (key, dimension). For a limit L over a window W (W = `minute_s`, 60 s, for rpm and tpm;
W = 1440 * `minute_s`, a day, for tpd) the bucket holds at most C = max(1, floor(L * burst_fraction))
units and refills continuously at r = (L - C) / (W + D) units per second, where D = `lease_s` (2 s) is
the lifetime of a leased permit (below). For L = 1 (the only case where C would reach L with
burst_fraction < 1) we use C = 1, r = 1 / (W + D): one request per W + D.

Leases
------
A process does not go to the database for every request. When its local allowance for a bucket cannot
cover a request, it takes k units from the shared bucket in ONE compare-and-set (a lease) and keeps them
in a process-local allowance; the next requests draw from it with no round trip. A lease EXPIRES D seconds
after it was granted: whatever is left then is dropped, never given back (dropping is always safe: it
only leaves units unused). k is sized from this process's own recent demand: the units it drew in the
last D / 2 seconds plus the current request's cost (so the allowance lasts about D / 2 at the recent pace,
with half its lifetime to spare), at least what the current request lacks, at most floor(C / 2) (at least
1) so one process never takes the whole burst, and at most what the bucket holds. At low rates a lease is
therefore exactly the request's own cost: nothing is hoarded. For the token dimensions a unit is a token:
a request draws its estimate, and a request larger than the cap leases exactly what it lacks.

The guarantee
-------------
No window [t, t + W) ever holds more than L units SENT (a request is sent when acquire returns; its units
are its cost on each dimension), across all processes. Proof:

1. Every unit is granted by one compare-and-set on the shared bucket document, stamped g: the `ts` it
   writes, max(the clock reading taken before the write, the previous `ts`). The lease's lifetime starts
   at a monotonic reading taken just before that clock reading, and a request leaves acquire only while
   every lease it draws from is at most D old; so a unit stamped g is sent at some u with
   g <= u <= g + D (g <= u up to clock skew, below). Hence the units sent in [t, t + W) were all granted
   with stamps in [t - D, t + W), a window of length W + D.
2. The grants in any window of length T number at most C + r * T units. Let the grants stamped in the
   window be X_1 .. X_n (in compare-and-set order, which is stamp order since stamps never go back),
   with a_i the uncapped level just before grant i (refilled from the previous write),
   m_i = min(C, a_i) the capped level, and e_i = m_i - X_i the level written. A grant needs a_i >= X_i,
   and a_{i+1} = e_i + r * (g_{i+1} - g_i). So for n >= 2:
       X_1 + ... + X_n <= X_1 + ... + X_{n-1} + a_n = X_1 + ... + X_{n-2} + m_{n-1} + r * (g_n - g_{n-1})
                       <= ... <= m_1 + r * (g_n - g_1) <= C + r * T.
   (A single grant is bounded by its own size, which is at most C unless one request alone costs more:
   see oversized requests.)
3. With T = W + D and r = (L - C) / (W + D): C + r * (W + D) = L.
For L = 1: two grants in a half-open window of length W + D would need r * (g_n - g_1) >= 1, i.e. a gap
of W + D: at most 1 request in any [t, t + W). A grant may come _EARLY_S (10 us) early: epoch-second floats
only resolve ~0.2 us and sleeps wake late anyway; ignored here.

The price of that guarantee is throughput: sustained, the buckets grant r * W = (L - C) * W / (W + D)
per window, 87% of L with the defaults (burst_fraction 0.1, W = 60 s, D = 2 s); the rest is the burst
allowance that makes the bound hold for windows that start with a full bucket, and the lease lifetime.
Every process must use the same D (and the same burst_fraction): a process with a larger D could hold a
unit longer than the refill assumes.

Clocks: grant stamps use each process's own clock (`time.time`), lease ages the monotonic clock. A
bucket's `ts` only moves forward (`ts = max(now, old ts)`), so the refill credited over any stretch of time
is at most the time elapsed plus the clock skew s between the hosts involved: the bound becomes L + r * s
(e.g. 100 ms of skew on a 100k tpm limit: +150 tokens). Keep the hosts NTP-synchronised.

Requests larger than the bucket: a cost X > C (a 20k-token prompt with C = 10k) could never be granted
by a bucket that holds at most C. Such a request is granted once the bucket has been full long enough
for the refill to have covered X (tokens + elapsed * r >= X, without the cap: full, plus (X - C) / r of
quiet); the bucket then goes into debt (C - X < 0), which later requests wait out. Step 2 covers such
grants too; it costs throughput when most requests are larger than C (raise burst_fraction then). A
single request larger than L itself can of course not fit any window: it is granted after the same
wait, and the bound for the window holding it is its own cost. An oversized request competes badly with
small ones from other processes (they keep the bucket from filling): it may hit `max_wait_s` and be
retried later.

Estimates and settle: `acquire` draws the caller's token estimate (an upper bound: prompt + max output);
`settle` replaces it by the real count once the call is done. The unused part goes back to the lease(s)
the request drew from, when they have not expired: no database write, and the bound above holds for the
net use (each granted unit still goes out at most D after its grant, whichever request ends up using it).
The part whose lease has expired is owed to the shared bucket and added to it (capped at C) by this
process's next write to that bucket (its next lease, usually within D while it keeps calling the model;
lost, which is safe, if it stops): such a refund credited during a window for a call sent before it can
let the real use of that window exceed L by at most the refunded amount, as any shared refund does. An
extra debit (the call used more than its estimate, which only a wrong estimate causes) is drawn from the
local allowance, then offset against refunds still owed, then debited from the shared bucket at once
(possibly into debt); it is charged when it becomes known, so the window holding the call may exceed L by
that excess.

Waiting: when neither the allowance nor the bucket can cover a request, acquire computes the wait
(cost - available) / r and sleeps it (all dimensions are checked first and nothing is taken while
waiting, so the leases of one request happen together just before it is sent). If the time already
waited plus the wait would exceed `max_wait_s`, acquire raises RateLimited(retry_after_s=wait) instead,
so the task is retried later rather than holding a worker slot. Within one process the coroutines of a
bucket queue on an asyncio.Lock (FIFO), so only one of them leases or polls the database; the time spent
in that queue counts towards max_wait_s too. If a compare-and-set succeeds on one dimension and then
loses a race on another, the first lease stays in the allowance (it is used if the wait is shorter than
D, dropped otherwise).

Round trips: a process remembers each bucket document as it last wrote or read it and tries its
compare-and-set with it directly (1 round trip); only when another process wrote meanwhile (no match)
does it read the current document and retry. The first acquire of a key reads (and creates missing
buckets full). A bucket that looks too low in the remembered copy is re-read before waiting (another
process's refund may have refilled it). So an acquire costs no round trip when the allowances cover it,
one per dimension it leases otherwise, plus the block checks below; at high rates, well under one per
request. `stats` counts them.

Provider 429s: `penalize(key, retry_after_s)` blocks new acquires of the key until now +
min(retry_after_s or 1.0, max_penalty_s): at once in this process (its allowances included), and in the
others through the key's block document, which every read of the buckets fetches too and which a process
re-reads before granting anything once its copy is `block_recheck_s` (0.5 s) old. A block set by another
process therefore takes effect within block_recheck_s (plus one round trip). acquire waits a block out like
a bucket wait.

State: collection `rate_limits`, one document per bucket, `_id = "<key>|<dimension>"`, with `tokens`
(float, may be negative: debt) and `ts` (epoch seconds of the last write); one per key,
`_id = "<key>|block"`, with `blocked_until` (epoch seconds). A missing bucket is created full.
Deleting the documents resets the limits (at worst one extra burst of C, plus any debt forgiven).
`minute_s` (default 60) shrinks time for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

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
_MAX_LEASES = 16  # live leases kept per bucket; beyond that, exhausted ones are forgotten (refunds then go shared)

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
    # Per bucket id: the leases (serial, units) the request drew from, so settle can give unused tokens back
    # to them. Filled by MongoRateLimiter; not part of a permit's identity.
    draws: dict[str, list[tuple[int, float]]] = field(default_factory=dict, compare=False, repr=False)


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
    """One token bucket: capacity C, refill rate r per second, for a limit L per window W whose grants are
    used at most `lease_s` (D) after they are made: r = (L - C) / (W + D)."""

    limit: int
    window_s: float
    capacity: float
    rate: float
    lease_s: float = 0.0

    @classmethod
    def for_limit(cls, limit: int, window_s: float, burst_fraction: float, lease_s: float = 0.0) -> Bucket:
        if limit < 1 or window_s <= 0 or lease_s < 0:
            raise ValueError("a bucket needs limit >= 1, window_s > 0 and lease_s >= 0")
        capacity = max(1, math.floor(limit * burst_fraction + _EPS))
        span = window_s + lease_s
        if capacity < limit:
            return cls(limit, window_s, float(capacity), (limit - capacity) / span, lease_s)
        return cls(limit, window_s, 1.0, 1.0 / span, lease_s)  # L = 1: one per W + D (see the module docstring)

    @property
    def lease_cap(self) -> float:
        """The most one lease takes beyond what its request lacks: floor(C / 2), at least 1."""
        return float(max(1, math.floor(self.capacity / 2 + _EPS)))

    def available(self, tokens: float, ts: float, now: float) -> float:
        """The level refilled up to `now`, WITHOUT the cap (an oversized cost is granted when it covers it)."""
        return tokens + max(0.0, now - ts) * self.rate

    def level(self, tokens: float, ts: float, now: float) -> float:
        """The level at `now`: refilled and capped at the capacity."""
        return min(self.capacity, self.available(tokens, ts, now))

    def credit(self, tokens: float, ts: float, now: float, amount: float) -> tuple[float, float]:
        """The bucket (tokens, ts) after `amount` is given back at `now`, capped at the capacity. When the
        cap binds, ts moves to now: refill credit from before is dropped (safe), as a full bucket has none."""
        if amount <= 0:
            return tokens, ts
        if self.available(tokens, ts, now) + amount >= self.capacity:
            return self.capacity, max(now, ts)
        return tokens + amount, ts

    def take(self, tokens: float, ts: float, now: float, cost: float) -> Take:
        """Take `cost` from a bucket stored as (tokens, ts), at `now`.

        Granted when the uncapped refill covers the cost: for cost <= C that is the usual level >= cost;
        for cost > C it means full plus (cost - C) / r of quiet. The new level is the capped level minus
        the cost (negative for an oversized cost: debt)."""
        avail = self.available(tokens, ts, now)
        if avail + _EPS + self.rate * _EARLY_S >= cost:
            return Take(True, min(self.capacity, avail) - cost, max(now, ts), 0.0)
        return Take(False, tokens, ts, (cost - avail) / self.rate)


# --- process-local state --------------------------------------------------------------------------------


@dataclass
class RateLimitStats:
    """Counters of one limiter (one process), for observability and tests."""

    acquires: int = 0  # acquires with limits that returned a permit
    local_acquires: int = 0  # of those, served without any database round trip
    round_trips: int = 0  # database operations of any kind (reads, compare-and-sets, creations, debits, blocks)
    leases: int = 0  # successful compare-and-sets: batches of units granted by the database
    cas_conflicts: int = 0  # compare-and-sets that found another process's write (then re-read)
    block_reads: int = 0  # reads made only to re-check the 429 block
    units_leased: float = 0.0  # units (requests or tokens) granted by the database
    units_drawn: float = 0.0  # units drawn by requests from the local allowances
    units_expired: float = 0.0  # leased units dropped unused when their lease expired
    refunded_locally: float = 0.0  # tokens settle gave back to a live lease
    refunded_shared: float = 0.0  # tokens settle owed to the shared bucket (lease expired)

    @property
    def round_trips_per_acquire(self) -> float:
        return self.round_trips / self.acquires if self.acquires else 0.0


@dataclass
class _Lease:
    units: float  # left to draw
    start: float  # monotonic reading taken before the grant's clock reading: the lease lives until start + D
    serial: int


@dataclass
class _Local:
    """What one process knows and holds of one bucket."""

    cached: tuple[float, float] | None = None  # (tokens, ts) as this process last wrote or read them
    leases: list[_Lease] = field(default_factory=list)  # oldest first
    owed: float = 0.0  # refunds owed to the shared bucket, added by the next write
    recent: deque[tuple[float, float]] = field(default_factory=deque)  # (monotonic, units) used lately (net)
    recent_sum: float = 0.0

    def note(self, mono: float, units: float) -> None:
        """Record use (or, negative, a refund) for the demand estimate."""
        self.recent.append((mono, units))
        self.recent_sum += units

    def held(self) -> float:
        return sum(lease.units for lease in self.leases)


@dataclass
class _Block:
    until: float = 0.0  # epoch seconds: the latest block known (read, or set by this process)
    checked: float | None = None  # monotonic reading before the last read of the block document


@dataclass(frozen=True)
class _Need:
    dimension: Dimension
    bucket_id: str
    bucket: Bucket
    cost: int


@dataclass(frozen=True)
class _Plan:
    need: _Need
    local: _Local
    size: float  # the lease
    take: Take  # the bucket after it
    owed: float  # the refunds the write delivers


# --- the shared limiter ---------------------------------------------------------------------------------


class MongoRateLimiter:
    """Rate limits shared through MongoDB, with leased permits (see the module docstring for the guarantee).

    `lease_s` is D, the lifetime of a lease; every process sharing the buckets must use the same value.
    `block_recheck_s` bounds how stale this process's view of another process's 429 block may get. Lease
    ages use `monotonic` (default: time.monotonic, or `clock` when a clock is injected)."""

    def __init__(self, db: Database, *, max_wait_s: float = 30.0, burst_fraction: float = 0.1,
                 max_penalty_s: float = 60.0, minute_s: float = 60.0, lease_s: float = 2.0,
                 block_recheck_s: float = 0.5, clock: Clock = time.time, sleep: Sleep = asyncio.sleep,
                 monotonic: Clock | None = None) -> None:
        if not 0 <= burst_fraction < 1:
            raise ValueError("burst_fraction must be in [0, 1)")
        if max_wait_s < 0 or max_penalty_s < 0 or minute_s <= 0:
            raise ValueError("max_wait_s and max_penalty_s must be >= 0, minute_s > 0")
        if lease_s <= 0 or block_recheck_s < 0:
            raise ValueError("lease_s must be > 0 and block_recheck_s >= 0")
        self._coll = db[COLLECTION]
        self._max_wait_s = max_wait_s
        self._burst_fraction = burst_fraction
        self._max_penalty_s = max_penalty_s
        self._lease_s = lease_s
        self._horizon_s = lease_s / 2  # a lease is sized for this much of the recent demand
        self._block_recheck_s = block_recheck_s
        self._windows: dict[Dimension, float] = {"rpm": minute_s, "tpm": minute_s, "tpd": minute_s * MINUTES_PER_DAY}
        self._clock = clock
        self._mono: Clock = monotonic if monotonic is not None else (time.monotonic if clock is time.time else clock)
        self._sleep = sleep
        self._locks: dict[str, asyncio.Lock] = {}
        self._local: dict[str, _Local] = {}
        self._blocks: dict[str, _Block] = {}
        self._serials = itertools.count(1)
        self.stats = RateLimitStats()

    def bucket(self, dimension: Dimension, limit: int) -> Bucket:
        return Bucket.for_limit(limit, self._windows[dimension], self._burst_fraction, self._lease_s)

    def _needs(self, key: str, limits: Limits, tokens: int) -> list[_Need]:
        needs = []
        for dim in DIMENSIONS:
            limit = limit_of(limits, dim)
            if limit is not None:
                needs.append(_Need(dim, f"{key}|{dim}", self.bucket(dim, limit), 1 if dim == "rpm" else tokens))
        return needs

    def _state(self, bucket_id: str) -> _Local:
        local = self._local.get(bucket_id)
        if local is None:
            local = self._local[bucket_id] = _Local()
        return local

    def allowance(self, bucket_id: str) -> float:
        """Units this process holds for a bucket in live leases (for tests and diagnostics)."""
        local = self._local.get(bucket_id)
        if local is None:
            return 0.0
        self._expire(local, self._mono())
        return local.held()

    # local allowance --------------------------------------------------------------------------------------

    def _alive(self, lease: _Lease, mono: float) -> bool:
        return 0.0 <= mono - lease.start <= self._lease_s

    def _expire(self, local: _Local, mono: float) -> None:
        """Drop the leases older than D (their units are lost: safe), and forget old demand."""
        if local.leases and not all(self._alive(lease, mono) for lease in local.leases):
            self.stats.units_expired += sum(max(0.0, lease.units) for lease in local.leases
                                            if not self._alive(lease, mono))
            local.leases = [lease for lease in local.leases if self._alive(lease, mono)]
        while local.recent and mono - local.recent[0][0] > self._horizon_s:
            local.recent_sum -= local.recent.popleft()[1]
        if not local.recent:
            local.recent_sum = 0.0

    @staticmethod
    def _covers(local: _Local, cost: int) -> bool:
        """The live leases cover the cost (a zero cost needs a live lease: it checked the bucket's debt)."""
        if cost <= 0:
            return bool(local.leases)
        return local.held() + _EPS >= cost

    def _draw(self, local: _Local, units: float) -> list[tuple[int, float]]:
        """Take units from the live leases, oldest first. Exhausted leases are kept until they expire (a
        refund may come back to them; the newest also marks a zero-cost check as done), at most
        _MAX_LEASES of them."""
        draws: list[tuple[int, float]] = []
        left = units
        for lease in local.leases:
            if left <= 0:
                break
            part = min(left, max(0.0, lease.units))
            if part > 0:
                lease.units -= part
                left -= part
                draws.append((lease.serial, part))
        if len(local.leases) > _MAX_LEASES:
            newest = local.leases[-1]
            kept = [lease for lease in local.leases[:-1] if lease.units > _EPS][-_MAX_LEASES + 1:]
            local.leases = [*kept, newest]
        return draws

    def _serve(self, needs: Sequence[_Need], locals_: Sequence[_Local], permit: Permit, mono: float) -> None:
        for need, local in zip(needs, locals_, strict=True):
            if need.cost <= 0:
                continue
            permit.draws[need.bucket_id] = self._draw(local, float(need.cost))
            local.note(mono, float(need.cost))
            self.stats.units_drawn += need.cost

    def _lease_size(self, need: _Need, local: _Local, lacking: float, level: float) -> float:
        """Units to lease: the recent (net) use of the last D / 2 plus this request's cost, less what is
        held; at least what the request lacks; at most the cap and what the bucket holds (beyond the lack)."""
        want = max(0.0, local.recent_sum) + need.cost - local.held()
        size = min(want, need.bucket.lease_cap, math.floor(level + _EPS))
        return max(lacking, float(size))

    # acquire ----------------------------------------------------------------------------------------------

    async def acquire(self, key: str, limits: Limits, tokens: int) -> Permit:
        """Take one request and `tokens` (the estimate) from the key's allowances, leasing from the shared
        buckets and waiting as needed.

        Raises RateLimited when the wait would exceed max_wait_s (nothing is taken for the request then)."""
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
            trips = await self._acquire_locked(key, needs, start, permit)
        self.stats.acquires += 1
        if trips == 0:
            self.stats.local_acquires += 1
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

    async def _acquire_locked(self, key: str, needs: Sequence[_Need], start: float, permit: Permit) -> int:
        """Serve the request from the allowances, leasing what they lack; returns the round trips made."""
        block = self._blocks.setdefault(key, _Block())
        locals_ = [self._state(need.bucket_id) for need in needs]
        trips = 0
        fresh: set[str] = set()  # buckets read in the previous pass: their copies are current
        just_read = False  # the previous pass read the block document
        while True:
            mono = self._mono()  # before the clock reading: a lease's lifetime starts no later than its stamp
            now = self._clock()
            for local in locals_:
                self._expire(local, mono)
            short = [(need, local) for need, local in zip(needs, locals_, strict=True)
                     if not self._covers(local, need.cost)]
            due = block.checked is None or (
                not just_read and not 0.0 <= mono - block.checked < self._block_recheck_s)
            just_read = False
            if due or any(local.cached is None for _, local in short):
                trips += 1
                just_read = True
                missing = await self._read(key, block, [need for need, _ in short], mono)
                if missing:
                    trips += await self._create(missing, now)
                    fresh = set()
                else:
                    fresh = {need.bucket_id for need, _ in short}
                continue

            wait = max(0.0, block.until - now)
            reason = f"blocked after a provider 429 for {wait:.1f}s more" if wait > 0 else ""
            if not short and wait <= 0:
                self._serve(needs, locals_, permit, mono)
                return trips

            plans: list[_Plan] = []
            stale = False
            for need, local in short:
                assert local.cached is not None  # read just above otherwise
                owed = local.owed
                tokens, ts = need.bucket.credit(*local.cached, now, owed)
                lacking = max(0.0, need.cost - local.held())
                take = need.bucket.take(tokens, ts, now, lacking)
                if not take.granted:
                    if need.bucket_id not in fresh:  # our copy may be old: another process may have refunded
                        local.cached = None
                        stale = True
                    elif take.wait_s > wait:
                        wait, reason = take.wait_s, self._reason(need)
                    continue
                size = self._lease_size(need, local, lacking, need.bucket.level(tokens, ts, now))
                plans.append(_Plan(need, local, size, need.bucket.take(tokens, ts, now, size), owed))
            fresh = set()
            if stale:
                continue
            if wait <= 0:
                for plan in plans:
                    if plan.size <= 0 and plan.owed <= 0:  # a zero cost on a bucket out of debt: nothing to write
                        plan.local.leases.append(_Lease(0.0, mono, next(self._serials)))
                        continue
                    trips += 1
                    if not await self._lease(plan, mono):
                        break
                if self._mono() - mono > self._lease_s and self._clock() - start > self._max_wait_s:
                    # The database took longer than a lease lives: the units expired on arrival.
                    raise RateLimited(f"rate limit of {key}: the database is too slow to lease permits",
                                      retry_after_s=self._lease_s)
                continue

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

    async def _read(self, key: str, block: _Block, needs: Sequence[_Need], mono: float) -> list[_Need]:
        """Read the key's block document and the given buckets (one round trip); returns the missing buckets."""
        block_id = f"{key}|block"
        ids = [need.bucket_id for need in needs]
        self.stats.round_trips += 1
        if not ids:
            self.stats.block_reads += 1
        docs = {doc["_id"]: doc for doc in await self._coll.find({"_id": {"$in": [*ids, block_id]}}).to_list(None)}
        block.checked = mono
        block.until = max(block.until, float(docs.get(block_id, {}).get("blocked_until", 0.0)))
        missing = []
        for need in needs:
            doc = docs.get(need.bucket_id)
            if doc is None:
                missing.append(need)
            else:
                self._state(need.bucket_id).cached = (float(doc["tokens"]), float(doc["ts"]))
        return missing

    async def _create(self, needs: Sequence[_Need], now: float) -> int:
        """Create missing buckets full; a concurrent creation by another process is as good."""
        for need in needs:
            self.stats.round_trips += 1
            with contextlib.suppress(DuplicateKeyError):
                await self._coll.update_one(
                    {"_id": need.bucket_id},
                    {"$setOnInsert": {"tokens": need.bucket.capacity, "ts": now}}, upsert=True)
        return len(needs)

    async def _lease(self, plan: _Plan, mono: float) -> bool:
        """One compare-and-set against the remembered copy; on success the units join the allowance."""
        local, take = plan.local, plan.take
        assert local.cached is not None
        tokens, ts = local.cached
        self.stats.round_trips += 1
        res = await self._coll.update_one({"_id": plan.need.bucket_id, "ts": ts, "tokens": tokens},
                                          {"$set": {"tokens": take.tokens, "ts": take.ts}})
        if not res.matched_count:
            local.cached = None  # another process wrote (or the bucket was deleted): read it again
            self.stats.cas_conflicts += 1
            return False
        local.cached = (take.tokens, take.ts)
        local.owed = max(0.0, local.owed - plan.owed)
        local.leases.append(_Lease(plan.size, mono, next(self._serials)))
        self.stats.leases += 1
        self.stats.units_leased += plan.size
        return True

    # settle / penalize ------------------------------------------------------------------------------------

    async def settle(self, permit: Permit, limits: Limits, actual_tokens: int) -> None:
        """Replace the token estimate by the real count on the tpm/tpd buckets (rpm is not adjusted): unused
        tokens go back to the live leases they came from, or are owed to the shared bucket; extra tokens
        come from the allowance, then from owed refunds, then from the shared bucket.

        A failure is logged, not raised: the call is done and its result matters more than the ledger."""
        delta = permit.tokens - max(0, int(actual_tokens))
        if delta == 0 or limits.empty:
            return
        mono = self._mono()
        for need in self._needs(permit.key, limits, permit.tokens):
            if need.dimension == "rpm":
                continue
            local = self._state(need.bucket_id)
            self._expire(local, mono)
            if delta > 0:
                self._refund(need, local, permit, float(delta), mono)
                continue
            extra = float(-delta)
            local.note(mono, extra)
            extra -= sum(part for _, part in self._draw(local, extra))
            offset = min(extra, local.owed)
            local.owed -= offset
            extra -= offset
            if extra <= _EPS:
                continue
            try:
                await self._debit(need, local, extra)
            except Exception as exc:
                log.warning("rate_limit_settle_failed", key=permit.key, dimension=need.dimension, error=str(exc))

    def _refund(self, need: _Need, local: _Local, permit: Permit, amount: float, mono: float) -> None:
        """Give unused tokens back to the live leases the permit drew them from (newest first), the rest
        to the shared bucket with the next write (capped at C, like any refund)."""
        left = amount
        by_serial = {lease.serial: lease for lease in local.leases}
        for serial, part in reversed(permit.draws.get(need.bucket_id, [])):
            lease = by_serial.get(serial)
            if lease is None or left <= 0:
                continue
            back = min(left, part)
            lease.units += back
            left -= back
        self.stats.refunded_locally += amount - left
        local.note(mono, -amount)  # the demand estimate counts net use
        if left > 0:
            local.owed = min(need.bucket.capacity, local.owed + left)
            self.stats.refunded_shared += left

    async def _debit(self, need: _Need, local: _Local, amount: float) -> None:
        """Debit the shared bucket at once (possibly into debt)."""
        self.stats.round_trips += 1
        doc = await self._coll.find_one_and_update({"_id": need.bucket_id}, {"$inc": {"tokens": -amount}},
                                                   return_document=ReturnDocument.AFTER)
        if doc is not None:
            local.cached = (float(doc["tokens"]), float(doc["ts"]))

    async def penalize(self, key: str, retry_after_s: float | None) -> None:
        """After a provider 429: block new acquires of `key`, at once in this process (allowances included)
        and in all the others within block_recheck_s."""
        delay = retry_after_s if retry_after_s is not None and retry_after_s > 0 else 1.0
        delay = min(delay, self._max_penalty_s)
        until = self._clock() + delay
        block = self._blocks.setdefault(key, _Block())
        block.until = max(block.until, until)
        flt, update = {"_id": f"{key}|block"}, {"$max": {"blocked_until": until}}
        self.stats.round_trips += 1
        try:
            await self._coll.update_one(flt, update, upsert=True)
        except DuplicateKeyError:  # created concurrently by another process: it exists now
            self.stats.round_trips += 1
            await self._coll.update_one(flt, update)
        log.info("rate_limit_penalized", key=key, block_s=round(delay, 3))
