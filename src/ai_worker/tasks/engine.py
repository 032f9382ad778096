"""The engine: claim -> run -> complete / retry / fail, with a lease heartbeat and world progress.

Order of writes on success: children inserted (deterministic ids, duplicates ignored) -> parent marked
completed (conditional on our claim) -> children's events published -> world progress refreshed.
A crash between any two leaves a re-runnable parent or pending children for the reconciler."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any, Protocol

import structlog
from pydantic import ValidationError

from ai_worker.errors import BudgetExceeded, InvalidParameters, UnknownTaskType, WorkerError
from ai_worker.messaging.events import BadMessage, EventType, TaskEvent, utcnow
from ai_worker.observability.logging import task_log_context
from ai_worker.tasks.context import ContextFactory, LeaseLost, TaskContext
from ai_worker.tasks.model import TERMINAL, TaskDoc, TaskStatus
from ai_worker.tasks.progress import WorldProgress
from ai_worker.tasks.registry import JobPolicy, JobRegistry
from ai_worker.tasks.retry import RetryPolicy
from ai_worker.tasks.store import TaskStore

log = structlog.get_logger(__name__)
_TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)


class Publisher(Protocol):
    async def publish_task(self, task_id: str, task_type: str, world_id: str) -> None: ...
    async def publish_progress(self, event: dict[str, Any]) -> None: ...


class Accounting(Protocol):
    async def sync_world(self, world_id: str) -> None:
        """Make a world's call counters exact (called when none of its tasks can still be calling)."""


