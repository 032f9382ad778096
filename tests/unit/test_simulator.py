from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fakes import MemoryRecorder
from PIL import Image

from ai_worker.content.schemas import CharacterBatch, PostBatch, PostContent, WorldDescription
from ai_worker.devstack.simulator import ModelKnobs, ProviderSimulator, SimulatorConfig
from ai_worker.errors import InvalidOutput, ProviderTimeout, ProviderUnavailable, RateLimited
from ai_worker.images.openrouter import OpenRouterImageProvider
from ai_worker.llm.client import LLMClient, Prompt
from ai_worker.providers.history import CallContext
from ai_worker.providers.retrying import NO_RETRY

CALL = CallContext(task_id="t-sim", world_id="w-sim", request_type="character_batch")


@pytest.fixture
async def sim() -> AsyncIterator[ProviderSimulator]:
    simulator = ProviderSimulator(SimulatorConfig(seed=1))
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


def llm(sim: ProviderSimulator, recorder: MemoryRecorder) -> LLMClient:
    return LLMClient.single(
        base_url=sim.base_url,
        api_key=None,
        model="sim/model",
        overrides={},
        timeout_s=10,
        max_concurrency=4,
        max_tokens=4000,
        openrouter_extras=False,
        recorder=recorder,
        retry=NO_RETRY,
    )


async def test_character_batch_exact_count_and_unique_usernames(sim: ProviderSimulator) -> None:
    recorder = MemoryRecorder()
    client = llm(sim, recorder)
    prompt = Prompt(system="You create characters.", user="Create exactly 7 characters for the world.")
    result = await client.structured(prompt, CharacterBatch, CALL)
    characters = result.value.characters
    assert len(characters) == 7
    usernames = [c.username for c in characters]
    assert len(set(usernames)) == 7
    assert all(u.replace("_", "").isalnum() and u == u.lower() for u in usernames)

    other = await client.structured(
        Prompt(system="You create characters.", user="Create exactly 7 characters for another world."),
        CharacterBatch,
        CALL,
    )
    assert not set(usernames) & {c.username for c in other.value.characters}

    again = await client.structured(prompt, CharacterBatch, CALL)
    assert again.value == result.value  # deterministic per (model, messages)

    assert result.usage.prompt_tokens > 0 and result.usage.cost > 0
    assert len(recorder.records) == 3
    await client.aclose()


async def test_other_schemas_validate(sim: ProviderSimulator) -> None:
    client = llm(sim, MemoryRecorder())
    world = await client.structured(Prompt(system="s", user="A floating city"), WorldDescription, CALL)
    assert world.value.name and world.value.locations
    posts = await client.structured(Prompt(system="s", user="Plan exactly 4 posts"), PostBatch, CALL)
    assert len(posts.value.posts) == 4
    post = await client.structured(Prompt(system="s", user="Write the post"), PostContent, CALL)
    assert post.value.tags
    await client.aclose()


async def test_image_over_http(sim: ProviderSimulator) -> None:
    provider = OpenRouterImageProvider(
        base_url=sim.base_url, api_key=None, model="sim/image", timeout_s=10, send_openrouter_extras=True
    )
    image = await provider.generate("a glass lighthouse", 1024, 512)
    decoded = Image.open(io.BytesIO(image.data))
    assert decoded.format == "PNG"
    assert decoded.size == (1024, 512)
    assert image.cost == pytest.approx(sim.config.image_cost)
    assert sim.stats["image"] == 1
    await provider.aclose()


async def test_fault_5xx(sim: ProviderSimulator) -> None:
    sim.config.error_rate_5xx = 1.0
    recorder = MemoryRecorder()
    client = llm(sim, recorder)
    with pytest.raises(ProviderUnavailable):
        await client.structured(Prompt(system="s", user="u"), PostContent, CALL)
    assert [r.status_code for r in recorder.records] == [503]
    await client.aclose()


async def test_schema_invalid_gives_invalid_output_after_two_records(sim: ProviderSimulator) -> None:
    sim.config.schema_invalid_rate = 1.0
    recorder = MemoryRecorder()
    client = llm(sim, recorder)
    with pytest.raises(InvalidOutput):
        await client.structured(Prompt(system="s", user="u"), PostContent, CALL)
    assert len(recorder.records) == 2
    assert [r.attempt for r in recorder.records] == [1, 2]
    assert sim.stats["schema_invalid"] == 2
    await client.aclose()


async def test_malformed_json_gives_invalid_output(sim: ProviderSimulator) -> None:
    sim.config.malformed_json_rate = 1.0
    recorder = MemoryRecorder()
    client = llm(sim, recorder)
    with pytest.raises(InvalidOutput):
        await client.structured(Prompt(system="s", user="u"), PostContent, CALL)
    assert sim.stats["malformed_json"] == 2
    await client.aclose()


