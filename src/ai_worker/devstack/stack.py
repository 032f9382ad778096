"""The whole embedded stack in one object: broker, database, provider simulator and local platform.

``EmbeddedStack(data_dir).start()`` returns a :class:`StackInfo` (addresses of everything), whose
:meth:`StackInfo.worker_env` gives the environment for ``ai-worker run`` against the stack. The parts are
public attributes so chaos tests can kill and restart them (``stack.broker.kill()``, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from ai_worker.devstack.processes import BrokerProcess, DatabaseProcess, create_topics

if TYPE_CHECKING:
    from ai_worker.devstack.platform_server import LocalPlatform
    from ai_worker.devstack.simulator import ProviderSimulator, SimulatorConfig

__all__ = ["DEFAULT_TOPICS", "EmbeddedStack", "StackInfo"]

log = logging.getLogger(__name__)

DEFAULT_TOPICS: tuple[str, str, str] = ("generia-tasks", "generia-progress", "generia-tasks-dlq")
# The first three topics of a stack, in order, play these roles.
TOPIC_ROLES = ("tasks", "progress", "dlq")
SIMULATOR_API_KEY = "sim-key"  # a dummy: the simulator accepts any key


@dataclass
class StackInfo:
    """Where the parts of a running stack listen. JSON round-trips (the devstack ready file)."""

    kafka_bootstrap: str
    mongo_uri: str
    simulator_url: str | None
    platform_grpc: str
    upload_base_url: str
    data_dir: str
    topics: dict[str, str] = field(
        default_factory=lambda: dict(zip(TOPIC_ROLES, DEFAULT_TOPICS, strict=True))
    )
    partitions: int = 8
    platform_mode: str = "local"

    def worker_env(
        self,
        *,
        group_id: str = "ai-worker",
        real_llm: bool = False,
        extra: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """Environment variables for ``ai-worker run`` against this stack (``extra`` wins).

        With ``real_llm`` the LLM and image settings are left to the caller's environment (a real
        OPENROUTER_API_KEY); otherwise both point at the provider simulator.
        """
        env = {
            "KAFKA_BROKERS": self.kafka_bootstrap,
            "KAFKA_TOPIC_TASKS": self.topics["tasks"],
            "KAFKA_TOPIC_PROGRESS": self.topics["progress"],
            "KAFKA_TOPIC_DLQ": self.topics["dlq"],
            "KAFKA_GROUP_ID": group_id,
            "KAFKA_TOPIC_PARTITIONS": str(self.partitions),
            # Fast group membership on the embedded broker (EMBEDDED.md: 1000/300 flaps, defaults are slow).
            "KAFKA_SESSION_TIMEOUT_MS": "2000",
            "KAFKA_HEARTBEAT_INTERVAL_MS": "500",
            "MONGODB_URI": self.mongo_uri,
            "MONGODB_DATABASE": "generia_ai_worker",
            "CHARACTER_SERVICE_ADDR": self.platform_grpc,
            "MEDIA_SERVICE_ADDR": self.platform_grpc,
            "POST_SERVICE_ADDR": self.platform_grpc,
            "WORLD_SERVICE_ADDR": self.platform_grpc,
            "LOG_LEVEL": "INFO",
        }
        if not real_llm:
            if self.simulator_url is None:
                raise ValueError("this stack runs without the provider simulator: use real_llm=True")
            env.update(
                {
                    "LLM_BASE_URL": self.simulator_url,
                    "OPENROUTER_API_KEY": SIMULATOR_API_KEY,
                    "IMAGE_BASE_URL": self.simulator_url,
                    "RUNWARE_BASE_URL": self.simulator_url.removesuffix("/v1") + "/runware/v1",
                    "RUNWARE_API_KEY": SIMULATOR_API_KEY,
                }
            )
        if extra:
            env.update(extra)
        return env

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StackInfo:
        data: dict[str, Any] = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _charge_registry_prices(simulator: ProviderSimulator) -> None:
    """The simulator charges the model registry's prices (the default image model at its few tenths of a cent,
    not the simulator's flat $0.039), so worlds on the stack cost what `ai-worker cost` predicts."""
    from ai_worker.devstack.simulator import charge_registry_prices
    from ai_worker.providers.registry import ModelRegistry, RegistryError, load_registry

    try:
        charge_registry_prices(simulator.config, ModelRegistry(load_registry()))
    except RegistryError as exc:
        log.warning("simulator keeps its own prices: %s", exc)


