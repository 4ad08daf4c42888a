"""The dashboard's HTTP server (``pmaster --dashboard HOST:PORT``): pages, assets and JSON.

A standard-library ThreadingHTTPServer on its own thread inside pmaster. It serves the page
and its assets from package data (no build step, no network) and the JSON endpoints of
:mod:`poolfleet.master.dashboard.api`, which speak to the master only through its client
socket. Access:

- Off loopback the dashboard needs a token file or TLS (or ``--insecure``), as the sockets
  need CurveZMQ keys (:func:`check_dashboard_settings`).
- With a token, every ``/api`` request carries it: ``Authorization: Bearer TOKEN``, or the
  cookie ``POST /login`` sets (an HMAC of the token, HttpOnly, SameSite=Strict).
- Without a token (so on loopback), only requests whose ``Host`` is a loopback name are
  answered, so a web page elsewhere cannot reach it through DNS rebinding.
- Changes are POSTs with a JSON body, from the dashboard's own origin.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import structlog

from poolfleet.common.errors import ConfigError
from poolfleet.common.net import is_loopback_host
from poolfleet.master.dashboard.api import ApiError, DashboardApi
from poolfleet.master.metrics import V6Server, parse_listen
from poolfleet.master.settings import MasterSettings

log = structlog.get_logger("pmaster")

MIN_TOKEN_CHARS = 16
COOKIE = "poolfleet_dashboard"
MAX_BODY_BYTES = 4096
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def parse_dashboard(text: str) -> tuple[str, int]:
    return parse_listen(text, "dashboard", "127.0.0.1:8080")


def read_token(path: Path) -> str:
    """The token in ``path`` (surrounding white space dropped); ConfigError if unusable."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the dashboard token file {path}: {exc}") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError(
            f"the dashboard token in {path} must be one word of at least {MIN_TOKEN_CHARS} characters "
            "(for example: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def check_dashboard_settings(settings: MasterSettings) -> None:
    """ConfigError for a dashboard address that is malformed, or off loopback with nothing that
    keeps strangers out (no token file and no TLS) and without ``--insecure``."""
    if not settings.dashboard:
        return
    host, _port = parse_dashboard(settings.dashboard)
    if settings.dashboard_token_file is not None:
        read_token(settings.dashboard_token_file)
    guarded = settings.dashboard_token_file is not None or settings.dashboard_tls
    if not is_loopback_host(host) and not guarded and not settings.insecure:
        raise ConfigError(
            f"refusing to serve the dashboard on {settings.dashboard}: anyone who can reach it could "
            "see the fleet and steer it. Give --dashboard-token-file (best with --dashboard-tls-cert "
            "and --dashboard-tls-key), serve it on loopback, or pass --insecure to accept the risk."
        )


def connect_url(bound: str) -> str:
    """An address to reach the client socket bound at ``bound`` from this host."""
    for any_host, loop in (("0.0.0.0", "127.0.0.1"), ("[::]", "[::1]"), ("*", "127.0.0.1")):
        prefix = f"tcp://{any_host}:"
        if bound.startswith(prefix):
            return f"tcp://{loop}:" + bound[len(prefix) :]
    return bound


def _static_files() -> dict[str, tuple[bytes, str]]:
    """Every asset under static/, by URL path."""
    out: dict[str, tuple[bytes, str]] = {}
    root = resources.files("poolfleet.master.dashboard").joinpath("static")

    def walk(node: Any, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            else:
                suffix = "." + child.name.rsplit(".", 1)[-1] if "." in child.name else ""
                ctype = _TYPES.get(suffix, "application/octet-stream")
                if child.name.endswith("LICENSE"):
                    ctype = _TYPES[".txt"]
                out[f"/static/{prefix}{child.name}"] = (child.read_bytes(), ctype)

    walk(root, "")
    return out


class Dashboard:
    """The HTTP server and its API; ``stop`` ends both."""

    def __init__(self, settings: MasterSettings, api: DashboardApi) -> None:
        assert settings.dashboard is not None
        self.api = api
        self.token = read_token(settings.dashboard_token_file) if settings.dashboard_token_file else None
        self.cookie_value = (
            hmac.new(self.token.encode(), b"poolfleet-dashboard-login", hashlib.sha256).hexdigest()
            if self.token
            else None
        )
        self.tls = settings.dashboard_tls
        self.files = _static_files()
        host, port = parse_dashboard(settings.dashboard)
        cls = V6Server if ":" in host else ThreadingHTTPServer
        self.httpd = cls((host, port), _handler(self))
        self.httpd.daemon_threads = True
        if settings.dashboard_tls_cert is not None and settings.dashboard_tls_key is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(settings.dashboard_tls_cert, settings.dashboard_tls_key)
            # the handshake happens in the request's thread, never in the accepting loop
            self.httpd.socket = ctx.wrap_socket(
                self.httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="dashboard", daemon=True
        )

    @property
    def url(self) -> str:
        raw, port = self.httpd.server_address[:2]
        host = raw.decode() if isinstance(raw, bytes) else str(raw)
        scheme = "https" if self.tls else "http"
        return f"{scheme}://[{host}]:{port}/" if ":" in host else f"{scheme}://{host}:{port}/"

    def start(self) -> None:
        self.api.start()
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)
        self.api.stop()

    # -- access ----------------------------------------------------------------------------
    def authorized(self, headers: Any) -> bool:
        if self.token is None or self.cookie_value is None:
            return True
        auth = str(headers.get("Authorization") or "")
        if auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].strip().encode(), self.token.encode()):
            return True
        for part in str(headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and hmac.compare_digest(value.encode(), self.cookie_value.encode()):
                return True
        return False

    def host_allowed(self, headers: Any) -> bool:
        """Without a token, only loopback names in Host (against DNS rebinding)."""
        if self.token is not None:
            return True
        host = str(headers.get("Host") or "")
        name = host.rsplit("]", 1)[0] + "]" if host.startswith("[") else host.split(":", 1)[0]
        return is_loopback_host(name)

    def login_cookie(self, token: str) -> str | None:
        if self.token is None or self.cookie_value is None:
            return None
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            return None
        secure = "; Secure" if self.tls else ""
        return f"{COOKIE}={self.cookie_value}; HttpOnly; SameSite=Strict; Path=/{secure}"


def _api_get(dash: Dashboard, segs: list[str], query: dict[str, list[str]]) -> Any:
    api = dash.api
    if segs == ["overview"]:
        return api.overview()
    if segs == ["info"]:
        return {"token_required": dash.token is not None, "can": api.capabilities()}
    if segs == ["tasks"]:
        return api.tasks(query)
    if len(segs) == 2 and segs[0] == "tasks":
        return api.task(segs[1])
    if len(segs) == 3 and segs[0] == "tasks" and segs[2] == "logs":
        return api.logs(segs[1], query)
    raise ApiError(404, f"no GET /api/{'/'.join(segs)}")


def _api_post(dash: Dashboard, segs: list[str], body: dict[str, Any], peer: str) -> Any:
    api = dash.api
    if len(segs) == 3 and segs[0] == "tasks" and segs[2] in ("cancel", "retry"):
        return api.cancel(segs[1], peer) if segs[2] == "cancel" else api.retry(segs[1], peer)
    if len(segs) == 3 and segs[0] == "queues" and segs[2] == "purge":
        return api.purge(segs[1], body, peer)
    if len(segs) == 3 and segs[0] == "queues":
        return api.queue(segs[1], segs[2], peer)
    if len(segs) == 3 and segs[0] == "workers":
        return api.worker(segs[1], segs[2], peer)
    if len(segs) == 3 and segs[0] == "schedules":
        return api.schedule(segs[1], segs[2], peer)
    raise ApiError(405, f"no POST /api/{'/'.join(segs)}")


class _Handler(BaseHTTPRequestHandler):
    """One request; ``dash`` is set on the subclass :func:`_handler` makes."""

    dash: Dashboard
    server_version = "pmaster-dashboard"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        try:
            self._route(method)
        except ApiError as exc:
            self.close_connection = True  # a refused request's body may still be unread
            self._json(exc.status, {"error": exc.message})
        except Exception as exc:  # one request fails, the dashboard goes on
            log.exception("dashboard_request_failed", path=self.path, error=repr(exc))
            self.close_connection = True
            self._json(500, {"error": f"the dashboard failed on this request: {exc!r}"})

    def _route(self, method: str) -> None:
        dash = self.dash
        if not dash.host_allowed(self.headers):
            raise ApiError(421, "this dashboard answers only to a loopback Host name")
        parts = urlsplit(self.path)
        path = parts.path
        if method == "GET" and path in ("/", "/index.html"):
            self._file("/static/index.html")
            return
        if method == "GET" and path in dash.files:
            self._file(path)
            return
        body = self._body() if method == "POST" else {}
        if method == "POST" and path == "/login":
            self._login(body)
            return
        if not path.startswith("/api/"):
            raise ApiError(404, f"no page {path}")
        if not dash.authorized(self.headers):
            raise ApiError(401, "this dashboard needs its token: log in")
        segs = [unquote(s) for s in path[len("/api/") :].split("/")]
        if method == "GET":
            self._json(200, _api_get(dash, segs, parse_qs(parts.query)))
        else:
            self._json(200, _api_post(dash, segs, body, self.client_address[0]))

    def _body(self) -> dict[str, Any]:
        ctype = str(self.headers.get("Content-Type") or "").split(";")[0].strip()
        if ctype != "application/json":
            raise ApiError(415, "changes are POSTs with a JSON body (Content-Type: application/json)")
        origin = self.headers.get("Origin")
        if origin and urlsplit(origin).netloc != self.headers.get("Host"):
            raise ApiError(403, f"a change from another origin ({origin}) is refused")
        try:
            length = int(self.headers.get("Content-Length") or "0")
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            raise ApiError(413, f"a request body has at most {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(length) if length else b"{}"
        try:
            doc = json.loads(raw)
        except ValueError:
            raise ApiError(400, "the body is not JSON") from None
        if not isinstance(doc, dict):
            raise ApiError(400, "the body must be a JSON object")
        return doc

    def _login(self, body: dict[str, Any]) -> None:
        token = body.get("token")
        cookie = self.dash.login_cookie(token) if isinstance(token, str) else None
        if self.dash.token is None:
            self._json(200, {"ok": True, "token_required": False})
        elif cookie is None:
            log.warning("dashboard_login_refused", peer=self.client_address[0])
            raise ApiError(403, "wrong token")
        else:
            self._json(200, {"ok": True}, {"Set-Cookie": cookie})

    def _file(self, path: str) -> None:
        data, ctype = self.dash.files[path]
        self._send(200, data, ctype, {"Cache-Control": "no-cache"})

    def _json(self, code: int, doc: dict[str, Any], extra: dict[str, str] | None = None) -> None:
        data = json.dumps(doc, ensure_ascii=False, allow_nan=False).encode()
        self._send(code, data, "application/json", {"Cache-Control": "no-store", **(extra or {})})

    def _send(self, code: int, data: bytes, ctype: str, extra: dict[str, str]) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in {**_SECURITY_HEADERS, **extra}.items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the browser went away first
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("dashboard_request", peer=self.client_address[0], line=format % args)


def _handler(dash: Dashboard) -> type[BaseHTTPRequestHandler]:
    return type("DashboardHandler", (_Handler,), {"dash": dash})


def start_dashboard(settings: MasterSettings, client_endpoint: str) -> Dashboard:
    """Serve the dashboard; its client connects to ``client_endpoint`` (the bound client socket).
    Exits the daemon with a clear error when it cannot listen."""
    from poolfleet.client.client import Client

    assert settings.dashboard is not None
    key = settings.dashboard_curve_secret_key
    client = Client(
        connect_url(client_endpoint),
        timeout_s=5.0,
        curve_server_key=str(settings.curve_secret_key) if key is not None and settings.has_curve else None,
        curve_secret_key=str(key) if key is not None and settings.has_curve else None,
    )
    try:
        dash = Dashboard(settings, DashboardApi(client))
    except (ConfigError, OSError, ssl.SSLError) as exc:
        client.close()
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        log.error("dashboard_failed", address=settings.dashboard, error=why)
        raise SystemExit(
            f"pmaster: error: cannot serve the dashboard on {settings.dashboard}: {why}; "
            "pick another --dashboard HOST:PORT"
        ) from None
    dash.start()
    log.info("dashboard_started", url=dash.url, token=dash.token is not None, tls=dash.tls)
    return dash
