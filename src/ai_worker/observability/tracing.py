"""OpenTelemetry tracing: optional (the `tracing` extra), off by default (TRACING_ENABLED), free when off.

When on, every world is one trace and its tasks are a tree of spans in it:

- a span per task attempt, `task <type>` (attributes `task.id`, `task.type`, `task.attempt`, `world.id`,
  `task.outcome`, `error.type`), started by the engine once the task is claimed;
- under it, a span per provider attempt (`llm <step>`, `image <step>`, `upload <step>`: model, step, status,
  tokens, cost) and per platform call (`<service>/<method>`: service, method, gRPC code), made from what the
  request history and the gRPC clients already measure (start and end times included);
- the trace id of a world is its id's 128 bits (a UUID; any other id is hashed), so every task of a world
  lands in the same trace, even one whose event was republished without headers (by the reconciler, or by the
  platform, which sends none): such a task's span is a root span of the world's trace;
- the task events the worker publishes carry a W3C `traceparent` header (docs/CONTRACTS.md allows new
  headers): the span of the task that spawned them, so a child task's span has its parent task's span as
  parent. A task republished for its own retry carries its attempt's parent instead, so retries are siblings.
  A `traceparent` of another trace (not the world's) is kept as a span link, never as the parent.

When off (the default, or the extra is not installed), `enabled()` is False, nothing of OpenTelemetry is
imported, and every hook returns at its first line. Exporter: TRACING_EXPORTER = `otlp` (the `tracing-otlp`
extra; OTEL_EXPORTER_OTLP_* variables), `console` or `none`. The SDK reads the standard OTEL_* variables
itself (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER[_ARG], OTEL_BSP_*). The worker keeps
its own tracer provider (the global one is left alone)."""

from __future__ import annotations

import contextvars
import hashlib
import importlib.util
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, SpanContext, Tracer

    from ai_worker.config import Settings
    from ai_worker.providers.history import ApiRequestRecord

TRACEPARENT: Final = "traceparent"
TRACER_NAME: Final = "ai_worker"
EXPORTERS: Final = ("otlp", "console", "none")
SDK_MODULE: Final = "opentelemetry.sdk"
OTLP_MODULE: Final = "opentelemetry.exporter.otlp.proto.http"

_enabled = False
_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_exporter_override: SpanExporter | None = None

# The traceparent header of the message being handled (set by the consumer, per message task).
_received: contextvars.ContextVar[str | None] = contextvars.ContextVar("ai_worker_traceparent", default=None)
# The trace id the id generator gives the next root span (the world's).
_root_trace_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("ai_worker_root_trace", default=None)


@dataclass
class TaskSpan:
    """A running task attempt's span, and what its own republication (a retry) must carry."""

    task_id: str
    span: Span
    parent: SpanContext | None  # the parent task's span; None for a root span of the world's trace
    token: object  # the OpenTelemetry context token to detach


_attempt: contextvars.ContextVar[TaskSpan | None] = contextvars.ContextVar("ai_worker_task_span", default=None)


def enabled() -> bool:
    return _enabled


def missing_packages(exporter: str) -> str | None:
    """What must be installed for tracing with `exporter`, or None when everything is there."""
    if importlib.util.find_spec("opentelemetry") is None or importlib.util.find_spec(SDK_MODULE) is None:
        return "the OpenTelemetry SDK is not installed: pip install 'ai-worker[tracing]'"
    if exporter == "otlp":
        try:
            found = importlib.util.find_spec(OTLP_MODULE) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return "the OTLP exporter is not installed: pip install 'ai-worker[tracing-otlp]'"
    return None


def world_trace_id(world_id: str) -> int:
    """The trace id of a world: its UUID's 128 bits, else the first 128 bits of its SHA-256 (never 0)."""
    try:
        value = uuid.UUID(world_id).int
    except (ValueError, AttributeError, TypeError):
        value = int.from_bytes(hashlib.sha256(str(world_id).encode()).digest()[:16], "big")
    return value or 1