async def test_runtime_config_and_stats_endpoints(sim: ProviderSimulator) -> None:
    root = sim.base_url.removesuffix("/v1")
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{root}/_sim/config", json={"error_rate_429": 1.0, "retry_after_s": 3})
        assert response.status_code == 200
        assert sim.config.error_rate_429 == 1.0
        bad = await http.post(f"{root}/_sim/config", json={"nonsense": 1})
        assert bad.status_code == 400

        client = llm(sim, MemoryRecorder())
        with pytest.raises(RateLimited) as info:
            await client.structured(Prompt(system="s", user="u"), PostContent, CALL)
        assert info.value.retry_after_s == 3.0
        await client.aclose()

        stats = (await http.get(f"{root}/_sim/stats")).json()
        assert stats["stats"]["error_429"] == 1
        assert stats["config"]["retry_after_s"] == 3.0


async def test_hang_is_released_by_client_timeout(sim: ProviderSimulator) -> None:
    sim.config.hang_rate = 1.0
    sim.config.hang_s = 30
    client = LLMClient.single(
        base_url=sim.base_url,
        api_key=None,
        model="sim/model",
        overrides={},
        timeout_s=0.3,
        max_concurrency=1,
        max_tokens=100,
        openrouter_extras=False,
        recorder=MemoryRecorder(),
        retry=NO_RETRY,
    )
    with pytest.raises(ProviderTimeout):
        await client.structured(Prompt(system="s", user="u"), PostContent, CALL)
    await client.aclose()


# --- per-model knobs and limits ---------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


async def chat(
    http: httpx.AsyncClient, sim: ProviderSimulator, model: str, text: str = "hello there"
) -> httpx.Response:
    return await http.post(
        f"{sim.base_url}/chat/completions", json={"model": model, "messages": [{"role": "user", "content": text}]}
    )


async def test_model_latency_adds_to_global(sim: ProviderSimulator) -> None:
    sim.config.models["slow"] = ModelKnobs(latency_ms=300)
    async with httpx.AsyncClient() as http:
        started = time.perf_counter()
        assert (await chat(http, sim, "fast")).status_code == 200
        fast = time.perf_counter() - started
        started = time.perf_counter()
        assert (await chat(http, sim, "slow")).status_code == 200
        slow = time.perf_counter() - started
        sim.config.latency_ms = 200
        started = time.perf_counter()
        assert (await chat(http, sim, "slow")).status_code == 200
        both = time.perf_counter() - started
    assert fast < 0.25
    assert slow >= 0.3
    assert both >= 0.5


async def test_model_5xx_and_429_on_top_of_global(sim: ProviderSimulator) -> None:
    sim.config.models["flaky"] = ModelKnobs(error_rate_5xx=1.0)
    sim.config.models["busy"] = ModelKnobs(error_rate_429=1.0)
    async with httpx.AsyncClient() as http:
        assert (await chat(http, sim, "flaky")).status_code == 503
        assert (await chat(http, sim, "steady")).status_code == 200
        busy = await chat(http, sim, "busy")
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        sim.config.error_rate_5xx = 1.0
        assert (await chat(http, sim, "steady")).status_code == 503
    stats = sim.model_stats()
    assert stats["flaky"]["error_5xx"] == 1 and stats["flaky"]["ok"] == 0
    assert stats["steady"] == {
        "requests": 2, "ok": 1, "error_429": 0, "limit_429": 0, "error_5xx": 1,
        "max_in_60s": 1, "tokens": stats["steady"]["tokens"], "max_tokens_in_60s": stats["steady"]["tokens"],
    }  # fmt: skip
    assert stats["steady"]["tokens"] > 0
    assert stats["busy"]["error_429"] == 1
    assert sim.stats["error_5xx"] == 2 and sim.stats["error_429"] == 1


async def test_model_fault_draws_are_deterministic() -> None:
    outcomes: list[list[int]] = []
    for _ in range(2):
        config = SimulatorConfig(seed=7, error_rate_5xx=0.3, models={"m": ModelKnobs(error_rate_429=0.3)})
        async with ProviderSimulator(config) as sim, httpx.AsyncClient() as http:
            outcomes.append([(await chat(http, sim, "m")).status_code for _ in range(20)])
    assert outcomes[0] == outcomes[1]
    assert {200, 429, 503} <= set(outcomes[0])


