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
from ai_worker.mongo import Collection, Database
from ai_worker.tasks.engine import Engine, Publisher
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
        republished = 0
        failed = 0
        for task in await self._store.due_pending(now, stale, BATCH):
            if await self._republish(task.id, task.type, task.world_id):
                await self._store.touch(task.id)
                republished += 1
            else:
                failed += 1
        expired = 0
        for task in await self._store.expired_leases(now, BATCH):
            if await self._republish(task.id, task.type, task.world_id):
                expired += 1
            else:
                failed += 1
        finished = 0
        for world_id in await self._worlds.stale(stale, BATCH):
            await self._engine.refresh_world(world_id)
            finished += 1
        if republished or expired or failed:
            log.info("reconciled", republished=republished, expired_leases=expired, worlds_checked=finished,
                     publish_failed=failed)
        return {"republished": republished, "expired_leases": expired, "worlds_checked": finished,
                "publish_failed": failed}

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
