"""payments.py against the local fake YooKassa through the real `yookassa` SDK.

Notifications are handed to ``payments.handle_notification`` directly here (web.py has its own
tests for the HTTP side, ProxyFix and gunicorn). Every money-moving test ends with the ledger audit.
"""
from __future__ import annotations

import datetime
import json
import logging
import threading
import time
import uuid
from types import SimpleNamespace

import pytest
from yookassa import Configuration
from yookassa import Payment as YKPayment

import billing
import config
import payments
import promo
import texts
from models import (
    LedgerEntry,
    Payment,
    PromoCode,
    PromoRedemption,
    Refund,
    User,
    utcnow,
)
from tests.helpers import audit_ok, yookassa_fixture

YK_IP = "185.71.76.1"
FAULTS = [500, 429, "hang", "close", "html502"]


@pytest.fixture
def yk(database, fake_yookassa):
    """The test config pointed at the fake (1 s SDK timeout), default promo codes, one user."""
    cfg = config.configure(config.get().replace(yookassa_api_url=fake_yookassa.api_url, yookassa_timeout=1.0))
    fake_yookassa.hang_seconds = 5
    promo.seed_defaults()
    user, _ = billing.get_or_create_user(777000, first_name="Payer", free_operations=0)
    return SimpleNamespace(cfg=cfg, fake=fake_yookassa, user=user)


def envelope(fake, event: str, object_id: str, **changes) -> bytes:
    """The notification YooKassa would POST for the fake's current object (with `changes` applied)."""
    table = fake.refunds if event.startswith("refund.") else fake.payments
    obj = json.loads(json.dumps(table[object_id]))
    obj.update(changes)
    return json.dumps({"type": "notification", "event": event, "object": obj}).encode()


def notify(yk, event, object_id, cfg=None, ip=YK_IP) -> payments.NotificationOutcome:
    return payments.handle_notification(envelope(yk.fake, event, object_id), ip, cfg or yk.cfg)


def credits_of(user_id) -> int:
    return billing.get_balance(user_id).credits


def create_requests(fake) -> list[dict]:
    return [r for r in fake.requests_log if r["method"] == "POST" and r["path"] == "/v3/payments"]


def hold(fake, yookassa_id):
    """Make the fake payment paid-and-held (what a `capture: false` payment looks like after paying)."""
    with fake._lock:
        payment = fake.payments[yookassa_id]
        payment.update(status="waiting_for_capture", paid=True, expires_at="2030-01-01T00:00:00.000Z")
        payment.pop("confirmation", None)


def test_configure_sdk_sets_url_timeout_and_no_logger(yk):
    Configuration.configure("1", "x")              # resets api_url to production (notes §1.1)
    payments.configure_sdk(yk.cfg)
    assert Configuration.api_url == yk.fake.api_url
    assert (Configuration.account_id, Configuration.secret_key) == ("123456", "test_secret")
    assert Configuration.logger is None
    from yookassa.client import ApiClient
    session = ApiClient().get_session()
    assert session.request.keywords == {"timeout": (1.0, 1.0)}
    with pytest.raises(payments.PaymentsNotConfigured):
        payments.configure_sdk(yk.cfg.replace(yookassa_shop_id="", yookassa_secret_key=""))


# --- amounts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, credits", [("250", 250), (" 10 ", 10), ("100000", 100000), ("0100", 100)])
def test_parse_credits_accepts_whole_ascii_numbers(cfg, text, credits):
    assert payments.parse_credits(text, cfg) == credits


@pytest.mark.parametrize("text, code", [
    ("abc", "not_a_number"), ("-5", "too_small"), ("0", "too_small"), ("10.5", "not_a_number"),
    ("1e9", "not_a_number"), ("９９", "not_a_number"), ("²", "not_a_number"), ("😀", "not_a_number"),
    ("", "not_a_number"), ("   ", "not_a_number"), ("1 000", "not_a_number"), ("+50", "not_a_number"),
    ("9", "too_small"), ("100001", "too_big"), ("9" * 30, "too_big"), (None, "not_a_number"),
])
def test_parse_credits_rejects(cfg, text, code):
    with pytest.raises(payments.InvalidTopupAmount) as info:
        payments.parse_credits(text, cfg)
    assert info.value.code == code
    message = texts.t(info.value.text_key, "ru", **info.value.values)
    assert message and "{" not in message
    assert texts.t(info.value.text_key, "en", **info.value.values) != message


@pytest.mark.parametrize("credits", [0, 9, 100001, -5, 10.5, "100", True])
def test_bad_amounts_create_no_order(yk, credits):
    with pytest.raises(payments.InvalidTopupAmount):
        payments.create_topup(yk.user.id, credits)
    assert Payment.select().count() == 0
    assert yk.fake.requests_log == []


