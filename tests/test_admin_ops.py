"""Admin commands for operations, through the fake Bot API: /payments, /jobs failed, /refund (a
real refund against the fake YooKassa, credits taken back once), /user with its ledger lines."""
import datetime
import json

import pytest

import billing
import config
import payments
import worker
from models import Generation, LedgerEntry, Payment, Refund, utcnow
from tests.helpers import ADMIN, USER, audit_ok, harness_for, user_row


@pytest.fixture
def app(database, fake_telegram, fake_fal, fake_yookassa):
    config.configure(config.get().replace(yookassa_api_url=fake_yookassa.api_url, yookassa_timeout=2.0))
    for harness in harness_for(fake_telegram, fake_fal):
        harness.yookassa = fake_yookassa
        yield harness


def paid_topup(app, credits=500, code="SAVE20") -> Payment:
    """A top-up of USER paid and credited (the check button's path)."""
    user = user_row()
    order = payments.create_topup(user.id, credits, promo_code=code)
    app.yookassa.succeed(order.yookassa_payment_id)
    payments.check_payment(order.id, user.id)
    return Payment.get_by_id(order.id)


def test_payments_lists_yookassa_ids_amounts_and_statuses(app):
    app.send("/start")
    app.send("/start", user=ADMIN)
    paid = paid_topup(app)
    pending = payments.create_topup(user_row().id, 100)
    [reply] = app.send("/payments %d" % USER, user=ADMIN)
    text = reply["text"]
    assert "Платежи %d" % USER in text
    assert "%s — 400.00 ₽, 500, succeeded" % paid.yookassa_payment_id in text
    assert "%s — 100.00 ₽, 100, pending" % pending.yookassa_payment_id in text
    assert text.index(pending.yookassa_payment_id) < text.index(paid.yookassa_payment_id)     # newest first
    [reply] = app.send("/payments", user=ADMIN)
    assert reply["text"] == "Использование: /payments <telegram id>"
    [reply] = app.send("/payments 999", user=ADMIN)
    assert "не найден" in reply["text"]
    [refused] = app.send("/payments %d" % USER)
    assert "Такой команды нет" in refused["text"]


def test_jobs_failed_shows_the_error_class(app):
    app.send("/start")
    app.send("/start", user=ADMIN)
    user = user_row()
    gen = Generation.create(user=user.id, chat_id=USER, mode="edit", status="failed",
                            error="rejected: PermanentProviderError: The provider refused the request: 401")
    Generation.create(user=user.id, chat_id=USER, mode="generate", status="delivered")
    [reply] = app.send("/jobs failed", user=ADMIN)
    assert "%s edit user %s: rejected/PermanentProviderError" % (str(gen.id)[:8], user.id) in reply["text"]
    assert "generate" not in reply["text"].split("\n", 1)[1]
    [reply] = app.send("/jobs", user=ADMIN)
    assert reply["text"] == "Использование: /jobs failed"


def test_refund_goes_through_yookassa_and_takes_the_credits_back(app):
    app.send("/start")
    app.send("/start", user=ADMIN)
    paid = paid_topup(app)                                   # 500 credits for 400.00 ₽
    [reply] = app.send("/refund %s 100" % paid.yookassa_payment_id, user=ADMIN)
    assert "проведён" in reply["text"] and "100.00 ₽" in reply["text"] and "списано 125 кредитов" in reply["text"]
    [refund] = app.yookassa.refunds.values()                # a real API refund in the fake
    assert (refund["payment_id"], refund["amount"]["value"], refund["status"]) == (
        paid.yookassa_payment_id, "100.00", "succeeded")
    assert billing.get_balance(user_row().id).credits == 375
    assert Payment.get_by_id(paid.id).refunded_kopecks == 10000
    # The refund.succeeded notification that follows changes nothing more.
    outcome = payments.handle_notification(
        json.dumps({"type": "notification", "event": "refund.succeeded", "object": refund}).encode(),
        "185.71.76.1")
    assert (outcome.http_status, outcome.detail) == (200, "already_applied")
    # The rest (300.00 ₽) with no amount; then nothing is left.
    [reply] = app.send("/refund %s" % paid.id, user=ADMIN)                # our order id works too
    assert "300.00 ₽" in reply["text"] and "списано 375" in reply["text"]
    assert billing.get_balance(user_row().id).credits == 0
    [reply] = app.send("/refund %s 1" % paid.yookassa_payment_id, user=ADMIN)
    assert reply["text"].startswith("⚠️ Возврат не выполнен")
    assert Refund.select().count() == 2 and len(app.yookassa.refunds) == 2
    assert LedgerEntry.select().where(LedgerEntry.reference.startswith("refund:")).count() == 2
    audit_ok()


