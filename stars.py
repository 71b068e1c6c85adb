"""Telegram Stars top-ups: our order first, the pre-checkout check, the credit on successful_payment,
refunds and reconciliation with getStarTransactions (issue 12).

Money flow (core.telegram.org/bots/payments-stars):

1. ``create_order`` writes our order first: a ``Payment`` with provider ``stars``, currency ``XTR``
   and the price in whole Stars in ``amount_kopecks`` (the currency's minor unit — XTR has none
   smaller than one Star). The bot then sends an invoice whose payload is the order id.
2. Telegram asks ``pre_checkout_query`` before it charges; ``check_pre_checkout`` says yes only for
   an order that exists, is pending, belongs to that Telegram user and has that amount and currency.
3. The credit happens only on the ``successful_payment`` service message
   (``apply_successful_payment``): one money transaction — the conditional update of our order to
   succeeded that also stores the ``telegram_payment_charge_id`` (unique), the ledger credit (key
   ``topup:<order id>``) — so any number of deliveries, in any process, credit once. A payment that
   does not match its order is never dropped: the order moves to ``needs_attention`` and the caller
   tells the admins.
4. A refund (``refund_order`` through refundStarPayment, or a ``refunded_payment`` Telegram reports)
   is always the whole charge and takes the order's credits back once (Refund ``stars:<charge id>``)
   by the YooKassa rule (``payments.record_refund``: capped at the available balance, the shortfall
   recorded).
5. ``reconcile`` reads getStarTransactions from a stored cursor and applies what no update brought:
   lost payments, unrecorded refunds; what it cannot match is reported for the admins.

Promo codes do not apply to Stars (a Stars price is fixed by STARS_PER_100_CREDITS). Amounts in
this module are Stars unless a name says credits. Telegram calls take a ``telebot.TeleBot``
argument: this module never builds a bot.
"""
from __future__ import annotations

import datetime
import logging
import uuid
from dataclasses import dataclass, field

from telebot.apihelper import ApiTelegramException

import billing
import config
import models
import payments
from models import Heartbeat, Payment, Refund, User, utcnow

logger = logging.getLogger(__name__)

PROVIDER = "stars"
CURRENCY = "XTR"
ORDER_EXPIRY = 60 * 60            # seconds after which an unpaid Stars order ends canceled
TITLE_MAX = 32                    # Bot API sendInvoice: title 1-32 characters
DESCRIPTION_MAX = 255             # description 1-255 characters
PAGE = 100                        # getStarTransactions: at most 100 per call
MAX_PAGES = 20                    # per reconciliation pass (2000 transactions)
CURSOR = "stars:transactions"     # Heartbeat row: how many transactions reconciliation has read
CURSOR_OVERLAP = 100              # re-read this many before the cursor (cheap, idempotent)


class StarsNotEnabled(payments.PaymentError):
    """Telegram Stars payments are switched off (STARS_ENABLED)."""

    text_key = "stars_not_enabled"


