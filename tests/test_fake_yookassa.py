"""Tests of the local fake YooKassa (tests/fakes/yookassa.py), driven through the real `yookassa` SDK."""
from __future__ import annotations

import base64
import functools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from yookassa import Configuration, Payment, Refund
from yookassa.client import ApiClient
from yookassa.domain.exceptions import (
    BadRequestError,
    InternalServerError,
    NotFoundError,
    ResponseProcessingError,
    TooManyRequestsError,
    UnauthorizedError,
)
from yookassa.domain.notification import WebhookNotificationFactory

from tests.fakes import yookassa as fake_module
from tests.fakes.yookassa import (
    INVALID_CREDENTIALS_DESCRIPTION,
    FakeYooKassa,
    FakeYooKassaError,
)

fake_yookassa = fake_module.fake_yookassa  # the pytest fixture, made visible to this module

RETURN_URL = "https://t.me/medialab_bot"


def _params(value="299.00", capture=True, **extra):
    params = {
        "amount": {"value": value, "currency": "RUB"},
        "capture": capture,
        "confirmation": {"type": "redirect", "return_url": RETURN_URL},
        "description": "Пополнение баланса: 299 кредитов",
        "metadata": {"user_id": "123456789", "order_id": "order-1"},
    }
    params.update(extra)
    return params


def _raw_post(fake, path, body, key="raw-key", auth=("123456", "test_secret")):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Idempotence-Key"] = key
    return requests.post(fake.api_url + path, data=json.dumps(body), headers=headers, auth=auth, timeout=5)


# --------------------------------------------------------------------------- a tiny webhook receiver


class _Receiver:
    """Stdlib HTTP server that records every POST (headers, JSON body) and answers `status`."""

    def __init__(self, status=200):
        self.status = status
        self.deliveries: list[tuple[dict, dict]] = []
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.cond:
                    receiver.deliveries.append((dict(self.headers.items()), body))
                    receiver.cond.notify_all()
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d/yookassa/webhook" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def wait(self, count, timeout=5.0):
        with self.cond:
            return self.cond.wait_for(lambda: len(self.deliveries) >= count, timeout=timeout)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = _Receiver()
    yield r
    r.close()


# --------------------------------------------------------------------------- payments


def test_create_payment_redirect_and_idempotent_replay(fake_yookassa):
    fake = fake_yookassa
    payment = Payment.create(_params(), idempotency_key="order-1")
    assert len(payment.id) == 36 and payment.id.count("-") == 4
    assert payment.status == "pending" and payment.paid is False and payment.refundable is False
    assert payment.test is True
    assert str(payment.amount.value) == "299.00" and payment.amount.currency == "RUB"
    assert payment.confirmation.type == "redirect"
    assert payment.confirmation.confirmation_url == "%s/checkout/%s" % (fake.url, payment.id)
    assert payment.confirmation.return_url == RETURN_URL
    assert payment.metadata == {"user_id": "123456789", "order_id": "order-1", "cms_name": "yookassa_sdk_python"}
    assert payment.recipient.account_id == "123456"
    assert payment.created_at.endswith("Z") and len(payment.created_at) == 24
    assert fake.capture_mode(payment.id) is True

    sent = fake.requests_log[-1]
    assert (sent["method"], sent["path"], sent["status"]) == ("POST", "/v3/payments", 200)
    assert sent["headers"]["Idempotence-Key"] == "order-1"
    assert sent["body"]["statements"] == [] and sent["body"]["transfers"] == []
    assert sent["body"]["metadata"]["cms_name"] == "yookassa_sdk_python"

    again = Payment.create(_params(), idempotency_key="order-1")
    assert again.id == payment.id and len(fake.payments) == 1

    with pytest.raises(BadRequestError) as err:
        Payment.create(_params(value="300.00"), idempotency_key="order-1")
    assert err.value.content["code"] == "invalid_request"
    assert err.value.content["description"] == "Idempotence key duplicated"
    assert err.value.content["parameter"] == "Idempotence-Key"
    assert len(fake.payments) == 1

    other = Payment.create(_params(), idempotency_key="order-2")
    assert other.id != payment.id and len(fake.payments) == 2


def test_wrong_secret_is_401_invalid_credentials(fake_yookassa):
    Configuration.configure("123456", "wrong_secret", api_url=fake_yookassa.api_url)
    with pytest.raises(UnauthorizedError) as err:
        Payment.create(_params(), idempotency_key="k")
    content = err.value.content
    assert content["code"] == "invalid_credentials" and content["parameter"] == "Authorization"
    assert content["description"] == INVALID_CREDENTIALS_DESCRIPTION
    assert content["type"] == "error" and len(content["id"]) == 36
    assert fake_yookassa.payments == {}


