"""`ai-worker dev`: the embedded stack, the worker as a separate process, one world, live progress."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pymongo import AsyncMongoClient
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ai_worker.client import send_world
from ai_worker.devstack.processes import free_port
from ai_worker.devstack.stack import EmbeddedStack, StackInfo
from ai_worker.views import render_status

if TYPE_CHECKING:
    from ai_worker.console.app import ConsoleServer

WORKER_DB = "generia_ai_worker"


def start_worker(info: StackInfo, log_path: Path, *, real_llm: bool, extra: dict[str, str] | None = None,
                 worker_id: str | None = None, port: int = 0) -> subprocess.Popen[bytes]:
    """`python -m ai_worker run` against the stack, logs to `log_path`, its HTTP endpoint on 127.0.0.1:`port`
    (0: any free port). Like the stack's servers it runs in its own session: a signal from the terminal (Ctrl-C,
    or SIGHUP when the terminal closes) reaches only us, and we stop the worker (drained) before the stack."""
    env = {**os.environ, **info.worker_env(real_llm=real_llm), "SERVICE_HOST": "127.0.0.1",
           "SERVICE_PORT": str(port)}
    if worker_id:
        env["WORKER_ID"] = worker_id
    env.update(extra or {})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab")  # noqa: SIM115 - handed to the child process
    return subprocess.Popen([sys.executable, "-m", "ai_worker", "run"], env=env, stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 40.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_for_world(mongo_uri: str, world_id: str, timeout_s: float,
                         on_update: Callable[[dict[str, Any]], object] | None = None,
                         worker: subprocess.Popen[bytes] | None = None) -> dict[str, Any]:
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


async def start_demo_console(info: StackInfo, console: Console) -> ConsoleServer | None:
    """The web console on the stack, in this process: CONSOLE_PORT (8082) or, when that is taken, any free
    port. The demo goes on without it if it cannot start."""
    from ai_worker.console.app import ConsoleConfig, start_console

    config = ConsoleConfig(mongo_uri=info.mongo_uri, database=WORKER_DB, kafka=(info.kafka_bootstrap,),
                           tasks_topic=info.topics["tasks"], dlq_topic=info.topics["dlq"],
                           token=os.environ.get("CONSOLE_TOKEN") or None,
                           host=os.environ.get("CONSOLE_HOST") or "127.0.0.1",
                           port=int(os.environ.get("CONSOLE_PORT") or 8082))
    for port in (config.port, 0):
        try:
            return await start_console(dataclasses.replace(config, port=port))
        except OSError as exc:
            problem = exc
    console.print(f"[yellow]the web console did not start[/]: {problem}")
    return None


# Signals that stop `dev` the way Ctrl-C does: SIGHUP arrives when the terminal closes, SIGTERM from `kill`.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _on_stop_signals(console: Console) -> tuple[list[signal.Signals], Any]:
    """Cancel the running demo (once) on any of STOP_SIGNALS, so its `finally` stops the worker and the stack;
    returns the list that records the signal, and a function that removes the handlers."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    received: list[signal.Signals] = []

    def handle(sig: signal.Signals) -> None:
        if received:  # already stopping: a second Ctrl-C must not cut the clean-up short
            console.print(f"{sig.name}: still stopping the worker and the stack...")
            return
        received.append(sig)
        console.print(f"{sig.name}: stopping the worker and the stack...")
        if main is not None:
            main.cancel()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, handle, sig)

    def remove() -> None:
        for sig in STOP_SIGNALS:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)

    return received, remove


async def run_demo(*, prompt: str, users: int, posts: int, data_dir: Path | None, keep: bool, timeout_s: float,
                   console: Console) -> int:
    """The demo; returns the exit code (0 only if the world completed; 128 + the signal's number when stopped
    by SIGINT, SIGTERM or SIGHUP, after everything was stopped)."""
    received, remove_handlers = _on_stop_signals(console)
    try:
        return await _demo(prompt=prompt, users=users, posts=posts, data_dir=data_dir, keep=keep,
                           timeout_s=timeout_s, console=console, received=received)
    finally:
        remove_handlers()


async def _demo(*, prompt: str, users: int, posts: int, data_dir: Path | None, keep: bool, timeout_s: float,
                console: Console, received: list[signal.Signals]) -> int:
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
    web: ConsoleServer | None = None
    code = 1
    kept = False  # waiting in --keep mode: a stop signal is the expected end, the world's result stands
    try:
        with console.status("starting Kafka (tansu), MongoDB (SecantusDB), simulator and local platform..."):
            info = await stack.start()
        console.print(f"stack up: kafka {info.kafka_bootstrap}, mongo {info.mongo_uri}, "
                      f"{'real LLM/image APIs' if real_llm else 'provider simulator ' + str(info.simulator_url)}")
        port = free_port()
        worker = start_worker(info, root / "logs" / "worker.log", real_llm=real_llm, port=port)
        console.print(f"worker: pid {worker.pid}, http://127.0.0.1:{port}/health (also /ready, /stats, /metrics), "
                      f"log {root / 'logs' / 'worker.log'}", soft_wrap=True)
        web = await start_demo_console(info, console)
        world_id, _ = await send_world(kafka=info.kafka_bootstrap, mongo_uri=info.mongo_uri, database=WORKER_DB,
                                       topic=info.topics.get("tasks", "generia-tasks"), prompt=prompt,
                                       users=users, posts=posts)
        console.print(f"world {world_id} requested: {users} characters, {posts} posts")
        if web is not None:
            console.print(f"web console: [bold]{web.url}worlds/{world_id}[/]"
                          + ("" if keep else "  (it stops with the demo; --keep leaves it running)"), soft_wrap=True)
        with Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            bars = {
                "stages": progress.add_task("stages", total=6),
                "characters": progress.add_task("characters", total=users),
                "posts": progress.add_task("posts", total=max(posts, 1)),
                "tasks": progress.add_task("tasks", total=None),
            }

            def update(doc: dict[str, Any]) -> None:
                stages = doc.get("stages", [])
                done = sum(1 for s in stages if s.get("status") == "completed")
                failed = [str(s.get("name")) for s in stages if s.get("status") == "failed"]
                # A failed stage is not progress: the bar counts completed stages and says which failed.
                label = f"x {failed[0]}" if failed else str(doc.get("current_stage", "stages"))
                progress.update(bars["stages"], completed=done, description=label[:12])
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
            console.print("[bold]--keep[/]: everything stays up until Ctrl-C (or SIGTERM, or the terminal closes)")
            console.print(info.to_json())
            console.print(f"worker endpoint: http://127.0.0.1:{port}/health, /ready, /stats, /metrics")
            for k, v in sorted(info.worker_env(real_llm=real_llm).items()):
                if "KEY" not in k:
                    console.print(f"  {k}={v}")
            kept = True
            await asyncio.Event().wait()  # until a stop signal cancels us
    except asyncio.CancelledError:
        if not received:
            raise
        if not kept:
            code = 128 + received[0].value
            console.print(f"interrupted; logs: {root / 'logs'}")
    except (RuntimeError, TimeoutError, OSError) as exc:
        console.print(f"[bold red]dev run failed[/]: {exc}")
        console.print(f"logs: {root / 'logs'}")
        code = 1
    finally:
        if web is not None:
            with contextlib.suppress(Exception):
                await web.stop()
        if worker is not None:
            await asyncio.to_thread(stop_process, worker)
        with contextlib.suppress(Exception):
            await stack.stop()
        if temp and not keep and code == 0:
            shutil.rmtree(root, ignore_errors=True)
    return code
