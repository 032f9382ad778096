"""Operator actions: a world failed on its budget is retried (with a raised cap) and completes, with exactly
the characters and posts asked for and nothing created twice."""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys

import pytest
from support import WorkerEnv, mongo, wait_world

from ai_worker.jobs import build_registry
from ai_worker.tasks import operations

pytestmark = pytest.mark.integration


async def test_retry_of_a_world_failed_on_its_budget_completes_it_without_duplicates(wenv: WorkerEnv) -> None:
    await wenv.create_topics()
    worker = wenv.start_worker(IMAGE_MODEL="google/gemini-2.5-flash-image", IMAGE_PRICE_USD="0.039")  # $0.039 images
    client = mongo(wenv.info)
    db = client[wenv.database]
    try:
        world_id = wenv.send_message("--prompt", "A lighthouse keepers' guild", "--users", "3", "--posts", "6",
                                     "--budget-usd", "0.05")
        failed = await wait_world(client, wenv.database, world_id, procs=[worker])
        assert failed["status"] == "failed" and failed["failure_reason"] == "budget_exceeded"

        with pytest.raises(ValueError):
            await operations.retry(db, build_registry())
        requeue = await db["tasks"].count_documents({"world_id": world_id, "status": {"$in": ["failed", "cancelled"]}})
        command = [sys.executable, "-m", "ai_worker", "retry", world_id, "--budget-usd", "5", "--mongo",
                   wenv.info.mongo_uri, "--database", wenv.database, "--kafka", wenv.info.kafka_bootstrap,
                   "--topic", wenv.tasks_topic]
        res = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60,
                                      check=False, env=wenv.env())
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"{requeue} task(s) put back to pending, {requeue} event(s) published" in res.stdout, res.stdout

        done = await wait_world(client, wenv.database, world_id, procs=[worker], timeout_s=120)
        assert done["status"] == "completed", done.get("failure_reason")
        assert (done["users_created"], done["posts_created"], done["tasks_failed"]) == (3, 6, 0)
        assert all(s["status"] == "completed" for s in done["stages"])
        plat = client["generia_platform"]
        characters = [c async for c in plat["characters"].find({"world_id": world_id})]
        posts = [p async for p in plat["posts"].find({"world_id": world_id})]
        assert len(characters) == 3 and len(posts) == 6
        # Nothing created twice: one create per planned character and post (by the worker's idempotency key).
        for docs in (characters, posts):
            assert max(collections.Counter(d.get("request_id") for d in docs).values()) == 1
        tasks = [t async for t in db["tasks"].find({"world_id": world_id})]
        assert len(tasks) == done["tasks_total"] and all(t["status"] == "completed" for t in tasks)

        # Retrying a world with nothing failed changes nothing.
        again = await operations.retry(db, build_registry(), world_id=world_id)
        assert (again.tasks_requeued, again.worlds_reopened) == (0, [])
    finally:
        await client.close()