def test_find_one_after_succeed(fake_yookassa):
    payment = Payment.create(_params(value="9.99"), idempotency_key="k")
    fake_yookassa.succeed(payment.id)
    got = Payment.find_one(payment.id)
    assert got.status == "succeeded" and got.paid is True and got.refundable is True
    assert str(got.income_amount.value) == "9.64"          # 96.5 %, as in the captured fixture
    assert str(got.refunded_amount.value) == "0.00"
    assert got.payment_method.type == "bank_card" and got.payment_method.card.last4 == "4444"
    assert got.authorization_details.rrn and got.captured_at.endswith("Z")
    assert got.confirmation is None                         # gone once the payment left pending
    with pytest.raises(FakeYooKassaError):
        fake_yookassa.succeed(payment.id)
    with pytest.raises(NotFoundError) as err:
        Payment.find_one("00000000-000f-5000-a000-000000000000")
    assert err.value.content["code"] == "not_found"


def test_capture_flow(fake_yookassa):
    payment = Payment.create(_params(capture=False), idempotency_key="k")
    with pytest.raises(BadRequestError):                    # only from waiting_for_capture
        Payment.capture(payment.id)
    fake_yookassa.succeed(payment.id)
    held = Payment.find_one(payment.id)
    assert held.status == "waiting_for_capture" and held.paid is True and held.expires_at
    captured = Payment.capture(payment.id, {"amount": {"value": "299.00", "currency": "RUB"}})
    assert captured.status == "succeeded" and captured.paid is True and captured.captured_at
    assert captured.expires_at is None and str(captured.income_amount.value) == "288.54"


def test_cancel_by_merchant_and_by_yookassa(fake_yookassa):
    held = Payment.create(_params(capture=False), idempotency_key="k1")
    fake_yookassa.succeed(held.id)
    canceled = Payment.cancel(held.id)
    assert canceled.status == "canceled" and canceled.paid is False
    assert dict(canceled.cancellation_details) == {"party": "merchant", "reason": "canceled_by_merchant"}

    pending = Payment.create(_params(), idempotency_key="k2")
    with pytest.raises(BadRequestError):
        Payment.cancel(pending.id)
    fake_yookassa.cancel(pending.id)
    got = Payment.find_one(pending.id)
    assert got.status == "canceled" and got.cancellation_details.reason == "expired_on_confirmation"
    assert got.cancellation_details.party == "yoo_money"


def test_refund_partial_then_over_refund(fake_yookassa):
    payment = Payment.create(_params(), idempotency_key="k")
    with pytest.raises(BadRequestError):                    # not succeeded yet
        Refund.create({"payment_id": payment.id, "amount": {"value": "1.00", "currency": "RUB"}})
    fake_yookassa.succeed(payment.id)
    refund = Refund.create({"payment_id": payment.id, "amount": {"value": "100.00", "currency": "RUB"},
                            "description": "partial"}, idempotency_key="refund-1")
    assert refund.status == "succeeded" and len(refund.id) == 36 and refund.payment_id == payment.id
    assert fake_yookassa.requests_log[-1]["body"]["sources"] == []
    assert str(Payment.find_one(payment.id).refunded_amount.value) == "100.00"

    with pytest.raises(BadRequestError) as err:
        Refund.create({"payment_id": payment.id, "amount": {"value": "199.01", "currency": "RUB"}})
    assert err.value.content["parameter"] == "amount.value"

    cabinet = fake_yookassa.refund(payment.id, "199.00")   # the rest, from the merchant cabinet
    got = Payment.find_one(payment.id)
    assert str(got.refunded_amount.value) == "299.00" and got.refundable is False
    assert Refund.find_one(cabinet["id"]).amount.value == refund.amount.value + 99
    assert {r.id for r in Refund.list({"payment_id": payment.id}).items} == {refund.id, cabinet["id"]}


def test_list_payments_with_cursor(fake_yookassa):
    ids = [Payment.create(_params(), idempotency_key="k%d" % i).id for i in range(3)]
    fake_yookassa.succeed(ids[0])
    page = Payment.list({"limit": 2})
    assert [p.id for p in page.items] == [ids[2], ids[1]] and page.next_cursor
    rest = Payment.list({"limit": 2, "cursor": page.next_cursor})
    assert [p.id for p in rest.items] == [ids[0]] and rest.next_cursor is None
    assert [p.id for p in Payment.list({"status": "succeeded"}).items] == [ids[0]]
    created = fake_yookassa.payments[ids[1]]["created_at"]
    assert ids[1] in [p.id for p in Payment.list({"created_at.gte": created}).items]


# --------------------------------------------------------------------------- validation


