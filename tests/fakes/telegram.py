"""A local fake of the Telegram Bot API server, spoken to by the real pyTelegramBotAPI.

Point the bot at it with ``TELEGRAM_API_URL=fake.url`` (the bot sets ``apihelper.API_URL`` and
``FILE_URL``). Tests play the users (``send_text``, ``send_photo``, ``send_document``, ``press``
push updates) and watch the bot (``calls``, ``messages``, ``wait_for``, ``wait_for_message``). The
``fake_telegram`` fixture yields a started fake. HTTP: tests/fakes/base.py.

Faithful, for what Media Lab uses (texts from tdlib/telegram-bot-api ``Client.cpp`` and TDLib):

* ``/bot<token>/<method>`` (case-insensitive method) and ``/file/bot<token>/<file_path>``;
  parameters from the query string and urlencoded, JSON or multipart bodies (parts with a filename
  are uploads). ``{"ok": true, "result"}``, or ``{"ok": false, "error_code", "description"
  [, "parameters"]}`` with that HTTP status: wrong token 401, unknown method 404, a 429 carries
  ``parameters.retry_after``.
* getUpdates: ``offset`` confirms older updates, ``limit`` 1..100, ``timeout`` (≤ 50 s) long-polls;
  409 while a webhook is set. setWebhook (``secret_token`` sent back as
  ``X-Telegram-Bot-Api-Secret-Token``, ``drop_pending_updates``) and deleteWebhook; updates are
  POSTed in order, a non-2xx answer is retried after ``webhook_retry_delay``.
* Text: no ``parse_mode`` at all (400; Media Lab never sends markup, so nothing a user typed is
  parsed). Text is trimmed like TDLib; limits in code points: text 4096 (``message is too long``),
  caption 1024 (``message caption is too long``); ``message text is empty`` /
  ``text must be non-empty``.
* Inline keyboards are checked (``Text buttons are unallowed in the inline keyboard``,
  callback_data > 64 bytes ``BUTTON_DATA_INVALID``, bad URL ``inline keyboard button URL '...' is
  invalid``) and echoed; an edit without ``reply_markup`` removes the keyboard; an identical edit
  is ``message is not modified``.
* Private chats only (chat id == user id), one ``message_id`` counter per chat. Unknown chat ->
  ``chat not found`` (``strict_chats=False`` creates users on the fly); after ``block`` sends get
  403 ``Forbidden: bot was blocked by the user`` until the user writes again.
* Uploaded photos get a ``photo`` array (a JPEG thumbnail, then the bytes as uploaded with their
  real size). Photo > 10 MB ``file is too big``, width + height > 10000 or ratio > 20
  ``PHOTO_INVALID_DIMENSIONS``, not an image ``IMAGE_PROCESS_FAILED``, any upload > 50 MB 413. Only
  uploads are accepted as input files (no file_id re-sends, no URLs: Media Lab sends bytes).
  getFile over 20 MiB ``file is too big``; downloads are recorded as ``Call("download")``.
* A callback query can be answered once.

* Telegram Stars (core.telegram.org/bots/payments-stars, bots/api#payments): sendInvoice /
  createInvoiceLink only in ``XTR`` with an empty ``provider_token`` and exactly one price (whole
  Stars), title 1–32, description 1–255 characters, payload 1–128 bytes. ``pay_invoice`` plays a user
  paying: a ``pre_checkout_query`` update, then — only for ``ok=True`` answered within
  ``pre_checkout_timeout`` seconds (10 in Telegram) — the charge (a StarTransaction whose id is the
  ``telegram_payment_charge_id``) and a ``successful_payment`` service message. A late answer gets
  ``query is too old ...`` and the payment is canceled. ``deliver_again`` pushes the same service
  message N more times; ``lose_next_successful_payment`` charges without delivering it.
  refundStarPayment (``CHARGE_ALREADY_REFUNDED`` the second time) and ``refund`` (Telegram refunding
  on its own) add a refund transaction (same id, a ``receiver``) and a ``refunded_payment`` message.
  getStarTransactions: ``offset``, ``limit`` 1..100, oldest first. Error texts marked approx. are
  ours where the exact Bot API text is not known.

Not modelled: groups, channels, inline mode, payments in real currencies (provider tokens),
shipping, tips, subscriptions, media groups sent by the bot, reply parameters, flood control (use
``fail_next``), ``allowed_updates`` (all update kinds are delivered).
"""
from __future__ import annotations

import copy
import io
import itertools
import json
import mimetypes
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from werkzeug.wrappers import Request, Response

from tests.fakes.base import FakeServer, json_response

DEFAULT_TOKEN = "123456:TEST-TOKEN"
MAX_TEXT_LENGTH = 4096
MAX_CAPTION_LENGTH = 1024
MAX_CALLBACK_DATA_BYTES = 64
MAX_PHOTO_UPLOAD = 10 * 1024 * 1024
MAX_UPLOAD = 50 * 1024 * 1024
MAX_DOWNLOAD = 20 << 20            # telegram-bot-api Client.h MAX_DOWNLOAD_FILE_SIZE
LONG_POLL_MAX_TIMEOUT = 50
FIRST_UPDATE_ID = 100_000_001
MESSAGE_METHODS = frozenset({"sendMessage", "sendPhoto", "sendDocument", "editMessageText", "editMessageCaption"})
_JSON_PARAMS = frozenset({"reply_markup", "allowed_updates", "commands", "entities", "caption_entities", "prices"})
_INT_PARAMS = frozenset({"chat_id", "message_id", "offset", "limit", "cache_time", "user_id"})
_BOOL_PARAMS = frozenset({"show_alert", "drop_pending_updates", "ok"})
PRE_CHECKOUT_TIMEOUT = 10.0        # seconds Telegram waits for answerPreCheckoutQuery
_QUERY_TOO_OLD = "query is too old and response timeout expired or query ID is invalid"
_CHAT_ACTIONS = frozenset({"typing", "upload_photo", "upload_document", "choose_sticker", "find_location",
                           "record_video", "upload_video", "record_voice", "upload_voice"})
