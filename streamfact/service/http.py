"""The daemon's HTTP API (stdlib threading server, JSON responses).

``GET /healthz``, ``/metrics`` (Prometheus text), ``/snapshot``,
``/embeddings/{key}`` and ``/similar/{key}?k=10[&side=rows|columns]``. Each
request reads the current :class:`~streamfact.service.snapshots.Snapshot` once,
so a response never mixes two versions.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from streamfact.service.snapshots import Snapshot

__all__ = ["ApiServer"]

MAX_K = 1000


class ApiServer:
    """Serves the API on ``host:port`` in a background thread.

    ``current()`` returns the snapshot to answer from (or None before the
    first one), ``health()`` a JSON-able status dict, ``metrics()`` the
    Prometheus exposition bytes.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        current: Callable[[], Snapshot | None],
        health: Callable[[], dict[str, Any]],
        metrics: Callable[[], bytes],
    ) -> None:
        api = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "streamfact"

            def log_message(self, format: str, *args: Any) -> None:  # quiet by default
                return

            def do_GET(self) -> None:
                api._dispatch(self)

        self.current, self.health, self.metrics = current, health, metrics
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="streamfact-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- routing ----------------------------------------------------------------
    def _dispatch(self, req: BaseHTTPRequestHandler) -> None:
        url = urlsplit(req.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        query = parse_qs(url.query)
        try:
            if parts == ["healthz"]:
                return _json(req, HTTPStatus.OK, self.health())
            if parts == ["metrics"]:
                return _send(
                    req, HTTPStatus.OK, self.metrics(), "text/plain; version=0.0.4; charset=utf-8"
                )
            snap = self.current()
            if parts == ["snapshot"]:
                if snap is None:
                    return _error(req, HTTPStatus.SERVICE_UNAVAILABLE, "no snapshot published yet")
                return _json(req, HTTPStatus.OK, snap.meta())
            if len(parts) == 2 and parts[0] in ("embeddings", "similar"):
                if snap is None:
                    return _error(req, HTTPStatus.SERVICE_UNAVAILABLE, "no snapshot published yet")
                if parts[0] == "embeddings":
                    return self._embedding(req, snap, parts[1])
                return self._similar(req, snap, parts[1], query)
            return _error(req, HTTPStatus.NOT_FOUND, f"no such endpoint: {url.path}")
        except BrokenPipeError:
            return None

    def _embedding(self, req: BaseHTTPRequestHandler, snap: Snapshot, key: str) -> None:
        found = snap.embedding(key)
        if not found:
            return _error(req, HTTPStatus.NOT_FOUND, f"unknown key {key!r}")
        return _json(req, HTTPStatus.OK, {"key": key, "version": snap.version, **found})

    def _similar(
        self, req: BaseHTTPRequestHandler, snap: Snapshot, key: str, query: dict[str, list[str]]
    ) -> None:
        try:
            k = int(query.get("k", ["10"])[0])
        except ValueError:
            return _error(req, HTTPStatus.BAD_REQUEST, "k must be an integer")
        if not 1 <= k <= MAX_K:
            return _error(req, HTTPStatus.BAD_REQUEST, f"k must be between 1 and {MAX_K}")
        side = query.get("side", [None])[0]
        if side not in (None, "rows", "columns"):
            return _error(req, HTTPStatus.BAD_REQUEST, "side must be rows or columns")
        result = snap.similar(key, k, side)
        if result is None:
            return _error(req, HTTPStatus.NOT_FOUND, f"unknown key {key!r}")
        neighbours = [{"key": nk, "score": score} for nk, score in result]
        return _json(
            req, HTTPStatus.OK, {"key": key, "version": snap.version, "neighbours": neighbours}
        )


def _send(req: BaseHTTPRequestHandler, status: HTTPStatus, body: bytes, ctype: str) -> None:
    req.send_response(status)
    req.send_header("Content-Type", ctype)
    req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    req.wfile.write(body)


def _json(req: BaseHTTPRequestHandler, status: HTTPStatus, payload: Any) -> None:
    _send(req, status, json.dumps(payload).encode(), "application/json")


def _error(req: BaseHTTPRequestHandler, status: HTTPStatus, message: str) -> None:
    _json(req, status, {"error": message, "status": int(status)})
