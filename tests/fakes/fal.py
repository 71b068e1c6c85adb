"""A local fake of the Fal.ai queue API, spoken to by the real ``fal-client`` (1.0.3).

The app points ``fal_client.client.QUEUE_URL_FORMAT`` at ``FAL_QUEUE_URL``; the ``fake_fal``
fixture does it for tests. HTTP: tests/fakes/base.py. Pillow decodes inputs and renders results.

Faithful (checked against ``fal_client/client.py`` 1.0.3 and the fal docs):

* Submit ``POST /{owner}/{alias}[/{sub/path}]`` with JSON and ``Authorization: Key <key>`` (else 401
  ``{"detail"}``) answers ``request_id``, ``response_url``/``status_url``/``cancel_url`` (without the
  sub-path: ``/fal-ai/nano-banana/requests/<id>``), ``status: IN_QUEUE``, ``queue_position``. A request
  id looked up under another owner/alias is 404.
* Status ``GET .../requests/{id}/status``: ``IN_QUEUE`` + ``queue_position`` and ``IN_PROGRESS`` (202),
  ``COMPLETED`` (200, with ``error``/``error_type`` when the run failed).
* Result ``GET .../requests/{id}``: the model JSON, or the error as fal reports it: model errors 422
  ``{"detail": [{"loc", "msg", "type"}]}`` + ``X-Fal-Retryable: false``; infra errors e.g. 500
  ``{"detail", "error_type": "runner_server_error"}`` + ``X-Fal-Error-Type``. Every per-request
  answer carries ``X-Fal-Request-Id`` (so fal-client never retries it as an ingress error).
* Cancel ``PUT .../requests/{id}/cancel``: 202 ``CANCELLATION_REQUESTED``, 400 ``ALREADY_COMPLETED``,
  404 ``NOT_FOUND``; the request then completes with ``error_type: client_cancelled`` and its result is
  499 (shape from fal's error table).
* Results: ``*/nano-banana*`` -> ``{"images": [Image], "description": ""}`` (``num_images`` 1-4, ``seed``
  echoed), others -> ``{"image": Image, "seed": N}``; ``Image = {url, content_type, file_name,
  file_size, width, height}``, a PNG served from ``GET /files/<name>`` on the fake. Size: 512x512, or an
  upscaler's ``scale``/``upscale_factor`` (default 2) times the input image.

Invented, for the tests:

* Test guard: an http(s) URL containing ``/file/bot`` (a Telegram file URL carries the bot token) is
  refused at submit with 422 ``telegram_file_url_leak`` and recorded in ``token_leaks``.
* Data URIs are decoded; ``submissions[i]["arguments"]`` holds ``{"data_uri": True, "bytes",
  "format", "size"}`` in their place and ``inputs`` lists them.
* Time runs by the wall clock at poll time. A result fetched early is 400 ``Request is still in
  progress``.

``script(kind, **options)`` queues the behaviour of the next submit; ``set_default(kind, **options)`` sets
the behaviour of the others (initially ``ok``; not the two submit kinds). Every kind takes
``seconds`` (run time, half queued, half in progress; else ``latency``, default 0):

================ ===========================================================================
``ok``           success.
``latency``      ``ok`` taking ``seconds`` (default 1.0).
``queue``        ``position=N`` (default 3): the submit reports N, each status poll one less.
``validation``   422 list detail (``loc``/``msg``/``type``).
``policy``       422 ``content_policy_violation``.
``error500``     500 ``runner_server_error``.
``hang``         stays IN_PROGRESS until cancelled.
``submit_lost``  the job is created but the submit connection closes unanswered (fal-client re-POSTs).
``submit_error`` the submit answers ``status`` (default 503) ``times`` times (default 1), no job;
                 ``ingress`` (default True for 502/503/504) answers nginx's HTML page, which
                 fal-client retries, else ``{"detail"}``.
``big_result``   success sized ``width`` x ``height`` (default 6000x6000).
================ ===========================================================================
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import random
import threading
import time
import uuid

from werkzeug.wrappers import Request, Response

from tests.fakes.base import DropConnection, FakeServer, json_response, nginx_page

KINDS = ("ok", "latency", "queue", "validation", "policy", "error500", "hang", "submit_lost", "submit_error",
         "big_result")
_UPSCALERS = {"fal-ai/esrgan": "scale", "fal-ai/clarity-upscaler": "upscale_factor"}


def _decode_data_uri(value: str) -> dict:
    """The summary recorded in place of a data URI argument."""
    header, _, payload = value.partition(",")
    summary = {"data_uri": True, "content_type": header[5:].split(";")[0] or None}
    try:
        raw = base64.b64decode(payload)
        summary["bytes"] = len(raw)
        from PIL import Image

        with Image.open(io.BytesIO(raw)) as img:
            summary.update(format=img.format, size=[img.width, img.height])
    except (binascii.Error, ValueError, OSError) as exc:
        summary["error"] = "not a decodable image: %s" % type(exc).__name__
    return summary


def _scan(value, path: str, inputs: list, leaks: list):
    """A copy of ``value`` with data URIs replaced by summaries; collects inputs and token leaks."""
    if isinstance(value, dict):
        return {k: _scan(v, f"{path}.{k}" if path else k, inputs, leaks) for k, v in value.items()}
    if isinstance(value, list):
        return [_scan(v, f"{path}[{i}]", inputs, leaks) for i, v in enumerate(value)]
    if isinstance(value, str) and value.startswith("data:"):
        summary = _decode_data_uri(value)
        inputs.append(dict(summary, field=path))
        return summary
    if isinstance(value, str) and value.lower().startswith(("http://", "https://")) and "/file/bot" in value.lower():
        leaks.append((path, value))
    return value


def _render_png(name: str, width: int, height: int) -> bytes:
    """A gradient in colours derived from ``name`` (deterministic)."""
    from PIL import Image

    digest = hashlib.sha256(name.encode()).digest()
    small = Image.new("RGB", (2, 2))
    small.putdata([tuple(digest[i:i + 3]) for i in (0, 3, 6, 9)])
    buf = io.BytesIO()
    small.resize((width, height), Image.BILINEAR).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _infra_error(status: int, detail: str, error_type: str) -> dict:
    return {"status": status, "body": {"detail": detail, "error_type": error_type},
            "headers": {"X-Fal-Error-Type": error_type}, "summary": detail, "error_type": error_type}


class FakeFal(FakeServer):
    """Local fake of the Fal queue API. See the module docstring."""

    name = "FakeFal"

    def __init__(self, key: str | None = "test-fal-key", *, port: int = 0):
        super().__init__(port)
        self.key = key
        self.latency = 0.0
        self.submissions: list[dict] = []         # see _submit for the fields
        self.cancelled: list[str] = []
        self.token_leaks: list[str] = []
        self._scripts: list[dict] = []
        self._default = {"kind": "ok", "options": {}}
        self._jobs: dict[str, dict] = {}
        self._files: dict[str, tuple] = {}          # name -> (width, height) or PNG bytes
        self._render_lock = threading.Lock()

    def script(self, kind: str, **options) -> None:
        """Queue the behaviour of the next submit (see the module docstring)."""
        if kind not in KINDS:
            raise ValueError(f"unknown FakeFal kind {kind!r} (known: {', '.join(KINDS)})")
        with self._lock:
            self._scripts.append({"kind": kind, "options": options,
                                  "times": int(options.get("times", 1)) if kind == "submit_error" else 1})

    def set_default(self, kind: str, **options) -> None:
        """The behaviour of submits no script entry is queued for (initially ``ok``)."""
        if kind not in KINDS or kind in ("submit_lost", "submit_error"):
            raise ValueError(f"FakeFal: {kind!r} cannot be the default")
        with self._lock:
            self._default = {"kind": kind, "options": options}

    def submission(self, request_id: str) -> dict:
        """The ``submissions`` record of ``request_id`` with its current ``status`` (``IN_QUEUE``,
        ``IN_PROGRESS``, ``COMPLETED``, or ``CANCELLED``); KeyError when unknown."""
        with self._lock:
            job = self._jobs[request_id]
            record = next(s for s in self.submissions if s["request_id"] == request_id)
            return dict(record, status="CANCELLED" if job["cancelled"] else self._phase(job, False)[0])

    def wait_for_submissions(self, n: int, timeout: float = 5.0) -> list[dict]:
        """Wait until at least ``n`` submissions exist; returns them (TimeoutError otherwise)."""
        self.wait_until(lambda: len(self.submissions) >= n, timeout)
        return self.submissions

    # ------------------------------------------------------------------ HTTP

    def handle(self, request: Request) -> Response:
        parts = [p for p in request.path.split("/") if p]
        if parts[:1] == ["files"] and len(parts) == 2 and parts[1] in self._files:
            return Response(self._png(parts[1]), content_type="image/png")
        if len(parts) < 2 or parts[0] == "files":
            return json_response({"detail": "Not Found"}, 404)
        if self.key is not None and request.headers.get("Authorization") != f"Key {self.key}":
            return json_response({"detail": "Invalid API key" if request.headers.get("Authorization")
                                  else "Missing authorization header"}, 401)
        base, rest = "/".join(parts[:2]), parts[2:]
        if rest[:1] == ["requests"] and len(rest) in (2, 3):
            with self._lock:
                job = self._jobs.get(rest[1])
                if job is None or job["base"] != base:
                    return json_response({"detail": f"Request {rest[1]} not found", "status": "NOT_FOUND"}, 404)
                op = (request.method, rest[2] if len(rest) == 3 else "")
                if op == ("GET", "status"):
                    return self._status(job)
                if op == ("PUT", "cancel"):
                    return self._cancel(job)
                if op == ("GET", "") and self._phase(job, False)[0] != "COMPLETED":
                    return json_response({"detail": "Request is still in progress"}, 400,
                                         {"X-Fal-Request-Id": job["request_id"]})
                outcome = self._outcome(job) if op == ("GET", "") else None
            if outcome is not None:
                return self._result(job, outcome)
            return json_response({"detail": "Method Not Allowed"}, 405)
        if request.method != "POST":
            return json_response({"detail": "Method Not Allowed"}, 405)
        return self._submit(request, "/".join(parts), base)

    def _urls(self, base: str, rid: str) -> dict:
        root = f"{self.url}/{base}/requests/{rid}"
        return {"response_url": root, "status_url": root + "/status", "cancel_url": root + "/cancel"}

    def _submit(self, request: Request, app: str, base: str) -> Response:
        try:
            arguments = json.loads(request.get_data() or b"null")
        except ValueError:
            return json_response({"detail": [{"loc": ["body"], "msg": "JSON decode error", "type": "json_invalid"}]}, 422)
        inputs, leaks = [], []
        summary = _scan(arguments, "", inputs, leaks)
        with self._lock:
            if leaks:
                self.token_leaks.extend(url for _, url in leaks)
                return json_response({"detail": [
                    {"loc": ["body", path], "msg": "FakeFal: a Telegram file URL (it contains the bot token) was sent "
                     "to Fal; send a data URI instead", "type": "telegram_file_url_leak"} for path, _ in leaks]},
                    422, {"X-Fal-Retryable": "false"})
            script = self._scripts[0] if self._scripts else dict(self._default, times=1)
            script["times"] -= 1
            if self._scripts and script["times"] <= 0:
                self._scripts.pop(0)
            kind, options = script["kind"], script["options"]
            if kind == "submit_error":
                status = int(options.get("status", 503))
                if options.get("ingress", status in (502, 503, 504)):
                    return nginx_page(status)
                return json_response({"detail": f"FakeFal scripted submit error {status}"}, status)
            rid = str(uuid.uuid4())
            seconds = float(options.get("seconds", 1.0 if kind == "latency" else self.latency))
            self._jobs[rid] = {"request_id": rid, "app": app, "base": base, "arguments": arguments, "inputs": inputs,
                               "kind": kind, "options": options, "clock": time.monotonic(), "seconds": seconds,
                               "queue_left": int(options.get("position", 3)) if kind == "queue" else None,
                               "cancelled": False, "outcome": None}
            self.submissions.append({"request_id": rid, "app": app, "arguments": summary, "inputs": inputs,
                                     "headers": {k.lower(): v for k, v in request.headers.items()}, "kind": kind,
                                     "response_dropped": kind == "submit_lost"})
            if kind == "submit_lost":
                raise DropConnection
            return json_response(dict(request_id=rid, status="IN_QUEUE", queue_position=self._jobs[rid]["queue_left"] or 0,
                                      logs=None, metrics={}, **self._urls(base, rid)), 200, {"X-Fal-Request-Id": rid})

    def _phase(self, job: dict, advance: bool):
        """(status, queue_position); ``advance`` consumes one scripted queue step."""
        if job["cancelled"]:
            return "COMPLETED", None
        if job["queue_left"] is not None:
            if not advance:
                return "IN_QUEUE", job["queue_left"]
            if job["queue_left"] > 0:
                job["queue_left"] -= 1
                return "IN_QUEUE", job["queue_left"]
            job["queue_left"], job["clock"] = None, time.monotonic()
        elapsed = time.monotonic() - job["clock"]
        if elapsed < job["seconds"] / 2:
            return "IN_QUEUE", 0
        if job["kind"] == "hang" or elapsed < job["seconds"]:
            return "IN_PROGRESS", None
        return "COMPLETED", None

    def _status(self, job: dict) -> Response:
        state, position = self._phase(job, True)
        payload = dict(status=state, request_id=job["request_id"], logs=None, **self._urls(job["base"], job["request_id"]))
        headers = {"X-Fal-Request-Id": job["request_id"]}
        if state == "IN_QUEUE":
            payload["queue_position"] = position
        if state != "COMPLETED":
            return json_response(payload, 202, headers)
        error = self._outcome(job)["error"]
        payload["metrics"] = {} if error else {"inference_time": job["seconds"] or 0.001}
        if error:
            payload.update(error=error["summary"], error_type=error["error_type"])
        return json_response(payload, 200, headers)

    def _cancel(self, job: dict) -> Response:
        headers = {"X-Fal-Request-Id": job["request_id"]}
        if not job["cancelled"] and self._phase(job, False)[0] == "COMPLETED":
            return json_response({"status": "ALREADY_COMPLETED"}, 400, headers)
        if not job["cancelled"]:
            job.update(cancelled=True, outcome=None)
            self.cancelled.append(job["request_id"])
        return json_response({"status": "CANCELLATION_REQUESTED"}, 202, headers)

    def _result(self, job: dict, outcome: dict) -> Response:
        """The result answer (outside the lock: big images take a while to render)."""
        headers = {"X-Fal-Request-Id": job["request_id"]}
        if outcome["error"]:
            return json_response(outcome["error"]["body"], outcome["error"]["status"],
                                 dict(headers, **outcome["error"]["headers"]))
        result = outcome["result"]
        for image in result.get("images") or [result["image"]]:
            image["file_size"] = len(self._png(image["file_name"]))
        return json_response(result, 200, headers)

    # ------------------------------------------------------------------ outcomes (lock held)

    def _outcome(self, job: dict) -> dict:
        """Decide (once) what a completed job returns."""
        if job["outcome"] is None:
            options, kind, detail, error = job["options"], job["kind"], None, None
            if job["cancelled"]:
                error = _infra_error(499, "Request cancelled by client", "client_cancelled")
            elif kind == "error500":
                error = _infra_error(500, "Internal error", "runner_server_error")
            elif kind == "policy":
                detail = {"loc": ["body", "prompt"], "type": "content_policy_violation",
                          "msg": "The request was flagged by the content policy checker and could not be processed."}
            elif kind == "validation":
                detail = {"loc": list(options.get("loc", ["body", "prompt"])), "type": options.get("type", "value_error"),
                          "msg": options.get("msg", "Invalid value (FakeFal scripted validation error)")}
            if detail is not None:
                error = {"status": 422, "body": {"detail": [detail]}, "headers": {"X-Fal-Retryable": "false"},
                         "summary": detail["msg"], "error_type": detail["type"]}
            job["outcome"] = {"error": error, "result": None if error else self._success(job)}
        return job["outcome"]

    def _success(self, job: dict) -> dict:
        args = job["arguments"] if isinstance(job["arguments"], dict) else {}
        width, height = 512, 512
        if job["kind"] == "big_result":
            width, height = int(job["options"].get("width", 6000)), int(job["options"].get("height", 6000))
        source = next((i for i in job["inputs"] if i["field"] == "image_url" and i.get("size")), None)
        if job["app"] in _UPSCALERS and source is not None:
            factor = args.get(_UPSCALERS[job["app"]]) or 2
            width, height = max(1, round(source["size"][0] * factor)), max(1, round(source["size"][1] * factor))
        multi = "nano-banana" in job["app"]
        images = []
        for i in range(args.get("num_images", 1) if multi else 1):
            name = f"{job['request_id'].replace('-', '')[:16]}-{i}.png"
            self._files[name] = (width, height)
            images.append({"url": f"{self.url}/files/{name}", "content_type": "image/png", "file_name": name,
                           "file_size": None, "width": width, "height": height})
        if multi:
            return {"images": images, "description": "", **({"seed": args["seed"]} if "seed" in args else {})}
        return {"image": images[0], "seed": args.get("seed", random.randint(0, 2**31 - 1))}

    def _png(self, name: str) -> bytes:
        with self._render_lock:
            if isinstance(self._files[name], tuple):
                self._files[name] = _render_png(name, *self._files[name])
            return self._files[name]


try:  # the fixture is optional so that demo.py can import this module without pytest
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
