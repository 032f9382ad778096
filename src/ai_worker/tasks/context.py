"""What a job sees: its task, its parameters, providers bound to the task for accounting, memoised
steps and child declarations. A job never writes task status, Kafka or counters: the engine does."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog
from pydantic import BaseModel, TypeAdapter

from ai_worker.content.schemas import WorldDescription
from ai_worker.errors import PermanentError, TaskCancelled
from ai_worker.images.upload import UploadedMedia
from ai_worker.messaging.events import TaskType
from ai_worker.providers.history import CallContext
from ai_worker.tasks.model import ChildTask, TaskDoc

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class LeaseLost(PermanentError):
    """The task was reclaimed by someone else (or cancelled); this worker must stop without effects."""

    error_type = "lease_lost"


class StepStore(Protocol):
    async def save_step(self, task: TaskDoc, worker_id: str, name: str, value: Any) -> bool: ...


class WorldStore(Protocol):
    async def load(self, world_id: str) -> WorldDescription | None: ...
    async def save(self, world_id: str, description: WorldDescription) -> None: ...


@dataclass
class Services:
    """Provider and platform handles shared by every job (built once by the app)."""

    llm: Any  # ai_worker.llm.client.LLMClient
    images: Any  # ai_worker.images.service.ImageService
    media: Any  # ai_worker.images.media.MediaUploader
    platform: Any  # ai_worker.platform.PlatformClients
    prompts: Any  # ai_worker.content.prompts.PromptLibrary
    worlds: WorldStore
    enhance: Any = None  # ai_worker.images.enhance.PromptEnhancer (IMAGE_PROMPT_ENHANCE), or None


class JobContext:
    def __init__(
        self,
        *,
        task: TaskDoc,
        worker_id: str,
        max_attempts: int,
        services: Services,
        steps: StepStore,
        is_cancelled: Callable[[], bool],
    ) -> None:
        self.task = task
        self.worker_id = worker_id
        self.max_attempts = max_attempts
        self.services = services
        self.children: list[ChildTask] = []
        self._steps = steps
        self._is_cancelled = is_cancelled
        self._world: WorldDescription | None = None
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

    def call(self, request_type: str) -> CallContext:
        return CallContext(task_id=self.task.id, world_id=self.task.world_id, request_type=request_type,
                           attempt=self.attempt)

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
        value = await fn()
        stored = adapter.dump_python(value, mode="json")
        if not await self._steps.save_step(self.task, self.worker_id, name, stored):
            raise LeaseLost(f"lost the lease while saving step {name!r}")
        self.task.steps[name] = stored
        return value

    # --- children -------------------------------------------------------------------------------
    def spawn(self, task_type: TaskType, key: str, params: BaseModel | dict[str, Any]) -> None:
        data = params.model_dump(mode="json") if isinstance(params, BaseModel) else dict(params)
        if any(c.key == key for c in self.children):
            raise ValueError(f"duplicate child key {key!r}")
        self.children.append(ChildTask(type=task_type, key=key, parameters=data))

    # --- providers ------------------------------------------------------------------------------
    async def llm(self, step: str, prompt: Any, schema: type[M]) -> M:
        self.check_alive()
        result = await self.services.llm.structured(prompt, schema, self.call(step), step=step)
        value: M = result.value
        return value

    async def image_upload(
        self, *, step: str, prompt: str, width: int, height: int, filename: str, media_type: Any,
        character_id: str = "",
    ) -> UploadedMedia:
        """Generate an image and deliver it through the Media presigned flow; returns the media id and URL."""
        self.check_alive()
        if self.services.enhance is not None:
            prompt = await self.services.enhance(prompt, width, height, self.call("image_prompt"))
            self.check_alive()
        image = await self.services.images.generate(prompt, width, height, self.call(step))
        self.check_alive()
        uploaded = await self.services.media.upload(
            world_id=self.world_id, character_id=character_id, filename=filename, media_type=media_type,
            image=image, call=self.call(f"{step}_upload"),
        )
        return UploadedMedia.model_validate(uploaded)

    def prompt(self, name: str, **values: Any) -> Any:
        return self.services.prompts.render(name, **values)

    @property
    def platform(self) -> Any:
        self.check_alive()
        return self.services.platform

    async def world(self) -> WorldDescription:
        if self._world is None:
            self._world = await self.services.worlds.load(self.world_id)
            if self._world is None:
                raise PermanentError(f"world_parameters for world {self.world_id} not found")
        return self._world

    async def save_world(self, description: WorldDescription) -> None:
        await self.services.worlds.save(self.world_id, description)
        self._world = description


__all__ = ["JobContext", "LeaseLost", "Services", "TaskCancelled"]
