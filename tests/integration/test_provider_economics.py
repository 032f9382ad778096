"""Provider economics against the provider simulator over real HTTP: shared rate limits hold over a 60-second
window with two worker processes; fallback engages on repeated 5xx and recovers; per-model statistics.

The session's simulator is shared, so each test names its own models (the simulator keeps knobs, limits and
statistics per model name)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import MemoryRecorder
from support import WorkerEnv, mongo, wait_world

from ai_worker.content.schemas import PostContent
from ai_worker.devstack.stack import StackInfo
from ai_worker.images.service import ImageService, provider_factory
from ai_worker.llm.client import LLMClient, Prompt
from ai_worker.providers.breaker import BreakerBoard, BreakerState
from ai_worker.providers.history import CallContext
from ai_worker.providers.registry import ModelRegistry, parse_registry
from ai_worker.providers.retrying import ProviderRetry
from ai_worker.providers.routing import ModelRouter

pytestmark = pytest.mark.integration

RPM = 30  # per model; the simulator enforces the same limit and answers 429 past it


def sim_root(info: StackInfo) -> str:
    assert info.simulator_url is not None
    return info.simulator_url.removesuffix("/v1")


async def sim_config(info: StackInfo, models: dict[str, dict[str, Any]]) -> None:
    async with httpx.AsyncClient() as http:
        res = await http.post(f"{sim_root(info)}/_sim/config", json={"models": models})
        assert res.status_code == 200, res.text


async def sim_model_stats(info: StackInfo) -> dict[str, dict[str, int]]:
    async with httpx.AsyncClient() as http:
        res = await http.get(f"{sim_root(info)}/_sim/stats")
        stats: dict[str, dict[str, int]] = res.json()["models"]
        return stats


def registry_toml(llm: str, image: str, rpm: int) -> str:
    return f"""
[defaults]
llm = "{llm}"
image = "{image}"

[providers.sim]
kind = "openai"
base_url = "https://openrouter.ai/api/v1"
base_url_env = "LLM_BASE_URL"
api_key_env = "OPENROUTER_API_KEY"

[models."{llm}"]
provider = "sim"
kind = "llm"
rpm = {rpm}
tpm = 200000
max_concurrent = 8

