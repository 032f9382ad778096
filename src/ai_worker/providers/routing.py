"""Which model one provider request goes to, and what it may take: fallback chain, per-model circuit
breakers, rate limits shared through MongoDB, and per-model concurrency. The LLM client and the image
service both route through a `ModelRouter`; one `attempt` is one HTTP request.

Choosing a model: the step's chain is the registry's primary then its fallbacks. An attempt goes to the
first model of the chain whose breaker lets it through and that has not already failed with a transient
error earlier in the same call (so a 5xx, timeout, 429 or unusable image moves the call's next attempt
to the next model at once, the way OpenRouter's own `models` fallback does). Models that already failed
in this call come last, in chain order, so they are tried again when nothing else is available. When
every breaker is open the attempt fails with `ProviderUnavailable` (retryable) without a request; it
carries the earliest next probe time (`retry_after_s`) and `spends_attempt=False`, as does a
`RateLimited` from our own limiter (a wait longer than its maximum), so the task waits for the provider
without using up its attempts.

Breakers count 5xx, connection errors and timeouts (`MODEL_FAILURES`); a 429 does not (it slows the
model's shared rate-limit bucket instead: `penalize`), nor do permanent errors or a reply that did not
fit the schema, nor a refusal of the structured-output mode (`StructuredOutputUnsupported`, a
ProviderRejected: the LLM client switches the model's mode and re-sends). The request records the model
that served it, the model the step asked for, and whether that was a fallback.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypeVar

import structlog

from ai_worker.errors import ProviderTimeout, ProviderUnavailable, RateLimited
from ai_worker.providers.breaker import BreakerBoard
from ai_worker.providers.ratelimit import NoRateLimit, Permit, RateLimiter
from ai_worker.providers.registry import IMAGE_STEPS, LLM_STEPS, ModelKind, ModelRegistry, ResolvedModel
from ai_worker.providers.retrying import RETRYABLE_IN_CALL
from ai_worker.scheduling import FairSlots

if TYPE_CHECKING:
    from ai_worker.config import Settings

T = TypeVar("T")

log = structlog.get_logger(__name__)

# Errors that say the model is unwell (not the request): they count against its circuit breaker.
MODEL_FAILURES: tuple[type[BaseException], ...] = (ProviderUnavailable, ProviderTimeout)


DEFAULT_SLOTS: dict[ModelKind, int] = {"llm": 8, "image": 4}


@dataclass(frozen=True)
class ProviderSlots:
    """Provider requests in flight per kind in one worker process, and which kinds were set explicitly.

    Precedence (the environment wins over the file, as everywhere else): MAX_CONCURRENT_LLM_REQUESTS /
    MAX_CONCURRENT_IMAGE_REQUESTS, when set, are the process's slots for that kind and replace the
    registry's per-model `max_concurrent` of that kind; when unset, the slots of a kind are the largest
    `max_concurrent` among the models its steps use (primaries and fallbacks), each model still held to its
    own (default 8 for LLM, 4 for images when no model sets one)."""

    llm: int
    image: int
    explicit: frozenset[ModelKind] = frozenset()

    def of(self, kind: ModelKind) -> int:
        return self.llm if kind == "llm" else self.image

    def as_mapping(self) -> dict[ModelKind, int]:
        return {"llm": self.llm, "image": self.image}


def provider_slots(settings: Settings) -> ProviderSlots:
    registry = settings.models

    def from_registry(kind: ModelKind, steps: tuple[str, ...]) -> int:
        caps = [m.max_concurrent for step in steps for m in registry.chain(step, kind) if m.max_concurrent]
        return max(caps) if caps else DEFAULT_SLOTS[kind]

    llm, image = settings.max_concurrent_llm_requests, settings.max_concurrent_image_requests
    explicit = frozenset(k for k, v in (("llm", llm), ("image", image)) if v)
    return ProviderSlots(llm=llm or from_registry("llm", LLM_STEPS), image=image or from_registry("image", IMAGE_STEPS),
                         explicit=explicit)  # type: ignore[arg-type]


def concurrency(settings: Settings) -> ProviderSlots:
    """The effective provider slots of `settings` (see ProviderSlots)."""
    return provider_slots(settings)


class _Hold:
    """The concurrency slots one request holds. Released once: when the provider has answered
    (`Route.answered`), or at the latest when the attempt ends."""

    def __init__(self) -> None:
        self._releases: list[Callable[[], None]] = []

    def add(self, release: Callable[[], None]) -> None:
        self._releases.append(release)

    def release(self) -> None:
        releases, self._releases = self._releases, []
        for release in reversed(releases):
            release()


@dataclass(frozen=True)
class Route:
    model: ResolvedModel
    requested: ResolvedModel
    hold: _Hold | None = field(default=None, compare=False, repr=False)

    def answered(self) -> None:
        """The provider has answered (or the request failed): give its concurrency slots to the next
        request now. Recording the call and settling its cost need no slot, and a slot held through them
        idles the provider for their database round trips."""
        if self.hold is not None:
            self.hold.release()

    @property
    def fallback(self) -> bool:
        return self.model.id != self.requested.id


class ModelRouter:
    def __init__(
        self,
        registry: ModelRegistry,
        *,
        limiter: RateLimiter | None = None,
        breakers: BreakerBoard | None = None,
        concurrency: Mapping[ModelKind, int] | ProviderSlots | None = None,
    ) -> None:
        self.registry = registry
        self.limiter: RateLimiter = limiter if limiter is not None else NoRateLimit()
        self.breakers = breakers if breakers is not None else BreakerBoard()
        self._model_slots: dict[str, FairSlots] = {}
        if isinstance(concurrency, ProviderSlots):
            limits: dict[ModelKind, int] = concurrency.as_mapping()
            self._explicit: frozenset[ModelKind] = concurrency.explicit
        else:
            limits = {**DEFAULT_SLOTS, **(concurrency or {})}
            self._explicit = frozenset()
        if min(limits.values()) < 1:
            raise ValueError("concurrency limits must be at least 1")
        # Slots are handed out fair by world, then by the job's priority (ai_worker.scheduling).
        self.slots: dict[ModelKind, FairSlots] = {kind: FairSlots(n, f"{kind} slots") for kind, n in limits.items()}

    def chain(self, step: str, kind: ModelKind) -> list[ResolvedModel]:
        return self.registry.chain(step, kind)

    def route(self, step: str, kind: ModelKind, failed: set[str]) -> Route:
        """The model for the next attempt of a call (see the module docstring); `failed` holds the ids that
        failed transiently earlier in the same call."""
        chain = self.chain(step, kind)
        ordered = [m for m in chain if m.id not in failed] + [m for m in chain if m.id in failed]
        for model in ordered:
            if self.breakers.get(model.provider, model.name).allow():
                if model.id != chain[0].id:
                    log.info("model_fallback", step=step, requested=chain[0].id, model=model.id)
                return Route(model=model, requested=chain[0])
        wait = min(self.breakers.get(m.provider, m.name).retry_after_s() for m in chain)
        # No request was made: the task should wait for the next probe without spending an attempt.
        raise ProviderUnavailable(
            f"circuit open for every model of step {step} ({', '.join(m.id for m in chain)}); "
            f"next probe in {wait:.1f}s", retry_after_s=wait or None, spends_attempt=False)

    def _model_semaphore(self, model: ResolvedModel) -> FairSlots | None:
        """The model's own `max_concurrent`, unless an explicit MAX_CONCURRENT_* setting replaces it."""
        if not model.max_concurrent or model.kind in self._explicit:
            return None
        slots = self._model_slots.get(model.id)
        if slots is None:
            slots = self._model_slots[model.id] = FairSlots(model.max_concurrent, model.id)
        return slots

    async def _take_slots(self, model: ResolvedModel) -> _Hold:
        """This process's slot for the model's kind, then the model's own."""
        hold = _Hold()
        try:
            for slots in (self.slots[model.kind], self._model_semaphore(model)):
                if slots is not None:
                    held = await slots.acquire()
                    hold.add(functools.partial(slots.release, held))
        except BaseException:
            hold.release()
            raise
        return hold

    async def attempt(
        self,
        step: str,
        kind: ModelKind,
        failed: set[str],
        fn: Callable[[Route], Awaitable[T]],
        *,
        tokens: Callable[[ResolvedModel], int] = lambda _m: 0,
        used_tokens: Callable[[T], int] = lambda _r: 0,
    ) -> T:
        """One request: route it, take the model's rate-limit permit and concurrency slot, run `fn`, and
        report the outcome to the breaker and the limiter."""
        route = self.route(step, kind, failed)
        try:
            return await self._run(route, fn, tokens(route.model), used_tokens)
        except RETRYABLE_IN_CALL:
            failed.add(route.model.id)
            raise

    async def _run(
        self, route: Route, fn: Callable[[Route], Awaitable[T]], tokens: int, used_tokens: Callable[[T], int]
    ) -> T:
        """Slots first (this process's MAX_CONCURRENT_* for the kind, then the model's max_concurrent), then
        the shared rate-limit permit, then the request at once: a permit is never held while queueing, so
        requests reach the provider at the pace the permits were granted. The breaker hears one verdict:
        success, failure (MODEL_FAILURES), or none (`release`)."""
        model = route.model
        breaker = self.breakers.get(model.provider, model.name)
        verdict: bool | None = None
        try:
            hold = await self._take_slots(model)
            try:
                try:
                    permit = await self.limiter.acquire(model.id, model.limits, tokens)
                except RateLimited as exc:  # our own limiter refused to wait longer: no request was made
                    exc.spends_attempt = False
                    raise
                actual = 0
                try:
                    result = await fn(replace(route, hold=hold))
                    actual = used_tokens(result)
                    verdict = True
                    return result
                except RateLimited as exc:
                    await self._penalize(model, exc)
                    raise
                except MODEL_FAILURES:
                    verdict = False
                    raise
                finally:
                    hold.release()
                    await self._settle(permit, model, actual)
            finally:
                hold.release()
        finally:
            if verdict is True:
                breaker.record_success()
            elif verdict is False:
                breaker.record_failure()
            else:
                breaker.release()

    async def _settle(self, permit: Permit, model: ResolvedModel, actual_tokens: int) -> None:
        try:
            await self.limiter.settle(permit, model.limits, actual_tokens)
        except Exception as exc:  # the permit stays taken: conservative, never over the limit
            log.warning("rate_limit_settle_failed", model=model.id, error=str(exc))

    async def _penalize(self, model: ResolvedModel, exc: RateLimited) -> None:
        try:
            await self.limiter.penalize(model.id, exc.retry_after_s)
        except Exception as err:
            log.warning("rate_limit_penalize_failed", model=model.id, error=str(err))
