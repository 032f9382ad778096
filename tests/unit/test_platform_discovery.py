"""ServiceResolver against a small fake Consul over real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from ai_worker.errors import PlatformUnavailable
from ai_worker.platform.discovery import ServiceResolver, parse_consul_address


class FakeConsul:
    def __init__(self) -> None:
        self.services: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[tuple[str, str]] = []
        self.runner: web.AppRunner | None = None
        self.address = ""

    async def _health(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.requests.append((name, request.query.get("passing", "")))
        return web.json_response(self.services.get(name, []), headers={"X-Consul-Index": "7"})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/health/service/{name}", self._health)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.address = f"127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def _entry(address: str, port: int, node: str = "10.9.9.9") -> dict[str, Any]:
    return {
        "Node": {"Node": "n1", "Address": node},
        "Service": {"Address": address, "Port": port},
        "Checks": [],
    }


@pytest.fixture
async def consul() -> AsyncIterator[FakeConsul]:
    fake = FakeConsul()
    await fake.start()
    yield fake
    await fake.stop()


async def test_static_address_wins_without_asking_consul(consul: FakeConsul) -> None:
    consul.services["character-service"] = [_entry("10.0.0.1", 9000)]
    resolver = ServiceResolver(consul.address, {"character-service": "localhost:7000"}, cache_s=30)
    try:
        assert await resolver.resolve("character-service") == "localhost:7000"
        assert consul.requests == []
    finally:
        await resolver.close()


async def test_resolves_from_consul_and_caches(consul: FakeConsul) -> None:
    consul.services["media-service"] = [_entry("10.0.0.2", 9001)]
    resolver = ServiceResolver(consul.address, {"media-service": None, "post-service": ""}, cache_s=30)
    try:
        assert await resolver.resolve("media-service") == "10.0.0.2:9001"
        assert await resolver.resolve("media-service") == "10.0.0.2:9001"
        assert consul.requests == [("media-service", "1")]
        consul.services["media-service"] = [_entry("10.0.0.3", 9002)]
        resolver.invalidate("media-service")
        assert await resolver.resolve("media-service") == "10.0.0.3:9002"
        assert len(consul.requests) == 2
    finally:
        await resolver.close()


async def test_empty_service_address_falls_back_to_the_name(consul: FakeConsul) -> None:
    consul.services["post-service"] = [_entry("", 8083)]
    resolver = ServiceResolver(f"http://{consul.address}", {}, cache_s=0)
    try:
        assert await resolver.resolve("post-service") == "post-service:8083"
    finally:
        await resolver.close()


async def test_round_robin_over_healthy_instances(consul: FakeConsul) -> None:
    consul.services["world-service"] = [_entry("10.0.0.4", 1), _entry("10.0.0.5", 2)]
    resolver = ServiceResolver(consul.address, {}, cache_s=30)
    try:
        got = [await resolver.resolve("world-service") for _ in range(4)]
        assert got == ["10.0.0.4:1", "10.0.0.5:2", "10.0.0.4:1", "10.0.0.5:2"]
    finally:
        await resolver.close()


async def test_no_healthy_instance_is_unavailable(consul: FakeConsul) -> None:
    resolver = ServiceResolver(consul.address, {}, cache_s=30)
    try:
        with pytest.raises(PlatformUnavailable, match="no healthy instance"):
            await resolver.resolve("world-service")
    finally:
        await resolver.close()


async def test_unreachable_consul_is_unavailable() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    resolver = ServiceResolver(f"127.0.0.1:{port}", {}, cache_s=30, timeout_s=2)
    try:
        with pytest.raises(PlatformUnavailable) as info:
            await resolver.resolve("character-service")
        assert info.value.retryable
    finally:
        await resolver.close()


def test_parse_consul_address() -> None:
    assert parse_consul_address("consul:8500") == ("http", "consul", 8500)
    assert parse_consul_address("https://c.example") == ("https", "c.example", 443)
    assert parse_consul_address("http://10.1.2.3:18500") == ("http", "10.1.2.3", 18500)
