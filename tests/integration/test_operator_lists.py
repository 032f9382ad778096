"""`ai-worker worlds` and `ai-worker tasks`: the owners' queries against the real database, their indexes,
and the commands' JSON output."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from support import WorkerEnv, mongo

from ai_worker.tasks.store import TaskStore
from ai_worker.worlds.status import WorldStatusStore, new_status_document

pytestmark = pytest.mark.integration


def _world(status: str, created: datetime, **extra: Any) -> dict[str, Any]:
    doc = new_status_document(users=2, posts=4, user_prompt="a world", task_predicted=10, llm_call_limit=50,
                              image_call_limit=50, budget_usd=None, now=created,
                              first_task_type="init_world_creation")
    doc.update(status=status, **extra)
    return doc


def _task(task_id: str, world_id: str, task_type: str, status: str, created: datetime, **extra: Any
          ) -> dict[str, Any]:
    return {"_id": task_id, "world_id": world_id, "type": task_type, "status": status, "attempt_count": 1,
            "created_at": created, "updated_at": created, **extra}


async def _seed(wenv: WorkerEnv) -> datetime:
    now = datetime.now(UTC)
    client = mongo(wenv.info)
    db = client[wenv.database]
    try:
        await WorldStatusStore(db).ensure_indexes()
        await TaskStore(db).ensure_indexes()
        worlds = db["world_generation_status"]
        await worlds.insert_many([
            {"_id": "w-old", **_world("completed", now - timedelta(days=3), llm_cost_total=1.5)},
            {"_id": "w-failed", **_world("failed", now - timedelta(hours=2), failure_reason="budget_exceeded")},
            {"_id": "w-live", **_world("in_progress", now - timedelta(minutes=5), tasks_completed=4)},
        ])
        await db["tasks"].insert_many([
            _task("t1", "w-failed", "init_world_creation", "completed", now - timedelta(hours=2)),
            _task("t2", "w-failed", "generate_post", "failed", now - timedelta(hours=2) + timedelta(seconds=1),
                  error_type="provider_timeout", error="the LLM did not answer"),
            _task("t3", "w-failed", "generate_post", "failed", now - timedelta(hours=2) + timedelta(seconds=2),
                  error_type="budget_exceeded", error="over budget"),
            _task("t4", "w-failed", "generate_post_image", "cancelled",
                  now - timedelta(hours=2) + timedelta(seconds=3)),
            _task("t5", "w-live", "generate_post", "pending", now),
        ])
    finally:
        await client.close()
    return now


async def test_owner_queries_filter_and_order(wenv: WorkerEnv) -> None:
    now = await _seed(wenv)
    client = mongo(wenv.info)
    db = client[wenv.database]
    try:
        worlds = WorldStatusStore(db)
        assert [d["_id"] for d in await worlds.recent()] == ["w-live", "w-failed", "w-old"]
        assert [d["_id"] for d in await worlds.recent(status="failed")] == ["w-failed"]
        assert [d["_id"] for d in await worlds.recent(since=now - timedelta(hours=24))] == ["w-live", "w-failed"]
        assert [d["_id"] for d in await worlds.recent(limit=1)] == ["w-live"]
        assert "stages" not in (await worlds.recent(limit=1))[0]  # only what a listing shows

        tasks = TaskStore(db)
        assert [d["_id"] for d in await tasks.list_for_world("w-failed")] == ["t1", "t2", "t3", "t4"]
        failed = await tasks.list_for_world("w-failed", status="failed")
        assert [(d["_id"], d["error_type"]) for d in failed] == [("t2", "provider_timeout"), ("t3", "budget_exceeded")]
        assert [d["_id"] for d in await tasks.list_for_world("w-failed", task_type="generate_post_image")] == ["t4"]
        assert await tasks.list_for_world("w-failed", status="failed", task_type="init_world_creation") == []

        # The indexes that serve them.
        world_keys = [list(ix["key"].items()) async for ix in await db["world_generation_status"].list_indexes()]
        assert [("status", 1), ("created_at", -1)] in world_keys and [("created_at", -1)] in world_keys
        task_keys = [list(ix["key"].items()) async for ix in await db["tasks"].list_indexes()]
        # (world_id, status, created_at) serves all four listings (by type: its world_id prefix); every
        # further index would cost every write to tasks (docs/DECISIONS.md, "Database access").
        assert [("world_id", 1), ("status", 1), ("created_at", 1)] in task_keys
    finally:
        await client.close()


def _cli(wenv: WorkerEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ai_worker", *args], capture_output=True, text=True, timeout=60,
                          env=wenv.env(), check=False)


async def test_worlds_and_tasks_commands(wenv: WorkerEnv) -> None:
    await _seed(wenv)
    res = await asyncio.to_thread(_cli, wenv, "worlds", "--since", "24h", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["world_id"] for r in rows] == ["w-live", "w-failed"]
    assert rows[1]["failure_reason"] == "budget_exceeded" and rows[0]["progress"] == 0.4

    res = await asyncio.to_thread(_cli, wenv, "worlds", "--status", "completed")
    assert res.returncode == 0 and "w-old" in res.stdout and "w-live" not in res.stdout
    assert "1.5000" in res.stdout  # cost

    res = await asyncio.to_thread(_cli, wenv, "tasks", "w-failed", "--status", "failed")
    assert res.returncode == 0, res.stderr
    assert "provider_timeout" in res.stdout and "budget_exceeded" in res.stdout and "t1" not in res.stdout
    assert "failed 2: provider_timeout 1, budget_exceeded 1" in res.stdout

    res = await asyncio.to_thread(_cli, wenv, "tasks", "w-failed", "--type", "generate_post", "--json")
    assert [r["task_id"] for r in json.loads(res.stdout)] == ["t2", "t3"]

    res = await asyncio.to_thread(_cli, wenv, "tasks", "no-such-world")
    assert res.returncode == 1 and "no tasks for world no-such-world" in res.stderr

    res = await asyncio.to_thread(_cli, wenv, "tasks", "w-failed", "--status", "broken")
    assert res.returncode == 2
