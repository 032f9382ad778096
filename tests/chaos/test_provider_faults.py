"""C4: a faulty provider. The simulator answers 20% of requests with HTTP 503, 10% with 429 + Retry-After,
5% with malformed JSON, 5% with schema-invalid JSON, lets 2% hang past the client timeout, and fails 10% of
image generations. The in-call retries (PROVIDER_MAX_RETRIES), the repair re-ask and the task-level retries
together still complete the world with exactly N characters and M posts; every HTTP attempt, failed ones
included, is one `api_requests_history` document."""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

import pytest
from harness import FAST, chaos_stack
from invariants import record_result

FAULTS: dict[str, float] = {
    "error_rate_5xx": 0.20,
    "error_rate_429": 0.10,
    "retry_after_s": 0.5,
    "malformed_json_rate": 0.05,
    "schema_invalid_rate": 0.05,
    "hang_rate": 0.02,
    "hang_s": 60,
    "image_error_rate": 0.10,
}
WORKER = {
    **FAST,
    "LLM_TIMEOUT_S": "3",  # a hang is cut off after 3 s and retried
    "IMAGE_TIMEOUT_S": "3",
    "PROVIDER_MAX_RETRIES": "3",
    "PROVIDER_RETRY_BASE_S": "0.2",
    "PROVIDER_RETRY_MAX_S": "2",
}
NAMES = ("w1", "w2")


async def run_c4(tmp_path: Path, *, users: int, posts: int, seed: int, timeout_s: float) -> None:
    async with chaos_stack(tmp_path) as c:
        sim = c.stack.simulator
        sim.config.update({**FAULTS, "seed": seed})
        for name in NAMES:
            c.env.start_worker(name, **WORKER)
        t0 = time.monotonic()
        world_id = await c.send(users, posts)
        status = await c.wait_world(world_id, timeout_s, NAMES)
        elapsed = time.monotonic() - t0
        assert status == "completed", c.tails(NAMES)
        report = await c.check(world_id, users=users, posts=posts)

        stats = dict(sim.stats)
        history = [h async for h in c.client[c.env.database]["api_requests_history"].find(
            {"api_type": {"$in": ["llm", "image_generation"]}},
            {"api_type": 1, "status": 1, "status_code": 1, "error_type": 1, "error": 1, "attempt": 1,
             "world_id": 1})]
        assert all(h["world_id"] == world_id for h in history)
        # Every HTTP attempt the simulator saw is one history document, failed attempts included.
        assert len(history) == stats["requests"], (len(history), stats)
        errors = collections.Counter(h["error_type"] for h in history if h["status"] == "error")
        by_code = collections.Counter(h["status_code"] for h in history if h["status"] == "error")
        assert by_code[429] == stats.get("error_429", 0)
        simulated_outages = sum(1 for h in history if "simulated upstream outage" in (h.get("error") or ""))
        assert simulated_outages == stats.get("error_5xx", 0)
        image_failures = sum(1 for h in history if "simulated image generation failure" in (h.get("error") or ""))
        assert image_failures == stats.get("image_error", 0)
        assert errors["provider_timeout"] == stats.get("hang", 0)
        bad_outputs = stats.get("malformed_json", 0) + stats.get("schema_invalid", 0)
        assert errors["invalid_output"] <= bad_outputs
        assert errors["invalid_output"] >= max(stats.get("malformed_json", 0), stats.get("schema_invalid", 0))
        # The scenario really injected the faults, of several kinds, and the worker retried inside calls.
        kinds = {"rate_limited", "provider_unavailable", "invalid_output", "provider_timeout"}
        assert kinds <= set(errors), f"error types recorded: {dict(errors)}; simulator: {stats}"
        assert any(h["api_type"] == "image_generation" and h["status"] == "error" for h in history)
        assert max(h["attempt"] for h in history) >= 2
        print(f"C4 {users}/{posts}: completed in {elapsed:.1f}s; errors {dict(errors)}; simulator {stats}")
        faults = sum(errors.values())
        record_result("C4 provider faults (2 workers)", f"{users}/{posts}", faults, report, elapsed,
                      f"5xx 20%, 429 10%, malformed 5%, invalid 5%, hang 2%, image 10%; "
                      f"{stats['requests']} HTTP attempts; errors {_fmt(errors)}")


def _fmt(counter: collections.Counter[Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items()))


async def test_c4_provider_faults_ci(tmp_path: Path) -> None:
    await run_c4(tmp_path, users=3, posts=6, seed=17, timeout_s=60)


@pytest.mark.chaos
async def test_c4_provider_faults_chaos(tmp_path: Path) -> None:
    await run_c4(tmp_path, users=10, posts=30, seed=6, timeout_s=240)
