"""Shared machinery of bench/throughput.py and bench/makespan.py.

Everything here observes the worker from the outside: worker processes (`python -m ai_worker run`), the
embedded stack's database and broker processes, `/proc`, the database's documents and the provider
simulator. The only hook inside the worker is the command counter of `ai_worker.observability.dbstats`,
switched on by `AI_WORKER_DB_STATS_FILE`.

The top half is pure (registry generation, TOML output, the critical path and the lower bound, command
count arithmetic, markdown rows): tests/unit/test_bench_*.py cover it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORKER_DB = "generia_ai_worker"
PLATFORM_DB = "generia_platform"
TERMINAL_WORLD = ("completed", "failed")
TERMINAL_TASK = ("completed", "failed", "cancelled")
BATCH_SIZE = 10  # characters per character batch, post ideas per post batch (ai_worker.worlds.plan)
RATE_LIMIT_KEYS = ("rpm", "tpm", "tpd")
DEFAULT_PROMPT = "A river delta of stilt villages where tide-readers trade forecasts"
# A world bigger than the default WORLD_BUDGET_USD (25) needs its own cap: the simulator's images cost $0.039.
BENCH_BUDGET_USD = 1_000_000.0
CODE_PATHS = ("src", "bench/*.py", "models.toml", "prompts", "pyproject.toml")  # what a measurement depends on


# ================================================================================================
# Pure helpers
# ================================================================================================


def parse_size(text: str) -> tuple[int, int]:
    """'40/400' -> (40, 400): characters / posts."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"size must look like USERS/POSTS (e.g. 40/400), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_env_items(items: Iterable[str]) -> dict[str, str]:
    """['A=1', 'B=x=y'] -> {'A': '1', 'B': 'x=y'}."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--set expects VAR=VALUE, got {item!r}")
        out[name.strip()] = value
    return out


# --- model registry ------------------------------------------------------------------------------


def bench_registry(
    base: Mapping[str, Any],
    *,
    strip_rate_limits: bool = True,
    llm_slots: int | None = None,
    image_slots: int | None = None,
) -> dict[str, Any]:
    """A copy of a model registry table for a bench: without the shared rate limits (rpm, tpm, tpd) when
    `strip_rate_limits`, and with every model's `max_concurrent` set to the slots of its kind when given."""
    data: dict[str, Any] = json.loads(json.dumps(base))  # deep copy of plain TOML data
    for model in data.get("models", {}).values():
        if strip_rate_limits:
            for key in RATE_LIMIT_KEYS:
                model.pop(key, None)
        slots = {"llm": llm_slots, "image": image_slots}.get(str(model.get("kind")))
        if slots is not None:
            model["max_concurrent"] = slots
    return data


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"TOML cannot hold {value!r} here")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dump_toml(data: Mapping[str, Any]) -> str:
    """TOML for nested tables of scalars and lists of scalars (what a model registry holds)."""
    lines: list[str] = []

    def table(prefix: tuple[str, ...], values: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, Mapping)}
        tables = {k: v for k, v in values.items() if isinstance(v, Mapping)}
        if prefix and (scalars or not tables):
            if lines:
                lines.append("")
            lines.append("[" + ".".join(_toml_key(p) for p in prefix) + "]")
        for key, value in scalars.items():
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
        for key, value in tables.items():
            table((*prefix, key), value)

    table((), data)
    return "\n".join(lines) + "\n"


def load_toml(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text(encoding="utf-8"))


# --- the plan's critical path and the lower bound ------------------------------------------------


