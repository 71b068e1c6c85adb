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
from tests.helpers import audit_ok


def _user(telegram_id: int) -> int:
    user, _ = billing.get_or_create_user(telegram_id, first_name="u%d" % telegram_id, free_operations=0)
    return user.id


def _order(user_id: int, status: str = "pending", credits: int = 100) -> uuid.UUID:
    """A bare top-up order row (what payments.create_topup writes first)."""
    now = utcnow()
    return Payment.create(id=uuid.uuid4(), user=user_id, credits=credits, amount_kopecks=credits * 90,
                          status=status, created_at=now, updated_at=now).id


def test_seed_defaults_is_idempotent(database):
    assert promo.seed_defaults() == 4
    assert promo.seed_defaults() == 0
    codes = {v.promo.code: (v.promo.kind, v.promo.percent, v.promo.max_discount_kopecks, v.promo.max_uses,
                            v.promo.expires_at) for v in promo.list_codes()}
    assert codes == {   # discounts only: free access is never seeded (issue 9 §1)
        "BONUS30": ("discount", 30, None, None, None),
        "MEGA50": ("discount", 50, 25000, None, None),
        "SAVE20": ("discount", 20, None, None, None),
        "WELCOME10": ("discount", 10, None, None, None),
    }
    assert [v.promo.code for v in promo.list_codes()] == sorted(codes)


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