class Engine:
    def __init__(
        self,
        *,
        store: TaskStore,
        progress: WorldProgress,
        registry: JobRegistry,
        publisher: Publisher,
        worker_id: str,
        lease_s: float,
        context_factory: ContextFactory = TaskContext,
        accounting: Accounting | None = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.store = store
        self.progress = progress
        self.registry = registry
        self._new_context = context_factory
        self._accounting = accounting
        self.publisher = publisher
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.policy = policy or RetryPolicy()
        self._timers: set[asyncio.TimerHandle] = set()
        self._background: set[asyncio.Task[None]] = set()

    # --- entry point from the consumer ------------------------------------------------------------
    async def handle(self, event: TaskEvent) -> None:
        """Process one event. Raises BadMessage for events that belong in the dead-letter topic."""
        if event.event_type == EventType.TASK_UPDATED:
            log.debug("event ignored", task_id=event.task_id, event_type=event.event_type)
            return
        if event.event_type != EventType.TASK_CREATED:
            raise BadMessage(f"unknown event_type {event.event_type[:64]!r}")
        task = await self.store.get(event.task_id)
        if task is None:
            raise BadMessage(f"unknown task id {event.task_id}: no such task document")
        await self.process(task)

    async def process(self, task: TaskDoc) -> None:
        if not self.registry.knows(task.type):
            reason = f"unknown task type {task.type[:64]!r}"
            log.error("task failed", task_id=task.id, world_id=task.world_id, reason=reason)
            if await self.store.fail_unclaimed(task.id, reason, UnknownTaskType.error_type):
                await self._refresh(task.world_id)
            raise BadMessage(reason)
        if task.status in TERMINAL:
            log.info("duplicate event skipped: task already terminal", task_id=task.id, status=task.status)
            return
        claimed = await self.store.claim(task.id, self.worker_id, self.lease_s)
        if claimed is None:
            self._skip_unclaimable(task)
            return
        with task_log_context(
            task_id=claimed.id, world_id=claimed.world_id, task_type=claimed.type, attempt=claimed.attempt_count
        ):
            await self._run_claimed(claimed)

    def _skip_unclaimable(self, task: TaskDoc) -> None:
        now = utcnow()
        if task.status == TaskStatus.PENDING and task.not_before and task.not_before > now:
            delay = (task.not_before - now).total_seconds()
            log.info("task not due yet: scheduling", task_id=task.id, in_s=round(delay, 2))
            self._schedule_publish(task, delay)
        else:
            log.info("task not claimable, skipped", task_id=task.id, status=task.status)

    # --- running a claimed task ------------------------------------------------------------------------
    async def _run_claimed(self, task: TaskDoc) -> None:
        policy = self.registry.policy(task.type)
        job = self.registry.create(task.type)
        try:
            params = job.Params.model_validate(task.parameters)
        except ValidationError as exc:
            error = InvalidParameters(_readable(exc))
            if policy.opens_world:  # the world never starts: say why on its status document
                await self.progress.status.open_failed(task.world_id, f"{error.error_type}: {error}", task.parameters,
                                                       utcnow())
            await self._on_failure(task, error, policy)
            return
        if policy.opens_world:
            await self.progress.open_world(task.world_id, job.world_opening(params))
        else:
            world = await self.progress.status.get(task.world_id)
            if world is not None and world.get("status") == "failed":
                # The world was cancelled (or failed) while this task waited: it must not add content.
                reason = f"world is failed: {world.get('failure_reason') or 'a world-level step failed'}"
                if await self.store.cancel_claimed(task, self.worker_id, reason):
                    log.info("task cancelled: its world already failed", reason=reason)
                    await self._refresh(task.world_id)
                return
        log.info("task started")
        lost = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(task, lost))
        ctx = self._new_context(task=task, worker_id=self.worker_id, max_attempts=policy.max_attempts,
                                steps=self.store, is_cancelled=lost.is_set)
        try:
            result = await job.run(ctx, params)
        except asyncio.CancelledError:
            log.warning("task interrupted; its lease will expire and it will be re-run")
            raise
        except LeaseLost as exc:
            log.warning("task abandoned", reason=str(exc))
            return
        except Exception as exc:
            await self._on_failure(task, exc, policy)
            return
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        await self._on_success(task, ctx, result)

    async def _on_success(self, task: TaskDoc, ctx: TaskContext, result: dict[str, Any]) -> None:
        now = utcnow()
        docs = [c.to_document(task, now) for c in ctx.children]
        inserted = await self.store.insert_children(docs)
        if not await self.store.complete(task, self.worker_id, result):
            log.warning("lost the lease before completing; result discarded")
            return
        log.info("task completed", children=len(docs), children_new=inserted)
        for doc in docs:
            await self._publish(doc["_id"], doc["type"], doc["world_id"])
        await self._refresh(task.world_id)

    async def _on_failure(self, task: TaskDoc, exc: BaseException, policy: JobPolicy) -> None:
        max_attempts = policy.max_attempts
        decision = self.policy.decide(exc, task.attempt_count, max_attempts)
        message = f"{decision.error_type}: {exc}"[:2000] if str(exc) else decision.error_type
        if decision.retry:
            not_before = utcnow() + timedelta(seconds=decision.delay_s)
            if not await self.store.schedule_retry(task, self.worker_id, message, decision.error_type, not_before):
                log.warning("lost the lease before scheduling a retry")
                return
            log.warning("task failed, will retry", error_type=decision.error_type, error=message,
                        retry_in_s=round(decision.delay_s, 2), max_attempts=max_attempts)
            self._schedule_publish(task, decision.delay_s)
            event_type = "task_retrying"
        else:
            if not await self.store.fail(task, self.worker_id, message, decision.error_type):
                log.warning("lost the lease before failing the task")
                return
            if decision.error_type == BudgetExceeded.error_type:
                await self.progress.status.mark_budget_exceeded(task.world_id, message)
            log.error("task failed", error_type=decision.error_type, error=message,
                      retryable=decision.retryable, max_attempts=max_attempts,
                      exc_info=not isinstance(exc, WorkerError | ValidationError))
            event_type = "task_failed"
        await self._publish_progress({
            "event_type": event_type, "task_id": task.id, "task_type": task.type, "world_id": task.world_id,
            "error_type": decision.error_type, "error_message": message, "retry_possible": decision.retry,
            "attempt": task.attempt_count, "max_attempts": max_attempts,
        })
        await self._refresh(task.world_id)

    async def _heartbeat(self, task: TaskDoc, lost: asyncio.Event) -> None:
        interval = max(0.5, self.lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self.store.renew_lease(task, self.worker_id, self.lease_s):
                    log.warning("lease lost (reclaimed or cancelled)")
                    lost.set()
                    return
            except Exception as exc:  # the database is down: keep trying until the lease runs out
                log.warning("lease renewal failed", error=str(exc))

    # --- helpers ------------------------------------------------------------------------------------------
    async def _refresh(self, world_id: str) -> None:
        counts = await self.store.counts_by_type_status(world_id)
        all_terminal = bool(counts) and all(status in _TERMINAL_VALUES for (_, status) in counts)
        if all_terminal and self._accounting is not None:
            # Nothing can be in flight any more: make the call counters exact before the world finishes.
            await self._accounting.sync_world(world_id)
        finished = await self.progress.refresh(world_id, counts)
        if finished:
            log.info("world finished", world_id=world_id, status=finished)
            await self._publish_progress({"event_type": f"world_{finished}", "world_id": world_id})

    async def refresh_world(self, world_id: str) -> None:
        await self._refresh(world_id)

    async def _publish(self, task_id: str, task_type: str, world_id: str) -> None:
        try:
            await self.publisher.publish_task(task_id, task_type, world_id)
        except Exception as exc:  # the task is pending in Mongo: the reconciler republishes it
            log.warning("publish failed; the reconciler will republish", task_id=task_id, error=str(exc))

    async def _publish_progress(self, event: dict[str, Any]) -> None:
        try:
            await self.publisher.publish_progress(event)
        except Exception as exc:
            log.warning("progress event not published", error=str(exc))

    def _schedule_publish(self, task: TaskDoc, delay_s: float) -> None:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.discard(handle)
            bg = loop.create_task(self._publish(task.id, task.type, task.world_id))
            self._background.add(bg)
            bg.add_done_callback(self._background.discard)

        handle = loop.call_later(max(0.0, delay_s), fire)
        self._timers.add(handle)

    def close(self) -> None:
        for handle in list(self._timers):
            handle.cancel()
        self._timers.clear()


def _readable(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "parameters"
        parts.append(f"{where}: {err['msg']}")
    return "invalid parameters: " + "; ".join(parts)
