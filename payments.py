"""YooKassa top-ups: create a payment, verify and apply notifications, reconcile, refunds.

Money flow (docs/SPEC.md §4, docs/REFERENCES.md §3):

1. ``create_topup`` writes our order (a ``Payment`` row, uuid) first, reserving a discount code on
   it, then calls ``yookassa.Payment.create`` with the order id as the idempotence key, so a retry
   (ours, after a timeout or a 5xx) can never create a second YooKassa payment.
2. A notification (``handle_notification``) is only a hint: it must come from YooKassa's networks,
   and we re-fetch the object through the API and trust only the fetched object (status, paid,
   amount, currency, metadata, test). There is no signature on YooKassa notifications.
3. Applying a succeeded payment is one money transaction: the conditional update of our order
   pending → succeeded, the ledger credit (idempotency key ``topup:<order id>``) and the promo
   consumption. Notifications, the "Проверить оплату" button and ``reconcile`` all go through the
   same ``_apply``, so any number of them, in any order and in any process, credit once.

The SDK keeps its settings in class attributes (process-global) and sets no HTTP timeout;
``configure_sdk`` sets both. Amounts are int kopecks inside and ``"90.00"`` strings at the API.
Money values in this module are kopecks unless a name says credits (1 credit = 1 ₽ = 100 kopecks).
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import ipaddress
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

import requests
import yookassa
from peewee import fn
from yookassa.client import ApiClient
from yookassa.domain.exceptions import ApiError
from yookassa.domain.notification import WebhookNotificationFactory

import billing
import config
import models
import promo
from models import Payment, Refund, User, utcnow

logger = logging.getLogger(__name__)

MAX_NOTIFICATION_BYTES = 64 * 1024      # larger bodies are refused with 413 (issue #4)
CREATE_ATTEMPTS = 3                     # Payment.create tries, all with the same idempotence key
CREATE_BACKOFF = (0.1, 0.4)             # seconds slept after failed attempt 1, 2
WEBHOOK_API_TIMEOUT = 5.0               # seconds: cap on each API call made inside a webhook request
REUSE_WINDOW = 15 * 60                  # seconds a pending order is re-used for the same tap
RECHECK_BACKOFF_MAX = 30 * 60           # seconds: the longest wait between re-checks of one pending order
MAX_JSON_DEPTH = 32                     # deeper notification bodies are refused with 400
ORDER_EXPIRY = 60 * 60                  # seconds after which a pending order YooKassa never confirmed ends
DESCRIPTION = "Пополнение баланса Media Lab: {credits} кредитов"
DESCRIPTION_MAX = 128                   # YooKassa API: description ≤ 128 characters (OAS Description)
PAYMENT_EVENTS = ("payment.succeeded", "payment.waiting_for_capture", "payment.canceled")
REFUND_EVENTS = ("refund.succeeded",)
EMAIL_RE = re.compile(r"[A-Za-z0-9._%+'-]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,63}", re.ASCII)
_DIGITS = re.compile(r"[0-9]+", re.ASCII)       # str.isdigit() would accept "９９" and "²"


# --- errors -----------------------------------------------------------------------------------

class PaymentError(Exception):
    """The payment could not be processed."""

    text_key = "payment_error"
    values: dict = {}  # for texts.t(text_key, lang, **values)

    def __str__(self):
        return self.args[0] if self.args else (self.__doc__ or "").strip()


class InvalidTopupAmount(PaymentError):
    """The top-up amount must be a whole number of credits within the allowed range."""

    def __init__(self, code: str, *, minimum: int, maximum: int, text: str = ""):
        super().__init__("invalid top-up amount %r: %s" % (str(text)[:20], code))
        self.code = code                                  # not_a_number | too_small | too_big
        self.text_key = "topup_" + code
        self.values = {"min": minimum, "max": maximum}    # for texts.t(exc.text_key, lang, **exc.values)


class PaymentsNotConfigured(PaymentError):
    """Payments are not configured (YOOKASSA_SHOP_ID / YOOKASSA_SECRET_KEY)."""

    text_key = "payments_not_configured"


class ProviderUnavailable(PaymentError):
    """YooKassa did not answer or answered with an error; the outcome is unknown, try again later."""

    text_key = "payment_provider_unavailable"


class PaymentRejected(PaymentError):
    """YooKassa rejected the payment request."""

    text_key = "payment_rejected"


class EmailRequired(PaymentError):
    """An e-mail address is needed for the receipt (54-FZ)."""

    text_key = "payment_email_required"


class InvalidEmail(PaymentError):
    """This is not a valid e-mail address."""

    text_key = "payment_email_invalid"


class NotAtProvider(ProviderUnavailable):
    """YooKassa does not know this object (404): a retry cannot fix it."""


class ProviderAuthFailed(ProviderUnavailable):
    """YooKassa refused our credentials (401/403): fix YOOKASSA_SHOP_ID / YOOKASSA_SECRET_KEY."""


class UnknownPayment(PaymentError):
    """No such payment."""

    text_key = "payment_unknown"


@dataclass(frozen=True)
class NotificationOutcome:
    """What the webhook answers: `http_status`, the order id newly credited by this call (or None),
    and a short machine-readable `detail` for logs and tests."""

    http_status: int
    credited_payment_id: uuid.UUID | None = None
    detail: str = ""
    refund_id: str | None = None            # a refund newly applied by this call (tell the user)
    canceled_payment_id: uuid.UUID | None = None   # an order newly canceled by this call (tell the user)


@dataclass(frozen=True)
class _Applied:
    credited: uuid.UUID | None
    detail: str


# --- the SDK: configuration, timeout, error classes -------------------------------------------

_default_timeout = 10.0
_local = threading.local()


def _current_timeout() -> float:
    return getattr(_local, "timeout", None) or _default_timeout


def _install_timeout_patch() -> None:
    """Give every SDK HTTP request a (connect, read) timeout.

    yookassa 3.13.0 calls ``session.request(...)`` without ``timeout=`` (its ``Configuration.timeout``
    is a retry backoff factor), so a stalled connection hangs forever: see
    docs/REFERENCES.md §3 and the unmerged fix yoomoney/yandex-checkout-sdk-python#62.
    This is the documented workaround from the notes: wrap ``ApiClient.get_session`` so the
    session's ``request`` gets ``timeout=``. A timeout then surfaces as ``AttributeError`` (§1.4).
    Installed once per process.
    """
    if getattr(ApiClient.get_session, "_medialab_timeout", False):
        return
    original = ApiClient.get_session

    @functools.wraps(original)
    def get_session(self):
        session = original(self)
        seconds = _current_timeout()
        session.request = functools.partial(session.request, timeout=(seconds, seconds))
        return session

    get_session._medialab_timeout = True
    ApiClient.get_session = get_session


@contextlib.contextmanager
def _api_timeout(seconds: float):
    """Use `seconds` as the SDK timeout for calls made by this thread inside the block."""
    previous = getattr(_local, "timeout", None)
    _local.timeout = seconds
    try:
        yield
    finally:
        _local.timeout = previous


def configure_sdk(cfg: config.Config | None = None) -> None:
    """Point the (process-global) SDK at `cfg`'s shop and API URL, with an HTTP timeout.

    Always passes ``api_url`` (every ``configure()`` without it resets the URL to production,
    notes §1.1) and never a logger (the SDK would log the Basic-auth secret, notes §1.5).
    Raises PaymentsNotConfigured when the shop id or secret key is missing.
    """
    global _default_timeout
    cfg = cfg or config.get()
    if not cfg.yookassa_configured:
        raise PaymentsNotConfigured("YOOKASSA_SHOP_ID / YOOKASSA_SECRET_KEY are not set")
    _default_timeout = float(cfg.yookassa_timeout)
    _install_timeout_patch()
    conf = yookassa.Configuration
    url = cfg.yookassa_api_url.rstrip("/")
    if (conf.account_id, conf.secret_key, conf.api_url, conf.auth_token) != (
            cfg.yookassa_shop_id, cfg.yookassa_secret_key, url, None):
        conf.configure(cfg.yookassa_shop_id, cfg.yookassa_secret_key, api_url=url)
    conf.logger = None


def _transient(exc: BaseException) -> bool:
    """True if an SDK error leaves the outcome unknown (retry with the same idempotence key).

    Per notes §1.4 / §4: 5xx, 429 and 202 answers, unknown statuses (plain ApiError), network
    errors and timeouts (``AttributeError`` from the SDK's error handler), ``requests`` errors and
    non-JSON error bodies (``requests.JSONDecodeError``, an HTML 502 from a proxy).
    """
    if isinstance(exc, ApiError):
        code = getattr(exc, "HTTP_CODE", 0)
        return code in (0, 202, 429) or code >= 500
    return isinstance(exc, (AttributeError, requests.RequestException, json.JSONDecodeError))


def _describe(exc: BaseException) -> str:
    """A log-safe one-line description of an SDK error (never headers or credentials)."""
    if isinstance(exc, ApiError):
        content = getattr(exc, "content", None) or {}
        if isinstance(content, dict):
            return "%s %s: %s" % (type(exc).__name__, content.get("code"), str(content.get("description"))[:200])
        return type(exc).__name__
    cause = exc.__context__ if isinstance(exc, AttributeError) and exc.__context__ else exc
    return "%s: %s" % (type(cause).__name__, str(cause)[:200])


# --- amounts ----------------------------------------------------------------------------------

def kopecks_to_value(kopecks: int) -> str:
    """Return the API amount string for `kopecks`: 9000 → ``"90.00"`` (never via float)."""
    return "%d.%02d" % divmod(int(kopecks), 100)


def value_to_kopecks(value) -> int:
    """Return whole kopecks for an API amount (``"90.00"``, ``Decimal('90.00')``, ``"1"``).

    Raises ValueError for a value that is not a whole number of kopecks.
    """
    try:
        kopecks = Decimal(str(value)) * 100
    except InvalidOperation:
        raise ValueError("not an amount: %r" % (value,)) from None
    if kopecks != kopecks.to_integral_value():
        raise ValueError("amount %r is not a whole number of kopecks" % (value,))
    return int(kopecks)


def parse_credits(text: str, cfg: config.Config | None = None) -> int:
    """Return the whole number of credits the user typed for a custom top-up.

    Accepts ASCII digits only, with surrounding spaces: ``"250"`` → 250. Rejects ``abc``, ``10.5``,
    ``1e9``, full-width ``９９``, emoji and empty text (code ``not_a_number``), ``0`` / ``-5`` and
    anything below MIN_TOPUP (``too_small``), anything above MAX_TOPUP (``too_big``): raises
    InvalidTopupAmount with that ``.code``.
    """
    cfg = cfg or config.get()
    limits = {"minimum": cfg.min_topup, "maximum": cfg.max_topup, "text": text if isinstance(text, str) else ""}
    raw = text.strip() if isinstance(text, str) else ""
    negative = raw.startswith("-") and _DIGITS.fullmatch(raw[1:]) is not None
    if negative:
        raise InvalidTopupAmount("too_small", **limits)
    if not _DIGITS.fullmatch(raw):
        raise InvalidTopupAmount("not_a_number", **limits)
    if len(raw.lstrip("0")) > 12:
        raise InvalidTopupAmount("too_big", **limits)
    return check_credits(int(raw), cfg)


def check_credits(credits: int, cfg: config.Config | None = None) -> int:
    """Return `credits` if it is an int within MIN_TOPUP..MAX_TOPUP; else raise InvalidTopupAmount."""
    cfg = cfg or config.get()
    limits = {"minimum": cfg.min_topup, "maximum": cfg.max_topup, "text": str(credits)}
    if isinstance(credits, bool) or not isinstance(credits, int):
        raise InvalidTopupAmount("not_a_number", **limits)
    if credits < cfg.min_topup:
        raise InvalidTopupAmount("too_small", **limits)
    if credits > cfg.max_topup:
        raise InvalidTopupAmount("too_big", **limits)
    return credits


# --- creating a top-up ------------------------------------------------------------------------

def set_email(user_id: int, email: str) -> User:
    """Remember the user's e-mail for 54-FZ receipts (asked once); return the User.

    The address is trimmed, its domain lower-cased, at most 254 characters. Raises InvalidEmail,
    billing.UnknownUser.
    """
    value = email.strip() if isinstance(email, str) else ""
    if len(value) > 254 or not EMAIL_RE.fullmatch(value):
        raise InvalidEmail("invalid e-mail address")
    local, _, domain = value.rpartition("@")
    value = local + "@" + domain.lower()
    billing.get_user(user_id)
    User.update(email=value).where(User.id == user_id).execute()
    logger.info("receipt e-mail set: user=%s", user_id)
    return billing.get_user(user_id)


def get_payment(payment_id, user_id: int | None = None) -> Payment:
    """Return our order `payment_id` (uuid or its text); with `user_id`, only if it is that user's.

    Raises UnknownPayment.
    """
    try:
        key = payment_id if isinstance(payment_id, uuid.UUID) else uuid.UUID(str(payment_id))
    except ValueError:
        raise UnknownPayment("not a payment id: %r" % (str(payment_id)[:40],)) from None
    order = Payment.get_or_none(Payment.id == key)
    if order is None or (user_id is not None and order.user_id != user_id):
        raise UnknownPayment("no payment %s for user %s" % (key, user_id))
    return order


def _reusable_order(user_id: int, credits: int, code: str | None, now: datetime.datetime) -> Payment | None:
    """A pending order of this user for the same top-up made in the last REUSE_WINDOW seconds.

    With `code`, only an order holding that code; without one, any such order (a discounted one
    first): a repeated tap after the discount was applied re-uses the discounted order instead of
    silently making a full-price one."""
    query = (Payment.select().where((Payment.user == user_id) & (Payment.credits == credits)
                                    & (Payment.status == "pending") & (Payment.provider == "yookassa")
                                    & (Payment.created_at >= now - datetime.timedelta(seconds=REUSE_WINDOW)))
             .order_by(Payment.created_at.desc()))
    orders = list(query)
    if code is None:
        discounted = [o for o in orders if o.promo_id is not None]
        return (discounted or orders or [None])[0]
    for order in orders:
        if order.promo_id and order.promo.code == code:
            return order
    return None


@billing.money_transaction
def _find_or_create_order(user_id: int, credits: int, code: str | None, now: datetime.datetime) -> Payment:
    """Re-use this tap's pending order, or validate the code and create the order with the code
    reserved on it — in one transaction that first locks the user's row, so two racing taps make
    one order on SQLite (the write lock) and PostgreSQL (``FOR UPDATE``) alike. Raises
    promo.PromoError subclasses before anything is written."""
    if not models.is_sqlite():
        User.select(User.id).where(User.id == user_id).for_update().get()
    order = _reusable_order(user_id, credits, code, now)
    if order is not None:
        logger.info("top-up order re-used: order=%s user=%s", order.id, user_id)
        return order
    discount = promo.check_discount(code, user_id, now) if code else None
    kopecks = promo.price_kopecks(credits, discount)
    order = Payment.create(id=uuid.uuid4(), user=user_id, credits=credits, amount_kopecks=kopecks, currency="RUB",
                           promo=discount.id if discount else None,
                           discount_percent=discount.percent if discount else 0,
                           status="pending", created_at=now, updated_at=now)
    if discount is not None:
        promo.reserve_for_payment(discount, user_id, order.id, now)
    logger.info("top-up order created: order=%s user=%s credits=%s amount=%s promo=%s",
                order.id, user_id, credits, kopecks_to_value(kopecks), discount.code if discount else None)
    return order


def _payment_params(order: Payment, user: User, cfg: config.Config) -> dict:
    """The ``Payment.create`` body for `order` (rebuilt per call: the SDK mutates ``metadata``).

    Deterministic for one order, so a retry with the same idempotence key sends the same body.
    """
    value = kopecks_to_value(order.amount_kopecks)
    description = DESCRIPTION.format(credits=order.credits)[:DESCRIPTION_MAX]
    return_url = cfg.yookassa_return_url
    if not return_url:
        logger.warning("YOOKASSA_RETURN_URL is empty: using https://t.me/ as the return URL")
        return_url = "https://t.me/"
    params = {
        "amount": {"value": value, "currency": order.currency},
        "capture": True,                       # else the payment waits for capture and expires (notes §3)
        "confirmation": {"type": "redirect", "return_url": return_url},
        "description": description,
        "metadata": {"order_id": str(order.id), "user_id": str(user.telegram_id), "credits": str(order.credits)},
    }
    if cfg.yookassa_receipts:
        params["receipt"] = _receipt(user.email, description, value, order.currency, cfg)
    return params


def _receipt(email: str | None, description: str, value: str, currency: str, cfg: config.Config) -> dict:
    """A 54-FZ receipt (docs/REFERENCES.md §3): the customer's e-mail and one item of
    `value` ("90.00"); vat_code / payment_mode / payment_subject are the shop's accounting choice
    (YOOKASSA_VAT_CODE, YOOKASSA_PAYMENT_MODE, YOOKASSA_PAYMENT_SUBJECT)."""
    return {"customer": {"email": email},
            "items": [{"description": description, "quantity": "1.00", "amount": {"value": value, "currency": currency},
                       "vat_code": cfg.yookassa_vat_code, "payment_mode": cfg.yookassa_payment_mode,
                       "payment_subject": cfg.yookassa_payment_subject}]}


def create_topup(user_id: int, credits: int, *, promo_code: str | None = None,
                 cfg: config.Config | None = None) -> Payment:
    """Create (or re-use) a top-up of `credits` credits for `user_id` (our User.id); return the order.

    The returned Payment has ``amount_kopecks`` (after the discount), ``yookassa_payment_id`` and
    ``confirmation_url`` (the pay button). Everything is validated before anything is written.
    A pending order for the same user, credits and code from the last REUSE_WINDOW seconds is
    re-used (a second tap never makes a second order): one with a payment link is re-checked
    through the API (if it has ended there, it is applied and a fresh order is made); one without
    a YooKassa payment yet is sent again with the same idempotence key, so YooKassa replays the
    first answer.

    Raises InvalidTopupAmount, PaymentsNotConfigured, EmailRequired (YOOKASSA_RECEIPTS=1 and no
    e-mail), promo.PromoError subclasses, billing.UnknownUser / UserBlocked, PaymentRejected (a 4xx
    from YooKassa: the order is canceled and its code released) and ProviderUnavailable (no
    answer after CREATE_ATTEMPTS tries: the order stays pending for a re-tap or reconciliation).
    """
    cfg = cfg or config.get()
    if not cfg.yookassa_configured:
        raise PaymentsNotConfigured("YOOKASSA_SHOP_ID / YOOKASSA_SECRET_KEY are not set")
    credits = check_credits(credits, cfg)
    user = billing.get_user(user_id)
    if user.is_blocked:
        raise billing.UserBlocked()
    if cfg.yookassa_receipts and not user.email:
        raise EmailRequired("user %s has no e-mail for the receipt" % user.id)
    code = promo.normalize(promo_code) if promo_code else None
    order = _find_or_create_order(user.id, credits, code, utcnow())
    if order.yookassa_payment_id and order.confirmation_url:
        if _still_payable(order, cfg):
            return order
        # The re-used order has ended at YooKassa (paid or canceled, notification not here yet):
        # it is applied now, and this tap gets a fresh order.
        order = _find_or_create_order(user.id, credits, code, utcnow())
        if order.yookassa_payment_id and order.confirmation_url:
            return order
    return _send_to_provider(order, user, cfg)


def _still_payable(order: Payment, cfg: config.Config) -> bool:
    """Re-fetch a re-used order and apply what the API says; True while it is still pending there
    (or when the API cannot tell us now: the user keeps the link they already have)."""
    configure_sdk(cfg)
    try:
        fetched = _fetch_payment(order.yookassa_payment_id)
        _apply(order, fetched, cfg, "re-tap")
    except ProviderUnavailable as exc:
        logger.warning("re-tap: could not re-check order %s (%s); keeping its link", order.id, exc)
        return True
    return Payment.select(Payment.status).where(Payment.id == order.id).scalar() == "pending"


def _send_to_provider(order: Payment, user: User, cfg: config.Config) -> Payment:
    """``Payment.create`` for `order` with its id as the idempotence key, retried on transient errors."""
    configure_sdk(cfg)
    key = str(order.id)
    response = None
    for attempt in range(1, CREATE_ATTEMPTS + 1):
        try:
            response = yookassa.Payment.create(_payment_params(order, user, cfg), idempotency_key=key)
            break
        except Exception as exc:            # classified below, unknown errors re-raised
            if _transient(exc):
                logger.warning("Payment.create failed (attempt %s/%s): order=%s %s",
                               attempt, CREATE_ATTEMPTS, order.id, _describe(exc))
                if attempt < CREATE_ATTEMPTS:
                    time.sleep(CREATE_BACKOFF[min(attempt, len(CREATE_BACKOFF)) - 1])
                continue
            if isinstance(exc, (ApiError, ValueError, TypeError)):
                # 4xx from the API, or the SDK's own validation: this request will never succeed.
                logger.error("Payment.create rejected: order=%s %s", order.id, _describe(exc))
                _mark_canceled(order.id, "rejected")
                raise PaymentRejected("YooKassa rejected order %s: %s" % (order.id, _describe(exc))) from exc
            raise
    if response is None:
        raise ProviderUnavailable("YooKassa did not create order %s after %s attempts" % (order.id, CREATE_ATTEMPTS))
    if response.status == "canceled":
        reason = getattr(getattr(response, "cancellation_details", None), "reason", None) or "canceled"
        logger.warning("Payment.create answered canceled: order=%s yookassa=%s reason=%s",
                       order.id, response.id, reason)
        _mark_canceled(order.id, str(reason)[:64])
        raise PaymentRejected("YooKassa canceled order %s at once (%s)" % (order.id, reason))
    confirmation = getattr(response, "confirmation", None)
    url = getattr(confirmation, "confirmation_url", None)
    with billing.writer_turn():  # a write: queue with the others, not in SQLite's sleeping busy handler
        changed = (Payment.update(yookassa_payment_id=response.id, confirmation_url=url, test=bool(response.test),
                                  updated_at=utcnow())
                   .where((Payment.id == order.id) & (Payment.yookassa_payment_id.is_null()
                                                      | (Payment.yookassa_payment_id == response.id))).execute())
    if not changed:
        logger.error("order %s already has another YooKassa payment than %s", order.id, response.id)
    logger.info("top-up sent to YooKassa: order=%s yookassa=%s amount=%s status=%s",
                order.id, response.id, kopecks_to_value(order.amount_kopecks), response.status)
    return Payment.get_by_id(order.id)


# --- applying what the API says ---------------------------------------------------------------

def _provider_error(exc: BaseException, what: str) -> ProviderUnavailable:
    """The domain error for a failed API call: NotAtProvider (404), ProviderAuthFailed (401/403),
    else ProviderUnavailable. Unknown exception types are not ours to classify: re-raised."""
    code = getattr(exc, "HTTP_CODE", None) if isinstance(exc, ApiError) else None
    if code == 404:
        return NotAtProvider("%s: not found at YooKassa (%s)" % (what, _describe(exc)))
    if code in (401, 403):
        return ProviderAuthFailed("%s: YooKassa refused our credentials (%s)" % (what, _describe(exc)))
    if _transient(exc) or isinstance(exc, ApiError):
        return ProviderUnavailable("%s failed: %s" % (what, _describe(exc)))
    raise exc


def _api(call, what: str):
    """Run one read-only SDK call; its errors become our domain errors (`_provider_error`):
    NotAtProvider, ProviderAuthFailed or ProviderUnavailable (we could not verify)."""
    try:
        return call()
    except Exception as exc:
        raise _provider_error(exc, what) from exc


def _fetch_payment(yookassa_id: str):
    """``Payment.find_one`` → PaymentResponse. Raises like `_api`."""
    return _api(lambda: yookassa.Payment.find_one(yookassa_id), "Payment.find_one(%s)" % yookassa_id)


def _fetch_refund(refund_id: str):
    """``Refund.find_one`` → RefundResponse. Raises like `_api`."""
    return _api(lambda: yookassa.Refund.find_one(refund_id), "Refund.find_one(%s)" % refund_id)


def _mismatches(order: Payment, fetched, cfg: config.Config) -> list[str]:
    """Why the fetched API object is not the payment for `order` (empty: it is)."""
    problems = []
    if fetched.id != order.yookassa_payment_id:
        problems.append("id %s != %s" % (fetched.id, order.yookassa_payment_id))
    amount = getattr(fetched, "amount", None)
    try:
        kopecks = value_to_kopecks(amount.value)
    except (AttributeError, ValueError):
        kopecks = None
    if kopecks != order.amount_kopecks:
        problems.append("amount %s != %s" % (getattr(amount, "value", None), kopecks_to_value(order.amount_kopecks)))
    if getattr(amount, "currency", None) != order.currency:
        problems.append("currency %s != %s" % (getattr(amount, "currency", None), order.currency))
    metadata = getattr(fetched, "metadata", None) or {}
    if not isinstance(metadata, dict):
        metadata = {}
    if metadata.get("order_id") != str(order.id):
        problems.append("metadata.order_id %r" % (metadata.get("order_id"),))
    telegram_id = User.select(User.telegram_id).where(User.id == order.user_id).scalar()
    if metadata.get("user_id") != str(telegram_id):
        problems.append("metadata.user_id %r != %s" % (metadata.get("user_id"), telegram_id))
    if getattr(fetched, "test", False) and not cfg.yookassa_allow_test:
        problems.append("test payment while YOOKASSA_ALLOW_TEST=0")
    return problems


def _capture(order: Payment, fetched, cfg: config.Config):
    """Capture a held payment with our key ``capture:<order id>``; return the API's answer.

    A rejected capture (someone captured or canceled it meanwhile) is answered by a re-fetch.
    Raises ProviderUnavailable when the outcome is unknown.
    """
    key = "capture:%s" % order.id
    try:
        captured = yookassa.Payment.capture(fetched.id, None, idempotency_key=key)
    except Exception as exc:
        if _transient(exc):
            raise ProviderUnavailable("capture of %s failed: %s" % (fetched.id, _describe(exc))) from exc
        if not isinstance(exc, ApiError):
            raise
        logger.warning("capture rejected: order=%s yookassa=%s %s — re-fetching", order.id, fetched.id, _describe(exc))
        captured = _fetch_payment(fetched.id)
        if captured.status == "waiting_for_capture":
            raise ProviderUnavailable("capture of %s rejected and the payment is still held" % fetched.id) from exc
    logger.info("payment captured: order=%s yookassa=%s status=%s", order.id, fetched.id, captured.status)
    return captured


def _apply(order: Payment, fetched, cfg: config.Config, source: str) -> _Applied:
    """Bring our order to what the fetched API object says (credit once, cancel, capture, or nothing).

    A fetched object that does not match our order changes nothing and is logged as a security
    event. Raises ProviderUnavailable when a capture's outcome is unknown.
    """
    problems = _mismatches(order, fetched, cfg)
    if not problems and fetched.status == "waiting_for_capture":
        if not fetched.paid:
            problems.append("waiting_for_capture but not paid")
        else:
            fetched = _capture(order, fetched, cfg)
            problems = _mismatches(order, fetched, cfg)
    if not problems and fetched.status == "succeeded" and not fetched.paid:
        problems.append("succeeded but not paid")
    if problems:
        logger.warning("security: %s: YooKassa payment %s does not match order %s: %s — nothing changed",
                       source, fetched.id, order.id, "; ".join(problems))
        return _Applied(None, "mismatch")
    if fetched.status == "succeeded":
        if _mark_succeeded(order.id, bool(fetched.test), source):
            return _Applied(order.id, "credited")
        return _Applied(None, "already_applied")
    if fetched.status == "canceled":
        details = getattr(fetched, "cancellation_details", None)
        reason = getattr(details, "reason", None) or "canceled"
        if _mark_canceled(order.id, str(reason)[:64]):
            return _Applied(None, "canceled")
        return _Applied(None, "already_applied")
    return _Applied(None, "status_" + str(fetched.status))


def _mark_succeeded(order_id: uuid.UUID, test: bool, source: str) -> bool:
    """Credit the order once (see _credit_order); True only for the call that made the change.

    A duplicate that waited for its turn finds the order succeeded with a plain read and never
    opens a write transaction.
    """
    with billing.writer_turn():  # the pre-read and the credit in one turn of this process
        if Payment.select(Payment.status).where(Payment.id == order_id).scalar() == "succeeded":
            return False
        return _credit_order(order_id, test, source)


@billing.money_transaction
def _credit_order(order_id: uuid.UUID, test: bool, source: str) -> bool:
    """pending → succeeded, the ledger credit and the promo consumption, all in one transaction.

    Returns True only for the call that made the change (the conditional update decides).
    """
    now = utcnow()
    order = Payment.get_by_id(order_id)
    changed = models.move(Payment, order_id, ("pending", "canceled", "needs_attention"), "succeeded",
                          succeeded_at=now, updated_at=now, test=test)
    if not changed:
        return False
    if order.status != "pending":
        logger.warning("order %s was %s here but YooKassa says succeeded: crediting (the user paid)",
                       order_id, order.status)
    billing.credit(order.user_id, order.credits, kind="topup", reference="payment:%s" % order_id,
                   idempotency_key="topup:%s" % order_id)
    promo.consume_for_payment(order_id, now)
    logger.info("payment succeeded: order=%s yookassa=%s user=%s credits=%s amount=%s via=%s",
                order_id, order.yookassa_payment_id, order.user_id, order.credits,
                kopecks_to_value(order.amount_kopecks), source)
    return True


@billing.money_transaction
def _mark_canceled(order_id: uuid.UUID, reason: str, from_states=("pending",)) -> bool:
    """pending (or `from_states`) → canceled and the promo reservation released; True if this call
    changed it."""
    now = utcnow()
    changed = models.move(Payment, order_id, from_states, "canceled", cancel_reason=reason, updated_at=now)
    if changed:
        promo.release_for_payment(order_id, now)
        logger.info("payment canceled: order=%s reason=%s", order_id, reason)
    else:
        status = Payment.select(Payment.status).where(Payment.id == order_id).scalar()
        logger.info("cancel ignored: order=%s is %s", order_id, status)
    return bool(changed)


def refund_credits(order: Payment, refunded_kopecks: int) -> int:
    """Credits to take back in all once `refunded_kopecks` of `order` are refunded in total.

    ``order.credits × refunded // paid`` (floor) on the *cumulative* refunded amount, so partial
    refunds that add up to the whole payment take back exactly the order's credits (3 × 33.33 ₽
    of 100 ₽ → 100 credits, not 3 × 33), and many small refunds are not each rounded to zero."""
    refunded = min(max(refunded_kopecks, 0), order.amount_kopecks)
    return order.credits * refunded // order.amount_kopecks


@billing.money_transaction
def _apply_refund(order_id: uuid.UUID, refund_id: str, kopecks: int) -> Refund | None:
    """Record YooKassa refund `refund_id` (`kopecks` refunded) once and take back its share of the
    credits: the cumulative rule of `refund_credits`, minus what earlier refunds of the order
    already asked for. Capped by the available balance with the shortfall recorded
    (billing.take_back). Returns the new Refund row, or None when it was already applied.
    """
    if Refund.select().where(Refund.id == refund_id).exists():
        return None
    now = utcnow()
    order = Payment.get_by_id(order_id)
    remaining = order.amount_kopecks - order.refunded_kopecks
    if kopecks > remaining:
        logger.warning("security: refund %s of %s exceeds what is left of order %s (%s)",
                       refund_id, kopecks_to_value(kopecks), order_id, kopecks_to_value(remaining))
        kopecks = max(remaining, 0)
    credits = (refund_credits(order, order.refunded_kopecks + kopecks)
               - refund_credits(order, order.refunded_kopecks))
    debited = shortfall = 0
    if credits > 0:
        entry = billing.take_back(order.user_id, credits, reference="refund:%s" % refund_id,
                                  idempotency_key="refund:%s" % refund_id)
        shortfall = entry.shortfall
        debited = credits - shortfall
    Refund.insert(id=refund_id, payment=order_id, amount_kopecks=kopecks, credits_requested=credits,
                  credits_debited=debited, shortfall=shortfall, created_at=now).execute()
    Payment.update(refunded_kopecks=Payment.refunded_kopecks + kopecks, updated_at=now).where(
        Payment.id == order_id).execute()
    logger.info("refund applied: refund=%s order=%s user=%s amount=%s credits=%s debited=%s shortfall=%s",
                refund_id, order_id, order.user_id, kopecks_to_value(kopecks), credits, debited, shortfall)
    _take_back_referral_bonus(order.user_id, refund_id)
    return Refund.get_by_id(refund_id)


def _take_back_referral_bonus(user_id: int, refund_id: str) -> int:
    """When a referred user's top-ups are refunded, take back the referrer's bonus by the same
    cumulative share: ``bonus × credits refunded // credits bought`` over the user's succeeded
    orders, minus what earlier refunds already took back (billing.take_back: capped by the
    referrer's balance, the shortfall recorded). Runs inside `_apply_refund`'s transaction; returns
    the credits asked back (0 for a user who brought no bonus)."""
    key = "referral:%s" % user_id                       # the bonus's ledger key (worker.referral_bonus)
    bonus = models.LedgerEntry.get_or_none(models.LedgerEntry.idempotency_key == key)
    if bonus is None:
        return 0
    orders = Payment.select(Payment.id).where((Payment.user == user_id) & (Payment.status == "succeeded"))
    bought = Payment.select(fn.SUM(Payment.credits)).where(Payment.id.in_(orders)).scalar() or 0
    refunded = Refund.select(fn.SUM(Refund.credits_requested)).where(Refund.payment.in_(orders)).scalar() or 0
    taken = (models.LedgerEntry.select(fn.SUM(models.LedgerEntry.amount))
             .where((models.LedgerEntry.user == bonus.user_id) & (models.LedgerEntry.kind == "payment_refund")
                    & (models.LedgerEntry.reference == key)).scalar() or 0)
    due = (bonus.amount * min(refunded, bought) // bought if bought else 0) - taken
    if due <= 0:
        return 0
    entry = billing.take_back(bonus.user_id, due, reference=key, idempotency_key="%s:refund:%s" % (key, refund_id))
    logger.info("referral bonus taken back: referrer=%s user=%s refund=%s credits=%s shortfall=%s",
                bonus.user_id, user_id, refund_id, due, entry.shortfall)
    return due


def record_refund(order_id: uuid.UUID, refund_id: str, amount: int) -> Refund | None:
    """Record refund `refund_id` of `amount` (the order's minor unit: kopecks, or Stars for an XTR
    order) of order `order_id` once and take back its share of the credits, as for a YooKassa
    refund (the cumulative rule, capped, the shortfall recorded). Returns the new Refund, or None
    when it was recorded already. Used for Stars refunds (stars.py)."""
    return _apply_refund(order_id, refund_id, amount)


def claim_refund_notification(refund_id: str) -> bool:
    """Return True exactly once for an applied refund: the caller then tells the user."""
    return bool(Refund.update(notified_at=utcnow())
                .where((Refund.id == refund_id) & Refund.notified_at.is_null()).execute())


def unnotified_refunds(older_than: int = 60, now: datetime.datetime | None = None, limit: int = 100) -> list[str]:
    """Ids of refunds applied more than `older_than` seconds ago whose user was never told."""
    now = now or utcnow()
    return [r.id for r in Refund.select(Refund.id).where(
        Refund.notified_at.is_null() & (Refund.created_at <= now - datetime.timedelta(seconds=older_than)))
        .order_by(Refund.created_at).limit(limit)]


# --- notifications ----------------------------------------------------------------------------

def normalize_ip(text: str):
    """Return an ``ipaddress`` address for `text`, IPv4-mapped IPv6 (``::ffff:1.2.3.4``) as IPv4;
    None when `text` is not one address (empty, a list, garbage)."""
    try:
        address = ipaddress.ip_address((text or "").strip())
    except (ValueError, TypeError, AttributeError):
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_trusted_source(client_ip: str, networks) -> bool:
    """True if `client_ip` (already resolved through the trusted proxies) is in one of `networks`."""
    address = normalize_ip(client_ip)
    if address is None:
        return False
    return any(address.version == net.version and address in net for net in networks)


def handle_notification(raw_body: bytes, client_ip: str, cfg: config.Config | None = None) -> NotificationOutcome:
    """Verify and apply one YooKassa HTTP notification; return the HTTP answer for YooKassa.

    `raw_body` is the request body as received; `client_ip` the real client address (web resolves
    it through TRUSTED_PROXY_COUNT proxies with Werkzeug's ProxyFix). Answers:

    * 403 — the source is not in YOOKASSA_TRUSTED_NETWORKS (logged as a security event);
    * 413 — body over 64 KB; 400 — not JSON, not an object, not a notification, fields missing;
    * 200 — applied and committed, or deliberately ignored: an event we do not handle, an object
      that is not ours (security log), a fetched object that does not match our order (security
      log; a redelivery cannot fix it, so no retry storm), a duplicate;
      The API answering 404 for the object (a retry cannot fix it) is such a case too: 200 and a
      ``security:`` log line;
    * 503 — we could not verify (the API re-fetch or capture failed or timed out, or payments are
      not configured): YooKassa delivers again later (it retries non-200 answers for 24 h). When
      the API refused our credentials (401/403) the outcome's detail is ``auth_failed`` and the
      caller alerts the admins: fixed keys plus the redelivery will apply it.

    Each API call made here waits at most min(YOOKASSA_TIMEOUT, WEBHOOK_API_TIMEOUT) seconds.
    """
    cfg = cfg or config.get()
    if not is_trusted_source(client_ip, cfg.yookassa_trusted_networks):
        logger.warning("security: notification from untrusted source %r refused", str(client_ip)[:64])
        return NotificationOutcome(403, None, "untrusted_source")
    parsed = _parse_notification(raw_body or b"")
    if isinstance(parsed, NotificationOutcome):
        return parsed
    event, notification = parsed
    object_id = notification.object.id
    if not cfg.yookassa_configured:
        logger.error("notification %s for %s cannot be verified: payments are not configured", event, object_id)
        return NotificationOutcome(503, None, "not_configured")
    configure_sdk(cfg)
    try:
        with _api_timeout(min(cfg.yookassa_timeout, WEBHOOK_API_TIMEOUT)):
            if event in REFUND_EVENTS:
                return _refund_notification(notification, cfg)
            return _payment_notification(event, object_id, cfg)
    except NotAtProvider as exc:
        logger.warning("security: notification %s for %s: %s — ignored (a retry cannot fix it)", event, object_id, exc)
        return NotificationOutcome(200, None, "not_at_provider")
    except ProviderAuthFailed as exc:
        logger.error("notification %s for %s not verified: %s — asking YooKassa to retry", event, object_id, exc)
        return NotificationOutcome(503, None, "auth_failed")
    except ProviderUnavailable as exc:
        logger.warning("notification %s for %s not verified, asking YooKassa to retry: %s", event, object_id, exc)
        return NotificationOutcome(503, None, "provider_unavailable")
    except billing.StorageFull as exc:
        logger.error("notification %s for %s not applied, asking YooKassa to retry: %s", event, object_id, exc)
        return NotificationOutcome(503, None, "storage_full")


def _parse_notification(raw_body: bytes):
    """(event, SDK notification object) for a well-formed body of an event we handle, else the
    NotificationOutcome to answer: 413 too large, 400 malformed, 200 an event we ignore."""
    if len(raw_body) > MAX_NOTIFICATION_BYTES:
        logger.warning("notification refused: body of %s bytes", len(raw_body))
        return NotificationOutcome(413, None, "too_large")
    try:
        data = json.loads(raw_body.decode("utf-8") if isinstance(raw_body, (bytes, bytearray)) else raw_body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        logger.warning("notification refused: body is not JSON")
        return NotificationOutcome(400, None, "not_json")
    if not isinstance(data, dict):
        return NotificationOutcome(400, None, "not_an_object")
    if _depth(data) > MAX_JSON_DEPTH:
        logger.warning("notification refused: JSON nested deeper than %s", MAX_JSON_DEPTH)
        return NotificationOutcome(400, None, "too_deep")
    event, obj = data.get("event"), data.get("object")
    if (data.get("type") != "notification" or not isinstance(event, str) or not isinstance(obj, dict)
            or not isinstance(obj.get("id"), str) or not obj["id"]):
        logger.warning("notification refused: fields missing (type/event/object.id)")
        return NotificationOutcome(400, None, "missing_fields")
    if event not in PAYMENT_EVENTS + REFUND_EVENTS:
        logger.info("notification ignored: event=%s object=%s", event[:64], obj["id"][:64])
        return NotificationOutcome(200, None, "ignored_event")
    try:
        # Every payment.* event parses as the base WebhookNotification: branch on `event`.
        notification = WebhookNotificationFactory().create(data)
        object_id = notification.object.id
    except Exception as exc:                # noqa: BLE001 - any parse failure is a bad body
        logger.warning("notification refused: unparseable %s (%s)", event, type(exc).__name__)
        return NotificationOutcome(400, None, "unparseable")
    if not isinstance(object_id, str) or not object_id:
        return NotificationOutcome(400, None, "missing_fields")
    return event, notification


def _depth(value, limit: int = MAX_JSON_DEPTH + 1) -> int:
    """Nesting depth of parsed JSON `value`, counted up to `limit` (iterative: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if depth >= limit:
            return depth
        stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _payment_notification(event: str, yookassa_id: str, cfg: config.Config) -> NotificationOutcome:
    order = Payment.get_or_none(Payment.yookassa_payment_id == yookassa_id)
    if order is None:
        logger.warning("security: notification %s for unknown payment %s ignored", event, yookassa_id[:64])
        return NotificationOutcome(200, None, "unknown_payment")
    if order.status == "succeeded":
        # Final for payment events (refunds come as refund.* events): a duplicate or a late
        # "canceled" changes nothing, so spare the API a re-fetch during a duplicate storm.
        return NotificationOutcome(200, None, "already_applied")
    fetched = _fetch_payment(yookassa_id)
    result = _apply(order, fetched, cfg, "notification " + event)
    return NotificationOutcome(200, result.credited, result.detail,
                               canceled_payment_id=order.id if result.detail == "canceled" else None)


def _refund_notification(notification, cfg: config.Config) -> NotificationOutcome:
    refund_id = notification.object.id
    claimed_payment = getattr(notification.object, "payment_id", None)
    order = Payment.get_or_none(Payment.yookassa_payment_id == claimed_payment) if claimed_payment else None
    if order is None:
        logger.warning("security: refund notification %s for unknown payment %s ignored",
                       refund_id[:64], str(claimed_payment)[:64])
        return NotificationOutcome(200, None, "unknown_payment")
    if Refund.select().where(Refund.id == refund_id).exists():
        return NotificationOutcome(200, None, "already_applied")
    fetched = _fetch_refund(refund_id)
    if fetched.payment_id != order.yookassa_payment_id:
        logger.warning("security: refund %s belongs to payment %s, not %s — nothing changed",
                       refund_id, fetched.payment_id, order.yookassa_payment_id)
        return NotificationOutcome(200, None, "mismatch")
    if fetched.status != "succeeded":
        logger.info("refund %s is %s: nothing to do yet", refund_id, fetched.status)
        return NotificationOutcome(200, None, "refund_" + str(fetched.status))
    if order.status != "succeeded":
        # The refund proves the payment went through: converge on the API first.
        _apply(order, _fetch_payment(order.yookassa_payment_id), cfg, "refund " + refund_id)
        order = Payment.get_by_id(order.id)
        if order.status != "succeeded":
            logger.warning("security: refund %s for order %s which is %s — nothing changed",
                           refund_id, order.id, order.status)
            return NotificationOutcome(200, None, "mismatch")
    try:
        kopecks = value_to_kopecks(fetched.amount.value)
    except (AttributeError, ValueError):
        kopecks = None
    if kopecks is None or kopecks <= 0 or fetched.amount.currency != order.currency:
        logger.warning("security: refund %s has amount %r — nothing changed", refund_id, getattr(fetched, "amount", None))
        return NotificationOutcome(200, None, "mismatch")
    applied = _apply_refund(order.id, refund_id, kopecks)
    if applied is None:
        return NotificationOutcome(200, None, "already_applied")
    return NotificationOutcome(200, None, "refunded", refund_id=refund_id)


# --- refunds made by an admin -------------------------------------------------------------------

class NotSettleable(PaymentError):
    """Only an order that needs attention can be settled by hand."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        # An order in another state, or (status None) one that never reached a payment provider.
        self.text_key = "admin_settle_not_needed" if status else "admin_settle_no_provider"
        self.values = {"status": status or ""}


SETTLE_ACTIONS = ("credit", "cancel")


def settle(reference: str, action: str, *, admin: int) -> Payment:
    """Settle by hand an order stuck in ``needs_attention`` (its payment could not be verified or
    did not match; the admins were alerted): ``credit`` — the admin checked that the money arrived
    (the YooKassa cabinet, the Stars transactions): the order's credits, once, by the usual credit
    path (`_credit_order`); ``cancel`` — no money arrived: canceled, its promo code released. A
    payment that succeeds later still credits (canceled → succeeded). Returns the order as it is now.

    :param reference: our order id, the YooKassa payment id or the Stars charge id.
    :param admin: the admin's Telegram id (logged, and the credit's source).
    :raises UnknownPayment: no such order.
    :raises NotSettleable: the order is not in needs_attention, or (credit) it never reached a
        payment provider (nothing to have been paid: cancel it).
    :raises ValueError: an `action` not in SETTLE_ACTIONS.
    """
    if action not in SETTLE_ACTIONS:
        raise ValueError("action must be one of %s" % ", ".join(SETTLE_ACTIONS))
    order = find_order(reference)
    if order is None:
        raise UnknownPayment("no order for %r" % str(reference)[:64])
    if order.status != "needs_attention":
        raise NotSettleable("order %s is %s" % (order.id, order.status), order.status)
    if action == "credit" and not (order.yookassa_payment_id or order.telegram_charge_id):
        raise NotSettleable("order %s never reached a payment provider" % order.id)
    source = "admin:%s" % admin
    done = (_credit_order(order.id, bool(order.test), source) if action == "credit"
            else _mark_canceled(order.id, source, from_states=("needs_attention",)))
    logger.warning("order %s settled by admin %s: %s (%s)", order.id, admin, action,
                   "done" if done else "already settled")
    return Payment.get_by_id(order.id)


class RefundNotPossible(PaymentError):
    """This payment cannot be refunded (not succeeded, nothing left, or a wrong amount)."""


@dataclass(frozen=True)
class RefundResult:
    """What ``Refund.create`` answered: the YooKassa refund id, its status, the amount in kopecks,
    and our applied `Refund` row when it succeeded at once (else None: the ``refund.succeeded``
    notification applies it when it comes)."""

    refund_id: str
    status: str
    kopecks: int
    applied: Refund | None


def find_order(reference: str) -> Payment | None:
    """Our order for `reference`: a YooKassa payment id as the cabinet shows it, a Telegram Stars
    charge id, or our order uuid."""
    reference = (reference or "").strip()
    order = Payment.get_or_none((Payment.yookassa_payment_id == reference)
                                | (Payment.telegram_charge_id == reference)) if reference else None
    if order is None:
        try:
            order = Payment.get_or_none(Payment.id == uuid.UUID(reference))
        except ValueError:
            return None
    return order


def refund_topup(reference: str, kopecks: int | None = None, *, idempotency_key: str,
                 cfg: config.Config | None = None) -> RefundResult:
    """Refund `kopecks` (default: all that is left) of a succeeded top-up through YooKassa
    ``Refund.create`` with `idempotency_key` (a retried command never refunds twice).

    `reference` is the YooKassa payment id or our order uuid. The credits come back through the
    usual path: when the API answers ``succeeded`` at once the refund is applied here with the same
    `_apply_refund` the ``refund.succeeded`` notification uses (once per refund id, whichever comes
    first); a pending refund is applied by that notification. With YOOKASSA_RECEIPTS a partial
    refund carries its 54-FZ refund receipt (the refunded amount as one item, to the user's e-mail);
    a full one carries none: YooKassa takes the payment's ("Чеки при возвратах", yookassa.ru/developers/54fz/refunds).

    :raises UnknownPayment: no such order (or it never reached YooKassa).
    :raises RefundNotPossible: the order is not succeeded, nothing is left, or `kopecks` is out of range.
    :raises PaymentsNotConfigured, ProviderUnavailable (outcome unknown: retry with the same key),
        PaymentRejected (YooKassa refused it).
    """
    cfg = cfg or config.get()
    configure_sdk(cfg)
    order = find_order(reference)
    if order is None or not order.yookassa_payment_id:
        raise UnknownPayment("no order for %r" % str(reference)[:64])
    left = order.amount_kopecks - order.refunded_kopecks
    kopecks = left if kopecks is None else int(kopecks)
    if order.status != "succeeded" or left <= 0 or not 0 < kopecks <= left:
        raise RefundNotPossible("order %s is %s with %s left; asked %s" % (
            order.id, order.status, kopecks_to_value(max(left, 0)), kopecks_to_value(max(kopecks, 0))))
    params = {"payment_id": order.yookassa_payment_id, "description": "Возврат по заказу %s" % order.id,
              "amount": {"value": kopecks_to_value(kopecks), "currency": order.currency}}
    if cfg.yookassa_receipts and kopecks != order.amount_kopecks:
        email = User.get_by_id(order.user_id).email
        params["receipt"] = _receipt(email, DESCRIPTION.format(credits=order.credits)[:DESCRIPTION_MAX],
                                     kopecks_to_value(kopecks), order.currency, cfg)
    try:
        response = yookassa.Refund.create(params, idempotency_key=idempotency_key)
    except Exception as exc:
        if _transient(exc):
            raise ProviderUnavailable("Refund.create for order %s failed: %s" % (order.id, _describe(exc))) from exc
        if isinstance(exc, (ApiError, ValueError, TypeError)):
            raise PaymentRejected("YooKassa refused the refund of order %s: %s" % (order.id, _describe(exc))) from exc
        raise
    applied = None
    if response.status == "succeeded" and response.payment_id == order.yookassa_payment_id:
        applied = _apply_refund(order.id, response.id, value_to_kopecks(response.amount.value))
    logger.info("refund requested: order=%s yookassa=%s refund=%s amount=%s status=%s applied=%s", order.id,
                order.yookassa_payment_id, response.id, kopecks_to_value(kopecks), response.status, applied is not None)
    return RefundResult(str(response.id), str(response.status), kopecks, applied)


# --- the button, reconciliation, reports ------------------------------------------------------

def check_payment(payment_id, user_id: int, cfg: config.Config | None = None) -> Payment:
    """The "Проверить оплату" button: re-fetch a pending order of `user_id` and apply it; return it.

    Same path as notifications, so it never credits twice. A returned order with status
    ``succeeded`` may have been credited by this call or earlier: the caller tells the user only
    if ``claim_notification(order.id)`` returns True. Raises UnknownPayment (not this user's),
    ProviderUnavailable (the API did not answer), PaymentsNotConfigured.
    """
    cfg = cfg or config.get()
    order = get_payment(payment_id, user_id)
    if order.status != "pending" or not order.yookassa_payment_id:
        return order
    configure_sdk(cfg)
    _apply(order, _fetch_payment(order.yookassa_payment_id), cfg, "check button")
    return Payment.get_by_id(order.id)


@dataclass
class ReconcileReport:
    """What one reconciliation pass did: orders `credited` (ids), `canceled` (count), orders moved
    to needs_attention (ids, tell the admins), `failed` re-fetches (retried with backoff),
    `auth_failed` (YooKassa refused our keys: the pass stopped, nothing changed; tell the admins),
    and `refunds` applied that no notification had brought (refund ids, tell the users)."""

    checked: int = 0
    credited: list = field(default_factory=list)
    canceled: int = 0
    needs_attention: list = field(default_factory=list)
    failed: int = 0
    auth_failed: bool = False
    refunds: list = field(default_factory=list)
    canceled_ids: list = field(default_factory=list)     # the canceled orders (tell the users)


def _backoff(order: Payment, cfg: config.Config, now: datetime.datetime) -> None:
    """Record a re-check of a still-pending order; the next one waits RECONCILE_INTERVAL × 2^(n−1)
    seconds, at most RECHECK_BACKOFF_MAX."""
    attempts = (order.check_attempts or 0) + 1
    wait = min(cfg.reconcile_interval * 2 ** min(attempts - 1, 16), RECHECK_BACKOFF_MAX)
    (Payment.update(checked_at=now, check_attempts=attempts, next_check_at=now + datetime.timedelta(seconds=wait))
     .where((Payment.id == order.id) & (Payment.status == "pending")).execute())


def _needs_attention(order: Payment, problem: str, now: datetime.datetime) -> bool:
    """pending → needs_attention (the API cannot verify the order); True for the call that moved it."""
    changed = models.move(Payment, order.id, "pending", "needs_attention", problem=problem[:500], checked_at=now,
                          updated_at=now)
    if changed:
        promo.release_for_payment(order.id, now)
        logger.error("payment needs attention: order=%s yookassa=%s user=%s amount=%s: %s", order.id,
                     order.yookassa_payment_id, order.user_id, kopecks_to_value(order.amount_kopecks), problem)
    return bool(changed)


def due_for_reconciliation(cfg: config.Config, now: datetime.datetime, limit: int = 500) -> list[Payment]:
    """Pending orders older than RECONCILE_AFTER seconds whose backoff has passed, oldest check first
    (never-checked orders before all others), at most `limit`: a round robin no order can starve."""
    cutoff = now - datetime.timedelta(seconds=cfg.reconcile_after)
    return list(Payment.select().where(
        (Payment.status == "pending") & (Payment.provider == "yookassa") & (Payment.created_at <= cutoff)
        & (Payment.next_check_at.is_null() | (Payment.next_check_at <= now)))
        .order_by(Payment.checked_at.asc(nulls="first"), Payment.created_at).limit(limit))


def reconcile(cfg: config.Config | None = None, now: datetime.datetime | None = None, limit: int = 500
              ) -> ReconcileReport:
    """Re-fetch pending orders (`due_for_reconciliation`) and apply what the API says, then apply
    refunds the API reports that we never recorded (`reconcile_refunds`).

    A lost notification therefore never loses a payment. Orders YooKassa never confirmed (no
    YooKassa payment id) end canceled after ORDER_EXPIRY seconds; abandoned ones end canceled when
    the API says so (``expired_on_confirmation``). An order the API cannot verify — unknown there
    (404), or not matching our order (amount, currency, metadata, a test payment in a live shop) —
    moves to ``needs_attention`` and leaves the set. A failed re-fetch is retried with backoff.
    401/403 stops the pass (every order would fail alike) with ``auth_failed`` set. Returns a
    ReconcileReport.
    """
    cfg = cfg or config.get()
    now = now or utcnow()
    report = ReconcileReport()
    if not cfg.yookassa_configured:
        return report
    configure_sdk(cfg)
    for order in due_for_reconciliation(cfg, now, limit):
        report.checked += 1
        try:
            _reconcile_order(order, cfg, now, report)
        except ProviderAuthFailed as exc:
            logger.error("reconcile stopped: %s", exc)
            report.auth_failed = True
            return report
    try:
        report.refunds = reconcile_refunds(cfg, now)
    except ProviderAuthFailed as exc:
        logger.error("refund reconciliation stopped: %s", exc)
        report.auth_failed = True
    except ProviderUnavailable as exc:
        logger.warning("refund reconciliation skipped: %s", exc)
    if report.checked or report.refunds:
        logger.info("reconcile: checked=%s credited=%s canceled=%s needs_attention=%s failed=%s refunds=%s",
                    report.checked, len(report.credited), report.canceled, len(report.needs_attention),
                    report.failed, len(report.refunds))
    return report


def _reconcile_order(order: Payment, cfg: config.Config, now: datetime.datetime, report: ReconcileReport) -> None:
    """Re-check one pending order and record the outcome in `report`. Raises ProviderAuthFailed."""
    if not order.yookassa_payment_id:
        if order.created_at <= now - datetime.timedelta(seconds=ORDER_EXPIRY) and _mark_canceled(
                order.id, "not_confirmed"):
            report.canceled += 1
            report.canceled_ids.append(order.id)
        else:
            _backoff(order, cfg, now)
        return
    try:
        result = _apply(order, _fetch_payment(order.yookassa_payment_id), cfg, "reconcile")
    except NotAtProvider as exc:
        if _needs_attention(order, str(exc), now):
            report.needs_attention.append(order.id)
        return
    except ProviderAuthFailed:
        raise
    except ProviderUnavailable as exc:
        report.failed += 1
        logger.warning("reconcile: order %s skipped: %s", order.id, exc)
        _backoff(order, cfg, now)
        return
    if result.credited:
        report.credited.append(result.credited)
    elif result.detail == "canceled":
        report.canceled += 1
        report.canceled_ids.append(order.id)
    elif result.detail == "mismatch":
        if _needs_attention(order, "the API object does not match the order (see the security log)", now):
            report.needs_attention.append(order.id)
    else:
        _backoff(order, cfg, now)


def reconcile_refunds(cfg: config.Config | None = None, now: datetime.datetime | None = None) -> list[str]:
    """Apply succeeded refunds of the last REFUND_WINDOW_DAYS days that the API lists and we never
    recorded (a lost ``refund.succeeded`` notification), each once by its refund id; return their ids.

    ``Refund.list`` (status succeeded, created_at ≥ window start) is one paginated listing for the
    whole shop, so the cost follows the number of refunds, not of orders. A listed refund of a
    payment that is not one of our succeeded orders is logged and left alone. Raises
    ProviderAuthFailed, ProviderUnavailable.
    """
    cfg = cfg or config.get()
    now = now or utcnow()
    configure_sdk(cfg)
    since = now - datetime.timedelta(days=cfg.refund_window_days)
    listed = _list_all(yookassa.Refund.list, {"status": "succeeded", "created_at.gte": _iso(since)})
    known = {r.id for r in Refund.select(Refund.id).where(Refund.id.in_([r.id for r in listed]))} if listed else set()
    applied = []
    for refund in listed:
        if refund.id in known:
            continue
        order = Payment.get_or_none(Payment.yookassa_payment_id == refund.payment_id)
        try:
            kopecks = value_to_kopecks(refund.amount.value)
        except (AttributeError, ValueError):
            kopecks = None
        if order is None or order.status != "succeeded" or kopecks is None or kopecks <= 0 \
                or refund.amount.currency != order.currency:
            logger.warning("security: listed refund %s (payment %s) matches none of our succeeded orders — ignored",
                           refund.id, refund.payment_id)
            continue
        if _apply_refund(order.id, refund.id, kopecks) is not None:
            logger.warning("refund %s of order %s found by reconciliation (its notification was lost)",
                           refund.id, order.id)
            applied.append(refund.id)
    return applied


def claim_notification(payment_id) -> bool:
    """Return True exactly once for a succeeded order: the caller then tells the user about the credit.

    A conditional update of ``notified_at`` (NULL → now), so concurrent callers (the worker task
    enqueued by several webhook copies, the check button) send one message.
    """
    changed = (Payment.update(notified_at=utcnow())
               .where((Payment.id == payment_id) & Payment.notified_at.is_null()
                      & (Payment.status == "succeeded")).execute())
    return bool(changed)


def unnotified_payments(older_than: int = 60, now: datetime.datetime | None = None, limit: int = 100
                        ) -> list[uuid.UUID]:
    """Ids of orders succeeded more than `older_than` seconds ago whose user was not told yet
    (a lost enqueue): the worker's periodic task can notify them through claim_notification."""
    now = now or utcnow()
    return [p.id for p in Payment.select(Payment.id).where(
        (Payment.status == "succeeded") & Payment.notified_at.is_null()
        & (Payment.succeeded_at <= now - datetime.timedelta(seconds=older_than))).limit(limit)]


def _iso(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _list_all(method, params: dict, max_pages: int = 100) -> list:
    items, cursor = [], None
    for _ in range(max_pages):
        page_params = dict(params, limit=100, **({"cursor": cursor} if cursor else {}))
        page = _api(lambda: method(page_params), "list")  # noqa: B023 - called at once
        items.extend(page.items or [])
        cursor = getattr(page, "next_cursor", None)
        if not cursor:
            break
    return items


def _compare(ours: dict, theirs: dict) -> dict:
    return {
        "ours_count": len(ours), "ours_kopecks": sum(ours.values()),
        "api_count": len(theirs), "api_kopecks": sum(theirs.values()),
        "missing_in_api": sorted(set(ours) - set(theirs)),
        "missing_ours": sorted(set(theirs) - set(ours)),
        "amount_mismatch": sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k]),
    }


def daily_report(cfg: config.Config | None = None, day: datetime.date | None = None) -> dict:
    """Compare our succeeded top-ups and applied refunds of one UTC `day` (default yesterday) with
    ``Payment.list`` / ``Refund.list`` (status succeeded; captured_at / created_at in that day).

    Returns ``{"day", "topups": {...}, "refunds": {...}, "ok"}``; each part has our and the API's
    count and sum in kopecks, the YooKassa ids missing on either side and those whose amounts
    differ. Events near midnight can land on different days on the two sides. Raises
    ProviderUnavailable, PaymentsNotConfigured.
    """
    cfg = cfg or config.get()
    configure_sdk(cfg)
    day = day or (utcnow().date() - datetime.timedelta(days=1))
    start = datetime.datetime.combine(day, datetime.time.min)
    end = start + datetime.timedelta(days=1)
    ours_topups = {p.yookassa_payment_id: p.amount_kopecks for p in Payment.select().where(
        (Payment.status == "succeeded") & (Payment.provider == "yookassa")
        & (Payment.succeeded_at >= start) & (Payment.succeeded_at < end))}
    ours_refunds = {r.id: r.amount_kopecks for r in Refund.select().join(Payment).where(
        (Payment.provider == "yookassa") & (Refund.created_at >= start) & (Refund.created_at < end))}
    api_topups = {p.id: value_to_kopecks(p.amount.value) for p in _list_all(yookassa.Payment.list, {
        "status": "succeeded", "captured_at.gte": _iso(start), "captured_at.lt": _iso(end)})}
    api_refunds = {r.id: value_to_kopecks(r.amount.value) for r in _list_all(yookassa.Refund.list, {
        "status": "succeeded", "created_at.gte": _iso(start), "created_at.lt": _iso(end)})}
    report = {"day": day.isoformat(), "topups": _compare(ours_topups, api_topups),
              "refunds": _compare(ours_refunds, api_refunds)}
    report["ok"] = not any(part[name] for part in (report["topups"], report["refunds"])
                           for name in ("missing_in_api", "missing_ours", "amount_mismatch"))
    logger.info("daily report %s: topups ours=%s/%s api=%s/%s refunds ours=%s api=%s ok=%s", report["day"],
                report["topups"]["ours_count"], report["topups"]["ours_kopecks"], report["topups"]["api_count"],
                report["topups"]["api_kopecks"], report["refunds"]["ours_count"], report["refunds"]["api_count"],
                report["ok"])
    return report
