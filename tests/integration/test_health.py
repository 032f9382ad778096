"""/ready of a real worker follows its database: 503 (naming mongodb) while it is stopped, 200 when it is back;
/health stays 200 throughout. The database is this test's own (the session's is shared)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import WorkerEnv

from ai_worker.devstack.processes import DatabaseProcess, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


async def _wait_ready(http: httpx.AsyncClient, status: int, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            res = await http.get("/ready")
            last = (res.status_code, res.json())
            if res.status_code == status:
                return dict(res.json())
        except httpx.HTTPError as exc:
            last = exc
        await asyncio.sleep(0.3)
    raise AssertionError(f"/ready did not answer {status} within {timeout_s} s; last: {last}")


async def test_ready_follows_the_database(wenv: WorkerEnv, tmp_path: Path) -> None:
    db = DatabaseProcess(tmp_path / "db", log_path=tmp_path / "db.log")
    await db.astart()
    try:
        await wenv.create_topics()
        port = free_port()
        worker = wenv.start_worker(MONGODB_URI=db.uri, SERVICE_HOST="127.0.0.1", SERVICE_PORT=str(port))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            body = await _wait_ready(http, 200, 60)
            assert body["failed"] == [] and body["checks"]["consumer"]["partitions"] >= 1

            await db.astop()
            body = await _wait_ready(http, 503, 20)
            assert "mongodb" in body["failed"], body
            assert (await http.get("/health")).status_code == 200

            await db.astart()  # same port, same data
            await _wait_ready(http, 200, 60)
        assert worker.poll() is None, wenv.log()
    finally:
        await db.astop()