@pytest.mark.parametrize("credits, percent, cap, kopecks", [
    (1000, 50, 25000, 75000),   # MEGA50 on 1000 credits: 250 ₽ off, not 500 ₽
    (100, 50, 25000, 5000),     # under the cap: the plain 50 %
    (500, 50, 25000, 25000),    # exactly at the cap
    (3, 99, 100, 200),          # the cap applies before the 1.00 ₽ floor
    (1, 99, 1, 100),            # …and the floor still holds
])
def test_discount_cap(credits, percent, cap, kopecks):
    assert promo.discounted_kopecks(credits, percent, cap) == kopecks


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
    promo.add_code("WEEKFREE", "free_access", days=7, max_uses=10)
    PromoCode.update(uses=1).where(PromoCode.code == "ONCE").execute()

    cases = [
        ("NOPE", promo.UnknownCode, "promo_unknown"),
        ("🎟️", promo.UnknownCode, "promo_unknown"),
        ("OFF", promo.CodeInactive, "promo_inactive"),
        ("OLD", promo.CodeExpired, "promo_expired"),
        ("ONCE", promo.CodeExhausted, "promo_exhausted"),
        ("WEEKFREE", promo.WrongCodeKind, "promo_wrong_kind_topup"),
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
    assert PromoRedemption.select().where(PromoRedemption.state == "consumed").count() == 1


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


def test_max_uses_counts_codes_held_by_unpaid_orders(database):
    """Five users open orders with a max_uses=1 code: only the first gets the discount (issue 9 §2);
    reserved + consumed ≤ max_uses at every moment; a canceled order frees its place."""
    promo.add_code("LAST", "discount", percent=40, max_uses=1)
    users = [_user(400 + i) for i in range(5)]
    first = _order(users[0])
    promo.reserve_for_payment(promo.check_discount("LAST", users[0]), users[0], first)
    code = PromoCode.get(PromoCode.code == "LAST")
    for user in users[1:]:
        with pytest.raises(promo.CodeExhausted):
            promo.check_discount("LAST", user)
        with pytest.raises(promo.CodeExhausted):   # the re-check inside the transaction refuses too
            promo.reserve_for_payment(code, user, _order(user))
    assert promo.open_reservations(code.id) == 1
    # The holder may still re-use its own order's reservation.
    assert promo.reserve_for_payment(code, users[0], first).payment_id == first
    # Canceling the first order frees the place for someone else.
    Payment.update(status="canceled").where(Payment.id == first).execute()
    assert promo.release_for_payment(first)
    second = _order(users[1])
    promo.reserve_for_payment(promo.check_discount("LAST", users[1]), users[1], second)
    Payment.update(status="succeeded").where(Payment.id == second).execute()
    assert promo.consume_for_payment(second)
    assert (PromoCode.get_by_id(code.id).uses, promo.open_reservations(code.id)) == (1, 0)
    with pytest.raises(promo.CodeExhausted):
        promo.check_discount("LAST", users[2])


def test_max_uses_holds_under_racing_reservations(any_database):
    """Eight users reserve a max_uses=2 code at the same moment: exactly two get it."""
    promo.add_code("RACE", "discount", percent=30, max_uses=2)
    users = [_user(450 + i) for i in range(8)]
    any_database.close()
    orders = {user: _order(user) for user in users}
    code = PromoCode.get(PromoCode.code == "RACE")
    barrier = threading.Barrier(len(users))
    outcomes = []

    def take(user):
        barrier.wait()
        try:
            promo.reserve_for_payment(code, user, orders[user])
            outcomes.append("reserved")
        except promo.CodeExhausted:
            outcomes.append("exhausted")
        finally:
            any_database.close()

    threads = [threading.Thread(target=take, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(outcomes) == ["exhausted"] * 6 + ["reserved"] * 2
    assert promo.open_reservations(code.id) == 2


def test_a_payment_that_succeeds_after_its_cancel_consumes_past_the_limit_with_a_warning(database, caplog):
    """The one way past max_uses: an order canceled here (its place given to another user) that
    YooKassa later reports paid. The user paid the discounted price, so it is consumed and logged."""
    promo.add_code("LAST", "discount", percent=40, max_uses=1)
    alice, bob = _user(470), _user(471)
    late = _order(alice)
    promo.reserve_for_payment(promo.check_discount("LAST", alice), alice, late)
    Payment.update(status="canceled").where(Payment.id == late).execute()
    promo.release_for_payment(late)
    paid = _order(bob)
    promo.reserve_for_payment(promo.check_discount("LAST", bob), bob, paid)
    Payment.update(status="succeeded").where(Payment.id.in_([paid, late])).execute()
    assert promo.consume_for_payment(paid)
    with caplog.at_level(logging.WARNING, logger="promo"):
        assert promo.consume_for_payment(late)
    assert PromoCode.get(PromoCode.code == "LAST").uses == 1
    assert [r.state for r in PromoRedemption.select()] == ["consumed", "consumed"]
    assert any("exhausted at success time" in r.getMessage() for r in caplog.records)


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
    promo.add_code("OWNER", "free_access", unlimited=True)     # only with the explicit word
    unlimited = promo.redeem_free_access("OWNER", other)
    assert unlimited.has_free_access and unlimited.free_access_until is None
    assert PromoCode.get(PromoCode.code == "OWNER").uses == 1
    assert [v.unlimited_free_access for v in promo.list_codes() if v.promo.code == "OWNER"] == [True]
    audit_ok()


def test_free_access_is_not_seeded_and_needs_days_and_a_limit(database):
    promo.seed_defaults()
    user = _user(510)
    with pytest.raises(promo.UnknownCode):
        promo.redeem_free_access("FREE_ACCESS", user)
    for kwargs in ({}, {"days": 7}, {"max_uses": 5}, {"unlimited": True, "days": 7},
                   {"unlimited": True, "max_uses": 1}):
        with pytest.raises(promo.InvalidCode):
            promo.add_code("FREEBIE", "free_access", **kwargs)
    assert not billing.get_balance(user).free_access
    assert PromoCode.select().where(PromoCode.kind == "free_access").count() == 0


@pytest.mark.parametrize("args, kwargs", [
    (("x", "discount"), {"percent": 10}),              # too short
    (("BAD CODE", "discount"), {"percent": 10}),
    (("ПРОМО", "discount"), {"percent": 10}),
    (("GOOD", "discount"), {"percent": 0}),
    (("GOOD", "discount"), {"percent": 100}),
    (("GOOD", "bonus"), {"percent": 10}),
    (("GOOD", "free_access"), {"days": 0, "max_uses": 1}),
    (("GOOD", "free_access"), {"max_uses": 1}),
    (("GOOD", "free_access"), {"days": 7}),
    (("GOOD", "discount"), {"percent": 10, "max_discount_kopecks": 0}),
    (("GOOD", "discount"), {"percent": 10, "max_uses": 0}),
    (("WELCOME10", "discount"), {"percent": 10}),      # exists
])
def test_add_code_validates(database, args, kwargs):
    promo.seed_defaults()
    with pytest.raises(promo.InvalidCode):
        promo.add_code(*args, **kwargs)
    assert PromoCode.select().count() == 4


def test_add_code_stores_upper_case(database):
    created = promo.add_code("spring-25", "discount", percent=25, max_uses=100)
    assert (created.code, created.percent, created.max_uses, created.uses) == ("SPRING-25", 25, 100, 0)
    assert promo.check_discount("Spring-25", _user(601)).id == created.id
