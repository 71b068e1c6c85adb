"""Model-based test of the billing core (ledger.md §7.3 T12, our poor man's VOPR).

A Hypothesis `RuleBasedStateMachine` drives random sequences of users, top-ups, grants,
reservations (free access → free operation → credits), commit / release / expire, the
sweeper with a moving clock, refunds (`take_back`), free access on and off, blocked users,
and replayed or conflicting idempotency keys, against a small in-memory reference model.
Issue 9 added: discount codes with use limits reserved on orders, orders paid or canceled
(consume / release), partial refunds of paid orders (the cumulative rule), and queued jobs
whose holds the worker's sweeper must keep however long the backlog.
After every step the balances and reservation states must equal the model's and
`billing.audit()` must be clean.

Each example starts from a fresh database: a copy of the migrated SQLite template (cheap),
or truncated PostgreSQL tables with TEST_POSTGRES_URL. Hypothesis prints the failing steps and
the seed to reproduce them. `HYPOTHESIS_PROFILE=ci-long` runs many more examples.
"""
import dataclasses
import datetime
import os
import shutil
import tempfile
import uuid

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

import billing
import config
import models
import payments
import promo
import worker
from models import Balance, Generation, LedgerEntry, Payment, PromoCode, PromoRedemption, Reservation, User
from tests.helpers import postgres_url

T0 = datetime.datetime(2030, 1, 1)

PROFILES = {
    # < 20 s on the 2-core CI box; the long profile is for nightly runs.
    "default": dict(max_examples=60, stateful_step_count=30),
    "ci-long": dict(max_examples=2000, stateful_step_count=60),
}
PG_PROFILES = {"default": dict(max_examples=25, stateful_step_count=20),
               "ci-long": dict(max_examples=300, stateful_step_count=40)}


def machine_settings(profiles) -> settings:
    name = os.environ.get("HYPOTHESIS_PROFILE", "default")
    chosen = profiles.get(name, profiles["default"])
    return settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                    print_blob=True, **chosen)


@dataclasses.dataclass
class ModelUser:
    telegram_id: int
    credits: int = 0
    credits_reserved: int = 0
    free_ops: int = 0
    free_ops_reserved: int = 0
    free_access: bool = False
    free_access_until: datetime.datetime | None = None
    blocked: bool = False

    def has_free_access(self, now):
        return self.free_access and (self.free_access_until is None or self.free_access_until > now)


@dataclasses.dataclass
class ModelReservation:
    user_id: int
    asset: str
    amount: int
    state: str
    expires_at: datetime.datetime
    job: bool = False            # a queued job holds it: the worker's sweeper keeps it alive


@dataclasses.dataclass
class ModelCode:
    max_uses: int | None
    uses: int = 0
    holders: dict = dataclasses.field(default_factory=dict)   # user id -> ("reserved", order) | ("consumed", order) | ("released", order)


@dataclasses.dataclass
class ModelOrder:
    user_id: int
    code: str
    credits: int
    kopecks: int
    status: str = "pending"
    refunded: int = 0            # kopecks
    taken: int = 0               # credits asked back by its refunds


@dataclasses.dataclass(frozen=True)
class KeyUse:
    """One successful call under an idempotency key: how to repeat it and what it returned."""

    operation: str              # credit | take_back | reserve
    user_id: int
    amount: int
    reference: str
    key: str
    result_id: int
    kind: str = ""


CLOSED = {"committed": billing.AlreadyCommitted, "released": billing.AlreadyReleased,
          "expired": billing.ReservationExpired}


