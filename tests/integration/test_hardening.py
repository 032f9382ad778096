"""Hardening against hostile input and unlucky models (issue #8): a world that asks for 10^9 characters
fails fast without blocking the event loop or writing predictions; batches that come back one item short
still give a world exactly the characters and posts it asked for."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from pymongo import AsyncMongoClient
from support import WorkerEnv, mongo, wait_world

from ai_worker.devstack.stack import StackInfo
from ai_worker.jobs import build_registry
from ai_worker.tasks.engine import Engine
from ai_worker.tasks.progress import WorldProgress
from ai_worker.tasks.store import TaskStore
from ai_worker.worlds.status import WorldStatusStore

pytestmark = pytest.mark.integration


class NoEvents:
    async def publish_task(self, task_id: str, task_type: str, world_id: str) -> None:
        return None

    async def publish_progress(self, event: dict[str, Any]) -> None:
        return None


@pytest.fixture
async def db(stack_info: StackInfo) -> AsyncIterator[Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack_info.mongo_uri, tz_aware=True)
    try:
        yield client[f"hardening_{uuid.uuid4().hex[:10]}"]
    finally:
        await client.close()


async def _loop_lag(stop: asyncio.Event, worst: list[float]) -> None:
    """The longest the event loop was late to wake a 5-ms sleeper."""
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(0.005)
        worst[0] = max(worst[0], time.perf_counter() - start - 0.005)


async def test_a_billion_characters_fail_fast_without_predictions_or_a_blocked_loop(db: Any) -> None:
    registry = build_registry()
    store, status = TaskStore(db), WorldStatusStore(db)
    engine = Engine(store=store, progress=WorldProgress(status, registry, tasks=store), registry=registry,
                    publisher=NoEvents(), worker_id="w1", lease_s=30)
    task_id, world_id, now = str(uuid.uuid4()), str(uuid.uuid4()), datetime.now(UTC)
    await db["tasks"].insert_one({
        "_id": task_id, "type": "init_world_creation", "world_id": world_id, "status": "pending", "worker_id": None,
        "parameters": {"user_prompt": "A planet of clerks", "users_count": 10**9, "posts_count": 10**9},
        "result": None, "error": None, "attempt_count": 0, "created_at": now, "updated_at": now})
    stop, worst = asyncio.Event(), [0.0]
    lag = asyncio.create_task(_loop_lag(stop, worst))
    try:
        task = await store.get(task_id)
        assert task is not None
        await engine.process(task)
    finally:
        stop.set()
        await lag
        engine.close()
    doc = await db["tasks"].find_one({"_id": task_id})
    assert doc["status"] == "failed" and doc["error_type"] == "invalid_parameters"
    assert "users_count" in doc["error"]
    attempt = doc["attempts"][0]
    claimed_to_failed = (attempt["ended_at"] - attempt["started_at"]).total_seconds()
    assert claimed_to_failed < 0.1, claimed_to_failed
    assert worst[0] < 0.05, f"event loop blocked {worst[0] * 1000:.0f} ms"
    world = await status.get(world_id)
    assert world is not None and world["status"] == "failed"
    assert world["failure_reason"].startswith("invalid_parameters: ")
    assert (world["users_predicted"], world["posts_predicted"], world["task_predicted"]) == (0, 0, 1)
    assert (world["tasks_total"], world["tasks_failed"]) == (1, 1)


@pytest.fixture
def short_batches(stack_info: StackInfo) -> Iterator[None]:
    """The session's simulator answers 30% of batch requests one item short, for one test."""
    assert stack_info.simulator_url is not None
    root = stack_info.simulator_url.rsplit("/v1", 1)[0]
    httpx.post(f"{root}/_sim/config", json={"short_batch_rate": 0.3}, timeout=5).raise_for_status()
    try:
        yield
    finally:
        httpx.post(f"{root}/_sim/config", json={"short_batch_rate": 0.0}, timeout=5).raise_for_status()


@pytest.mark.usefixtures("short_batches")
@pytest.mark.parametrize(("users", "posts"), [(12, 36), pytest.param(20, 200, marks=pytest.mark.chaos)])
async def test_batches_one_item_short_still_give_exact_counts(wenv: WorkerEnv, users: int, posts: int) -> None:
    await wenv.create_topics()
    worker = wenv.start_worker()
    client = mongo(wenv.info)
    db = client[wenv.database]
    try:
        world_id = wenv.send_message("--prompt", "A market of short measures", "--users", str(users), "--posts",
                                     str(posts))
        status = await wait_world(client, wenv.database, world_id, timeout_s=600, procs=[worker])
        assert status["status"] == "completed", status.get("failure_reason")
        plat = client["generia_platform"]
        assert await plat["characters"].count_documents({"world_id": world_id}) == users
        assert await plat["posts"].count_documents({"world_id": world_id}) == posts
        asked_again = await db["tasks"].count_documents({"world_id": world_id, "steps.ask-2": {"$exists": True}})
        assert asked_again > 0, "no batch came back short: the knob did not bite"
        assert await db["tasks"].count_documents({"world_id": world_id, "status": "failed"}) == 0
    finally:
        await client.close()
