"""Structured-output modes of the LLM client: each mode's request body, sampling fields, detection of a
rejected mode (switch at once, remember per model, never an outage), and the reply read leniently."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fakes import MemoryRecorder
from structlog.testing import capture_logs

from ai_worker.content.schemas import PostContent
from ai_worker.errors import ProviderUnavailable, StructuredOutputUnsupported
from ai_worker.llm.client import LLMClient, Prompt
from ai_worker.llm.parsing import CONTROL_CHARACTERS
from ai_worker.llm.schema import strict_json_schema
from ai_worker.providers.breaker import BreakerBoard, BreakerState
from ai_worker.providers.history import CallContext
from ai_worker.providers.registry import ModelRegistry
from ai_worker.providers.retrying import NO_RETRY, ProviderRetry
from ai_worker.providers.routing import ModelRouter

CALL = CallContext(task_id="task-1", world_id="world-1", request_type="post", attempt=1)
PROMPT = Prompt(system="You write posts.", user="Write one post.")
GOOD = {"caption": "Morning at the docks", "image_prompt": "a harbour at dawn", "tags": ["harbour"]}
MODEL = "local/smollm"

# llama-cpp-python's server, asked for json_schema (its real answer, HTTP 500).
LLAMA_CPP_PYTHON_REJECTION = {"error": {
    "message": "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
               "'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema'}",
    "type": "internal_server_error", "param": None, "code": None}}


def completion(content: str, finish: str = "stop") -> dict[str, Any]:
    return {"id": "gen-1", "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                        "finish_reason": finish}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 20}}


def client_for(handler: Any, recorder: MemoryRecorder, *, breakers: BreakerBoard | None = None,
               retry: ProviderRetry = NO_RETRY, **fields: Any) -> LLMClient:
    registry = ModelRegistry.single(base_url="http://127.0.0.1:1/v1", api_key=None, model=MODEL,
                                    openrouter_extras=False, model_fields=fields)
    router = ModelRouter(registry, breakers=breakers or BreakerBoard())
    return LLMClient(router=router, recorder=recorder, http=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
                     retry=retry)


def bodies(seen: list[httpx.Request]) -> list[dict[str, Any]]:
    return [json.loads(r.content) for r in seen]


@pytest.mark.parametrize("mode", ["json_schema", "json_object", "prompt"])
async def test_request_body_of_each_mode(mode: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=completion(json.dumps(GOOD)))

    recorder = MemoryRecorder()
    client = client_for(handler, recorder, structured_output=mode)
    result = await client.structured(PROMPT, PostContent, CALL)
    assert result.value.caption == GOOD["caption"]
    [body] = bodies(seen)
    schema = strict_json_schema(PostContent)
    system = body["messages"][0]["content"]
    if mode == "json_schema":
        assert body["response_format"] == {"type": "json_schema", "json_schema": {
            "name": "PostContent", "strict": True, "schema": schema}}
        assert system == PROMPT.system  # the server sees the schema: the prompt stays as written
    elif mode == "json_object":
        # llama-cpp-python's form: JSON mode with the schema beside it (turned into a grammar there).
        assert body["response_format"] == {"type": "json_object", "schema": schema}
        assert system == PROMPT.system  # small models echo a schema in the prompt: the grammar has it
    else:
        assert "response_format" not in body
        assert system.startswith(PROMPT.system) and json.dumps(schema, separators=(",", ":")) in system
        assert "nothing else" in system
    assert body["messages"][1] == {"role": "user", "content": PROMPT.user}
    # No sampling field is sent unless the registry sets it.
    assert not {"temperature", "top_p", "frequency_penalty", "presence_penalty", "repeat_penalty"} & set(body)
    assert recorder.records[0].request_data["structured_output"] == mode


async def test_sampling_settings_are_sent_only_when_set() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=completion(json.dumps(GOOD)))

    client = client_for(handler, MemoryRecorder(), temperature=0.2, top_p=0.9, repeat_penalty=1.1)
    await client.structured(PROMPT, PostContent, CALL)
    [body] = bodies(seen)
    assert (body["temperature"], body["top_p"], body["repeat_penalty"]) == (0.2, 0.9, 1.1)
    assert "frequency_penalty" not in body and "presence_penalty" not in body

    seen.clear()
    client = client_for(handler, MemoryRecorder(), frequency_penalty=0.5, presence_penalty=-0.5)
    await client.structured(PROMPT, PostContent, CALL)
    [body] = bodies(seen)
    assert (body["frequency_penalty"], body["presence_penalty"]) == (0.5, -0.5)
    assert "repeat_penalty" not in body and "temperature" not in body


async def test_auto_falls_back_at_once_remembers_and_never_counts_as_an_outage() -> None:
    """llama-cpp-python: json_schema is refused with a 500 naming response_format. The client re-sends
    the same ask as json_object right away, the breaker (threshold 1) stays closed, the next call starts
    with json_object, and the switch is logged once."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if json.loads(request.content).get("response_format", {}).get("type") == "json_schema":
            return httpx.Response(500, json=LLAMA_CPP_PYTHON_REJECTION)
        return httpx.Response(200, json=completion(json.dumps(GOOD)))

    breakers = BreakerBoard(failure_threshold=1)
    recorder = MemoryRecorder()
    client = client_for(handler, recorder, breakers=breakers)
    with capture_logs() as logs:
        first = await client.structured(PROMPT, PostContent, CALL)
        second = await client.structured(PROMPT, PostContent, CALL)
    assert first.value.caption == second.value.caption == GOOD["caption"]
    assert [b.get("response_format", {}).get("type") for b in bodies(seen)] == [
        "json_schema", "json_object", "json_object"]
    assert first.calls == 2 and second.calls == 1
    assert breakers.get("main", MODEL).state is BreakerState.CLOSED
    assert client.modes.learned() == {MODEL: "json_object"}
    assert [e["mode"] for e in logs if e["event"] == "llm_structured_output_mode"] == ["json_object"]

    rejected, ok1, ok2 = recorder.records
    assert (rejected.status, rejected.status_code, rejected.error_type) == (
        "error", 500, "structured_output_unsupported")
    assert rejected.request_data["structured_output"] == "json_schema"
    assert "response_format" in (rejected.error or "")
    assert (ok1.status, ok1.attempt, ok1.request_data["structured_output"]) == ("ok", 2, "json_object")
    assert ok1.request_data["call_id"] == rejected.request_data["call_id"] != ok2.request_data["call_id"]


