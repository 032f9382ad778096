from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

import httpx
import pytest
from fakes import MemoryRecorder
from PIL import Image

from ai_worker.config import load_settings
from ai_worker.errors import InvalidImage, ProviderRejected, ProviderUnavailable, RateLimited
from ai_worker.images.base import GeneratedImage
from ai_worker.images.offline import OfflineImageProvider
from ai_worker.images.openrouter import OpenRouterImageProvider, decode_data_url, nearest_aspect_ratio
from ai_worker.images.service import ImageService
from ai_worker.images.validate import normalize_image
from ai_worker.providers.history import CallContext
from ai_worker.providers.retrying import NO_RETRY

CALL = CallContext(task_id="t-1", world_id="w-1", request_type="generate_world_image", attempt=1)


def make_image(width: int, height: int, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    image = Image.new(mode, (width, height), (200, 40, 40) if mode == "RGB" else (200, 40, 40, 128))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def open_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


@pytest.mark.parametrize(
    ("src", "dst"), [((300, 200), (512, 512)), ((1024, 1024), (1024, 512)), ((64, 64), (64, 64))]
)
def test_normalize_gives_exact_size_png(src: tuple[int, int], dst: tuple[int, int]) -> None:
    out = normalize_image(make_image(*src), "image/png", *dst)
    assert open_png(out).size == dst


def test_normalize_converts_mismatched_type() -> None:
    jpeg = make_image(100, 80, "JPEG")
    out = normalize_image(jpeg, "image/png", 50, 50)
    assert open_png(out).size == (50, 50)


def test_normalize_keeps_alpha() -> None:
    out = normalize_image(make_image(40, 40, "PNG", "RGBA"), None, 20, 20)
    assert open_png(out).mode == "RGBA"


@pytest.mark.parametrize("data", [b"", b"<html>not an image</html>", make_image(20, 20)[:30]])
def test_normalize_rejects_non_images(data: bytes) -> None:
    with pytest.raises(InvalidImage):
        normalize_image(data, "image/png", 10, 10)


async def test_offline_provider_size_and_determinism() -> None:
    provider = OfflineImageProvider()
    first = await provider.generate("a lighthouse on a cliff at night", 1024, 512)
    again = await provider.generate("a lighthouse on a cliff at night", 1024, 512)
    other = await provider.generate("a desert market at noon", 1024, 512)
    assert open_png(first.data).size == (1024, 512)
    assert (first.width, first.height, first.content_type) == (1024, 512, "image/png")
    assert first.data == again.data
    assert first.data != other.data
    assert first.provider == "offline" and first.cost == 0.0


def image_response(png: bytes, cost: float = 0.04, mime: str = "image/png") -> dict[str, Any]:
    url = f"data:{mime};base64," + base64.b64encode(png).decode()
    return {
        "id": "gen-img",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "here you go",
                    "images": [{"type": "image_url", "image_url": {"url": url}}],
                },
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1290, "cost": cost},
    }


def provider_with(handler: Any, extras: bool = True) -> OpenRouterImageProvider:
    return OpenRouterImageProvider(
        base_url="https://img.example/api/v1",
        api_key="sk-img",
        model="test/image-model",
        timeout_s=5,
        send_openrouter_extras=extras,
        http=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )


async def test_openrouter_provider_happy_path() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/chat/completions"
        assert request.headers["authorization"] == "Bearer sk-img"
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=image_response(make_image(800, 800, "JPEG"), mime="image/png"))

    provider = provider_with(handler)
    image = await provider.generate("a castle", 1024, 512)
    assert isinstance(image, GeneratedImage)
    assert open_png(image.data).size == (1024, 512)
    assert image.cost == pytest.approx(0.04)
    assert image.model == "test/image-model"
    body = seen[0]
    assert body["modalities"] == ["image", "text"]
    assert body["usage"] == {"include": True}
    assert "1024x512" in body["messages"][0]["content"]
    assert body["messages"][0]["content"].startswith("a castle")


async def test_openrouter_provider_without_image_is_invalid() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = image_response(b"")
        del body["choices"][0]["message"]["images"]
        return httpx.Response(200, json=body)

    with pytest.raises(InvalidImage):
        await provider_with(handler).generate("x", 64, 64)


