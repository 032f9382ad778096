"""Cost per world: the jobs' predictions per step, the predicted cost at the registry's prices, the default
budget, image sizes asked per step (priced by size), and the simulator charging by size."""

from __future__ import annotations

import io
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import MemoryRecorder
from PIL import Image

from ai_worker.config import load_settings
from ai_worker.devstack.simulator import ModelKnobs, ProviderSimulator, SimulatorConfig
from ai_worker.images.base import GeneratedImage, Size
from ai_worker.images.runware import RunwareImageProvider
from ai_worker.images.service import ImageService
from ai_worker.jobs import build_registry
from ai_worker.providers.budget import Reservation
from ai_worker.providers.cost import (
    DELIVERED_SIZES,
    UNMEASURED,
    BudgetPolicy,
    default_budget,
    predict_world_cost,
    step_tokens,
)
from ai_worker.providers.history import CallContext
from ai_worker.providers.registry import (
    IMAGE_STEPS,
    ModelChoice,
    ModelRegistry,
    RegistryError,
    StepTokens,
    load_registry,
    parse_registry,
)
from ai_worker.providers.retrying import NO_RETRY
from ai_worker.providers.routing import ModelRouter
from ai_worker.worlds.plan import Prediction, WorldPlan

ROOT = Path(__file__).resolve().parents[2]
JOBS = build_registry()
KEYS = {"OPENROUTER_API_KEY": "sk", "RUNWARE_API_KEY": "rw"}


def shipped(**choice: Any) -> ModelRegistry:
    return ModelRegistry(load_registry(ROOT / "models.toml"), choice=ModelChoice(**choice), env=KEYS)


def estimate(users: int, posts: int, registry: ModelRegistry | None = None, enhance: bool = False) -> Any:
    plan = WorldPlan(users, posts)
    return predict_world_cost(plan, JOBS.predict(plan), registry or shipped(), enhance=enhance)


# --- Prediction per step ----------------------------------------------------------------------------------

def test_prediction_totals_follow_the_steps() -> None:
    p = Prediction(tasks=2, llm_calls_by_step={"post": 3, "post_batch": 0}, images_by_step={"avatar": 2})
    assert (p.llm_calls, p.images) == (3, 2)
    assert dict(p.llm_calls_by_step) == {"post": 3}  # zero counts dropped
    q = p + Prediction(tasks=1, llm_calls=4, llm_calls_by_step={"post": 1})  # 3 calls no step claims
    assert (q.tasks, q.llm_calls, q.images, q.unattributed_llm_calls) == (3, 7, 2, 3)
    assert dict(q.llm_calls_by_step) == {"post": 4}
    assert Prediction(tasks=1, llm_calls=1).llm_calls == 1  # the old form still works
    with pytest.raises(ValueError, match="less than"):
        Prediction(llm_calls=1, llm_calls_by_step={"post": 2})
    with pytest.raises(TypeError):
        p.llm_calls_by_step["post"] = 9  # type: ignore[index]


@pytest.mark.parametrize(("users", "posts"), [(1, 0), (3, 6), (10, 50), (25, 150), (7, 3), (100, 2000)])
def test_jobs_name_the_step_of_every_call(users: int, posts: int) -> None:
    plan = WorldPlan(users, posts)
    p = JOBS.predict(plan)
    assert p.unattributed_llm_calls == 0 and p.unattributed_images == 0
    assert dict(p.llm_calls_by_step) == {k: v for k, v in {
        "world_description": 1, "character_batch": plan.character_batches(), "post_batch": plan.post_batches(),
        "post": posts}.items() if v}
    assert dict(p.images_by_step) == {k: v for k, v in {
        "world_header": 1, "world_icon": 1, "avatar": users, "post_image": posts}.items() if v}


# --- predicted cost -----------------------------------------------------------------------------------------

