"""Throughput of the worker at zero provider latency: tasks/s, database commands per task, CPU and memory.

Starts a fresh embedded stack (broker, database, provider simulator at 0 ms, local platform), N worker
processes (`python -m ai_worker run`, database command counter on), waits until they hold every partition,
sends one world and measures from the send to the world's terminal status:

- tasks/s: the world's tasks (documents in `tasks`; equal to `tasks_total`) / (send -> `finished_at`);
- database commands per task, by collection and command, counted in the worker processes by PyMongo
  command monitoring (ai_worker.observability.dbstats), summed over the workers;
- CPU seconds and % of that window of the workers, the database, the broker and this process (which hosts
  the simulator and the local platform), from /proc/<pid>/stat; peak RSS (VmHWM) of each worker;
- the exact counts at the end: characters and posts on the local platform, tasks terminal, world status.

Provider settings: the repository's model registry with its shared rate limits (rpm/tpm/tpd) removed, so
the engine is measured and not the limiter (`--keep-rate-limits` keeps them); images from the simulator
(`--offline-images`: IMAGE_PROVIDER=offline, drawn in the worker). Each world gets `budget_usd` 1e6.

    python bench/throughput.py --size 40/400
    python bench/throughput.py --size 40/400 --workers 4 --out bench/results/throughput.md
    python bench/throughput.py --matrix --timeout 900 --out bench/results/throughput.md
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

MATRIX: tuple[tuple[int, int, int], ...] = (
    (10, 100, 1), (40, 400, 1), (100, 2000, 1), (500, 5000, 1), (40, 400, 2), (40, 400, 4),
)
HEADER = ("| date | commit | world | workers | result | tasks | send->done s | tasks/s | wall s | DB cmds/task "
          "| worker CPU % | DB CPU % | broker CPU % | stack CPU % | CPU ms per task: worker / DB / stack "
          "| worker peak RSS MB | machine busy (ours), cores "
          "| load before -> after | command |")
SEPARATOR = "|" + "---|" * HEADER.count(" | ") + "---|"


def single_command(args: argparse.Namespace, users: int, posts: int, workers: int) -> str:
    """The command that reproduces one run (also for a run that was part of --matrix)."""
    argv = ["python", "bench/throughput.py", "--size", f"{users}/{posts}", "--workers", str(workers),
            "--timeout", f"{args.timeout:g}"]
    for name, value in sorted(args.env.items()):
        argv += ["--set", f"{name}={value}"]
    if args.offline_images:
        argv.append("--offline-images")
    if args.keep_rate_limits:
        argv.append("--keep-rate-limits")
    if args.worker_src:
        argv += ["--worker-src", args.worker_src_given]
    return shlex.join(argv)


async def run_once(args: argparse.Namespace, users: int, posts: int, workers: int) -> dict[str, Any]:
    from ai_worker.devstack.simulator import SimulatorConfig
    from ai_worker.providers.registry import default_registry_path

    load_before = c.loadavg()
    wall_started = time.monotonic()
    registry_file = Path(f"{args.worker_src}/models.toml") if args.worker_src else default_registry_path()
    registry = c.bench_registry(c.load_toml(registry_file), strip_rate_limits=not args.keep_rate_limits)
    extra = dict(args.env)
    if args.worker_src:  # the workers run another checkout's code (a baseline), the stack this one's
        extra["PYTHONPATH"] = f"{args.worker_src}/src"  # made absolute when the arguments were read
    if args.offline_images:
        extra.setdefault("IMAGE_PROVIDER", "offline")
    result: dict[str, Any] = {"users": users, "posts": posts, "workers": workers, "load_before": load_before,
                              "command": single_command(args, users, posts, workers), "date": c.today(),
                              "commit": c.git_commit(args.worker_src), "cores": c.cores()}
    async with c.BenchStack(simulator_config=SimulatorConfig(latency_ms=0), registry=registry,
                            keep=args.keep) as bs:
        settings = bs.effective_settings(extra)
        result["slots"] = c.effective_slots(settings)
        result["max_concurrent_tasks"] = settings.max_concurrent_tasks
        bs.start_workers(workers, extra)
        result["ready_s"] = await bs.wait_ready()
        baseline = await bs.fresh_stats(after=time.time())
        watch = c.ProcWatch([*bs.worker_pids(), *bs.stack_pids()])
        watch.start()
        world_id, sent_at = await bs.send(users, posts, prompt=args.prompt)
        deadline = time.monotonic() + args.timeout
        doc = await bs.wait_world(world_id, deadline, label=f"{users}/{posts} x{workers}: ")
        detected_at = time.time()
        await watch.stop()
        await watch.close()
        terminal = doc.get("status") in c.TERMINAL_WORLD
        facts = await bs.facts(world_id)
        stopped_at = time.time()
        await asyncio.to_thread(bs.stop_workers)
        final = await bs.fresh_stats(after=stopped_at, timeout_s=5)
        counts = c.diff_counts(c.merge_counts(c.command_counts(d) for d in final),
                               c.merge_counts(c.command_counts(d) for d in baseline))
        stale = [w.name for w, d in zip(bs.workers, final, strict=True) if not d or float(d["at"]) < stopped_at]
        if not terminal:
            bs.keep_reason = "timeout"
        elif c.counts_ok(facts, users, posts):
            bs.keep_reason = "; ".join(c.counts_ok(facts, users, posts))
    seconds = c.finished_seconds(doc, sent_at, detected_at) if terminal else watch.wall_s()
    tasks = facts.tasks_in_collection if terminal else facts.tasks_terminal
    result.update(
        world_id=world_id, terminal=terminal, status=facts.status, seconds=seconds, tasks=tasks,
        tasks_total=facts.tasks_total, tasks_by_status=facts.tasks_by_status, characters=facts.characters,
        posts_created=facts.posts, problems=c.counts_ok(facts, users, posts) if terminal else ["timeout"],
        tasks_per_s=tasks / seconds if seconds else 0.0, wall_s=time.monotonic() - wall_started,
        db_commands={f"{cmd} {coll}": vars(v) for (cmd, coll), v in counts.items()},
        db_total=c.total_commands(counts), db_per_task=c.total_commands(counts) / max(tasks, 1),
        stale_stats=stale, procs=watch.grouped(), machine_busy_cores=watch.machine_busy_cores(),
        window_s=watch.wall_s(), load_after=c.loadavg(),
    )
    result["_counts"] = counts
    return result


def report(r: dict[str, Any]) -> str:
    slots = r["slots"]
    lines = [
        "",
        f"== throughput {r['users']}/{r['posts']}, {r['workers']} worker process(es), simulator at 0 ms ==",
        f"slots per worker: LLM {slots['llm']['slots']}, image {slots['image']['slots']}, "
        f"tasks {r['max_concurrent_tasks']}; workers ready (partitions assigned) in {r['ready_s']:.1f} s",
    ]
    if r["terminal"]:
        lines.append(f"world {r['status']} in {r['seconds']:.1f} s from the send (wall {r['wall_s']:.1f} s with "
                     f"start-up and teardown): {r['tasks']} tasks, {r['tasks_per_s']:.1f} tasks/s")
    else:
        lines.append(f"TIMEOUT after {r['seconds']:.0f} s: {r['tasks']} of {r['tasks_total']} tasks known so far "
                     f"terminal ({r['tasks_per_s']:.1f} tasks/s), {r['characters']} characters, "
                     f"{r['posts_created']} posts")
    by_status = ", ".join(f"{n} {s}" for s, n in sorted(r["tasks_by_status"].items()))
    verdict = "exact" if not r["problems"] else "PROBLEMS: " + "; ".join(r["problems"])
    lines.append(f"counts: characters {r['characters']}/{r['users']}, posts {r['posts_created']}/{r['posts']}, "
                 f"tasks_total {r['tasks_total']}, tasks {by_status}, world {r['status']} -> {verdict}")
    lines.append(f"database commands sent by the worker(s): {r['db_total']} ({r['db_per_task']:.2f} per task)"
                 + (f" [counter files not rewritten at exit: {r['stale_stats']}]" if r["stale_stats"] else ""))
    lines += ["  " + line for line in c.breakdown_lines(r["_counts"], r["tasks"])]
    lines.append(f"{'process':<32}{'CPU s':>9}{'CPU %':>8}{'peak RSS MB':>13}   (CPU % of one core over "
                 f"{r['window_s']:.1f} s)")
    for label, g in r["procs"].items():
        name = f"{label} ({g['n']})" if label == "worker" else label
        lines.append(f"{name:<32}{g['cpu_s']:>9.1f}{g['cpu_pct']:>8.0f}{g['peak_rss_mb']:>13.0f}")
        if g["n"] > 1:
            for p in g["per_process"]:
                lines.append(f"{'  pid ' + str(p['pid']):<32}{p['cpu_s']:>9.1f}{p['cpu_pct']:>8.0f}"
                             f"{p['peak_rss_mb']:>13.0f}")
    lines.append("CPU ms per task: " + ", ".join(f"{label} {ms:.0f}" for label, ms in cpu_ms_per_task(r).items()))
    ours = sum(g["cpu_s"] for g in r["procs"].values()) / r["window_s"]
    busy = r["machine_busy_cores"]
    lines.append(f"machine: {busy:.2f} of {r['cores']} cores busy on average, {ours:.2f} by the processes above"
                 if busy is not None else "machine: busy time unknown")
    lines.append(f"load average before {r['load_before']}, after {r['load_after']}")
    lines.append(f"reproduce: {r['command']}")
    return "\n".join(lines)


def cpu_ms_per_task(r: dict[str, Any]) -> dict[str, float]:
    """CPU milliseconds per task of the workers (together), the database and the stack process: less
    sensitive to a busy machine than tasks/s."""
    tasks = max(r["tasks"], 1)
    return {label: 1000 * r["procs"][label]["cpu_s"] / tasks if label in r["procs"] else float("nan")
            for label in ("worker", "database", "stack (simulator + platform)")}


def row(r: dict[str, Any]) -> str:
    procs = r["procs"]

    def pct(label: str) -> str:
        g = procs.get(label)
        if g is None:
            return "-"
        if g["n"] > 1:
            each = " + ".join(f"{p['cpu_pct']:.0f}" for p in g["per_process"])
            return f"{g['cpu_pct']:.0f} ({each})"
        return f"{g['cpu_pct']:.0f}"

    result = r["status"] if r["terminal"] else "TIMEOUT (partial)"
    if r["terminal"] and r["problems"]:
        result += ": " + "; ".join(r["problems"])
    elif r["terminal"]:
        result += ", exact"
    busy = r["machine_busy_cores"]
    ours = sum(g["cpu_s"] for g in procs.values()) / r["window_s"]
    cells = [
        r["date"], r["commit"], f"{r['users']}/{r['posts']}", str(r["workers"]), result,
        f"{r['tasks']}" + ("" if r["terminal"] else f" of {r['tasks_total']}+"), f"{r['seconds']:.1f}",
        f"{r['tasks_per_s']:.1f}", f"{r['wall_s']:.0f}", f"{r['db_per_task']:.2f}", pct("worker"), pct("database"),
        pct("broker"), pct("stack (simulator + platform)"),
        " / ".join(f"{ms:.0f}" for ms in cpu_ms_per_task(r).values()),
        f"{procs['worker']['peak_rss_mb']:.0f}" if "worker" in procs else "-",
        f"{busy:.2f} ({ours:.2f})" if busy is not None else "-",
        f"{r['load_before']} -> {r['load_after']}", f"`{c.md_escape(r['command'])}`",
    ]
    return "| " + " | ".join(cells) + " |"


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    c.install_interrupt_handler()
    c.git_commit()  # the code being measured: read once, before any file changes
    plan = list(MATRIX) if args.matrix else [(args.users, args.posts, args.workers)]
    results: list[dict[str, Any]] = []
    for users, posts, workers in plan:
        for attempt in range(args.repeat):
            tag = f" (run {attempt + 1}/{args.repeat})" if args.repeat > 1 else ""
            print(f"-- {users}/{posts}, {workers} worker(s){tag}, load {c.loadavg()}", flush=True)
            r = await run_once(args, users, posts, workers)
            print(report(r), flush=True)
            if args.out:
                c.append_row(Path(args.out), HEADER, SEPARATOR, row(r))
            results.append(r)
    if len(results) > 1:
        print("\n== summary ==")
        print(f"{'world':<12}{'workers':>8}{'tasks/s':>10}{'cmds/task':>11}{'worker CPU %':>14}{'DB CPU %':>10}"
              f"{'stack CPU %':>13}{'RSS MB':>8}{'CPU ms/task w/DB/stack':>24}  result")
        for r in results:
            p = r["procs"]
            print(f"{r['users']}/{r['posts']:<8}{r['workers']:>8}{r['tasks_per_s']:>10.1f}{r['db_per_task']:>11.2f}"
                  f"{p['worker']['cpu_pct']:>14.0f}{p['database']['cpu_pct']:>10.0f}"
                  f"{p['stack (simulator + platform)']['cpu_pct']:>13.0f}{p['worker']['peak_rss_mb']:>8.0f}"
                  f"{' / '.join(f'{ms:.0f}' for ms in cpu_ms_per_task(r).values()):>24}  "
                  f"{r['status'] if r['terminal'] else 'TIMEOUT'} {'; '.join(r['problems'])}")
        ones = {(r["users"], r["posts"]): r["tasks_per_s"] for r in results if r["workers"] == 1 and r["terminal"]}
        for r in results:
            base = ones.get((r["users"], r["posts"]))
            if r["workers"] > 1 and base and r["terminal"]:
                print(f"{r['users']}/{r['posts']}: {r['workers']} workers / 1 worker = {r['tasks_per_s'] / base:.2f}")
    if args.json:
        text = json.dumps([{k: v for k, v in r.items() if not k.startswith("_")} for r in results], indent=2,
                          default=str)
        await asyncio.to_thread(Path(args.json).write_text, text)
    return results


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", help="USERS/POSTS, e.g. 40/400 (default 40/400)")
    parser.add_argument("--users", type=int)
    parser.add_argument("--posts", type=int)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--matrix", action="store_true",
                        help="the issue's list: 10/100, 40/400, 100/2000, 500/5000 with 1 worker; 40/400 with 2 and 4")
    parser.add_argument("--timeout", type=float, default=900, help="per world, seconds (default 900); a world that "
                        "is not done by then is reported as partial")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each world, each on a fresh stack")
    parser.add_argument("--set", dest="env", action="append", default=[], metavar="VAR=VALUE",
                        help="extra worker environment, e.g. --set MAX_CONCURRENT_TASKS=64")
    parser.add_argument("--offline-images", action="store_true",
                        help="IMAGE_PROVIDER=offline (drawn in the worker) instead of the simulator's images")
    parser.add_argument("--keep-rate-limits", action="store_true",
                        help="keep the registry's rpm/tpm/tpd limits (they cap a zero-latency world)")
    parser.add_argument("--worker-src", metavar="CHECKOUT",
                        help="run the workers from another checkout's code (its src/ and models.toml; it needs the "
                             "database command counter, observability/dbstats.py), e.g. a baseline, to compare "
                             "side by side on the same stack code")
    parser.add_argument("--prompt", default=c.DEFAULT_PROMPT)
    parser.add_argument("--out", help="append one markdown row per run to this file (e.g. bench/results/throughput.md)")
    parser.add_argument("--json", help="write every figure of every run to this file")
    parser.add_argument("--keep", action="store_true", help="keep the stack's data directory (logs, counters)")
    args = parser.parse_args(argv)
    users, posts = c.parse_size(args.size) if args.size else (40, 400)
    args.users = args.users if args.users is not None else users
    args.posts = args.posts if args.posts is not None else posts
    args.env = c.parse_env_items(args.env)
    args.worker_src_given = args.worker_src  # as typed (relative): what the recorded command shows
    if args.worker_src:
        args.worker_src = str(Path(args.worker_src).resolve())
    if args.repeat < 1 or args.workers < 1:
        parser.error("--repeat and --workers must be at least 1")
    return args


def run(argv: list[str]) -> int:
    args = parse(argv)
    try:
        results = asyncio.run(main(args))
    except c.Interrupted:
        return 130
    return 0 if all(r["terminal"] and not r["problems"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