class BillingMachine(RuleBasedStateMachine):
    """The billing core against a reference model. `open_database()` gives each example a
    fresh, migrated, bound database."""

    users = Bundle("users")
    reservations = Bundle("reservations")
    keys = Bundle("keys")
    codes = Bundle("codes")
    orders = Bundle("orders")

    open_database = None   # set by the test: a callable returning a cleanup callable

    def __init__(self):
        super().__init__()
        self.cleanup = type(self).open_database()
        self.clock = T0
        self.model_users: dict[int, ModelUser] = {}
        self.model_reservations: dict[int, ModelReservation] = {}
        self.keys_by_reservation: dict[int, KeyUse] = {}
        self.model_codes: dict[str, ModelCode] = {}
        self.model_orders: dict = {}
        self.serial = 0
        worker.huey.flush()

    def teardown(self):
        worker.huey.flush()
        self.cleanup()

    # --- helpers -----------------------------------------------------------------------------

    def fresh(self, prefix):
        self.serial += 1
        return "%s:%d" % (prefix, self.serial)

    def snapshot(self):
        return (LedgerEntry.select().count(),
                sorted((b.user_id, b.asset, b.available, b.reserved) for b in Balance.select()),
                sorted((r.id, r.state) for r in Reservation.select()))

    # --- rules -------------------------------------------------------------------------------

    @rule(target=users, free_ops=st.integers(0, 4))
    def add_user(self, free_ops):
        telegram_id = 5000 + len(self.model_users)
        user, created = billing.get_or_create_user(telegram_id, free_operations=free_ops)
        assert created
        again, created_again = billing.get_or_create_user(telegram_id, free_operations=free_ops)
        assert (again.id, created_again) == (user.id, False)
        self.model_users[user.id] = ModelUser(telegram_id, free_ops=free_ops)
        return user.id

    @rule(target=keys, user_id=users, credits=st.integers(1, 500))
    def top_up(self, user_id, credits):
        payment = Payment.create(user=user_id, credits=credits, amount_kopecks=credits * 100, status="succeeded",
                                 yookassa_payment_id=str(uuid.uuid4()), succeeded_at=models.utcnow())
        reference, key = "payment:%s" % payment.id, "topup:%s" % payment.id
        entry = billing.credit(user_id, credits, kind="topup", reference=reference, idempotency_key=key)
        assert (entry.delta_available, entry.delta_reserved) == (credits, 0)
        self.model_users[user_id].credits += credits
        return KeyUse("credit", user_id, credits, reference, key, entry.id, kind="topup")

    @rule(target=keys, user_id=users, credits=st.integers(1, 200), kind=st.sampled_from(["grant", "promo", "adjust"]))
    def grant(self, user_id, credits, kind):
        reference, key = "admin:1:%s" % kind, self.fresh("grant")
        entry = billing.credit(user_id, credits, kind=kind, reference=reference, idempotency_key=key)
        self.model_users[user_id].credits += credits
        return KeyUse("credit", user_id, credits, reference, key, entry.id, kind=kind)

    @rule(target=keys, user_id=users, amount=st.integers(1, 300))
    def take_back(self, user_id, amount):
        model = self.model_users[user_id]
        key = self.fresh("refund")
        entry = billing.take_back(user_id, amount, reference=key, idempotency_key=key)
        debited = min(amount, model.credits)
        assert (entry.delta_available, entry.shortfall) == (-debited, amount - debited)
        model.credits -= debited
        return KeyUse("take_back", user_id, amount, key, key, entry.id)

    @rule(target=reservations, user_id=users, price=st.integers(1, 60), ttl=st.sampled_from([30, 120, 900]))
    def reserve(self, user_id, price, ttl):
        return self._reserve(user_id, price, ttl)

    @rule(target=reservations, user_id=users, price=st.integers(1, 20))
    def reserve_another(self, user_id, price):   # a second rule doubles the weight of reserve
        return self._reserve(user_id, price, 900)

    def _reserve(self, user_id, price, ttl):
        model = self.model_users[user_id]
        key = self.fresh("generation")
        before = self.snapshot()
        if model.blocked:
            expected = billing.UserBlocked
        elif model.has_free_access(self.clock):
            expected = ("free_access", 0)
        elif model.free_ops:
            expected = ("free_ops", 1)
        elif model.credits >= price:
            expected = ("credits", price)
        else:
            expected = billing.InsufficientCredits
        if isinstance(expected, type):
            try:
                billing.reserve(user_id, price, reference=key, idempotency_key=key, ttl=ttl, now=self.clock)
            except expected:
                assert self.snapshot() == before
                return multiple()
            raise AssertionError("reserve should have raised %s" % expected.__name__)
        r = billing.reserve(user_id, price, reference=key, idempotency_key=key, ttl=ttl, now=self.clock)
        assert (r.asset, r.amount, r.state) == (*expected, "reserved")
        assert r.expires_at == self.clock + datetime.timedelta(seconds=ttl)
        if r.asset == "free_ops":
            model.free_ops -= 1
            model.free_ops_reserved += 1
        elif r.asset == "credits":
            model.credits -= price
            model.credits_reserved += price
        self.model_reservations[r.id] = ModelReservation(user_id, r.asset, r.amount, "reserved", r.expires_at)
        self.keys_by_reservation[r.id] = KeyUse("reserve", user_id, price, key, key, r.id)
        return r.id

    def _close(self, reservation_id, state):
        r = self.model_reservations[reservation_id]
        model = self.model_users[r.user_id]
        if r.asset == "credits":
            model.credits_reserved -= r.amount
            if state != "committed":
                model.credits += r.amount
        elif r.asset == "free_ops":
            model.free_ops_reserved -= 1
            if state != "committed":
                model.free_ops += 1
        r.state = state

    @rule(reservation_id=reservations, operation=st.sampled_from(["commit", "release", "expire"]))
    def resolve(self, reservation_id, operation):
        self._resolve(reservation_id, operation)

    @rule(reservation_id=reservations, operation=st.sampled_from(["commit", "commit", "release"]))
    def resolve_another(self, reservation_id, operation):   # doubles the weight; commit twice as likely
        self._resolve(reservation_id, operation)

    def _resolve(self, reservation_id, operation):
        r = self.model_reservations[reservation_id]
        state = {"commit": "committed", "release": "released", "expire": "expired"}[operation]
        if r.state == "reserved":
            done = getattr(billing, operation)(reservation_id, now=self.clock)
            assert done.state == state
            self._close(reservation_id, state)
        else:
            before = self.snapshot()
            try:
                getattr(billing, operation)(reservation_id, now=self.clock)
            except billing.ReservationClosed as exc:
                assert type(exc) is CLOSED[r.state]
            else:
                raise AssertionError("%s of a %s reservation succeeded" % (operation, r.state))
            assert self.snapshot() == before

    @precondition(lambda self: self.model_users)
    @rule(seconds=st.sampled_from([1, 29, 30, 31, 90, 600, 901, 3600]))
    def time_passes_and_the_sweeper_runs(self, seconds):
        self.clock += datetime.timedelta(seconds=seconds)
        self.sweep()

    @precondition(lambda self: self.model_reservations)
    @rule()
    def sweep(self):
        expected = sorted(rid for rid, r in self.model_reservations.items()
                          if r.state == "reserved" and r.expires_at <= self.clock)
        assert sorted(billing.expire_stale(now=self.clock)) == expected
        for rid in expected:
            self._close(rid, "expired")

    @rule(user_id=users, enabled=st.booleans(), days=st.sampled_from([None, 1]))
    def set_free_access(self, user_id, enabled, days):
        model = self.model_users[user_id]
        active = model.has_free_access(self.clock)
        user = billing.set_free_access(user_id, days=days, enabled=enabled, now=self.clock)
        if not enabled or days is None or (active and model.free_access_until is None):
            until = None
        else:
            until = (model.free_access_until if active else self.clock) + datetime.timedelta(days=days)
        model.free_access, model.free_access_until = enabled, until
        assert (user.has_free_access, user.free_access_until) == (enabled, until)

    @rule(user_id=users, blocked=st.sampled_from([True, False, False]))
    def block(self, user_id, blocked):
        User.update(is_blocked=blocked).where(User.id == user_id).execute()   # what the admin command does
        self.model_users[user_id].blocked = blocked

    @rule(use=keys)
    def replay_a_key(self, use):
        before = self.snapshot()
        if use.operation == "credit":
            again = billing.credit(use.user_id, use.amount, kind=use.kind, reference=use.reference,
                                   idempotency_key=use.key)
        else:
            again = billing.take_back(use.user_id, use.amount, reference=use.reference, idempotency_key=use.key)
        assert again.id == use.result_id
        assert self.snapshot() == before

    @rule(reservation_id=reservations)
    def replay_a_reservation(self, reservation_id):
        use = self.keys_by_reservation[reservation_id]
        before = self.snapshot()
        again = billing.reserve(use.user_id, use.amount, reference=use.reference, idempotency_key=use.key,
                                ttl=900, now=self.clock)
        assert (again.id, again.state) == (reservation_id, self.model_reservations[reservation_id].state)
        assert self.snapshot() == before

    @rule(use=keys, change=st.sampled_from(["amount", "user", "reference"]), other=users)
    def reuse_a_key_with_other_arguments(self, use, change, other):
        if change == "user" and other == use.user_id:
            return
        args = {"user_id": use.user_id, "amount": use.amount, "reference": use.reference}
        args.update({"amount": {"amount": use.amount + 1}, "user": {"user_id": other},
                     "reference": {"reference": use.reference + ":other"}}[change])
        before = self.snapshot()
        try:
            if use.operation == "credit":
                billing.credit(kind=use.kind, idempotency_key=use.key, **args)
            else:
                billing.take_back(idempotency_key=use.key, **args)
        except billing.IdempotencyConflict:
            pass
        else:
            raise AssertionError("reusing key %s with another %s succeeded" % (use.key, change))
        assert self.snapshot() == before

    @rule(reservation_id=reservations, change=st.sampled_from(["amount", "user", "reference"]), other=users)
    def reuse_a_reservation_key_with_other_arguments(self, reservation_id, change, other):
        use = self.keys_by_reservation[reservation_id]
        if (change == "user" and other == use.user_id) or (
                change == "amount" and self.model_reservations[reservation_id].asset != "credits"):
            return  # a free-op / free-access reservation does not record its price (see test_billing.py)
        args = {"user_id": use.user_id, "amount": use.amount, "reference": use.reference}
        args.update({"amount": {"amount": use.amount + 1}, "user": {"user_id": other},
                     "reference": {"reference": use.reference + ":other"}}[change])
        before = self.snapshot()
        try:
            billing.reserve(idempotency_key=use.key, ttl=900, now=self.clock, **args)
        except billing.IdempotencyConflict:
            pass
        else:
            raise AssertionError("reusing reservation key %s with another %s succeeded" % (use.key, change))
        assert self.snapshot() == before

    # --- promo codes on orders (issue 9 §2) ----------------------------------------------------

    @rule(target=codes, percent=st.integers(1, 60), max_uses=st.sampled_from([None, 1, 2]))
    def add_code(self, percent, max_uses):
        name = self.fresh("CODE").replace(":", "")
        promo.add_code(name, "discount", percent=percent, max_uses=max_uses)
        self.model_codes[name] = ModelCode(max_uses)
        return name

    def _reserved_by_others(self, code: ModelCode, user_id: int) -> int:
        return sum(1 for holder, (state, order) in code.holders.items()
                   if holder != user_id and state == "reserved" and self.model_orders[order].status == "pending")

    @rule(target=orders, user_id=users, code=codes)
    def open_order(self, user_id, code):
        model = self.model_codes[code]
        credits = 100 + self.serial           # a new amount each time: never re-uses an open order
        self.fresh("order")
        state, order = model.holders.get(user_id, (None, None))
        if state == "consumed" or (state == "reserved" and self.model_orders[order].status == "pending"):
            expected = promo.CodeAlreadyUsed
        elif model.max_uses is not None and model.uses + self._reserved_by_others(model, user_id) >= model.max_uses:
            expected = promo.CodeExhausted
        else:
            expected = None
        before = self.snapshot()
        if expected is not None:
            with pytest.raises(expected):
                payments._find_or_create_order(user_id, credits, code, models.utcnow())
            assert self.snapshot() == before
            return multiple()
        created = payments._find_or_create_order(user_id, credits, code, models.utcnow())
        Payment.update(yookassa_payment_id=str(uuid.uuid4())).where(Payment.id == created.id).execute()
        self.model_orders[created.id] = ModelOrder(user_id, code, credits, created.amount_kopecks)
        model.holders[user_id] = ("reserved", created.id)
        return created.id

    @rule(target=orders, user_id=users, code=codes)
    def open_another_order(self, user_id, code):   # doubles the weight of orders
        return self.open_order(user_id, code)

    @rule(order_id=orders)
    def pay_another_order(self, order_id):         # doubles the weight of payments
        self.pay_order(order_id)

    @rule(order_id=orders, share=st.sampled_from([0.1, 0.333, 0.5, 1.0]))
    def refund_another_part(self, order_id, share):
        self.refund_part(order_id, share)

    @rule(order_id=orders)
    def pay_order(self, order_id):
        order = self.model_orders[order_id]
        if order.status != "pending":
            return   # a payment that succeeds after its cancel is the one logged anomaly; not modelled
        assert payments._mark_succeeded(order_id, False, "model") is True
        assert payments._mark_succeeded(order_id, False, "model") is False        # once
        order.status = "succeeded"
        self.model_users[order.user_id].credits += order.credits
        code = self.model_codes[order.code]
        state, held_order = code.holders[order.user_id]
        if held_order == order_id and state in ("reserved", "released"):
            code.holders[order.user_id] = ("consumed", order_id)
            if code.max_uses is None or code.uses < code.max_uses:
                code.uses += 1

    @rule(order_id=orders)
    def cancel_order(self, order_id):
        order = self.model_orders[order_id]
        changed = payments._mark_canceled(order_id, "model")
        assert changed == (order.status == "pending")
        if changed:
            order.status = "canceled"
            code = self.model_codes[order.code]
            state, held_order = code.holders[order.user_id]
            if state == "reserved" and held_order == order_id:
                code.holders[order.user_id] = ("released", order_id)

    @rule(order_id=orders, share=st.floats(0.01, 1.0))
    def refund_part(self, order_id, share):
        """A partial refund: credits back follow the cumulative refunded total (issue 9 §5)."""
        order = self.model_orders[order_id]
        left = order.kopecks - order.refunded
        if order.status != "succeeded" or left <= 0:
            return
        kopecks = max(1, min(left, int(left * share)))
        refund_id = self.fresh("refund")
        row = payments._apply_refund(order_id, refund_id, kopecks)
        assert payments._apply_refund(order_id, refund_id, kopecks) is None       # once
        target = order.credits * (order.refunded + kopecks) // order.kopecks
        asked = target - order.taken
        user = self.model_users[order.user_id]
        debited = min(asked, user.credits)
        assert (row.credits_requested, row.credits_debited, row.shortfall) == (asked, debited, asked - debited)
        user.credits -= debited
        order.refunded += kopecks
        order.taken = target
        if order.refunded == order.kopecks:
            assert order.taken == order.credits           # a whole refund takes back exactly its credits

    # --- queued jobs and the worker's sweeper (issue 9 §3) --------------------------------------

    @rule(reservation_id=reservations)
    def queue_a_job(self, reservation_id):
        r = self.model_reservations[reservation_id]
        if r.state != "reserved" or r.job:
            return
        Generation.create(user=r.user_id, chat_id=1, mode="generate", status="queued", prompt="p",
                          reservation=reservation_id, cost=r.amount if r.asset == "credits" else 0)
        r.job = True

    @precondition(lambda self: self.model_users)
    @rule(seconds=st.sampled_from([30, 600, 901, 3600, 86400]))
    def a_backlog_waits_and_the_worker_sweeps(self, seconds):
        self.clock += datetime.timedelta(seconds=seconds)
        cfg = config.get()
        horizon = self.clock + datetime.timedelta(seconds=cfg.sweep_interval)
        for r in self.model_reservations.values():
            if r.state == "reserved" and r.job and r.expires_at <= horizon:
                r.expires_at = self.clock + datetime.timedelta(seconds=cfg.reservation_ttl)
        expected = sorted(rid for rid, r in self.model_reservations.items()
                          if r.state == "reserved" and r.expires_at <= self.clock)
        report = worker.sweep_once(now=self.clock, cfg=cfg)
        assert sorted(report["expired"]) == expected
        for rid in expected:
            self._close(rid, "expired")
        for r in self.model_reservations.values():
            if r.job and r.state != "reserved":
                r.job = False                 # the sweeper failed the job whose hold had ended
        live = {g.reservation_id for g in Generation.select().where(Generation.status == "queued")}
        assert live == {rid for rid, r in self.model_reservations.items() if r.job}
        for rid in live:                      # a queued job's hold never lapses, however long it waits
            assert Reservation.get_by_id(rid).expires_at > self.clock

    # --- invariants --------------------------------------------------------------------------

    @invariant()
    def promo_limits_and_holders_match_the_model(self):
        for name, model in self.model_codes.items():
            code = PromoCode.get(PromoCode.code == name)
            assert code.uses == model.uses, name
            if model.max_uses is not None:
                reserved = promo.open_reservations(code.id)
                assert code.uses + reserved <= model.max_uses, name
            actual = {r.user_id: (r.state, r.payment_id) for r in PromoRedemption.select().where(
                PromoRedemption.promo == code.id)}
            assert actual == {u: tuple(v) for u, v in model.holders.items()}, name

    @invariant()
    def balances_match_the_model(self):
        for user_id, model in self.model_users.items():
            view = billing.get_balance(user_id, now=self.clock)
            assert (view.credits, view.credits_reserved, view.free_ops, view.free_ops_reserved, view.free_access) == (
                model.credits, model.credits_reserved, model.free_ops, model.free_ops_reserved,
                model.has_free_access(self.clock)), "user %s" % user_id

    @invariant()
    def reservations_match_the_model(self):
        actual = {r.id: (r.state, r.asset, r.amount) for r in Reservation.select()}
        assert actual == {rid: (r.state, r.asset, r.amount) for rid, r in self.model_reservations.items()}

    @invariant()
    def the_audit_is_clean(self):
        report = billing.audit(now=self.clock)
        assert report.ok, "\n".join(report.violations)