async def test_model_rpm_limit_answers_429_with_retry_after() -> None:
    clock = FakeClock()
    config = SimulatorConfig(models={"limited": ModelKnobs(rpm_limit=3)})
    async with ProviderSimulator(config, clock=clock) as sim, httpx.AsyncClient() as http:
        for _ in range(3):
            assert (await chat(http, sim, "limited")).status_code == 200
            clock.now += 10
        # accepted at 0, 10 and 20; now 30: the one at 0 leaves the window at 60
        limited = await chat(http, sim, "limited")
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "30"
        assert "limited" in limited.json()["error"]["message"]
        assert (await chat(http, sim, "other")).status_code == 200  # the limit is per model
        clock.now += 29.5
        assert (await chat(http, sim, "limited")).headers["retry-after"] == "1"  # 0.5 s, at least 1
        clock.now += 0.5  # 60: the first request is out of (0, 60]
        assert (await chat(http, sim, "limited")).status_code == 200
        stats = (await http.get(f"{sim.root_url}/_sim/stats")).json()
    assert stats["stats"]["limit_429"] == 2
    model = stats["models"]["limited"]
    assert (model["requests"], model["ok"], model["limit_429"], model["max_in_60s"]) == (6, 4, 2, 3)
    assert stats["models"]["other"]["ok"] == 1
    assert stats["models"] == sim.model_stats()


async def test_rpm_limit_holds_under_concurrency() -> None:
    config = SimulatorConfig(latency_ms=50, models={"m": ModelKnobs(rpm_limit=2)})
    async with ProviderSimulator(config) as sim, httpx.AsyncClient() as http:
        responses = await asyncio.gather(*(chat(http, sim, "m") for _ in range(6)))
    assert sorted(r.status_code for r in responses) == [200, 200, 429, 429, 429, 429]
    assert all(int(r.headers["retry-after"]) in (59, 60) for r in responses if r.status_code == 429)
    assert sim.model_stats()["m"]["max_in_60s"] == 2


async def test_max_in_60s_is_the_sliding_window_maximum() -> None:
    clock = FakeClock()
    start = clock.now
    async with ProviderSimulator(SimulatorConfig(), clock=clock) as sim, httpx.AsyncClient() as http:
        tokens = 0
        for offset in (0, 30, 59, 61, 62, 95, 200):
            clock.now = start + offset
            response = await chat(http, sim, "m")
            assert response.status_code == 200
            tokens = response.json()["usage"]["total_tokens"]
    stats = sim.model_stats()["m"]
    # windows ending at each acceptance: 1, 2, 3, 3 (30, 59, 61), 4 (30..62), 4 (59..95), 1
    assert stats["max_in_60s"] == 4
    assert stats["ok"] == 7
    assert stats["tokens"] == 7 * tokens  # same request, same reply
    assert stats["max_tokens_in_60s"] == 4 * tokens


async def test_model_tpm_limit() -> None:
    clock = FakeClock()
    async with ProviderSimulator(SimulatorConfig(), clock=clock) as sim, httpx.AsyncClient() as http:
        first = (await chat(http, sim, "m", "x" * 400)).json()["usage"]
        total, prompt = first["total_tokens"], first["prompt_tokens"]
        assert prompt == 100
        # room for one more identical request (its prompt is estimated before answering), not two
        sim.config.update({"models": {"m": {"tpm_limit": total + prompt}}})
        clock.now += 10
        assert (await chat(http, sim, "m", "x" * 400)).status_code == 200
        clock.now += 10
        limited = await chat(http, sim, "m", "x" * 400)
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "40"  # once the first has left, the request fits
        huge = await chat(http, sim, "m", "x" * 4 * (total + prompt + 1))
        assert huge.status_code == 429 and huge.headers["retry-after"] == "60"  # can never fit
    stats = sim.model_stats()["m"]
    assert stats["limit_429"] == 2 and stats["max_tokens_in_60s"] == 2 * total


async def test_model_price_overrides(sim: ProviderSimulator) -> None:
    sim.config.models["free"] = ModelKnobs(price_in_per_mtok=0, price_out_per_mtok=0)
    sim.config.models["dear"] = ModelKnobs(price_out_per_mtok=1_000_000)
    async with httpx.AsyncClient() as http:
        free = (await chat(http, sim, "free")).json()["usage"]
        dear = (await chat(http, sim, "dear")).json()["usage"]
        normal = (await chat(http, sim, "normal")).json()["usage"]
    assert free["cost"] == 0
    assert dear["cost"] == pytest.approx(dear["prompt_tokens"] * 0.30 / 1e6 + dear["completion_tokens"])
    assert normal["cost"] == pytest.approx(
        (normal["prompt_tokens"] * 0.30 + normal["completion_tokens"] * 2.50) / 1e6
    )


