"""The dashboard's HTTP side: a stdlib threading server whose handler serves the page's static
files (a fixed list: nothing else on disk is reachable), ``/api/state`` and ``/report``.

The handler never touches the coordinator: it asks the :class:`server.dashboard.Dashboard`
for the last snapshot, the report and whether a request carries the token.
"""

from __future__ import annotations

import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from server.pages import static_file

log = logging.getLogger("hfedmoe.server")

HTML = "text/html; charset=utf-8"
# URL path -> (file in server/dashboard/static/, content type): all the files served
PAGE_FILES = {
    "/": ("index.html", HTML),
    "/index.html": ("index.html", HTML),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
}
# the page's stylesheet and script carry no run data (they are the package's files): served
# without the token, which the browser cannot add to <link> and <script> requests
PUBLIC = frozenset({"/dashboard.css", "/dashboard.js"})
# the page loads its own files only; the report is one file with inline styles and PNGs
PAGE_CSP = "default-src 'self'; img-src 'self' data:"
REPORT_CSP = "default-src 'self'; style-src 'unsafe-inline'; img-src 'self' data:"


class Source(Protocol):
    """What the handler asks of the dashboard (:class:`server.dashboard.Dashboard`)."""

    def authorized(self, header: str, query_tokens: list[str]) -> bool: ...

    def host_allowed(self, header: str | None) -> bool: ...

    def state_bytes(self) -> bytes: ...

    def report(self) -> tuple[int, bytes, str]: ...


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True
    dashboard: Source


class Handler(BaseHTTPRequestHandler):
    server_version = "hfedmoe-dashboard"
    server: DashboardServer

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self._serve(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        d = self.server.dashboard
        url = urlsplit(self.path)
        tokens = parse_qs(url.query).get("token", [])
        if not d.host_allowed(self.headers.get("Host")):  # DNS rebinding: another site's name
            self._send(421, b"421: this dashboard does not answer to that Host name\n",
                       "text/plain", head)
            return
        if url.path not in PUBLIC and not d.authorized(self.headers.get("Authorization", ""),
                                                       tokens):
            self._send(401, b"401: this dashboard needs its token (?token=... or "
                            b"Authorization: Bearer ...)\n", "text/plain", head,
                       {"WWW-Authenticate": 'Bearer realm="hfedmoe"'})
            return
        if url.path in PAGE_FILES:
            name, ctype = PAGE_FILES[url.path]
            self._send(200, static_file(name), ctype, head)
        elif url.path == "/api/state":
            self._send(200, d.state_bytes(), "application/json", head)
        elif url.path == "/report":
            self._send(*d.report(), head, csp=REPORT_CSP)
        else:
            self._send(404, b"not found\n", "text/plain", head)

    def _send(self, code: int, body: bytes, ctype: str, head: bool,
              extra: dict[str, str] | None = None, csp: str = PAGE_CSP) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", csp)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        # the path only: a query may carry the token
        log.debug("dashboard: %s %s %s", self.command, urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("dashboard: " + format, *args)
