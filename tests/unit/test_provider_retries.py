"""In-call retries of provider requests (PROVIDER_MAX_RETRIES): LLM client and image service."""

from __future__ import annotations

import base64
import io
import json
import random
from typing import Any

import httpx
import pytest
from fakes import MemoryRecorder
from PIL import Image

from ai_worker.config import load_settings
from ai_worker.content.schemas import PostContent
from ai_worker.errors import (
    InvalidImage,
    InvalidOutput,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from ai_worker.images.openrouter import OpenRouterImageProvider
from ai_worker.images.service import ImageService
from ai_worker.llm.client import LLMClient, Prompt
from ai_worker.providers.history import CallContext
from ai_worker.providers.retrying import ProviderRetry

CALL = CallContext(task_id="task-1", world_id="world-1", request_type="post", attempt=1)
PROMPT = Prompt(system="You write posts.", user="Write one post.")
GOOD = {"caption": "Morning at the docks", "image_prompt": "a harbour at dawn", "tags": ["harbour"]}


class Sleeps:
    """A fake sleep that records the delays tenacity asks for."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def policy(sleeps: Sleeps, *, max_retries: int = 3, base_s: float = 0.5, max_s: float = 10.0) -> ProviderRetry:
    return ProviderRetry(max_retries=max_retries, base_s=base_s, max_s=max_s, rng=random.Random(1), sleep=sleeps)


def completion(content: str) -> dict[str, Any]:
    return {
        "id": "gen-1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "cost": 0.001},
    }


def llm(handler: Any, recorder: MemoryRecorder, retry: ProviderRetry) -> LLMClient:
    return LLMClient.single(
        base_url="https://llm.example/v1", api_key="k", model="m", timeout_s=5,
        max_concurrency=2, max_tokens=100, openrouter_extras=False, recorder=recorder,
        http=httpx.AsyncClient(transport=httpx.MockTransport(handler)), retry=retry,
    )


def scripted(responses: list[Any]) -> tuple[Any, list[httpx.Request]]:
    """A handler answering from `responses` in order (an exception instance is raised)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        item = responses[min(len(seen) - 1, len(responses) - 1)]
        if isinstance(item, Exception):
            raise item
        assert isinstance(item, httpx.Response)
        return item

    return handler, seen


def test_delay_is_exponential_with_jitter_and_capped() -> None:
    retry = ProviderRetry(base_s=0.5, max_s=3.0, rng=random.Random(7))
    for n, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (10, 3.0)]:
        for _ in range(20):
            assert cap / 2 <= retry.delay(n, ProviderUnavailable("x")) <= cap
    # Retry-After is honoured, but never beyond the ceiling.
    assert retry.delay(1, RateLimited("x", retry_after_s=2.0)) >= 2.0
    assert retry.delay(1, RateLimited("x", retry_after_s=60.0)) == 3.0
    with pytest.raises(ValueError):
        ProviderRetry(max_retries=-1)


def test_from_settings() -> None:
    settings = load_settings(MONGODB_URI="mongodb://db", KAFKA_BROKERS="k:9092", OPENROUTER_API_KEY="x",
                             RUNWARE_API_KEY="x", PROVIDER_MAX_RETRIES="5", PROVIDER_RETRY_BASE_S="0.1",
                             PROVIDER_RETRY_MAX_S="2")
    retry = ProviderRetry.from_settings(settings)
    assert (retry.max_retries, retry.base_s, retry.max_s) == (5, 0.1, 2.0)
    defaults = ProviderRetry.from_settings(load_settings(MONGODB_URI="mongodb://db", KAFKA_BROKERS="k:9092",
                                                         OPENROUTER_API_KEY="x", RUNWARE_API_KEY="x"))
    assert (defaults.max_retries, defaults.base_s, defaults.max_s) == (3, 0.5, 10.0)


async def test_llm_transient_errors_are_retried_and_each_attempt_recorded() -> None:
    handler, seen = scripted([
        httpx.Response(503, json={"error": {"code": 503, "message": "down"}}),
        httpx.Response(429, headers={"Retry-After": "2"}, json={"error": {"code": 429, "message": "slow"}}),
        httpx.ReadTimeout("hang"),
        httpx.Response(200, json=completion(json.dumps(GOOD))),
    ])
    recorder, sleeps = MemoryRecorder(), Sleeps()
    result = await llm(handler, recorder, policy(sleeps)).structured(PROMPT, PostContent, CALL)
    assert result.value == PostContent.model_validate(GOOD)
    assert result.calls == 4
    assert len(seen) == 4
    assert [r.attempt for r in recorder.records] == [1, 2, 3, 4]
    assert [r.error_type for r in recorder.records] == [
        "provider_unavailable", "rate_limited", "provider_timeout", None]
    assert [r.status_code for r in recorder.records] == [503, 429, None, 200]
    assert all(r.task_attempt == 1 for r in recorder.records)
    assert len(sleeps.delays) == 3
    assert sleeps.delays[1] >= 2.0  # the 429's Retry-After