async def test_model_image_cost_override_for_chat_images(sim: ProviderSimulator) -> None:
    sim.config.models["sim/image"] = ModelKnobs(image_cost=0.5)
    images = OpenRouterImageProvider(
        base_url=sim.base_url, api_key=None, model="sim/image", timeout_s=10, send_openrouter_extras=True
    )
    image = await images.generate("a glass lighthouse", 256, 256)
    assert image.cost == pytest.approx(0.5)
    assert sim.model_stats()["sim/image"]["tokens"] > 1290
    await images.aclose()


async def test_config_models_merge_and_validation(sim: ProviderSimulator) -> None:
    url = f"{sim.root_url}/_sim/config"
    async with httpx.AsyncClient() as http:
        response = await http.post(url, json={"models": {"m": {"rpm_limit": 5, "latency_ms": 10, "image_cost": 0.1}}})
        assert response.status_code == 200
        assert response.json()["models"]["m"]["rpm_limit"] == 5
        response = await http.post(url, json={"models": {"m": {"latency_ms": 20, "image_cost": None}, "n": {}}})
        assert response.status_code == 200
        assert sim.config.models["m"] == ModelKnobs(latency_ms=20, rpm_limit=5, image_cost=None)
        assert sim.config.models["n"] == ModelKnobs()
        got: dict[str, Any] = (await http.get(url)).json()
        assert got["models"]["m"] == {
            "latency_ms": 20.0, "error_rate_5xx": 0, "error_rate_429": 0, "rpm_limit": 5, "tpm_limit": 0,
            "price_in_per_mtok": None, "price_out_per_mtok": None, "image_cost": None, "image_cost_per_mpx": 0,
        }  # fmt: skip
        assert isinstance(got["models"]["m"]["rpm_limit"], int)

        bad_updates: list[Any] = [
            {"models": {"m": {"bogus": 1}}},
            {"models": {"m": {"rpm_limit": "5"}}},
            {"models": {"m": {"rpm_limit": 1.5}}},
            {"models": {"m": {"rpm_limit": -1}}},
            {"models": {"m": {"latency_ms": None}}},
            {"models": {"m": {"error_rate_5xx": True}}},
            {"models": {"m": 3}},
            {"models": {"": {}}},
            {"models": [1]},
            {"latency_ms": 5, "models": {"m": {"bogus": 1}}},  # nothing is changed
        ]
        for update in bad_updates:
            response = await http.post(url, json=update)
            assert response.status_code == 400, update
            assert response.json()["error"]["message"]
        assert sim.config.latency_ms == 0
        assert sim.config.models["m"] == ModelKnobs(latency_ms=20, rpm_limit=5)

        assert (await http.post(url, json={"models": {"n": None}})).status_code == 200
        assert "n" not in sim.config.models


def test_config_update_in_process() -> None:
    config = SimulatorConfig()
    config.update({"models": {"a": {"tpm_limit": 1000.0, "error_rate_429": 0.5}}, "seed": 3})
    assert config.models["a"] == ModelKnobs(tpm_limit=1000, error_rate_429=0.5)
    assert config.seed == 3
    with pytest.raises(ValueError, match="unknown knob"):
        config.update({"models": {"a": {"rpm": 1}}})
    assert config.knobs("missing") == ModelKnobs()


async def test_sim_files_unknown_is_404(sim: ProviderSimulator) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{sim.root_url}/_sim/files/unknown.png")
    assert response.status_code == 404
    assert sim.runware_url == f"http://127.0.0.1:{sim.port}/runware/v1"


async def test_runware_file_is_served_and_bounded(sim: ProviderSimulator) -> None:
    task = {
        "taskType": "imageInference",
        "taskUUID": "9f3c2f9e-33d5-4c3d-9a43-3a8a2a0f5a11",
        "positivePrompt": "tiny test",
        "model": "runware:100@1",
        "width": 128,
        "height": 192,
    }
    async with httpx.AsyncClient() as http:
        answer = (await http.post(sim.runware_url, json=[task], headers={"Authorization": "Bearer k"})).json()
        result = answer["data"][0]
        assert result["taskUUID"] == task["taskUUID"] and result["cost"] == pytest.approx(sim.config.image_cost)
        assert result["imageURL"] == f"{sim.root_url}/_sim/files/{result['imageUUID']}.png"
        served = await http.get(result["imageURL"])
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(served.content)).size == (128, 192)
    assert sim.stats["runware"] == 1 and sim.stats["requests"] == 1


async def test_short_batch_knob_answers_one_item_short() -> None:
    async with ProviderSimulator(SimulatorConfig(short_batch_rate=1.0)) as short_sim:
        client = llm(short_sim, MemoryRecorder())
        prompt = Prompt(system="You create characters.", user="Create exactly 7 characters for the world.")
        result = await client.structured(prompt, CharacterBatch, CALL)
        assert len(result.value.characters) == 6
        assert short_sim.stats["short_batch"] == 1
        await client.aclose()
