"""Terminal views of the worker's state: a world's progress (world_generation_status) as a table, for `status`
and `dev`."""

from __future__ import annotations

from typing import Any

from rich.table import Table

_COLOURS = {"completed": "green", "failed": "red", "in_progress": "yellow", "pending": "dim"}


def _c(status: str) -> str:
    return f"[{_COLOURS.get(status, 'white')}]{status}[/]"


def render_status(doc: dict[str, Any]) -> Table:
    table = Table(title=f"world {doc.get('_id')}: {_c(str(doc.get('status')))}", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    for stage in doc.get("stages", []):
        table.add_row(f"stage {stage.get('name')}", _c(str(stage.get("status"))))
    table.add_row("current stage", str(doc.get("current_stage")))
    table.add_row("tasks", f"{doc.get('tasks_completed', 0)}/{doc.get('tasks_total', 0)} "
                            f"(failed {doc.get('tasks_failed', 0)}, predicted {doc.get('task_predicted', 0)})")
    table.add_row("characters", f"{doc.get('users_created', 0)}/{doc.get('users_predicted', 0)}")
    table.add_row("posts", f"{doc.get('posts_created', 0)}/{doc.get('posts_predicted', 0)}")
    table.add_row("LLM calls", f"{doc.get('api_calls_made_LLM', 0)} (limit {doc.get('api_call_limits_LLM', 0)})")
    table.add_row("image calls",
                  f"{doc.get('api_calls_made_images', 0)} (limit {doc.get('api_call_limits_images', 0)})")
    cost = float(doc.get("llm_cost_total", 0.0)) + float(doc.get("image_cost_total", 0.0))
    table.add_row("cost (USD)", f"{cost:.4f}")
    if doc.get("failure_reason"):
        table.add_row("failure", str(doc["failure_reason"]))
    return table
