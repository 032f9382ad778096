"""The error classes every layer raises; the engine decides retry or fail from them.

`retryable` is the only thing the engine reads: timeouts, connection errors, 429, 5xx, gRPC
UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED and invalid LLM output (after the repair attempt)
are retryable; bad parameters, other 4xx and unknown types are permanent.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base class. `error_type` is a stable short name recorded on tasks and history documents."""

    retryable: bool = False
    error_type: str = "worker_error"


class RetryableError(WorkerError):
    retryable = True
    error_type = "retryable"


class PermanentError(WorkerError):
    retryable = False
    error_type = "permanent"


class InvalidParameters(PermanentError):
    error_type = "invalid_parameters"


class UnknownTaskType(PermanentError):
    error_type = "unknown_task_type"


class TaskCancelled(PermanentError):
    error_type = "cancelled"


class ProviderTimeout(RetryableError):
    error_type = "provider_timeout"


class ProviderUnavailable(RetryableError):
    """Connection errors and HTTP 5xx."""

    error_type = "provider_unavailable"


class RateLimited(RetryableError):
    error_type = "rate_limited"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ProviderRejected(PermanentError):
    """HTTP 4xx other than 429, or an error object the provider says is permanent."""

    error_type = "provider_rejected"


class InvalidOutput(RetryableError):
    """The model's output was not valid JSON for the schema, even after the repair attempt."""

    error_type = "invalid_output"


class InvalidImage(RetryableError):
    """The image bytes were not an image of the declared type."""

    error_type = "invalid_image"


class PlatformUnavailable(RetryableError):
    """gRPC UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED (or no address could be resolved)."""

    error_type = "platform_unavailable"


class PlatformRejected(PermanentError):
    """Any other gRPC error, or a response with success=false."""

    error_type = "platform_rejected"


class UploadFailed(RetryableError):
    error_type = "upload_failed"


class BudgetExceeded(PermanentError):
    """A world's money cap or call limit, or the daily cap, would be exceeded: the call is not made."""

    error_type = "budget_exceeded"
