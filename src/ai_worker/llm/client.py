"""OpenAI-compatible chat client for structured output.

One call of `structured` makes up to three asks: the first answer; when that answer was cut at the token
limit (`finish_reason: length`), one re-ask with a doubled max_tokens (within the model's ceiling) and an
instruction to be brief; when an answer is not valid JSON for the schema, one repair request that shows
the model its reply and the error. A reply is read leniently first (code fences, text around the object,
raw control characters in strings: llm/parsing.py), so a repair is asked only for a real problem.

Each request asks for structured output in the model's mode (llm/structured.py: json_schema, json_object
or prompt); a server that rejects the mode gets the next one at once ("auto"), without counting as an
outage. max_tokens is sized per step (the registry's STEP_MAX_TOKENS, the model's step_max_tokens and
ceiling, LLM_MAX_TOKENS), and the same figure is what the rate limits and budgets reserve. Each request is
retried on transient errors (429, 5xx, timeouts) up to PROVIDER_MAX_RETRIES times with backoff and
jitter (`ProviderRetry`); permanent errors are raised at once. Every HTTP attempt is recorded
(`api_requests_history`, `attempt` numbered from 1 within the call), failed ones included. A semaphore
in the router bounds the number of requests in flight (MAX_CONCURRENT_LLM_REQUESTS); it is not held while
waiting to retry. Each attempt is routed (`ModelRouter`): the step's model from the registry, or its fallback when
the model's breaker is open or it already failed in this call, within the model's shared rate limits.
"""

from __future__ import annotations

import functools
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import httpx
import structlog
from pydantic import BaseModel, ValidationError

from ai_worker.errors import InvalidOutput, OutputTruncated, ProviderRejected, StructuredOutputUnsupported, WorkerError
from ai_worker.llm.parsing import ReplyNotJSON, parse_json_reply
from ai_worker.llm.structured import FALLBACK_ORDER, Mode, ModeMemory, is_mode_rejection, messages_for, response_format
from ai_worker.providers.budget import CallBudget, Unlimited
from ai_worker.providers.history import ApiRequestRecord, CallContext, Recorder
from ai_worker.providers.http_errors import (
    attach_status,
    decode_json_body,
    error_for_body,
    error_for_status,
    error_for_transport,
    status_of,
)
from ai_worker.providers.registry import DEFAULT_LLM_MAX_TOKENS, LLM_STEPS, FlatDefaults, ModelRegistry, ResolvedModel
from ai_worker.providers.retrying import ProviderRetry
from ai_worker.providers.routing import ModelRouter, Route, concurrency

if TYPE_CHECKING:
    from ai_worker.config import Settings

T = TypeVar("T", bound=BaseModel)

log = structlog.get_logger(__name__)

MAX_RECORDED_CONTENT = 20_000
_MAX_ERROR_IN_REPAIR = 600
_FENCE = re.compile(r"^```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)
TRUNCATION_BOOST = 2  # a reply cut at the token limit is asked again with this many times the tokens


class Prompt(BaseModel):
    system: str
    user: str


class LLMUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: LLMUsage) -> LLMUsage:
        return LLMUsage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
            cost=self.cost + other.cost,
        )

    @classmethod
    def from_response(cls, body: Mapping[str, Any]) -> LLMUsage:
        usage = body.get("usage")
        if not isinstance(usage, Mapping):
            return cls()
        prompt_details = usage.get("prompt_tokens_details")
        completion_details = usage.get("completion_tokens_details")
        return cls(
            prompt_tokens=_as_int(usage.get("prompt_tokens")),
            completion_tokens=_as_int(usage.get("completion_tokens")),
            cached_tokens=_as_int(prompt_details.get("cached_tokens"))
            if isinstance(prompt_details, Mapping)
            else 0,
            reasoning_tokens=_as_int(completion_details.get("reasoning_tokens"))
            if isinstance(completion_details, Mapping)
            else 0,
            cost=_as_float(usage.get("cost")),
        )