async def test_llm_gives_up_after_max_retries() -> None:
    handler, seen = scripted([httpx.Response(500, text="boom")])
    recorder, sleeps = MemoryRecorder(), Sleeps()
    with pytest.raises(ProviderUnavailable):
        await llm(handler, recorder, policy(sleeps, max_retries=2)).structured(PROMPT, PostContent, CALL)
    assert len(seen) == 3
    assert [r.attempt for r in recorder.records] == [1, 2, 3]
    assert all(r.status == "error" for r in recorder.records)


async def test_llm_permanent_error_is_not_retried() -> None:
    handler, seen = scripted([httpx.Response(400, json={"error": {"code": 400, "message": "bad"}})])
    recorder, sleeps = MemoryRecorder(), Sleeps()
    with pytest.raises(ProviderRejected):
        await llm(handler, recorder, policy(sleeps)).structured(PROMPT, PostContent, CALL)
    assert len(seen) == 1 and sleeps.delays == []


async def test_llm_invalid_output_gets_one_repair_not_retries() -> None:
    handler, seen = scripted([httpx.Response(200, json=completion("{not json"))])
    recorder, sleeps = MemoryRecorder(), Sleeps()
    with pytest.raises(InvalidOutput):
        await llm(handler, recorder, policy(sleeps)).structured(PROMPT, PostContent, CALL)
    assert len(seen) == 2  # the answer and its repair
    assert sleeps.delays == []
    assert [r.error_type for r in recorder.records] == ["invalid_output", "invalid_output"]


async def test_llm_repair_request_is_retried_too() -> None:
    handler, seen = scripted([
        httpx.Response(200, json=completion('{"caption": 1')),
        httpx.Response(502, text="bad gateway"),
        httpx.Response(200, json=completion(json.dumps(GOOD))),
    ])
    recorder, sleeps = MemoryRecorder(), Sleeps()
    result = await llm(handler, recorder, policy(sleeps)).structured(PROMPT, PostContent, CALL)
    assert result.value.caption == GOOD["caption"]
    assert result.calls == 3
    assert [r.attempt for r in recorder.records] == [1, 2, 3]
    repair = json.loads(seen[2].content)["messages"]
    assert repair[-1]["role"] == "user" and "not valid" in repair[-1]["content"]


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(out, format="PNG")
    return out.getvalue()


def image_body(data: bytes) -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    return {"choices": [{"message": {"role": "assistant", "content": "",
                                     "images": [{"type": "image_url", "image_url": {"url": url}}]}}],
            "usage": {"cost": 0.04}}


def images(handler: Any, recorder: MemoryRecorder, retry: ProviderRetry) -> ImageService:
    provider = OpenRouterImageProvider(
        base_url="https://img.example/v1", api_key="k", model="img", timeout_s=5, send_openrouter_extras=True,
        http=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )
    return ImageService.single(provider, max_concurrency=1, recorder=recorder, retry=retry)


async def test_image_transient_failures_are_retried() -> None:
    handler, seen = scripted([
        httpx.Response(500, json={"error": {"code": 500, "message": "gen failed"}}),
        httpx.Response(200, json=image_body(b"garbage, not an image")),
        httpx.Response(429, json={"error": {"code": 429, "message": "slow"}}),
        httpx.Response(200, json=image_body(png(32, 32))),
    ])
    recorder, sleeps = MemoryRecorder(), Sleeps()
    image = await images(handler, recorder, policy(sleeps)).generate("a fox", 64, 64, CALL)
    assert (image.width, image.height) == (64, 64)
    assert len(seen) == 4
    assert [r.attempt for r in recorder.records] == [1, 2, 3, 4]
    assert [r.error_type for r in recorder.records] == [
        "provider_unavailable", "invalid_image", "rate_limited", None]
    assert recorder.records[-1].cost == pytest.approx(0.04)
    assert len(sleeps.delays) == 3


async def test_image_gives_up_and_permanent_is_not_retried() -> None:
    handler, seen = scripted([httpx.Response(200, json=image_body(b"junk"))])
    recorder, sleeps = MemoryRecorder(), Sleeps()
    with pytest.raises(InvalidImage):
        await images(handler, recorder, policy(sleeps, max_retries=1)).generate("x", 16, 16, CALL)
    assert len(seen) == 2 and len(recorder.records) == 2

    handler, seen = scripted([httpx.Response(403, json={"error": {"code": 403, "message": "no"}})])
    recorder, sleeps = MemoryRecorder(), Sleeps()
    with pytest.raises(ProviderRejected):
        await images(handler, recorder, policy(sleeps)).generate("x", 16, 16, CALL)
    assert len(seen) == 1 and sleeps.delays == []


async def test_real_sleep_is_short_with_small_base() -> None:
    handler, _seen = scripted([httpx.ConnectError("refused"), httpx.Response(200, json=completion(json.dumps(GOOD)))])
    recorder = MemoryRecorder()
    retry = ProviderRetry(max_retries=1, base_s=0.01, max_s=0.02)
    result = await llm(handler, recorder, retry).structured(PROMPT, PostContent, CALL)
    assert result.calls == 2
    assert [r.error_type for r in recorder.records] == ["provider_unavailable", None]


def test_timeout_error_class_is_in_call_retryable() -> None:
    from ai_worker.providers.retrying import RETRYABLE_IN_CALL

    assert ProviderTimeout in RETRYABLE_IN_CALL and InvalidOutput not in RETRYABLE_IN_CALL
