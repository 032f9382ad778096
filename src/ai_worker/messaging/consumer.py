"""The task consumer: one poll loop, a bounded pool of in-flight tasks, per-partition offset tracking.

- Commits only the lowest unfinished offset per partition (never a bare commit()).
- Backpressure: at MAX_CONCURRENT_TASKS in flight every assigned partition is paused (the loop keeps
  polling, so the group membership stays alive) and resumed when a slot frees; nothing is rejected.
- A message that cannot be parsed, has an unknown event type, or names a missing task is sent to the
  dead-letter topic with the reason in its headers, then committed. Nothing stops the loop.
- On partitions revoked and on shutdown: stop dispatching, wait a bounded time, commit what finished; on
  shutdown, what did not finish is cancelled (and awaited, so nothing runs on after the clients close) and
  left uncommitted, to be redelivered.
- Every line logged while a message is handled carries `kafka_partition` and `kafka_offset`, so a skip or a
  failure can be traced to the message that caused it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition

from ai_worker.messaging.events import BadMessage, TaskEvent, parse_task_event
from ai_worker.messaging.offsets import OffsetTracker
from ai_worker.messaging.producer import EventProducer

log = structlog.get_logger(__name__)

Handler = Callable[[TaskEvent], Awaitable[None]]
COMMIT_INTERVAL_S = 0.5
CANCEL_WAIT_S = 2.0


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: TaskConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        await self._owner._on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        log.info("partitions assigned", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))


class TaskConsumer:
    def __init__(
        self,
        *,
        bootstrap: Sequence[str],
        topic: str,
        group_id: str,
        handler: Handler,
        producer: EventProducer,
        max_in_flight: int,
        drain_timeout_s: float,
        session_timeout_ms: int = 10000,
        heartbeat_interval_ms: int = 3000,
        client_id: str = "ai-worker",
    ) -> None:
        self.topic = topic
        self._handler = handler
        self._producer = producer
        self._max_in_flight = max_in_flight
        self._drain_timeout_s = drain_timeout_s
        self._tracker = OffsetTracker()
        self._tasks: dict[TopicPartition, set[asyncio.Task[None]]] = {}
        self._paused = False
        self._last_commit = 0.0
        self.processed = 0
        self.dead_lettered = 0
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=list(bootstrap),
            group_id=group_id,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
            fetch_max_wait_ms=100,
            max_partition_fetch_bytes=2 * 1024 * 1024,
        )

    # --- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.subscribe([self.topic], listener=_Rebalance(self))

    async def stop(self) -> None:
        await self._consumer.stop()

    def in_flight(self) -> int:
        return sum(len(s) for s in self._tasks.values())

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until `stop` is set, then drain (bounded) and commit what finished."""
        log.info("consumer running", topic=self.topic, max_in_flight=self._max_in_flight)
        try:
            while not stop.is_set():
                self._apply_backpressure()
                free = max(1, self._max_in_flight - self.in_flight())
                batch = await self._consumer.getmany(timeout_ms=200, max_records=free)
                for tp, messages in batch.items():
                    for msg in messages:
                        self._dispatch(tp, msg)
                await self._commit(force=False)
        finally:
            await self._drain(list(self._tasks), "shutdown")
            await self._cancel_unfinished()

    async def _cancel_unfinished(self) -> None:
        """Cancel the tasks the drain left behind and wait (briefly) until they have unwound."""
        leftover = [t for tasks in self._tasks.values() for t in tasks if not t.done()]
        if not leftover:
            return
        for task in leftover:
            task.cancel()
        _, still = await asyncio.wait(leftover, timeout=CANCEL_WAIT_S)
        if still:
            log.warning("in-flight tasks did not stop after cancellation", unfinished=len(still))

    # --- dispatch -----------------------------------------------------------------------------------------
    def _apply_backpressure(self) -> None:
        full = self.in_flight() >= self._max_in_flight
        if full and not self._paused:
            assigned = list(self._consumer.assignment())
            if assigned:
                self._consumer.pause(*assigned)
                self._paused = True
                log.debug("paused: in-flight bound reached", in_flight=self.in_flight())
        elif not full and self._paused:
            paused = list(self._consumer.paused())
            if paused:
                self._consumer.resume(*paused)
            self._paused = False

    def _dispatch(self, tp: TopicPartition, msg: ConsumerRecord[bytes, bytes]) -> None:
        self._tracker.add(tp, msg.offset)
        task = asyncio.create_task(self._process(tp, msg))
        self._tasks.setdefault(tp, set()).add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.get(tp, set()).discard(t)
            self._tracker.done(tp, msg.offset)

        task.add_done_callback(done)

    async def _process(self, tp: TopicPartition, msg: ConsumerRecord[bytes, bytes]) -> None:
        # Each message runs in its own asyncio task (its own contextvars copy): bind where it came from.
        structlog.contextvars.bind_contextvars(kafka_partition=tp.partition, kafka_offset=msg.offset)
        where = {"partition": tp.partition, "offset": msg.offset}
        try:
            event = parse_task_event(msg.value)
            await self._handler(event)
            self.processed += 1
        except BadMessage as exc:
            log.warning("message dead-lettered", reason=exc.reason, **where)
            await self._dead_letter(tp, msg, exc.reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Infrastructure trouble (database down, ...): the task stays in Mongo, where the
            # reconciler finds it; the message itself was fine, so it is not dead-lettered.
            log.error("message handling failed; left to the reconciler", error=str(exc),
                      error_type=type(exc).__name__, **where)

    async def _dead_letter(self, tp: TopicPartition, msg: ConsumerRecord[bytes, bytes], reason: str) -> None:
        try:
            await self._producer.send_dead_letter(
                value=msg.value, key=msg.key, headers=list(msg.headers or ()), reason=reason,
                source_topic=tp.topic, partition=tp.partition, offset=msg.offset,
            )
            self.dead_lettered += 1
        except Exception as exc:
            log.error("dead-letter publish failed; message skipped", reason=reason, error=str(exc),
                      partition=tp.partition, offset=msg.offset)

    # --- commits --------------------------------------------------------------------------------------------
    async def _commit(self, *, force: bool, tps: Sequence[TopicPartition] | None = None) -> None:
        now = time.monotonic()
        if not force and now - self._last_commit < COMMIT_INTERVAL_S:
            return
        self._last_commit = now
        offsets = self._tracker.to_commit(tps)
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
            self._tracker.mark_committed(offsets)
        except Exception as exc:
            log.warning("commit failed; will retry", error=str(exc), error_type=type(exc).__name__)

    async def _drain(self, tps: list[TopicPartition], why: str) -> None:
        pending = [t for tp in tps for t in self._tasks.get(tp, set())]
        if pending:
            log.info("draining in-flight tasks", why=why, in_flight=len(pending),
                     timeout_s=self._drain_timeout_s)
            _, still = await asyncio.wait(pending, timeout=self._drain_timeout_s)
            if still:
                log.warning("drain timed out; unfinished tasks will be redelivered", unfinished=len(still))
        await self._commit(force=True, tps=tps)

    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        if not revoked:
            return
        log.info("partitions revoked", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in revoked))
        await self._drain(revoked, "revoke")
        self._tracker.forget(revoked)
        self._paused = False
