"""Issue 12: Telegram Stars as a second way to top up — exactly-once, refundable, reconciled.

The bot is driven through the fake Bot API (tests/fakes/telegram.py) with the real
pyTelegramBotAPI: the user opens the balance, picks Stars and an amount, pays the invoice (the fake
plays Telegram's pre-checkout round trip), and the successful_payment message arrives — once, many
times, in two webhook processes, or never (reconciliation finds it). The audit runs after each.
"""
import json
import threading
import uuid

import pytest
from telebot import types

import billing
import bot
import config
import models
import stars
import worker
from models import LedgerEntry, Payment, Refund
from tests.helpers import ADMIN, USER, audit_ok, harness_for, user_row

OTHER = 502
RATE = 70                       # STARS_PER_100_CREDITS in these tests
SECRET = "stars-secret_0123456789"


@pytest.fixture
def app(database, fake_telegram, fake_fal):
    """The bot harness with Stars on, no free operations (credits are spent first) and a quick
    pre-checkout deadline on the fake."""
    fake_telegram.pre_checkout_timeout = 5.0
    for harness in harness_for(fake_telegram, fake_fal):
        harness.cfg = config.configure(harness.cfg.replace(stars_enabled=True, stars_per_100_credits=RATE,
                                                           free_operations_count=0))
        harness.restart()
        fake_telegram.add_user(ADMIN)
        yield harness


def open_invoice(app, credits=100, user=USER, **kw) -> dict:
    """The user opens the balance, taps "⭐ Telegram Stars", then an amount; return the invoice."""
    app.send("/balance", user=user, **kw)
    app.press("stars", user=user, **kw)
    app.press("stars:%d" % credits, user=user, **kw)
    return app.fake.invoice(user)


def pay(app, user=USER, *, link=None, pump=True, language_code="ru"):
    """The user pays the latest invoice; the bot answers the pre-checkout (and, with `pump`, gets
    the successful_payment). Returns the fake's PaymentAttempt."""
    attempt = app.fake.pay_invoice(user, link=link, language_code=language_code)
    app.bot.process_new_updates(app.fetch())          # the pre_checkout_query; the payment comes after
    attempt.wait()
    if pump:
        app.pump()
    return attempt


def order_of(invoice) -> Payment:
    return Payment.get_by_id(uuid.UUID(invoice["payload"]))


def topups(user=USER) -> list:
    return list(LedgerEntry.select().where((LedgerEntry.user == user_row(user).id) & (LedgerEntry.kind == "topup")))


def texts_to(app, user, needle) -> list:
    return [m["text"] for m in app.fake.messages(user) if needle in m.get("text", "")]


def test_happy_path_invoice_pre_checkout_credit_and_one_message(app):
    app.send("/start")
    [balance] = app.send("/balance")
    assert "⭐ Telegram Stars" in [b["text"] for b in app.fake.buttons(balance)]
    [screen] = app.press("stars")
    assert "Промокоды и скидки к оплате звёздами не применяются" in screen["text"]
    assert "100 кредитов — 70 ⭐" in [b["text"] for b in app.fake.buttons(screen)]
    app.press("stars:300", message=screen)                              # 300 × 70 / 100 = 210 Stars
    invoice = app.fake.invoice(USER)
    call = app.fake.calls("sendInvoice")[-1]
    assert (call.params["currency"], call.params["provider_token"], len(call.params["prices"])) == ("XTR", "", 1)
    order = order_of(invoice)
    assert (invoice["total_amount"], order.amount_kopecks, order.credits, order.currency, order.provider,
            order.status) == (210, 210, 300, "XTR", "stars", "pending")
    attempt = pay(app)
    assert attempt.outcome == "paid"
    order = order_of(invoice)
    assert (order.status, order.telegram_charge_id) == ("succeeded", attempt.charge_id)
    assert billing.get_balance(user_row().id).credits == 300
    assert len(texts_to(app, USER, "✅ Оплата получена")) == 1
    assert "⭐" in app.send("/help")[0]["text"]
    audit_ok()


