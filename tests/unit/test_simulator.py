from __future__ import annotations

import io
from collections.abc import AsyncIterator

import httpx
import pytest
from PIL import Image

from ai_worker.content.schemas import CharacterBatch, PostBatch, PostContent, WorldDescription
from ai_worker.devstack.simulator import ProviderSimulator, SimulatorConfig
from ai_worker.errors import InvalidOutput, ProviderTimeout, ProviderUnavailable, RateLimited
from ai_worker.images.openrouter import OpenRouterImageProvider
from ai_worker.llm.client import LLMClient, Prompt
from ai_worker.llm.history import CallContext, MemoryRecorder
from ai_worker.llm.retrying import NO_RETRY

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
    return LLMClient(
        base_url=sim.base_url,
        api_key=None,
        default_model="sim/model",
        model_overrides={},
        timeout_s=10,
        max_concurrency=4,
        max_tokens=4000,
        send_openrouter_extras=False,
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
    client = LLMClient(
        base_url=sim.base_url,
        api_key=None,
        default_model="sim/model",
        model_overrides={},
        timeout_s=0.3,
        max_concurrency=1,
        max_tokens=100,
        send_openrouter_extras=False,
        recorder=MemoryRecorder(),
        retry=NO_RETRY,
    )
    with pytest.raises(ProviderTimeout):
        await client.structured(Prompt(system="s", user="u"), PostContent, CALL)
    await client.aclose()
