"""max_tokens per step (registry precedence, the same figure reserved by rate limits and budgets) and a
reply cut at the token limit (`finish_reason: length`): asked again once with more room and a request to
be brief, recorded as such, `output_truncated` when it is cut again."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fakes import MemoryRecorder

from ai_worker.content.schemas import PostContent
from ai_worker.errors import InvalidOutput, OutputTruncated
from ai_worker.llm.client import LLMClient, Prompt
from ai_worker.providers.budget import Reservation
from ai_worker.providers.history import CallContext
from ai_worker.providers.ratelimit import Limits, Permit
from ai_worker.providers.registry import (
    DEFAULT_LLM_MAX_TOKENS,
    LLM_STEPS,
    STEP_MAX_TOKENS,
    FlatDefaults,
    ModelChoice,
    ModelRegistry,
    RegistryError,
    parse_registry,
)
from ai_worker.providers.retrying import NO_RETRY
from ai_worker.providers.routing import ModelRouter

CALL = CallContext(task_id="task-1", world_id="world-1", request_type="post", attempt=1)
PROMPT = Prompt(system="You write posts.", user="Write one post.")
GOOD = {"caption": "Morning at the docks", "image_prompt": "a harbour at dawn", "tags": ["harbour"]}
CUT = '{"caption": "Morning at the docks, where the lanterns'


def table(**fields: Any) -> dict[str, Any]:
    return {
        "defaults": {"llm": "m/llm", "image": "off"},
        "providers": {"local": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1"},
                      "offline": {"kind": "offline"}},
        "models": {"m/llm": {"provider": "local", "kind": "llm", "price_in_per_mtok": 1.0,
                             "price_out_per_mtok": 10.0, **fields},
                   "off": {"provider": "offline", "kind": "image"}},
    }


def registry(env: dict[str, str] | None = None, flat: FlatDefaults | None = None, **fields: Any) -> ModelRegistry:
    return ModelRegistry(parse_registry(table(**fields)), choice=ModelChoice(), env=env or {}, flat=flat)


# --- precedence -------------------------------------------------------------------------------------
def test_every_llm_step_has_a_size_and_a_post_is_small() -> None:
    assert set(STEP_MAX_TOKENS) == set(LLM_STEPS)
    assert STEP_MAX_TOKENS["post"] < STEP_MAX_TOKENS["post_batch"] < STEP_MAX_TOKENS["world_description"]
    assert max(STEP_MAX_TOKENS.values()) < DEFAULT_LLM_MAX_TOKENS


def test_default_sizes_per_step() -> None:
    m = registry().model("m/llm")
    assert m.max_tokens == DEFAULT_LLM_MAX_TOKENS
    assert {s: m.max_tokens_for(s) for s in LLM_STEPS} == STEP_MAX_TOKENS
    assert m.max_tokens_for("not_a_step") == DEFAULT_LLM_MAX_TOKENS


def test_model_overrides_a_step_and_its_ceiling_caps_every_step() -> None:
    m = registry(step_max_tokens={"post": 300, "world_description": 9000}, max_tokens=5000).model("m/llm")
    assert m.max_tokens_for("post") == 300
    assert m.max_tokens_for("world_description") == 5000  # the model's own limit wins
    assert m.max_tokens_for("character_batch") == 5000
    assert m.max_tokens_for("post_batch") == STEP_MAX_TOKENS["post_batch"]


def test_an_explicit_llm_max_tokens_caps_everything_even_the_model() -> None:
    m = registry(env={"LLM_MAX_TOKENS": "700"}, flat=FlatDefaults(max_tokens=700), max_tokens=5000).model("m/llm")
    assert m.max_tokens == 700
    assert {s: m.max_tokens_for(s) for s in LLM_STEPS} == {s: min(700, v) for s, v in STEP_MAX_TOKENS.items()}
    # Variable names are case-insensitive, as everywhere in the configuration; empty means unset.
    assert registry(env={"llm_max_tokens": "650"}).model("m/llm").max_tokens == 650
    assert registry(env={"LLM_MAX_TOKENS": ""}).model("m/llm").max_tokens == DEFAULT_LLM_MAX_TOKENS
    # An explicit value above the step sizes raises the ceiling only (steps keep their size).
    big = registry(env={"LLM_MAX_TOKENS": "16000"}, flat=FlatDefaults(max_tokens=16000)).model("m/llm")
    assert big.max_tokens == 16000 and big.max_tokens_for("post") == STEP_MAX_TOKENS["post"]


def test_llm_max_tokens_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from ai_worker.config import Settings

    base = {"MONGODB_URI": "mongodb://x", "KAFKA_BROKERS": "k:9092", "OPENROUTER_API_KEY": "sk"}
    for key, value in base.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LLM_MAX_TOKENS", raising=False)
    assert Settings().models.primary("post").max_tokens_for("post") == STEP_MAX_TOKENS["post"]
    monkeypatch.setenv("LLM_MAX_TOKENS", "256")
    m = Settings().models.primary("post")
    assert (m.max_tokens, m.max_tokens_for("post"), m.max_tokens_for("world_description")) == (256, 256, 256)


@pytest.mark.parametrize(("fields", "message"), [
    ({"step_max_tokens": {"posts": 100}}, "unknown LLM step 'posts'"),
    ({"step_max_tokens": {"post": 0}}, "step_max_tokens.post must be > 0"),
    ({"structured_output": "xml"}, "structured_output"),
    ({"temperature": 3.0}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"repeat_penalty": 0}, "repeat_penalty"),
    ({"unknown_field": 1}, "unknown_field"),
])
def test_invalid_new_fields_are_rejected(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        registry(**fields)


def test_llm_fields_on_an_image_model_are_rejected() -> None:
    data = table()
    data["models"]["off"].update({"temperature": 0.5, "structured_output": "prompt"})
    with pytest.raises(RegistryError, match="temperature, structured_output only apply to llm models"):
        parse_registry(data)


def test_resolved_model_carries_mode_and_only_the_sampling_set() -> None:
    m = registry(structured_output="json_object", temperature=0.2, repeat_penalty=1.1).model("m/llm")
    assert m.structured_output == "json_object"
    assert dict(m.sampling) == {"temperature": 0.2, "repeat_penalty": 1.1}
    assert registry().model("m/llm").sampling == ()
    assert registry().model("m/llm").structured_output == "auto"


# --- the client uses the same figure for the request, the rate limit and the budget -----------------
class RecordingLimiter:
    def __init__(self) -> None:
        self.tokens: list[int] = []

    async def acquire(self, key: str, limits: Limits, tokens: int) -> Permit:
        self.tokens.append(tokens)
        return Permit(key=key, tokens=tokens)

    async def settle(self, permit: Permit, limits: Limits, actual_tokens: int) -> None:
        return None

    async def penalize(self, key: str, retry_after_s: float | None) -> None:
        return None


class RecordingBudget:
    def __init__(self) -> None:
        self.reserved: list[float] = []

    async def reserve(self, call: CallContext, kind: str, max_cost: float) -> Reservation:
        self.reserved.append(max_cost)
        return Reservation(world_id=None, day=None, amount=max_cost)

    async def settle(self, reservation: Reservation, spent: float, *, counted: bool = True) -> None:
        return None


def completion(content: str, finish: str = "stop") -> dict[str, Any]:
    return {"choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 20}}


def make(handler: Any, reg: ModelRegistry, limiter: RecordingLimiter | None = None,
         budget: RecordingBudget | None = None, recorder: MemoryRecorder | None = None) -> LLMClient:
    router = ModelRouter(reg, limiter=limiter)
    return LLMClient(router=router, recorder=recorder or MemoryRecorder(), retry=NO_RETRY, budget=budget,
                     http=httpx.AsyncClient(transport=httpx.MockTransport(handler)))


async def test_request_rate_limit_and_budget_use_the_step_size() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=completion(json.dumps(GOOD)))

    reg = registry(step_max_tokens={"post": 321})
    limiter, budget = RecordingLimiter(), RecordingBudget()
    client = make(handler, reg, limiter, budget)
    await client.structured(PROMPT, PostContent, CALL)
    assert seen[0]["max_tokens"] == 321
    messages = seen[0]["messages"]
    prompt_estimate = LLMClient.prompt_tokens_estimate(messages)
    assert limiter.tokens == [prompt_estimate + 321]
    model = reg.model("m/llm")
    assert budget.reserved == [pytest.approx(prompt_estimate * model.price_in + 321 * model.price_out)]


# --- finish_reason: length ----------------------------------------------------------------------------
async def test_a_cut_off_reply_is_asked_again_with_twice_the_tokens_and_a_brevity_note() -> None:
    seen: list[dict[str, Any]] = []
    replies = iter([completion(CUT, "length"), completion(json.dumps(GOOD))])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=next(replies))

    recorder = MemoryRecorder()
    limiter, budget = RecordingLimiter(), RecordingBudget()
    client = make(handler, registry(step_max_tokens={"post": 400}), limiter, budget, recorder)
    result = await client.structured(PROMPT, PostContent, CALL)
    assert result.value.caption == GOOD["caption"] and result.calls == 2
    assert [b["max_tokens"] for b in seen] == [400, 800]
    assert "cut off at the limit of 400 tokens" in seen[1]["messages"][-1]["content"]
    assert seen[1]["messages"][-1]["content"].startswith(PROMPT.user)
    assert len(seen[1]["messages"]) == 2  # the cut-off reply is not sent back
    assert limiter.tokens[1] - limiter.tokens[0] >= 400  # the reservation grows with the request

    cut, ok = recorder.records
    assert (cut.status, cut.error_type, cut.response_data["finish_reason"]) == ("error", "output_truncated", "length")
    assert "cut off at the token limit, max_tokens 400" in (cut.error or "")
    assert (ok.status, ok.request_data["purpose"], ok.request_data["max_tokens"]) == ("ok", "truncated", 800)
    assert ok.request_data["call_id"] == cut.request_data["call_id"]


async def test_the_larger_ask_never_passes_the_model_ceiling() -> None:
    seen: list[int] = []
    replies = iter([completion(CUT, "length"), completion(json.dumps(GOOD))])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content)["max_tokens"])
        return httpx.Response(200, json=next(replies))

    client = make(handler, registry(step_max_tokens={"post": 400}, max_tokens=500))
    await client.structured(PROMPT, PostContent, CALL)
    assert seen == [400, 500]


async def test_cut_off_twice_is_output_truncated() -> None:
    seen: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content)["max_tokens"])
        return httpx.Response(200, json=completion(CUT, "length"))

    recorder = MemoryRecorder()
    client = make(handler, registry(step_max_tokens={"post": 100}), recorder=recorder)
    with pytest.raises(OutputTruncated) as info:
        await client.structured(PROMPT, PostContent, CALL)
    assert info.value.retryable is True and info.value.error_type == "output_truncated"
    assert seen == [100, 200]  # no repair request of a cut-off reply
    assert [r.error_type for r in recorder.records] == ["output_truncated", "output_truncated"]


async def test_cut_off_but_complete_json_is_accepted() -> None:
    # A grammar can let the model pad a finished object with whitespace until the limit.
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=completion(json.dumps(GOOD) + "\n" * 50, "length"))

    recorder = MemoryRecorder()
    client = make(handler, registry(), recorder=recorder)
    result = await client.structured(PROMPT, PostContent, CALL)
    assert result.calls == 1 and recorder.records[0].status == "ok"


async def test_invalid_after_the_longer_ask_gets_the_repair_request() -> None:
    seen: list[dict[str, Any]] = []
    replies = iter([completion(CUT, "length"), completion('{"caption": "x"}'), completion(json.dumps(GOOD))])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=next(replies))

    recorder = MemoryRecorder()
    client = make(handler, registry(step_max_tokens={"post": 100}), recorder=recorder)
    result = await client.structured(PROMPT, PostContent, CALL)
    assert result.calls == 3
    assert [r.request_data["purpose"] for r in recorder.records] == ["first", "truncated", "repair"]
    assert [b["max_tokens"] for b in seen] == [100, 200, 200]
    assert seen[2]["messages"][-2] == {"role": "assistant", "content": '{"caption": "x"}'}


async def test_invalid_not_cut_off_is_still_invalid_output() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=completion('{"caption": 1}'))

    client = make(handler, registry())
    with pytest.raises(InvalidOutput) as info:
        await client.structured(PROMPT, PostContent, CALL)
    assert not isinstance(info.value, OutputTruncated)
