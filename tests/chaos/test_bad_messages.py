"""C5: a flood of bad messages interleaved with a real world. Non-JSON bytes, JSON that is not an object,
wrong types, missing fields, ~1 MB strings, unknown event types, non-UUID and unknown task ids, null values,
and duplicated valid events of tasks that already finished. The world still completes, the consumer never
stops, and every bad message is accounted for exactly once: in the dead-letter topic (matched by its
source partition/offset header) or skipped with a logged reason (matched by the `kafka_partition` /
`kafka_offset` the consumer binds to every line it logs while handling a message)."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from harness import FAST, chaos_stack
from invariants import record_result
from support import read_topic

# ~1 MB: the embedded broker (tansu) accepts it, and so does the worker's dead-letter producer (2 MB max).
BIG = 1024 * 1024
SKIP_EVENTS = ("duplicate event skipped", "task not claimable", "task not due yet")
NAMES = ("w1",)


def bad_message(rng: random.Random, i: int) -> tuple[str, bytes | None]:
    """One generated bad message (kind, value); never a valid event for an existing task."""
    kind = rng.choice(KINDS)
    return kind, GENERATORS[kind](rng, i)


def _garbage(rng: random.Random, i: int) -> bytes:
    return rng.choice([b"this is not json {", b"\xff\xfe\x00garbage", b"", b"{\"event_type\": \"task_created\"",
                       bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))])


def _not_object(rng: random.Random, i: int) -> bytes:
    return json.dumps(rng.choice([[1, 2, 3], 42, "task_created", None, True, 3.5])).encode()


def _wrong_types(rng: random.Random, i: int) -> bytes:
    event: dict[str, Any] = {"event_type": "task_created", "task_id": str(uuid.uuid4()), "world_id": "w"}
    field, value = rng.choice([("task_id", 12345), ("event_type", 7), ("parameters", "not an object"),
                               ("task_id", None), ("task_id", ["a"]), ("world_id", {"x": 1}),
                               ("task_type", 3.14)])
    event[field] = value
    return json.dumps(event).encode()


def _missing_fields(rng: random.Random, i: int) -> bytes:
    event = {"event_type": "task_created", "task_id": str(uuid.uuid4()), "task_type": "generate_post"}
    for name in rng.sample(["event_type", "task_id"], rng.randint(1, 2)):
        del event[name]
    return json.dumps(event).encode()


def _huge(rng: random.Random, i: int) -> bytes:
    event = {"event_type": "task_created", "task_id": str(uuid.uuid4()), "parameters": {"x": "a" * BIG}}
    return json.dumps(event).encode()


def _unknown_event(rng: random.Random, i: int) -> bytes:
    return json.dumps({"event_type": f"task_exploded_{i}", "task_id": str(uuid.uuid4())}).encode()


def _bad_task_id(rng: random.Random, i: int) -> bytes:
    task_id = rng.choice(["", "not-a-uuid", "x" * 129, f"task-{i}", "../../etc/passwd"])
    return json.dumps({"event_type": "task_created", "task_id": task_id}).encode()


def _unknown_task(rng: random.Random, i: int) -> bytes:
    return json.dumps({"event_type": "task_created", "task_id": str(uuid.uuid4()),
                       "task_type": "generate_post", "world_id": str(uuid.uuid4())}).encode()


def _null(rng: random.Random, i: int) -> bytes | None:
    return None


GENERATORS = {
    "not_json": _garbage, "not_object": _not_object, "wrong_types": _wrong_types, "missing_fields": _missing_fields,
    "unknown_event_type": _unknown_event, "bad_task_id": _bad_task_id, "unknown_task": _unknown_task, "null": _null,
}
KINDS = tuple(GENERATORS)


class Flood:
    """Produces the bad messages and remembers where each one landed (partition, offset)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=4 * BIG, linger_ms=5,
                                         request_timeout_ms=30000)
        self.sent: dict[tuple[int, int], str] = {}

    async def send(self, batch: list[tuple[str, bytes | None]]) -> None:
        futures = []
        for kind, value in batch:
            key = b"tombstone" if value is None else None  # a null value needs a key
            futures.append((kind, await self.producer.send(self.topic, value, key=key)))
        for kind, fut in futures:
            meta = await fut
            self.sent[(meta.partition, meta.offset)] = kind