def test_server_side_validation(fake_yookassa):
    fake = fake_yookassa
    assert _raw_post(fake, "/payments", _params(), key=None).json()["parameter"] == "Idempotence-Key"
    assert _raw_post(fake, "/payments", _params(), key="x" * 65).status_code == 400
    bad_amount = _raw_post(fake, "/payments", _params(value="10.5"))
    assert bad_amount.status_code == 400 and bad_amount.json()["parameter"] == "amount.value"
    assert _raw_post(fake, "/payments", _params(value="0.00"), key="k0").status_code == 400
    long_desc = _params(description="x" * 129)
    assert _raw_post(fake, "/payments", long_desc, key="k1").json()["parameter"] == "description"
    no_return = _params(confirmation={"type": "redirect"})
    assert _raw_post(fake, "/payments", no_return, key="k2").json()["parameter"] == "confirmation.return_url"
    int_meta = _params(metadata={"user_id": 42})
    assert _raw_post(fake, "/payments", int_meta, key="k3").json()["parameter"] == "metadata"
    with pytest.raises(BadRequestError) as err:             # 16 own keys + the SDK's cms_name = 17
        Payment.create(_params(metadata={"k%d" % i: "v" for i in range(16)}))
    assert err.value.content["parameter"] == "metadata"
    assert Payment.create(_params(metadata={"k%d" % i: "v" for i in range(15)})).status == "pending"
    assert _raw_post(fake, "/payments", _params(), key="ok", auth=("123456", "nope")).status_code == 401
    assert len(fake.payments) == 1


def test_receipts_required_mode():
    receipt = {"customer": {"email": "user@example.com"},
               "items": [{"description": "Пакет 299 кредитов", "quantity": "1.00",
                          "amount": {"value": "299.00", "currency": "RUB"}, "vat_code": 1,
                          "payment_mode": "full_prepayment", "payment_subject": "service"}]}
    with FakeYooKassa(receipts_required=True) as fake:
        fake.configure_sdk()
        with pytest.raises(BadRequestError) as err:
            Payment.create(_params())
        assert err.value.content["description"] == "Receipt is missing or illegal"
        assert err.value.content["parameter"] == "receipt"
        no_contact = _params(receipt={**receipt, "customer": {"full_name": "X"}})
        assert _raw_post(fake, "/payments", no_contact).json()["parameter"] == "receipt.customer"
        payment = Payment.create(_params(receipt=receipt))
        assert payment.receipt_registration == "pending"
        assert fake.receipts[payment.id]["customer"]["email"] == "user@example.com"


# --------------------------------------------------------------------------- faults


def test_faults_map_to_sdk_errors(fake_yookassa):
    fake = fake_yookassa
    payment = Payment.create(_params(), idempotency_key="k")

    fake.fault(500)
    with pytest.raises(InternalServerError):
        Payment.find_one(payment.id)
    fake.fault(429)
    with pytest.raises(TooManyRequestsError) as err:
        Payment.find_one(payment.id)
    assert err.value.content["code"] == "too_many_requests"
    fake.fault(202)
    with pytest.raises(ResponseProcessingError):
        Payment.find_one(payment.id)
    fake.fault("close")
    with pytest.raises(AttributeError):                     # the SDK's handling of a dropped connection
        Payment.find_one(payment.id)
    fake.fault("html502")
    with pytest.raises(requests.exceptions.JSONDecodeError):
        Payment.find_one(payment.id)
    assert Payment.find_one(payment.id).id == payment.id    # faults are one-shot

    fake.fault(500, times=2, path_prefix="POST /v3/refunds")
    assert Payment.find_one(payment.id).status == "pending"  # not matched, fault still pending
    assert fake.faults == [{"kind": 500, "times": 2, "path_prefix": "POST /v3/refunds", "after": False}]
    fake.clear_faults()


def test_fault_after_processing_then_retry_with_same_key(fake_yookassa):
    fake_yookassa.fault(500, path_prefix="/v3/payments", after=True)
    with pytest.raises(InternalServerError):
        Payment.create(_params(), idempotency_key="order-9")
    assert len(fake_yookassa.payments) == 1                 # it happened, the answer was lost
    retried = Payment.create(_params(), idempotency_key="order-9")
    assert retried.id in fake_yookassa.payments and len(fake_yookassa.payments) == 1


def test_hang_with_read_timeout_patch(fake_yookassa, monkeypatch):
    original = ApiClient.get_session

    def get_session(self):
        session = original(self)
        session.request = functools.partial(session.request, timeout=(2, 1))
        return session

    monkeypatch.setattr(ApiClient, "get_session", get_session)
    fake_yookassa.fault("hang", path_prefix="GET /v3/payments/")
    started = time.monotonic()
    with pytest.raises(AttributeError) as err:
        Payment.find_one("00000000-000f-5000-a000-000000000000")
    assert time.monotonic() - started < 2.5
    assert isinstance(err.value.__context__, requests.exceptions.ReadTimeout)
    # stop() (fixture teardown) releases the hanging handler at once


# --------------------------------------------------------------------------- notifications and controls


