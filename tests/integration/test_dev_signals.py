"""`ai-worker dev` stopped by SIGHUP (the terminal closed) stops everything it started, as Ctrl-C does: no
broker, database or worker process survives it. It also prints the worker's HTTP endpoint, which answers."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from support import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def _descendants(pid: int) -> set[int]:
    tree = _children()
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_for(lines: queue.Queue[str], pattern: str, timeout_s: float, seen: list[str]) -> re.Match[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no line matching {pattern!r} within {timeout_s} s:\n{''.join(seen)}")


def _wait_health(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as res:
                assert res.status == 200
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.mark.parametrize("mode", ["mid-world", "keep"])
def test_sighup_stops_everything(mode: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENROUTER_API_KEY"}  # the provider simulator
    env["PYTHONPATH"] = str(REPO / "src")
    size = ["--users", "6", "--posts", "40"] if mode == "mid-world" else ["--users", "1", "--posts", "1", "--keep"]
    proc = subprocess.Popen([sys.executable, "-m", "ai_worker", "dev", *size, "--data-dir", str(tmp_path / "dev")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # like a terminal's session leader; our signals stay ours
    seen: list[str] = []
    family: set[int] = set()
    try:
        lines = _lines(proc)
        endpoint = _wait_for(lines, r"worker: pid (\d+), (http://127\.0\.0\.1:\d+)/health", 120, seen)
        _wait_for(lines, r"world \S+ requested" if mode == "mid-world" else r"--keep", 180, seen)
        _wait_health(f"{endpoint[2]}/health", 60)  # the printed endpoint answers
        family = _descendants(proc.pid)
        assert int(endpoint[1]) in family
        assert len(family) >= 3, f"expected broker, database and worker under {proc.pid}: {family}"

        proc.send_signal(signal.SIGHUP)
        code = proc.wait(timeout=90)
        assert code == (128 + signal.SIGHUP.value if mode == "mid-world" else 0), "".join(seen)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in family):
            time.sleep(0.2)
        survivors = [pid for pid in family if _alive(pid)]
        assert not survivors, f"still running after SIGHUP: {survivors}"
    finally:
        if proc.poll() is None:  # the test failed before the SIGHUP: stop dev the clean way, then make sure
            family |= _descendants(proc.pid)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in family:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
