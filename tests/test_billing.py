"""billing.py against issue #3: reserve → commit | release | expire, the append-only ledger,
idempotency keys, amounts, refunds, the sweeper, the audit and the first-contact race.

Every test runs on SQLite and, with TEST_POSTGRES_URL set, on PostgreSQL (`any_database`).
"Changes nothing" is always checked the same way: a snapshot of every ledger row count,
balance and reservation state before and after the call must be equal.
"""
import datetime
import threading
from decimal import Decimal

import pytest
from peewee import DatabaseError

import billing
import config
import models
from models import Balance, LedgerEntry, Payment, Reservation, User
from tests import billing_harness
from tests.helpers import audit_ok

PRICE = 10
T0 = datetime.datetime(2030, 1, 1, 12, 0, 0)


# --- helpers ---------------------------------------------------------------------------------

def snapshot():
    """Everything money: ledger size, every balance, every reservation's state."""
    return (
        LedgerEntry.select().count(),
        sorted((b.user_id, b.asset, b.available, b.reserved) for b in Balance.select()),
        sorted((r.id, r.state, r.asset, r.amount) for r in Reservation.select()),
    )


def make_user(telegram_id=1001, *, credits=0, free_ops=0):
    user, _ = billing.get_or_create_user(telegram_id, free_operations=free_ops)
    if credits:
        billing.credit(user.id, credits, kind="grant", reference="test", idempotency_key="grant:%d" % telegram_id)
    return user.id


def reserve(user_id, amount=PRICE, key=None, *, ttl=900, now=None, reference=None):
    key = key or "generation:%s" % len(Reservation.select())
    return billing.reserve(user_id, amount, reference=reference or key, idempotency_key=key, ttl=ttl, now=now)


def balance(user_id):
    b = billing.get_balance(user_id)
    return b.credits, b.credits_reserved, b.free_ops, b.free_ops_reserved


def topup_payment(user_id, credits):
    """A succeeded Payment as payments.py records it (the audit checks top-ups against it)."""
    payment = Payment.create(user=user_id, credits=credits, amount_kopecks=credits * 100, status="succeeded",
                             yookassa_payment_id="yk-%s" % credits, succeeded_at=models.utcnow())
    return payment


