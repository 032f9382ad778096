"""What the engine gives a running job: its task, memoised steps, child declarations and the cancellation
check. A job never writes task status, Kafka or counters: the engine does. The providers a job calls are
added by `jobs.context.JobContext`, a subclass, so the engine depends on no provider."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog
from pydantic import BaseModel, TypeAdapter

from ai_worker.errors import PermanentError, TaskCancelled
from ai_worker.tasks.model import ChildTask, TaskDoc

if TYPE_CHECKING:
    from ai_worker.tasks.registry import Job

T = TypeVar("T")
P = TypeVar("P", bound=BaseModel)


class LeaseLost(PermanentError):
    """The task was reclaimed by someone else (or cancelled); this worker must stop without effects."""

    error_type = "lease_lost"


class StepStore(Protocol):
    async def save_step(self, task: TaskDoc, worker_id: str, name: str, value: Any) -> bool: ...
    async def still_owned(self, task: TaskDoc, worker_id: str) -> bool: ...


# A step starts only while the task is still this worker's: ownership is confirmed before a step unless it
# was confirmed (claim, or the previous step's save) less than this long ago.
CONFIRM_S = 0.25


class TaskContext:
    def __init__(
        self,
        *,
        task: TaskDoc,
        worker_id: str,
        max_attempts: int,
        steps: StepStore,
        is_cancelled: Callable[[], bool],
    ) -> None:
        self.task = task
        self.worker_id = worker_id
        self.max_attempts = max_attempts
        self.children: list[ChildTask] = []
        self._steps = steps
        self._is_cancelled = is_cancelled
        self._confirmed_at = time.monotonic()  # the claim itself
        self.log = structlog.get_logger("ai_worker.job")

    # --- identity -------------------------------------------------------------------------------
    @property
    def task_id(self) -> str:
        return self.task.id

    @property
    def world_id(self) -> str:
        return self.task.world_id

    @property
    def attempt(self) -> int:
        return self.task.attempt_count

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts

    def request_id(self, step: str) -> str:
        """Idempotency key for a platform create call: stable across retries of this task."""
        return hashlib.sha256(f"{self.task.id}:{step}".encode()).hexdigest()[:32]

    def check_alive(self) -> None:
        if self._is_cancelled():
            raise LeaseLost("task was cancelled or reclaimed; stopping without side effects")

    # --- memoised steps -------------------------------------------------------------------------
    async def step(self, name: str, fn: Callable[[], Awaitable[T]], kind: type[T]) -> T:
        """Run `fn` once per task: its JSON-able result is stored in the task document, and a retried
        task gets the stored value back instead of paying or creating again."""
        adapter: TypeAdapter[T] = TypeAdapter(kind)
        if name in self.task.steps:
            return adapter.validate_python(self.task.steps[name])
        self.check_alive()
        # Cancelled or reclaimed meanwhile? Then no new side effect may start (a step may create content).
        stale = time.monotonic() - self._confirmed_at > CONFIRM_S
        if stale and not await self._steps.still_owned(self.task, self.worker_id):
            raise LeaseLost(f"the task is no longer this worker's; step {name!r} not started")
        value = await fn()
        stored = adapter.dump_python(value, mode="json")
        if not await self._steps.save_step(self.task, self.worker_id, name, stored):
            raise LeaseLost(f"lost the lease while saving step {name!r}")
        self._confirmed_at = time.monotonic()
        self.task.steps[name] = stored
        return value

    # --- children -------------------------------------------------------------------------------
    def spawn(self, job: type[Job[P, Any]], key: str, params: P) -> None:
        """Declare a child task: `job`'s type with `params`, which must be that job's `Params` (mypy checks
        it; so does this call). `key` is unique among this task's children and makes the child's id."""
        if not isinstance(params, job.Params):
            raise TypeError(f"{job.__name__} takes {job.Params.__name__}, not {type(params).__name__}")
        if any(c.key == key for c in self.children):
            raise ValueError(f"duplicate child key {key!r}")
        self.children.append(ChildTask(type=str(job.task_type), key=key, parameters=params.model_dump(mode="json")))


ContextFactory = Callable[..., TaskContext]
"""Builds the context of one attempt from the keyword arguments of `TaskContext.__init__`."""

__all__ = ["ContextFactory", "LeaseLost", "StepStore", "TaskCancelled", "TaskContext"]
