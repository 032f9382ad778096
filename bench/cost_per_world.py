"""Cost per world: predicted (`ai-worker cost`) against recorded (the world's api_requests_history), per
image option, on the provider simulator.

Starts the embedded stack (broker, database, simulator, local platform), makes the simulator charge what the
model registry says (LLM prices per token, image prices per image and per megapixel asked), then for each
image option starts one worker process with that option's environment, generates one world (default
25 characters / 150 posts) and compares, per step: calls, tokens, cost, predicted vs recorded; then the LLM
vs image split, the total, the cost per post and the default budget the world got.

    python bench/cost_per_world.py                              # default, gemini, enhance options
    python bench/cost_per_world.py --options default --users 100 --posts 2000
    python bench/cost_per_world.py --tokens                     # also print measured [tokens.<step>] TOML
    python bench/cost_per_world.py --markdown out.md --json out.json

The simulator's token counts are characters / 4 of the real prompts and of its own replies, so the
`[tokens.<step>]` figures in models.toml are measured here (with --tokens); a real model's differ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from ai_worker.client import send_world
from ai_worker.config import Settings, load_settings
from ai_worker.devstack.demo import WORKER_DB, start_worker, stop_process, wait_for_world
from ai_worker.devstack.simulator import registry_prices
from ai_worker.devstack.stack import EmbeddedStack
from ai_worker.jobs import build_registry
from ai_worker.providers.cost import BudgetPolicy, WorldCostEstimate, predict_world_cost
from ai_worker.worlds.plan import WorldPlan

# name -> (worker environment, what it is)
OPTIONS: dict[str, tuple[dict[str, str], str]] = {
    "default": ({}, "registry defaults: FLUX.1 [schnell] on Runware, icon and avatars asked at 384x384"),
    "gemini": ({"IMAGE_MODEL": "google/gemini-2.5-flash-image"}, "IMAGE_MODEL=google/gemini-2.5-flash-image"),
    "enhance": ({"IMAGE_PROMPT_ENHANCE": "true"}, "defaults + IMAGE_PROMPT_ENHANCE=true"),
}


def settings_for(env: dict[str, str]) -> Settings:
    """The worker's settings for an option, as far as prices and model choice go (no servers needed)."""
    return load_settings(check=False, MONGODB_URI="unset", KAFKA_BROKERS="unset", **env)  # type: ignore[arg-type]


def predicted(settings: Settings, plan: WorldPlan) -> WorldCostEstimate:
    return predict_world_cost(plan, build_registry().predict(plan), settings.models,
                              enhance=settings.image_prompt_enhance)