def run_together(count, target):
    """Run `target()` in `count` threads released by one barrier; return (results, errors)."""
    barrier, results, errors = threading.Barrier(count), [], []

    def go():
        try:
            barrier.wait(10)
            results.append(target())
        except Exception as exc:
            errors.append(exc)
        finally:
            models.db.close()

    threads = [threading.Thread(target=go) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results, errors


# --- users -----------------------------------------------------------------------------------

def test_a_new_user_gets_the_free_operations_once(any_database, cfg):
    user, created = billing.get_or_create_user(42, username="ann", language_code="ru")
    again, created_again = billing.get_or_create_user(42, username="ann2")
    assert (created, created_again) == (True, False)
    assert again.id == user.id and User.get_by_id(user.id).username == "ann2"
    assert balance(user.id) == (0, 0, cfg.free_operations_count, 0)
    grants = list(LedgerEntry.select().where(LedgerEntry.kind == "grant"))
    assert [(g.user_id, g.asset, g.amount, g.idempotency_key) for g in grants] == [
        (user.id, "free_ops", cfg.free_operations_count, "free_ops:tg:42")]
    audit_ok()


@pytest.mark.parametrize("telegram_id", [0, -5, True, "42", 4.0, None])
def test_a_bad_telegram_id_is_rejected_before_a_write(any_database, telegram_id):
    with pytest.raises(billing.BillingError):
        billing.get_or_create_user(telegram_id)
    assert User.select().count() == 0 and LedgerEntry.select().count() == 0


def test_ten_threads_racing_a_first_contact_make_one_user_and_one_grant(any_database, cfg):
    for telegram_id in (77, 78, 79):   # the race is timing-dependent: several rounds make it show
        results, errors = run_together(10, lambda t=telegram_id: billing.get_or_create_user(t, first_name="Racer"))
        assert errors == [] and len(results) == 10 and len({user.id for user, _ in results}) == 1
        assert sum(created for _, created in results) == 1, \
            "created=True must be returned to exactly one caller, got %d" % sum(created for _, created in results)
    assert User.select().count() == 3
    assert [e.amount for e in LedgerEntry.select().where(LedgerEntry.kind == "grant")] == \
        [cfg.free_operations_count] * 3
    audit_ok()


def test_ten_processes_racing_a_first_contact_make_one_user_and_one_grant(any_database, cfg):
    results = billing_harness.user_race(config.get().database_url, telegram_id=88, processes=10)
    assert [r["error"] for r in results if r["error"]] == []
    assert len({r["user_id"] for r in results}) == 1
    assert User.select().count() == 1
    assert [e.amount for e in LedgerEntry.select().where(LedgerEntry.kind == "grant")] == [cfg.free_operations_count]
    assert sum(r["created"] for r in results) == 1, "created=True must be returned to exactly one caller"
    audit_ok()


# --- reserve ---------------------------------------------------------------------------------

def test_free_operations_are_used_first_then_credits(any_database):
    user_id = make_user(credits=25, free_ops=2)
    first, second = reserve(user_id, key="g1"), reserve(user_id, key="g2")
    assert [(r.asset, r.amount) for r in (first, second)] == [("free_ops", 1), ("free_ops", 1)]
    assert balance(user_id) == (25, 0, 0, 2)
    third, fourth = reserve(user_id, key="g3"), reserve(user_id, key="g4")
    assert [(r.asset, r.amount) for r in (third, fourth)] == [("credits", PRICE), ("credits", PRICE)]
    assert balance(user_id) == (5, 20, 0, 2)
    before = snapshot()
    with pytest.raises(billing.InsufficientCredits):
        reserve(user_id, key="g5")
    assert snapshot() == before
    for r in (first, third):
        billing.commit(r.id)
    for r in (second, fourth):
        billing.release(r.id)
    assert balance(user_id) == (15, 0, 1, 0)
    audit_ok()


def test_free_access_reserves_nothing(any_database):
    user_id = make_user(credits=25, free_ops=1)
    billing.set_free_access(user_id, days=None)
    before = snapshot()
    r = reserve(user_id, key="fa1")
    assert (r.asset, r.amount, r.state) == ("free_access", 0, "reserved")
    assert snapshot()[:2] == before[:2], "free access must hold neither credits nor a free operation"
    billing.commit(r.id)
    assert snapshot()[:2] == before[:2]
    with pytest.raises(billing.AlreadyCommitted):
        billing.commit(r.id)
    billing.set_free_access(user_id, enabled=False)
    assert reserve(user_id, key="fa2").asset == "free_ops"
    audit_ok()


def test_free_access_for_some_days_ends(any_database):
    user_id = make_user(credits=25)
    billing.set_free_access(user_id, days=3, now=T0)
    assert reserve(user_id, key="d1", now=T0 + datetime.timedelta(days=2)).asset == "free_access"
    assert reserve(user_id, key="d2", now=T0 + datetime.timedelta(days=3, seconds=1)).asset == "credits"
    assert balance(user_id) == (15, 10, 0, 0)


def test_insufficient_credits_change_nothing(any_database):
    user_id = make_user(credits=PRICE - 1)
    before = snapshot()
    with pytest.raises(billing.InsufficientCredits):
        reserve(user_id)
    assert snapshot() == before
    assert Reservation.select().count() == 0
    audit_ok()


def test_a_blocked_user_cannot_reserve(any_database):
    user_id = make_user(credits=100, free_ops=1)
    User.update(is_blocked=True).where(User.id == user_id).execute()
    before = snapshot()
    with pytest.raises(billing.UserBlocked):
        reserve(user_id)
    assert snapshot() == before


def test_an_unknown_user_is_rejected(any_database):
    before = snapshot()
    with pytest.raises(billing.UnknownUser):
        reserve(999)
    with pytest.raises(billing.UnknownUser):
        billing.credit(999, 5, reference="x", idempotency_key="x")
    with pytest.raises(billing.UnknownUser):
        billing.take_back(999, 5, reference="x", idempotency_key="y")
    assert snapshot() == before


# --- commit / release / expire ----------------------------------------------------------------

def test_release_restores_the_balance(any_database):
    user_id = make_user(credits=30)
    r = reserve(user_id)
    assert balance(user_id) == (20, 10, 0, 0)
    released = billing.release(r.id)
    assert released.state == "released" and Reservation.get_by_id(r.id).state == "released"
    assert balance(user_id) == (30, 0, 0, 0)
    rows = [(e.kind, e.delta_available, e.delta_reserved, e.available_after, e.reserved_after)
            for e in LedgerEntry.select().where(LedgerEntry.asset == "credits").order_by(LedgerEntry.id)]
    assert rows == [("grant", 30, 0, 30, 0), ("reserve", -10, 10, 20, 10), ("release", 10, -10, 30, 0)]
    audit_ok()


def test_commit_spends_the_reservation(any_database):
    user_id = make_user(credits=30)
    r = reserve(user_id)
    committed = billing.commit(r.id)
    assert committed.state == "committed" and committed.resolved_at is not None
    assert balance(user_id) == (20, 0, 0, 0)
    last = LedgerEntry.select().order_by(LedgerEntry.id.desc()).get()
    assert (last.kind, last.amount, last.delta_available, last.delta_reserved, last.reference) == (
        "commit", PRICE, 0, -PRICE, r.reference)
    audit_ok()


ILLEGAL = [
    ("commit", "commit", billing.AlreadyCommitted),
    ("commit", "release", billing.AlreadyCommitted),
    ("commit", "expire", billing.AlreadyCommitted),
    ("release", "commit", billing.AlreadyReleased),
    ("release", "release", billing.AlreadyReleased),
    ("release", "expire", billing.AlreadyReleased),
    ("expire", "commit", billing.ReservationExpired),
    ("expire", "release", billing.ReservationExpired),
    ("expire", "expire", billing.ReservationExpired),
]


@pytest.mark.parametrize("asset", ["credits", "free_ops", "free_access"])
@pytest.mark.parametrize("first,second,error", ILLEGAL, ids=["%s-then-%s" % (f, s) for f, s, _ in ILLEGAL])
def test_a_reservation_resolves_exactly_once(any_database, asset, first, second, error):
    user_id = make_user(credits=50, free_ops=1 if asset == "free_ops" else 0)
    if asset == "free_access":
        billing.set_free_access(user_id)
    r = reserve(user_id)
    assert r.asset == asset
    getattr(billing, first)(r.id)
    before = snapshot()
    with pytest.raises(billing.ReservationClosed) as caught:
        getattr(billing, second)(r.id)
    assert type(caught.value) is error, "each closed state has its own exception"
    assert snapshot() == before
    audit_ok()


def test_the_closed_state_exceptions_are_distinct():
    classes = {billing.AlreadyCommitted, billing.AlreadyReleased, billing.ReservationExpired}
    assert len(classes) == 3 and all(issubclass(c, billing.ReservationClosed) for c in classes)
    assert len({c.__doc__ for c in classes}) == 3


@pytest.mark.parametrize("operation", ["commit", "release", "expire"])
def test_an_unknown_reservation_is_rejected(any_database, operation):
    make_user(credits=50)
    before = snapshot()
    with pytest.raises(billing.UnknownReservation):
        getattr(billing, operation)(12345)
    assert snapshot() == before


def test_expire_stale_expires_only_stale_reservations(any_database):
    user_id = make_user(credits=100, free_ops=1)
    short = reserve(user_id, key="short", ttl=60, now=T0)          # free op, stale at T0+60
    long = reserve(user_id, key="long", ttl=600, now=T0)           # credits, stale at T0+600
    done = reserve(user_id, key="done", ttl=60, now=T0)            # committed before the sweep
    billing.commit(done.id)
    assert billing.expire_stale(now=T0 + datetime.timedelta(seconds=59)) == []
    assert billing.expire_stale(now=T0 + datetime.timedelta(seconds=60)) == [short.id]
    assert [Reservation.get_by_id(r.id).state for r in (short, long, done)] == ["expired", "reserved", "committed"]
    assert balance(user_id) == (80, 10, 1, 0)
    assert billing.expire_stale(now=T0 + datetime.timedelta(seconds=60)) == []
    with pytest.raises(billing.ReservationExpired):
        billing.commit(short.id)
    assert billing.expire_stale(now=T0 + datetime.timedelta(hours=1)) == [long.id]
    assert balance(user_id) == (90, 0, 1, 0)
    audit_ok(now=T0 + datetime.timedelta(hours=1))


# --- idempotency -----------------------------------------------------------------------------

def test_a_replayed_credit_key_returns_the_first_row_and_credits_once(any_database):
    user_id = make_user()
    payment = topup_payment(user_id, 300)
    key, ref = "topup:%s" % payment.id, "payment:%s" % payment.id
    first = billing.credit(user_id, 300, kind="topup", reference=ref, idempotency_key=key)
    before = snapshot()
    for _ in range(3):
        assert billing.credit(user_id, 300, kind="topup", reference=ref, idempotency_key=key).id == first.id
    assert snapshot() == before and balance(user_id)[0] == 300
    audit_ok()


@pytest.mark.parametrize("change", ["amount", "user", "reference", "kind"])
def test_a_credit_key_reused_with_other_arguments_is_a_conflict(any_database, change):
    user_id, other_id = make_user(1), make_user(2)
    args = {"user_id": user_id, "amount": 50, "kind": "grant", "reference": "admin:1:gift"}
    billing.credit(idempotency_key="grant:upd-1", **args)
    changed = dict(args)
    changed[{"user": "user_id"}.get(change, change)] = {"amount": 51, "user": other_id,
                                                         "reference": "admin:1:other", "kind": "promo"}[change]
    before = snapshot()
    with pytest.raises(billing.IdempotencyConflict):
        billing.credit(idempotency_key="grant:upd-1", **changed)
    assert snapshot() == before
    audit_ok()


def test_a_replayed_reservation_key_returns_the_same_reservation(any_database):
    user_id = make_user(credits=100)
    first = reserve(user_id, key="generation:a")
    before = snapshot()
    assert reserve(user_id, key="generation:a").id == first.id
    assert snapshot() == before
    billing.commit(first.id)
    before = snapshot()
    replay = reserve(user_id, key="generation:a")
    assert (replay.id, replay.state) == (first.id, "committed"), "a late retry must not reserve again"
    assert snapshot() == before
    audit_ok()


@pytest.mark.parametrize("change", ["amount", "user", "reference"])
def test_a_reservation_key_reused_with_other_arguments_is_a_conflict(any_database, change):
    user_id, other_id = make_user(1, credits=100), make_user(2, credits=100)
    billing.reserve(user_id, PRICE, reference="generation:x", idempotency_key="generation:x", ttl=900)
    args = {"user_id": user_id, "amount": PRICE, "reference": "generation:x"}
    args[{"user": "user_id"}.get(change, change)] = {"amount": PRICE + 1, "user": other_id,
                                                      "reference": "generation:y"}[change]
    before = snapshot()
    with pytest.raises(billing.IdempotencyConflict):
        billing.reserve(idempotency_key="generation:x", ttl=900, **args)
    assert snapshot() == before


@pytest.mark.parametrize("asset", ["free_ops", "free_access"])
def test_a_reservation_key_reused_with_another_price_is_a_conflict_for_any_asset(any_database, asset):
    """Issue #3: "the same key with different fields is an error, never a silent success".
    A reservation that took a free operation (or free access) does not record the price it
    was asked for, so a retry with another price replays silently. See the report."""
    user_id = make_user(credits=100, free_ops=1)
    if asset == "free_access":
        billing.set_free_access(user_id)
    assert reserve(user_id, PRICE, key="generation:z").asset == asset
    before = snapshot()
    with pytest.raises(billing.IdempotencyConflict):
        reserve(user_id, PRICE * 5, key="generation:z")
    assert snapshot() == before


def test_the_same_key_from_eight_threads_reserves_once(any_database):
    user_id = make_user(credits=100)
    for round_ in range(5):   # the race is timing-dependent: several rounds make it show
        ids, errors = run_together(8, lambda n=round_: reserve(user_id, key="generation:dup:%d" % n).id)
        assert errors == [] and len(ids) == 8 and len(set(ids)) == 1, "round %d: %r" % (round_, errors)
    assert balance(user_id) == (50, 50, 0, 0)
    assert Reservation.select().count() == 5
    audit_ok()


@pytest.mark.parametrize("operation", ["credit", "take_back"])
def test_the_same_ledger_key_from_eight_threads_applies_once(any_database, operation):
    user_id = make_user(credits=100)

    def apply():
        if operation == "credit":
            return billing.credit(user_id, 30, kind="grant", reference="admin:1:dup", idempotency_key="dup").id
        return billing.take_back(user_id, 30, reference="refund:dup", idempotency_key="dup").id

    ids, errors = run_together(8, apply)
    assert errors == [] and len(ids) == 8 and len(set(ids)) == 1
    assert balance(user_id)[0] == (130 if operation == "credit" else 70)
    audit_ok()


def test_commit_and_release_racing_on_one_reservation_resolve_it_once(any_database):
    user_id = make_user(credits=100)
    for round_ in range(5):
        r = reserve(user_id, key="race:%d" % round_)
        barrier, outcomes = threading.Barrier(4), []

        def go(op, barrier=barrier, r=r, outcomes=outcomes):
            try:
                barrier.wait(10)
                getattr(billing, op)(r.id)
                outcomes.append(op)
            except billing.ReservationClosed as exc:
                outcomes.append(type(exc).__name__)
            except Exception as exc:
                outcomes.append(repr(exc))
            finally:
                models.db.close()

        threads = [threading.Thread(target=go, args=(op,)) for op in ("commit", "release", "expire", "commit")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        winners = [o for o in outcomes if o in ("commit", "release", "expire")]
        assert len(outcomes) == 4 and len(winners) == 1, outcomes
        loser = {"commit": "AlreadyCommitted", "release": "AlreadyReleased", "expire": "ReservationExpired"}[winners[0]]
        assert sorted(o for o in outcomes if o not in winners) == [loser] * 3
    audit_ok()


# --- amounts ---------------------------------------------------------------------------------

BAD_AMOUNTS = [0, -1, 1.5, "10", True, False, 2**63, -(2**63), None, float("nan"), float("inf"), Decimal(10), 10.0]


@pytest.mark.parametrize("amount", BAD_AMOUNTS, ids=repr)
@pytest.mark.parametrize("operation", ["credit", "reserve", "take_back"])
def test_a_bad_amount_is_rejected_before_any_write(any_database, operation, amount):
    user_id = make_user(credits=100, free_ops=1)
    before = snapshot()
    calls = {
        "credit": lambda uid: billing.credit(uid, amount, reference="x", idempotency_key="k-credit"),
        "reserve": lambda uid: billing.reserve(uid, amount, reference="x", idempotency_key="k-res", ttl=900),
        "take_back": lambda uid: billing.take_back(uid, amount, reference="x", idempotency_key="k-refund"),
    }
    with pytest.raises(billing.InvalidAmount):
        calls[operation](user_id)
    # Checked before the user is even looked up: an unknown user still gets InvalidAmount.
    with pytest.raises(billing.InvalidAmount):
        calls[operation](999999)
    assert snapshot() == before


@pytest.mark.parametrize("ttl", [0, -1, 1.5, None, True])
def test_a_bad_ttl_is_rejected(any_database, ttl):
    user_id = make_user(credits=100)
    before = snapshot()
    with pytest.raises(billing.InvalidAmount):
        billing.reserve(user_id, PRICE, reference="x", idempotency_key="x", ttl=ttl)
    assert snapshot() == before


def test_the_largest_amount_is_accepted(any_database):
    user_id = make_user()
    billing.credit(user_id, billing.INT64_MAX, kind="grant", reference="max", idempotency_key="max")
    assert balance(user_id)[0] == 2**63 - 1
    r = reserve(user_id, billing.INT64_MAX)
    billing.commit(r.id)
    assert balance(user_id) == (0, 0, 0, 0)
    audit_ok()


def test_a_credit_that_would_overflow_the_balance_is_rejected_and_changes_nothing(any_database):
    """I11: balances fit in int64. Today SQLite raises OverflowError and PostgreSQL
    peewee.DataError — both roll back, but neither is a BillingError. See the report."""
    user_id = make_user()
    billing.credit(user_id, billing.INT64_MAX, kind="grant", reference="max", idempotency_key="max")
    before = snapshot()
    with pytest.raises(billing.InvalidAmount):
        billing.credit(user_id, 1, kind="grant", reference="one", idempotency_key="one")
    assert snapshot() == before
    audit_ok()


def test_a_credit_cannot_make_an_open_reservation_unreleasable(any_database):
    """available + reserved must stay within int64, or releasing (or expiring) a reservation
    overflows: the reservation could then never end and would block the sweeper."""
    user_id = make_user()
    billing.credit(user_id, billing.INT64_MAX, kind="grant", reference="max", idempotency_key="max")
    r = reserve(user_id, billing.INT64_MAX - 5)                # 5 available, MAX-5 reserved
    try:
        billing.credit(user_id, billing.INT64_MAX - 10, kind="grant", reference="big", idempotency_key="big")
    except billing.InvalidAmount:
        pass                                                   # refusing the credit is the fix
    billing.release(r.id)                                      # must always be possible
    assert balance(user_id)[1] == 0
    audit_ok()


@pytest.mark.parametrize("key", ["", None, 17, "k" * 201])
def test_a_bad_idempotency_key_is_rejected(any_database, key):
    user_id = make_user(credits=100)
    before = snapshot()
    with pytest.raises(billing.BillingError):
        billing.credit(user_id, 5, reference="x", idempotency_key=key)
    with pytest.raises(billing.BillingError):
        billing.reserve(user_id, 5, reference="x", idempotency_key=key, ttl=900)
    assert snapshot() == before


# --- refunds (take_back) ---------------------------------------------------------------------

def test_take_back_is_capped_at_the_available_balance_and_records_the_shortfall(any_database):
    user_id = make_user(credits=30)
    reserve(user_id)                                   # 20 available, 10 reserved
    entry = billing.take_back(user_id, 50, reference="refund:r1", idempotency_key="refund:r1")
    assert (entry.kind, entry.amount, entry.delta_available, entry.shortfall) == ("payment_refund", 50, -20, 30)
    assert balance(user_id) == (0, 10, 0, 0), "the reservation is not touched by a refund"
    before = snapshot()
    assert billing.take_back(user_id, 50, reference="refund:r1", idempotency_key="refund:r1").id == entry.id
    assert snapshot() == before
    empty = billing.take_back(user_id, 7, reference="refund:r2", idempotency_key="refund:r2")
    assert (empty.delta_available, empty.shortfall) == (0, 7)
    with pytest.raises(billing.IdempotencyConflict):
        billing.take_back(user_id, 8, reference="refund:r2", idempotency_key="refund:r2")
    audit_ok()


def test_take_back_within_the_balance_has_no_shortfall(any_database):
    user_id = make_user(credits=30)
    entry = billing.take_back(user_id, 30, reference="refund:r3", idempotency_key="refund:r3")
    assert (entry.delta_available, entry.shortfall, entry.available_after) == (-30, 0, 0)
    audit_ok()


# --- the append-only guarantees ---------------------------------------------------------------

def _rejected(statement, params=()):
    with pytest.raises(DatabaseError) as caught, models.db.atomic():
        models.db.execute_sql(statement, params)
    return str(caught.value)


def test_the_ledger_rejects_update_and_delete(any_database):
    user_id = make_user(credits=30)
    reserve(user_id)
    before = [(e.id, e.amount, e.delta_available, e.available_after) for e in LedgerEntry.select()]
    assert "append-only" in _rejected("UPDATE ledger SET amount = amount + 1")
    assert "append-only" in _rejected("UPDATE ledger SET available_after = 0 WHERE kind = 'grant'")
    assert "append-only" in _rejected("DELETE FROM ledger")
    with pytest.raises(DatabaseError), models.db.atomic():
        LedgerEntry.update(shortfall=1).execute()
    after = [(e.id, e.amount, e.delta_available, e.available_after) for e in LedgerEntry.select()]
    assert after == before
    audit_ok()


@pytest.mark.parametrize("end", ["commit", "release", "expire"])
def test_a_resolved_reservation_cannot_be_updated_or_deleted(any_database, end):
    user_id = make_user(credits=30)
    r = reserve(user_id)
    getattr(billing, end)(r.id)
    state = Reservation.get_by_id(r.id).state
    assert "already resolved" in _rejected("UPDATE reservation SET state = 'reserved' WHERE id = %s" % r.id)
    assert "already resolved" in _rejected("UPDATE reservation SET amount = 1 WHERE id = %s" % r.id)
    assert "never deleted" in _rejected("DELETE FROM reservation WHERE id = %s" % r.id)
    assert Reservation.get_by_id(r.id).state == state
    audit_ok()


# --- the audit -------------------------------------------------------------------------------

def test_the_audit_passes_after_normal_operation_and_sums_up(any_database):
    a, b = make_user(1, credits=100, free_ops=2), make_user(2, free_ops=0)
    payment = topup_payment(b, 300)
    billing.credit(b, 300, kind="topup", reference="payment:%s" % payment.id, idempotency_key="topup:%s" % payment.id)
    for n, user_id in enumerate([a, a, a, b, b]):
        r = reserve(user_id, key="g%d" % n)
        (billing.commit if n % 2 == 0 else billing.release)(r.id)
    reserve(b, key="open")
    billing.take_back(b, 5, reference="refund:1", idempotency_key="refund:1")
    report = audit_ok()
    assert report.summary["users"] == 2
    assert report.summary["topups"] == 1 and report.summary["topup_credits"] == 300
    assert report.summary["reservations"] == {"reserved": 1, "committed": 3, "released": 2, "expired": 0}
    assert report.summary["credits_reserved"] == PRICE
    assert report.summary["credits_available"] == sum(balance(u)[0] for u in (a, b))
    assert report.summary["ledger_rows"] == LedgerEntry.select().count()


def test_the_audit_reports_a_tampered_balance_precisely(any_database):
    user_id = make_user(credits=30)
    Balance.update(available=Balance.available + 5).where(
        (Balance.user == user_id) & (Balance.asset == "credits")).execute()
    assert billing.audit().violations == [
        "I1 user %d credits: cached 35/0, ledger sums to 30/0" % user_id]


def test_the_audit_reports_reserved_credits_without_a_reservation(any_database):
    user_id = make_user(credits=30)
    r = reserve(user_id)
    Reservation.update(state="released").where(Reservation.id == r.id).execute()   # no ledger row
    violations = billing.audit().violations
    assert violations == [
        "I5 reservation %d is released but the ledger resolves it by nothing" % r.id,
        "I4 user %d credits: reserved 10, open reservations hold 0" % user_id,
    ]


def _drop_append_only_trigger():
    if models.is_sqlite():
        models.db.execute_sql("DROP TRIGGER ledger_no_update")
        return "ledger_no_update"
    models.db.execute_sql("DROP TRIGGER ledger_append_only ON ledger")
    return "ledger_append_only"


def test_the_audit_reports_a_missing_trigger(any_database):
    make_user(credits=30)
    name = _drop_append_only_trigger()
    assert billing.audit().violations == ["I8 trigger %s is missing: the ledger could be rewritten" % name]


def test_the_audit_reports_a_rewritten_ledger_row(any_database):
    user_id = make_user(credits=30)
    r = reserve(user_id)
    _drop_append_only_trigger()
    row = LedgerEntry.get(LedgerEntry.idempotency_key == "reserve:" + r.idempotency_key)
    LedgerEntry.update(available_after=25).where(LedgerEntry.id == row.id).execute()
    violations = billing.audit().violations
    assert "I2 ledger %d (user %d credits): balance-after 25/10 does not follow from the previous row (20/10)"\
           % (row.id, user_id) in violations
    assert any(v.startswith("I8 trigger") for v in violations)


def test_the_audit_reports_a_top_up_without_a_succeeded_payment(any_database):
    user_id = make_user()
    pending = Payment.create(user=user_id, credits=100, amount_kopecks=10000, status="pending")
    billing.credit(user_id, 100, kind="topup", reference="payment:%s" % pending.id, idempotency_key="t1")
    billing.credit(user_id, 50, kind="topup", reference="manual", idempotency_key="t2")
    rows = {e.idempotency_key: e.id for e in LedgerEntry.select()}
    assert billing.audit().violations == [
        "I7 top-up ledger %d: payment %s is pending" % (rows["t1"], pending.id),
        "I7 top-up ledger %d references no payment (manual)" % rows["t2"],
    ]


def test_the_audit_reports_too_many_free_operations(any_database):
    user, _ = billing.get_or_create_user(5, free_operations=9)
    assert billing.audit(free_operations=4).violations == [
        "I9 user %d was granted 9 free operations (limit 4)" % user.id]
    assert billing.audit(free_operations=9).ok


def test_the_audit_reports_a_reservation_the_sweeper_missed(any_database, cfg):
    user_id = make_user(credits=30)
    r = reserve(user_id, now=T0, ttl=cfg.reservation_ttl)
    limit = T0 + datetime.timedelta(seconds=cfg.reservation_ttl + cfg.sweep_interval)
    assert billing.audit(now=limit).ok
    assert billing.audit(now=limit + datetime.timedelta(seconds=1)).violations == [
        "I10 reservation %d (from %s) is open past its expiry %s + the sweep interval"
        % (r.id, T0, T0 + datetime.timedelta(seconds=cfg.reservation_ttl))]
    billing.expire_stale(now=limit)
    audit_ok(now=limit + datetime.timedelta(days=1))


def test_the_audit_never_writes(any_database):
    user_id = make_user(credits=30)
    reserve(user_id)
    before = snapshot()
    models.db.execute_sql("DROP TRIGGER %s" % ("ledger_no_update" if models.is_sqlite()
                                               else "ledger_append_only ON ledger"))
    billing.audit()
    billing.audit(now=datetime.datetime(2200, 1, 1))
    assert snapshot() == before


# --- SQLite lock discipline (ledger.md §5.2, T8) ------------------------------------------------

def test_the_sqlite_connection_is_set_up_for_money(database):
    pragmas = {name: database.execute_sql("PRAGMA %s" % name).fetchone()[0]
               for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")}
    assert pragmas == {"journal_mode": "wal", "synchronous": 2, "busy_timeout": 30000, "foreign_keys": 1}


def test_every_money_write_runs_in_a_begin_immediate_transaction(database):
    """No write may happen in a DEFERRED transaction (a read lock upgraded to a write lock gets
    SQLITE_BUSY at once, ignoring busy_timeout). Traces every statement SQLite runs."""
    user_id = make_user(credits=100, free_ops=1)
    statements = []
    database.connection().set_trace_callback(statements.append)
    r1, r2 = reserve(user_id, key="t1"), reserve(user_id, key="t2")
    billing.commit(r1.id)
    billing.release(r2.id)
    billing.expire_stale(now=T0)
    billing.expire(reserve(user_id, key="t3").id)
    billing.credit(user_id, 5, kind="grant", reference="x", idempotency_key="t4")
    billing.take_back(user_id, 5, reference="x", idempotency_key="t5")
    billing.set_free_access(user_id, days=2)
    billing.get_or_create_user(31337)
    database.connection().set_trace_callback(None)
    in_transaction, writes_outside, begins = None, [], []
    for sql in (s.strip() for s in statements):
        head = sql.split(None, 1)[0].upper()
        if head == "BEGIN":
            begins.append(sql)
            in_transaction = sql
        elif head in ("COMMIT", "ROLLBACK", "END"):
            in_transaction = None
        elif head in ("INSERT", "UPDATE", "DELETE") and in_transaction != "BEGIN IMMEDIATE":
            writes_outside.append((in_transaction, sql[:80]))
    assert begins and set(begins) == {"BEGIN IMMEDIATE"}
    assert writes_outside == []


def test_a_money_transaction_waits_for_the_write_lock_instead_of_failing(database):
    import sqlite3

    user_id = make_user(credits=100)
    holder = sqlite3.connect(database.database, timeout=30, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("UPDATE user SET username = 'held' WHERE id = ?", (user_id,))
    done, errors = threading.Event(), []

    def charge():
        try:
            billing.commit(reserve(user_id, key="waiting").id)
        except Exception as exc:
            errors.append(exc)
        finally:
            done.set()
            models.db.close()

    thread = threading.Thread(target=charge)
    thread.start()
    assert not done.wait(0.5), "the reserve did not wait for the lock: %r" % errors
    # The audit reads a snapshot while the writer holds the lock (safe while the bot runs).
    report = billing.audit()
    assert report.ok and report.summary["reservations"]["reserved"] == 0
    holder.execute("COMMIT")
    holder.close()
    assert done.wait(30) and errors == []
    thread.join(5)
    assert balance(user_id) == (90, 0, 0, 0)
    assert User.get_by_id(user_id).username == "held"


def test_the_deferred_anti_pattern_fails_at_once_as_the_notes_say(database):
    """Negative control for the test above: a DEFERRED read-then-write gets SQLITE_BUSY
    immediately, busy_timeout notwithstanding — what BEGIN IMMEDIATE prevents."""
    import sqlite3
    import time

    make_user(credits=100)
    reader = sqlite3.connect(database.database, timeout=30, isolation_level=None)
    writer = sqlite3.connect(database.database, timeout=30, isolation_level=None)
    reader.execute("BEGIN")                                    # DEFERRED
    reader.execute("SELECT available FROM balance").fetchall()  # read snapshot taken
    writer.execute("UPDATE balance SET available = available + 1 WHERE asset = 'credits'")
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked|busy"):
        reader.execute("UPDATE balance SET available = available - 1 WHERE asset = 'credits'")
    assert time.monotonic() - started < 5, "busy_timeout (30 s) was not consulted"
    reader.execute("ROLLBACK")
    reader.close()
    writer.close()