# --- set-up ------------------------------------------------------------------------------------------------
def configure(settings: Settings) -> None:
    """Install the tracer provider when TRACING_ENABLED (raises RuntimeError when the extra is missing);
    otherwise leave tracing off. `shutdown()` flushes and turns it off again."""
    global _enabled, _tracer, _provider
    shutdown()
    if not settings.tracing_enabled:
        return
    exporter_name = settings.tracing_exporter
    if _exporter_override is None:
        problem = missing_packages(exporter_name)
        if problem:
            raise RuntimeError(f"TRACING_ENABLED is set but {problem}")
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    attributes: dict[str, Any] = {}
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""):
        attributes["service.name"] = settings.service_name
    attributes["service.instance.id"] = settings.worker_id
    provider = TracerProvider(resource=Resource.create(attributes), id_generator=_world_id_generator(),
                              shutdown_on_exit=False)
    if _exporter_override is not None:
        provider.add_span_processor(SimpleSpanProcessor(_exporter_override))
    elif exporter_name == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _provider = provider
    _tracer = provider.get_tracer(TRACER_NAME)
    _enabled = True


def shutdown() -> None:
    """Flush what is buffered and turn tracing off."""
    global _enabled, _tracer, _provider
    _enabled = False
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


@contextmanager
def use_exporter(exporter: SpanExporter) -> Iterator[None]:
    """Tests: while inside, `configure` exports every span to `exporter` at once (e.g. the SDK's
    InMemorySpanExporter), whatever TRACING_EXPORTER says."""
    global _exporter_override
    previous, _exporter_override = _exporter_override, exporter
    try:
        yield
    finally:
        _exporter_override = previous


def _world_id_generator() -> Any:
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class WorldIdGenerator(RandomIdGenerator):
        """Random span ids; the trace id of a root span is its world's when one is set (`_root_trace_id`)."""

        def generate_trace_id(self) -> int:
            wanted = _root_trace_id.get()
            return wanted if wanted is not None else super().generate_trace_id()

        def is_trace_id_random(self) -> bool:
            return False

    return WorldIdGenerator()


# --- hooks -------------------------------------------------------------------------------------------------
def received(headers: Sequence[tuple[str, bytes]] | None) -> None:
    """The consumer, in the task that handles one message: remember its traceparent header, if any."""
    if not _enabled or not headers:
        return
    for key, value in headers:
        if key == TRACEPARENT and value:
            _received.set(value.decode("ascii", "replace"))
            return


def task_headers(task_id: str) -> list[tuple[str, bytes]] | None:
    """The headers of the event the worker publishes for `task_id` (None when tracing is off): the current
    task's span (a child's parent), or, when `task_id` is the current attempt's own task (a retry), that
    attempt's parent; outside any attempt the header of the message being handled is passed on."""
    if not _enabled:
        return None
    from opentelemetry import trace

    attempt = _attempt.get()
    if attempt is not None and attempt.task_id == task_id:
        parent = attempt.parent
    else:
        current = trace.get_current_span().get_span_context()
        parent = current if current.is_valid else None
    if parent is None:
        header = _received.get() if attempt is None else None
        return [(TRACEPARENT, header.encode())] if header else None
    return [(TRACEPARENT, _format_traceparent(parent).encode())]


def _format_traceparent(ctx: SpanContext) -> str:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _parse_traceparent(header: str | None) -> SpanContext | None:
    if not header:
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    ctx = TraceContextTextMapPropagator().extract({TRACEPARENT: header})
    span_context = trace.get_current_span(ctx).get_span_context()
    return span_context if span_context.is_valid else None


