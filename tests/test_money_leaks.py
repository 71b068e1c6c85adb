"""Issue 9: the ways money left the product, each closed and pinned.

Runs against the fake YooKassa API with the real SDK and, where the engine matters, on SQLite and
PostgreSQL (`any_database`, skipped without TEST_POSTGRES_URL). Each test names the point it pins.
"""
from __future__ import annotations

import datetime
import json
import logging
import threading
from types import SimpleNamespace

import pytest

import billing
import config
import payments
import promo
import worker
from models import LedgerEntry, Payment, PromoCode, PromoRedemption, Refund, User, utcnow
from tests.helpers import audit_ok

YK_IP = "185.71.76.1"


def credits_of(user_id) -> int:
    return billing.get_balance(user_id).credits


def creates(fake) -> list:
    return [r for r in fake.requests_log if r["method"] == "POST" and r["path"] == "/v3/payments"]


def notify(shop, event, object_id, body=None):
    table = shop.fake.refunds if event.startswith("refund.") else shop.fake.payments
    body = body or json.dumps({"type": "notification", "event": event, "object": table[object_id]}).encode()
    return payments.handle_notification(body, YK_IP, shop.cfg)


def _shop(fake_yookassa, database, telegram_id=880000):
    cfg = config.configure(config.get().replace(yookassa_api_url=fake_yookassa.api_url, yookassa_timeout=5.0))
    promo.seed_defaults()
    user, _ = billing.get_or_create_user(telegram_id, first_name="Payer", free_operations=0)
    return SimpleNamespace(cfg=cfg, fake=fake_yookassa, user=user, database=database)


@pytest.fixture
def shop(database, fake_yookassa):
    return _shop(fake_yookassa, database)


@pytest.fixture
def shop_any(any_database, fake_yookassa):
    return _shop(fake_yookassa, any_database)


def race(database, *calls):
    """Run `calls` at the same moment on their own connections; return their results or exceptions."""
    database.close()
    barrier = threading.Barrier(len(calls))
    results = [None] * len(calls)

    def run(index, call):
        barrier.wait()
        try:
            results[index] = call()
        except Exception as exc:  # noqa: BLE001 - returned to the test
            results[index] = exc
        finally:
            database.close()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


# --- §2 limits that hold ----------------------------------------------------------------------

def test_two_taps_on_one_amount_make_one_order_and_one_payment(shop_any):
    """§2: two concurrent taps make one order and one YooKassa payment (PostgreSQL too)."""
    shop = shop_any
    first, second = race(shop.database, *[lambda: payments.create_topup(shop.user.id, 300)] * 2)
    assert not isinstance(first, Exception) and not isinstance(second, Exception), (first, second)
    assert first.id == second.id and Payment.select().count() == 1
    assert len({r["headers"]["Idempotence-Key"] for r in creates(shop.fake)}) == 1
    assert len(shop.fake.payments) == 1


def test_once_per_user_holds_under_two_concurrent_discounted_top_ups(shop_any):
    """§2: a released redemption plus two concurrent taps with the code: one discounted order."""
    shop = shop_any
    old = payments.create_topup(shop.user.id, 100, promo_code="WELCOME10")
    shop.fake.cancel(old.yookassa_payment_id)
    assert notify(shop, "payment.canceled", old.yookassa_payment_id).detail == "canceled"
    assert PromoRedemption.get().state == "released"
    results = race(shop.database, lambda: payments.create_topup(shop.user.id, 300, promo_code="WELCOME10"),
                   lambda: payments.create_topup(shop.user.id, 500, promo_code="WELCOME10"))
    orders = [r for r in results if isinstance(r, Payment)]
    refused = [r for r in results if isinstance(r, promo.CodeAlreadyUsed)]
    assert len(orders) == 1 and len(refused) == 1, results
    for order in orders:
        shop.fake.succeed(order.yookassa_payment_id)
        notify(shop, "payment.succeeded", order.yookassa_payment_id)
    discounted = Payment.select().where((Payment.discount_percent > 0) & (Payment.status == "succeeded")).count()
    assert discounted == 1 and PromoCode.get(PromoCode.code == "WELCOME10").uses == 1
    audit_ok()


