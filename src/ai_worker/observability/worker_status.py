"""The worker status documents (`workers`, _id = worker id): who runs, and how it is doing.

Every worker process upserts its own document every WORKER_STATUS_INTERVAL_S (10 s; one small write per
worker per interval):

    {_id: worker id, updated_at: date, started_at: date, in_flight, buffered, processed, dead_lettered,
     breakers: {"provider/model": "closed" | "open" | "half_open"}, host, pid}

A worker that stops cleanly deletes its document; one that dies stops refreshing it, and a TTL index on
`updated_at` (max(5 minutes, 10 intervals)) removes it. The web console's Models page reads these documents
(console/data.py `workers`), and GET /stats of the worker returns the same fields. This module owns the
collection."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

import structlog

from ai_worker.mongo import Collection, Database, Document
from ai_worker.retention import DAY_S, Retention, ensure_ttl

log = structlog.get_logger(__name__)

WORKERS: Final = "workers"
MIN_TTL_S: Final = 300.0
CLOSE_TIMEOUT_S: Final = 2.0

# The live counters of this process: in_flight, buffered, processed, dead_lettered, breakers.
Counters = Callable[[], Mapping[str, Any]]


def ttl_s(interval_s: float) -> float:
    """How long a status document outlives its last refresh."""
    return max(MIN_TTL_S, 10 * interval_s)


class WorkerStatusStore:
    """The owner of `workers`."""

    def __init__(self, db: Database) -> None:
        self._col: Collection = db[WORKERS]

    async def ensure_indexes(self, interval_s: float) -> str:
        return await ensure_ttl(self._col, Retention(WORKERS, "updated_at", ttl_s(interval_s) / DAY_S))

    async def put(self, doc: Document) -> None:
        fields = {k: v for k, v in doc.items() if k != "_id"}
        await self._col.update_one({"_id": doc["_id"]}, {"$set": fields}, upsert=True)

    async def remove(self, worker_id: str) -> None:
        await self._col.delete_one({"_id": worker_id})

    async def get(self, worker_id: str) -> Document | None:
        return await self._col.find_one({"_id": worker_id})


class WorkerStatusReporter:
    """Writes this worker's status document every `interval_s` from `start()` until `close()`."""

    def __init__(self, store: WorkerStatusStore, *, worker_id: str, counters: Counters, interval_s: float) -> None:
        self._store = store
        self.worker_id = worker_id
        self._counters = counters
        self._interval_s = interval_s
        self.started_at = datetime.now(UTC)
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.writes = 0

    def snapshot(self) -> dict[str, Any]:
        """The status now, as stored (dates are datetimes)."""
        counters = self._counters()
        return {
            "_id": self.worker_id, "updated_at": datetime.now(UTC), "started_at": self.started_at,
            "in_flight": int(counters.get("in_flight", 0)), "buffered": int(counters.get("buffered", 0)),
            "processed": int(counters.get("processed", 0)), "dead_lettered": int(counters.get("dead_lettered", 0)),
            "breakers": dict(counters.get("breakers") or {}), "host": self._host, "pid": self._pid,
        }

    def stats(self) -> dict[str, Any]:
        """The same fields for GET /stats: `worker_id` for `_id`, ISO dates."""
        doc = self.snapshot()
        out: dict[str, Any] = {"worker_id": doc.pop("_id")}
        for key, value in doc.items():
            out[key] = value.isoformat() if isinstance(value, datetime) else value
        return out

    async def write_once(self) -> None:
        await self._store.put(self.snapshot())
        self.writes += 1

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self._store.ensure_indexes(self._interval_s)
        except Exception as exc:  # the documents still work; only dead workers linger
            log.warning("worker status index not ensured", error=str(exc), error_type=type(exc).__name__)
        while True:
            try:
                await self.write_once()
                if self._failing:
                    log.info("worker status written again")
                self._failing = False
            except Exception as exc:
                if not self._failing:  # once per outage, not every interval
                    log.warning("worker status not written", error=str(exc), error_type=type(exc).__name__)
                self._failing = True
            await asyncio.sleep(self._interval_s)

    async def close(self) -> None:
        """Stop writing and delete the document (bounded: the database may be gone; the TTL index then
        removes it)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._store.remove(self.worker_id), CLOSE_TIMEOUT_S)


__all__ = ["WORKERS", "WorkerStatusReporter", "WorkerStatusStore", "ttl_s"]
