"""The metrics and the status document of a real worker process (README "Metrics"): /metrics is scraped before
and after a 2-character / 2-post world and one unusable message, every family is there and the counters moved
by what happened; the worker's document in `workers` appears, is refreshed, equals /stats, shows on the
console's Models page, and is removed when the worker stops."""

from __future__ import annotations

from collections import defaultdict

import httpx
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from support import WorkerEnv, eventually, mongo, produce, wait_world

from ai_worker.client import send_world
from ai_worker.console import data as console_data
from ai_worker.console.app import ConsoleConfig, create_app
from ai_worker.observability.worker_status import WORKERS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

FAMILIES = {
    "ai_worker_tasks_started": "counter", "ai_worker_tasks_finished": "counter",
    "ai_worker_task_duration_seconds": "histogram", "ai_worker_tasks_in_flight": "gauge",
    "ai_worker_events_buffered": "gauge", "ai_worker_events_received": "counter",
    "ai_worker_task_retries": "counter", "ai_worker_dead_letters": "counter", "ai_worker_consumer_lag": "gauge",
    "ai_worker_grpc_calls": "counter", "ai_worker_grpc_call_seconds": "histogram",
    "ai_worker_reconciler_republished": "counter", "ai_worker_lease_expiries": "counter",
    "ai_worker_budget_refusals": "counter", "ai_worker_worlds_finished": "counter",
    "ai_worker_provider_requests": "counter", "ai_worker_provider_request_seconds": "histogram",
    "ai_worker_provider_tokens": "counter", "ai_worker_provider_cost_usd": "counter",
}
TASKS_2_2 = {"init_world_creation": 1, "generate_world_description": 1, "generate_world_image": 1,
             "generate_character_batch": 1, "generate_character": 2, "generate_character_avatar": 2,
             "generate_post_batch": 2, "generate_post": 2, "generate_post_image": 2}


class Scrape:
    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[sample.name].append((dict(sample.labels), sample.value))

    def sum(self, name: str, **labels: str) -> float:
        return sum(v for have, v in self.samples.get(name, []) if all(have.get(k) == w for k, w in labels.items()))

    def by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for have, v in self.samples.get(name, []):
            if all(have.get(k) == w for k, w in labels.items()):
                out[have[label]] += v
        return dict(out)


async def scrape(http: httpx.AsyncClient) -> Scrape:
    res = await http.get("/metrics")
    assert res.status_code == 200
    return Scrape(res.text)


def health_port(wenv: WorkerEnv) -> int | None:
    for line in wenv.log_lines():
        if line.get("event") == "health endpoint listening":
            return int(line["port"])
    return None


