"""The local fake YooKassa (tests/fakes/yookassa.py), driven through the real `yookassa` SDK."""
from __future__ import annotations

import base64
import functools
import json
import threading
import time

import pytest
import requests
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response
from yookassa import Configuration, Payment, Refund, Settings
from yookassa.client import ApiClient
from yookassa.domain.exceptions import (
    BadRequestError,
    InternalServerError,
    NotFoundError,
    TooManyRequestsError,
    UnauthorizedError,
)
from yookassa.domain.notification import WebhookNotificationFactory

from tests.fakes.yookassa import INVALID_CREDENTIALS_DESCRIPTION, FakeYooKassa, FakeYooKassaError

RETURN_URL = "https://t.me/medialab_bot"


def _params(value="299.00", capture=True, **extra):
    params = {"amount": {"value": value, "currency": "RUB"}, "capture": capture,
              "confirmation": {"type": "redirect", "return_url": RETURN_URL},
              "description": "Пополнение баланса: 299 кредитов",
              "metadata": {"user_id": "123456789", "order_id": "order-1"}}
    params.update(extra)
    return params


def _raw_post(fake, path, body, key="raw-key", auth=("123456", "test_secret")):
    headers = {"Content-Type": "application/json", **({"Idempotence-Key": key} if key is not None else {})}
    return requests.post(fake.api_url + path, data=json.dumps(body), headers=headers, auth=auth, timeout=5)


@pytest.fixture
def receiver():
    """A webhook endpoint recording (headers, JSON body) and answering ``status``."""
    state = {"status": 200, "deliveries": []}

    def app(environ, start_response):
        request = Request(environ)
        state["deliveries"].append((dict(request.headers), request.get_json()))
        return Response(status=state["status"])(environ, start_response)

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    state["url"] = "http://127.0.0.1:%d/yookassa/webhook" % server.server_port
    yield state
    server.shutdown()
    thread.join(5)
    server.server_close()


def test_create_payment_redirect_and_idempotent_replay(fake_yookassa):
    fake = fake_yookassa
    payment = Payment.create(_params(), idempotency_key="order-1")
    assert len(payment.id) == 36 and payment.id.count("-") == 4 and payment.id[9:13] == "000f"
    assert payment.status == "pending" and payment.paid is False and payment.refundable is False
    assert payment.test is True
    assert str(payment.amount.value) == "299.00" and payment.amount.currency == "RUB"
    assert payment.confirmation.type == "redirect" and payment.confirmation.return_url == RETURN_URL
    assert payment.confirmation.confirmation_url == "%s/checkout/%s" % (fake.url, payment.id)
    assert payment.metadata == {"user_id": "123456789", "order_id": "order-1", "cms_name": "yookassa_sdk_python"}
    assert payment.recipient.account_id == "123456"
    assert payment.created_at.endswith("Z") and len(payment.created_at) == 24
    assert "capture" not in fake.payments[payment.id]

    sent = fake.requests_log[-1]
    assert (sent["method"], sent["path"], sent["status"]) == ("POST", "/v3/payments", 200)
    assert sent["headers"]["Idempotence-Key"] == "order-1"
    assert base64.b64decode(sent["headers"]["Authorization"].split()[1]).decode() == "123456:test_secret"
    assert sent["body"]["metadata"]["cms_name"] == "yookassa_sdk_python"

    again = Payment.create(_params(), idempotency_key="order-1")
    assert again.id == payment.id and len(fake.payments) == 1
    with pytest.raises(BadRequestError) as err:
        Payment.create(_params(value="300.00"), idempotency_key="order-1")
    assert (err.value.content["code"], err.value.content["description"], err.value.content["parameter"]) == (
        "invalid_request", "Idempotence key duplicated", "Idempotence-Key")
    other = Payment.create(_params(), idempotency_key="order-2")
    assert other.id != payment.id and len(fake.payments) == 2


def test_a_replayed_error_is_the_same_answer(fake_yookassa):
    first = _raw_post(fake_yookassa, "/payments", _params(value="1.5"), key="bad")
    second = _raw_post(fake_yookassa, "/payments", _params(value="1.5"), key="bad")
    assert first.status_code == second.status_code == 400 and first.json() == second.json()   # same error id