async def recorded(mongo_uri: str, world_id: str) -> dict[str, Any]:
    """Per step: calls, failed calls, tokens, cost, sizes asked, from the world's history."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
    try:
        db = client[WORKER_DB]
        status = await db["world_generation_status"].find_one({"_id": world_id}) or {}
        steps: dict[str, dict[str, Any]] = defaultdict(lambda: {"calls": 0, "failed": 0, "prompt_tokens": 0,
                                                                "completion_tokens": 0, "cost": 0.0, "sizes": set()})
        query = {"world_id": world_id, "api_type": {"$in": ["llm", "image_generation"]}}
        async for rec in db["api_requests_history"].find(query):
            row = steps[rec["request_type"]]
            row["kind"] = "llm" if rec["api_type"] == "llm" else "image"
            row["calls"] += 1
            row["failed"] += rec.get("status") != "ok"
            row["prompt_tokens"] += int(rec.get("prompt_tokens") or 0)
            row["completion_tokens"] += int(rec.get("completion_tokens") or 0)
            row["cost"] += float(rec.get("cost") or 0.0)
            data = rec.get("request_data") or {}
            if row["kind"] == "image":
                w, h = data.get("source_width", data.get("width")), data.get("source_height", data.get("height"))
                row["sizes"].add(f"{w}x{h}")
        for row in steps.values():
            row["sizes"] = sorted(row["sizes"])
        return {"status": status, "steps": dict(steps)}
    finally:
        await client.close()


def compare(name: str, plan: WorldPlan, estimate: WorldCostEstimate, rec: dict[str, Any], budget: float,
            elapsed: float) -> dict[str, Any]:
    status = rec["status"]
    steps = rec["steps"]
    rows = []
    for s in estimate.steps:
        got = steps.get(s.step, {})
        rows.append({"step": s.step, "kind": s.kind, "model": s.model, "predicted_calls": s.calls,
                     "recorded_calls": got.get("calls", 0), "failed": got.get("failed", 0),
                     "predicted_usd": s.cost_usd, "recorded_usd": got.get("cost", 0.0),
                     "size": f"{s.size[0]}x{s.size[1]}" if s.size else None, "recorded_sizes": got.get("sizes"),
                     "predicted_tokens": [s.prompt_tokens, s.completion_tokens],
                     "recorded_tokens_per_call": [got["prompt_tokens"] / got["calls"], got["completion_tokens"]
                                                  / got["calls"]] if got.get("calls") and s.kind == "llm" else None})
    for step, got in steps.items():  # recorded steps the prediction does not have
        if step not in {r["step"] for r in rows}:
            rows.append({"step": step, "kind": got["kind"], "model": "?", "predicted_calls": 0,
                         "recorded_calls": got["calls"], "failed": got["failed"], "predicted_usd": 0.0,
                         "recorded_usd": got["cost"], "size": None, "recorded_sizes": got.get("sizes"),
                         "predicted_tokens": None, "recorded_tokens_per_call": None})
    rec_llm = sum(r["recorded_usd"] for r in rows if r["kind"] == "llm")
    rec_img = sum(r["recorded_usd"] for r in rows if r["kind"] == "image")
    total = rec_llm + rec_img
    posts = int(status.get("posts_created") or 0)
    return {
        "option": name, "users": plan.users, "posts": plan.posts, "status": status.get("status"),
        "posts_created": posts, "elapsed_s": elapsed, "rows": rows,
        "predicted": {"llm_usd": estimate.llm_usd, "image_usd": estimate.image_usd, "total_usd": estimate.total_usd,
                      "per_post_usd": estimate.per_post_usd},
        "recorded": {"llm_usd": rec_llm, "image_usd": rec_img, "total_usd": total,
                     "per_post_usd": total / posts if posts else None,
                     "status_llm_cost_total": status.get("llm_cost_total"),
                     "status_image_cost_total": status.get("image_cost_total")},
        "deviation": (total - estimate.total_usd) / estimate.total_usd if estimate.total_usd else None,
        "default_budget_usd": budget, "world_budget_usd": status.get("budget_usd"),
    }


def measured_tokens(results: list[dict[str, Any]]) -> str:
    """[tokens.<step>] TOML from the recorded LLM calls of every option: the tokens recorded for a step over
    the calls the prediction counts for it, so the re-asks of a batch short of items (and repair requests,
    retries) are in the figure."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0])
    for result in results:
        for row in result["rows"]:
            if row["kind"] == "llm" and row["predicted_calls"] and row["recorded_tokens_per_call"]:
                s = sums[row["step"]]
                s[0] += row["predicted_calls"]
                s[1] += row["recorded_tokens_per_call"][0] * row["recorded_calls"]
                s[2] += row["recorded_tokens_per_call"][1] * row["recorded_calls"]
    return "\n".join(f"[tokens.{step}]\nprompt = {round(p / n)}\ncompletion = {round(c / n)}\n"
                     for step, (n, p, c) in sums.items())


def report(result: dict[str, Any]) -> str:
    p, r = result["predicted"], result["recorded"]
    dev = result["deviation"]
    lines = [f"### `{result['option']}`: {OPTIONS[result['option']][1]}", "",
             f"World {result['users']} / {result['posts']}: {result['status']}, {result['posts_created']} posts, "
             f"{result['elapsed_s']:.0f} s; default budget ${result['default_budget_usd']:.2f} "
             f"(the world's status document: ${result['world_budget_usd']}).", "",
             "| step | model | size asked | calls predicted / recorded | predicted $ | recorded $ |",
             "|---|---|---|---:|---:|---:|"]
    for row in result["rows"]:
        size = row["size"] or ""
        if row["recorded_sizes"] and row["recorded_sizes"] != [row["size"]]:
            size += f" (recorded {', '.join(row['recorded_sizes'])})"
        failed = f" ({row['failed']} failed)" if row["failed"] else ""
        lines.append(f"| {row['step']} | {row['model']} | {size} | {row['predicted_calls']} / "
                     f"{row['recorded_calls']}{failed} | {row['predicted_usd']:.4f} | {row['recorded_usd']:.4f} |")
    lines += [f"| **LLM** | | | | {p['llm_usd']:.4f} | {r['llm_usd']:.4f} |",
              f"| **images** | | | | {p['image_usd']:.4f} | {r['image_usd']:.4f} |",
              f"| **total** | | | | **{p['total_usd']:.4f}** | **{r['total_usd']:.4f}** |",
              f"| per post | | | | {p['per_post_usd'] or 0:.5f} | {r['per_post_usd'] or 0:.5f} |", "",
              f"Recorded - predicted: {100 * dev:+.1f} %." if dev is not None else ""]
    return "\n".join(lines)


