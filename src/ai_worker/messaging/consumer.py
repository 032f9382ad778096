"""The task consumer: one poll loop, a bounded window of buffered events, a scheduler that picks what runs
next, and per-partition offset tracking.

- Events are read into a window of at most `window` events (buffered + running); at the bound every
  assigned partition is paused (the loop keeps polling, so the group membership stays alive) and resumed
  when there is room again; nothing is rejected.
- At most `max_running` events are handled at once. When a slot frees, the next event is chosen by the
  scheduling policy (`ai_worker.scheduling`): the world with the fewest running tasks first (a world
  started while others run gets its share promptly), then the job's priority (work that unlocks more work
  first), then arrival order; a task whose provider pool already has its cap of running tasks
  (`pool_caps`) stays buffered until one of them ends (its task pending, where idle work can take it).
  The event's `world_id` and `task_type` are used as hints for this; the task document stays the truth.
- Idle work (`find_idle_work`): when a provider pool runs fewer tasks than its slots (`idle_slots`) and
  nothing of that pool is buffered here, the consumer asks for tasks of that pool that have waited
  pending for a while (their events sit in another worker's buffer, or are unread) and runs them through
  the same handler; the task's claim decides who runs it, so the event that arrives later (here or at the
  other worker) is skipped. With several worker processes the partitions split a world's tasks unevenly;
  this keeps every process's provider slots busy while any has a backlog. The look-ups back off (0.25 s
  doubling to 1 s) while they find nothing; a pool that was busy looks at once when it idles again.
- Commits only the lowest unfinished offset per partition (never a bare commit()): a buffered event is
  unfinished until it has been handled.
- A message that cannot be parsed, has an unknown event type, or names a missing or malformed task is sent
  to the dead-letter topic with the reason in its headers, then committed. Nothing stops the loop.
- On partitions revoked and on shutdown: stop dispatching, drop what is buffered for those partitions (it
  was not committed: the next owner reads it again), wait a bounded time for what runs, commit what
  finished; on shutdown, what did not finish is cancelled (and awaited, so nothing runs on after the
  clients close) and left uncommitted, to be redelivered.
- Every line logged while a message is handled carries `kafka_partition` and `kafka_offset`, so a skip or a
  failure can be traced to the message that caused it."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition

from ai_worker.messaging.events import BadMessage, TaskEvent, parse_task_event
from ai_worker.messaging.offsets import OffsetTracker
from ai_worker.messaging.producer import EventProducer
from ai_worker.observability import metrics, tracing
from ai_worker.scheduling import FairQueue, WorkClass

log = structlog.get_logger(__name__)

Handler = Callable[[TaskEvent], Awaitable[None]]
Classifier = Callable[[TaskEvent], WorkClass]
Record = ConsumerRecord  # ConsumerRecord[bytes, bytes]
IdleWork = Callable[[str, int], Awaitable[list[TaskEvent]]]
COMMIT_INTERVAL_S = 0.5
CANCEL_WAIT_S = 2.0
IDLE_LOOK_MIN_S = 0.25
IDLE_LOOK_MAX_S = 1.0


def _by_task(event: TaskEvent) -> WorkClass:
    return WorkClass(world=event.world_id or event.task_id, priority=0)


@dataclass
class _Item:
    tp: TopicPartition
    msg: Any  # ConsumerRecord
    event: TaskEvent | None  # None: the message is not a valid event (dead-lettered when it runs)
    reason: str | None = None


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
        window: int | None = None,
        classify: Classifier = _by_task,
        pool_caps: Mapping[str, int] | None = None,
        find_idle_work: IdleWork | None = None,
        idle_slots: Mapping[str, int] | None = None,
        session_timeout_ms: int = 10000,
        heartbeat_interval_ms: int = 3000,
        client_id: str = "ai-worker",
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.topic = topic
        self._handler = handler
        self._producer = producer
        self._max_running = max_in_flight
        self._window = max(window or 0, max_in_flight)
        self._classify = classify
        self._pool_caps = dict(pool_caps or {})
        self._running_by_pool: Counter[str] = Counter()
        self._find_idle_work = find_idle_work
        self._idle_slots = dict(idle_slots or {})
        self._idle_next: dict[str, tuple[float, float]] = {}  # pool -> (next look-up at, back-off interval)
        self._looking: asyncio.Task[None] | None = None
        self._taken: set[asyncio.Task[None]] = set()  # idle work running (no message of ours behind it)
        self._idle_failing = False  # the last look-up failed: the next failures are logged at debug
        self.taken_idle = 0
        self._drain_timeout_s = drain_timeout_s
        self._tracker = OffsetTracker()
        self._queue: FairQueue[_Item] = FairQueue()
        self._running: dict[TopicPartition, set[asyncio.Task[None]]] = {}
        self._running_by_world: Counter[str] = Counter()
        self._dispatching = True
        self._paused = False
        self._last_commit = 0.0
        self.last_poll = 0.0
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
            **dict(client_options or {}),
        )
        self._lag = metrics.ConsumerLag(self._consumer)

    # --- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.subscribe([self.topic], listener=_Rebalance(self))

    async def stop(self) -> None:
        await self._consumer.stop()

    def assignment(self) -> set[TopicPartition]:
        return set(self._consumer.assignment())

    def in_flight(self) -> int:
        """Events handled right now (idle work included)."""
        return sum(len(s) for s in self._running.values()) + len(self._taken)

    def buffered(self) -> int:
        """Events read and waiting for a slot."""
        return len(self._queue)

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until `stop` is set, then drain (bounded) and commit what finished."""
        log.info("consumer running", topic=self.topic, max_running=self._max_running, window=self._window)
        try:
            while not stop.is_set():
                self._apply_backpressure()
                room = max(1, self._window - self.in_flight() - self.buffered())
                batch = await self._consumer.getmany(timeout_ms=200, max_records=room)
                self.last_poll = time.monotonic()
                for tp, messages in batch.items():
                    for msg in messages:
                        self._accept(tp, msg)
                self._fill()
                self._look_for_idle_work()
                await self._commit(force=False)
                await self._lag.refresh()
        finally:
            self._dispatching = False
            if self._looking is not None:
                self._looking.cancel()
            self._drop_buffered(None)
            await self._drain(list(self._running), "shutdown", also=list(self._taken))
            await self._cancel_unfinished()

    async def _cancel_unfinished(self) -> None:
        """Cancel the tasks the drain left behind and wait (briefly) until they have unwound."""
        leftover = [t for tasks in [*self._running.values(), self._taken] for t in tasks if not t.done()]
        if not leftover:
            return
        for task in leftover:
            task.cancel()
        _, still = await asyncio.wait(leftover, timeout=CANCEL_WAIT_S)
        if still:
            log.warning("in-flight tasks did not stop after cancellation", unfinished=len(still))

    # --- the window and the scheduler ---------------------------------------------------------------------
    def _apply_backpressure(self) -> None:
        full = self.in_flight() + self.buffered() >= self._window
        if full and not self._paused:
            assigned = list(self._consumer.assignment())
            if assigned:
                self._consumer.pause(*assigned)
                self._paused = True
                log.debug("paused: window full", running=self.in_flight(), buffered=self.buffered())
        elif not full and self._paused:
            paused = list(self._consumer.paused())
            if paused:
                self._consumer.resume(*paused)
            self._paused = False

    def _accept(self, tp: TopicPartition, msg: Any) -> None:
        """Track the message and buffer it for the scheduler (an unusable one is dead-lettered at once)."""
        self._tracker.add(tp, msg.offset)
        metrics.event_received()
        try:
            event = parse_task_event(msg.value)
        except BadMessage as exc:
            self._start(_Item(tp, msg, None, exc.reason), WorkClass(world="", priority=1_000_000))
            return
        self._queue.push(_Item(tp, msg, event), self._classify(event))

    def _fill(self) -> None:
        while self._dispatching and self.in_flight() < self._max_running:
            full = [pool for pool, cap in self._pool_caps.items() if self._running_by_pool[pool] >= cap]
            picked = self._queue.pop(self._running_by_world, full)
            if picked is None:
                return
            item, work = picked
            self._start(item, work)

    def _start(self, item: _Item, work: WorkClass) -> None:
        task = asyncio.create_task(self._process(item))
        self._running.setdefault(item.tp, set()).add(task)
        self._running_by_world[work.world] += 1
        self._running_by_pool[work.pool] += 1

        def done(t: asyncio.Task[None]) -> None:
            self._running.get(item.tp, set()).discard(t)
            self._forget_running(work)
            self._tracker.done(item.tp, item.msg.offset)
            self._fill()

        task.add_done_callback(done)

    # --- idle work ---------------------------------------------------------------------------------------------
    def _idle_room(self, pool: str) -> int:
        return min(self._idle_slots[pool] - self._running_by_pool[pool], self._max_running - self.in_flight())

    def _look_for_idle_work(self) -> None:
        """Start one look-up for a pool whose slots idle while nothing of it is buffered here (at most one
        look-up at a time; each pool's look-ups back off while they find nothing)."""
        if self._find_idle_work is None or self._looking is not None or not self._dispatching:
            return
        now = time.monotonic()
        buffered = self._queue.pools()
        for pool in self._idle_slots:
            room = self._idle_room(pool)
            if room <= 0:  # busy: the first look-up once it idles again goes out at once
                self._idle_next.pop(pool, None)
                continue
            next_at, _ = self._idle_next.get(pool, (0.0, IDLE_LOOK_MIN_S))
            if pool not in buffered and now >= next_at:
                self._looking = asyncio.create_task(self._take_idle_work(pool, room))
                return

    async def _take_idle_work(self, pool: str, room: int) -> None:
        assert self._find_idle_work is not None
        try:
            events = await self._find_idle_work(pool, room)
            if self._idle_failing:
                log.info("looking for idle work works again", pool=pool)
            self._idle_failing = False
        except Exception as exc:  # the database is down: logged once, until a look-up works again
            (log.debug if self._idle_failing else log.warning)(
                "looking for idle work failed", pool=pool, error=str(exc), error_type=type(exc).__name__)
            self._idle_failing = True
            events = []
        finally:
            self._looking = None
        log.debug("idle work look-up", pool=pool, room=room, found=len(events))
        _, interval = self._idle_next.get(pool, (0.0, IDLE_LOOK_MIN_S))
        interval = IDLE_LOOK_MIN_S if events else min(IDLE_LOOK_MAX_S, 2 * interval)
        self._idle_next[pool] = (time.monotonic() + interval, interval)
        for event in events[:max(0, self._idle_room(pool))]:
            if not self._dispatching:
                return
            self._start_idle(event, self._classify(event))

    def _start_idle(self, event: TaskEvent, work: WorkClass) -> None:
        task = asyncio.create_task(self._process_idle(event))
        self._taken.add(task)
        self._running_by_world[work.world] += 1
        self._running_by_pool[work.pool] += 1
        self.taken_idle += 1
        metrics.idle_work_taken(work.pool)

        def done(t: asyncio.Task[None]) -> None:
            self._taken.discard(t)
            self._forget_running(work)
            self._fill()

        task.add_done_callback(done)

    async def _process_idle(self, event: TaskEvent) -> None:
        structlog.contextvars.bind_contextvars(idle_work=True)
        try:
            await self._handler(event)
            self.processed += 1
        except BadMessage as exc:  # its own message is dead-lettered where it is read
            log.warning("idle work not run", task_id=event.task_id, reason=exc.reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("idle work failed; left to the reconciler", task_id=event.task_id, error=str(exc),
                      error_type=type(exc).__name__)

    def _forget_running(self, work: WorkClass) -> None:
        self._running_by_world[work.world] -= 1
        self._running_by_pool[work.pool] -= 1
        if self._running_by_world[work.world] <= 0:
            del self._running_by_world[work.world]

    def _drop_buffered(self, tps: Sequence[TopicPartition] | None) -> None:
        """Forget buffered events (of `tps`, or all). They stay unfinished in the offset tracker, so no commit
        passes them: they will be read again (by this worker after a restart, or by the partition's next
        owner)."""
        wanted = None if tps is None else set(tps)
        dropped = self._queue.remove_if(lambda item: wanted is None or item.tp in wanted)
        if dropped:
            log.info("buffered events dropped, to be read again", count=len(dropped))

    # --- handling one message -------------------------------------------------------------------------------
    async def _process(self, item: _Item) -> None:
        tp, msg = item.tp, item.msg
        # Each message runs in its own asyncio task (its own contextvars copy): bind where it came from.
        structlog.contextvars.bind_contextvars(kafka_partition=tp.partition, kafka_offset=msg.offset)
        where = {"partition": tp.partition, "offset": msg.offset}
        tracing.received(msg.headers)
        try:
            if item.event is None:
                raise BadMessage(item.reason or "not a task event")
            await self._handler(item.event)
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

    async def _dead_letter(self, tp: TopicPartition, msg: Any, reason: str) -> None:
        try:
            await self._producer.send_dead_letter(
                value=msg.value, key=msg.key, headers=list(msg.headers or ()), reason=reason,
                source_topic=tp.topic, partition=tp.partition, offset=msg.offset,
            )
            self.dead_lettered += 1
            metrics.dead_lettered(reason)
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

    async def _drain(self, tps: list[TopicPartition], why: str, also: Sequence[asyncio.Task[None]] = ()) -> None:
        pending = [t for tp in tps for t in self._running.get(tp, set())] + list(also)
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
        self._drop_buffered(revoked)
        await self._drain(revoked, "revoke")
        self._tracker.forget(revoked)
        self._paused = False