async def test_auto_walks_every_mode_down_to_prompt() -> None:
    """A server that refuses json_schema (400) and json_object (422) gets the schema in the prompt."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        fmt = json.loads(request.content).get("response_format")
        if fmt is not None:
            return httpx.Response(400 if fmt["type"] == "json_schema" else 422,
                                  json={"error": {"message": f"response_format type {fmt['type']} not supported"}})
        return httpx.Response(200, json=completion(json.dumps(GOOD)))

    client = client_for(handler, MemoryRecorder())
    result = await client.structured(PROMPT, PostContent, CALL)
    assert result.value.caption == GOOD["caption"]
    assert [b.get("response_format", {}).get("type") for b in bodies(seen)] == ["json_schema", "json_object", None]
    assert client.modes.learned() == {MODEL: "prompt"}


async def test_concurrent_rejections_move_the_model_one_step_only() -> None:
    from ai_worker.llm.structured import ModeMemory

    registry = ModelRegistry.single(base_url="http://x/v1", api_key=None, model=MODEL)
    model = registry.model(MODEL)
    memory = ModeMemory()
    assert memory.current(model) == "json_schema"
    assert memory.demote(model, "json_schema", "no") == "json_object"
    assert memory.demote(model, "json_schema", "no") == "json_object"  # a late rejection of the old mode
    assert memory.current(model) == "json_object"
    assert memory.demote(model, "json_object", "no") == "prompt"
    assert memory.demote(model, "prompt", "no") is None


async def test_an_explicit_mode_is_not_changed_and_the_rejection_is_permanent() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json=LLAMA_CPP_PYTHON_REJECTION)

    breakers = BreakerBoard(failure_threshold=1)
    recorder = MemoryRecorder()
    client = client_for(handler, recorder, breakers=breakers, structured_output="json_schema",
                        retry=ProviderRetry(max_retries=3, base_s=0.0, max_s=0.0))
    with pytest.raises(StructuredOutputUnsupported) as info:
        await client.structured(PROMPT, PostContent, CALL)
    assert info.value.retryable is False
    assert len(recorder.records) == 1  # not retried as a transient error
    assert breakers.get("main", MODEL).state is BreakerState.CLOSED
    assert client.modes.learned() == {}


async def test_a_500_that_does_not_name_the_format_is_still_an_outage() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error": {"message": "CUDA out of memory"}})

    breakers = BreakerBoard(failure_threshold=1)
    client = client_for(handler, MemoryRecorder(), breakers=breakers)
    with pytest.raises(ProviderUnavailable):
        await client.structured(PROMPT, PostContent, CALL)
    assert breakers.get("main", MODEL).state is BreakerState.OPEN
    assert client.modes.learned() == {}


async def test_a_reply_with_raw_newlines_is_valid_without_a_repair() -> None:
    content = '{"caption": "Morning\nat the docks", "image_prompt": "a harbour", "tags": ["harbour"]}'
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=completion(content))

    recorder = MemoryRecorder()
    client = client_for(handler, recorder, structured_output="json_object")
    result = await client.structured(PROMPT, PostContent, CALL)
    assert result.value.caption == "Morning\nat the docks"
    assert len(seen) == 1 and result.calls == 1
    [record] = recorder.records
    assert record.status == "ok"
    assert record.response_data is not None and record.response_data["lenient"] == [CONTROL_CHARACTERS]


async def test_repair_names_the_problem_without_at_at() -> None:
    seen: list[httpx.Request] = []
    replies = iter(['{"caption": "x" "tags": []}', json.dumps(GOOD)])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=completion(next(replies)))

    recorder = MemoryRecorder()
    client = client_for(handler, recorder)
    result = await client.structured(PROMPT, PostContent, CALL)
    assert result.calls == 2
    repair = bodies(seen)[1]["messages"][-1]["content"]
    assert "Expecting ',' delimiter at line 1 column 17" in repair and "at at" not in repair
    assert [r.request_data["purpose"] for r in recorder.records] == ["first", "repair"]
    assert recorder.records[0].error_type == "invalid_output"
