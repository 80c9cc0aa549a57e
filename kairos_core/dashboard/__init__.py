"""The web dashboard: a static single-page app (HTML, vanilla JS, CSS shipped in ``static/``)
that reads the local API's JSON routes and its watch stream.

It is served at ``/`` of the local API (the unix socket: no login, the socket is 0600) and, when
``api.http_listen`` is set, over TCP (:class:`~kairos_core.api.APIServer` does both). Over TCP
every request needs the node's dashboard token (:func:`load_token`, ``dashboard.token`` in the
state dir, mode 0600), compared in constant time: as ``?token=`` once — answered with a redirect
that sets it as an HttpOnly, SameSite=Strict cookie — then as that cookie, or as an
``Authorization: Bearer`` header (scripts). ``kairos dashboard --url`` prints the URL with it.

Nothing here inserts data into HTML: the JSON routes escape nothing, and the app puts every
string peers wrote (hostnames, ledger values) into the page as text (``textContent``). The
pages are served with a Content-Security-Policy that allows only the app's own files.
"""

from __future__ import annotations

import hmac
import os
import secrets
from contextlib import suppress
from http.cookies import CookieError, SimpleCookie
from importlib import resources
from pathlib import Path

TOKEN_FILE = "dashboard.token"
COOKIE = "kairos_dashboard"
#: what a browser needs to send with a write that a cookie authenticates (a cross-site form
#: cannot add a header, and a cross-site fetch that does is stopped by CORS before it is sent)
WRITE_HEADER = "x-kairos-dashboard"

# route -> (file in static/, content type)
ASSETS: dict[str, tuple[str, str]] = {
    "": ("index.html", "text/html; charset=utf-8"),
    "dashboard/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "dashboard/style.css": ("style.css", "text/css; charset=utf-8"),
}

#: every dashboard page is served with these: nothing but the app's own files runs or loads
SECURITY_HEADERS = [
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
]

_cache: dict[str, bytes] = {}


def asset(path: str) -> tuple[bytes, str] | None:
    """The bytes and content type of the dashboard file at URL path ``path`` (no leading slash),
    or None when the dashboard has no such file."""
    known = ASSETS.get(path)
    if known is None:
        return None
    name, content_type = known
    if name not in _cache:
        _cache[name] = resources.files(__package__).joinpath("static", name).read_bytes()
    return _cache[name], content_type


def load_token(state_dir: Path) -> str:
    """The node's dashboard token: read from ``<state_dir>/dashboard.token``, or made (32 random
    bytes, URL-safe) and written there with mode 0600 the first time."""
    path = Path(state_dir) / TOKEN_FILE
    with suppress(FileNotFoundError):
        text = path.read_text().strip()
        if len(text) >= 32:
            return text
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    os.replace(tmp, path)
    return token


def token_matches(expected: str, offered: str | None) -> bool:
    """Constant-time comparison (a wrong guess's timing says nothing about the token)."""
    if not offered:
        return False
    return hmac.compare_digest(expected.encode(), offered.encode("utf-8", "replace"))


def cookie_token(cookie_header: str | None) -> str | None:
    """The dashboard token from a ``Cookie:`` header, if it holds one."""
    if not cookie_header:
        return None
    jar = SimpleCookie()
    try:
        jar.load(cookie_header)
    except CookieError:
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel is not None else None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def login_cookie(token: str) -> str:
    """The ``Set-Cookie`` value that keeps a browser logged in after ``?token=`` (for the session)."""
    return f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"


def parse_http_listen(text: str) -> tuple[str, int]:
    """``api.http_listen``: ``host:port``, or a port alone for localhost (127.0.0.1)."""
    from ..errors import KairosError
    from ..metrics import parse_listen

    text = text.strip()
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    try:
        return parse_listen(text)
    except KairosError:
        raise KairosError(f"api.http_listen: {text!r} is not host:port or a port (e.g. 127.0.0.1:8480)") from None
