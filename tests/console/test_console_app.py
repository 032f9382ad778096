"""The console's pages and actions against the real embedded database (aiohttp test client, no browser)."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import MakeConsole
from console_seed import seed_world

from ai_worker.console import actions
from ai_worker.console.app import img_src
from ai_worker.mongo import Database
from ai_worker.providers.stats import ModelStatsStore

pytestmark = pytest.mark.integration

TOKEN = "s3cret-console-token"
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


async def _login(client: TestClient[Any, Any], token: str = TOKEN) -> str:
    """Log in through the form; returns the CSRF token of the session."""
    page = await client.get("/login")
    assert page.status == 200
    resp = await client.post("/login", data={"csrf": _csrf(await page.text()), "token": token, "next": "/worlds"},
                             allow_redirects=False)
    assert resp.status == 303, await resp.text()
    worlds = await client.get("/worlds")
    return _csrf(await worlds.text())


async def test_worlds_page_lists_filters_and_paginates(console_db: Database, make_console: MakeConsole) -> None:
    running = await seed_world(console_db, name="Running Reach", status="in_progress")
    done = await seed_world(console_db, name="Finished Fen", status="completed", age_s=600)
    client = await make_console()

    resp = await client.get("/worlds")
    assert resp.status == 200
    html = await resp.text()
    assert "Running Reach" in html and "Finished Fen" in html
    assert f"/worlds/{running.world_id}" in html and f"/worlds/{done.world_id}" in html
    assert html.index("Running Reach") < html.index("Finished Fen")  # newest first
    assert 'data-live-url="/worlds/live' in html
    assert "$0.3633" in html and "of $25.00" in html  # cost and budget

    only_done = await (await client.get("/worlds?status=completed")).text()
    assert "Finished Fen" in only_done and "Running Reach" not in only_done
    assert "Running Reach" in await (await client.get("/worlds?status=bogus")).text()  # unknown filter: all

    live = await client.get("/worlds/live?status=in_progress")
    body = await live.json()
    assert body["done"] is False and "Running Reach" in body["parts"]["worlds"]

    for i in range(50):  # 52 worlds: two pages of 50
        await console_db["world_generation_status"].insert_one(
            {"_id": f"old-{i:02d}", "status": "completed", "stages": [], "parameters": {"user_prompt": "p"},
             "created_at": None})
    page2 = await (await client.get("/worlds?page=2")).text()
    assert "page 2 of 2" in page2 and "52 worlds" in page2


async def test_world_page_shows_content_progress_failures_and_costs(console_db: Database,
                                                                   make_console: MakeConsole) -> None:
    world = await seed_world(console_db, name="Lanternfall", status="in_progress", users=3, posts=6, made_users=3,
                             made_posts=4, failed_error=("invalid_output", "asked 3 times for 2 items, got 1 usable"))
    client = await make_console()
    resp = await client.get(f"/worlds/{world.world_id}")
    assert resp.status == 200
    html = await resp.text()
    assert "Lanternfall" in html and "Lanternfall is a test world." in html
    assert f"{world.world_id}-header" in html and f"{world.world_id}-icon" in html
    assert html.count('class="avatar"') == 3 and "Person 2" in html and "@user_1" in html
    assert html.count('class="post-image"') == 4 and "Post number 3 about the canals." in html and "#canal" in html
    assert html.index("Post number 3") < html.index("Post number 0")  # newest first
    assert 'data-meter="characters" data-value="3" data-total="3"' in html
    assert 'data-meter="posts" data-value="4" data-total="6"' in html
    assert "invalid_output" in html and "asked 3 times for 2 items, got 1 usable" in html
    assert "google/gemini-2.5-flash-image" in html and "$0.0123" in html
    assert all(s in html for s in ("world description", "characters", "finishing"))
    assert '<meta http-equiv="refresh"' in html  # running: the page refreshes itself without JavaScript

    live = await (await client.get(f"/worlds/{world.world_id}/live?page=1&cpage=1")).json()
    assert live["done"] is False
    assert set(live["parts"]) == {"hero", "about", "progress", "characters", "posts", "failed"}
    assert "invalid_output" in live["parts"]["failed"]

    assert (await client.get("/worlds/no-such-world")).status == 404
    assert (await client.get("/worlds/no-such-world/live")).status == 404


async def test_world_page_shows_pending_placeholders(console_db: Database, make_console: MakeConsole) -> None:
    world = await seed_world(console_db, users=3, posts=6, made_users=1, made_posts=0)
    html = await (await (await make_console()).get(f"/worlds/{world.world_id}")).text()
    assert html.count('class="avatar"') == 1  # the one made; the two others are pending placeholders
    assert html.count("avatar placeholder") == 2
    assert "No posts yet" in html


async def test_posts_are_paginated(console_db: Database, make_console: MakeConsole) -> None:
    world = await seed_world(console_db, users=2, posts=60, status="completed")
    client = await make_console()
    first = await (await client.get(f"/worlds/{world.world_id}")).text()
    assert first.count('class="post-image"') == 24 and "page 1 of 3" in first
    last = await (await client.get(f"/worlds/{world.world_id}?page=3")).text()
    assert last.count('class="post-image"') == 12 and "Post number 0 about" in last
    assert '<meta http-equiv="refresh"' not in last  # ended: nothing to refresh


async def test_generated_text_is_escaped(console_db: Database, make_console: MakeConsole) -> None:
    world = await seed_world(console_db, name=XSS, captions={0: XSS},
                             avatar_urls={0: "javascript:alert(1)", 1: 'http://x.invalid/a.png" onerror="alert(1)'})
    await console_db["tasks"].update_many({"world_id": world.world_id, "type": "generate_post_image"},
                                          {"$set": {"parameters.tags": [XSS]}})
    client = await make_console()
    for url in ("/worlds", f"/worlds/{world.world_id}"):
        html = await (await client.get(url)).text()
        assert "<script>window.__xss" not in html and 'onerror="window' not in html
        assert "&lt;script&gt;window.__xss = 1&lt;/script&gt;" in html
    html = await (await client.get(f"/worlds/{world.world_id}")).text()
    assert "javascript:" not in html and 'onerror="alert' not in html
    live = await (await client.get(f"/worlds/{world.world_id}/live")).json()
    assert all("<script>window.__xss" not in part for part in live["parts"].values())
    resp = await client.get("/worlds")
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]


def test_image_urls_must_be_http() -> None:
    assert img_src("http://127.0.0.1:8090/media/abc") == "http://127.0.0.1:8090/media/abc"
    assert img_src("https://cdn.example/a.png?x=1&y=2") == "https://cdn.example/a.png?x=1&y=2"
    for bad in ("javascript:alert(1)", "JaVaScRiPt:alert(1)", "data:image/png;base64,AAAA", "//evil.example/a",
                "/relative.png", "http://a b", 'http://x/"onerror=', "", None, 42, "vbscript:x", "http:/x"):
        assert img_src(bad) is None, bad


async def test_read_only_without_token(console_db: Database, make_console: MakeConsole) -> None:
    world = await seed_world(console_db, status="in_progress")
    client = await make_console()  # no token
    html = await (await client.get(f"/worlds/{world.world_id}")).text()
    assert "read-only" in html and 'action="/worlds/' not in html and "Cancel world" not in html
    resp = await client.post(f"/worlds/{world.world_id}/cancel", data={"csrf": "anything"})
    assert resp.status == 403 and "read-only" in await resp.text()
    assert (await client.post(f"/worlds/{world.world_id}/retry")).status == 403
    assert (await client.post("/dlq/replay", data={"partition": "0", "offset": "0"})).status == 403
    assert (await client.post("/login", data={"token": "x"})).status == 403
    status = await console_db["world_generation_status"].find_one({"_id": world.world_id})
    assert status is not None and status["status"] == "in_progress"


async def test_token_login_csrf_and_cancel(console_db: Database, make_console: MakeConsole) -> None:
    world = await seed_world(console_db, status="in_progress", made_posts=2)
    open_task = await console_db["tasks"].insert_one(
        {"_id": "open-task", "type": "generate_post", "world_id": world.world_id, "status": "pending",
         "parameters": {}, "attempt_count": 0})
    client = await make_console(token=TOKEN)
    cancel = f"/worlds/{world.world_id}/cancel"

    page = await (await client.get(f"/worlds/{world.world_id}")).text()
    assert "Cancel world" not in page and "Log in" in page  # a token exists, this browser has no session
    assert (await client.post(cancel, data={"csrf": "x"})).status == 403  # no session

    login = await client.get("/login")
    form_csrf = _csrf(await login.text())
    wrong = await client.post("/login", data={"csrf": form_csrf, "token": "wrong"}, allow_redirects=False)
    assert wrong.status == 403 and "Wrong token" in await wrong.text()
    no_csrf = await client.post("/login", data={"token": TOKEN}, allow_redirects=False)
    assert no_csrf.status == 403

    ok = await client.post("/login", data={"csrf": form_csrf, "token": TOKEN, "next": f"/worlds/{world.world_id}"},
                           allow_redirects=False)
    assert ok.status == 303 and ok.headers["Location"].startswith(f"/worlds/{world.world_id}")
    cookie = ok.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie

    page = await (await client.get(f"/worlds/{world.world_id}")).text()
    assert "Cancel world" in page and TOKEN not in page
    csrf = _csrf(page)
    assert (await client.post(cancel)).status == 403  # no CSRF token
    wrong_csrf = csrf[:-1] + ("1" if csrf.endswith("0") else "0")  # differs from the real one, always
    assert (await client.post(cancel, data={"csrf": wrong_csrf})).status == 403  # a wrong one
    cross = await client.post(cancel, data={"csrf": csrf}, headers={"Origin": "http://evil.example"})
    assert cross.status == 403
    status = await console_db["world_generation_status"].find_one({"_id": world.world_id})
    assert status is not None and status["status"] == "in_progress"

    done = await client.post(cancel, data={"csrf": csrf}, allow_redirects=False)
    assert done.status == 303 and done.headers["Location"].endswith("?done=cancelled")
    status = await console_db["world_generation_status"].find_one({"_id": world.world_id})
    assert status is not None and status["status"] == "failed" and status["failure_reason"] == actions.CANCEL_REASON
    task = await console_db["tasks"].find_one({"_id": open_task.inserted_id})
    assert task is not None and task["status"] == "cancelled"
    after = await (await client.get(f"/worlds/{world.world_id}?done=cancelled")).text()
    assert "World cancelled" in after and "Cancel world" not in after

    # A session made with another token is worthless.
    other = await make_console(token="another-token")
    other.session.cookie_jar.update_cookies({c.key: c.value for c in client.session.cookie_jar})
    assert (await other.post(cancel, data={"csrf": csrf})).status == 403

    out = await client.post("/logout", data={"csrf": csrf}, allow_redirects=False)
    assert out.status == 303
    assert "Cancel world" not in await (await client.get(f"/worlds/{world.world_id}")).text()


async def test_retry_puts_failed_tasks_back(console_db: Database, make_console: MakeConsole) -> None:
    world = await seed_world(console_db, status="failed", failed_error=("timeout", "took too long"))
    client = await make_console(token=TOKEN)
    csrf = await _login(client)
    page = await (await client.get(f"/worlds/{world.world_id}")).text()
    assert actions.retry_available() is True and "Retry failed tasks" in page
    failed = await console_db["tasks"].count_documents({"world_id": world.world_id, "status": "failed"})
    assert failed > 0
    resp = await client.post(f"/worlds/{world.world_id}/retry", data={"csrf": csrf}, allow_redirects=False)
    assert resp.status == 303
    assert await console_db["tasks"].count_documents({"world_id": world.world_id, "status": "failed"}) == 0
    assert await console_db["tasks"].count_documents({"world_id": world.world_id, "status": "pending"}) >= failed


async def test_models_page_and_workers(console_db: Database, make_console: MakeConsole) -> None:
    client = await make_console()
    html = await (await client.get("/models")).text()
    assert "No worker has reported" in html and "No provider calls recorded" in html

    stats = ModelStatsStore(console_db)
    for status in ("ok", "ok", "error"):
        await stats.add({"api_type": "llm", "model": "google/gemini-2.5-flash", "provider": "openrouter",
                         "status": status, "duration_ms": 900, "prompt_tokens": 100, "completion_tokens": 50,
                         "cost": 0.001})
    await console_db["workers"].insert_one({
        "_id": "host-1234", "updated_at": None, "in_flight": 3, "processed": 41,
        "breakers": {"openrouter/google/gemini-2.5-flash": "closed", "openrouter/openai/gpt-4.1-mini": "open",
                     "runware/runware:101@1": "half_open"}})
    html = await (await client.get("/models?days=7")).text()
    assert "google/gemini-2.5-flash" in html and "66.7" in html
    assert "host-1234" in html and "breaker-open" in html and "breaker-half-open" in html and "breaker-closed" in html


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_dlq_page_when_kafka_is_unreachable_or_not_configured(make_console: MakeConsole) -> None:
    client = await make_console(kafka=(f"127.0.0.1:{_closed_port()}",))
    started = time.monotonic()
    resp = await client.get("/dlq")
    assert resp.status == 200 and "Kafka is unreachable" in await resp.text()
    assert time.monotonic() - started < 5

    # A broker that accepts connections but never answers is cut short as well (default bound: 4 s).
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # say nothing until the client gives up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await make_console(kafka=(f"127.0.0.1:{port}",))
        started = time.monotonic()
        resp = await client.get("/dlq")
        assert resp.status == 200 and "Kafka is unreachable" in await resp.text()
        assert time.monotonic() - started < 8  # kafka_timeout_s (4 s) and some slack for a busy machine
    finally:
        server.close()

    client = await make_console()
    assert "Kafka is not configured" in await (await client.get("/dlq")).text()


async def test_dlq_page_lists_and_replays_one_message(make_console: MakeConsole, wenv: Any) -> None:
    from support import produce, read_topic

    await wenv.create_topics()
    await produce(wenv.info.kafka_bootstrap, wenv.dlq_topic, [b"first"])
    # A dead letter as the consumer writes it: original bytes plus the x-dlq-* headers.
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=wenv.info.kafka_bootstrap)
    await producer.start()
    try:
        meta = await producer.send_and_wait(wenv.dlq_topic, b"<b>not json</b>", key=b"k1", headers=[
            ("trace", b"t-1"), ("x-dlq-reason", b"not JSON: <script>bad()</script>"),
            ("x-dlq-source-topic", wenv.tasks_topic.encode()), ("x-dlq-source-partition", b"0"),
            ("x-dlq-source-offset", b"7"), ("x-dlq-time", b"2030-01-01T00:00:00Z")])
    finally:
        await producer.stop()
    client = await make_console(kafka=(wenv.info.kafka_bootstrap,), dlq_topic=wenv.dlq_topic,
                                tasks_topic=wenv.tasks_topic, token=TOKEN)
    html = await (await client.get("/dlq")).text()
    assert "not JSON: &lt;script&gt;bad()&lt;/script&gt;" in html and f"{wenv.tasks_topic}:0@7" in html
    assert "&lt;b&gt;not json&lt;/b&gt;" in html and 'data-action="replay"' not in html  # no session: no button

    csrf = await _login(client)
    html = await (await client.get("/dlq")).text()
    assert 'data-action="replay"' in html
    resp = await client.post("/dlq/replay", data={"csrf": csrf, "partition": str(meta.partition),
                                                  "offset": str(meta.offset)}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/dlq?done=replayed"
    (replayed,) = await read_topic(wenv.info.kafka_bootstrap, wenv.tasks_topic, expect=1, timeout_s=10)
    assert replayed.value == b"<b>not json</b>" and replayed.key == b"k1"
    assert list(replayed.headers) == [("trace", b"t-1")]  # the x-dlq-* headers are stripped

    missing = await client.post("/dlq/replay", data={"csrf": csrf, "partition": str(meta.partition),
                                                     "offset": "999"}, allow_redirects=False)
    assert missing.headers["Location"] == "/dlq?done=missing"


async def test_no_secrets_on_any_page(console_db: Database, make_console: MakeConsole) -> None:
    world = await seed_world(console_db)
    client = await make_console(token=TOKEN)
    await _login(client)
    for url in ("/worlds", f"/worlds/{world.world_id}", f"/worlds/{world.world_id}/live", "/models", "/dlq",
                "/login", "/nope"):
        text = await (await client.get(url)).text()
        assert TOKEN not in text and "hunter2" not in text and "db.invalid" not in text, url


async def test_database_down_gives_a_page_not_a_traceback(make_console: MakeConsole) -> None:
    from pymongo import AsyncMongoClient

    from ai_worker.console.app import ConsoleConfig, create_app

    dead: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(f"mongodb://127.0.0.1:{_closed_port()}",
                                                              serverSelectionTimeoutMS=300)
    app = create_app(ConsoleConfig(mongo_uri="unused"), db=dead["x"])
    from aiohttp.test_utils import TestServer

    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    try:
        resp = await asyncio.wait_for(client.get("/worlds"), timeout=10)
        assert resp.status == 503 and "Database unavailable" in await resp.text()
    finally:
        await client.close()
        await dead.close()


def test_login_only_redirects_inside_the_console() -> None:
    from ai_worker.console.app import _safe_next

    assert _safe_next("/worlds/abc?page=2") == "/worlds/abc?page=2"
    for bad in ("//evil.example", "https://evil.example", "/\t/evil.example", "/\\evil.example", "evil", "",
                None, "/\n/x"):
        assert _safe_next(bad) == "/worlds", bad


async def test_a_5000_post_world_is_paginated_and_cheap_to_follow(console_db: Database,
                                                                   make_console: MakeConsole) -> None:
    world = await seed_world(console_db, users=50, posts=5000, status="in_progress")
    client = await make_console()
    first = await (await client.get(f"/worlds/{world.world_id}")).text()
    assert first.count('class="post-image"') == 24 and "page 1 of 209" in first and "5000 posts" in first
    assert "page 209 of 209" in await (await client.get(f"/worlds/{world.world_id}?page=209")).text()
    live = await (await client.get(f"/worlds/{world.world_id}/live?page=1&cpage=1")).json()
    assert live["parts"]["posts"].count('class="post-image"') == 24
    assert live["parts"]["characters"].count('class="avatar"') == 50
    # Polling an unchanged world reads its status document only and sends nothing back.
    same = await (await client.get(f"/worlds/{world.world_id}/live", params={"v": live["version"]})).json()
    assert same == {"parts": {}, "done": False, "version": live["version"]}
    await console_db["world_generation_status"].update_one({"_id": world.world_id}, {"$inc": {"posts_created": 1}})
    changed = await (await client.get(f"/worlds/{world.world_id}/live", params={"v": live["version"]})).json()
    assert changed["parts"] and changed["version"] != live["version"]
