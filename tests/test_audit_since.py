"""`billing.audit_since(N)`: the incremental audit of the ledger rows after id N (issue 13 §3)."""
from peewee import fn

import billing
from models import Balance, LedgerEntry


def _user(telegram_id, credits=100):
    user, _ = billing.get_or_create_user(telegram_id, free_operations=0)
    billing.credit(user.id, credits, kind="grant", reference="admin:1:test", idempotency_key="grant:%d" % telegram_id)
    return user


def _last_id():
    return LedgerEntry.select(fn.MAX(LedgerEntry.id)).scalar()


def test_clean_rows_after_a_clean_audit(database):
    a, b = _user(11), _user(12)
    assert billing.audit().ok
    since = _last_id()
    for user, key in ((a, "g1"), (b, "g2"), (a, "g3")):
        r = billing.reserve(user.id, 10, reference="generation:" + key, idempotency_key="generation:" + key, ttl=900)
        billing.commit(r.id) if key != "g3" else billing.release(r.id)
    billing.reserve(b.id, 10, reference="generation:g4", idempotency_key="generation:g4", ttl=900)   # left open
    report = billing.audit_since(since)
    assert report.ok, report.violations
    assert report.summary["last_ledger_id"] == _last_id()
    assert report.summary["new_ledger_rows"] == _last_id() - since
    assert report.summary["reservations"] == {"committed": 2, "released": 1, "reserved": 1}
    assert billing.audit_since(_last_id()).ok                # nothing new: nothing to find


def test_a_cached_balance_that_disagrees_with_new_rows_is_found(database):
    a = _user(21)
    since = _last_id()
    r = billing.reserve(a.id, 10, reference="generation:x", idempotency_key="generation:x", ttl=900)
    billing.commit(r.id)
    Balance.update(available=Balance.available + 5).where((Balance.user == a.id) & (Balance.asset == "credits")).execute()
    report = billing.audit_since(since)
    assert any(v.startswith("I1 user %s credits" % a.id) for v in report.violations), report.violations
    assert not billing.audit().ok                            # the full audit agrees


def test_a_new_top_up_over_its_order_is_found_without_reading_every_order(database):
    """I15 in the incremental audit reads only the orders the new rows credit or refund."""
    from models import Payment

    a = _user(31)
    quiet = Payment.create(user=a.id, credits=100, amount_kopecks=10000, status="succeeded",
                           telegram_charge_id="stx-on-a-yookassa-order")       # old: the full audit's business
    since = _last_id()
    order = Payment.create(user=a.id, credits=100, amount_kopecks=10000, status="succeeded",
                           yookassa_payment_id="2f1c0d1e-000f-5000-8000-000000000001")
    billing.credit(a.id, 150, kind="topup", reference="payment:%s" % order.id, idempotency_key="topup:%s" % order.id)
    i15 = [v for v in billing.audit_since(since).violations if v.startswith("I15")]
    assert i15 == ["I15 payment %s: 150 credits topped up, 100 paid for" % order.id]
    assert any(str(quiet.id) in v for v in billing.audit().violations if v.startswith("I15"))
