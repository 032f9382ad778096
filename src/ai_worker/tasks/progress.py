"""`world_generation_status` (CONTRACTS.md): created when a world starts, then derived from the tasks
collection after every task transition, so counters never drift.

Concurrent refreshes are safe without a read-modify-write: counters only grow (`$max`), each stage moves
forward only (one array-filtered `$set` per stage, conditioned on the stage's current status), and the
world's status leaves `pending` / `in_progress` once."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import structlog

from ai_worker.messaging.events import TaskType, utcnow
from ai_worker.tasks.model import WORLD_LEVEL_TYPES, TaskDoc, TaskStatus

log = structlog.get_logger(__name__)

WORLD_STATUS = "world_generation_status"
BATCH_SIZE = 10

STAGES: tuple[str, ...] = ("initializing", "world_description", "world_image", "characters", "posts", "finishing")
STAGE_TYPES: dict[str, tuple[TaskType, ...]] = {
    "initializing": (TaskType.INIT_WORLD_CREATION,),
    "world_description": (TaskType.GENERATE_WORLD_DESCRIPTION,),
    "world_image": (TaskType.GENERATE_WORLD_IMAGE,),
    "characters": (
        TaskType.GENERATE_CHARACTER_BATCH,
        TaskType.GENERATE_CHARACTER,
        TaskType.GENERATE_CHARACTER_AVATAR,
    ),
    "posts": (TaskType.GENERATE_POST_BATCH, TaskType.GENERATE_POST, TaskType.GENERATE_POST_IMAGE),
}
# A stage can only be finished once the stages that spawn its tasks are finished.
STAGE_AFTER: dict[str, tuple[str, ...]] = {
    "world_description": ("initializing",),
    "world_image": ("world_description",),
    "characters": ("world_description",),
    "posts": ("characters",),
}
_RANK = {"pending": 0, "in_progress": 1, "completed": 2, "failed": 2}


@dataclass(frozen=True)
class WorldPlan:
    users: int
    posts: int

    def posts_for(self, index: int) -> int:
        """Post totals split over characters: they sum to `posts`; every character gets >= 1 when
        posts >= users (otherwise the first `posts` characters get one each)."""
        base, extra = divmod(self.posts, self.users) if self.users else (0, 0)
        return base + (1 if index < extra else 0)

    def predicted_tasks(self) -> int:
        batches = math.ceil(self.users / BATCH_SIZE)
        post_batches = sum(math.ceil(self.posts_for(i) / BATCH_SIZE) for i in range(self.users))
        return 3 + batches + 2 * self.users + post_batches + 2 * self.posts

    def predicted_llm_calls(self) -> int:
        batches = math.ceil(self.users / BATCH_SIZE)
        post_batches = sum(math.ceil(self.posts_for(i) / BATCH_SIZE) for i in range(self.users))
        return 1 + batches + post_batches + self.posts

    def predicted_images(self) -> int:
        return 2 + self.users + self.posts


def _int_param(params: dict[str, Any], key: str, default: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return default
    try:
        return max(0, int(value))
    except ValueError:
        return default


def _headroom(predicted_calls: int) -> int:
    """Call limit of a world that sets none: room for retries (every attempt is a call), so a default world
    is never starved by a flaky provider; the money cap (WORLD_BUDGET_USD) is the real bound."""
    return 3 * predicted_calls + 20


def _money(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class WorldProgress:
    def __init__(self, db: Any, *, default_budget_usd: float | None = None) -> None:
        self._worlds = db[WORLD_STATUS]
        self._default_budget = default_budget_usd

    async def get(self, world_id: str) -> dict[str, Any] | None:
        doc: dict[str, Any] | None = await self._worlds.find_one({"_id": world_id})
        return doc

    async def open_world(self, init_task: TaskDoc) -> None:
        """Create the status document for a world (idempotent; the first writer wins)."""
        params = init_task.parameters
        plan = WorldPlan(users=_int_param(params, "users_count", 10), posts=_int_param(params, "posts_count", 50))
        now = utcnow()
        llm_limit = params.get("api_call_limits_llm")
        img_limit = params.get("api_call_limits_images")
        budget = params.get("budget_usd", self._default_budget)
        doc = {
            "status": "in_progress",
            "current_stage": STAGES[0],
            "stages": [{"name": s, "status": "pending"} for s in STAGES],
            "tasks_total": 1,
            "tasks_completed": 0,
            "tasks_failed": 0,
            "task_predicted": plan.predicted_tasks(),
            "users_created": 0,
            "posts_created": 0,
            "users_predicted": plan.users,
            "posts_predicted": plan.posts,
            "api_call_limits_LLM": llm_limit if isinstance(llm_limit, int) else _headroom(plan.predicted_llm_calls()),
            "api_call_limits_images": img_limit if isinstance(img_limit, int) else _headroom(plan.predicted_images()),
            "api_calls_made_LLM": 0,
            "api_calls_made_images": 0,
            "llm_cost_total": 0.0,
            "image_cost_total": 0.0,
            # ours: the money cap and the ledger of reservations (providers.budget)
            "budget_usd": _money(budget),
            "budget_committed_usd": 0.0,
            "api_calls_reserved_LLM": 0,
            "api_calls_reserved_images": 0,
            "parameters": {
                "users_count": plan.users,
                "posts_count": plan.posts,
                "user_prompt": str(params.get("user_prompt", "")),
            },
            "created_at": now,
            "updated_at": now,
        }
        await self._worlds.update_one({"_id": init_task.world_id}, {"$setOnInsert": doc}, upsert=True)

    async def refresh(self, world_id: str, counts: dict[tuple[str, str], int]) -> str | None:
        """Derive counters, stages and status from task counts (type, status) -> n.
        Returns the world's terminal status when this refresh finished it."""
        def n(types: tuple[TaskType, ...] | None = None, statuses: frozenset[str] | None = None) -> int:
            return sum(
                v for (t, s), v in counts.items()
                if (types is None or t in types) and (statuses is None or s in statuses)
            )

        terminal = frozenset(s.value for s in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED))
        done = frozenset({TaskStatus.COMPLETED.value})
        bad = frozenset({TaskStatus.FAILED.value, TaskStatus.CANCELLED.value})
        total = n()
        open_tasks = total - n(statuses=terminal)
        world_failed = n(tuple(WORLD_LEVEL_TYPES), bad) > 0

        stage_status: dict[str, str] = {}
        for stage, types in STAGE_TYPES.items():
            have = n(types)
            if have == 0:
                status = "pending"
            elif n(types, terminal) < have or any(stage_status.get(p) not in ("completed", "failed")
                                                  for p in STAGE_AFTER.get(stage, ())):
                status = "in_progress"
            elif any(t in WORLD_LEVEL_TYPES for t in types) and n(
                tuple(t for t in types if t in WORLD_LEVEL_TYPES), bad
            ):
                status = "failed"
            else:
                status = "completed"
            stage_status[stage] = status

        finished: str | None = None
        if total > 0 and open_tasks == 0:
            finished = "failed" if world_failed else "completed"
            # Stages that never started because an earlier step failed end as failed too.
            for stage in STAGE_TYPES:
                if stage_status[stage] != "completed":
                    stage_status[stage] = "failed" if world_failed else "completed"
            stage_status["finishing"] = finished
        elif stage_status["posts"] == "completed":
            stage_status["finishing"] = "in_progress"
        else:
            stage_status["finishing"] = "pending"

        current = STAGES[0]
        for stage in STAGES:
            if stage_status[stage] != "pending":
                current = stage

        now = utcnow()
        sets: dict[str, Any] = {"updated_at": now, "current_stage": current}
        filters: list[dict[str, Any]] = []
        for i, stage in enumerate(STAGES):
            status = stage_status[stage]
            lower = [s for s, r in _RANK.items() if r < _RANK[status]]
            if not lower:
                continue
            sets[f"stages.$[s{i}].status"] = status
            filters.append({f"s{i}.name": stage, f"s{i}.status": {"$in": lower}})
        update: dict[str, Any] = {
            "$max": {
                "tasks_total": total,
                "tasks_completed": n(statuses=done),
                "tasks_failed": n(statuses=bad),
                "users_created": n((TaskType.GENERATE_CHARACTER,), done),
                "posts_created": n((TaskType.GENERATE_POST_IMAGE,), done),
            },
            "$set": sets,
        }
        await self._worlds.update_one({"_id": world_id}, update, array_filters=filters or None)
        if finished is None:
            return None
        live = {"$in": ["pending", "in_progress"]}
        ending = {"current_stage": "finishing", "updated_at": now, "finished_at": now}
        if finished == "completed":
            res = await self._worlds.update_one(
                {"_id": world_id, "status": live, "budget_exceeded": {"$ne": True}},
                {"$set": {"status": "completed", **ending}})
            if res.modified_count:
                return "completed"
        res = await self._worlds.update_one(
            {"_id": world_id, "status": live},
            {"$set": {"status": "failed", **ending}})
        return "failed" if res.modified_count else None

    async def mark_budget_exceeded(self, world_id: str, reason: str) -> None:
        """A paid call was refused by the budget: the world will end `failed` with `budget_exceeded`
        once its remaining tasks are terminal (they finish what they can without paying more)."""
        await self._worlds.update_one(
            {"_id": world_id, "status": {"$in": ["pending", "in_progress"]}},
            {"$set": {"budget_exceeded": True, "failure_reason": "budget_exceeded", "budget_detail": reason,
                      "updated_at": utcnow()}})

    async def fail_world(self, world_id: str, reason: str) -> bool:
        res = await self._worlds.update_one(
            {"_id": world_id, "status": {"$in": ["pending", "in_progress"]}},
            {"$set": {"status": "failed", "failure_reason": reason, "updated_at": utcnow()}},
        )
        return bool(res.modified_count)
