"""C1: three worker processes; a random one is SIGKILLed every few seconds and started again while a world
is generated. The world still completes with exactly N characters and M posts and no duplicated effects."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest
from harness import Chaos, chaos_stack
from invariants import CHARACTER_FOUND, record_result

NAMES = ("w1", "w2", "w3")


async def busy_worker(c: Chaos, world_id: str, rng: random.Random, wait_s: float = 2.0) -> str:
    """A worker that holds a task in progress right now (so the kill lands mid-task), waiting up to
    `wait_s` for one; otherwise a random worker."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        owners = await c.client[c.env.database]["tasks"].distinct(
            "worker_id", {"world_id": world_id, "status": "in_progress"})
        names = sorted({str(o).split("-", 1)[0] for o in owners if o} & set(NAMES))
        if names:
            return rng.choice(names)
        await asyncio.sleep(0.1)
    return rng.choice(NAMES)


async def run_c1(tmp_path: Path, *, users: int, posts: int, every_s: float, kill_for_s: float, timeout_s: float,
                 latency_ms: float, seed: int) -> None:
    rng = random.Random(seed)
    async with chaos_stack(tmp_path, latency_ms=latency_ms) as c:
        procs = {name: c.start_worker(name) for name in NAMES}
        t0 = time.monotonic()
        world_id = await c.send(users, posts)
        kills = 0
        # Kill phase (bounded): SIGKILL a worker that holds a task in progress (else a random one), restart it.
        while time.monotonic() - t0 < kill_for_s:
            await asyncio.sleep(every_s * rng.uniform(0.6, 1.4))
            if await c.world_status(world_id) in ("completed", "failed"):
                break
            name = await busy_worker(c, world_id, rng)
            procs[name].kill()
            await asyncio.to_thread(procs[name].wait)
            kills += 1
            procs[name] = c.start_worker(name)
        status = await c.wait_world(world_id, timeout_s, NAMES)
        elapsed = time.monotonic() - t0
        assert kills >= 2, f"only {kills} kills landed before the world finished: the scenario proved nothing"
        assert status == "completed", c.tails(NAMES)
        # kill -9 interrupts calls in flight: a post or an upload whose id was not saved yet is made again
        # (reported), and a provider call in flight is billed but never recorded (reported).
        report = await c.check(world_id, users=users, posts=posts, may_duplicate=True, billed_exact=False)
        reused = c.count_logged(NAMES, CHARACTER_FOUND)
        print(f"C1 {users}/{posts}: {kills} kills, completed in {elapsed:.1f}s; {reused} characters found by look-up")
        record_result("C1 kill -9 random worker (3 workers)", f"{users}/{posts}", kills, report, elapsed,
                      f"kill every ~{every_s}s for <= {kill_for_s}s, llm/image latency {latency_ms:.0f} ms; "
                      f"{reused} characters of killed attempts found by the look-up instead of created again")


async def test_c1_worker_kills_ci(tmp_path: Path) -> None:
    await run_c1(tmp_path, users=4, posts=8, every_s=1.5, kill_for_s=12, timeout_s=60, latency_ms=1000, seed=1)


@pytest.mark.chaos
async def test_c1_worker_kills_chaos(tmp_path: Path) -> None:
    await run_c1(tmp_path, users=10, posts=30, every_s=3, kill_for_s=60, timeout_s=180, latency_ms=1000, seed=2)