def summary(results: list[dict[str, Any]]) -> str:
    lines = ["| option | predicted $ | recorded $ | deviation | LLM $ (rec.) | images $ (rec.) | per post $ (rec.) "
             "| default budget $ |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        p, r = res["predicted"], res["recorded"]
        lines.append(f"| `{res['option']}` | {p['total_usd']:.4f} | {r['total_usd']:.4f} | "
                     f"{100 * (res['deviation'] or 0):+.1f} % | {r['llm_usd']:.4f} | {r['image_usd']:.4f} | "
                     f"{r['per_post_usd'] or 0:.5f} | {res['default_budget_usd']:.2f} |")
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    plan = WorldPlan(users=args.users, posts=args.posts)
    root = Path(tempfile.mkdtemp(prefix="ai-worker-cost-"))
    stack = EmbeddedStack(root, simulator=True)
    info = await stack.start()
    results = []
    try:
        # Predicted vs recorded means anything only if the simulator charges the registry's prices (the stack
        # sets them when it starts; made explicit here, the comparison depends on it).
        stack.simulator.config.update({"models": registry_prices(settings_for({}).models)})
        for name in args.options:
            env = {**OPTIONS[name][0], **args.env}
            settings = settings_for(env)
            estimate = predicted(settings, plan)
            budget = BudgetPolicy.from_settings(settings).budget(estimate.total_usd)
            worker = start_worker(info, root / f"worker-{name}.log", real_llm=False, extra=env)
            try:
                started = time.monotonic()
                world_id, _ = await send_world(
                    kafka=info.kafka_bootstrap, mongo_uri=info.mongo_uri, database=WORKER_DB,
                    topic=info.topics.get("tasks", "generia-tasks"), prompt=args.prompt, users=plan.users,
                    posts=plan.posts)
                await wait_for_world(info.mongo_uri, world_id, args.timeout, worker=worker)
                elapsed = time.monotonic() - started
            finally:
                await asyncio.to_thread(stop_process, worker)
            rec = await recorded(info.mongo_uri, world_id)
            results.append(compare(name, plan, estimate, rec, budget, elapsed))
            print(report(results[-1]), flush=True)
    finally:
        await stack.stop()
        shutil.rmtree(root, ignore_errors=True)
    return results


def run(args: argparse.Namespace) -> int:
    results = asyncio.run(main(args))
    text = summary(results)
    print("\n" + text)
    if args.tokens:
        print("\n" + measured_tokens(results))
    if args.markdown:
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        body = [f"## {day}, {args.users} / {args.posts}, options {', '.join(args.options)}", "", text, ""]
        body += [report(r) + "\n" for r in results]
        Path(args.markdown).write_text("\n".join(body), encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    return 0 if all(r["status"] == "completed" for r in results) else 1


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--users", type=int, default=25)
    parser.add_argument("--posts", type=int, default=150)
    parser.add_argument("--options", default=",".join(OPTIONS),
                        help=f"comma-separated, from {', '.join(OPTIONS)}")
    parser.add_argument("--prompt", default="A river delta of stilt villages where tide-readers trade forecasts")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--tokens", action="store_true", help="print the measured [tokens.<step>] TOML")
    parser.add_argument("--markdown", help="write the report to this file")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--set", dest="env", action="append", default=[], metavar="VAR=VALUE",
                        help="extra worker environment for every option")
    args = parser.parse_args(argv)
    args.options = [o.strip() for o in args.options.split(",") if o.strip()]
    unknown = sorted(set(args.options) - set(OPTIONS))
    if unknown:
        parser.error(f"unknown option(s) {unknown}; known: {list(OPTIONS)}")
    args.env = dict(item.split("=", 1) for item in args.env)
    return args


if __name__ == "__main__":
    sys.exit(run(parse(sys.argv[1:])))
