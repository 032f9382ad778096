"""Fair scheduling across worlds (issue #10): a small world started while a bigger one is being generated
gets its share of the slots at once, instead of waiting behind the big world's backlog. With provider
latency (LLM 0.3 s, images 0.6 s) the small world's makespan stays within twice its makespan alone."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from harness_path import chaos_stack

pytestmark = pytest.mark.integration

LLM_S, IMAGE_S = 0.3, 0.6
IMAGE_MODELS = ("runware:100@1", "google/gemini-2.5-flash-image")  # models.toml's default and its alternative
WORKER = {"MAX_CONCURRENT_LLM_REQUESTS": "4", "MAX_CONCURRENT_IMAGE_REQUESTS": "3", "LOG_LEVEL": "WARNING"}


async def test_a_small_world_started_behind_a_big_one_gets_its_share(tmp_path: Path) -> None:
    async with chaos_stack(tmp_path, latency_ms=LLM_S * 1000) as c:
        sim = c.stack.simulator
        slower = {"latency_ms": (IMAGE_S - LLM_S) * 1000}
        sim.config.update({"models": {m: slower for m in IMAGE_MODELS}})
        c.env.start_worker("w1", **WORKER)
        warm = await c.send(1, 1, prompt="A warm-up hut")  # the worker joins its group, caches, connections
        assert await c.wait_world(warm, 60, ("w1",)) == "completed"

        t0 = time.monotonic()
        alone = await c.send(1, 2, prompt="A lone watchtower")
        assert await c.wait_world(alone, 60, ("w1",)) == "completed"
        alone_s = time.monotonic() - t0

        big = await c.send(10, 60, prompt="A sprawling river delta")
        await asyncio.sleep(2.0)
        t1 = time.monotonic()
        small = await c.send(1, 2, prompt="A second lone watchtower")
        assert await c.wait_world(small, 120, ("w1",)) == "completed"
        small_s = time.monotonic() - t1
        big_doc = await c.client[c.env.database]["world_generation_status"].find_one({"_id": big})
        assert big_doc is not None
        big_done = big_doc["tasks_completed"] / max(big_doc["task_predicted"], 1)
        print(f"small world alone {alone_s:.1f}s, behind the big one {small_s:.1f}s; the big world was "
              f"{big_doc['status']} at {big_done:.0%} of its tasks")
        assert big_doc["status"] == "in_progress", "the big world finished first: the scenario proved nothing"
        # Served in turn (FIFO) the small world waits for the big world's backlog; served fairly it finishes
        # while much of the big world is still to do, and not much slower than alone. Measured on a quiet
        # 2-core machine: fair 4.3 s (1.8x alone) with the big world at 59 %; FIFO (the queue's fairness
        # key removed) 15.5-15.8 s (6.5x), after the big world completed. The bounds sit between the two;
        # bench/makespan.py measures it.
        assert big_done < 0.8, big_done
        assert small_s <= 3 * alone_s, (alone_s, small_s)
        assert await c.wait_world(big, 240, ("w1",)) == "completed"