def test_amount_conversions():
    assert payments.kopecks_to_value(9000) == "90.00"
    assert payments.kopecks_to_value(105) == "1.05"
    assert payments.value_to_kopecks("90.00") == 9000
    assert payments.value_to_kopecks("1") == 100
    with pytest.raises(ValueError):
        payments.value_to_kopecks("1.005")
    with pytest.raises(ValueError):
        payments.value_to_kopecks("abc")


# --- creating a payment ----------------------------------------------------------------------

def test_create_topup_with_discount(yk):
    order = payments.create_topup(yk.user.id, 100, promo_code="welcome10")
    assert (order.credits, order.amount_kopecks, order.discount_percent, order.status) == (100, 9000, 10, "pending")
    [request] = create_requests(yk.fake)
    assert request["headers"]["Idempotence-Key"] == str(order.id)
    body = request["body"]
    assert body["amount"] == {"value": "90.00", "currency": "RUB"}
    assert body["capture"] is True
    assert body["confirmation"] == {"type": "redirect", "return_url": yk.cfg.yookassa_return_url}
    assert body["description"] == "Пополнение баланса Media Lab: 100 кредитов" and len(body["description"]) <= 128
    assert body["metadata"] == {"order_id": str(order.id), "user_id": "777000", "credits": "100",
                                "cms_name": "yookassa_sdk_python"}
    assert "receipt" not in body
    fake_payment = yk.fake.payments[order.yookassa_payment_id]
    assert fake_payment["amount"]["value"] == "90.00" and fake_payment["status"] == "pending"
    assert order.confirmation_url == fake_payment["confirmation"]["confirmation_url"]
    redemption = PromoRedemption.get()
    assert (redemption.payment_id, redemption.state, redemption.user_id) == (order.id, "reserved", yk.user.id)


def test_create_topup_refuses_bad_promo_before_any_write(yk):
    promo.add_code("WEEKFREE", "free_access", days=7, max_uses=5)
    for code, exc in (("NOPE", promo.UnknownCode), ("WEEKFREE", promo.WrongCodeKind)):
        with pytest.raises(exc):
            payments.create_topup(yk.user.id, 100, promo_code=code)
    assert Payment.select().count() == 0 and yk.fake.requests_log == []
    with pytest.raises(payments.PaymentsNotConfigured):
        payments.create_topup(yk.user.id, 100, cfg=yk.cfg.replace(yookassa_shop_id="", yookassa_secret_key=""))
    User.update(is_blocked=True).where(User.id == yk.user.id).execute()
    with pytest.raises(billing.UserBlocked):
        payments.create_topup(yk.user.id, 100)
    assert Payment.select().count() == 0


def test_retap_reuses_the_pending_order(yk):
    first = payments.create_topup(yk.user.id, 300, promo_code="SAVE20")
    again = payments.create_topup(yk.user.id, 300, promo_code="save20")
    assert again.id == first.id and again.confirmation_url == first.confirmation_url
    assert len(create_requests(yk.fake)) == 1 and Payment.select().count() == 1
    other = payments.create_topup(yk.user.id, 500)
    assert other.id != first.id and Payment.select().count() == 2


def test_retap_after_the_payment_ended_at_yookassa_makes_a_fresh_order(yk):
    first = payments.create_topup(yk.user.id, 100, promo_code="WELCOME10")
    yk.fake.cancel(first.yookassa_payment_id)                 # card declined; notification not here yet
    second = payments.create_topup(yk.user.id, 100, promo_code="WELCOME10")
    assert second.id != first.id and second.amount_kopecks == 9000
    assert Payment.get_by_id(first.id).status == "canceled"
    assert PromoRedemption.get().payment_id == second.id     # the code moved to the new order
    yk.fake.succeed(second.yookassa_payment_id)               # paid; notification lost
    with pytest.raises(promo.CodeAlreadyUsed):                # the re-check credits it: code used up
        payments.create_topup(yk.user.id, 100, promo_code="WELCOME10")
    assert Payment.get_by_id(second.id).status == "succeeded" and credits_of(yk.user.id) == 100
    third = payments.create_topup(yk.user.id, 100)
    assert third.id not in (first.id, second.id) and Payment.select().count() == 3
    audit_ok()


def test_create_topup_with_receipt(yk):
    cfg = config.configure(yk.cfg.replace(yookassa_receipts=True))
    yk.fake.receipts_required = True
    with pytest.raises(payments.EmailRequired):
        payments.create_topup(yk.user.id, 100, cfg=cfg)
    for bad in ("", "no-at-sign", "a@b", "a b@example.com", "x@exa mple.com", "a" * 250 + "@example.com"):
        with pytest.raises(payments.InvalidEmail):
            payments.set_email(yk.user.id, bad)
    assert payments.set_email(yk.user.id, " Buyer.Name@Example.COM ").email == "Buyer.Name@example.com"
    assert Payment.select().count() == 0
    order = payments.create_topup(yk.user.id, 100, promo_code="WELCOME10", cfg=cfg)
    receipt = yk.fake.receipts[order.yookassa_payment_id]
    assert receipt["customer"] == {"email": "Buyer.Name@example.com"}
    [item] = receipt["items"]
    assert item["amount"] == {"value": "90.00", "currency": "RUB"}
    assert (item["vat_code"], item["payment_mode"], item["payment_subject"]) == (1, "full_prepayment", "service")
    assert item["description"] == "Пополнение баланса Media Lab: 100 кредитов"


