"""Wiring and lifecycle of the worker: build clients, start/stop in order, signals, drain."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import httpx
import structlog
from pymongo import AsyncMongoClient

from ai_worker.config import Settings
from ai_worker.content.prompts import PromptLibrary
from ai_worker.images.enhance import PromptEnhancer
from ai_worker.images.service import ImageService
from ai_worker.images.upload import MediaUploader
from ai_worker.jobs import build_registry
from ai_worker.jobs.context import JobContext, Services
from ai_worker.llm.client import LLMClient
from ai_worker.messaging.admin import ensure_topics
from ai_worker.messaging.consumer import TaskConsumer
from ai_worker.messaging.producer import EventProducer
from ai_worker.observability.health import HealthServer
from ai_worker.platform.clients import PlatformClients
from ai_worker.providers.breaker import BreakerBoard
from ai_worker.providers.budget import MongoBudget
from ai_worker.providers.cost import BudgetPolicy, default_budget
from ai_worker.providers.history import MongoRecorder
from ai_worker.providers.ratelimit import MongoRateLimiter
from ai_worker.providers.routing import ModelRouter, concurrency
from ai_worker.tasks.engine import Engine
from ai_worker.tasks.progress import WorldProgress
from ai_worker.tasks.reconciler import Reconciler
from ai_worker.tasks.retry import RetryPolicy
from ai_worker.tasks.store import TaskStore
from ai_worker.worlds.parameters import WorldParametersStore
from ai_worker.worlds.status import WorldStatusStore

log = structlog.get_logger(__name__)


def mongo_client(settings: Settings) -> AsyncMongoClient[dict[str, Any]]:
    return AsyncMongoClient(settings.mongodb_uri, tz_aware=True, serverSelectionTimeoutMS=10000)


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    """SIGTERM/SIGINT: start the graceful shutdown; a repeated signal (during the drain) changes nothing."""
    if stop.is_set():
        log.info("shutdown already in progress; signal ignored", signal=sig.name)
        return
    log.info("shutdown requested", signal=sig.name)
    stop.set()


async def run_worker(settings: Settings, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, _on_signal, sig, stop)

    log.info("worker starting", worker_id=settings.worker_id, topic=settings.kafka_topic_tasks,
             group=settings.kafka_group_id, models=settings.models.assignments())
    mongo = mongo_client(settings)
    db = mongo[settings.mongodb_database]
    store = TaskStore(db)
    await store.ensure_indexes()
    status = WorldStatusStore(db)
    await status.ensure_indexes()
    topics = [settings.kafka_topic_tasks, settings.kafka_topic_progress, settings.kafka_topic_dlq]
    try:
        await ensure_topics(settings.kafka_bootstrap, topics, settings.kafka_topic_partitions)
    except Exception as exc:  # a managed cluster may forbid creation: the topics must then exist already
        log.warning("could not ensure topics", error=str(exc))

    recorder = MongoRecorder(db)
    await recorder.ensure_indexes()
    producer = EventProducer(
        bootstrap=settings.kafka_bootstrap, tasks_topic=settings.kafka_topic_tasks,
        progress_topic=settings.kafka_topic_progress, dlq_topic=settings.kafka_topic_dlq,
        enable_idempotence=settings.kafka_enable_idempotence, client_id=settings.worker_id,
    )
    await producer.start()
    platform = PlatformClients.from_settings(settings, recorder)
    budget = MongoBudget(db, daily_cap_usd=settings.daily_budget_usd)
    breakers = BreakerBoard(failure_threshold=settings.breaker_failure_threshold,
                            cooldown_s=settings.breaker_cooldown_s)
    router = ModelRouter(settings.models, limiter=MongoRateLimiter(db, max_wait_s=settings.rate_limit_max_wait_s),
                         breakers=breakers, concurrency=concurrency(settings))
    llm = LLMClient.from_settings(settings, recorder, budget, router)
    images = ImageService.from_settings(settings, recorder, budget, router)
    prompts = PromptLibrary()
    upload_http = httpx.AsyncClient(timeout=httpx.Timeout(settings.upload_timeout_s, connect=10))
    services = Services(
        llm=llm, images=images, media=MediaUploader(platform.media, upload_http, recorder), platform=platform,
        prompts=prompts, worlds=WorldParametersStore(db),
        enhance=PromptEnhancer(llm, prompts, enabled=True) if settings.image_prompt_enhance else None,
    )
    policy = RetryPolicy(base_delay_s=settings.retry_base_delay_s, max_delay_s=settings.retry_max_delay_s)
    registry = build_registry(max_attempts=settings.task_max_attempts)
    progress = WorldProgress(status, registry, default_budget=default_budget(
        registry.predict, settings.models, BudgetPolicy.from_settings(settings), enhance=settings.image_prompt_enhance))
    engine = Engine(store=store, progress=progress, registry=registry, context_factory=JobContext.factory(services),
                    accounting=recorder, publisher=producer, worker_id=settings.worker_id,
                    lease_s=settings.task_lease_s, policy=policy)
    consumer = TaskConsumer(
        bootstrap=settings.kafka_bootstrap, topic=settings.kafka_topic_tasks, group_id=settings.kafka_group_id,
        handler=engine.handle, producer=producer, max_in_flight=settings.max_concurrent_tasks,
        drain_timeout_s=settings.shutdown_grace_s, session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms, client_id=settings.worker_id,
    )
    reconciler = Reconciler(db=db, store=store, engine=engine, publisher=producer, worker_id=settings.worker_id,
                            interval_s=settings.reconcile_interval_s, lease_s=settings.task_lease_s,
                            ensure_topics=lambda: ensure_topics(settings.kafka_bootstrap, topics,
                                                                settings.kafka_topic_partitions))
    health = HealthServer(settings.service_host, settings.service_port, stats=lambda: {
        "worker_id": settings.worker_id, "in_flight": consumer.in_flight(), "processed": consumer.processed,
        "dead_lettered": consumer.dead_lettered, "breakers": breakers.snapshot()})
    await consumer.start()
    await health.start()
    reconcile_task = asyncio.create_task(reconciler.run(stop))
    try:
        await consumer.run(stop)
    finally:
        log.info("worker stopping")
        stop.set()
        reconcile_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reconcile_task
        engine.close()
        for closer in (consumer.stop, health.stop, producer.stop, llm.aclose, images.aclose, upload_http.aclose,
                       platform.close):
            try:
                await closer()
            except Exception as exc:
                log.warning("error while stopping", what=getattr(closer, "__qualname__", "?"), error=str(exc))
        await mongo.close()
        _ignore_late_sigterm(loop)
        log.info("worker stopped")


def _ignore_late_sigterm(loop: asyncio.AbstractEventLoop) -> None:
    """Everything is closed: a SIGTERM that arrives now (a repeated one, while asyncio.run tears down the loop)
    must not turn the clean exit into death by signal. Closing the loop would restore the default action."""
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
