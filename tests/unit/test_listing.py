"""The operator's lists: age parsing, rows and summaries (no database)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ai_worker.listing import error_summary, parse_age, task_row, world_row


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800),
                                               ("2w", 1209600), (" 1.5h ", 5400), ("3D", 259200)])
def test_parse_age(text: str, seconds: int) -> None:
    assert parse_age(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "24", "h", "3x", "-1h", "1 day"])
def test_parse_age_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_age(text)


def test_world_row_progress_and_cost() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    row = world_row({"_id": "w", "status": "in_progress", "tasks_completed": 3, "tasks_failed": 1, "tasks_total": 5,
                     "task_predicted": 8, "llm_cost_total": 0.25, "image_cost_total": 0.5, "created_at": now,
                     "parameters": {"user_prompt": "p"}})
    assert row["progress"] == 0.5 and row["tasks_expected"] == 8 and row["cost_usd"] == 0.75
    assert row["created_at"] == "2026-01-01T00:00:00+00:00" and row["prompt"] == "p"
    assert world_row({"_id": "bare"})["progress"] == 0.0


def test_task_row_and_error_summary() -> None:
    docs = [{"_id": "a", "status": "failed", "error_type": "timeout"},
            {"_id": "b", "status": "failed", "error_type": "timeout"},
            {"_id": "c", "status": "failed"},
            {"_id": "d", "status": "completed"}]
    assert error_summary(docs) == "failed 3: timeout 2, unknown 1"
    assert error_summary(docs[3:]) == ""
    assert task_row(docs[0])["error_type"] == "timeout" and task_row(docs[3])["attempts"] == 0