def test_default_world_costs_at_most_fifty_cents() -> None:
    e = estimate(25, 150)
    by = {s.step: s for s in e.steps}
    assert [s.step for s in e.steps] == ["world_description", "character_batch", "post_batch", "post",
                                         "world_header", "world_icon", "avatar", "post_image"]
    assert {s.model for s in e.steps if s.kind == "image"} == {"runware:100@1"}
    assert (by["world_header"].size, by["world_icon"].size, by["avatar"].size, by["post_image"].size) == (
        (1024, 512), (384, 384), (384, 384), (512, 512))
    assert by["post_image"].unit_usd == pytest.approx(0.003 * 512 * 512 / 1e6)
    assert by["avatar"].calls == 25 and by["post"].calls == 150 and by["post_batch"].calls == 25
    tokens = load_registry(ROOT / "models.toml").tokens["post"]
    assert by["post"].unit_usd == pytest.approx(tokens.prompt * 0.30e-6 + tokens.completion * 2.50e-6)
    assert e.total_usd == pytest.approx(e.llm_usd + e.image_usd)
    assert e.total_usd <= 0.50
    assert e.per_post_usd == pytest.approx(e.total_usd / 150)


def test_gemini_images_are_one_setting_away_and_cost_what_the_issue_says() -> None:
    e = estimate(25, 150, shipped(image_model="google/gemini-2.5-flash-image"))
    assert e.image_usd == pytest.approx(177 * 0.039)  # $6.90: every size up to 1024x1024 is one price
    assert e.llm_usd == pytest.approx(estimate(25, 150).llm_usd)
    provider = shipped(image_provider="openrouter")  # IMAGE_PROVIDER=openrouter picks the same model
    assert {s.model for s in estimate(25, 150, provider).steps if s.kind == "image"} == {
        "google/gemini-2.5-flash-image"}


def test_prompt_enhancement_adds_one_llm_call_per_image() -> None:
    plain, enhanced = estimate(25, 150), estimate(25, 150, enhance=True)
    extra = [s for s in enhanced.steps if s.step == "image_prompt"]
    assert len(extra) == 1 and extra[0].calls == 177
    assert enhanced.total_usd == pytest.approx(plain.total_usd + extra[0].cost_usd)


def test_step_tokens_fall_back_to_default_then_to_the_largest() -> None:
    tokens = {"post": StepTokens(prompt=10, completion=5), "post_batch": StepTokens(prompt=3, completion=9)}
    assert step_tokens(tokens, "post") == StepTokens(prompt=10, completion=5)
    assert step_tokens(tokens, "image_prompt") == StepTokens(prompt=10, completion=9)
    tokens["default"] = StepTokens(prompt=1, completion=1)
    assert step_tokens(tokens, "image_prompt") == StepTokens(prompt=1, completion=1)
    assert step_tokens({}, "post") == UNMEASURED  # a registry without [tokens]: a generous guess, not zero


def test_unattributed_calls_are_priced_at_the_default_models() -> None:
    registry = shipped()
    e = predict_world_cost(WorldPlan(1, 1), Prediction(llm_calls=2, images=1), registry)
    assert [(s.step, s.model, s.calls) for s in e.steps] == [
        ("other", "google/gemini-2.5-flash", 2), ("other", "runware:100@1", 1)]
    assert e.steps[1].size == DELIVERED_SIZES["post_image"]


def test_prediction_is_constant_time_in_the_world_size() -> None:
    e = estimate(10**9, 10**10)  # refused by validation, but nothing loops over characters or posts
    assert e.calls("image") == 2 + 10**9 + 10**10


# --- default budget -----------------------------------------------------------------------------------------

def test_budget_policy() -> None:
    policy = BudgetPolicy(factor=3.0, floor_usd=1.0)
    assert policy.budget(0.01) == 1.0  # tiny worlds get the floor
    assert policy.budget(0.5) == 1.5
    assert policy.budget(0.70001) == 2.11  # rounded up to the cent
    assert BudgetPolicy(cap_usd=0.25).budget(100.0) == 0.25  # WORLD_BUDGET_USD is an explicit cap
    assert "WORLD_BUDGET_FACTOR" in policy.describe() and "WORLD_BUDGET_USD" in BudgetPolicy(cap_usd=2).describe()


