"""Terminal tables and JSON rows for the operator's lists: `ai-worker worlds` and `ai-worker tasks WORLD_ID`."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.markup import escape
from rich.table import Table

_COLOURS = {"completed": "green", "failed": "red", "cancelled": "magenta", "in_progress": "yellow", "pending": "dim"}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)


def parse_age(text: str) -> timedelta:
    """`90s`, `30m`, `24h`, `7d`, `2w` -> a timedelta; ValueError otherwise."""
    match = _AGE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not an age like 30m, 24h or 7d")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2].lower()])


def _c(status: object) -> str:
    text = str(status)
    return f"[{_COLOURS.get(text, 'white')}]{escape(text)}[/]"


def _when(value: object, now: datetime) -> str:
    """A date as an age (`3m ago`); strings (the platform writes some dates as strings) as they are."""
    if not isinstance(value, datetime):
        return "-" if value is None else str(value)[:19]
    moment = value if value.tzinfo else value.replace(tzinfo=UTC)
    seconds = max((now - moment).total_seconds(), 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _n(doc: Mapping[str, Any], key: str) -> int:
    value = doc.get(key)
    return int(value) if isinstance(value, int | float) else 0


def world_row(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON row of one world (`worlds --json`)."""
    done = _n(doc, "tasks_completed") + _n(doc, "tasks_failed")
    expected = max(_n(doc, "tasks_total"), _n(doc, "task_predicted"))
    params = doc.get("parameters") if isinstance(doc.get("parameters"), Mapping) else {}
    return {
        "world_id": str(doc.get("_id")),
        "status": doc.get("status"),
        "stage": doc.get("current_stage"),
        "progress": round(done / expected, 3) if expected else 0.0,
        "tasks_done": done,
        "tasks_expected": expected,
        "tasks_failed": _n(doc, "tasks_failed"),
        "characters": _n(doc, "users_created"),
        "characters_predicted": _n(doc, "users_predicted"),
        "posts": _n(doc, "posts_created"),
        "posts_predicted": _n(doc, "posts_predicted"),
        "cost_usd": round(float(doc.get("llm_cost_total") or 0.0) + float(doc.get("image_cost_total") or 0.0), 6),
        "created_at": _iso(doc.get("created_at")),
        "updated_at": _iso(doc.get("updated_at")),
        "finished_at": _iso(doc.get("finished_at")),
        "failure_reason": doc.get("failure_reason"),
        "prompt": str((params or {}).get("user_prompt") or ""),
    }


def render_worlds(docs: Sequence[Mapping[str, Any]], title: str, now: datetime | None = None) -> Table:
    now = now or datetime.now(UTC)
    table = Table(title=title)
    for name, justify in (("world", "left"), ("status", "left"), ("stage", "left"), ("progress", "right"),
                          ("characters", "right"), ("posts", "right"), ("cost $", "right"), ("created", "right"),
                          ("updated", "right"), ("prompt / failure", "left")):
        table.add_column(name, justify=justify, no_wrap=name != "prompt / failure")  # type: ignore[arg-type]
    for doc in docs:
        row = world_row(doc)
        note = row["failure_reason"] or row["prompt"]
        table.add_row(row["world_id"], _c(row["status"]), escape(str(row["stage"] or "-")),
                      f"{100 * row['progress']:.0f}% ({row['tasks_done']}/{row['tasks_expected']})",
                      f"{row['characters']}/{row['characters_predicted']}", f"{row['posts']}/{row['posts_predicted']}",
                      f"{row['cost_usd']:.4f}", _when(doc.get("created_at"), now), _when(doc.get("updated_at"), now),
                      escape(str(note)[:60]))
    return table


def task_row(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON row of one task (`tasks --json`)."""
    return {
        "task_id": str(doc.get("_id")),
        "type": doc.get("type"),
        "status": doc.get("status"),
        "attempts": _n(doc, "attempt_count"),
        "error_type": doc.get("error_type"),
        "error": doc.get("error"),
        "worker_id": doc.get("worker_id"),
        "created_at": _iso(doc.get("created_at")),
        "updated_at": _iso(doc.get("updated_at")),
        "finished_at": _iso(doc.get("finished_at")),
        "not_before": _iso(doc.get("not_before")),
    }


def render_tasks(docs: Sequence[Mapping[str, Any]], title: str, now: datetime | None = None) -> Table:
    now = now or datetime.now(UTC)
    table = Table(title=title)
    for name in ("task", "type", "status", "attempts", "error type", "error", "updated"):
        table.add_column(name, justify="right" if name == "attempts" else "left", no_wrap=name != "error")
    for doc in docs:
        row = task_row(doc)
        error = str(row["error"] or "")
        table.add_row(row["task_id"], escape(str(row["type"])), _c(row["status"]), str(row["attempts"]),
                      escape(str(row["error_type"] or "-")), escape(error[:80] + ("..." if len(error) > 80 else "")),
                      _when(doc.get("updated_at"), now))
    return table


def error_summary(docs: Sequence[Mapping[str, Any]]) -> str:
    """`failed 3: provider_timeout 2, invalid_output 1` over the listed tasks ('' when none failed)."""
    failed = [d for d in docs if d.get("status") == "failed"]
    if not failed:
        return ""
    kinds = Counter(str(d.get("error_type") or "unknown") for d in failed)
    return f"failed {len(failed)}: " + ", ".join(f"{kind} {n}" for kind, n in kinds.most_common())


def _iso(value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else value


__all__ = ["error_summary", "parse_age", "render_tasks", "render_worlds", "task_row", "world_row"]
