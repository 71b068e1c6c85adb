"""The schema and the database handle. Nothing else lives here.

One database (SQLite in WAL mode by default, PostgreSQL for scale-out) behind a
`DatabaseProxy`; `init_db(url)` binds it. Money columns are integers: credits for
balances and the ledger, kopecks for payments (1 credit = 1 ₽ = 100 kopecks).
The schema itself is created by the numbered files in `migrations/`; the models here
must match them (tests/test_migrations.py checks that on a blank database).
"""
from __future__ import annotations

import datetime
import logging
import os
import uuid

from peewee import (
    BigIntegerField,
    BooleanField,
    CharField,
    Check,
    DatabaseProxy,
    DateTimeField,
    ForeignKeyField,
    IntegerField,
    JSONField,
    Model,
    SqliteDatabase,
    TextField,
    UUIDField,
)
from playhouse.db_url import connect

logger = logging.getLogger(__name__)

db = DatabaseProxy()

MIGRATIONS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")

# SQLite settings for money (docs/REFERENCES.md §1): WAL so readers never block the writer,
# synchronous=FULL so an acknowledged commit survives a power cut, a busy timeout so writers queue
# instead of failing, and every transaction BEGIN IMMEDIATE (lock_type) so none upgrades a read lock.
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "full",
    "foreign_keys": 1,
    "busy_timeout": 30000,
    "cache_size": -16000,
}