def test_a_repeated_tap_reuses_the_discounted_order(shop):
    """§2: after the discount was applied, a second tap on the same amount (the bot no longer
    remembers the code) re-uses the discounted order instead of making a full-price one."""
    discounted = payments.create_topup(shop.user.id, 100, promo_code="SAVE20")
    again = payments.create_topup(shop.user.id, 100)
    assert again.id == discounted.id and again.amount_kopecks == 8000
    assert Payment.select().count() == 1 and len(creates(shop.fake)) == 1


def test_mega50_is_capped(shop):
    order = payments.create_topup(shop.user.id, 1000, promo_code="MEGA50")
    assert order.amount_kopecks == 75000                           # 250 ₽ off, not 500 ₽
    assert shop.fake.payments[order.yookassa_payment_id]["amount"]["value"] == "750.00"


# --- §5 webhook answers -----------------------------------------------------------------------

def test_a_404_for_our_payment_is_answered_200_with_a_security_line(shop, caplog):
    order = payments.create_topup(shop.user.id, 100)
    shop.fake.fault(404, times=1, path_prefix="GET /v3/payments/")
    with caplog.at_level(logging.WARNING, logger="payments"):
        outcome = notify(shop, "payment.succeeded", order.yookassa_payment_id)
    assert (outcome.http_status, outcome.detail) == (200, "not_at_provider")
    assert any(r.getMessage().startswith("security:") for r in caplog.records)
    assert Payment.get_by_id(order.id).status == "pending" and credits_of(shop.user.id) == 0


@pytest.mark.parametrize("code", [401, 403])
def test_refused_credentials_are_answered_503_so_the_redelivery_applies_it(shop, code):
    order = payments.create_topup(shop.user.id, 100)
    shop.fake.succeed(order.yookassa_payment_id)
    shop.fake.fault(code, times=1, path_prefix="GET /v3/payments/")
    outcome = notify(shop, "payment.succeeded", order.yookassa_payment_id)
    assert (outcome.http_status, outcome.detail) == (503, "auth_failed")
    assert credits_of(shop.user.id) == 0
    assert notify(shop, "payment.succeeded", order.yookassa_payment_id).detail == "credited"   # keys fixed
    assert credits_of(shop.user.id) == 100


@pytest.mark.parametrize("depth", [40, 5000, 30000])
def test_deeply_nested_json_is_400_never_500(shop, depth):
    body = ('{"type": "notification", "event": "payment.succeeded", "object": {"id": "x", "a": '
            + "[" * depth + "]" * depth + "}}").encode()
    outcome = payments.handle_notification(body[:payments.MAX_NOTIFICATION_BYTES], YK_IP, shop.cfg)
    assert outcome.http_status == 400
    assert shop.fake.requests_log == []


# --- §5 refunds converge ------------------------------------------------------------------------

def _paid(shop, credits, code=None):
    order = payments.create_topup(shop.user.id, credits, promo_code=code)
    shop.fake.succeed(order.yookassa_payment_id)
    assert notify(shop, "payment.succeeded", order.yookassa_payment_id).detail == "credited"
    return order


def test_partial_refunds_adding_up_to_the_payment_take_back_exactly_its_credits(shop):
    """§5: 33.33 + 33.33 + 33.34 ₽ of 100 ₽ take back 100 credits (the old rule took 3 × 33)."""
    order = _paid(shop, 100)
    for value in ("33.33", "33.33", "33.34"):
        refund = shop.fake.refund(order.yookassa_payment_id, value)
        assert notify(shop, "refund.succeeded", refund["id"]).detail == "refunded"
    taken = [r.credits_requested for r in Refund.select().order_by(Refund.created_at, Refund.id)]
    assert sorted(taken) == [33, 33, 34] and sum(taken) == 100
    assert credits_of(shop.user.id) == 0
    audit_ok()