def test_settings_defaults_for_the_budget() -> None:
    settings = load_settings(check=False, MONGODB_URI="m", KAFKA_BROKERS="k", WORLD_BUDGET_USD=None)
    policy = BudgetPolicy.from_settings(settings)
    assert (policy.cap_usd, policy.factor, policy.floor_usd) == (None, 3.0, 1.0)
    explicit = load_settings(check=False, MONGODB_URI="m", KAFKA_BROKERS="k", WORLD_BUDGET_USD="7.5",
                             WORLD_BUDGET_FACTOR="4", WORLD_BUDGET_MIN_USD="0.2")
    assert BudgetPolicy.from_settings(explicit) == BudgetPolicy(cap_usd=7.5, factor=4.0, floor_usd=0.2)


@pytest.mark.parametrize(("users", "posts"), [(3, 6), (25, 150), (100, 2000), (500, 5000)])
def test_default_budget_covers_the_predicted_cost_with_the_factor(users: int, posts: int) -> None:
    registry = shipped()
    budget_for = default_budget(JOBS.predict, registry, BudgetPolicy())
    predicted = estimate(users, posts, registry).total_usd
    budget = budget_for(WorldPlan(users, posts))
    assert budget >= 3.0 * predicted and budget >= 1.0
    assert budget - predicted >= 0.5  # room for the reservations in flight (20 LLM calls at max_tokens)
    if (users, posts) == (100, 2000):
        assert budget == pytest.approx(math.ceil(3 * predicted * 100) / 100)
        assert budget < 25.0  # the old fixed cap; the Gemini world of that size would pass it
        gemini = estimate(100, 2000, shipped(image_model="google/gemini-2.5-flash-image")).total_usd
        assert gemini > 25.0
        assert default_budget(JOBS.predict, shipped(image_model="google/gemini-2.5-flash-image"),
                              BudgetPolicy())(WorldPlan(100, 2000)) >= 3 * gemini


# --- registry: tokens, image sizes, price per megapixel ---------------------------------------------------

def base_table(**image_model: Any) -> dict[str, Any]:
    return {
        "defaults": {"llm": "l", "image": "i"},
        "providers": {"p": {"kind": "openai", "base_url": "http://x/v1"}, "rw": {"kind": "runware"}},
        "models": {"l": {"provider": "p", "kind": "llm"}, "i": {"provider": "rw", "kind": "image", **image_model}},
    }


def test_registry_validates_tokens_and_image_sizes() -> None:
    table = parse_registry({**base_table(price_per_mpx=0.01, image_sizes={"avatar": "256x256"}),
                            "tokens": {"post": {"prompt": 5, "completion": 6}}})
    model = ModelRegistry(table).primary("avatar", "image")
    assert model.source_size("avatar", 512, 512) == (256, 256)
    assert model.source_size("post_image", 512, 512) == (512, 512)
    assert model.image_price(1000, 1000) == pytest.approx(0.01)
    assert hash(model)  # resolved models stay hashable
    for bad, match in [
        ({**base_table(), "tokens": {"poem": {"prompt": 1, "completion": 1}}}, "unknown LLM step"),
        ({**base_table(), "tokens": {"post": {"prompt": -1, "completion": 1}}}, "tokens"),
        (base_table(image_sizes={"avatar": "big"}), "WIDTHxHEIGHT"),
        (base_table(image_sizes={"avatar": "4096x512"}), "64..2048"),
        (base_table(image_sizes={"post": "512x512"}), "unknown image step"),
    ]:
        with pytest.raises(RegistryError, match=match):
            parse_registry(bad)
    llm_sizes = base_table()
    llm_sizes["models"]["l"]["image_sizes"] = {"avatar": "256x256"}
    with pytest.raises(RegistryError, match="for image models"):
        parse_registry(llm_sizes)


def test_shipped_registry_measures_every_llm_step_and_prices_every_image_step() -> None:
    table = load_registry(ROOT / "models.toml")
    assert set(table.tokens) >= {"world_description", "character_batch", "post_batch", "post", "image_prompt"}
    registry = shipped()
    for step in IMAGE_STEPS:
        model = registry.primary(step, "image")
        assert model.image_price(*model.source_size(step, *DELIVERED_SIZES[step])) > 0


