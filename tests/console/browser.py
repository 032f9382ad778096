"""Headless Chromium (Debian's `chromium` + `chromium-driver`) through Selenium, and the console as its own
process (`python -m ai_worker console`), for the browser tests and the README screenshots."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[2]


def missing_browser() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        return (f"headless browser not installed ({', '.join(missing)} missing): "
                "apt-get install chromium chromium-driver (.ci/run does)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def start_browser(width: int = 1280, height: int = 1000) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--hide-scrollbars", f"--window-size={width},{height}",
                f"--user-data-dir={tempfile.mkdtemp(prefix='console-chromium-')}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


class ConsoleProcess:
    """`python -m ai_worker console --port 0 ...` as a child process; `url` is what it printed."""

    def __init__(self, mongo_uri: str, database: str, log_dir: Path, *, kafka: str | None = None,
                 token: str | None = None, extra: dict[str, str] | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("CONSOLE_TOKEN", "KAFKA_BROKERS")}
        env["PYTHONPATH"] = str(REPO / "src")
        if token:
            env["CONSOLE_TOKEN"] = token
        env.update(extra or {})
        args = [sys.executable, "-m", "ai_worker", "console", "--host", "127.0.0.1", "--port", "0",
                "--mongo", mongo_uri, "--database", database]
        if kafka:
            args += ["--kafka", kafka]
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"console-{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self.url = self._wait_url()

    def _wait_url(self, timeout_s: float = 30) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            match = re.search(r"console: (http://\S+/)", text)
            if match:
                return match.group(1).rstrip("/")
            if self.proc.poll() is not None:
                raise RuntimeError(f"the console exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the console printed no URL in {timeout_s} s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


IMAGES_JS = """
const count = (sel) => {
  const imgs = [...document.querySelectorAll(sel)];
  return {n: imgs.length, loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length};
};
return {avatars: count('img.avatar'), posts: count('img.post-image'), header: count('img.world-header'),
        icon: count('img.world-icon'), done: document.querySelector('main').dataset.liveDone || '',
        ticks: document.querySelector('main').dataset.liveTicks || '0'};
"""