def test_the_stars_button_is_there_without_yookassa_and_rounds_the_price_up(app):
    app.cfg = config.configure(app.cfg.replace(yookassa_shop_id="", stars_per_100_credits=33))
    app.restart()
    [balance] = app.send("/balance")
    data = app.fake.button_data(balance)
    assert "stars" in data and not any(d.startswith("amount:") for d in data)
    [screen] = app.press("stars")
    assert "100 кредитов — 33 ⭐" in [b["text"] for b in app.fake.buttons(screen)]
    assert stars.price_stars(10, app.cfg) == 4                         # ceil(3.3)


def test_fifty_concurrent_deliveries_credit_once_and_tell_once(app):
    invoice = open_invoice(app)
    attempt = pay(app, pump=False)
    raw = json.dumps(attempt.update)
    barrier = threading.Barrier(50)
    errors = []

    def deliver():
        try:
            barrier.wait()
            app.bot.process_new_updates([types.Update.de_json(raw)])
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=deliver) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    app.fake.deliver_again(attempt.update, times=3)
    app.pump()                                                          # the original and 3 copies too
    assert errors == []
    assert [row.amount for row in topups()] == [100]
    assert billing.get_balance(user_row().id).credits == 100
    assert len(texts_to(app, USER, "✅ Оплата получена")) == 1
    assert order_of(invoice).status == "succeeded"
    audit_ok()