# --- the size asked per step: reserved, asked and recorded -------------------------------------------------

class FakeProvider:
    name = "fake"
    model = "i"

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, Size | None]] = []

    async def generate(self, prompt: str, width: int, height: int, *, source: Size | None = None) -> GeneratedImage:
        self.calls.append((width, height, source))
        return GeneratedImage(data=b"png", content_type="image/png", width=width, height=height, model=self.model,
                              provider=self.name)


class Ledger:
    def __init__(self) -> None:
        self.reserved: list[float] = []
        self.settled: list[float] = []

    async def reserve(self, call: CallContext, kind: str, max_cost: float) -> Reservation:
        self.reserved.append(max_cost)
        return Reservation(world_id=None, day=None, amount=max_cost)

    async def settle(self, reservation: Reservation, actual_cost: float, *, counted: bool = True) -> None:
        self.settled.append(actual_cost)


async def test_image_service_asks_the_step_size_and_reserves_its_price() -> None:
    registry = ModelRegistry(parse_registry(base_table(price_per_image=0.001, price_per_mpx=0.01,
                                                       image_sizes={"avatar": "256x256"})))
    provider, ledger, recorder = FakeProvider(), Ledger(), MemoryRecorder()
    service = ImageService(ModelRouter(registry), recorder, providers=lambda _m: provider, retry=NO_RETRY,
                           budget=ledger)
    avatar = await service.generate("a face", 512, 512, CallContext("t", "w", "avatar"))
    post = await service.generate("a post", 512, 512, CallContext("t", "w", "post_image"))
    assert (avatar.width, avatar.height, post.width) == (512, 512, 512)
    assert provider.calls == [(512, 512, (256, 256)), (512, 512, None)]
    small, full = 0.001 + 0.01 * 256 * 256 / 1e6, 0.001 + 0.01 * 512 * 512 / 1e6
    assert ledger.reserved == pytest.approx([small, full])
    assert ledger.settled == pytest.approx([small, full])  # no cost from the provider: the registry's price
    first, second = recorder.records
    assert (first.request_data["width"], first.request_data["source_width"], first.cost) == (512, 256,
                                                                                              pytest.approx(small))
    assert "source_width" not in second.request_data


@pytest.fixture
async def sim() -> AsyncIterator[ProviderSimulator]:
    simulator = ProviderSimulator(SimulatorConfig(seed=3))
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


async def test_runware_is_asked_the_source_size_and_charged_by_size(sim: ProviderSimulator) -> None:
    sim.config.models["runware:100@1"] = ModelKnobs(image_cost=0.0, image_cost_per_mpx=0.003)
    sent: list[dict[str, Any]] = []

    async def spy(request: httpx.Request) -> None:
        if request.method == "POST":
            import json

            sent.extend(json.loads(request.content))

    async with httpx.AsyncClient(event_hooks={"request": [spy]}) as http:
        provider = RunwareImageProvider(sim.runware_url, "k", "runware:100@1", 10, http=http)
        image = await provider.generate("a portrait", 512, 512, source=(384, 384))
        full = await provider.generate("a post", 512, 512)
    assert [(t["width"], t["height"]) for t in sent] == [(384, 384), (512, 512)]
    assert Image.open(io.BytesIO(image.data)).size == (512, 512)  # the platform still gets its size
    assert image.cost == pytest.approx(0.003 * 384 * 384 / 1e6)
    assert full.cost == pytest.approx(0.003 * 512 * 512 / 1e6)


def test_simulator_charges_the_registry_prices_but_keeps_explicit_knobs() -> None:
    from ai_worker.devstack.simulator import charge_registry_prices

    config = SimulatorConfig()
    config.models["google/gemini-2.5-flash-image"] = ModelKnobs(image_cost=0.5, latency_ms=3)
    charge_registry_prices(config, shipped())
    assert config.models["runware:100@1"] == ModelKnobs(image_cost=0.0, image_cost_per_mpx=0.003)
    assert config.models["google/gemini-2.5-flash"].price_out_per_mtok == 2.5
    assert config.models["google/gemini-2.5-flash-image"] == ModelKnobs(image_cost=0.5, latency_ms=3)