# --- runners -----------------------------------------------------------------------------------

def sqlite_opener(template):
    def open_database():
        folder = tempfile.mkdtemp(prefix="billing-sm-")
        path = os.path.join(folder, "db.sqlite")
        shutil.copyfile(template, path)
        url = "sqlite:///" + path
        config.configure(config.get().replace(database_url=url))
        database = models.init_db(url)
        # One process, one connection: durability is not under test here, speed is (fsync off).
        database.execute_sql("PRAGMA synchronous = OFF")

        def cleanup():
            database.close()
            shutil.rmtree(folder, ignore_errors=True)
        return cleanup
    return open_database


def pg_opener(url):
    tables = ", ".join('"%s"' % m._meta.table_name for m in models.ALL_MODELS)

    def open_database():
        database = models.init_db(url)
        database.execute_sql("TRUNCATE %s RESTART IDENTITY CASCADE" % tables)
        return database.close
    return open_database


LONG = os.environ.get("HYPOTHESIS_PROFILE") == "ci-long"


@pytest.mark.timeout(0 if LONG else 300)
def test_the_billing_core_matches_its_model_on_sqlite(cfg, _template_db):
    machine = type("SqliteBillingMachine", (BillingMachine,), {"open_database": staticmethod(sqlite_opener(_template_db))})
    run_state_machine_as_test(machine, settings=machine_settings(PROFILES))