def price_stars(credits: int, cfg: config.Config | None = None) -> int:
    """Whole Stars for `credits` credits: ceil(credits × STARS_PER_100_CREDITS / 100)."""
    cfg = cfg or config.get()
    return -(-int(credits) * cfg.stars_per_100_credits // 100)


def _order_id(payload: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(payload))
    except ValueError:
        return None


# --- creating an order ------------------------------------------------------------------------

def create_order(user_id: int, credits: int, cfg: config.Config | None = None) -> Payment:
    """Write a pending Stars order for `credits` credits of user `user_id` (our User.id) and return
    it; its price in Stars is ``amount_kopecks``. A new order per tap (an invoice is one order):
    unpaid ones end canceled after ORDER_EXPIRY seconds. No discount applies.

    Raises StarsNotEnabled, payments.InvalidTopupAmount, billing.UnknownUser / UserBlocked.
    """
    cfg = cfg or config.get()
    if not cfg.stars_enabled:
        raise StarsNotEnabled("STARS_ENABLED is off")
    credits = payments.check_credits(credits, cfg)
    user = billing.get_user(user_id)
    if user.is_blocked:
        raise billing.UserBlocked()
    now = utcnow()
    order = Payment.create(id=uuid.uuid4(), user=user.id, credits=credits, amount_kopecks=price_stars(credits, cfg),
                           currency=CURRENCY, provider=PROVIDER, status="pending", created_at=now, updated_at=now)
    logger.info("stars order created: order=%s user=%s credits=%s stars=%s", order.id, user.id, credits,
                order.amount_kopecks)
    return order


# --- pre-checkout -----------------------------------------------------------------------------

def check_pre_checkout(telegram_id: int, payload: str, currency: str, total_amount: int) -> str | None:
    """Decide a pre_checkout_query: None when the order `payload` exists, is a pending Stars order of
    Telegram user `telegram_id` with that `currency` and `total_amount` (Stars); else the reason
    (``unknown`` — no such order or not this user's, ``not_pending``, ``mismatch``). Read-only."""
    key = _order_id(payload)
    order = Payment.get_or_none(Payment.id == key) if key else None
    owner = User.select(User.telegram_id).where(User.id == order.user_id).scalar() if order else None
    if order is None or order.provider != PROVIDER or owner != telegram_id:
        reason = "unknown"
    elif order.status != "pending":
        reason = "not_pending"
    elif currency != CURRENCY or total_amount != order.amount_kopecks:
        reason = "mismatch"
    else:
        return None
    logger.info("stars pre-checkout refused (%s): payload=%r user=%s %s %s", reason, str(payload)[:64], telegram_id,
                total_amount, str(currency)[:8])
    return reason


# --- successful payments ----------------------------------------------------------------------

@dataclass(frozen=True)
class StarsOutcome:
    """What applying a Stars payment did: the `order_id` (None when no order of ours matches),
    `credited` (True only for the call that credited), and `detail` — ``credited``,
    ``already_applied``, ``needs_attention`` (a mismatch: tell the admins) or ``unmatched`` (no
    order to attach it to: tell the admins)."""

    order_id: uuid.UUID | None
    credited: bool
    detail: str
    problem: str = ""


def _mismatch(order: Payment | None, telegram_id: int, currency: str, total_amount: int) -> str:
    if order is None:
        return "no such order"
    if order.provider != PROVIDER:
        return "order %s is a %s order" % (order.id, order.provider)
    problems = []
    owner = User.select(User.telegram_id).where(User.id == order.user_id).scalar()
    if owner != telegram_id:
        problems.append("paid by Telegram user %s, the order is %s's" % (telegram_id, owner))
    if currency != CURRENCY:
        problems.append("currency %s" % str(currency)[:8])
    if total_amount != order.amount_kopecks:
        problems.append("%s Stars paid, the order costs %s" % (total_amount, order.amount_kopecks))
    return "; ".join(problems)


def apply_successful_payment(telegram_id: int, currency: str, total_amount: int, payload: str, charge_id: str,
                             source: str = "update") -> StarsOutcome:
    """Apply one Stars payment (a successful_payment, or a transaction reconciliation found) of
    `total_amount` Stars by Telegram user `telegram_id` for order `payload`, keyed on `charge_id`.

    A matching payment credits its order once, also when the order was canceled (the user paid).
    One that does not match moves its order to needs_attention, and one with no order of ours is
    ``unmatched``: the caller tells the admins (``worker.alert_admins``). Raises billing.StorageFull.
    """
    with billing.writer_turn():
        known = Payment.get_or_none(Payment.telegram_charge_id == charge_id)
        if known is not None:
            detail = "already_applied" if known.status == "succeeded" else known.status
            return StarsOutcome(known.id, False, detail, known.problem or "")
        return _apply(telegram_id, currency, total_amount, payload, charge_id, source)


@billing.money_transaction
def _apply(telegram_id, currency, total_amount, payload, charge_id, source) -> StarsOutcome:
    now = utcnow()
    key = _order_id(payload)
    order = Payment.get_or_none(Payment.id == key) if key else None
    problem = _mismatch(order, telegram_id, currency, total_amount)
    if problem:
        problem = "Stars charge %s (%s %s Stars by %s, payload %r): %s" % (
            charge_id, source, total_amount, telegram_id, str(payload)[:64], problem)
        logger.error("stars payment does not match: %s", problem)
        if order is None or order.provider != PROVIDER:
            return StarsOutcome(None, False, "unmatched", problem)
        moved = order.telegram_charge_id is None and models.move(
            Payment, order.id, ("pending", "canceled"), "needs_attention", Payment.telegram_charge_id.is_null(),
            telegram_charge_id=charge_id, problem=problem[:500], updated_at=now)
        return StarsOutcome(order.id if moved else None, False, "needs_attention" if moved else "unmatched", problem)
    changed = models.move(Payment, order.id, ("pending", "canceled", "needs_attention"), "succeeded",
                          Payment.telegram_charge_id.is_null(), telegram_charge_id=charge_id,
                          succeeded_at=now, updated_at=now)
    if not changed:
        current = Payment.get_by_id(order.id)
        problem = "Stars charge %s for order %s, which was already paid by charge %s" % (
            charge_id, order.id, current.telegram_charge_id)
        logger.error("stars payment for an order paid already: %s", problem)
        return StarsOutcome(None, False, "unmatched", problem)
    if order.status != "pending":
        logger.warning("stars order %s was %s but Telegram says paid: crediting (the user paid)", order.id, order.status)
    billing.credit(order.user_id, order.credits, kind="topup", reference="payment:%s" % order.id,
                   idempotency_key="topup:%s" % order.id)
    logger.info("payment succeeded: order=%s stars charge=%s user=%s credits=%s stars=%s via=%s", order.id,
                charge_id, order.user_id, order.credits, order.amount_kopecks, source)
    return StarsOutcome(order.id, True, "credited")


# --- refunds ----------------------------------------------------------------------------------

def refund_id(charge_id: str) -> str:
    """Our Refund id of the Stars charge `charge_id` (a Stars refund is the whole charge, once)."""
    return "stars:%s" % charge_id


def apply_refund(charge_id: str, source: str = "update") -> Refund | None:
    """Record the refund of Stars charge `charge_id` once and take back the order's credits by the
    cumulative rule (capped, the shortfall recorded); return the new Refund, or None when it was
    recorded already. Raises payments.UnknownPayment when no order of ours has that charge."""
    order = Payment.get_or_none((Payment.telegram_charge_id == charge_id) & (Payment.provider == PROVIDER))
    if order is None:
        raise payments.UnknownPayment("no Stars order with charge %r" % str(charge_id)[:64])
    if order.status != "succeeded":
        raise payments.RefundNotPossible("Stars order %s is %s" % (order.id, order.status))
    refund = payments.record_refund(order.id, refund_id(charge_id), order.amount_kopecks - order.refunded_kopecks)
    if refund is not None:
        logger.info("stars refund applied: order=%s charge=%s via=%s", order.id, charge_id, source)
    return refund


def refund_order(order: Payment, bot) -> Refund | None:
    """Refund Stars order `order` through refundStarPayment (the whole charge) and apply it; return
    the new Refund, or None when it had been applied already. A charge Telegram says is refunded
    already (CHARGE_ALREADY_REFUNDED) is applied too (it was refunded, so its credits go back).

    :raises payments.RefundNotPossible: the order is not a paid Stars order, or nothing is left.
    :raises payments.ProviderUnavailable: Telegram did not answer (try again).
    :raises payments.PaymentRejected: Telegram refused the refund.
    """
    if order.provider != PROVIDER or order.status != "succeeded" or not order.telegram_charge_id:
        raise payments.RefundNotPossible("order %s is not a paid Stars order" % order.id)
    if Refund.select().where(Refund.id == refund_id(order.telegram_charge_id)).exists():
        raise payments.RefundNotPossible("Stars order %s is refunded already" % order.id)
    telegram_id = User.select(User.telegram_id).where(User.id == order.user_id).scalar()
    try:
        bot.refund_star_payment(telegram_id, order.telegram_charge_id)
    except ApiTelegramException as exc:
        if "CHARGE_ALREADY_REFUNDED" not in str(exc.description):
            if exc.error_code == 429 or exc.error_code >= 500:
                raise payments.ProviderUnavailable("refundStarPayment: %s" % exc.description) from exc
            raise payments.PaymentRejected("refundStarPayment: %s" % exc.description) from exc
        logger.warning("stars order %s: Telegram says charge %s is refunded already", order.id, order.telegram_charge_id)
    except Exception as exc:                 # network errors and timeouts: the outcome is unknown
        raise payments.ProviderUnavailable("refundStarPayment: %s" % type(exc).__name__) from exc
    return apply_refund(order.telegram_charge_id, "refundStarPayment")


# --- reconciliation ---------------------------------------------------------------------------

@dataclass
class StarsReconcileReport:
    """One pass over getStarTransactions: transactions `checked`, orders `credited` (ids: tell the
    users), `refunds` applied (Refund ids: tell the users), `problems` ((key, text) pairs: tell the
    admins, deduplicated by key), unpaid orders `canceled`, and `failed` when Telegram did not answer."""

    checked: int = 0
    credited: list = field(default_factory=list)
    refunds: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    canceled: int = 0
    failed: bool = False


def _cursor() -> int:
    return int(Heartbeat.select(Heartbeat.value).where(Heartbeat.name == CURSOR).scalar() or 0)


def _save_cursor(value: int, now: datetime.datetime) -> None:
    (Heartbeat.insert(name=CURSOR, at=now, value=value)
     .on_conflict(conflict_target=[Heartbeat.name], update={Heartbeat.at: now, Heartbeat.value: value}).execute())


def reconcile(bot, cfg: config.Config | None = None, now: datetime.datetime | None = None) -> StarsReconcileReport:
    """Read the bot's Star transactions (getStarTransactions, pages of 100, at most MAX_PAGES a
    pass) from where the last pass stopped (minus CURSOR_OVERLAP) and apply what no update brought:
    an incoming payment whose charge id is not in our ledger is credited to its order, a refund we
    never recorded is applied. What cannot be matched lands in ``problems``. Unpaid Stars orders
    older than ORDER_EXPIRY seconds end canceled. Never raises for Telegram errors (``failed``).
    """
    cfg = cfg or config.get()
    now = now or utcnow()
    report = StarsReconcileReport()
    report.canceled = _expire_orders(now)
    offset = max(0, _cursor() - CURSOR_OVERLAP)
    for _ in range(MAX_PAGES):
        try:
            page = bot.get_star_transactions(offset=offset, limit=PAGE).transactions or []
        except Exception as exc:             # noqa: BLE001 - the next pass tries again
            logger.warning("stars reconcile: getStarTransactions failed (%s)", type(exc).__name__)
            report.failed = True
            break
        for transaction in page:
            report.checked += 1
            _reconcile_transaction(transaction, report)
        offset += len(page)
        if len(page) < PAGE:
            break
    if offset > _cursor():
        _save_cursor(offset, now)
    if report.credited or report.refunds or report.problems:
        logger.info("stars reconcile: checked=%s credited=%s refunds=%s problems=%s", report.checked,
                    len(report.credited), len(report.refunds), len(report.problems))
    return report


def _reconcile_transaction(transaction, report: StarsReconcileReport) -> None:
    source, receiver = transaction.source, transaction.receiver
    if source is not None and getattr(source, "type", None) == "user" and getattr(source, "invoice_payload", None):
        if Payment.select().where(Payment.telegram_charge_id == transaction.id).exists():
            return
        outcome = apply_successful_payment(source.user.id, CURRENCY, transaction.amount, source.invoice_payload,
                                           transaction.id, "reconcile")
        if outcome.credited:
            logger.warning("stars payment %s of order %s found by reconciliation (its update was lost)",
                           transaction.id, outcome.order_id)
            report.credited.append(outcome.order_id)
        elif outcome.detail in ("needs_attention", "unmatched"):
            report.problems.append(("stars:%s" % transaction.id, outcome.problem))
    elif receiver is not None and getattr(receiver, "type", None) == "user" \
            and getattr(receiver, "invoice_payload", None):
        if Refund.select().where(Refund.id == refund_id(transaction.id)).exists():
            return
        try:
            refund = apply_refund(transaction.id, "reconcile")
        except payments.PaymentError as exc:
            report.problems.append(("stars_refund:%s" % transaction.id, "Stars refund %s (%s Stars to %s): %s" % (
                transaction.id, transaction.amount, receiver.user.id, exc)))
            return
        if refund is not None:
            logger.warning("stars refund %s found by reconciliation (its update was lost)", transaction.id)
            report.refunds.append(refund.id)


def _expire_orders(now: datetime.datetime) -> int:
    cutoff = now - datetime.timedelta(seconds=ORDER_EXPIRY)
    expired = 0
    for order_id in [p.id for p in Payment.select(Payment.id).where(
            (Payment.provider == PROVIDER) & (Payment.status == "pending") & (Payment.created_at <= cutoff))]:
        if models.move(Payment, order_id, "pending", "canceled", cancel_reason="expired", updated_at=now):
            logger.info("stars order canceled: order=%s reason=expired", order_id)
            expired += 1
    return expired
