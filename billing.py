"""The billing core: users, balances, the ledger, reserve → commit / release / expire.

Model (docs/REFERENCES.md §2, after TigerBeetle's two-phase transfers):

* Two assets per user: `credits` (1 credit = 1 ₽) and `free_ops` (free paid-mode operations).
  A `Balance` row caches `available` and `reserved` for each; the append-only `ledger` holds one
  row per change with both deltas, the balances after, a reference and a unique idempotency key.
* A job *reserves* (available → reserved) before it runs, then the reservation is *committed*
  (reserved → spent) on delivery, or *released* / *expired* (reserved → available). The state
  of a reservation changes exactly once, by a conditional UPDATE on its state.
* Every function that moves money runs in one transaction that takes the write lock up front
  (`BEGIN IMMEDIATE` on SQLite via the database's lock_type; row locks from the conditional
  UPDATEs on PostgreSQL) and is retried as a whole when SQLite stays busy.
* The same idempotency key with the same arguments replays the first result; with different
  arguments it raises `IdempotencyConflict` and changes nothing.

All amounts are positive Python ints within int64, in credits unless the name says otherwise.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import logging
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, field

from peewee import IntegrityError, OperationalError, fn

import config
from models import (
    AdminAction,
    Balance,
    Generation,
    LedgerEntry,
    Payment,
    PromoCode,
    PromoRedemption,
    Refund,
    Reservation,
    User,
    db,
    is_sqlite,
    utcnow,
)

logger = logging.getLogger(__name__)

INT64_MAX = 2**63 - 1
MAX_TX_ATTEMPTS = 8


class BillingError(Exception):
    """Billing operation failed."""

    #: The user's text for this error (a key of texts.TEXTS) and its values; None: no user text.
    text_key: str | None = None
    values: dict = {}

    def __str__(self):
        return self.args[0] if self.args else (self.__doc__ or "").strip()


class StorageFull(BillingError):
    """The disk holding the database is full: nothing was changed. Free space and try again."""

    text_key = "storage_full"


class InvalidAmount(BillingError):
    """Amount must be a positive whole number of credits within int64."""


class UnknownUser(BillingError):
    """No such user."""


class UserBlocked(BillingError):
    """The user is blocked by an administrator."""

    text_key = "blocked"


class InsufficientCredits(BillingError):
    """Not enough credits for this operation."""

    text_key = "insufficient_credits"

    def __init__(self, price: int, balance: int):
        super().__init__()
        #: The credits the operation needs and the credits available when it was refused.
        self.values = {"price": price, "balance": balance}


class IdempotencyConflict(BillingError):
    """This idempotency key was already used with different arguments."""


class UnknownReservation(BillingError):
    """No such reservation."""


class ReservationClosed(BillingError):
    """The reservation has already been resolved."""


class AlreadyCommitted(ReservationClosed):
    """The reservation was already committed."""


class AlreadyReleased(ReservationClosed):
    """The reservation was already released."""


class ReservationExpired(ReservationClosed):
    """The reservation expired before it was committed."""


_CLOSED = {"committed": AlreadyCommitted, "released": AlreadyReleased, "expired": ReservationExpired}


_FULL = ("database or disk is full", "no space left on device", "could not extend file", "disk full")


def _is_full(exc: Exception) -> bool:
    """SQLite's SQLITE_FULL ("database or disk is full") or PostgreSQL's disk_full (53100)."""
    text = str(exc).lower()
    return getattr(exc, "pgcode", None) == "53100" or any(word in text for word in _FULL)


def _is_retryable(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(word in text for word in ("database is locked", "database is busy", "deadlock", "could not serialize"))


class _WriterTurn:
    """One writer at a time per SQLite database file, queued fairly by the OS.

    SQLite makes a blocked writer poll with sleeps of up to 100 ms (its busy handler), so under
    contention a writer can wait seconds while the lock sits free between others' turns. Writers
    queue instead on `flock` of `<database>-writer.lock` (one open file per process), behind a
    re-entrant thread lock (flock is per open file, not per thread). Taken only around an
    outermost money transaction; SQLite's own lock and busy timeout still stand behind it.
    """

    def __init__(self):
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._file = None
        self._file_key = None
        self._held = None

    def _lock_file(self):
        path = getattr(db.obj, "database", None)
        if not path or path == ":memory:":
            return None
        key = (os.getpid(), path)
        if self._file_key != key:  # first use, another database, or a forked child
            if self._file is not None and self._file_key[0] == os.getpid():
                self._file.close()
            self._file = open(path + "-writer.lock", "a+b")  # kept open: flock needs it
            self._file_key = key
        return self._file

    def __enter__(self):
        self._thread_lock.acquire()
        try:
            if self._depth == 0:
                handle = self._lock_file()
                if handle is not None:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                self._held = handle
            self._depth += 1
        except BaseException:
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        try:
            if self._depth == 0 and self._held is not None:
                fcntl.flock(self._held.fileno(), fcntl.LOCK_UN)
                self._held = None
        finally:
            self._thread_lock.release()


_writer = _WriterTurn()


def writer_turn():
    """This process's turn to write (see `_WriterTurn`): a context manager for an outermost SQLite
    write transaction; a no-op inside a transaction and on PostgreSQL (row locks there)."""
    if db.in_transaction() or not is_sqlite():
        return contextlib.nullcontext()
    return _writer


def money_transaction(func):
    """Run `func` in one write transaction, retried whole while the database is busy.

    Nested inside another money transaction it runs in a savepoint and is not retried
    (the outermost caller owns the retry). `database is locked` never reaches a caller
    unless the lock stays taken for MAX_TX_ATTEMPTS × the 30 s busy timeout. A full disk
    raises StorageFull (the transaction rolled back: nothing changed).
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if db.in_transaction():
            with db.atomic():
                return func(*args, **kwargs)
        for attempt in range(MAX_TX_ATTEMPTS):
            try:
                with writer_turn(), db.atomic():
                    return func(*args, **kwargs)
            except OperationalError as exc:
                if _is_full(exc):
                    logger.error("%s: the disk is full, nothing changed (%s)", func.__name__, exc)
                    raise StorageFull("disk full: %s" % exc) from exc
                if not _is_retryable(exc) or attempt == MAX_TX_ATTEMPTS - 1:
                    raise
                logger.warning("%s: database busy, retrying (%s)", func.__name__, attempt + 1)
            except IntegrityError:
                # Two PostgreSQL transactions raced on a unique key (user, idempotency key):
                # the loser retries once and then sees the winner's row.
                if attempt >= 1:
                    raise
            time.sleep(min(0.5, 0.01 * (2 ** attempt)) * random.random())
        raise AssertionError("unreachable")

    return wrapper


