from __future__ import annotations

import io
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from PIL import Image

from ai_worker.devstack.simulator import ModelKnobs, ProviderSimulator, SimulatorConfig
from ai_worker.errors import (
    InvalidImage,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    WorkerError,
)
from ai_worker.images.offline import render_placeholder
from ai_worker.images.runware import RunwareImageProvider, error_for_runware_errors, runware_side
from ai_worker.providers.http_errors import status_of

MODEL = "runware:100@1"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def sim() -> AsyncIterator[ProviderSimulator]:
    simulator = ProviderSimulator(SimulatorConfig(seed=1))
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


def provider(sim: ProviderSimulator, http: httpx.AsyncClient | None = None) -> RunwareImageProvider:
    return RunwareImageProvider(base_url=sim.runware_url, api_key="sim-key", model=MODEL, timeout_s=10, http=http)


def task(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "positivePrompt": "a glass lighthouse",
        "model": MODEL,
        "width": 512,
        "height": 512,
        "numberResults": 1,
        "outputType": "URL",
        "outputFormat": "PNG",
        "includeCost": True,
    }
    values.update(overrides)
    return values


def test_runware_side() -> None:
    assert [runware_side(n) for n in (1, 64, 128, 200, 300, 512, 513, 2048, 5000)] == [
        128, 128, 128, 256, 320, 512, 576, 2048, 2048,
    ]  # fmt: skip


async def test_success_512(sim: ProviderSimulator) -> None:
    images = provider(sim)
    image = await images.generate("a glass lighthouse at dusk", 512, 512)
    decoded = Image.open(io.BytesIO(image.data))
    assert decoded.format == "PNG" and decoded.size == (512, 512)
    assert (image.width, image.height, image.provider, image.model) == (512, 512, "runware", MODEL)
    assert image.cost == pytest.approx(sim.config.image_cost)
    assert sim.stats["runware"] == 1
    stats = sim.model_stats()[MODEL]
    assert stats["requests"] == 1 and stats["ok"] == 1 and stats["max_in_60s"] == 1
    await images.aclose()


async def test_odd_size_is_rounded_then_normalised_and_cost_override(sim: ProviderSimulator) -> None:
    sim.config.models[MODEL] = ModelKnobs(image_cost=0.0013)
    sent: list[dict[str, Any]] = []

    async def capture(request: httpx.Request) -> None:
        if request.method == "POST":
            sent.extend(json.loads(request.content))

    async with httpx.AsyncClient(event_hooks={"request": [capture]}) as http:
        image = await provider(sim, http).generate("a floating market", 300, 200)
    assert Image.open(io.BytesIO(image.data)).size == (300, 200)
    assert (image.width, image.height) == (300, 200)
    assert image.cost == pytest.approx(0.0013)
    assert len(sent) == 1
    assert (sent[0]["width"], sent[0]["height"]) == (320, 256)
    assert sent[0]["taskType"] == "imageInference" and sent[0]["model"] == MODEL
    assert uuid.UUID(sent[0]["taskUUID"]).version == 4


async def test_simulator_rejects_bad_size_with_errors_body(sim: ProviderSimulator) -> None:
    async with httpx.AsyncClient() as http:
        bad = task(width=300)
        response = await http.post(sim.runware_url, json=[bad])
        assert response.status_code == 400
        error = response.json()["errors"][0]
        assert error["code"] == "invalidWidth" and error["parameter"] == "width"
        assert error["taskUUID"] == bad["taskUUID"]
        invalid: list[dict[str, Any]] = [
            {"height": 4096},
            {"height": 64},
            {"width": True},
            {"positivePrompt": "x"},
            {"taskUUID": "no"},
        ]
        for overrides in invalid:
            response = await http.post(sim.runware_url, json=[task(**overrides)])
            assert response.status_code == 400, overrides
            assert response.json()["errors"]
        not_array = await http.post(sim.runware_url, json=task())
        assert not_array.status_code == 400
        ok = await http.post(sim.runware_url, json=[task(width=2048, height=128)])
        assert ok.status_code == 200
    assert sim.stats["bad_request"] == 7


async def test_400_is_permanent(sim: ProviderSimulator) -> None:
    images = provider(sim)
    with pytest.raises(ProviderRejected) as info:
        await images.generate("", 512, 512)  # sent anyway: the server decides
    assert status_of(info.value) == 400
    assert "invalidPositivePrompt" in str(info.value)
    await images.aclose()


def mock_client(body: Any, status: int = 200, seen: list[httpx.Request] | None = None) -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        if request.method == "GET":
            png = render_placeholder("x", 128, 128)
            return httpx.Response(200, content=png, headers={"content-type": "image/png"})
        payload = body(request) if callable(body) else body
        return httpx.Response(status, json=payload)

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ({"code": "invalidModel", "message": "unknown model"}, ProviderRejected),
        ({"code": "somethingOdd", "message": "bad value", "parameter": "width"}, ProviderRejected),
        ({"code": "invalidApiKey", "message": "Invalid API key"}, ProviderRejected),
        ({"code": "insufficientCredits", "message": "top up your account"}, ProviderRejected),
        ({"code": "rateLimitExceeded", "message": "slow down"}, RateLimited),
        ({"code": "timeoutProvider", "message": "the provider did not answer"}, ProviderTimeout),
        ({"code": "unexpectedError", "message": "worker crashed"}, ProviderUnavailable),
        ({"message": "The width is invalid"}, ProviderRejected),
        ({}, ProviderUnavailable),
        ("plain string", ProviderUnavailable),
    ],
)
async def test_errors_array_with_200_is_classified(error: Any, expected: type[WorkerError]) -> None:
    async with mock_client({"errors": [error]}) as http:
        images = RunwareImageProvider("https://runware.test/v1", "key", MODEL, 5, http=http)
        with pytest.raises(WorkerError) as info:
            await images.generate("a prompt", 512, 512)
    assert type(info.value) is expected
    assert status_of(info.value) == 200
    assert info.value.retryable == (expected is not ProviderRejected)


