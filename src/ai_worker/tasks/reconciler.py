"""The safety net (not the hot path): every RECONCILE_INTERVAL_S one elected worker republishes pending
tasks that are due and whose event may have been lost, re-publishes tasks whose lease expired (any worker
may claim them), re-creates missing topics, and finishes worlds whose last task ended during a crash.
Election is a lease document in Mongo (`worker_leases`, _id "reconciler"). Indexed queries only."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

import structlog
from pymongo.errors import DuplicateKeyError

from ai_worker.messaging.events import utcnow
from ai_worker.mongo import Collection, Database, Document
from ai_worker.observability import metrics
from ai_worker.tasks.engine import Engine, Publisher
from ai_worker.tasks.model import InvalidTaskDocument, TaskDoc, parse_task
from ai_worker.tasks.store import TaskStore
from ai_worker.worlds.status import WorldStatusStore

log = structlog.get_logger(__name__)

LEASES = "worker_leases"
BATCH = 500


class Reconciler:
    def __init__(
        self, *, db: Database, store: TaskStore, engine: Engine, publisher: Publisher, worker_id: str,
        interval_s: float, lease_s: float, ensure_topics: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._leases: Collection = db[LEASES]
        self._worlds = WorldStatusStore(db)
        self._store = store
        self._engine = engine
        self._publisher = publisher
        self._worker_id = worker_id
        self._interval_s = interval_s
        self._lease_s = lease_s
        self._ensure_topics = ensure_topics

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self._interval_s)
                return
            except TimeoutError:
                pass
            try:
                if await self._elect():
                    await self.reconcile_once()
            except Exception as exc:
                log.warning("reconcile pass failed", error=str(exc), error_type=type(exc).__name__)

    async def _elect(self) -> bool:
        now = utcnow()
        until = now + timedelta(seconds=self._interval_s * 3)
        query = {"_id": "reconciler", "$or": [{"holder": self._worker_id}, {"until": {"$lt": now}}]}
        try:
            res = await self._leases.update_one(query, {"$set": {"holder": self._worker_id, "until": until}},
                                                upsert=True)
        except DuplicateKeyError:  # someone else holds a live lease
            return False
        return bool(res.matched_count or res.upserted_id)

    async def reconcile_once(self) -> dict[str, int]:
        now = utcnow()
        if self._ensure_topics is not None:
            created = await self._ensure_topics()
            if created:
                log.warning("topics were missing and have been re-created", topics=created)
        stale = now - timedelta(seconds=self._interval_s)
        counts = {"republished": 0, "expired_leases": 0, "worlds_checked": 0, "publish_failed": 0,
                  "quarantined": 0, "errors": 0}
        for raw in await self._store.due_pending(now, stale, BATCH):
            task = await self._usable(raw, counts)
            if task is None:
                continue
            if await self._republish(task.id, task.type, task.world_id):
                metrics.republished("due_pending")
                await self._store.touch(task.id)
                counts["republished"] += 1
            else:
                counts["publish_failed"] += 1
        for raw in await self._store.expired_leases(now, BATCH):
            task = await self._usable(raw, counts)
            if task is None:
                continue
            metrics.lease_expired()
            if await self._republish(task.id, task.type, task.world_id):
                metrics.republished("expired_lease")
                counts["expired_leases"] += 1
            else:
                counts["publish_failed"] += 1
        for raw in await self._store.malformed_live(BATCH):
            await self._usable(raw, counts)
        for world_id in await self._worlds.stale(stale, BATCH):
            try:
                await self._engine.refresh_world(world_id)
                counts["worlds_checked"] += 1
            except Exception as exc:  # one world must not stop the pass for the others
                counts["errors"] += 1
                log.warning("world recount failed", world_id=world_id, error=str(exc), error_type=type(exc).__name__)
        if any(counts[k] for k in ("republished", "expired_leases", "publish_failed", "quarantined", "errors")):
            log.info("reconciled", **counts)
        return counts

    async def _usable(self, raw: Document, counts: dict[str, int]) -> TaskDoc | None:
        """The document as a task, or None after quarantining a malformed one (one bad document never
        stops the pass)."""
        try:
            return parse_task(raw)
        except InvalidTaskDocument as exc:
            try:
                if await self._engine.quarantine(raw, str(exc)):
                    counts["quarantined"] += 1
            except Exception as err:
                counts["errors"] += 1
                log.warning("quarantine failed", task_id=str(raw.get("_id")), error=str(err))
            return None

    async def _republish(self, task_id: str, task_type: str, world_id: str) -> bool:
        """One failed publish (e.g. a broker that just came back empty) must not abort the whole pass:
        the task stays due and is tried again next pass."""
        try:
            await self._publisher.publish_task(task_id, task_type, world_id)
            return True
        except Exception as exc:
            log.warning("republish failed; will try again next pass", task_id=task_id, error=str(exc),
                        error_type=type(exc).__name__)
            return False
