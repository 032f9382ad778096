"""Wiring and lifecycle of the worker: build clients, start/stop in order, signals, drain."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import structlog
from pymongo import AsyncMongoClient
from pymongo.errors import ConfigurationError, PyMongoError

from ai_worker.config import Settings
from ai_worker.connectivity import (
    Unreachable,
    mask_uri,
    mongo_error,
    quiet_kafka_logs,
    short_error,
    start_kafka,
    wait_for_kafka,
    wait_for_mongo,
)
from ai_worker.content.prompts import PromptLibrary
from ai_worker.images.enhance import PromptEnhancer
from ai_worker.images.service import ImageService
from ai_worker.images.upload import MediaUploader
from ai_worker.jobs import build_registry
from ai_worker.jobs.context import JobContext, Services
from ai_worker.llm.client import LLMClient
from ai_worker.messaging.admin import ensure_topics
from ai_worker.messaging.consumer import IdleWork, TaskConsumer
from ai_worker.messaging.events import TaskEvent
from ai_worker.messaging.producer import EventProducer
from ai_worker.messaging.security import describe
from ai_worker.observability import dbstats, metrics, tracing
from ai_worker.observability.health import HealthServer
from ai_worker.observability.worker_checks import worker_readiness
from ai_worker.observability.worker_status import WorkerStatusReporter, WorkerStatusStore
from ai_worker.platform.clients import PlatformClients
from ai_worker.providers.breaker import BreakerBoard
from ai_worker.providers.budget import MongoBudget
from ai_worker.providers.cost import BudgetPolicy, default_budget
from ai_worker.providers.history import MongoRecorder
from ai_worker.providers.ratelimit import MongoRateLimiter
from ai_worker.providers.routing import ModelRouter, provider_slots
from ai_worker.retention import apply_retention
from ai_worker.scheduling import pool_cap
from ai_worker.tasks.engine import Engine
from ai_worker.tasks.progress import WorldProgress
from ai_worker.tasks.reconciler import Reconciler
from ai_worker.tasks.retry import RetryPolicy
from ai_worker.tasks.store import TaskStore
from ai_worker.worlds.parameters import WorldParametersStore
from ai_worker.worlds.status import WorldStatusStore

log = structlog.get_logger(__name__)

STATS_FLUSH_S = 2.0  # the per-model summary is written every 2 s (providers/stats.py)


def mongo_client(settings: Settings) -> AsyncMongoClient[dict[str, Any]]:
    # AI_WORKER_DB_STATS_FILE set (the benches): count the commands sent (observability/dbstats.py).
    listeners = dbstats.install_from_env()
    if listeners:
        return AsyncMongoClient(settings.mongodb_uri, tz_aware=True, serverSelectionTimeoutMS=10000,
                                event_listeners=listeners)
    return AsyncMongoClient(settings.mongodb_uri, tz_aware=True, serverSelectionTimeoutMS=10000)


class StartupError(Exception):
    """The worker could not start; the reason is already logged (one `startup failed` line)."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"start-up failed (exit code {exit_code})")
        self.exit_code = exit_code


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    """SIGTERM/SIGINT: start the graceful shutdown; a repeated signal (during the drain) changes nothing."""
    if stop.is_set():
        log.info("shutdown already in progress; signal ignored", signal=sig.name)
        return
    log.info("shutdown requested", signal=sig.name)
    stop.set()


def _closing(stack: contextlib.AsyncExitStack, what: str, closer: Callable[[], Awaitable[object]]) -> None:
    """Close `what` when the stack unwinds; an error while closing is logged and the others still close."""
    async def close() -> None:
        try:
            await closer()
        except Exception as exc:
            log.warning("error while stopping", what=what, error=str(exc), error_type=type(exc).__name__)
    stack.push_async_callback(close)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def _remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 1.0)