@pytest.mark.timeout(0 if LONG else 300)
def test_the_billing_core_matches_its_model_on_postgresql(pg_database):
    machine = type("PgBillingMachine", (BillingMachine,), {"open_database": staticmethod(pg_opener(postgres_url()))})
    run_state_machine_as_test(machine, settings=machine_settings(PG_PROFILES))


def test_the_model_catches_a_broken_core(cfg, _template_db):
    """The machine must be able to fail: on a database whose free operations are silently
    doubled by a trigger, some step's balance check or audit fails."""
    inner = sqlite_opener(_template_db)

    def broken():
        cleanup = inner()
        models.db.execute_sql("""CREATE TRIGGER sabotage AFTER UPDATE OF available ON balance
            WHEN NEW.asset = 'free_ops' AND NEW.available < OLD.available
            BEGIN UPDATE balance SET available = available + 1 WHERE id = NEW.id; END""")
        return cleanup

    machine = type("BrokenMachine", (BillingMachine,), {"open_database": staticmethod(broken)})
    with pytest.raises(AssertionError):
        run_state_machine_as_test(machine, settings=settings(
            max_examples=40, stateful_step_count=20, deadline=None, database=None, print_blob=False,
            phases=[Phase.generate]))   # no shrinking: only that it fails matters here
