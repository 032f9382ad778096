"""Idle work across worker processes (issue #10): a worker whose provider slots idle takes due tasks that
wait pending for another worker, and the claim keeps every task run once. Here the tasks topic has one
partition and there are two workers, so one of them reads no event at all: every task it runs, it took
as idle work (with IDLE_WORK_AFTER_S=0 it runs none; tried)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from harness_path import chaos_stack

from ai_worker.client import send_world
from ai_worker.messaging.admin import ensure_topics

pytestmark = pytest.mark.integration

LLM_S, IMAGE_S = 0.2, 1.0
IMAGE_MODELS = ("runware:100@1", "google/gemini-2.5-flash-image")  # models.toml's default and its alternative
WORKER = {"MAX_CONCURRENT_LLM_REQUESTS": "4", "MAX_CONCURRENT_IMAGE_REQUESTS": "2", "LOG_LEVEL": "INFO",
          "KAFKA_SESSION_TIMEOUT_MS": "3000", "KAFKA_HEARTBEAT_INTERVAL_MS": "500"}


def _assignments(log: str) -> list[list[str]]:
    out = []
    for line in log.splitlines():
        if '"partitions assigned"' in line:
            out.append(json.loads(line)["partitions"])
    return out


async def _until(what: str, check: Callable[[], object], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_worker_without_partitions_takes_work_waiting_for_another(tmp_path: Path) -> None:
    async with chaos_stack(tmp_path, latency_ms=LLM_S * 1000) as c:
        slower = {"latency_ms": (IMAGE_S - LLM_S) * 1000}
        c.stack.simulator.config.update({"models": {m: slower for m in IMAGE_MODELS}})
        topic = c.env.tasks_topic + "-one-partition"
        await ensure_topics([c.env.info.kafka_bootstrap], [topic], 1)
        c.env.start_worker("w1", KAFKA_TOPIC_TASKS=topic, **WORKER)
        await _until("w1 to own the partition", lambda: [p for p in _assignments(c.env.log("w1")) if p])
        c.env.start_worker("w2", KAFKA_TOPIC_TASKS=topic, **WORKER)
        # w2's join moves the group to a new generation: both log an assignment once it settled.
        await _until("the group to settle", lambda: _assignments(c.env.log("w2"))
                     and len(_assignments(c.env.log("w1"))) >= 2)
        world, _ = await send_world(kafka=c.env.info.kafka_bootstrap, mongo_uri=c.env.info.mongo_uri,
                                    database=c.env.database, topic=topic, prompt="A mill on a slow river",
                                    users=3, posts=9)
        assert await c.wait_world(world, 120, ("w1", "w2")) == "completed"
        await c.check(world, users=3, posts=9)

        last = {name: _assignments(c.env.log(name))[-1] for name in ("w1", "w2")}
        assert sorted(len(p) for p in last.values()) == [0, 1], last  # one worker read every event
        idle = next(name for name, parts in last.items() if not parts)
        tasks = [t async for t in c.client[c.env.database]["tasks"].find({"world_id": world})]
        by_worker = Counter(str(t["worker_id"]).split("-")[0] for t in tasks)
        print(f"tasks run by worker: {dict(by_worker)}; {idle} owned no partition")
        assert by_worker[idle] > 0, by_worker  # it ran only idle work
        assert all(t["attempt_count"] == 1 for t in tasks), [t["_id"] for t in tasks if t["attempt_count"] != 1]
