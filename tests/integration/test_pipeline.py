"""The whole pipeline on real protocols: tansu (Kafka), SecantusDB (MongoDB), the local platform (gRPC +
HTTP uploads) and the provider simulator (HTTP), with the worker as a separate OS process."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from support import WorkerEnv, mongo, produce, read_topic, wait_world

pytestmark = pytest.mark.integration

STAGES = ["initializing", "world_description", "world_image", "characters", "posts", "finishing"]



async def test_world_end_to_end(wenv: WorkerEnv) -> None:
    await wenv.create_topics()
    worker = wenv.start_worker()
    world_id = wenv.send_message("--prompt", "A drowned city of lantern-lit canals", "--users", "3", "--posts", "6")
    client = mongo(wenv.info)
    try:
        status = await wait_world(client, wenv.database, world_id, procs=[worker])
        assert status["status"] == "completed", status
        assert status["users_created"] == 3
        assert status["posts_created"] == 6
        assert status["users_predicted"] == 3 and status["posts_predicted"] == 6
        assert status["tasks_total"] == status["tasks_completed"] == status["task_predicted"]
        assert status["tasks_failed"] == 0
        assert [s["name"] for s in status["stages"]] == STAGES
        assert all(s["status"] == "completed" for s in status["stages"]), status["stages"]
        assert status["parameters"]["users_count"] == 3
        assert status["api_calls_made_LLM"] > 0 and status["api_calls_made_images"] == 2 + 3 + 6
        assert isinstance(status["llm_cost_total"], float) and status["llm_cost_total"] > 0

        db = client[wenv.database]
        params = await db["world_parameters"].find_one({"_id": world_id})
        assert params is not None and params["name"] and params["locations"]

        tasks = [t async for t in db["tasks"].find({"world_id": world_id})]
        assert len(tasks) == status["tasks_total"]
        assert all(t["status"] == "completed" for t in tasks)

        history = [h async for h in db["api_requests_history"].find({"world_id": world_id})]
        assert history
        for h in history:
            assert {"prompt_tokens", "completion_tokens", "total_tokens", "cost", "duration_ms"} <= set(h), h
            assert "Bearer" not in json.dumps(h, default=str)
        llm = [h for h in history if h["api_type"] == "llm"]
        assert len(llm) == status["api_calls_made_LLM"]
        assert all(h["total_tokens"] > 0 and h["cost"] > 0 for h in llm)
        assert abs(sum(h["cost"] for h in llm) - status["llm_cost_total"]) < 1e-9

        plat = client["generia_platform"]
        characters = [c async for c in plat["characters"].find({"world_id": world_id})]
        assert len(characters) == 3
        assert all(c.get("avatar_media_id") for c in characters)
        posts = [p async for p in plat["posts"].find({"world_id": world_id})]
        assert len(posts) == 6
        assert all(p.get("media_id") and p.get("caption") for p in posts)
        assert {p["character_id"] for p in posts} == {c["_id"] for c in characters}
        world = await plat["worlds"].find_one({"_id": world_id})
        assert world is not None and world.get("image_uuid") and world.get("icon_uuid")
        media = await plat["media"].count_documents({"world_id": world_id, "status": "confirmed"})
        assert media == 2 + 3 + 6
        # The confirmed media URLs travel in the task results (the console shows them).
        urls = {m["_id"]: m["url"] async for m in plat["media"].find({"world_id": world_id})}
        results = {t["type"]: [] for t in tasks}
        for t in tasks:
            results[t["type"]].append(t["result"])
        assert sorted(r["avatar_url"] for r in results["generate_character_avatar"]) == sorted(
            urls[c["avatar_media_id"]] for c in characters)
        assert sorted(r["media_url"] for r in results["generate_post_image"]) == sorted(
            urls[p["media_id"]] for p in posts)
        (image,) = results["generate_world_image"]
        assert image["header_url"] == urls[world["image_uuid"]] and image["icon_url"] == urls[world["icon_uuid"]]
        await check_service_endpoints(wenv, processed=len(tasks), llm_calls=len(llm))
    finally:
        await client.close()


async def check_service_endpoints(wenv: WorkerEnv, *, processed: int, llm_calls: int) -> None:
    """GET /health, /stats and /metrics of the running worker (SERVICE_PORT=0: its port is in its log)."""
    listening = [x for x in wenv.log_lines() if x.get("event") == "health endpoint listening"]
    assert len(listening) == 1, wenv.log()[-3000:]
    base = f"http://127.0.0.1:{listening[0]['port']}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        health = await http.get("/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        stats = (await http.get("/stats")).json()
        assert stats["worker_id"] == f"w1-{wenv.suffix}" and stats["in_flight"] == 0
        assert stats["processed"] >= processed and stats["dead_lettered"] == 0
        assert isinstance(stats["breakers"], dict | list)
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        ok_llm = [line for line in metrics.text.splitlines()
                  if line.startswith("ai_worker_provider_requests_total{") and 'api_type="llm"' in line
                  and 'status="ok"' in line]
        assert ok_llm and sum(float(line.rsplit(" ", 1)[1]) for line in ok_llm) == llm_calls
        assert "ai_worker_provider_request_seconds_bucket" in metrics.text
        assert (await http.get("/nothing-here")).status_code == 404


async def test_platform_shapes_are_accepted(wenv: WorkerEnv) -> None:
    """The platform's own task document (string dates, created_at and test_mode in parameters) and its
    event (with `parameters`, no key, no headers)."""
    await wenv.create_topics()
    worker = wenv.start_worker()
    world_id, task_id = str(uuid.uuid4()), str(uuid.uuid4())
    now = datetime.now(UTC).isoformat()
    params = {"user_prompt": "Ein Dorf aus Glas am Rand der Wüste", "users_count": 1, "posts_count": 1,
              "created_at": now, "test_mode": True}
    client = mongo(wenv.info)
    try:
        await client[wenv.database]["tasks"].insert_one({
            "_id": task_id, "type": "init_world_creation", "world_id": world_id, "status": "pending",
            "worker_id": None, "parameters": params, "result": None, "error": None, "attempt_count": 0,
            "created_at": now, "updated_at": now,
        })
        event = {"event_type": "task_created", "task_id": task_id, "task_type": "init_world_creation",
                 "world_id": world_id, "parameters": params}
        await produce(wenv.info.kafka_bootstrap, wenv.tasks_topic, [json.dumps(event).encode()])
        status = await wait_world(client, wenv.database, world_id, procs=[worker])
        assert status["status"] == "completed", status
        assert status["users_created"] == 1 and status["posts_created"] == 1
    finally:
        await client.close()


async def test_bad_input_is_dead_lettered_and_consumer_keeps_going(wenv: WorkerEnv) -> None:
    await wenv.create_topics()
    worker = wenv.start_worker()
    client = mongo(wenv.info)
    db = client[wenv.database]
    try:
        # A task with an empty user_prompt, inserted as the platform would.
        bad_world, bad_task = str(uuid.uuid4()), str(uuid.uuid4())
        await db["tasks"].insert_one({
            "_id": bad_task, "type": "init_world_creation", "world_id": bad_world, "status": "pending",
            "worker_id": None, "parameters": {"user_prompt": "   ", "users_count": 2, "posts_count": 2},
            "result": None, "error": None, "attempt_count": 0,
            "created_at": datetime.now(UTC), "updated_at": datetime.now(UTC),
        })
        missing_task = str(uuid.uuid4())
        await produce(wenv.info.kafka_bootstrap, wenv.tasks_topic, [
            b"this is not json {",
            json.dumps({"event_type": "task_exploded", "task_id": str(uuid.uuid4())}).encode(),
            json.dumps({"event_type": "task_created", "task_id": missing_task}).encode(),
            json.dumps({"event_type": "task_created", "task_id": bad_task, "task_type": "init_world_creation",
                        "world_id": bad_world}).encode(),
        ])
        # The consumer keeps consuming: a good world sent after the bad messages completes.
        world_id = wenv.send_message("--prompt", "A quiet lighthouse town", "--users", "1", "--posts", "1")
        status = await wait_world(client, wenv.database, world_id, procs=[worker])
        assert status["status"] == "completed"

        bad = await db["tasks"].find_one({"_id": bad_task})
        assert bad is not None and bad["status"] == "failed"
        assert "user_prompt" in bad["error"]
        bad_status = await wait_world(client, wenv.database, bad_world, procs=[worker])
        assert bad_status["status"] == "failed"
        assert bad_status["failure_reason"].startswith("invalid_parameters: ") and "user_prompt" in bad_status[
            "failure_reason"]
        assert (bad_status["users_predicted"], bad_status["posts_predicted"]) == (0, 0)
        assert (bad_status["tasks_total"], bad_status["tasks_failed"]) == (1, 1)

        dead = await read_topic(wenv.info.kafka_bootstrap, wenv.dlq_topic, expect=3)
        reasons = sorted(dict(m.headers)["x-dlq-reason"].decode() for m in dead)
        assert len(dead) == 3, reasons
        assert any(r.startswith("not JSON") for r in reasons)
        assert any("unknown event_type" in r for r in reasons)
        assert any(missing_task in r for r in reasons)
        assert b"this is not json {" in [m.value for m in dead]
        for m in dead:
            headers = dict(m.headers)
            assert headers["x-dlq-source-topic"].decode() == wenv.tasks_topic
            assert int(headers["x-dlq-source-offset"]) >= 0

        logged = [line for line in wenv.log_lines() if line.get("event") == "message dead-lettered"]
        assert len(logged) == 3
        failed = [line for line in wenv.log_lines() if line.get("event") == "task failed"]
        assert any(line.get("task_id") == bad_task and "user_prompt" in line.get("error", "") for line in failed)
        assert worker.poll() is None
    finally:
        await client.close()
