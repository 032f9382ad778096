"""LLM calls and tokens per generated post, for one world on the provider simulator.

Starts the embedded stack (broker, database, simulator, local platform) and one worker process, generates a
world (default 10 characters / 50 posts), and prints, from `api_requests_history`, the LLM calls and tokens
per step and per generated post, plus images and cost. Run it before and after a prompt change and compare:

    python bench/llm_cost_per_post.py                       # 10 characters, 50 posts
    python bench/llm_cost_per_post.py --users 25 --posts 150 --json results.json

The simulator's token counts are characters / 4 of the real prompts and replies, so prompt changes move
them as they would move real ones; the reply lengths are the simulator's, not a model's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from ai_worker.client import send_world
from ai_worker.devstack.demo import WORKER_DB, start_worker, stop_process, wait_for_world
from ai_worker.devstack.stack import EmbeddedStack


async def figures(mongo_uri: str, world_id: str) -> dict[str, Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
    try:
        db = client[WORKER_DB]
        status = await db["world_generation_status"].find_one({"_id": world_id}) or {}
        steps: dict[str, dict[str, float]] = {}
        images = 0
        image_cost = 0.0
        async for rec in db["api_requests_history"].find({"world_id": world_id}):
            if rec.get("api_type") == "image_generation":
                images += 1
                image_cost += float(rec.get("cost") or 0.0)
            if rec.get("api_type") != "llm":
                continue
            row = steps.setdefault(rec["request_type"], {"calls": 0, "failed": 0, "prompt_tokens": 0,
                                                         "completion_tokens": 0, "cost": 0.0})
            row["calls"] += 1
            row["failed"] += rec.get("status") != "ok"
            row["prompt_tokens"] += int(rec.get("prompt_tokens") or 0)
            row["completion_tokens"] += int(rec.get("completion_tokens") or 0)
            row["cost"] += float(rec.get("cost") or 0.0)
        posts = int(status.get("posts_created") or 0)
        total = {k: sum(r[k] for r in steps.values()) for k in ("calls", "failed", "prompt_tokens",
                                                                 "completion_tokens", "cost")}
        per_post = {k: (v / posts if posts else None) for k, v in total.items()}
        return {"world_id": world_id, "status": status.get("status"), "characters": status.get("users_created"),
                "posts": posts, "steps": steps, "llm_total": total, "llm_per_post": per_post,
                "images": images, "image_cost": image_cost,
                "images_per_post": images / posts if posts else None}
    finally:
        await client.close()


def report(result: dict[str, Any], elapsed: float) -> str:
    lines = [f"world {result['world_id']}: {result['status']}, {result['characters']} characters, "
             f"{result['posts']} posts, {elapsed:.1f} s", "",
             f"{'step':<20}{'calls':>7}{'failed':>8}{'prompt tok':>12}{'compl. tok':>12}{'cost $':>10}"]
    for step, row in sorted(result["steps"].items()):
        lines.append(f"{step:<20}{row['calls']:>7.0f}{row['failed']:>8.0f}{row['prompt_tokens']:>12.0f}"
                     f"{row['completion_tokens']:>12.0f}{row['cost']:>10.4f}")
    t, p = result["llm_total"], result["llm_per_post"]
    lines.append(f"{'LLM total':<20}{t['calls']:>7.0f}{t['failed']:>8.0f}{t['prompt_tokens']:>12.0f}"
                 f"{t['completion_tokens']:>12.0f}{t['cost']:>10.4f}")
    if result["posts"]:
        lines.append(f"{'LLM per post':<20}{p['calls']:>7.2f}{p['failed']:>8.2f}{p['prompt_tokens']:>12.1f}"
                     f"{p['completion_tokens']:>12.1f}{p['cost']:>10.5f}")
        lines.append(f"images: {result['images']} ({result['images_per_post']:.2f} per post), "
                     f"${result['image_cost']:.4f}")
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="ai-worker-bench-"))
    stack = EmbeddedStack(root, simulator=True)
    info = await stack.start()
    worker = start_worker(info, root / "worker.log", real_llm=False, extra=args.env)
    try:
        started = time.monotonic()
        world_id, _ = await send_world(kafka=info.kafka_bootstrap, mongo_uri=info.mongo_uri, database=WORKER_DB,
                                       topic=info.topics.get("tasks", "generia-tasks"), prompt=args.prompt,
                                       users=args.users, posts=args.posts)
        await wait_for_world(info.mongo_uri, world_id, args.timeout, worker=worker)
        elapsed = time.monotonic() - started
        result = await figures(info.mongo_uri, world_id)
    finally:
        await asyncio.to_thread(stop_process, worker)
        await stack.stop()
        shutil.rmtree(root, ignore_errors=True)
    result.update(elapsed_s=elapsed, users=args.users, requested_posts=args.posts, prompt=args.prompt)
    return result


def run(args: argparse.Namespace) -> int:
    result = asyncio.run(main(args))
    print(report(result, result["elapsed_s"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["status"] == "completed" else 1


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--posts", type=int, default=50)
    parser.add_argument("--prompt", default="A river delta of stilt villages where tide-readers trade forecasts")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--set", dest="env", action="append", default=[], metavar="VAR=VALUE",
                        help="extra worker environment, e.g. --set IMAGE_PROMPT_ENHANCE=true")
    args = parser.parse_args(argv)
    args.env = dict(item.split("=", 1) for item in args.env)
    return args


if __name__ == "__main__":
    sys.exit(run(parse(sys.argv[1:])))