def test_error_for_runware_errors_without_errors() -> None:
    assert error_for_runware_errors({"data": []}) is None
    assert error_for_runware_errors({"errors": []}) is None


async def test_request_shape_auth_and_download_without_key() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> dict[str, Any]:
        sent = json.loads(request.content)[0]
        return {"data": [{"taskUUID": sent["taskUUID"], "imageURL": "https://cdn.test/i.png", "cost": 0.002}]}

    async with mock_client(answer, seen=seen) as http:
        image = await RunwareImageProvider("https://runware.test/v1/", "key", MODEL, 5, http=http).generate(
            "p q", 128, 128
        )
    assert image.cost == pytest.approx(0.002)
    post, get = seen
    assert post.method == "POST" and str(post.url) == "https://runware.test/v1"
    assert post.headers["authorization"] == "Bearer key"
    assert str(get.url) == "https://cdn.test/i.png" and "authorization" not in get.headers


@pytest.mark.parametrize(
    "body",
    [
        {"data": []},
        {"data": [{"taskUUID": "someone-else", "imageURL": "https://cdn.test/i.png"}]},
        {"data": [{"taskUUID": "<same>"}]},
        {"data": [{"taskUUID": "<same>", "imageURL": "ftp://cdn.test/i.png"}]},
    ],
)
async def test_answer_without_our_image_is_invalid_image(body: dict[str, Any]) -> None:
    def answer(request: httpx.Request) -> dict[str, Any]:
        text = json.dumps(body).replace("<same>", json.loads(request.content)[0]["taskUUID"])
        result: dict[str, Any] = json.loads(text)
        return result

    async with mock_client(answer) as http:
        with pytest.raises(InvalidImage):
            await RunwareImageProvider("https://runware.test/v1", None, MODEL, 5, http=http).generate("p q", 128, 128)


async def test_model_rpm_limit_gives_rate_limited_with_retry_after() -> None:
    clock = FakeClock()
    async with ProviderSimulator(SimulatorConfig(models={MODEL: ModelKnobs(rpm_limit=2)}), clock=clock) as sim:
        images = provider(sim)
        await images.generate("first image", 256, 256)
        clock.now += 15
        await images.generate("second image", 256, 256)
        clock.now += 5
        with pytest.raises(RateLimited) as info:
            await images.generate("third image", 256, 256)
        assert info.value.retry_after_s == 40.0  # the first leaves the window 60 s after it was accepted
        assert status_of(info.value) == 429
        clock.now += 40
        await images.generate("third image", 256, 256)
        stats = sim.model_stats()[MODEL]
        assert (stats["ok"], stats["limit_429"], stats["max_in_60s"], stats["tokens"]) == (3, 1, 2, 0)
        assert sim.stats["limit_429"] == 1
        await images.aclose()


async def test_global_429_and_5xx(sim: ProviderSimulator) -> None:
    images = provider(sim)
    sim.config.error_rate_429 = 1.0
    sim.config.retry_after_s = 3
    with pytest.raises(RateLimited) as limited:
        await images.generate("a prompt", 256, 256)
    assert limited.value.retry_after_s == 3.0
    sim.config.error_rate_429 = 0
    sim.config.error_rate_5xx = 1.0
    with pytest.raises(ProviderUnavailable) as down:
        await images.generate("a prompt", 256, 256)
    assert status_of(down.value) == 503
    sim.config.error_rate_5xx = 0
    sim.config.models[MODEL] = ModelKnobs(error_rate_5xx=1.0)
    with pytest.raises(ProviderUnavailable):
        await images.generate("a prompt", 256, 256)
    sim.config.models.clear()
    sim.config.image_error_rate = 1.0
    with pytest.raises(ProviderUnavailable) as failed:
        await images.generate("a prompt", 256, 256)
    assert status_of(failed.value) == 500
    stats = sim.model_stats()[MODEL]
    assert (stats["requests"], stats["error_429"], stats["error_5xx"], stats["ok"]) == (4, 1, 2, 0)
    await images.aclose()


class _MissingFiles(httpx.AsyncBaseTransport):
    """Forwards to the simulator, but asks for a file it does not have."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            request = httpx.Request("GET", request.url.copy_with(path="/_sim/files/gone.png"))
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_download_404_is_a_retryable_image_error(sim: ProviderSimulator) -> None:
    async with httpx.AsyncClient(transport=_MissingFiles()) as http:
        with pytest.raises(InvalidImage) as info:
            await provider(sim, http).generate("a prompt", 256, 256)
    assert status_of(info.value) == 404
    assert info.value.retryable


async def test_connection_refused_is_unavailable(sim: ProviderSimulator) -> None:
    url = sim.runware_url
    await sim.stop()
    images = RunwareImageProvider(url, "k", MODEL, 5)
    with pytest.raises(ProviderUnavailable):
        await images.generate("a prompt", 256, 256)
    await images.aclose()