def test_me_answers_the_shop_settings(fake_yookassa):
    settings = Settings.get_account_settings()
    assert settings["account_id"] == "123456" and settings["test"] is True and settings["status"] == "enabled"


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
    assert got.captured_at.endswith("Z") and got.confirmation is None
    with pytest.raises(FakeYooKassaError):
        fake_yookassa.succeed(payment.id)
    with pytest.raises(NotFoundError) as err:
        Payment.find_one("00000000-000f-5000-a000-000000000000")
    assert err.value.content["code"] == "not_found"
    with pytest.raises(NotFoundError):
        Refund.find_one("00000000-0015-5000-a000-000000000000")


def test_capture_flow_and_cancellation(fake_yookassa):
    payment = Payment.create(_params(capture=False), idempotency_key="k")
    with pytest.raises(BadRequestError):                    # only from waiting_for_capture
        Payment.capture(payment.id, idempotency_key="c0")
    fake_yookassa.succeed(payment.id)
    held = Payment.find_one(payment.id)
    assert held.status == "waiting_for_capture" and held.paid is True and held.expires_at
    captured = Payment.capture(payment.id, None, idempotency_key="c1")
    assert captured.status == "succeeded" and captured.paid is True and captured.captured_at
    assert captured.expires_at is None and str(captured.income_amount.value) == "288.54"

    pending = Payment.create(_params(), idempotency_key="k2")
    fake_yookassa.cancel(pending.id)
    got = Payment.find_one(pending.id)
    assert got.status == "canceled" and got.paid is False
    assert (got.cancellation_details.party, got.cancellation_details.reason) == ("yoo_money", "expired_on_confirmation")
    with pytest.raises(FakeYooKassaError):
        fake_yookassa.cancel(pending.id)
    held_again = Payment.create(_params(capture=False), idempotency_key="k3")
    fake_yookassa.succeed(held_again.id)
    assert fake_yookassa.succeed(held_again.id)["status"] == "succeeded"   # the user's "capture"


def test_cabinet_refunds_and_lists(fake_yookassa):
    payment = Payment.create(_params(), idempotency_key="k")
    with pytest.raises(FakeYooKassaError):                  # not succeeded yet
        fake_yookassa.refund(payment.id, "1.00")
    for n, body in enumerate(({"payment_id": "nope", "amount": {"value": "1.00", "currency": "RUB"}}, [])):
        answer = _raw_post(fake_yookassa, "/refunds", body, key="bad-%d" % n).json()
        assert answer["code"] == "invalid_request" and answer.get("parameter", "payment_id") == "payment_id"
    fake_yookassa.succeed(payment.id)
    first = fake_yookassa.refund(payment.id, "100.00", "partial")
    assert first["status"] == "succeeded" and len(first["id"]) == 36 and first["description"] == "partial"
    assert str(Payment.find_one(payment.id).refunded_amount.value) == "100.00"
    with pytest.raises(FakeYooKassaError):
        fake_yookassa.refund(payment.id, "199.01")
    long_text = {"payment_id": payment.id, "amount": {"value": "1.00", "currency": "RUB"}, "description": "x" * 251}
    assert _raw_post(fake_yookassa, "/refunds", long_text, key="long").json()["parameter"] == "description"
    with pytest.raises(BadRequestError) as err:           # the API: same rules
        Refund.create({"payment_id": payment.id, "amount": {"value": "199.01", "currency": "RUB"}}, idempotency_key="r0")
    assert err.value.content["parameter"] == "amount.value"
    api = Refund.create({"payment_id": payment.id, "amount": {"value": "99.00", "currency": "RUB"},
                         "description": "через API"}, idempotency_key="r1")
    assert api.status == "succeeded" and api.payment_id == payment.id and api.description == "через API"
    assert Refund.create({"payment_id": payment.id, "amount": {"value": "99.00", "currency": "RUB"},
                          "description": "через API"}, idempotency_key="r1").id == api.id   # replayed, not repeated
    rest = fake_yookassa.refund(payment.id, "100.00")
    got = Payment.find_one(payment.id)
    assert str(got.refunded_amount.value) == "299.00" and got.refundable is False
    assert str(Refund.find_one(rest["id"]).amount.value) == "100.00"
    assert [r.id for r in Refund.list({"payment_id": payment.id, "status": "succeeded"}).items] == [
        rest["id"], api.id, first["id"]]
    assert Refund.list({"created_at.gte": "2100-01-01T00:00:00.000Z"}).items == []