def utcnow() -> datetime.datetime:
    """Return the current UTC time as a naive datetime (how every timestamp is stored)."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


# PostgreSQL connections come from peewee's pool (playhouse.pool): every request, task and update
# opens and closes its connection, and a new PostgreSQL connection is a new server process (the
# webhook on PostgreSQL saturated at 231 notifications/s, 515 with the pool: bench_scaleout.py).
# Closed connections go back to the pool, rolled back if a transaction was left open; a thread
# waits up to PG_POOL_WAIT seconds for one when PG_POOL_SIZE are in use in this process.
PG_POOL_SIZE = 32              # per process: above the busiest one's threads (gunicorn 8, worker 8, bot 4)
PG_POOL_STALE = 300            # seconds: an older connection is closed and replaced on its next use
PG_POOL_WAIT = 10              # seconds


def open_database(url: str):
    """Return an unconnected peewee database for `url` (sqlite:///path or postgresql://...; a
    PostgreSQL URL gets a connection pool, see PG_POOL_SIZE).

    A relative SQLite path is relative to the working directory; its folder is created.
    """
    if url.startswith("sqlite"):
        path = url[len("sqlite:///"):].split("?", 1)[0] if url.startswith("sqlite:///") else ""
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return connect(url, pragmas=SQLITE_PRAGMAS, lock_type="IMMEDIATE", returning_clause=True, timeout=30)
    scheme, rest = url.split("://", 1)
    if scheme in ("postgres", "postgresql"):
        return connect("%s+pool://%s" % (scheme, rest), max_connections=PG_POOL_SIZE, stale_timeout=PG_POOL_STALE,
                       timeout=PG_POOL_WAIT)
    return connect(url)


def discard(database) -> None:
    """Close `database` for good: its connection, and for a pool every idle connection it holds
    (a one-off check or a stopped thread must not leave server connections open, nor hand them to
    a forked child)."""
    if not database.is_closed():
        database.close()
    if hasattr(database, "close_all"):          # playhouse.pool
        database.close_all()


def init_db(url: str):
    """Bind the models to the database at `url` and return it (does not migrate)."""
    database = open_database(url)
    db.initialize(database)
    return database


def is_sqlite() -> bool:
    """True when the bound database is SQLite (the only difference is the lock mode)."""
    return isinstance(db.obj, SqliteDatabase)


class BaseModel(Model):
    """Every model lives in the one database behind `db`, with snake_case table names."""

    class Meta:
        database = db
        legacy_table_names = False


class User(BaseModel):
    """A Telegram account, created on first contact."""

    telegram_id = BigIntegerField(unique=True)
    username = CharField(null=True)
    first_name = CharField(null=True)
    language_code = CharField(null=True)
    email = CharField(null=True)                      # for 54-FZ receipts, asked once
    created_at = DateTimeField(default=utcnow)
    last_seen_at = DateTimeField(default=utcnow)
    is_blocked = BooleanField(default=False)
    has_free_access = BooleanField(default=False)
    free_access_until = DateTimeField(null=True)      # None with has_free_access: no expiry
    referred_by = BigIntegerField(null=True)          # user.id of the referrer (/start ref_<code>), 0004


ASSETS = ("credits", "free_ops")


class Balance(BaseModel):
    """Cached balance of one user in one asset; always equal to the sum of its ledger rows."""

    user = ForeignKeyField(User, backref="balances", on_delete="RESTRICT")
    asset = CharField()                               # credits | free_ops
    available = BigIntegerField(default=0, constraints=[Check("available >= 0")])
    reserved = BigIntegerField(default=0, constraints=[Check("reserved >= 0")])

    class Meta:
        indexes = ((("user", "asset"), True),)


LEDGER_KINDS = ("topup", "reserve", "commit", "release", "expire", "grant", "promo",
                "payment_refund", "adjust")


class LedgerEntry(BaseModel):
    """One append-only journal row per balance change (triggers reject UPDATE and DELETE)."""

    user = ForeignKeyField(User, backref="ledger", on_delete="RESTRICT")
    asset = CharField()
    kind = CharField()
    amount = BigIntegerField()                        # the operation's size, a positive integer
    delta_available = BigIntegerField()
    delta_reserved = BigIntegerField()
    available_after = BigIntegerField()
    reserved_after = BigIntegerField()
    reference = CharField()                           # payment:<id>, generation:<id>, admin:<id> …
    idempotency_key = CharField(unique=True)
    shortfall = BigIntegerField(default=0)            # refunds: credits that could not be taken back
    created_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "ledger"


RESERVATION_STATES = ("reserved", "committed", "released", "expired")


class Reservation(BaseModel):
    """A hold on credits, on one free operation, or (free access) on nothing; resolves exactly once."""

    user = ForeignKeyField(User, backref="reservations", on_delete="RESTRICT")
    asset = CharField()                               # credits | free_ops | free_access
    amount = BigIntegerField()                        # credits, or 1 free op, or 0 for free access
    price = BigIntegerField()                         # credits asked for (the idempotency check)
    state = CharField(default="reserved", index=True)
    reference = CharField()
    idempotency_key = CharField(unique=True)
    created_at = DateTimeField(default=utcnow)
    expires_at = DateTimeField(index=True)
    resolved_at = DateTimeField(null=True)


GENERATION_STATES = ("queued", "running", "delivered", "failed", "canceled")


class Generation(BaseModel):
    """One job: what the user asked for, its reservation, the Fal request and the outcome."""

    id = UUIDField(primary_key=True, default=uuid.uuid4)
    user = ForeignKeyField(User, backref="generations", on_delete="RESTRICT")
    chat_id = BigIntegerField()
    mode = CharField()
    status = CharField(default="queued", index=True)
    prompt = TextField(null=True)
    options = JSONField(default=dict)                 # aspect_ratio, position, colour …
    input_file_ids = JSONField(default=list)          # Telegram file ids, in order
    cost = IntegerField(default=0)                    # credits (0 for a free op or free access)
    reservation = ForeignKeyField(Reservation, null=True, on_delete="RESTRICT")
    endpoint = CharField(null=True)
    fal_request_id = CharField(null=True)
    attempts = IntegerField(default=0)
    status_message_id = BigIntegerField(null=True)
    result_message_id = BigIntegerField(null=True)
    seed = BigIntegerField(null=True)
    error = TextField(null=True)
    created_at = DateTimeField(default=utcnow, index=True)
    started_at = DateTimeField(null=True)
    heartbeat_at = DateTimeField(null=True)
    finished_at = DateTimeField(null=True)
    result_file_id = CharField(null=True)             # Telegram file id of the sent result (0004)


class PromoCode(BaseModel):
    """A discount code (percent off a top-up) or a free-access code."""

    code = CharField(unique=True)                     # stored upper-case
    kind = CharField()                                # discount | free_access
    percent = IntegerField(default=0)                 # discount: 1..99
    free_access_days = IntegerField(null=True)        # free_access: None = no expiry
    max_uses = IntegerField(null=True)                # None = unlimited
    uses = IntegerField(default=0)
    expires_at = DateTimeField(null=True)
    active = BooleanField(default=True)
    created_at = DateTimeField(default=utcnow)
    max_discount_kopecks = BigIntegerField(null=True)  # discount: cap on the discount of one top-up


# needs_attention: the API could not verify the order (unknown to YooKassa, a mismatch, a test
# payment in a live shop); it leaves the reconciliation set and the admins are told once.
PAYMENT_STATES = ("pending", "succeeded", "canceled", "needs_attention")


class Payment(BaseModel):
    """Our top-up order; its id is the YooKassa idempotence key."""

    id = UUIDField(primary_key=True, default=uuid.uuid4)
    user = ForeignKeyField(User, backref="payments", on_delete="RESTRICT")
    credits = BigIntegerField()                       # credited on success
    amount_kopecks = BigIntegerField()                # what the user pays (after the discount)
    currency = CharField(default="RUB")
    promo = ForeignKeyField(PromoCode, null=True, on_delete="RESTRICT")
    discount_percent = IntegerField(default=0)
    status = CharField(default="pending", index=True)
    yookassa_payment_id = CharField(null=True, unique=True)
    confirmation_url = TextField(null=True)
    test = BooleanField(default=False)
    refunded_kopecks = BigIntegerField(default=0)
    created_at = DateTimeField(default=utcnow, index=True)
    updated_at = DateTimeField(default=utcnow)
    succeeded_at = DateTimeField(null=True)
    notified_at = DateTimeField(null=True)            # the user was told about the credit
    cancel_reason = CharField(null=True)
    checked_at = DateTimeField(null=True)             # reconciliation: last re-fetch (round-robin order)
    next_check_at = DateTimeField(null=True, index=True)  # reconciliation: not before (backoff)
    check_attempts = IntegerField(null=True)          # reconciliation: re-fetches while pending
    problem = TextField(null=True)                    # needs_attention: why
    # migrations/0005: Telegram Stars. provider "stars" orders have currency "XTR" and keep the
    # price in whole Stars in amount_kopecks / refunded_kopecks (the currency's minor unit: XTR has
    # none smaller than one Star); revenue in roubles counts RUB orders only.
    provider = CharField(default="yookassa", null=True)   # yookassa | stars (NULL never written)
    telegram_charge_id = CharField(null=True, unique=True)  # Stars: telegram_payment_charge_id

    class Meta:
        indexes = ((("status", "notified_at"), False),)   # unnotified_payments (migration 0006)


PAYMENT_PROVIDERS = ("yookassa", "stars")


class PromoRedemption(BaseModel):
    """A user's use of a code: reserved on a pending payment, consumed on success, once per user."""

    promo = ForeignKeyField(PromoCode, backref="redemptions", on_delete="RESTRICT")
    user = ForeignKeyField(User, backref="redemptions", on_delete="RESTRICT")
    payment = ForeignKeyField(Payment, null=True, on_delete="RESTRICT")
    state = CharField(default="reserved")             # reserved | consumed | released
    created_at = DateTimeField(default=utcnow)
    updated_at = DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("promo", "user"), True),)


