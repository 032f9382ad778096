"""One task attempt as an operator sees it: the log context of its lines, its metrics and its span.

The engine wraps each claimed attempt in `task_attempt(...)` and, where the attempt's fate is decided, says
so with `attempt_outcome(...)`: `completed`, `retrying` (with its error type), `failed` (with its error type)
or `cancelled`. An attempt that ends without an outcome of its own is `abandoned`: its lease was lost, it was
interrupted (shutdown, a revoked partition) or a database error cut it short; in every case its lease expires
and the task is run again. Counting is in-process (a few Prometheus counter updates per attempt)."""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ai_worker.observability import metrics, tracing
from ai_worker.observability.logging import task_log_context
from ai_worker.observability.metrics import Outcome


@dataclass
class _Attempt:
    task_type: str  # the label value
    started: float
    span: tracing.TaskSpan | None
    outcome: Outcome | None = None
    error_type: str | None = None


_current: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar("ai_worker_attempt", default=None)


@contextmanager
def task_attempt(*, task_id: str, world_id: str, task_type: str, attempt: int) -> Iterator[None]:
    """Run one claimed attempt inside this: every log line carries the task, the attempt is counted
    (started, finished by outcome, its duration) and, with tracing on, is the span `task <type>`."""
    with task_log_context(task_id=task_id, world_id=world_id, task_type=task_type, attempt=attempt):
        label = metrics.task_type_label(task_type)
        span = (tracing.start_task(task_id=task_id, world_id=world_id, task_type=task_type, attempt=attempt)
                if tracing.enabled() else None)
        state = _Attempt(task_type=label, started=time.perf_counter(), span=span)
        token = _current.set(state)
        metrics.task_started(label)
        try:
            yield
        finally:
            _current.reset(token)
            outcome: Outcome = state.outcome or "abandoned"
            metrics.task_finished(label, outcome, time.perf_counter() - state.started)
            if span is not None:
                tracing.end_task(span, outcome, state.error_type)


def attempt_outcome(outcome: Outcome, error_type: str | None = None) -> None:
    """The current attempt's fate (the last call wins); outside an attempt it does nothing."""
    state = _current.get()
    if state is None:
        return
    state.outcome = outcome
    state.error_type = error_type
    if outcome == "retrying":
        metrics.task_retry(state.task_type, error_type)


__all__ = ["attempt_outcome", "task_attempt"]
