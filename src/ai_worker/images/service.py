"""The image service: one provider behind a semaphore, with a history record per generation attempt.

Transient failures (429, 5xx, timeouts, an unusable image) are retried inside the call with backoff and
jitter (`ProviderRetry`, PROVIDER_MAX_RETRIES); every attempt is its own history record, `attempt`
numbered from 1. The semaphore is not held while waiting to retry."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING

import structlog

from ai_worker.errors import WorkerError
from ai_worker.images.base import GeneratedImage, ImageProvider
from ai_worker.images.offline import OfflineImageProvider
from ai_worker.images.openrouter import OpenRouterImageProvider
from ai_worker.llm.budget import CallBudget, Unlimited
from ai_worker.llm.history import ApiRequestRecord, CallContext, Recorder
from ai_worker.llm.http_errors import status_of
from ai_worker.llm.retrying import ProviderRetry

if TYPE_CHECKING:
    from ai_worker.config import Settings

log = structlog.get_logger(__name__)


class ImageService:
    def __init__(
        self,
        provider: ImageProvider,
        max_concurrency: int,
        recorder: Recorder,
        retry: ProviderRetry | None = None,
        budget: CallBudget | None = None,
        price_usd: float = 0.0,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self._budget: CallBudget = budget if budget is not None else Unlimited()
        self._price = 0.0 if provider.name == "offline" else price_usd
        self.provider = provider
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._recorder = recorder
        self._retry = retry if retry is not None else ProviderRetry()

    @classmethod
    def from_settings(cls, settings: Settings, recorder: Recorder, budget: CallBudget | None = None) -> ImageService:
        provider: ImageProvider
        if settings.image_provider == "offline":
            provider = OfflineImageProvider()
        else:
            provider = OpenRouterImageProvider(
                base_url=settings.image_base_url or settings.llm_base_url,
                api_key=settings.openrouter_api_key,
                model=settings.image_model,
                timeout_s=settings.image_timeout_s,
                send_openrouter_extras=settings.talks_to_openrouter,
            )
        return cls(provider, settings.max_concurrent_image_requests, recorder, ProviderRetry.from_settings(settings),
                   budget=budget, price_usd=settings.image_price_usd)

    async def aclose(self) -> None:
        closer = getattr(self.provider, "aclose", None)
        if closer is not None:
            await closer()

    async def generate(self, prompt: str, width: int, height: int, call: CallContext) -> GeneratedImage:
        """Generate one image, retrying transient failures; raises the last error when they run out."""
        attempt = 0
        async for retry in self._retry.retrying():
            with retry:
                attempt += 1
                return await self._paid_attempt(prompt, width, height, call, attempt)
        raise AssertionError("unreachable: tenacity either returns or re-raises")  # pragma: no cover

    async def _paid_attempt(
        self, prompt: str, width: int, height: int, call: CallContext, attempt: int
    ) -> GeneratedImage:
        """Reserve the image price against the budgets, generate, settle to the real cost (refunded on
        failure)."""
        reservation = await self._budget.reserve(call, "image", self._price)
        spent = 0.0
        try:
            image = await self._attempt(prompt, width, height, call, attempt)
            spent = image.cost
            return image
        finally:
            await self._budget.settle(reservation, spent)

    async def _attempt(
        self, prompt: str, width: int, height: int, call: CallContext, attempt: int
    ) -> GeneratedImage:
        """One provider request, recorded in the history (failed ones too) and logged."""
        record = ApiRequestRecord(
            api_type="image_generation", task_id=call.task_id, world_id=call.world_id,
            request_type=call.request_type,
            request_data={"prompt": prompt, "width": width, "height": height, "model": self.provider.model},
            duration_ms=0, model=self.provider.model, provider=self.provider.name, attempt=attempt,
            task_attempt=call.attempt,
        )
        async with self._semaphore:
            started = time.monotonic()
            try:
                image = await self.provider.generate(prompt, width, height)
                if image.cost == 0 and self._price:  # no cost from the provider: use the configured price
                    image = dataclasses.replace(image, cost=self._price)
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
        record.model, record.provider, record.cost = image.model, image.provider, image.cost
        record.response_data = {"width": image.width, "height": image.height, "bytes": len(image.data),
                                "content_type": image.content_type}
        await self._record(record)
        log.info("image_generated", model=image.model, provider=image.provider, request_type=call.request_type,
                 task_id=call.task_id, width=image.width, height=image.height, bytes=len(image.data),
                 cost=image.cost, duration_ms=record.duration_ms)
        return image

    async def _record(self, record: ApiRequestRecord) -> None:
        try:
            await self._recorder.record(record)
        except Exception:  # history is best effort: never fail a paid, successful generation over it
            log.exception("image_record_failed", request_type=record.request_type, task_id=record.task_id)
