"""Idle work across worker processes (issue #10): a worker whose provider slots idle takes due tasks that
wait pending for another worker, and the claim keeps every task run once. Here the tasks topic has one
partition and there are two workers, so one of them reads no event at all: every task it runs, it took
as idle work (with IDLE_WORK_AFTER_S=0 it runs none; tried)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from harness_path import chaos_stack
from pymongo import AsyncMongoClient

from ai_worker.client import send_world
from ai_worker.devstack.stack import StackInfo
from ai_worker.jobs import build_registry
from ai_worker.messaging.admin import ensure_topics
from ai_worker.messaging.events import TaskType, utcnow
from ai_worker.tasks.engine import Engine
from ai_worker.tasks.progress import WorldProgress
from ai_worker.tasks.store import TaskStore
from ai_worker.worlds.status import WorldStatusStore

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


async def test_idle_work_is_old_pending_work_of_the_pool_and_never_a_retry(stack_info: StackInfo) -> None:
    """The look-up on the embedded database: pending tasks of the pool's types untouched for the delay,
    oldest first; not a fresh task (its event is on its way), not a retry (its event comes when it is due),
    not another pool's, not a running one."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack_info.mongo_uri, tz_aware=True)
    try:
        db = client[f"idle_{uuid.uuid4().hex[:10]}"]
        store = TaskStore(db)
        await store.ensure_indexes()
        now = utcnow()

        async def task(name: str, task_type: str, age_s: float, status: str = "pending", **extra: Any) -> None:
            at = now - timedelta(seconds=age_s)
            await db["tasks"].insert_one({"_id": name, "type": task_type, "world_id": "w", "status": status,
                                          "parameters": {}, "attempt_count": 0, "created_at": at,
                                          "updated_at": at, **extra})

        avatar, post_image, post = (TaskType.GENERATE_CHARACTER_AVATAR.value, TaskType.GENERATE_POST_IMAGE.value,
                                    TaskType.GENERATE_POST.value)
        await task("old-avatar", avatar, 5)
        await task("older-post-image", post_image, 9)
        await task("fresh-avatar", avatar, 0.1)
        await task("due-retry", avatar, 5, not_before=now - timedelta(seconds=1))
        await task("old-post", post, 9)
        await task("running-avatar", avatar, 9, status="in_progress")
        engine = Engine(store=store, progress=WorldProgress(WorldStatusStore(db), build_registry(), tasks=store),
                        registry=build_registry(), publisher=cast(Any, None), worker_id="w1", lease_s=30)
        events = await engine.idle_work("image", 10, 0.5)
        assert [(e.task_id, e.task_type, e.world_id) for e in events] == [
            ("older-post-image", post_image, "w"), ("old-avatar", avatar, "w")]
        assert [e.task_id for e in await engine.idle_work("image", 1, 0.5)] == ["older-post-image"]
        assert [e.task_id for e in await engine.idle_work("llm", 10, 0.5)] == ["old-post"]
    finally:
        await client.close()
