"""Rate limits on the real database: two limiters (two processes' worth of state and locks) share a bucket,
settle refunds, and a 429 penalty of one blocks the other."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from support import mongo, unique_name

from ai_worker.devstack.stack import StackInfo
from ai_worker.errors import RateLimited
from ai_worker.providers.ratelimit import COLLECTION, Bucket, Limits, MongoRateLimiter

pytestmark = pytest.mark.integration


@pytest.fixture
async def db(stack_info: StackInfo) -> AsyncIterator[Any]:
    client = mongo(stack_info)
    name = unique_name("ratelimit")
    try:
        yield client[name]
        await client.drop_database(name)
    finally:
        await client.close()


def _max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, start in enumerate(times):
        while j < len(times) and times[j] < start + window:
            j += 1
        best = max(best, j - i)
    return best


async def test_two_limiters_share_the_limit_over_every_sliding_window(db: Any) -> None:
    minute, rpm, run_s = 3.0, 30, 7.0
    limits = Limits(rpm=rpm)
    bucket = Bucket.for_limit(rpm, minute, 0.1)  # C = 3, r = 9/s
    limiters = [MongoRateLimiter(db, minute_s=minute, max_wait_s=2.0) for _ in range(2)]
    grants: list[float] = []
    rate_limited = 0
    start = time.time()
    deadline = start + run_s

    async def hammer(rl: MongoRateLimiter) -> None:
        nonlocal rate_limited
        while time.time() < deadline:
            try:
                await rl.acquire("m", limits, 0)
            except RateLimited:
                rate_limited += 1
                await asyncio.sleep(0.05)
                continue
            now = time.time()
            if now < deadline:
                grants.append(now)

    await asyncio.gather(*(hammer(rl) for rl in limiters for _ in range(40)))
    elapsed = time.time() - start
    most = _max_in_window(grants, minute)
    allowed = bucket.capacity + bucket.rate * run_s  # the most the bucket can grant in run_s: 66
    print(f"grants={len(grants)} allowed={allowed:.0f} max_per_window={most} rate_limited={rate_limited} "
          f"elapsed={elapsed:.1f}s")
    assert most <= rpm
    assert len(grants) >= 0.8 * allowed
    assert len(grants) <= allowed + 1


async def test_settle_refunds_tokens(db: Any) -> None:
    rl = MongoRateLimiter(db, max_wait_s=0.5)
    limits = Limits(tpm=600)  # C = 60, r = 9/s
    permit = await rl.acquire("m", limits, 50)
    doc = await db[COLLECTION].find_one({"_id": "m|tpm"})
    assert doc["tokens"] == pytest.approx(10.0)
    with pytest.raises(RateLimited, match="tpm 600") as err:
        await rl.acquire("m", limits, 50)  # ~4.4 s away
    assert err.value.retry_after_s == pytest.approx(40 / 9, abs=0.2)
    await rl.settle(permit, limits, 10)  # used 10 of the 50: 40 back
    await rl.acquire("m", limits, 50)
    await rl.settle(permit, limits, 0)  # a big refund on a nearly full bucket is capped
    await rl.settle(permit, limits, 0)
    doc = await db[COLLECTION].find_one({"_id": "m|tpm"})
    assert doc["tokens"] == pytest.approx(60.0)
    await rl.settle(permit, limits, 150)  # 100 more than estimated: debt
    doc = await db[COLLECTION].find_one({"_id": "m|tpm"})
    assert doc["tokens"] == pytest.approx(-40.0)


async def test_penalize_blocks_the_other_limiter(db: Any) -> None:
    a = MongoRateLimiter(db, max_wait_s=0.3, max_penalty_s=5.0)
    b = MongoRateLimiter(db, max_wait_s=0.3)
    limits = Limits(rpm=10_000)
    await b.acquire("m", limits, 0)
    await a.penalize("m", 1.5)
    with pytest.raises(RateLimited, match="429") as err:
        await b.acquire("m", limits, 0)
    assert err.value.retry_after_s is not None and 1.0 < err.value.retry_after_s <= 1.5
    await b.acquire("other-model", limits, 0)  # only that key is blocked
    patient = MongoRateLimiter(db, max_wait_s=5.0)
    t0 = time.monotonic()
    await patient.acquire("m", limits, 0)  # waits the block out
    assert 0.9 < time.monotonic() - t0 < 2.5
    await a.penalize("m", 600)  # capped at max_penalty_s
    doc = await db[COLLECTION].find_one({"_id": "m|block"})
    assert doc["blocked_until"] == pytest.approx(time.time() + 5.0, abs=1.0)
