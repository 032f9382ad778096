"""What a job sees: the engine's `TaskContext` (its task, memoised steps, children, cancellation) plus the
providers it calls, each bound to the task for accounting: the LLM, images with the Media upload flow,
the platform's services, prompt templates and the world's description."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from ai_worker.content.prompts import PromptLibrary
from ai_worker.content.schemas import WorldDescription
from ai_worker.errors import PermanentError
from ai_worker.images.enhance import PromptEnhancer
from ai_worker.images.service import ImageService
from ai_worker.images.upload import MediaUploader, UploadedMedia
from ai_worker.llm.client import LLMClient, Prompt
from ai_worker.platform.clients import MediaKind, PlatformClients
from ai_worker.providers.history import CallContext
from ai_worker.tasks import registry
from ai_worker.tasks.context import TaskContext
from ai_worker.worlds.parameters import WorldParametersStore

M = TypeVar("M", bound=BaseModel)
P = TypeVar("P", bound=BaseModel)


@dataclass
class Services:
    """Provider and platform handles shared by every job (built once by the app)."""

    llm: LLMClient
    images: ImageService
    media: MediaUploader
    platform: PlatformClients
    prompts: PromptLibrary
    worlds: WorldParametersStore
    enhance: PromptEnhancer | None = None  # IMAGE_PROMPT_ENHANCE


class JobContext(TaskContext):
    def __init__(self, *, services: Services, **task: Any) -> None:
        super().__init__(**task)
        self.services = services
        self._world: WorldDescription | None = None

    @classmethod
    def factory(cls, services: Services) -> Callable[..., JobContext]:
        """The engine's context factory for these services."""

        def build(**task: Any) -> JobContext:
            return cls(services=services, **task)

        return build

    def call(self, request_type: str) -> CallContext:
        """Who a provider or platform call is made for (recorded in the request history)."""
        return CallContext(task_id=self.task.id, world_id=self.task.world_id, request_type=request_type,
                           attempt=self.attempt)

    # --- providers ------------------------------------------------------------------------------
    async def llm(self, step: str, prompt: Prompt, schema: type[M]) -> M:
        self.check_alive()
        result = await self.services.llm.structured(prompt, schema, self.call(step), step=step)
        return result.value

    async def image_upload(
        self, *, step: str, prompt: str, width: int, height: int, filename: str, media_type: MediaKind,
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

    def prompt(self, template: str, /, **values: Any) -> Prompt:
        """Render `prompts/<template>.md` with `values` (any placeholder name, `template` included)."""
        return self.services.prompts.render(template, **values)

    @property
    def platform(self) -> PlatformClients:
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


class Job(registry.Job[P, JobContext], Generic[P]):
    """A job of this worker: its `run` gets a `JobContext`. See `tasks.registry.Job` for the policy."""


__all__ = ["Job", "JobContext", "Services"]