def check_amount(amount, *, allow_zero: bool = False) -> int:
    """Return `amount` if it is an int in 1..int64 (0 allowed with allow_zero); else raise InvalidAmount."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidAmount("amount must be a whole number, got %r" % (amount,))
    if amount < (0 if allow_zero else 1) or amount > INT64_MAX:
        raise InvalidAmount("amount must be between 1 and 2^63-1, got %r" % (amount,))
    return amount


def _check_key(key) -> str:
    if not isinstance(key, str) or not key or len(key) > 200:
        raise BillingError("idempotency key must be a non-empty string of at most 200 characters")
    return key


# --- the hot path as SQL written once -------------------------------------------------------
# reserve/commit/release run a handful of small statements each; building them through peewee's
# query compiler cost ~4x the statements themselves (profiled: 65 % of a cycle), so these few
# are written once as parameterised SQL ({p} is the driver's placeholder, ? or %s). They are the
# same on SQLite and PostgreSQL; peewee still builds everything else.
_SQL = {
    "reservation_by_key": "SELECT * FROM reservation WHERE idempotency_key = {p}",
    "reservation_by_id": "SELECT * FROM reservation WHERE id = {p}",
    "reservation_state": "SELECT state FROM reservation WHERE id = {p}",
    "user_access": 'SELECT id, is_blocked, has_free_access, free_access_until FROM "user" WHERE id = {p}',
    "available": "SELECT asset, available FROM balance WHERE user_id = {p}",
    "move": ("UPDATE balance SET available = available + {p}, reserved = reserved + {p} "
             "WHERE user_id = {p} AND asset = {p} AND available >= {p} AND reserved >= {p} "
             "AND available + reserved <= {p} RETURNING available, reserved"),
    "ledger_insert": ("INSERT INTO ledger (user_id, asset, kind, amount, delta_available, delta_reserved, "
                      "available_after, reserved_after, reference, idempotency_key, shortfall, created_at) "
                      "VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}) RETURNING id"),
    "reservation_insert": ("INSERT INTO reservation (user_id, asset, amount, price, state, reference, "
                           "idempotency_key, created_at, expires_at) "
                           "VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}) RETURNING id"),
    "resolve": ("UPDATE reservation SET state = {p}, resolved_at = {p} "
                "WHERE id = {p} AND state = 'reserved'"),
}
_compiled: dict = {}


def _sql(name: str, *params):
    """Execute hot-path statement `name` with `params` in the current transaction; return the cursor."""
    param = db.obj.param
    key = (name, param)
    text = _compiled.get(key)
    if text is None:
        text = _compiled[key] = _SQL[name].replace("{p}", param)
    return db.execute_sql(text, params)


def _when(value: datetime.datetime):
    """A timestamp as the driver stores it (text on SQLite, as peewee writes it; native on PostgreSQL)."""
    return str(value) if is_sqlite() else value


# --- users -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class BalanceView:
    """A user's balances: credits and free operations, available and reserved, and free access."""

    credits: int
    credits_reserved: int
    free_ops: int
    free_ops_reserved: int
    free_access: bool
    free_access_until: datetime.datetime | None = None


def _touch(user: User, username, first_name, language_code) -> None:
    changes = {}
    if username is not None and user.username != username:
        changes["username"] = username
    if first_name is not None and user.first_name != first_name:
        changes["first_name"] = first_name
    if language_code is not None and user.language_code != language_code:
        changes["language_code"] = language_code
    now = utcnow()
    if changes or (now - user.last_seen_at).total_seconds() > 300:
        changes["last_seen_at"] = now
        User.update(**changes).where(User.id == user.id).execute()
        for name, value in changes.items():
            setattr(user, name, value)


def get_or_create_user(telegram_id: int, *, username: str | None = None, first_name: str | None = None,
                       language_code: str | None = None, free_operations: int | None = None) -> tuple[User, bool]:
    """Return `(user, created)` for a Telegram account, creating it exactly once.

    A new user gets `free_operations` free operations (default FREE_OPERATIONS_COUNT), granted
    once per Telegram account (ledger key `free_ops:tg:<telegram_id>`), even when many first
    updates race in several processes.
    """
    if isinstance(telegram_id, bool) or not isinstance(telegram_id, int) or telegram_id <= 0:
        raise BillingError("telegram_id must be a positive integer")
    user = User.get_or_none(User.telegram_id == telegram_id)
    if user is not None:
        _touch(user, username, first_name, language_code)
        return user, False
    if free_operations is None:
        free_operations = config.get().free_operations_count
    return _create_user(telegram_id, username, first_name, language_code, free_operations)


@money_transaction
def _create_user(telegram_id, username, first_name, language_code, free_operations):
    now = utcnow()
    created = False
    user = User.get_or_none(User.telegram_id == telegram_id)
    if user is None:
        # ON CONFLICT DO NOTHING + RETURNING: only the caller whose row went in sees an id, so
        # exactly one of many racing first contacts reports created=True (SQLite and PostgreSQL).
        inserted = list(User.insert(telegram_id=telegram_id, username=username, first_name=first_name,
                                    language_code=language_code, created_at=now, last_seen_at=now)
                        .on_conflict_ignore().returning(User.id).execute())
        user = User.get(User.telegram_id == telegram_id)
        created = bool(inserted)
    Balance.insert_many([{"user": user.id, "asset": asset} for asset in ("credits", "free_ops")]
                        ).on_conflict_ignore().execute()
    if free_operations > 0:
        _post(user.id, "free_ops", "grant", free_operations, free_operations, 0,
              reference="welcome", idempotency_key="free_ops:tg:%d" % telegram_id)
    if created:
        logger.info("user created: user=%s telegram_id=%s free_ops=%s", user.id, telegram_id, free_operations)
    return user, created


def get_user(user_id: int) -> User:
    """Return the user with this id; raise UnknownUser."""
    user = User.get_or_none(User.id == user_id)
    if user is None:
        raise UnknownUser("no user with id %r" % (user_id,))
    return user


def has_free_access(user: User, now: datetime.datetime | None = None) -> bool:
    """True if the user runs paid modes free now (free access set and not expired)."""
    if not user.has_free_access:
        return False
    return user.free_access_until is None or user.free_access_until > (now or utcnow())


def claim_action(key: str) -> bool:
    """Record admin action `key` (e.g. ``broadcast:<update id>``); True the first time only, so a
    redelivered Telegram update does not run the action again. Joins the caller's transaction."""
    _check_key(key)
    return AdminAction.insert(key=key, created_at=utcnow()).on_conflict_ignore().as_rowcount().execute() == 1


