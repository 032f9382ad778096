"""The console's token and CSRF protection.

- No token configured (`CONSOLE_TOKEN` unset): the console is read-only; every action is refused.
- With a token: the operator types it once into the login form. The session cookie (HttpOnly,
  SameSite=Strict) holds `nonce.issued.mac`, `mac` = HMAC-SHA256 keyed with the token over the nonce and
  the issue time: it proves the token was known without containing it, and a changed token invalidates
  every session. Each POST carries a CSRF token, HMAC(token, "csrf" + nonce), rendered into the page's
  forms and checked against the session's nonce. The login form itself is protected by a double-submit
  cookie. Secrets are compared with `hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from aiohttp import web

SESSION_COOKIE = "aiw_console_session"
LOGIN_COOKIE = "aiw_console_login"
SESSION_TTL_S = 12 * 3600


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class Auth:
    def __init__(self, token: str | None, *, ttl_s: float = SESSION_TTL_S) -> None:
        self._key = token.encode() if token else None
        self._ttl_s = ttl_s

    @property
    def enabled(self) -> bool:
        """Actions are possible at all (a token is configured)."""
        return self._key is not None

    def _mac(self, purpose: str, *parts: str) -> str:
        assert self._key is not None
        message = "\x1f".join((purpose, *parts)).encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def check_token(self, candidate: str) -> bool:
        if self._key is None:
            return False
        # Compare digests so that the lengths compared are equal whatever was typed.
        return hmac.compare_digest(hashlib.sha256(candidate.encode()).digest(), hashlib.sha256(self._key).digest())

    # --- the session cookie ------------------------------------------------------------------------

    def new_session(self) -> str:
        nonce = secrets.token_urlsafe(18)
        issued = str(int(time.time()))
        return f"{nonce}.{issued}.{self._mac('session', nonce, issued)}"

    def session_nonce(self, request: web.Request) -> str | None:
        """The nonce of a valid, unexpired session cookie; None otherwise."""
        if self._key is None:
            return None
        value = request.cookies.get(SESSION_COOKIE, "")
        parts = value.split(".")
        if len(parts) != 3:
            return None
        nonce, issued, mac = parts
        if not _same(mac, self._mac("session", nonce, issued)):
            return None
        try:
            age = time.time() - int(issued)
        except ValueError:
            return None
        return nonce if 0 <= age <= self._ttl_s else None

    def set_session(self, response: web.StreamResponse, request: web.Request) -> None:
        response.set_cookie(SESSION_COOKIE, self.new_session(), httponly=True, samesite="Strict", path="/",
                            secure=request.secure, max_age=int(self._ttl_s))

    @staticmethod
    def clear_session(response: web.StreamResponse) -> None:
        response.del_cookie(SESSION_COOKIE, path="/")

    # --- CSRF --------------------------------------------------------------------------------------

    def csrf_token(self, nonce: str) -> str:
        return self._mac("csrf", nonce)

    def check_csrf(self, nonce: str, candidate: str) -> bool:
        return self._key is not None and _same(candidate, self.csrf_token(nonce))

    # --- the login form's double-submit token ------------------------------------------------------

    @staticmethod
    def login_token(request: web.Request) -> tuple[str, bool]:
        """The login form's CSRF value: the one in the login cookie, or a new one (then True: set it)."""
        current = request.cookies.get(LOGIN_COOKIE, "")
        if len(current) >= 20:
            return current, False
        return secrets.token_urlsafe(24), True

    @staticmethod
    def set_login_cookie(response: web.StreamResponse, request: web.Request, value: str) -> None:
        response.set_cookie(LOGIN_COOKIE, value, httponly=True, samesite="Strict", path="/login",
                            secure=request.secure, max_age=3600)

    @staticmethod
    def check_login_csrf(request: web.Request, candidate: str) -> bool:
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        return bool(cookie) and bool(candidate) and _same(cookie, candidate)


def same_origin(request: web.Request) -> bool:
    """A POST whose Origin (when the browser sends one) is this console. A second line of defence behind
    the CSRF token and the SameSite cookie."""
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return origin is None
    host = origin.split("://", 1)[-1]
    return host == request.host