[models."{image}"]
provider = "sim"
kind = "image"
base_url_env = "IMAGE_BASE_URL"
price_per_image = 0.01
rpm = {rpm}
max_concurrent = 4
"""


async def test_rate_limits_hold_over_60s_with_two_worker_processes(wenv: WorkerEnv, tmp_path: Path) -> None:
    llm_model, image_model = f"rl-{wenv.suffix}/llm", f"rl-{wenv.suffix}/img"
    registry = tmp_path / "models.toml"
    registry.write_text(registry_toml(llm_model, image_model, RPM))
    await sim_config(wenv.info, {llm_model: {"rpm_limit": RPM, "latency_ms": 50},
                                 image_model: {"rpm_limit": RPM, "latency_ms": 50}})
    await wenv.create_topics()
    # WORLD_BUDGET_USD: this registry prices images at $0.01 while the simulator charges its default $0.039, so
    # the default cap (a factor over the predicted cost at the registry's prices) would stop the world early.
    env = {"MODEL_REGISTRY_FILE": str(registry), "LLM_MAX_TOKENS": "2000", "PROVIDER_RETRY_MAX_S": "2",
           "WORLD_BUDGET_USD": "25"}
    workers = [wenv.start_worker("w1", **env), wenv.start_worker("w2", **env)]
    client = mongo(wenv.info)
    try:
        started = time.monotonic()
        world_id = wenv.send_message("--prompt", "A windmill town on a salt flat", "--users", "6", "--posts", "24")
        doc = await wait_world(client, wenv.database, world_id, timeout_s=240, procs=workers)
        elapsed = time.monotonic() - started
        assert doc["status"] == "completed", doc
        db = client[wenv.database]
        workers_used = await db["tasks"].distinct("worker_id", {"world_id": world_id})
        llm_calls = await db["api_requests_history"].count_documents({"world_id": world_id, "model": llm_model})
        image_calls = await db["api_requests_history"].count_documents({"world_id": world_id, "model": image_model})
        image_cost = sum([d["cost"] async for d in db["api_requests_history"].find({"model": image_model})])
    finally:
        wenv.stop()
    stats = await sim_model_stats(wenv.info)
    llm, image = stats[llm_model], stats[image_model]
    print(f"\n{elapsed:.1f}s; workers {sorted(workers_used)}; LLM {llm_calls} calls, max {llm['max_in_60s']} "
          f"in 60 s; images {image_calls}, max {image['max_in_60s']} in 60 s; limit {RPM}")
    assert len(workers_used) == 2, workers_used  # both processes took their share
    assert elapsed > 60, "the world must outlast one window for the check to mean anything"
    for model in (llm, image):
        assert model["limit_429"] == 0, model  # the simulator never had to refuse: we stayed under its limit
        assert model["max_in_60s"] <= RPM, model
    # The limit was really the bottleneck (so this test fails when limits stop being shared).
    assert max(llm["max_in_60s"], image["max_in_60s"]) >= RPM - 3
    assert llm_calls + image_calls > RPM * 1.5

    # The per-model summary: the collection and the command.
    out = await asyncio.to_thread(subprocess.run,
        [sys.executable, "-m", "ai_worker", "models", "stats", "--mongo", wenv.info.mongo_uri,
         "--database", wenv.database, "--json"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    rows = {row["model"]: row for row in json.loads(out.stdout)}
    assert rows[llm_model]["calls"] == llm_calls and rows[image_model]["calls"] == image_calls
    assert rows[llm_model]["success_rate"] == 1.0 and rows[llm_model]["p95_ms"] >= rows[llm_model]["p50_ms"] > 0
    assert rows[llm_model]["prompt_tokens"] > 0 and rows[image_model]["cost"] == pytest.approx(image_cost)
    table = await asyncio.to_thread(subprocess.run,
        [sys.executable, "-m", "ai_worker", "models", "stats", "--mongo", wenv.info.mongo_uri,
         "--database", wenv.database, "--world", world_id], capture_output=True, text=True, timeout=60,
        check=False, env={**os.environ, "COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    assert llm_model in table.stdout and "p95 ms" in table.stdout


def fallback_router(info: StackInfo, primary: str, backup: str, kind: str, breakers: BreakerBoard,
                    backup_provider: str = "sim") -> ModelRouter:
    table = parse_registry({
        "defaults": {"llm": primary if kind == "llm" else "x/llm", "image": primary if kind == "image" else "x/img"},
        "providers": {
            "sim": {"kind": "openai", "base_url": info.simulator_url},
            "rw": {"kind": "runware", "base_url": sim_root(info) + "/runware/v1"},
        },
        "models": {
            primary: {"provider": "sim", "kind": kind, "fallbacks": [backup]},
            backup: {"provider": backup_provider, "kind": kind, "model": "runware:100@1" if kind == "image" else None},
            "x/llm": {"provider": "sim", "kind": "llm"},
            "x/img": {"provider": "sim", "kind": "image"},
        },
    })
    return ModelRouter(ModelRegistry(table, env={}), breakers=breakers)


async def test_llm_fallback_engages_on_repeated_5xx_and_recovers(stack_info: StackInfo) -> None:
    sfx = uuid.uuid4().hex[:8]
    primary, backup = f"fb-{sfx}/primary", f"fb-{sfx}/backup"
    breakers = BreakerBoard(failure_threshold=3, cooldown_s=1.0)
    recorder = MemoryRecorder()
    client = LLMClient(router=fallback_router(stack_info, primary, backup, "llm", breakers), recorder=recorder,
                       retry=ProviderRetry(max_retries=3, base_s=0.01, max_s=0.05))
    prompt = Prompt(system="You write posts.", user="Write one post about the harbour.")
    call = CallContext(task_id="t", world_id=None, request_type="post")
    try:
        await sim_config(stack_info, {primary: {"error_rate_5xx": 1.0}})
        outage = [await client.structured(prompt, PostContent, call, step="post") for _ in range(10)]
        assert {r.model for r in outage} == {backup}
        primary_tries = [r for r in recorder.records if r.model == primary]
        assert len(primary_tries) == 3 and all(r.status_code == 503 for r in primary_tries)  # then it opened
        assert breakers.get("sim", primary).state == BreakerState.OPEN
        served = [r for r in recorder.records if r.model == backup]
        assert len(served) == 10 and all(r.fallback and r.requested_model == primary for r in served)

        await sim_config(stack_info, {primary: {"error_rate_5xx": 0.0}})
        await asyncio.sleep(1.1)  # the cooldown: the next call is the half-open probe
        recorder.records.clear()
        recovered = [await client.structured(prompt, PostContent, call, step="post") for _ in range(5)]
        assert {r.model for r in recovered} == {primary}
        assert breakers.get("sim", primary).state == BreakerState.CLOSED
        assert not any(r.fallback for r in recorder.records)
    finally:
        await client.aclose()
    stats = (await sim_model_stats(stack_info))[primary]
    assert stats["error_5xx"] == 3 and stats["ok"] == 5


async def test_image_fallback_to_runware(stack_info: StackInfo) -> None:
    sfx = uuid.uuid4().hex[:8]
    primary, backup = f"fbi-{sfx}/primary", f"fbi-{sfx}/runware"
    breakers = BreakerBoard(failure_threshold=2, cooldown_s=60)
    recorder = MemoryRecorder()
    service = ImageService(fallback_router(stack_info, primary, backup, "image", breakers, backup_provider="rw"),
                           recorder, providers=provider_factory(30),
                           retry=ProviderRetry(max_retries=2, base_s=0.01, max_s=0.05))
    call = CallContext(task_id="t", world_id=None, request_type="avatar")
    async with httpx.AsyncClient() as http:  # the session's simulator: put its Runware price back after
        before = (await http.get(f"{sim_root(stack_info)}/_sim/config")).json()["models"].get("runware:100@1")
    try:
        await sim_config(stack_info, {primary: {"error_rate_5xx": 1.0},
                                       "runware:100@1": {"image_cost": 0.0021, "image_cost_per_mpx": 0.0}})
        images = [await service.generate("A lighthouse keeper, portrait", 300, 200, call) for _ in range(3)]
    finally:
        await service.aclose()
        await sim_config(stack_info, {"runware:100@1": before})
    assert all((i.provider, i.width, i.height) == ("runware", 300, 200) for i in images)
    assert [r.model for r in recorder.records] == [primary, backup, primary, backup, backup]
    assert all(r.cost == pytest.approx(0.0021) for r in recorder.records if r.model == backup)
