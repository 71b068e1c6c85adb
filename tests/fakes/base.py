"""The HTTP server the fakes of the outside world (Telegram, YooKassa, Fal) share.

A fake subclasses ``FakeServer`` and implements ``handle(request) -> Response`` with Werkzeug's
``Request``/``Response``. ``start()`` serves it on 127.0.0.1 (port 0: a free one) with Werkzeug's
threaded server (``werkzeug.serving.ThreadedWSGIServer``, one thread per connection); ``stop()``
wakes waiters, stops accepting, closes open connections and joins the serving threads.

Werkzeug's own ``WSGIRequestHandler.run_wsgi`` answers ``Connection: close`` on every request;
the SDKs under test keep connections alive (requests/httpx pools), so ``_Handler.run_wsgi`` calls
the same WSGI app and writes the answer with a ``Content-Length`` and without that header:
HTTP/1.1 keep-alive as a real API server does. TCP_NODELAY is set because headers and body are two
writes, which would otherwise meet the client's delayed ACK (~40 ms per answer on keep-alive).

Faults shared by the fakes: ``DropConnection`` (close the socket without an answer: the client sees
a lost response), ``hang()`` (hold the answer until ``seconds`` pass or the fake stops, then drop)
and ``nginx_page()`` (the HTML error page of an ingress proxy).
"""
from __future__ import annotations

import json
import socket
import threading
import time
import traceback
from typing import Self

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler
from werkzeug.wrappers import Request, Response

NGINX_REASONS = {429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
                 503: "Service Temporarily Unavailable", 504: "Gateway Time-out"}


class DropConnection(Exception):
    """Raised by ``handle``: the connection is closed without any answer."""


def nginx_page(code: int) -> Response:
    reason = NGINX_REASONS.get(code, "Error")
    page = ("<html>\r\n<head><title>%d %s</title></head>\r\n<body>\r\n<center><h1>%d %s</h1></center>\r\n"
            "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n" % (code, reason, code, reason))
    return Response(page, code, content_type="text/html")


def json_response(obj, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False), status, headers, content_type="application/json")


class _Handler(WSGIRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120                  # an idle keep-alive connection is closed after this

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def run_wsgi(self) -> None:
        fake = self.server.fake
        with fake._cond:
            fake._inflight += 1
        try:
            self._answer(self.make_environ())
        finally:
            with fake._cond:
                fake._inflight -= 1
                fake._cond.notify_all()

    def _answer(self, environ) -> None:
        started = []
        try:
            body = b"".join(self.server.app(environ, lambda status, headers, exc_info=None:
                                            started.extend((status, headers))))
        except DropConnection:
            self.close_connection = True
            return
        code, _, reason = started[0].partition(" ")
        self.send_response(int(code), reason)
        for name, value in started[1]:
            if name.lower() not in ("content-length", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_request(self, *args) -> None:
        pass

    def log_error(self, *args) -> None:
        pass


class _Server(ThreadedWSGIServer):
    """Werkzeug's threaded server, remembering each open connection and its thread so that ``stop``
    can close and join them (socketserver does not join daemon threads)."""

    def process_request(self, request, client_address):
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name="%s-connection" % self.fake.name, daemon=True)
        with self.fake._lock:
            self.fake._connections[request] = thread
        thread.start()

    def shutdown_request(self, request):
        with self.fake._lock:
            self.fake._connections.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        pass               # a client hung up, or stop() closed the socket


class FakeServer:
    """Base of the fakes: lifecycle, ``url``, a lock + condition, ``wait_until`` and a request log.

    ``requests_log`` holds ``{"method", "path", "query", "headers", "body", "status"}`` for every
    request but ``/_test`` controls (``status`` is ``"dropped"`` when no answer was sent); a fake sets
    ``log_requests = False`` to keep none. Every answered request notifies the condition.
    """

    name = "fake"
    log_requests = True

    def __init__(self, port: int = 0):
        self._port = port
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: dict = {}           # socket -> the thread serving it
        self._inflight = 0                     # requests being answered
        self.requests_log: list[dict] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        if self._server is None:
            self._stopping.clear()
            self._server = _Server("127.0.0.1", self._port, self, _Handler)
            self._server.fake = self
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                            name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Wake waiting requests, stop accepting, let answers in progress finish (≤ 2 s), close the
        open connections and join their threads."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        server.shutdown()          # serve_forever returns and closes the listening socket
        with self._cond:           # let the answers being written (woken long polls too) go out
            self._cond.wait_for(lambda: self._inflight == 0, timeout=2)
            connections = list(self._connections.items())
        for conn, _ in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, thread in connections:
            thread.join(timeout=10)
        self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        if self._server is None:
            raise RuntimeError("%s is not started" % type(self).__name__)
        return "http://127.0.0.1:%d" % self._server.server_port

    # ------------------------------------------------------------------ helpers for fakes and tests

    def wait_until(self, predicate, timeout: float = 5.0):
        """Return ``predicate()`` once truthy, or raise TimeoutError. It is re-checked on every
        request and at least every 50 ms (for conditions that change with time, e.g. a Fal run)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (value := predicate()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("%s: condition not met within %ss" % (type(self).__name__, timeout))
                self._cond.wait(min(remaining, 0.05))
        return value

    def hang(self, seconds: float):
        """Hold the answer ``seconds`` (released at once by ``stop``), then drop the connection."""
        self._stopping.wait(seconds)
        raise DropConnection

    def pause(self, seconds: float) -> None:
        """Sleep ``seconds`` in a background thread of the fake, ending early on ``stop``."""
        self._stopping.wait(seconds)

    # ------------------------------------------------------------------ WSGI

    def handle(self, request: Request) -> Response:
        raise NotImplementedError

    def __call__(self, environ, start_response):
        request = Request(environ)
        body = request.get_data()          # read it all: the connection stays usable (keep-alive)
        entry = None
        if self.log_requests and not request.path.startswith("/_test"):
            try:
                logged = json.loads(body) if body else None
            except ValueError:
                logged = body.decode("utf-8", "replace")
            entry = {"method": request.method, "path": request.path, "query": request.args.to_dict(),
                     "headers": dict(request.headers.items()), "body": logged, "status": None,
                     "time": time.time()}
            with self._cond:
                self.requests_log.append(entry)
                self._cond.notify_all()
        status = "dropped"
        try:
            response = self.handle(request)
        except DropConnection:
            raise
        except Exception:  # noqa: BLE001 - a bug in a fake is a 500 with its traceback, not a hang
            traceback.print_exc()
            status = 500
            response = Response("%s error:\n%s" % (type(self).__name__, traceback.format_exc()), 500)
        else:
            status = response.status_code
        finally:
            with self._cond:
                if entry is not None:
                    entry["status"] = status
                self._cond.notify_all()
        return response(environ, start_response)
