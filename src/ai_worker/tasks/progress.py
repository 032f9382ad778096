"""World progress: the status document the platform reads, kept up to date at O(1) per task transition.

- A world's document is created when the job that opens it has validated its parameters (`open_world`).
- Every transition the engine makes (children inserted, a task completed, failed or cancelled) is one
  `$inc` of the counters and of the per-type counts on that document, read back in the same round trip
  (`record`). The `$inc` follows the task's own conditional write, so it is applied once per transition:
  a redelivered event finds the task already moved and counts nothing.
- The stages are derived from the per-type counts with the jobs' policies (which stage a type belongs to,
  which failures fail the world, which tasks make a character or a post); they are written only when
  they change (a handful of times per world).
- When the counters say every task is terminal, the world is recounted exactly from the tasks collection
  (`recount`, O(world size), once per world), its call counters are synced with the request history, and
  it is finished. A crash between a task's write and its `$inc` leaves the counters short: the world then
  never looks done to `record`, stops moving, and the reconciler's periodic `recount` of stale worlds
  repairs and finishes it.

The document itself is written by its owner, `worlds.status.WorldStatusStore`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, Protocol

import structlog

from ai_worker.messaging.events import utcnow
from ai_worker.mongo import Document
from ai_worker.tasks.model import TaskStatus
from ai_worker.tasks.registry import JOB_STAGES, JobRegistry
from ai_worker.tasks.store import TaskStore
from ai_worker.worlds.plan import WorldOpening, WorldPlan
from ai_worker.worlds.status import STAGES, TASK_COUNTS, WorldStatusStore, new_status_document, stage_statuses

log = structlog.get_logger(__name__)

# A stage can only be finished once the stages that spawn its tasks are finished.
STAGE_AFTER: Final[dict[str, tuple[str, ...]]] = {
    "world_description": ("initializing",),
    "world_image": ("world_description",),
    "characters": ("world_description",),
    "posts": ("characters",),
}
_DONE = TaskStatus.COMPLETED.value
_BAD = frozenset({TaskStatus.FAILED.value, TaskStatus.CANCELLED.value})

BudgetFor = Callable[[WorldPlan], float | None]
Finished = Literal["completed", "failed"]


class Accounting(Protocol):
    async def sync_world(self, world_id: str) -> None:
        """Make a world's call counters exact (called when none of its tasks can still be calling)."""


def call_limit_headroom(predicted_calls: int) -> int:
    """Call limit of a world that sets none: room for retries (every attempt is a call), so a default world
    is never starved by a flaky provider; the money cap is the real bound."""
    return 3 * predicted_calls + 20


@dataclass
class TypeCounts:
    total: int = 0
    done: int = 0
    failed: int = 0  # failed or cancelled

    @property
    def open(self) -> int:
        return self.total - self.done - self.failed


@dataclass(frozen=True)
class WorldState:
    """What a progress update learned about a world: its status (for the engine's cache) and whether this
    update finished it."""

    status: str
    failure_reason: str | None
    finished: Finished | None = None


def _type_counts(doc: Document) -> dict[str, TypeCounts]:
    raw = doc.get(TASK_COUNTS)
    out: dict[str, TypeCounts] = {}
    if isinstance(raw, Mapping):
        for task_type, values in raw.items():
            if isinstance(values, Mapping):
                out[str(task_type)] = TypeCounts(*(int(values.get(k) or 0) for k in ("total", "done", "failed")))
    return out