def test_a_partial_refund_carries_its_receipt_and_a_full_one_none(yk):
    """54-FZ with YooKassa's receipts: a partial refund must send the returned amount as a receipt
    (YooKassa refuses it otherwise); a full refund sends none (YooKassa reuses the payment's)."""
    cfg = config.configure(yk.cfg.replace(yookassa_receipts=True))
    yk.fake.receipts_required = True
    payments.set_email(yk.user.id, "buyer@example.com")
    orders = []
    for credits in (100, 200):
        order = payments.create_topup(yk.user.id, credits, cfg=cfg)
        yk.fake.succeed(order.yookassa_payment_id)
        notify(yk, "payment.succeeded", order.yookassa_payment_id)
        orders.append(Payment.get_by_id(order.id))
    partial = payments.refund_topup(orders[0].yookassa_payment_id, 2500, idempotency_key="r1", cfg=cfg)
    receipt = yk.fake.receipts[partial.refund_id]
    assert receipt["customer"] == {"email": "buyer@example.com"}
    [item] = receipt["items"]
    assert (item["amount"], float(item["quantity"])) == ({"value": "25.00", "currency": "RUB"}, 1.0)
    assert item["description"] == "Пополнение баланса Media Lab: 100 кредитов"
    rest = payments.refund_topup(orders[0].yookassa_payment_id, None, idempotency_key="r2", cfg=cfg)
    assert rest.kopecks == 7500 and rest.refund_id in yk.fake.receipts      # the rest is partial too
    full = payments.refund_topup(orders[1].yookassa_payment_id, None, idempotency_key="r3", cfg=cfg)
    assert full.kopecks == 20000 and full.refund_id not in yk.fake.receipts
    assert [r.status for r in (partial, rest, full)] == ["succeeded"] * 3
    assert credits_of(yk.user.id) == 0
    audit_ok()


@pytest.mark.parametrize("kind", FAULTS)
def test_create_faults_retry_with_one_key_then_a_retap_recovers(yk, kind):
    cfg = yk.cfg.replace(yookassa_timeout=0.5)
    yk.fake.fault(kind, times=payments.CREATE_ATTEMPTS, path_prefix="POST /v3/payments")
    started = time.monotonic()
    with pytest.raises(payments.ProviderUnavailable) as info:
        payments.create_topup(yk.user.id, 100, promo_code="WELCOME10", cfg=cfg)
    assert time.monotonic() - started < 10
    assert texts.t(info.value.text_key, "ru")
    [order] = list(Payment.select())
    assert (order.status, order.yookassa_payment_id) == ("pending", None)
    keys = [r["headers"]["Idempotence-Key"] for r in create_requests(yk.fake)]
    assert keys == [str(order.id)] * payments.CREATE_ATTEMPTS
    assert yk.fake.payments == {}
    # The fault has cleared: the same tap again re-uses the order and its key.
    again = payments.create_topup(yk.user.id, 100, promo_code="WELCOME10", cfg=cfg)
    assert again.id == order.id and again.yookassa_payment_id in yk.fake.payments
    assert Payment.select().count() == 1 and len(yk.fake.payments) == 1
    assert {r["headers"]["Idempotence-Key"] for r in create_requests(yk.fake)} == {str(order.id)}


def test_create_answer_lost_after_processing_is_replayed(yk):
    yk.fake.fault(500, times=1, path_prefix="POST /v3/payments", after=True)
    order = payments.create_topup(yk.user.id, 100)
    assert len(create_requests(yk.fake)) == 2
    assert list(yk.fake.payments) == [order.yookassa_payment_id]      # one YooKassa payment, not two


def test_create_rejected_cancels_the_order_and_frees_the_code(yk):
    yk.fake.fault(400, times=1, path_prefix="POST /v3/payments")
    with pytest.raises(payments.PaymentRejected):
        payments.create_topup(yk.user.id, 100, promo_code="WELCOME10")
    [order] = list(Payment.select())
    assert (order.status, order.cancel_reason) == ("canceled", "rejected")
    assert PromoRedemption.get().state == "released"
    assert payments.create_topup(yk.user.id, 100, promo_code="WELCOME10").amount_kopecks == 9000


# --- notifications ---------------------------------------------------------------------------

