"""The task state machine in MongoDB (the owner of `tasks`). Every write that changes a claimed task is
conditional on the claim (status, worker id and attempt number), so a worker that lost its lease cannot
overwrite the task. No multi-document transactions: correctness comes from the order of writes and
idempotent ids.

Reads hand back raw documents; the engine validates them one by one (`model.parse_task`), so one malformed
document is quarantined (failed with `invalid_task_document`) and never stops a scan or another task."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Collection as Many
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import structlog
from pymongo import ASCENDING
from pymongo.errors import BulkWriteError, OperationFailure

from ai_worker.messaging.events import utcnow
from ai_worker.mongo import Collection, Database, Document
from ai_worker.tasks.model import TERMINAL_VALUES, TaskDoc, TaskStatus, parse_task

log = structlog.get_logger(__name__)

TASKS = "tasks"
DUPLICATE_KEY = 11000
_LIVE = [TaskStatus.PENDING.value, TaskStatus.IN_PROGRESS.value]
_OBSOLETE_INDEXES = ("world_id_1_type_1_status_1", "status_1_not_before_1", "status_1_lease_until_1")
_CLAIM_ROUNDS = 3  # a compare-and-set lost to a concurrent write: look again (a touch, a racing claimer)
_UNUSABLE_FIELD = {2, 14}  # BadValue, TypeMismatch: the claim's $inc / $push cannot apply to the document


class Claim(NamedTuple):
    """A claim attempt: the claimed document (None when not claimed) and the document as last read (None
    when there is no such task)."""

    claimed: Document | None
    current: Document | None


def _millis(moment: datetime) -> datetime:
    """`moment` at the database's precision, so what the claim builds equals what it stored."""
    return moment.replace(microsecond=moment.microsecond - moment.microsecond % 1000)