def batches(count: int, size: int = BATCH_SIZE) -> int:
    return -(-max(0, count) // size)


def posts_for(users: int, posts: int, index: int) -> int:
    """The posts of character `index` (the worker's split: shares differ by at most one, the first
    `posts mod users` characters get the extra post)."""
    if users <= 0 or not 0 <= index < users:
        return 0
    base, extra = divmod(posts, users)
    return base + (1 if index < extra else 0)


def critical_path_s(users: int, posts: int, llm_s: float, image_s: float, batch: int = BATCH_SIZE) -> float:
    """The longest chain of dependent provider calls of a world, in seconds, every call taking its latency.

    world description (LLM) -> world header then icon (2 images, one after the other); and world description
    -> character batches 1..b (LLM each, one after another) where batch b creates the character -> its avatar
    (image), and -> its post batches 1..k (LLM each, one after another) -> a post of batch k (LLM) -> the
    post's image. Tasks that make no provider call (init, create character) count as zero."""
    longest = llm_s + 2 * image_s  # the world image task: header, then icon
    for index in range(max(0, users)):
        created = llm_s + (index // batch + 1) * llm_s  # description + character batches up to this one
        longest = max(longest, created + image_s)  # avatar
        share = posts_for(users, posts, index)
        if share > 0:
            longest = max(longest, created + batches(share, batch) * llm_s + llm_s + image_s)
    return longest


@dataclass(frozen=True)
class LowerBound:
    critical_path_s: float
    llm_s: float  # LLM calls x LLM latency / LLM slots
    image_s: float  # images x image latency / image slots

    @property
    def value(self) -> float:
        return max(self.critical_path_s, self.llm_s, self.image_s)

    @property
    def binding(self) -> str:
        """Which term is the bound: 'critical path', 'LLM slots' or 'image slots'."""
        terms = {"critical path": self.critical_path_s, "LLM slots": self.llm_s, "image slots": self.image_s}
        return max(terms, key=lambda name: terms[name])


def lower_bound(
    *, users: int, posts: int, llm_calls: int, images: int, llm_latency_s: float, image_latency_s: float,
    llm_slots: int, image_slots: int,
) -> LowerBound:
    """max(critical path, LLM calls x LLM latency / LLM slots, images x image latency / image slots); the
    slots are those of all worker processes together."""
    if llm_slots < 1 or image_slots < 1:
        raise ValueError("slots must be at least 1")
    return LowerBound(
        critical_path_s=critical_path_s(users, posts, llm_latency_s, image_latency_s),
        llm_s=llm_calls * llm_latency_s / llm_slots,
        image_s=images * image_latency_s / image_slots,
    )


# --- database command counts ---------------------------------------------------------------------

CommandKey = tuple[str, str]  # (command, collection)


@dataclass
class CommandCount:
    n: int = 0
    failed: int = 0
    ms: float = 0.0


def command_counts(doc: Mapping[str, Any] | None) -> dict[CommandKey, CommandCount]:
    """The counts of one dbstats file (ai_worker.observability.dbstats snapshot)."""
    out: dict[CommandKey, CommandCount] = {}
    for row in (doc or {}).get("commands", []):
        key = (str(row["command"]), str(row["collection"]))
        out[key] = CommandCount(int(row.get("n", 0)), int(row.get("failed", 0)), float(row.get("ms", 0.0)))
    return out


def merge_counts(parts: Iterable[Mapping[CommandKey, CommandCount]]) -> dict[CommandKey, CommandCount]:
    """Sum of the counts of several processes."""
    out: dict[CommandKey, CommandCount] = {}
    for part in parts:
        for key, count in part.items():
            total = out.setdefault(key, CommandCount())
            total.n += count.n
            total.failed += count.failed
            total.ms += count.ms
    return out


def diff_counts(after: Mapping[CommandKey, CommandCount],
                before: Mapping[CommandKey, CommandCount]) -> dict[CommandKey, CommandCount]:
    """`after - before`, keys with nothing left dropped."""
    out: dict[CommandKey, CommandCount] = {}
    for key, count in after.items():
        base = before.get(key, CommandCount())
        delta = CommandCount(count.n - base.n, count.failed - base.failed, count.ms - base.ms)
        if delta.n or delta.failed:
            out[key] = delta
    return out


def by_collection(counts: Mapping[CommandKey, CommandCount]) -> dict[str, int]:
    out: dict[str, int] = {}
    for (_, collection), count in counts.items():
        out[collection] = out.get(collection, 0) + count.n
    return dict(sorted(out.items(), key=lambda item: (-item[1], item[0])))


def total_commands(counts: Mapping[CommandKey, CommandCount]) -> int:
    return sum(c.n for c in counts.values())


def breakdown_lines(counts: Mapping[CommandKey, CommandCount], tasks: int, *, markdown: bool = False) -> list[str]:
    """A table of commands per task by collection and command, most frequent first, then per collection."""
    per = max(tasks, 1)
    total = total_commands(counts)
    rows = sorted(counts.items(), key=lambda item: (-item[1].n, item[0]))
    lines: list[str] = []
    if markdown:
        lines += ["| collection | command | commands | per task | failed | avg ms |", "|---|---|---:|---:|---:|---:|"]
        for (cmd, coll), c in rows:
            lines.append(f"| {coll} | {cmd} | {c.n} | {c.n / per:.2f} | {c.failed} | {c.ms / max(c.n, 1):.2f} |")
        lines.append(f"| **all** | | **{total}** | **{total / per:.2f}** | "
                     f"{sum(c.failed for c in counts.values())} | |")
        lines += ["", "| collection | commands per task |", "|---|---:|"]
        lines += [f"| {coll} | {n / per:.2f} |" for coll, n in by_collection(counts).items()]
        return lines
    lines.append(f"{'collection':<26}{'command':<16}{'commands':>10}{'per task':>10}{'failed':>8}{'avg ms':>9}")
    for (cmd, coll), c in rows:
        lines.append(f"{coll:<26}{cmd:<16}{c.n:>10}{c.n / per:>10.2f}{c.failed:>8}{c.ms / max(c.n, 1):>9.2f}")
    lines.append(f"{'all':<42}{total:>10}{total / per:>10.2f}{sum(c.failed for c in counts.values()):>8}")
    lines.append("per collection: " + ", ".join(f"{coll} {n / per:.2f}" for coll, n in by_collection(counts).items()))
    return lines


# --- small statistics and results files ----------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def insert_row(text: str, header: str, separator: str, row: str) -> str:
    """`text` with `row` added at the end of the table that starts with `header`; a new table (header and
    separator) at the end of the text when there is none."""
    lines = text.splitlines()
    for start, line in enumerate(lines):
        if line.strip() == header.strip():
            end = start + 1
            while end < len(lines) and lines[end].lstrip().startswith("|"):
                end += 1
            lines.insert(end, row)
            return "\n".join(lines) + "\n"
    prefix = text.rstrip("\n")
    block = [header, separator, row]
    return (prefix + "\n\n" if prefix else "") + "\n".join(block) + "\n"


def append_row(path: Path, header: str, separator: str, row: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(insert_row(text, header, separator, row), encoding="utf-8")


# ================================================================================================
# The machine and the processes
# ================================================================================================


def loadavg() -> str:
    """The 1/5/15-minute load averages, '1.23 0.98 0.75'."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cores() -> int:
    return os.cpu_count() or 1


@functools.cache
def git_commit(checkout: str | None = None) -> str:
    """HEAD's short hash when the bench started, `+dirty` when the code (not the docs or results) differs; of
    `checkout` (the workers' code) when given."""
    where = Path(checkout) if checkout else REPO
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
                               cwd=where,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return ("workers " if checkout else "") + out + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def command_line(argv: Sequence[str]) -> str:
    """How this bench was started, relative to the repository: `python bench/x.py ARGS`."""
    script = Path(argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(REPO)
    return shlex.join(["python", str(script), *argv[1:]])


def today() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), seconds; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "; fields[0] is the state
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def status_kb(pid: int, name: str) -> int | None:
    """A `VmHWM`/`VmRSS`-style line of /proc/<pid>/status, kB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def machine_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores together, from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    values = [int(v) for v in first[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


@dataclass
class ProcUsage:
    label: str
    pid: int
    cpu_start: float | None = None
    cpu_last: float | None = None
    cpu_end: float | None = None
    hwm_kb: int = 0

    @property
    def cpu_s(self) -> float:
        end = self.cpu_end if self.cpu_end is not None else self.cpu_last
        if self.cpu_start is None or end is None:
            return 0.0
        return max(0.0, end - self.cpu_start)


class ProcWatch:
    """CPU time (between `start` and `stop`) and peak RSS of a set of processes, sampled every second so a
    process that exits keeps its last figures; plus the whole machine's busy time over the same window."""

    def __init__(self, procs: Sequence[tuple[str, int]]) -> None:
        self.procs = [ProcUsage(label, pid) for label, pid in procs]
        self._task: asyncio.Task[None] | None = None
        self._machine_start: tuple[int, int] | None = None
        self._machine_end: tuple[int, int] | None = None
        self.started_at = 0.0
        self.stopped_at = 0.0

    def _sample(self) -> None:
        for p in self.procs:
            cpu = cpu_seconds(p.pid)
            if cpu is not None:
                p.cpu_last = cpu
            hwm = status_kb(p.pid, "VmHWM")
            if hwm is not None:
                p.hwm_kb = max(p.hwm_kb, hwm)

    async def _loop(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(1.0)

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._machine_start = machine_jiffies()
        for p in self.procs:
            p.cpu_start = cpu_seconds(p.pid)
            p.cpu_last = p.cpu_start
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """End of the measured window: CPU read now; peak RSS keeps being sampled until `close`."""
        self._sample()
        self.stopped_at = time.monotonic()
        self._machine_end = machine_jiffies()
        for p in self.procs:
            p.cpu_end = p.cpu_last

    async def close(self) -> None:
        self._sample()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def wall_s(self) -> float:
        return max(1e-9, (self.stopped_at or time.monotonic()) - self.started_at)

    def machine_busy_cores(self) -> float | None:
        """Cores busy on average over the window (everyone's processes, not only ours)."""
        if self._machine_start is None or self._machine_end is None:
            return None
        busy = self._machine_end[0] - self._machine_start[0]
        total = self._machine_end[1] - self._machine_start[1]
        return busy / total * cores() if total > 0 else None

    def grouped(self) -> dict[str, dict[str, Any]]:
        """label -> {cpu_s, cpu_pct (of one core, over the window), peak_rss_mb (largest process), n, pids}."""
        wall = self.wall_s()
        out: dict[str, dict[str, Any]] = {}
        for p in self.procs:
            g = out.setdefault(p.label, {"cpu_s": 0.0, "peak_rss_mb": 0.0, "n": 0, "pids": [], "per_process": []})
            g["cpu_s"] += p.cpu_s
            g["peak_rss_mb"] = max(g["peak_rss_mb"], p.hwm_kb / 1024)
            g["n"] += 1
            g["pids"].append(p.pid)
            g["per_process"].append({"pid": p.pid, "cpu_s": p.cpu_s, "cpu_pct": 100 * p.cpu_s / wall,
                                     "peak_rss_mb": p.hwm_kb / 1024})
        for g in out.values():
            g["cpu_pct"] = 100 * g["cpu_s"] / wall
        return out


# ================================================================================================
# The embedded stack and the worker processes
# ================================================================================================


class Interrupted(Exception):
    """SIGINT/SIGTERM: the bench stops its workers and the stack, and exits."""


_interrupted: list[str] = []


def install_interrupt_handler() -> None:
    """Ctrl-C / SIGTERM set a flag that the waiting loops check (`check_interrupted`), so the stack and the
    workers are always stopped in order; a second one is ignored while that happens."""
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if not _interrupted:
            print(f"\n{sig.name}: stopping the workers and the stack...", file=sys.stderr, flush=True)
        _interrupted.append(sig.name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)


def check_interrupted() -> None:
    if _interrupted:
        raise Interrupted(_interrupted[0])


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    stats_path: Path

    def log_events(self) -> Iterator[dict[str, Any]]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return
        for line in text.splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    yield json.loads(line)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def current_assignment(events: Iterable[Mapping[str, Any]], topic: str) -> set[int]:
    """The partitions of `topic` a worker holds after the given log events (assigned / revoked)."""
    held: set[int] = set()
    for ev in events:
        kind = ev.get("event")
        if kind not in ("partitions assigned", "partitions revoked"):
            continue
        parts = {int(p.rsplit(":", 1)[1]) for p in ev.get("partitions", []) if p.rsplit(":", 1)[0] == topic}
        held = held | parts if kind == "partitions assigned" else held - parts
    return held


def assignment_complete(assignments: Sequence[set[int]], partitions: int) -> bool:
    """Every worker holds something (when there are enough partitions) and together they hold each
    partition exactly once."""
    if not assignments:
        return False
    if len(assignments) <= partitions and any(not a for a in assignments):
        return False
    union: set[int] = set().union(*assignments)
    return union == set(range(partitions)) and sum(len(a) for a in assignments) == partitions


@dataclass
class WorldFacts:
    world_id: str
    status: str | None
    tasks_total: int
    tasks_by_status: dict[str, int]
    characters: int
    posts: int
    status_doc: dict[str, Any] = field(default_factory=dict)

    @property
    def tasks_terminal(self) -> int:
        return sum(n for s, n in self.tasks_by_status.items() if s in TERMINAL_TASK)

    @property
    def tasks_in_collection(self) -> int:
        return sum(self.tasks_by_status.values())


class BenchStack:
    """One embedded stack (own temporary directory), a generated model registry and N worker processes.

    Use: `async with BenchStack(...) as bs: await bs.start_workers(n, env); wid, t0 = await bs.send(...)`."""

    def __init__(self, *, simulator_config: Any, registry: Mapping[str, Any], keep: bool = False,
                 partitions: int = 8) -> None:
        from ai_worker.devstack.stack import EmbeddedStack

        self.root = Path(tempfile.mkdtemp(prefix="ai-worker-bench-"))
        self.keep = keep
        self.stack = EmbeddedStack(self.root / "stack", simulator_config=simulator_config, partitions=partitions)
        self.registry_path = self.root / "models.toml"
        self.registry_path.write_text(dump_toml(registry), encoding="utf-8")
        self.workers: list[Worker] = []
        self.keep_reason: str | None = None  # set when a run went wrong: its logs are kept
        self._client: Any = None
        self.info: Any = None

    async def __aenter__(self) -> BenchStack:
        from pymongo import AsyncMongoClient

        self.info = await self.stack.start()
        self._client = AsyncMongoClient(self.info.mongo_uri, tz_aware=True, serverSelectionTimeoutMS=10000)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop_workers)
        if self._client is not None:
            await self._client.close()
        await self.stack.stop()
        failed = isinstance(exc[0], type) and not issubclass(exc[0], Interrupted)
        if self.keep or failed or self.keep_reason:
            why = self.keep_reason or (exc[0].__name__ if isinstance(exc[0], type) else "--keep")
            print(f"bench data (worker logs, counters, database) kept in {self.root} ({why})", file=sys.stderr)
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def db(self) -> Any:
        return self._client[WORKER_DB]

    @property
    def platform_db(self) -> Any:
        return self._client[PLATFORM_DB]

    @property
    def tasks_topic(self) -> str:
        return str(self.info.topics["tasks"])

    def worker_env(self, extra: Mapping[str, str]) -> dict[str, str]:
        """The environment of a worker process: ours, the stack's (StackInfo.worker_env: addresses, the
        simulator, fast group timings), the bench registry, then `extra`."""
        env = {**os.environ, **self.info.worker_env(), "SERVICE_PORT": "0",
               "MODEL_REGISTRY_FILE": str(self.registry_path)}
        env.update(extra)
        return env

    def effective_settings(self, extra: Mapping[str, str]) -> Any:
        """The worker's own Settings for that environment (what `ai-worker run` will see)."""
        from ai_worker.config import load_settings

        env = self.worker_env(extra)
        saved = dict(os.environ)
        try:
            os.environ.clear()
            os.environ.update(env)
            return load_settings(check=False)
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def start_workers(self, count: int, extra: Mapping[str, str]) -> list[Worker]:
        for _ in range(count):
            name = f"w{len(self.workers) + 1}"
            log_path = self.root / f"worker-{name}.log"
            stats_path = self.root / f"dbstats-{name}.json"
            env = self.worker_env({"WORKER_ID": f"bench-{name}", "AI_WORKER_DB_STATS_FILE": str(stats_path),
                                   **extra})
            out = open(log_path, "ab")  # noqa: SIM115 - handed to the child
            try:
                proc = subprocess.Popen([sys.executable, "-m", "ai_worker", "run"], env=env, stdout=out,
                                        stderr=subprocess.STDOUT, cwd=self.root)
            finally:
                out.close()
            self.workers.append(Worker(name, proc, log_path, stats_path))
        return self.workers

    async def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Until the workers hold every partition of the tasks topic between them; returns the seconds."""
        started = time.monotonic()
        while True:
            for w in self.workers:
                if w.proc.poll() is not None:
                    raise RuntimeError(f"worker {w.name} exited with {w.proc.returncode}:\n{w.tail()}")
            held = [current_assignment(w.log_events(), self.tasks_topic) for w in self.workers]
            check_interrupted()
            if assignment_complete(held, self.info.partitions):
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"workers not assigned after {timeout_s:.0f} s: {held}")
            await asyncio.sleep(0.2)

    def stop_workers(self) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in self.workers:
            try:
                w.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()

    def worker_pids(self) -> list[tuple[str, int]]:
        return [("worker", w.proc.pid) for w in self.workers]

    def stack_pids(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = [("stack (simulator + platform)", os.getpid())]
        if self.stack.db.pid is not None:
            out.append(("database", self.stack.db.pid))
        if self.stack.broker.pid is not None:
            out.append(("broker", self.stack.broker.pid))
        return out

    # --- database stats files -------------------------------------------------------------------
    def read_stats(self) -> list[dict[str, Any] | None]:
        out: list[dict[str, Any] | None] = []
        for w in self.workers:
            try:
                out.append(json.loads(w.stats_path.read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError):
                out.append(None)
        return out

    async def fresh_stats(self, after: float, timeout_s: float = 10.0) -> list[dict[str, Any] | None]:
        """The workers' counter files once each was written after wall-clock time `after`."""
        deadline = time.monotonic() + timeout_s
        while True:
            docs = self.read_stats()
            if all(d is not None and float(d.get("at", 0)) >= after for d in docs) or time.monotonic() > deadline:
                return docs
            await asyncio.sleep(0.2)

    # --- worlds ----------------------------------------------------------------------------------
    async def send(self, users: int, posts: int, prompt: str = DEFAULT_PROMPT,
                   budget_usd: float = BENCH_BUDGET_USD) -> tuple[str, float]:
        """Start a world the platform's way; returns its id and the wall-clock time (epoch s) of the send."""
        from ai_worker.client import send_world

        sent_at = time.time()
        world_id, _ = await send_world(kafka=self.info.kafka_bootstrap, mongo_uri=self.info.mongo_uri,
                                       database=WORKER_DB, topic=self.tasks_topic, prompt=prompt, users=users,
                                       posts=posts, extra={"budget_usd": budget_usd})
        return world_id, sent_at

    async def status(self, world_id: str) -> dict[str, Any]:
        doc = await self.db["world_generation_status"].find_one({"_id": world_id})
        return dict(doc) if doc else {}

    async def wait_world(self, world_id: str, deadline: float, *, progress_every_s: float = 15.0,
                         label: str = "") -> dict[str, Any]:
        """Poll until the world is terminal or `deadline` (monotonic) passes; returns the last status document.
        Prints a progress line every `progress_every_s`; raises when a worker process dies."""
        last_print = time.monotonic()
        started = last_print
        doc: dict[str, Any] = {}
        while True:
            found = await self.db["world_generation_status"].find_one(
                {"_id": world_id}, {"status": 1, "tasks_total": 1, "tasks_completed": 1, "tasks_failed": 1,
                                    "users_created": 1, "posts_created": 1, "finished_at": 1})
            if found:
                doc = dict(found)
                if doc.get("status") in TERMINAL_WORLD:
                    return doc
            for w in self.workers:
                if w.proc.poll() is not None:
                    raise RuntimeError(f"worker {w.name} exited with {w.proc.returncode}:\n{w.tail()}")
            check_interrupted()
            now = time.monotonic()
            if now >= deadline:
                return doc
            if progress_every_s and now - last_print >= progress_every_s:
                last_print = now
                print(f"  {label}{now - started:6.0f} s: {progress_text(doc)}  load {loadavg()}", flush=True)
            await asyncio.sleep(0.1)

    async def facts(self, world_id: str) -> WorldFacts:
        doc = await self.status(world_id)
        by_status: dict[str, int] = {}
        async for row in await self.db["tasks"].aggregate([
            {"$match": {"world_id": world_id}}, {"$group": {"_id": "$status", "n": {"$sum": 1}}}]):
            by_status[str(row["_id"])] = int(row["n"])
        characters = await self.platform_db["characters"].count_documents({"world_id": world_id})
        posts = await self.platform_db["posts"].count_documents({"world_id": world_id})
        return WorldFacts(world_id=world_id, status=doc.get("status"), tasks_total=int(doc.get("tasks_total") or 0),
                          tasks_by_status=by_status, characters=characters, posts=posts, status_doc=doc)

    async def calls(self, world_id: str) -> dict[str, dict[str, Any]]:
        """LLM and image attempts of a world from api_requests_history: count, errors, durations (ms)."""
        out: dict[str, dict[str, Any]] = {}
        cursor = self.db["api_requests_history"].find(
            {"world_id": world_id, "api_type": {"$in": ["llm", "image_generation"]}},
            {"api_type": 1, "status": 1, "duration_ms": 1, "model": 1})
        async for rec in cursor:
            kind = "llm" if rec.get("api_type") == "llm" else "image"
            row = out.setdefault(kind, {"n": 0, "errors": 0, "durations_ms": [], "models": {}})
            row["n"] += 1
            row["errors"] += rec.get("status") != "ok"
            row["durations_ms"].append(int(rec.get("duration_ms") or 0))
            model = str(rec.get("model"))
            row["models"][model] = row["models"].get(model, 0) + 1
        return out


def progress_text(doc: Mapping[str, Any]) -> str:
    return (f"{doc.get('status', '?')}, tasks {doc.get('tasks_completed', 0)}+{doc.get('tasks_failed', 0)}"
            f"/{doc.get('tasks_total', 0)}, characters {doc.get('users_created', 0)}, "
            f"posts {doc.get('posts_created', 0)}")


def finished_seconds(doc: Mapping[str, Any], sent_at: float, detected_at: float) -> float:
    """send -> terminal: the world's own `finished_at` when it has one, else when the bench saw it."""
    finished = doc.get("finished_at")
    if isinstance(finished, dt.datetime):
        if finished.tzinfo is None:
            finished = finished.replace(tzinfo=dt.UTC)
        return max(0.0, finished.timestamp() - sent_at)
    return max(0.0, detected_at - sent_at)


def counts_ok(facts: WorldFacts, users: int, posts: int) -> list[str]:
    """What is wrong with a finished world's counts (empty when everything is exact)."""
    problems = []
    if facts.status != "completed":
        problems.append(f"world {facts.status}")
    if facts.characters != users:
        problems.append(f"characters {facts.characters}/{users}")
    if facts.posts != posts:
        problems.append(f"posts {facts.posts}/{posts}")
    if facts.tasks_terminal != facts.tasks_in_collection:
        problems.append(f"tasks terminal {facts.tasks_terminal}/{facts.tasks_in_collection}")
    if facts.tasks_total != facts.tasks_in_collection:
        problems.append(f"tasks_total {facts.tasks_total} != {facts.tasks_in_collection} in tasks")
    if facts.tasks_by_status.get("failed"):
        problems.append(f"{facts.tasks_by_status['failed']} tasks failed")
    return problems


def effective_slots(settings: Any) -> dict[str, dict[str, Any]]:
    """Per kind: the slots one worker process really has for the primary model of its steps, by the worker's
    own rule (providers.routing.provider_slots: an explicit MAX_CONCURRENT_<KIND>_REQUESTS is the kind's
    slots and replaces the models' max_concurrent; unset, the registry decides), with the inputs."""
    from ai_worker.providers.registry import IMAGE_STEPS, LLM_STEPS
    from ai_worker.providers.routing import provider_slots

    slots = provider_slots(settings)
    out: dict[str, dict[str, Any]] = {}
    for kind, steps, env_value in (("llm", LLM_STEPS, settings.max_concurrent_llm_requests),
                                   ("image", IMAGE_STEPS, settings.max_concurrent_image_requests)):
        per_model = {m.id: m.max_concurrent for m in (settings.models.primary(step, kind) for step in steps)}
        effective = slots.of(kind)
        if kind not in slots.explicit:
            effective = min([effective, *(v for v in per_model.values() if v)])
        out[kind] = {"slots": effective, "env": env_value, "models": per_model}
    return out


def model_names(settings: Any, kind: str) -> set[str]:
    """The provider-side names of every model (primaries and fallbacks) serving the steps of `kind`."""
    from ai_worker.providers.registry import IMAGE_STEPS, LLM_STEPS

    steps = LLM_STEPS if kind == "llm" else IMAGE_STEPS
    return {m.name for step in steps for m in settings.models.chain(step, kind)}