def test_refund_refusals(app):
    app.send("/start")
    app.send("/start", user=ADMIN)
    paid = paid_topup(app)
    pending = payments.create_topup(user_row().id, 100)
    for command in ("/refund", "/refund %s abc" % paid.yookassa_payment_id, "/refund %s 0" % paid.yookassa_payment_id):
        [reply] = app.send(command, user=ADMIN)
        assert reply["text"].startswith("Использование: /refund"), command
    [reply] = app.send("/refund %s 500" % paid.yookassa_payment_id, user=ADMIN)     # more than was paid
    assert reply["text"].startswith("⚠️ Возврат не выполнен")
    [reply] = app.send("/refund %s" % pending.yookassa_payment_id, user=ADMIN)     # not paid
    assert reply["text"].startswith("⚠️ Возврат не выполнен")
    [reply] = app.send("/refund no-such-payment", user=ADMIN)
    assert reply["text"].startswith("⚠️ Возврат не выполнен")
    [refused] = app.send("/refund %s" % paid.yookassa_payment_id)
    assert "Такой команды нет" in refused["text"]
    assert app.yookassa.refunds == {} and billing.get_balance(user_row().id).credits == 500


def test_user_shows_the_latest_ledger_lines(app):
    app.send("/start")
    app.send("/start", user=ADMIN)
    app.send("/grant %d 50 bonus" % USER, user=ADMIN)
    [reply] = app.send("/user %d" % USER, user=ADMIN)
    text = reply["text"]
    assert "Кредиты: 50" in text and "Последние операции" in text
    assert "grant credits +50 → 50 (+0 → 0) admin:%d:bonus" % ADMIN in text


def _stuck(app, credits, code=None) -> Payment:
    """A paid order of USER that the reconciliation could not verify: a test payment in a live shop
    (the fake's payments are test payments) → needs_attention, nothing credited."""
    order = payments.create_topup(user_row().id, credits, promo_code=code)
    app.yookassa.succeed(order.yookassa_payment_id)
    live = config.get().replace(yookassa_allow_test=False)
    later = utcnow() + datetime.timedelta(seconds=live.reconcile_after + 1)
    worker.reconcile_once(live, now=later)             # the admins are alerted
    assert Payment.get_by_id(order.id).status == "needs_attention"
    return Payment.get_by_id(order.id)


def test_settle_credits_or_cancels_an_order_that_needs_attention_once(app):
    """/settle: the admin checked the cabinet; credit pays the order's credits once and tells the
    user, cancel closes it and frees its promo code; anything else is refused and changes nothing."""
    app.send("/start")
    app.send("/start", user=ADMIN)
    paid, unpaid = _stuck(app, 500, "SAVE20"), _stuck(app, 100)
    assert "/settle %s credit" % paid.id in app.fake.wait_for_message(ADMIN, str(paid.id))["text"]
    [done] = app.send("/settle %s credit" % paid.yookassa_payment_id, user=ADMIN)
    assert "succeeded" in done["text"] and billing.get_balance(user_row().id).credits == 500
    assert app.fake.wait_for_message(USER, "Оплата получена")
    [again] = app.send("/settle %s credit" % paid.id, user=ADMIN)            # a second tap: nothing more
    assert "не требует внимания" in again["text"] and billing.get_balance(user_row().id).credits == 500
    [closed] = app.send("/settle %s cancel" % unpaid.id, user=ADMIN)
    assert "canceled" in closed["text"] and Payment.get_by_id(unpaid.id).status == "canceled"
    assert billing.get_balance(user_row().id).credits == 500
    for bad in ("/settle", "/settle %s refund" % unpaid.id, "/settle nope credit"):
        [reply] = app.send(bad, user=ADMIN)
        assert "/settle" in reply["text"] or "не найден" in reply["text"]
    [refused] = app.send("/settle %s credit" % unpaid.id)                     # not an admin
    assert "Такой команды нет" in refused["text"]
    assert LedgerEntry.select().where(LedgerEntry.kind == "topup").count() == 1
    audit_ok()


def test_an_order_that_never_reached_yookassa_can_only_be_canceled(app):
    app.send("/start")
    app.send("/start", user=ADMIN)
    order = Payment.create(user=user_row().id, credits=100, amount_kopecks=10000, status="needs_attention")
    [reply] = app.send("/settle %s credit" % order.id, user=ADMIN)
    assert "не дошёл до платёжной системы" in reply["text"] and Payment.get_by_id(order.id).status == "needs_attention"
    [reply] = app.send("/settle %s cancel" % order.id, user=ADMIN)
    assert Payment.get_by_id(order.id).status == "canceled"
    audit_ok()