async def run_worker(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Start every client (bounded by STARTUP_TIMEOUT_S), consume until `stop` (or SIGTERM/SIGINT), then close
    everything that was opened, in reverse order, whatever failed. A start-up failure logs one line and raises
    StartupError."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, _on_signal, sig, stop)

    log.info("worker starting", worker_id=settings.worker_id, topic=settings.kafka_topic_tasks,
             group=settings.kafka_group_id, models=settings.models.assignments())
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(_ignore_late_sigterm, loop)  # runs last, once everything is closed
        try:
            consumer = await _start(settings, stack, stop)
        except Unreachable as exc:
            log.error("startup failed", **exc.log_fields())
            raise StartupError(exc.exit_code) from None
        except Exception as exc:
            log.error("startup failed", what="worker", error_type=type(exc).__name__, error=short_error(exc),
                      exc_info=settings.log_level == "DEBUG")
            raise StartupError(1) from None
        if consumer is None:  # stopped while waiting for the servers
            log.info("worker stopped before it started")
            return
        stack.callback(log.info, "worker stopping")
        await consumer.run(stop)
    log.info("worker stopped")


async def _start(settings: Settings, stack: contextlib.AsyncExitStack, stop: asyncio.Event) -> TaskConsumer | None:
    """Open and start everything; each client is registered on `stack` as soon as it exists. Returns the
    consumer to run, or None when `stop` was set while waiting for the servers."""
    deadline = time.monotonic() + settings.startup_timeout_s
    tracing.configure(settings)  # off unless TRACING_ENABLED; flushed once everything else has stopped
    stack.callback(tracing.shutdown)
    uri = settings.mongodb_uri
    try:
        mongo = mongo_client(settings)
    except (ConfigurationError, ValueError, TypeError) as exc:
        raise Unreachable("MongoDB", mask_uri(uri), exc, "fix MONGODB_URI", usage=True) from None
    _closing(stack, "mongodb", mongo.close)
    await wait_for_mongo(mongo, uri, deadline, stop)
    if stop.is_set():
        return None
    db = mongo[settings.mongodb_database]
    store = TaskStore(db)
    status = WorldStatusStore(db)
    recorder = MongoRecorder(db, stats_flush_s=STATS_FLUSH_S, worlds=status)
    _closing(stack, "request history", recorder.aclose)  # records kept through an outage: last chance
    try:
        for owner in (store, status, recorder):
            await asyncio.wait_for(owner.ensure_indexes(), _remaining(deadline))
    except (PyMongoError, TimeoutError) as exc:
        raise mongo_error(uri, exc) from None
    try:
        await asyncio.wait_for(apply_retention(db, settings), _remaining(deadline))
    except Exception as exc:  # old data stays a little longer: not a reason to stop working
        log.warning("retention not applied", error=short_error(exc), error_type=type(exc).__name__)

    bootstrap = settings.kafka_bootstrap
    kafka_options = settings.kafka_options  # validated by load_settings
    log.info("kafka security", **describe(kafka_options))
    await wait_for_kafka(bootstrap, kafka_options, deadline, stop)
    if stop.is_set():
        return None
    topics = [settings.kafka_topic_tasks, settings.kafka_topic_progress, settings.kafka_topic_dlq]
    try:
        with quiet_kafka_logs():
            await asyncio.wait_for(ensure_topics(bootstrap, topics, settings.kafka_topic_partitions,
                                                 kafka_options), _remaining(deadline))
    except Exception as exc:  # a managed cluster may forbid creation: the topics must then exist already
        log.warning("could not ensure topics", error=short_error(exc), error_type=type(exc).__name__)

    producer = EventProducer(
        bootstrap=bootstrap, tasks_topic=settings.kafka_topic_tasks,
        progress_topic=settings.kafka_topic_progress, dlq_topic=settings.kafka_topic_dlq,
        enable_idempotence=settings.kafka_enable_idempotence, client_id=settings.worker_id,
        client_options=kafka_options,
    )
    _closing(stack, "kafka producer", producer.stop)
    await start_kafka(producer.start, bootstrap, _remaining(deadline), "Kafka (producer)")

    platform = PlatformClients.from_settings(settings, recorder)
    _closing(stack, "platform clients", platform.close)
    budget = MongoBudget(db, daily_cap_usd=settings.daily_budget_usd, worlds=status)
    slots = provider_slots(settings)
    task_slots = settings.task_slots(slots.llm + slots.image)
    log.info("slots", llm=slots.llm, image=slots.image, explicit=sorted(slots.explicit), tasks=task_slots,
             window=settings.window(task_slots))
    breakers = BreakerBoard(failure_threshold=settings.breaker_failure_threshold,
                            cooldown_s=settings.breaker_cooldown_s)
    router = ModelRouter(settings.models, limiter=MongoRateLimiter(db, max_wait_s=settings.rate_limit_max_wait_s),
                         breakers=breakers, concurrency=slots)
    llm = LLMClient.from_settings(settings, recorder, budget, router)
    _closing(stack, "llm client", llm.aclose)
    images = ImageService.from_settings(settings, recorder, budget, router)
    _closing(stack, "image service", images.aclose)
    prompts = PromptLibrary()
    upload_http = httpx.AsyncClient(timeout=httpx.Timeout(settings.upload_timeout_s, connect=10))
    _closing(stack, "upload http client", upload_http.aclose)
    services = Services(
        llm=llm, images=images, media=MediaUploader(platform.media, upload_http, recorder), platform=platform,
        prompts=prompts, worlds=WorldParametersStore(db),
        enhance=PromptEnhancer(llm, prompts, enabled=True) if settings.image_prompt_enhance else None,
    )
    policy = RetryPolicy(base_delay_s=settings.retry_base_delay_s, max_delay_s=settings.retry_max_delay_s)
    registry = build_registry(max_attempts=settings.task_max_attempts, timeouts_s=settings.task_timeouts_s)
    metrics.set_task_types(registry.types())
    progress = WorldProgress(status, registry, tasks=store, accounting=recorder, default_budget=default_budget(
        registry.predict, settings.models, BudgetPolicy.from_settings(settings), enhance=settings.image_prompt_enhance))
    engine = Engine(store=store, progress=progress, registry=registry, context_factory=JobContext.factory(services),
                    publisher=producer, worker_id=settings.worker_id, lease_s=settings.task_lease_s, policy=policy)
    consumer = TaskConsumer(
        bootstrap=bootstrap, topic=settings.kafka_topic_tasks, group_id=settings.kafka_group_id,
        handler=engine.handle, producer=producer, max_in_flight=task_slots, window=settings.window(task_slots),
        classify=engine.work_class, pool_caps={"llm": pool_cap(slots.llm), "image": pool_cap(slots.image)},
        find_idle_work=_idle_work(engine, settings.idle_work_after_s),
        idle_slots={"llm": slots.llm, "image": slots.image},
        drain_timeout_s=settings.shutdown_grace_s, session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms, client_id=settings.worker_id,
        client_options=kafka_options,
    )
    _closing(stack, "kafka consumer", consumer.stop)
    metrics.watch_consumer(consumer.in_flight, consumer.buffered)
    stack.callback(engine.close)  # retry timers go before the consumer closes (as the drain has finished)
    await start_kafka(consumer.start, bootstrap, _remaining(deadline), "Kafka (consumer)")

    reconciler = Reconciler(db=db, store=store, engine=engine, publisher=producer, worker_id=settings.worker_id,
                            interval_s=settings.reconcile_interval_s, lease_s=settings.task_lease_s,
                            ensure_topics=lambda: ensure_topics(bootstrap, topics, settings.kafka_topic_partitions,
                                                                kafka_options))
    reporter = WorkerStatusReporter(WorkerStatusStore(db), worker_id=settings.worker_id, counters=lambda: {
        "in_flight": consumer.in_flight(), "buffered": consumer.buffered(), "processed": consumer.processed,
        "taken_idle": consumer.taken_idle, "dead_lettered": consumer.dead_lettered, "breakers": breakers.snapshot()},
        interval_s=settings.worker_status_interval_s)
    health = HealthServer(settings.service_host, settings.service_port, stats=reporter.stats,
                          ready=worker_readiness(settings, db, producer, consumer, stop))
    _closing(stack, "health endpoint", health.stop)
    try:
        await health.start()
    except OSError as exc:
        raise Unreachable("health endpoint", f"{settings.service_host}:{settings.service_port}", exc,
                          "check SERVICE_HOST / SERVICE_PORT (is the port already in use?)", usage=True) from None
    reconcile_task = asyncio.create_task(reconciler.run(stop))
    stack.push_async_callback(_cancel, reconcile_task)
    _closing(stack, "worker status", reporter.close)  # removes this worker's status document
    reporter.start()
    stack.callback(stop.set)  # whatever ends the run, the reconciler and the timers stop first
    return consumer


def _idle_work(engine: Engine, after_s: float) -> IdleWork | None:
    """Idle work for the consumer: tasks pending for `after_s` (IDLE_WORK_AFTER_S; 0 turns it off)."""
    if after_s <= 0:
        return None

    async def find(pool: str, limit: int) -> list[TaskEvent]:
        return await engine.idle_work(pool, limit, after_s)

    return find


def _ignore_late_sigterm(loop: asyncio.AbstractEventLoop) -> None:
    """Everything is closed: a SIGTERM that arrives now (a repeated one, while asyncio.run tears down the loop)
    must not turn the clean exit into death by signal. Closing the loop would restore the default action."""
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