@dataclass
class LLMResult(Generic[T]):
    value: T
    usage: LLMUsage
    model: str
    calls: int


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    return 0


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        return 0.0
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return 0.0
    return 0.0


def strip_fences(text: str) -> str:
    """Remove a surrounding Markdown code fence (```json ... ```), which some models add anyway."""
    stripped = text.strip()
    match = _FENCE.match(stripped)
    return match.group(1).strip() if match else stripped


def _describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


@dataclass
class _Attempt:
    """What one HTTP attempt produced: the raw text, and either a value or why it was unusable."""

    content: str
    usage: LLMUsage
    value: BaseModel | None
    problem: str | None
    model: str
    truncated: bool = False  # finish_reason "length" and no usable value
    max_tokens: int = 0


class LLMClient:
    def __init__(
        self,
        *,
        router: ModelRouter,
        recorder: Recorder,
        timeout_s: float = 120.0,
        http: httpx.AsyncClient | None = None,
        retry: ProviderRetry | None = None,
        budget: CallBudget | None = None,
    ) -> None:
        self.router = router
        self._budget: CallBudget = budget if budget is not None else Unlimited()
        self._timeout = httpx.Timeout(timeout_s, connect=10.0)
        self._recorder = recorder
        self._retry = retry if retry is not None else ProviderRetry()
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=self._timeout)
        self.modes = ModeMemory()

    @classmethod
    def from_settings(
        cls, settings: Settings, recorder: Recorder, budget: CallBudget | None = None,
        router: ModelRouter | None = None,
    ) -> LLMClient:
        return cls(
            router=router if router is not None else ModelRouter(settings.models, concurrency=concurrency(settings)),
            recorder=recorder,
            timeout_s=settings.llm_timeout_s,
            retry=ProviderRetry.from_settings(settings),
            budget=budget,
        )

    @classmethod
    def single(
        cls,
        *,
        base_url: str,
        api_key: str | None,
        model: str,
        recorder: Recorder,
        overrides: Mapping[str, str] | None = None,
        openrouter_extras: bool | None = None,
        max_tokens: int | None = None,
        price_in_per_mtok: float = 0.0,
        price_out_per_mtok: float = 0.0,
        timeout_s: float = 120.0,
        max_concurrency: int = 8,
        http: httpx.AsyncClient | None = None,
        retry: ProviderRetry | None = None,
        budget: CallBudget | None = None,
        model_fields: Mapping[str, Any] | None = None,
    ) -> LLMClient:
        """A client for one OpenAI-compatible endpoint and model (tools and tests). `max_tokens`: one value
        for every request (default: sized per step); `model_fields`: more fields of the model's registry
        entry (structured_output, sampling, step_max_tokens)."""
        fields = dict(model_fields or {})
        if max_tokens is not None:
            fields.setdefault("max_tokens", max_tokens)
            fields.setdefault("step_max_tokens", dict.fromkeys(LLM_STEPS, max_tokens))
        registry = ModelRegistry.single(
            base_url=base_url, api_key=api_key, model=model, overrides=overrides, openrouter_extras=openrouter_extras,
            flat=FlatDefaults(price_in_per_mtok=price_in_per_mtok, price_out_per_mtok=price_out_per_mtok,
                              max_tokens=max_tokens or DEFAULT_LLM_MAX_TOKENS),
            model_fields=fields)
        return cls(router=ModelRouter(registry, concurrency={"llm": max_concurrency}), recorder=recorder,
                   timeout_s=timeout_s, http=http, retry=retry, budget=budget)

    def model_for(self, step: str) -> str:
        return self.router.registry.primary(step).id

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def structured(
        self, prompt: Prompt, schema: type[T], call: CallContext, *, step: str | None = None
    ) -> LLMResult[T]:
        """Ask for a JSON object valid for `schema`: a cut-off reply is asked again once with more room, an
        invalid one is repaired once; raise OutputTruncated / InvalidOutput when that fails too."""
        step = step or call.request_type
        messages: list[dict[str, str]] = [
            {"role": "system", "content": prompt.system},
            {"role": "user", "content": prompt.user},
        ]
        log.debug("llm_prompt", step=step, request_type=call.request_type, messages=messages)
        ask = _Ask(step=step, schema=schema, call=call, call_id=uuid.uuid4().hex[:12])

        first = await self._request(ask, messages, purpose="first", boost=1)
        usage = first.usage
        if first.value is not None:
            return self._result(first, schema, usage, ask)
        last, boost = first, 1
        if first.truncated:
            boost = TRUNCATION_BOOST
            log.warning("llm_output_truncated_asking_again", model=first.model, request_type=call.request_type,
                        task_id=call.task_id, max_tokens=first.max_tokens)
            messages = _briefer(messages, first.max_tokens)
            second = await self._request(ask, messages, purpose="truncated", boost=boost)
            usage = usage + second.usage
            if second.value is not None:
                return self._result(second, schema, usage, ask)
            if second.truncated:
                raise OutputTruncated(f"{schema.__name__} output cut at the token limit twice "
                                      f"(max_tokens {first.max_tokens}, then {second.max_tokens})")
            last = second

        log.warning(
            "llm_output_invalid_repairing",
            model=last.model,
            request_type=call.request_type,
            task_id=call.task_id,
            problem=last.problem,
        )
        repair = list(messages)
        if last.content:
            repair.append({"role": "assistant", "content": last.content})
        repair.append(
            {
                "role": "user",
                "content": (
                    f"Your previous reply was not valid: {last.problem}. "
                    "Reply again with only the corrected JSON object that matches the schema."
                ),
            }
        )
        fixed = await self._request(ask, repair, purpose="repair", boost=boost)
        usage = usage + fixed.usage
        if fixed.value is not None:
            return self._result(fixed, schema, usage, ask)
        if fixed.truncated:
            raise OutputTruncated(f"{schema.__name__} repair output cut at the token limit "
                                  f"(max_tokens {fixed.max_tokens}): {fixed.problem}")
        raise InvalidOutput(f"{schema.__name__} output still invalid after repair: {fixed.problem}")

    def _result(self, attempt: _Attempt, schema: type[T], usage: LLMUsage, ask: _Ask) -> LLMResult[T]:
        return LLMResult(value=self._typed(attempt.value, schema), usage=usage, model=attempt.model,
                         calls=ask.counter)

    async def _request(self, ask: _Ask, messages: list[dict[str, str]], *, purpose: str, boost: int) -> _Attempt:
        """One ask with in-call retries of transient errors (each attempt routed: a model that failed
        hands the next attempt to its fallback). A rejection of the structured-output mode switches the
        model to its next mode and re-sends at once (at most once per mode)."""
        failed: set[str] = set()
        async for retry in self._retry.retrying():
            with retry:
                for _ in FALLBACK_ORDER:
                    ask.counter += 1
                    number = ask.counter
                    try:
                        return await self.router.attempt(
                            ask.step, "llm", failed,
                            functools.partial(self._attempt, ask=ask, messages=messages, attempt=number,
                                              purpose=purpose, boost=boost),
                            tokens=lambda model: self.max_tokens_of(model, self._sent(model, messages, ask),
                                                                    self.request_max_tokens(model, ask.step, boost)),
                            used_tokens=lambda result: result.usage.total_tokens,
                        )
                    except StructuredOutputUnsupported as exc:
                        rejected = next((m for m in FALLBACK_ORDER if m == exc.mode), None)
                        if not exc.model_id or rejected is None:
                            raise
                        model = self.router.registry.model(exc.model_id)
                        if self.modes.demote(model, rejected, str(exc)) is None:
                            raise
                raise AssertionError("unreachable: every structured-output mode was tried")  # pragma: no cover
        raise AssertionError("unreachable: tenacity either returns or re-raises")  # pragma: no cover

    def _sent(self, model: ResolvedModel, messages: list[dict[str, str]], ask: _Ask) -> list[dict[str, str]]:
        return messages_for(self.modes.current(model), messages, ask.schema)

    @staticmethod
    def request_max_tokens(model: ResolvedModel, step: str, boost: int = 1) -> int:
        """max_tokens of a request: the step's size for the model (x `boost` after a cut-off reply), never
        above the model's ceiling."""
        return min(model.max_tokens_for(step) * max(1, boost), model.max_tokens)

    @staticmethod
    def _typed(value: BaseModel | None, schema: type[T]) -> T:
        if not isinstance(value, schema):  # pragma: no cover - _validate always returns schema instances
            raise InvalidOutput(f"expected {schema.__name__}, got {type(value).__name__}")
        return value

    @staticmethod
    def _payload(model: ResolvedModel, mode: Mode, messages: list[dict[str, str]], schema: type[BaseModel],
                 max_tokens: int) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": model.name,
            "messages": messages,
            "max_tokens": max_tokens,
        }
        fmt = response_format(mode, schema)
        if fmt is not None:
            payload["response_format"] = fmt
        for name, value in model.sampling:
            payload[name] = value
        if model.openrouter_extras:
            if fmt is not None:
                payload["provider"] = {"require_parameters": True}
            payload["usage"] = {"include": True}
        return payload

    @staticmethod
    def _headers(model: ResolvedModel) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if model.api_key:
            headers["Authorization"] = f"Bearer {model.api_key}"
        return headers

    @staticmethod
    def _validate(content: str, schema: type[BaseModel]) -> tuple[BaseModel | None, str | None, tuple[str, ...]]:
        """(value, problem, leniencies used): the reply read leniently, then checked against the schema."""
        try:
            parsed = parse_json_reply(content)
        except ReplyNotJSON as exc:
            return None, str(exc), ()
        try:
            return schema.model_validate(parsed.data), None, parsed.lenient
        except ValidationError as exc:
            detail = _describe_validation_error(exc)[:_MAX_ERROR_IN_REPAIR]
            return None, f"the JSON does not match the schema ({detail})", parsed.lenient

    @staticmethod
    def prompt_tokens_estimate(messages: list[dict[str, str]]) -> int:
        """Prompt tokens, over-estimated at 3 characters a token plus 16 a message."""
        return int(sum(len(m.get("content", "")) for m in messages) / 3) + 16 * len(messages)

    def max_tokens_of(self, model: ResolvedModel, messages: list[dict[str, str]], max_tokens: int) -> int:
        """The most tokens one request can use: taken from the model's token rate limits beforehand."""
        return self.prompt_tokens_estimate(messages) + max_tokens

    def max_cost(self, model: ResolvedModel, messages: list[dict[str, str]], max_tokens: int) -> float:
        """The most one request can cost: prompt estimate x input price + its max_tokens x output price.
        Reserved against the budgets before the request."""
        return self.prompt_tokens_estimate(messages) * model.price_in + max_tokens * model.price_out

    async def _attempt(
        self,
        route: Route,
        *,
        ask: _Ask,
        messages: list[dict[str, str]],
        attempt: int,
        purpose: str,
        boost: int,
    ) -> _Attempt:
        """One paid request: reserve its maximum cost, make it, settle to the real cost (a failed request
        is refunded: providers do not bill errors)."""
        model = route.model
        mode = self.modes.current(model)
        sent = messages_for(mode, messages, ask.schema)
        max_tokens = self.request_max_tokens(model, ask.step, boost)
        reservation = await self._budget.reserve(ask.call, "llm", self.max_cost(model, sent, max_tokens))
        spent, recorded = 0.0, False
        try:
            result = await self._attempt_unbudgeted(route, ask, sent, mode=mode, max_tokens=max_tokens,
                                                    attempt=attempt, purpose=purpose)
            spent, recorded = result.usage.cost, True
            return result
        except WorkerError:
            recorded = True  # a failed request is in the history too
            raise
        finally:
            await self._budget.settle(reservation, spent, counted=recorded)

    async def _attempt_unbudgeted(
        self,
        route: Route,
        ask: _Ask,
        messages: list[dict[str, str]],
        *,
        mode: Mode,
        max_tokens: int,
        attempt: int,
        purpose: str,
    ) -> _Attempt:
        """One HTTP request. Raises the classified error for transport/HTTP/provider failures (after
        recording it; a rejection of the structured-output mode becomes StructuredOutputUnsupported);
        returns an `_Attempt` whose `problem` is set when the output is unusable."""
        model, schema, call = route.model, ask.schema, ask.call
        payload = self._payload(model, mode, messages, schema, max_tokens)
        request_data: dict[str, Any] = {
            "model": model.name,
            "messages": messages,
            "max_tokens": max_tokens,
            "schema": schema.__name__,
            "structured_output": mode,
            "call_id": ask.call_id,
            "purpose": purpose,  # first | truncated (asked again after a cut-off reply) | repair
        }
        if model.sampling:
            request_data["sampling"] = dict(model.sampling)
        started = time.monotonic()
        status_code: int | None = None
        body: dict[str, Any] | None = None
        usage = LLMUsage()
        content = ""
        finish_reason: str | None = None
        lenient: tuple[str, ...] = ()
        value: BaseModel | None = None
        problem: str | None = None
        response_data: dict[str, Any] | None = None
        try:
            started = time.monotonic()
            try:
                response = await self._http.post(
                    _chat_url(model), json=payload, headers=self._headers(model), timeout=self._timeout
                )
            except httpx.HTTPError as exc:
                raise error_for_transport(exc) from exc
            finally:
                route.answered()  # the slot goes to the next request; validating and recording need none
            status_code = response.status_code
            http_error = error_for_status(response)
            if http_error is not None:
                raise http_error
            body = decode_json_body(response)
            usage = LLMUsage.from_response(body)
            if usage.cost == 0 and usage.total_tokens:  # no cost from the provider: price it ourselves
                usage.cost = usage.prompt_tokens * model.price_in + usage.completion_tokens * model.price_out
            body_error = error_for_body(body, status_code)
            if body_error is not None:
                raise body_error
            content, finish_reason = _first_message(body)
            response_data = {
                "content": content[:MAX_RECORDED_CONTENT],
                "finish_reason": finish_reason,
                "id": body.get("id"),
            }
            value, problem, lenient = self._validate(content, schema)
            if lenient:
                response_data["lenient"] = list(lenient)
            if problem is not None and finish_reason == "length":
                problem += f" (the reply was cut off at the token limit, max_tokens {max_tokens})"
        except WorkerError as exc:
            failure: WorkerError | None = exc
            if status_code is not None and status_of(exc) is None:
                attach_status(exc, status_code)
            if is_mode_rejection(exc, mode):
                failure = attach_status(StructuredOutputUnsupported(
                    f"the server rejected structured output mode {mode!r} of model {model.id!r}: {exc}",
                    model_id=model.id, mode=mode), status_of(exc))
            if body is not None and response_data is None:
                response_data = {"id": body.get("id"), "error": body.get("error")}
        else:
            failure = None
        truncated = value is None and finish_reason == "length"
        duration_ms = int((time.monotonic() - started) * 1000)
        invalid: WorkerError | None = None
        if failure is None and problem is not None:
            invalid = OutputTruncated(problem) if truncated else InvalidOutput(problem)
        await self._record(
            call,
            attempt=attempt,
            route=route,
            request_data=request_data,
            response_data=response_data,
            usage=usage,
            status_code=status_code,
            duration_ms=duration_ms,
            error=failure if failure is not None else invalid,
        )
        if failure is not None:
            log.warning("llm_call_failed", model=model.id, request_type=call.request_type, task_id=call.task_id,
                        attempt=attempt, status_code=status_code, error_type=failure.error_type,
                        error=str(failure), duration_ms=duration_ms, structured_output=mode)
            raise failure
        log.info("llm_call", model=model.id, fallback=route.fallback, request_type=call.request_type,
                 task_id=call.task_id, attempt=attempt, purpose=purpose, valid=problem is None,
                 finish_reason=finish_reason, lenient=list(lenient) or None, structured_output=mode,
                 max_tokens=max_tokens, prompt_tokens=usage.prompt_tokens,
                 completion_tokens=usage.completion_tokens, cost=usage.cost, duration_ms=duration_ms)
        log.debug("llm_reply", model=model.id, content=content[:MAX_RECORDED_CONTENT])
        return _Attempt(content=content, usage=usage, value=value, problem=problem, model=model.id,
                        truncated=truncated, max_tokens=max_tokens)

    async def _record(
        self,
        call: CallContext,
        *,
        attempt: int,
        route: Route,
        request_data: dict[str, Any],
        response_data: dict[str, Any] | None,
        usage: LLMUsage,
        status_code: int | None,
        duration_ms: int,
        error: WorkerError | None,
    ) -> None:
        record = ApiRequestRecord(
            api_type="llm",
            task_id=call.task_id,
            world_id=call.world_id,
            request_type=call.request_type,
            request_data=request_data,
            response_data=response_data,
            error=str(error) if error is not None else None,
            error_type=error.error_type if error is not None else None,
            status="error" if error is not None else "ok",
            status_code=status_code,
            duration_ms=duration_ms,
            model=route.model.id,
            requested_model=route.requested.id,
            fallback=route.fallback,
            provider=route.model.label,
            attempt=attempt,
            task_attempt=call.attempt,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            total_tokens=usage.total_tokens,
            cost=usage.cost,
        )
        try:
            await self._recorder.record(record)
        except Exception:  # history is best effort: never turn a paid, successful call into a failure
            log.exception("llm_record_failed", request_type=call.request_type, task_id=call.task_id)


