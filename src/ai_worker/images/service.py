"""The image service: each generation routed to an image model (registry, fallbacks, breakers, shared rate
limits, and the MAX_CONCURRENT_IMAGE_REQUESTS slots: `ModelRouter`), with a history record per attempt.

Transient failures (429, 5xx, timeouts, an unusable image) are retried inside the call with backoff and
jitter (`ProviderRetry`, PROVIDER_MAX_RETRIES), the next attempt going to the step's fallback model when
there is one; every attempt is its own history record, `attempt` numbered from 1. The semaphore is not
held while waiting to retry."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from ai_worker.errors import WorkerError
from ai_worker.images.base import GeneratedImage, ImageProvider, Size
from ai_worker.images.offline import OfflineImageProvider
from ai_worker.images.openrouter import OpenRouterImageProvider
from ai_worker.images.runware import RunwareImageProvider
from ai_worker.providers.budget import CallBudget, Unlimited
from ai_worker.providers.history import ApiRequestRecord, CallContext, NoRecorder, Recorder
from ai_worker.providers.http_errors import status_of
from ai_worker.providers.registry import FlatDefaults, ModelRegistry, ResolvedModel
from ai_worker.providers.retrying import ProviderRetry
from ai_worker.providers.routing import ModelRouter, Route, concurrency

if TYPE_CHECKING:
    from ai_worker.config import Settings

log = structlog.get_logger(__name__)

ProviderFactory = Callable[[ResolvedModel], ImageProvider]


def provider_factory(timeout_s: float) -> ProviderFactory:
    """Build the provider client a registry model names (offline renderer, Runware, OpenAI-compatible)."""

    def build(model: ResolvedModel) -> ImageProvider:
        if model.provider_kind == "offline":
            return OfflineImageProvider()
        if model.provider_kind == "runware":
            return RunwareImageProvider(base_url=model.base_url or "", api_key=model.api_key, model=model.name,
                                        timeout_s=timeout_s)
        return OpenRouterImageProvider(base_url=model.base_url or "", api_key=model.api_key, model=model.name,
                                       timeout_s=timeout_s, send_openrouter_extras=model.openrouter_extras)

    return build


class ImageService:
    def __init__(
        self,
        router: ModelRouter,
        recorder: Recorder,
        *,
        providers: ProviderFactory,
        retry: ProviderRetry | None = None,
        budget: CallBudget | None = None,
    ) -> None:
        self.router = router
        self._factory = providers
        self._providers: dict[str, ImageProvider] = {}
        self._budget: CallBudget = budget if budget is not None else Unlimited()
        self._recorder = recorder
        self._retry = retry if retry is not None else ProviderRetry()

    @classmethod
    def from_settings(
        cls, settings: Settings, recorder: Recorder, budget: CallBudget | None = None,
        router: ModelRouter | None = None,
    ) -> ImageService:
        if router is None:
            router = ModelRouter(settings.models, concurrency=concurrency(settings))
        return cls(router, recorder, providers=provider_factory(settings.image_timeout_s),
                   retry=ProviderRetry.from_settings(settings), budget=budget)

    @classmethod
    def single(
        cls, provider: ImageProvider, max_concurrency: int = 4, recorder: Recorder | None = None,
        retry: ProviderRetry | None = None, budget: CallBudget | None = None, price_usd: float = 0.0,
    ) -> ImageService:
        """One provider for every image step (tools and tests)."""
        registry = ModelRegistry.single(
            base_url="", api_key=None, model=provider.model, kind="image",
            flat=FlatDefaults(price_per_image=price_usd),
            provider_kind="offline" if provider.name == "offline" else "openai")
        return cls(ModelRouter(registry, concurrency={"image": max_concurrency}),
                   recorder if recorder is not None else NoRecorder(),
                   providers=lambda _model: provider, retry=retry, budget=budget)

    def provider_for(self, model: ResolvedModel) -> ImageProvider:
        provider = self._providers.get(model.id)
        if provider is None:
            provider = self._providers[model.id] = self._factory(model)
        return provider

    @property
    def provider(self) -> ImageProvider:
        """The provider of the default image step's primary model."""
        return self.provider_for(self.router.registry.primary("post_image", "image"))

    async def aclose(self) -> None:
        for provider in {id(p): p for p in self._providers.values()}.values():
            closer = getattr(provider, "aclose", None)
            if closer is not None:
                await closer()

    async def generate(self, prompt: str, width: int, height: int, call: CallContext) -> GeneratedImage:
        """Generate one image for step `call.request_type`, retrying transient failures (on the fallback
        model when there is one); raises the last error when they run out."""
        attempt = 0
        failed: set[str] = set()
        async for retry in self._retry.retrying():
            with retry:
                attempt += 1
                number = attempt
                return await self.router.attempt(
                    call.request_type, "image", failed,
                    functools.partial(self._paid_attempt, prompt=prompt, width=width, height=height, call=call,
                                      attempt=number))
        raise AssertionError("unreachable: tenacity either returns or re-raises")  # pragma: no cover

    async def _paid_attempt(
        self, route: Route, prompt: str, width: int, height: int, call: CallContext, attempt: int
    ) -> GeneratedImage:
        """Reserve the image price against the budgets, generate, settle to the real cost (refunded on
        failure)."""
        source = route.model.source_size(call.request_type, width, height)
        reservation = await self._budget.reserve(call, "image", route.model.image_price(*source))
        spent, recorded = 0.0, False
        try:
            image = await self._attempt(route, prompt, width, height, source, call, attempt)
            spent, recorded = image.cost, True
            return image
        except Exception:
            recorded = True  # a failed generation is in the history too
            raise
        finally:
            await self._budget.settle(reservation, spent, counted=recorded)

    async def _attempt(
        self, route: Route, prompt: str, width: int, height: int, source: Size, call: CallContext, attempt: int
    ) -> GeneratedImage:
        """One provider request, recorded in the history (failed ones too) and logged. `source` is the size
        asked of the provider (the registry's `image_sizes` for the step); the image delivered is width x
        height either way."""
        model = route.model
        provider = self.provider_for(model)
        request_data: dict[str, object] = {"prompt": prompt, "width": width, "height": height, "model": provider.model}
        if source != (width, height):
            request_data.update(source_width=source[0], source_height=source[1])
        record = ApiRequestRecord(
            api_type="image_generation", task_id=call.task_id, world_id=call.world_id,
            request_type=call.request_type,
            request_data=request_data,
            duration_ms=0, model=model.id, requested_model=route.requested.id, fallback=route.fallback,
            provider=provider.name, attempt=attempt, task_attempt=call.attempt,
        )
        started = time.monotonic()
        try:
            try:
                if source == (width, height):
                    image = await provider.generate(prompt, width, height)
                else:
                    image = await provider.generate(prompt, width, height, source=source)
            finally:
                route.answered()  # the slot goes to the next request; recording it needs none
            price = model.image_price(*source)
            if image.cost == 0 and price:  # no cost from the provider: the registry's price
                image = dataclasses.replace(image, cost=price)
        except Exception as exc:
            record.error_type = exc.error_type if isinstance(exc, WorkerError) else "unexpected"
            record.error, record.status, record.status_code = str(exc), "error", status_of(exc)
            record.duration_ms = int((time.monotonic() - started) * 1000)
            await self._record(record)
            log.warning("image_generation_failed", model=record.model, request_type=call.request_type,
                        task_id=call.task_id, attempt=attempt, error_type=record.error_type,
                        error=record.error, duration_ms=record.duration_ms)
            raise
        record.duration_ms = int((time.monotonic() - started) * 1000)
        record.provider, record.cost = image.provider, image.cost
        record.response_data = {"width": image.width, "height": image.height, "bytes": len(image.data),
                                "content_type": image.content_type}
        await self._record(record)
        log.info("image_generated", model=model.id, fallback=route.fallback, provider=image.provider,
                 request_type=call.request_type, task_id=call.task_id, width=image.width, height=image.height,
                 bytes=len(image.data), cost=image.cost, duration_ms=record.duration_ms)
        return image

    async def _record(self, record: ApiRequestRecord) -> None:
        try:
            await self._recorder.record(record)
        except Exception:  # history is best effort: never fail a paid, successful generation over it
            log.exception("image_record_failed", request_type=record.request_type, task_id=record.task_id)