def test_many_small_refunds_are_not_each_rounded_to_zero(shop):
    """§5: ten refunds of 0.89 ₽ on a 90 ₽ payment of 100 credits take back 9 credits (the old
    rule took nothing)."""
    order = _paid(shop, 100, "WELCOME10")                          # pays 90.00 ₽
    for _ in range(10):
        refund = shop.fake.refund(order.yookassa_payment_id, "0.89")
        notify(shop, "refund.succeeded", refund["id"])
    assert sum(r.credits_requested for r in Refund.select()) == 100 * 890 // 9000 == 9
    assert credits_of(shop.user.id) == 91
    audit_ok()


def test_a_lost_refund_notification_is_found_by_reconciliation_once_and_the_user_told(shop, fake_telegram):
    """§5: refunds the API reports that we never recorded are applied by reconciliation, by
    refund id, once; the user is told about each."""
    config.configure(shop.cfg.replace(telegram_api_url=fake_telegram.url))
    fake_telegram.add_user(shop.user.telegram_id)
    order = _paid(shop, 100)
    lost = shop.fake.refund(order.yookassa_payment_id, "40.00")           # its notification never comes
    report = payments.reconcile(shop.cfg)
    assert report.refunds == [lost["id"]] and credits_of(shop.user.id) == 60
    assert payments.reconcile(shop.cfg).refunds == []                      # once
    assert notify(shop, "refund.succeeded", lost["id"]).detail == "already_applied"
    worker.huey.flush()
    assert payments.claim_notification(order.id)                          # the top-up was told already
    assert worker.reconcile_once(config.get(), now=utcnow() + datetime.timedelta(seconds=61)) == []
    task = worker.huey.dequeue()
    assert isinstance(task, worker.notify_refund.task_class) and worker.huey.dequeue() is None
    worker.huey.execute(task)
    told = [m for m in fake_telegram.messages(shop.user.telegram_id) if "Возврат 40.00" in (m.get("text") or "")]
    assert len(told) == 1 and "Списано 40" in told[0]["text"]
    assert worker._notify_refund(lost["id"], config.get()) is False        # told once
    audit_ok()


# --- §5 reconciliation that cannot starve -------------------------------------------------------

def test_unverifiable_orders_leave_the_pending_set_and_a_lost_payment_is_still_credited(shop):
    """§5: orders YooKassa does not know (404) move to needs_attention, reported once, and never
    come back; a paid order whose notification was lost is credited although a pass takes only
    three orders and seven others are pending ahead of it."""
    unknown = [payments.create_topup(shop.user.id, 100 + i) for i in range(3)]
    for index, order in enumerate(unknown):            # YooKassa does not know them: every re-fetch is 404
        Payment.update(yookassa_payment_id="0000000%d-000f-5000-a000-1e3515f51c18" % index).where(
            Payment.id == order.id).execute()
    waiting = [payments.create_topup(shop.user.id, 200 + i) for i in range(4)]   # still unpaid
    paid = payments.create_topup(shop.user.id, 500)
    shop.fake.succeed(paid.yookassa_payment_id)        # its notification is lost
    later = utcnow() + datetime.timedelta(seconds=shop.cfg.reconcile_after + 1)
    passes = [payments.reconcile(shop.cfg, now=later, limit=3) for _ in range(3)]
    assert sum((p.credited for p in passes), []) == [paid.id] and credits_of(shop.user.id) == 500
    assert sorted(map(str, sum((p.needs_attention for p in passes), []))) == sorted(str(o.id) for o in unknown)
    assert {Payment.get_by_id(o.id).status for o in unknown} == {"needs_attention"}
    assert all(Payment.get_by_id(o.id).problem for o in unknown)
    assert {Payment.get_by_id(o.id).status for o in waiting} == {"pending"}
    again = payments.reconcile(shop.cfg, now=later + datetime.timedelta(hours=1))
    assert again.needs_attention == [] and again.checked == len(waiting)   # the 404s never come back
    audit_ok()


def test_a_test_payment_in_a_live_shop_needs_attention(shop):
    order = payments.create_topup(shop.user.id, 100)
    shop.fake.succeed(order.yookassa_payment_id)       # the fake's payments are test payments
    live = shop.cfg.replace(yookassa_allow_test=False)
    later = utcnow() + datetime.timedelta(seconds=live.reconcile_after + 1)
    report = payments.reconcile(live, now=later)
    assert report.needs_attention == [order.id] and report.credited == []
    assert Payment.get_by_id(order.id).status == "needs_attention" and credits_of(shop.user.id) == 0
    audit_ok()