def test_list_payments_with_cursor_and_filters(fake_yookassa):
    ids = [Payment.create(_params(), idempotency_key="k%d" % i).id for i in range(3)]
    fake_yookassa.succeed(ids[0])
    page = Payment.list({"limit": 2})
    assert [p.id for p in page.items] == [ids[2], ids[1]] and page.next_cursor
    rest = Payment.list({"limit": 2, "cursor": page.next_cursor})
    assert [p.id for p in rest.items] == [ids[0]] and rest.next_cursor is None
    captured = fake_yookassa.payments[ids[0]]["captured_at"]
    assert [p.id for p in Payment.list({"status": "succeeded", "captured_at.gte": captured}).items] == [ids[0]]
    assert Payment.list({"status": "succeeded", "captured_at.lt": captured}).items == []
    created = fake_yookassa.payments[ids[1]]["created_at"]
    assert ids[1] in [p.id for p in Payment.list({"created_at.gte": created}).items]
    with pytest.raises(BadRequestError):
        Payment.list({"limit": 101})


def test_server_side_validation(fake_yookassa):
    fake = fake_yookassa
    assert _raw_post(fake, "/payments", _params(), key=None).json()["parameter"] == "Idempotence-Key"
    assert _raw_post(fake, "/payments", _params(), key="x" * 65).status_code == 400
    bad_amount = _raw_post(fake, "/payments", _params(value="10.5"))
    assert bad_amount.status_code == 400 and bad_amount.json()["parameter"] == "amount.value"
    assert _raw_post(fake, "/payments", _params(value="0.00"), key="k0").status_code == 400
    dollars = _params(amount={"value": "1.00", "currency": "USD"})
    assert _raw_post(fake, "/payments", dollars, key="k5").json()["parameter"] == "amount.currency"
    assert _raw_post(fake, "/payments", _params(description="x" * 129), key="k1").json()["parameter"] == "description"
    no_return = _params(confirmation={"type": "redirect"})
    assert _raw_post(fake, "/payments", no_return, key="k2").json()["parameter"] == "confirmation.return_url"
    assert _raw_post(fake, "/payments", _params(confirmation={"type": "qr"}), key="k6").status_code == 400
    assert _raw_post(fake, "/payments", _params(metadata={"user_id": 42}), key="k3").json()["parameter"] == "metadata"
    assert _raw_post(fake, "/payments", _params(capture="yes"), key="k4").json()["parameter"] == "capture"
    with pytest.raises(BadRequestError) as err:             # 16 own keys + the SDK's cms_name = 17
        Payment.create(_params(metadata={"k%d" % i: "v" for i in range(16)}))
    assert err.value.content["parameter"] == "metadata"
    assert Payment.create(_params(metadata={"k%d" % i: "v" for i in range(15)})).status == "pending"
    assert requests.get(fake.url + "/v3/webhooks", auth=("123456", "test_secret"), timeout=5).status_code == 404
    not_json = requests.post(fake.api_url + "/payments", data="{", auth=("123456", "test_secret"),
                             headers={"Idempotence-Key": "k7"}, timeout=5)
    assert not_json.json()["description"] == "Request body is not valid JSON"
    assert _raw_post(fake, "/payments", [], key="k8").json()["description"] == "Request body must be a JSON object"
    with pytest.raises(NotFoundError):
        Payment.capture("00000000-000f-5000-a000-000000000000", idempotency_key="c")
    for query in ({"created_at.gte": "yesterday"}, {"cursor": "%%%"}):
        with pytest.raises(BadRequestError):
            Payment.list(query)
    assert len(fake.payments) == 1


