"""`api_requests_history`: one document per external call attempt (CONTRACTS.md), plus the per-world
call and cost counters on `world_generation_status`. Never store secrets or image bytes here."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import structlog
from pydantic import BaseModel, Field
from pymongo import ASCENDING
from pymongo.errors import BulkWriteError, PyMongoError

from ai_worker.groupcommit import GroupInsert
from ai_worker.mongo import Collection, Database, Document
from ai_worker.observability.metrics import observe_call
from ai_worker.providers.stats import ModelStatsStore
from ai_worker.worlds.status import CallKind, WorldStatusStore

log = structlog.get_logger(__name__)

ApiType = Literal["llm", "image_generation", "grpc", "upload"]

HISTORY_COLLECTION = "api_requests_history"
_COUNTED_KINDS: dict[str, CallKind] = {"llm": "llm", "image_generation": "image"}
DUPLICATE_KEY = 11000


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
    """The owner of `api_requests_history`: one document per attempt, and the per-model summary
    (`model_stats`, one $inc per provider attempt). The world's call and cost counters are counted with the
    budget settlement of the same call (one update: `providers.budget`) and set from this history when the
    world ends (`sync_world`).

    Records are written in groups: concurrent calls share one insert (groupcommit.GroupInsert), each caller
    still waits for its own record. A record that cannot be written (the database is down) is kept in this
    process and written again in the background until it is (`pending`), so the history ends up equal to
    what the providers billed; a world that finished meanwhile has its counters set again from the completed
    history."""

    def __init__(self, db: Database, *, retry_s: float = 0.5, max_pending: int = 100_000,
                 stats_flush_s: float = 0.0, worlds: WorldStatusStore | None = None) -> None:
        self._history: Collection = db[HISTORY_COLLECTION]
        self._inserts = GroupInsert(self._history, self._keep)
        self._worlds = worlds or WorldStatusStore(db)
        self._stats = ModelStatsStore(db, flush_s=stats_flush_s)
        self._retry_s = retry_s
        self._max_pending = max_pending
        self._pending: list[Document] = []
        self._flusher: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Records not written yet (kept in memory until the database takes them)."""
        return len(self._pending)

    async def ensure_indexes(self) -> None:
        await self._history.create_index([("world_id", ASCENDING), ("api_type", ASCENDING)])
        await self._stats.ensure_indexes()

    async def record(self, record: ApiRequestRecord) -> None:
        """Write one record (grouped with the records other calls of this process write at the same moment:
        groupcommit.GroupInsert); a record the database does not take is kept and written later."""
        doc = record.model_dump(by_alias=True)
        observe_call(record)
        if not await self._inserts.insert(doc):
            return
        if record.api_type in ("llm", "image_generation"):
            try:
                await self._stats.add(doc)
            except Exception as exc:  # a summary, not the ledger: never fail the call over it
                log.warning("model_stats_update_failed", model=record.model, error=str(exc))

    def _keep(self, doc: Document, exc: BaseException) -> None:
        if len(self._pending) >= self._max_pending:
            log.error("request_history_dropped", reason="too many records waiting", record_id=doc["_id"])
            return
        self._pending.append(doc)
        log.warning("request_history_deferred", error=str(exc), error_type=type(exc).__name__,
                    pending=len(self._pending))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while self._pending:
            await asyncio.sleep(self._retry_s)
            with contextlib.suppress(PyMongoError):
                await self.flush()

    async def flush(self) -> int:
        """Write the records kept in memory; returns how many were written (raises while the database is
        down). A world that finished while its records waited gets its counters set again."""
        batch, self._pending = self._pending, []
        if not batch:
            return 0
        try:
            await self._history.insert_many(batch, ordered=False)
        except BulkWriteError as exc:  # already written (the first insert did reach the server): fine
            other = [e for e in exc.details.get("writeErrors", []) if e.get("code") != DUPLICATE_KEY]
            if other:
                self._pending[:0] = batch
                raise
        except BaseException:
            self._pending[:0] = batch
            raise
        for doc in batch:
            if doc.get("api_type") in ("llm", "image_generation"):
                with contextlib.suppress(Exception):
                    await self._stats.add(doc)
        for world_id in {str(d["world_id"]) for d in batch if d.get("world_id")}:
            await self.sync_world(world_id, finished_too=True)
        log.info("request_history_flushed", records=len(batch))
        return len(batch)

    async def aclose(self) -> None:
        """Last chance for records kept in memory (at shutdown), and for the summary's pending counts."""
        await self._inserts.drain()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._flusher
        if self._pending:
            try:
                await self.flush()
            except Exception as exc:
                log.error("request_history_lost_at_shutdown", records=len(self._pending), error=str(exc))
        try:
            await self._stats.aclose()
        except Exception as exc:
            log.warning("model_stats_lost_at_shutdown", error=str(exc))

    async def sync_world(self, world_id: str, *, finished_too: bool = False) -> None:
        """Set the world's call counters and cost totals to what the history holds (the truth).

        Called when every task of the world is terminal (no call can be in flight): the counters are
        counted with each call's budget settlement, so a crash or a database outage between the history
        write and that update leaves them short; this repairs them before the world is marked finished.
        Records this process still keeps in memory are written first."""
        if self._pending:
            with contextlib.suppress(PyMongoError):
                await self.flush()
        pipeline: list[Document] = [
            {"$match": {"world_id": world_id, "api_type": {"$in": list(_COUNTED_KINDS)}}},
            {"$group": {"_id": "$api_type", "n": {"$sum": 1}, "cost": {"$sum": "$cost"}}},
        ]
        totals: dict[CallKind, tuple[int, float]] = {}
        async for row in await self._history.aggregate(pipeline):
            kind = _COUNTED_KINDS.get(str(row["_id"]))
            if kind is not None:
                totals[kind] = (int(row["n"]), float(row["cost"] or 0.0))
        await self._worlds.set_call_totals(world_id, totals, live_only=not finished_too)

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
