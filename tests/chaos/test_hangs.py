"""C8: hangs. The provider accepts 20% of requests and never answers them, and the Character service's
UpdateCharacter hangs for 40% of calls with a gRPC deadline far longer than the job may run. HTTP timeouts
and in-call retries handle the provider; the per-attempt timeout of the job cancels the stuck gRPC call,
records a `timeout` and retries the task. The world completes, and no task stays `in_progress` longer than
its type's timeout plus one lease (sampled every 0.2 s for the whole run)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from harness import FAST, chaos_stack
from invariants import record_result

LEASE_S = 4.0
TIMEOUTS = {  # seconds per attempt, short so that a hang is cut off quickly
    "init_world_creation": 10, "generate_world_description": 20, "generate_world_image": 20,
    "generate_character_batch": 20, "generate_character": 10, "generate_character_avatar": 6,
    "generate_post_batch": 20, "generate_post": 20, "generate_post_image": 20,
}
WORKER = {
    **FAST,
    "TASK_LEASE_S": str(LEASE_S),
    "TASK_TIMEOUTS_S": json.dumps(TIMEOUTS),
    "TASK_MAX_ATTEMPTS": json.dumps({"generate_character_avatar": 6}),
    "LLM_TIMEOUT_S": "2",
    "IMAGE_TIMEOUT_S": "2",
    "PROVIDER_MAX_RETRIES": "4",
    "PROVIDER_RETRY_BASE_S": "0.1",
    "PROVIDER_RETRY_MAX_S": "0.5",
    "GRPC_DEADLINE_S": "60",  # the stuck call is not cut off by its deadline: the job's timeout must do it
}
NAMES = ("w1", "w2")


async def watch_in_progress(c: Any, database: str, stop: asyncio.Event, longest: dict[str, float]) -> None:
    """Record, per task type, the longest a (task, attempt) was seen in progress."""
    first_seen: dict[tuple[str, int], tuple[str, float]] = {}
    while not stop.is_set():
        now = time.monotonic()
        try:
            docs = [d async for d in c.client[database]["tasks"].find(
                {"status": "in_progress"}, {"type": 1, "attempt_count": 1})]
        except Exception:
            docs = []
        for d in docs:
            key = (d["_id"], d.get("attempt_count", 0))
            task_type, since = first_seen.setdefault(key, (d["type"], now))
            longest[task_type] = max(longest.get(task_type, 0.0), now - since)
        await asyncio.sleep(0.2)


async def run_c8(tmp_path: Path, *, users: int, posts: int, timeout_s: float, seed: int) -> None:
    async with chaos_stack(tmp_path) as c:
        c.stack.simulator.config.update({"hang_rate": 0.2, "hang_s": 600, "seed": seed})
        c.stack.platform.hang("UpdateCharacter", 0.4)
        for name in NAMES:
            c.env.start_worker(name, **WORKER)
        stop, longest = asyncio.Event(), {}
        watcher = asyncio.create_task(watch_in_progress(c, c.env.database, stop, longest))
        t0 = time.monotonic()
        world_id = await c.send(users, posts)
        try:
            status = await c.wait_world(world_id, timeout_s, NAMES)
        finally:
            stop.set()
            await watcher
        elapsed = time.monotonic() - t0
        assert status == "completed", c.tails(NAMES)
        report = await c.check(world_id, users=users, posts=posts)
        assert c.stack.simulator.stats["hang"] > 0 and c.stack.platform.hung > 0, "no hang was injected"
        over = {t: round(s, 1) for t, s in longest.items() if s > TIMEOUTS[t] + LEASE_S + 1.0}
        assert not over, f"tasks in progress longer than their timeout plus one lease: {over}"
        timeouts = await c.client[c.env.database]["tasks"].count_documents(
            {"world_id": world_id, "attempts.error_type": "timeout"})
        assert timeouts > 0, "the hung gRPC calls should have been cut off by the job's timeout"
        print(f"C8 {users}/{posts}: completed in {elapsed:.1f}s, {c.stack.simulator.stats['hang']} provider hangs, "
              f"{c.stack.platform.hung} gRPC hangs, {timeouts} tasks with a timed-out attempt, "
              f"longest in progress {max(longest.values()):.1f}s")
        record_result("C8 hangs (provider 20%, UpdateCharacter 40%)", f"{users}/{posts}",
                      c.stack.simulator.stats["hang"] + c.stack.platform.hung, report, elapsed,
                      f"longest in_progress {max(longest.values()):.1f}s; timeouts+lease bound held")


async def test_c8_hangs_ci(tmp_path: Path) -> None:
    await run_c8(tmp_path, users=4, posts=8, timeout_s=120, seed=8)


@pytest.mark.chaos
async def test_c8_hangs_chaos(tmp_path: Path) -> None:
    await run_c8(tmp_path, users=10, posts=30, timeout_s=300, seed=80)