@money_transaction
def set_free_access(user_id: int, *, days: int | None = None, enabled: bool = True,
                    now: datetime.datetime | None = None, idempotency_key: str | None = None) -> User:
    """Give (or with enabled=False take away) free access; `days` None means no expiry.

    Granting to a user who already has free access extends it from its current end. With
    `idempotency_key` (an admin command's ``free_access:<update id>``) a repeated call changes
    nothing and returns the user as it is. Raises UnknownUser.
    """
    if idempotency_key is not None and not claim_action(idempotency_key):
        logger.info("free access: %s already applied", idempotency_key)
        return get_user(user_id)
    user = get_user(user_id)
    now = now or utcnow()
    active = has_free_access(user, now)
    if not enabled or days is None or (active and user.free_access_until is None):
        until = None                    # taken away, unlimited, or already unlimited
    else:
        check_amount(days)
        start = user.free_access_until if active else now
        until = start + datetime.timedelta(days=days)
    User.update(has_free_access=enabled, free_access_until=until).where(User.id == user.id).execute()
    logger.info("free access: user=%s enabled=%s until=%s", user.id, enabled, until)
    return get_user(user_id)


def set_blocked(user_id: int, blocked: bool = True) -> User:
    """Block (or unblock) a user: a blocked user cannot reserve, so cannot start paid jobs."""
    user = get_user(user_id)
    User.update(is_blocked=bool(blocked)).where(User.id == user.id).execute()
    logger.info("user %s: blocked=%s", user.id, bool(blocked))
    user.is_blocked = bool(blocked)
    return user


def get_balance(user_id: int, now: datetime.datetime | None = None) -> BalanceView:
    """Return the user's balances (credits and free operations, available and reserved)."""
    user = get_user(user_id)
    rows = {b.asset: b for b in Balance.select().where(Balance.user == user.id)}
    credits, free_ops = rows.get("credits"), rows.get("free_ops")
    return BalanceView(
        credits=credits.available if credits else 0,
        credits_reserved=credits.reserved if credits else 0,
        free_ops=free_ops.available if free_ops else 0,
        free_ops_reserved=free_ops.reserved if free_ops else 0,
        free_access=has_free_access(user, now),
        free_access_until=user.free_access_until if has_free_access(user, now) else None,
    )


# --- the ledger ------------------------------------------------------------------------------

def _replay(key: str, **expected) -> LedgerEntry | None:
    """Return the ledger row already written under `key` if its fields match; raise on a mismatch."""
    existing = (LedgerEntry.select(LedgerEntry.id, LedgerEntry.user, LedgerEntry.asset, LedgerEntry.kind,
                                   LedgerEntry.amount, LedgerEntry.reference, LedgerEntry.available_after,
                                   LedgerEntry.reserved_after, LedgerEntry.shortfall)
                .where(LedgerEntry.idempotency_key == key).first())
    if existing is None:
        return None
    actual = {name: (getattr(existing, name + "_id") if name == "user" else getattr(existing, name))
              for name in expected}
    if actual != expected:
        logger.warning("idempotency conflict: key=%s expected=%s found=%s", key, expected, actual)
        raise IdempotencyConflict("idempotency key %r was used for %s" % (key, actual))
    return existing


def _post(user_id, asset, kind, amount, d_available, d_reserved, *, reference, idempotency_key,
          shortfall=0, replay=True) -> LedgerEntry | None:
    """Apply deltas to one balance and append the ledger row, inside the caller's transaction.

    Returns the row (or the earlier row for a replayed key), or None when the conditional
    update found too little available/reserved (nothing is changed then). `replay=False` is for
    the keys a reservation derives from its own (reserve:/commit:/release:/expire:…): the
    reservation's key and its one-way state already make them unique, and the UNIQUE index
    still stands behind them.
    """
    if replay:
        earlier = _replay(idempotency_key, user=user_id, asset=asset, kind=kind, amount=amount,
                          reference=reference)
        if earlier is not None:
            return earlier
    growth = d_available + d_reserved
    # Conditional: enough available/reserved for a decrease, and available + reserved within int64
    # (SQLite would turn an overflow into a float, and an open reservation must stay releasable).
    row = _sql("move", d_available, d_reserved, user_id, asset, max(0, -d_available), max(0, -d_reserved),
               INT64_MAX - max(0, growth)).fetchone()
    if row is None:
        if not Balance.select().where((Balance.user == user_id) & (Balance.asset == asset)).exists():
            raise UnknownUser("user %r has no %s balance" % (user_id, asset))
        return None
    now = utcnow()
    entry_id = _sql("ledger_insert", user_id, asset, kind, amount, d_available, d_reserved, row[0], row[1],
                    reference, idempotency_key, shortfall, _when(now)).fetchone()[0]
    entry = LedgerEntry(id=entry_id, user=user_id, asset=asset, kind=kind, amount=amount,
                        delta_available=d_available, delta_reserved=d_reserved, available_after=row[0],
                        reserved_after=row[1], reference=reference, idempotency_key=idempotency_key,
                        shortfall=shortfall, created_at=now)
    logger.info("ledger: user=%s %s %s %+d/%+d -> %d/%d ref=%s", user_id, asset, kind, d_available,
                d_reserved, entry.available_after, entry.reserved_after, reference)
    return entry


@money_transaction
def credit(user_id: int, amount: int, *, kind: str = "topup", reference: str, idempotency_key: str) -> LedgerEntry:
    """Add `amount` credits to the user's available balance; return the ledger row.

    `kind` is topup (a YooKassa payment), grant (an admin), promo (a bonus) or adjust.
    The same key with the same arguments returns the first row and credits nothing more.
    Raises InvalidAmount, UnknownUser, IdempotencyConflict.
    """
    check_amount(amount)
    _check_key(idempotency_key)
    if kind not in ("topup", "grant", "promo", "adjust"):
        raise BillingError("credit kind must be topup, grant, promo or adjust, got %r" % (kind,))
    get_user(user_id)
    entry = _post(user_id, "credits", kind, amount, amount, 0, reference=reference, idempotency_key=idempotency_key)
    if entry is None:
        raise InvalidAmount("crediting %s would overflow the balance of user %s" % (amount, user_id))
    return entry


