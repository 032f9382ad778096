"""Operator actions on worlds (the CLI and the console call these): cancel now; retry comes with it."""

from __future__ import annotations

from dataclasses import dataclass

from ai_worker.mongo import Database
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