def _topic_map(topics: Sequence[str]) -> dict[str, str]:
    if len(topics) < len(TOPIC_ROLES):
        roles = ", ".join(TOPIC_ROLES)
        raise ValueError(f"need at least {len(TOPIC_ROLES)} topics ({roles}), got {topics!r}")
    mapping = dict(zip(TOPIC_ROLES, topics, strict=False))
    for extra in topics[len(TOPIC_ROLES) :]:
        mapping[extra] = extra
    return mapping


class EmbeddedStack:
    """Starts and stops the embedded servers in order. Layout under ``data_dir``:

    ``db/`` (database storage), ``platform/`` (uploaded media of the local platform), ``logs/`` (the
    output of the broker and the database).

    ``platform_mode``: "local" (the local platform honours our `request_id` idempotency key) or "real" (it
    ignores it, as the platform's own services do: every create call creates; see LocalPlatform).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        simulator: bool = True,
        simulator_config: SimulatorConfig | None = None,
        partitions: int = 8,
        topics: Sequence[str] = DEFAULT_TOPICS,
        platform_mode: Literal["local", "real"] = "local",
    ) -> None:
        if platform_mode not in ("local", "real"):
            raise ValueError(f"platform_mode must be 'local' or 'real', not {platform_mode!r}")
        self.platform_mode = platform_mode
        self.data_dir = Path(data_dir).resolve()
        self.use_simulator = simulator
        self.simulator_config = simulator_config
        self.partitions = partitions
        self.topics = tuple(topics)
        self._topic_map = _topic_map(self.topics)
        logs = self.data_dir / "logs"
        self.broker = BrokerProcess(log_path=logs / "broker.log")
        self.db = DatabaseProcess(self.data_dir / "db", log_path=logs / "db.log")
        self._simulator: ProviderSimulator | None = None
        self._platform: LocalPlatform | None = None
        self._info: StackInfo | None = None

    # --- parts -------------------------------------------------------------------------------------
    @property
    def simulator(self) -> ProviderSimulator:
        if self._simulator is None:
            raise RuntimeError("the provider simulator is not running (not started, or simulator=False)")
        return self._simulator

    @property
    def platform(self) -> LocalPlatform:
        if self._platform is None:
            raise RuntimeError("the local platform is not running (stack not started)")
        return self._platform

    @property
    def info(self) -> StackInfo:
        if self._info is None:
            raise RuntimeError("stack not started")
        return self._info

    # --- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> StackInfo:
        """Start broker and database (in parallel), topics, simulator, platform; stop all on failure."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            await asyncio.gather(self.broker.astart(), self.db.astart())
            await self.recreate_topics()
            simulator_url: str | None = None
            if self.use_simulator:
                from ai_worker.devstack.simulator import ProviderSimulator

                self._simulator = ProviderSimulator(self.simulator_config)
                _charge_registry_prices(self._simulator)
                await self._simulator.start()
                simulator_url = self._simulator.base_url
            from ai_worker.devstack.platform_server import LocalPlatform

            platform_dir = self.data_dir / "platform"
            platform_dir.mkdir(parents=True, exist_ok=True)
            self._platform = LocalPlatform(mongo_uri=self.db.uri, data_dir=platform_dir,
                                           honour_request_id=self.platform_mode == "local")
            await self._platform.start()
        except BaseException:
            await self.stop()
            raise
        self._info = StackInfo(
            kafka_bootstrap=self.broker.bootstrap,
            mongo_uri=self.db.uri,
            simulator_url=simulator_url,
            platform_grpc=self._platform.grpc_address,
            upload_base_url=self._platform.upload_base_url,
            data_dir=str(self.data_dir),
            topics=dict(self._topic_map),
            partitions=self.partitions,
            platform_mode=self.platform_mode,
        )
        return self._info

    async def stop(self) -> None:
        """Stop everything in reverse order; parts that are already dead or never started are skipped."""
        if self._platform is not None:
            with _logged("local platform"):
                await self._platform.stop()
            self._platform = None
        if self._simulator is not None:
            with _logged("provider simulator"):
                await self._simulator.stop()
            self._simulator = None
        with _logged("database"):
            await self.db.astop()
        with _logged("broker"):
            await self.broker.astop()
        self._info = None

    async def recreate_topics(self) -> None:
        """(Re-)create the stack's topics; needed after a broker restart, which comes back empty."""
        await create_topics(self.broker.bootstrap, self.topics, self.partitions)

    async def restart_broker(self) -> None:
        """Graceful broker restart on the same port, then the topics again (the new broker is empty)."""
        await self.broker.arestart()
        await self.recreate_topics()

    async def __aenter__(self) -> StackInfo:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


@contextlib.contextmanager
def _logged(what: str) -> Iterator[None]:
    try:
        yield
    except Exception:
        log.warning("stopping the %s failed", what, exc_info=True)