async def run_c5(tmp_path: Path, *, users: int, posts: int, bad: int, huge: int, duplicates: int, seed: int,
                 timeout_s: float) -> None:
    rng = random.Random(seed)
    async with chaos_stack(tmp_path, latency_ms=50) as c:
        worker = c.env.start_worker("w1", **FAST)
        db = c.client[c.env.database]
        flood = Flood(c.env.info.kafka_bootstrap, c.env.tasks_topic)
        await flood.producer.start()
        try:
            t0 = time.monotonic()
            world_id = await c.send(users, posts)
            plain = bad - huge - duplicates
            messages = [bad_message(rng, i) for i in range(plain)] + [("huge", _huge(rng, i)) for i in range(huge)]
            rng.shuffle(messages)
            rounds = 10
            per_round = -(-len(messages) // rounds)
            dup_left = duplicates
            for r in range(rounds):
                # Interleave with the world: a slice of the flood, then duplicates of tasks that already finished.
                await flood.send(messages[r * per_round:(r + 1) * per_round])
                done = [t async for t in db["tasks"].find(
                    {"world_id": world_id, "status": {"$in": ["completed", "failed"]}}, {"type": 1})]
                if done and dup_left:
                    n = dup_left if r == rounds - 1 else min(dup_left, -(-duplicates // rounds))
                    dups = []
                    for _ in range(n):
                        task = rng.choice(done)
                        dups.append(("duplicate", json.dumps({
                            "event_type": "task_created", "task_id": task["_id"], "task_type": task["type"],
                            "world_id": world_id}).encode()))
                    await flood.send(dups)
                    dup_left -= n
                await asyncio.sleep(0.3)
            while dup_left:  # the world had not finished a task yet: wait for one
                done = [t async for t in db["tasks"].find({"world_id": world_id, "status": "completed"}, {"type": 1})]
                if done:
                    task = done[0]
                    await flood.send([("duplicate", json.dumps({
                        "event_type": "task_created", "task_id": task["_id"], "task_type": task["type"],
                        "world_id": world_id}).encode()) for _ in range(dup_left)])
                    dup_left = 0
                await asyncio.sleep(0.2)
        finally:
            await flood.producer.stop()
        assert len(flood.sent) == bad

        status = await c.wait_world(world_id, timeout_s, NAMES)
        elapsed = time.monotonic() - t0
        assert status == "completed", c.tails(NAMES)
        report = await c.check(world_id, users=users, posts=posts)

        expected_dlq = sum(1 for kind in flood.sent.values() if kind != "duplicate")
        # Wait until the consumer has dealt with everything we sent (DLQ complete, skips logged).
        deadline = time.monotonic() + 30
        while True:
            dead = await read_topic(c.env.info.kafka_bootstrap, c.env.dlq_topic, expect=expected_dlq, timeout_s=5)
            skipped = _skips(c.env.log_lines("w1"), c.env.tasks_topic)
            if (len(dead) >= expected_dlq and len(skipped & set(flood.sent)) >= duplicates) \
                    or time.monotonic() > deadline:
                break
        assert worker.poll() is None, "the worker stopped\n" + c.tails(NAMES)

        dead_at: dict[tuple[int, int], str] = {}
        for m in dead:
            headers = {k: v.decode(errors="replace") for k, v in (m.headers or ())}
            assert headers["x-dlq-source-topic"] == c.env.tasks_topic
            where = (int(headers["x-dlq-source-partition"]), int(headers["x-dlq-source-offset"]))
            assert where not in dead_at, f"dead-lettered twice: {where}"
            dead_at[where] = headers["x-dlq-reason"]
        # Nothing but our bad messages went to the DLQ (the world's own events were all fine).
        assert set(dead_at) <= set(flood.sent), set(dead_at) - set(flood.sent)
        unaccounted = {w: k for w, k in flood.sent.items() if (w in dead_at) == (w in skipped)}
        assert not unaccounted, f"{len(unaccounted)} bad messages neither dead-lettered nor skipped (or both): " \
                                f"{list(unaccounted.items())[:10]}"
        for where, kind in flood.sent.items():
            if kind == "duplicate":
                assert where in skipped, (where, dead_at.get(where))
            else:
                assert where in dead_at, (where, kind)
        assert len(dead_at) + len(skipped & set(flood.sent)) == bad
        reasons = [r for r in dead_at.values()]
        assert any(r.startswith("message too large") for r in reasons) == (huge > 0)
        assert any(r.startswith("not JSON") for r in reasons)
        assert any("unknown task id" in r for r in reasons)
        logged = [x for x in c.env.log_lines("w1") if x.get("event") == "message dead-lettered"]
        assert len(logged) == len(dead_at)
        print(f"C5 {users}/{posts} + {bad} bad ({huge} of ~1 MB, {duplicates} duplicates): completed in "
              f"{elapsed:.1f}s, {len(dead_at)} dead-lettered, {len(skipped & set(flood.sent))} skipped")
        record_result("C5 bad messages (1 worker)", f"{users}/{posts}", bad, report, elapsed,
                      f"{bad} bad messages ({huge} of ~1 MB, {duplicates} duplicated valid events): "
                      f"{len(dead_at)} dead-lettered + {len(skipped & set(flood.sent))} skipped, consumer alive")


def _skips(lines: list[dict[str, Any]], topic: str) -> set[tuple[int, int]]:
    """(partition, offset) of the messages the worker logged a skip for."""
    out = set()
    for line in lines:
        event = str(line.get("event", ""))
        if event.startswith(SKIP_EVENTS) and "kafka_offset" in line:
            out.add((int(line["kafka_partition"]), int(line["kafka_offset"])))
    return out


async def test_c5_bad_messages_ci(tmp_path: Path) -> None:
    await run_c5(tmp_path, users=2, posts=4, bad=200, huge=2, duplicates=20, seed=5, timeout_s=60)


@pytest.mark.chaos
async def test_c5_bad_messages_chaos(tmp_path: Path) -> None:
    await run_c5(tmp_path, users=5, posts=10, bad=1000, huge=6, duplicates=100, seed=6, timeout_s=180)