def test_receipts_required_mode():
    item = {"description": "Пакет 299 кредитов", "quantity": "1.00", "amount": {"value": "299.00", "currency": "RUB"},
            "vat_code": 1, "payment_mode": "full_prepayment", "payment_subject": "service"}
    receipt = {"customer": {"email": "user@example.com"}, "items": [item]}
    with FakeYooKassa(receipts_required=True) as fake:
        fake.configure_sdk()
        with pytest.raises(BadRequestError) as err:
            Payment.create(_params())
        assert (err.value.content["description"], err.value.content["parameter"]) == (
            "Receipt is missing or illegal", "receipt")
        no_contact = _params(receipt={**receipt, "customer": {"full_name": "X"}})
        assert _raw_post(fake, "/payments", no_contact).json()["parameter"] == "receipt.customer"
        wrong_total = _params(receipt={**receipt, "items": [dict(item, quantity="2.00")]})
        assert _raw_post(fake, "/payments", wrong_total, key="k2").json()["parameter"] == "receipt.items"
        for n, items in enumerate(([], [dict(item, vat_code=13)], [{"description": "x"}])):
            bad_items = _params(receipt={**receipt, "items": items})
            assert _raw_post(fake, "/payments", bad_items, key="k3-%d" % n).json()["parameter"] == "receipt.items"
        payment = Payment.create(_params(receipt=receipt))
        assert payment.receipt_registration == "pending"
        assert fake.receipts[payment.id]["customer"]["email"] == "user@example.com"
        fake.succeed(payment.id)
        assert fake.payments[payment.id]["receipt_registration"] == "succeeded"


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
    fake.fault("close")
    with pytest.raises(AttributeError):                     # the SDK's handling of a dropped connection
        Payment.find_one(payment.id)
    fake.fault("html502")
    with pytest.raises(requests.exceptions.JSONDecodeError):
        Payment.find_one(payment.id)
    assert Payment.find_one(payment.id).id == payment.id    # faults are one-shot
    fake.fault(500, times=2, path_prefix="POST /v3/payments")
    assert Payment.find_one(payment.id).status == "pending"  # a GET does not match
    for _ in range(2):
        with pytest.raises(InternalServerError):
            Payment.create(_params(), idempotency_key="k-new")
    assert len(fake.payments) == 1 and Payment.create(_params(), idempotency_key="k-new").id in fake.payments
    assert [e["status"] for e in fake.requests_log[-4:]] == [200, 500, 500, 200]
    with pytest.raises(FakeYooKassaError):
        fake.fault("explode")


def test_fault_after_processing_then_retry_with_same_key(fake_yookassa):
    fake_yookassa.fault(500, path_prefix="/v3/payments", after=True)
    with pytest.raises(InternalServerError):
        Payment.create(_params(), idempotency_key="order-9")
    assert len(fake_yookassa.payments) == 1                 # it happened, the answer was lost
    retried = Payment.create(_params(), idempotency_key="order-9")
    assert retried.id in fake_yookassa.payments and len(fake_yookassa.payments) == 1


def test_hang_until_the_client_times_out(fake_yookassa, monkeypatch):
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


def test_notify_delivers_duplicates(fake_yookassa, receiver):
    payment = Payment.create(_params(), idempotency_key="k")
    fake_yookassa.succeed(payment.id)
    statuses = fake_yookassa.notify("payment.succeeded", payment.id, receiver["url"], times=3, concurrency=2,
                                    source_ip="185.71.76.1")
    assert statuses == [200, 200, 200] and len(receiver["deliveries"]) == 3
    headers, body = receiver["deliveries"][0]
    assert headers["X-Forwarded-For"] == "185.71.76.1"
    assert body["type"] == "notification" and body["event"] == "payment.succeeded"
    parsed = WebhookNotificationFactory().create(body)
    assert parsed.object.id == payment.id and parsed.object.status == "succeeded" and parsed.object.paid
    refund = fake_yookassa.refund(payment.id, "10.00")
    assert fake_yookassa.notify("refund.succeeded", refund["id"], receiver["url"]) == [200]
    assert WebhookNotificationFactory().create(receiver["deliveries"][-1][1]).object.payment_id == payment.id
    receiver["status"] = 500
    assert fake_yookassa.notify("payment.succeeded", payment.id, receiver["url"], times=2) == [500, 500]
    assert fake_yookassa.notify("payment.succeeded", payment.id, "http://127.0.0.1:9/", timeout=2) == [0]
    with pytest.raises(FakeYooKassaError):
        fake_yookassa.notify("payment.succeeded", "nope", receiver["url"])


def test_http_controls_for_a_fake_in_another_process(fake_yookassa):
    payment = Payment.create(_params(), idempotency_key="k")
    control = fake_yookassa.url + "/_test/payments/"
    got = requests.post(control + payment.id + "/succeed", timeout=5)
    assert got.status_code == 200 and got.json()["status"] == "succeeded"
    assert requests.post(control + payment.id + "/succeed", timeout=5).status_code == 400
    assert requests.get(control + payment.id, timeout=5).json()["paid"] is True
    assert requests.get(control + "nope", timeout=5).status_code == 404
    assert requests.delete(control + payment.id, timeout=5).status_code == 404
    assert [e["path"] for e in fake_yookassa.requests_log] == ["/v3/payments"]    # controls are not logged
