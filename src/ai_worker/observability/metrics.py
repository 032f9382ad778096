"""Prometheus metrics of provider calls (served at GET /metrics of the health endpoint).

One observation per recorded attempt (the recorder calls `observe_call`), labelled by API type, model and
outcome; costs are summed per model. Label values come from the model registry, so their number is small."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram

if TYPE_CHECKING:
    from ai_worker.providers.history import ApiRequestRecord

PROVIDER_REQUESTS = Counter(
    "ai_worker_provider_requests_total", "Provider request attempts (LLM, image)",
    ["api_type", "model", "status", "fallback"])
PROVIDER_LATENCY = Histogram(
    "ai_worker_provider_request_seconds", "Latency of provider request attempts", ["api_type", "model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120))
PROVIDER_TOKENS = Counter("ai_worker_provider_tokens_total", "Tokens used", ["model", "kind"])
PROVIDER_COST = Counter("ai_worker_provider_cost_usd_total", "Cost of provider calls, USD", ["api_type", "model"])


def observe_call(record: ApiRequestRecord) -> None:
    """Count one `ApiRequestRecord` (LLM or image generation attempts; other types are ignored)."""
    if record.api_type not in ("llm", "image_generation"):
        return
    model = record.model or "unknown"
    PROVIDER_REQUESTS.labels(record.api_type, model, record.status, "true" if record.fallback else "false").inc()
    PROVIDER_LATENCY.labels(record.api_type, model).observe(record.duration_ms / 1000.0)
    if record.prompt_tokens:
        PROVIDER_TOKENS.labels(model, "prompt").inc(record.prompt_tokens)
    if record.completion_tokens:
        PROVIDER_TOKENS.labels(model, "completion").inc(record.completion_tokens)
    if record.cost > 0:
        PROVIDER_COST.labels(record.api_type, model).inc(record.cost)
