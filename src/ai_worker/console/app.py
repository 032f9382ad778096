"""The web console: an aiohttp application rendering Jinja2 templates server-side.

Pages: worlds (`/worlds`), one world (`/worlds/{id}`), models and breakers (`/models`), dead letters
(`/dlq`), login. Every page works without JavaScript (a `<noscript>` refresh keeps a running world's page
moving); `static/console.js` swaps in fresh server-rendered fragments from the `/live` endpoints every few
seconds while something is still running, and stops when it has ended. All database reads are in
data.py, all changes in actions.py, the token and CSRF checks in auth.py.

Safety: templates autoescape every value (LLM text included; nothing from the database is marked safe),
image URLs are used only when they are http(s), a Content-Security-Policy allows scripts from this
origin only, and no setting that could hold a secret is passed to a template.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import jinja2
import structlog
from aiohttp import web
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from ai_worker.config import Settings
from ai_worker.console import actions, data
from ai_worker.console.auth import Auth, same_origin
from ai_worker.messaging.dlq import DeadLetter, read_dead_letters
from ai_worker.mongo import Client, Database

log = structlog.get_logger(__name__)

WORLDS_PER_PAGE = 50
POSTS_PER_PAGE = 24
CHARACTERS_PER_PAGE = 60
FAILED_SHOWN = 50
DLQ_LIMIT = 200
LIVE_WORLD_MS = 2000
LIVE_LIST_MS = 5000
NOSCRIPT_REFRESH_S = 5
MODEL_DAYS = (1, 7, 30)

NOTICES = {
    "cancelled": "World cancelled: its open tasks are cancelled and the world is marked failed.",
    "already": "Nothing to do: the world had already ended.",
    "replayed": "The dead letter was re-published onto the tasks topic.",
    "missing": "There is no message at that position any more.",
    "login": "Logged in: actions are enabled.",
    "logout": "Logged out.",
}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' http: https: data:; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


@dataclass(frozen=True)
class ConsoleConfig:
    """Where the console reads from and listens. `token` is never rendered (repr hides it too)."""

    mongo_uri: str = field(repr=False)
    database: str = "generia_ai_worker"
    kafka: tuple[str, ...] = ()  # empty: Kafka not configured, the dead-letter page says so
    tasks_topic: str = "generia-tasks"
    dlq_topic: str = "generia-tasks-dlq"
    token: str | None = field(default=None, repr=False)
    host: str = "127.0.0.1"
    port: int = 8082
    kafka_timeout_s: float = 4.0  # the dead-letter page's bound on waiting for Kafka

    @classmethod
    def from_settings(cls, settings: Settings, *, kafka_configured: bool = True, database: str | None = None,
                      host: str | None = None, port: int | None = None) -> ConsoleConfig:
        return cls(
            mongo_uri=settings.mongodb_uri, database=database or settings.mongodb_database,
            kafka=tuple(settings.kafka_bootstrap) if kafka_configured else (),
            tasks_topic=settings.kafka_topic_tasks, dlq_topic=settings.kafka_topic_dlq,
            token=settings.console_token or None, host=host or settings.console_host,
            port=settings.console_port if port is None else port,
        )


@dataclass
class _State:
    config: ConsoleConfig
    auth: Auth
    env: jinja2.Environment
    db: Database | None = None


STATE = web.AppKey("console_state", _State)


class Refused(Exception):
    """An action or request that is not allowed; rendered as a message page with its status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- template helpers --------------------------------------------------------------------------------


