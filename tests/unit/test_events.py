"""parse_task_event: every malformed message becomes a BadMessage with a readable reason."""

from __future__ import annotations

import json
import uuid

import pytest

from ai_worker.messaging.events import MAX_EVENT_BYTES, BadMessage, TaskEvent, parse_task_event

TASK_ID = str(uuid.UUID("1b4e28ba-2fa1-11d2-883f-0016d3cca427"))


def _raw(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def _reason(raw: bytes | None) -> str:
    with pytest.raises(BadMessage) as info:
        parse_task_event(raw)
    reason = info.value.reason
    assert reason == str(info.value)
    assert reason and len(reason) < 500
    return reason


def test_valid_event() -> None:
    event = parse_task_event(_raw(event_type="task_created", task_id=TASK_ID, task_type="generate_post",
                                  world_id="w1"))
    assert isinstance(event, TaskEvent)
    assert event.task_id == TASK_ID
    assert event.event_type == "task_created"
    assert event.task_type == "generate_post"
    assert event.world_id == "w1"


def test_platform_event_with_parameters_and_extra_keys_is_accepted() -> None:
    raw = _raw(
        event_type="task_created",
        task_id=TASK_ID,
        task_type="init_world_creation",
        world_id="world-42",
        parameters={"user_prompt": "a city of cats", "users_count": 5, "posts_count": 20},
        created_at="2024-01-01T00:00:00Z",
        producer="world-service",
    )
    event = parse_task_event(raw)
    assert event.parameters == {"user_prompt": "a city of cats", "users_count": 5, "posts_count": 20}
    assert event.model_extra == {"created_at": "2024-01-01T00:00:00Z", "producer": "world-service"}


def test_not_json() -> None:
    assert "not JSON" in _reason(b"{this is not json")


def test_not_utf8() -> None:
    assert "not JSON" in _reason(b"\xff\xfe\xfa{")


def test_json_array() -> None:
    reason = _reason(b'[{"task_id": "x"}]')
    assert "not a JSON object" in reason
    assert "list" in reason


@pytest.mark.parametrize("raw", [b"42", b'"text"', b"null"])
def test_json_scalars(raw: bytes) -> None:
    assert "not a JSON object" in _reason(raw)


def test_null_value() -> None:
    assert "null" in _reason(None)


def test_missing_task_id() -> None:
    reason = _reason(_raw(event_type="task_created"))
    assert "task_id" in reason


def test_missing_event_type() -> None:
    assert "event_type" in _reason(_raw(task_id=TASK_ID))


def test_task_id_not_a_uuid() -> None:
    reason = _reason(_raw(event_type="task_created", task_id="not-a-uuid"))
    assert "UUID" in reason
    assert "not-a-uuid" in reason


def test_empty_task_id() -> None:
    assert "task_id" in _reason(_raw(event_type="task_created", task_id=""))


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"event_type": "task_created", "task_id": 5}, "task_id"),
        ({"event_type": "task_created", "task_id": None}, "task_id"),
        ({"event_type": "task_created", "task_id": [TASK_ID]}, "task_id"),
        ({"event_type": 7, "task_id": TASK_ID}, "event_type"),
        ({"event_type": "task_created", "task_id": TASK_ID, "parameters": "users=5"}, "parameters"),
    ],
)
def test_wrong_types(fields: dict[str, object], where: str) -> None:
    reason = _reason(json.dumps(fields).encode())
    assert reason.startswith("invalid event")
    assert where in reason


def test_oversized_message() -> None:
    raw = _raw(event_type="task_created", task_id=TASK_ID, padding="x" * (MAX_EVENT_BYTES + 10))
    reason = _reason(raw)
    assert "too large" in reason
    assert str(len(raw)) in reason


def test_size_limit_boundary() -> None:
    assert MAX_EVENT_BYTES == 64 * 1024
    head = _raw(event_type="task_created", task_id=TASK_ID, padding="")
    pad = MAX_EVENT_BYTES - len(head)
    exact = _raw(event_type="task_created", task_id=TASK_ID, padding="x" * pad)
    assert len(exact) == MAX_EVENT_BYTES
    assert parse_task_event(exact).task_id == TASK_ID
    over = _raw(event_type="task_created", task_id=TASK_ID, padding="x" * (pad + 1))
    assert "too large" in _reason(over)


def test_round_trip_through_to_bytes() -> None:
    event = TaskEvent(event_type="task_updated", task_id=TASK_ID, world_id="w")
    back = parse_task_event(event.to_bytes())
    assert back.task_id == TASK_ID
    assert back.world_id == "w"
    assert b"task_type" not in event.to_bytes()  # None fields are left out
