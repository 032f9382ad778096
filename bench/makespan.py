"""Makespan of a world against its lower bound, with slow providers (simulator latency per model).

Starts a fresh embedded stack, N worker processes, sends one world and measures its makespan (the send ->
the world's `finished_at`). The simulator answers the LLM models after `--llm-latency` (1.0 s) and the image
models after `--image-latency` (2.0 s): a global latency plus a per-model extra for the models the worker's
registry really uses (read through `ai_worker.config.load_settings`); the history's call durations are
printed to check it. The lower bound comes from the calls actually made (attempts in `api_requests_history`):

    bound = max(critical path, LLM calls x LLM latency / LLM slots, images x image latency / image slots)

with the slots of all worker processes together, and the critical path of the world's plan
(`_common.critical_path_s`). Slots are set both ways, so today's precedence cannot lower them: a generated
registry (MODEL_REGISTRY_FILE) whose models have `max_concurrent` = the slots of their kind, and
MAX_CONCURRENT_LLM_REQUESTS / MAX_CONCURRENT_IMAGE_REQUESTS; the EFFECTIVE slots are printed. The
registry's shared rate limits are removed (`--keep-rate-limits` keeps them): the bound ignores them.

    python bench/makespan.py                                   # 25/150, 15 LLM / 10 image slots, 1 worker
    python bench/makespan.py --repeat 3 --out bench/results/makespan.md
    python bench/makespan.py --workers 2
    python bench/makespan.py --registry-slots                  # models.toml's own slots (8 LLM / 4 image)
    python bench/makespan.py --fairness                        # 3/6 alone, then 5 s after a 100/1000 world
    python bench/makespan.py --fairness --fairness-big 20/200  # a quicker version
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import _common as c

HEADER = ("| date | commit | world | workers | slots per worker LLM/image/tasks | makespan s | lower bound s "
          "(binding) | ratio | critical path s | LLM calls / images | median call s LLM / image "
          "| slot use LLM / image | result | load before -> after | command |")
SEPARATOR = "|" + "---|" * HEADER.count(" | ") + "---|"
FAIR_HEADER = ("| date | commit | small world | big world, delay | workers | slots per worker LLM/image/tasks "
               "| small alone A s | small with big B s | B/A | big world at that time | load before -> after "
               "| command |")
FAIR_SEPARATOR = "|" + "---|" * FAIR_HEADER.count(" | ") + "---|"


def reproduce(args: argparse.Namespace) -> str:
    argv = ["python", "bench/makespan.py"]
    if args.fairness:
        argv += ["--fairness", "--size", f"{args.users}/{args.posts}", "--fairness-big", args.fairness_big,
                 "--fairness-delay", f"{args.fairness_delay:g}"]
    else:
        argv += ["--size", f"{args.users}/{args.posts}"]
    argv += ["--workers", str(args.workers)]
    if args.registry_slots:
        argv.append("--registry-slots")
    else:
        argv += ["--llm-slots", str(args.llm_slots), "--image-slots", str(args.image_slots)]
    if args.task_slots:
        argv += ["--task-slots", str(args.task_slots)]
    argv += ["--llm-latency", f"{args.llm_latency:g}", "--image-latency", f"{args.image_latency:g}",
             "--timeout", f"{args.timeout:g}"]
    if args.keep_rate_limits:
        argv.append("--keep-rate-limits")
    for name, value in sorted(args.env.items()):
        argv += ["--set", f"{name}={value}"]
    if args.worker_src:
        argv += ["--worker-src", args.worker_src]
    return shlex.join(argv)


def worker_extra(args: argparse.Namespace) -> dict[str, str]:
    extra: dict[str, str] = {}
    if not args.registry_slots:
        extra["MAX_CONCURRENT_LLM_REQUESTS"] = str(args.llm_slots)
        extra["MAX_CONCURRENT_IMAGE_REQUESTS"] = str(args.image_slots)
    if args.task_slots:
        extra["MAX_CONCURRENT_TASKS"] = str(args.task_slots)
    extra.update(args.env)
    if args.worker_src:  # the workers run another checkout's code (a baseline); the stack is this one's
        extra["PYTHONPATH"] = str(Path(args.worker_src).resolve() / "src")
    return extra


def latency_knobs(settings: Any, llm_s: float, image_s: float) -> dict[str, Any]:
    """Simulator configuration (the `/_sim/config` shape): a global latency = the smaller of the two, and
    the models of the other kind (every model of its steps' chains) get the difference on top."""
    base = min(llm_s, image_s)
    models: dict[str, dict[str, float]] = {}
    for kind, latency in (("llm", llm_s), ("image", image_s)):
        if latency > base:
            for name in sorted(c.model_names(settings, kind)):
                models[name] = {"latency_ms": (latency - base) * 1000}
    return {"latency_ms": base * 1000, "models": models}


async def open_stack(args: argparse.Namespace) -> tuple[c.BenchStack, dict[str, Any]]:
    """A stack with the bench's registry and simulator latencies; workers started and assigned."""
    from ai_worker.devstack.simulator import SimulatorConfig
    from ai_worker.providers.registry import default_registry_path

    slots = (None, None) if args.registry_slots else (args.llm_slots, args.image_slots)
    registry = c.bench_registry(c.load_toml(default_registry_path()), strip_rate_limits=not args.keep_rate_limits,
                                llm_slots=slots[0], image_slots=slots[1])
    extra = worker_extra(args)
    bs = c.BenchStack(simulator_config=SimulatorConfig(), registry=registry, keep=args.keep)
    await bs.__aenter__()
    try:
        settings = bs.effective_settings(extra)
        knobs = latency_knobs(settings, args.llm_latency, args.image_latency)
        bs.stack.simulator.config.update(knobs)  # what POST /_sim/config does
        info = {"slots": c.effective_slots(settings), "max_concurrent_tasks": settings.max_concurrent_tasks,
                "sim_latency": knobs}
        bs.start_workers(args.workers, extra)
        info["ready_s"] = await bs.wait_ready()
    except BaseException:
        await bs.__aexit__(*sys.exc_info())
        raise
    return bs, info


async def measure_world(bs: c.BenchStack, args: argparse.Namespace, users: int, posts: int,
                        label: str) -> dict[str, Any]:
    world_id, sent_at = await bs.send(users, posts, prompt=args.prompt)
    doc = await bs.wait_world(world_id, time.monotonic() + args.timeout, label=label)
    detected_at = time.time()
    return {"world_id": world_id, "sent_at": sent_at, "doc": doc, "detected_at": detected_at,
            "terminal": doc.get("status") in c.TERMINAL_WORLD}


async def run_once(args: argparse.Namespace) -> dict[str, Any]:
    load_before = c.loadavg()
    bs, info = await open_stack(args)
    try:
        watch = c.ProcWatch([*bs.worker_pids(), *bs.stack_pids()])
        watch.start()
        m = await measure_world(bs, args, args.users, args.posts, f"{args.users}/{args.posts} x{args.workers}: ")
        await watch.stop()
        await watch.close()
        facts = await bs.facts(m["world_id"])
        calls = await bs.calls(m["world_id"])
        problems = c.counts_ok(facts, args.users, args.posts) if m["terminal"] else ["timeout"]
        bs.keep_reason = "; ".join(problems) or None
    finally:
        await bs.__aexit__(None, None, None)
    makespan = c.finished_seconds(m["doc"], m["sent_at"], m["detected_at"]) if m["terminal"] else watch.wall_s()
    slots = info["slots"]
    llm_slots = slots["llm"]["slots"] * args.workers
    image_slots = slots["image"]["slots"] * args.workers
    n_llm = calls.get("llm", {}).get("n", 0)
    n_img = calls.get("image", {}).get("n", 0)
    bound = c.lower_bound(users=args.users, posts=args.posts, llm_calls=n_llm, images=n_img,
                          llm_latency_s=args.llm_latency, image_latency_s=args.image_latency,
                          llm_slots=llm_slots, image_slots=image_slots)
    med = {k: c.median(v["durations_ms"]) / 1000 for k, v in calls.items()}
    use = {k: sum(v["durations_ms"]) / 1000 / ((llm_slots if k == "llm" else image_slots) * makespan)
           for k, v in calls.items()}
    return {
        **info, "users": args.users, "posts": args.posts, "workers": args.workers, "makespan_s": makespan,
        "terminal": m["terminal"], "status": facts.status, "bound": bound, "ratio": makespan / bound.value,
        "llm_calls": n_llm, "images": n_img, "call_errors": {k: v["errors"] for k, v in calls.items()},
        "median_call_s": med, "slot_use": use, "models_called": {k: v["models"] for k, v in calls.items()},
        "problems": problems,
        "characters": facts.characters, "posts_created": facts.posts, "tasks": facts.tasks_in_collection,
        "procs": watch.grouped(), "window_s": watch.wall_s(), "machine_busy_cores": watch.machine_busy_cores(),
        "load_before": load_before, "load_after": c.loadavg(), "date": c.today(),
        "commit": c.git_commit(args.worker_src), "cores": c.cores(), "command": reproduce(args),
        "world_id": m["world_id"],
    }


def slots_text(r: dict[str, Any]) -> str:
    s = r["slots"]
    return f"{s['llm']['slots']}/{s['image']['slots']}/{r['max_concurrent_tasks']}"


def slots_detail(r: dict[str, Any]) -> str:
    s = r["slots"]
    parts = []
    for kind, env in (("llm", "MAX_CONCURRENT_LLM_REQUESTS"), ("image", "MAX_CONCURRENT_IMAGE_REQUESTS")):
        models = ", ".join(f"{m} max_concurrent={v or 'none'}" for m, v in s[kind]["models"].items())
        parts.append(f"{kind.upper() if kind == 'llm' else kind} {s[kind]['slots']} ({env}={s[kind]['env']}; "
                     f"{models})")
    return "effective slots per worker: " + "; ".join(parts) + f"; tasks {r['max_concurrent_tasks']}"


def report(r: dict[str, Any]) -> str:
    b: c.LowerBound = r["bound"]
    lat = r["sim_latency"]
    lines = [
        "",
        f"== makespan {r['users']}/{r['posts']}, {r['workers']} worker process(es) ==",
        slots_detail(r),
        f"simulator latency: {lat['latency_ms']:.0f} ms for every model, plus "
        + (", ".join(f"{k['latency_ms']:.0f} ms for {m}" for m, k in lat["models"].items()) or "nothing per model"),
        f"calls made: {r['llm_calls']} LLM, {r['images']} images (errors {r['call_errors']}); median durations "
        + ", ".join(f"{k} {v:.2f} s" for k, v in r["median_call_s"].items()),
    ]
    if r["terminal"]:
        lines.append(f"world {r['status']}: makespan {r['makespan_s']:.1f} s")
    else:
        lines.append(f"TIMEOUT after {r['makespan_s']:.0f} s (partial)")
    lines += [
        f"lower bound {b.value:.1f} s ({b.binding}): critical path {b.critical_path_s:.1f} s, LLM "
        f"{b.llm_s:.1f} s, images {b.image_s:.1f} s  ->  ratio {r['ratio']:.2f}",
        "slot use over the makespan: " + ", ".join(f"{k} {v:.0%}" for k, v in r["slot_use"].items()),
        f"counts: characters {r['characters']}/{r['users']}, posts {r['posts_created']}/{r['posts']}, "
        f"{r['tasks']} tasks -> " + ("exact" if not r["problems"] else "PROBLEMS: " + "; ".join(r["problems"])),
        "CPU % of one core: " + ", ".join(f"{label} {g['cpu_pct']:.0f}" for label, g in r["procs"].items())
        + (f"; machine {r['machine_busy_cores']:.2f} of {r['cores']} cores busy"
           if r["machine_busy_cores"] is not None else ""),
        f"load average before {r['load_before']}, after {r['load_after']}",
        f"reproduce: {r['command']}",
    ]
    return "\n".join(lines)


def row(r: dict[str, Any]) -> str:
    b: c.LowerBound = r["bound"]
    result = (r["status"] or "?") if r["terminal"] else "TIMEOUT (partial)"
    result += ", exact" if not r["problems"] else ": " + "; ".join(r["problems"])
    med = r["median_call_s"]
    use = r["slot_use"]
    cells = [
        r["date"], r["commit"], f"{r['users']}/{r['posts']}", str(r["workers"]), slots_text(r),
        f"{r['makespan_s']:.1f}", f"{b.value:.1f} ({b.binding})", f"**{r['ratio']:.2f}**",
        f"{b.critical_path_s:.1f}", f"{r['llm_calls']} / {r['images']}",
        f"{med.get('llm', float('nan')):.2f} / {med.get('image', float('nan')):.2f}",
        f"{use.get('llm', 0):.0%} / {use.get('image', 0):.0%}", result,
        f"{r['load_before']} -> {r['load_after']}", f"`{c.md_escape(r['command'])}`",
    ]
    return "| " + " | ".join(cells) + " |"


async def run_fairness(args: argparse.Namespace) -> dict[str, Any]:
    """The small world alone (A); then the big world and, `fairness_delay` s later, the small one again (B)."""
    big_users, big_posts = c.parse_size(args.fairness_big)
    load_before = c.loadavg()
    bs, info = await open_stack(args)
    try:
        alone = await measure_world(bs, args, args.users, args.posts, "small alone: ")
        big_id, _ = await bs.send(big_users, big_posts, prompt="A sprawling archipelago of lighthouse guilds")
        await asyncio.sleep(args.fairness_delay)
        shared = await measure_world(bs, args, args.users, args.posts, "small with big: ")
        big_doc = await bs.status(big_id)
        small_facts = [await bs.facts(m["world_id"]) for m in (alone, shared)]
        if not (alone["terminal"] and shared["terminal"]):
            bs.keep_reason = "timeout"
    finally:
        await bs.__aexit__(None, None, None)
    a = c.finished_seconds(alone["doc"], alone["sent_at"], alone["detected_at"])
    b = c.finished_seconds(shared["doc"], shared["sent_at"], shared["detected_at"])
    problems = [f"{name}: {p}" for name, f in zip(("alone", "with big"), small_facts, strict=True)
                for p in c.counts_ok(f, args.users, args.posts)]
    if not (alone["terminal"] and shared["terminal"]):
        problems.append("timeout")
    return {**info, "small": f"{args.users}/{args.posts}", "big": f"{big_users}/{big_posts}",
            "delay_s": args.fairness_delay, "workers": args.workers, "alone_s": a, "with_big_s": b,
            "ratio": b / a if a else float("nan"), "big_progress": c.progress_text(big_doc), "problems": problems,
            "load_before": load_before, "load_after": c.loadavg(), "date": c.today(),
            "commit": c.git_commit(args.worker_src), "cores": c.cores(), "command": reproduce(args)}


def fairness_report(r: dict[str, Any]) -> str:
    return "\n".join([
        "",
        f"== fairness: {r['small']} alone, then {r['small']} sent {r['delay_s']:g} s after {r['big']}, "
        f"{r['workers']} worker process(es) ==",
        slots_detail(r),
        f"small world alone: A = {r['alone_s']:.1f} s; with the big world: B = {r['with_big_s']:.1f} s; "
        f"B/A = {r['ratio']:.2f} (target <= 2)",
        f"big world when the small one finished: {r['big_progress']}",
        "counts: " + ("exact" if not r["problems"] else "PROBLEMS: " + "; ".join(r["problems"])),
        f"load average before {r['load_before']}, after {r['load_after']}",
        f"reproduce: {r['command']}",
    ])


def fairness_row(r: dict[str, Any]) -> str:
    cells = [r["date"], r["commit"], r["small"], f"{r['big']}, +{r['delay_s']:g} s", str(r["workers"]),
             slots_text(r), f"{r['alone_s']:.1f}", f"{r['with_big_s']:.1f}", f"**{r['ratio']:.2f}**",
             r["big_progress"] + ("" if not r["problems"] else "; PROBLEMS: " + "; ".join(r["problems"])),
             f"{r['load_before']} -> {r['load_after']}", f"`{c.md_escape(r['command'])}`"]
    return "| " + " | ".join(cells) + " |"


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    c.install_interrupt_handler()
    c.git_commit()  # the code being measured: read once, before any file changes
    results: list[dict[str, Any]] = []
    for attempt in range(args.repeat):
        tag = f" (run {attempt + 1}/{args.repeat})" if args.repeat > 1 else ""
        print(f"-- {'fairness ' if args.fairness else ''}{args.users}/{args.posts}, {args.workers} worker(s){tag}, "
              f"load {c.loadavg()}", flush=True)
        if args.fairness:
            r = await run_fairness(args)
            print(fairness_report(r), flush=True)
            if args.out:
                c.append_row(Path(args.out), FAIR_HEADER, FAIR_SEPARATOR, fairness_row(r))
        else:
            r = await run_once(args)
            print(report(r), flush=True)
            if args.out:
                c.append_row(Path(args.out), HEADER, SEPARATOR, row(r))
        results.append(r)
    if len(results) > 1:
        key = "with_big_s" if args.fairness else "makespan_s"
        ratios = [r["ratio"] for r in results]
        print(f"\n== {len(results)} runs: median {key} {c.median([r[key] for r in results]):.1f} s, "
              f"median ratio {c.median(ratios):.2f} (all: {', '.join(f'{x:.2f}' for x in ratios)})")
    if args.json:
        serial = [{k: (vars(v) if isinstance(v, c.LowerBound) else v) for k, v in r.items()} for r in results]
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(serial, indent=2, default=str))
    return results


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", help="USERS/POSTS (default 25/150; with --fairness the small world, default 3/6)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--llm-slots", type=int, default=15, help="LLM requests in flight per worker (default 15)")
    parser.add_argument("--image-slots", type=int, default=10, help="image requests in flight per worker (default 10)")
    parser.add_argument("--registry-slots", action="store_true",
                        help="leave the slots to models.toml and the defaults (8 LLM / 4 image today)")
    parser.add_argument("--task-slots", type=int, help="MAX_CONCURRENT_TASKS (default: the worker's, 16)")
    parser.add_argument("--llm-latency", type=float, default=1.0, help="seconds per LLM call (default 1.0)")
    parser.add_argument("--image-latency", type=float, default=2.0, help="seconds per image (default 2.0)")
    parser.add_argument("--keep-rate-limits", action="store_true", help="keep the registry's rpm/tpm/tpd limits")
    parser.add_argument("--fairness", action="store_true",
                        help="the small world alone, then again FAIRNESS_DELAY s after a big world")
    parser.add_argument("--fairness-big", default="100/1000", help="the big world of --fairness (default 100/1000)")
    parser.add_argument("--fairness-delay", type=float, default=5.0, help="seconds between the two sends (5)")
    parser.add_argument("--repeat", type=int, default=1, help="runs, each on a fresh stack; the median is printed")
    parser.add_argument("--timeout", type=float, default=900, help="per world, seconds (default 900)")
    parser.add_argument("--set", dest="env", action="append", default=[], metavar="VAR=VALUE",
                        help="extra worker environment")
    parser.add_argument("--worker-src", metavar="CHECKOUT",
                        help="run the workers from another checkout's src/ (e.g. a baseline worktree), to compare "
                             "side by side on the same stack code")
    parser.add_argument("--prompt", default=c.DEFAULT_PROMPT)
    parser.add_argument("--out", help="append one markdown row per run to this file (bench/results/makespan.md)")
    parser.add_argument("--json", help="write every figure of every run to this file")
    parser.add_argument("--keep", action="store_true", help="keep the stack's data directory")
    args = parser.parse_args(argv)
    args.users, args.posts = c.parse_size(args.size) if args.size else ((3, 6) if args.fairness else (25, 150))
    args.env = c.parse_env_items(args.env)
    if min(args.repeat, args.workers, args.llm_slots, args.image_slots) < 1:
        parser.error("--repeat, --workers and the slots must be at least 1")
    return args


def run(argv: list[str]) -> int:
    args = parse(argv)
    try:
        results = asyncio.run(main(args))
    except c.Interrupted:
        return 130
    return 0 if all(not r["problems"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
