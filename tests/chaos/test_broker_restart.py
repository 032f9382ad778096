"""C2: the broker is SIGKILLed mid-world and a NEW, EMPTY broker starts on the same port (the in-memory broker
loses every topic, event, consumer group and offset). The workers notice, re-create their topics (the
reconciler), rejoin the group, and the events lost with the broker are republished from MongoDB."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from harness import Chaos, chaos_stack
from invariants import record_result

NAMES = ("w1", "w2")


async def wait_progress(c: Chaos, world_id: str, completed: int, timeout_s: float = 30) -> None:
    """Wait until `completed` tasks of the world are done (so the outage lands mid-world)."""
    tasks = c.client[c.env.database]["tasks"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await tasks.count_documents({"world_id": world_id, "status": "completed"}) >= completed:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"world {world_id}: fewer than {completed} tasks completed in {timeout_s}s")


async def run_c2(tmp_path: Path, *, users: int, posts: int, outages: int, after_tasks: int, down_s: float,
                 timeout_s: float, latency_ms: float) -> None:
    async with chaos_stack(tmp_path, latency_ms=latency_ms) as c:
        for name in NAMES:
            c.start_worker(name)
        t0 = time.monotonic()
        world_id = await c.send(users, posts)
        for i in range(outages):
            await wait_progress(c, world_id, after_tasks * (i + 1))
            assert await c.world_status(world_id) == "in_progress", "the world finished before the outage"
            await c.stack.broker.akill()
            await asyncio.sleep(down_s)
            await c.stack.broker.astart()  # same port, empty: the workers must re-create the topics
        status = await c.wait_world(world_id, timeout_s, NAMES)
        elapsed = time.monotonic() - t0
        assert status == "completed", c.tails(NAMES)
        report = await c.check(world_id, users=users, posts=posts)  # no call is interrupted: all exact
        print(f"C2 {users}/{posts}: {outages} broker restarts, completed in {elapsed:.1f}s")
        record_result("C2 broker SIGKILL + empty restart (2 workers)", f"{users}/{posts}", outages, report,
                      elapsed, f"down {down_s}s after every {after_tasks} completed tasks, "
                      f"latency {latency_ms:.0f} ms")


async def test_c2_broker_restart_ci(tmp_path: Path) -> None:
    await run_c2(tmp_path, users=4, posts=8, outages=1, after_tasks=8, down_s=1.0, timeout_s=60,
                 latency_ms=500)


@pytest.mark.chaos
async def test_c2_broker_restart_chaos(tmp_path: Path) -> None:
    await run_c2(tmp_path, users=10, posts=30, outages=3, after_tasks=20, down_s=2.0, timeout_s=180,
                 latency_ms=800)
