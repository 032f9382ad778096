"""What the console can change: cancel a world, retry its failed tasks, replay a dead letter.

Each action is one function here, so the web layer has one place to call and the command line and the
console do the same thing. Authorisation is the caller's job (see auth.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from ai_worker.jobs import build_registry
from ai_worker.messaging.dlq import DeadLetter, replay_one
from ai_worker.mongo import Database
from ai_worker.tasks import operations

CANCEL_REASON = "cancelled from the console"


class NotAvailable(Exception):
    """The action does not exist (yet) in this version of the worker."""


@dataclass(frozen=True)
class CancelResult:
    tasks_cancelled: int
    world_marked_failed: bool


async def cancel_world(db: Database, world_id: str, reason: str = CANCEL_REASON) -> CancelResult:
    """What `ai-worker cancel` does: the world's non-terminal tasks become `cancelled`, the world `failed`
    with the reason; running jobs stop at their next step."""
    report = await operations.cancel_world(db, build_registry(), world_id, reason)
    return CancelResult(tasks_cancelled=report.tasks_cancelled, world_marked_failed=report.world_failed)


def retry_available() -> bool:
    """Whether `retry_world` can work; the console hides its button otherwise."""
    return True


async def retry_world(db: Database, world_id: str) -> int:
    """What `ai-worker retry WORLD_ID` does: the world's failed tasks go back to pending with fresh attempts
    (memoised steps kept: nothing paid or created is done again) and a finished world back to in progress.
    The console publishes no events: the workers' reconciler starts the tasks within two reconcile
    intervals. Returns how many tasks were put back."""
    report = await operations.retry(db, build_registry(), world_id=world_id)
    return report.tasks_requeued


async def replay_dead_letter(bootstrap: Sequence[str], dlq_topic: str, tasks_topic: str, partition: int,
                             offset: int, *, timeout_s: float = 10.0) -> DeadLetter | None:
    """Re-publish one dead letter (original bytes, key and headers) onto the tasks topic; None when there is
    no message at that position."""
    return await asyncio.wait_for(replay_one(bootstrap, dlq_topic, tasks_topic, partition, offset),
                                  timeout=timeout_s)