def img_src(value: Any) -> str | None:
    """The URL when it is an absolute http(s) URL without control characters; None otherwise (so
    `javascript:`, `data:` and relative tricks never reach a `src` attribute)."""
    if not isinstance(value, str) or not value or len(value) > 2048:
        return None
    if any(ord(ch) < 33 or ch in "\\\"'<>`" for ch in value):
        return None
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    return value if parts.scheme in ("http", "https") and parts.netloc else None


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def ago(value: Any) -> str:
    if not isinstance(value, datetime):
        return "-"
    seconds = max(0.0, (datetime.now(UTC) - _aware(value)).total_seconds())
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def duration(start: Any, end: Any) -> str:
    if not isinstance(start, datetime):
        return "-"
    stop = _aware(end) if isinstance(end, datetime) else datetime.now(UTC)
    seconds = max(0.0, (stop - _aware(start)).total_seconds())
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def money(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return "-"
    return f"${value:.4f}" if abs(value) < 1 else f"${value:,.2f}"


def pct(done: Any, total: Any) -> int:
    if not isinstance(done, int | float) or not isinstance(total, int | float) or total <= 0:
        return 0
    return max(0, min(100, round(100 * done / total)))


def when(value: Any) -> str:
    return _aware(value).strftime("%Y-%m-%d %H:%M:%S UTC") if isinstance(value, datetime) else "-"


def short_id(value: Any) -> str:
    return str(value)[:8]


def path_segment(value: Any) -> str:
    return quote(str(value), safe="")


def build_env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("ai_worker.console", "templates"),
        autoescape=True,  # every template, whatever its name: generated text is never trusted
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(img_src=img_src, ago=ago, money=money, when=when, short_id=short_id, seg=path_segment,
                       duration=duration)
    env.globals.update(pct=pct)
    return env


# --- request helpers ---------------------------------------------------------------------------------


def _state(request: web.Request) -> _State:
    return request.app[STATE]


def _db(request: web.Request) -> Database:
    db = _state(request).db
    if db is None:
        raise Refused(503, "The console is not connected to the database yet.")
    return db


def _int_param(request: web.Request, name: str, default: int = 1, lo: int = 1, hi: int = 100_000) -> int:
    try:
        value = int(request.query.get(name, default))
    except ValueError:
        return default
    return max(lo, min(hi, value))


@dataclass(frozen=True)
class Viewer:
    """Who is looking: whether actions exist at all and whether this browser may use them."""

    auth_enabled: bool
    logged_in: bool
    csrf: str | None

    @property
    def can_act(self) -> bool:
        return self.logged_in and self.csrf is not None


def _viewer(request: web.Request) -> Viewer:
    auth = _state(request).auth
    nonce = auth.session_nonce(request)
    return Viewer(auth_enabled=auth.enabled, logged_in=nonce is not None,
                  csrf=auth.csrf_token(nonce) if nonce is not None else None)


def _render_text(request: web.Request, template: str, **ctx: Any) -> str:
    state = _state(request)
    ctx.setdefault("viewer", _viewer(request))
    return state.env.get_template(template).render(
        request_path=request.path, database=state.config.database, retry_available=actions.retry_available(),
        notice=NOTICES.get(request.query.get("done", "")), **ctx)


def _render(request: web.Request, template: str, *, http_status: int = 200, **ctx: Any) -> web.Response:
    return web.Response(text=_render_text(request, template, **ctx), status=http_status, content_type="text/html",
                        headers={"Cache-Control": "no-store"})


def _message(request: web.Request, status: int, title: str, text: str) -> web.Response:
    return _render(request, "message.html", http_status=status, title=title, text=text)


def _live(parts: Mapping[str, str], done: bool, version: str | None = None) -> web.Response:
    """A live answer: fresh fragments by part name, whether polling can stop, the version they show."""
    return web.json_response({"parts": dict(parts), "done": done, "version": version},
                             headers={"Cache-Control": "no-store"})


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


async def _authorize(request: web.Request) -> Mapping[str, str]:
    """The form of an action POST, once the token session, the CSRF token and the origin are checked."""
    auth = _state(request).auth
    if not auth.enabled:
        raise Refused(403, "This console is read-only: no CONSOLE_TOKEN is configured.")
    if not same_origin(request):
        raise Refused(403, "Refused: the request did not come from this console.")
    nonce = auth.session_nonce(request)
    if nonce is None:
        raise Refused(403, "Log in with the console token first.")
    form = await request.post()
    csrf = form.get("csrf")
    if not isinstance(csrf, str) or not auth.check_csrf(nonce, csrf):
        raise Refused(403, "Refused: missing or invalid CSRF token. Reload the page and try again.")
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _safe_next(value: Any) -> str:
    """A local path to go to after logging in; anything else (another site, `//host`, control characters that
    browsers drop, backslashes) becomes the worlds page."""
    if (isinstance(value, str) and value.startswith("/") and not value.startswith("//") and len(value) < 2048
            and all(32 < ord(ch) < 127 and ch != "\\" for ch in value)):
        return value
    return "/worlds"


# --- middleware --------------------------------------------------------------------------------------


@web.middleware
async def _guard(request: web.Request,
                 handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        response = await handler(request)
    except Refused as exc:
        response = _message(request, exc.status, "Not allowed" if exc.status == 403 else "Unavailable",
                            exc.message)
    except web.HTTPNotFound:
        response = _message(request, 404, "Not found", "There is nothing at this address.")
    except web.HTTPMethodNotAllowed:
        response = _message(request, 405, "Not allowed", "This address does not accept that method.")
    except PyMongoError as exc:
        log.warning("console database error", error_type=type(exc).__name__)
        response = _message(request, 503, "Database unavailable",
                            f"The database could not be read ({type(exc).__name__}). Try again in a moment.")
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


# --- worlds ------------------------------------------------------------------------------------------


async def _worlds_context(request: web.Request) -> dict[str, Any]:
    db = _db(request)
    status = request.query.get("status", "")
    if status not in data.WORLD_STATUSES:
        status = ""
    page = _int_param(request, "page")
    worlds = await data.list_worlds(db, status=status or None, page=page, per_page=WORLDS_PER_PAGE)
    counts = await data.count_worlds(db)
    query = {k: v for k, v in (("status", status), ("page", str(page))) if v}
    return {"worlds": worlds, "counts": counts, "status": status, "statuses": data.WORLD_STATUSES,
            "live_url": "/worlds/live" + ("?" + urlencode(query) if query else ""),
            "done": all(w.terminal for w in worlds.items)}


async def worlds_page(request: web.Request) -> web.Response:
    ctx = await _worlds_context(request)
    return _render(request, "worlds.html", live_ms=LIVE_LIST_MS, **ctx)


async def worlds_live(request: web.Request) -> web.Response:
    ctx = await _worlds_context(request)
    return _live({"worlds": _render_text(request, "_worlds_table.html", **ctx)}, ctx["done"])


WORLD_PARTS = {"hero": "_world_hero.html", "about": "_world_about.html", "progress": "_world_progress.html",
               "characters": "_characters.html", "posts": "_posts.html", "failed": "_failed.html"}


async def _find_world(request: web.Request) -> data.WorldSummary:
    db = _db(request)
    world_id = request.match_info["world_id"]
    world = await data.get_world(db, world_id)
    if world is None:
        if await data.world_has_tasks(db, world_id):
            raise Refused(404, "This world has been requested but no worker has picked it up yet. "
                               "Reload in a moment.")
        raise web.HTTPNotFound()
    return world


def _version(world: data.WorldSummary) -> str:
    """Changes whenever the world does: its status document is refreshed after every task transition."""
    stamp = world.updated_at.isoformat() if world.updated_at else ""
    return (f"{stamp}|{world.status}|{world.tasks_total}|{world.tasks_completed}|{world.tasks_failed}|"
            f"{world.users_created}|{world.posts_created}")


async def _world_context(request: web.Request, world: data.WorldSummary, *, full: bool) -> dict[str, Any]:
    db = _db(request)
    world_id = world.id
    page = _int_param(request, "page")
    cpage = _int_param(request, "cpage")
    query = {"page": str(page), "cpage": str(cpage)}
    # tasks_failed counts failed and cancelled tasks: none means there is nothing to look for.
    failed, failed_total = (await data.failed_tasks(db, world_id, limit=FAILED_SHOWN) if world.tasks_failed
                            else ([], 0))
    ctx: dict[str, Any] = {
        "world": world,
        "version": _version(world),
        "images": await data.world_images(db, world_id),
        "characters": await data.characters(db, world_id, page=cpage, per_page=CHARACTERS_PER_PAGE),
        "posts": await data.posts(db, world_id, page=page, per_page=POSTS_PER_PAGE),
        "failed": failed, "failed_total": failed_total,
        "text": await data.world_text(db, world_id),
        "page": page, "cpage": cpage,
        "base_url": f"/worlds/{path_segment(world_id)}",
        "live_url": f"/worlds/{path_segment(world_id)}/live?{urlencode(query)}",
    }
    if full:
        ctx["costs"] = await data.cost_by_model(db, world_id)
        ctx["task_counts"] = await data.task_counts(db, world_id)
    return ctx


async def world_page(request: web.Request) -> web.Response:
    ctx = await _world_context(request, await _find_world(request), full=True)
    return _render(request, "world.html", live_ms=LIVE_WORLD_MS, refresh_s=NOSCRIPT_REFRESH_S, **ctx)


async def world_live(request: web.Request) -> web.Response:
    """The page's live fragments; nothing but the version when the world has not changed since `v` (one
    small read instead of the page's queries, however large the world)."""
    world = await _find_world(request)
    version = _version(world)
    if request.query.get("v") == version:
        return _live({}, world.terminal, version)
    ctx = await _world_context(request, world, full=False)
    viewer = _viewer(request)
    parts = {name: _render_text(request, template, viewer=viewer, **ctx) for name, template in WORLD_PARTS.items()}
    return _live(parts, world.terminal, version)


async def cancel_action(request: web.Request) -> web.StreamResponse:
    await _authorize(request)
    db = _db(request)
    world_id = request.match_info["world_id"]
    world = await data.get_world(db, world_id)
    if world is None:
        raise web.HTTPNotFound()
    done = "already"
    if not world.terminal:
        result = await actions.cancel_world(db, world_id)
        log.info("world cancelled from the console", world_id=world_id, tasks=result.tasks_cancelled)
        done = "cancelled"
    return _redirect(f"/worlds/{path_segment(world_id)}?done={done}")


async def retry_action(request: web.Request) -> web.StreamResponse:
    await _authorize(request)
    db = _db(request)
    world_id = request.match_info["world_id"]
    try:
        await actions.retry_world(db, world_id)
    except actions.NotAvailable as exc:
        return _message(request, 501, "Not available", str(exc))
    return _redirect(f"/worlds/{path_segment(world_id)}")


# --- models, dead letters ----------------------------------------------------------------------------


async def models_page(request: web.Request) -> web.Response:
    db = _db(request)
    days = _int_param(request, "days", 1, 1, 366)
    rows = await data.model_stats(db, days=days)
    return _render(request, "models.html", rows=[r.as_dict() for r in rows], days=days, day_choices=MODEL_DAYS,
                   workers=await data.workers(db))


async def _reachable(bootstrap: Sequence[str], timeout_s: float) -> bool:
    """Whether any bootstrap address accepts a TCP connection (fails fast where Kafka is down)."""
    async def one(address: str) -> bool:
        host, _, port = address.strip().rpartition(":")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]") or "localhost", int(port)),
                                               timeout=timeout_s)
        except (OSError, ValueError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    return any(await asyncio.gather(*(one(a) for a in bootstrap)))


async def _dead_letters(config: ConsoleConfig) -> list[DeadLetter]:
    consumer, letters = await read_dead_letters(config.kafka, config.dlq_topic, None, DLQ_LIMIT, idle_s=1.0)
    await consumer.stop()
    return letters


async def dlq_page(request: web.Request) -> web.Response:
    config = _state(request).config
    ctx: dict[str, Any] = {"configured": bool(config.kafka), "dlq_topic": config.dlq_topic,
                           "tasks_topic": config.tasks_topic, "letters": [], "problem": None, "limit": DLQ_LIMIT}
    if config.kafka:
        if not await _reachable(config.kafka, min(2.0, config.kafka_timeout_s)):
            ctx["problem"] = "Kafka is unreachable: no broker accepted a connection."
        else:
            try:
                letters = await asyncio.wait_for(_dead_letters(config), timeout=config.kafka_timeout_s)
                ctx["letters"] = [_letter_view(letter) for letter in letters]
            except Exception as exc:  # the page says what happened instead of a traceback
                log.warning("console could not read the dead-letter topic", error_type=type(exc).__name__)
                problem = "Kafka did not answer in time" if isinstance(exc, TimeoutError) else type(exc).__name__
                ctx["problem"] = f"Kafka is unreachable: the dead-letter topic could not be read ({problem})."
    return _render(request, "dlq.html", **ctx)


def _letter_view(letter: DeadLetter) -> dict[str, Any]:
    headers = {k: v for k, v in letter.headers}
    body = letter.value or b""
    return {"partition": letter.partition, "offset": letter.offset, "reason": letter.reason or "(no reason)",
            "source": letter.source, "time": headers.get("x-dlq-time", b"").decode(errors="replace"),
            "size": len(body), "preview": body[:400].decode(errors="replace"),
            "key": (letter.key or b"").decode(errors="replace")[:100]}


async def replay_action(request: web.Request) -> web.StreamResponse:
    form = await _authorize(request)
    config = _state(request).config
    if not config.kafka:
        raise Refused(503, "Kafka is not configured for this console.")
    try:
        partition, offset = int(form.get("partition", "")), int(form.get("offset", ""))
    except ValueError:
        raise Refused(400, "Which message? The form needs a partition and an offset.") from None
    try:
        letter = await actions.replay_dead_letter(config.kafka, config.dlq_topic, config.tasks_topic, partition,
                                                  offset, timeout_s=config.kafka_timeout_s + 5)
    except Exception as exc:
        log.warning("console replay failed", error_type=type(exc).__name__)
        raise Refused(503, f"The message could not be replayed ({type(exc).__name__}).") from None
    log.info("dead letter replayed from the console", partition=partition, offset=offset, found=letter is not None)
    return _redirect(f"/dlq?done={'replayed' if letter else 'missing'}")


# --- login -------------------------------------------------------------------------------------------


def _login_form(request: web.Request, *, status: int = 200, error: str | None = None,
                next_url: str | None = None) -> web.Response:
    auth = _state(request).auth
    token, fresh = auth.login_token(request)
    response = _render(request, "login.html", http_status=status, login_csrf=token, error=error,
                       next_url=_safe_next(next_url or request.query.get("next")))
    if fresh and auth.enabled:
        auth.set_login_cookie(response, request, token)
    return response


async def login_page(request: web.Request) -> web.Response:
    return _login_form(request)


async def login_action(request: web.Request) -> web.StreamResponse:
    auth = _state(request).auth
    if not auth.enabled:
        raise Refused(403, "This console is read-only: no CONSOLE_TOKEN is configured.")
    form = await request.post()
    csrf, token, next_url = form.get("csrf"), form.get("token"), form.get("next")
    if not same_origin(request) or not isinstance(csrf, str) or not auth.check_login_csrf(request, csrf):
        return _login_form(request, status=403, error="The form expired. Please try again.",
                           next_url=_safe_next(next_url))
    if not isinstance(token, str) or not auth.check_token(token):
        await asyncio.sleep(0.5)  # slows down guessing
        return _login_form(request, status=403, error="Wrong token.", next_url=_safe_next(next_url))
    target = _safe_next(next_url)
    response = _redirect(target + ("&" if "?" in target else "?") + "done=login")
    auth.set_session(response, request)
    return response


async def logout_action(request: web.Request) -> web.StreamResponse:
    await _authorize(request)
    response = _redirect("/worlds?done=logout")
    Auth.clear_session(response)
    return response


async def index(request: web.Request) -> web.StreamResponse:
    return _redirect("/worlds")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


# --- the application ---------------------------------------------------------------------------------


def create_app(config: ConsoleConfig, *, db: Database | None = None) -> web.Application:
    """The console application. With `db` it uses that database (tests); otherwise it connects to
    `config.mongo_uri` when it starts and closes the client when it stops."""
    state = _State(config=config, auth=Auth(config.token), env=build_env(), db=db)
    app = web.Application(middlewares=[_guard], client_max_size=64 * 1024)
    app[STATE] = state

    async def indexes(db: Database) -> None:
        try:
            await data.ensure_indexes(db)
        except Exception as exc:  # the pages still work (slower); each says so if the database is down
            log.warning("console could not create its indexes", error_type=type(exc).__name__)

    async def connect(app: web.Application) -> AsyncIterator[None]:
        client: Client | None = None
        if state.db is None:
            client = AsyncMongoClient(config.mongo_uri, tz_aware=True, serverSelectionTimeoutMS=3000,
                                      appname="ai-worker-console")
            state.db = client[config.database]
        # In the background: building an index on a large collection must not hold back the first page.
        building = asyncio.create_task(indexes(state.db))
        yield
        building.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await building
        if client is not None:
            await client.close()

    app.cleanup_ctx.append(connect)
    r = app.router
    r.add_get("/", index)
    r.add_get("/healthz", healthz)
    r.add_get("/worlds", worlds_page)
    r.add_get("/worlds/live", worlds_live)
    r.add_get("/worlds/{world_id}", world_page)
    r.add_get("/worlds/{world_id}/live", world_live)
    r.add_post("/worlds/{world_id}/cancel", cancel_action)
    r.add_post("/worlds/{world_id}/retry", retry_action)
    r.add_get("/models", models_page)
    r.add_get("/dlq", dlq_page)
    r.add_post("/dlq/replay", replay_action)
    r.add_get("/login", login_page)
    r.add_post("/login", login_action)
    r.add_post("/logout", logout_action)
    static = r.add_static("/static", str(files("ai_worker.console") / "static"), name="static", append_version=True)

    def static_url(filename: str) -> str:
        return str(static.url_for(filename=filename))

    state.env.globals["static"] = static_url
    return app


class ConsoleServer:
    """The console listening on a TCP port (`start_console`)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self._runner = runner
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    async def stop(self) -> None:
        await self._runner.cleanup()


async def start_console(config: ConsoleConfig, *, db: Database | None = None) -> ConsoleServer:
    runner = web.AppRunner(create_app(config, db=db), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    sockets = getattr(site._server, "sockets", None) or []
    port = sockets[0].getsockname()[1] if sockets else config.port
    return ConsoleServer(runner, config.host, int(port))


async def serve(config: ConsoleConfig, on_ready: Callable[[ConsoleServer], None] | None = None) -> None:
    """Run the console until SIGTERM/SIGINT."""
    server = await start_console(config)
    if on_ready is not None:
        on_ready(server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()
