"""A local fake of the YooKassa API v3 (the subset Media Lab uses), for tests and demos.

Stdlib HTTP server (``http.server.ThreadingHTTPServer`` on 127.0.0.1, a free port) that the
real ``yookassa`` SDK talks to::

    fake = FakeYooKassa().start()          # or: with FakeYooKassa() as fake: ...
    Configuration.configure("123456", "test_secret", api_url=fake.api_url)   # or fake.configure_sdk()
    p = Payment.create({...}, idempotency_key=order_id)
    fake.succeed(p.id)
    fake.notify("payment.succeeded", p.id, "http://127.0.0.1:8080/yookassa/webhook", source_ip="185.71.76.1")
    fake.stop()

Spec: docs/REFERENCES.md §4; object shapes follow the captured payloads in
tests/fixtures/yookassa/ (ids, timestamps, money, recipient, payment_method, cancellation_details).

What is faithful (checked against the notes, the OAS-derived field lists and SDK 3.13.0 behaviour)
------------------------------------------------------------------------------------------------
* Basic auth ``shop_id:secret_key``; a mismatch gives 401 with the real ``invalid_credentials`` body.
* Success is exactly HTTP 200; errors are JSON ``{"type":"error","id","code","description","parameter"}``
  with 400/401/404/429/500 (``parameter`` is left out when no single parameter is at fault, as the
  real API does for e.g. 500). The SDK maps them to ``BadRequestError``, ``UnauthorizedError``, ...
* Ids are 36-character uuid-shaped strings shaped like real ones (``2e8dd95a-000f-5000-a000-1e3515f51c18``);
  timestamps are ISO-8601 UTC with milliseconds and ``Z``; money is ``{"value": "299.00", "currency": "RUB"}``.
* ``Idempotence-Key`` is required on every POST (missing or > 64 chars → 400). Same key + same
  method/path/canonical JSON body → the stored response is replayed byte for byte (status and body,
  including an error's ``id``) for 24 h; same key + anything different → 400 ``invalid_request``
  «Idempotence key duplicated», parameter ``Idempotence-Key``. Every processed response below 500 is
  stored (so a replayed bad request replays its 400); injected faults and 500s are not.
* Payment lifecycle: ``pending`` → (``succeed()``) ``succeeded`` when created with ``capture: true``,
  else ``waiting_for_capture`` (paid, ``expires_at`` + 7 days) → API capture → ``succeeded`` / API
  cancel → ``canceled`` (merchant, canceled_by_merchant). ``confirmation`` disappears once the payment
  leaves ``pending`` (as in the captured succeeded/canceled notifications); ``paid`` is true only in
  ``waiting_for_capture``/``succeeded``; ``income_amount`` is 96.5 % of ``amount`` (9.99 → 9.64 as in the
  fixture); a succeeded payment has ``refunded_amount`` 0.00 and ``refundable`` true until fully refunded.
* ``capture`` is NOT echoed in the payment object: the real Payment object (OAS) and the SDK's
  ``PaymentResponse`` have no such field. The fake remembers it internally (``capture_mode(id)``).
* Request validation the SDK does not do for you: amount ``^\\d+\\.\\d{2}$`` and > 0, currency RUB,
  description ≤ 128, metadata ≤ 16 keys (the SDK adds ``cms_name``), key ≤ 32, value a string ≤ 512
  (or null), redirect confirmation needs ``return_url`` ≤ 2048. ``statements: []``, ``transfers: []``,
  ``sources: []`` and unknown top-level fields are accepted and ignored.
* Fiscalisation mode (``receipts_required=True``): a payment without ``receipt`` → 400
  «Receipt is missing or illegal», parameter ``receipt``. A receipt, whenever one is sent, must have a
  customer email or phone (parameter ``receipt.customer``) and items with description, quantity,
  amount and vat_code 1..12 (parameter ``receipt.items``). Receipts are kept in ``receipts``.
* Lists: ``{"type": "list", "items": [...], "next_cursor"?}``, newest first, ``limit`` 1..100 (default 10).
* Notifications are the real envelope ``{"type":"notification","event":...,"object":{...}}`` POSTed as
  JSON; there is no signature header (there is none in reality either).

What is simplified
------------------
* One shop, one currency (RUB), payments only by "bank card 5555 55** **** 4444", no 3-D Secure, no
  split payments/deals/saved cards/receipts API/webhooks API/``/me``. Unknown routes → 404 ``not_found``.
* Refunds succeed at once (never ``pending``/``canceled``); an unknown or non-succeeded payment gives
  400 ``invalid_request`` (parameter ``payment_id``). A refund receipt is validated if sent, never required.
* Extra assumption (not verified against the real API): in fiscalisation checks, the receipt items'
  total must equal the payment amount.
* Metadata values must be strings or null (the real API's handling of numbers is unknown; the SDK
  sends ints unconverted, and rejecting them catches that bug early).
* Nothing expires on its own: a pending payment stays pending until ``succeed()``/``cancel()``.
* Plain http only, so the SDK's https-only 202 retry adapter is never exercised (notes §1.2).
* List cursors are opaque but simple (base64 of an internal sequence number); the 24-h idempotency
  window uses the monotonic clock.

Test controls (Python methods, and the same over HTTP without auth under ``/_test``)
----------------------------------------------------------------------------------
=====================================================  ===========================================
HTTP                                                   Python
=====================================================  ===========================================
``POST /_test/payments/{id}/succeed``                  ``succeed(id)`` → payment
``POST /_test/payments/{id}/cancel`` {party, reason}   ``cancel(id, party, reason)`` → payment
``POST /_test/payments/{id}/refund`` {amount: "50.00"} ``refund(id, "50.00")`` → refund
``POST /_test/notify`` {event, object_id (or id), url,  ``notify(event, object_id, url, ...)``
times, concurrency, source_ip} → {"statuses": [...]}    → list of status codes
``POST /_test/faults`` {kind, times, path_prefix,      ``fault(kind, times, path_prefix, after)``
after} or {"next": [500, "hang", ...]}
``DELETE /_test/faults``                               ``clear_faults()``
``POST /_test/reset``                                  ``reset()``
``POST /_test/settings`` {receipts_required,           attributes of the same names
hang_seconds, webhook_url, webhook_source_ip}
``GET /_test/state``                                   ``payments``, ``refunds``, ``receipts``, ``deliveries``
``GET /_test/payments/{id}``, ``/_test/refunds/{id}``  ``payments[id]``, ``refunds[id]``
``GET /_test/requests``                                ``requests_log``
=====================================================  ===========================================

Control errors are ``{"error": "..."}`` with 400 (bad input or wrong state) or 404 (unknown object);
the Python methods raise ``FakeYooKassaError`` (a ``ValueError``) for the same cases.

pytest fixture: ``fake_yookassa`` (this module; registered through ``pytest_plugins`` in
tests/conftest.py) yields a started fake with ``yookassa.Configuration`` pointed at it.
``GET /checkout/{id}`` serves a tiny page whose "Pay"/"Cancel" buttons call ``succeed``/``cancel``
and then redirect to the payment's ``return_url``.

With ``webhook_url`` set, every state change (``payment.waiting_for_capture``, ``payment.succeeded``,
``payment.canceled``, ``refund.succeeded``) is also delivered there in a background thread, with the
object as it was at the event, like the real service; results are appended to ``deliveries``.
``webhook_source_ip`` is sent as ``X-Forwarded-For`` on those deliveries.

Fault kinds: ``500``/``429``/any int ≥ 400 (JSON error; 429 carries ``Retry-After: 1``), ``202``
(``{"type": "processing", ...}``), ``"hang"`` (no answer for up to ``hang_seconds``, then the socket is
closed; released at once by ``stop()``), ``"close"`` (socket closed without a response), ``"html502"``
(``text/html`` 502 Bad Gateway page). Without ``path_prefix`` a fault hits the next ``/v3`` request;
faults never hit ``/_test`` and are checked before auth.
With ``after=True`` the request is processed first (idempotency result stored) and only the
response is replaced, modelling "the operation happened but the answer was lost".
"""
from __future__ import annotations

