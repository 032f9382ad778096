"""`world_generation_status` (CONTRACTS.md): the one module that reads and writes it.

The platform's world service reads this document to answer "how far is generation?", so its names and
types are a contract: the constants below are the only place they are spelled. The engine (progress),
the accounting (budget reservations, call counters) and the reconciler call this store; nobody else
touches the collection.

Fields of the contract: `status`, `current_stage`, `stages`, the task counters (`tasks_total`,
`tasks_completed`, `tasks_failed`, `task_predicted`), the content counters (`users_created`,
`posts_created`, `users_predicted`, `posts_predicted`), the call limits and counters (`api_call_limits_LLM`,
`api_call_limits_images`, `api_calls_made_LLM`, `api_calls_made_images`), the money spent
(`llm_cost_total`, `image_cost_total`), `parameters`, `created_at`, `updated_at`.
Fields we add: `budget_usd` (the money cap), `budget_committed_usd` (spent + reserved in flight),
`api_calls_reserved_LLM` / `api_calls_reserved_images` (calls reserved, the ledger the limits are checked
against), `failure_reason`, `budget_exceeded`, `budget_detail`, `finished_at`.

Concurrent writers never read-modify-write: counters only grow (`$max`) or are `$inc`ed, each stage
moves forward only (array-filtered `$set` conditioned on the stage's current status), and the world's
status leaves `pending` / `in_progress` once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final, Literal

from pymongo import ASCENDING, DESCENDING

from ai_worker.groupcommit import GroupIncrement
from ai_worker.messaging.events import utcnow
from ai_worker.mongo import Collection, Database, Document

COLLECTION: Final = "world_generation_status"

# The six stages, in order (CONTRACTS.md).
STAGES: Final[tuple[str, ...]] = ("initializing", "world_description", "world_image", "characters", "posts",
                                  "finishing")
LIVE: Final[tuple[str, ...]] = ("pending", "in_progress")
TERMINAL_WORLD: Final[tuple[str, ...]] = ("completed", "failed")
_RANK: Final = {"pending": 0, "in_progress": 1, "completed": 2, "failed": 2}

CallKind = Literal["llm", "image"]

# Per kind of paid call: (calls made, cost total, calls reserved, call limit). Note the platform's casing.
CALL_FIELDS: Final[dict[CallKind, tuple[str, str, str, str]]] = {
    "llm": ("api_calls_made_LLM", "llm_cost_total", "api_calls_reserved_LLM", "api_call_limits_LLM"),
    "image": ("api_calls_made_images", "image_cost_total", "api_calls_reserved_images", "api_call_limits_images"),
}
COUNTERS: Final[tuple[str, ...]] = ("tasks_total", "tasks_completed", "tasks_failed", "users_created",
                                    "posts_created")
TASK_COUNTS: Final = "task_counts"
COUNTS_FINAL: Final = "counts_final"  # ours: the final recount wrote the exact counts (WorldProgress.recount)
# What a progress update reads back: enough to derive the stages and to know whether the world is live.
_PROGRESS_VIEW: Final = {"status": 1, "stages": 1, "current_stage": 1, TASK_COUNTS: 1, "budget_exceeded": 1,
                         "failure_reason": 1, **{c: 1 for c in COUNTERS}}


def new_status_document(
    *, users: int, posts: int, user_prompt: str, task_predicted: int, llm_call_limit: int, image_call_limit: int,
    budget_usd: float | None, now: datetime, first_task_type: str,
) -> Document:
    """A world's document as it is created (its first task, of `first_task_type`, exists and is counted)."""
    return {
        "status": "in_progress",
        "current_stage": STAGES[0],
        "stages": [{"name": s, "status": "pending"} for s in STAGES],
        "tasks_total": 1,
        "tasks_completed": 0,
        "tasks_failed": 0,
        "task_predicted": task_predicted,
        "users_created": 0,
        "posts_created": 0,
        "users_predicted": users,
        "posts_predicted": posts,
        "api_call_limits_LLM": llm_call_limit,
        "api_call_limits_images": image_call_limit,
        "api_calls_made_LLM": 0,
        "api_calls_made_images": 0,
        "llm_cost_total": 0.0,
        "image_cost_total": 0.0,
        "budget_usd": budget_usd,
        "budget_committed_usd": 0.0,
        "api_calls_reserved_LLM": 0,
        "api_calls_reserved_images": 0,
        "parameters": {"users_count": users, "posts_count": posts, "user_prompt": user_prompt},
        "created_at": now,
        "updated_at": now,
        # ours: the world's tasks by type (total, done, failed incl. cancelled), kept with the counters
        TASK_COUNTS: {first_task_type: {"total": 1, "done": 0, "failed": 0}},
    }


