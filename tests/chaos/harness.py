"""Shared helpers of the chaos scenarios: each scenario runs its OWN embedded stack (C2/C3 kill the broker or
the database, which must not hurt other tests), workers are separate OS processes with short timings.

The local platform runs in real-platform mode by default (`request_id` ignored: every create call creates, as
on the platform's own services), so the invariants count what the real platform would hold."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from invariants import WorldReport, check_world
from pymongo import AsyncMongoClient
from support import WorkerEnv, mongo

from ai_worker.client import send_world
from ai_worker.devstack.simulator import SimulatorConfig
from ai_worker.devstack.stack import EmbeddedStack

# Short timings: a lost lease is reclaimed in seconds, a SIGKILLed member leaves the group in ~3 s.
FAST = {
    "TASK_LEASE_S": "4",
    "RECONCILE_INTERVAL_S": "1",
    "RETRY_BASE_DELAY_S": "0.2",
    "RETRY_MAX_DELAY_S": "2",
    "SHUTDOWN_GRACE_S": "5",
    "KAFKA_SESSION_TIMEOUT_MS": "2000",
    "KAFKA_HEARTBEAT_INTERVAL_MS": "500",
    "LOG_LEVEL": "INFO",
}


@dataclass
class Chaos:
    stack: EmbeddedStack
    env: WorkerEnv
    client: AsyncMongoClient[dict[str, Any]]

    @property
    def platform_mode(self) -> str:
        return self.stack.platform_mode

    async def check(self, world_id: str, *, users: int, posts: int, expect_status: str = "completed",
                    may_duplicate: bool = False, billed_exact: bool = True) -> WorldReport:
        """The invariants (invariants.check_world) for a world of this stack, with the simulator's counts."""
        return await check_world(self.client, self.env.database, world_id, users=users, posts=posts,
                                 expect_status=expect_status, simulator=self.stack.simulator,
                                 platform_mode=self.platform_mode, may_duplicate=may_duplicate,
                                 billed_exact=billed_exact)

    def start_worker(self, name: str) -> Any:
        return self.env.start_worker(name, **FAST)

    async def send(self, users: int, posts: int, prompt: str = "A city of bells under a frozen sea") -> str:
        world_id, _ = await send_world(
            kafka=self.env.info.kafka_bootstrap, mongo_uri=self.env.info.mongo_uri, database=self.env.database,
            topic=self.env.tasks_topic, prompt=prompt, users=users, posts=posts)
        return world_id

    async def world_status(self, world_id: str) -> str | None:
        doc = await self.client[self.env.database]["world_generation_status"].find_one(
            {"_id": world_id}, {"status": 1})
        return str(doc["status"]) if doc else None

    async def wait_world(self, world_id: str, timeout_s: float, names: Sequence[str] = ()) -> str:
        """Poll until the world is terminal; tolerates a database that is down meanwhile."""
        deadline = time.monotonic() + timeout_s
        status: str | None = None
        while time.monotonic() < deadline:
            try:
                status = await self.world_status(world_id)
            except Exception:  # the database may be restarting
                status = None
            if status in ("completed", "failed"):
                return status
            await asyncio.sleep(0.3)
        raise AssertionError(f"world {world_id} not finished in {timeout_s}s (status {status})\n"
                             + self.tails(names))

    def count_logged(self, names: Sequence[str], event: str) -> int:
        """How many times the workers `names` logged `event` (e.g. a duplicate prevented by a look-up)."""
        total = 0
        for name in names:
            try:
                total += sum(1 for line in self.env.log_lines(name) if line.get("event") == event)
            except OSError:
                continue
        return total

    def tails(self, names: Sequence[str], lines: int = 40) -> str:
        out = []
        for name in names:
            try:
                text = self.env.log(name).splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"--- worker {name} ---\n" + "\n".join(text))
        return "\n".join(out)


@asynccontextmanager
async def chaos_stack(tmp_path: Path, *, latency_ms: float = 0,
                      platform_mode: Literal["local", "real"] = "real") -> AsyncIterator[Chaos]:
    stack = EmbeddedStack(tmp_path / "stack", simulator_config=SimulatorConfig(latency_ms=latency_ms),
                          platform_mode=platform_mode)
    info = await stack.start()
    env = WorkerEnv(info, tmp_path)
    client = mongo(info)
    try:
        await env.create_topics()
        yield Chaos(stack=stack, env=env, client=client)
    finally:
        await asyncio.to_thread(env.stop)
        await client.close()
        await stack.stop()