async def test_metrics_move_during_a_world_and_the_status_document_lives(wenv: WorkerEnv) -> None:
    await wenv.create_topics()
    worker = wenv.start_worker(WORKER_STATUS_INTERVAL_S="0.5")
    worker_id = f"w1-{wenv.suffix}"
    client = mongo(wenv.info)
    db = client[wenv.database]

    async def port() -> int | None:
        assert worker.poll() is None, wenv.log()[-3000:]
        return health_port(wenv)

    try:
        base = f"http://127.0.0.1:{await eventually(port, timeout_s=60, what='health endpoint')}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            before = await scrape(http)
            assert {name: before.types.get(name) for name in FAMILIES} == FAMILIES
            assert before.sum("ai_worker_tasks_started_total") == 0
            assert before.by("ai_worker_dead_letters_total", "reason")["not_json"] == 0

            await produce(wenv.info.kafka_bootstrap, wenv.tasks_topic, [b"not json at all {"])
            world_id, _ = await send_world(kafka=wenv.info.kafka_bootstrap, mongo_uri=wenv.info.mongo_uri,
                                           database=wenv.database, topic=wenv.tasks_topic,
                                           prompt="A market of floating lanterns", users=2, posts=2)
            status = await wait_world(client, wenv.database, world_id, procs=[worker])
            assert status["status"] == "completed", status
            tasks = [t async for t in db["tasks"].find({"world_id": world_id})]
            attempts = sum(t["attempt_count"] for t in tasks)

            after = await scrape(http)
            assert {name: after.types.get(name) for name in FAMILIES} == FAMILIES
            started = after.by("ai_worker_tasks_started_total", "type")
            assert sum(started.values()) == attempts and started.keys() == TASKS_2_2.keys()
            assert after.by("ai_worker_tasks_finished_total", "type", outcome="completed") == TASKS_2_2
            assert after.sum("ai_worker_tasks_finished_total") == attempts
            assert after.sum("ai_worker_task_duration_seconds_count") == attempts
            assert after.sum("ai_worker_task_retries_total") == attempts - len(tasks)
            assert after.by("ai_worker_worlds_finished_total", "status") == {"completed": 1, "failed": 0}
            assert after.by("ai_worker_dead_letters_total", "reason")["not_json"] == 1
            assert after.sum("ai_worker_dead_letters_total") == 1
            assert after.sum("ai_worker_events_received_total") >= len(tasks) + 1
            assert after.sum("ai_worker_tasks_in_flight") == 0 and after.sum("ai_worker_events_buffered") == 0
            grpc = after.by("ai_worker_grpc_calls_total", "method", code="OK")
            assert grpc["CreateCharacter"] == 2 and grpc["CreateAIPost"] == 2 and grpc["ConfirmUpload"] == 6
            assert after.sum("ai_worker_grpc_call_seconds_count") == after.sum("ai_worker_grpc_calls_total")
            llm_calls = await db["api_requests_history"].count_documents({"world_id": world_id, "api_type": "llm"})
            assert after.sum("ai_worker_provider_requests_total", api_type="llm") == llm_calls
            assert after.sum("ai_worker_provider_requests_total", api_type="image_generation", status="ok") == 6
            assert after.sum("ai_worker_budget_refusals_total") == 0

            async def lag() -> dict[str, float]:  # refreshed every 5 s from the poll loop
                partitions = (await scrape(http)).by("ai_worker_consumer_lag", "partition", topic=wenv.tasks_topic)
                return partitions if len(partitions) == 4 else {}

            assert set((await eventually(lag, timeout_s=15, interval_s=0.5, what="lag of 4 partitions")).values()) \
                == {0.0}

            # The status document: there, refreshed, the same fields as /stats, on the console's Models page.
            doc = await eventually(lambda: db[WORKERS].find_one({"_id": worker_id}), what="worker status document")
            refreshed = await eventually(lambda: db[WORKERS].find_one({"_id": worker_id,
                                                                       "updated_at": {"$gt": doc["updated_at"]}}),
                                         timeout_s=5, what="a refreshed status document")
            stats = (await http.get("/stats")).json()
            assert set(stats) == (set(refreshed) - {"_id"}) | {"worker_id"}
            assert stats["worker_id"] == worker_id and stats["processed"] == refreshed["processed"] >= len(tasks)
            assert refreshed["in_flight"] == 0 and refreshed["dead_lettered"] == 1 and refreshed["pid"] == worker.pid
            assert refreshed["started_at"] <= refreshed["updated_at"]
            assert isinstance(refreshed["breakers"], dict)
            assert [w.id for w in await console_data.workers(db)] == [worker_id]
            console = TestClient(TestServer(create_app(ConsoleConfig(mongo_uri="mongodb://x.invalid",
                                                                     database=wenv.database), db=db)))
            await console.start_server()
            try:
                html = await (await console.get("/models")).text()
            finally:
                await console.close()
            assert worker_id in html and "No worker has reported" not in html

        wenv.stop()
        assert worker.returncode == 0, wenv.log()[-3000:]
        assert await db[WORKERS].find_one({"_id": worker_id}) is None
        indexes = {i["name"]: i async for i in await db[WORKERS].list_indexes()}
        assert indexes["ttl_updated_at"]["expireAfterSeconds"] == 300
    finally:
        await client.close()

