"""Operator actions on worlds (the CLI and the console call these): cancel a world, retry its failed tasks."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from ai_worker.mongo import Database, Document
from ai_worker.tasks.progress import WorldProgress
from ai_worker.tasks.registry import JobRegistry
from ai_worker.tasks.store import TaskStore
from ai_worker.worlds.status import WorldStatusStore


@dataclass(frozen=True)
class CancelReport:
    tasks_cancelled: int
    world_failed: bool  # False when the world was already terminal


async def cancel_world(db: Database, registry: JobRegistry, world_id: str, reason: str) -> CancelReport:
    """Cancel a world: its pending and running tasks become `cancelled` (a running job notices at its next
    step and stops without effects), the world `failed` with `reason`, and its counters and stages are
    recounted so they say how far it got."""
    tasks = TaskStore(db)
    status = WorldStatusStore(db)
    n = await tasks.cancel_world(world_id, reason)
    marked = await status.fail(world_id, reason)
    await WorldProgress(status, registry, tasks=tasks).recount(world_id)
    return CancelReport(tasks_cancelled=n, world_failed=marked)


class TaskPublisher(Protocol):
    async def publish_task(self, task_id: str, task_type: str, world_id: str) -> None: ...


@dataclass(frozen=True)
class RetryReport:
    tasks_requeued: int
    worlds_reopened: list[str] = field(default_factory=list)
    published: int = 0
    warnings: list[str] = field(default_factory=list)


async def retry(db: Database, registry: JobRegistry, *, world_id: str | None = None, task_id: str | None = None,
                budget_usd: float | None = None, publisher: TaskPublisher | None = None) -> RetryReport:
    """Put a world's failed (or cancelled) tasks, or one task, back to pending with fresh attempts.

    The same guarantees hold as for any retry: memoised steps are kept (nothing paid or created is done
    again) and children have deterministic ids (a parent that runs again yields the same children). The
    world goes back to `in_progress` if it had finished; `budget_usd` raises its money cap (a world that
    failed on its budget would fail again without it). Events are published when a `publisher` is given;
    otherwise (or when publishing fails) the reconciler starts the tasks within two RECONCILE_INTERVAL_S."""
    if (world_id is None) == (task_id is None):
        raise ValueError("give a world id or a task id")
    tasks, status = TaskStore(db), WorldStatusStore(db)
    query = {"world_id": world_id} if world_id is not None else {"_id": task_id}
    before: dict[str, Document | None] = {}
    if world_id is not None:
        before[world_id] = await status.get(world_id)
    requeued = await tasks.requeue(query, registry.types())
    by_world: dict[str, Counter[str]] = {}
    for doc in requeued:
        by_world.setdefault(str(doc["world_id"]), Counter())[str(doc["type"])] += 1
    progress = WorldProgress(status, registry, tasks=tasks)
    report = RetryReport(tasks_requeued=len(requeued))
    for wid, types in by_world.items():
        world = before.get(wid) or await status.get(wid)
        if world is not None and world.get("budget_exceeded") and budget_usd is None:
            report.warnings.append(f"world {wid} failed on its budget (${world.get('budget_usd')}): "
                                   "its paid calls will be refused again unless you raise it with --budget-usd")
        if await status.reopen(wid, budget_usd=budget_usd):
            report.worlds_reopened.append(wid)
        await progress.requeued(wid, types)
    if world_id is not None and not requeued and budget_usd is not None:
        await status.reopen(world_id, budget_usd=budget_usd)
    published = 0
    if publisher is not None:
        for doc in requeued:
            try:
                await publisher.publish_task(str(doc["_id"]), str(doc["type"]), str(doc["world_id"]))
                published += 1
            except Exception as exc:  # the tasks are pending: the reconciler republishes them
                report.warnings.append(f"event of task {doc['_id']} not published ({exc}); the reconciler will")
                break
    return RetryReport(tasks_requeued=report.tasks_requeued, worlds_reopened=report.worlds_reopened,
                       published=published, warnings=report.warnings)
