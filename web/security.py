"""What keeps the playground's server to its user: Host check, access token, per-session CSRF token, headers.

A page on any web site can make the browser send requests to ``http://127.0.0.1:PORT`` (cross-site
request forgery) and, through DNS rebinding, read answers under its own host name. So:

- the ``Host`` header must name this server (loopback names, or the ``--host`` given), else 400;
- with ``--host`` (reachable from other machines) every request needs the access token: once as
  ``?token=…`` (which sets an HttpOnly cookie) or as ``Authorization: Bearer …``, else 401;
- every request that changes something (any method but GET/HEAD/OPTIONS) carries the session's
  CSRF token (form field ``csrf`` or header ``X-CSRF-Token``) and no foreign ``Origin``, else 403;
- every answer carries a Content-Security-Policy without inline scripts, ``nosniff``, no framing
  and referrers only to itself (the address may hold the token).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlencode, urlsplit

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_FORM_BYTES = 1 << 20
CSP = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"same-origin"),
                    (b"cross-origin-resource-policy", b"same-origin")]


def host_name(host_header: str) -> str:
    """The name part of a ``Host`` header: ``[::1]:8000`` -> ``::1``, ``Example.org:80`` -> ``example.org``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@dataclass
class Guard:
    """The server's secrets and rules. ``token`` set: every request must prove it knows the token."""

    port: int
    bind_host: str = "127.0.0.1"
    token: str | None = None
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    @property
    def session_cookie(self) -> str:
        # Cookies are shared between the ports of one host: one name per port keeps two servers apart.
        return f"lorareg_session_{self.port}"

    @property
    def auth_cookie(self) -> str:
        return f"lorareg_auth_{self.port}"

    def host_allowed(self, host_header: str | None) -> bool:
        """True for a Host header that names this server."""
        if not host_header:
            return False
        name = host_name(host_header)
        if name in LOOPBACK_NAMES or name in self.allowed_hosts:
            return True
        if self.bind_host in WILDCARD_HOSTS:  # reachable under any name: the token is what protects it
            return self.token is not None
        return name == host_name(self.bind_host)

    def csrf_token(self, session: str) -> str:
        """The CSRF token of a session (derived, so the server keeps no session table)."""
        return hmac.new(self.secret, b"csrf:" + session.encode(), hashlib.sha256).hexdigest()[:40]

    def auth_value(self) -> str:
        """What the access cookie holds: derived from the token, never the token itself."""
        return hmac.new(self.secret, b"auth:" + (self.token or "").encode(), hashlib.sha256).hexdigest()

    def token_ok(self, given: str | None) -> bool:
        return bool(self.token) and given is not None and hmac.compare_digest(given.encode(), self.token.encode())


def _cookies(headers: dict[bytes, bytes]) -> dict[str, str]:
    jar = SimpleCookie()
    try:
        jar.load(headers.get(b"cookie", b"").decode("latin-1"))
    except Exception:  # a malformed Cookie header counts as no cookie
        return {}
    return {k: m.value for k, m in jar.items()}


def _cookie_header(name: str, value: str) -> tuple[bytes, bytes]:
    return b"set-cookie", f"{name}={value}; Path=/; HttpOnly; SameSite=Strict".encode()


async def _plain(send, status: int, text: str, extra: list[tuple[bytes, bytes]] = ()) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                            *SECURITY_HEADERS, *extra]})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """ASGI middleware applying a :class:`Guard` to every HTTP request.

    It puts ``csrf`` (the session's token) into ``scope["state"]`` for the pages' forms.
    """

    def __init__(self, app, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guard = self.guard
        headers = dict(scope.get("headers") or [])
        if not guard.host_allowed(headers.get(b"host", b"").decode("latin-1")):
            await _plain(send, 400, "Invalid Host header: this server answers only to its own address "
                                    "(DNS rebinding protection)")
            return
        cookies = _cookies(headers)
        method = scope["method"].upper()
        if guard.token is not None and not await self._authorised(scope, send, headers, cookies):
            return
        session = cookies.get(guard.session_cookie, "")
        new_session = None
        if len(session) < 32:
            session = new_session = secrets.token_urlsafe(32)
        scope.setdefault("state", {})["csrf"] = guard.csrf_token(session)
        if method not in SAFE_METHODS:
            receive = await self._check_unsafe(scope, receive, send, headers, new_session is not None)
            if receive is None:
                return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
                if new_session is not None:
                    message["headers"].append(_cookie_header(guard.session_cookie, new_session))
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _authorised(self, scope, send, headers: dict[bytes, bytes], cookies: dict[str, str]) -> bool:
        guard = self.guard
        if hmac.compare_digest(cookies.get(guard.auth_cookie, "").encode(), guard.auth_value().encode()):
            return True
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        if authorization.lower().startswith("bearer ") and guard.token_ok(authorization[7:].strip()):
            return True
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if guard.token_ok((query.get("token") or [None])[-1]) and scope["method"].upper() in SAFE_METHODS:
            rest = urlencode([(k, v) for k, values in query.items() if k != "token" for v in values], doseq=True)
            location = scope.get("path", "/") + (f"?{rest}" if rest else "")
            await _plain(send, 303, "signed in", [(b"location", location.encode()),
                                                  _cookie_header(guard.auth_cookie, guard.auth_value())])
            return False
        await _plain(send, 401, "This lorareg server needs its access token: open the address that "
                                "`lorareg serve` printed (it ends in ?token=...)")
        return False

    async def _check_unsafe(self, scope, receive, send, headers: dict[bytes, bytes], no_session: bool):
        """Check Origin and the CSRF token of a state-changing request; return a ``receive`` that replays the body."""
        origin = headers.get(b"origin", b"").decode("latin-1")
        fetch_site = headers.get(b"sec-fetch-site", b"").decode("latin-1")
        if (origin and origin != "null" and not self.guard.host_allowed(urlsplit(origin).netloc)) or \
                fetch_site == "cross-site" or origin == "null":
            await _plain(send, 403, "Refused: this request comes from another site")
            return None
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_FORM_BYTES:
                await _plain(send, 413, "Request too large")
                return None
        given = headers.get(b"x-csrf-token", b"").decode("latin-1")
        if not given and headers.get(b"content-type", b"").startswith(b"application/x-www-form-urlencoded"):
            given = (parse_qs(body.decode("utf-8", "replace")).get("csrf") or [""])[-1]
        expected = scope["state"]["csrf"]
        if no_session or not given or not hmac.compare_digest(given.encode(), expected.encode()):
            await _plain(send, 403, "Refused: the form's security token is missing or out of date; reload the page "
                                    "and try again")
            return None
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay
