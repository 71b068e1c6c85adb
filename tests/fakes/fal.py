"""A local fake of the Fal.ai queue API, spoken to by the real ``fal-client`` (1.0.3).

Point fal-client at it by monkeypatching the queue base URL (this is what the app does with
``FAL_QUEUE_URL``)::

    fake = FakeFal(key="test-fal-key").start()
    fal_client.client.QUEUE_URL_FORMAT = fake.url + "/"
    client = fal_client.SyncClient(key="test-fal-key")
    client.subscribe("fal-ai/nano-banana", {"prompt": "cat"}, interval=0.02)

or use the ``fake_fal`` pytest fixture defined at the bottom of this module (tests/conftest.py
registers this module as a pytest plugin, so the fixture is available to every test).

The server is stdlib-only (``http.server.ThreadingHTTPServer`` on 127.0.0.1, port 0, HTTP/1.1
keep-alive); Pillow is used to decode input images and to render result images.

What is faithful (checked against ``fal_client/client.py`` 1.0.3 and the fal docs)
----------------------------------------------------------------------------------
* Submit: ``POST /{owner}/{alias}[/{sub/path}]`` with a JSON body and ``Authorization: Key <key>``
  (missing or wrong key: 401 ``{"detail": ...}``). The answer carries ``request_id``,
  ``response_url``, ``status_url``, ``cancel_url`` (pointing back at the fake, *without* the
  sub-path: ``/fal-ai/nano-banana/requests/<id>``), ``status: IN_QUEUE``, ``queue_position``,
  ``logs: null``, ``metrics: {}``. ``?fal_webhook=`` is recorded (never called).
  The ``workflows/`` and ``comfy/`` namespaces are understood (``/workflows/o/a/requests/<id>``).
* ``SyncClient.status/result/cancel/get_handle`` rebuild
  ``{QUEUE_URL_FORMAT}{owner}/{alias}/requests/{id}`` themselves, so the same paths serve both a
  live handle and a resume with a fresh client. A request id looked up under another
  owner/alias is 404.
* Status ``GET .../requests/{id}/status?logs=true|false``: ``IN_QUEUE`` + ``queue_position``,
  ``IN_PROGRESS`` (``logs`` key always present, a list when ``logs=true`` else null), ``COMPLETED``
  with ``logs``, ``metrics`` and ``error``/``error_type`` when the run failed. 202 while pending,
  200 when completed.
* Result ``GET .../requests/{id}``: the model JSON (200) or, for a failed run, the error the
  way fal reports it, which ``fal_client._raise_for_status`` turns into ``FalClientHTTPError``:

  - model errors (validation, content policy, missing fields, undecodable input images):
    422 ``{"detail": [{"loc", "msg", "type", ...}]}`` + ``X-Fal-Retryable: false``
    -> ``exc.status_code == 422``, ``exc.message`` is the *list* (the category is in its
    ``type``), ``exc.error_type is None`` here (no ``X-Fal-Error-Type`` on model errors);
  - infra errors: e.g. 500 ``{"detail": "Internal error", "error_type": "runner_server_error"}``
    + ``X-Fal-Error-Type`` -> ``exc.error_type == "runner_server_error"``.

  Every per-request answer carries ``X-Fal-Request-Id`` (so fal-client never mistakes a 502/503/504
  from a run for an nginx ingress error and retries it).
* Cancel ``PUT .../requests/{id}/cancel``: 202 ``{"status": "CANCELLATION_REQUESTED"}``;
  400 ``{"status": "ALREADY_COMPLETED"}``; 404 ``{"status": "NOT_FOUND"}``.
* Client-side retries (``_maybe_retry_request``: transport errors, 408/409/429, and 502/503/504
  *without* ``x-fal-request-id`` whose body contains "nginx") apply to the submit POST, which is
  what ``submit_lost`` / ``submit_error`` exercise. ``submit_error`` with 502/503/504 answers an
  nginx HTML page by default (retried, like a real ingress hiccup); pass ``ingress=False`` for a
  JSON body, which fal-client does not retry.
* Result shapes (notes B5): ``fal-ai/nano-banana[/edit]`` (any ``*/nano-banana*``) ->
  ``{"images": [Image...], "description": ""}`` (``num_images`` 1-4, default 1; ``seed`` echoed
  when given); everything else -> ``{"image": Image, "seed": N}``.
  ``Image = {url, content_type: "image/png", file_name, file_size, width, height}``.
  Required inputs are checked like the model schemas (``prompt``; ``image_urls`` for edit;
  ``base_image_url``/``swap_image_url`` for face-swap; ``image_url`` for esrgan/retoucher/
  clarity-upscaler) and fail the run with 422 ``type: "missing"``.

What is simplified / invented
-----------------------------
* Input validation and all run failures are reported when the run completes (the submit is
  accepted, and would be billed, then the result URL answers the error, as with fal's queue).
  Exception: the *test guard* below.
* Test guard: an http(s) URL containing ``/file/bot`` anywhere in the arguments (a Telegram file
  URL carries the bot token) is rejected at submit time with 422
  (``type: "telegram_file_url_leak"``), no job is created, and it is recorded in
  ``fake.token_leaks`` / ``fake.rejected``. Real fal would happily download it.
* Other http(s) input URLs are not downloaded; they are recorded as-is (size unknown).
  Data URIs (``data:image/png;base64,...``) are decoded with Pillow; an undecodable one fails
  the run with 422 ``image_load_error``.
* Time: runs progress by wall clock measured at poll time (the server never sleeps). Queue
  positions of the ``queue`` script decrease per status poll.
* The status of a cancelled request becomes COMPLETED with ``error_type: "client_cancelled"``
  and its result is 499 ``{"detail": "Request cancelled by client", "error_type":
  "client_cancelled"}`` (shape from the fal request-error table; exact real behaviour unverified).
  A result fetched before completion answers 400 ``{"detail": "Request is still in progress"}``.
  This also ends fal-client's orphan thread: after ``subscribe(client_timeout=...)`` raises
  ``FalClientTimeoutError`` (it cancels first), its executor thread keeps polling until it sees
  COMPLETED. Note fal-client 1.0.3 refuses ``client_timeout <= 1`` (it becomes the
  ``X-Fal-Request-Timeout`` start timeout, which must be > 1 s).
* ``error``/``error_type`` in a failed COMPLETED status: infra errors carry their ``detail`` and
  ``error_type``; model errors carry the first ``msg`` and ``type`` (approximation).
* Result images are always PNG (``output_format`` ignored), served from
  ``GET /files/<name>.png`` on the fake itself (no auth), rendered with Pillow: a colour gradient
  with the prompt and size drawn on it, the configured size (default 512x512); upscalers
  (``fal-ai/esrgan`` ``scale``, ``fal-ai/clarity-upscaler`` ``upscale_factor``, default 2)
  multiply the size of a decoded input image. ``big_result`` renders big images (noise when a
  byte size is targeted). Rendering is lazy and cached.
* No uploads (``rest.fal.ai`` / CDN), no ``run()`` (``fal.run``), no streaming/realtime, no
  server-side retries.

Scripting behaviours
--------------------
Each submit takes the first queued script entry whose ``endpoint`` is unset or equal to the
submitted app path (e.g. ``"fal-ai/nano-banana/edit"``); with none it uses the default for that
endpoint, then the global default (``set_default``), initially ``"ok"``. Kinds and options:

================ ===========================================================================
``ok``           success. Every kind takes ``seconds`` (total run time, split evenly between
                 IN_QUEUE and IN_PROGRESS), or ``queue_seconds``/``run_seconds``; without them
                 ``fake.latency`` (default 0) is used.
``latency``      ``ok`` with ``seconds`` (default 1.0).
``queue``        ``position=N`` (default 3): the submit reports N, each status poll one less
                 (N-1 ... 0), then the run continues by time.
``validation``   422 list detail; options ``detail`` (full list) or ``loc``/``msg``/``type``.
``policy``       422 ``content_policy_violation`` (``msg`` mentions the content policy).
``error500``     500 ``runner_server_error``; ``status``/``error_type``/``detail`` to imitate
                 other infra errors (e.g. ``status=504, error_type="request_timeout"``).
``hang``         stays IN_PROGRESS until cancelled (a client timeout must fire).
``submit_lost``  the job is created and recorded, the submit connection is closed without an
                 answer (once per entry); fal-client re-POSTs, which takes the next behaviour.
``submit_error`` the submit answers ``status`` (default 503) ``times`` times (default 1) before
                 the entry is used up; no job is created. ``ingress`` (default: True for
                 502/503/504) chooses the nginx HTML body; otherwise ``{"detail": ...}``.
``big_result``   success with ``width``/``height`` (default 6000x6000) or ``bytes`` (a noise
                 PNG of at least that many bytes).
================ ===========================================================================

HTTP control endpoints (for a demo script in another process; no auth, not in ``requests_log``)
----------------------------------------------------------------------------------------------
* ``POST /_test/script``   body ``{"kind": "...", ...options}``      -> ``fake.script(...)``
* ``POST /_test/default``  body ``{"kind": "...", ...options}``      -> ``fake.set_default(...)``
* ``POST /_test/latency``  body ``{"seconds": 1.5}``                 -> ``fake.latency = 1.5``
* ``POST /_test/reset``                                               -> ``fake.reset()``
* ``GET  /_test/state``    -> ``{"submissions", "requests_log", "cancelled", "rejected",
  "token_leaks", "scripts", "latency"}``
* ``GET  /_test/wait_for_submissions?n=2&timeout=5`` -> ``{"submissions": [...]}`` or 408.

Run standalone: ``python -m tests.fakes.fal --port 8765 --key test-fal-key [--latency 2]``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import copy
import datetime as _dt
import hashlib
import io
import json
import math
import os
import random
import re
import socket
import textwrap
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qs, unquote_to_bytes, urlsplit

__all__ = ["KINDS", "FakeFal", "fake_fal"]

KINDS = (
    "ok", "latency", "queue", "validation", "policy", "error500", "hang",
    "submit_lost", "submit_error", "big_result",
)
_NAMESPACES = ("workflows", "comfy")
_DEFAULT_SIZE = (512, 512)
# endpoint -> argument holding the scale factor (default 2)
_UPSCALERS = {"fal-ai/esrgan": "scale", "fal-ai/clarity-upscaler": "upscale_factor"}
# endpoint -> required arguments (model schemas, notes B5)
_REQUIRED = {
    "fal-ai/nano-banana": ("prompt",),
    "fal-ai/nano-banana/edit": ("prompt", "image_urls"),
    "fal-ai/nano-banana-pro": ("prompt",),
    "fal-ai/nano-banana-pro/edit": ("prompt", "image_urls"),
    "fal-ai/nano-banana-2/edit": ("prompt", "image_urls"),
    "fal-ai/face-swap": ("base_image_url", "swap_image_url"),
    "fal-ai/retoucher": ("image_url",),
    "fal-ai/esrgan": ("image_url",),
    "fal-ai/clarity-upscaler": ("image_url",),
}
_DATA_URI = re.compile(r"^data:([^,;]*)((?:;[^,;]*)*),(.*)$", re.DOTALL)
_NGINX_PAGE = (
    "<html>\r\n<head><title>{code} {reason}</title></head>\r\n<body>\r\n"
    "<center><h1>{code} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
_DROP = object()  # handler result: close the socket without answering


def _now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat()


def _is_telegram_file_url(value: str) -> bool:
    low = value.lower()
    return low.startswith(("http://", "https://")) and "/file/bot" in low


def _decode_data_uri(value: str) -> dict:
    """Decode a data URI; return the summary recorded in place of the argument."""
    match = _DATA_URI.match(value)
    if not match:
        return {"data_uri": True, "bytes": 0, "error": "malformed data URI"}
    mime, params, payload = match.groups()
    try:
        if ";base64" in params.lower():
            raw = base64.b64decode(payload, validate=False)
        else:
            raw = unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        return {"data_uri": True, "bytes": 0, "content_type": mime, "error": f"bad base64: {exc}"}
    summary = {"data_uri": True, "bytes": len(raw), "content_type": mime or None}
    try:
        from PIL import Image

        with Image.open(io.BytesIO(raw)) as img:
            summary["format"] = img.format
            summary["size"] = [img.width, img.height]
            img.verify()
    except Exception as exc:  # noqa: BLE001 - any decoding failure is an invalid image
        summary.pop("format", None)
        summary.pop("size", None)
        summary["error"] = f"not a decodable image: {type(exc).__name__}"
    return summary


def _scan_arguments(value, path: str, inputs: list, leaks: list):
    """Return a copy of ``value`` with data URIs replaced by summaries; collect inputs/leaks."""
    if isinstance(value, dict):
        return {k: _scan_arguments(v, f"{path}.{k}" if path else str(k), inputs, leaks)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_scan_arguments(v, f"{path}[{i}]", inputs, leaks) for i, v in enumerate(value)]
    if isinstance(value, str):
        if value.startswith("data:"):
            summary = _decode_data_uri(value)
            inputs.append(dict(summary, field=path))
            return summary
        if _is_telegram_file_url(value):
            leaks.append((path, value))
        elif value.lower().startswith(("http://", "https://")):
            inputs.append({"url": value, "field": path})
    return value


def _loc(path: str) -> list:
    """``"image_urls[0]"`` -> ``["body", "image_urls", 0]``."""
    loc = ["body"]
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        loc.append(int(part[1:-1]) if part.startswith("[") else part)
    return loc


def _render_png(spec: dict) -> bytes:
    """Render the PNG for a result file spec (deterministic for a given spec)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = spec["width"], spec["height"]
    buf = io.BytesIO()
    if spec.get("noise"):
        rng = random.Random(spec["name"])
        img = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
        img.save(buf, "PNG", compress_level=0)
        return buf.getvalue()
    digest = hashlib.sha256(spec["name"].encode()).digest()
    c1, c2 = tuple(digest[0:3]), tuple(digest[3:6])
    small = Image.new("RGB", (8, 8))
    for x in range(8):
        for y in range(8):
            t = (x + y) / 14.0
            small.putpixel((x, y), tuple(int(a + (b - a) * t) for a, b in zip(c1, c2, strict=True)))
    img = small.resize((width, height), Image.BILINEAR)
    if width >= 32 and height >= 16:
        size = max(10, min(48, min(width, height) // 16))
        try:  # a Cyrillic-capable font (the prompts are Russian); Pillow's default has no Cyrillic
            import font_roboto
            font = ImageFont.truetype(os.path.join(os.path.dirname(font_roboto.__file__), "files",
                                                   "Roboto-Regular.ttf"), size)
        except (ImportError, OSError):
            font = ImageFont.load_default(size=size)
        prompt = spec.get('text') or 'FakeFal'
        text = "\n".join(textwrap.wrap(prompt[:120], 28)[:4]) + f"\n{width}x{height}"
        draw = ImageDraw.Draw(img)
        draw.multiline_text((8, 8), text, fill=(255, 255, 255), font=font,
                            stroke_width=1, stroke_fill=(0, 0, 0))
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


class _Job:
    """One accepted submission (internal)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeFal/1.0"
    timeout = 60

    def log_message(self, format, *args):
        pass

    def setup(self):
        super().setup()
        # Nagle off: headers and body are two writes; avoid 40 ms delayed-ACK stalls per answer
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.fake._track(self.connection, add=True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, add=False)

    def do_GET(self):
        self.server.fake._dispatch(self)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET


class FakeFal:
    """Local fake of the Fal queue API. See the module docstring for the protocol and scripts."""

    def __init__(self, key: str | None = "test-fal-key", *, image_size=_DEFAULT_SIZE, port: int = 0):
        """``key``: the accepted API key (``None`` disables the auth check).
        ``image_size``: (width, height) of generated images. ``port``: 0 picks a free port."""
        self.key = key
        self.image_size = tuple(image_size)
        self.latency = 0.0
        self._port = port
        self._cond = threading.Condition(threading.RLock())
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set = set()
        self._inflight = 0
        self._url = ""
        self._render_lock = threading.Lock()
        self._init_state()

    def _init_state(self):
        self._scripts: list[dict] = []
        self._defaults: dict = {}
        self._jobs: dict[str, _Job] = {}
        self._order: list[str] = []
        self._log: list[dict] = []
        self._cancelled: list[str] = []
        self._rejected: list[dict] = []
        self._files: dict[str, dict] = {}
        self._file_bytes: dict[str, bytes] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeFal:
        """Start serving on 127.0.0.1 in a daemon thread; returns self."""
        if self._server is not None:
            return self
        self._server = _Server(("127.0.0.1", self._port), _Handler)
        self._server.fake = self
        self._url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01},
            name="FakeFal", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the server and close open keep-alive connections."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # no new connections
        with self._cond:  # let answers being written finish (bounded)
            self._cond.wait_for(lambda: self._inflight == 0, timeout=2.0)
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321`` (no trailing slash)."""
        if not self._url:
            raise RuntimeError("FakeFal is not started")
        return self._url

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self.url.rsplit(":", 1)[1])

    # ------------------------------------------------------------------ controls

    @staticmethod
    def _behaviour(kind: str, options: dict) -> dict:
        if kind not in KINDS:
            raise ValueError(f"unknown FakeFal kind {kind!r} (known: {', '.join(KINDS)})")
        options = dict(options)
        endpoint = options.pop("endpoint", None)
        remaining = int(options.get("times", 1)) if kind == "submit_error" else 1
        return {"kind": kind, "options": options, "endpoint": endpoint, "remaining": remaining}

    def script(self, kind: str, **options) -> None:
        """Queue ``kind`` for the next submit (FIFO); ``endpoint=`` restricts it to that app path.
        Kinds/options: see the module docstring."""
        beh = self._behaviour(kind, options)
        with self._cond:
            self._scripts.append(beh)

    def set_default(self, kind: str, **options) -> None:
        """Behaviour for submits that match no script entry (``endpoint=`` sets a per-app default)."""
        beh = self._behaviour(kind, options)
        with self._cond:
            self._defaults[beh["endpoint"]] = beh

    def reset(self) -> None:
        """Forget all jobs, logs, scripts and defaults; ``latency`` back to 0. Keeps serving."""
        with self._cond:
            self._init_state()
            self.latency = 0.0
            self._cond.notify_all()

    # ------------------------------------------------------------------ observation

    @property
    def submissions(self) -> list[dict]:
        """Accepted submissions in order (copies): ``request_id, app, arguments`` (data URIs
        replaced by ``{"data_uri": True, "bytes", "format", "size", ...}``), ``inputs``,
        ``headers`` (lowercase names), ``kind``, ``options``, ``status`` (current),
        ``created`` (epoch seconds), ``response_dropped``, ``cancelled``, ``webhook_url``."""
        with self._cond:
            now = time.monotonic()
            out = []
            for rid in self._order:
                job = self._jobs[rid]
                rec = copy.deepcopy(job.record)
                rec["status"] = "CANCELLED" if job.cancelled else self._phase(job, now, False)[0]
                rec["cancelled"] = job.cancelled
                out.append(rec)
            return out

    def submission(self, request_id: str) -> dict:
        """The ``submissions`` record of one request id (KeyError if unknown)."""
        for rec in self.submissions:
            if rec["request_id"] == request_id:
                return rec
        raise KeyError(request_id)

    @property
    def requests_log(self) -> list[dict]:
        """Every protocol HTTP request answered (not ``/_test/``): ``method, path, query,
        status`` (int, or ``"dropped"``), ``time``."""
        with self._cond:
            return [dict(e) for e in self._log]

    @property
    def cancelled(self) -> list[str]:
        """Request ids that received an accepted cancel, in order."""
        with self._cond:
            return list(self._cancelled)

    @property
    def rejected(self) -> list[dict]:
        """Submits refused before creating a job (``app``, ``reason``, ``fields``)."""
        with self._cond:
            return copy.deepcopy(self._rejected)

    @property
    def token_leaks(self) -> list[str]:
        """Telegram file URLs (``/file/bot<token>/``) that were sent to the fake."""
        with self._cond:
            return [url for r in self._rejected for _, url in r.get("leaks", [])]

    def wait_until(self, predicate, timeout: float = 5.0):
        """Block until ``predicate()`` is truthy (re-checked whenever the fake handles a request);
        returns its value or raises ``TimeoutError``. The predicate may use this object's
        properties."""
        with self._cond:
            value = self._cond.wait_for(predicate, timeout)
        if not value:
            raise TimeoutError(f"FakeFal: condition not met within {timeout}s")
        return value

    def wait_for_submissions(self, n: int, timeout: float = 5.0) -> list[dict]:
        """Block until at least ``n`` submissions exist; returns ``submissions`` or raises
        ``TimeoutError``."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._order) >= n, timeout):
                raise TimeoutError(
                    f"FakeFal: {len(self._order)} submissions after {timeout}s, wanted {n}")
            return self.submissions

    # ------------------------------------------------------------------ internals: HTTP

    def _track(self, conn, add: bool) -> None:
        with self._cond:
            (self._conns.add if add else self._conns.discard)(conn)

    def _dispatch(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        split = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        parts = [p for p in split.path.split("/") if p]
        control = parts[:1] == ["_test"]
        with self._cond:
            self._inflight += 1
        try:
            try:
                if control:
                    answer = self._control(h.command, parts[1:], query, body)
                else:
                    answer = self._route(h, parts, query, body)
            except Exception as exc:  # noqa: BLE001 - a fake bug must not kill the connection
                answer = (500, {"detail": f"FakeFal internal error: {exc!r}"}, {})
            status = "dropped" if answer is _DROP else answer[0]
            if not control:
                # logged before answering, so a client that has its answer always finds it here
                with self._cond:
                    self._log.append({"method": h.command, "path": split.path,
                                      "query": split.query, "status": status, "time": time.time()})
                    self._cond.notify_all()
            if answer is _DROP:
                h.close_connection = True
            else:
                self._send(h, *answer)
        finally:
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()

    @staticmethod
    def _send(h, status: int, payload, headers: dict) -> None:
        headers = dict(headers)
        if isinstance(payload, (bytes, bytearray)):
            data = bytes(payload)
            headers.setdefault("Content-Type", "application/octet-stream")
        elif isinstance(payload, str):
            data = payload.encode()
            headers.setdefault("Content-Type", "text/html")
        else:
            data = json.dumps(payload).encode()
            headers.setdefault("Content-Type", "application/json")
        h.send_response(status)
        for name, value in headers.items():
            h.send_header(name, str(value))
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _authorized(self, h) -> bool:
        return self.key is None or h.headers.get("Authorization") == f"Key {self.key}"

    def _route(self, h, parts, query, body):
        method = h.command
        if parts[:1] == ["files"] and len(parts) == 2:
            if method != "GET":
                return 405, {"detail": "Method Not Allowed"}, {}
            return self._serve_file(parts[1])
        n = 3 if parts[:1] and parts[0] in _NAMESPACES else 2
        if len(parts) < n:
            return 404, {"detail": "Not Found"}, {}
        base, rest = "/".join(parts[:n]), parts[n:]
        if not self._authorized(h):
            detail = "Missing authorization header" if not h.headers.get("Authorization") \
                else "Invalid API key"
            return 401, {"detail": detail}, {}
        if rest[:1] == ["requests"] and len(rest) in (2, 3):
            op = rest[2] if len(rest) == 3 else None
            if op is None and method == "GET":
                return self._result(base, rest[1])
            if op == "status" and method == "GET":
                return self._status(base, rest[1], query.get("logs", "false").lower() == "true")
            if op == "cancel" and method == "PUT":
                return self._cancel(base, rest[1])
            if op in (None, "status", "cancel"):
                return 405, {"detail": "Method Not Allowed"}, {}
            return 404, {"detail": "Not Found"}, {}
        if method != "POST":
            return 405, {"detail": "Method Not Allowed"}, {}
        return self._submit(h, "/".join(parts), base, query, body)

    def _control(self, method, parts, query, body):
        name = parts[0] if parts else ""
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            return 400, {"detail": "invalid JSON"}, {}
        try:
            if method == "POST" and name == "script":
                self.script(data.pop("kind"), **data)
            elif method == "POST" and name == "default":
                self.set_default(data.pop("kind"), **data)
            elif method == "POST" and name == "latency":
                self.latency = float(data.get("seconds", 0))
            elif method == "POST" and name == "reset":
                self.reset()
            elif method == "GET" and name == "state":
                with self._cond:
                    scripts = copy.deepcopy(self._scripts)
                return 200, {"submissions": self.submissions, "requests_log": self.requests_log,
                             "cancelled": self.cancelled, "rejected": self.rejected,
                             "token_leaks": self.token_leaks, "scripts": scripts,
                             "latency": self.latency}, {}
            elif method == "GET" and name == "wait_for_submissions":
                try:
                    subs = self.wait_for_submissions(int(query.get("n", 1)),
                                                     float(query.get("timeout", 5)))
                except TimeoutError as exc:
                    return 408, {"detail": str(exc)}, {}
                return 200, {"submissions": subs}, {}
            else:
                return 404, {"detail": "unknown control endpoint"}, {}
        except (KeyError, TypeError, ValueError) as exc:
            return 400, {"detail": f"bad control request: {exc!r}"}, {}
        return 200, {"ok": True}, {}

    # ------------------------------------------------------------------ internals: queue

    def _take_behaviour(self, app: str) -> dict:
        """Pick the behaviour for a submit of ``app`` (caller holds the lock)."""
        for i, beh in enumerate(self._scripts):
            if beh["endpoint"] in (None, app):
                beh["remaining"] -= 1
                if beh["remaining"] <= 0:
                    del self._scripts[i]
                return beh
        return self._defaults.get(app) or self._defaults.get(None) or self._behaviour("ok", {})

    def _urls(self, base: str, rid: str) -> dict:
        root = f"{self.url}/{base}/requests/{rid}"
        return {"response_url": root, "status_url": root + "/status", "cancel_url": root + "/cancel"}

    def _submit(self, h, app, base, query, body):
        try:
            arguments = json.loads(body or b"null")
        except ValueError:
            return 422, {"detail": [{"loc": ["body"], "msg": "JSON decode error",
                                     "type": "json_invalid"}]}, {}
        inputs, leaks = [], []
        summary = _scan_arguments(arguments, "", inputs, leaks)
        if leaks:
            with self._cond:
                self._rejected.append({"app": app, "reason": "telegram_file_url",
                                       "fields": [p for p, _ in leaks], "leaks": leaks,
                                       "time": time.time()})
            detail = [{"loc": _loc(path), "msg": "FakeFal: a Telegram file URL (it contains the "
                       "bot token) was sent to Fal; send a data URI instead",
                       "type": "telegram_file_url_leak"} for path, _ in leaks]
            return 422, {"detail": detail}, {"X-Fal-Retryable": "false"}

        with self._cond:
            beh = self._take_behaviour(app)
            kind, opts = beh["kind"], beh["options"]
            if kind == "submit_error":
                return self._submit_error(opts)
            rid = str(uuid.uuid4())
            seconds = opts.get("seconds", 1.0 if kind == "latency" else self.latency)
            queue_s = float(opts.get("queue_seconds", seconds / 2.0))
            run_s = float(opts.get("run_seconds", seconds - seconds / 2.0))
            position = int(opts.get("position", 3)) if kind == "queue" else None
            record = {
                "request_id": rid, "app": app, "endpoint": base, "arguments": summary,
                "inputs": inputs, "headers": {k.lower(): v for k, v in h.headers.items()},
                "kind": kind, "options": copy.deepcopy(opts), "created": time.time(),
                "response_dropped": kind == "submit_lost", "webhook_url": query.get("fal_webhook"),
            }
            job = _Job(request_id=rid, app=app, base=base, arguments=arguments, inputs=inputs,
                       kind=kind, options=opts, clock=time.monotonic(), queue_left=position,
                       queue_s=queue_s, run_s=run_s, cancelled=False, outcome=None,
                       record=record, seed=None)
            self._jobs[rid] = job
            self._order.append(rid)
            self._cond.notify_all()
            if kind == "submit_lost":
                return _DROP
            payload = dict(request_id=rid, status="IN_QUEUE", queue_position=position or 0,
                           logs=None, metrics={}, **self._urls(base, rid))
            return 200, payload, {"X-Fal-Request-Id": rid}

    @staticmethod
    def _submit_error(opts):
        status = int(opts.get("status", 503))
        reasons = {429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
                   503: "Service Temporarily Unavailable", 504: "Gateway Time-out"}
        if opts.get("ingress", status in (502, 503, 504)):
            page = _NGINX_PAGE.format(code=status, reason=reasons.get(status, "Error"))
            return status, page, {"Content-Type": "text/html"}
        detail = opts.get("detail", f"FakeFal scripted submit error {status}")
        return status, {"detail": detail}, {}

    def _phase(self, job: _Job, now: float, advance: bool):
        """(status, queue_position) of a job; ``advance`` consumes one scripted queue step."""
        if job.cancelled:
            return "COMPLETED", None
        if job.queue_left is not None:
            if not advance:
                return "IN_QUEUE", job.queue_left
            if job.queue_left > 0:
                job.queue_left -= 1
                return "IN_QUEUE", job.queue_left
            job.queue_left = None
            job.clock = now
        elapsed = now - job.clock
        if elapsed < job.queue_s:
            return "IN_QUEUE", 0
        if job.kind == "hang" or elapsed < job.queue_s + job.run_s:
            return "IN_PROGRESS", None
        return "COMPLETED", None

    def _lookup(self, base, rid):
        job = self._jobs.get(rid)
        return job if job is not None and job.base == base else None

    def _status(self, base, rid, with_logs):
        with self._cond:
            job = self._lookup(base, rid)
            if job is None:
                return 404, {"detail": f"Request {rid} not found"}, {}
            state, position = self._phase(job, time.monotonic(), True)
            payload = dict(status=state, request_id=rid, **self._urls(base, rid))
            logs = [{"message": "FakeFal: request queued", "level": "INFO", "source": "user",
                     "timestamp": _now_iso()}]
            if state == "IN_QUEUE":
                payload["queue_position"] = position
                payload["logs"] = None
                return 202, payload, {"X-Fal-Request-Id": rid}
            logs.append({"message": f"FakeFal: running {job.app}", "level": "INFO",
                         "source": "user", "timestamp": _now_iso()})
            if state == "IN_PROGRESS":
                payload["logs"] = logs if with_logs else None
                return 202, payload, {"X-Fal-Request-Id": rid}
            outcome = self._outcome(job)
            payload["logs"] = logs if with_logs else None
            if outcome["error"] is None:
                payload["metrics"] = {"inference_time": round(job.queue_s + job.run_s, 3) or 0.001}
            else:
                err = outcome["error"]
                payload["metrics"] = {}
                payload["error"], payload["error_type"] = err["summary"], err["error_type"]
            return 200, payload, {"X-Fal-Request-Id": rid}

    def _cancel(self, base, rid):
        with self._cond:
            job = self._lookup(base, rid)
            if job is None:
                return 404, {"status": "NOT_FOUND"}, {}
            if not job.cancelled and self._phase(job, time.monotonic(), False)[0] == "COMPLETED":
                return 400, {"status": "ALREADY_COMPLETED"}, {"X-Fal-Request-Id": rid}
            if not job.cancelled:
                job.cancelled = True
                job.outcome = None
                self._cancelled.append(rid)
                self._cond.notify_all()
            return 202, {"status": "CANCELLATION_REQUESTED"}, {"X-Fal-Request-Id": rid}

    def _result(self, base, rid):
        with self._cond:
            job = self._lookup(base, rid)
            if job is None:
                return 404, {"detail": f"Request {rid} not found"}, {}
            if self._phase(job, time.monotonic(), False)[0] != "COMPLETED":
                return 400, {"detail": "Request is still in progress"}, {"X-Fal-Request-Id": rid}
            outcome = self._outcome(job)
        headers = {"X-Fal-Request-Id": rid}
        err = outcome["error"]
        if err is not None:
            headers.update(err["headers"])
            return err["status"], err["body"], headers
        # render outside the lock (big images take a while), then fill file_size once
        result = outcome["result"]
        for image in outcome["images"]:
            if image.get("file_size") is None:
                image["file_size"] = len(self._png(image["file_name"]))
        return 200, result, headers

    # ------------------------------------------------------------------ internals: outcomes

    @staticmethod
    def _model_error(detail: list) -> dict:
        first = detail[0] if detail else {}
        return {"status": 422, "body": {"detail": detail}, "headers": {"X-Fal-Retryable": "false"},
                "summary": first.get("msg", "Unprocessable Entity"), "error_type": first.get("type")}

    def _outcome(self, job: _Job) -> dict:
        """Decide (once) what a completed job returns (caller holds the lock)."""
        if job.outcome is not None:
            return job.outcome
        opts, kind = job.options, job.kind
        error = None
        if job.cancelled:
            error = {"status": 499, "body": {"detail": "Request cancelled by client",
                                             "error_type": "client_cancelled"},
                     "headers": {"X-Fal-Error-Type": "client_cancelled"},
                     "summary": "Request cancelled by client", "error_type": "client_cancelled"}
        elif kind == "error500":
            etype = opts.get("error_type", "runner_server_error")
            detail = opts.get("detail", "Internal error")
            error = {"status": int(opts.get("status", 500)),
                     "body": {"detail": detail, "error_type": etype},
                     "headers": {"X-Fal-Error-Type": etype}, "summary": detail, "error_type": etype}
        elif kind == "policy":
            error = self._model_error([{
                "loc": list(opts.get("loc", ["body", "prompt"])),
                "msg": opts.get("msg", "The request was flagged by the content policy checker "
                                       "and could not be processed (content policy violation)."),
                "type": "content_policy_violation"}])
        elif kind == "validation":
            detail = opts.get("detail") or [{
                "loc": list(opts.get("loc", ["body", "prompt"])),
                "msg": opts.get("msg", "Invalid value (FakeFal scripted validation error)"),
                "type": opts.get("type", "value_error")}]
            error = self._model_error(detail)
        else:
            problems = self._validate_inputs(job)
            if problems:
                error = self._model_error(problems)
        if error is not None:
            job.outcome = {"error": error, "result": None, "images": []}
            return job.outcome
        job.outcome = self._success(job)
        return job.outcome

    def _validate_inputs(self, job: _Job) -> list:
        args = job.arguments if isinstance(job.arguments, dict) else {}
        problems = []
        for name in _REQUIRED.get(job.app, ()):
            if args.get(name) in (None, "", []):
                problems.append({"loc": ["body", name], "msg": "Field required", "type": "missing"})
        num = args.get("num_images", 1)
        if "nano-banana" in job.app and (not isinstance(num, int) or not 1 <= num <= 4):
            problems.append({"loc": ["body", "num_images"], "msg": "Input should be between 1 and 4",
                             "type": "value_error", "input": num})
        for item in job.inputs:
            if item.get("data_uri") and item.get("error"):
                problems.append({"loc": _loc(item["field"]), "msg": "Failed to load the image: {}".format(item["error"]), "type": "image_load_error"})
        return problems

    def _output_size(self, job: _Job):
        opts = job.options
        if job.kind == "big_result":
            if opts.get("bytes"):
                side = max(1, math.ceil(math.sqrt(int(opts["bytes"]) / 3.0)))
                return side, side, True
            return int(opts.get("width", 6000)), int(opts.get("height", 6000)), False
        factor_arg = _UPSCALERS.get(job.app)
        if factor_arg:
            args = job.arguments if isinstance(job.arguments, dict) else {}
            src = next((i for i in job.inputs if i.get("field") == "image_url" and i.get("size")),
                       None)
            if src is not None:
                factor = args.get(factor_arg) or 2
                return (max(1, round(src["size"][0] * factor)),
                        max(1, round(src["size"][1] * factor)), False)
        return self.image_size[0], self.image_size[1], False

    def _success(self, job: _Job) -> dict:
        args = job.arguments if isinstance(job.arguments, dict) else {}
        width, height, noise = self._output_size(job)
        multi = "nano-banana" in job.app
        count = args.get("num_images", 1) if multi else 1
        images = []
        for i in range(count):
            name = f"{job.request_id.replace('-', '')[:16]}-{i}.png"
            self._files[name] = {"name": name, "width": width, "height": height, "noise": noise,
                                 "text": str(args.get("prompt") or job.app)}
            images.append({"url": f"{self.url}/files/{name}", "content_type": "image/png",
                           "file_name": name, "file_size": None, "width": width, "height": height})
        if multi:
            result = {"images": images, "description": ""}
            if "seed" in args:
                result["seed"] = args["seed"]
        else:
            seed = args["seed"] if "seed" in args else random.randint(0, 2**31 - 1)
            result = {"image": images[0], "seed": seed}
        return {"error": None, "result": result, "images": images}

    def _png(self, name: str) -> bytes:
        with self._cond:
            cached = self._file_bytes.get(name)
            spec = self._files.get(name)
        if cached is not None or spec is None:
            return cached
        with self._render_lock:
            with self._cond:
                cached = self._file_bytes.get(name)
            if cached is None:
                cached = _render_png(spec)
                with self._cond:
                    self._file_bytes[name] = cached
        return cached

    def _serve_file(self, name: str):
        data = self._png(name)
        if data is None:
            return 404, {"detail": "File not found"}, {}
        return 200, data, {"Content-Type": "image/png"}


try:  # the fixture is optional so the module also runs as a standalone demo server
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.fixture
    def fake_fal():
        """A started ``FakeFal(key="test-fal-key")`` with ``fal_client.client.QUEUE_URL_FORMAT``
        pointed at it (restored afterwards)."""
        import fal_client.client as fal_client_module

        old = fal_client_module.QUEUE_URL_FORMAT
        with FakeFal(key="test-fal-key") as fake:
            fal_client_module.QUEUE_URL_FORMAT = fake.url + "/"
            try:
                yield fake
            finally:
                fal_client_module.QUEUE_URL_FORMAT = old


def main(argv=None) -> None:
    """Run the fake until interrupted (for demos in another process)."""
    parser = argparse.ArgumentParser(description="Local fake of the Fal queue API")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--key", default=os.environ.get("FAL_KEY", "test-fal-key"))
    parser.add_argument("--latency", type=float, default=0.0)
    ns = parser.parse_args(argv)
    fake = FakeFal(key=ns.key, port=ns.port).start()
    fake.latency = ns.latency
    print(f"FakeFal listening on {fake.url} (FAL_QUEUE_URL={fake.url}, key {ns.key!r})",
          flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
