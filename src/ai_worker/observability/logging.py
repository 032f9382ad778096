"""structlog JSON logging to stdout; task context (task_id, world_id, task_type, attempt) is bound with
contextvars so every line logged while a task runs carries it. Prompt bodies are logged at DEBUG only."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog

_SECRET_KEYS = ("api_key", "authorization", "openrouter_api_key", "password", "secret")


def _redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        if any(s in key.lower() for s in _SECRET_KEYS):
            event_dict[key] = "***"
    return event_dict


class _RebalanceIsNotAnError(logging.Filter):
    """aiokafka logs a commit refused because the group is rebalancing ("... IllegalGenerationError ...,
    will rejoin") at ERROR. It needs no action: the consumer rejoins, our own line says the commit will be
    retried, and what was not committed is redelivered and claimed idempotently. Logged as a WARNING, so an
    alert on error lines does not fire for every rebalance (seen in chaos scenario C6)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "will rejoin" in record.getMessage():
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def configure_logging(level: str = "INFO", *, json: bool = True, stream: Any = None) -> None:
    """Our structlog lines and the libraries' stdlib logging records (aiokafka, pymongo, ...) go to `stream` in
    the same format: with `json`, every line of the output is one JSON object (a library's traceback included,
    in its `exception` field), so a log pipeline never sees a stray text line."""
    lvl = logging.getLevelName(level.upper())
    if not isinstance(lvl, int):
        lvl = logging.INFO
    out = stream or sys.stdout
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    handler = logging.StreamHandler(out)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
        ],
    ))
    logging.basicConfig(level=lvl, handlers=[handler], force=True)
    for noisy in ("aiokafka", "kafka", "pymongo", "httpx", "httpcore", "grpc"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    if not any(isinstance(f, _RebalanceIsNotAnError) for f in coordinator.filters):
        coordinator.addFilter(_RebalanceIsNotAnError())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


@contextmanager
def task_log_context(*, task_id: str, world_id: str, task_type: str, attempt: int) -> Iterator[None]:
    tokens = structlog.contextvars.bind_contextvars(
        task_id=task_id, world_id=world_id, task_type=task_type, attempt=attempt
    )
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
