"""`ai-worker dev`: the embedded stack, the worker as a separate process, one world, live progress."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ai_worker.client import send_world
from ai_worker.devstack.stack import EmbeddedStack, StackInfo
from ai_worker.views import render_status

WORKER_DB = "generia_ai_worker"


def start_worker(info: StackInfo, log_path: Path, *, real_llm: bool, extra: dict[str, str] | None = None,
                 worker_id: str | None = None) -> subprocess.Popen[bytes]:
    """`python -m ai_worker run` against the stack, logs to `log_path`."""
    env = {**os.environ, **info.worker_env(real_llm=real_llm), "SERVICE_PORT": "0"}
    if worker_id:
        env["WORKER_ID"] = worker_id
    env.update(extra or {})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab")  # noqa: SIM115 - handed to the child process
    return subprocess.Popen([sys.executable, "-m", "ai_worker", "run"], env=env, stdout=out,
                            stderr=subprocess.STDOUT)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 40.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_for_world(mongo_uri: str, world_id: str, timeout_s: float,
                         on_update: Any = None, worker: subprocess.Popen[bytes] | None = None) -> dict[str, Any]:
    """Poll world_generation_status until completed/failed (or timeout); returns the last document."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri, serverSelectionTimeoutMS=10000)
    try:
        deadline = time.monotonic() + timeout_s
        doc: dict[str, Any] = {}
        while time.monotonic() < deadline:
            found = await client[WORKER_DB]["world_generation_status"].find_one({"_id": world_id})
            if found:
                doc = found
                if on_update:
                    on_update(doc)
                if doc.get("status") in ("completed", "failed"):
                    return doc
            if worker is not None and worker.poll() is not None:
                raise RuntimeError(f"the worker exited with code {worker.returncode}")
            await asyncio.sleep(0.5)
        raise TimeoutError(f"world {world_id} did not finish within {timeout_s:.0f} s")
    finally:
        await client.close()


async def _summary(info: StackInfo, world_id: str, status: dict[str, Any], console: Console,
                   temporary: bool) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(info.mongo_uri)
    try:
        params = await client[WORKER_DB]["world_parameters"].find_one({"_id": world_id}) or {}
        plat = client["generia_platform"]
        characters = [c async for c in plat["characters"].find({"world_id": world_id})]
        posts = [p async for p in plat["posts"].find({"world_id": world_id}).limit(3)]
        n_posts = await plat["posts"].count_documents({"world_id": world_id})
    finally:
        await client.close()
    console.rule(f"[bold]{params.get('name', '(unnamed world)')}")
    if params.get("summary"):
        console.print(params["summary"])
    table = Table(title=f"{len(characters)} characters")
    table.add_column("name")
    table.add_column("avatar")
    for c in characters[:10]:
        table.add_row(str(c.get("display_name")), "yes" if c.get("avatar_media_id") else "no")
    console.print(table)
    for p in posts:
        tags = " ".join("#" + t for t in p.get("tags", []))
        console.print(f"[bold]post[/] {p.get('caption', '')[:200]}  [dim]{tags}[/]")
    console.print(render_status(status))
    console.print(f"posts in the platform: {n_posts}")
    if temporary:
        console.print(f"data: {info.data_dir} (temporary: removed on exit; keep it with --data-dir or --keep)")
    else:
        console.print(f"data: {info.data_dir}")
    console.print(f"inspect (while the stack runs, e.g. with --keep): mongosh '{info.mongo_uri}' --eval "
                  f"'db.getSiblingDB(\"{WORKER_DB}\").world_generation_status.findOne({{_id: \"{world_id}\"}})'")


async def run_demo(*, prompt: str, users: int, posts: int, data_dir: Path | None, keep: bool, timeout_s: float,
                   console: Console) -> int:
    real_llm = bool(os.environ.get("OPENROUTER_API_KEY"))
    if real_llm:  # the worker would exit 2 on missing keys (RUNWARE_API_KEY for the default images): say it now
        from ai_worker.config import ConfigError, load_settings

        try:
            load_settings(MONGODB_URI="unset", KAFKA_BROKERS="unset")
        except ConfigError as exc:
            console.print(f"[bold red]configuration error[/] (OPENROUTER_API_KEY is set, so the real APIs are "
                          f"used): {exc}")
            return 2
    temp = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="ai-worker-dev-")) if data_dir is None else data_dir
    root.mkdir(parents=True, exist_ok=True)
    stack = EmbeddedStack(root, simulator=not real_llm)
    worker: subprocess.Popen[bytes] | None = None
    code = 1
    try:
        with console.status("starting Kafka (tansu), MongoDB (SecantusDB), simulator and local platform..."):
            info = await stack.start()
        console.print(f"stack up: kafka {info.kafka_bootstrap}, mongo {info.mongo_uri}, "
                      f"{'real LLM/image APIs' if real_llm else 'provider simulator ' + str(info.simulator_url)}")
        worker = start_worker(info, root / "logs" / "worker.log", real_llm=real_llm)
        world_id, _ = await send_world(kafka=info.kafka_bootstrap, mongo_uri=info.mongo_uri, database=WORKER_DB,
                                       topic=info.topics.get("tasks", "generia-tasks"), prompt=prompt,
                                       users=users, posts=posts)
        console.print(f"world {world_id} requested: {users} characters, {posts} posts")
        with Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            bars = {
                "stages": progress.add_task("stages", total=6),
                "characters": progress.add_task("characters", total=users),
                "posts": progress.add_task("posts", total=max(posts, 1)),
                "tasks": progress.add_task("tasks", total=None),
            }

            def update(doc: dict[str, Any]) -> None:
                done = sum(1 for s in doc.get("stages", []) if s.get("status") in ("completed", "failed"))
                progress.update(bars["stages"], completed=done,
                                description=f"{doc.get('current_stage', 'stages')[:12]}")
                progress.update(bars["characters"], completed=doc.get("users_created", 0))
                progress.update(bars["posts"], completed=doc.get("posts_created", 0))
                progress.update(bars["tasks"], completed=doc.get("tasks_completed", 0),
                                total=max(doc.get("tasks_total", 0), doc.get("task_predicted", 0)) or None)

            status = await wait_for_world(info.mongo_uri, world_id, timeout_s, update, worker)
        await _summary(info, world_id, status, console, temporary=temp and not keep)
        code = 0 if status.get("status") == "completed" else 1
        if code:
            console.print(f"[bold red]world {status.get('status')}[/]; worker log: {root / 'logs' / 'worker.log'}")
        if keep:
            console.print("[bold]--keep[/]: everything stays up until Ctrl-C")
            console.print(info.to_json())
            for k, v in sorted(info.worker_env(real_llm=real_llm).items()):
                if "KEY" not in k:
                    console.print(f"  {k}={v}")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
    except (RuntimeError, TimeoutError, OSError) as exc:
        console.print(f"[bold red]dev run failed[/]: {exc}")
        console.print(f"logs: {root / 'logs'}")
        code = 1
    finally:
        if worker is not None:
            await asyncio.to_thread(stop_process, worker)
        with contextlib.suppress(Exception):
            await stack.stop()
        if temp and not keep and code == 0:
            shutil.rmtree(root, ignore_errors=True)
    return code
