from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from fakes import MemoryRecorder

from ai_worker.content.schemas import PostContent
from ai_worker.errors import (
    InvalidOutput,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from ai_worker.llm.client import LLMClient, LLMUsage, Prompt, strip_fences
from ai_worker.providers.history import CallContext
from ai_worker.providers.registry import STEP_MAX_TOKENS
from ai_worker.providers.retrying import NO_RETRY, ProviderRetry

CALL = CallContext(task_id="task-1", world_id="world-1", request_type="post", attempt=2)
PROMPT = Prompt(system="You write posts.", user="Write one post.")
GOOD = {"caption": "Morning at the docks", "image_prompt": "a harbour at dawn", "tags": ["harbour"]}
SECRET = "sk-test-secret"


def completion(content: str, usage: dict[str, Any] | None = None, finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "gen-1",
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
        ],
        "usage": usage
        or {
            "prompt_tokens": 100,
            "completion_tokens": 20,
            "prompt_tokens_details": {"cached_tokens": 40},
            "completion_tokens_details": {"reasoning_tokens": 5},
            "cost": 0.0012,
        },
    }


def make_client(
    handler: Any,
    recorder: MemoryRecorder,
    *,
    extras: bool = True,
    max_concurrency: int = 4,
    api_key: str | None = SECRET,
    overrides: dict[str, str] | None = None,
    retry: ProviderRetry = NO_RETRY,
) -> LLMClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return LLMClient.single(
        base_url="https://llm.example/api/v1/",
        api_key=api_key,
        model="test/default",
        overrides=overrides or {},
        timeout_s=5,
        max_concurrency=max_concurrency,
        max_tokens=1234,
        openrouter_extras=extras,
        recorder=recorder,
        http=http,
        retry=retry,
    )


async def test_happy_path_sends_strict_schema_and_records_usage() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=completion(json.dumps(GOOD)))

    recorder = MemoryRecorder()
    client = make_client(handler, recorder, overrides={"post": "test/post-model"})
    result = await client.structured(PROMPT, PostContent, CALL)

    assert result.value == PostContent.model_validate(GOOD)
    assert result.calls == 1
    assert result.model == "test/post-model"
    assert result.usage == LLMUsage(
        prompt_tokens=100, completion_tokens=20, cached_tokens=40, reasoning_tokens=5, cost=0.0012
    )

    request = seen[0]
    assert str(request.url) == "https://llm.example/api/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {SECRET}"
    body = json.loads(request.content)
    assert body["model"] == "test/post-model"
    # A model named only in the environment is sized per step (a post: STEP_MAX_TOKENS["post"]), within
    # the flat ceiling the client was given.
    assert body["max_tokens"] == STEP_MAX_TOKENS["post"]
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["name"] == "PostContent"
    assert fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"]["additionalProperties"] is False
    assert body["provider"] == {"require_parameters": True}
    assert body["usage"] == {"include": True}

    [record] = recorder.records
    assert record.api_type == "llm"
    assert record.status == "ok"
    assert record.status_code == 200
    assert (record.task_id, record.world_id, record.request_type) == ("task-1", "world-1", "post")
    assert record.task_attempt == 2
    assert record.attempt == 1
    assert record.model == "test/post-model"
    assert record.provider == "openrouter"
    assert (record.prompt_tokens, record.completion_tokens) == (100, 20)
    assert (record.cached_tokens, record.reasoning_tokens, record.total_tokens) == (40, 5, 120)
    assert record.cost == pytest.approx(0.0012)
    assert record.request_data["schema"] == "PostContent"
    assert record.response_data is not None
    assert record.response_data["finish_reason"] == "stop"
    assert record.response_data["id"] == "gen-1"
    assert SECRET not in record.model_dump_json()
    await client.aclose()


async def test_plain_endpoint_gets_no_openrouter_extras_and_no_auth_without_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=completion("```json\n" + json.dumps(GOOD) + "\n```"))

    recorder = MemoryRecorder()
    client = make_client(handler, recorder, extras=False, api_key=None)
    result = await client.structured(PROMPT, PostContent, CALL, step="other")
    assert result.value.caption == GOOD["caption"]
    assert result.model == "test/default"
    body = json.loads(seen[0].content)
    assert "provider" not in body and "usage" not in body
    assert "authorization" not in seen[0].headers
    assert recorder.records[0].provider == "openai-compatible"


async def test_repair_after_invalid_json() -> None:
    bodies: list[dict[str, Any]] = []
    replies = ["{not json", json.dumps(GOOD)]

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=completion(replies[len(bodies) - 1]))

    recorder = MemoryRecorder()
    client = make_client(handler, recorder)
    result = await client.structured(PROMPT, PostContent, CALL)

    assert result.calls == 2
    assert result.usage.prompt_tokens == 200 and result.usage.cost == pytest.approx(0.0024)
    repair_messages = bodies[1]["messages"]
    assert [m["role"] for m in repair_messages] == ["system", "user", "assistant", "user"]
    assert repair_messages[2]["content"] == "{not json"
    assert "not valid JSON" in repair_messages[3]["content"]
    assert [r.attempt for r in recorder.records] == [1, 2]
    assert [r.status for r in recorder.records] == ["error", "ok"]
    assert recorder.records[0].error_type == "invalid_output"


