"""The error classes every layer raises; the engine decides retry or fail from them.

`retryable` decides retry or fail: timeouts, connection errors, 429, 5xx, gRPC UNAVAILABLE /
DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED, invalid or truncated LLM output (after the repair attempt) are
retryable; bad parameters, other 4xx and unknown types are permanent.

Two more attributes tell the retry policy about the provider's state (tasks/retry.py):
`retry_after_s` - the earliest time a new try can succeed (an open circuit breaker's next probe, a rate
limit's reset, a provider's Retry-After); the task is not retried before it. `spends_attempt` - False
when the call was refused before any request was made (every breaker open, our own rate limiter's wait
too long): waiting for the provider is not the task's fault, so the wait should not use up its attempts.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base class. `error_type` is a stable short name recorded on tasks and history documents."""

    retryable: bool = False
    error_type: str = "worker_error"
    retry_after_s: float | None = None
    spends_attempt: bool = True

    def __init__(self, *args: object, retry_after_s: float | None = None, spends_attempt: bool | None = None) -> None:
        super().__init__(*args)
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s
        if spends_attempt is not None:
            self.spends_attempt = spends_attempt


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

    def __init__(self, message: str, retry_after_s: float | None = None, *, spends_attempt: bool | None = None) -> None:
        super().__init__(message, retry_after_s=retry_after_s, spends_attempt=spends_attempt)


class ProviderRejected(PermanentError):
    """HTTP 4xx other than 429, or an error object the provider says is permanent."""

    error_type = "provider_rejected"


class StructuredOutputUnsupported(ProviderRejected):
    """The server refused the request's structured-output mode (`response_format`): a 4xx, or a 5xx whose
    message names response_format / json_schema. Not an outage: it never counts against a circuit breaker.
    The LLM client handles it by switching the model to the next mode and re-sending at once; it reaches
    the task only when the model's mode was set explicitly (or no mode is left), and then it is permanent."""

    error_type = "structured_output_unsupported"

    def __init__(self, message: str, *, model_id: str = "", mode: str = "") -> None:
        super().__init__(message)
        self.model_id = model_id
        self.mode = mode


class InvalidOutput(RetryableError):
    """The model's output was not valid JSON for the schema, even after the repair attempt."""

    error_type = "invalid_output"


class OutputTruncated(InvalidOutput):
    """The reply was cut at the token limit (`finish_reason: length`) and the larger / shorter re-ask was
    cut too. Retryable: a later attempt may fit."""

    error_type = "output_truncated"


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
