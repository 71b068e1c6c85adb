"""Promo codes: discounts on a top-up and free-access codes.

Two kinds (docs/SPEC.md §4, docs/DESIGN.md "promo"):

* ``discount`` — ``percent`` (1..99) off the price of one top-up. It is *checked* when the order
  is created, *reserved* on that pending order (a ``PromoRedemption`` row in state ``reserved``),
  *consumed* when the payment succeeds (state ``consumed`` and ``uses + 1`` by a conditional
  update, ``uses < max_uses``) and *released* when the payment is canceled.
  A discount may be capped in kopecks (``max_discount_kopecks``) and may expire.
* ``free_access`` — grants free access for ``free_access_days`` days; it is consumed at once by
  ``redeem_free_access``. It is an operator's tool, never seeded: `add_code` refuses one without
  an expiry in days *and* a use limit unless the caller says ``unlimited=True`` explicitly.

Limits hold at every moment: uses consumed + redemptions reserved on pending payments ≤ max_uses,
and one use per user. Every check that decides runs with the code's row locked (SQLite: the
write lock the transaction already holds; PostgreSQL: ``SELECT … FOR UPDATE``), so racing
top-ups of one code serialise.

A user uses each code at most once: ``PromoRedemption`` has one row per (code, user), re-used when
an earlier reservation was released. Codes are stored upper-case. Every change here runs inside
a ``billing.money_transaction`` (joining the caller's transaction when there is one).

Each refusal is its own exception; its ``text_key`` names the user text in ``texts.py``.
"""
from __future__ import annotations

import datetime
import logging
import re
from dataclasses import dataclass

from peewee import fn

import billing
import models
from models import Payment, PromoCode, PromoRedemption, User, utcnow

logger = logging.getLogger(__name__)

KINDS = ("discount", "free_access")
CODE_RE = re.compile(r"[A-Z0-9_-]{2,32}", re.ASCII)
MIN_PAYMENT_KOPECKS = 100          # a discount never takes a payment below 1.00 ₽ (docs/SPEC.md §4)

# The seeded codes (docs/SPEC.md §4): discounts only, code -> (percent, cap on the discount in
# kopecks or None). MEGA50 is capped at 250 ₽ off a top-up. Free access is never seeded.
DEFAULT_CODES = {
    "WELCOME10": (10, None),
    "SAVE20": (20, None),
    "BONUS30": (30, None),
    "MEGA50": (50, 250_00),
}


class PromoError(Exception):
    """This promo code cannot be used."""

    text_key = "promo_error"
    values: dict = {}  # for texts.t(text_key, lang, **values)

    def __str__(self):
        return self.args[0] if self.args else (self.__doc__ or "").strip()


class InvalidCode(PromoError):
    """The promo code is not valid (admin input: name, kind, percent, days or limit)."""

    text_key = "promo_invalid"


class UnknownCode(PromoError):
    """There is no such promo code."""

    text_key = "promo_unknown"


class CodeExists(InvalidCode):
    """A promo code with this name already exists."""

    text_key = "promo_exists"


class CodeInactive(PromoError):
    """This promo code is switched off."""

    text_key = "promo_inactive"


class CodeExpired(PromoError):
    """This promo code has expired."""

    text_key = "promo_expired"


class CodeExhausted(PromoError):
    """This promo code has been used up."""

    text_key = "promo_exhausted"


class CodeAlreadyUsed(PromoError):
    """You have already used this promo code (or it is waiting on another unpaid top-up)."""

    text_key = "promo_already_used"


class WrongCodeKind(PromoError):
    """This promo code is of another kind (a discount code where free access is asked, or back)."""

    def __init__(self, message: str = "", *, expected: str = "discount"):
        super().__init__(*([message] if message else []))
        self.expected = expected
        # A free-access code entered at a top-up, or a discount code entered for free access.
        self.text_key = "promo_wrong_kind_topup" if expected == "discount" else "promo_wrong_kind_free"


# --- codes ------------------------------------------------------------------------------------