def _aware(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def claimable(doc: Document, now: datetime, types: Many[str] | None = None) -> bool:
    """Can a worker running `types` claim this document now: pending with no due date or one that is past,
    or in_progress with a lease that expired. A due date or lease that is not a date never is (such a
    document is quarantined by the reconciler)."""
    task_type = doc.get("type")
    if types is not None and (not isinstance(task_type, str) or task_type not in types):
        return False
    status = doc.get("status")
    if status == TaskStatus.PENDING.value:
        not_before = doc.get("not_before")
        if not_before is None:
            return True
        due = _aware(not_before)
        return due is not None and due <= now
    if status == TaskStatus.IN_PROGRESS.value:
        lease = _aware(doc.get("lease_until"))
        return lease is not None and lease < now
    return False


class TaskStore:
    """The owner of the `tasks` collection."""

    def __init__(self, db: Database) -> None:
        self._tasks: Collection = db[TASKS]

    async def ensure_indexes(self) -> None:
        """Two indexes (and the retention's TTL index on `finished_at`, retention.py). None serves the
        per-task path, which addresses tasks by `_id` only; every index costs each task write (measured on
        the embedded database: an update 2.7 ms of database CPU under six indexes, 2.2 ms under three), so
        there are only the ones the scans need:
        - (status, updated_at): the reconciler's due pending tasks that were not touched lately, and, by its
          `status` prefix, the running tasks whose lease expired (at most as many as the slots running) and
          live tasks with malformed dates;
        - (world_id, status, created_at): a world's tasks (recount, cancel, retry, listing)."""
        await self._tasks.create_index([("status", ASCENDING), ("updated_at", ASCENDING)])
        await self._tasks.create_index([("world_id", ASCENDING), ("status", ASCENDING), ("created_at", ASCENDING)])
        for name in _OBSOLETE_INDEXES:  # created by earlier versions; each one slowed every write
            with contextlib.suppress(OperationFailure):
                await self._tasks.drop_index(name)

    # --- reading ----------------------------------------------------------------------------------
    async def get_raw(self, task_id: str) -> Document | None:
        doc: Document | None = await self._tasks.find_one({"_id": task_id})
        return doc

    async def get(self, task_id: str) -> TaskDoc | None:
        """The task, validated (raises InvalidTaskDocument for a malformed one)."""
        doc = await self.get_raw(task_id)
        return parse_task(doc) if doc is not None else None

    async def insert(self, doc: Document) -> None:
        await self._tasks.insert_one(doc)

    # --- claiming -----------------------------------------------------------------------------------
    async def claim(self, task_id: str, worker_id: str, lease_s: float,
                    types: Many[str] | None = None) -> TaskDoc | None:
        """Like `claim_raw`, validated (raises InvalidTaskDocument for a malformed document)."""
        doc = (await self.try_claim(task_id, worker_id, lease_s, types)).claimed
        return parse_task(doc) if doc is not None else None

    async def claim_raw(self, task_id: str, worker_id: str, lease_s: float,
                        types: Many[str] | None = None) -> Document | None:
        """The raw claimed document, None when the task is not claimable now (see `try_claim`)."""
        return (await self.try_claim(task_id, worker_id, lease_s, types)).claimed

    async def try_claim(self, task_id: str, worker_id: str, lease_s: float,
                        types: Many[str] | None = None) -> Claim:
        """pending (and due) or lease-expired in_progress -> in_progress, attempt_count + 1, for tasks of
        `types` (the ones this worker runs). Two point operations by `_id`: read the document, decide in
        Python, then a compare-and-set on what was read (status, attempt, `updated_at`, and the due date or
        the lease); a concurrent writer makes the write match nothing and the claim looks again.

        Why not one find-and-modify with `$or`: a query whose top level holds an operator cannot be routed
        through the `_id` index by the embedded database, so that claim scanned the whole collection (one
        claim cost 30 ms of database CPU at 1,000 tasks, 150 ms at 5,000); bare equalities by `_id` cost
        the same at any size (tests/integration/test_indexes.py). Every write to a task sets `updated_at`,
        so the compare-and-set also proves nothing else (an old holder's step) landed in between, and the
        claimed document is built here from what was read."""
        for _ in range(_CLAIM_ROUNDS):
            doc: Document | None = await self._tasks.find_one({"_id": task_id})
            if doc is None:
                return Claim(None, None)
            now = _millis(utcnow())
            if not claimable(doc, now, types):
                return Claim(None, doc)
            guard: Document = {"_id": task_id, "status": doc["status"], "attempt_count": doc.get("attempt_count"),
                               "updated_at": doc.get("updated_at")}
            if doc["status"] == TaskStatus.PENDING.value:
                guard["not_before"] = doc.get("not_before")
            else:
                guard["worker_id"] = doc.get("worker_id")
                guard["lease_until"] = doc.get("lease_until")
            lease_until = now + timedelta(seconds=lease_s)
            attempt: Document = {"worker_id": worker_id, "started_at": now}
            try:
                res = await self._tasks.update_one(guard, {
                    "$set": {"status": TaskStatus.IN_PROGRESS.value, "worker_id": worker_id,
                             "lease_until": lease_until, "updated_at": now},
                    "$inc": {"attempt_count": 1},
                    "$push": {"attempts": attempt},
                })
            except OperationFailure as exc:
                if exc.code not in _UNUSABLE_FIELD:  # a string attempt_count, an `attempts` that is no list
                    raise
                return Claim(None, doc)
            if res.matched_count:
                claimed = dict(doc)
                claimed.update(status=TaskStatus.IN_PROGRESS.value, worker_id=worker_id, lease_until=lease_until,
                               updated_at=now, attempt_count=int(doc.get("attempt_count") or 0) + 1,
                               attempts=[*(doc.get("attempts") or []), attempt])
                return Claim(claimed, doc)
        return Claim(None, await self._tasks.find_one({"_id": task_id}))

    @staticmethod
    def _owned(task: TaskDoc, worker_id: str) -> Document:
        """The claim this worker holds: a write under it fails once the lease moved to someone else."""
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

    async def still_owned(self, task: TaskDoc, worker_id: str) -> bool:
        """Is the task still this worker's claim (not cancelled, not reclaimed)? One read by `_id`."""
        return await self._tasks.find_one(self._owned(task, worker_id), {"_id": 1}) is not None

    async def save_step(self, task: TaskDoc, worker_id: str, name: str, value: Any) -> bool:
        res = await self._tasks.update_one(
            self._owned(task, worker_id), {"$set": {f"steps.{name}": value, "updated_at": utcnow()}}
        )
        return bool(res.matched_count)

    async def insert_children(self, docs: list[Document]) -> Counter[str]:
        """Insert children; ids are deterministic, so duplicates (a re-run parent) are ignored. Returns how
        many NEW children of each type were inserted (what the world's counters must add)."""
        if not docs:
            return Counter()
        try:
            await self._tasks.insert_many(docs, ordered=False)
            return Counter(str(d["type"]) for d in docs)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            other = [e for e in errors if e.get("code") != DUPLICATE_KEY]
            if other:
                raise
            duplicate = {int(e["index"]) for e in errors}
            return Counter(str(d["type"]) for i, d in enumerate(docs) if i not in duplicate)

    # --- transitions of a claimed task ---------------------------------------------------------------
    def _finish_attempt(self, task: TaskDoc, outcome: str, now: datetime, **fields: Any) -> Document:
        idx = len(task.attempts) - 1
        if idx < 0:
            return {}
        out = {f"attempts.{idx}.ended_at": now, f"attempts.{idx}.outcome": outcome}
        out.update({f"attempts.{idx}.{k}": v for k, v in fields.items()})
        return out

    async def complete(self, task: TaskDoc, worker_id: str, result: Document) -> bool:
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
                    "finished_at": now,
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
                    "finished_at": now,
                    **self._finish_attempt(task, "failed", now, error_type=error_type, error=error),
                }
            },
        )
        return bool(res.matched_count)

    async def cancel_claimed(self, task: TaskDoc, worker_id: str, reason: str) -> bool:
        now = utcnow()
        res = await self._tasks.update_one(
            self._owned(task, worker_id),
            {"$set": {"status": TaskStatus.CANCELLED.value, "error": reason, "error_type": "cancelled",
                      "lease_until": None, "updated_at": now, "finished_at": now,
                      **self._finish_attempt(task, "cancelled", now)}},
        )
        return bool(res.matched_count)

    async def schedule_retry(
        self, task: TaskDoc, worker_id: str, error: str, error_type: str, not_before: datetime, *,
        spends_attempt: bool = True,
    ) -> bool:
        """Back to pending until `not_before`. A retry that does not spend an attempt (the failure was the
        infrastructure's or a provider wait, not the task's) gives the claim's attempt back."""
        now = utcnow()
        update: Document = {
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
        }
        if not spends_attempt:
            update["$inc"] = {"attempt_count": -1, "free_retries": 1}
        res = await self._tasks.update_one(self._owned(task, worker_id), update)
        return bool(res.matched_count)

    # --- transitions of tasks nobody can run -----------------------------------------------------------
    async def fail_unclaimed(self, task_id: str, error: str, error_type: str) -> bool:
        """Fail a task nobody can run (e.g. an unknown type) straight from pending."""
        now = utcnow()
        res = await self._tasks.update_one(
            {"_id": task_id, "status": TaskStatus.PENDING.value},
            {"$set": {"status": TaskStatus.FAILED.value, "error": error, "error_type": error_type,
                      "lease_until": None, "updated_at": now, "finished_at": now}},
        )
        return bool(res.matched_count)

    async def quarantine(self, raw: Document, error: str) -> bool:
        """Fail a malformed task document (whatever its fields hold) unless its status already says it is
        finished. Returns True when this call quarantined it."""
        if raw.get("status") in TERMINAL_VALUES:
            return False
        now = utcnow()
        res = await self._tasks.update_one(
            {"_id": raw["_id"], "status": {"$nin": list(TERMINAL_VALUES)}},
            {"$set": {"status": TaskStatus.FAILED.value, "error": error[:2000], "error_type": "invalid_task_document",
                      "lease_until": None, "updated_at": now, "finished_at": now}},
        )
        return bool(res.matched_count)

    # --- the reconciler's scans (indexed) ---------------------------------------------------------------
    # The scans keep every operator below the top level: a top-level `$or` / `$and` is a collection scan on
    # the embedded database (measured: 265 ms a pass over 20,000 finished tasks, against 4 ms this way).
    async def due_pending(self, now: datetime, older_than: datetime, limit: int) -> list[Document]:
        """Pending tasks that are due and were last touched before `older_than` (their event may be lost).
        A platform-inserted task whose `updated_at` is a string (or missing) counts as untouched. Served by
        the `status` prefix of (status, updated_at): O(pending tasks), not O(all tasks)."""
        cursor = self._tasks.find(
            {
                "status": TaskStatus.PENDING.value,
                "updated_at": {"$not": {"$gte": older_than}},  # older, a string, null or missing
                "not_before": {"$not": {"$gt": now}},  # none or due, or malformed: dropped below
            },
            limit=limit,
        )
        # A `not_before` that is not a date is left to `malformed_live` (quarantined, not republished).
        return [d async for d in cursor if d.get("not_before") is None or _aware(d.get("not_before")) is not None]

    async def idle_work(self, types: Many[str], older_than: datetime, limit: int) -> list[Document]:
        """Up to `limit` pending tasks of `types` not touched since `older_than`, oldest first: work whose
        event waits in another worker's buffer (or is still unread), for a worker whose slots of that kind
        idle. Not the retries (a `not_before`): the worker that scheduled one publishes its event when it is
        due, and the reconciler when that worker is gone. Only `_id`, `type` and `world_id` are read. Served
        by the (status, updated_at) index."""
        cursor = self._tasks.find(
            {
                "status": TaskStatus.PENDING.value,
                "updated_at": {"$lt": older_than},
                "type": {"$in": list(types)},
                "not_before": None,
            },
            projection={"_id": 1, "type": 1, "world_id": 1},
            sort=[("updated_at", ASCENDING)],
            limit=limit,
        )
        return [d async for d in cursor]

    async def expired_leases(self, now: datetime, limit: int) -> list[Document]:
        # `updated_at < now` holds for every running task (the claim and each renewal set it): it is there
        # so the (status, updated_at) index serves the scan.
        cursor = self._tasks.find(
            {"status": TaskStatus.IN_PROGRESS.value, "updated_at": {"$lt": now}, "lease_until": {"$lt": now}},
            limit=limit,
        )
        return [d async for d in cursor]

    async def malformed_live(self, limit: int) -> list[Document]:
        """Live tasks whose dates make them unclaimable (a string `not_before` or `lease_until`): found so
        they can be quarantined even when their event was lost."""
        found: list[Document] = []
        for status, field in ((TaskStatus.PENDING, "not_before"), (TaskStatus.IN_PROGRESS, "lease_until")):
            cursor = self._tasks.find({"status": status.value, field: {"$type": "string"}}, limit=limit)
            found += [d async for d in cursor]
        return found[:limit]

    async def touch(self, task_id: str) -> None:
        await self._tasks.update_one(
            {"_id": task_id, "status": TaskStatus.PENDING.value}, {"$set": {"updated_at": utcnow()}}
        )

    # --- worlds ---------------------------------------------------------------------------------------
    async def cancel_world(self, world_id: str, reason: str) -> int:
        now = utcnow()
        res = await self._tasks.update_many(
            {"world_id": world_id, "status": {"$in": _LIVE}},
            {"$set": {"status": TaskStatus.CANCELLED.value, "error": reason, "error_type": "cancelled",
                      "lease_until": None, "updated_at": now, "finished_at": now}},
        )
        return int(res.modified_count)

    async def requeue(self, query: Document, types: Many[str]) -> list[Document]:
        """Put failed or cancelled tasks matching `query` back to pending with fresh attempts (an operator's
        retry). Their memoised steps stay, so nothing paid or created is done again. Quarantined documents
        and unknown types are left alone. Returns the requeued tasks (`_id`, `type`, `world_id`)."""
        candidates = self._tasks.find(
            {**query, "status": {"$in": [TaskStatus.FAILED.value, TaskStatus.CANCELLED.value]},
             "type": {"$in": list(types)}, "error_type": {"$ne": "invalid_task_document"}},
            {"_id": 1, "type": 1, "world_id": 1, "status": 1})
        requeued: list[Document] = []
        now = utcnow()
        async for doc in candidates:
            res = await self._tasks.update_one(
                {"_id": doc["_id"], "status": doc["status"]},
                {"$set": {"status": TaskStatus.PENDING.value, "worker_id": None, "lease_until": None,
                          "not_before": None, "attempt_count": 0, "free_retries": 0, "updated_at": now,
                          "requeued_at": now},
                 "$unset": {"finished_at": "", "completed_at": ""},
                 "$inc": {"requeues": 1}})
            if res.modified_count:
                requeued.append(doc)
        return requeued

    async def counts_by_type_status(self, world_id: str) -> dict[tuple[str, str], int]:
        """Tasks of a world by (type, status): O(world size), for the exact recount only (the hot path keeps
        incremental counters)."""
        pipeline: list[Document] = [
            {"$match": {"world_id": world_id}},
            {"$group": {"_id": {"type": "$type", "status": "$status"}, "n": {"$sum": 1}}},
        ]
        out: dict[tuple[str, str], int] = {}
        cursor = await self._tasks.aggregate(pipeline)
        async for row in cursor:
            key = row.get("_id") or {}
            out[(str(key.get("type")), str(key.get("status")))] = int(row["n"])
        return out

    async def list_for_world(self, world_id: str, status: str | None = None, task_type: str | None = None,
                             limit: int = 100) -> list[Document]:
        """A world's tasks in the order they were created, optionally of one status and one type; only the
        fields a listing shows (`ai-worker tasks`)."""
        query: Document = {"world_id": world_id}
        if status is not None:
            query["status"] = status
        if task_type is not None:
            query["type"] = task_type
        fields = ("type", "status", "attempt_count", "error_type", "error", "worker_id", "created_at", "updated_at",
                  "finished_at", "not_before")
        cursor = self._tasks.find(query, dict.fromkeys(fields, 1), sort=[("created_at", ASCENDING)], limit=limit)
        return [doc async for doc in cursor]