def test_backoff_keeps_a_slow_order_from_being_fetched_every_pass(shop):
    order = payments.create_topup(shop.user.id, 100)
    start = utcnow() + datetime.timedelta(seconds=shop.cfg.reconcile_after + 1)
    fetches = []
    for minute in range(0, 20):
        now = start + datetime.timedelta(minutes=minute)
        fetches.append(payments.reconcile(shop.cfg, now=now).checked)
    assert sum(fetches) < 20 and fetches[0] == 1
    assert Payment.get_by_id(order.id).check_attempts == sum(fetches)


# --- §6 and the admin alert -----------------------------------------------------------------------

def test_admin_alerts_are_sent_once_per_window(shop, fake_telegram):
    config.configure(shop.cfg.replace(telegram_api_url=fake_telegram.url))
    admin = config.get().admin_ids[0]
    fake_telegram.add_user(admin)
    text = worker.texts.t("admin_alert_yookassa_auth", "ru")
    assert worker.alert_admins("yookassa_auth", text) is True
    assert worker.alert_admins("yookassa_auth", text) is False
    assert [m["text"][:2] for m in fake_telegram.messages(admin)] == ["⚠️"]


# --- §1 the public code of earlier releases ----------------------------------------------------

def test_the_migration_switches_off_an_unlimited_free_access_code(tmp_path, cfg):
    from playhouse.migrations import Runner

    import models
    database = models.open_database("sqlite:///" + str(tmp_path / "old.db"))
    runner = Runner(database, directory=models.MIGRATIONS_DIR)
    runner.up(target="0001_initial")
    now = utcnow()
    database.execute_sql("INSERT INTO promo_code (code, kind, percent, uses, active, created_at) "
                         "VALUES ('FREE_ACCESS', 'free_access', 0, 0, 1, ?), ('VIP', 'free_access', 0, 0, 1, ?)",
                         (now, now))
    database.execute_sql("UPDATE promo_code SET max_uses = 5, free_access_days = 7 WHERE code = 'VIP'")
    runner.up()
    active = dict(database.execute_sql("SELECT code, active FROM promo_code").fetchall())
    assert active == {"FREE_ACCESS": 0, "VIP": 1}
    database.close()


def test_user_rows_are_untouched_by_a_refused_code(shop):
    with pytest.raises(promo.UnknownCode):
        promo.redeem_free_access("FREE_ACCESS", shop.user.id)
    assert not User.get_by_id(shop.user.id).has_free_access
    assert LedgerEntry.select().count() == 0


def test_a_full_disk_answers_503_so_yookassa_delivers_again(shop):
    """Issue 8 §4: the credit cannot be written — nothing changes and YooKassa is asked to retry."""
    order = payments.create_topup(shop.user.id, 100)
    shop.fake.succeed(order.yookassa_payment_id)
    filler, _ = billing.get_or_create_user(880099, free_operations=0)
    pages = shop.database.execute_sql("PRAGMA page_count").fetchone()[0]
    shop.database.execute_sql("PRAGMA max_page_count = %d" % pages)
    try:
        for i in range(5000):                       # fill the ledger's pages to the brim
            try:
                billing.credit(filler.id, 1, kind="grant", reference="fill", idempotency_key="fill:%06d" % i)
            except billing.StorageFull:
                break
        else:
            pytest.fail("the capped database never filled up")
        outcome = notify(shop, "payment.succeeded", order.yookassa_payment_id)
        assert (outcome.http_status, outcome.detail) == (503, "storage_full")
        assert Payment.get_by_id(order.id).status == "pending" and credits_of(shop.user.id) == 0
    finally:
        shop.database.execute_sql("PRAGMA max_page_count = 1073741823")
    notify(shop, "payment.succeeded", order.yookassa_payment_id)
    assert credits_of(shop.user.id) == 100
    audit_ok()