class Refund(BaseModel):
    """A refund, applied to the ledger exactly once: YooKassa's, or a Stars refund (``stars:<charge id>``,
    always the whole charge; amount_kopecks then counts Stars)."""

    id = CharField(primary_key=True)                  # YooKassa refund id, or stars:<telegram charge id>
    payment = ForeignKeyField(Payment, backref="refunds", on_delete="RESTRICT")
    amount_kopecks = BigIntegerField()
    credits_requested = BigIntegerField()
    credits_debited = BigIntegerField()
    shortfall = BigIntegerField(default=0)
    created_at = DateTimeField(default=utcnow)
    notified_at = DateTimeField(null=True)            # the user was told about the refund


class AdminAction(BaseModel):
    """An action done once, keyed: an admin command (on its Telegram update: a redelivered update
    does not run it twice), a claimed tap, a notice or an alert window. Pruned after
    STATE_RETENTION_DAYS (migrations/0008)."""

    key = CharField(primary_key=True)                 # <command>:<update id>, tap:…, notice:…
    created_at = DateTimeField(default=utcnow, index=True)


class ConversationState(BaseModel):
    """The bot's per-chat conversation state (survives a bot restart); a chat idle for
    STATE_RETENTION_DAYS loses it (migrations/0008)."""

    key = CharField(primary_key=True)                 # built by the bot's state storage
    state = CharField(null=True)
    data = JSONField(default=dict)
    updated_at = DateTimeField(default=utcnow, index=True)


