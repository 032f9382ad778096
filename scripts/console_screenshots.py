"""Take the README's console screenshots (docs/console-worlds.png, docs/console-world.png).

Starts the embedded stack with the provider simulator, a worker, a few worlds (finished, cancelled,
running) and the console, then photographs the pages with headless Chromium (Debian's `chromium` and
`chromium-driver`, through Selenium from the test extra):

    python scripts/console_screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from ai_worker.client import send_world
from ai_worker.console.actions import cancel_world
from ai_worker.console.app import ConsoleConfig, start_console
from ai_worker.devstack.demo import WORKER_DB, start_worker, stop_process, wait_for_world
from ai_worker.devstack.stack import EmbeddedStack

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "console"))
from browser import IMAGES_JS, missing_browser, start_browser

WORLDS = [  # (prompt, users, posts)
    ("A drowned city of lantern-lit canals where gondoliers trade rumours", 3, 6),
    ("A desert observatory town that reads the future in sandstorms", 6, 12),
]
CANCELLED = ("An endless library whose shelves rearrange themselves at night", 5, 20)
RUNNING = ("A floating archipelago of sky-cities connected by airships", 10, 40)


def _shoot(driver: Any, url: str, path: Path, *, width: int = 1360, max_height: int = 2700) -> None:
    driver.set_window_size(width, 900)
    driver.get(url)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # every picture loaded
        seen = driver.execute_script(IMAGES_JS)
        if all(seen[k]["n"] == seen[k]["loaded"] for k in ("avatars", "posts", "header", "icon")):
            break
        time.sleep(0.2)
    height = min(max_height, int(driver.execute_script("return document.documentElement.scrollHeight")))
    driver.set_window_size(width, height)
    time.sleep(0.5)
    driver.save_screenshot(str(path))


async def main(out: Path) -> None:
    problem = missing_browser()
    if problem:
        raise SystemExit(problem)
    root = Path(tempfile.mkdtemp(prefix="console-shots-"))
    stack = EmbeddedStack(root)
    info = await stack.start()
    stack.simulator.config.update({"latency_ms": 150})
    worker = start_worker(info, root / "logs" / "worker.log", real_llm=False)
    server = await start_console(ConsoleConfig(mongo_uri=info.mongo_uri, database=WORKER_DB, port=0,
                                               kafka=(info.kafka_bootstrap,)))
    driver = start_browser()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(info.mongo_uri, tz_aware=True)
    topic = info.topics["tasks"]
    try:
        async def send(prompt: str, users: int, posts: int) -> str:
            world_id, _ = await send_world(kafka=info.kafka_bootstrap, mongo_uri=info.mongo_uri, database=WORKER_DB,
                                           topic=topic, prompt=prompt, users=users, posts=posts)
            return world_id

        finished = []
        for prompt, users, posts in WORLDS:
            world_id = await send(prompt, users, posts)
            await wait_for_world(info.mongo_uri, world_id, 300, worker=worker)
            finished.append(world_id)
        cancelled = await send(*CANCELLED)
        for _ in range(600):  # cancel it once it has a few posts
            doc = await client[WORKER_DB]["world_generation_status"].find_one({"_id": cancelled})
            if doc and doc.get("posts_created"):
                break
            await asyncio.sleep(0.2)
        await cancel_world(client[WORKER_DB], cancelled)
        await send(*RUNNING)
        await asyncio.sleep(6)
        await asyncio.to_thread(_shoot, driver, f"{server.url}worlds", out / "console-worlds.png", max_height=900)
        await asyncio.to_thread(_shoot, driver, f"{server.url}worlds/{finished[-1]}", out / "console-world.png")
        print(f"screenshots in {out}")
    finally:
        driver.quit()
        await client.close()
        await server.stop()
        await asyncio.to_thread(stop_process, worker)
        await stack.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    asyncio.run(main(args.out))
