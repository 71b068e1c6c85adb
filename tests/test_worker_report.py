"""The daily payment report task: our ledger compared with what YooKassa lists, admins told
in Telegram when they disagree (fake YooKassa through the real SDK, fake Telegram)."""
import pytest
from yookassa import Payment as YKPayment

import billing
import payments
import promo
import worker
from models import utcnow
from tests.helpers import configure

ADMIN = 1000      # ADMIN_IDS in the test environment


@pytest.fixture
def setup(database, fake_telegram, fake_yookassa):
    cfg = configure(fake_telegram, yookassa_api_url=fake_yookassa.api_url, yookassa_timeout=2.0)
    fake_telegram.add_user(ADMIN)
    promo.seed_defaults()
    user, _ = billing.get_or_create_user(777001, free_operations=0)
    order = payments.create_topup(user.id, 100, cfg=cfg)
    fake_yookassa.succeed(order.yookassa_payment_id)
    payments.check_payment(order.id, user.id, cfg)
    return cfg


def admin_messages(fake_telegram):
    return [m["text"] for m in fake_telegram.messages(ADMIN)]


def test_a_matching_day_is_quiet(setup, fake_telegram):
    report = worker.payment_report_once(setup, day=utcnow().date())
    assert report["ok"] and report["topups"]["ours_kopecks"] == report["topups"]["api_kopecks"] == 10000
    assert admin_messages(fake_telegram) == []


def test_a_payment_missing_from_our_ledger_is_reported_to_the_admins(setup, fake_telegram, fake_yookassa):
    foreign = YKPayment.create({"amount": {"value": "5.00", "currency": "RUB"}, "capture": True,
                                "confirmation": {"type": "redirect", "return_url": "https://t.me/x"}},
                               idempotency_key="foreign-report-1")
    fake_yookassa.succeed(foreign.id)
    report = worker.payment_report_once(setup, day=utcnow().date())
    assert report["ok"] is False and report["topups"]["missing_ours"] == [foreign.id]
    [text] = admin_messages(fake_telegram)
    assert utcnow().date().isoformat() in text and foreign.id in text and "расходятся" in text


def test_no_report_without_yookassa(database, fake_telegram):
    cfg = configure(fake_telegram, yookassa_shop_id="", yookassa_secret_key="")
    assert worker.payment_report_once(cfg) is None