def test_notify_delivers_duplicates(fake_yookassa, receiver):
    payment = Payment.create(_params(), idempotency_key="k")
    fake_yookassa.succeed(payment.id)
    statuses = fake_yookassa.notify("payment.succeeded", payment.id, receiver.url, times=3, concurrency=2,
                                    source_ip="185.71.76.1")
    assert statuses == [200, 200, 200] and len(receiver.deliveries) == 3
    headers, body = receiver.deliveries[0]
    assert headers["X-Forwarded-For"] == "185.71.76.1"
    assert body["type"] == "notification" and body["event"] == "payment.succeeded"
    parsed = WebhookNotificationFactory().create(body)
    assert parsed.object.id == payment.id and parsed.object.status == "succeeded" and parsed.object.paid

    refund = fake_yookassa.refund(payment.id, "10.00")
    assert fake_yookassa.notify("refund.succeeded", refund["id"], receiver.url) == [200]
    assert WebhookNotificationFactory().create(receiver.deliveries[-1][1]).object.payment_id == payment.id

    receiver.status = 500
    assert fake_yookassa.notify("payment.succeeded", payment.id, receiver.url, times=2) == [500, 500]
    assert fake_yookassa.notify("payment.succeeded", payment.id, "http://127.0.0.1:9/", timeout=2) == [0]


def test_automatic_webhooks(fake_yookassa, receiver):
    fake_yookassa.webhook_url = receiver.url
    fake_yookassa.webhook_source_ip = "185.71.77.5"
    payment = Payment.create(_params(capture=False), idempotency_key="k")
    fake_yookassa.succeed(payment.id)
    Payment.capture(payment.id)
    assert receiver.wait(2)
    assert fake_yookassa.wait_for(lambda f: len(f.deliveries) == 2)
    events = sorted(body["event"] for _, body in receiver.deliveries)
    assert events == ["payment.succeeded", "payment.waiting_for_capture"]
    assert all(h["X-Forwarded-For"] == "185.71.77.5" for h, _ in receiver.deliveries)


def test_http_control_endpoints(fake_yookassa, receiver):
    fake = fake_yookassa
    payment = Payment.create(_params(), idempotency_key="k")
    control = fake.url + "/_test"

    page = requests.get("%s/checkout/%s" % (fake.url, payment.id), timeout=5)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"] and payment.id in page.text

    got = requests.post("%s/payments/%s/succeed" % (control, payment.id), timeout=5)
    assert got.status_code == 200 and got.json()["status"] == "succeeded"
    assert requests.post("%s/payments/%s/succeed" % (control, payment.id), timeout=5).status_code == 400
    refund = requests.post("%s/payments/%s/refund" % (control, payment.id), json={"amount": "5.00"}, timeout=5)
    assert refund.json()["amount"] == {"value": "5.00", "currency": "RUB"}

    sent = requests.post(control + "/notify", json={"event": "payment.succeeded", "id": payment.id,
                                                    "url": receiver.url, "times": 2}, timeout=10)
    assert sent.json() == {"statuses": [200, 200]} and len(receiver.deliveries) == 2

    assert requests.post(control + "/faults", json={"next": [500]}, timeout=5).json()["faults"][0]["kind"] == 500
    with pytest.raises(InternalServerError):
        Payment.find_one(payment.id)
    other = Payment.create(_params(), idempotency_key="k2")
    assert requests.post("%s/payments/%s/cancel" % (control, other.id),
                         json={"reason": "insufficient_funds"}, timeout=5).json()["cancellation_details"] == \
        {"party": "yoo_money", "reason": "insufficient_funds"}
    state = requests.get(control + "/state", timeout=5).json()
    assert set(state["payments"]) == {payment.id, other.id}
    log = requests.get(control + "/requests", timeout=5).json()
    assert all(not entry["path"].startswith("/_test") for entry in log)
    assert requests.post(control + "/payments/nope/succeed", timeout=5).status_code == 404
    assert requests.post(control + "/reset", timeout=5).json() == {"ok": True}
    assert fake.payments == {} and fake.requests_log == []


def test_checkout_pay_redirects_to_return_url(fake_yookassa):
    payment = Payment.create(_params(), idempotency_key="k")
    resp = requests.post("%s/checkout/%s" % (fake_yookassa.url, payment.id), data={"action": "pay"},
                         allow_redirects=False, timeout=5)
    assert resp.status_code == 303 and resp.headers["Location"] == RETURN_URL
    assert Payment.find_one(payment.id).status == "succeeded"


def test_basic_auth_header_is_what_the_sdk_sends(fake_yookassa):
    Payment.create(_params(), idempotency_key="k")
    auth = fake_yookassa.requests_log[-1]["headers"]["Authorization"]
    assert base64.b64decode(auth.split()[1]).decode() == "123456:test_secret"
