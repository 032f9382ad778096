"""Operator commands on real servers: `ai-worker dlq list|replay` and `ai-worker cancel`."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from support import WorkerEnv, mongo, produce, read_topic

pytestmark = pytest.mark.integration



def cli(wenv: WorkerEnv, *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "ai_worker", *args], capture_output=True, text=True,
                         timeout=60, env=wenv.env(), check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


async def test_dlq_list_and_replay(wenv: WorkerEnv) -> None:
    await wenv.create_topics()
    wenv.start_worker()
    await produce(wenv.info.kafka_bootstrap, wenv.tasks_topic, [b"definitely not json"])
    assert len(await read_topic(wenv.info.kafka_bootstrap, wenv.dlq_topic, expect=1)) == 1

    kafka = ["--kafka", wenv.info.kafka_bootstrap, "--dlq-topic", wenv.dlq_topic]
    listing = await asyncio.to_thread(cli, wenv, "dlq", "list", *kafka)
    assert "not JSON" in listing and f"{wenv.tasks_topic}:" in listing and "1 message(s)" in listing

    replay = ["dlq", "replay", *kafka, "--topic", wenv.tasks_topic, "--group", f"replay-{wenv.suffix}"]
    assert "replayed 1 message(s)" in await asyncio.to_thread(cli, wenv, *replay)
    # Still bad: the worker dead-letters it again, with its reason.
    again = await read_topic(wenv.info.kafka_bootstrap, wenv.dlq_topic, expect=2)
    assert len(again) == 2 and all(m.value == b"definitely not json" for m in again)
    # The replay group remembers: only the new dead letter is replayed the second time.
    assert "replayed 1 message(s)" in await asyncio.to_thread(cli, wenv, *replay)


async def test_cancel_stops_a_world(wenv: WorkerEnv) -> None:
    await wenv.create_topics()
    worker = wenv.start_worker()
    world_id = wenv.send_message("--prompt", "An endless library", "--users", "6", "--posts", "30")
    client = mongo(wenv.info)
    db = client[wenv.database]
    try:
        for _ in range(200):
            doc = await db["world_generation_status"].find_one({"_id": world_id})
            if doc and doc.get("users_created", 0) >= 1:
                break
            await asyncio.sleep(0.05)
        out = await asyncio.to_thread(cli, wenv, "cancel", world_id, "--reason", "stopped by the test",
                                      "--mongo", wenv.info.mongo_uri, "--database", wenv.database)
        assert "cancelled" in out
        status = await db["world_generation_status"].find_one({"_id": world_id})
        assert status["status"] == "failed" and status["failure_reason"] == "stopped by the test"
        # Nothing keeps running: every task of the world ends terminal, and no content is added after.
        for _ in range(100):
            open_tasks = await db["tasks"].count_documents(
                {"world_id": world_id, "status": {"$in": ["pending", "in_progress"]}})
            if open_tasks == 0:
                break
            await asyncio.sleep(0.1)
        assert open_tasks == 0
        posts = await client["generia_platform"]["posts"].count_documents({"world_id": world_id})
        await asyncio.sleep(2)
        assert await client["generia_platform"]["posts"].count_documents({"world_id": world_id}) == posts
        assert posts < 30
        assert await db["tasks"].count_documents({"world_id": world_id, "status": "cancelled"}) > 0
        assert worker.poll() is None
    finally:
        await client.close()