def normalize(code: str) -> str:
    """Return `code` as stored: surrounding spaces removed, upper-case (``" welcome10 "`` → ``"WELCOME10"``).

    Does not check that the code exists; a non-string gives ``""``.
    """
    if not isinstance(code, str):
        return ""
    return code.strip().upper()


def _get(code: str) -> PromoCode:
    name = normalize(code)
    promo = PromoCode.get_or_none(PromoCode.code == name) if CODE_RE.fullmatch(name) else None
    if promo is None:
        raise UnknownCode("unknown promo code %r" % name[:40])
    return promo


def open_reservations(promo_id: int, *, excluding_user: int | None = None) -> int:
    """How many redemptions of code `promo_id` are reserved on payments that are still pending
    (optionally not counting `excluding_user`'s own). These count against ``max_uses``."""
    query = (PromoRedemption.select(fn.COUNT(PromoRedemption.id))
             .join(Payment, on=(PromoRedemption.payment == Payment.id))
             .where((PromoRedemption.promo == promo_id) & (PromoRedemption.state == "reserved")
                    & (Payment.status == "pending")))
    if excluding_user is not None:
        query = query.where(PromoRedemption.user != excluding_user)
    return query.scalar() or 0


def _check_usable(promo: PromoCode, user_id: int, now: datetime.datetime, *, for_payment=None) -> None:
    """Raise the first reason `promo` cannot be used by `user_id` now (kind is checked by the caller):
    inactive, expired, already used by this user, exhausted.

    A redemption *reserved* on a payment that is still pending counts as used, unless that
    payment is `for_payment` itself; one reserved on a payment that is no longer pending is stale.
    ``max_uses`` counts consumed uses plus other users' reservations on pending payments.
    """
    if not promo.active:
        raise CodeInactive("promo code %s is inactive" % promo.code)
    if promo.expires_at is not None and promo.expires_at <= now:
        raise CodeExpired("promo code %s expired at %s" % (promo.code, promo.expires_at))
    redemption = PromoRedemption.get_or_none((PromoRedemption.promo == promo.id) & (PromoRedemption.user == user_id))
    if redemption is not None and redemption.state == "consumed":
        raise CodeAlreadyUsed("user %s already used promo code %s" % (user_id, promo.code))
    if (redemption is not None and redemption.state == "reserved" and redemption.payment_id is not None
            and redemption.payment_id != for_payment):
        pending = Payment.select().where((Payment.id == redemption.payment_id) & (Payment.status == "pending")).exists()
        if pending:
            raise CodeAlreadyUsed("promo code %s is reserved on pending payment %s of user %s"
                                  % (promo.code, redemption.payment_id, user_id))
    if promo.max_uses is not None:
        taken = promo.uses + open_reservations(promo.id, excluding_user=user_id)
        if taken >= promo.max_uses:
            raise CodeExhausted("promo code %s is exhausted (%s used + reserved of %s)"
                                % (promo.code, taken, promo.max_uses))


def _locked(promo_id: int) -> PromoCode:
    """Re-read code `promo_id` inside the caller's money transaction with its row locked
    (PostgreSQL ``FOR UPDATE``; SQLite already holds the database write lock)."""
    query = PromoCode.select().where(PromoCode.id == promo_id)
    if not models.is_sqlite():
        query = query.for_update()
    return query.get()


def check_discount(code: str, user_id: int, now: datetime.datetime | None = None) -> PromoCode:
    """Return the discount `PromoCode` for `code` if `user_id` (our User.id) may use it on a top-up now.

    Raises UnknownCode, WrongCodeKind (a free-access code), CodeInactive, CodeExpired,
    CodeExhausted, CodeAlreadyUsed. Changes nothing.
    """
    promo = _get(code)
    if promo.kind != "discount":
        raise WrongCodeKind("promo code %s is %s, not a discount" % (promo.code, promo.kind), expected="discount")
    _check_usable(promo, user_id, now or utcnow())
    return promo