@money_transaction
def take_back(user_id: int, amount: int, *, reference: str, idempotency_key: str) -> LedgerEntry:
    """Take back up to `amount` credits after a payment refund; return the ledger row.

    Takes at most what is available (available never goes below zero); the rest is recorded
    as the row's `shortfall`, not lost. Replays on the same key. Raises InvalidAmount,
    UnknownUser, IdempotencyConflict.
    """
    check_amount(amount)
    _check_key(idempotency_key)
    get_user(user_id)
    replay = _replay(idempotency_key, user=user_id, asset="credits", kind="payment_refund",
                     amount=amount, reference=reference)
    if replay is not None:
        return replay
    # A no-op UPDATE takes the row lock on PostgreSQL (SQLite already holds the write lock).
    rows = list(Balance.update(available=Balance.available)
                .where((Balance.user == user_id) & (Balance.asset == "credits"))
                .returning(Balance.available).execute())
    if not rows:
        raise UnknownUser("user %r has no credits balance" % (user_id,))
    debited = min(amount, rows[0].available)
    entry = _post(user_id, "credits", "payment_refund", amount, -debited, 0, reference=reference,
                  idempotency_key=idempotency_key, shortfall=amount - debited)
    if amount - debited:
        logger.warning("refund shortfall: user=%s requested=%s debited=%s ref=%s", user_id, amount, debited, reference)
    return entry


# --- reservations ----------------------------------------------------------------------------

def _lock_balances(user_id: int) -> None:
    """Take the row locks of a user's balances (PostgreSQL; SQLite holds the database write lock)."""
    if not is_sqlite():
        Balance.update(available=Balance.available).where(Balance.user == user_id).execute()


def _replay_reservation(key, user_id, reference, amount) -> Reservation | None:
    existing = next(iter(Reservation.raw(_SQL["reservation_by_key"].replace("{p}", db.obj.param), key)), None)
    if existing is None:
        return None
    if existing.user_id != user_id or existing.reference != reference or existing.price != amount:
        raise IdempotencyConflict("reservation key %r was used for another reservation" % key)
    return existing


@money_transaction
def reserve(user_id: int, amount: int, *, reference: str, idempotency_key: str, ttl: int,
            now: datetime.datetime | None = None) -> Reservation:
    """Hold the price of one paid operation; return the open Reservation.

    Order: free access (holds nothing), then one free operation, then `amount` credits.
    `ttl` is in seconds; after it the sweeper expires the reservation. The same key with the
    same arguments returns the first reservation. Raises InvalidAmount, UnknownUser,
    UserBlocked, InsufficientCredits, IdempotencyConflict.
    """
    check_amount(amount)
    _check_key(idempotency_key)
    check_amount(ttl)
    # Lock this user's balance rows first (a no-op UPDATE: a row lock on PostgreSQL; SQLite already
    # holds the write lock), so concurrent reserves of one user — the same key from several
    # processes included — run one after another and each sees what the previous one committed.
    _lock_balances(user_id)
    replay = _replay_reservation(idempotency_key, user_id, reference, amount)
    if replay is not None:
        return replay
    user = next(iter(User.raw(_SQL["user_access"].replace("{p}", db.obj.param), user_id)), None)
    if user is None:
        raise UnknownUser("no user with id %r" % (user_id,))
    if user.is_blocked:
        raise UserBlocked()
    now = now or utcnow()
    expires = now + datetime.timedelta(seconds=ttl)
    available = dict(_sql("available", user_id).fetchall())
    if has_free_access(user, now):
        asset, units = "free_access", 0
    elif available.get("free_ops", 0) >= 1 and _post(
            user.id, "free_ops", "reserve", 1, -1, 1, reference=reference,
            idempotency_key="reserve:" + idempotency_key, replay=False):
        asset, units = "free_ops", 1
    elif available.get("credits", 0) >= amount and _post(
            user.id, "credits", "reserve", amount, -amount, amount, reference=reference,
            idempotency_key="reserve:" + idempotency_key, replay=False):
        asset, units = "credits", amount
    else:
        raise InsufficientCredits(price=amount, balance=available.get("credits", 0))
    reservation_id = _sql("reservation_insert", user.id, asset, units, amount, "reserved", reference,
                          idempotency_key, _when(now), _when(expires)).fetchone()[0]
    reservation = Reservation(id=reservation_id, user=user.id, asset=asset, amount=units, price=amount,
                              state="reserved", reference=reference, idempotency_key=idempotency_key,
                              created_at=now, expires_at=expires)
    logger.info("reserved: reservation=%s user=%s %s %s ref=%s", reservation.id, user.id, units, asset, reference)
    return reservation


def _resolve(reservation_id: int, state: str, kind: str, now=None) -> Reservation:
    if isinstance(reservation_id, bool) or not isinstance(reservation_id, int):
        raise UnknownReservation("no reservation %r" % (reservation_id,))
    reservation = next(iter(Reservation.raw(_SQL["reservation_by_id"].replace("{p}", db.obj.param),
                                            reservation_id)), None)
    if reservation is None:
        raise UnknownReservation("no reservation %r" % (reservation_id,))
    now = now or utcnow()
    changed = _sql("resolve", state, _when(now), reservation_id).rowcount
    if not changed:
        current = _sql("reservation_state", reservation_id).fetchone()[0]
        raise _CLOSED[current]("reservation %s is already %s" % (reservation_id, current))
    if reservation.asset != "free_access":
        back = 0 if kind == "commit" else reservation.amount
        entry = _post(reservation.user_id, reservation.asset, kind, reservation.amount, back, -reservation.amount,
                      reference=reservation.reference, idempotency_key="%s:%s" % (kind, reservation.idempotency_key),
                      replay=False)
        if entry is None:  # cached reserved disagrees with the open reservations: never silently
            raise BillingError("reserved balance is smaller than reservation %s" % reservation_id)
    reservation.state, reservation.resolved_at = state, now
    logger.info("%s: reservation=%s user=%s %s %s", state, reservation.id, reservation.user_id,
                reservation.amount, reservation.asset)
    return reservation


@money_transaction
def commit(reservation_id: int, now: datetime.datetime | None = None) -> Reservation:
    """Spend a reservation (the image was delivered). Raises UnknownReservation,
    AlreadyCommitted, AlreadyReleased, ReservationExpired; none of them changes anything."""
    return _resolve(reservation_id, "committed", "commit", now)


@money_transaction
def release(reservation_id: int, now: datetime.datetime | None = None) -> Reservation:
    """Return a reservation to the user (the job failed or was cancelled). Raises
    UnknownReservation, AlreadyCommitted, AlreadyReleased, ReservationExpired."""
    return _resolve(reservation_id, "released", "release", now)