class Draft(BaseModel):
    """A refused or failed job's inputs (migrations/0004), kept DRAFT_TTL seconds so the user can
    retry, change the prompt, or top up and continue; one per user (a new one replaces it)."""

    user = ForeignKeyField(User, unique=True, on_delete="RESTRICT")
    token = CharField()                               # what the draft's buttons carry
    chat_id = BigIntegerField()
    mode = CharField()
    prompt = TextField(null=True)
    options = JSONField(default=dict)
    input_file_ids = JSONField(default=list)          # Telegram file ids, in order
    reason = CharField()                              # credits | jobs | policy | failed …
    resume_on_payment = BooleanField(default=False)   # start it when a top-up is credited
    created_at = DateTimeField(default=utcnow)
    expires_at = DateTimeField(index=True)


class Heartbeat(BaseModel):
    """A named timestamp and counter (migrations/0003): process liveness (``process:bot`` …),
    periodic task runs (``task:sweep`` …), alert dedupe (``alert:<key>``) and webhook outcome
    counts (``webhook:<status>:<detail>``). Written and read through `ops`; one more row,
    ``stars:transactions``, is the Stars reconciliation's cursor (stars.py)."""

    name = CharField(primary_key=True)
    at = DateTimeField(null=True)
    value = BigIntegerField(default=0)


ALL_MODELS = [User, Balance, LedgerEntry, Reservation, Generation, PromoCode, Payment,
              PromoRedemption, Refund, ConversationState, AdminAction,
              Heartbeat, Draft]


# --- lifecycles ---------------------------------------------------------------------------------
# Every status change of a Generation or a Payment goes through `move`, a conditional UPDATE that
# only follows these tables (tests/test_lifecycles.py walks them and refuses everything else).

GENERATION_TRANSITIONS = {
    "queued": ("running", "delivered", "failed", "canceled"),   # delivered: the sweeper finishing a sent image
    "running": ("queued", "delivered", "failed", "canceled"),   # queued: a retry, a resume, a shutdown
    "delivered": (),
    "failed": (),
    "canceled": (),
}

PAYMENT_TRANSITIONS = {
    "pending": ("succeeded", "canceled", "needs_attention"),
    "canceled": ("succeeded", "needs_attention"),  # paid after our cancel: the user paid (a Stars
                                                   # payment that does not match it needs a human)
    "needs_attention": ("succeeded", "canceled"),   # verified later (a notification, the check button),
                                                    # or settled by an admin (/settle: credit or cancel)
    "succeeded": (),
}


class IllegalTransition(ValueError):
    """A status change the lifecycle table does not allow (a programming error)."""


def move(model, row_id, from_states, to: str, *where, **fields) -> bool:
    """Move row `row_id` of `model` (Generation or Payment) from one of `from_states` (a state or a
    tuple of states) to `to`, setting `fields` too, in one conditional ``UPDATE … WHERE id = ? AND
    status IN (…) [AND where…]``; return True if this call moved it (False: another writer did, or
    the row is in another state). Extra peewee expressions in `where` narrow the condition.

    :raises IllegalTransition: a from → to pair not in GENERATION_TRANSITIONS / PAYMENT_TRANSITIONS.
    """
    table = {Generation: GENERATION_TRANSITIONS, Payment: PAYMENT_TRANSITIONS}[model]
    sources = (from_states,) if isinstance(from_states, str) else tuple(from_states)
    for source in sources:
        if to not in table.get(source, ()):
            raise IllegalTransition("%s: %s → %s is not allowed" % (model.__name__, source, to))
    query = model.update(status=to, **fields).where((model.id == row_id) & model.status.in_(sources), *where)
    return bool(query.execute())


class NotMigrated(Exception):
    """The database schema is not up to date: run `make migrate`."""


def pending_migrations(database=None) -> list[str]:
    """Return the names of migrations in `migrations/` not yet applied to `database`."""
    from playhouse.migrations import Runner

    runner = Runner(database or db.obj, directory=MIGRATIONS_DIR)
    return [m.name for m in runner.status() if m.path is not None and not m.applied]


def migrate(database=None) -> list[str]:
    """Apply pending migrations to `database` (default: the bound one); return their names."""
    from playhouse.migrations import Runner

    return Runner(database or db.obj, directory=MIGRATIONS_DIR).up()


def ensure_migrated(database=None) -> None:
    """Raise `NotMigrated` naming the pending migrations, if any."""
    pending = pending_migrations(database)
    if pending:
        raise NotMigrated("database is not migrated, pending: %s — run `make migrate`" % ", ".join(pending))
