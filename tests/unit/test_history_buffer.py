"""Request history that survives a database outage: a record that cannot be written is kept in the process
and written when the database is back, so the history ends up equal to what the providers billed."""

from __future__ import annotations

import asyncio
from typing import Any

from pymongo.errors import AutoReconnect

from ai_worker.providers.history import ApiRequestRecord, MongoRecorder


class Col:
    def __init__(self, name: str, db: DB) -> None:
        self.name, self.db = name, db
        self.docs: dict[Any, dict[str, Any]] = {}

    async def insert_one(self, doc: dict[str, Any]) -> None:
        self.db.check()
        self.docs[doc["_id"]] = doc

    async def insert_many(self, docs: list[dict[str, Any]], ordered: bool = True) -> None:
        self.db.check()
        for doc in docs:
            self.docs[doc["_id"]] = doc

    async def update_one(self, query: dict[str, Any], update: dict[str, Any], **_: Any) -> None:
        self.db.check()
        self.db.updates.append((self.name, query, update))

    async def aggregate(self, pipeline: list[dict[str, Any]]) -> Any:
        self.db.check()
        world = pipeline[0]["$match"]["world_id"]
        rows: dict[str, list[float]] = {}
        for d in self.docs.values():
            if d["world_id"] == world:
                rows.setdefault(d["api_type"], []).append(d["cost"])

        async def gen() -> Any:
            for api_type, costs in rows.items():
                yield {"_id": api_type, "n": len(costs), "cost": sum(costs)}

        return gen()


class DB:
    def __init__(self) -> None:
        self.down = False
        self.cols: dict[str, Col] = {}
        self.updates: list[tuple[str, dict[str, Any], dict[str, Any]]] = []

    def check(self) -> None:
        if self.down:
            raise AutoReconnect("connection refused")

    def __getitem__(self, name: str) -> Col:
        return self.cols.setdefault(name, Col(name, self))


def record(cost: float) -> ApiRequestRecord:
    return ApiRequestRecord(api_type="image_generation", task_id="t", world_id="w1", request_type="post_image",
                            request_data={}, duration_ms=5, model="m", cost=cost)


async def test_records_written_while_the_database_is_down_are_kept_and_written_later() -> None:
    db = DB()
    recorder = MongoRecorder(db, retry_s=0.01)  # type: ignore[arg-type]
    await recorder.record(record(0.1))
    db.down = True
    await recorder.record(record(0.2))
    await recorder.record(record(0.3))
    assert recorder.pending == 2 and len(db["api_requests_history"].docs) == 1
    await asyncio.sleep(0.05)
    assert recorder.pending == 2  # still down: kept, not lost
    db.down = False
    for _ in range(100):
        if not recorder.pending:
            break
        await asyncio.sleep(0.01)
    assert recorder.pending == 0
    assert sorted(d["cost"] for d in db["api_requests_history"].docs.values()) == [0.1, 0.2, 0.3]
    # The world's counters are set again from the completed history, even if it finished meanwhile.
    (name, query, update) = db.updates[-1]
    assert name == "world_generation_status" and query == {"_id": "w1"}
    assert update["$set"]["api_calls_made_images"] == 3
    await recorder.aclose()


async def test_a_record_that_did_reach_the_server_is_not_written_twice() -> None:
    db = DB()
    recorder = MongoRecorder(db, retry_s=10)  # type: ignore[arg-type]
    db.down = True
    rec = record(0.5)
    await recorder.record(rec)
    db.down = False
    history = db["api_requests_history"]
    history.docs[rec.id] = rec.model_dump(by_alias=True)  # the first insert was applied after all
    assert await recorder.flush() == 1
    assert len(history.docs) == 1
    await recorder.aclose()


async def test_shutdown_writes_what_is_left() -> None:
    db = DB()
    recorder = MongoRecorder(db, retry_s=10)  # type: ignore[arg-type]
    db.down = True
    await recorder.record(record(0.4))
    db.down = False
    await recorder.aclose()
    assert recorder.pending == 0 and len(db["api_requests_history"].docs) == 1