@money_transaction
def expire(reservation_id: int, now: datetime.datetime | None = None) -> Reservation:
    """Return a reservation that outlived its time limit. Raises like `release`."""
    return _resolve(reservation_id, "expired", "expire", now)


def extend(reservation_ids, ttl: int, now: datetime.datetime | None = None) -> int:
    """Give each still-open reservation of `reservation_ids` a new expiry `ttl` seconds from `now`;
    return how many were extended. Not a balance change (no ledger row): the hold stays the same,
    only the time the sweeper may expire it moves. Used by the sweeper for live jobs, so a job
    waiting in a long queue keeps its hold. Raises InvalidAmount for a bad `ttl`."""
    check_amount(ttl)
    ids = [int(i) for i in reservation_ids]
    if not ids:
        return 0
    now = now or utcnow()
    return (Reservation.update(expires_at=now + datetime.timedelta(seconds=ttl))
            .where(Reservation.id.in_(ids) & (Reservation.state == "reserved")).execute())


def expire_stale(now: datetime.datetime | None = None, limit: int = 1000) -> list[int]:
    """Expire every open reservation past its `expires_at`; return their ids (the sweeper)."""
    now = now or utcnow()
    ids = [r.id for r in Reservation.select(Reservation.id)
           .where((Reservation.state == "reserved") & (Reservation.expires_at <= now))
           .order_by(Reservation.id).limit(limit)]
    done = []
    for reservation_id in ids:
        try:
            expire(reservation_id, now=now)
            done.append(reservation_id)
        except ReservationClosed:
            pass  # resolved by its job between our SELECT and our UPDATE
        except BillingError:  # one broken row must not keep every later reservation open
            logger.exception("could not expire reservation %s", reservation_id)
    if done:
        logger.warning("expired %d stale reservations: %s", len(done), done)
    return done


# --- audit -----------------------------------------------------------------------------------

@dataclass
class AuditReport:
    """What `audit()` found: `violations` (one line each) and summary figures."""

    violations: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no invariant is violated."""
        return not self.violations


def _read_snapshot():
    if is_sqlite():
        return db.atomic(lock_type="DEFERRED")
    return db.atomic(isolation_level="REPEATABLE READ")


def _payment_for(reference: str):
    if not reference.startswith("payment:"):
        return None
    try:
        payment_id = uuid.UUID(reference.split(":", 1)[1])
    except ValueError:
        return None
    return Payment.get_or_none(Payment.id == payment_id)


def _audit_promo_limits(bad) -> None:
    """I12: per code, uses + redemptions reserved on pending payments ≤ max_uses; a consumed
    redemption's payment succeeded; a discounted payment holds a redemption of its code."""
    reserved = dict(PromoRedemption.select(PromoRedemption.promo, fn.COUNT(PromoRedemption.id))
                    .join(Payment, on=(PromoRedemption.payment == Payment.id))
                    .where((PromoRedemption.state == "reserved") & (Payment.status == "pending"))
                    .group_by(PromoRedemption.promo).tuples())
    for code in PromoCode.select().where(PromoCode.max_uses.is_null(False)):
        taken = code.uses + reserved.get(code.id, 0)
        if taken > code.max_uses:
            bad("I12 promo %s: %s used + %s reserved > max_uses %s"
                % (code.code, code.uses, reserved.get(code.id, 0), code.max_uses))
    for row in (PromoRedemption.select(PromoRedemption.id, Payment.status.alias("pstatus"))
                .join(Payment, on=(PromoRedemption.payment == Payment.id))
                .where((PromoRedemption.state == "consumed") & (Payment.status != "succeeded")).objects()):
        bad("I12 promo redemption %s is consumed but its payment is %s" % (row.id, row.pstatus))
    held = {(r.payment_id, r.promo_id) for r in PromoRedemption.select(PromoRedemption.payment, PromoRedemption.promo)
            .where(PromoRedemption.payment.is_null(False))}
    for payment in Payment.select(Payment.id, Payment.promo).where(Payment.promo.is_null(False)
                                                                    & (Payment.status == "succeeded")):
        if (payment.id, payment.promo_id) not in held:
            bad("I12 payment %s was discounted but holds no redemption of its code" % payment.id)


def _confirmed(payment) -> bool:
    """A payment carries the confirmation of exactly one provider: its own, and not the other's."""
    if payment.provider == "stars":
        return bool(payment.telegram_charge_id) and not payment.yookassa_payment_id and payment.currency == "XTR"
    return bool(payment.yookassa_payment_id) and not payment.telegram_charge_id and payment.currency != "XTR"


def _audit_stars(bad, payment_ids=None) -> None:
    """I14: every Stars refund (``stars:<charge id>``) references the Stars payment with that charge
    and is the whole charge; I15: per order, the top-up credits never exceed what was paid for
    (the order's credits) and a Stars charge id sits on a Stars order only. `payment_ids`: only
    those orders (the incremental audit), else all."""
    refunds = Refund.select(Refund, Payment).join(Payment).where(Refund.id.startswith("stars:"))
    orders = Payment.select(Payment.id, Payment.credits, Payment.provider, Payment.telegram_charge_id)
    topups = LedgerEntry.select(LedgerEntry.reference, fn.SUM(LedgerEntry.amount)).where(LedgerEntry.kind == "topup")
    if payment_ids is not None:
        payment_ids = list(payment_ids)
        refunds = refunds.where(Refund.payment.in_(payment_ids))
        orders = orders.where(Payment.id.in_(payment_ids))
        topups = topups.where(LedgerEntry.reference.in_(["payment:%s" % pid for pid in payment_ids]))
    for refund in refunds:
        payment = refund.payment
        if payment.provider != "stars" or "stars:%s" % payment.telegram_charge_id != refund.id:
            bad("I14 Stars refund %s references payment %s (%s, charge %s)"
                % (refund.id, payment.id, payment.provider, payment.telegram_charge_id))
        elif refund.amount_kopecks != payment.amount_kopecks:
            bad("I14 Stars refund %s is %s of %s Stars (a Stars refund is the whole charge)"
                % (refund.id, refund.amount_kopecks, payment.amount_kopecks))
    credited = dict(topups.group_by(LedgerEntry.reference).tuples())
    for payment_id, credits, provider, charge_id in orders.tuples().iterator():
        total = credited.get("payment:%s" % payment_id, 0)
        if total > credits:
            bad("I15 payment %s: %s credits topped up, %s paid for" % (payment_id, total, credits))
        if charge_id and provider != "stars":
            bad("I15 payment %s (%s) holds a Telegram charge id" % (payment_id, provider))


