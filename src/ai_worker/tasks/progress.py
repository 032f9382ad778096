"""World progress: a world's status document is created when the job that opens it has validated its
parameters, then derived from the tasks collection after every task transition, so counters never drift.
Which stage a task belongs to, which failures fail the world and which tasks count as a character or a
post made all come from the jobs' policies (the registry); the document itself is written by its owner,
`worlds.status.WorldStatusStore`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

import structlog

from ai_worker.messaging.events import utcnow
from ai_worker.tasks.model import TaskStatus
from ai_worker.tasks.registry import JobRegistry
from ai_worker.worlds.plan import WorldOpening, WorldPlan
from ai_worker.worlds.status import STAGES, WorldStatusStore, new_status_document

log = structlog.get_logger(__name__)

# A stage can only be finished once the stages that spawn its tasks are finished.
STAGE_AFTER: Final[dict[str, tuple[str, ...]]] = {
    "world_description": ("initializing",),
    "world_image": ("world_description",),
    "characters": ("world_description",),
    "posts": ("characters",),
}
TERMINAL: Final = frozenset(s.value for s in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED))
DONE: Final = frozenset({TaskStatus.COMPLETED.value})
BAD: Final = frozenset({TaskStatus.FAILED.value, TaskStatus.CANCELLED.value})

Counts = Mapping[tuple[str, str], int]  # (task type, status) -> number of tasks
BudgetFor = Callable[[WorldPlan], float | None]


def call_limit_headroom(predicted_calls: int) -> int:
    """Call limit of a world that sets none: room for retries (every attempt is a call), so a default world
    is never starved by a flaky provider; the money cap is the real bound."""
    return 3 * predicted_calls + 20


class WorldProgress:
    def __init__(self, status: WorldStatusStore, registry: JobRegistry, *,
                 default_budget: BudgetFor | None = None) -> None:
        self.status = status
        self._registry = registry
        self._default_budget = default_budget

    async def open_world(self, world_id: str, opening: WorldOpening) -> None:
        """Create the status document for a world from its validated opening (idempotent)."""
        plan = opening.plan
        predicted = self._registry.predict(plan)
        budget = opening.budget_usd
        if budget is None and self._default_budget is not None:
            budget = self._default_budget(plan)
        doc = new_status_document(
            users=plan.users, posts=plan.posts, user_prompt=opening.user_prompt, task_predicted=predicted.tasks,
            llm_call_limit=opening.llm_call_limit or call_limit_headroom(predicted.llm_calls),
            image_call_limit=opening.image_call_limit or call_limit_headroom(predicted.images),
            budget_usd=budget, now=utcnow())
        await self.status.open(world_id, doc)

    async def refresh(self, world_id: str, counts: Counts) -> str | None:
        """Derive counters, stages and status from task counts (type, status) -> n.
        Returns the world's terminal status when this refresh finished it."""
        stage_of = {p.task_type: p.stage for p in self._registry.policies()}
        world_level = {p.task_type for p in self._registry.policies() if p.world_level}
        produces = {p.task_type: p.produces for p in self._registry.policies()}

        def n(types: Callable[[str], bool] | None = None, statuses: frozenset[str] | None = None) -> int:
            return sum(v for (t, s), v in counts.items()
                       if (types is None or types(t)) and (statuses is None or s in statuses))

        total = n()
        open_tasks = total - n(statuses=TERMINAL)
        world_failed = n(lambda t: t in world_level, BAD) > 0

        stage_status: dict[str, str] = {}
        for stage in STAGES[:-1]:
            def in_stage(t: str, stage: str = stage) -> bool:
                return stage_of.get(t) == stage

            def world_level_in_stage(t: str, stage: str = stage) -> bool:
                return stage_of.get(t) == stage and t in world_level

            have = n(in_stage)
            if have == 0:
                status = "pending"
            elif n(in_stage, TERMINAL) < have or any(stage_status.get(p) not in ("completed", "failed")
                                                     for p in STAGE_AFTER.get(stage, ())):
                status = "in_progress"
            elif n(world_level_in_stage, BAD):
                status = "failed"
            else:
                status = "completed"
            stage_status[stage] = status

        finished: str | None = None
        if total > 0 and open_tasks == 0:
            finished = "failed" if world_failed else "completed"
            # Stages that never started because an earlier step failed end as failed too.
            for stage in STAGES[:-1]:
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

        counters = {
            "tasks_total": total,
            "tasks_completed": n(statuses=DONE),
            "tasks_failed": n(statuses=BAD),
            "users_created": n(lambda t: produces.get(t) == "users", DONE),
            "posts_created": n(lambda t: produces.get(t) == "posts", DONE),
        }
        await self.status.write_progress(world_id, counters, current, stage_status)
        if finished is None:
            return None
        return await self.status.finish(world_id, "failed" if finished == "failed" else "completed")
