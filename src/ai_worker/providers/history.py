"""`api_requests_history`: one document per external call attempt (CONTRACTS.md), plus the per-world
call and cost counters on `world_generation_status`. Never store secrets or image bytes here."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import structlog
from pydantic import BaseModel, Field
from pymongo import ASCENDING

from ai_worker.mongo import Collection, Database, Document
from ai_worker.observability.metrics import observe_call
from ai_worker.providers.stats import ModelStatsStore
from ai_worker.worlds.status import CallKind, WorldStatusStore

log = structlog.get_logger(__name__)

ApiType = Literal["llm", "image_generation", "grpc", "upload"]

HISTORY_COLLECTION = "api_requests_history"
_COUNTED_KINDS: dict[str, CallKind] = {"llm": "llm", "image_generation": "image"}


@dataclass(frozen=True)
class CallContext:
    """Who a call is made for: recorded on every history document."""

    task_id: str | None
    world_id: str | None
    request_type: str
    attempt: int = 1


class ApiRequestRecord(BaseModel):
    id: str = Field(default_factory=lambda: str(uuid.uuid4()), alias="_id")
    api_type: ApiType
    task_id: str | None
    world_id: str | None
    request_type: str
    request_data: dict[str, Any]
    response_data: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None
    status: Literal["ok", "error"] = "ok"
    status_code: int | None = None
    duration_ms: int
    model: str | None = None
    requested_model: str | None = None  # the step's primary model; differs from `model` on a fallback
    fallback: bool = False
    provider: str | None = None
    attempt: int = 1
    task_attempt: int = 1
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    cost: float = 0.0
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    model_config = {"populate_by_name": True}


class Recorder(Protocol):
    async def record(self, record: ApiRequestRecord) -> None: ...


class MongoRecorder:
    """The owner of `api_requests_history`: inserts one document per attempt, keeps the world's call/cost
    counters (one $inc per call) and the per-model summary (`model_stats`, one $inc per provider attempt)."""

    def __init__(self, db: Database) -> None:
        self._history: Collection = db[HISTORY_COLLECTION]
        self._worlds = WorldStatusStore(db)
        self._stats = ModelStatsStore(db)

    async def ensure_indexes(self) -> None:
        await self._history.create_index([("world_id", ASCENDING), ("api_type", ASCENDING)])
        await self._stats.ensure_indexes()

    async def record(self, record: ApiRequestRecord) -> None:
        doc = record.model_dump(by_alias=True)
        observe_call(record)
        await self._history.insert_one(doc)
        if record.api_type in ("llm", "image_generation"):
            try:
                await self._stats.add(doc)
            except Exception as exc:  # a summary, not the ledger: never fail the call over it
                log.warning("model_stats_update_failed", model=record.model, error=str(exc))
        kind = _COUNTED_KINDS.get(record.api_type)
        if record.world_id is not None and kind is not None:
            await self._worlds.add_call(record.world_id, kind, record.cost, record.created_at)

    async def sync_world(self, world_id: str) -> None:
        """Set the world's call counters and cost totals to what the history holds (the truth).

        Call only when every task of the world is terminal (no call can be in flight): `record` writes
        the history document and then `$inc`s the counters, so a crash or a database outage between the two
        leaves the counters short; this repairs them before the world is marked finished."""
        pipeline: list[Document] = [
            {"$match": {"world_id": world_id, "api_type": {"$in": list(_COUNTED_KINDS)}}},
            {"$group": {"_id": "$api_type", "n": {"$sum": 1}, "cost": {"$sum": "$cost"}}},
        ]
        totals: dict[CallKind, tuple[int, float]] = {}
        async for row in await self._history.aggregate(pipeline):
            kind = _COUNTED_KINDS.get(str(row["_id"]))
            if kind is not None:
                totals[kind] = (int(row["n"]), float(row["cost"] or 0.0))
        await self._worlds.set_call_totals(world_id, totals)

    async def world_records(self, world_id: str) -> list[Document]:
        """The LLM and image attempts of one world (what `models stats --world` summarises exactly)."""
        fields = {"api_type": 1, "model": 1, "provider": 1, "status": 1, "duration_ms": 1, "fallback": 1,
                  "cost": 1, "prompt_tokens": 1, "completion_tokens": 1, "cached_tokens": 1, "reasoning_tokens": 1}
        cursor = self._history.find({"world_id": world_id, "api_type": {"$in": ["llm", "image_generation"]}}, fields)
        return [doc async for doc in cursor]


class NoRecorder:
    """Records nothing (tools that make a one-off call outside any world)."""

    async def record(self, record: ApiRequestRecord) -> None:
        return None