@dataclass
class _Ask:
    """One `structured` call: what it asks for, and how many HTTP attempts it made so far."""

    step: str
    schema: type[BaseModel]
    call: CallContext
    call_id: str  # in every history record of the call (request_data.call_id)
    counter: int = 0


def _briefer(messages: list[dict[str, str]], max_tokens: int) -> list[dict[str, str]]:
    """The messages again, the last user message asking for a shorter reply (a cut-off reply's re-ask)."""
    note = (f"\n\nImportant: your previous reply was cut off at the limit of {max_tokens} tokens. Keep every "
            "text field brief (one or two short sentences) and lists short, so that the complete JSON object "
            "fits.")
    out = [dict(m) for m in messages]
    for message in reversed(out):
        if message.get("role") == "user":
            message["content"] = message.get("content", "") + note
            return out
    return [*out, {"role": "user", "content": note.strip()}]


def _chat_url(model: ResolvedModel) -> str:
    if not model.base_url:
        raise ProviderRejected(f"model {model.id!r} has no base URL (provider {model.provider!r})")
    return model.base_url.rstrip("/") + "/chat/completions"


def _first_message(body: Mapping[str, Any]) -> tuple[str, str | None]:
    """`choices[0].message.content` and the finish reason; missing pieces give an empty string."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        return "", None
    choice = choices[0]
    finish = choice.get("finish_reason")
    message = choice.get("message")
    if not isinstance(message, Mapping):
        return "", finish if isinstance(finish, str) else None
    content = message.get("content")
    if isinstance(content, list):  # content parts: join the text ones
        content = "".join(
            str(part.get("text", "")) for part in content if isinstance(part, Mapping) and "text" in part
        )
    if not isinstance(content, str):
        content = ""
    return content, finish if isinstance(finish, str) else None
