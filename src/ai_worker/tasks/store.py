"""The task state machine in MongoDB. Every write that changes a claimed task is conditional on the
claim (status, worker id and attempt number), so a worker that lost its lease cannot overwrite the
task. No multi-document transactions: correctness comes from the order of writes and idempotent ids."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import structlog
from pymongo import ASCENDING, ReturnDocument
from pymongo.errors import BulkWriteError

from ai_worker.messaging.events import utcnow
from ai_worker.mongo import Collection, Database, Document
from ai_worker.tasks.model import TaskDoc, TaskStatus

log = structlog.get_logger(__name__)

TASKS = "tasks"
DUPLICATE_KEY = 11000


class TaskStore:
    """The owner of the `tasks` collection."""

    def __init__(self, db: Database) -> None:
        self._tasks: Collection = db[TASKS]

    async def ensure_indexes(self) -> None:
        await self._tasks.create_index([("world_id", ASCENDING), ("type", ASCENDING), ("status", ASCENDING)])
        await self._tasks.create_index([("status", ASCENDING), ("not_before", ASCENDING)])
        await self._tasks.create_index([("status", ASCENDING), ("lease_until", ASCENDING)])

    async def get(self, task_id: str) -> TaskDoc | None:
        doc = await self._tasks.find_one({"_id": task_id})
        return TaskDoc.model_validate(doc) if doc else None

    async def insert(self, doc: dict[str, Any]) -> None:
        await self._tasks.insert_one(doc)

    async def claim(self, task_id: str, worker_id: str, lease_s: float) -> TaskDoc | None:
        """pending (and due) or lease-expired in_progress -> in_progress, attempt_count + 1."""
        now = utcnow()
        claimable = {
            "_id": task_id,
            "$or": [
                {"status": TaskStatus.PENDING.value, "not_before": None},
                {"status": TaskStatus.PENDING.value, "not_before": {"$lte": now}},
                {"status": TaskStatus.IN_PROGRESS.value, "lease_until": {"$lt": now}},
            ],
        }
        doc = await self._tasks.find_one_and_update(
            claimable,
            {
                "$set": {
                    "status": TaskStatus.IN_PROGRESS.value,
                    "worker_id": worker_id,
                    "lease_until": now + timedelta(seconds=lease_s),
                    "updated_at": now,
                },
                "$inc": {"attempt_count": 1},
                "$push": {"attempts": {"worker_id": worker_id, "started_at": now}},
            },
            return_document=ReturnDocument.AFTER,
        )
        return TaskDoc.model_validate(doc) if doc else None

    @staticmethod
    def _owned(task: TaskDoc, worker_id: str) -> dict[str, Any]:
        return {
            "_id": task.id,
            "status": TaskStatus.IN_PROGRESS.value,
            "worker_id": worker_id,
            "attempt_count": task.attempt_count,
        }

    async def renew_lease(self, task: TaskDoc, worker_id: str, lease_s: float) -> bool:
        now = utcnow()
        res = await self._tasks.update_one(
            self._owned(task, worker_id),
            {"$set": {"lease_until": now + timedelta(seconds=lease_s), "updated_at": now}},
        )
        return bool(res.matched_count)

    async def save_step(self, task: TaskDoc, worker_id: str, name: str, value: Any) -> bool:
        res = await self._tasks.update_one(
            self._owned(task, worker_id), {"$set": {f"steps.{name}": value, "updated_at": utcnow()}}
        )
        return bool(res.matched_count)

    async def insert_children(self, docs: list[dict[str, Any]]) -> int:
        """Insert children; ids are deterministic, so duplicates (a re-run parent) are ignored."""
        if not docs:
            return 0
        try:
            res = await self._tasks.insert_many(docs, ordered=False)
            return len(res.inserted_ids)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            other = [e for e in errors if e.get("code") != DUPLICATE_KEY]
            if other:
                raise
            return int(exc.details.get("nInserted", 0))

    def _finish_attempt(self, task: TaskDoc, outcome: str, now: datetime, **fields: Any) -> dict[str, Any]:
        idx = len(task.attempts) - 1
        if idx < 0:
            return {}
        out = {f"attempts.{idx}.ended_at": now, f"attempts.{idx}.outcome": outcome}
        out.update({f"attempts.{idx}.{k}": v for k, v in fields.items()})
        return out

    async def complete(self, task: TaskDoc, worker_id: str, result: dict[str, Any]) -> bool:
        now = utcnow()
        res = await self._tasks.update_one(
            self._owned(task, worker_id),
            {
                "$set": {
                    "status": TaskStatus.COMPLETED.value,
                    "result": result,
                    "error": None,
                    "lease_until": None,
                    "updated_at": now,
                    "completed_at": now,
                    **self._finish_attempt(task, "completed", now),
                }
            },
        )
        return bool(res.matched_count)

    async def fail(self, task: TaskDoc, worker_id: str, error: str, error_type: str) -> bool:
        now = utcnow()
        res = await self._tasks.update_one(
            self._owned(task, worker_id),
            {
                "$set": {
                    "status": TaskStatus.FAILED.value,
                    "error": error,
                    "error_type": error_type,
                    "lease_until": None,
                    "updated_at": now,
                    **self._finish_attempt(task, "failed", now, error_type=error_type, error=error),
                }
            },
        )
        return bool(res.matched_count)

    async def cancel_claimed(self, task: TaskDoc, worker_id: str, reason: str) -> bool:
        now = utcnow()
        res = await self._tasks.update_one(
            self._owned(task, worker_id),
            {"$set": {"status": TaskStatus.CANCELLED.value, "error": reason, "lease_until": None,
                      "updated_at": now, **self._finish_attempt(task, "cancelled", now)}},
        )
        return bool(res.matched_count)

    async def fail_unclaimed(self, task_id: str, error: str, error_type: str) -> bool:
        """Fail a task nobody can run (e.g. an unknown type) straight from pending."""
        res = await self._tasks.update_one(
            {"_id": task_id, "status": TaskStatus.PENDING.value},
            {"$set": {"status": TaskStatus.FAILED.value, "error": error, "error_type": error_type,
                      "updated_at": utcnow()}},
        )
        return bool(res.matched_count)

    async def schedule_retry(
        self, task: TaskDoc, worker_id: str, error: str, error_type: str, not_before: datetime
    ) -> bool:
        now = utcnow()
        res = await self._tasks.update_one(
            self._owned(task, worker_id),
            {
                "$set": {
                    "status": TaskStatus.PENDING.value,
                    "worker_id": None,
                    "error": error,
                    "error_type": error_type,
                    "lease_until": None,
                    "not_before": not_before,
                    "updated_at": now,
                    **self._finish_attempt(task, "retrying", now, error_type=error_type, error=error),
                }
            },
        )
        return bool(res.matched_count)

    async def due_pending(self, now: datetime, older_than: datetime, limit: int) -> list[TaskDoc]:
        """Pending tasks that are due and were last touched before `older_than` (their event may be lost)."""
        cursor = self._tasks.find(
            {
                "status": TaskStatus.PENDING.value,
                "$or": [{"not_before": None}, {"not_before": {"$lte": now}}],
                "updated_at": {"$lt": older_than},
            },
            limit=limit,
        )
        return [TaskDoc.model_validate(d) async for d in cursor]

    async def expired_leases(self, now: datetime, limit: int) -> list[TaskDoc]:
        cursor = self._tasks.find(
            {"status": TaskStatus.IN_PROGRESS.value, "lease_until": {"$lt": now}}, limit=limit
        )
        return [TaskDoc.model_validate(d) async for d in cursor]

    async def touch(self, task_id: str) -> None:
        await self._tasks.update_one(
            {"_id": task_id, "status": TaskStatus.PENDING.value}, {"$set": {"updated_at": utcnow()}}
        )

    async def cancel_world(self, world_id: str, reason: str) -> int:
        res = await self._tasks.update_many(
            {"world_id": world_id, "status": {"$in": [TaskStatus.PENDING.value, TaskStatus.IN_PROGRESS.value]}},
            {"$set": {"status": TaskStatus.CANCELLED.value, "error": reason, "updated_at": utcnow()}},
        )
        return int(res.modified_count)

    async def counts_by_type_status(self, world_id: str) -> dict[tuple[str, str], int]:
        pipeline: list[Document] = [
            {"$match": {"world_id": world_id}},
            {"$group": {"_id": {"type": "$type", "status": "$status"}, "n": {"$sum": 1}}},
        ]
        out: dict[tuple[str, str], int] = {}
        cursor = await self._tasks.aggregate(pipeline)
        async for row in cursor:
            out[(row["_id"]["type"], row["_id"]["status"])] = int(row["n"])
        return out