class WorldProgress:
    def __init__(self, status: WorldStatusStore, registry: JobRegistry, *, tasks: TaskStore | None = None,
                 accounting: Accounting | None = None, default_budget: BudgetFor | None = None) -> None:
        self.status = status
        self._registry = registry
        self._tasks = tasks
        self._accounting = accounting
        self._default_budget = default_budget

    # --- opening --------------------------------------------------------------------------------------
    async def open_world(self, world_id: str, opening: WorldOpening, first_task_type: str) -> None:
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
            budget_usd=budget, now=utcnow(), first_task_type=first_task_type)
        await self.status.open(world_id, doc)

    # --- the hot path: one transition ------------------------------------------------------------------
    async def record(self, world_id: str, *, inserted: Counter[str] | None = None, completed: str | None = None,
                     failed: str | None = None) -> WorldState | None:
        """Count one transition: children `inserted` (by type), a task of type `completed` or `failed`
        (failed or cancelled). Returns the world's state, None when it has no status document."""
        inc: Counter[str] = Counter()
        for task_type, n in (inserted or {}).items():
            inc["tasks_total"] += n
            inc[f"{TASK_COUNTS}.{task_type}.total"] += n
        if completed is not None:
            inc["tasks_completed"] += 1
            inc[f"{TASK_COUNTS}.{completed}.done"] += 1
            produces = self._produces(completed)
            if produces is not None:
                inc[f"{produces}_created"] += 1
        if failed is not None:
            inc["tasks_failed"] += 1
            inc[f"{TASK_COUNTS}.{failed}.failed"] += 1
        if not inc:
            return None
        doc = await self.status.add_progress(world_id, inc)
        if doc is None:
            return None
        state = WorldState(status=str(doc.get("status")), failure_reason=_str_or_none(doc.get("failure_reason")))
        counts = _type_counts(doc)
        stages = self._stages(counts, failing=self._failing(doc, counts), finished=None)
        if self._changed(doc, stages):
            await self.status.write_progress(world_id, {}, _current(stages), stages)
        total, done, bad = (int(doc.get(k) or 0) for k in ("tasks_total", "tasks_completed", "tasks_failed"))
        if total > 0 and done + bad >= total:
            finished = await self.recount(world_id)
            return WorldState(finished or state.status, state.failure_reason, finished)
        return state

    async def requeued(self, world_id: str, types: Counter[str]) -> None:
        """Failed tasks (by type) went back to pending: take them out of the failed counts and set the
        stages again from the counts (they may move back, e.g. from failed to in_progress)."""
        inc: Counter[str] = Counter()
        for task_type, n in types.items():
            inc["tasks_failed"] -= n
            inc[f"{TASK_COUNTS}.{task_type}.failed"] -= n
        doc = await self.status.add_progress(world_id, inc)
        if doc is None:
            return
        counts = _type_counts(doc)
        stages = self._stages(counts, failing=self._failing(doc, counts), finished=None)
        await self.status.set_stages(world_id, _current(stages), stages)

    # --- the exact recount (once per world, and for worlds that stopped moving) -------------------------
    async def recount(self, world_id: str) -> Finished | None:
        """Recount a world from its tasks (O(world size)); finish it when every task is terminal. Returns
        the status this call finished it with."""
        if self._tasks is None:
            return None
        rows = await self._tasks.counts_by_type_status(world_id)
        counts: dict[str, TypeCounts] = {}
        for (task_type, status), n in rows.items():
            c = counts.setdefault(task_type, TypeCounts())
            c.total += n
            if status == _DONE:
                c.done += n
            elif status in _BAD:
                c.failed += n
        total = sum(c.total for c in counts.values())
        all_terminal = total > 0 and all(c.open == 0 for c in counts.values())
        if all_terminal and self._accounting is not None:
            # Nothing can be in flight any more: make the call counters exact before the world finishes.
            await self._accounting.sync_world(world_id)
        doc = await self.status.get(world_id)
        if doc is None:
            return None
        failing = self._failing(doc, counts)
        finished: Finished | None = ("failed" if failing else "completed") if all_terminal else None
        stages = self._stages(counts, failing=failing, finished=finished)
        counters = {
            "tasks_total": total,
            "tasks_completed": sum(c.done for c in counts.values()),
            "tasks_failed": sum(c.failed for c in counts.values()),
            "users_created": sum(c.done for t, c in counts.items() if self._produces(t) == "users"),
            "posts_created": sum(c.done for t, c in counts.items() if self._produces(t) == "posts"),
        }
        per_type = {t: {"total": c.total, "done": c.done, "failed": c.failed} for t, c in counts.items()
                    if self._registry.knows(t)}
        # Mid-world a recount only raises the counts ($max): a transition it counted may still add its own
        # increment. Once every task is terminal the counts are exact and final: increments that were still
        # on their way are not applied any more (WorldStatusStore.add_progress).
        await self.status.write_progress(world_id, counters, _current(stages), stages, per_type,
                                         final=all_terminal)
        if finished is None:
            return None
        ended = await self.status.finish(world_id, finished)
        if ended is None:
            return None
        log.info("world finished", world_id=world_id, status=ended)
        return "completed" if ended == "completed" else "failed"

    # --- deriving the stages ---------------------------------------------------------------------------
    def _produces(self, task_type: str) -> str | None:
        return self._registry.policy(task_type).produces if self._registry.knows(task_type) else None

    def _failing(self, doc: Document, counts: Mapping[str, TypeCounts]) -> bool:
        """The world will end failed: a world-level task failed for good, its budget ran out, or it was
        cancelled (failed by an operator)."""
        world_level_failed = any(c.failed for t, c in counts.items()
                                 if self._registry.knows(t) and self._registry.policy(t).world_level)
        return world_level_failed or bool(doc.get("budget_exceeded")) or doc.get("status") == "failed"

    def _stages(self, counts: Mapping[str, TypeCounts], *, failing: bool, finished: Finished | None) -> dict[str, str]:
        """Each stage's status. A stage whose work was cut short by the world's failure is `failed`, never
        `completed`; at the end, stages that never started share the world's outcome."""
        by_stage: dict[str, TypeCounts] = {s: TypeCounts() for s in JOB_STAGES}
        world_level_failed: Counter[str] = Counter()
        for task_type, c in counts.items():
            if not self._registry.knows(task_type):
                continue
            policy = self._registry.policy(task_type)
            agg = by_stage[policy.stage]
            agg.total, agg.done, agg.failed = agg.total + c.total, agg.done + c.done, agg.failed + c.failed
            if policy.world_level:
                world_level_failed[policy.stage] += c.failed
        out: dict[str, str] = {}
        for stage in JOB_STAGES:
            agg = by_stage[stage]
            if agg.total == 0:
                status = "pending"
            elif agg.open > 0 or any(out.get(p) not in ("completed", "failed") for p in STAGE_AFTER.get(stage, ())):
                status = "in_progress"
            elif world_level_failed[stage] or (failing and agg.failed):
                status = "failed"
            else:
                status = "completed"
            out[stage] = status
        if finished is not None:
            for stage in JOB_STAGES:
                if out[stage] not in ("completed", "failed"):
                    out[stage] = "failed" if finished == "failed" else "completed"
            out["finishing"] = finished
        elif out["posts"] == "completed":
            out["finishing"] = "in_progress"
        else:
            out["finishing"] = "pending"
        return out

    @staticmethod
    def _changed(doc: Document, stages: Mapping[str, str]) -> bool:
        rank = {"pending": 0, "in_progress": 1, "completed": 2, "failed": 2}
        have = stage_statuses(doc)
        moved = any(rank.get(status, 0) > rank.get(have.get(stage, "pending"), 0) for stage, status in stages.items())
        return moved or doc.get("current_stage") != _current(stages)


def _current(stages: Mapping[str, str]) -> str:
    current = STAGES[0]
    for stage in STAGES:
        if stages.get(stage, "pending") != "pending":
            current = stage
    return current


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
