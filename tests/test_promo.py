"""Promo codes: seeding, discount math in kopecks, every refusal, once per user, races, release."""
from __future__ import annotations

import datetime
import logging
import threading
import uuid
from decimal import ROUND_HALF_UP, Decimal

import pytest

import billing
import promo
import texts
from models import Payment, PromoCode, PromoRedemption, utcnow


def _audit_ok():
    report = billing.audit()
    assert report.ok, "\n".join(report.violations)


def _user(telegram_id: int) -> int:
    user, _ = billing.get_or_create_user(telegram_id, first_name="u%d" % telegram_id, free_operations=0)
    return user.id


def _order(user_id: int, status: str = "pending", credits: int = 100) -> uuid.UUID:
    """A bare top-up order row (what payments.create_topup writes first)."""
    now = utcnow()
    return Payment.create(id=uuid.uuid4(), user=user_id, credits=credits, amount_kopecks=credits * 90,
                          status=status, created_at=now, updated_at=now).id


def test_seed_defaults_is_idempotent(database):
    assert promo.seed_defaults() == 5
    assert promo.seed_defaults() == 0
    codes = {p.code: (p.kind, p.percent, p.free_access_days, p.max_uses, p.expires_at) for p in promo.list_codes()}
    assert codes == {
        "BONUS30": ("discount", 30, None, None, None),
        "FREE_ACCESS": ("free_access", 0, None, None, None),
        "MEGA50": ("discount", 50, None, None, None),
        "SAVE20": ("discount", 20, None, None, None),
        "WELCOME10": ("discount", 10, None, None, None),
    }
    assert [p.code for p in promo.list_codes()] == sorted(codes)


@pytest.mark.parametrize("credits, percent, kopecks", [
    (100, 10, 9000),        # docs/SPEC.md §4: 100 credits with 10 % off cost 90.00 ₽
    (100, 0, 10000),
    (300, 20, 24000),
    (333, 33, 22311),
    (7, 50, 350),
    (1, 99, 100),           # 0.01 ₽ → the 1.00 ₽ floor
    (1, 50, 100),           # 0.50 ₽ → the floor
    (2, 50, 100),           # exactly 1.00 ₽
    (3, 50, 150),
    (100000, 99, 100000),
])
def test_discounted_kopecks(credits, percent, kopecks):
    assert promo.discounted_kopecks(credits, percent) == kopecks


def test_discounted_kopecks_matches_decimal_half_up():
    for credits in (1, 2, 3, 7, 10, 99, 101, 333, 999, 12345):
        for percent in range(100):
            exact = (Decimal(credits) * 100 * (100 - percent) / 100).quantize(Decimal(1), ROUND_HALF_UP)
            assert promo.discounted_kopecks(credits, percent) == max(int(exact), 100)


@pytest.mark.parametrize("credits, percent", [(0, 10), (-1, 10), (10, 100), (10, -1), (1.5, 10), (10, 10.0),
                                              (True, 10), ("10", 10)])
def test_discounted_kopecks_rejects_bad_input(credits, percent):
    with pytest.raises(ValueError):
        promo.discounted_kopecks(credits, percent)


def test_normalize():
    assert promo.normalize("  welcome10 ") == "WELCOME10"
    assert promo.normalize(None) == ""


def test_each_refusal_has_its_own_exception_and_text(database):
    promo.seed_defaults()
    user = _user(101)
    now = utcnow()
    promo.add_code("OLD", "discount", percent=5, expires_at=now - datetime.timedelta(seconds=1))
    promo.add_code("ONCE", "discount", percent=5, max_uses=1)
    promo.add_code("OFF", "discount", percent=5)
    promo.set_active("off", False)
    PromoCode.update(uses=1).where(PromoCode.code == "ONCE").execute()

    cases = [
        ("NOPE", promo.UnknownCode, "promo_unknown"),
        ("🎟️", promo.UnknownCode, "promo_unknown"),
        ("OFF", promo.CodeInactive, "promo_inactive"),
        ("OLD", promo.CodeExpired, "promo_expired"),
        ("ONCE", promo.CodeExhausted, "promo_exhausted"),
        ("FREE_ACCESS", promo.WrongCodeKind, "promo_wrong_kind_topup"),
    ]
    for code, exc_type, key in cases:
        with pytest.raises(exc_type) as info:
            promo.check_discount(code, user)
        assert type(info.value) is exc_type and info.value.text_key == key, code
        assert texts.t(key, "ru") and texts.t(key, "en") != texts.t(key, "ru")
    with pytest.raises(promo.WrongCodeKind) as info:
        promo.redeem_free_access("welcome10", user)
    assert info.value.text_key == "promo_wrong_kind_free"
    assert texts.TEXTS["promo_already_used"]["en"] and texts.TEXTS["promo_error"]["en"]
    # Nothing was written by any refusal.
    assert PromoRedemption.select().count() == 0
    assert promo.check_discount(" welcome10", user).percent == 10