_API_PATH = re.compile(r"/bot([^/]+)/([A-Za-z0-9_]+)/?")
_FILE_PATH = re.compile(r"/file/bot([^/]+)/(.+)")
_FAULT_TEXT = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden: bot was blocked by the user",
               404: "Not Found", 500: "Internal Server Error", 502: "Bad Gateway"}
_NOT_MODIFIED = ("message is not modified: specified new message content and reply markup are exactly "
                 "the same as a current content and reply markup of the message")


@dataclass
class Call:
    """One Bot API request as the fake understood it: ``params`` normalised (JSON fields decoded,
    ids as int, flags as bool), ``files`` the uploaded bytes by field, ``result`` the answer (None on
    error), ``error`` ``{"error_code", "description"[, "parameters"]}``."""

    method: str
    params: dict
    files: dict = field(default_factory=dict)
    time: float = 0.0
    result: Any = None
    error: dict | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def chat_id(self) -> int | None:
        return _as_int(self.params.get("chat_id"))

    def summary(self) -> str:
        """One line for failure dumps."""
        bits = [self.method] + ([f"chat={self.chat_id}"] if self.chat_id is not None else [])
        for key in ("message_id", "text", "caption", "data", "action", "callback_query_id"):
            if key in self.params:
                value = str(self.params[key])
                bits.append(f"{key}={value[:60]!r}" + ("..." if len(value) > 60 else ""))
        if self.files:
            bits.append("files=" + ",".join(f"{k}:{len(v)}B" for k, v in self.files.items()))
        if self.error:
            bits.append(f"-> {self.error['error_code']} {self.error['description']}")
        return " ".join(bits)


class _ApiError(Exception):
    def __init__(self, code: int, description: str, parameters: dict | None = None):
        super().__init__(description)
        self.code, self.description, self.parameters = code, description, parameters

    def as_dict(self) -> dict:
        return {"error_code": self.code, "description": self.description,
                **({"parameters": dict(self.parameters)} if self.parameters else {})}


def _bad(message: str) -> _ApiError:
    return _ApiError(400, "Bad Request: " + message)


def _as_int(value) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return None


def _normalize(params: dict) -> dict:
    out = {}
    for key, value in params.items():
        if isinstance(value, str):
            if key in _JSON_PARAMS:
                try:
                    value = json.loads(value)
                except ValueError:
                    pass          # kept as a string; the method answers "can't parse ..."
            elif key in _INT_PARAMS:
                value = value if _as_int(value) is None else _as_int(value)
            elif key in _BOOL_PARAMS:
                value = value.strip().lower() in ("true", "1")
        out[key] = value
    return out


def _valid_link(url: str) -> bool:
    """Simplified LinkManager::get_checked_link, http(s) only (Media Lab sends no tg:// links)."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    host = parts.hostname or ""
    return parts.scheme in ("http", "https") and ("." in host or host == "localhost") and not any(
        c.isspace() for c in url)


def _image_info(data: bytes):
    """(width, height) read by Pillow, or None when not an image."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            return img.width, img.height
    except Exception:  # noqa: BLE001 - any failure means "not an image we can read"
        return None