def test_two_webhook_processes_racing_on_the_same_update_credit_once(app):
    invoice = open_invoice(app)
    attempt = pay(app, pump=False)
    app.fetch()                                                         # confirmed here: only the webhooks deliver it
    cfg = config.configure(app.cfg.replace(telegram_webhook_url="http://127.0.0.1/telegram/webhook",
                                           telegram_webhook_secret=SECRET))
    clients = [bot.create_webhook_app(cfg).test_client() for _ in range(2)]   # two bot processes, one database
    body = json.dumps(attempt.update)
    statuses = []
    barrier = threading.Barrier(10)

    def post(client):
        barrier.wait()
        statuses.append(client.post("/telegram/webhook", data=body, content_type="application/json",
                                    headers={bot.SECRET_HEADER: SECRET}).status_code)

    threads = [threading.Thread(target=post, args=(clients[n % 2],)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert statuses == [200] * 10
    assert [row.amount for row in topups()] == [100]
    assert len(texts_to(app, USER, "✅ Оплата получена")) == 1
    assert order_of(invoice).telegram_charge_id == attempt.charge_id
    audit_ok()


def test_pre_checkout_refuses_unknown_canceled_foreign_and_mismatched_orders(app):
    api = worker.telegram(app.cfg)

    def link(payload, amount):
        return api.create_invoice_link("Media Lab", "Пополнение", payload, "", "XTR",
                                       [types.LabeledPrice("100 кредитов", amount)])

    invoice = open_invoice(app)
    order = order_of(invoice)
    app.send("/start", user=OTHER, language_code="en")
    cases = [
        (USER, link(str(uuid.uuid4()), 70), "Заказ не найден"),                        # unknown order
        (USER, link("not-an-order", 70), "Заказ не найден"),
        (OTHER, link(str(order.id), 70), "Order not found"),                           # someone else's, in English
        (USER, link(str(order.id), 69), "не совпадает"),                               # amount does not match
    ]
    for user, url, message in cases:
        attempt = pay(app, user, link=url, language_code="en" if user == OTHER else "ru")
        assert attempt.outcome == "refused" and message in attempt.error_message, (url, attempt.error_message)
    worker.reconcile_stars_once(app.cfg, now=models.utcnow() + stars_expiry())      # the unpaid order expires
    assert order_of(invoice).status == "canceled"
    attempt = pay(app)
    assert attempt.outcome == "refused" and "уже оплачен или устарел" in attempt.error_message
    assert topups() == [] and app.fake.star_transactions() == []
    audit_ok()


def stars_expiry():
    import datetime

    return datetime.timedelta(seconds=stars.ORDER_EXPIRY + 1)


def test_a_late_pre_checkout_answer_charges_nothing(app):
    invoice = open_invoice(app)
    app.fake.pre_checkout_timeout = 0.2
    attempt = app.fake.pay_invoice(USER)
    assert attempt.wait() == "timeout"                 # the bot had not answered within the deadline
    app.pump()                                         # now it answers: too late, Telegram refuses it
    failed = app.fake.calls("answerPreCheckoutQuery")[-1]
    assert not failed.ok and "query is too old" in failed.error["description"]
    assert app.fake.pending_updates() == 0 and topups() == []
    assert order_of(invoice).status == "pending" and app.fake.star_transactions() == []
    audit_ok()


def test_a_successful_payment_for_a_canceled_order_still_credits(app):
    invoice = open_invoice(app)
    attempt = pay(app, pump=False)                     # paid; the order ends canceled before the update lands
    assert models.move(Payment, order_of(invoice).id, "pending", "canceled", cancel_reason="expired")
    app.pump()
    assert order_of(invoice).status == "succeeded" and [r.amount for r in topups()] == [100]
    assert attempt.charge_id == order_of(invoice).telegram_charge_id
    audit_ok()


def test_a_mismatched_payment_needs_attention_and_the_admins_are_told(app):
    invoice = open_invoice(app)
    attempt = pay(app, pump=False)
    update = json.loads(json.dumps(attempt.update))
    update["message"]["successful_payment"]["total_amount"] = 1            # not what the order costs
    app.bot.process_new_updates([types.Update.de_json(json.dumps(update))])
    order = order_of(invoice)
    assert order.status == "needs_attention" and "1 Stars paid" in order.problem
    assert order.telegram_charge_id == attempt.charge_id
    alert = app.fake.wait_for_message(ADMIN, "Telegram Stars")
    assert attempt.charge_id in alert["text"]
    told = app.fake.wait_for_message(USER, "не совпала с заказом")
    assert "/paysupport" in told["text"]
    app.pump()                                                              # the real one: same charge, nothing more
    assert topups() == [] and len(app.fake.messages(ADMIN)) == 1
    assert sum("не совпала" in (m.get("text") or "") for m in app.fake.messages(USER)) == 1
    unknown = json.loads(json.dumps(attempt.update))
    unknown["message"]["successful_payment"].update(invoice_payload=str(uuid.uuid4()),
                                                    telegram_payment_charge_id="stxUNKNOWN")
    app.bot.process_new_updates([types.Update.de_json(json.dumps(unknown))])
    assert "stxUNKNOWN" in app.fake.wait_for_message(ADMIN, "stxUNKNOWN")["text"]
    audit_ok()


def test_a_refund_after_partial_spend_takes_back_what_is_left_once_and_tells_the_user(app):
    invoice = open_invoice(app)
    attempt = pay(app)
    user = user_row()
    billing.commit(billing.reserve(user.id, 60, reference="generation:x", idempotency_key="generation:x",
                                   ttl=900).id)
    [reply] = app.send("/refund %s" % attempt.charge_id, user=ADMIN)
    assert "списано 40 кредитов, не хватило 60" in reply["text"]
    refund = Refund.get_by_id("stars:%s" % attempt.charge_id)
    assert (refund.amount_kopecks, refund.credits_requested, refund.credits_debited, refund.shortfall) == (70, 100, 40, 60)
    assert len(texts_to(app, USER, "Возврат 70 ⭐")) == 1
    app.pump()                                          # Telegram's refunded_payment message: already applied
    assert len(texts_to(app, USER, "Возврат 70 ⭐")) == 1
    [again] = app.send("/refund %s" % order_of(invoice).id, user=ADMIN)
    assert "Возврат не выполнен" in again["text"]
    [whole] = app.send("/refund %s 10" % attempt.charge_id, user=ADMIN)
    assert "целиком" in whole["text"]
    assert billing.get_balance(user.id).credits == 0
    assert LedgerEntry.select().where(LedgerEntry.kind == "payment_refund").count() == 1
    assert Payment.get_by_id(order_of(invoice).id).refunded_kopecks == 70
    audit_ok()


def test_a_refund_telegram_reports_is_applied_once(app):
    open_invoice(app, credits=300)
    attempt = pay(app)
    update = app.fake.refund(attempt.charge_id)
    app.pump()
    app.bot.process_new_updates([types.Update.de_json(json.dumps(update))])   # delivered twice
    assert billing.get_balance(user_row().id).credits == 0
    assert len(texts_to(app, USER, "Возврат 210 ⭐")) == 1
    audit_ok()


def test_reconciliation_finds_a_lost_payment_and_a_lost_refund(app):
    invoice = open_invoice(app)
    app.fake.lose_next_successful_payment()
    attempt = pay(app)
    assert attempt.outcome == "paid" and attempt.update is None and topups() == []
    report = worker.reconcile_stars_once(app.cfg)
    assert report.credited == [order_of(invoice).id] and report.problems == []
    assert app.run_jobs() == 1
    assert len(texts_to(app, USER, "✅ Оплата получена")) == 1
    assert worker.reconcile_stars_once(app.cfg).credited == []                    # once
    audit_ok()
    app.fake.refund(attempt.charge_id)
    app.fetch()                                                                   # the refunded_payment is lost
    report = worker.reconcile_stars_once(app.cfg)
    assert report.refunds == ["stars:%s" % attempt.charge_id]
    app.run_jobs()
    assert billing.get_balance(user_row().id).credits == 0
    assert len(texts_to(app, USER, "Возврат 70 ⭐")) == 1
    assert worker.reconcile_stars_once(app.cfg).refunds == []
    audit_ok()


def test_reconciliation_reports_what_it_cannot_match_to_the_admins_once(app):
    invoice = open_invoice(app)
    app.fake.lose_next_successful_payment()
    attempt = pay(app)
    Payment.update(amount_kopecks=71).where(Payment.id == order_of(invoice).id).execute()   # our order says otherwise
    report = worker.reconcile_stars_once(app.cfg)
    assert report.credited == [] and [key for key, _ in report.problems] == ["stars:%s" % attempt.charge_id]
    assert order_of(invoice).status == "needs_attention"
    assert attempt.charge_id in app.fake.wait_for_message(ADMIN, "Telegram Stars")["text"]
    worker.reconcile_stars_once(app.cfg)
    assert len(app.fake.messages(ADMIN)) == 1                                     # not again
    audit_ok()


def test_a_blocked_user_who_paid_is_credited_and_an_unknown_refund_goes_to_the_admins(app):
    open_invoice(app)
    attempt = app.fake.pay_invoice(USER)
    app.bot.process_new_updates(app.fetch())
    attempt.wait()
    billing.set_blocked(user_row().id)                 # blocked between the invoice and the payment
    app.pump()
    assert [r.amount for r in topups()] == [100]
    [listing] = app.send("/payments %d" % USER, user=ADMIN)
    assert "70 ⭐" in listing["text"] and attempt.charge_id in listing["text"]
    update = json.loads(json.dumps(app.fake.refund(attempt.charge_id)))
    app.fetch()
    update["message"]["refunded_payment"]["telegram_payment_charge_id"] = "stxNOPE"
    app.bot.process_new_updates([types.Update.de_json(json.dumps(update))])
    assert "stxNOPE" in app.fake.wait_for_message(ADMIN, "stxNOPE")["text"]
    audit_ok()


def test_the_ticker_runs_stars_reconciliation_only_when_enabled(cfg):
    assert worker.reconcile_stars in [job for job, _ in worker.Ticker(cfg.replace(stars_enabled=True)).jobs]
    assert worker.reconcile_stars not in [job for job, _ in worker.Ticker(cfg).jobs]


def test_the_audit_catches_a_stars_top_up_without_its_charge(app):
    invoice = open_invoice(app)
    pay(app)
    Payment.update(telegram_charge_id=None).where(Payment.id == order_of(invoice).id).execute()
    assert any(v.startswith("I7") and "exactly one provider" in v for v in billing.audit().violations)