def start_task(*, task_id: str, world_id: str, task_type: str, attempt: int) -> TaskSpan | None:
    """Start (and make current) the span of one task attempt; None when tracing is off."""
    if not _enabled or _tracer is None:
        return None
    from opentelemetry import context as otel_context
    from opentelemetry import trace

    trace_id = world_trace_id(world_id)
    remote = _parse_traceparent(_received.get())
    links = []
    parent: SpanContext | None = None
    if remote is not None and remote.trace_id == trace_id:
        parent = remote
    elif remote is not None:
        links.append(trace.Link(remote, {"link.reason": "traceparent of another trace"}))
    parent_ctx: Context = (trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent is not None
                           else otel_context.Context())
    root_token = _root_trace_id.set(trace_id)
    try:
        span = _tracer.start_span(
            f"task {task_type}", context=parent_ctx, kind=trace.SpanKind.CONSUMER, links=links,
            attributes={"task.id": task_id, "task.type": task_type, "task.attempt": attempt, "world.id": world_id})
    finally:
        _root_trace_id.reset(root_token)
    token = otel_context.attach(trace.set_span_in_context(span))
    state = TaskSpan(task_id=task_id, span=span, parent=parent, token=token)
    _attempt.set(state)
    return state


def end_task(state: TaskSpan, outcome: str, error_type: str | None) -> None:
    from opentelemetry import context as otel_context
    from opentelemetry.trace import Status, StatusCode

    span = state.span
    span.set_attribute("task.outcome", outcome)
    if error_type:
        span.set_attribute("error.type", error_type)
    if outcome in ("failed", "retrying", "quarantined"):
        span.set_status(Status(StatusCode.ERROR, error_type or outcome))
    span.end()
    _attempt.set(None)
    otel_context.detach(state.token)  # type: ignore[arg-type]


def _child_span(name: str, seconds: float, attributes: dict[str, Any], error: str | None) -> None:
    """A finished CLIENT span under the current task span (none outside a task), `seconds` long, ending now."""
    if _tracer is None:
        return
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    if not trace.get_current_span().get_span_context().is_valid:
        return
    end = time.time_ns()
    span = _tracer.start_span(name, kind=trace.SpanKind.CLIENT, attributes=attributes,
                              start_time=end - int(seconds * 1e9))
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=end)


_KIND_NAMES: Final = {"llm": "llm", "image_generation": "image", "upload": "upload"}


def record_span(record: ApiRequestRecord) -> None:
    """A span for one provider (or upload) attempt of the request history."""
    if not _enabled:
        return
    attributes: dict[str, Any] = {
        "provider.api_type": record.api_type, "provider.step": record.request_type,
        "provider.status": record.status, "provider.attempt": record.attempt,
    }
    if record.model:
        attributes["provider.model"] = record.model
        attributes["provider.fallback"] = record.fallback
    if record.provider:
        attributes["provider.name"] = record.provider
    if record.status_code is not None:
        attributes["provider.status_code"] = record.status_code
    if record.api_type == "llm":
        attributes["provider.tokens.prompt"] = record.prompt_tokens
        attributes["provider.tokens.completion"] = record.completion_tokens
    if record.api_type != "upload":
        attributes["provider.cost_usd"] = record.cost
    if record.error_type:
        attributes["error.type"] = record.error_type
    name = f"{_KIND_NAMES.get(record.api_type, record.api_type)} {record.request_type}"
    _child_span(name, record.duration_ms / 1000.0, attributes,
                (record.error_type or "error") if record.status == "error" else None)


def grpc_span(service: str, method: str, code: str, seconds: float) -> None:
    """A span for one platform call."""
    if not _enabled:
        return
    _child_span(f"{service}/{method}", seconds,
                {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method, "rpc.grpc.code": code},
                None if code == "OK" else code)


__all__ = [
    "EXPORTERS", "TRACEPARENT", "TaskSpan", "configure", "enabled", "end_task", "grpc_span", "missing_packages",
    "received", "record_span", "shutdown", "start_task", "task_headers", "use_exporter", "world_trace_id",
]
