"""The scheduling policy: slots and buffered work are served fair by world, then by priority, then FIFO."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from ai_worker.scheduling import CURRENT, FairQueue, FairSlots, WorkClass, pool_cap, working_as


async def _start(slots: FairSlots, work: WorkClass, order: list[str], name: str, hold: asyncio.Event) -> None:
    async with slots.slot(work):
        order.append(name)
        await hold.wait()


async def test_free_slots_are_taken_at_once_then_waiters_queue() -> None:
    slots = FairSlots(2)
    a, b = WorkClass("w1", 0), WorkClass("w1", 0)
    assert await slots.acquire(a) == a and await slots.acquire(b) == b
    assert slots.in_use == 2
    waiter = asyncio.create_task(slots.acquire(WorkClass("w1", 0)))
    await asyncio.sleep(0)
    assert not waiter.done() and slots.waiting == 1
    slots.release(a)
    await asyncio.wait_for(waiter, 1)
    assert slots.in_use == 2 and slots.waiting == 0


async def test_a_waiting_world_with_fewer_slots_goes_first() -> None:
    slots = FairSlots(2)
    big = WorkClass("big", 0)
    await slots.acquire(big)
    await slots.acquire(big)
    order: list[str] = []
    hold = asyncio.Event()
    tasks = [asyncio.create_task(_start(slots, WorkClass("big", 0), order, f"big{i}", hold)) for i in range(3)]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(_start(slots, WorkClass("small", 0), order, "small", hold)))
    await asyncio.sleep(0)
    slots.release(big)  # one slot frees: the small world (0 held) beats the big one (1 held), though later
    await asyncio.sleep(0)
    assert order == ["small"]
    slots.release(big)
    await asyncio.sleep(0)
    assert order == ["small", "big0"]
    hold.set()
    await asyncio.gather(*tasks)
    assert slots.in_use == 0


async def test_within_a_world_higher_priority_first_then_fifo() -> None:
    slots = FairSlots(1)
    first = WorkClass("w", 0)
    await slots.acquire(first)
    order: list[str] = []
    hold = asyncio.Event()
    hold.set()
    tasks = []
    for name, prio in (("leaf1", 10), ("leaf2", 10), ("batch", 60), ("description", 90)):
        tasks.append(asyncio.create_task(_start(slots, WorkClass("w", prio), order, name, hold)))
        await asyncio.sleep(0)
    slots.release(first)
    await asyncio.gather(*tasks)
    assert order == ["description", "batch", "leaf1", "leaf2"]


async def test_a_cancelled_waiter_leaves_no_trace() -> None:
    slots = FairSlots(1)
    holder = WorkClass("w", 0)
    await slots.acquire(holder)
    waiter = asyncio.create_task(slots.acquire(WorkClass("w", 5)))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.waiting == 0
    slots.release(holder)
    assert slots.in_use == 0
    assert await slots.acquire(WorkClass("x", 0)) == WorkClass("x", 0)


async def test_the_current_work_class_travels_in_the_context() -> None:
    slots = FairSlots(1)
    with working_as(WorkClass("world-7", 42)):
        assert CURRENT.get() == WorkClass("world-7", 42)
        assert await slots.acquire() == WorkClass("world-7", 42)
    assert CURRENT.get().world == ""


def test_queue_pops_fair_by_running_world_then_priority_then_arrival() -> None:
    q: FairQueue[str] = FairQueue()
    for name, world, prio in (("b-img1", "big", 10), ("b-img2", "big", 10), ("b-post", "big", 50),
                              ("s-desc", "small", 90), ("s-img", "small", 10)):
        q.push(name, WorkClass(world, prio))
    running: Counter[str] = Counter({"big": 5})
    popped = q.pop(running)
    assert popped == ("s-desc", WorkClass("small", 90))
    running["small"] += 1
    assert q.pop(running)[0] == "s-img"  # small still has fewer running (1 < 5)
    running["small"] += 1
    assert [q.pop(running)[0] for _ in range(3)] == ["b-post", "b-img1", "b-img2"]  # type: ignore[index]
    assert q.pop(running) is None and len(q) == 0


def test_queue_with_equal_running_serves_the_highest_priority_head() -> None:
    q: FairQueue[str] = FairQueue()
    q.push("a-leaf", WorkClass("a", 10))
    q.push("b-batch", WorkClass("b", 60))
    assert q.pop(Counter())[0] == "b-batch"  # type: ignore[index]


def test_queue_remove_if() -> None:
    q: FairQueue[int] = FairQueue()
    for i in range(10):
        q.push(i, WorkClass(f"w{i % 3}", i))
    removed = q.remove_if(lambda i: i % 2 == 0)
    assert sorted(removed) == [0, 2, 4, 6, 8] and len(q) == 5
    out = []
    while (item := q.pop(Counter())) is not None:
        out.append(item[0])
    assert sorted(out) == [1, 3, 5, 7, 9]


def test_queue_never_serves_a_full_pool() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(3):
        q.push(f"post{i}", WorkClass("w", 50, "llm"))
    q.push("image0", WorkClass("w", 10, "image"))
    q.push("image1", WorkClass("w", 10, "image"))
    running: Counter[str] = Counter()
    assert q.pop(running)[0] == "post0"  # type: ignore[index]  # no pool full: priority first
    popped = q.pop(running, full={"llm"})
    assert popped is not None and popped[0] == "image0" and popped[1] == WorkClass("w", 10, "image")
    assert q.pop(running, full={"llm"})[0] == "image1"  # type: ignore[index]
    # Only the full pool's items are left: they stay buffered (their tasks stay pending in the database,
    # where a worker whose slots of that pool idle can take them) until the pool has room.
    assert q.pop(running, full={"llm"}) is None and len(q) == 2
    assert q.pop(running, full={"llm", "image"}) is None
    assert q.pop(running)[0] == "post1"  # type: ignore[index]
    assert q.pools() == {"llm"}
    assert q.pop(running)[0] == "post2" and q.pop(running) is None and q.pools() == set()  # type: ignore[index]


async def test_the_consumer_caps_the_running_tasks_of_each_provider_pool() -> None:
    """Twelve high-priority LLM tasks and three image tasks buffered, six task slots, pool caps 3: the
    image tasks start at once instead of after the LLM backlog (which idled the image slots)."""
    from types import SimpleNamespace
    from typing import Any, cast

    from aiokafka import TopicPartition

    from ai_worker.messaging.consumer import TaskConsumer, _Item
    from ai_worker.messaging.events import TaskEvent

    gate = asyncio.Event()
    started: list[str] = []

    async def handler(event: TaskEvent) -> None:
        started.append(event.task_id)
        await gate.wait()

    consumer = TaskConsumer(bootstrap=["127.0.0.1:9"], topic="t", group_id="g", handler=handler,
                            producer=cast(Any, None), max_in_flight=6, drain_timeout_s=1.0,
                            pool_caps={"llm": 3, "image": 3})
    tp = TopicPartition("t", 0)
    items = [(f"post{i}", WorkClass("w", 50, "llm")) for i in range(12)]
    items += [(f"image{i}", WorkClass("w", 10, "image")) for i in range(3)]
    for offset, (task_id, work) in enumerate(items):
        consumer._tracker.add(tp, offset)
        event = TaskEvent(event_type="task_created", task_id=task_id)
        consumer._queue.push(_Item(tp, SimpleNamespace(offset=offset, headers=[]), event), work)
    consumer._fill()
    await asyncio.sleep(0.05)
    assert sorted(started) == ["image0", "image1", "image2", "post0", "post1", "post2"]
    gate.set()
    for _ in range(50):
        await asyncio.sleep(0.01)
        if len(started) == 15 and consumer.in_flight() == 0:
            break
    assert len(started) == 15 and consumer.in_flight() == 0
    await consumer.stop()


@pytest.mark.parametrize(("slots", "cap"), [(1, 3), (4, 6), (10, 12), (15, 18), (40, 48)])
def test_a_pool_runs_its_slots_and_a_few_tasks_more(slots: int, cap: int) -> None:
    """A few claimed tasks wait for each pool's slots (one replaces a finished call at once), never twice the
    slots: a task claimed here waits for this worker's slots even while another worker's idle."""
    assert pool_cap(slots) == cap
    assert pool_cap(slots) < 2 * slots or slots < 3


class _RecordingProducer:
    def __init__(self) -> None:
        self.dead_letters: list[str] = []

    async def send_dead_letter(self, **kwargs: object) -> None:
        self.dead_letters.append(str(kwargs.get("reason")))


async def test_idle_slots_take_work_that_waits_elsewhere_and_back_off_when_there_is_none() -> None:
    """A pool with idle slots and nothing of it buffered asks for tasks waiting elsewhere and runs them through
    the handler (at most its idle slots, and only while task slots are free); a look-up that finds nothing
    backs off; a task taken that cannot run is not dead-lettered (its own message is, where it is read)."""
    from types import SimpleNamespace
    from typing import Any, cast

    from aiokafka import TopicPartition
    from prometheus_client import REGISTRY

    from ai_worker.messaging import consumer as consumer_module
    from ai_worker.messaging.consumer import TaskConsumer, _Item
    from ai_worker.messaging.events import BadMessage, TaskEvent

    gate = asyncio.Event()
    started: list[str] = []
    looked: list[tuple[str, int]] = []
    waiting_elsewhere = {"image": [f"img{i}" for i in range(5)] + ["gone"], "llm": [f"char{i}" for i in range(4)]}

    async def handler(event: TaskEvent) -> None:
        if event.task_id == "gone":
            raise BadMessage("unknown task id gone: no such task document")
        started.append(event.task_id)
        await gate.wait()

    async def find_idle_work(pool: str, limit: int) -> list[TaskEvent]:
        looked.append((pool, limit))
        ids, waiting_elsewhere[pool] = waiting_elsewhere[pool][:limit], waiting_elsewhere[pool][limit:]
        return [TaskEvent(event_type="task_created", task_id=i, world_id="w", task_type=pool) for i in ids]

    def classify(event: TaskEvent) -> WorkClass:
        return WorkClass(event.world_id or "", 10, event.task_type or "")

    producer = _RecordingProducer()
    consumer = TaskConsumer(bootstrap=["127.0.0.1:9"], topic="t", group_id="g", handler=handler,
                            producer=cast(Any, producer), max_in_flight=8, drain_timeout_s=1.0,
                            classify=classify, pool_caps={"llm": 4, "image": 6}, find_idle_work=find_idle_work,
                            idle_slots={"llm": 2, "image": 3})
    tp = TopicPartition("t", 0)
    for offset in range(4):  # LLM work: over the llm pool's idle slots, so it is not looked up
        consumer._tracker.add(tp, offset)
        event = TaskEvent(event_type="task_created", task_id=f"post{offset}", world_id="w", task_type="llm")
        consumer._queue.push(_Item(tp, SimpleNamespace(offset=offset, headers=[]), event), classify(event))
    consumer._fill()
    await asyncio.sleep(0.02)
    assert sorted(started) == ["post0", "post1", "post2", "post3"]  # four LLM tasks running (cap 4)
    taken_before = REGISTRY.get_sample_value("ai_worker_idle_work_taken_total", {"pool": "image"}) or 0.0
    consumer._look_for_idle_work()
    await asyncio.sleep(0.05)
    assert looked == [("image", 3)]  # three idle image slots
    assert REGISTRY.get_sample_value("ai_worker_idle_work_taken_total", {"pool": "image"}) == taken_before + 3
    assert sorted(started[4:]) == ["img0", "img1", "img2"] and consumer.in_flight() == 7
    consumer._look_for_idle_work()  # the image slots are busy, the llm pool is over its slots: no look-up
    await asyncio.sleep(0.05)
    assert looked == [("image", 3)] and consumer.taken_idle == 3

    gate.set()
    await asyncio.sleep(0.05)
    assert consumer.in_flight() == 0 and consumer.processed == 7
    for _ in range(8):  # the rest is taken as the look-ups come due; then they find nothing and back off
        consumer._look_for_idle_work()
        await asyncio.sleep(0.3)
    assert waiting_elsewhere == {"image": [], "llm": []}
    assert sorted(started) == sorted([f"post{i}" for i in range(4)] + [f"img{i}" for i in range(5)]
                                     + [f"char{i}" for i in range(4)])
    assert producer.dead_letters == [] and consumer.taken_idle == 10  # "gone" was taken, not run, not dead-lettered
    assert looked[1] == ("llm", 2)  # pools in turn: the one that is due and idle
    assert all(interval > consumer_module.IDLE_LOOK_MIN_S for _, interval in consumer._idle_next.values())
    assert len(looked) <= 10, looked  # without the back-off: a look-up per pool every 0.3 s (16)
    await consumer.stop()