class WorldStatusStore:
    """The owner of `world_generation_status`. A process shares one instance between its engine, budget
    and history (app.py), so that the counters' increments of all three are grouped per world
    (groupcommit.GroupIncrement: concurrent increments share one update)."""

    def __init__(self, db: Database) -> None:
        self._col: Collection = db[COLLECTION]
        # Once the final recount wrote a world's exact counts (`counts_final`), increments no longer apply:
        # a late one (a transition counted by that recount, whose own `$inc` was still on its way) would
        # count it twice. An operator's retry (reopen) lifts the mark.
        self._increments = GroupIncrement(self._col, _PROGRESS_VIEW, guard={COUNTS_FINAL: None})

    async def ensure_indexes(self) -> None:
        # The reconciler's scan of worlds that stopped moving, and the operator's list of recent worlds.
        await self._col.create_index([("status", ASCENDING), ("updated_at", ASCENDING)])
        await self._col.create_index([("created_at", DESCENDING)])
        await self._col.create_index([("status", ASCENDING), ("created_at", DESCENDING)])  # `worlds --status`

    # --- reading -----------------------------------------------------------------------------------
    async def get(self, world_id: str) -> Document | None:
        doc: Document | None = await self._col.find_one({"_id": world_id})
        return doc

    async def get_state(self, world_id: str) -> Document | None:
        """Just the world's `status` and `failure_reason` (is it still live?)."""
        doc: Document | None = await self._col.find_one({"_id": world_id}, {"status": 1, "failure_reason": 1})
        return doc

    async def stale(self, older_than: datetime, limit: int) -> list[str]:
        """Ids of worlds still in progress that nobody updated since `older_than`."""
        cursor = self._col.find({"status": "in_progress", "updated_at": {"$lt": older_than}}, {"_id": 1},
                                limit=limit)
        return [str(doc["_id"]) async for doc in cursor]

    async def ledger(self, world_id: str) -> Document | None:
        """The budget fields of a world: the money cap and the call limits (constant once created)."""
        doc: Document | None = await self._col.find_one(
            {"_id": world_id}, {"budget_usd": 1, **{fields[3]: 1 for fields in CALL_FIELDS.values()}})
        return doc

    # --- creating and finishing ----------------------------------------------------------------------
    async def open(self, world_id: str, doc: Document) -> None:
        """Create the document (idempotent: the first writer wins)."""
        await self._col.update_one({"_id": world_id}, {"$setOnInsert": doc}, upsert=True)

    async def add_progress(self, world_id: str, increments: Mapping[str, int]) -> Document | None:
        """One task transition (or a parent's completion with its new children): `$inc` the counters and the
        per-type counts, then read back what the stages are derived from: an update and a read by `_id`,
        O(1), grouped with the world's other increments of this process (a find-and-modify would scan the
        collection on the embedded database, see TaskStore.try_claim). The read may already hold concurrent
        transitions' increments too; what the caller derives from it (stages forward, the final recount) is
        idempotent. Returns None, and counts nothing, once the world's counts are final (every task was
        terminal when the final recount counted it, this transition included) or when there is no such
        world; the call counters of `settle` share the round trip and the rule (the final recount made them
        exact from the history)."""
        return await self._increments.update(world_id, increments, {"updated_at": utcnow()}, read=True)

    async def write_progress(
        self, world_id: str, counters: Mapping[str, int], current_stage: str, stages: Mapping[str, str],
        task_counts: Mapping[str, Mapping[str, int]] | None = None, *, final: bool = False,
    ) -> None:
        """Raise the counters (and per-type counts) to at least the values given and move each stage forward
        to `stages[name]`; `current_stage` is set as given. `final` (every task of the world is terminal):
        set the counts to exactly the values given and mark them final (see `add_progress`)."""
        sets: dict[str, Any] = {"updated_at": utcnow(), "current_stage": current_stage}
        filters: list[Document] = []
        for i, stage in enumerate(STAGES):
            status = stages.get(stage)
            if status is None:
                continue
            lower = [s for s, r in _RANK.items() if r < _RANK[status]]
            if not lower:
                continue
            sets[f"stages.$[s{i}].status"] = status
            filters.append({f"s{i}.name": stage, f"s{i}.status": {"$in": lower}})
        highest: dict[str, int] = dict(counters)
        for task_type, values in (task_counts or {}).items():
            highest.update({f"{TASK_COUNTS}.{task_type}.{k}": v for k, v in values.items()})
        update: Document = {"$set": sets}
        if final:
            sets.update(highest)
            sets[COUNTS_FINAL] = True
        elif highest:
            update["$max"] = highest
        await self._col.update_one({"_id": world_id}, update, array_filters=filters or None)

    async def open_failed(self, world_id: str, reason: str, parameters: Mapping[str, Any], now: datetime,
                          first_task_type: str) -> None:
        """Record a world that could not start (its parameters are invalid): `failed` with the reason, and
        no predictions (nothing will be made). Idempotent, and never overwrites a world that exists."""
        def count(value: Any) -> int:
            return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62 else 0

        doc = new_status_document(
            users=0, posts=0, user_prompt=str(parameters.get("user_prompt") or "")[:4000], task_predicted=1,
            llm_call_limit=0, image_call_limit=0, budget_usd=None, now=now, first_task_type=first_task_type)
        doc.update(status="failed", failure_reason=reason[:2000], finished_at=now,
                   parameters={"users_count": count(parameters.get("users_count")),
                               "posts_count": count(parameters.get("posts_count")),
                               "user_prompt": doc["parameters"]["user_prompt"]})
        await self._col.update_one({"_id": world_id}, {"$setOnInsert": doc}, upsert=True)

    async def finish(self, world_id: str, status: Literal["completed", "failed"]) -> str | None:
        """End a live world; `completed` turns into `failed` when its budget was exceeded. Returns the
        status this call set, None when the world was already terminal."""
        now = utcnow()
        live = {"$in": list(LIVE)}
        ending = {"current_stage": "finishing", "updated_at": now, "finished_at": now}
        if status == "completed":
            res = await self._col.update_one({"_id": world_id, "status": live, "budget_exceeded": {"$ne": True}},
                                             {"$set": {"status": "completed", **ending}})
            if res.modified_count:
                return "completed"
        res = await self._col.update_one({"_id": world_id, "status": live}, {"$set": {"status": "failed", **ending}})
        return "failed" if res.modified_count else None

    async def mark_budget_exceeded(self, world_id: str, reason: str) -> None:
        """A paid call was refused by the budget: the world will end `failed` with `budget_exceeded`."""
        await self._col.update_one(
            {"_id": world_id, "status": {"$in": list(LIVE)}},
            {"$set": {"budget_exceeded": True, "failure_reason": "budget_exceeded", "budget_detail": reason,
                      "updated_at": utcnow()}})

    async def fail(self, world_id: str, reason: str) -> bool:
        """Fail a live world now (operator cancel); returns False when it was already terminal."""
        res = await self._col.update_one(
            {"_id": world_id, "status": {"$in": list(LIVE)}},
            {"$set": {"status": "failed", "failure_reason": reason, "updated_at": utcnow()}})
        return bool(res.modified_count)

    async def reopen(self, world_id: str, *, budget_usd: float | None = None) -> bool:
        """A finished world goes back to `in_progress` (an operator retries its failed tasks): its failure
        reason and budget flag are cleared; `budget_usd` raises its money cap. Returns True when it was
        finished."""
        sets: Document = {"status": "in_progress", "updated_at": utcnow()}
        if budget_usd is not None:
            sets["budget_usd"] = budget_usd
        res = await self._col.update_one(
            {"_id": world_id, "status": {"$in": list(TERMINAL_WORLD)}},
            {"$set": sets, "$unset": {"failure_reason": "", "budget_exceeded": "", "budget_detail": "",
                                      "finished_at": "", COUNTS_FINAL: ""}})
        if not res.modified_count and budget_usd is not None:
            await self._col.update_one({"_id": world_id}, {"$set": {"budget_usd": budget_usd}})
        return bool(res.modified_count)

    async def set_stages(self, world_id: str, current_stage: str, stages: Mapping[str, str]) -> None:
        """Set every stage's status as given (not only forward: an operator's retry moves stages back)."""
        await self._col.update_one({"_id": world_id}, {"$set": {
            "current_stage": current_stage, "stages": [{"name": s, "status": stages.get(s, "pending")} for s in STAGES],
            "updated_at": utcnow()}})

    # --- the ledger of paid calls --------------------------------------------------------------------
    async def reserve(self, world_id: str, kind: CallKind, amount: float, cap: float | None,
                      limit: int | None) -> bool:
        """Reserve `amount` USD and one call of `kind` in one atomic conditional update; False when the
        world is not live, or the reservation would pass the money cap or the call limit."""
        reserved = CALL_FIELDS[kind][2]
        query: Document = {"_id": world_id, "status": {"$in": list(LIVE)}}
        if cap is not None:
            query["budget_committed_usd"] = {"$lte": cap - amount}
        if limit is not None:
            query[reserved] = {"$lt": limit}
        res = await self._col.update_one(query, {"$inc": {"budget_committed_usd": amount, reserved: 1}})
        return bool(res.matched_count)

    async def settle(self, world_id: str, kind: CallKind, delta_usd: float, cost: float, *,
                     count: bool = True) -> None:
        """Replace a reservation by the real cost (`delta_usd` = real - reserved) and, with `count`, count
        the call and its cost, in one update (grouped with the world's other increments)."""
        made, total, _, _ = CALL_FIELDS[kind]
        inc: dict[str, float] = {"budget_committed_usd": delta_usd}
        if count:
            inc.update({made: 1, total: cost})
        await self._increments.update(world_id, inc, {"updated_at": utcnow()} if count else None)

    async def set_call_totals(self, world_id: str, totals: Mapping[CallKind, tuple[int, float]], *,
                              live_only: bool = True) -> None:
        """Set the call counters and cost totals to the truth (the history): while the world is live, or
        also after it ended (`live_only=False`, when late history records were written)."""
        sets: Document = {}
        for kind, (made, total, _, _) in CALL_FIELDS.items():
            n, cost = totals.get(kind, (0, 0.0))
            sets[made], sets[total] = n, cost
        query: Document = {"_id": world_id}
        if live_only:
            query["status"] = {"$in": list(LIVE)}
        await self._col.update_one(query, {"$set": sets})

    # --- the operator's list (`ai-worker worlds`) ---------------------------------------------------------
    async def recent(self, status: str | None = None, since: datetime | None = None, limit: int = 20) -> list[Document]:
        """The newest worlds first (by `created_at`), optionally of one status and created at or after `since`;
        only the fields a listing shows."""
        query: Document = {}
        if status is not None:
            query["status"] = status
        if since is not None:
            query["created_at"] = {"$gte": since}
        fields = ["status", "current_stage", "created_at", "updated_at", "finished_at", "failure_reason",
                  "parameters", "budget_usd", *COUNTERS, "task_predicted", "users_predicted", "posts_predicted",
                  *(names[0] for names in CALL_FIELDS.values()), *(names[1] for names in CALL_FIELDS.values())]
        cursor = self._col.find(query, dict.fromkeys(fields, 1), sort=[("created_at", DESCENDING)], limit=limit)
        return [doc async for doc in cursor]


def stage_statuses(doc: Document) -> dict[str, str]:
    """name -> status of a status document's stages (tolerant of a malformed array)."""
    stages = doc.get("stages")
    out: dict[str, str] = {}
    if isinstance(stages, Sequence):
        for entry in stages:
            if isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
                out[entry["name"]] = str(entry.get("status"))
    return out


__all__ = ["CALL_FIELDS", "COLLECTION", "COUNTERS", "LIVE", "STAGES", "TASK_COUNTS", "TERMINAL_WORLD", "CallKind",
           "WorldStatusStore", "new_status_document", "stage_statuses"]
