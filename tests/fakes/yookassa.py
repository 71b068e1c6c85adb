"""A local fake of the YooKassa API v3 (the part Media Lab uses), for the real ``yookassa`` SDK.

::

    with FakeYooKassa() as fake:
        fake.configure_sdk()                      # Configuration.configure(..., api_url=fake.api_url)
        p = Payment.create({...}, idempotency_key=order_id)
        fake.succeed(p.id)
        fake.notify("payment.succeeded", p.id, "http://127.0.0.1:8080/yookassa/webhook", source_ip="185.71.76.1")

Spec: docs/REFERENCES.md §4; object shapes follow tests/fixtures/yookassa/. HTTP: tests/fakes/base.py.

Faithful:

* Basic auth ``shop_id:secret_key`` (else 401 ``invalid_credentials``). Success is HTTP 200; errors
  are ``{"type": "error", "id", "code", "description"[, "parameter"]}`` with 400/401/404/429/500.
* Ids shaped like real ones (``2e8dd95a-000f-5000-a000-1e3515f51c18``), ISO-8601 UTC timestamps with
  milliseconds and ``Z``, money ``{"value": "299.00", "currency": "RUB"}``.
* ``Idempotence-Key`` is required on every POST (≤ 64 chars). The same key with the same method,
  path and body replays the stored answer (status and body) for 24 h; with anything else it is
  400 «Idempotence key duplicated». Answers below 500 are stored; injected faults are not.
* ``POST /v3/payments``: amount ``^\\d+\\.\\d{2}$`` > 0 in RUB, description ≤ 128, metadata ≤ 16
  string values (key ≤ 32, value ≤ 512), ``capture`` a bool, redirect confirmation with
  ``return_url``. ``receipts_required=True``: a payment without ``receipt`` is 400 (parameter
  ``receipt``); a sent receipt needs a customer email/phone and valid items (assumption: their total
  equals the amount). ``GET /v3/payments/{id}``; ``POST /v3/payments/{id}/capture`` of a
  ``waiting_for_capture`` payment; ``POST /v3/refunds`` (succeeds at once, of a succeeded payment, up
  to what is left of it, description ≤ 250; ``receipts_required=True``: a partial refund needs a
  ``receipt`` for its amount, a full one none); ``GET /v3/refunds/{id}``; ``GET /v3/me`` (the shop's
  settings); lists ``GET /v3/payments`` and ``/v3/refunds`` newest first with
  ``status``/``payment_id``, ``created_at.*``/``captured_at.*`` (gte, gt, lte, lt) filters,
  ``limit`` 1..100 and ``cursor``/``next_cursor``.
* Lifecycle: ``pending`` → ``succeed()`` → ``succeeded`` (``capture: true``) or
  ``waiting_for_capture`` (``expires_at`` + 7 days) → capture → ``succeeded``; ``cancel()`` →
  ``canceled`` with ``cancellation_details``. ``income_amount`` is 96.5 % of the amount; refunds
  (API or ``refund()``, one made in the merchant cabinet) update ``refunded_amount``/``refundable``. ``capture`` is not echoed (the real object has no such field).
* ``notify()`` POSTs the real envelope ``{"type": "notification", "event", "object"}`` (no signature).

Not modelled: other confirmation types, API cancel, the receipts and webhooks
APIs, 3-D Secure, expiry by time, https (so the SDK's 202 retry adapter never runs).

Faults (``fault(kind, times, path_prefix, after)``, checked before auth, never on ``/_test``): an
HTTP status as a JSON error (429 with ``Retry-After: 1``), ``"hang"`` (no answer for
``hang_seconds``, then the socket closes; ``stop()`` releases it), ``"close"`` (socket closed without
an answer) and ``"html502"`` (nginx page). ``path_prefix`` is ``"/v3/..."`` or ``"METHOD /v3/..."``;
``after=True`` processes the request and only replaces its answer ("it happened, the answer was
lost"). HTTP controls for a fake in another process (bench/): ``POST /_test/payments/{id}/succeed``
and ``GET /_test/payments/{id}``.
"""
from __future__ import annotations

import base64
import copy
import json
import re
import secrets
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

import pytest
import requests
from werkzeug.wrappers import Request, Response

