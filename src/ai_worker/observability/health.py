"""The health/stats HTTP endpoint on SERVICE_HOST:SERVICE_PORT (0 = a free port).

GET /health -> liveness: 200 {"status": "ok"} whenever the event loop answers (restart the process when it
does not); GET /ready -> readiness: 200 when MongoDB and Kafka are reachable and the consumer is assigned and
polling, else 503 with a JSON body naming what failed (see readiness.py); GET /stats -> worker counters;
GET /metrics -> Prometheus text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ai_worker.observability.readiness import Readiness

log = structlog.get_logger(__name__)


class HealthServer:
    def __init__(self, host: str, port: int, stats: Callable[[], dict[str, Any]],
                 ready: Readiness | None = None) -> None:
        self._host = host
        self._port = port
        self._stats = stats
        self._ready = ready
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._readiness)
        app.router.add_get("/stats", self._stats_view)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        log.info("health endpoint listening", host=self._host, port=self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readiness(self, _: web.Request) -> web.Response:
        if self._ready is None:
            return web.json_response({"status": "ready", "failed": [], "checks": {}})
        ready, body = await self._ready.result()
        return web.json_response(body, status=200 if ready else 503)

    async def _stats_view(self, _: web.Request) -> web.Response:
        return web.json_response(self._stats())

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})
