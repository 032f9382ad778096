"""``python -m ai_worker.devstack``: run the embedded servers (no worker) until SIGTERM / SIGINT.

Writes the :class:`~ai_worker.devstack.stack.StackInfo` JSON to ``--ready-file`` (atomically: a
temporary file renamed into place, so a reader never sees half a file) once everything serves, prints
it on stdout, and removes the ready file again after a clean stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ai_worker.devstack.stack import EmbeddedStack

if TYPE_CHECKING:
    from ai_worker.devstack.simulator import SimulatorConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ai_worker.devstack",
        description="Run the embedded broker, database, provider simulator and local platform.",
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="database storage, uploads and logs")
    parser.add_argument("--ready-file", type=Path, help="write the stack's addresses (JSON) here when ready")
    parser.add_argument("--no-simulator", action="store_true", help="do not start the provider simulator")
    parser.add_argument(
        "--sim-latency-ms", type=float, default=None, help="simulated provider latency per call (ms)"
    )
    parser.add_argument("--partitions", type=int, default=8, help="partitions per topic (default 8)")
    return parser


def _simulator_config(latency_ms: float | None) -> SimulatorConfig | None:
    """A SimulatorConfig with the given latency, or None for the simulator's defaults."""
    if latency_ms is None:
        return None
    from ai_worker.devstack.simulator import SimulatorConfig

    return SimulatorConfig(latency_ms=latency_ms)


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


async def _run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    stack = EmbeddedStack(
        args.data_dir,
        simulator=not args.no_simulator,
        simulator_config=_simulator_config(args.sim_latency_ms),
        partitions=args.partitions,
    )
    try:
        info = await stack.start()
    except Exception as exc:
        print(f"devstack: failed to start: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        text = info.to_json()
        if args.ready_file is not None:
            _write_atomically(args.ready_file, text)
        print(text, flush=True)
        await stop.wait()
    finally:
        await stack.stop()
        if args.ready_file is not None:
            with contextlib.suppress(OSError):
                args.ready_file.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
