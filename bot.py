"""The Telegram bot: handlers, keyboards and conversation state (pyTelegramBotAPI 4.37.1).

`create_bot(cfg)` builds a `TeleBot` whose handlers are all registered in `register_handlers`.
Handlers are thin: parse the update, call one service (`worker.accept_generation`,
`payments.create_topup`, `promo.check_discount` ...), reply. Every Telegram call goes through
`worker.tg` (the one wrapper that honours 429 `retry_after`).

Pieces:

* `PeeweeStateStorage` keeps each chat's conversation state (a `Step` and a data dict: mode, file
  ids, prompt ...) in the `ConversationState` table, so a restarted bot continues a flow where the
  user left it. Its `update` is the locked read-modify-write used when album photos (one update
  each, handled concurrently) add to the same state.
* `UserMiddleware` runs before every message and callback query: creates the user once
  (`billing.get_or_create_user`, race-safe), refuses blocked users, picks the language, and hands
  the handler a `Ctx`.
* `_guarded` wraps every handler: domain errors become texts (`_error_reply`), anything else is
  logged with its traceback and answered with `error_generic`; a callback query is always
  answered.

Images are checked before anything is reserved: the declared size (Bot API getFile stops at 20 MB),
then the downloaded bytes (`media.inspect_image`). Only Telegram file ids go into the state.

Callback data: ``menu``, ``cancel``, ``mode:<mode>``, ``consent``, ``ratio:<w:h>``, ``done``,
``pos:<top|center|bottom>``, ``color:<name>``, ``again:<generation id>``, ``jobcancel:<generation
id>``, ``pay``, ``amount:<credits>``, ``amount_custom``, ``promo``, ``check:<payment uuid>``,
``dretry:<draft token>``, ``dedit:<draft token>``, ``payfor:<draft token>`` (a kept draft),
``use:<edit|upscale|add_text>:<generation id>`` (a result as the next input), ``hsend:<id>`` and
``rerun:<id>`` (/history), ``bcast`` (an admin's broadcast preview), ``stars``, ``stars:<credits>``
(Telegram Stars); anything else (or a button of a step that is over) is answered "this button is
no longer active".

A tap acts once, and only on its own flow (issue 11 §1): every flow button carries its flow's token
(``ratio:16:9~k3x9q2``, `Ctx.button`); the middleware splits it off into ``ctx.token`` and `_claim`
records ``<token>:<kind>`` on the chat's state row in the same locked transaction as the step's
transition, so a second tap (sequential or concurrent) answers "✓ Уже сделано" and a button of an
older flow "this button is no longer active". Buttons that are not part of a flow are claimed with
`billing.claim_action` (``tap:again:<id>``, ``tap:draft:<user>:<token>``).

Telegram Stars (issue 12, `stars`): the invoice's payload is our order id; the pre_checkout_query is
answered here in the bot process (`on_pre_checkout`, within Telegram's 10 s); successful_payment and
refunded_payment service messages are applied by `MediaLabBot.process_new_updates` before the
handlers (pyTelegramBotAPI 4.37.1 gives refunded_payment no content_type, and a payment must be
credited even for a user the middleware would refuse).

`main()` runs long polling, or webhook mode when TELEGRAM_WEBHOOK_URL is set (`create_webhook_app`).
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import hmac
import logging
import random
import re
import secrets
import sys
import threading
import time
import urllib.parse
import uuid
import zlib
from dataclasses import dataclass, field

import requests
import telebot
from peewee import fn
from telebot import apihelper, types
from telebot.custom_filters import StateFilter
from telebot.handler_backends import BaseMiddleware, CancelUpdate
from telebot.states import State, StatesGroup
from telebot.storage import StateStorageBase
from telebot.storage.base_storage import StateDataContext

import billing
import config
import media
import models
import ops
import payments
import promo
import stars
import startup
import texts
import worker
from models import ConversationState, Generation, Payment, User

logger = logging.getLogger(__name__)

ALLOWED_UPDATES = ["message", "callback_query", "pre_checkout_query"]
USER_UPDATES = ("message", "callback_query")      # what UserMiddleware loads a user and a chat state for
IMAGE_MIME_TYPES = ("image/jpeg", "image/png", "image/webp")
# Data keys that outlive a flow (cancel, menu, a finished job): consent and a chosen discount code.
STICKY_KEYS = tuple(s.consent_key for s in media.MODE_SPECS.values() if s.consent_key) + ("promo_code", "taps")
TOKEN_SEP = "~"              # callback data "<action>~<flow token>": the flow that sent the button
TAPS_KEPT = 30               # claimed "<flow>:<kind>" keys remembered per chat (a second tap: "already done")


class Step(StatesGroup):
    """Where a chat is in a flow; `data["mode"]` says which flow."""

    images = State()      # waiting for photos (data["files"])
    prompt = State()      # waiting for the typed input: the prompt, the instruction or the text to draw
    option = State()      # waiting for the button of option data["option"] (aspect ratio, position, colour)
    amount = State()      # top-up: waiting for a custom amount
    promo = State()       # top-up: waiting for a promo code
    email = State()       # top-up: waiting for an e-mail for the receipt


# --------------------------------------------------------------------------------------------
# Conversation state in the database
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _state_durability():
    """On SQLite, commit conversation state without an fsync (``synchronous=NORMAL`` on this
    thread's connection for the one transaction; FULL again afterwards).

    Every commit with synchronous=FULL waits for an fsync of the WAL (4 ms p50 on the 2-core box),
    and writes take turns, so state writes (most updates write one) capped the whole database at a
    few hundred transactions/s shared with the money code. In WAL mode NORMAL is still atomic and
    consistent; a power cut (not a crash of the process) may lose the last state changes, i.e. a
    user presses a button again. The next FULL commit (any money change) makes them durable too.
    Money transactions keep FULL.
    """
    if not models.is_sqlite() or models.db.in_transaction():
        yield
        return
    models.db.execute_sql("PRAGMA synchronous = NORMAL")
    try:
        yield
    finally:
        models.db.execute_sql("PRAGMA synchronous = FULL")


class PeeweeStateStorage(StateStorageBase):
    """pyTelegramBotAPI state storage in the `ConversationState` table (survives restarts).

    Implements every method of `telebot.storage.StateStorageBase` (notes A3). Keys are
    ``medialab[:bot_id][:business id][:thread]:chat:user``, built by the base class's `_get_key`.
    Writes of one key are serialised by a striped per-key thread lock and run in one transaction
    (`BEGIN IMMEDIATE` on SQLite, `SELECT … FOR UPDATE` on PostgreSQL), so concurrent updates of
    one chat (album photos) never lose each other's data.
    """

    STRIPES = 64

    def __init__(self, prefix: str = "medialab", separator: str = ":"):
        super().__init__()
        self.prefix = prefix
        self.separator = separator
        self._locks = [threading.Lock() for _ in range(self.STRIPES)]

    def key(self, chat_id, user_id, business_connection_id=None, message_thread_id=None, bot_id=None) -> str:
        """Return the row key of one chat/user (the format telebot's storages use)."""
        return self._get_key(chat_id, user_id, self.prefix, self.separator,
                             business_connection_id, message_thread_id, bot_id)

    def _lock(self, key: str) -> threading.Lock:
        return self._locks[zlib.crc32(key.encode()) % self.STRIPES]

    def update(self, chat_id, user_id, change, *, business_connection_id=None, message_thread_id=None,
               bot_id=None):
        """Apply `change(record)` to the stored record under the key's lock; return its result.

        `record` is a dict ``{"state": str | None, "data": dict}`` that `change` may modify in
        place; it is written back afterwards (the row is created when missing). `change` must
        depend only on the record: it may run twice (once on a plain read; again inside the
        write transaction when the first run changed something).
        """
        key = self.key(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        with self._lock(key):
            # Most updates leave the state as it is (/start or /balance outside a flow, a button
            # that only answers): decide that on a plain read and skip the write transaction,
            # whose commit (an fsync) and write lock were the bot's largest cost under load
            # (bench/bench_bot.py, py-spy). Linearizable: `change` sees the record as it is at
            # the read, and a change that would alter it goes on to the locked write below.
            # A missing row reads as no state and no data (`load`), so it is not created either.
            row = ConversationState.get_or_none(ConversationState.key == key)
            record = {"state": row.state, "data": copy.deepcopy(row.data or {})} if row else {"state": None, "data": {}}
            before = copy.deepcopy(record)
            result = change(record)
            if record == before:
                return result
            return self._write(key, change)

    def _write(self, key, change):
        # The bot's writes queue for the database like the money code's (billing.writer_turn:
        # fair flock turns instead of SQLite's sleeping busy handler).
        with _state_durability(), billing.writer_turn(), models.db.atomic():
            now = models.utcnow()
            ConversationState.insert(key=key, state=None, data={}, updated_at=now).on_conflict_ignore().execute()
            query = ConversationState.select().where(ConversationState.key == key)
            if not models.is_sqlite():
                query = query.for_update()
            row = query.get()
            record = {"state": row.state, "data": dict(row.data or {})}
            result = change(record)
            ConversationState.update(state=record["state"], data=record["data"], updated_at=now).where(
                ConversationState.key == key).execute()
            return result

    def _read(self, chat_id, user_id, business_connection_id=None, message_thread_id=None, bot_id=None):
        key = self.key(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        return ConversationState.get_or_none(ConversationState.key == key)

    def load(self, chat_id, user_id, *, business_connection_id=None, message_thread_id=None, bot_id=None):
        """Return (state name or None, a copy of the data) in one read."""
        row = self._read(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        return (row.state, dict(row.data or {})) if row is not None else (None, {})

    def set_state(self, chat_id, user_id, state, business_connection_id=None, message_thread_id=None,
                  bot_id=None) -> bool:
        """Set the state (a `State` or its name), keeping the data; create the record if needed."""
        name = state.name if hasattr(state, "name") else state

        def change(record):
            record["state"] = name

        self.update(chat_id, user_id, change, business_connection_id=business_connection_id,
                    message_thread_id=message_thread_id, bot_id=bot_id)
        return True

    def get_state(self, chat_id, user_id, business_connection_id=None, message_thread_id=None,
                  bot_id=None) -> str | None:
        """Return the state name, or None."""
        row = self._read(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        return row.state if row is not None else None

    def delete_state(self, chat_id, user_id, business_connection_id=None, message_thread_id=None,
                     bot_id=None) -> bool:
        """Delete the whole record (state and data); return whether there was one."""
        key = self.key(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        with self._lock(key):
            return bool(ConversationState.delete().where(ConversationState.key == key).execute())

    def set_data(self, chat_id, user_id, key, value, business_connection_id=None, message_thread_id=None,
                 bot_id=None) -> bool:
        """Set one data value (creates the record when missing, unlike the memory storage)."""

        def change(record):
            record["data"][key] = value

        self.update(chat_id, user_id, change, business_connection_id=business_connection_id,
                    message_thread_id=message_thread_id, bot_id=bot_id)
        return True

    def get_data(self, chat_id, user_id, business_connection_id=None, message_thread_id=None,
                 bot_id=None) -> dict:
        """Return a copy of the data dict ({} when there is no record)."""
        row = self._read(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        return dict(row.data or {}) if row is not None else {}

    def reset_data(self, chat_id, user_id, business_connection_id=None, message_thread_id=None,
                   bot_id=None) -> bool:
        """Empty the data, keeping the state; return whether there was a record."""
        key = self.key(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        with self._lock(key):
            return bool(ConversationState.update(data={}, updated_at=models.utcnow()).where(
                ConversationState.key == key).execute())

    def get_interactive_data(self, chat_id, user_id, business_connection_id=None, message_thread_id=None,
                             bot_id=None) -> StateDataContext:
        """Return telebot's `with`-context over the data (saved on exit)."""
        return StateDataContext(self, chat_id=chat_id, user_id=user_id, business_connection_id=business_connection_id,
                                message_thread_id=message_thread_id, bot_id=bot_id)

    def save(self, chat_id, user_id, data, business_connection_id=None, message_thread_id=None,
             bot_id=None) -> bool:
        """Replace the data dict (what `StateDataContext` calls on exit)."""

        def change(record):
            record["data"] = dict(data)

        self.update(chat_id, user_id, change, business_connection_id=business_connection_id,
                    message_thread_id=message_thread_id, bot_id=bot_id)
        return True


# --------------------------------------------------------------------------------------------
# Per-update context, middleware, error handling
# --------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """What a handler needs besides the update: the bot, settings, the user and their chat state."""

    bot: telebot.TeleBot
    cfg: config.Config
    user: User
    lang: str
    chat_id: int
    telegram_id: int
    update_id: int | None
    state: str | None = None
    data: dict = field(default_factory=dict)
    call: types.CallbackQuery | None = None
    answered: bool = False
    token: str | None = None          # the flow token a pressed button carried (None: none)
    created: bool = False             # this update created the user (first contact)

    def t(self, key: str, **values) -> str:
        """Return text `key` in the user's language."""
        return texts.t(key, self.lang, **values)

    @property
    def storage(self) -> PeeweeStateStorage:
        """The bot's conversation-state storage."""
        return self.bot.current_states

    def update(self, change):
        """Run `change(record)` on this chat's stored state under its lock (see `PeeweeStateStorage.update`)."""
        return self.storage.update(self.chat_id, self.telegram_id, change, bot_id=self.bot.bot_id)

    def go(self, state: State | None, **data) -> None:
        """Move to `state` (None ends the flow) and merge `data` into the stored data."""
        name = state.name if state is not None else None

        def change(record):
            record["state"] = name
            record["data"].update(data)

        self.update(change)
        self.state = name
        self.data.update(data)

    def start_flow(self, state: State | None, **data) -> None:
        """Start a fresh flow: keep only the sticky data keys, then set `state` and `data`."""
        name = state.name if state is not None else None

        def change(record):
            kept = {k: v for k, v in record["data"].items() if k in STICKY_KEYS}
            kept["flow"] = new_flow_token()
            kept.update(data)
            record["state"], record["data"] = name, kept
            return kept

        self.data = dict(self.update(change))
        self.state = name

    def finish(self) -> None:
        """End the flow (keeping the sticky keys)."""
        self.start_flow(None)

    def flow(self) -> str:
        """The current flow's token (the one its buttons carry); a chat without one gets one."""
        token = self.data.get("flow")
        if not token:
            token = new_flow_token()

            def change(record):
                record["data"].setdefault("flow", token)
                return record["data"]["flow"]

            token = self.update(change)
            self.data["flow"] = token
        return token

    def button(self, data: str) -> str:
        """Callback data `data` tagged with the current flow's token (``ratio:16:9~k3x9q2``)."""
        return "%s%s%s" % (data, TOKEN_SEP, self.flow())


def new_flow_token() -> str:
    """A short random flow token (6 URL-safe characters; callback data stays far below 64 bytes)."""
    return secrets.token_urlsafe(6)[:6].replace(TOKEN_SEP, "_")


class UserMiddleware(BaseMiddleware):
    """Before every message and callback query: create/refresh the user, refuse blocked users,
    pick the language, load the chat state; the handler receives it all as `ctx`."""

    def __init__(self, bot: telebot.TeleBot, cfg: config.Config):
        super().__init__()
        self.update_types = list(USER_UPDATES)
        self.bot = bot
        self.cfg = cfg

    def pre_process(self, update, data):
        """Load the user and chat state into ``data["ctx"]``; CancelUpdate for anything we do not serve."""
        message = update.message if isinstance(update, types.CallbackQuery) else update
        sender = update.from_user
        if message is None or sender is None or sender.is_bot or message.chat.type != "private":
            return CancelUpdate()  # private chats with people only
        call = update if isinstance(update, types.CallbackQuery) else None
        token = None
        if call is not None and TOKEN_SEP in (call.data or ""):
            call.data, token = call.data.rsplit(TOKEN_SEP, 1)   # handlers match the action alone
        try:
            user, created = billing.get_or_create_user(sender.id, username=sender.username, first_name=sender.first_name,
                                                 language_code=sender.language_code)
            state, stored = self.bot.current_states.load(message.chat.id, sender.id, bot_id=self.bot.bot_id)
        except Exception:
            logger.exception("could not load user %s", sender.id)
            _reply_raw(self.bot, message.chat.id, call, texts.t("error_generic", texts.lang_of(sender.language_code)))
            return CancelUpdate()
        ctx = Ctx(bot=self.bot, cfg=self.cfg, user=user, lang=texts.lang_of(user.language_code or sender.language_code),
                  chat_id=message.chat.id, telegram_id=sender.id, update_id=getattr(update, "update_id", None),
                  state=state, data=stored, call=call, token=token, created=created)
        if user.is_blocked and sender.id not in self.cfg.admin_ids:
            logger.info("blocked user %s refused", user.id)
            _reply_raw(self.bot, message.chat.id, call, ctx.t("blocked"))
            return CancelUpdate()
        data["ctx"] = ctx

    def post_process(self, update, data, exception):
        """Nothing to do after a handler (pyTelegramBotAPI requires the method)."""


def _reply_raw(bot, chat_id, call, text):
    """Tell the user `text` (answering the callback query if there is one), swallowing failures."""
    try:
        if call is not None:
            worker.tg(bot.answer_callback_query, call.id, text[:200], show_alert=True)
        else:
            worker.tg(bot.send_message, chat_id, text)
    except Exception as exc:  # noqa: BLE001 - nothing more to do for this update
        logger.warning("could not reply to chat %s: %s", chat_id, _redact(str(exc), bot.token))


def _redact(text: str, token: str) -> str:
    """Remove the bot token from `text` (requests errors quote the URL, which contains it)."""
    secret = token.split(":", 1)[-1] if token else ""
    return text.replace(secret, "<token>") if secret else text


class BotExceptionHandler(telebot.ExceptionHandler):
    """Last resort for errors outside our handlers (polling, the worker pool): log, token redacted.

    Returns False so pyTelegramBotAPI keeps its own back-off for polling errors.
    """

    def __init__(self, token: str):
        self.token = token

    def handle(self, exception) -> bool:
        """Log `exception` without the token; return False (not handled)."""
        logger.error("bot error: %s: %s", type(exception).__name__, _redact(str(exception), self.token))
        return False


def _guarded(handler):
    """Wrap a handler: map domain errors to texts, log anything else, always answer callbacks."""

    @functools.wraps(handler)
    def run(update, ctx):
        try:
            handler(update, ctx)
        except Exception as exc:  # noqa: BLE001 - the edge of the bot: every error becomes a reply
            _report(ctx, exc)
        finally:
            if ctx.call is not None and not ctx.answered:
                try:
                    _answer(ctx)
                except Exception as exc:  # noqa: BLE001
                    logger.warning("could not answer callback %s: %s", ctx.call.id, _redact(str(exc), ctx.bot.token))

    return run


def _report(ctx: Ctx, exc: Exception) -> None:
    """Tell the user what went wrong with `exc`, in their language, and log it."""
    text, markup = _error_reply(ctx, exc)
    if text is None:
        if isinstance(exc, (requests.RequestException, apihelper.ApiException)):
            logger.error("telegram call failed for user %s: %s", ctx.user.id, _redact(str(exc), ctx.bot.token))
        else:
            logger.exception("unexpected error for user %s", ctx.user.id)
        text, markup = ctx.t("error_generic"), _menu_button_markup(ctx)
    else:
        logger.info("user %s: %s (%s)", ctx.user.id, type(exc).__name__, exc)
    try:
        _send(ctx, text, markup)
    except Exception as send_exc:  # noqa: BLE001
        logger.warning("could not send an error text to %s: %s", ctx.chat_id, _redact(str(send_exc), ctx.bot.token))


def _error_reply(ctx: Ctx, exc: Exception):
    """Return (text, markup) for a domain error that names its user text (`exc.text_key`, formatted
    with `exc.values`), or (None, None).

    Too few credits offers a top-up, a full disk or the job limit the menu, a blocked user nothing;
    any other step that can be retried keeps its "✖ Отмена" button.
    """
    key = getattr(exc, "text_key", None)
    if key not in texts.TEXTS:
        return None, None
    markup = {"insufficient_credits": _topup_button_markup, "storage_full": _menu_button_markup,
              "too_many_jobs": _menu_button_markup, "blocked": None}.get(key, _retry_markup)
    return ctx.t(key, **exc.values), markup and markup(ctx)


def _retry_markup(ctx: Ctx) -> types.InlineKeyboardMarkup:
    """"✖ Отмена" while a step waits for another try, else "🏠 Меню"."""
    return _cancel_markup(ctx) if ctx.state is not None else _menu_button_markup(ctx)


# --------------------------------------------------------------------------------------------
# Sending
# --------------------------------------------------------------------------------------------


def _send(ctx: Ctx, text: str, markup=None) -> types.Message:
    """Send `text` to the user's chat (no parse mode: user text is never markup)."""
    return worker.tg(ctx.bot.send_message, ctx.chat_id, text, reply_markup=markup)


def _answer(ctx: Ctx, text: str | None = None, alert: bool = False) -> None:
    """Answer the callback query once (stops the client's spinner)."""
    if ctx.call is None or ctx.answered:
        return
    ctx.answered = True
    worker.tg(ctx.bot.answer_callback_query, ctx.call.id, text, show_alert=alert or None)


def _markup(rows) -> types.InlineKeyboardMarkup:
    """Build an inline keyboard from rows of (text, callback_data) or (text, None, url)."""
    markup = types.InlineKeyboardMarkup()
    for row in rows:
        buttons = []
        for item in row:
            if len(item) == 3:
                buttons.append(types.InlineKeyboardButton(item[0], url=item[2]))
            else:
                buttons.append(types.InlineKeyboardButton(item[0], callback_data=item[1]))
        markup.row(*buttons)
    return markup


def _main_menu_markup(ctx: Ctx) -> types.InlineKeyboardMarkup:
    modes = [(ctx.t("btn_" + mode), "mode:" + mode) for mode in config.MODES]     # two in a row
    return _markup([modes[i:i + 2] for i in range(0, len(modes), 2)] + [[(ctx.t("btn_pay"), "pay")]])


def _cancel_markup(ctx: Ctx) -> types.InlineKeyboardMarkup:
    return _markup([[(ctx.t("btn_cancel"), ctx.button("cancel"))]])


def _menu_button_markup(ctx: Ctx) -> types.InlineKeyboardMarkup:
    return _markup([[(ctx.t("btn_menu"), "menu")]])


def _topup_button_markup(ctx: Ctx) -> types.InlineKeyboardMarkup:
    return _markup([[(ctx.t("btn_topup"), "pay")], [(ctx.t("btn_menu"), "menu")]])


def _rub(kopecks: int, exact: bool = True) -> str:
    """Format kopecks as roubles: "90.00" (exact) or "90" / "90.50" (short)."""
    whole, part = divmod(int(kopecks), 100)
    if exact or part:
        return "%d.%02d" % (whole, part)
    return "%d" % whole


# --------------------------------------------------------------------------------------------
# Menu, help, cancel
# --------------------------------------------------------------------------------------------


def _status_lines(ctx: Ctx) -> str:
    """The user's balance in a few lines (credits, reserved, free operations or free access)."""
    view = billing.get_balance(ctx.user.id)
    lines = [ctx.t("balance_credits", credits=view.credits)]
    if view.credits_reserved:
        lines.append(ctx.t("balance_reserved", reserved=view.credits_reserved))
    if view.free_access:
        if view.free_access_until is not None:
            lines.append(ctx.t("free_access_until", until=view.free_access_until.strftime("%d.%m.%Y")))
        else:
            lines.append(ctx.t("free_access_forever"))
    else:
        lines.append(ctx.t("free_ops_left", left=view.free_ops, total=ctx.cfg.free_operations_count))
    return "\n".join(lines)


def show_menu(ctx: Ctx, *, welcome: bool = False) -> None:
    """Send the main menu (with the welcome text on /start)."""
    name = ctx.user.first_name or ""
    head = ctx.t("welcome", name=name) if welcome else ctx.t("menu_title")
    _send(ctx, "%s\n\n%s" % (head, _status_lines(ctx)), _main_menu_markup(ctx))


def cmd_start(message: types.Message, ctx: Ctx) -> None:
    """/start: end any flow, greet, show the menu. ``/start ref_<code>`` (a referral link) on a
    user's first contact records who referred them (`worker.set_referrer`)."""
    ctx.finish()
    payload = (telebot.util.extract_arguments(message.text or "") or "").strip()
    if payload.startswith("ref_") and ctx.created:
        worker.set_referrer(ctx.user.id, payload[4:])
    show_menu(ctx, welcome=True)


def _referral_link(ctx: Ctx) -> str | None:
    """The user's referral link ``https://t.me/<bot>?start=ref_<code>`` (None if getMe fails)."""
    try:
        username = ctx.bot.user.username
    except Exception as exc:  # noqa: BLE001 - the link is a convenience
        logger.info("getMe failed, no referral link: %s", _redact(str(exc), ctx.bot.token))
        return None
    return "https://t.me/%s?start=ref_%s" % (username, worker.referral_code(ctx.user.id))


def _support_lines(ctx: Ctx) -> list[str]:
    """The support contact, terms and privacy links that are set (SUPPORT_CONTACT, TERMS_URL, PRIVACY_URL)."""
    lines = []
    if ctx.cfg.support_contact:
        lines.append(ctx.t("support_line", contact=ctx.cfg.support_contact))
    if ctx.cfg.terms_url:
        lines.append(ctx.t("terms_line", url=ctx.cfg.terms_url))
    if ctx.cfg.privacy_url:
        lines.append(ctx.t("privacy_line", url=ctx.cfg.privacy_url))
    return lines


def cmd_help(message: types.Message, ctx: Ctx) -> None:
    """/help: what each mode does, prices and free operations (and Stars when they are on), support
    and terms (and, for admins, the admin commands)."""
    text = ctx.t("help", price=ctx.cfg.price_per_operation, free=ctx.cfg.free_operations_count,
                 max_mb=ctx.cfg.max_image_bytes // (1024 * 1024))
    if ctx.cfg.stars_enabled:
        text += "\n\n" + ctx.t("help_stars", rate=ctx.cfg.stars_per_100_credits)
    extra = _support_lines(ctx)
    if ctx.telegram_id in ctx.cfg.admin_ids:
        extra.append(ctx.t("admin_help"))
    _send(ctx, "\n\n".join([text] + (["\n".join(extra)] if extra else [])), _menu_button_markup(ctx))


def cmd_paysupport(message: types.Message, ctx: Ctx) -> None:
    """/paysupport (Telegram's payment rules ask bots for one): how to reach support about a payment."""
    if ctx.cfg.support_contact:
        _send(ctx, ctx.t("paysupport", contact=ctx.cfg.support_contact), _menu_button_markup(ctx))
    else:
        _send(ctx, ctx.t("paysupport_none"), _menu_button_markup(ctx))


def cmd_terms(message: types.Message, ctx: Ctx) -> None:
    """/terms: the terms and privacy links (or what buying credits means when none is set)."""
    lines = [line for line in _support_lines(ctx) if not line.startswith("🛟")]
    _send(ctx, "\n".join(lines) if lines else ctx.t("terms_none"), _menu_button_markup(ctx))


def cmd_cancel(message: types.Message, ctx: Ctx) -> None:
    """/cancel: leave the current step; queued jobs can be cancelled from their status message."""
    had_flow = ctx.state is not None
    ctx.finish()
    _send(ctx, ctx.t("cancelled" if had_flow else "nothing_to_cancel"), _main_menu_markup(ctx))


def on_menu(call: types.CallbackQuery, ctx: Ctx) -> None:
    """🏠 Меню."""
    _answer(ctx)
    ctx.finish()
    show_menu(ctx)


def on_cancel(call: types.CallbackQuery, ctx: Ctx) -> None:
    """✖ Отмена: leave the flow that sent the button (a button of an older flow does nothing)."""
    if not _claim(ctx, "cancel"):
        return
    ctx.finish()
    _send(ctx, ctx.t("cancelled"), _main_menu_markup(ctx))


def on_unknown_command(message: types.Message, ctx: Ctx) -> None:
    """A command we do not know (admin commands from non-admins land here too): a short hint."""
    _send(ctx, ctx.t("unknown_command"), _menu_button_markup(ctx))


def on_unexpected(message: types.Message, ctx: Ctx) -> None:
    """Anything a step does not expect: say what the step wants."""
    hint = STEP_HINTS.get(ctx.state)
    count = len(ctx.data.get("files", []))
    spec = media.MODE_SPECS.get(ctx.data.get("mode"))
    if ctx.state == Step.images.name and spec is not None and _collects(spec) and count >= spec.min_images:
        _send(ctx, _collected_text(ctx, spec, count, 0), _done_markup(ctx))
    elif hint is None:                                     # stray input: a short hint, one button
        _send(ctx, ctx.t("hint_stray"), _menu_button_markup(ctx))
    else:
        _send(ctx, ctx.t(hint), _cancel_markup(ctx))


STEP_HINTS = {
    Step.images.name: "hint_send_photo",
    Step.prompt.name: "hint_send_text",
    Step.option.name: "hint_press_button",
    Step.amount.name: "hint_send_amount",
    Step.promo.name: "hint_send_code",
    Step.email.name: "hint_send_email",
}


def on_stale_button(call: types.CallbackQuery, ctx: Ctx) -> None:
    """A button from an old message (or an unknown callback)."""
    _answer(ctx, ctx.t("button_outdated"), alert=True)


def _already_done(ctx: Ctx) -> None:
    """A second tap of a button that already acted: a toast, no new message."""
    _answer(ctx, ctx.t("button_done"))


def _claim(ctx: Ctx, kind: str, *, states=None, mode: str | None = None, check=None, change=None,
           drop: bool = True) -> bool:
    """Claim the press of a flow button once, atomically, on the chat's state row.

    The button must carry the current flow's token (`Ctx.button`), the flow must be in one of
    `states` (None: any) and `mode`, and `check(data)` must hold (when given); the key ``<flow>:<kind>``
    must not be claimed yet. The claim,
    and `change(record)` (the step's transition), are written in the same locked transaction
    (`PeeweeStateStorage.update`), so two taps — sequential or concurrent — act once. On success the
    message's keyboard is removed (unless `drop` is False) and True returned; otherwise the query is answered ("already
    done" for a claimed key, "no longer active" for a button of another flow) and False returned.
    """
    token = ctx.token
    key = "%s:%s" % (token, kind)

    def apply(record):
        data = record["data"]
        taps = list(data.get("taps") or [])
        if token and key in taps:
            return "done"
        if not token or token != data.get("flow"):
            return "stale"
        if (states is not None and record["state"] not in states) or (mode and data.get("mode") != mode):
            return "stale"
        if check is not None and not check(data):
            return "stale"
        data["taps"] = (taps + [key])[-TAPS_KEPT:]
        if change is not None:
            change(record)
        ctx.state, ctx.data = record["state"], copy.deepcopy(data)
        return "ok"

    outcome = ctx.update(apply)
    if outcome == "done":
        _already_done(ctx)
        return False
    if outcome != "ok":
        on_stale_button(ctx.call, ctx)
        return False
    _answer(ctx)
    if drop:
        _drop_keyboard(ctx)
    return True


def _drop_keyboard(ctx: Ctx, markup=None) -> None:
    """Remove (or replace by `markup`) the keyboard of the pressed message; best effort."""
    if ctx.call is None or ctx.call.message is None:
        return
    try:
        worker.tg(ctx.bot.edit_message_reply_markup, ctx.chat_id, ctx.call.message.message_id, reply_markup=markup)
    except Exception as exc:  # noqa: BLE001 - the claim already guards against a second action
        logger.info("could not edit the keyboard of %s: %s", ctx.call.message.message_id,
                    _redact(str(exc), ctx.bot.token))


# --------------------------------------------------------------------------------------------
# Modes. Every step comes from the mode's `media.ModeSpec`: its images (one question each), its
# typed input (prompt or text), its options (buttons), then the job (paid) or the picture (local).
# --------------------------------------------------------------------------------------------


def on_mode(call: types.CallbackQuery, ctx: Ctx) -> None:
    """A main-menu mode button: start that mode's flow (after its one-time consent, if it has one)."""
    mode = call.data.split(":", 1)[1]
    if mode not in config.MODES:
        return on_stale_button(call, ctx)
    _answer(ctx)
    worker.discard_draft(ctx.user.id)                    # a new flow replaces the kept one
    spec = media.mode_spec(mode)
    if spec.consent_key and not ctx.data.get(spec.consent_key):
        ctx.start_flow(None, mode=mode)
        _send(ctx, ctx.t(spec.consent_key), _markup([[(ctx.t("btn_consent"), ctx.button("consent"))],
                                                     [(ctx.t("btn_cancel"), ctx.button("cancel"))]]))
        return
    _start_mode(ctx, spec)


def on_consent(call: types.CallbackQuery, ctx: Ctx) -> None:
    """The user accepted the mode's one-time note (face swap): remember it and start the mode."""
    spec = media.MODE_SPECS.get(ctx.data.get("mode"))
    if spec is None or not spec.consent_key:
        return on_stale_button(call, ctx)
    if not _claim(ctx, "consent", states=(None,), mode=spec.name):
        return
    ctx.go(None, **{spec.consent_key: True})
    _start_mode(ctx, spec)


def _start_mode(ctx: Ctx, spec: media.ModeSpec) -> None:
    """A fresh flow of mode `spec` and its first question (with the price): the first image, or
    the typed input of a mode without images."""
    values = dict(price=_price_text(ctx, spec.name), max_mb=ctx.cfg.max_image_bytes // 2**20,
                  max=ctx.cfg.max_prompt_length)
    if spec.max_images:
        ctx.start_flow(Step.images, mode=spec.name, files=[])
        _send(ctx, ctx.t(spec.image_keys[0], **values), _cancel_markup(ctx))
    else:
        ctx.start_flow(Step.prompt, mode=spec.name)
        _send(ctx, ctx.t(spec.input_key, **values), _cancel_markup(ctx))


def _collects(spec: media.ModeSpec) -> bool:
    """True for a mode that takes a varying number of images (merge): the user taps "✅ Готово"."""
    return spec.min_images < spec.max_images


def _typed(spec: media.ModeSpec) -> bool:
    """True for a mode that asks for a typed input (a prompt or a text to draw)."""
    return spec.needs_prompt or spec.needs_text


def _price_text(ctx: Ctx, mode: str) -> str:
    """The mode's price and what the user will pay it with (free access, a free operation, or the
    credit balance — said to be short when it is)."""
    if mode not in config.PAID_MODES:
        return ctx.t("price_free")
    price = ctx.cfg.price(mode)
    view = billing.get_balance(ctx.user.id)
    if view.free_access:
        you = ctx.t("price_you_free_access")
    elif view.free_ops > 0:
        you = ctx.t("price_you_free_op", left=view.free_ops, total=ctx.cfg.free_operations_count)
    elif view.credits >= price:
        you = ctx.t("price_you_balance", balance=view.credits)
    else:
        you = ctx.t("price_you_short", balance=view.credits)
    return "%s %s" % (ctx.t("price_paid", price=price), you)


def _incoming_image(message: types.Message):
    """Return (file_id, declared size in bytes or None) of a photo or an image document.

    Raises InvalidInput(not_an_image / unsupported_format) for other documents.
    """
    if message.content_type == "photo":
        largest = message.photo[-1]   # sizes are ordered; the last one is the largest
        return largest.file_id, largest.file_size
    document = message.document
    mime = (document.mime_type or "").lower()
    if mime in IMAGE_MIME_TYPES:
        return document.file_id, document.file_size
    if mime.startswith("image/"):
        raise media.InvalidInput("unsupported_format")
    raise media.InvalidInput("not_an_image")


def on_image(message: types.Message, ctx: Ctx) -> None:
    """A photo or image document while a mode waits for images: check it, then keep its file id.

    A caption is the prompt (edit, merge): no second question. The photos of an album (one
    update each, handled concurrently) are one input: an album gets one reply, edited as its
    photos come in (merge: the count, the photos over the limit), edit takes the first photo and
    says so, face swap takes face + target.
    """
    spec = media.mode_spec(ctx.data.get("mode"))
    group = message.media_group_id
    if len(ctx.data.get("files", [])) >= spec.max_images and not group:
        return _too_many_images(ctx, spec)
    file_id, declared = _incoming_image(message)
    media.check_declared_size(declared, ctx.cfg)           # > 20 MB: refused before downloading
    media.inspect_image(worker.download_file(file_id, ctx.cfg), ctx.cfg)
    caption = (message.caption or "").strip()
    outcome = ctx.update(functools.partial(_add_image, ctx, spec, [message.message_id, file_id], caption, group))
    if outcome == "late_caption":
        return _take_input(ctx, spec, caption)
    if outcome == -1:
        return _too_many_images(ctx, spec)
    if outcome is None:
        return
    count, role, album = outcome
    if album is not None and _collects(spec):
        return _album_reply(ctx, spec, role, album)
    if album is not None and (count < spec.max_images or album["extra"]):
        return                                             # the album's next photo is the next image
    _after_image(ctx, spec, count, album_note=album is not None and spec.max_images == 1)


def _add_image(ctx: Ctx, spec: media.ModeSpec, entry: list, caption: str, group, record: dict):
    """Add image `entry` ([message id, file id]) to the chat's state `record`, under the chat's lock
    (album photos race here). Returns (images now, album role "send"/"edit"/None, album copy),
    "late_caption" (an album's caption came with a photo after the flow moved on), -1 (over the
    limit, not in an album) or None (the flow changed meanwhile)."""
    data = record["data"]
    files = data.setdefault("files", [])
    album = data.get("album") if group and (data.get("album") or {}).get("group") == group else None
    if record["state"] != Step.images.name or data.get("mode") != spec.name:
        if (album is not None and caption and spec.needs_prompt and data.get("mode") == spec.name
                and record["state"] == Step.prompt.name and not data.get("caption")):
            data["caption"] = caption
            ctx.state, ctx.data = record["state"], copy.deepcopy(data)
            return "late_caption"
        return None
    if caption and spec.needs_prompt:
        data["caption"] = caption
    role = None
    if group:
        role = "edit" if album is not None else "send"
        if album is None:
            album = data["album"] = {"group": group, "msg": None, "extra": 0}
    if len(files) >= spec.max_images:
        if album is None:
            return -1
        album["extra"] += 1
    else:
        files.append(entry)
        files.sort()                                       # album order, whatever order they arrive in
        if len(files) >= spec.max_images and _typed(spec) and not _collects(spec):
            record["state"] = Step.prompt.name
    ctx.state, ctx.data = record["state"], copy.deepcopy(data)
    return len(files), role, copy.deepcopy(album)


def _collected_text(ctx: Ctx, spec: media.ModeSpec, count: int, extra: int) -> str:
    """What a collecting mode (merge) says after `count` images: the count, or that more are needed;
    `extra`: the album's photos over the limit, dropped."""
    text = ctx.t("merge_photo_added", count=count, max=spec.max_images)
    if count < spec.min_images:
        text = ctx.t("merge_need_more", count=count)
    if extra:
        text += "\n" + ctx.t("album_extra_dropped", count=extra)
    return text


def _album_reply(ctx: Ctx, spec: media.ModeSpec, role: str, album: dict) -> None:
    """One reply per merge album: the first photo's handler sends it, the others edit it."""
    markup = _done_markup(ctx) if len(ctx.data.get("files", [])) >= spec.min_images else _cancel_markup(ctx)
    if role == "send":
        sent = _send(ctx, _collected_text(ctx, spec, len(ctx.data.get("files", [])), album["extra"]), markup)

        def store(record):
            current = record["data"].get("album") or {}
            if current.get("group") == album["group"]:
                current["msg"] = sent.message_id
            return len(record["data"].get("files", [])), current.get("extra", 0)

        shown = (len(ctx.data.get("files", [])), album["extra"])
        if ctx.update(store) != shown:                     # photos added while it was being sent
            _show_album(ctx, spec, sent.message_id, album["group"], None)
    elif album.get("msg"):
        _show_album(ctx, spec, album["msg"], album["group"], None)


def _album_now(ctx: Ctx, group) -> tuple | None:
    """(photos taken, photos over the limit) of album `group` as stored now (a read: no write)."""
    def read(record):
        current = record["data"].get("album") or {}
        if current.get("group") != group:
            return None
        return len(record["data"].get("files", [])), current.get("extra", 0)
    return ctx.update(read)


def _show_album(ctx: Ctx, spec: media.ModeSpec, message_id: int, group, shown: tuple | None) -> None:
    """Edit the album's reply to the stored count, and again while the stored count moved during the
    edit: the album's photos are handled concurrently and their edits can reach Telegram in any
    order, so every handler ends with the final text (at most 5 edits each)."""
    for _ in range(5):
        now = _album_now(ctx, group)
        if now is None or now == shown:
            return
        count, extra = shown = now
        markup = _done_markup(ctx) if count >= spec.min_images else _cancel_markup(ctx)
        try:
            worker.tg(ctx.bot.edit_message_text, _collected_text(ctx, spec, count, extra), chat_id=ctx.chat_id,
                      message_id=message_id, reply_markup=markup)
        except apihelper.ApiTelegramException as exc:      # "message is not modified": already right
            logger.info("album reply %s not edited: %s", message_id, exc.description)


def _done_markup(ctx: Ctx) -> types.InlineKeyboardMarkup:
    return _markup([[(ctx.t("btn_done"), ctx.button("done"))], [(ctx.t("btn_cancel"), ctx.button("cancel"))]])


def _too_many_images(ctx: Ctx, spec: media.ModeSpec) -> None:
    markup = _done_markup(ctx) if _collects(spec) else _cancel_markup(ctx)
    _send(ctx, ctx.t("too_many_photos", limit=spec.max_images), markup)


def _file_ids(ctx: Ctx) -> list[str]:
    return [file_id for _, file_id in ctx.data.get("files", [])]


def _after_image(ctx: Ctx, spec: media.ModeSpec, count: int, *, album_note: bool = False) -> None:
    """Say what comes next after image number `count`: the count (collecting modes), the next
    image's question, or — all images in — the next step. `album_note`: say that only the
    album's first photo is used."""
    if album_note:
        _send(ctx, ctx.t("album_first_photo_used"))
    if _collects(spec):
        markup = _done_markup(ctx) if count >= spec.min_images else _cancel_markup(ctx)
        _send(ctx, _collected_text(ctx, spec, count, 0), markup)
    elif count < spec.max_images:
        _send(ctx, ctx.t(spec.image_keys[min(count, len(spec.image_keys) - 1)]), _cancel_markup(ctx))
    else:
        _after_images(ctx, spec)


def _after_images(ctx: Ctx, spec: media.ModeSpec, *, with_price: bool = False) -> None:
    """Every image is in (the flow is already at Step.prompt for a typed mode): a caption is the
    prompt; else ask for the typed input (`with_price`: and say the price), or go on."""
    if not _typed(spec):
        return _finish(ctx, spec)
    if spec.needs_prompt and ctx.data.get("caption"):
        return _take_input(ctx, spec, ctx.data["caption"])
    question = ctx.t(spec.input_key)
    if with_price:
        question = "%s %s" % (question, _price_text(ctx, spec.name))
    _send(ctx, question, _cancel_markup(ctx))


def on_done(call: types.CallbackQuery, ctx: Ctx) -> None:
    """"✅ Готово" in a collecting mode (merge, 2–4 photos): go on with the photos sent."""
    spec = media.MODE_SPECS.get(ctx.data.get("mode"))
    if spec is None or not _collects(spec):
        return on_stale_button(call, ctx)
    count = len(ctx.data.get("files", []))
    if ctx.token == ctx.data.get("flow") and count < spec.min_images:
        _answer(ctx)                                       # not enough photos: "Готово" is not spent
        _send(ctx, _collected_text(ctx, spec, count, 0), _cancel_markup(ctx))
        return
    after = Step.prompt.name if _typed(spec) else None
    if _claim(ctx, "done", states=(Step.images.name,), mode=spec.name,
              change=lambda record: record.__setitem__("state", after)):
        _after_images(ctx, spec)


def on_input(message: types.Message, ctx: Ctx) -> None:
    """The typed input of the flow's mode: its prompt, instruction or text to draw."""
    spec = media.MODE_SPECS.get(ctx.data.get("mode"))
    if spec is None or not _typed(spec):
        return on_unexpected(message, ctx)
    _take_input(ctx, spec, message.text)


def _take_input(ctx: Ctx, spec: media.ModeSpec, text: str | None) -> None:
    """Check the typed input (`media.validate_input`), then ask the mode's first option or finish."""
    value = media.validate_input(spec, text, ctx.cfg)
    if not spec.options:
        return _finish(ctx, spec, value=value)
    ctx.go(Step.option, input=value, option=spec.options[0].name, chosen={})
    _ask_option(ctx, spec.options[0])


def _ask_option(ctx: Ctx, option: media.Option) -> None:
    """The question of `option` with a button per choice, `option.per_row` in a row, and "✖ Отмена"."""
    buttons = [(ctx.t(option.label_key % choice) if option.label_key else choice,
                ctx.button("%s:%s" % (option.button, choice))) for choice in option.choices]
    rows = [buttons[i:i + option.per_row] for i in range(0, len(buttons), option.per_row)]
    _send(ctx, ctx.t(option.ask_key), _markup(rows + [[(ctx.t("btn_cancel"), ctx.button("cancel"))]]))


def on_option(call: types.CallbackQuery, ctx: Ctx) -> None:
    """An option button ("<option.button>:<choice>"): keep the choice (once per flow), then ask
    the next option or finish."""
    button, choice = call.data.split(":", 1)
    option = OPTION_BUTTONS.get(button)
    if option is None or choice not in option.choices:
        return on_stale_button(call, ctx)

    def choose(record):
        data = record["data"]
        data.setdefault("chosen", {})[option.name] = choice
        later = _options_after(media.mode_spec(data["mode"]), option)
        if later:
            data["option"] = later[0].name

    if not _claim(ctx, button, states=(Step.option.name,), check=lambda data: data.get("option") == option.name,
                  change=choose):
        return
    spec = media.mode_spec(ctx.data["mode"])
    later = _options_after(spec, option)
    if later:
        return _ask_option(ctx, later[0])
    _finish(ctx, spec, value=ctx.data.get("input"), options=ctx.data.get("chosen"))


def _options_after(spec: media.ModeSpec, option: media.Option) -> tuple:
    return spec.options[spec.options.index(option) + 1:]


# Every option by the callback-data prefix of its buttons.
OPTION_BUTTONS = {option.button: option for spec in media.MODE_SPECS.values() for option in spec.options}


def _finish(ctx: Ctx, spec: media.ModeSpec, *, value: str | None = None, options: dict | None = None) -> None:
    """Every input is in: a paid mode becomes a job (`_accept`), the local one (add_text) is drawn
    here and sent at once, free."""
    if not spec.local:
        _accept(ctx, spec.name, prompt=value, options=options, file_ids=_file_ids(ctx))
        return
    image = worker.download_file(_file_ids(ctx)[0], ctx.cfg)
    png = worker.render_add_text(image, value, cfg=ctx.cfg, **(options or {}))
    ctx.finish()
    worker.tg(ctx.bot.send_photo, ctx.chat_id, ("text.png", png), caption=ctx.t("add_text_done"),
              reply_markup=_markup([[(ctx.t("btn_add_text_again"), "mode:" + spec.name),
                                     (ctx.t("btn_menu"), "menu")]]))


def _accept(ctx: Ctx, mode: str, *, prompt=None, options=None, file_ids=()) -> Generation | None:
    """Hand a job to the worker (validates, reserves, enqueues) and end the flow. A job refused for
    credits or the active-job limit keeps its inputs as a draft and offers to continue."""
    inputs = dict(prompt=prompt, options=options or {}, file_ids=list(file_ids))
    try:
        generation = worker.accept_generation(ctx.user, ctx.chat_id, mode, cfg=ctx.cfg, **inputs)
    except (billing.InsufficientCredits, worker.TooManyJobs) as exc:
        short = isinstance(exc, billing.InsufficientCredits)
        ctx.finish()
        draft = worker.save_draft(ctx.user.id, ctx.chat_id, mode, reason="credits" if short else "jobs",
                                  cfg=ctx.cfg, **inputs)
        logger.info("user %s: %s refused (%s), draft kept", ctx.user.id, mode, type(exc).__name__)
        _send(ctx, worker.refusal_text(exc, ctx.lang),
              worker.draft_buttons(draft, ctx.lang, topup=short and ctx.cfg.yookassa_configured))
        return None
    finally:
        ctx.finish()                                       # accepted or refused, this flow is over
    _after_accept(ctx, generation)
    return generation


def _draft_tap(ctx: Ctx) -> models.Draft | None:
    """Claim a draft button (once per draft) and take the draft; None (answered) when gone."""
    token = ctx.call.data.split(":", 1)[1]
    if not billing.claim_action("tap:draft:%s:%s" % (ctx.user.id, token[:40])):
        _already_done(ctx)
        return None
    draft = worker.take_draft(ctx.user.id, token)
    if draft is None:
        on_stale_button(ctx.call, ctx)
        return None
    _answer(ctx)
    _drop_keyboard(ctx)
    return draft


def on_draft_retry(call: types.CallbackQuery, ctx: Ctx) -> None:
    """🔁 Повторить: the kept inputs as a new job."""
    draft = _draft_tap(ctx)
    if draft is not None:
        _accept(ctx, draft.mode, prompt=draft.prompt, options=dict(draft.options or {}),
                file_ids=list(draft.input_file_ids or []))


def on_draft_edit(call: types.CallbackQuery, ctx: Ctx) -> None:
    """✏️ Изменить запрос: the same photos, ask for a new prompt."""
    draft = _draft_tap(ctx)
    if draft is None:
        return
    files = [[n, file_id] for n, file_id in enumerate(draft.input_file_ids or [])]
    ctx.start_flow(Step.prompt, mode=draft.mode, files=files)
    key = "ask_new_prompt" if media.mode_spec(draft.mode).max_images else "ask_new_generate_prompt"
    _send(ctx, ctx.t(key), _cancel_markup(ctx))


def on_pay_for_draft(call: types.CallbackQuery, ctx: Ctx) -> None:
    """💰 Пополнить и продолжить: remember to start the draft once a top-up is credited, then the
    top-up screen."""
    token = call.data.split(":", 1)[1]
    if worker.mark_draft_resume(ctx.user.id, token) is None:
        return on_stale_button(call, ctx)
    if not billing.claim_action("tap:payfor:%s:%s" % (ctx.user.id, token[:40])):
        return _already_done(ctx)                          # one top-up screen per tap
    _answer(ctx)
    ctx.finish()
    show_balance(ctx, resume_note=True)


def _after_accept(ctx: Ctx, generation: Generation) -> None:
    """Show the "⏳ в очереди" status message the worker then edits in place."""
    markup = _markup([[(ctx.t("btn_cancel_job"), "jobcancel:%s" % generation.id)]])
    sent = _send(ctx, ctx.t("job_queued", position=worker.queue_position(generation.id) or 1), markup)
    with billing.writer_turn():                            # a write: take the turn (see PeeweeStateStorage)
        Generation.update(status_message_id=sent.message_id).where(
            (Generation.id == generation.id) & Generation.status_message_id.is_null()).execute()
    if Generation.get_by_id(generation.id).status not in worker.ACTIVE_STATES:
        # The worker finished before it could see the id: remove the stale "в очереди" itself.
        worker.tg(ctx.bot.delete_message, ctx.chat_id, sent.message_id)


def on_again(call: types.CallbackQuery, ctx: Ctx) -> None:
    """🔁 Ещё раз: the same mode, prompt and inputs as a new job (a new reservation)."""
    try:
        generation_id = uuid.UUID(call.data.split(":", 1)[1])
    except ValueError:
        return on_stale_button(call, ctx)
    old = Generation.get_or_none((Generation.id == generation_id) & (Generation.user == ctx.user.id))
    if old is None:
        return on_stale_button(call, ctx)
    if not billing.claim_action("tap:again:%s" % old.id):     # one new job per result, however many taps
        return _already_done(ctx)
    _answer(ctx)
    _drop_keyboard(ctx, worker.result_buttons(old, ctx.lang, again=False))   # the other actions stay
    _accept(ctx, old.mode, prompt=old.prompt, options=dict(old.options or {}), file_ids=list(old.input_file_ids or []))


def on_job_cancel(call: types.CallbackQuery, ctx: Ctx) -> None:
    """✖ Отменить on a queued job's status message."""
    try:
        generation_id = uuid.UUID(call.data.split(":", 1)[1])
    except ValueError:
        return on_stale_button(call, ctx)
    if worker.cancel_generation(generation_id, ctx.user.id, ctx.cfg):
        _answer(ctx, ctx.t("job_cancelled_short"))
        worker.tg(ctx.bot.edit_message_text, ctx.t("job_cancelled"), chat_id=ctx.chat_id,
                  message_id=call.message.message_id, reply_markup=_main_menu_markup(ctx))
    else:
        _answer(ctx, ctx.t("job_not_cancellable"), alert=True)


# --- results as inputs, /history --------------------------------------------------------------

HISTORY_SIZE = 10


def _own_result(ctx: Ctx, raw: str) -> Generation | None:
    """The user's delivered generation with id `raw` that has a stored result file id, or None."""
    try:
        generation_id = uuid.UUID(raw)
    except ValueError:
        return None
    return Generation.get_or_none((Generation.id == generation_id) & (Generation.user == ctx.user.id)
                                  & (Generation.status == "delivered") & Generation.result_file_id.is_null(False))


def on_use_result(call: types.CallbackQuery, ctx: Ctx) -> None:
    """"✏️ Изменить это" / "⬆️ Улучшить это" / "📝 Добавить текст": the result is the next input."""
    _, mode, raw = (call.data.split(":", 2) + ["", ""])[:3]
    gen = _own_result(ctx, raw)
    if gen is None or mode not in dict(worker.RESULT_ACTIONS):
        return on_stale_button(call, ctx)
    _answer(ctx)
    worker.discard_draft(ctx.user.id)
    spec = media.mode_spec(mode)
    ctx.start_flow(Step.prompt if _typed(spec) else None, mode=mode, files=[[0, gen.result_file_id]])
    _after_images(ctx, spec, with_price=True)


def cmd_history(message: types.Message, ctx: Ctx) -> None:
    """/history: the last results (mode, date, cost), each to send again (with its actions) or to
    make again."""
    ctx.finish()
    results = list(Generation.select().where((Generation.user == ctx.user.id) & (Generation.status == "delivered")
                                             & Generation.result_file_id.is_null(False))
                   .order_by(Generation.created_at.desc()).limit(HISTORY_SIZE))
    if not results:
        return _send(ctx, ctx.t("history_empty"), _menu_button_markup(ctx))
    lines, rows = [ctx.t("history_title")], []
    for n, gen in enumerate(results, start=1):
        cost = ctx.t("history_cost_credits", cost=gen.cost) if gen.cost else ctx.t("history_cost_free")
        lines.append(ctx.t("history_line", n=n, mode=ctx.t("job_mode_" + gen.mode), cost=cost,
                           date=(gen.finished_at or gen.created_at).strftime("%d.%m %H:%M")))
        rows.append([(ctx.t("btn_history_send", n=n), "hsend:%s" % gen.id),
                     (ctx.t("btn_history_rerun", n=n), ctx.button("rerun:%s" % gen.id))])
    lines.append(ctx.t("history_hint"))
    rows.append([(ctx.t("btn_menu"), "menu")])
    _send(ctx, "\n".join(lines), _markup(rows))


def on_history_send(call: types.CallbackQuery, ctx: Ctx) -> None:
    """📤 N: send the result again by its Telegram file id, with the result's actions."""
    gen = _own_result(ctx, call.data.split(":", 1)[1])
    if gen is None:
        return on_stale_button(call, ctx)
    _answer(ctx)
    caption = ctx.t("history_resent", mode=ctx.t("job_mode_" + gen.mode),
                    date=(gen.finished_at or gen.created_at).strftime("%d.%m.%Y %H:%M"))
    markup = worker.result_buttons(gen, ctx.lang, again=False)
    try:
        worker.tg(ctx.bot.send_photo, ctx.chat_id, gen.result_file_id, caption=caption, reply_markup=markup)
    except apihelper.ApiTelegramException:                 # it was sent as a document
        worker.tg(ctx.bot.send_document, ctx.chat_id, gen.result_file_id, caption=caption, reply_markup=markup)


def on_history_rerun(call: types.CallbackQuery, ctx: Ctx) -> None:
    """🔁 N in /history: the same mode, prompt and inputs as a new job (once per list)."""
    raw = call.data.split(":", 1)[1]
    gen = _own_result(ctx, raw)
    if gen is None:
        return on_stale_button(call, ctx)
    if not _claim(ctx, "rerun:%s" % raw[:8], drop=False):
        return
    _accept(ctx, gen.mode, prompt=gen.prompt, options=dict(gen.options or {}), file_ids=list(gen.input_file_ids or []))


# --------------------------------------------------------------------------------------------
# Balance and top-ups
# --------------------------------------------------------------------------------------------


def _active_discount(ctx: Ctx):
    """Return the remembered discount code (a PromoCode) if it is still valid for this user."""
    code = ctx.data.get("promo_code")
    if not code:
        return None
    try:
        return promo.check_discount(code, ctx.user.id)
    except promo.PromoError as exc:
        logger.info("user %s: remembered promo code dropped (%s)", ctx.user.id, exc)
        ctx.update(lambda record: record["data"].pop("promo_code", None))
        ctx.data.pop("promo_code", None)
        return None


def show_balance(ctx: Ctx, *, resume_note: bool = False) -> None:
    """The balance and the top-up menu: amounts (discounted when a code is active), other amount,
    promo code, cancel (`resume_note`: the draft starts once paid)."""
    discount = _active_discount(ctx)
    lines = [ctx.t("balance_title"), _status_lines(ctx), ctx.t("price_line", price=ctx.cfg.price_per_operation)]
    if resume_note:
        lines.append(ctx.t("draft_topup_note"))
    link = _referral_link(ctx) if ctx.cfg.referral_bonus > 0 else None
    if link:
        lines.append(ctx.t("referral_line", bonus=ctx.cfg.referral_bonus, link=link))
    if discount is not None:
        lines.append(ctx.t("promo_active", code=discount.code, percent=discount.percent))
    rows = []
    if ctx.cfg.yookassa_configured:
        lines.append(ctx.t("choose_amount"))
        buttons = []
        for credits in ctx.cfg.topup_amounts:
            if discount is not None:
                price = promo.discounted_kopecks(credits, discount.percent)
                label = ctx.t("btn_amount_discounted", credits=credits, price=_rub(price, exact=False))
            else:
                label = ctx.t("btn_amount", credits=credits)
            buttons.append((label, ctx.button("amount:%d" % credits)))
        rows += [buttons[i:i + 2] for i in range(0, len(buttons), 2)]
        rows.append([(ctx.t("btn_other_amount"), "amount_custom")])
    if ctx.cfg.stars_enabled:       # beside the card payment, and also without YooKassa
        rows.append([(ctx.t("btn_stars"), "stars")])
    if rows:
        rows.append([(ctx.t("btn_promo"), "promo")])
        rows.append([(ctx.t("btn_cancel"), ctx.button("cancel"))])
        lines += _support_lines(ctx)
    else:   # nothing to pay with: no top-up or promo buttons that lead nowhere
        lines.append(ctx.t("payments_not_configured_contact", contact=ctx.cfg.support_contact)
                     if ctx.cfg.support_contact else ctx.t("payments_not_configured"))
        rows.append([(ctx.t("btn_menu"), "menu")])
    _send(ctx, "\n".join(lines), _markup(rows))


def cmd_balance(message: types.Message, ctx: Ctx) -> None:
    """/balance."""
    ctx.finish()
    show_balance(ctx)


def on_pay(call: types.CallbackQuery, ctx: Ctx) -> None:
    """💰 Оплатить / Баланс (and "💰 Пополнить")."""
    _answer(ctx)
    ctx.finish()
    show_balance(ctx)


def on_amount(call: types.CallbackQuery, ctx: Ctx) -> None:
    """A top-up amount button."""
    try:
        credits = int(call.data.split(":", 1)[1])
    except ValueError:
        return on_stale_button(call, ctx)
    if credits not in ctx.cfg.topup_amounts:
        return on_stale_button(call, ctx)
    if not _claim(ctx, "amount"):                            # one order per balance screen
        return
    _start_topup(ctx, credits)


def on_amount_custom(call: types.CallbackQuery, ctx: Ctx) -> None:
    """"Другая сумма": ask for a whole number of credits."""
    _answer(ctx)
    if not ctx.cfg.yookassa_configured:
        raise payments.PaymentsNotConfigured()
    ctx.start_flow(Step.amount)
    _send(ctx, ctx.t("ask_amount", min=ctx.cfg.min_topup, max=ctx.cfg.max_topup), _cancel_markup(ctx))


def on_amount_text(message: types.Message, ctx: Ctx) -> None:
    """The custom amount the user typed."""
    credits = payments.parse_credits(message.text or "", ctx.cfg)
    _start_topup(ctx, credits)


def _start_topup(ctx: Ctx, credits: int) -> None:
    """Ask for the receipt e-mail first if needed, else create the payment."""
    if not ctx.cfg.yookassa_configured:
        raise payments.PaymentsNotConfigured()
    if ctx.cfg.yookassa_receipts and not ctx.user.email:
        ctx.start_flow(Step.email, credits=credits)
        _send(ctx, ctx.t("payment_email_required"), _cancel_markup(ctx))
        return
    _create_topup(ctx, credits)


def _create_topup(ctx: Ctx, credits: int) -> None:
    discount = _active_discount(ctx)
    try:
        payment = payments.create_topup(ctx.user.id, credits, promo_code=discount.code if discount else None,
                                        cfg=ctx.cfg)
    except payments.EmailRequired:
        ctx.start_flow(Step.email, credits=credits)
        _send(ctx, ctx.t("payment_email_required"), _cancel_markup(ctx))
        return
    ctx.finish()
    lines = [ctx.t("topup_created", credits=payment.credits, amount=_rub(payment.amount_kopecks))]
    if payment.discount_percent:
        lines.append(ctx.t("topup_discount", percent=payment.discount_percent))
    lines += _support_lines(ctx)
    rows = [[(ctx.t("btn_pay_url", amount=_rub(payment.amount_kopecks, exact=False)), None, payment.confirmation_url)],
            [(ctx.t("btn_check_payment"), "check:%s" % payment.id)],
            [(ctx.t("btn_menu"), "menu")]]
    _send(ctx, "\n".join(lines), _markup(rows))


def on_email(message: types.Message, ctx: Ctx) -> None:
    """The e-mail for 54-FZ receipts (asked once), then the payment."""
    credits = ctx.data.get("credits")
    ctx.user = payments.set_email(ctx.user.id, message.text or "")
    if not credits:
        ctx.finish()
        return show_balance(ctx)
    _create_topup(ctx, int(credits))


def on_check(call: types.CallbackQuery, ctx: Ctx) -> None:
    """"Проверить оплату": ask YooKassa, credit if paid, tell the user."""
    try:
        payment_id = uuid.UUID(call.data.split(":", 1)[1])
    except ValueError:
        return on_stale_button(call, ctx)
    payment = payments.check_payment(payment_id, ctx.user.id, cfg=ctx.cfg)
    if payment.status == "succeeded":
        _answer(ctx)
        # Told once: whoever claims first (this button or the worker after a webhook) says it.
        worker.referral_bonus(payment.id, ctx.cfg)            # idempotent: once per referred user
        told = payments.claim_notification(payment.id)
        key = "payment_received" if told else "payment_already_credited"
        _send(ctx, "%s\n\n%s" % (ctx.t(key, credits=payment.credits), _status_lines(ctx)), _main_menu_markup(ctx))
        if told:
            worker.resume_draft(ctx.user.id, ctx.cfg)       # "Пополнить и продолжить"
    elif payment.status == "canceled":
        _answer(ctx)
        billing.claim_action("notice:canceled:%s" % payment.id)   # told here: the worker stays quiet
        _send(ctx, ctx.t("payment_canceled"), _menu_button_markup(ctx))
    else:
        _answer(ctx, ctx.t("payment_pending"), alert=True)


def on_stars(call: types.CallbackQuery, ctx: Ctx) -> None:
    """"⭐ Telegram Stars": the same top-up amounts priced in Stars (promo codes do not apply)."""
    _answer(ctx)
    if not ctx.cfg.stars_enabled:
        raise stars.StarsNotEnabled()
    ctx.finish()
    buttons = [(ctx.t("btn_stars_amount", credits=credits, stars=stars.price_stars(credits, ctx.cfg)),
                ctx.button("stars:%d" % credits)) for credits in ctx.cfg.topup_amounts]
    rows = [buttons[i:i + 2] for i in range(0, len(buttons), 2)] + [[(ctx.t("btn_cancel"), ctx.button("cancel"))]]
    _send(ctx, ctx.t("stars_title", rate=ctx.cfg.stars_per_100_credits), _markup(rows))


def on_stars_amount(call: types.CallbackQuery, ctx: Ctx) -> None:
    """A Stars amount button: our order first, then an invoice in XTR (empty provider token, one
    price in whole Stars, the order id as payload)."""
    try:
        credits = int(call.data.split(":", 1)[1])
    except ValueError:
        return on_stale_button(call, ctx)
    if credits not in ctx.cfg.topup_amounts:
        return on_stale_button(call, ctx)
    if not _claim(ctx, "stars"):                             # one invoice per Stars screen
        return
    order = stars.create_order(ctx.user.id, credits, ctx.cfg)
    worker.tg(ctx.bot.send_invoice, ctx.chat_id, ctx.t("stars_invoice_title", credits=credits)[:stars.TITLE_MAX],
              ctx.t("stars_invoice_description", credits=credits)[:stars.DESCRIPTION_MAX], str(order.id), "",
              stars.CURRENCY, [types.LabeledPrice(ctx.t("stars_price_label", credits=credits), order.amount_kopecks)])


def on_pre_checkout(bot: telebot.TeleBot, cfg: config.Config, query: types.PreCheckoutQuery) -> None:
    """Answer a pre_checkout_query at once (Telegram cancels the payment after 10 s): ok only for a
    pending Stars order of this user with this amount and currency, else ok=False with the reason
    in the user's language. Never raises."""
    lang = texts.lang_of(getattr(query.from_user, "language_code", None))
    try:
        reason = stars.check_pre_checkout(query.from_user.id, query.invoice_payload, query.currency,
                                          query.total_amount)
    except Exception:  # noqa: BLE001 - the query must be answered whatever happens
        logger.exception("pre-checkout %s: could not check the order", query.id)
        reason = "error"
    try:
        if reason is None:
            worker.tg(bot.answer_pre_checkout_query, query.id, ok=True)
        else:
            worker.tg(bot.answer_pre_checkout_query, query.id, ok=False,
                      error_message=texts.t("stars_precheckout_" + reason, lang))
    except Exception as exc:  # noqa: BLE001 - late (Telegram canceled the payment) or Telegram down
        logger.warning("pre-checkout %s: answer failed (%s)", query.id, _redact(str(exc), bot.token))


def on_payment_message(bot: telebot.TeleBot, cfg: config.Config, message: types.Message) -> None:
    """A successful_payment or refunded_payment service message in Stars: credit the order once
    (keyed on the charge id) and tell the user once, or take the refund's credits back once and
    tell the user; a payment that matches no order is never dropped — the admins are told, and the
    payer that it will be checked by hand."""
    paid, refunded, sender = message.successful_payment, message.refunded_payment, message.from_user
    if paid is not None:              # any currency: one we never invoiced is a mismatch for the admins
        outcome = stars.apply_successful_payment(sender.id, paid.currency, paid.total_amount, paid.invoice_payload,
                                                 paid.telegram_payment_charge_id, "successful_payment")
        if outcome.detail in ("needs_attention", "unmatched"):
            worker.alert_admins("stars:%s" % paid.telegram_payment_charge_id,
                                texts.t("admin_alert_stars", "ru", problem=outcome.problem), cfg)
            payer = User.get_or_none(User.telegram_id == sender.id)
            if payer is not None:                           # the payer hears it is not lost, once
                worker.tell_user_once("notice:stars:%s" % paid.telegram_payment_charge_id, payer.id,
                                      "notify_stars_mismatch", cfg)
        elif outcome.order_id is not None:
            worker.tell_payment(outcome.order_id, cfg)       # once per order, whichever copy gets here first
    elif refunded is not None:
        try:
            refund = stars.apply_refund(refunded.telegram_payment_charge_id, "refunded_payment")
        except payments.PaymentError as exc:
            worker.alert_admins("stars_refund:%s" % refunded.telegram_payment_charge_id, texts.t(
                "admin_alert_stars", "ru", problem="refund of %s Stars, charge %s: %s" % (
                    refunded.total_amount, refunded.telegram_payment_charge_id, exc)), cfg)
            return
        if refund is not None:
            worker.tell_refund(refund.id, cfg)


def on_promo(call: types.CallbackQuery, ctx: Ctx) -> None:
    """"🎟️ Промокод": ask for a code."""
    _answer(ctx)
    ctx.start_flow(Step.promo)
    _send(ctx, ctx.t("ask_promo"), _cancel_markup(ctx))


def on_promo_text(message: types.Message, ctx: Ctx) -> None:
    """A promo code: free access is redeemed now; a discount is remembered for the next top-up."""
    code = promo.normalize(message.text or "")
    try:
        discount = promo.check_discount(code, ctx.user.id)
    except promo.WrongCodeKind:
        ctx.user = promo.redeem_free_access(code, ctx.user.id)
        ctx.finish()
        _send(ctx, "%s\n\n%s" % (ctx.t("free_access_granted"), _status_lines(ctx)), _main_menu_markup(ctx))
        return
    ctx.start_flow(None, promo_code=discount.code)
    show_balance(ctx)


# --------------------------------------------------------------------------------------------
# Admin commands
# --------------------------------------------------------------------------------------------


def _is_admin(message: types.Message, cfg: config.Config) -> bool:
    return message.from_user is not None and message.from_user.id in cfg.admin_ids


def _args(message: types.Message) -> list[str]:
    return (telebot.util.extract_arguments(message.text or "") or "").split()


_NUMBER = re.compile(r"[0-9]{1,18}", re.ASCII)   # str.isdigit() would accept "٣" and "²"


def _number(raw: str) -> int:
    """A positive whole number typed by an admin, ASCII digits only; raise AdminError (usage)."""
    if not _NUMBER.fullmatch(raw or "") or int(raw) <= 0:
        raise AdminError()
    return int(raw)


def _update_key(ctx: "Ctx", message: types.Message, command: str) -> str:
    """The idempotency key of an admin command: its Telegram update id (a redelivered update
    carries the same one), else the chat and message ids."""
    return "%s:%s" % (command, ctx.update_id if ctx.update_id is not None
                      else "%s:%s" % (ctx.chat_id, message.message_id))


def _target_user(raw: str) -> User:
    """Return the user with Telegram id `raw`; raise AdminError (usage, or "no such user")."""
    if not _NUMBER.fullmatch(raw or ""):
        raise AdminError()
    user = User.get_or_none(User.telegram_id == int(raw))
    if user is None:
        raise AdminError("admin_no_user", telegram_id=raw)
    return user


class AdminError(Exception):
    """An admin command cannot run: reply text `key` (None: the command's usage) with `values`."""

    def __init__(self, key: str | None = None, **values):
        super().__init__(key or "usage")
        self.key, self.values = key, values


def _admin(usage_key: str):
    """Wrap an admin handler: an AdminError becomes its text (by default the usage text)."""

    def wrap(handler):
        @functools.wraps(handler)
        def run(message, ctx):
            try:
                handler(message, ctx)
            except AdminError as exc:
                _send(ctx, ctx.t(exc.key or usage_key, **exc.values))

        return run

    return wrap


def collect_stats(now: datetime.datetime | None = None, days: int = 7) -> dict:
    """Read-only figures for /stats: users, active in 24 h, generations per day (last `days`) and
    per mode, failures, revenue (kopecks, succeeded RUB payments minus refunds; Stars payments are not
    roubles and count only as payments and paying users), paying users."""
    now = now or models.utcnow()
    day_ago = now - datetime.timedelta(hours=24)
    since = (now - datetime.timedelta(days=days - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
    users = User.select().count()
    day = fn.DATE(Generation.created_at)
    per_day = {str(row.day)[:10]: row.n for row in Generation.select(day.alias("day"), fn.COUNT(Generation.id).alias("n"))
               .where(Generation.created_at >= since).group_by(day).order_by(day)}
    per_mode = {row.mode: row.n for row in Generation.select(Generation.mode, fn.COUNT(Generation.id).alias("n"))
                .group_by(Generation.mode).order_by(Generation.mode)}
    succeeded = Payment.select().where(Payment.status == "succeeded")
    revenue = (Payment.select(fn.COALESCE(fn.SUM(Payment.amount_kopecks - Payment.refunded_kopecks), 0))
               .where((Payment.status == "succeeded") & (Payment.currency == "RUB")).scalar())   # Stars are not ₽
    payers = succeeded.select(fn.COUNT(fn.DISTINCT(Payment.user))).scalar()
    periods = {}
    for name, hours in (("day", 24), ("week", 24 * 7)):
        start = now - datetime.timedelta(hours=hours)
        paid = Payment.select().where((Payment.status == "succeeded") & (Payment.succeeded_at >= start))
        active = User.select().where(User.last_seen_at >= start).count()
        paying = paid.select(fn.COUNT(fn.DISTINCT(Payment.user))).scalar() or 0
        periods["revenue_%s_kopecks" % name] = int(paid.select(
            fn.COALESCE(fn.SUM(Payment.amount_kopecks - Payment.refunded_kopecks), 0)).scalar() or 0)
        periods["paying_%s" % name] = int(paying)
        periods["conversion_%s_percent" % name] = round(100.0 * paying / active, 1) if active else 0.0
    return {
        **periods,
        "users": users,
        "active_24h": User.select().where(User.last_seen_at >= day_ago).count(),
        "new_24h": User.select().where(User.created_at >= day_ago).count(),
        "generations_per_day": per_day,
        "generations_per_mode": per_mode,
        "generations_total": Generation.select().count(),
        "failed_24h": Generation.select().where((Generation.status == "failed") & (Generation.created_at >= day_ago)).count(),
        "failed_total": Generation.select().where(Generation.status == "failed").count(),
        "payments_succeeded": succeeded.count(),
        "revenue_kopecks": int(revenue or 0),
        "paying_users": int(payers or 0),
        "conversion_percent": round(100.0 * (payers or 0) / users, 1) if users else 0.0,
    }


@_admin("admin_usage_stats")
def cmd_stats(message: types.Message, ctx: Ctx) -> None:
    """/stats (admins)."""
    s = collect_stats()
    per_day = "\n".join("  %s: %s" % item for item in s["generations_per_day"].items()) or "  —"
    per_mode = "\n".join("  %s: %s" % (ctx.t("job_mode_" + mode) if "job_mode_" + mode in texts.TEXTS else mode, n)
                         for mode, n in s["generations_per_mode"].items()) or "  —"
    _send(ctx, ctx.t("admin_stats", per_day_text=per_day, per_mode_text=per_mode,
                     revenue=_rub(s["revenue_kopecks"]), revenue_day=_rub(s["revenue_day_kopecks"]),
                     revenue_week=_rub(s["revenue_week_kopecks"]), **s))


@_admin("admin_usage_user")
def cmd_user(message: types.Message, ctx: Ctx) -> None:
    """/user <telegram id> (admins)."""
    args = _args(message)
    if len(args) != 1:
        raise AdminError()
    user = _target_user(args[0])
    view = billing.get_balance(user.id)
    _send(ctx, ctx.t(
        "admin_user", telegram_id=user.telegram_id, id=user.id, username=user.username or "—",
        first_name=user.first_name or "—", created=user.created_at.strftime("%Y-%m-%d %H:%M"),
        last_seen=user.last_seen_at.strftime("%Y-%m-%d %H:%M"), blocked=ctx.t("yes" if user.is_blocked else "no"),
        free_access=ctx.t("yes" if view.free_access else "no"), credits=view.credits,
        reserved=view.credits_reserved, free_ops=view.free_ops,
        generations=Generation.select().where(Generation.user == user.id).count(),
        payments=Payment.select().where((Payment.user == user.id) & (Payment.status == "succeeded")).count())
        + "\n\n" + ctx.t("admin_user_ledger", lines="\n".join(_ledger_line(e) for e in ops.ledger_lines(user.id))
                         or "—"))


def _ledger_line(entry) -> str:
    return "%s %s %s %+d → %d (%+d → %d) %s" % (
        entry.created_at.strftime("%m-%d %H:%M"), entry.kind, entry.asset, entry.delta_available,
        entry.available_after, entry.delta_reserved, entry.reserved_after, entry.reference)


@_admin("admin_usage_payments")
def cmd_payments(message: types.Message, ctx: Ctx) -> None:
    """/payments <telegram id> (admins): the user's latest top-ups with YooKassa payment ids."""
    args = _args(message)
    if len(args) != 1:
        raise AdminError()
    user = _target_user(args[0])
    lines = []
    for p in ops.user_payments(user.id):
        refunded = ctx.t("admin_payment_refunded", amount=_rub(p.refunded_kopecks)) if p.refunded_kopecks else ""
        if p.provider == stars.PROVIDER:      # amount_kopecks counts whole Stars
            lines.append("%s ⭐ %s — %s ⭐, %s, %s%s" % (p.created_at.strftime("%Y-%m-%d %H:%M"),
                                                        p.telegram_charge_id or p.id, p.amount_kopecks, p.credits,
                                                        p.status, " ↩️" if p.refunded_kopecks else ""))
            continue
        lines.append("%s %s — %s ₽, %s, %s%s" % (p.created_at.strftime("%Y-%m-%d %H:%M"),
                                                     p.yookassa_payment_id or "—", _rub(p.amount_kopecks),
                                                     p.credits, p.status, refunded))
    _send(ctx, ctx.t("admin_payments", telegram_id=user.telegram_id, lines="\n".join(lines) or "—"))


@_admin("admin_usage_jobs")
def cmd_jobs(message: types.Message, ctx: Ctx) -> None:
    """/jobs failed (admins): the latest failed generations with their error class."""
    if _args(message) != ["failed"]:
        raise AdminError()
    lines = []
    for gen in ops.failed_generations():
        kind, exc = ops.error_class(gen.error)
        when = (gen.finished_at or gen.created_at).strftime("%m-%d %H:%M")
        lines.append("%s %s %s user %s: %s%s — %s" % (when, str(gen.id)[:8], gen.mode, gen.user_id, kind,
                                                      "/" + exc if exc else "", (gen.error or "")[:120]))
    _send(ctx, ctx.t("admin_jobs_failed", lines="\n".join(lines) or "—"))


@_admin("admin_usage_refund")
def cmd_refund(message: types.Message, ctx: Ctx) -> None:
    """/refund <YooKassa payment id> [amount ₽] (admins): a real refund through YooKassa; the
    credits are taken back by the refund path (`payments.refund_topup`)."""
    args = _args(message)
    if not 1 <= len(args) <= 2:
        raise AdminError()
    kopecks = None
    if len(args) == 2:
        try:
            kopecks = payments.value_to_kopecks(args[1].replace(",", "."))
        except ValueError:
            raise AdminError() from None
        if kopecks <= 0:
            raise AdminError()
    order = payments.find_order(args[0])
    if order is not None and order.provider == stars.PROVIDER:
        return _refund_stars(ctx, order, has_amount=kopecks is not None)
    key = "refund:%s" % (ctx.update_id if ctx.update_id is not None else "%s:%s" % (ctx.chat_id, message.message_id))
    try:
        result = payments.refund_topup(args[0], kopecks, idempotency_key=key, cfg=ctx.cfg)
    except payments.PaymentError as exc:
        logger.warning("admin %s: refund of %s failed: %s", ctx.telegram_id, args[0][:64], exc)
        raise AdminError("admin_refund_failed", reason=str(exc)) from None
    logger.info("admin %s refunded %s of %s: refund %s %s", ctx.telegram_id, _rub(result.kopecks), args[0][:64],
                result.refund_id, result.status)
    if result.applied is not None:
        _send(ctx, ctx.t("admin_refund_done", refund_id=result.refund_id, amount=_rub(result.kopecks),
                         credits=result.applied.credits_debited, shortfall=result.applied.shortfall))
    else:
        _send(ctx, ctx.t("admin_refund_pending", refund_id=result.refund_id, amount=_rub(result.kopecks),
                         status=result.status))


@_admin("admin_usage_settle")
def cmd_settle(message: types.Message, ctx: Ctx) -> None:
    """/settle <order id | YooKassa payment id | Stars charge id> credit|cancel (admins): settle an
    order stuck in needs_attention (`payments.settle`); a credit tells the user as a payment does."""
    args = _args(message)
    if len(args) != 2 or args[1] not in payments.SETTLE_ACTIONS:
        raise AdminError()
    try:
        order = payments.settle(args[0], args[1], admin=ctx.telegram_id)
    except payments.UnknownPayment:
        raise AdminError("admin_settle_unknown", reference=args[0][:64]) from None
    except payments.NotSettleable as exc:
        raise AdminError(exc.text_key, **exc.values) from None
    if order.status == "succeeded":
        worker.tell_payment(order.id, ctx.cfg)             # once per order, as for any credited payment
    _send(ctx, ctx.t("admin_settle_done", order=order.id, status=order.status, credits=order.credits))


def _refund_stars(ctx: Ctx, order: Payment, *, has_amount: bool) -> None:
    """/refund of a Stars order: the whole charge through refundStarPayment; the credits come back
    by the refund rule and the user is told (`stars.refund_order`)."""
    if has_amount:
        raise AdminError("admin_refund_stars_whole")
    try:
        refund = stars.refund_order(order, ctx.bot)
    except payments.PaymentError as exc:
        logger.warning("admin %s: Stars refund of order %s failed: %s", ctx.telegram_id, order.id, exc)
        raise AdminError("admin_refund_failed", reason=str(exc)) from None
    if refund is None:      # a refunded_payment update applied it first
        refund = models.Refund.get_by_id(stars.refund_id(order.telegram_charge_id))
    logger.info("admin %s refunded Stars order %s (charge %s)", ctx.telegram_id, order.id, order.telegram_charge_id)
    worker.tell_refund(refund.id, ctx.cfg)
    _send(ctx, ctx.t("admin_refund_stars_done", charge=order.telegram_charge_id, stars=refund.amount_kopecks,
                     credits=refund.credits_debited, shortfall=refund.shortfall))


@_admin("admin_usage_grant")
def cmd_grant(message: types.Message, ctx: Ctx) -> None:
    """/grant <telegram id> <credits> <reason> (admins); idempotent per update."""
    args = _args(message)
    if len(args) < 3:
        raise AdminError()
    credits = _number(args[1])
    user = _target_user(args[0])
    reason = " ".join(args[2:])[:100]
    key = _update_key(ctx, message, "grant")
    billing.credit(user.id, credits, kind="grant", reference="admin:%s:%s" % (ctx.telegram_id, reason),
                   idempotency_key=key)
    logger.info("admin %s granted %s credits to user %s", ctx.telegram_id, credits, user.id)
    worker.notify_grant(user.id, credits, key, ctx.cfg)
    _send(ctx, ctx.t("admin_granted", credits=credits, telegram_id=user.telegram_id,
                     balance=billing.get_balance(user.id).credits))


@_admin("admin_usage_free_access")
def cmd_free_access(message: types.Message, ctx: Ctx) -> None:
    """/free_access <telegram id> [days] (admins); idempotent per update (a redelivered update
    does not extend it twice)."""
    args = _args(message)
    if not 1 <= len(args) <= 2:
        raise AdminError()
    days = _number(args[1]) if len(args) == 2 else None
    user = _target_user(args[0])
    key = _update_key(ctx, message, "free_access")
    user = billing.set_free_access(user.id, days=days, idempotency_key=key)
    worker.notify_free_access(user.id, key, ctx.cfg)
    until = user.free_access_until.strftime("%d.%m.%Y") if user.free_access_until else ctx.t("forever")
    _send(ctx, ctx.t("admin_free_access", telegram_id=user.telegram_id, until=until))


def _set_blocked(message: types.Message, ctx: Ctx, blocked: bool) -> None:
    args = _args(message)
    if len(args) != 1:
        raise AdminError()
    user = _target_user(args[0])
    billing.set_blocked(user.id, blocked)
    logger.info("admin %s set blocked=%s for user %s", ctx.telegram_id, blocked, user.id)
    _send(ctx, ctx.t("admin_blocked" if blocked else "admin_unblocked", telegram_id=user.telegram_id))


@_admin("admin_usage_block")
def cmd_block(message: types.Message, ctx: Ctx) -> None:
    """/block <telegram id> (admins)."""
    _set_blocked(message, ctx, True)


@_admin("admin_usage_unblock")
def cmd_unblock(message: types.Message, ctx: Ctx) -> None:
    """/unblock <telegram id> (admins)."""
    _set_blocked(message, ctx, False)


def _promo_options(words: list[str]) -> dict:
    """Parse /promo_add options: ``uses=N``, ``days=N``, ``max=RUB`` (discount cap), ``valid=N``
    (days the code itself stays valid) and the word ``unlimited``; bare numbers are, in order,
    uses and days (the older form). Raises AdminError (usage)."""
    options: dict = {}
    positional = iter(("uses", "days"))
    for word in words:
        name, sep, value = word.lower().partition("=")
        if not sep and name == "unlimited":
            options["unlimited"] = True
            continue
        if not sep:
            name, value = next(positional, None), word
        if name not in ("uses", "days", "max", "valid") or name in options:
            raise AdminError()
        options[name] = _number(value)
    return options


@_admin("admin_usage_promo_add")
def cmd_promo_add(message: types.Message, ctx: Ctx) -> None:
    """/promo_add CODE <percent 1–99> [uses=N] [valid=DAYS] [max=RUB] — a discount;
    /promo_add CODE free_access days=N uses=N [valid=DAYS] — free access (both limits required);
    /promo_add CODE free_access unlimited — never-ending free access for anyone (explicit) (admins)."""
    args = _args(message)
    if len(args) < 2:
        raise AdminError()
    code, kind = args[0], args[1].lower()
    options = _promo_options(args[2:])
    valid = options.get("valid")
    expires = models.utcnow() + datetime.timedelta(days=valid) if valid else None
    try:
        if kind in ("free", "free_access"):
            if "max" in options:
                raise AdminError()
            created = promo.add_code(code, kind="free_access", max_uses=options.get("uses"),
                                     days=options.get("days"), expires_at=expires,
                                     unlimited=options.get("unlimited", False))
        elif _NUMBER.fullmatch(kind) and 1 <= int(kind) <= 99 and "unlimited" not in options:
            if "days" in options and valid is None:   # the older form: [days] is how long the code is valid
                expires = models.utcnow() + datetime.timedelta(days=options["days"])
            cap = options.get("max")
            created = promo.add_code(code, kind="discount", percent=int(kind), max_uses=options.get("uses"),
                                     expires_at=expires, max_discount_kopecks=cap * 100 if cap else None)
        else:
            raise AdminError()
    except promo.CodeExists:
        raise AdminError("admin_promo_exists", code=promo.normalize(code)) from None
    except promo.InvalidCode:
        raise AdminError() from None
    logger.info("admin %s added promo code %s", ctx.telegram_id, created.code)
    _send(ctx, ctx.t("admin_promo_added", code=created.code))


def _promo_line(view, ctx: Ctx) -> str:
    code = view.promo
    if code.kind == "discount":
        what = "%d%%" % code.percent
        if code.max_discount_kopecks:
            what += ctx.t("promo_cap", cap=_rub(code.max_discount_kopecks, exact=False))
    elif view.unlimited_free_access:
        what = ctx.t("promo_kind_free_unlimited")
    else:
        what = ctx.t("promo_kind_free_days", days=code.free_access_days or "∞")
    limit = "%s/%s" % (code.uses, code.max_uses if code.max_uses is not None else "∞")
    until = code.expires_at.strftime("%d.%m.%Y") if code.expires_at else "—"
    state = "" if code.active else ctx.t("promo_off_mark")
    return ctx.t("promo_list_line", code=code.code, what=what, limit=limit, reserved=view.reserved,
                 until=until, state=state)


@_admin("admin_usage_promo_list")
def cmd_promo_list(message: types.Message, ctx: Ctx) -> None:
    """/promo_list (admins): each code with its uses, open reservations, limits and expiry."""
    lines = [_promo_line(view, ctx) for view in promo.list_codes()]
    _send(ctx, ctx.t("admin_promo_list", codes="\n".join(lines) or "—"))


def _set_promo_active(message: types.Message, ctx: Ctx, active: bool) -> None:
    args = _args(message)
    if len(args) != 1:
        raise AdminError()
    try:
        code = promo.set_active(args[0], active)
    except promo.UnknownCode:
        raise AdminError("admin_promo_unknown", code=promo.normalize(args[0])[:32]) from None
    logger.info("admin %s set promo code %s active=%s", ctx.telegram_id, code.code, active)
    _send(ctx, ctx.t("admin_promo_on" if active else "admin_promo_off", code=code.code))


@_admin("admin_usage_promo_off")
def cmd_promo_off(message: types.Message, ctx: Ctx) -> None:
    """/promo_off CODE (admins): no new orders or redemptions with it."""
    _set_promo_active(message, ctx, False)


@_admin("admin_usage_promo_on")
def cmd_promo_on(message: types.Message, ctx: Ctx) -> None:
    """/promo_on CODE (admins)."""
    _set_promo_active(message, ctx, True)


@_admin("admin_usage_broadcast")
def cmd_broadcast(message: types.Message, ctx: Ctx) -> None:
    """/broadcast [ru|en] <text> (admins): a preview with the number of recipients and a confirm
    button; the worker sends it (~20 messages/s) to every user not blocked (of that language) and
    reports back. The confirm acts once per /broadcast update (billing.claim_action)."""
    text = (telebot.util.extract_arguments(message.text or "") or "").strip()
    target = None
    first, _, rest = text.partition(" ")
    if first.lower() in texts.LANGS and rest.strip():
        target, text = first.lower(), rest.strip()
    if not text:
        raise AdminError()
    ctx.start_flow(None, broadcast={"text": text, "lang": target, "key": _update_key(ctx, message, "broadcast")})
    count = worker.broadcast_recipients(target)
    _send(ctx, ctx.t("admin_broadcast_preview", count=count, audience=target or ctx.t("admin_broadcast_all"), text=text),
          _markup([[(ctx.t("btn_broadcast_send"), ctx.button("bcast"))], [(ctx.t("btn_cancel"), ctx.button("cancel"))]]))


def on_broadcast_confirm(call: types.CallbackQuery, ctx: Ctx) -> None:
    """"✅ Отправить" under a broadcast preview (admins): queue it, once."""
    if ctx.telegram_id not in ctx.cfg.admin_ids:
        return on_stale_button(call, ctx)
    if not _claim(ctx, "bcast"):
        return
    job = ctx.data.get("broadcast") or {}
    ctx.finish()
    if not job.get("text") or not billing.claim_action(job["key"]):
        logger.info("admin %s: broadcast %s already queued", ctx.telegram_id, job.get("key"))
        return
    worker.broadcast(job["text"], ctx.chat_id, ctx.lang, target_lang=job.get("lang"))
    _send(ctx, ctx.t("admin_broadcast_started"))


# --------------------------------------------------------------------------------------------
# Wiring
# --------------------------------------------------------------------------------------------


class MediaLabBot(telebot.TeleBot):
    """TeleBot that copies each update's `update_id` onto its message / callback query (admin
    grants use it as their idempotency key)."""

    cfg: config.Config | None = None

    def process_new_updates(self, updates):
        """Copy each update's id onto its message / callback query (admin /grant keys on it); apply
        Stars successful_payment / refunded_payment messages first (`on_payment_message`) and leave
        them out of the handlers."""
        rest = []
        for update in updates:
            message = update.message
            if message is not None and (message.successful_payment is not None
                                        or message.refunded_payment is not None):
                try:
                    on_payment_message(self, self.cfg or config.get(), message)
                except Exception:  # noqa: BLE001 - reconciliation finds what this missed
                    logger.exception("update %s: payment message not applied", update.update_id)
                self.last_update_id = max(self.last_update_id, update.update_id)   # polling confirms it
                continue
            for part in (update.message, update.callback_query):
                if part is not None:
                    part.update_id = update.update_id
            rest.append(update)
        return super().process_new_updates(rest) if rest else None

    _beat_at: float | None = None

    def get_updates(self, *args, **kwargs):
        """getUpdates, first writing the bot's heartbeat (``process:bot``, at most every
        ops.HEARTBEAT_EVERY seconds): a polling loop that stops makes /health answer 503."""
        now = time.monotonic()
        if self._beat_at is None or now - self._beat_at >= ops.HEARTBEAT_EVERY:
            try:
                ops.beat("process:bot")
                self._beat_at = now
            except Exception as exc:  # noqa: BLE001 - polling goes on; /health shows the stale beat
                logger.warning("heartbeat failed (%s)", type(exc).__name__)
        return super().get_updates(*args, **kwargs)


def _prefix(prefix: str):
    return lambda call: (call.data or "").startswith(prefix)


def _button(data: str):
    """The filter of a button: "name:" matches callback data starting with it, "name" exactly."""
    return _prefix(data) if data.endswith(":") else (lambda call: call.data == data)


USER_COMMANDS = (("start", cmd_start), ("help", cmd_help), ("cancel", cmd_cancel), ("balance", cmd_balance),
                 ("history", cmd_history), ("paysupport", cmd_paysupport), ("terms", cmd_terms))
ADMIN_COMMANDS = (("stats", cmd_stats), ("user", cmd_user), ("grant", cmd_grant), ("free_access", cmd_free_access),
                  ("block", cmd_block), ("unblock", cmd_unblock), ("promo_add", cmd_promo_add),
                  ("promo_list", cmd_promo_list), ("promo_off", cmd_promo_off), ("promo_on", cmd_promo_on),
                  ("broadcast", cmd_broadcast), ("payments", cmd_payments), ("jobs", cmd_jobs), ("refund", cmd_refund),
                  ("settle", cmd_settle))
# (callback data or "prefix:", handler), in the order they are tried; option buttons come from media.
BUTTONS = (("menu", on_menu), ("cancel", on_cancel), ("mode:", on_mode), ("consent", on_consent),
           *((button + ":", on_option) for button in OPTION_BUTTONS),
           ("done", on_done), ("again:", on_again), ("jobcancel:", on_job_cancel),
           ("dretry:", on_draft_retry), ("use:", on_use_result), ("hsend:", on_history_send),
           ("rerun:", on_history_rerun), ("dedit:", on_draft_edit), ("payfor:", on_pay_for_draft),
           ("pay", on_pay), ("bcast", on_broadcast_confirm), ("amount:", on_amount),
           ("amount_custom", on_amount_custom), ("promo", on_promo), ("check:", on_check),
           ("stars", on_stars), ("stars:", on_stars_amount))


def register_handlers(bot: telebot.TeleBot, cfg: config.Config) -> None:
    """Register every handler, in the order they are tried: commands (any step), the steps' inputs,
    anything else, then the buttons (`BUTTONS`) and the Stars pre-checkout query."""
    msg, g = bot.register_message_handler, _guarded
    for name, handler in USER_COMMANDS:
        msg(g(handler), commands=[name])
    admin = functools.partial(_is_admin, cfg=cfg)
    for name, handler in ADMIN_COMMANDS:
        msg(g(handler), commands=[name], func=admin)
    msg(g(on_unknown_command), func=lambda m: (m.text or "").startswith("/"))
    msg(g(on_image), content_types=["photo", "document"], state=Step.images)
    # A photo of an album whose first photo already moved the flow on (edit: to the instruction)
    # still reaches on_image: its caption may be the instruction. Handlers are chosen by the state
    # when the update is dispatched, and an album's updates are handled concurrently.
    msg(g(on_image), content_types=["photo", "document"], state=Step.prompt,
        func=lambda m: m.media_group_id is not None)
    msg(g(on_input), content_types=["text"], state=Step.prompt)
    msg(g(on_amount_text), content_types=["text"], state=Step.amount)
    msg(g(on_promo_text), content_types=["text"], state=Step.promo)
    msg(g(on_email), content_types=["text"], state=Step.email)
    msg(g(on_unexpected), content_types=["text", "photo", "document", "sticker", "video", "voice", "audio",
                                         "animation", "video_note", "location", "contact"])
    for data, handler in BUTTONS:
        bot.register_callback_query_handler(g(handler), func=_button(data))
    bot.register_pre_checkout_query_handler(lambda query: on_pre_checkout(bot, cfg, query), func=lambda q: True)
    bot.register_callback_query_handler(g(on_stale_button), func=lambda c: True)


def create_bot(cfg: config.Config | None = None, *, threaded: bool = True, num_threads: int = 4) -> telebot.TeleBot:
    """Build the bot: API URL from TELEGRAM_API_URL, database-backed states, the user middleware,
    every handler. `threaded=False` runs handlers inline in `process_new_updates` (tests)."""
    cfg = cfg or config.get()
    worker.telegram(cfg)           # points apihelper.API_URL / FILE_URL at cfg.telegram_api_url
    bot = MediaLabBot(cfg.telegram_bot_token, threaded=threaded, num_threads=num_threads,
                      state_storage=PeeweeStateStorage(), use_class_middlewares=True,
                      exception_handler=BotExceptionHandler(cfg.telegram_bot_token))
    bot.cfg = cfg
    bot.add_custom_filter(StateFilter(bot))
    bot.setup_middleware(UserMiddleware(bot, cfg))
    register_handlers(bot, cfg)
    return bot


COMMANDS = ("start", "help", "balance", "history", "cancel", "paysupport", "terms")


def set_commands(bot: telebot.TeleBot) -> None:
    """Publish the command list in Russian (default) and English."""
    for lang, code in (("ru", None), ("en", "en")):
        commands = [types.BotCommand(name, texts.t("cmd_" + name, lang)) for name in COMMANDS]
        worker.tg(bot.set_my_commands, commands, language_code=code)


STARTUP_FIRST_DELAY = 1.0     # seconds before the second try of a start-up call
STARTUP_MAX_DELAY = 60.0      # seconds: the cap of the exponential back-off
STARTUP_TIMEOUT = 10.0        # seconds: connect and read timeout of each start-up call


def backoff_delay(attempt: int, *, first: float = STARTUP_FIRST_DELAY, cap: float = STARTUP_MAX_DELAY,
                  rng=random.random) -> float:
    """Seconds to wait after failed try number `attempt` (1-based): `first` doubled each try,
    capped at `cap`, then jittered to 50–100 % (`rng()` in [0, 1)) so restarted bots spread out."""
    return min(cap, first * 2 ** (max(1, attempt) - 1)) * (0.5 + 0.5 * rng())


class _StartupTimeouts:
    """Lower pyTelegramBotAPI's per-request timeouts to `STARTUP_TIMEOUT` while starting.

    ``apihelper.CONNECT_TIMEOUT`` / ``READ_TIMEOUT`` are module globals read by every request
    (``apihelper._make_request``); get_me and set_my_commands take no timeout argument. Start-up
    is single-threaded (polling has not begun), so the old values are restored afterwards.
    """

    def __enter__(self):
        self.saved = apihelper.CONNECT_TIMEOUT, apihelper.READ_TIMEOUT
        apihelper.CONNECT_TIMEOUT = apihelper.READ_TIMEOUT = STARTUP_TIMEOUT
        return self

    def __exit__(self, *exc):
        apihelper.CONNECT_TIMEOUT, apihelper.READ_TIMEOUT = self.saved


def _startup_problem(exc: Exception, what: str):
    """Classify a failed start-up call: (None, reason) to retry, or (ConfigError, None) to stop.

    Transient: network errors and timeouts, HTTP 5xx, 429, an answer that is not JSON. A 401 (or
    404, what Telegram answers for a token it does not know) is a configuration error; any other
    Bot API error is raised unchanged.
    """
    if isinstance(exc, requests.RequestException):
        reason = "no answer within %g s" % STARTUP_TIMEOUT if isinstance(exc, requests.Timeout) else \
            "cannot connect" if isinstance(exc, requests.ConnectionError) else "request failed"
        return None, "%s (%s)" % (reason, type(exc).__name__)
    if isinstance(exc, apihelper.ApiTelegramException):
        code, text = exc.error_code, exc.description
    elif isinstance(exc, apihelper.ApiException):
        code, text = getattr(exc.result, "status_code", 0), getattr(exc.result, "reason", "") or "not JSON"
    else:
        raise exc
    if code in (401, 404) and what == "getMe":
        return config.ConfigError(["TELEGRAM_BOT_TOKEN was refused by Telegram (getMe: %s %s): copy the token "
                                   "from @BotFather again; check TELEGRAM_API_URL too" % (code, text)]), None
    if code == 401:
        return config.ConfigError(["TELEGRAM_BOT_TOKEN was refused by Telegram (%s: 401 %s)" % (what, text)]), None
    if code == 400 and what == "setWebhook":
        return config.ConfigError(["TELEGRAM_WEBHOOK_URL was refused by Telegram (setWebhook: 400 %s)" % text]), None
    if code == 429 or code >= 500 or isinstance(exc, apihelper.ApiInvalidJSONException):
        return None, "HTTP %s %s" % (code, text)
    raise exc


def call_until_answered(call, what: str, *, sleep=time.sleep, rng=random.random, max_attempts: int | None = None):
    """Run the start-up Telegram call `call()` until Telegram answers it and return the result.

    Each failed try logs one line (the call, the try number, the reason — never the URL, which
    carries the token) and waits `backoff_delay` seconds (at least a 429's retry_after) through
    `sleep`; after `max_attempts` tries (None: no limit) the last error is raised.

    :raises config.ConfigError: Telegram refused the token (401, or 404 for getMe).
    :raises telebot.apihelper.ApiException: any other Bot API error (a 400 ...).
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            with _StartupTimeouts():
                return call()
        except Exception as exc:  # noqa: BLE001 - classified below; anything unknown is re-raised
            problem, reason = _startup_problem(exc, what)
            if problem is not None:
                raise problem from None
            if max_attempts is not None and attempt >= max_attempts:
                raise
            delay = backoff_delay(attempt, rng=rng)
            if isinstance(exc, apihelper.ApiTelegramException) and exc.error_code == 429:
                delay = max(delay, worker.retry_after(exc))
            logger.warning("Telegram %s failed (try %d: %s); retrying in %.1f s", what, attempt, reason, delay)
            sleep(delay)


def start_up(cfg: config.Config, bot: telebot.TeleBot, *, sleep=time.sleep, rng=random.random) -> config.Config:
    """The start-up calls of `python bot.py` before serving: getMe until Telegram answers (the
    token is checked; YOOKASSA_RETURN_URL defaults to the bot's t.me link), then deleteWebhook
    (long polling only) and setMyCommands, retried the same way. Returns the configuration
    (with the return URL filled in).

    :raises config.ConfigError: Telegram refused the token.
    """
    me = call_until_answered(bot.get_me, "getMe", sleep=sleep, rng=rng)
    logger.info("Telegram answered: bot @%s", me.username)
    if not cfg.yookassa_return_url:  # the payment page returns the user to this bot
        cfg = config.configure(cfg.replace(yookassa_return_url="https://t.me/%s" % me.username))
    steps = [] if cfg.telegram_webhook_url else [("deleteWebhook", bot.delete_webhook)]
    steps.append(("setMyCommands", lambda: set_commands(bot)))
    for what, step in steps:
        try:   # conveniences: a Bot API server refusing them must not stop the bot
            call_until_answered(step, what, sleep=sleep, rng=rng)
        except telebot.apihelper.ApiException as exc:
            logger.warning("start-up call %s refused, going on: %s", what, exc.__class__.__name__)
    return cfg


def main() -> int:
    """Run the bot (`python bot.py`): long polling, or webhook mode when TELEGRAM_WEBHOOK_URL is set.

    Returns the exit code: 78 (config.EX_CONFIG) for a bad configuration, a token Telegram
    refuses, a YooKassa key YooKassa refuses or an unmigrated database; 69 when PostgreSQL/Redis
    does not answer. Telegram being unreachable is not an error: start-up retries until it answers.
    """
    try:
        cfg = config.configure(config.load())
    except config.ConfigError as exc:
        return startup.refuse(exc)
    startup.configure_logging(cfg)
    try:
        for warning in startup.check_services(cfg):
            logger.warning("%s", warning)
    except (config.ConfigError, models.NotMigrated, startup.Unavailable) as exc:
        return startup.refuse(exc)
    models.init_db(cfg.database_url)
    bot = worker.telegram(cfg) if cfg.telegram_webhook_url else create_bot(cfg)
    try:
        cfg = start_up(cfg, bot)
        if cfg.telegram_webhook_url:
            app = create_webhook_app(cfg)
            call_until_answered(lambda: bot.set_webhook(url=cfg.telegram_webhook_url,
                                                        secret_token=cfg.telegram_webhook_secret,
                                                        allowed_updates=ALLOWED_UPDATES), "setWebhook")
    except config.ConfigError as exc:
        return startup.refuse(exc)
    if cfg.telegram_webhook_url:
        return _serve_webhook(cfg, app)
    logger.info("bot starting (long polling)")
    bot.infinity_polling(skip_pending=False, allowed_updates=ALLOWED_UPDATES, timeout=30, long_polling_timeout=25)
    return 0


# --- webhook mode ----------------------------------------------------------------------------

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"   # Bot API setWebhook: sent back with every update


def create_webhook_app(cfg: config.Config | None = None):
    """Webhook mode (TELEGRAM_WEBHOOK_URL set): a Flask app taking Telegram updates at the path of
    that URL. An update without the right `X-Telegram-Bot-Api-Secret-Token` (the setWebhook
    `secret_token`, core.telegram.org/bots/api#setwebhook) gets 403 and changes nothing; a body
    that is not an update gets 400. Handlers run inline (`threaded=False`: the WSGI server's
    threads are the concurrency) and their errors are answered and logged by the bot's own guard,
    so Telegram gets 200 and does not redeliver. `python bot.py` serves it; for several processes
    run `gunicorn -b 127.0.0.1:8081 'bot:create_webhook_app()'` behind nginx.
    """
    from flask import Flask, request  # webhook mode only: long polling never loads Flask

    cfg = cfg or config.get()
    if models.db.obj is None:
        models.init_db(cfg.database_url)
    bot = create_bot(cfg, threaded=False)
    path = urllib.parse.urlsplit(cfg.telegram_webhook_url).path or "/"
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024

    @app.post(path)
    def telegram_webhook():
        given = request.headers.get(SECRET_HEADER, "")
        if not cfg.telegram_webhook_secret or not hmac.compare_digest(given, cfg.telegram_webhook_secret):
            logger.warning("security: webhook update without the right secret token from %s", request.remote_addr)
            return "", 403
        try:
            update = types.Update.de_json(request.get_data(as_text=True))
        except (ValueError, TypeError, KeyError, AttributeError):
            return "", 400
        if update is None:
            return "", 400
        with models.db.connection_context():
            bot.process_new_updates([update])
        return "", 200

    return app


def _serve_webhook(cfg: config.Config, app) -> int:
    """Serve the webhook app (registered with Telegram by `main`) on TELEGRAM_WEBHOOK_LISTEN."""
    from werkzeug.serving import run_simple

    ops.HeartbeatThread("bot", cfg.database_url).start()     # no polling loop to beat in this mode
    host, _, port = cfg.telegram_webhook_listen.rpartition(":")
    logger.info("bot starting (webhook mode, listening on %s:%s)", host, port)
    run_simple(host.strip("[]"), int(port), app, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
