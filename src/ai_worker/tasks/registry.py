"""Jobs and the job factory. A job is one task type: its input model (`Params`), its `run`, and its policy as
class attributes, which the engine reads; the engine knows no job by name.

Policy a job declares (defaults in brackets):
- `max_attempts` [2]: claims before a retryable failure becomes final (TASK_MAX_ATTEMPTS overrides);
- `timeout_s` [300]: the longest one attempt may run; past it the attempt is cancelled and recorded as a
  `timeout` (retryable) (TASK_TIMEOUTS_S overrides);
- `stage`: which of the world's stages (world_generation_status `stages`) its tasks belong to;
- `world_level` [False]: a permanent failure fails the whole world;
- `priority` [0]: when provider or task slots are contended, higher runs first (work that unlocks more work);
- `pool` [""]: the provider slots its tasks mostly wait for ("llm" or "image"); a worker runs at most twice
  that pool's slots of such tasks at once, so they never hold every task slot while the other pool idles;
- `produces` [None]: "users" or "posts" when one completed task is one character / post made;
- `opens_world` [False]: the job that starts a world; it declares the world's shape with `world_opening`;
- `predict(plan)`: how many tasks of this type a world of that shape has, and their LLM calls and images.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel

from ai_worker.errors import UnknownTaskType
from ai_worker.worlds.plan import Prediction, WorldOpening, WorldPlan
from ai_worker.worlds.status import STAGES

if TYPE_CHECKING:
    from ai_worker.tasks.context import TaskContext

P = TypeVar("P", bound=BaseModel)
C = TypeVar("C", bound="TaskContext")

Produces = Literal["users", "posts"]
Pool = Literal["", "llm", "image"]
JOB_STAGES = STAGES[:-1]  # "finishing" is the world's own end, no task belongs to it


class Job(ABC, Generic[P, C]):
    """One task type. Subclasses set `task_type`, `Params`, `stage` (and any other policy) and implement `run`."""

    task_type: ClassVar[str]
    Params: type[P]
    stage: ClassVar[str]
    max_attempts: ClassVar[int] = 2
    timeout_s: ClassVar[float] = 300.0
    world_level: ClassVar[bool] = False
    priority: ClassVar[int] = 0
    pool: ClassVar[Pool] = ""
    produces: ClassVar[Produces | None] = None
    opens_world: ClassVar[bool] = False

    @classmethod
    def predict(cls, plan: WorldPlan) -> Prediction:
        """This type's share of a world of shape `plan` (tasks, LLM calls, images); O(1)."""
        return Prediction()

    def world_opening(self, params: P) -> WorldOpening:
        """For the job that opens a world (`opens_world`): the world's shape from its validated parameters."""
        raise NotImplementedError(f"{type(self).__name__} does not open worlds")

    @abstractmethod
    async def run(self, ctx: C, params: P) -> dict[str, Any]:
        """Do the work through ctx; return the task's result. Declare children with ctx.spawn."""


@dataclass(frozen=True)
class JobPolicy:
    """A job's policy with the operator's overrides applied."""

    task_type: str
    stage: str
    max_attempts: int
    timeout_s: float
    world_level: bool
    priority: int
    pool: Pool
    produces: Produces | None
    opens_world: bool


class JobRegistry:
    def __init__(self, *, max_attempts: Mapping[str, int] | None = None,
                 timeouts_s: Mapping[str, float] | None = None) -> None:
        self._jobs: dict[str, type[Job[Any, Any]]] = {}
        self._policies: dict[str, JobPolicy] = {}
        self._max_attempts = dict(max_attempts or {})
        self._timeouts = dict(timeouts_s or {})

    def register(self, job: type[Job[Any, Any]]) -> type[Job[Any, Any]]:
        task_type = str(job.task_type)
        if task_type in self._jobs:
            raise ValueError(f"job for {task_type} registered twice")
        stage = getattr(job, "stage", None)
        if stage not in JOB_STAGES:
            raise ValueError(f"{job.__name__}.stage must be one of {list(JOB_STAGES)}, not {stage!r}")
        if job.max_attempts < 1 or job.timeout_s <= 0:
            raise ValueError(f"{job.__name__}: max_attempts must be >= 1 and timeout_s > 0")
        self._jobs[task_type] = job
        self._policies[task_type] = JobPolicy(
            task_type=task_type, stage=stage, max_attempts=max(1, self._max_attempts.get(task_type, job.max_attempts)),
            timeout_s=float(self._timeouts.get(task_type, job.timeout_s)), world_level=job.world_level,
            priority=job.priority, pool=job.pool, produces=job.produces, opens_world=job.opens_world)
        return job

    def check_overrides(self) -> None:
        """Overrides must name registered types (a typo would silently do nothing)."""
        unknown = sorted((set(self._max_attempts) | set(self._timeouts)) - set(self._jobs))
        if unknown:
            raise ValueError(f"unknown task type(s) {unknown}; known: {self.types()}")

    def knows(self, task_type: str) -> bool:
        return task_type in self._jobs

    def create(self, task_type: str) -> Job[Any, Any]:
        try:
            return self._jobs[task_type]()
        except KeyError:
            raise UnknownTaskType(f"unknown task type {task_type!r}") from None

    def policy(self, task_type: str) -> JobPolicy:
        try:
            return self._policies[task_type]
        except KeyError:
            raise UnknownTaskType(f"unknown task type {task_type!r}") from None

    def policies(self) -> Iterator[JobPolicy]:
        return iter(self._policies.values())

    def types(self) -> list[str]:
        return sorted(self._jobs)

    def predict(self, plan: WorldPlan) -> Prediction:
        """The whole world's prediction: the sum of every job's share."""
        total = Prediction()
        for job in self._jobs.values():
            total = total + job.predict(plan)
        return total