import base64
import copy
import json
import re
import secrets
import socket
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from html import escape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

__all__ = ["INVALID_CREDENTIALS_DESCRIPTION", "FakeYooKassa", "FakeYooKassaError", "fake_yookassa"]

INVALID_CREDENTIALS_DESCRIPTION = (
    "Incorrect password format in the Authorization header. "
    "Use Secret key issued in Merchant Profile as the password."
)
IDEMPOTENCY_TTL = 24 * 3600.0
FAULT_KINDS_TEXT = ("hang", "close", "html502")
HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
_AMOUNT_RE = re.compile(r"^\d+\.\d{2}$")
_CENT = Decimal("0.01")
_EPOCH_2000 = 946684800
_CONFIRMATION_TYPES = ("redirect", "embedded", "external", "qr", "mobile_application")


# ----------------------------------------------------------------------------- helpers


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(dt: datetime) -> str:
    """ISO-8601 UTC with milliseconds and Z, e.g. 2024-10-01T09:49:14.459Z."""
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (dt.microsecond // 1000)


def _parse_ts(text: str) -> datetime:
    dt = datetime.fromisoformat(text)  # Python 3.11 accepts the trailing Z
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _money(value: Decimal, currency: str = "RUB") -> dict:
    return {"value": str(value.quantize(_CENT, ROUND_HALF_UP)), "currency": currency}


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class _ApiError(Exception):
    """Raised inside request processing; becomes a YooKassa JSON error response."""

    def __init__(self, status: int, code: str, description: str, parameter: str | None = None):
        super().__init__(description)
        self.status, self.code, self.description, self.parameter = status, code, description, parameter


def _bad(description: str, parameter: str | None = None) -> _ApiError:
    return _ApiError(400, "invalid_request", description, parameter)


def _error_body(code: str, description: str, parameter: str | None = None) -> dict:
    body = {"type": "error", "id": str(uuid.uuid4()), "code": code, "description": description}
    if parameter is not None:
        body["parameter"] = parameter
    return body


class FakeYooKassaError(ValueError):
    """A test control was misused: unknown object (HTTP 404 on ``/_test``) or wrong state/input (400)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class _Fault:
    def __init__(self, kind, times: int, path_prefix: str | None, after: bool):
        self.kind, self.times, self.path_prefix, self.after = kind, times, path_prefix, after

    def matches(self, method: str, path: str) -> bool:
        prefix = self.path_prefix
        if not prefix:
            return path.startswith("/v3/")
        if " " in prefix:
            want_method, _, want_path = prefix.partition(" ")
            return method == want_method.upper() and path.startswith(want_path.strip())
        return path.startswith(prefix)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "times": self.times, "path_prefix": self.path_prefix, "after": self.after}


class _Response:
    __slots__ = ("body", "content_type", "fault", "headers", "status")

    def __init__(self, status=200, body=b"", content_type="application/json; charset=utf-8", headers=None,
                 fault=None):
        self.status, self.body, self.content_type = status, body, content_type
        self.headers = headers or {}
        self.fault = fault  # "hang" / "close": no HTTP response at all


# ----------------------------------------------------------------------------- the fake


class FakeYooKassa:
    """Local fake of the YooKassa API v3 subset used by Media Lab (see the module docstring).

    Public state (read it in assertions; it is changed only under the fake's lock):
    ``payments`` (id → payment dict), ``refunds`` (id → refund dict), ``receipts`` (payment or
    refund id → receipt dict as sent), ``requests_log`` (list of dicts with method, path, query,
    headers, body, status; ``/_test`` calls are not logged), ``deliveries`` (automatic webhook
    deliveries: event, object_id, status).
    """

    def __init__(self, shop_id: str = "123456", secret_key: str = "test_secret", *,
                 receipts_required: bool = False, hang_seconds: float = 30.0,
                 webhook_url: str | None = None, webhook_source_ip: str | None = None,
                 gateway_id: str = "2323500", income_rate: str = "0.965",
                 host: str = "127.0.0.1", port: int = 0):
        self.shop_id = str(shop_id)
        self.secret_key = str(secret_key)
        self.receipts_required = receipts_required
        self.hang_seconds = hang_seconds
        self.webhook_url = webhook_url
        self.webhook_source_ip = webhook_source_ip
        self.gateway_id = gateway_id
        self.income_rate = Decimal(income_rate)
        self._host, self._port = host, port

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set = set()
        self._seq = 0
        self._reset_state()

    # ------------------------------------------------------------------ lifecycle

    def _reset_state(self):
        self.payments: dict[str, dict] = {}
        self.refunds: dict[str, dict] = {}
        self.receipts: dict[str, dict] = {}
        self.requests_log: list[dict] = []
        self.deliveries: list[dict] = []
        self._idempotency: dict[str, tuple] = {}
        self._faults: list[_Fault] = []
        self._capture: dict[str, bool] = {}
        self._order: dict[str, int] = {}

    def start(self) -> Self:
        """Bind 127.0.0.1 on a free port (or the given one), serve in a daemon thread, return self."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server((self._host, self._port), _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-yookassa", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: releases hanging requests, drops open connections, closes the socket."""
        server = self._server
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL, ``http://127.0.0.1:PORT`` (the fake must be started)."""
        if self._server is None:
            raise RuntimeError("FakeYooKassa is not started")
        host, port = self._server.server_address[:2]
        return "http://%s:%d" % (host, port)

    @property
    def api_url(self) -> str:
        """The value for ``Configuration.configure(..., api_url=...)``: ``url + "/v3"``."""
        return self.url + "/v3"

    def configure_sdk(self, shop_id: str | None = None, secret_key: str | None = None) -> None:
        """Point the global ``yookassa.Configuration`` at this fake (own credentials by default)."""
        from yookassa import Configuration

        Configuration.configure(shop_id or self.shop_id, secret_key or self.secret_key, api_url=self.api_url)

    def reset(self) -> None:
        """Forget all payments, refunds, receipts, idempotency keys, faults, logs and deliveries."""
        with self._lock:
            self._reset_state()
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = 5.0) -> bool:
        """Block until ``predicate(fake)`` is true (re-checked on every request, state change and
        delivery); return False on timeout. Use instead of sleeping."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout=timeout)

    def capture_mode(self, payment_id: str) -> bool:
        """The ``capture`` flag the payment was created with (the API object does not carry it)."""
        return self._capture[payment_id]

    # ------------------------------------------------------------------ test controls

    def succeed(self, payment_id: str) -> dict:
        """The user paid: ``pending`` → ``succeeded`` (``capture: true``) or ``waiting_for_capture``
        (``capture: false``; paid, ``expires_at`` in 7 days). On a ``waiting_for_capture`` payment it
        captures the full amount. Returns a copy of the payment. Final states raise ``ValueError``."""
        with self._lock:
            payment = self._payment_or_raise(payment_id)
            status = payment["status"]
            if status == "pending":
                self._authorize(payment)
                if self._capture.get(payment_id):
                    self._mark_succeeded(payment)
                    event = "payment.succeeded"
                else:
                    payment["status"] = "waiting_for_capture"
                    payment["expires_at"] = _ts(_now() + timedelta(days=7))
                    event = "payment.waiting_for_capture"
            elif status == "waiting_for_capture":
                self._mark_succeeded(payment)
                event = "payment.succeeded"
            else:
                raise FakeYooKassaError("payment %s is %s, cannot succeed" % (payment_id, status))
            self._changed(event, payment)
            return copy.deepcopy(payment)

    def cancel(self, payment_id: str, party: str = "yoo_money", reason: str = "expired_on_confirmation") -> dict:
        """Cancel a ``pending`` or ``waiting_for_capture`` payment on YooKassa's side (user never paid,
        card declined, hold expired ...). Returns a copy. Final states raise ``ValueError``."""
        with self._lock:
            payment = self._payment_or_raise(payment_id)
            if payment["status"] not in ("pending", "waiting_for_capture"):
                raise FakeYooKassaError("payment %s is %s, cannot cancel" % (payment_id, payment["status"]))
            self._mark_canceled(payment, party, reason)
            self._changed("payment.canceled", payment)
            return copy.deepcopy(payment)

    def refund(self, payment_id: str, amount_value: str, description: str | None = None) -> dict:
        """A refund made in the merchant cabinet (not through our API): same rules as
        ``POST /v3/refunds``; updates the payment. Returns a copy of the refund; bad input raises
        ``ValueError``."""
        with self._lock:
            self._payment_or_raise(payment_id)
            body = {"payment_id": payment_id, "amount": {"value": str(amount_value), "currency": "RUB"}}
            if description:
                body["description"] = description
            try:
                refund = self._create_refund(body)
            except _ApiError as e:
                raise FakeYooKassaError("%s (%s)" % (e.description, e.parameter)) from None
            return copy.deepcopy(refund)

    def notify(self, event: str, object_id: str, url: str, times: int = 1, concurrency: int = 1,
               source_ip: str | None = None, timeout: float = 10.0) -> list[int]:
        """POST ``{"type":"notification","event":event,"object":<current payment or refund>}`` to
        ``url`` ``times`` times from ``concurrency`` threads; return the HTTP status codes in delivery
        order (0 for a connection error or timeout). ``source_ip`` is sent as ``X-Forwarded-For``.
        ``refund.*`` events look the id up in ``refunds``, all others in ``payments``; an unknown id
        raises ``FakeYooKassaError``. Blocks until every delivery has finished."""
        with self._lock:
            table = self.refunds if event.startswith("refund.") else self.payments
            if object_id not in table:
                raise FakeYooKassaError("no %s %s" % ("refund" if table is self.refunds else "payment", object_id), 404)
            envelope = {"type": "notification", "event": event, "object": copy.deepcopy(table[object_id])}
        times, concurrency = int(times), max(1, int(concurrency))
        if times < 0:
            raise FakeYooKassaError("times must be >= 0")
        return self._deliver(url, envelope, times, concurrency, source_ip, timeout)

    def fault(self, kind, times: int = 1, path_prefix: str | None = None, after: bool = False) -> None:
        """Make the next ``times`` matching API requests fail with ``kind``: an int HTTP status
        (500, 429, 503 ... as a JSON error; 202 as ``processing``), ``"hang"``, ``"close"`` or
        ``"html502"``. ``path_prefix`` is a path prefix (``"/v3/payments"``) or ``"METHOD /path"``.
        ``after=True`` processes the request first and then replaces the response."""
        if isinstance(kind, str) and kind.isdigit():
            kind = int(kind)
        if not (kind in FAULT_KINDS_TEXT or (isinstance(kind, int) and (kind == 202 or 400 <= kind <= 599))):
            raise FakeYooKassaError("unknown fault kind %r" % (kind,))
        if int(times) < 1:
            raise FakeYooKassaError("times must be >= 1")
        with self._lock:
            self._faults.append(_Fault(kind, int(times), path_prefix, bool(after)))

    def clear_faults(self) -> None:
        """Drop all pending injected faults."""
        with self._lock:
            self._faults.clear()

    @property
    def faults(self) -> list[dict]:
        """Pending injected faults (copies)."""
        with self._lock:
            return [f.as_dict() for f in self._faults]

    # ------------------------------------------------------------------ state helpers (under lock)

    def _new_id(self, kind: str) -> str:
        seg = "000f" if kind == "payment" else "0015"
        while True:
            oid = "%08x-%s-5000-%s-%s" % ((int(time.time()) - _EPOCH_2000) & 0xFFFFFFFF, seg,
                                          secrets.choice(("8000", "9000", "a000", "b000")), secrets.token_hex(6))
            if oid not in self.payments and oid not in self.refunds:
                return oid

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _payment_or_raise(self, payment_id: str) -> dict:
        payment = self.payments.get(payment_id)
        if payment is None:
            raise FakeYooKassaError("no payment %s" % payment_id, 404)
        return payment

    def _authorize(self, payment: dict) -> None:
        payment["paid"] = True
        payment.pop("confirmation", None)
        payment["payment_method"] = {
            "type": "bank_card", "id": payment["id"], "saved": False, "title": "Bank card *4444",
            "card": {"first6": "555555", "last4": "4444", "expiry_year": "2030", "expiry_month": "12",
                     "card_type": "MasterCard", "issuer_country": "RU", "issuer_name": "Sberbank"},
        }
        payment["authorization_details"] = {
            "rrn": "%015d" % secrets.randbelow(10 ** 15), "auth_code": "%06d" % secrets.randbelow(10 ** 6),
            "three_d_secure": {"applied": False},
        }

    def _mark_succeeded(self, payment: dict) -> None:
        amount = Decimal(payment["amount"]["value"])
        payment["status"] = "succeeded"
        payment["paid"] = True
        payment["captured_at"] = _ts(_now())
        payment["income_amount"] = _money(amount * self.income_rate, payment["amount"]["currency"])
        payment["refunded_amount"] = _money(Decimal(0), payment["amount"]["currency"])
        payment["refundable"] = True
        payment.pop("expires_at", None)
        payment.pop("confirmation", None)
        if "receipt_registration" in payment:
            payment["receipt_registration"] = "succeeded"

    def _mark_canceled(self, payment: dict, party: str, reason: str) -> None:
        payment["status"] = "canceled"
        payment["paid"] = False
        payment["refundable"] = False
        payment.pop("expires_at", None)
        payment.pop("confirmation", None)
        payment["cancellation_details"] = {"party": party, "reason": reason}
        if "receipt_registration" in payment:
            payment["receipt_registration"] = "canceled"

    def _changed(self, event: str | None, obj: dict | None) -> None:
        """Wake waiters; with ``webhook_url`` set, deliver ``event`` in the background."""
        self._cond.notify_all()
        if event and obj is not None and self.webhook_url:
            envelope = {"type": "notification", "event": event, "object": copy.deepcopy(obj)}
            url, ip = self.webhook_url, self.webhook_source_ip
            threading.Thread(target=self._auto_deliver, args=(url, envelope, ip), daemon=True,
                             name="fake-yookassa-webhook").start()

    def _auto_deliver(self, url: str, envelope: dict, source_ip: str | None) -> None:
        status = self._deliver(url, envelope, 1, 1, source_ip, 10.0)[0]
        with self._lock:
            self.deliveries.append({"event": envelope["event"], "object_id": envelope["object"]["id"],
                                    "status": status})
            self._cond.notify_all()

    @staticmethod
    def _deliver(url, envelope, times, concurrency, source_ip, timeout) -> list[int]:
        data = _json_bytes(envelope)
        headers = {"Content-Type": "application/json"}
        if source_ip:
            headers["X-Forwarded-For"] = source_ip
        statuses: list[int | None] = [None] * times
        counter = iter(range(times))
        counter_lock = threading.Lock()

        def worker():
            with requests.Session() as session:
                while True:
                    with counter_lock:
                        index = next(counter, None)
                    if index is None:
                        return
                    try:
                        statuses[index] = session.post(url, data=data, headers=headers, timeout=timeout).status_code
                    except requests.RequestException:
                        statuses[index] = 0

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(concurrency, max(times, 1)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [s if s is not None else 0 for s in statuses]

    # ------------------------------------------------------------------ HTTP dispatch

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _fault_response(self, kind) -> _Response:
        if kind in ("hang", "close"):
            return _Response(fault=kind)
        if kind == "html502":
            return _Response(502, HTML_502, "text/html")
        if kind == 202:
            return _Response(202, _json_bytes({"type": "processing", "description": "Request accepted, "
                                               "but processing is not finished yet", "retry_after": 1800}))
        if kind == 429:
            return _Response(429, _json_bytes(_error_body("too_many_requests", "Too many requests. Retry later.")),
                             headers={"Retry-After": "1"})
        if kind == 500:
            return _Response(500, _json_bytes(_error_body("internal_server_error", "Internal server error")))
        codes = {400: "invalid_request", 401: "invalid_credentials", 403: "forbidden", 404: "not_found",
                 410: "gone"}
        return _Response(kind, _json_bytes(_error_body(codes.get(kind, "internal_server_error"),
                                                       "Injected error %d" % kind)))

    def _handle(self, method: str, raw_path: str, headers: dict, raw_body: bytes) -> _Response:
        parts = urlsplit(raw_path)
        path = parts.path
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        if path.startswith("/_test/") or path == "/_test":
            return self._control(method, path, raw_body)

        try:
            body_for_log = json.loads(raw_body) if raw_body else None
        except ValueError:
            body_for_log = raw_body.decode("utf-8", "replace")
        entry = {"method": method, "path": path, "query": query, "headers": headers, "body": body_for_log,
                 "status": None}
        with self._lock:
            self.requests_log.append(entry)
            self._cond.notify_all()

        fault = self._take_fault(method, path)
        if fault is not None and not fault.after:
            response = self._fault_response(fault.kind)
        else:
            try:
                response = self._api(method, path, query, headers, raw_body)
            except _ApiError as e:
                response = _Response(e.status, _json_bytes(_error_body(e.code, e.description, e.parameter)))
            if fault is not None:
                response = self._fault_response(fault.kind)
        with self._lock:
            entry["status"] = response.status if response.fault is None else response.fault
            self._cond.notify_all()
        return response

    def _api(self, method, path, query, headers, raw_body) -> _Response:
        if path.startswith("/checkout/"):
            return self._checkout(method, path, raw_body)
        if not path.startswith("/v3/"):
            raise _ApiError(404, "not_found", "Path not found")
        self._check_auth(headers)
        segs = path[len("/v3/"):].strip("/").split("/")
        if segs[0] == "payments":
            if len(segs) == 1 and method == "GET":
                return self._ok(self._list(self.payments, query, ("status",)))
            if len(segs) == 1 and method == "POST":
                return self._idempotent(method, path, headers, raw_body, self._create_payment)
            if len(segs) == 2 and method == "GET":
                return self._ok(self._get(self.payments, segs[1], "Payment"))
            if len(segs) == 3 and method == "POST" and segs[2] in ("capture", "cancel"):
                action = self._capture_payment if segs[2] == "capture" else self._cancel_payment
                return self._idempotent(method, path, headers, raw_body, lambda body: action(segs[1], body))
        elif segs == ["me"] and method == "GET":   # shop settings (SDK: yookassa.Settings.get_account_settings)
            return self._ok({"account_id": self.shop_id, "test": True, "fiscalization_enabled": False,
                             "payment_methods": ["bank_card", "yoo_money", "sbp"], "status": "enabled"})
        elif segs[0] == "refunds":
            if len(segs) == 1 and method == "GET":
                return self._ok(self._list(self.refunds, query, ("status", "payment_id")))
            if len(segs) == 1 and method == "POST":
                return self._idempotent(method, path, headers, raw_body, self._create_refund)
            if len(segs) == 2 and method == "GET":
                return self._ok(self._get(self.refunds, segs[1], "Refund"))
        raise _ApiError(404, "not_found", "Path not found")

    @staticmethod
    def _ok(obj) -> _Response:
        return _Response(200, _json_bytes(obj))

    def _check_auth(self, headers: dict) -> None:
        auth = _header(headers, "Authorization") or ""
        expected = "%s:%s" % (self.shop_id, self.secret_key)
        ok = False
        if auth[:6].lower() == "basic ":
            try:
                ok = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8") == expected
            except (ValueError, UnicodeDecodeError):
                ok = False
        if not ok:
            raise _ApiError(401, "invalid_credentials", INVALID_CREDENTIALS_DESCRIPTION, "Authorization")

    def _idempotent(self, method, path, headers, raw_body, action) -> _Response:
        key = _header(headers, "Idempotence-Key")
        if not key:
            raise _bad("Idempotence-Key header is missing", "Idempotence-Key")
        if len(key) > 64:
            raise _bad("Idempotence-Key is too long. Max length is 64", "Idempotence-Key")
        if raw_body.strip():
            try:
                body = json.loads(raw_body)
            except ValueError:
                raise _bad("Request body is not valid JSON") from None
        else:
            body = None
        canonical = _canonical([method, path, body])
        with self._lock:
            stored = self._idempotency.get(key)
            if stored is not None and time.monotonic() - stored[0] < IDEMPOTENCY_TTL:
                if stored[1] != canonical:
                    raise _bad("Idempotence key duplicated", "Idempotence-Key")
                return _Response(stored[2], stored[3])
            try:
                response = self._ok(action(body))
            except _ApiError as e:
                response = _Response(e.status, _json_bytes(_error_body(e.code, e.description, e.parameter)))
            if response.status < 500:
                self._idempotency[key] = (time.monotonic(), canonical, response.status, response.body)
            return response

    def _get(self, table: dict, oid: str, what: str) -> dict:
        with self._lock:
            obj = table.get(oid)
            if obj is None:
                raise _ApiError(404, "not_found", "%s doesn't exist or access denied" % what, "%s_id" % what.lower())
            return copy.deepcopy(obj)

    def _list(self, table: dict, query: dict, filters: tuple) -> dict:
        raw_limit = query.get("limit", "10")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
            raise _bad("Invalid limit value. Allowed values: 1..100", "limit")
        limit = int(raw_limit)
        bounds = []
        for field in ("created_at", "captured_at"):
            for op in ("gte", "gt", "lte", "lt"):
                name = "%s.%s" % (field, op)
                if name in query:
                    try:
                        bounds.append((field, op, _parse_ts(query[name])))
                    except ValueError:
                        raise _bad("Invalid date-time value", name) from None
        before = None
        if query.get("cursor"):
            try:
                before = int(base64.urlsafe_b64decode(query["cursor"].encode() + b"==").decode())
            except ValueError:
                raise _bad("Invalid cursor value", "cursor") from None
        with self._lock:
            items = sorted(table.values(), key=lambda o: self._order[o["id"]], reverse=True)
            selected = []
            for obj in items:
                if before is not None and self._order[obj["id"]] >= before:
                    continue
                if any(f in query and query[f] != "" and obj.get(f) != query[f] for f in filters):
                    continue
                if not all(_within(obj.get(field), op, bound) for field, op, bound in bounds):
                    continue
                selected.append(obj)
                if len(selected) > limit:
                    break
            result = {"type": "list", "items": copy.deepcopy(selected[:limit])}
            if len(selected) > limit:
                last = self._order[selected[limit - 1]["id"]]
                result["next_cursor"] = base64.urlsafe_b64encode(str(last).encode()).decode().rstrip("=")
            return result

    # ------------------------------------------------------------------ API operations (under lock)

    def _create_payment(self, body) -> dict:
        if not isinstance(body, dict):
            raise _bad("Request body must be a JSON object")
        amount, currency = _parse_amount(body.get("amount"), "amount")
        description = body.get("description")
        if description is not None:
            if not isinstance(description, str):
                raise _bad("Invalid description value", "description")
            if len(description) > 128:
                raise _bad("The value of the description parameter is too long. Max length is 128",
                           "description")
        metadata = _check_metadata(body.get("metadata"))
        capture = body.get("capture", False)
        if not isinstance(capture, bool):
            raise _bad("Invalid capture value", "capture")
        for name in ("statements", "transfers"):
            if name in body and not isinstance(body[name], list):
                raise _bad("Invalid %s value" % name, name)
        receipt = body.get("receipt")
        if receipt is None and self.receipts_required:
            raise _bad("Receipt is missing or illegal", "receipt")
        if receipt is not None:
            _check_receipt(receipt, amount)

        pid = self._new_id("payment")
        confirmation = self._confirmation(body.get("confirmation"), pid)
        payment = {"id": pid, "status": "pending", "amount": _money(amount, currency)}
        if description is not None:
            payment["description"] = description
        payment["recipient"] = {"account_id": self.shop_id, "gateway_id": self.gateway_id}
        payment["created_at"] = _ts(_now())
        if confirmation is not None:
            payment["confirmation"] = confirmation
        payment["test"] = True
        payment["paid"] = False
        payment["refundable"] = False
        if receipt is not None:
            payment["receipt_registration"] = "pending"
            self.receipts[pid] = copy.deepcopy(receipt)
        payment["metadata"] = metadata or {}
        self.payments[pid] = payment
        self._capture[pid] = capture
        self._order[pid] = self._next_seq()
        self._changed(None, None)
        return copy.deepcopy(payment)

    def _confirmation(self, conf, pid: str) -> dict | None:
        if conf is None:
            return None
        if not isinstance(conf, dict) or conf.get("type") not in _CONFIRMATION_TYPES:
            raise _bad("Invalid confirmation type", "confirmation.type")
        kind = conf["type"]
        out = {"type": kind}
        if kind == "redirect":
            return_url = conf.get("return_url")
            if not isinstance(return_url, str) or not return_url:
                raise _bad("Parameter return_url is required for confirmation type redirect",
                           "confirmation.return_url")
            if len(return_url) > 2048:
                raise _bad("Invalid return_url value. Max length is 2048", "confirmation.return_url")
            out["return_url"] = return_url
            if "enforce" in conf:
                out["enforce"] = bool(conf["enforce"])
            out["confirmation_url"] = "%s/checkout/%s" % (self.url, pid)
        elif kind == "embedded":
            out["confirmation_token"] = "ct-" + pid
        elif kind == "qr":
            out["confirmation_data"] = "https://qr.nspk.ru/FAKE%s?type=02" % pid.replace("-", "")[:24].upper()
        elif kind == "mobile_application":
            out["confirmation_url"] = "%s/checkout/%s" % (self.url, pid)
        if conf.get("locale") in ("ru_RU", "en_US"):
            out["locale"] = conf["locale"]
        return out

    def _api_payment(self, payment_id: str) -> dict:
        payment = self.payments.get(payment_id)
        if payment is None:
            raise _ApiError(404, "not_found", "Payment doesn't exist or access denied", "payment_id")
        return payment

    def _capture_payment(self, payment_id: str, body) -> dict:
        payment = self._api_payment(payment_id)
        if payment["status"] != "waiting_for_capture":
            raise _bad("Payment has status %s. You can only capture a payment with status "
                       "waiting_for_capture" % payment["status"], "payment_id")
        if body is not None and not isinstance(body, dict):
            raise _bad("Request body must be a JSON object")
        if body and body.get("amount") is not None:
            amount, currency = _parse_amount(body["amount"], "amount")
            if currency != payment["amount"]["currency"]:
                raise _bad("Currency doesn't match the payment currency", "amount.currency")
            if amount > Decimal(payment["amount"]["value"]):
                raise _bad("Capture amount exceeds the payment amount", "amount.value")
            payment["amount"] = _money(amount, currency)
        if body and body.get("receipt") is not None:
            _check_receipt(body["receipt"], Decimal(payment["amount"]["value"]))
            self.receipts[payment_id] = copy.deepcopy(body["receipt"])
        self._mark_succeeded(payment)
        self._changed("payment.succeeded", payment)
        return copy.deepcopy(payment)

    def _cancel_payment(self, payment_id: str, body) -> dict:
        payment = self._api_payment(payment_id)
        if payment["status"] != "waiting_for_capture":
            raise _bad("Payment has status %s. You can only cancel a payment with status "
                       "waiting_for_capture" % payment["status"], "payment_id")
        self._mark_canceled(payment, "merchant", "canceled_by_merchant")
        self._changed("payment.canceled", payment)
        return copy.deepcopy(payment)

    def _create_refund(self, body) -> dict:
        if not isinstance(body, dict):
            raise _bad("Request body must be a JSON object")
        payment_id = body.get("payment_id")
        if not isinstance(payment_id, str) or len(payment_id) != 36:
            raise _bad("Invalid payment_id value", "payment_id")
        payment = self.payments.get(payment_id)
        if payment is None:
            raise _bad("Payment doesn't exist or access denied", "payment_id")
        if payment["status"] != "succeeded":
            raise _bad("Payment has status %s. You can only refund a succeeded payment" % payment["status"],
                       "payment_id")
        amount, currency = _parse_amount(body.get("amount"), "amount")
        if currency != payment["amount"]["currency"]:
            raise _bad("Currency doesn't match the payment currency", "amount.currency")
        refunded = Decimal(payment.get("refunded_amount", {}).get("value", "0"))
        available = Decimal(payment["amount"]["value"]) - refunded
        if amount > available:
            raise _bad("Refund amount exceeds the amount available for refund (%s)" % available, "amount.value")
        description = body.get("description")
        if description is not None and (not isinstance(description, str) or len(description) > 250):
            raise _bad("Invalid description value. Max length is 250", "description")
        metadata = _check_metadata(body.get("metadata"))
        if "sources" in body and not isinstance(body["sources"], list):
            raise _bad("Invalid sources value", "sources")
        if body.get("receipt") is not None:
            _check_receipt(body["receipt"], amount)

        rid = self._new_id("refund")
        refund = {"id": rid, "payment_id": payment_id, "status": "succeeded", "amount": _money(amount, currency),
                  "created_at": _ts(_now())}
        if description is not None:
            refund["description"] = description
        if metadata:
            refund["metadata"] = metadata
        if body.get("receipt") is not None:
            refund["receipt_registration"] = "succeeded"
            self.receipts[rid] = copy.deepcopy(body["receipt"])
        self.refunds[rid] = refund
        self._order[rid] = self._next_seq()
        payment["refunded_amount"] = _money(refunded + amount, currency)
        payment["refundable"] = refunded + amount < Decimal(payment["amount"]["value"])
        self._changed("refund.succeeded", refund)
        return copy.deepcopy(refund)

    # ------------------------------------------------------------------ checkout page and controls

    def _checkout(self, method: str, path: str, raw_body: bytes) -> _Response:
        segs = path.strip("/").split("/")
        with self._lock:
            payment = self.payments.get(segs[1]) if len(segs) == 2 else None
            if payment is None:
                return _Response(404, b"<html><body><h1>Payment not found</h1></body></html>", "text/html")
            if method == "POST":
                action = parse_qs(raw_body.decode("utf-8", "replace")).get("action", [""])[-1]
                return_url = (payment.get("confirmation") or {}).get("return_url")
                try:
                    if action == "pay":
                        self.succeed(payment["id"])
                    elif action == "cancel":
                        self.cancel(payment["id"])
                except FakeYooKassaError:
                    pass
                if return_url:
                    return _Response(303, b"", "text/html", headers={"Location": return_url})
            pid, status = escape(payment["id"]), escape(payment["status"])
            amount = escape("%s %s" % (payment["amount"]["value"], payment["amount"]["currency"]))
            desc = escape(payment.get("description", ""))
        buttons = ""
        if payment["status"] == "pending":
            buttons = ('<form method="post"><button name="action" value="pay">Pay with 5555 5555 5555 4444'
                       '</button> <button name="action" value="cancel">Cancel</button></form>')
        page = ("<!doctype html><html><head><meta charset=\"utf-8\"><title>Fake YooKassa checkout</title></head>"
                "<body><h1>Fake YooKassa checkout</h1><p>Payment <code>%s</code>: %s</p><p>%s</p>"
                "<p>Status: <b id=\"status\">%s</b></p>%s</body></html>" % (pid, amount, desc, status, buttons))
        return _Response(200, page.encode("utf-8"), "text/html; charset=utf-8")

    def _control(self, method: str, path: str, raw_body: bytes) -> _Response:
        try:
            body = json.loads(raw_body) if raw_body.strip() else {}
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _Response(400, _json_bytes({"error": "body must be a JSON object"}))
        segs = path.strip("/").split("/")[1:]
        try:
            result = self._control_route(method, segs, body)
        except FakeYooKassaError as e:
            return _Response(e.status, _json_bytes({"error": str(e)}))
        except (TypeError, ValueError, KeyError) as e:
            return _Response(400, _json_bytes({"error": "%s: %s" % (type(e).__name__, e)}))
        return self._ok(result)

    def _control_route(self, method: str, segs: list, body: dict):
        if segs[:1] == ["payments"] and len(segs) == 3 and method == "POST":
            pid, action = segs[1], segs[2]
            if action == "succeed":
                return self.succeed(pid)
            if action == "cancel":
                return self.cancel(pid, body.get("party", "yoo_money"), body.get("reason", "expired_on_confirmation"))
            if action == "refund":
                amount = body.get("amount")
                if isinstance(amount, dict):
                    amount = amount.get("value")
                if amount is None:
                    raise FakeYooKassaError("amount is required")
                return self.refund(pid, str(amount), body.get("description"))
        if segs[:1] in (["payments"], ["refunds"]) and len(segs) == 2 and method == "GET":
            table = self.payments if segs[0] == "payments" else self.refunds
            with self._lock:
                if segs[1] not in table:
                    raise FakeYooKassaError("no %s %s" % (segs[0][:-1], segs[1]), 404)
                return copy.deepcopy(table[segs[1]])
        if segs == ["notify"] and method == "POST":
            object_id = body.get("object_id") or body.get("id")
            if not body.get("event") or not object_id or not body.get("url"):
                raise FakeYooKassaError("event, object_id (or id) and url are required")
            statuses = self.notify(body["event"], object_id, body["url"], int(body.get("times", 1)),
                                   int(body.get("concurrency", 1)), body.get("source_ip"),
                                   float(body.get("timeout", 10.0)))
            return {"statuses": statuses}
        if segs == ["faults"]:
            if method == "DELETE":
                self.clear_faults()
            elif method == "POST":
                if "next" in body:
                    kinds = body["next"] if isinstance(body["next"], list) else [body["next"]]
                    for kind in kinds:
                        self.fault(kind, 1, body.get("path_prefix"), bool(body.get("after", False)))
                else:
                    self.fault(body.get("kind"), int(body.get("times", 1)), body.get("path_prefix"),
                               bool(body.get("after", False)))
            elif method != "GET":
                raise FakeYooKassaError("use GET, POST or DELETE", 404)
            return {"faults": self.faults}
        if segs == ["reset"] and method == "POST":
            self.reset()
            return {"ok": True}
        if segs == ["settings"] and method in ("GET", "POST"):
            with self._lock:
                for name in ("receipts_required", "hang_seconds", "webhook_url", "webhook_source_ip"):
                    if name in body:
                        setattr(self, name, body[name])
                return {"receipts_required": self.receipts_required, "hang_seconds": self.hang_seconds,
                        "webhook_url": self.webhook_url, "webhook_source_ip": self.webhook_source_ip,
                        "shop_id": self.shop_id, "api_url": self.api_url}
        if segs == ["state"] and method == "GET":
            with self._lock:
                return copy.deepcopy({"payments": self.payments, "refunds": self.refunds,
                                      "receipts": self.receipts, "deliveries": self.deliveries,
                                      "faults": self.faults})
        if segs == ["requests"] and method == "GET":
            with self._lock:
                return copy.deepcopy(self.requests_log)
        raise FakeYooKassaError("unknown control %s /_test/%s" % (method, "/".join(segs)), 404)


# ----------------------------------------------------------------------------- validation helpers


def _header(headers: dict, name: str) -> str | None:
    lname = name.lower()
    for key, value in headers.items():
        if key.lower() == lname:
            return value
    return None


def _within(value, op: str, bound: datetime) -> bool:
    if value is None:
        return False
    ts = _parse_ts(value)
    return {"gte": ts >= bound, "gt": ts > bound, "lte": ts <= bound, "lt": ts < bound}[op]


def _parse_amount(amount, param: str) -> tuple[Decimal, str]:
    if not isinstance(amount, dict):
        raise _bad("Amount is missing or illegal", param)
    value = amount.get("value")
    if not isinstance(value, str) or not _AMOUNT_RE.match(value):
        raise _bad("Invalid amount value. Use a string with two decimals, e.g. \"100.00\"", param + ".value")
    dec = Decimal(value)
    if dec <= 0:
        raise _bad("Invalid amount value. The amount must be greater than 0", param + ".value")
    currency = amount.get("currency")
    if currency != "RUB":
        raise _bad("Currency %r is not supported by this shop" % (currency,), param + ".currency")
    return dec, currency


def _check_metadata(metadata) -> dict | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise _bad("Invalid metadata value", "metadata")
    if len(metadata) > 16:
        raise _bad("Too many metadata keys. Max is 16", "metadata")
    for key, value in metadata.items():
        if len(key) > 32:
            raise _bad("Metadata key %r is too long. Max length is 32" % key, "metadata")
        if value is not None and not isinstance(value, str):
            raise _bad("Metadata value of %r must be a string" % key, "metadata")
        if value is not None and len(value) > 512:
            raise _bad("Metadata value of %r is too long. Max length is 512" % key, "metadata")
    return dict(metadata)


def _check_receipt(receipt, total: Decimal) -> None:
    if not isinstance(receipt, dict):
        raise _bad("Receipt is missing or illegal", "receipt")
    customer = receipt.get("customer") or {}
    if not isinstance(customer, dict):
        raise _bad("Receipt is missing or illegal", "receipt.customer")
    if not (customer.get("email") or customer.get("phone") or receipt.get("email") or receipt.get("phone")):
        raise _bad("Receipt is missing or illegal", "receipt.customer")
    items = receipt.get("items")
    if not isinstance(items, list) or not 1 <= len(items) <= 100:
        raise _bad("Receipt is missing or illegal", "receipt.items")
    items_total = Decimal(0)
    for item in items:
        try:
            if not isinstance(item, dict) or not 1 <= len(str(item.get("description") or "")) <= 128:
                raise ValueError
            quantity = Decimal(str(item["quantity"]))
            value, _ = _parse_amount(item.get("amount"), "receipt.items.amount")
            vat = int(item["vat_code"])
            if quantity <= 0 or not 1 <= vat <= 12:
                raise ValueError
        except (KeyError, ValueError, TypeError, InvalidOperation, _ApiError):
            raise _bad("Receipt is missing or illegal", "receipt.items") from None
        items_total += (quantity * value).quantize(_CENT, ROUND_HALF_UP)
    if items_total != total:
        raise _bad("Receipt is missing or illegal: items total %s does not match amount %s" % (items_total, total),
                   "receipt.items")


# ----------------------------------------------------------------------------- HTTP plumbing


class _Server(ThreadingHTTPServer):
    request_queue_size = 128      # bursts of concurrent re-fetches; the default backlog is 5
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    fake: FakeYooKassa


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeYooKassa/1.0"
    sys_version = ""

    def setup(self):
        super().setup()
        with self.server.fake._lock:
            self.server.fake._connections.add(self.connection)

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        with self.server.fake._lock:
            self.server.fake._connections.discard(self.connection)

    def log_message(self, format, *args):
        pass

    def _serve(self):
        fake: FakeYooKassa = self.server.fake
        self.close_connection = True
        length = int(self.headers.get("Content-Length") or 0)
        raw_body = self.rfile.read(length) if length > 0 else b""
        response = fake._handle(self.command, self.path, dict(self.headers.items()), raw_body)
        if response.fault == "hang":
            fake._stopping.wait(fake.hang_seconds)
            self._drop()
            return
        if response.fault == "close":
            self._drop()
            return
        self.send_response(response.status)
        if response.content_type:
            self.send_header("Content-Type", response.content_type)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def _drop(self):
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _serve


# ----------------------------------------------------------------------------- pytest fixture


@pytest.fixture
def fake_yookassa():
    """A started ``FakeYooKassa`` (shop "123456", secret "test_secret") with the global
    ``yookassa.Configuration`` pointed at it; stopped after the test."""
    fake = FakeYooKassa().start()
    try:
        fake.configure_sdk()
    except ImportError:  # pragma: no cover - the SDK is a runtime dependency
        pass
    try:
        yield fake
    finally:
        fake.stop()
