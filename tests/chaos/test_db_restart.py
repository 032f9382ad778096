"""C3: the database server is stopped mid-world, stays down for a few seconds and starts again on the same
storage path. Engine transitions that failed meanwhile must not leave tasks stuck: a task left in_progress
is reclaimed when its lease expires, a pending task whose event was consumed during the outage is
republished by the reconciler, and the world completes with exact counts.

No process dies, so every call the provider billed must be in `api_requests_history`: while the database is
down a history write fails and the worker keeps the record in memory until the database takes it
(providers/history.py), so a billed-but-unrecorded difference fails the test."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from harness import chaos_stack
from invariants import CHARACTER_FOUND, record_result
from test_broker_restart import wait_progress

NAMES = ("w1", "w2")
HISTORY_BUFFERED = True  # the worker buffers history records through a database outage


async def run_c3(tmp_path: Path, *, users: int, posts: int, outages: int, after_tasks: int, down_s: float,
                 timeout_s: float, latency_ms: float, kill: bool = False) -> None:
    async with chaos_stack(tmp_path, latency_ms=latency_ms) as c:
        for name in NAMES:
            c.start_worker(name)
        t0 = time.monotonic()
        world_id = await c.send(users, posts)
        for i in range(outages):
            await wait_progress(c, world_id, after_tasks * (i + 1))
            assert await c.world_status(world_id) == "in_progress", "the world finished before the outage"
            if kill:
                await c.stack.db.akill()
            else:
                await c.stack.db.astop()
            await asyncio.sleep(down_s)
            await c.stack.db.astart()  # same port, same storage path
        status = await c.wait_world(world_id, timeout_s, NAMES)
        elapsed = time.monotonic() - t0
        assert status == "completed", c.tails(NAMES)
        # A platform create that succeeded while the database went away before its id was saved is made again
        # by the retry: posts and media may be duplicated (reported); characters are looked up first.
        report = await c.check(world_id, users=users, posts=posts, may_duplicate=True, billed_exact=HISTORY_BUFFERED)
        how = "SIGKILL" if kill else "stop"
        print(f"C3 {users}/{posts}: {outages} database {how}s, completed in {elapsed:.1f}s")
        reused = c.count_logged(NAMES, CHARACTER_FOUND)
        record_result(f"C3 database {how} + restart (2 workers)", f"{users}/{posts}", outages, report, elapsed,
                      f"down {down_s}s after every {after_tasks} completed tasks, latency {latency_ms:.0f} ms; "
                      f"{reused} characters found by the look-up")
        assert report.accounting is not None
        unrecorded = report.accounting.unrecorded
        if unrecorded:  # only reachable while HISTORY_BUFFERED is False (check_world asserts it otherwise)
            pytest.xfail(f"{unrecorded} provider-billed calls missing from api_requests_history after the "
                         "database outage: needs the history buffering of issue #16")


async def test_c3_db_restart_ci(tmp_path: Path) -> None:
    await run_c3(tmp_path, users=4, posts=8, outages=1, after_tasks=8, down_s=3.0, timeout_s=60,
                 latency_ms=500)


@pytest.mark.chaos
async def test_c3_db_restart_chaos(tmp_path: Path) -> None:
    await run_c3(tmp_path, users=10, posts=30, outages=3, after_tasks=20, down_s=4.0, timeout_s=240,
                 latency_ms=800)