from tests.fakes.base import DropConnection, FakeServer, json_response, nginx_page

INVALID_CREDENTIALS_DESCRIPTION = ("Incorrect password format in the Authorization header. "
                                   "Use Secret key issued in Merchant Profile as the password.")
IDEMPOTENCY_TTL = 24 * 3600.0
_AMOUNT_RE = re.compile(r"^\d+\.\d{2}$")
_CENT = Decimal("0.01")
_EPOCH_2000 = 946684800
_ERROR_CODES = {400: "invalid_request", 401: "invalid_credentials", 403: "forbidden", 404: "not_found",
                429: "too_many_requests", 500: "internal_server_error"}


def _ts(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (dt.microsecond // 1000)


def _money(value: Decimal) -> dict:
    return {"value": str(value.quantize(_CENT, ROUND_HALF_UP)), "currency": "RUB"}


class _ApiError(Exception):
    def __init__(self, status: int, description: str, parameter: str | None = None):
        super().__init__(description)
        self.status, self.description, self.parameter = status, description, parameter

    def response(self) -> Response:
        body = {"type": "error", "id": str(uuid.uuid4()), "code": _ERROR_CODES.get(self.status, "internal_server_error"),
                "description": self.description}
        if self.parameter is not None:
            body["parameter"] = self.parameter
        return json_response(body, self.status, {"Retry-After": "1"} if self.status == 429 else None)


def _bad(description: str, parameter: str | None = None) -> _ApiError:
    return _ApiError(400, description, parameter)


class FakeYooKassaError(ValueError):
    """A test control was misused: unknown object (status 404) or wrong state/input (400)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class FakeYooKassa(FakeServer):
    """Fake YooKassa API v3. Read ``payments``/``refunds`` (id → object), ``receipts`` (payment or
    refund id → receipt as sent) and ``requests_log`` in assertions; they change under ``_lock``."""

    name = "FakeYooKassa"

    def __init__(self, shop_id: str = "123456", secret_key: str = "test_secret", *, receipts_required: bool = False,
                 hang_seconds: float = 30.0, port: int = 0):
        super().__init__(port)
        self.shop_id, self.secret_key = str(shop_id), str(secret_key)
        self.receipts_required = receipts_required
        self.hang_seconds = hang_seconds
        self.payments: dict[str, dict] = {}
        self.refunds: dict[str, dict] = {}
        self.receipts: dict[str, dict] = {}
        self._idempotency: dict[str, tuple] = {}
        self._faults: list[dict] = []
        self._capture: dict[str, bool] = {}
        self._order: dict[str, int] = {}

    @property
    def api_url(self) -> str:
        return self.url + "/v3"

    def configure_sdk(self) -> None:
        """Point the global ``yookassa.Configuration`` at this fake."""
        from yookassa import Configuration

        Configuration.configure(self.shop_id, self.secret_key, api_url=self.api_url)

    # ------------------------------------------------------------------ test controls

    def succeed(self, payment_id: str) -> dict:
        """The user paid: ``pending`` → ``succeeded`` (``capture: true``) or ``waiting_for_capture``;
        ``waiting_for_capture`` → ``succeeded``. Returns a copy of the payment."""
        with self._lock:
            payment = self._control_payment(payment_id)
            if payment["status"] == "pending" and not self._capture[payment_id]:
                payment.update(status="waiting_for_capture", paid=True, expires_at=_ts(datetime.now(UTC) + timedelta(days=7)))
                payment.pop("confirmation", None)
                self._add_card(payment)
            elif payment["status"] in ("pending", "waiting_for_capture"):
                self._add_card(payment)
                self._mark_succeeded(payment)
            else:
                raise FakeYooKassaError("payment %s is %s, cannot succeed" % (payment_id, payment["status"]))
            return copy.deepcopy(payment)

    def cancel(self, payment_id: str, party: str = "yoo_money", reason: str = "expired_on_confirmation") -> dict:
        """YooKassa cancels a ``pending``/``waiting_for_capture`` payment. Returns a copy."""
        with self._lock:
            payment = self._control_payment(payment_id)
            if payment["status"] not in ("pending", "waiting_for_capture"):
                raise FakeYooKassaError("payment %s is %s, cannot cancel" % (payment_id, payment["status"]))
            payment.update(status="canceled", paid=False, refundable=False,
                           cancellation_details={"party": party, "reason": reason})
            for name in ("expires_at", "confirmation"):
                payment.pop(name, None)
            return copy.deepcopy(payment)

    def refund(self, payment_id: str, amount_value: str, description: str | None = None) -> dict:
        """A refund made in the merchant cabinet (same rules as ``POST /v3/refunds``). Returns a copy."""
        with self._lock:
            self._control_payment(payment_id)
            body = {"payment_id": payment_id, "amount": {"value": amount_value, "currency": "RUB"}}
            try:
                return self._create_refund(dict(body, **({"description": description} if description else {})),
                                           cabinet=True)
            except _ApiError as error:
                raise FakeYooKassaError("%s (%s)" % (error.description, error.parameter)) from None

    def notify(self, event: str, object_id: str, url: str, times: int = 1, concurrency: int = 1,
               source_ip: str | None = None, timeout: float = 10.0) -> list[int]:
        """POST the notification for the current payment (``refund.*``: refund) to ``url`` ``times``
        times from ``concurrency`` threads; return the HTTP statuses in order (0: no answer).
        ``source_ip`` is sent as ``X-Forwarded-For``."""
        with self._lock:
            table = self.refunds if event.startswith("refund.") else self.payments
            if object_id not in table:
                raise FakeYooKassaError("no object %s" % object_id, 404)
            data = json.dumps({"type": "notification", "event": event, "object": table[object_id]}).encode()
        headers = {"Content-Type": "application/json", **({"X-Forwarded-For": source_ip} if source_ip else {})}
        statuses = [0] * times
        indexes = iter(range(times))
        take = threading.Lock()

        def deliver():
            with requests.Session() as session:
                while True:
                    with take:
                        index = next(indexes, None)
                    if index is None:
                        return
                    try:
                        statuses[index] = session.post(url, data=data, headers=headers, timeout=timeout).status_code
                    except requests.RequestException:
                        pass

        threads = [threading.Thread(target=deliver, daemon=True) for _ in range(max(1, min(concurrency, times)))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return statuses

    def fault(self, kind, times: int = 1, path_prefix: str | None = None, after: bool = False) -> None:
        """The next ``times`` API requests matching ``path_prefix`` fail with ``kind`` (see the
        module docstring)."""
        if kind not in ("hang", "close", "html502") and not (isinstance(kind, int) and 400 <= kind <= 599):
            raise FakeYooKassaError("unknown fault kind %r" % (kind,))
        method, _, prefix = (path_prefix or "/v3/").rpartition(" ")
        with self._lock:
            self._faults.append({"kind": kind, "times": int(times), "method": method.upper(), "prefix": prefix,
                                 "after": after})

    # ------------------------------------------------------------------ state (lock held)

    def _control_payment(self, payment_id: str) -> dict:
        if payment_id not in self.payments:
            raise FakeYooKassaError("no payment %s" % payment_id, 404)
        return self.payments[payment_id]

    def _new_id(self, segment: str) -> str:
        return "%08x-%s-5000-%s-%s" % ((int(time.time()) - _EPOCH_2000) & 0xFFFFFFFF, segment,
                                       secrets.choice(("8000", "9000", "a000", "b000")), secrets.token_hex(6))

    @staticmethod
    def _add_card(payment: dict) -> None:
        payment["payment_method"] = {
            "type": "bank_card", "id": payment["id"], "saved": False, "title": "Bank card *4444",
            "card": {"first6": "555555", "last4": "4444", "expiry_year": "2030", "expiry_month": "12",
                     "card_type": "MasterCard", "issuer_country": "RU"}}

    @staticmethod
    def _mark_succeeded(payment: dict) -> None:
        amount = Decimal(payment["amount"]["value"])
        payment.update(status="succeeded", paid=True, captured_at=_ts(datetime.now(UTC)),
                       income_amount=_money(amount * Decimal("0.965")), refunded_amount=_money(Decimal(0)),
                       refundable=True)
        for name in ("expires_at", "confirmation"):
            payment.pop(name, None)
        if "receipt_registration" in payment:
            payment["receipt_registration"] = "succeeded"

    # ------------------------------------------------------------------ HTTP

    def handle(self, request: Request) -> Response:
        path = request.path
        if path.startswith("/_test/"):
            return self._test_control(request.method, path.split("/")[2:])
        fault = None
        with self._lock:
            for candidate in self._faults:
                if path.startswith(candidate["prefix"]) and candidate["method"] in ("", request.method):
                    fault = candidate
                    fault["times"] -= 1
                    if fault["times"] <= 0:
                        self._faults.remove(fault)
                    break
        if fault is None or fault["after"]:
            try:
                response = self._api(request, path)
            except _ApiError as error:
                response = error.response()
        if fault is None:
            return response
        if fault["kind"] == "hang":
            self.hang(self.hang_seconds)
        if fault["kind"] == "close":
            raise DropConnection
        if fault["kind"] == "html502":
            return nginx_page(502)
        return _ApiError(fault["kind"], "Injected error %d" % fault["kind"]).response()

    def _test_control(self, method: str, segments: list) -> Response:
        try:
            if method == "POST" and len(segments) == 3 and segments[0] == "payments" and segments[2] == "succeed":
                return json_response(self.succeed(segments[1]))
            if method == "GET" and len(segments) == 2 and segments[0] == "payments":
                with self._lock:
                    return json_response(copy.deepcopy(self._control_payment(segments[1])))
        except FakeYooKassaError as error:
            return json_response({"error": str(error)}, error.status)
        return json_response({"error": "unknown control"}, 404)

    def _api(self, request: Request, path: str) -> Response:
        auth = request.authorization
        if auth is None or auth.type != "basic" or (auth.username, auth.password) != (self.shop_id, self.secret_key):
            raise _ApiError(401, INVALID_CREDENTIALS_DESCRIPTION, "Authorization")
        segments = path.strip("/").split("/")[1:]
        method = request.method
        if segments in (["payments"], ["refunds"]) and method == "GET":
            return json_response(self._list(self.payments if segments == ["payments"] else self.refunds, request.args))
        if len(segments) == 2 and segments[0] in ("payments", "refunds") and method == "GET":
            with self._lock:
                table = self.payments if segments[0] == "payments" else self.refunds
                if segments[1] not in table:
                    what = segments[0][:-1]
                    raise _ApiError(404, "%s doesn't exist or access denied" % what.title(), what + "_id")
                return json_response(copy.deepcopy(table[segments[1]]))
        if segments == ["payments"] and method == "POST":
            return self._idempotent(request, self._create_payment)
        if segments == ["me"] and method == "GET":       # shop settings (SDK: Settings.get_account_settings)
            return json_response({"account_id": self.shop_id, "test": True, "fiscalization_enabled": False,
                                  "payment_methods": ["bank_card", "yoo_money", "sbp"], "status": "enabled"})
        if segments == ["refunds"] and method == "POST":
            return self._idempotent(request, self._create_refund)
        if len(segments) == 3 and segments[0] == "payments" and segments[2] == "capture" and method == "POST":
            return self._idempotent(request, lambda body: self._capture_payment(segments[1]))
        raise _ApiError(404, "Path not found")

    def _idempotent(self, request: Request, action) -> Response:
        key = request.headers.get("Idempotence-Key")
        if not key or len(key) > 64:
            raise _bad("Idempotence-Key header is missing or longer than 64", "Idempotence-Key")
        try:
            body = json.loads(request.get_data()) if request.get_data().strip() else None
        except ValueError:
            raise _bad("Request body is not valid JSON") from None
        canonical = json.dumps([request.method, request.path, body], sort_keys=True)
        with self._lock:
            stored = self._idempotency.get(key)
            if stored is not None and time.monotonic() - stored[0] < IDEMPOTENCY_TTL:
                if stored[1] != canonical:
                    raise _bad("Idempotence key duplicated", "Idempotence-Key")
                return Response(stored[3], stored[2], content_type="application/json")
            try:
                response = json_response(action(body))
            except _ApiError as error:
                response = error.response()
            if response.status_code < 500:
                self._idempotency[key] = (time.monotonic(), canonical, response.status_code, response.get_data())
            return response

    def _list(self, table: dict, query) -> dict:
        limit = query.get("limit", "10")
        if not limit.isdigit() or not 1 <= int(limit) <= 100:
            raise _bad("Invalid limit value. Allowed values: 1..100", "limit")
        checks = []
        for name, value in query.items():
            field, _, op = name.partition(".")
            if field in ("created_at", "captured_at") and op in ("gte", "gt", "lte", "lt"):
                try:
                    bound = datetime.fromisoformat(value)
                except ValueError:
                    raise _bad("Invalid date-time value", name) from None
                bound = bound if bound.tzinfo else bound.replace(tzinfo=UTC)
                checks.append((field, {"gte": "__ge__", "gt": "__gt__", "lte": "__le__", "lt": "__lt__"}[op], bound))
            elif name in ("status", "payment_id") and value:
                checks.append((name, "__eq__", value))
        try:
            before = int(base64.urlsafe_b64decode(query["cursor"] + "==")) if query.get("cursor") else None
        except ValueError:
            raise _bad("Invalid cursor value", "cursor") from None
        with self._lock:
            selected = [obj for obj in sorted(table.values(), key=lambda o: self._order[o["id"]], reverse=True)
                        if (before is None or self._order[obj["id"]] < before) and all(
                            obj.get(field) is not None and getattr(
                                datetime.fromisoformat(obj[field]) if field.endswith("_at") else obj[field], op)(bound)
                            for field, op, bound in checks)]
            result = {"type": "list", "items": copy.deepcopy(selected[:int(limit)])}
            if len(selected) > int(limit):
                last = self._order[selected[int(limit) - 1]["id"]]
                result["next_cursor"] = base64.urlsafe_b64encode(str(last).encode()).decode().rstrip("=")
            return result

    def _create_payment(self, body) -> dict:
        if not isinstance(body, dict):
            raise _bad("Request body must be a JSON object")
        amount = _parse_amount(body.get("amount"), "amount")
        description = body.get("description")
        if description is not None and (not isinstance(description, str) or len(description) > 128):
            raise _bad("Invalid description value. Max length is 128", "description")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or len(metadata) > 16:
            raise _bad("Invalid metadata value", "metadata")
        for key, value in metadata.items():
            if len(key) > 32 or not (value is None or isinstance(value, str) and len(value) <= 512):
                raise _bad("Invalid metadata value of %r: strings of up to 512 characters" % key, "metadata")
        if not isinstance(body.get("capture", False), bool):
            raise _bad("Invalid capture value", "capture")
        receipt = body.get("receipt")
        if receipt is None and self.receipts_required:
            raise _bad("Receipt is missing or illegal", "receipt")
        if receipt is not None:
            _check_receipt(receipt, amount)
        confirmation = body.get("confirmation")
        if confirmation is not None and (not isinstance(confirmation, dict) or confirmation.get("type") != "redirect"):
            raise _bad("Invalid confirmation type (the fake knows redirect only)", "confirmation.type")
        pid = self._new_id("000f")
        payment = {"id": pid, "status": "pending", "amount": _money(amount)}
        if description is not None:
            payment["description"] = description
        payment.update(recipient={"account_id": self.shop_id, "gateway_id": "2323500"},
                       created_at=_ts(datetime.now(UTC)))
        if confirmation is not None:
            return_url = confirmation.get("return_url")
            if not isinstance(return_url, str) or not 1 <= len(return_url) <= 2048:
                raise _bad("Parameter return_url is required for confirmation type redirect", "confirmation.return_url")
            payment["confirmation"] = {"type": "redirect", "return_url": return_url,
                                       "confirmation_url": "%s/checkout/%s" % (self.url, pid)}
        payment.update(test=True, paid=False, refundable=False, metadata=metadata)
        if receipt is not None:
            payment["receipt_registration"] = "pending"
            self.receipts[pid] = copy.deepcopy(receipt)
        self.payments[pid] = payment
        self._capture[pid] = body.get("capture", False)
        self._order[pid] = len(self._order)
        return copy.deepcopy(payment)

    def _create_refund(self, body, cabinet: bool = False) -> dict:
        """Refunds succeed at once (never pending), of a succeeded payment, up to what is left of it.
        With ``receipts_required`` a partial API refund needs a receipt for its amount (the cabinet
        asks for the items on screen)."""
        if not isinstance(body, dict):
            raise _bad("Request body must be a JSON object")
        payment = self.payments.get(body.get("payment_id"))
        if payment is None:
            raise _bad("Payment doesn't exist or access denied", "payment_id")
        if payment["status"] != "succeeded":
            raise _bad("Payment has status %s. You can only refund a succeeded payment" % payment["status"], "payment_id")
        amount = _parse_amount(body.get("amount"), "amount")
        receipt = body.get("receipt")
        partial = amount != Decimal(payment["amount"]["value"])
        if receipt is not None or (self.receipts_required and partial and not cabinet):
            _check_receipt(receipt, amount)       # a partial refund needs its receipt; a full one takes the payment's
        refunded = Decimal(payment["refunded_amount"]["value"]) + amount
        if refunded > Decimal(payment["amount"]["value"]):
            raise _bad("Refund amount exceeds the amount available for refund", "amount.value")
        description = body.get("description")
        if description is not None and (not isinstance(description, str) or len(description) > 250):
            raise _bad("Invalid description value. Max length is 250", "description")
        rid = self._new_id("0015")
        refund = {"id": rid, "payment_id": payment["id"], "status": "succeeded", "amount": _money(amount),
                  "created_at": _ts(datetime.now(UTC)), **({"description": description} if description else {})}
        self.refunds[rid] = refund
        if receipt is not None:
            self.receipts[rid] = copy.deepcopy(receipt)
        self._order[rid] = len(self._order)
        payment.update(refunded_amount=_money(refunded), refundable=refunded < Decimal(payment["amount"]["value"]))
        return copy.deepcopy(refund)

    def _capture_payment(self, payment_id: str) -> dict:
        payment = self.payments.get(payment_id)
        if payment is None:
            raise _ApiError(404, "Payment doesn't exist or access denied", "payment_id")
        if payment["status"] != "waiting_for_capture":
            raise _bad("Payment has status %s. You can only capture a payment with status waiting_for_capture"
                       % payment["status"], "payment_id")
        self._mark_succeeded(payment)
        return copy.deepcopy(payment)


def _parse_amount(amount, param: str) -> Decimal:
    if not isinstance(amount, dict) or not isinstance(amount.get("value"), str) or not _AMOUNT_RE.match(amount["value"]):
        raise _bad('Invalid amount value. Use a string with two decimals, e.g. "100.00"', param + ".value")
    if Decimal(amount["value"]) <= 0:
        raise _bad("Invalid amount value. The amount must be greater than 0", param + ".value")
    if amount.get("currency") != "RUB":
        raise _bad("Currency %r is not supported by this shop" % (amount.get("currency"),), param + ".currency")
    return Decimal(amount["value"])


def _check_receipt(receipt, total: Decimal) -> None:
    customer = receipt.get("customer") if isinstance(receipt, dict) else None
    if not isinstance(customer, dict) or not (customer.get("email") or customer.get("phone")):
        raise _bad("Receipt is missing or illegal", "receipt.customer")
    items, items_total = receipt.get("items"), Decimal(0)
    try:
        if not isinstance(items, list) or not 1 <= len(items) <= 100:
            raise ValueError
        for item in items:
            quantity = Decimal(str(item["quantity"]))
            if not 1 <= len(item["description"]) <= 128 or quantity <= 0 or not 1 <= int(item["vat_code"]) <= 12:
                raise ValueError
            items_total += (quantity * _parse_amount(item["amount"], "receipt.items.amount")).quantize(_CENT)
    except (KeyError, ValueError, TypeError, InvalidOperation, _ApiError):
        raise _bad("Receipt is missing or illegal", "receipt.items") from None
    if items_total != total:
        raise _bad("Receipt is missing or illegal: items total %s != amount %s" % (items_total, total), "receipt.items")


@pytest.fixture
def fake_yookassa():
    """A started ``FakeYooKassa`` (shop "123456", secret "test_secret") with the global
    ``yookassa.Configuration`` pointed at it; stopped after the test."""
    with FakeYooKassa() as fake:
        fake.configure_sdk()
        yield fake
