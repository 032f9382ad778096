"""Settings from the environment.

Every variable is documented in the README configuration table; keep both in step.
Names follow the worker we replace (SERVICE_*, MONGODB_*, KAFKA_*, ...) plus the ones we add.
"""

from __future__ import annotations

import os
import socket
from functools import cached_property
from typing import Any, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from ai_worker.providers.registry import (
    LLM_STEPS,
    FlatDefaults,
    ModelChoice,
    ModelRegistry,
    RegistryError,
    load_registry,
)

OPENROUTER_BASE_URL = "https://openrouter.ai/api/v1"


class ConfigError(Exception):
    """Missing or invalid configuration; the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", env_ignore_empty=True)

    # --- service -------------------------------------------------------------------------------
    service_name: str = Field("ai-worker", alias="SERVICE_NAME")
    service_host: str = Field("127.0.0.1", alias="SERVICE_HOST")  # containers set 0.0.0.0 explicitly
    service_port: int = Field(8081, alias="SERVICE_PORT", ge=0, le=65535)
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}", alias="WORKER_ID")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", alias="LOG_LEVEL")

    # --- MongoDB -------------------------------------------------------------------------------
    mongodb_uri: str = Field(alias="MONGODB_URI")
    mongodb_database: str = Field("generia_ai_worker", alias="MONGODB_DATABASE")

    # --- Kafka ---------------------------------------------------------------------------------
    kafka_brokers: str = Field(alias="KAFKA_BROKERS")
    kafka_topic_tasks: str = Field("generia-tasks", alias="KAFKA_TOPIC_TASKS")
    kafka_topic_progress: str = Field("generia-progress", alias="KAFKA_TOPIC_PROGRESS")
    kafka_topic_dlq: str = Field("generia-tasks-dlq", alias="KAFKA_TOPIC_DLQ")
    kafka_group_id: str = Field("ai-worker", alias="KAFKA_GROUP_ID")
    kafka_enable_idempotence: bool = Field(False, alias="KAFKA_ENABLE_IDEMPOTENCE")
    kafka_session_timeout_ms: int = Field(10000, alias="KAFKA_SESSION_TIMEOUT_MS", ge=1000)
    kafka_heartbeat_interval_ms: int = Field(3000, alias="KAFKA_HEARTBEAT_INTERVAL_MS", ge=100)
    kafka_topic_partitions: int = Field(8, alias="KAFKA_TOPIC_PARTITIONS", ge=1)
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", alias="KAFKA_SECURITY_PROTOCOL")
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", alias="KAFKA_SASL_MECHANISM")
    kafka_sasl_username: str | None = Field(None, alias="KAFKA_SASL_USERNAME")
    kafka_sasl_password: str | None = Field(None, alias="KAFKA_SASL_PASSWORD", repr=False)
    kafka_ssl_cafile: str | None = Field(None, alias="KAFKA_SSL_CAFILE")
    kafka_ssl_certfile: str | None = Field(None, alias="KAFKA_SSL_CERTFILE")
    kafka_ssl_keyfile: str | None = Field(None, alias="KAFKA_SSL_KEYFILE")
    kafka_ssl_key_password: str | None = Field(None, alias="KAFKA_SSL_KEY_PASSWORD", repr=False)

    # --- LLM -----------------------------------------------------------------------------------
    openrouter_api_key: str | None = Field(None, alias="OPENROUTER_API_KEY", repr=False)
    llm_base_url: str = Field(OPENROUTER_BASE_URL, alias="LLM_BASE_URL")
    model_registry_file: str | None = Field(None, alias="MODEL_REGISTRY_FILE")
    default_llm_model: str | None = Field(None, alias="DEFAULT_LLM_MODEL")
    llm_model_overrides: dict[str, str] = Field(default_factory=dict, alias="LLM_MODEL_OVERRIDES")
    llm_timeout_s: float = Field(120.0, alias="LLM_TIMEOUT_S", gt=0)
    llm_max_tokens: int = Field(8000, alias="LLM_MAX_TOKENS", gt=0)
    max_concurrent_llm_requests: int | None = Field(None, alias="MAX_CONCURRENT_LLM_REQUESTS", ge=1)

    # --- budgets (reserved before every paid call) --------------------------------------------------
    world_budget_usd: float | None = Field(None, alias="WORLD_BUDGET_USD", ge=0)  # explicit cap of every world
    world_budget_factor: float = Field(3.0, alias="WORLD_BUDGET_FACTOR", gt=0)  # else factor x predicted cost
    world_budget_min_usd: float = Field(1.0, alias="WORLD_BUDGET_MIN_USD", ge=0)  # ... and at least this
    daily_budget_usd: float = Field(0.0, alias="DAILY_BUDGET_USD", ge=0)
    llm_price_in_per_mtok: float = Field(0.30, alias="LLM_PRICE_IN_PER_MTOK", ge=0)
    llm_price_out_per_mtok: float = Field(2.50, alias="LLM_PRICE_OUT_PER_MTOK", ge=0)
    image_price_usd: float = Field(0.04, alias="IMAGE_PRICE_USD", ge=0)

    # --- images --------------------------------------------------------------------------------
    image_provider: Literal["openrouter", "runware", "offline"] | None = Field(None, alias="IMAGE_PROVIDER")
    image_model: str | None = Field(None, alias="IMAGE_MODEL")
    image_base_url: str | None = Field(None, alias="IMAGE_BASE_URL")
    runware_api_key: str | None = Field(None, alias="RUNWARE_API_KEY", repr=False)
    runware_base_url: str | None = Field(None, alias="RUNWARE_BASE_URL")
    image_prompt_enhance: bool = Field(False, alias="IMAGE_PROMPT_ENHANCE")
    image_timeout_s: float = Field(180.0, alias="IMAGE_TIMEOUT_S", gt=0)
    max_concurrent_image_requests: int | None = Field(None, alias="MAX_CONCURRENT_IMAGE_REQUESTS", ge=1)
    upload_timeout_s: float = Field(60.0, alias="UPLOAD_TIMEOUT_S", gt=0)
    provider_max_retries: int = Field(3, alias="PROVIDER_MAX_RETRIES", ge=0, le=20)
    provider_retry_base_s: float = Field(0.5, alias="PROVIDER_RETRY_BASE_S", ge=0)
    provider_retry_max_s: float = Field(10.0, alias="PROVIDER_RETRY_MAX_S", ge=0)

    # --- provider resilience (per model) ---------------------------------------------------------
    rate_limit_max_wait_s: float = Field(30.0, alias="RATE_LIMIT_MAX_WAIT_S", ge=0)
    breaker_failure_threshold: int = Field(5, alias="BREAKER_FAILURE_THRESHOLD", ge=1)
    breaker_cooldown_s: float = Field(30.0, alias="BREAKER_COOLDOWN_S", gt=0)

    # --- platform (gRPC) -----------------------------------------------------------------------
    consul_address: str = Field("consul:8500", alias="CONSUL_ADDRESS")
    character_service_addr: str | None = Field(None, alias="CHARACTER_SERVICE_ADDR")
    media_service_addr: str | None = Field(None, alias="MEDIA_SERVICE_ADDR")
    post_service_addr: str | None = Field(None, alias="POST_SERVICE_ADDR")
    world_service_addr: str | None = Field(None, alias="WORLD_SERVICE_ADDR")
    grpc_deadline_s: float = Field(10.0, alias="GRPC_DEADLINE_S", gt=0)
    consul_cache_s: float = Field(30.0, alias="CONSUL_CACHE_S", ge=0)

    # --- engine --------------------------------------------------------------------------------
    max_concurrent_tasks: int | None = Field(None, alias="MAX_CONCURRENT_TASKS", ge=1)
    scheduler_window: int | None = Field(None, alias="SCHEDULER_WINDOW", ge=1)
    task_lease_s: float = Field(120.0, alias="TASK_LEASE_S", gt=1)
    shutdown_grace_s: float = Field(30.0, alias="SHUTDOWN_GRACE_S", ge=0)
    retry_base_delay_s: float = Field(2.0, alias="RETRY_BASE_DELAY_S", ge=0)
    retry_max_delay_s: float = Field(60.0, alias="RETRY_MAX_DELAY_S", ge=0)
    task_max_attempts: dict[str, int] = Field(default_factory=dict, alias="TASK_MAX_ATTEMPTS")
    task_timeouts_s: dict[str, float] = Field(default_factory=dict, alias="TASK_TIMEOUTS_S")
    reconcile_interval_s: float = Field(10.0, alias="RECONCILE_INTERVAL_S", gt=0)
    idle_work_after_s: float = Field(0.5, alias="IDLE_WORK_AFTER_S", ge=0)
    startup_timeout_s: float = Field(30.0, alias="STARTUP_TIMEOUT_S", gt=0)
    cli_timeout_s: float = Field(5.0, alias="CLI_TIMEOUT_S", gt=0)

    # --- observability (metrics are always on; tracing needs the `tracing` extra) ------------------
    worker_status_interval_s: float = Field(10.0, alias="WORKER_STATUS_INTERVAL_S", gt=0)
    tracing_enabled: bool = Field(False, validation_alias=AliasChoices("TRACING_ENABLED", "OTEL_TRACES_ENABLED"))
    tracing_exporter: Literal["otlp", "console", "none"] = Field("otlp", alias="TRACING_EXPORTER")

    # --- web console (`ai-worker console`) -----------------------------------------------------
    console_host: str = Field("127.0.0.1", alias="CONSOLE_HOST")
    console_port: int = Field(8082, alias="CONSOLE_PORT", ge=0, le=65535)
    console_token: str | None = Field(None, alias="CONSOLE_TOKEN", repr=False)

    # --- retention (TTL indexes, see retention.py); 0 = keep forever -------------------------------
    task_retention_days: float = Field(30.0, alias="TASK_RETENTION_DAYS", ge=0)
    history_retention_days: float = Field(30.0, alias="HISTORY_RETENTION_DAYS", ge=0)
    model_stats_retention_days: float = Field(400.0, alias="MODEL_STATS_RETENTION_DAYS", ge=0)

    # --- accepted for compatibility with the worker we replace (see README) ---------------------
    minio_endpoint: str | None = Field(None, alias="MINIO_ENDPOINT")
    minio_access_key: str | None = Field(None, alias="MINIO_ACCESS_KEY", repr=False)
    minio_secret_key: str | None = Field(None, alias="MINIO_SECRET_KEY", repr=False)
    minio_bucket: str | None = Field(None, alias="MINIO_BUCKET")
    minio_use_ssl: bool = Field(False, validation_alias=AliasChoices("MINIO_USE_SSL", "MINIO_SECURE"))
    api_gateway_url: str | None = Field(None, alias="API_GATEWAY_URL")

    @field_validator("llm_model_overrides")
    @classmethod
    def _known_steps(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(LLM_STEPS))
        if unknown:
            raise ValueError(f"unknown step(s) {unknown}; known: {list(LLM_STEPS)}")
        return value

    @cached_property
    def kafka_bootstrap(self) -> list[str]:
        return [b.strip() for b in self.kafka_brokers.split(",") if b.strip()]

    @cached_property
    def kafka_options(self) -> dict[str, Any]:
        """Security keyword arguments of every aiokafka client (raises ConfigError naming the variable)."""
        from ai_worker.messaging.security import kafka_options

        return kafka_options(self)

    @cached_property
    def models(self) -> ModelRegistry:
        """The model registry file resolved against these settings (raises RegistryError)."""
        env = dict(os.environ)
        for name, fld in type(self).model_fields.items():  # values given as keyword overrides count too
            value = getattr(self, name)
            if fld.alias and isinstance(value, str) and value:
                env[fld.alias] = value
        return ModelRegistry(
            load_registry(self.model_registry_file),
            choice=ModelChoice(default_llm_model=self.default_llm_model, llm_model_overrides=self.llm_model_overrides,
                               image_model=self.image_model, image_provider=self.image_provider),
            env=env,
            flat=FlatDefaults(price_in_per_mtok=self.llm_price_in_per_mtok,
                              price_out_per_mtok=self.llm_price_out_per_mtok,
                              price_per_image=self.image_price_usd, max_tokens=self.llm_max_tokens),
        )

    def task_slots(self, provider_slots: int) -> int:
        """Tasks handled at once by one process: MAX_CONCURRENT_TASKS, or derived from the provider slots
        (twice as many tasks as provider slots, plus room for the tasks that only call the platform), so a
        task waiting for a provider never leaves a provider slot idle."""
        return self.max_concurrent_tasks or 2 * provider_slots + 8

    def window(self, task_slots: int) -> int:
        """Events one process buffers for its scheduler (SCHEDULER_WINDOW, default max(1000, 8 x task slots))."""
        return max(task_slots, self.scheduler_window or max(1000, 8 * task_slots))

    def model_for(self, step: str) -> str:
        """The id of the model that serves `step` first."""
        return self.models.primary(step).id

    def check_runtime(self) -> None:
        """Checks that need more than one variable; raises ConfigError naming the variable."""
        _ = self.kafka_options
        try:
            missing = self.models.missing_keys()
        except RegistryError as exc:
            raise ConfigError(f"invalid configuration:\n  MODEL_REGISTRY_FILE: {exc}") from None
        if missing:
            raise ConfigError("missing API key(s):\n  " + "\n  ".join(missing) + "\n" + self._image_hint())
        if self.tracing_enabled:
            from ai_worker.observability.tracing import missing_packages

            problem = missing_packages(self.tracing_exporter)
            if problem:
                raise ConfigError(f"invalid configuration:\n  TRACING_ENABLED: {problem}")
        from ai_worker.jobs import build_registry  # the jobs need the settings module: import late

        for name, overrides in (("TASK_MAX_ATTEMPTS", {"max_attempts": self.task_max_attempts}),
                                ("TASK_TIMEOUTS_S", {"timeouts_s": self.task_timeouts_s})):
            try:
                build_registry(**overrides)
            except ValueError as exc:
                raise ConfigError(f"invalid configuration:\n  {name}: {exc}") from None

    def _image_hint(self) -> str:
        """How else images can be drawn: another image model of the registry whose key is set, or offline."""
        registry = self.models
        usable = [registry.model(name, "image") for name, m in registry.table.models.items() if m.kind == "image"]
        usable = [m for m in usable if m.provider_kind != "offline" and m.usable]
        if not usable:
            return "(images can also use IMAGE_PROVIDER=offline)"
        alt = usable[0]
        return (f"(images can also use IMAGE_MODEL={alt.id}, whose key is set, at ${alt.image_price(512, 512):g} "
                f"an image (see `ai-worker cost --image-model {alt.id}`), or IMAGE_PROVIDER=offline)")


def load_settings(*, check: bool = True, **overrides: object) -> Settings:
    """Build settings from the environment, turning pydantic errors into a ConfigError per variable.
    `check=False` skips the checks across variables (API keys), for tools that only read the registry."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = str(err["loc"][0]).upper() if err["loc"] else "?"
            if err["type"] == "missing":
                lines.append(f"{name}: required but not set")
            else:
                lines.append(f"{name}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    except SettingsError as exc:  # JSON-valued variables are decoded before validation
        text = str(exc)
        name = next((f.alias for n, f in Settings.model_fields.items() if f'"{n}"' in text and f.alias), "?")
        raise ConfigError(f"invalid configuration:\n  {name}: not valid JSON ({exc.__cause__ or exc})") from None
    if check:
        settings.check_runtime()
    return settings
