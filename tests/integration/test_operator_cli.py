"""Operator commands on real servers: `ai-worker dlq list|replay`, `cancel` and `send`."""

from __future__ import annotations

import asyncio
import json
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
        # A platform call already sent when the cancel landed completes; no step starts after it (each step
        # confirms the task is still the worker's first), so after one call's time nothing more is added.
        await asyncio.sleep(1)
        posts = await client["generia_platform"]["posts"].count_documents({"world_id": world_id})
        await asyncio.sleep(2)
        assert await client["generia_platform"]["posts"].count_documents({"world_id": world_id}) == posts
        assert posts < 30
        assert await db["tasks"].count_documents({"world_id": world_id, "status": "cancelled"}) > 0
        assert worker.poll() is None
    finally:
        await client.close()


def cli_result(wenv: WorkerEnv, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ai_worker", *args], capture_output=True, text=True, timeout=60,
                          env=wenv.env(**env), check=False)


async def test_send_talks_to_kafka_first(wenv: WorkerEnv) -> None:
    """A broker that cannot be reached means nothing is inserted; once it is back, exactly one world."""
    await wenv.create_topics()
    client = mongo(wenv.info)
    tasks = client[wenv.database]["tasks"]
    try:
        down = await asyncio.to_thread(cli_result, wenv, "send", "--kafka", "127.0.0.1:1")
        assert down.returncode == 1, down.stderr
        assert "Kafka at 127.0.0.1:1" in down.stderr and "world_id" not in down.stdout
        assert await tasks.count_documents({}) == 0

        up = await asyncio.to_thread(cli_result, wenv, "send", "--users", "1", "--posts", "0")
        assert up.returncode == 0, up.stderr
        assert await tasks.count_documents({"type": "init_world_creation"}) == 1
        events = await read_topic(wenv.info.kafka_bootstrap, wenv.tasks_topic, expect=1)
        assert len(events) == 1
    finally:
        await client.close()


async def test_send_with_an_idempotency_key_starts_one_world(wenv: WorkerEnv) -> None:
    await wenv.create_topics()
    client = mongo(wenv.info)
    tasks = client[wenv.database]["tasks"]
    try:
        first = await asyncio.to_thread(cli_result, wenv, "send", "--idempotency-key", "order-42")
        again = await asyncio.to_thread(cli_result, wenv, "send", "--idempotency-key", "order-42",
                                        "--prompt", "something else")
        assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
        ids = [line for line in first.stdout.splitlines() if line.startswith(("world_id", "task_id"))]
        assert ids == [line for line in again.stdout.splitlines() if line.startswith(("world_id", "task_id"))]
        assert "nothing inserted" in again.stdout
        docs = [d async for d in tasks.find({})]
        assert len(docs) == 1 and docs[0]["parameters"]["user_prompt"] != "something else"
        # Both sends published the event (the second one re-publishes the stored parameters).
        events = await read_topic(wenv.info.kafka_bootstrap, wenv.tasks_topic, expect=2)
        assert len(events) == 2
        assert {json.loads(e.value)["task_id"] for e in events} == {docs[0]["_id"]}
    finally:
        await client.close()


def test_send_publish_failure_after_insert_warns_and_exits_0(wenv: WorkerEnv, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """The insert is the commitment: a publish that fails afterwards is left to the worker's reconciler."""
    import logging

    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaTimeoutError
    from typer.testing import CliRunner

    from ai_worker.cli import app

    asyncio.run(wenv.create_topics())

    async def broken(self: object, *args: object, **kwargs: object) -> None:
        raise KafkaTimeoutError("the broker went away")

    monkeypatch.setattr(AIOKafkaProducer, "send_and_wait", broken)
    for name in ("aiokafka", "kafka", "asyncio", "pymongo"):  # the CLI quiets them: restore after
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    res = CliRunner().invoke(app, ["send", "--kafka", wenv.info.kafka_bootstrap, "--mongo", wenv.info.mongo_uri,
                                   "--database", wenv.database, "--topic", wenv.tasks_topic,
                                   "--idempotency-key", "k"])
    assert res.exit_code == 0, res.output
    assert "world_id:" in res.output
    assert f"Kafka at {wenv.info.kafka_bootstrap}" in res.output and "RECONCILE_INTERVAL_S" in res.output

    async def count() -> int:
        client = mongo(wenv.info)
        try:
            return await client[wenv.database]["tasks"].count_documents({})
        finally:
            await client.close()

    assert asyncio.run(count()) == 1