def discounted_kopecks(credits: int, percent: int, max_discount_kopecks: int | None = None) -> int:
    """Return the price in kopecks of a top-up of `credits` credits with `percent` % off.

    1 credit = 1 ₽ = 100 kopecks. Integer arithmetic, rounded half up to whole kopecks; the
    discount is at most `max_discount_kopecks` (None: no cap) and the price never below
    MIN_PAYMENT_KOPECKS (1.00 ₽): ``discounted_kopecks(100, 10) == 9000``,
    ``discounted_kopecks(1000, 50, 25000) == 75000``, ``discounted_kopecks(1, 99) == 100``.
    `percent` is 0..99. Raises ValueError on bad input.
    """
    if isinstance(credits, bool) or not isinstance(credits, int) or credits < 1:
        raise ValueError("credits must be a positive whole number, got %r" % (credits,))
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 99:
        raise ValueError("percent must be a whole number 0..99, got %r" % (percent,))
    if max_discount_kopecks is not None and (isinstance(max_discount_kopecks, bool)
                                             or not isinstance(max_discount_kopecks, int) or max_discount_kopecks < 0):
        raise ValueError("max_discount_kopecks must be a whole number ≥ 0, got %r" % (max_discount_kopecks,))
    full = credits * 100
    scaled = full * (100 - percent)                    # kopecks × 100
    kopecks = (scaled + 50) // 100                     # ROUND_HALF_UP (all values are positive)
    if max_discount_kopecks is not None:
        kopecks = max(kopecks, full - max_discount_kopecks)
    return max(kopecks, MIN_PAYMENT_KOPECKS)


def price_kopecks(credits: int, discount: PromoCode | None) -> int:
    """The price in kopecks of `credits` credits with discount code `discount` (None: full price)."""
    if discount is None:
        return discounted_kopecks(credits, 0)
    return discounted_kopecks(credits, discount.percent, discount.max_discount_kopecks)


@billing.money_transaction
def seed_defaults() -> int:
    """Create the default discount codes (WELCOME10, SAVE20, BONUS30, MEGA50) that are missing.

    Idempotent: existing codes are left as they are. Returns how many were created.
    """
    existing = {p.code for p in PromoCode.select(PromoCode.code).where(PromoCode.code.in_(list(DEFAULT_CODES)))}
    created = 0
    for code, (percent, cap) in DEFAULT_CODES.items():
        if code in existing:
            continue
        PromoCode.insert(code=code, kind="discount", percent=percent, max_discount_kopecks=cap,
                         created_at=utcnow()).on_conflict_ignore().execute()
        created += 1
        logger.info("promo code seeded: %s discount %s%% cap=%s", code, percent, cap)
    return created