async def test_still_invalid_after_repair_raises_invalid_output() -> None:
    bad = json.dumps({"caption": "missing fields"})

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=completion(bad))

    recorder = MemoryRecorder()
    client = make_client(handler, recorder)
    with pytest.raises(InvalidOutput) as info:
        await client.structured(PROMPT, PostContent, CALL)
    assert info.value.retryable
    assert len(recorder.records) == 2
    assert all(r.status == "error" and r.error_type == "invalid_output" for r in recorder.records)
    assert recorder.records[0].response_data is not None
    assert recorder.records[0].response_data["content"] == bad


async def test_empty_choices_is_invalid_output() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"id": "x", "choices": []})

    recorder = MemoryRecorder()
    client = make_client(handler, recorder)
    with pytest.raises(InvalidOutput):
        await client.structured(PROMPT, PostContent, CALL)
    assert len(recorder.records) == 2


@pytest.mark.parametrize(
    ("code", "expected"),
    [(429, RateLimited), (502, ProviderUnavailable), (400, ProviderRejected), ("403", ProviderRejected)],
)
async def test_error_object_in_200_body(code: Any, expected: type[Exception]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"error": {"code": code, "message": "upstream said no"}})

    recorder = MemoryRecorder()
    client = make_client(handler, recorder)
    with pytest.raises(expected):
        await client.structured(PROMPT, PostContent, CALL)
    [record] = recorder.records
    assert record.status == "error"
    assert record.status_code == 200
    assert record.error is not None and "upstream said no" in record.error


async def test_429_with_retry_after() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            429, headers={"Retry-After": "7"}, json={"error": {"code": 429, "message": "slow down"}}
        )

    recorder = MemoryRecorder()
    client = make_client(handler, recorder)
    with pytest.raises(RateLimited) as info:
        await client.structured(PROMPT, PostContent, CALL)
    assert info.value.retry_after_s == 7.0
    assert info.value.retryable
    [record] = recorder.records
    assert record.status_code == 429
    assert record.error_type == "rate_limited"


async def test_500_is_provider_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, text="boom")

    recorder = MemoryRecorder()
    client = make_client(handler, recorder)
    with pytest.raises(ProviderUnavailable):
        await client.structured(PROMPT, PostContent, CALL)
    assert recorder.records[0].status_code == 500


async def test_401_is_permanent() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"code": 401, "message": "bad key"}})

    recorder = MemoryRecorder()
    client = make_client(handler, recorder)
    with pytest.raises(ProviderRejected) as info:
        await client.structured(PROMPT, PostContent, CALL)
    assert not info.value.retryable


async def test_timeout_is_provider_timeout() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("read timed out", request=request)

    recorder = MemoryRecorder()
    client = make_client(handler, recorder)
    with pytest.raises(ProviderTimeout):
        await client.structured(PROMPT, PostContent, CALL)
    [record] = recorder.records
    assert record.status_code is None
    assert record.error_type == "provider_timeout"


async def test_connection_error_is_provider_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    recorder = MemoryRecorder()
    client = make_client(handler, recorder)
    with pytest.raises(ProviderUnavailable):
        await client.structured(PROMPT, PostContent, CALL)


async def test_concurrency_is_bounded_by_semaphore() -> None:
    limit = 3
    in_flight = 0
    peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        return httpx.Response(200, json=completion(json.dumps(GOOD)))

    recorder = MemoryRecorder()
    client = make_client(handler, recorder, max_concurrency=limit)
    results = await asyncio.gather(*(client.structured(PROMPT, PostContent, CALL) for _ in range(10)))
    assert len(results) == 10
    assert peak == limit
    assert len(recorder.records) == 10


async def test_the_slot_is_free_while_the_call_is_recorded() -> None:
    """One slot: the second request goes out while the first call's history record is still being written
    (recording needs no provider slot)."""
    writing = asyncio.Event()
    sent: list[str] = []

    class SlowRecorder(MemoryRecorder):
        async def record(self, record: Any) -> None:
            if not self.records:
                await writing.wait()
            await super().record(record)

    async def handler(request: httpx.Request) -> httpx.Response:
        sent.append("request")
        if len(sent) == 2:
            writing.set()  # the first call is still recording: its slot was given back
        return httpx.Response(200, json=completion(json.dumps(GOOD)))

    client = make_client(handler, SlowRecorder(), max_concurrency=1)
    results = await asyncio.wait_for(
        asyncio.gather(*(client.structured(PROMPT, PostContent, CALL) for _ in range(2))), 5.0)
    assert len(results) == 2 and len(sent) == 2


def test_strip_fences() -> None:
    assert strip_fences('```json\n{"a": 1}\n```') == '{"a": 1}'
    assert strip_fences('```\n{"a": 1}```') == '{"a": 1}'
    assert strip_fences('  {"a": 1} ') == '{"a": 1}'