def _audit_refunds(bad) -> None:
    """I13: per payment, refunded kopecks = Σ its refunds ≤ what was paid, and the credits asked
    back = the cumulative share credits × refunded // paid (partial refunds converge); I16: a
    referral bonus (key ``referral:<user id>``) is never taken back (keys
    ``referral:<user id>:refund:<refund id>``) for more than it gave."""
    sums = {pid: (kopecks, credits) for pid, kopecks, credits in
            Refund.select(Refund.payment, fn.SUM(Refund.amount_kopecks), fn.SUM(Refund.credits_requested))
            .group_by(Refund.payment).tuples()}
    for payment in Payment.select().where((Payment.refunded_kopecks > 0) | Payment.id.in_(list(sums))):
        kopecks, credits = sums.get(payment.id, (0, 0))
        if kopecks != payment.refunded_kopecks or kopecks > payment.amount_kopecks:
            bad("I13 payment %s: refunded %s kopecks, its refunds sum to %s (paid %s)"
                % (payment.id, payment.refunded_kopecks, kopecks, payment.amount_kopecks))
        expected = payment.credits * min(kopecks, payment.amount_kopecks) // payment.amount_kopecks
        if credits != expected:
            bad("I13 payment %s: refunds asked back %s credits, the cumulative share is %s"
                % (payment.id, credits, expected))
    # Referral rows by their idempotency keys ("referral:<user id>" and "referral:<user id>:refund:…"):
    # a range on the unique index, not a scan of the ledger (':' + 1 = ';').
    bonuses, taken = {}, {}
    for kind, reference, amount in (LedgerEntry.select(LedgerEntry.kind, LedgerEntry.reference, LedgerEntry.amount)
                                    .where((LedgerEntry.idempotency_key >= "referral:")
                                           & (LedgerEntry.idempotency_key < "referral;")).tuples()):
        if kind == "grant":
            bonuses[reference] = amount
        elif kind == "payment_refund":
            taken[reference] = taken.get(reference, 0) + amount
    for reference, total in taken.items():
        if total > bonuses.get(reference, 0):
            bad("I16 %s: %s credits taken back, the bonus was %s" % (reference, total, bonuses.get(reference, 0)))


# The audit's scans read plain tuples of the columns they check, not model instances: building a
# peewee object per row was most of a 1,000,000-row audit (55 s → see bench/bench_growth.py).
_CHAIN_COLUMNS = (LedgerEntry.id, LedgerEntry.user, LedgerEntry.asset, LedgerEntry.kind, LedgerEntry.amount,
                  LedgerEntry.delta_available, LedgerEntry.delta_reserved, LedgerEntry.available_after,
                  LedgerEntry.reserved_after)


def _audit_chain(query, sums: dict, bad) -> None:
    """I2, I11 over `query`'s ledger rows (ordered by user, asset, id), continuing `sums`
    {(user id, asset): (available, reserved)} and leaving the final balances in it."""
    for row_id, user_id, asset, kind, amount, d_avail, d_res, avail_after, res_after in (
            query.select(*_CHAIN_COLUMNS).tuples().iterator()):
        key = (user_id, asset)
        avail, res = sums.get(key, (0, 0))
        avail, res = avail + d_avail, res + d_res
        if avail != avail_after or res != res_after:
            bad("I2 ledger %s (user %s %s): balance-after %s/%s does not follow from the previous row (%s/%s)"
                % (row_id, user_id, asset, avail_after, res_after, avail, res))
            avail, res = avail_after, res_after
        sums[key] = (avail, res)
        if amount <= 0 or amount > INT64_MAX:
            bad("I11 ledger %s has amount %s" % (row_id, amount))
        if kind != "payment_refund" and abs(d_avail) + abs(d_res) == 0:
            bad("I11 ledger %s (%s) changes nothing" % (row_id, kind))


def _audit_reservations(query, resolving: dict, open_sums: dict, counts: dict, stale_before, bad) -> None:
    """I4 (open sums), I5, I10, I11 over `query`'s reservations; `resolving` maps the ledger's
    reserve/commit/release/expire idempotency keys to their kind."""
    columns = (Reservation.id, Reservation.user, Reservation.asset, Reservation.amount, Reservation.state,
               Reservation.idempotency_key, Reservation.created_at, Reservation.expires_at)
    want = {"reserved": [], "committed": ["commit"], "released": ["release"], "expired": ["expire"]}
    for rid, user_id, asset, amount, state, key, created_at, expires_at in query.select(*columns).tuples().iterator():
        counts[state] = counts.get(state, 0) + 1
        if state == "reserved":
            if asset != "free_access":
                open_sums[(user_id, asset)] = open_sums.get((user_id, asset), 0) + amount
            if expires_at < stale_before:
                bad("I10 reservation %s (from %s) is open past its expiry %s + the sweep interval"
                    % (rid, created_at, expires_at))
        if asset == "free_access":
            if amount != 0:
                bad("I11 free-access reservation %s holds %s" % (rid, amount))
            continue
        if ("reserve:" + key) not in resolving:
            bad("I5 reservation %s has no reserve row in the ledger" % rid)
        ends = [kind for kind in ("commit", "release", "expire") if "%s:%s" % (kind, key) in resolving]
        if ends != want[state]:
            bad("I5 reservation %s is %s but the ledger resolves it by %s" % (rid, state, ends or "nothing"))


def _audit_topups(query, bad) -> list:
    """I6, I7 over `query`'s top-up rows (payments read in one query); return their amounts."""
    rows = list(query.select(LedgerEntry.id, LedgerEntry.user, LedgerEntry.amount, LedgerEntry.reference).tuples())
    ids = {}
    for _, _, _, reference in rows:
        if reference.startswith("payment:"):
            try:
                ids[reference] = uuid.UUID(reference.split(":", 1)[1])
            except ValueError:
                pass
    found = {}
    wanted = list(set(ids.values()))
    for start in range(0, len(wanted), 500):
        for payment in Payment.select().where(Payment.id.in_(wanted[start:start + 500])):
            found[payment.id] = payment
    seen: dict = {}
    for row_id, user_id, amount, reference in rows:
        seen[reference] = seen.get(reference, 0) + 1
        payment = found.get(ids.get(reference))
        if payment is None:
            bad("I7 top-up ledger %s references no payment (%s)" % (row_id, reference))
        elif payment.status != "succeeded":
            bad("I7 top-up ledger %s: payment %s is %s" % (row_id, payment.id, payment.status))
        elif not _confirmed(payment):
            bad("I7 top-up ledger %s: payment %s (%s) is not confirmed by exactly one provider "
                "(yookassa %s, stars %s)" % (row_id, payment.id, payment.provider, payment.yookassa_payment_id,
                                             payment.telegram_charge_id))
        elif payment.credits != amount or payment.user_id != user_id:
            bad("I7 top-up ledger %s does not match payment %s" % (row_id, payment.id))
    for ref, count in seen.items():
        if count > 1:
            bad("I6 %s credited %d times" % (ref, count))
    return [row[2] for row in rows]


