"""The job factory: task type -> job class."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel

from ai_worker.errors import UnknownTaskType
from ai_worker.messaging.events import TaskType

if TYPE_CHECKING:
    from ai_worker.tasks.context import JobContext

P = TypeVar("P", bound=BaseModel)


class Job(ABC, Generic[P]):
    """One task type. Subclasses set `task_type`, `Params` and implement `run`."""

    task_type: ClassVar[TaskType]
    Params: type[P]

    @abstractmethod
    async def run(self, ctx: JobContext, params: P) -> dict[str, Any]:
        """Do the work through ctx; return the task's result. Declare children with ctx.spawn."""


class JobRegistry:
    def __init__(self) -> None:
        self._jobs: dict[str, type[Job[Any]]] = {}

    def register(self, job: type[Job[Any]]) -> type[Job[Any]]:
        if job.task_type.value in self._jobs:
            raise ValueError(f"job for {job.task_type} registered twice")
        self._jobs[job.task_type.value] = job
        return job

    def knows(self, task_type: str) -> bool:
        return task_type in self._jobs

    def create(self, task_type: str) -> Job[Any]:
        try:
            return self._jobs[task_type]()
        except KeyError:
            raise UnknownTaskType(f"unknown task type {task_type!r}") from None

    def types(self) -> list[str]:
        return sorted(self._jobs)
