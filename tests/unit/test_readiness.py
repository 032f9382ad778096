"""/health and /ready of the worker's HTTP endpoint: status codes, bodies, bounded checks, the 1 s cache."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from ai_worker.observability.health import HealthServer
from ai_worker.observability.readiness import NotReady, Probe, Readiness


class Flags:
    def __init__(self) -> None:
        self.db_up = True
        self.calls = 0


@pytest.fixture
def flags() -> Flags:
    return Flags()


@pytest.fixture
async def server(flags: Flags) -> AsyncIterator[str]:
    async def mongodb() -> None:
        flags.calls += 1
        if not flags.db_up:
            raise ConnectionError("connection refused")

    async def kafka() -> dict[str, Any]:
        return {"brokers": 1}

    ready = Readiness({"mongodb": Probe(mongodb, 1.0), "kafka": Probe(kafka, 1.0)}, cache_s=0.2)
    health = HealthServer("127.0.0.1", 0, stats=lambda: {}, ready=ready)
    await health.start()
    try:
        yield f"http://127.0.0.1:{health.port}"
    finally:
        await health.stop()


async def test_ready_and_not_ready(server: str, flags: Flags) -> None:
    async with httpx.AsyncClient(base_url=server) as http:
        res = await http.get("/ready")
        assert res.status_code == 200
        body = res.json()
        assert body["status"] == "ready" and body["failed"] == []
        assert body["checks"]["kafka"] == {"ok": True, "ms": body["checks"]["kafka"]["ms"], "brokers": 1}

        flags.db_up = False
        await asyncio.sleep(0.25)  # past the cache
        res = await http.get("/ready")
        assert res.status_code == 503
        assert res.json()["failed"] == ["mongodb"]
        assert res.json()["checks"]["mongodb"] == {"ok": False, "error": "ConnectionError: connection refused"}
        assert (await http.get("/health")).json() == {"status": "ok"}  # liveness does not depend on the database

        flags.db_up = True
        await asyncio.sleep(0.25)
        assert (await http.get("/ready")).status_code == 200


async def test_results_are_cached_and_shared(server: str, flags: Flags) -> None:
    async with httpx.AsyncClient(base_url=server) as http:
        results = await asyncio.gather(*(http.get("/ready") for _ in range(10)))
        assert {r.status_code for r in results} == {200}
        assert flags.calls == 1  # ten probes at once, one database ping


async def test_a_hanging_check_is_bounded() -> None:
    async def hangs() -> None:
        await asyncio.sleep(3600)

    async def refuses() -> None:
        raise NotReady("no partitions assigned")

    ready = Readiness({"slow": Probe(hangs, 0.2), "consumer": Probe(refuses, 1.0)})
    ok, body = await asyncio.wait_for(ready.result(), 2)
    assert not ok and body["failed"] == ["slow", "consumer"]
    assert body["checks"]["slow"]["error"] == "no answer within 0.2 s"
    assert body["checks"]["consumer"]["error"] == "NotReady: no partitions assigned"
