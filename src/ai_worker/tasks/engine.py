"""The engine: claim -> run -> complete / retry / fail, with a lease heartbeat, a timeout per attempt and
world progress.

Order of writes on success: children inserted (deterministic ids, duplicates ignored) -> parent marked
completed (conditional on our claim) -> world progress counted (one `$inc`) -> children's events published.
A crash between any two leaves a re-runnable parent or pending children for the reconciler, and counters
that the world's exact recount repairs.

A task document that does not have the contract's shape is quarantined (failed with
`invalid_task_document`) and its event dead-lettered; it never stops the consumer or another task."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from datetime import timedelta
from typing import Any, Protocol

import structlog
from pydantic import ValidationError

from ai_worker.errors import BudgetExceeded, InvalidParameters, UnknownTaskType, WorkerError
from ai_worker.messaging.events import BadMessage, EventType, TaskEvent, utcnow
from ai_worker.mongo import Document
from ai_worker.observability import metrics
from ai_worker.observability.attempts import attempt_outcome, task_attempt
from ai_worker.scheduling import WorkClass, working_as
from ai_worker.tasks.context import ContextFactory, LeaseLost, TaskContext
from ai_worker.tasks.model import TERMINAL_VALUES, InvalidTaskDocument, TaskDoc, TaskStatus, parse_task
from ai_worker.tasks.progress import WorldProgress, WorldState
from ai_worker.tasks.registry import JobPolicy, JobRegistry
from ai_worker.tasks.retry import RetryPolicy
from ai_worker.tasks.store import TaskStore

log = structlog.get_logger(__name__)

WORLD_CACHE_S = 2.0  # how long a world's status read by this process is trusted (cancel detection)
WORLD_CACHE_SIZE = 4096


class Publisher(Protocol):
    async def publish_task(self, task_id: str, task_type: str, world_id: str) -> None: ...
    async def publish_progress(self, event: dict[str, Any]) -> None: ...


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
        policy: RetryPolicy | None = None,
    ) -> None:
        self.store = store
        self.progress = progress
        self.registry = registry
        self._new_context = context_factory
        self.publisher = publisher
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.policy = policy or RetryPolicy()
        self._types = frozenset(registry.types())
        self._timers: set[asyncio.TimerHandle] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._worlds: OrderedDict[str, tuple[float, str, str | None]] = OrderedDict()

    # --- entry point from the consumer ------------------------------------------------------------
    def work_class(self, event: TaskEvent) -> WorkClass:
        """How the scheduler sees an event before its task is read: its world, its job's priority and
        provider pool (from the event's hints; the task document stays the truth)."""
        task_type = event.task_type or ""
        if not self.registry.knows(task_type):
            return WorkClass(world=event.world_id or event.task_id)
        policy = self.registry.policy(task_type)
        return WorkClass(world=event.world_id or event.task_id, priority=policy.priority, pool=policy.pool)

    async def idle_work(self, pool: str, limit: int, older_than_s: float) -> list[TaskEvent]:
        """Events for up to `limit` tasks of provider pool `pool` that have waited pending for `older_than_s`
        (not retries; their own events sit in another worker's buffer, or are unread): what a worker whose
        slots of that pool idle may take (see messaging.consumer). They go through `handle` like any event:
        the claim decides, so a task taken here is skipped where its own event arrives, and the other way
        round."""
        types = [p.task_type for p in self.registry.policies() if p.pool == pool]
        if not types or limit <= 0:
            return []
        docs = await self.store.idle_work(types, utcnow() - timedelta(seconds=older_than_s), limit)
        events = []
        for doc in docs:
            world_id = doc.get("world_id")
            try:
                events.append(TaskEvent(event_type=EventType.TASK_CREATED, task_id=str(doc["_id"]),
                                        task_type=str(doc.get("type")),
                                        world_id=world_id if isinstance(world_id, str) else None))
            except ValidationError:  # an id no event could carry: left to its own event and the reconciler
                continue
        return events

    async def handle(self, event: TaskEvent) -> None:
        """Process one event. Raises BadMessage for events that belong in the dead-letter topic."""
        if event.event_type == EventType.TASK_UPDATED:
            log.debug("event ignored", task_id=event.task_id, event_type=event.event_type)
            return
        if event.event_type != EventType.TASK_CREATED:
            raise BadMessage(f"unknown event_type {event.event_type[:64]!r}")
        # The hot path is two point operations by `_id` (read, compare-and-set); the document read is
        # what an unclaimable task is judged by.
        claim = await self.store.try_claim(event.task_id, self.worker_id, self.lease_s, self._types)
        if claim.claimed is not None:
            task = await self._valid(claim.claimed)
            with task_attempt(task_id=task.id, world_id=task.world_id, task_type=task.type,
                              attempt=task.attempt_count):
                await self._run_claimed(task)
            return
        raw = claim.current
        if raw is None:
            raise BadMessage(f"unknown task id {event.task_id}: no such task document")
        if raw.get("error_type") == InvalidTaskDocument.error_type:
            # Quarantined earlier (by the reconciler, or by an earlier delivery): still an unusable event.
            raise BadMessage(f"{InvalidTaskDocument.error_type}: {raw.get('error')}")
        await self._unclaimable(await self._valid(raw))

    async def process(self, task: TaskDoc) -> None:
        """Claim and run `task` (tests and tools; the consumer goes through `handle`)."""
        raw = await self.store.claim_raw(task.id, self.worker_id, self.lease_s, self._types)
        if raw is None:
            await self._unclaimable(task)
            return
        claimed = await self._valid(raw)
        with task_attempt(task_id=claimed.id, world_id=claimed.world_id, task_type=claimed.type,
                          attempt=claimed.attempt_count):
            await self._run_claimed(claimed)

    async def _valid(self, raw: Document) -> TaskDoc:
        """The document as a TaskDoc; a malformed one is quarantined and its event dead-lettered."""
        try:
            return parse_task(raw)
        except InvalidTaskDocument as exc:
            await self.quarantine(raw, str(exc))
            raise BadMessage(f"{exc.error_type}: {exc}") from None

    async def quarantine(self, raw: Document, reason: str) -> bool:
        """Fail a malformed task document (the reconciler calls this too); its world is recounted."""
        if not await self.store.quarantine(raw, reason):
            return False
        log.error("task quarantined", task_id=str(raw.get("_id")), error_type=InvalidTaskDocument.error_type,
                  error=reason)
        metrics.task_finished(raw.get("type"), "quarantined")
        world_id = raw.get("world_id")
        if isinstance(world_id, str):
            await self._recount(world_id)
        return True

    async def _unclaimable(self, task: TaskDoc) -> None:
        """A valid task this worker could not claim: of a type it does not know, finished, not due yet, or
        running elsewhere."""
        if not self.registry.knows(task.type):
            reason = f"unknown task type {task.type[:64]!r}"
            if await self.store.fail_unclaimed(task.id, f"{UnknownTaskType.error_type}: {reason}",
                                               UnknownTaskType.error_type):
                metrics.task_finished(task.type, "failed")
                await self._recount(task.world_id)
            raise BadMessage(reason)  # logged once, by the consumer, with the dead letter
        if task.status in TERMINAL_VALUES:
            log.info("duplicate event skipped: task already terminal", task_id=task.id, status=task.status)
            return
        now = utcnow()
        if task.status == TaskStatus.PENDING.value and task.not_before and task.not_before > now:
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
                                                       utcnow(), task.type)
            await self._on_failure(task, error, policy)
            return
        if policy.opens_world:
            await self.progress.open_world(task.world_id, job.world_opening(params), task.type)
        else:
            status, reason = await self._world_status(task.world_id)
            if status == "failed":
                # The world was cancelled (or failed) while this task waited: it must not add content.
                why = f"world is failed: {reason or 'a world-level step failed'}"
                if await self.store.cancel_claimed(task, self.worker_id, why):
                    log.info("task cancelled: its world already failed", reason=why)
                    attempt_outcome("cancelled")
                    await self._record(task.world_id, failed=task.type)
                return
        log.info("task started")
        lost = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(task, lost))
        ctx = self._new_context(task=task, worker_id=self.worker_id, max_attempts=policy.max_attempts,
                                steps=self.store, is_cancelled=lost.is_set)
        try:
            with working_as(WorkClass(world=task.world_id, priority=policy.priority)):
                async with asyncio.timeout(policy.timeout_s):
                    result = await job.run(ctx, params)
        except asyncio.CancelledError:
            log.warning("task interrupted; its lease will expire and it will be re-run")
            raise
        except LeaseLost as exc:
            log.warning("task abandoned", reason=str(exc))
            return
        except TimeoutError as exc:
            if lost.is_set():
                log.warning("task abandoned", reason="lease lost")
                return
            timeout = TimeoutError(f"attempt exceeded the {policy.timeout_s:g}s timeout of {task.type}")
            timeout.__cause__ = exc
            await self._on_failure(task, timeout, policy)
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
        log.info("task completed", children=len(docs), children_new=sum(inserted.values()))
        attempt_outcome("completed")
        await self._record(task.world_id, inserted=inserted, completed=task.type)
        # All at once: the producer sends them in one batch, rather than one acknowledged round trip each
        # before the next (a batch's last child, often the one that continues its chain, waited ~0.1 s).
        await asyncio.gather(*(self._publish(doc["_id"], doc["type"], doc["world_id"]) for doc in docs))

    async def _on_failure(self, task: TaskDoc, exc: BaseException, policy: JobPolicy) -> None:
        max_attempts = policy.max_attempts
        decision = self.policy.decide(exc, task.attempt_count, max_attempts, task.free_retries)
        message = f"{decision.error_type}: {exc}"[:2000] if str(exc) else decision.error_type
        if decision.retry:
            not_before = utcnow() + timedelta(seconds=decision.delay_s)
            if not await self.store.schedule_retry(task, self.worker_id, message, decision.error_type, not_before,
                                                   spends_attempt=decision.spends_attempt):
                log.warning("lost the lease before scheduling a retry")
                return
            log.warning("task failed, will retry", error_type=decision.error_type, error=message,
                        retry_in_s=round(decision.delay_s, 2), max_attempts=max_attempts,
                        attempt_spent=decision.spends_attempt)
            attempt_outcome("retrying", decision.error_type)
            self._schedule_publish(task, decision.delay_s)
            event_type = "task_retrying"
        else:
            if not await self.store.fail(task, self.worker_id, message, decision.error_type):
                log.warning("lost the lease before failing the task")
                return
            attempt_outcome("failed", decision.error_type)
            if decision.error_type == BudgetExceeded.error_type:
                await self.progress.status.mark_budget_exceeded(task.world_id, message)
            log.error("task failed", error_type=decision.error_type, error=message,
                      retryable=decision.retryable, max_attempts=max_attempts,
                      exc_info=not isinstance(exc, WorkerError | ValidationError | TimeoutError))
            event_type = "task_failed"
        await self._publish_progress({
            "event_type": event_type, "task_id": task.id, "task_type": task.type, "world_id": task.world_id,
            "error_type": decision.error_type, "error_message": message, "retry_possible": decision.retry,
            "attempt": task.attempt_count, "max_attempts": max_attempts,
        })
        if not decision.retry:
            await self._record(task.world_id, failed=task.type)

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

    # --- world progress --------------------------------------------------------------------------------
    async def _record(self, world_id: str, **transition: Any) -> None:
        state = await self.progress.record(world_id, **transition)
        if state is not None:
            self._remember_world(world_id, state)
            if state.finished is not None:
                metrics.world_finished(state.finished)
                await self._publish_progress({"event_type": f"world_{state.finished}", "world_id": world_id})

    async def _recount(self, world_id: str) -> None:
        finished = await self.progress.recount(world_id)
        if finished is not None:
            metrics.world_finished(finished)
            self._worlds.pop(world_id, None)
            await self._publish_progress({"event_type": f"world_{finished}", "world_id": world_id})

    async def refresh_world(self, world_id: str) -> None:
        """Recount a world exactly (the reconciler, for worlds that stopped moving)."""
        await self._recount(world_id)

    def _remember_world(self, world_id: str, state: WorldState) -> None:
        self._worlds[world_id] = (time.monotonic(), state.status, state.failure_reason)
        self._worlds.move_to_end(world_id)
        while len(self._worlds) > WORLD_CACHE_SIZE:
            self._worlds.popitem(last=False)

    async def _world_status(self, world_id: str) -> tuple[str | None, str | None]:
        """(status, failure_reason) of a world, read at most every WORLD_CACHE_S per world by this process
        (every progress update of the world refreshes it for free)."""
        cached = self._worlds.get(world_id)
        if cached is not None and time.monotonic() - cached[0] < WORLD_CACHE_S and cached[1] != "failed":
            return cached[1], cached[2]  # a cached "failed" is read again: an operator may have retried the world
        doc = await self.progress.status.get_state(world_id)
        if doc is None:
            return None, None
        state = WorldState(status=str(doc.get("status")), failure_reason=doc.get("failure_reason"))
        self._remember_world(world_id, state)
        return state.status, state.failure_reason

    # --- helpers ------------------------------------------------------------------------------------------
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


__all__ = ["Engine", "Publisher"]
