"""The web dashboard: a static single-page app (HTML, vanilla JS, CSS shipped in ``static/``)
that reads the local API's JSON routes and its watch stream.

It is served at ``/`` of the local API (the unix socket: no login, the socket is 0600) and, when
``api.http_listen`` is set, over TCP (:class:`~kairos_core.api.APIServer` does both). Over TCP
every request needs the node's dashboard token (:func:`load_token`, ``dashboard.token`` in the
state dir, mode 0600), compared in constant time: as ``?token=`` once — answered with a redirect
that sets a session cookie — then as that cookie, or as an ``Authorization: Bearer`` header
(scripts). ``kairos dashboard --url`` prints the URL with it.

The cookie never holds the token: browsers send a host's cookies to every port of it (RFC 6265
§8.5), so another local web server would receive it. It holds an expiry and an HMAC of the port
and that expiry under the token (:func:`session_cookie`): valid on this listener only, for
:data:`SESSION_SECONDS`, and void once the token file is replaced. Its name carries the port, so
two nodes on one host do not overwrite each other's login.

Nothing here inserts data into HTML: the JSON routes escape nothing, and the app puts every
string peers wrote (hostnames, ledger values) into the page as text (``textContent``). The
pages are served with a Content-Security-Policy that allows only the app's own files.
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
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


def cookie_value(cookie_header: str | None, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie:`` header, if it holds one."""
    if not cookie_header:
        return None
    jar = SimpleCookie()
    try:
        jar.load(cookie_header)
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


#: how long a browser login lasts (then ``?token=`` again)
SESSION_SECONDS = 12 * 3600


def cookie_name(port: int) -> str:
    """The session cookie's name on the listener at ``port``."""
    return f"{COOKIE}_{port}"


def _session_mac(token: str, port: int, expires: int) -> str:
    return hmac.new(token.encode(), f"kairos-dashboard-session:{port}:{expires}".encode(), "sha256").hexdigest()


def session_cookie(token: str, port: int, now: float | None = None) -> str:
    """A session value for the listener at ``port``: ``<expiry>.<HMAC>`` (never the token)."""
    expires = int((time.time() if now is None else now) + SESSION_SECONDS)
    return f"{expires}.{_session_mac(token, port, expires)}"


def session_valid(token: str, port: int, cookie_header: str | None, now: float | None = None) -> bool:
    """Whether ``cookie_header`` holds a session of this listener that has not expired."""
    value = cookie_value(cookie_header, cookie_name(port))
    if not value:
        return False
    expires_text, _, mac = value.partition(".")
    if not expires_text.isdigit() or int(expires_text) < (time.time() if now is None else now):
        return False
    return hmac.compare_digest(_session_mac(token, port, int(expires_text)).encode(), mac.encode("utf-8", "replace"))


def login_cookie(token: str, port: int) -> str:
    """The ``Set-Cookie`` value that keeps a browser logged in after ``?token=``."""
    return f"{cookie_name(port)}={session_cookie(token, port)}; Path=/; Max-Age={SESSION_SECONDS}; HttpOnly; SameSite=Strict"


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