def _thumbnail(data: bytes, box: int):
    """(jpeg_bytes, width, height) scaled to fit ``box``."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (box, box))
        img = img.convert("RGB")
        img.thumbnail((box, box))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
        return buf.getvalue(), img.width, img.height


class PaymentAttempt:
    """A user's tap on Pay (``FakeTelegram.pay_invoice``): ``query_id`` and ``update`` (the
    pre_checkout_query pushed); ``wait()`` returns the outcome — ``"paid"`` (then ``charge_id`` and
    ``update``, the successful_payment update or None when it was lost), ``"refused"`` (ok=false,
    ``error_message``) or ``"timeout"`` (no answer within the deadline: canceled)."""

    def __init__(self, query_id: str, update: dict):
        self.query_id, self.pre_checkout = query_id, update
        self.outcome: str | None = None
        self.charge_id: str | None = None
        self.update: dict | None = None
        self.error_message: str | None = None
        self._done = threading.Event()

    def _finish(self, outcome: str, **values) -> None:
        self.outcome = outcome
        for name, value in values.items():
            setattr(self, name, value)
        self._done.set()

    def wait(self, timeout: float = 15.0) -> str:
        """Block until Telegram decided (at most `timeout` seconds); return the outcome."""
        if not self._done.wait(timeout):
            raise AssertionError(f"pre-checkout {self.query_id} undecided after {timeout}s")
        return self.outcome


class FakeTelegram(FakeServer):
    """Local fake Telegram Bot API for one bot. See the module docstring."""

    name = "FakeTelegram"
    log_requests = False           # calls() is the log
    METHODS = ("getMe", "getUpdates", "setWebhook", "deleteWebhook", "setMyCommands", "sendMessage",
               "sendPhoto", "sendDocument", "editMessageText", "editMessageCaption", "editMessageReplyMarkup",
               "deleteMessage", "answerCallbackQuery", "sendChatAction", "getFile", "sendInvoice",
               "createInvoiceLink", "answerPreCheckoutQuery", "refundStarPayment", "getStarTransactions")

    def __init__(self, token: str = DEFAULT_TOKEN, bot_username: str = "medialab_test_bot", *,
                 strict_chats: bool = True, port: int = 0, webhook_retry_delay: float = 0.5,
                 pre_checkout_timeout: float = PRE_CHECKOUT_TIMEOUT):
        super().__init__(port)
        self.token = token
        self.bot_id = int(token.split(":", 1)[0])
        self.bot_user = {"id": self.bot_id, "is_bot": True, "first_name": "Media Lab", "username": bot_username}
        self.strict_chats = strict_chats
        self.webhook_retry_delay = webhook_retry_delay
        self._methods = {name.lower(): name for name in self.METHODS}
        self._webhook_thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._calls: list[Call] = []
        self._updates: list[dict] = []
        self._next_update_id = FIRST_UPDATE_ID
        self._users: dict[int, dict] = {}
        self._blocked: set[int] = set()
        self._messages: dict[tuple[int, int], dict] = {}
        self._bot_messages: dict[int, list[int]] = {}
        self._next_message_id: dict[int, int] = {}
        self._files: dict[str, dict] = {}
        self._paths: dict[str, str] = {}
        self._callbacks: dict[str, bool] = {}           # query id -> answered
        self._faults: dict[str, list[list]] = {}        # method -> [[error, times], ...]
        self._webhook: dict | None = None
        self._polling = 0
        self.pre_checkout_timeout = pre_checkout_timeout
        self._invoices: dict[str, dict] = {}            # invoice key (message or link) -> invoice
        self._pre_checkouts: dict[str, dict] = {}       # query id -> {"answer": None | params, "late": bool}
        self._transactions: list[dict] = []             # StarTransaction objects, oldest first
        self._charges: dict[str, dict] = {}             # charge id -> {"user", "invoice", "refunded"}
        self._lose_successful = 0

    def start(self) -> FakeTelegram:
        if self._server is None:
            super().start()
            self._webhook_thread = threading.Thread(target=self._webhook_loop, name="FakeTelegram-webhook",
                                                    daemon=True)
            self._webhook_thread.start()
        return self

    def stop(self) -> None:
        super().stop()
        if self._webhook_thread is not None:
            self._webhook_thread.join(timeout=10)
            self._webhook_thread = None

    # ------------------------------------------------------------------ simulated users

    def add_user(self, user_id: int, *, first_name: str = "Tester", username: str | None = None,
                 language_code: str | None = "ru") -> dict:
        """Register a user (as if they had opened the bot) without sending an update."""
        with self._cond:
            return copy.deepcopy(self._user(user_id, first_name, username, language_code))

    def send_text(self, user_id: int, text: str, *, first_name: str = "Tester", username: str | None = None,
                  language_code: str | None = "ru") -> dict:
        """The user sends ``text``; returns the pushed update (a leading /command gets its entity)."""
        if not text.strip() or len(text) > MAX_TEXT_LENGTH:
            raise ValueError("Telegram clients send 1..4096 characters")
        content: dict = {"text": text}
        command = re.match(r"/[A-Za-z0-9_]{1,64}(@[A-Za-z0-9_]{3,32})?", text)
        if command:
            content["entities"] = [{"type": "bot_command", "offset": 0, "length": len(command.group(0))}]
        with self._cond:
            return self._user_message(self._user(user_id, first_name, username, language_code), content)

    def send_photo(self, user_id: int, image_bytes: bytes, *, caption: str | None = None,
                   media_group_id: str | None = None, file_size: int | None = None, first_name: str = "Tester",
                   username: str | None = None, language_code: str | None = "ru") -> dict:
        """The user sends a photo; returns the update. ``file_size`` overrides the reported size of
        the largest PhotoSize."""
        info = _image_info(image_bytes)
        if info is None:
            raise ValueError("send_photo needs image bytes Pillow can read")
        with self._cond:
            user = self._user(user_id, first_name, username, language_code)
            content: dict = {"photo": self._store_photo(bytes(image_bytes), info, file_size)}
            if media_group_id is not None:
                content["media_group_id"] = str(media_group_id)
            if caption:
                content["caption"] = caption
            return self._user_message(user, content)

    def send_album(self, user_id: int, images: list[bytes], *, caption: str | None = None, **kwargs) -> list[dict]:
        """Several photos as one album (caption on the first); returns the updates."""
        group = str(10**17 + next(self._ids))
        return [self.send_photo(user_id, data, caption=caption if n == 0 else None, media_group_id=group, **kwargs)
                for n, data in enumerate(images)]

    def send_document(self, user_id: int, data: bytes, *, file_name: str, mime_type: str,
                      caption: str | None = None, file_size: int | None = None, first_name: str = "Tester",
                      username: str | None = None, language_code: str | None = "ru") -> dict:
        """The user sends a file as a document; returns the update."""
        with self._cond:
            user = self._user(user_id, first_name, username, language_code)
            record = self._store_file(bytes(data), "documents", file_size, file_name, mime_type)
            content: dict = {"document": self._document_json(record)}
            if caption:
                content["caption"] = caption
            return self._user_message(user, content)

    def press(self, user_id: int, message_id: int, data: str, *, first_name: str = "Tester",
              username: str | None = None, language_code: str | None = "ru", force: bool = False) -> dict:
        """The user presses the inline button with callback ``data`` on a bot message (which must
        show it now, unless ``force``: a tap that raced the keyboard's removal); returns the
        callback_query update."""
        with self._cond:
            message = self._messages.get((user_id, message_id))
            if message is None or message["from"]["id"] != self.bot_id:
                raise AssertionError(f"no bot message {message_id} in chat {user_id}")
            if not force and data not in self.button_data(message):
                raise AssertionError(f"message {message_id} in chat {user_id} has no button with callback_data "
                                     f"{data!r}; it has {self.button_data(message)}")
            user = self._user(user_id, first_name, username, language_code)
            query_id = str(4 * 10**21 + next(self._ids))
            self._callbacks[query_id] = False
            return self._push_update("callback_query", {
                "id": query_id, "from": copy.deepcopy(user), "message": copy.deepcopy(message),
                "chat_instance": str(-(7 * 10**18 + user_id)), "data": data})

    def block(self, user_id: int) -> None:
        """The user blocks the bot: sends to them fail with 403 until they write again."""
        with self._cond:
            if user_id not in self._users:
                raise AssertionError(f"unknown user {user_id}")
            self._blocked.add(user_id)

    def add_file(self, data: bytes, file_size: int | None = None) -> tuple[str, str]:
        """Store bytes under a new file_id; returns (file_id, file_unique_id). ``file_size``
        overrides the size getFile reports (e.g. 30 MB without allocating it)."""
        with self._cond:
            record = self._store_file(bytes(data), "documents", file_size)
            return record["file_id"], record["file_unique_id"]

    def fail_next(self, method: str, error_code: int = 429, description: str | None = None, *,
                  retry_after: int | None = None, times: int = 1) -> None:
        """The next ``times`` calls of ``method`` fail without side effects. A 429 gets
        ``parameters.retry_after`` (default 1) and ``Too Many Requests: retry after N``."""
        if error_code == 429 and retry_after is None:
            retry_after = 1
        if description is None:
            description = (f"Too Many Requests: retry after {retry_after}" if error_code == 429
                           else _FAULT_TEXT.get(error_code, "Bad Request"))
        error = _ApiError(error_code, description, {"retry_after": retry_after} if retry_after is not None else None)
        with self._cond:
            self._faults.setdefault(method.lower(), []).append([error, times])

    # ------------------------------------------------------------------ Telegram Stars (users, Telegram)

    def invoice(self, user_id: int, message_id: int | None = None, link: str | None = None) -> dict:
        """The invoice behind a bot message in ``user_id``'s chat (the latest when ``message_id`` is
        None) or behind an invoice ``link``: ``{"title", "description", "payload", "currency",
        "total_amount"}``."""
        with self._cond:
            if link is not None:
                key = "link:" + link
            else:
                if message_id is None:
                    ids = [m for m in self._bot_messages.get(user_id, []) if f"msg:{user_id}:{m}" in self._invoices]
                    if not ids:
                        raise AssertionError(f"no invoice in chat {user_id}")
                    message_id = ids[-1]
                key = f"msg:{user_id}:{message_id}"
            if key not in self._invoices:
                raise AssertionError(f"no invoice {key}")
            return copy.deepcopy(self._invoices[key])

    def pay_invoice(self, user_id: int, message_id: int | None = None, *, link: str | None = None,
                    language_code: str | None = "ru") -> PaymentAttempt:
        """The user taps Pay on an invoice: a ``pre_checkout_query`` update is pushed now, and a
        background thread waits ``pre_checkout_timeout`` seconds for answerPreCheckoutQuery. With
        ``ok=True`` in time the Stars are charged and a ``successful_payment`` message is pushed;
        otherwise the payment is canceled. Returns a `PaymentAttempt` (``wait()`` → its outcome)."""
        invoice = self.invoice(user_id, message_id, link)
        with self._cond:
            user = self._user(user_id, self._users.get(user_id, {}).get("first_name", "Tester"),
                              self._users.get(user_id, {}).get("username"), language_code)
            query_id = str(5 * 10**18 + next(self._ids))
            self._pre_checkouts[query_id] = {"answer": None, "late": False}
            update = self._push_update("pre_checkout_query", {
                "id": query_id, "from": copy.deepcopy(user), "currency": invoice["currency"],
                "total_amount": invoice["total_amount"], "invoice_payload": invoice["payload"]})
        attempt = PaymentAttempt(query_id, update)
        threading.Thread(target=self._checkout, args=(attempt, user, invoice), name="FakeTelegram-checkout",
                         daemon=True).start()
        return attempt

    def _checkout(self, attempt: PaymentAttempt, user: dict, invoice: dict) -> None:
        deadline = time.monotonic() + self.pre_checkout_timeout
        with self._cond:
            state = self._pre_checkouts[attempt.query_id]
            while state["answer"] is None and not self._stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            answer = state["answer"]
            state["late"] = answer is None
            if answer is None:
                attempt._finish("timeout")
            elif not answer.get("ok"):
                attempt._finish("refused", error_message=answer.get("error_message"))
            else:
                charge_id = f"stxFAKE{next(self._ids):08d}"
                self._charges[charge_id] = {"user": user["id"], "invoice": dict(invoice), "refunded": False}
                self._transactions.append({
                    "id": charge_id, "amount": invoice["total_amount"], "date": int(time.time()),
                    "source": {"type": "user", "transaction_type": "invoice_payment", "user": copy.deepcopy(user),
                               "invoice_payload": invoice["payload"]}})
                payment = {"currency": invoice["currency"], "total_amount": invoice["total_amount"],
                           "invoice_payload": invoice["payload"], "telegram_payment_charge_id": charge_id,
                           "provider_payment_charge_id": ""}
                update = None
                if self._lose_successful:
                    self._lose_successful -= 1
                else:
                    update = self._user_message(user, {"successful_payment": payment})
                attempt._finish("paid", charge_id=charge_id, update=update)
            self._cond.notify_all()

    def lose_next_successful_payment(self, times: int = 1) -> None:
        """The next ``times`` payments are charged but their successful_payment never reaches the bot."""
        with self._cond:
            self._lose_successful += times

    def deliver_again(self, update: dict, times: int = 1) -> list[dict]:
        """Push the message of ``update`` (a successful_payment, say) ``times`` more times, each as a
        new update, as Telegram does when it could not be sure the bot got it; returns them."""
        with self._cond:
            return [self._push_update("message", update["message"]) for _ in range(times)]

    def refund(self, charge_id: str) -> dict:
        """Telegram refunds a Stars payment on its own (a dispute, say): the refund transaction and
        a ``refunded_payment`` message; returns the update."""
        with self._cond:
            return self._refund(charge_id)

    def star_transactions(self) -> list[dict]:
        """Every StarTransaction so far, oldest first."""
        with self._cond:
            return copy.deepcopy(self._transactions)

    def _refund(self, charge_id: str) -> dict:
        charge = self._charges.get(charge_id)
        if charge is None:
            raise _bad("CHARGE_NOT_FOUND")                                           # approx.
        if charge["refunded"]:
            raise _bad("CHARGE_ALREADY_REFUNDED")
        charge["refunded"] = True
        invoice, user = charge["invoice"], self._users[charge["user"]]
        self._transactions.append({"id": charge_id, "amount": invoice["total_amount"], "date": int(time.time()),
                                   "receiver": {"type": "user", "transaction_type": "invoice_payment",
                                                "user": copy.deepcopy(user), "invoice_payload": invoice["payload"]}})
        return self._push_update("message", self._new_message(user["id"], user, {"refunded_payment": {
            "currency": invoice["currency"], "total_amount": invoice["total_amount"],
            "invoice_payload": invoice["payload"], "telegram_payment_charge_id": charge_id}}))

    # ------------------------------------------------------------------ observation

    def calls(self, method: str | None = None, chat_id: int | None = None) -> list[Call]:
        """Recorded bot calls, oldest first, optionally filtered by method and chat."""
        with self._cond:
            return [c for c in self._calls if (method is None or c.method.lower() == method.lower())
                    and (chat_id is None or c.chat_id == chat_id)]

    def mark(self) -> int:
        """The number of calls so far; pass it as ``since=`` to wait only for later calls."""
        with self._cond:
            return len(self._calls)

    def messages(self, chat_id: int) -> list[dict]:
        """The bot's messages in ``chat_id`` as they are now (edits applied, deleted ones gone)."""
        with self._cond:
            return [copy.deepcopy(self._messages[(chat_id, mid)])
                    for mid in self._bot_messages.get(chat_id, []) if (chat_id, mid) in self._messages]

    def last_message(self, chat_id: int) -> dict | None:
        found = self.messages(chat_id)
        return found[-1] if found else None

    def message(self, chat_id: int, message_id: int) -> dict | None:
        """Any message (bot or user) in ``chat_id`` as it is now, or None."""
        with self._cond:
            return copy.deepcopy(self._messages.get((chat_id, message_id)))

    def answers(self, callback_query_id: str | None = None) -> list[dict]:
        """The parameters of successful answerCallbackQuery calls."""
        return [dict(c.params) for c in self.calls("answerCallbackQuery")
                if c.ok and callback_query_id in (None, str(c.params.get("callback_query_id")))]

    def pending_updates(self) -> int:
        """How many pushed updates the bot has not confirmed yet."""
        with self._cond:
            return len(self._updates)

    def wait_for(self, predicate: Callable[[Call], bool] | str, timeout: float = 10.0, *, since: int = 0) -> Call:
        """Wait for a recorded call (index >= ``since``) matching ``predicate`` (a method name or a
        function) and return it; on timeout AssertionError lists the recent calls."""
        if isinstance(predicate, str):
            name = predicate.lower()
            predicate = lambda call: call.method.lower() == name  # noqa: E731
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while since < len(self._calls):
                    since += 1
                    if predicate(self._calls[since - 1]):
                        return self._calls[since - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    recent = [c for c in self._calls if c.method != "getUpdates"][-25:]
                    raise AssertionError(f"no matching Telegram call within {timeout}s; recent calls:\n"
                                         + ("\n".join("  " + c.summary() for c in recent) or "  (none)"))
                self._cond.wait(remaining)

    def wait_for_message(self, chat_id: int, contains: str | None = None, timeout: float = 10.0, *,
                         since: int = 0) -> dict:
        """Wait for a successful send/edit in ``chat_id`` whose text or caption contains ``contains``
        (any when None); return the message as Telegram answered it."""
        def matches(call: Call) -> bool:
            result = call.result if isinstance(call.result, dict) else {}
            body = result.get("text", result.get("caption", ""))
            return (call.ok and call.method in MESSAGE_METHODS and call.chat_id == chat_id
                    and (contains is None or contains in body))
        try:
            return copy.deepcopy(self.wait_for(matches, timeout, since=since).result)
        except AssertionError as exc:
            raise AssertionError(f"the bot sent no message {contains!r} to chat {chat_id}; {exc}") from None

    def wait_until_polling(self, timeout: float = 10.0) -> None:
        """Wait until a getUpdates long poll is waiting for updates."""
        try:
            self.wait_until(lambda: self._polling, timeout)
        except TimeoutError:
            raise AssertionError(f"no getUpdates long poll within {timeout}s") from None

    @staticmethod
    def buttons(message: dict) -> list[dict]:
        """All inline keyboard buttons of ``message``, row by row."""
        keyboard = (message or {}).get("reply_markup") or {}
        return [dict(b) for row in keyboard.get("inline_keyboard", []) for b in row]

    @classmethod
    def button_data(cls, message: dict) -> list[str]:
        return [b["callback_data"] for b in cls.buttons(message) if "callback_data" in b]

    @classmethod
    def find_button(cls, message: dict, text_substring: str) -> dict:
        """The first inline button whose text contains ``text_substring`` (AssertionError if none)."""
        for button in cls.buttons(message):
            if text_substring in button.get("text", ""):
                return button
        raise AssertionError(f"no button containing {text_substring!r}; buttons: "
                             f"{[b.get('text') for b in cls.buttons(message)]}")

    # ------------------------------------------------------------------ HTTP

    def handle(self, request: Request) -> Response:
        match = _API_PATH.fullmatch(request.path)
        if match:
            params = request.args.to_dict()
            params.update(request.form.to_dict())
            if request.is_json:
                params.update(request.get_json(silent=True) or {})
            uploads = {name: (f.filename or name, f.read()) for name, f in request.files.items()}
            return self._api(match.group(1), match.group(2), params, uploads)
        match = _FILE_PATH.fullmatch(request.path)
        code = 401 if match and match.group(1) != self.token else 404
        if match and code == 404:
            with self._cond:
                file_id = self._paths.get(match.group(2))
                if file_id is not None:
                    self._calls.append(Call("download", {"file_path": match.group(2), "file_id": file_id},
                                            time=time.time(), result=len(self._files[file_id]["data"])))
                    return Response(self._files[file_id]["data"], content_type="application/octet-stream")
        return json_response({"ok": False, "error_code": code, "description": _FAULT_TEXT[code]}, code)

    def _api(self, token: str, raw_method: str, params: dict, uploads: dict) -> Response:
        method = self._methods.get(raw_method.lower(), raw_method)
        call = Call(method, _normalize(params), {k: data for k, (_, data) in uploads.items()}, time.time())
        try:
            if token != self.token:
                return json_response({"ok": False, "error_code": 401, "description": "Unauthorized"}, 401)
            with self._cond:
                queue = self._faults.get(method.lower())
                if queue:
                    queue[0][1] -= 1
                    error = queue[0][0] if queue[0][1] >= 0 else None
                    if queue[0][1] <= 0:
                        queue.pop(0)
                    if error is not None:
                        raise error
                if raw_method.lower() not in self._methods:
                    raise _ApiError(404, "Not Found: method not found")
                result = getattr(self, "_m_" + method)(call.params, uploads)
                call.result = copy.deepcopy(result)
                return json_response({"ok": True, "result": result})
        except _ApiError as exc:
            call.error = exc.as_dict()
            return json_response({"ok": False, **exc.as_dict()}, exc.code)
        finally:
            if token == self.token:
                with self._cond:
                    self._calls.append(call)

    # ------------------------------------------------------------------ webhook delivery

    def _webhook_loop(self) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping.is_set() or (self._webhook and self._updates))
                if self._stopping.is_set():
                    return
                hook, update = dict(self._webhook), copy.deepcopy(self._updates[0])
            request = urllib.request.Request(hook["url"], data=json.dumps(update).encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
            if hook["secret_token"]:
                request.add_header("X-Telegram-Bot-Api-Secret-Token", hook["secret_token"])
            try:
                with opener.open(request, timeout=10) as response:
                    response.read()
                delivered = True
            except (urllib.error.URLError, OSError):
                delivered = False
            with self._cond:
                if delivered:
                    self._updates = [u for u in self._updates if u["update_id"] != update["update_id"]]
                self._cond.notify_all()
            if not delivered:
                self.pause(self.webhook_retry_delay)

    # ------------------------------------------------------------------ state (lock held)

    def _user(self, user_id, first_name, username, language_code) -> dict:
        user = {"id": int(user_id), "is_bot": False, "first_name": first_name}
        if username:
            user["username"] = username
        if language_code:
            user["language_code"] = language_code
        self._users[int(user_id)] = user
        return user

    def _chat(self, chat_id: int) -> dict:
        user = self._users.get(chat_id, {})
        chat = {"id": chat_id, "type": "private", "first_name": user.get("first_name", "")}
        if user.get("username"):
            chat["username"] = user["username"]
        return chat

    def _new_message(self, chat_id: int, sender: dict, content: dict) -> dict:
        message_id = self._next_message_id.get(chat_id, 1)
        self._next_message_id[chat_id] = message_id + 1
        message = {"message_id": message_id, "from": copy.deepcopy(sender), "chat": self._chat(chat_id),
                   "date": int(time.time()), **copy.deepcopy(content)}
        self._messages[(chat_id, message_id)] = message
        return message

    def _user_message(self, user: dict, content: dict) -> dict:
        self._blocked.discard(user["id"])          # writing to a blocked bot restarts it
        return self._push_update("message", self._new_message(user["id"], user, content))

    def _push_update(self, kind: str, payload: dict) -> dict:
        update = {"update_id": self._next_update_id, kind: copy.deepcopy(payload)}
        self._next_update_id += 1
        self._updates.append(update)
        self._cond.notify_all()
        return copy.deepcopy(update)

    def _store_file(self, data: bytes, kind: str, file_size: int | None = None, file_name: str | None = None,
                    mime_type: str | None = None) -> dict:
        n = next(self._ids)
        prefix = "AgACAgIAAxkBAAI" if kind == "photos" else "BQACAgIAAxkBAAI"
        record = {"file_id": f"{prefix}{n:06d}FAKE", "file_unique_id": f"AQAD{n:06d}", "data": data,
                  "file_size": len(data) if file_size is None else int(file_size), "kind": kind,
                  "file_name": file_name, "mime_type": mime_type, "file_path": None}
        self._files[record["file_id"]] = record
        return record

    @staticmethod
    def _document_json(record: dict) -> dict:
        document = {k: record[k] for k in ("file_id", "file_unique_id", "file_size")}
        document.update({k: record[k] for k in ("file_name", "mime_type") if record[k]})
        return document

    def _store_photo(self, data: bytes, info, file_size: int | None = None) -> list[dict]:
        """A JPEG thumbnail (320 px box) when the photo is larger, then the photo as uploaded."""
        sizes = [_thumbnail(data, 320)] if max(info) > 320 else []
        photo = []
        for blob, width, height in sizes + [(data, *info)]:
            record = self._store_file(blob, "photos", file_size if blob is data else None)
            photo.append({"file_id": record["file_id"], "file_unique_id": record["file_unique_id"],
                          "file_size": record["file_size"], "width": width, "height": height})
        return photo

    def _target_chat(self, p: dict, *, sending: bool = True) -> int:
        chat_id = _as_int(p.get("chat_id"))
        if p.get("chat_id") in (None, ""):
            raise _bad("chat_id is empty")
        if chat_id is None or chat_id not in self._users and (self.strict_chats or chat_id <= 0):
            raise _bad("chat not found")
        if chat_id not in self._users:
            self._user(chat_id, "User", None, None)
        if sending and chat_id in self._blocked:
            raise _ApiError(403, "Forbidden: bot was blocked by the user")
        return chat_id

    @staticmethod
    def _reply_markup(p: dict) -> dict | None:
        """Validate ``reply_markup``; return what Telegram echoes (inline keyboards only)."""
        markup = p.get("reply_markup")
        if markup in (None, ""):
            return None
        if not isinstance(markup, dict):
            raise _bad("can't parse reply keyboard markup JSON object")
        rows = markup.get("inline_keyboard")
        if rows is None:
            return None
        if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
            raise _bad('field "inline_keyboard" of the InlineKeyboardMarkup must be an Array of Arrays')
        echoed = []
        for row in rows:
            echoed.append([])
            for button in row:
                if not isinstance(button, dict) or not isinstance(button.get("text"), str) or not button["text"]:
                    raise _bad("can't parse inline keyboard button: InlineKeyboardButton must be an Object "
                               "with a non-empty text")  # approx.
                url, data = button.get("url"), button.get("callback_data")
                if url:
                    if not _valid_link(url):
                        raise _bad(f"inline keyboard button URL '{url}' is invalid: Wrong HTTP URL")
                    echoed[-1].append({"text": button["text"], "url": url})
                elif data:
                    if len(data.encode("utf-8")) > MAX_CALLBACK_DATA_BYTES:
                        raise _bad("BUTTON_DATA_INVALID")
                    echoed[-1].append({"text": button["text"], "callback_data": data})
                else:
                    raise _bad("can't parse inline keyboard button: Text buttons are unallowed in the inline keyboard")
        return {"inline_keyboard": echoed} if any(echoed) else None

    @staticmethod
    def _formatted(p: dict, key: str, limit: int, too_long: str) -> str:
        if p.get("parse_mode"):
            raise _bad("parse_mode is refused by the fake: Media Lab sends plain text only")
        text = str(p.get(key) or "").rstrip().lstrip(" \n")      # TDLib fix_formatted_text trimming
        if len(text) > limit:
            raise _bad(too_long)
        return text

    def _text(self, p: dict) -> str:
        if p.get("text") in (None, ""):
            raise _bad("message text is empty")
        text = self._formatted(p, "text", MAX_TEXT_LENGTH, "message is too long")
        if not text:
            raise _bad("text must be non-empty")
        return text

    def _caption(self, p: dict) -> dict:
        caption = self._formatted(p, "caption", MAX_CAPTION_LENGTH, "message caption is too long")
        return {"caption": caption} if caption else {}

    def _upload(self, p: dict, uploads: dict, name: str):
        if p.get(name) not in (None, ""):              # a file sent before, again by its file_id
            record = self._files.get(str(p[name]))
            if record is None:
                raise _bad("wrong file identifier/HTTP URL specified")
            return record["file_name"] or name, record["data"]
        if name not in uploads:
            raise _bad(f"there is no {name} in the request")
        if len(uploads[name][1]) > MAX_UPLOAD:
            raise _ApiError(413, "Request Entity Too Large")
        return uploads[name]

    def _bot_message(self, chat_id: int, content: dict, markup: dict | None) -> dict:
        message = self._new_message(chat_id, self.bot_user, content)
        if markup:
            message["reply_markup"] = markup
        self._bot_messages.setdefault(chat_id, []).append(message["message_id"])
        return copy.deepcopy(message)

    def _edit_target(self, p: dict) -> dict:
        message = self._messages.get((self._target_chat(p, sending=False), _as_int(p.get("message_id"))))
        if message is None:
            raise _bad("message to edit not found")
        if message["from"]["id"] != self.bot_id:
            raise _bad("message can't be edited")
        return message

    def _edit(self, message: dict, key: str, value: str, markup: dict | None) -> dict:
        if (value, markup) == (message.get(key, ""), message.get("reply_markup")):
            raise _bad(_NOT_MODIFIED)
        for name, new in ((key, value), ("reply_markup", markup)):
            if new:
                message[name] = new
            else:
                message.pop(name, None)
        message["edit_date"] = int(time.time())
        return copy.deepcopy(message)

    # ------------------------------------------------------------------ Bot API methods (lock held)

    def _m_getMe(self, p, uploads):
        return dict(self.bot_user, can_join_groups=True, can_read_all_group_messages=False,
                    supports_inline_queries=False)

    def _m_getUpdates(self, p, uploads):
        if self._webhook:
            raise _ApiError(409, "Conflict: can't use getUpdates method while webhook is active; "
                                 "use deleteWebhook to delete the webhook first")
        offset = _as_int(p.get("offset")) or 0
        limit = min(max(_as_int(p.get("limit")) or 100, 1), 100)
        timeout = min(max(int(float(p.get("timeout") or 0)), 0), LONG_POLL_MAX_TIMEOUT)
        if offset > 0:
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
        deadline = time.monotonic() + timeout
        self._polling += 1
        self._cond.notify_all()
        try:
            while not self._updates and not self._stopping.is_set() and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            return copy.deepcopy(self._updates[:limit])
        finally:
            self._polling -= 1

    def _m_setWebhook(self, p, uploads):
        url = str(p.get("url") or "")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _bad("invalid webhook URL specified")
        if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost"):
            raise _bad("bad webhook: An HTTPS URL must be provided for webhook")
        secret = str(p.get("secret_token") or "")
        if not re.fullmatch(r"[A-Za-z0-9_-]{0,256}", secret):
            raise _bad("secret token contains unallowed characters")
        return self._m_deleteWebhook(p, uploads, {"url": url, "secret_token": secret})

    def _m_deleteWebhook(self, p, uploads, hook=None):
        if p.get("drop_pending_updates"):
            self._updates.clear()
        self._webhook = hook
        self._cond.notify_all()
        return True

    def _m_setMyCommands(self, p, uploads):
        commands = p.get("commands")
        if not isinstance(commands, list) or len(commands) > 100:
            raise _bad("can't parse commands JSON object")                      # approx.
        for command in commands:
            if not re.fullmatch(r"[a-z0-9_]{1,32}", str(command.get("command", "")).lstrip("/")):
                raise _bad("BOT_COMMAND_INVALID")
            if not 1 <= len(str(command.get("description", ""))) <= 256:
                raise _bad("BOT_COMMAND_DESCRIPTION_INVALID")
        return True

    def _m_sendMessage(self, p, uploads):
        text, markup = self._text(p), self._reply_markup(p)
        return self._bot_message(self._target_chat(p), {"text": text}, markup)

    def _m_sendPhoto(self, p, uploads):
        caption, markup = self._caption(p), self._reply_markup(p)
        _, data = self._upload(p, uploads, "photo")
        chat_id = self._target_chat(p)
        if len(data) > MAX_PHOTO_UPLOAD:
            raise _bad("file is too big")
        info = _image_info(data)
        if info is None:
            raise _bad("IMAGE_PROCESS_FAILED")
        if sum(info) > 10000 or max(info) > 20 * min(info):
            raise _bad("PHOTO_INVALID_DIMENSIONS")
        return self._bot_message(chat_id, {"photo": self._store_photo(data, info), **caption}, markup)

    def _m_sendDocument(self, p, uploads):
        caption, markup = self._caption(p), self._reply_markup(p)
        name, data = self._upload(p, uploads, "document")
        chat_id = self._target_chat(p)
        mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
        record = self._store_file(data, "documents", None, name, mime)
        return self._bot_message(chat_id, {"document": self._document_json(record), **caption}, markup)

    def _m_editMessageText(self, p, uploads):
        text, markup = self._text(p), self._reply_markup(p)
        message = self._edit_target(p)
        if "text" not in message:
            raise _bad("there is no text in the message to edit")
        return self._edit(message, "text", text, markup)

    def _m_editMessageCaption(self, p, uploads):
        caption, markup = self._caption(p).get("caption", ""), self._reply_markup(p)
        message = self._edit_target(p)
        if "text" in message:
            raise _bad("there is no caption in the message to edit")
        return self._edit(message, "caption", caption, markup)

    def _m_editMessageReplyMarkup(self, p, uploads):
        markup = self._reply_markup(p)               # without reply_markup: the keyboard is removed
        message = self._edit_target(p)
        key = "text" if "text" in message else "caption"
        return self._edit(message, key, message.get(key, ""), markup)

    def _m_deleteMessage(self, p, uploads):
        key = (self._target_chat(p, sending=False), _as_int(p.get("message_id")))
        if self._messages.pop(key, None) is None:
            raise _bad("message to delete not found")
        return True

    def _m_answerCallbackQuery(self, p, uploads):
        query_id = str(p.get("callback_query_id") or "")
        if self._callbacks.get(query_id, True):
            raise _bad("query is too old and response timeout expired or query ID is invalid")
        self._callbacks[query_id] = True
        return True

    def _m_sendChatAction(self, p, uploads):
        if p.get("action") not in _CHAT_ACTIONS:
            raise _bad("wrong parameter action in request")
        self._target_chat(p)
        return True

    def _m_getFile(self, p, uploads):
        record = self._files.get(str(p.get("file_id") or ""))
        if record is None:
            raise _bad("invalid file_id")
        if record["file_size"] > MAX_DOWNLOAD:
            raise _bad("file is too big")
        if record["file_path"] is None:
            name = record["file_name"] or ""
            ext = ".jpg" if record["kind"] == "photos" else name[name.rfind("."):] if "." in name else ""
            record["file_path"] = f"{record['kind']}/file_{next(self._ids)}{ext}"
            self._paths[record["file_path"]] = record["file_id"]
        return {k: record[k] for k in ("file_id", "file_unique_id", "file_size", "file_path")}

    def _invoice(self, p: dict, payload_key: str) -> dict:
        title, description = str(p.get("title") or ""), str(p.get("description") or "")
        payload = str(p.get(payload_key) or "")
        if not 1 <= len(title) <= 32:
            raise _bad("TITLE_INVALID" if title else "title is empty")                  # approx.
        if not 1 <= len(description) <= 255:
            raise _bad("DESCRIPTION_INVALID" if description else "description is empty")  # approx.
        if not 1 <= len(payload.encode("utf-8")) <= 128:
            raise _bad("PAYLOAD_INVALID" if payload else "payload is empty")            # approx.
        if p.get("currency") != "XTR":
            raise _bad("CURRENCY_INVALID: the fake models Telegram Stars (XTR) only")   # approx.
        if p.get("provider_token") not in (None, ""):
            raise _bad("PAYMENT_PROVIDER_INVALID: pass an empty provider_token for Telegram Stars")  # approx.
        prices = p.get("prices")
        if not isinstance(prices, list):
            raise _bad("can't parse prices JSON object")                                 # approx.
        if len(prices) != 1:
            raise _bad("STARS_INVOICE_INVALID: exactly one price is allowed in Telegram Stars")  # approx.
        amount = prices[0].get("amount") if isinstance(prices[0], dict) else None
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0 or not prices[0].get("label"):
            raise _bad("STARS_INVOICE_INVALID")                                          # approx.
        if p.get("max_tip_amount") or p.get("suggested_tip_amounts") or p.get("need_shipping_address"):
            raise _bad("STARS_INVOICE_INVALID: no tips or shipping in Telegram Stars")   # approx.
        return {"title": title, "description": description, "payload": payload, "currency": "XTR",
                "total_amount": amount}

    def _m_sendInvoice(self, p, uploads):
        invoice, markup = self._invoice(p, "payload"), self._reply_markup(p)
        chat_id = self._target_chat(p)
        message = self._bot_message(chat_id, {"invoice": {
            "title": invoice["title"], "description": invoice["description"], "start_parameter": "",
            "currency": invoice["currency"], "total_amount": invoice["total_amount"]}}, markup)
        self._invoices[f"msg:{chat_id}:{message['message_id']}"] = invoice
        return message

    def _m_createInvoiceLink(self, p, uploads):
        invoice = self._invoice(p, "payload")
        link = f"https://t.me/$FAKE{next(self._ids):010d}"
        self._invoices["link:" + link] = invoice
        return link

    def _m_answerPreCheckoutQuery(self, p, uploads):
        state = self._pre_checkouts.get(str(p.get("pre_checkout_query_id") or ""))
        if state is None or state["answer"] is not None or state["late"]:
            raise _bad(_QUERY_TOO_OLD)
        if not p.get("ok") and not str(p.get("error_message") or "").strip():
            raise _bad("ERROR_MESSAGE_EMPTY")                                            # approx.
        state["answer"] = {"ok": bool(p.get("ok")), "error_message": p.get("error_message")}
        self._cond.notify_all()
        return True

    def _m_refundStarPayment(self, p, uploads):
        charge_id = str(p.get("telegram_payment_charge_id") or "")
        if not charge_id:
            raise _bad("CHARGE_ID_EMPTY")                                                # approx.
        charge = self._charges.get(charge_id)
        if charge is not None and charge["user"] != _as_int(p.get("user_id")):
            raise _bad("USER_ID_INVALID")                                                # approx.
        self._refund(charge_id)
        return True

    def _m_getStarTransactions(self, p, uploads):
        offset = max(_as_int(p.get("offset")) or 0, 0)
        limit = _as_int(p.get("limit")) or 100
        if not 1 <= limit <= 100:
            raise _bad("limit must be between 1 and 100")                                # approx.
        return {"transactions": copy.deepcopy(self._transactions[offset:offset + limit])}


try:  # the fixture is optional so that demo.py can import this module without pytest
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.fixture
    def fake_telegram():
        """A started ``FakeTelegram()`` (token ``123456:TEST-TOKEN``); stopped afterwards."""
        with FakeTelegram() as fake:
            yield fake