def test_full_flow_credits_once(yk):
    order = payments.create_topup(yk.user.id, 100, promo_code="WELCOME10")
    yk.fake.succeed(order.yookassa_payment_id)
    outcome = notify(yk, "payment.succeeded", order.yookassa_payment_id)
    assert outcome == payments.NotificationOutcome(200, order.id, "credited")
    assert credits_of(yk.user.id) == 100
    again = notify(yk, "payment.succeeded", order.yookassa_payment_id)
    assert (again.http_status, again.credited_payment_id, again.detail) == (200, None, "already_applied")
    assert credits_of(yk.user.id) == 100
    stored = Payment.get_by_id(order.id)
    assert stored.status == "succeeded" and stored.succeeded_at is not None and stored.test is True
    assert PromoRedemption.get().state == "consumed" and PromoCode.get(PromoCode.code == "WELCOME10").uses == 1
    [entry] = LedgerEntry.select().where(LedgerEntry.kind == "topup")
    assert (entry.reference, entry.idempotency_key, entry.amount) == (
        "payment:%s" % order.id, "topup:%s" % order.id, 100)
    assert [payments.claim_notification(order.id) for _ in range(3)] == [True, False, False]
    audit_ok()


def test_duplicates_in_threads_credit_once_and_claim_once(yk, database):
    order = payments.create_topup(yk.user.id, 300)
    yk.fake.succeed(order.yookassa_payment_id)
    body = envelope(yk.fake, "payment.succeeded", order.yookassa_payment_id)
    barrier = threading.Barrier(20)
    outcomes, claims = [], []
    # 5 s: 20 simultaneous re-fetches overflow the fake's listen backlog of 5; a dropped SYN is
    # retried by the kernel after 1 s.
    cfg = yk.cfg.replace(yookassa_timeout=5.0)

    def deliver():
        barrier.wait()
        outcomes.append(payments.handle_notification(body, YK_IP, cfg))
        claims.append(payments.claim_notification(order.id))
        database.close()

    threads = [threading.Thread(target=deliver) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(outcomes) == 20 and {o.http_status for o in outcomes} == {200}
    assert [o.credited_payment_id for o in outcomes if o.credited_payment_id] == [order.id]
    assert claims.count(True) == 1
    assert credits_of(yk.user.id) == 300
    audit_ok()


@pytest.mark.parametrize("name", ["payment.succeeded", "payment.canceled", "payment.waiting_for_capture",
                                  "refund.succeeded"])
def test_fixture_notifications_for_unknown_objects_change_nothing(yk, name, caplog):
    body = yookassa_fixture(name)
    with caplog.at_level(logging.WARNING, logger="payments"):
        outcome = payments.handle_notification(body, YK_IP, yk.cfg)
    assert (outcome.http_status, outcome.detail) == (200, "unknown_payment")
    assert any(r.getMessage().startswith("security:") for r in caplog.records)
    assert yk.fake.requests_log == []               # nothing worth an API call
    assert LedgerEntry.select().where(LedgerEntry.asset == "credits").count() == 0


def test_fixture_succeeded_for_our_order_is_verified_through_the_api(yk):
    """The captured real body, pointed at our order: only the re-fetched object counts."""
    order = payments.create_topup(yk.user.id, 100)
    body = json.loads(yookassa_fixture("payment.succeeded"))
    body["object"]["id"] = order.yookassa_payment_id     # says succeeded, but the API says pending
    outcome = payments.handle_notification(json.dumps(body).encode(), YK_IP, yk.cfg)
    assert (outcome.http_status, outcome.credited_payment_id, outcome.detail) == (200, None, "status_pending")
    assert Payment.get_by_id(order.id).status == "pending" and credits_of(yk.user.id) == 0


@pytest.mark.parametrize("body, status, detail", [
    (b"", 400, "not_json"),
    (b"not json", 400, "not_json"),
    (b"\xff\xfe", 400, "not_json"),
    (b"[1, 2]", 400, "not_an_object"),
    (b'{"type": "notification", "event": "payment.succeeded"}', 400, "missing_fields"),
    (b'{"type": "notification", "event": "payment.succeeded", "object": {}}', 400, "missing_fields"),
    (b'{"type": "other", "event": "payment.succeeded", "object": {"id": "x"}}', 400, "missing_fields"),
    (b'{"type": "notification", "event": "payment.succeeded", "object": {"id": "x", "amount": 5}}',
     400, "unparseable"),
    (b'{"type": "notification", "event": "deal.closed", "object": {"id": "x"}}', 200, "ignored_event"),
    (b'{"type": "notification", "event": "something.new", "object": {"id": "x"}}', 200, "ignored_event"),
    (b"{" + b" " * (64 * 1024) + b"}", 413, "too_large"),
])
def test_bad_bodies(yk, body, status, detail):
    outcome = payments.handle_notification(body, YK_IP, yk.cfg)
    assert (outcome.http_status, outcome.detail) == (status, detail)


@pytest.mark.parametrize("ip, trusted", [
    ("185.71.76.1", True), ("185.71.77.31", True), ("77.75.156.11", True), ("::ffff:185.71.76.1", True),
    ("2a02:5180:1::1", True), ("8.8.8.8", False), ("185.71.77.32", False), ("77.75.156.12", False),
    ("2001:db8::1", False), ("::ffff:8.8.8.8", False), ("", False), ("not-an-ip", False),
    ("185.71.76.1, 8.8.8.8", False), (None, False),
])
def test_source_address_check(yk, ip, trusted):
    assert payments.is_trusted_source(ip, yk.cfg.yookassa_trusted_networks) is trusted


def test_untrusted_source_changes_nothing(yk, caplog):
    order = payments.create_topup(yk.user.id, 100)
    yk.fake.succeed(order.yookassa_payment_id)
    with caplog.at_level(logging.WARNING, logger="payments"):
        outcome = notify(yk, "payment.succeeded", order.yookassa_payment_id, ip="8.8.8.8")
    assert (outcome.http_status, outcome.detail) == (403, "untrusted_source")
    assert any("security: notification from untrusted source" in r.getMessage() for r in caplog.records)
    assert Payment.get_by_id(order.id).status == "pending" and credits_of(yk.user.id) == 0


@pytest.mark.parametrize("field, value", [
    ("amount", {"value": "1.00", "currency": "RUB"}),
    ("amount", {"value": "100.00", "currency": "USD"}),
    ("metadata", "order"),
    ("metadata", "user"),
])
def test_api_object_that_does_not_match_our_order_credits_nothing(yk, field, value, caplog):
    order = payments.create_topup(yk.user.id, 100)
    yk.fake.succeed(order.yookassa_payment_id)
    with yk.fake._lock:
        obj = yk.fake.payments[order.yookassa_payment_id]
        if value == "order":
            obj["metadata"]["order_id"] = str(uuid.uuid4())
        elif value == "user":
            obj["metadata"]["user_id"] = "1"
        else:
            obj[field] = value
    with caplog.at_level(logging.WARNING, logger="payments"):
        outcome = notify(yk, "payment.succeeded", order.yookassa_payment_id)
    assert (outcome.http_status, outcome.credited_payment_id, outcome.detail) == (200, None, "mismatch")
    assert any("security:" in r.getMessage() and str(order.id) in r.getMessage() for r in caplog.records)
    assert Payment.get_by_id(order.id).status == "pending" and credits_of(yk.user.id) == 0
    audit_ok()


def test_test_payment_rejected_unless_allowed(yk):
    order = payments.create_topup(yk.user.id, 100)
    yk.fake.succeed(order.yookassa_payment_id)             # the fake is a test shop: "test": true
    strict = yk.cfg.replace(yookassa_allow_test=False)
    outcome = notify(yk, "payment.succeeded", order.yookassa_payment_id, cfg=strict)
    assert (outcome.http_status, outcome.detail) == (200, "mismatch") and credits_of(yk.user.id) == 0
    assert notify(yk, "payment.succeeded", order.yookassa_payment_id).detail == "credited"
    assert credits_of(yk.user.id) == 100
    audit_ok()


@pytest.mark.parametrize("kind", FAULTS)
def test_refetch_faults_answer_503_then_a_redelivery_credits_once(yk, kind):
    order = payments.create_topup(yk.user.id, 100)
    yk.fake.succeed(order.yookassa_payment_id)
    yk.fake.fault(kind, times=1, path_prefix="GET /v3/payments/")
    started = time.monotonic()
    outcome = notify(yk, "payment.succeeded", order.yookassa_payment_id, cfg=yk.cfg.replace(yookassa_timeout=0.5))
    assert time.monotonic() - started < 5
    assert (outcome.http_status, outcome.detail) == (503, "provider_unavailable")
    assert Payment.get_by_id(order.id).status == "pending" and credits_of(yk.user.id) == 0
    assert notify(yk, "payment.succeeded", order.yookassa_payment_id).detail == "credited"
    assert notify(yk, "payment.succeeded", order.yookassa_payment_id).detail == "already_applied"
    assert credits_of(yk.user.id) == 100
    audit_ok()


def test_waiting_for_capture_is_captured_with_our_key(yk):
    order = payments.create_topup(yk.user.id, 100, promo_code="MEGA50")
    hold(yk.fake, order.yookassa_payment_id)
    outcome = notify(yk, "payment.waiting_for_capture", order.yookassa_payment_id)
    assert (outcome.http_status, outcome.credited_payment_id) == (200, order.id)
    [capture] = [r for r in yk.fake.requests_log if r["path"].endswith("/capture")]
    assert capture["headers"]["Idempotence-Key"] == "capture:%s" % order.id
    assert yk.fake.payments[order.yookassa_payment_id]["status"] == "succeeded"
    assert credits_of(yk.user.id) == 100 and Payment.get_by_id(order.id).amount_kopecks == 5000
    audit_ok()


@pytest.mark.parametrize("kind", FAULTS)
def test_capture_faults_answer_503_then_a_redelivery_credits_once(yk, kind):
    order = payments.create_topup(yk.user.id, 100)
    hold(yk.fake, order.yookassa_payment_id)
    yk.fake.fault(kind, times=1, path_prefix="POST /v3/payments/%s/capture" % order.yookassa_payment_id)
    cfg = yk.cfg.replace(yookassa_timeout=0.5)
    outcome = notify(yk, "payment.waiting_for_capture", order.yookassa_payment_id, cfg=cfg)
    assert (outcome.http_status, outcome.detail) == (503, "provider_unavailable")
    assert Payment.get_by_id(order.id).status == "pending" and credits_of(yk.user.id) == 0
    outcome = notify(yk, "payment.waiting_for_capture", order.yookassa_payment_id, cfg=cfg)
    assert (outcome.http_status, outcome.credited_payment_id) == (200, order.id)
    keys = {r["headers"]["Idempotence-Key"] for r in yk.fake.requests_log if r["path"].endswith("/capture")}
    assert keys == {"capture:%s" % order.id}
    assert credits_of(yk.user.id) == 100
    audit_ok()


def test_capture_answer_lost_then_the_succeeded_payment_is_applied(yk):
    order = payments.create_topup(yk.user.id, 100)
    hold(yk.fake, order.yookassa_payment_id)
    yk.fake.fault(500, times=1, path_prefix="POST /v3/payments/", after=True)
    assert notify(yk, "payment.waiting_for_capture", order.yookassa_payment_id).http_status == 503
    assert yk.fake.payments[order.yookassa_payment_id]["status"] == "succeeded"   # it did happen
    assert notify(yk, "payment.succeeded", order.yookassa_payment_id).credited_payment_id == order.id
    assert credits_of(yk.user.id) == 100
    audit_ok()


def test_canceled_releases_the_promo_and_late_events_converge(yk):
    order = payments.create_topup(yk.user.id, 100, promo_code="WELCOME10")
    yk.fake.cancel(order.yookassa_payment_id)
    outcome = notify(yk, "payment.canceled", order.yookassa_payment_id)
    assert (outcome.http_status, outcome.detail) == (200, "canceled")
    stored = Payment.get_by_id(order.id)
    assert (stored.status, stored.cancel_reason) == ("canceled", "expired_on_confirmation")
    assert PromoRedemption.get().state == "released"
    # A late, forged or out-of-order "succeeded" for it: the API says canceled, nothing changes.
    assert notify(yk, "payment.succeeded", order.yookassa_payment_id).detail == "already_applied"
    assert credits_of(yk.user.id) == 0
    # The code is free again.
    second = payments.create_topup(yk.user.id, 200, promo_code="WELCOME10")
    assert second.amount_kopecks == 18000
    yk.fake.succeed(second.yookassa_payment_id)
    assert notify(yk, "payment.succeeded", second.yookassa_payment_id).credited_payment_id == second.id
    # "canceled" arriving after "succeeded": the API says succeeded, nothing changes.
    assert notify(yk, "payment.canceled", second.yookassa_payment_id).detail == "already_applied"
    assert Payment.get_by_id(second.id).status == "succeeded" and credits_of(yk.user.id) == 200
    audit_ok()


# --- the button, reconciliation, refunds, report ---------------------------------------------

def test_check_payment_button(yk):
    order = payments.create_topup(yk.user.id, 100)
    other, _ = billing.get_or_create_user(777001, free_operations=0)
    with pytest.raises(payments.UnknownPayment):
        payments.check_payment(order.id, other.id)
    with pytest.raises(payments.UnknownPayment):
        payments.check_payment("not-a-uuid", yk.user.id)
    assert payments.check_payment(order.id, yk.user.id).status == "pending"
    yk.fake.succeed(order.yookassa_payment_id)
    assert payments.check_payment(str(order.id), yk.user.id).status == "succeeded"
    assert notify(yk, "payment.succeeded", order.yookassa_payment_id).detail == "already_applied"
    assert payments.check_payment(order.id, yk.user.id).status == "succeeded"
    assert credits_of(yk.user.id) == 100
    yk.fake.fault("close", times=1, path_prefix="GET /v3/payments/")
    pending = payments.create_topup(yk.user.id, 200)
    with pytest.raises(payments.ProviderUnavailable):
        payments.check_payment(pending.id, yk.user.id)
    audit_ok()


def test_lost_notification_is_recovered_by_reconcile(yk):
    order = payments.create_topup(yk.user.id, 100, promo_code="BONUS30")
    abandoned = payments.create_topup(yk.user.id, 500)
    yk.fake.succeed(order.yookassa_payment_id)                 # the notification never arrives
    yk.fake.cancel(abandoned.yookassa_payment_id)
    assert payments.reconcile(yk.cfg).checked == 0             # too fresh to reconcile yet
    later = utcnow() + datetime.timedelta(seconds=yk.cfg.reconcile_after + 1)
    assert payments.reconcile(yk.cfg, now=later).credited == [order.id]
    assert payments.reconcile(yk.cfg, now=later).credited == []
    assert credits_of(yk.user.id) == 100 and PromoCode.get(PromoCode.code == "BONUS30").uses == 1
    assert Payment.get_by_id(abandoned.id).status == "canceled"
    assert payments.unnotified_payments(0, now=later) == [order.id]
    assert payments.claim_notification(order.id) and payments.unnotified_payments(0, now=later) == []
    audit_ok()


def test_reconcile_ends_orders_yookassa_never_confirmed(yk):
    yk.fake.fault(500, times=payments.CREATE_ATTEMPTS)
    with pytest.raises(payments.ProviderUnavailable):
        payments.create_topup(yk.user.id, 100, promo_code="WELCOME10")
    [order] = list(Payment.select())
    soon = utcnow() + datetime.timedelta(seconds=yk.cfg.reconcile_after + 1)
    assert payments.reconcile(yk.cfg, now=soon).checked == 1 and Payment.get_by_id(order.id).status == "pending"
    hours = utcnow() + datetime.timedelta(seconds=payments.ORDER_EXPIRY + 1)
    assert payments.reconcile(yk.cfg, now=hours).canceled == 1
    assert Payment.get_by_id(order.id).status == "canceled" and PromoRedemption.get().state == "released"


def test_reconcile_skips_orders_when_the_api_fails(yk):
    order = payments.create_topup(yk.user.id, 100)
    yk.fake.succeed(order.yookassa_payment_id)
    later = utcnow() + datetime.timedelta(seconds=yk.cfg.reconcile_after + 1)
    yk.fake.fault("html502", times=1, path_prefix="GET /v3/payments/")
    first = payments.reconcile(yk.cfg, now=later)
    assert (first.credited, first.failed) == ([], 1)
    assert payments.reconcile(yk.cfg, now=later).checked == 0     # backoff: not again at once
    again = later + datetime.timedelta(seconds=yk.cfg.reconcile_interval)
    assert payments.reconcile(yk.cfg, now=again).credited == [order.id]
    audit_ok()


def test_refund_after_credits_were_partly_spent(yk):
    order = payments.create_topup(yk.user.id, 100, promo_code="WELCOME10")    # pays 90.00
    yk.fake.succeed(order.yookassa_payment_id)
    assert notify(yk, "payment.succeeded", order.yookassa_payment_id).credited_payment_id == order.id
    spent = billing.reserve(yk.user.id, 70, reference="generation:x", idempotency_key="generation:x", ttl=900)
    billing.commit(spent.id)
    assert credits_of(yk.user.id) == 30
    partial = yk.fake.refund(order.yookassa_payment_id, "45.00")              # half: 50 credits
    assert notify(yk, "refund.succeeded", partial["id"]).detail == "refunded"
    assert notify(yk, "refund.succeeded", partial["id"]).detail == "already_applied"
    row = Refund.get_by_id(partial["id"])
    assert (row.amount_kopecks, row.credits_requested, row.credits_debited, row.shortfall) == (4500, 50, 30, 20)
    assert credits_of(yk.user.id) == 0
    rest = yk.fake.refund(order.yookassa_payment_id, "45.00")
    assert notify(yk, "refund.succeeded", rest["id"]).detail == "refunded"
    row = Refund.get_by_id(rest["id"])
    assert (row.credits_requested, row.credits_debited, row.shortfall) == (50, 0, 50)
    entries = list(LedgerEntry.select().where(LedgerEntry.kind == "payment_refund").order_by(LedgerEntry.id))
    assert [(e.reference, e.amount, -e.delta_available, e.shortfall) for e in entries] == [
        ("refund:%s" % partial["id"], 50, 30, 20), ("refund:%s" % rest["id"], 50, 0, 50)]
    assert Payment.get_by_id(order.id).refunded_kopecks == 9000
    audit_ok()


def test_refund_faults_answer_503(yk):
    order = payments.create_topup(yk.user.id, 100)
    yk.fake.succeed(order.yookassa_payment_id)
    notify(yk, "payment.succeeded", order.yookassa_payment_id)
    refund = yk.fake.refund(order.yookassa_payment_id, "100.00")
    yk.fake.fault(429, times=1, path_prefix="GET /v3/refunds/")
    assert notify(yk, "refund.succeeded", refund["id"]).http_status == 503
    assert credits_of(yk.user.id) == 100
    assert notify(yk, "refund.succeeded", refund["id"]).detail == "refunded"
    assert credits_of(yk.user.id) == 0
    audit_ok()


def test_refund_of_a_payment_whose_notification_was_lost(yk):
    order = payments.create_topup(yk.user.id, 100)
    yk.fake.succeed(order.yookassa_payment_id)
    refund = yk.fake.refund(order.yookassa_payment_id, "30.00")
    assert notify(yk, "refund.succeeded", refund["id"]).detail == "refunded"
    assert Payment.get_by_id(order.id).status == "succeeded"
    assert credits_of(yk.user.id) == 70
    audit_ok()


def test_daily_report_compares_with_the_api(yk):
    order = payments.create_topup(yk.user.id, 100, promo_code="WELCOME10")
    yk.fake.succeed(order.yookassa_payment_id)
    notify(yk, "payment.succeeded", order.yookassa_payment_id)
    refund = yk.fake.refund(order.yookassa_payment_id, "9.00")
    notify(yk, "refund.succeeded", refund["id"])
    today = utcnow().date()
    report = payments.daily_report(yk.cfg, day=today)
    assert report["ok"] is True and report["day"] == today.isoformat()
    assert (report["topups"]["ours_count"], report["topups"]["ours_kopecks"], report["topups"]["api_kopecks"]) == (
        1, 9000, 9000)
    assert (report["refunds"]["ours_kopecks"], report["refunds"]["api_kopecks"]) == (900, 900)
    # A payment taken outside the bot shows up as missing on our side.
    foreign = YKPayment.create({"amount": {"value": "5.00", "currency": "RUB"}, "capture": True,
                                "confirmation": {"type": "redirect", "return_url": "https://t.me/x"}},
                               idempotency_key="foreign-1")
    yk.fake.succeed(foreign.id)
    report = payments.daily_report(yk.cfg, day=today)
    assert report["ok"] is False and report["topups"]["missing_ours"] == [foreign.id]
    assert payments.daily_report(yk.cfg, day=today - datetime.timedelta(days=1))["topups"]["ours_count"] == 0


def test_webhook_button_and_reconcile_race_to_one_credit(yk, database):
    order = payments.create_topup(yk.user.id, 100, promo_code="SAVE20")
    hold(yk.fake, order.yookassa_payment_id)                  # each path must also capture once
    body = envelope(yk.fake, "payment.waiting_for_capture", order.yookassa_payment_id)
    cfg = yk.cfg.replace(yookassa_timeout=5.0)
    later = utcnow() + datetime.timedelta(seconds=cfg.reconcile_after + 1)
    barrier = threading.Barrier(12)
    credited, errors = [], []

    def run(action):
        try:
            barrier.wait()
            credited.append(action())
        except Exception as exc:                               # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            database.close()

    actions = [lambda: payments.handle_notification(body, YK_IP, cfg).credited_payment_id] * 8
    actions += [lambda: payments.check_payment(order.id, yk.user.id, cfg).id
                if Payment.get_by_id(order.id).status == "succeeded" else None] * 2
    actions += [lambda: (payments.reconcile(cfg, now=later).credited or [None])[0]] * 2
    threads = [threading.Thread(target=run, args=(a,)) for a in actions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(credited) == 12
    assert Payment.get_by_id(order.id).status == "succeeded"
    assert credits_of(yk.user.id) == 100
    assert LedgerEntry.select().where(LedgerEntry.kind == "topup").count() == 1
    keys = {r["headers"]["Idempotence-Key"] for r in yk.fake.requests_log if r["path"].endswith("/capture")}
    assert keys == {"capture:%s" % order.id}
    assert PromoCode.get(PromoCode.code == "SAVE20").uses == 1
    audit_ok()


@pytest.fixture
def yk_any(any_database, fake_yookassa):
    """Like `yk`, on SQLite and (with TEST_POSTGRES_URL) on PostgreSQL."""
    cfg = config.configure(config.get().replace(yookassa_api_url=fake_yookassa.api_url, yookassa_timeout=5.0))
    promo.seed_defaults()
    user, _ = billing.get_or_create_user(777100, first_name="Payer", free_operations=0)
    return SimpleNamespace(cfg=cfg, fake=fake_yookassa, user=user, database=any_database)


def test_money_paths_on_any_database(yk_any):
    yk = yk_any
    order = payments.create_topup(yk.user.id, 100, promo_code="WELCOME10")
    yk.fake.succeed(order.yookassa_payment_id)
    body = envelope(yk.fake, "payment.succeeded", order.yookassa_payment_id)
    barrier = threading.Barrier(12)
    outcomes = []

    def deliver():
        barrier.wait()
        try:
            outcomes.append(payments.handle_notification(body, YK_IP, yk.cfg))
        finally:
            yk.database.close()

    threads = [threading.Thread(target=deliver) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(o.detail for o in outcomes).count("credited") == 1 and len(outcomes) == 12
    assert credits_of(yk.user.id) == 100 and PromoCode.get(PromoCode.code == "WELCOME10").uses == 1
    refund = yk.fake.refund(order.yookassa_payment_id, "45.00")
    assert notify(yk, "refund.succeeded", refund["id"]).detail == "refunded"
    assert notify(yk, "refund.succeeded", refund["id"]).detail == "already_applied"
    assert credits_of(yk.user.id) == 50
    canceled = payments.create_topup(yk.user.id, 200, promo_code="SAVE20")
    yk.fake.cancel(canceled.yookassa_payment_id)
    assert notify(yk, "payment.canceled", canceled.yookassa_payment_id).detail == "canceled"
    assert promo.check_discount("SAVE20", yk.user.id).percent == 20
    assert payments.claim_notification(order.id) and not payments.claim_notification(order.id)
    audit_ok()