def _payments_touched(new) -> set:
    """The orders ledger rows `new` credit (top-ups, ``payment:<id>``) or refund (``refund:<id>``)."""
    touched, refunds = set(), []
    for kind, reference in new.select(LedgerEntry.kind, LedgerEntry.reference).where(
            LedgerEntry.kind.in_(["topup", "payment_refund"])).tuples():
        if kind == "topup" and reference.startswith("payment:"):
            touched.add(reference[len("payment:"):])
        elif reference.startswith("refund:"):
            refunds.append(reference[len("refund:"):])
    if refunds:
        touched.update(str(pid) for pid, in Refund.select(Refund.payment).where(Refund.id.in_(refunds)).tuples())
    return touched


def audit_since(since_id: int, now: datetime.datetime | None = None, *, free_operations: int | None = None,
                sweep_interval: int | None = None) -> AuditReport:
    """The audit of what ledger rows after `since_id` could have broken, given that a full audit
    (or an earlier `audit_since`) found the ledger up to `since_id` clean; reads O(new rows).

    Checks, for each (user, asset) with rows after `since_id`: I2 and I11 on those rows, chained
    from the balance-after of that key's last earlier row; I1 and I3 on its cached balance; I4 on
    its reserved sum. I5 for the reservations those rows reserve or resolve; I6 and I7 for the new
    top-ups (I6 among them: a duplicate of an old top-up's reference is for the full audit); I9 for
    the users with new free-operation grants; I10 on every open reservation; I14–I15 for the orders
    the new rows credit or refund; I12, I13, I16 and I8 as the full audit. `summary["last_ledger_id"]` is where the next incremental audit starts.
    """
    free_operations, sweep, now = _audit_settings(free_operations, sweep_interval, now)
    report = AuditReport()
    bad = report.violations.append
    with _read_snapshot():
        new = LedgerEntry.select().where(LedgerEntry.id > since_id)
        keys = sorted(set(new.select(LedgerEntry.user, LedgerEntry.asset).distinct().tuples()))
        sums = {}
        for user_id, asset in keys:                      # where each chain stood at since_id
            last = (LedgerEntry.select(LedgerEntry.available_after, LedgerEntry.reserved_after)
                    .where((LedgerEntry.user == user_id) & (LedgerEntry.asset == asset) & (LedgerEntry.id <= since_id))
                    .order_by(LedgerEntry.id.desc()).limit(1).tuples().first())
            sums[(user_id, asset)] = tuple(last) if last else (0, 0)
        _audit_chain(new.order_by(LedgerEntry.user, LedgerEntry.asset, LedgerEntry.id), sums, bad)
        _since_balances(keys, sums, bad)
        reservation_keys, counts = _since_reservations(new, bad)
        late = datetime.timedelta(seconds=sweep)
        for rid, created_at, expires_at in (Reservation.select(Reservation.id, Reservation.created_at,
                                                               Reservation.expires_at)
                                            .where((Reservation.state == "reserved")
                                                   & (Reservation.expires_at < now - late)).tuples()):
            bad("I10 reservation %s (from %s) is open past its expiry %s + the sweep interval"
                % (rid, created_at, expires_at))
        topups = _audit_topups(new.where(LedgerEntry.kind == "topup"), bad)
        _since_free_ops(new, free_operations, bad)
        _audit_promo_limits(bad)
        _audit_refunds(bad)
        _audit_stars(bad, _payments_touched(new))
        _audit_triggers(bad)
        report.summary = {
            "since_ledger_id": since_id,
            "last_ledger_id": LedgerEntry.select(fn.MAX(LedgerEntry.id)).scalar() or since_id,
            "new_ledger_rows": new.count(),
            "balances_checked": len(keys),
            "reservations_checked": len(reservation_keys),
            "reservations": counts,
            "topups": len(topups),
            "topup_credits": sum(topups),
        }
    return report


def _since_balances(keys: list, sums: dict, bad) -> None:
    """`audit_since`: I1, I3 and I4 for each (user, asset) in `keys`, against the chained `sums`."""
    for user_id, asset in keys:
        balance = Balance.get_or_none((Balance.user == user_id) & (Balance.asset == asset))
        if balance is None:
            bad("I1 user %s %s: ledger rows without a balance row" % (user_id, asset))
            continue
        if (balance.available, balance.reserved) != sums[(user_id, asset)]:
            bad("I1 user %s %s: cached %s/%s, ledger sums to %s/%s" % (
                user_id, asset, balance.available, balance.reserved, *sums[(user_id, asset)]))
        if balance.available < 0 or balance.reserved < 0:
            bad("I3 user %s %s: negative balance %s/%s" % (user_id, asset, balance.available, balance.reserved))
        held = (Reservation.select(fn.COALESCE(fn.SUM(Reservation.amount), 0))
                .where((Reservation.user == user_id) & (Reservation.asset == asset)
                       & (Reservation.state == "reserved")).scalar())
        if balance.reserved != held:
            bad("I4 user %s %s: reserved %s, open reservations hold %s" % (user_id, asset, balance.reserved, held))


def _since_reservations(new, bad) -> tuple[list, dict]:
    """`audit_since`: I5 for the reservations the new ledger rows `new` reserve or resolve;
    returns (their idempotency keys, counts by state)."""
    moves = list(new.select(LedgerEntry.idempotency_key)
                 .where(LedgerEntry.kind.in_(["reserve", "commit", "release", "expire"])).tuples())
    reservation_keys = sorted({key.split(":", 1)[1] for (key,) in moves})
    counts: dict = {}
    for start in range(0, len(reservation_keys), 500):
        chunk = reservation_keys[start:start + 500]
        wanted = ["%s:%s" % (kind, key) for key in chunk for kind in ("reserve", "commit", "release", "expire")]
        resolving = dict(LedgerEntry.select(LedgerEntry.idempotency_key, LedgerEntry.kind)
                         .where(LedgerEntry.idempotency_key.in_(wanted)).tuples())
        found = Reservation.select().where(Reservation.idempotency_key.in_(chunk))
        for key in sorted(set(chunk) - {k for (k,) in found.select(Reservation.idempotency_key).tuples()}):
            bad("I5 ledger rows …:%s have no reservation" % key)
        # I10 is checked below for every open reservation, so not here (stale_before=min).
        _audit_reservations(found, resolving, {}, counts, datetime.datetime.min, bad)
    return reservation_keys, counts