async def test_openrouter_provider_garbage_image_is_invalid() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=image_response(b"definitely not a png"))

    with pytest.raises(InvalidImage):
        await provider_with(handler).generate("x", 64, 64)


@pytest.mark.parametrize(
    ("status", "expected"), [(429, RateLimited), (500, ProviderUnavailable), (400, ProviderRejected)]
)
async def test_openrouter_provider_http_errors(status: int, expected: type[Exception]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": {"code": status, "message": "nope"}})

    with pytest.raises(expected):
        await provider_with(handler).generate("x", 64, 64)


async def test_openrouter_provider_error_object_in_200() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"error": {"code": 503, "message": "upstream down"}})

    with pytest.raises(ProviderUnavailable):
        await provider_with(handler).generate("x", 64, 64)


def test_decode_data_url_and_aspect_ratio() -> None:
    data, mime = decode_data_url("data:image/webp;base64," + base64.b64encode(b"abc").decode())
    assert (data, mime) == (b"abc", "image/webp")
    with pytest.raises(InvalidImage):
        decode_data_url("https://example.com/x.png")
    assert nearest_aspect_ratio(512, 512) == "1:1"
    assert nearest_aspect_ratio(1024, 512) == "16:9"


async def test_service_records_success_without_bytes() -> None:
    recorder = MemoryRecorder()
    service = ImageService.single(OfflineImageProvider(), max_concurrency=2, recorder=recorder)
    image = await service.generate("a red fox", 256, 256, CALL)
    [record] = recorder.records
    assert record.api_type == "image_generation"
    assert record.status == "ok"
    assert record.request_data == {
        "prompt": "a red fox",
        "width": 256,
        "height": 256,
        "model": "offline-renderer",
    }
    assert record.response_data == {
        "width": 256,
        "height": 256,
        "bytes": len(image.data),
        "content_type": "image/png",
    }
    assert (record.task_id, record.world_id) == ("t-1", "w-1")


async def test_service_records_failure_with_status_and_cost() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return httpx.Response(503, json={"error": {"code": 503, "message": "busy"}})
        return httpx.Response(200, json=image_response(make_image(64, 64), cost=0.039))

    recorder = MemoryRecorder()
    service = ImageService.single(provider_with(handler), max_concurrency=1, recorder=recorder, retry=NO_RETRY)
    with pytest.raises(ProviderUnavailable):
        await service.generate("x", 64, 64, CALL)
    await service.generate("x", 64, 64, CALL)
    first, second = recorder.records
    assert (first.status, first.status_code, first.error_type) == ("error", 503, "provider_unavailable")
    assert second.status == "ok"
    assert second.cost == pytest.approx(0.039)
    await service.aclose()


async def test_the_image_slot_is_free_while_the_image_is_recorded() -> None:
    """One slot: the second image is asked for while the first one's history record is still being written."""
    writing = asyncio.Event()
    asked = 0

    class SlowRecorder(MemoryRecorder):
        async def record(self, record: Any) -> None:
            if not self.records:
                await writing.wait()
            await super().record(record)

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal asked
        asked += 1
        if asked == 2:
            writing.set()  # the first image is still recording: its slot was given back
        return httpx.Response(200, json=image_response(make_image(64, 64)))

    service = ImageService.single(provider_with(handler), max_concurrency=1, recorder=SlowRecorder(), retry=NO_RETRY)
    await asyncio.wait_for(asyncio.gather(*(service.generate("x", 64, 64, CALL) for _ in range(2))), 5.0)
    assert asked == 2
    await service.aclose()


def test_from_settings_picks_provider() -> None:
    recorder = MemoryRecorder()
    base = {"MONGODB_URI": "mongodb://db", "KAFKA_BROKERS": "k:9092", "OPENROUTER_API_KEY": "sk-x"}
    offline = ImageService.from_settings(load_settings(**base, IMAGE_PROVIDER="offline"), recorder)
    assert isinstance(offline.provider, OfflineImageProvider)
    online = ImageService.from_settings(load_settings(**base, IMAGE_PROVIDER="openrouter", IMAGE_MODEL="m/img"),
                                        recorder)
    assert isinstance(online.provider, OpenRouterImageProvider)
    assert online.provider.model == "m/img"
    assert online.provider.name == "openrouter"