def _whole(value, low: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= low


@billing.money_transaction
def add_code(code: str, kind: str, percent: int = 0, days: int | None = None, max_uses: int | None = None,
             expires_at: datetime.datetime | None = None, max_discount_kopecks: int | None = None,
             unlimited: bool = False) -> PromoCode:
    """Create a promo code (the admin's /promo_add) and return it.

    * ``discount``: `percent` 1..99, optional `max_discount_kopecks` (≥ 1, a cap on the discount
      of one top-up), `max_uses` (≥ 1, None: unlimited) and `expires_at` (naive UTC).
    * ``free_access``: `days` of free access (≥ 1) **and** `max_uses` (≥ 1) are required; an
      unlimited, never-expiring free-access code needs ``unlimited=True`` (with days and
      max_uses None) so it is never created by accident. `expires_at` ends the code itself.

    The code is 2..32 characters of A-Z, 0-9, ``_``, ``-`` (stored upper-case). Raises
    InvalidCode, CodeExists.
    """
    name = normalize(code)
    if not CODE_RE.fullmatch(name):
        raise InvalidCode("code must be 2..32 characters of A-Z 0-9 _ -, got %r" % name[:40])
    if kind not in KINDS:
        raise InvalidCode("kind must be discount or free_access, got %r" % (kind,))
    if max_uses is not None and not _whole(max_uses, 1):
        raise InvalidCode("max_uses must be ≥ 1 or empty, got %r" % (max_uses,))
    if kind == "discount":
        if not (_whole(percent, 1) and percent <= 99):
            raise InvalidCode("a discount needs percent 1..99, got %r" % (percent,))
        if max_discount_kopecks is not None and not _whole(max_discount_kopecks, 1):
            raise InvalidCode("max_discount must be ≥ 1 ruble or empty, got %r" % (max_discount_kopecks,))
        days, unlimited = None, False
    else:
        percent, max_discount_kopecks = 0, None
        if unlimited:
            if days is not None or max_uses is not None:
                raise InvalidCode("an unlimited free-access code takes no days and no use limit")
        else:
            if not _whole(days, 1):
                raise InvalidCode("a free-access code needs days ≥ 1 (or the explicit word unlimited), got %r"
                                  % (days,))
            if max_uses is None:
                raise InvalidCode("a free-access code needs a use limit (or the explicit word unlimited)")
    if PromoCode.select().where(PromoCode.code == name).exists():
        raise CodeExists("promo code %s already exists" % name)
    promo = PromoCode.create(code=name, kind=kind, percent=percent, free_access_days=days, max_uses=max_uses,
                             expires_at=expires_at, max_discount_kopecks=max_discount_kopecks, created_at=utcnow())
    logger.info("promo code added: %s %s percent=%s cap=%s days=%s max_uses=%s expires=%s unlimited=%s",
                name, kind, percent, max_discount_kopecks, days, max_uses, expires_at, unlimited)
    return promo


def is_unlimited_free_access(promo: PromoCode) -> bool:
    """True for a free-access code with neither a use limit nor days (the dangerous kind)."""
    return promo.kind == "free_access" and promo.max_uses is None and promo.free_access_days is None


@billing.money_transaction
def set_active(code: str, active: bool) -> PromoCode:
    """Switch a code on or off (the admin's /promo_on, /promo_off); return it. Raises UnknownCode.

    Switching off stops new orders and redemptions; orders already holding the code keep their
    discount (the user was shown that price)."""
    promo = _get(code)
    PromoCode.update(active=bool(active)).where(PromoCode.id == promo.id).execute()
    logger.info("promo code %s active=%s", promo.code, bool(active))
    return _get(promo.code)


@dataclass(frozen=True)
class CodeView:
    """One line of /promo_list: the code and its figures (reserved = on pending payments)."""

    promo: PromoCode
    reserved: int
    unlimited_free_access: bool


def list_codes() -> list[CodeView]:
    """Return every code with its open reservations, ordered by name (for the admin's /promo_list)."""
    return [CodeView(p, open_reservations(p.id), is_unlimited_free_access(p))
            for p in PromoCode.select().order_by(PromoCode.code)]


# --- discount codes on payments (inside the caller's money transaction) -----------------------

@billing.money_transaction
def reserve_for_payment(promo: PromoCode, user_id: int, payment_id, now: datetime.datetime | None = None
                        ) -> PromoRedemption:
    """Reserve discount `promo` for `user_id` on pending payment `payment_id` (a uuid); return the row.

    Re-checks usability inside the transaction (another order may have taken it meanwhile) and
    re-uses the (code, user) row when an earlier reservation was released or went stale.
    Raises CodeInactive, CodeExpired, CodeExhausted, CodeAlreadyUsed, WrongCodeKind.
    """
    now = now or utcnow()
    promo = _locked(promo.id)
    if promo.kind != "discount":
        raise WrongCodeKind("promo code %s is not a discount" % promo.code, expected="discount")
    _check_usable(promo, user_id, now, for_payment=payment_id)
    changed = (PromoRedemption.update(state="reserved", payment=payment_id, updated_at=now)
               .where((PromoRedemption.promo == promo.id) & (PromoRedemption.user == user_id)
                      & (PromoRedemption.state != "consumed")).execute())
    if not changed:
        PromoRedemption.insert(promo=promo.id, user=user_id, payment=payment_id, state="reserved",
                               created_at=now, updated_at=now).execute()
    logger.info("promo reserved: code=%s user=%s payment=%s", promo.code, user_id, payment_id)
    return PromoRedemption.get((PromoRedemption.promo == promo.id) & (PromoRedemption.user == user_id))


@billing.money_transaction
def consume_for_payment(payment_id, now: datetime.datetime | None = None) -> bool:
    """Mark the code reserved on `payment_id` used (the payment succeeded); return True if one was.

    ``uses`` grows by a conditional update (``uses < max_uses``). If other payments exhausted the
    code meanwhile, the redemption is still consumed — the user has paid the discounted price —
    and this is logged as a warning. A redemption released by a cancel is consumed too when the
    API later says the payment succeeded. Returns False when no code was reserved on the payment.
    """
    now = now or utcnow()
    redemption = PromoRedemption.get_or_none((PromoRedemption.payment == payment_id)
                                             & (PromoRedemption.state.in_(["reserved", "released"])))
    if redemption is None:
        return False
    changed = (PromoRedemption.update(state="consumed", updated_at=now)
               .where((PromoRedemption.id == redemption.id) & (PromoRedemption.state == redemption.state))
               .execute())
    if not changed:
        return False
    counted = (PromoCode.update(uses=PromoCode.uses + 1)
               .where((PromoCode.id == redemption.promo_id)
                      & (PromoCode.max_uses.is_null() | (PromoCode.uses < PromoCode.max_uses))).execute())
    code = PromoCode.get_by_id(redemption.promo_id).code
    if counted:
        logger.info("promo consumed: code=%s user=%s payment=%s", code, redemption.user_id, payment_id)
    else:
        logger.warning("promo exhausted at success time: code=%s user=%s payment=%s — payment credited anyway "
                       "(the user paid the discounted price)", code, redemption.user_id, payment_id)
    return True


@billing.money_transaction
def release_for_payment(payment_id, now: datetime.datetime | None = None) -> bool:
    """Free the code reserved on `payment_id` (the payment was canceled); return True if one was."""
    changed = (PromoRedemption.update(state="released", updated_at=now or utcnow())
               .where((PromoRedemption.payment == payment_id) & (PromoRedemption.state == "reserved")).execute())
    if changed:
        logger.info("promo released: payment=%s", payment_id)
    return bool(changed)


# --- free-access codes ------------------------------------------------------------------------

@billing.money_transaction
def redeem_free_access(code: str, user_id: int, now: datetime.datetime | None = None) -> User:
    """Use a free-access code for `user_id` (our User.id) at once; return the updated User.

    Grants free access for the code's days (None: no expiry) via ``billing.set_free_access``.
    Raises UnknownCode, WrongCodeKind (a discount code), CodeInactive, CodeExpired,
    CodeExhausted, CodeAlreadyUsed, billing.UnknownUser.
    """
    now = now or utcnow()
    promo = _get(code)
    if promo.kind != "free_access":
        raise WrongCodeKind("promo code %s is %s, not free access" % (promo.code, promo.kind), expected="free_access")
    promo = _locked(promo.id)
    billing.get_user(user_id)
    _check_usable(promo, user_id, now)
    counted = (PromoCode.update(uses=PromoCode.uses + 1)
               .where((PromoCode.id == promo.id)
                      & (PromoCode.max_uses.is_null() | (PromoCode.uses < PromoCode.max_uses))).execute())
    if not counted:
        raise CodeExhausted("promo code %s is exhausted" % promo.code)
    changed = (PromoRedemption.update(state="consumed", payment=None, updated_at=now)
               .where((PromoRedemption.promo == promo.id) & (PromoRedemption.user == user_id)
                      & (PromoRedemption.state == "released")).execute())
    if not changed:
        PromoRedemption.insert(promo=promo.id, user=user_id, state="consumed", created_at=now,
                               updated_at=now).execute()
    user = billing.set_free_access(user_id, days=promo.free_access_days, now=now)
    logger.info("promo free access redeemed: code=%s user=%s days=%s", promo.code, user_id, promo.free_access_days)
    return user