def _since_free_ops(new, free_operations: int, bad) -> None:
    """`audit_since`: I9 for the users with new free-operation grants among `new`."""
    granted = sorted({u for (u,) in new.select(LedgerEntry.user).where(
        (LedgerEntry.asset == "free_ops") & (LedgerEntry.kind == "grant")).tuples()})
    for user_id in granted:
        total = (LedgerEntry.select(fn.SUM(LedgerEntry.amount)).where(
            (LedgerEntry.user == user_id) & (LedgerEntry.asset == "free_ops") & (LedgerEntry.kind == "grant"))
            .scalar())
        if total > free_operations:
            bad("I9 user %s was granted %s free operations (limit %s)" % (user_id, total, free_operations))


def _audit_triggers(bad) -> None:
    """I8: the append-only guards are in place."""
    if is_sqlite():
        names = {r[0] for r in db.execute_sql("SELECT name FROM sqlite_master WHERE type='trigger'")}
        wanted = {"ledger_no_update", "ledger_no_delete", "reservation_final"}
    else:
        names = {r[0] for r in db.execute_sql(
            "SELECT t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE NOT t.tgisinternal AND n.nspname = current_schema()")}
        wanted = {"ledger_append_only", "reservation_final"}
    for name in sorted(wanted - names):
        bad("I8 trigger %s is missing: the ledger could be rewritten" % name)


def _audit_settings(free_operations, sweep_interval, now) -> tuple[int, int, datetime.datetime]:
    """The audit's settings: the arguments, or the process configuration where they are None."""
    cfg = config.get()
    return (cfg.free_operations_count if free_operations is None else free_operations,
            cfg.sweep_interval if sweep_interval is None else sweep_interval, now or utcnow())


def _audit_balances(balances: dict, sums: dict, bad) -> None:
    """I1: cached balances equal the ledger sums (and no ledger rows without a balance row);
    I3: nothing negative."""
    for key, balance in balances.items():
        expected = sums.get(key, (0, 0))
        if (balance.available, balance.reserved) != expected:
            bad("I1 user %s %s: cached %s/%s, ledger sums to %s/%s"
                % (key[0], key[1], balance.available, balance.reserved, expected[0], expected[1]))
        if balance.available < 0 or balance.reserved < 0:
            bad("I3 user %s %s: negative balance %s/%s" % (key[0], key[1], balance.available, balance.reserved))
    for key in set(sums) - set(balances):
        bad("I1 user %s %s: ledger rows without a balance row" % key)


def _audit_reserved(balances: dict, open_sums: dict, bad) -> None:
    """I4: each cached reserved amount equals what the user's open reservations hold."""
    for key, balance in balances.items():
        if balance.reserved != open_sums.get(key, 0):
            bad("I4 user %s %s: reserved %s, open reservations hold %s"
                % (key[0], key[1], balance.reserved, open_sums.get(key, 0)))


def _audit_free_ops(free_operations: int, bad) -> None:
    """I9: no account was granted more than `free_operations` free operations."""
    for row in (LedgerEntry.select(LedgerEntry.user, fn.SUM(LedgerEntry.amount).alias("total"))
                .where((LedgerEntry.asset == "free_ops") & (LedgerEntry.kind == "grant"))
                .group_by(LedgerEntry.user)):
        if row.total > free_operations:
            bad("I9 user %s was granted %s free operations (limit %s)" % (row.user_id, row.total, free_operations))


def audit(now: datetime.datetime | None = None, *, free_operations: int | None = None,
          sweep_interval: int | None = None) -> AuditReport:
    """Check the ledger invariants I1–I16 on a read snapshot; never writes (I12 promo limits,
    I13 refunds by the cumulative rule, I14 Stars refunds, I15 credits ≤ what was paid for, I16 referral
    take-backs ≤ the bonus).

    Safe while the bot runs (SQLite readers never block the WAL writer). Settings default
    to the process configuration.
    """
    free_operations, sweep, now = _audit_settings(free_operations, sweep_interval, now)
    report = AuditReport()
    bad = report.violations.append
    with _read_snapshot():
        balances = {(b.user_id, b.asset): b for b in Balance.select()}
        # I1, I2, I11: cached = sum of journal; continuous balance-after chain; positive amounts.
        sums: dict = {}
        _audit_chain(LedgerEntry.select().order_by(LedgerEntry.user, LedgerEntry.asset, LedgerEntry.id), sums, bad)
        _audit_balances(balances, sums, bad)
        # I4, I5, I10: reserved = open reservations; each resolved once; none too old.
        open_sums: dict = {}
        resolving = dict(LedgerEntry.select(LedgerEntry.idempotency_key, LedgerEntry.kind)
                         .where(LedgerEntry.kind.in_(["reserve", "commit", "release", "expire"])).tuples().iterator())
        late = datetime.timedelta(seconds=sweep)
        counts = {"reserved": 0, "committed": 0, "released": 0, "expired": 0}
        _audit_reservations(Reservation.select(), resolving, open_sums, counts, now - late, bad)
        _audit_reserved(balances, open_sums, bad)
        # I7: every top-up credit references exactly one succeeded payment confirmed by exactly one
        # provider: YooKassa (its payment id) or Telegram Stars (its charge id, currency XTR).
        topups = _audit_topups(LedgerEntry.select().where(LedgerEntry.kind == "topup"), bad)
        _audit_free_ops(free_operations, bad)
        _audit_promo_limits(bad)
        _audit_refunds(bad)
        _audit_stars(bad)
        free_deliveries = (Generation.select().join(Reservation, on=(Generation.reservation == Reservation.id))
                           .where((Generation.status == "delivered")
                                  & Reservation.state.in_(["expired", "released"])).count())
        _audit_triggers(bad)
        report.summary = {
            "users": User.select().count(),
            "ledger_rows": LedgerEntry.select().count(),
            "credits_available": sum(b.available for (u, a), b in balances.items() if a == "credits"),
            "credits_reserved": sum(b.reserved for (u, a), b in balances.items() if a == "credits"),
            "free_ops_available": sum(b.available for (u, a), b in balances.items() if a == "free_ops"),
            "topups": len(topups),
            "topup_credits": sum(topups),
            "reservations": counts,
            "free_deliveries": free_deliveries,     # an anomaly (logged when it happens), not a violation
        }
    return report