def test_code_is_once_per_user_and_reserved_on_a_pending_payment(database):
    promo.seed_defaults()
    alice, bob = _user(201), _user(202)
    welcome = promo.check_discount("WELCOME10", alice)
    first = _order(alice)
    promo.reserve_for_payment(welcome, alice, first)
    # While the first order is pending, the code is taken for Alice (not for Bob).
    with pytest.raises(promo.CodeAlreadyUsed):
        promo.check_discount("WELCOME10", alice)
    with pytest.raises(promo.CodeAlreadyUsed):
        promo.reserve_for_payment(welcome, alice, _order(alice))
    assert promo.check_discount("WELCOME10", bob).code == "WELCOME10"
    # Success consumes it: used once, never again for Alice.
    Payment.update(status="succeeded").where(Payment.id == first).execute()
    assert promo.consume_for_payment(first) is True
    assert promo.consume_for_payment(first) is False
    assert PromoCode.get(PromoCode.code == "WELCOME10").uses == 1
    with pytest.raises(promo.CodeAlreadyUsed):
        promo.check_discount("welcome10", alice)
    assert promo.redemption_count("WELCOME10") == 1


def test_release_on_cancel_frees_the_code(database):
    promo.seed_defaults()
    user = _user(301)
    save = promo.check_discount("SAVE20", user)
    first = _order(user)
    promo.reserve_for_payment(save, user, first)
    Payment.update(status="canceled").where(Payment.id == first).execute()
    assert promo.release_for_payment(first) is True
    assert promo.release_for_payment(first) is False
    second = _order(user)
    promo.reserve_for_payment(promo.check_discount("SAVE20", user), user, second)
    rows = list(PromoRedemption.select())
    assert [(r.payment_id, r.state) for r in rows] == [(second, "reserved")]   # the row was re-used
    assert PromoCode.get(PromoCode.code == "SAVE20").uses == 0


def test_stale_reservation_on_a_finished_payment_does_not_block(database):
    promo.seed_defaults()
    user = _user(302)
    order = _order(user)
    promo.reserve_for_payment(promo.check_discount("BONUS30", user), user, order)
    Payment.update(status="canceled").where(Payment.id == order).execute()   # canceled, release missed
    assert promo.check_discount("BONUS30", user).percent == 30


def test_exhausted_under_a_race_still_consumes_and_counts_once(database, caplog):
    promo.add_code("LAST", "discount", percent=40, max_uses=1)
    users = [_user(401), _user(402)]
    orders = []
    for user in users:   # reservations do not count against max_uses: both orders get the discount
        order = _order(user)
        promo.reserve_for_payment(promo.check_discount("LAST", user), user, order)
        orders.append(order)
    Payment.update(status="succeeded").where(Payment.id.in_(orders)).execute()
    barrier = threading.Barrier(2)
    results = []

    def consume(order):
        barrier.wait()
        results.append(promo.consume_for_payment(order))
        database.close()

    with caplog.at_level(logging.WARNING, logger="promo"):
        threads = [threading.Thread(target=consume, args=(o,)) for o in orders]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert results == [True, True]     # both users paid the discounted price: both redemptions consumed
    assert PromoCode.get(PromoCode.code == "LAST").uses == 1
    assert [r.state for r in PromoRedemption.select()] == ["consumed", "consumed"]
    assert any("exhausted at success time" in r.getMessage() for r in caplog.records)
    with pytest.raises(promo.CodeExhausted):
        promo.check_discount("LAST", _user(403))


def test_redeem_free_access(database):
    promo.seed_defaults()
    promo.add_code("WEEK", "free_access", days=7, max_uses=1)
    user, other = _user(501), _user(502)
    now = utcnow()
    redeemed = promo.redeem_free_access(" week ", user, now=now)
    assert redeemed.has_free_access and redeemed.free_access_until == now + datetime.timedelta(days=7)
    assert billing.get_balance(user).free_access
    with pytest.raises(promo.CodeAlreadyUsed):
        promo.redeem_free_access("WEEK", user)
    with pytest.raises(promo.CodeExhausted):
        promo.redeem_free_access("WEEK", other)
    assert not billing.get_balance(other).free_access
    unlimited = promo.redeem_free_access("FREE_ACCESS", other)
    assert unlimited.has_free_access and unlimited.free_access_until is None
    assert PromoCode.get(PromoCode.code == "FREE_ACCESS").uses == 1
    _audit_ok()


@pytest.mark.parametrize("args, kwargs", [
    (("x", "discount"), {"percent": 10}),              # too short
    (("BAD CODE", "discount"), {"percent": 10}),
    (("ПРОМО", "discount"), {"percent": 10}),
    (("GOOD", "discount"), {"percent": 0}),
    (("GOOD", "discount"), {"percent": 100}),
    (("GOOD", "bonus"), {"percent": 10}),
    (("GOOD", "free_access"), {"days": 0}),
    (("GOOD", "discount"), {"percent": 10, "max_uses": 0}),
    (("WELCOME10", "discount"), {"percent": 10}),      # exists
])
def test_add_code_validates(database, args, kwargs):
    promo.seed_defaults()
    with pytest.raises(promo.InvalidCode):
        promo.add_code(*args, **kwargs)
    assert PromoCode.select().count() == 5


def test_add_code_stores_upper_case(database):
    created = promo.add_code("spring-25", "discount", percent=25, max_uses=100)
    assert (created.code, created.percent, created.max_uses, created.uses) == ("SPRING-25", 25, 100, 0)
    assert promo.check_discount("Spring-25", _user(601)).id == created.id
