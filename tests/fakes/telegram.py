"""A local fake of the Telegram Bot API HTTP server, spoken to by the real pyTelegramBotAPI.

Point the bot at it with ``TELEGRAM_API_URL=fake.url``; the bot then sets::

    apihelper.API_URL = fake.url + "/bot{0}/{1}"
    apihelper.FILE_URL = fake.url + "/file/bot{0}/{1}"

Tests play the users (``send_text``, ``send_photo``, ``press`` ... push updates) and watch the bot
(``calls``, ``messages``, ``wait_for``, ``wait_for_message``). The ``fake_telegram`` fixture at the
bottom yields a started fake. The server is stdlib only (``http.server.ThreadingHTTPServer`` on
127.0.0.1, HTTP/1.1 keep-alive). Pillow, which is a runtime dependency anyway, reads image sizes
and makes thumbnails.

What is faithful
----------------
Error texts and limits come from the Bot API server source (tdlib/telegram-bot-api ``Client.cpp``)
and TDLib (``MessageEntity.cpp``, ``MessageContent.cpp``, ``MessagesManager.cpp``).

* Routes ``/bot<token>/<method>`` (method names are case-insensitive) and
  ``/file/bot<token>/<file_path>``. Parameters come from the query string (where
  pyTelegramBotAPI puts them) and from urlencoded, JSON or multipart bodies. Multipart parts that
  carry a filename are uploads, and ``attach://<name>`` refers to them.
* Answers are ``{"ok": true, "result": ...}``. Errors are ``{"ok": false, "error_code", "description"
  [, "parameters"]}`` sent with that HTTP status: wrong token -> 401 ``Unauthorized``, unknown method
  -> 404 ``Not Found: method not found``, a 429 carries ``parameters.retry_after``.
* getUpdates: ``offset`` confirms (drops) older updates, a negative offset keeps only the last N,
  ``limit`` is 1..100 and ``timeout`` (0..50 s) long-polls on a Condition. A second concurrent
  getUpdates ends the first with 409 ``Conflict: terminated by other getUpdates request``.
  getUpdates while a webhook is set -> 409. ``allowed_updates`` is remembered, and updates of other
  types are never queued.
* Webhooks: setWebhook (``secret_token`` checked and sent back as the
  ``X-Telegram-Bot-Api-Secret-Token`` header, ``drop_pending_updates``), deleteWebhook and
  getWebhookInfo (``pending_update_count``, ``last_error_*``). Updates are POSTed as JSON in
  order. A non-2xx answer is retried. A 2xx JSON answer that names a ``method`` is executed like
  Telegram's "reply in the webhook response".
* Text: ``parse_mode`` HTML, MarkdownV2 and Markdown are parsed as TDLib does (ported
  ``parse_html``/``parse_markdown_v2``/``parse_markdown``). Stored text is the plain text, plus
  ``entities`` with UTF-16 offsets. Bad markup -> 400 ``can't parse entities: ...`` (e.g.
  ``Unsupported start tag "x" at byte offset 3``, ``Character '.' is reserved and must be escaped
  with the preceding '\\'``). Text is trimmed like TDLib. Limits count Unicode code points after
  parsing: text 4096 (``message is too long``), caption 1024 (``message caption is too long``).
  Empty text gives ``message text is empty``, and whitespace-only text gives
  ``text must be non-empty``.
* Keyboards: inline keyboards are checked (text buttons -> ``can't parse inline keyboard button:
  Text buttons are unallowed in the inline keyboard``, callback_data > 64 bytes ->
  ``BUTTON_DATA_INVALID``, bad URLs -> ``inline keyboard button URL '...' is invalid``). Only
  inline keyboards are echoed in ``reply_markup``. An edit without ``reply_markup`` removes the
  keyboard, as on Telegram. Editing to identical content -> ``message is not modified: ...``.
* Chats: private chats only (chat id == user id). ``message_id`` is one counter per chat, shared
  by user and bot messages. Sending to a user who never wrote to the bot -> 400 ``chat not found``
  (pass ``strict_chats=False`` to allow it). After ``block(user_id)`` sends get 403
  ``Forbidden: bot was blocked by the user``, and ``my_chat_member`` updates are pushed.
* Files: an uploaded photo gets a ``photo`` array of PhotoSize (real JPEG thumbnails, and the
  last entry is the uploaded bytes with their real width/height). Photos > 10 MB -> ``file is too
  big``. Width+height > 10000 or aspect ratio > 20 -> ``PHOTO_INVALID_DIMENSIONS``. Bytes that are
  not an image -> ``IMAGE_PROCESS_FAILED``. Any upload > 50 MB -> 413. Re-sending by file_id works,
  and an unknown file_id -> ``wrong file identifier/HTTP URL specified``. HTTP(S) URLs are really
  downloaded (photo 5 MB, other 20 MB; unreachable -> ``failed to get HTTP URL content``, not an
  image -> ``wrong type of the web page content``). getFile over 20 MiB -> ``file is too big``.
  Downloads serve the bytes, and an unknown path -> 404.
* Callback queries can be answered once. A second answer or an unknown id ->
  ``query is too old and response timeout expired or query ID is invalid``.

What is simplified
------------------
* One bot, private chats only: no groups, channels, inline mode, payments or business features.
* The largest PhotoSize is the uploaded file as is. Telegram would re-encode it to JPEG and cap it
  at 2560 px; ``send_photo(..., recompress=True)`` imitates that for user photos. Only photo
  and document media exist (no video, audio, stickers, animations or document thumbnails).
* No automatic flood control: use ``fail_next``. No 48-hour edit/delete window, no callback
  answer deadline, no 24-hour update expiry.
* Webhook delivery is one connection in order, to ``https://`` *or* ``http://127.0.0.1`` /
  ``localhost``. Telegram wants HTTPS on ports 443/80/88/8443 and verifies certificates, and the
  fake does not verify them. Retries come after ``webhook_retry_delay`` seconds, not Telegram's
  back-off.
* Some rarely hit error texts are approximations (marked "approx." in the code). Automatic
  entities (URLs, mentions) are not detected in bot text. Link URLs are not normalised.
* Downloads are recorded as ``Call("download", {"file_path", "file_id"})`` next to the API calls.
"""
from __future__ import annotations

import copy
import email.parser
import email.policy
import io
import itertools
import json
import mimetypes
import re
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

DEFAULT_TOKEN = "123456:TEST-TOKEN"

MAX_TEXT_LENGTH = 4096
MAX_CAPTION_LENGTH = 1024
MAX_CALLBACK_DATA_BYTES = 64
MAX_PHOTO_UPLOAD = 10 * 1024 * 1024
MAX_UPLOAD = 50 * 1024 * 1024
MAX_PHOTO_BY_URL = 5 * 1024 * 1024
MAX_FILE_BY_URL = 20 * 1024 * 1024
MAX_DOWNLOAD = 20 << 20            # telegram-bot-api Client.h MAX_DOWNLOAD_FILE_SIZE
LONG_POLL_MAX_TIMEOUT = 50         # Client.h LONG_POLL_MAX_TIMEOUT
FIRST_UPDATE_ID = 100_000_001

MESSAGE_METHODS = frozenset({
    "sendMessage", "sendPhoto", "sendDocument", "sendMediaGroup", "copyMessage",
    "editMessageText", "editMessageCaption", "editMessageReplyMarkup",
})
_JSON_PARAMS = frozenset({
    "reply_markup", "media", "reply_parameters", "caption_entities", "entities",
    "allowed_updates", "commands", "scope", "link_preview_options", "menu_button",
})
_INT_PARAMS = frozenset({
    "chat_id", "from_chat_id", "message_id", "reply_to_message_id", "offset", "limit", "timeout",
    "cache_time", "message_thread_id", "max_connections", "user_id",
})
_BOOL_PARAMS = frozenset({
    "disable_notification", "protect_content", "show_alert", "drop_pending_updates",
    "allow_sending_without_reply", "disable_web_page_preview", "disable_content_type_detection",
    "has_spoiler", "show_caption_above_media", "allow_paid_broadcast",
})
_CHAT_ACTIONS = frozenset({
    "cancel", "typing", "record_video", "upload_video", "record_audio", "record_voice",
    "upload_audio", "upload_voice", "upload_photo", "upload_document", "choose_sticker",
    "pick_up_location", "find_location", "record_video_note", "upload_video_note",
})
# update types Telegram sends when allowed_updates is empty (all but these three)
_NOT_DEFAULT_UPDATES = frozenset({"chat_member", "message_reaction", "message_reaction_count"})
_INLINE_BUTTON_ACTIONS = ("callback_game", "pay", "switch_inline_query",
                          "switch_inline_query_chosen_chat", "switch_inline_query_current_chat",
                          "login_url", "web_app", "copy_text")


@dataclass
class Call:
    """One Bot API request made by the bot, as the fake understood it.

    ``params`` are normalised: JSON-valued fields decoded, ids/limits as ``int``, flags as
    ``bool``. ``files`` maps multipart field names to the uploaded bytes. ``result`` is what was
    answered (``None`` on error) and ``error`` is ``{"error_code", "description"[, "parameters"]}``.
    """

    method: str
    params: dict
    files: dict = field(default_factory=dict)
    time: float = 0.0
    result: Any = None
    error: dict | None = None

    @property
    def ok(self) -> bool:
        """True when the call succeeded."""
        return self.error is None

    @property
    def chat_id(self) -> int | None:
        """The ``chat_id`` parameter as an int (None when absent or not numeric)."""
        return _as_int(self.params.get("chat_id"))

    def summary(self) -> str:
        """One line for failure dumps."""
        bits = [self.method]
        if self.chat_id is not None:
            bits.append(f"chat={self.chat_id}")
        for key in ("message_id", "text", "caption", "data", "action", "callback_query_id"):
            if key in self.params:
                value = str(self.params[key])
                bits.append(f"{key}={value[:60]!r}" if len(value) <= 60 else f"{key}={value[:57]!r}...")
        if self.files:
            bits.append("files=" + ",".join(f"{k}:{len(v)}B" for k, v in self.files.items()))
        if self.error:
            bits.append(f"-> {self.error['error_code']} {self.error['description']}")
        return " ".join(bits)


class _ApiError(Exception):
    def __init__(self, code: int, description: str, parameters: dict | None = None):
        super().__init__(description)
        self.code = code
        self.description = description
        self.parameters = parameters

    def as_dict(self) -> dict:
        err = {"error_code": self.code, "description": self.description}
        if self.parameters:
            err["parameters"] = dict(self.parameters)
        return err


def _bad(message: str) -> _ApiError:
    return _ApiError(400, "Bad Request: " + message)


def _as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return None


def _as_bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1")
    return bool(value)


# ---------------------------------------------------------------------------------------------
# text formatting: ports of TDLib parse_html / parse_markdown / parse_markdown_v2 + trimming

_SPACES = " \t\r\n\v\f\0"      # TDLib is_space(); NUL is our end-of-text sentinel
_HTML_TAGS = frozenset({"a", "b", "strong", "i", "em", "s", "strike", "del", "u", "ins", "tg-spoiler",
                        "tg-emoji", "tg-time", "span", "pre", "code", "blockquote"})
_HTML_SIMPLE = {"b": "bold", "strong": "bold", "i": "italic", "em": "italic", "s": "strikethrough",
                "strike": "strikethrough", "del": "strikethrough", "u": "underline", "ins": "underline",
                "tg-spoiler": "spoiler", "span": "spoiler"}
_TD_TYPE_NAMES = {"bold": "Bold", "italic": "Italic", "underline": "Underline",
                  "strikethrough": "Strikethrough", "spoiler": "Spoiler", "code": "Code", "pre": "Pre",
                  "text_link": "TextUrl", "custom_emoji": "CustomEmoji", "blockquote": "BlockQuote"}
_MDV2_RESERVED = "_*[]()~`>#+-=|{}.!\n"


def _u16(s: str) -> int:
    return len(s.encode("utf-16-le", "surrogatepass")) // 2


def _entities_error(message: str) -> _ApiError:
    return _bad("can't parse entities: " + message)


def _byte_offset(text: str, index: int) -> int:
    return len(text[:index].encode("utf-8", "surrogatepass"))


def _checked_link(url: str) -> str:
    """Simplified LinkManager::get_checked_link: '' when the URL is not acceptable."""
    url = url.strip()
    if not url or any(c.isspace() for c in url):
        return ""
    parts = urlsplit(url if "://" in url or url.startswith("tg:") else "http://" + url)
    if parts.scheme.lower() in ("http", "https"):
        host = parts.hostname or ""
        return url if "." in host or host == "localhost" else ""
    return url if parts.scheme.lower() in ("tg", "ton", "tonsite") else ""


def _decode_html_entity(t: str, pos: int):
    """Return (char, next_pos) for an HTML entity at t[pos] == '&', else (None, pos)."""
    end = pos + 1
    if t[pos + 1] == "#":
        end += 1
        code = 0
        if t[pos + 2] == "x":
            end += 1
            while t[end] in "0123456789abcdefABCDEF":
                code = code * 16 + int(t[end], 16)
                end += 1
        else:
            while t[end] in "0123456789":
                code = code * 10 + int(t[end])
                end += 1
        if code == 0 or code >= 0x10FFFF or end - pos >= 10:
            return None, pos
        char = "\ufffd" if 0xD800 <= code <= 0xDFFF else chr(code)
    else:
        while t[end].isascii() and t[end].isalpha():
            end += 1
        char = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}.get(t[pos + 1:end])
        if char is None:
            return None, pos
    if t[end] == ";":
        end += 1
    return char, end


def _parse_html(text: str):
    t, n = text + "\0", len(text)
    out: list[str] = []
    entities: list[dict] = []
    stack: list[list] = []          # [tag, argument, utf16 start, len(out) at start]
    u16 = 0
    i = 0
    while i < n:
        c = t[i]
        if c == "&":
            char, j = _decode_html_entity(t, i)
            if char is not None:
                out.append(char)
                u16 += _u16(char)
                i = j
                continue
        if c != "<":
            out.append(c)
            u16 += _u16(c)
            i += 1
            continue
        begin = i
        i += 1
        if t[i] != "/":
            while t[i] not in _SPACES and t[i] != ">":
                i += 1
            if i >= n:
                raise _entities_error(f"Unclosed start tag at byte offset {_byte_offset(text, begin)}")
            tag = t[begin + 1:i].lower()
            if tag not in _HTML_TAGS:
                raise _entities_error(
                    f'Unsupported start tag "{tag}" at byte offset {_byte_offset(text, begin)}')
            argument = ""
            while t[i] != ">":
                while i < n and t[i] in _SPACES:
                    i += 1
                if t[i] == ">":
                    break
                name_begin = i
                while t[i] not in _SPACES and t[i] not in "=>/\"'":
                    i += 1
                name = t[name_begin:i]
                if not name:
                    raise _entities_error(f'Empty attribute name in the tag "{tag}" at byte offset '
                                          f"{_byte_offset(text, begin)}")
                while i < n and t[i] in _SPACES:
                    i += 1
                if t[i] != "=":
                    if i >= n:
                        raise _entities_error(f'Unclosed start tag "{tag}" at byte offset '
                                              f"{_byte_offset(text, begin)}")
                    if tag == "blockquote" and name == "expandable":
                        argument = "1"
                    continue
                i += 1
                while i < n and t[i] in _SPACES:
                    i += 1
                if i >= n:
                    raise _entities_error(f'Unclosed start tag "{tag}" at byte offset '
                                          f"{_byte_offset(text, begin)}")
                if t[i] not in "'\"":
                    value_begin = i
                    while t[i].isascii() and (t[i].isalnum() or t[i] in ".-"):
                        i += 1
                    value = t[value_begin:i].lower()
                    if t[i] not in _SPACES and t[i] != ">":
                        raise _entities_error("Unexpected end of name token at byte offset "
                                              f"{_byte_offset(text, value_begin)}")
                else:
                    quote = t[i]
                    i += 1
                    chars = []
                    while i < n and t[i] != quote:
                        if t[i] == "&":
                            char, j = _decode_html_entity(t, i)
                            if char is not None:
                                chars.append(char)
                                i = j
                                continue
                        chars.append(t[i])
                        i += 1
                    if t[i] == quote:
                        i += 1
                    value = "".join(chars)
                if i >= n:
                    raise _entities_error(f"Unclosed start tag at byte offset {_byte_offset(text, begin)}")
                if tag == "a" and name == "href":
                    argument = value
                elif tag == "code" and name == "class" and value.startswith("language-"):
                    argument = value[9:]
                elif tag == "span" and name == "class" and value.startswith("tg-"):
                    argument = value[3:]
                elif tag == "tg-emoji" and name == "emoji-id":
                    argument = value
                elif tag == "blockquote" and name == "expandable":
                    argument = "1"
            if tag == "span" and argument != "spoiler":
                raise _entities_error(f'Tag "span" must have class "tg-spoiler" at byte offset '
                                      f"{_byte_offset(text, begin)}")
            stack.append([tag, argument, u16, len(out)])
            i += 1
            continue
        # an end tag
        if not stack:
            raise _entities_error(f"Unexpected end tag at byte offset {_byte_offset(text, begin)}")
        while t[i] not in _SPACES and t[i] != ">":
            i += 1
        end_tag = t[begin + 2:i].lower()
        while i < n and t[i] in _SPACES:
            i += 1
        if t[i] != ">":
            raise _entities_error(f"Unclosed end tag at byte offset {_byte_offset(text, begin)}")
        tag, argument, start, out_start = stack.pop()
        if end_tag and end_tag != tag:
            raise _entities_error(f"Unmatched end tag at byte offset {_byte_offset(text, begin)}, "
                                  f'expected "</{tag}>", found "</{end_tag}>"')
        if u16 > start:
            entity = {"offset": start, "length": u16 - start}
            last = entities[-1] if entities else None
            same_span = last is not None and last["offset"] == start and last["length"] == u16 - start
            if tag in _HTML_SIMPLE:
                entities.append(dict(entity, type=_HTML_SIMPLE[tag]))
            elif tag == "tg-emoji":
                if not argument.isdigit() or int(argument) == 0:
                    raise _entities_error("Invalid custom emoji identifier specified")
                entities.append(dict(entity, type="custom_emoji", custom_emoji_id=argument))
            elif tag == "a":
                url = _checked_link(argument or "".join(out[out_start:]))
                if url:
                    entities.append(dict(entity, type="text_link", url=url))
            elif tag == "pre":
                if same_span and last["type"] == "code" and last.get("language"):
                    last["type"] = "pre"
                else:
                    entities.append(dict(entity, type="pre"))
            elif tag == "code":
                if same_span and last["type"] == "pre" and argument:
                    last["language"] = argument
                else:
                    entities.append(dict(entity, type="code", **({"language": argument} if argument else {})))
            elif tag == "blockquote":
                entities.append(dict(entity, type="expandable_blockquote" if argument else "blockquote"))
            # tg-time: date entities are not modelled
        i += 1
    if stack:
        raise _entities_error(f'Can\'t find end tag corresponding to start tag "{stack[-1][0]}"')
    for entity in entities:
        if entity["type"] == "code":
            entity.pop("language", None)
    return "".join(out), entities


def _parse_markdown(text: str):
    """Legacy ``Markdown`` (v1)."""
    t, n = text + "\0", len(text)
    out: list[str] = []
    entities: list[dict] = []
    u16 = 0
    i = 0
    while i < n:
        c = t[i]
        if c == "\\" and t[i + 1] in "_*`[":
            out.append(t[i + 1])
            u16 += 1
            i += 2
            continue
        if c not in "_*`[":
            out.append(c)
            u16 += _u16(c)
            i += 1
            continue
        begin = i
        end_char = "]" if c == "[" else c
        is_pre = False
        language = ""
        i += 1
        if c == "`" and t[i] == "`" and t[i + 1] == "`":
            i += 2
            is_pre = True
            language_end = i
            while t[language_end] not in _SPACES and t[language_end] != "`":
                language_end += 1
            if i != language_end and language_end < n and t[language_end] != "`":
                language = t[i:language_end]
                i = language_end
            if t[i] in "\r\n":
                i += 2 if t[i + 1] in "\r\n" and t[i] != t[i + 1] else 1
        start = u16
        while i < n and (t[i] != end_char or (is_pre and not (t[i + 1] == "`" and t[i + 2] == "`"))):
            out.append(t[i])
            u16 += _u16(t[i])
            i += 1
        if i >= n:
            raise _entities_error("Can't find end of the entity starting at byte offset "
                                  f"{_byte_offset(text, begin)}")
        if u16 != start:
            entity = {"offset": start, "length": u16 - start}
            if c == "_":
                entities.append(dict(entity, type="italic"))
            elif c == "*":
                entities.append(dict(entity, type="bold"))
            elif c == "[":
                if t[i + 1] != "(":
                    url = text[begin + 1:i]
                else:
                    i += 2
                    url_begin = i
                    while i < n and t[i] != ")":
                        i += 1
                    url = text[url_begin:i]
                url = _checked_link(url)
                if url:
                    entities.append(dict(entity, type="text_link", url=url))
            elif is_pre:
                entities.append(dict(entity, type="pre", **({"language": language} if language else {})))
            else:
                entities.append(dict(entity, type="code"))
        if is_pre:
            i += 2
        i += 1
    return "".join(out), entities


def _parse_markdown_v2(text: str):
    t, n = text + "\0", len(text)
    out: list[str] = []
    entities: list[dict] = []
    stack: list[list] = []    # [type, argument, utf16 start, char index of the marker, len(out)]
    u16 = 0
    have_blockquote = False
    can_start_blockquote = True

    def reserved(char):
        return _entities_error(f"Character '{char}' is reserved and must be escaped with the preceding '\\'")

    def cant_find_end(item):
        name = _TD_TYPE_NAMES.get(item[0], item[0])
        if item[0] == "pre" and item[1]:
            name = "PreCode"
        return _entities_error(f"Can't find end of {name} entity at byte offset {_byte_offset(text, item[3])}")

    def read_url(i):
        chars = []
        while i < n and t[i] != ")":
            if t[i] == "\\" and 0 < ord(t[i + 1]) <= 126:
                chars.append(t[i + 1])
                i += 2
                continue
            chars.append(t[i])
            i += 1
        return "".join(chars), i

    i = 0
    while i < n:
        c = t[i]
        if c == "\\" and 0 < ord(t[i + 1]) <= 126:
            i += 1
            u16 += 1
            out.append(t[i])
            if t[i] != "\r":
                can_start_blockquote = t[i] == "\n"
            i += 1
            continue
        chars = "`" if stack and stack[-1][0] in ("code", "pre") else _MDV2_RESERVED
        if c not in chars:
            u16 += _u16(c)
            if c != "\r":
                can_start_blockquote = False
            out.append(c)
            i += 1
            continue

        is_end = False
        if stack:
            top = stack[-1][0]
            if have_blockquote and c == "\n" and (i + 1 == n or t[i + 1] != ">"):
                is_end = True
            elif top == "bold":
                is_end = c == "*"
            elif top == "italic":
                is_end = c == "_" and t[i + 1] != "_"
            elif top == "code":
                is_end = c == "`"
            elif top == "pre":
                is_end = c == "`" and t[i + 1] == "`" and t[i + 2] == "`"
            elif top in ("text_link", "custom_emoji"):
                is_end = c == "]"
            elif top == "underline":
                is_end = c == "_" and t[i + 1] == "_"
            elif top == "strikethrough":
                is_end = c == "~"
            elif top == "spoiler":
                is_end = c == "|" and t[i + 1] == "|"

        if not is_end:
            argument = ""
            marker = i
            if c == "_":
                if t[i + 1] == "_":
                    kind = "underline"
                    i += 1
                else:
                    kind = "italic"
            elif c == "*":
                kind = "bold"
            elif c == "~":
                kind = "strikethrough"
            elif c == "|":
                if t[i + 1] != "|":
                    raise reserved(c)
                kind = "spoiler"
                i += 1
            elif c == "[":
                kind = "text_link"
            elif c == "`":
                if t[i + 1] == "`" and t[i + 2] == "`":
                    i += 3
                    kind = "pre"
                    language_end = i
                    while t[language_end] not in _SPACES and t[language_end] != "`":
                        language_end += 1
                    if i != language_end and language_end < n and t[language_end] != "`":
                        argument = t[i:language_end]
                        i = language_end
                    if t[i] in "\r\n":
                        i += 2 if t[i + 1] in "\r\n" and t[i] != t[i + 1] else 1
                    i -= 1
                else:
                    kind = "code"
            elif c == "!":
                if t[i + 1] != "[":
                    raise reserved(c)
                kind = "custom_emoji"
                i += 1
            elif c == "\n":
                u16 += 1
                out.append("\n")
                can_start_blockquote = True
                i += 1
                continue
            elif c == ">":
                if not can_start_blockquote:
                    raise reserved(c)
                if have_blockquote:
                    i += 1
                    continue
                kind = "blockquote"
                have_blockquote = True
            else:
                raise reserved(c)
            stack.append([kind, argument, u16, marker, len(out)])
            i += 1
            continue

        # the end of an entity
        kind = stack[-1][0]
        if c == "\n" and kind != "blockquote":
            marker = stack[-1][3]
            if kind != "spoiler" or not (marker == i - 2 or (marker == i - 3 and out and out[-1] == "\r")):
                raise cant_find_end(stack[-1])
            stack.pop()
            if stack[-1][0] != "blockquote":
                raise cant_find_end(stack[-1])
            kind = "expandable_blockquote"
        top = stack[-1]
        argument = top[1]
        skip = u16 == top[2]
        extra: dict = {}
        if kind in ("underline", "spoiler"):
            i += 1
        elif kind == "pre":
            i += 2
            if argument:
                extra["language"] = argument
        elif kind == "text_link":
            if t[i + 1] != "(":
                url = "".join(out[top[4]:])
            else:
                url_begin = i + 2
                url, i = read_url(url_begin)
                if t[i] != ")":
                    raise _entities_error(f"Can't find end of a URL at byte offset {_byte_offset(text, url_begin)}")
            url = _checked_link(url)
            if url:
                extra["url"] = url
            else:
                skip = True
        elif kind == "custom_emoji":
            if t[i + 1] != "(":
                raise _entities_error("The entity must contain a tg://emoji or tg://time URL")
            url_begin = i + 2
            url, i = read_url(url_begin)
            if t[i] != ")":
                raise _entities_error(f"Can't find end of a URL at byte offset {_byte_offset(text, url_begin)}")
            match = re.fullmatch(r"tg://emoji\?id=(\d+)", url)
            if match:
                extra["custom_emoji_id"] = match.group(1)
            elif url.startswith("tg://time?"):
                skip = True       # date entities are not modelled
            else:
                raise _entities_error("Invalid tg://emoji or tg://time URL specified")
        elif kind in ("blockquote", "expandable_blockquote"):
            have_blockquote = False
            out.append(t[i])
            can_start_blockquote = True
            u16 += 1
            skip = False
        if not skip:
            entities.append({"type": kind, "offset": top[2], "length": u16 - top[2], **extra})
        stack.pop()
        i += 1

    if have_blockquote and stack:
        kind = "blockquote"
        if stack[-1][0] == "spoiler" and stack[-1][3] == n - 2:
            stack.pop()
            kind = "expandable_blockquote"
        if stack and stack[-1][0] == "blockquote":
            if u16 != stack[-1][2]:
                entities.append({"type": kind, "offset": stack[-1][2], "length": u16 - stack[-1][2]})
            stack.pop()
    if stack:
        raise cant_find_end(stack[-1])
    return "".join(out), entities


def _trim(text: str, entities: list[dict]):
    """TDLib fix_formatted_text trimming: rtrim whitespace, ltrim spaces/newlines before entities."""
    stripped = text.rstrip()
    if not stripped:
        return "", []
    if len(stripped) != len(text):
        limit = _u16(stripped)
        kept = []
        for entity in entities:
            if entity["offset"] >= limit:
                continue
            if entity["offset"] + entity["length"] > limit:
                entity = dict(entity, length=limit - entity["offset"])
            kept.append(entity)
        entities = kept
    first = min((e["offset"] for e in entities), default=len(stripped))
    cut = 0
    while cut < first and cut < len(stripped) and stripped[cut] in " \n":
        cut += 1
    if cut:
        stripped = stripped[cut:]
        entities = [dict(e, offset=e["offset"] - cut) for e in entities]
    return stripped, sorted(entities, key=lambda e: (e["offset"], -e["length"]))


def _format_text(text, parse_mode, entities):
    """Parse ``text`` with ``parse_mode`` (or take explicit ``entities``); return (text, entities)."""
    text = "" if text is None else str(text)
    mode = (parse_mode or "").strip().lower()
    if text and mode not in ("", "none"):
        if mode == "html":
            text, parsed = _parse_html(text)
        elif mode == "markdownv2":
            text, parsed = _parse_markdown_v2(text)
        elif mode == "markdown":
            text, parsed = _parse_markdown(text)
        else:
            raise _bad("unsupported parse_mode")
    else:
        if entities not in (None, "") and not isinstance(entities, list):
            raise _bad("can't parse entities JSON object")
        parsed = [dict(e) for e in entities or [] if isinstance(e, dict)]
    return _trim(text, parsed)


def _bot_command_entities(text: str) -> list[dict]:
    match = re.match(r"/[A-Za-z0-9_]{1,64}(@[A-Za-z0-9_]{3,32})?", text)
    return [{"type": "bot_command", "offset": 0, "length": _u16(match.group(0))}] if match else []


# ---------------------------------------------------------------------------------------------
# images and bodies

def _image_info(data: bytes):
    """(width, height, format) read from the image header, or None when not an image."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            return img.width, img.height, (img.format or "").upper()
    except Exception:  # noqa: BLE001 - any failure means "not an image we can read"
        return None


def _thumbnail(data: bytes, box: int):
    """(jpeg_bytes, width, height) scaled to fit ``box``, or None when it cannot be decoded."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (box, box))
            img = img.convert("RGB")
            img.thumbnail((box, box))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=80)
            return buf.getvalue(), img.width, img.height
    except Exception:  # noqa: BLE001
        return None


def _recompress(data: bytes) -> bytes:
    """Roughly what Telegram does to a photo: JPEG, at most 2560 px on the long side."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        img.thumbnail((2560, 2560))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=87)
        return buf.getvalue()


@dataclass
class _Upload:
    filename: str
    data: bytes
    content_type: str = "application/octet-stream"
    from_url: bool = False


def _parse_body(content_type: str, body: bytes):
    """Return (params, uploads) from a request body; raises ValueError on malformed input."""
    ctype = content_type.split(";")[0].strip().lower()
    if not body:
        return {}, {}
    if ctype == "application/json":
        obj = json.loads(body.decode("utf-8"))
        if not isinstance(obj, dict):
            raise ValueError("JSON body must be an object")
        return obj, {}
    if ctype == "application/x-www-form-urlencoded":
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True)), {}
    if ctype == "multipart/form-data":
        head = b"Content-Type: " + content_type.encode("latin-1") + b"\r\nMIME-Version: 1.0\r\n\r\n"
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        if not message.is_multipart():
            raise ValueError("malformed multipart body")
        params, uploads = {}, {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if not name:
                continue
            name = _fix_header_text(str(name))
            data = part.get_payload(decode=True) or b""
            filename = part.get_filename()
            if filename is not None:
                uploads[name] = _Upload(_fix_header_text(filename), data, part.get_content_type())
            else:
                params[name] = data.decode("utf-8", "replace")
        return params, uploads
    return {}, {}


def _fix_header_text(value: str) -> str:
    """pyTelegramBotAPI writes raw UTF-8 filenames; the email parser keeps them surrogate-escaped."""
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError:
        return value


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
                number = _as_int(value)
                value = value if number is None else number
            elif key in _BOOL_PARAMS:
                value = _as_bool(value)
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# HTTP plumbing

class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return        # a client hung up or the fake closed the socket at stop()
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nginx/1.18.0"
    sys_version = ""
    timeout = 120

    def log_message(self, format, *args):
        pass

    def setup(self):
        super().setup()
        # headers and body are separate writes: avoid delayed-ACK stalls on keep-alive
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.fake._track(self.connection, add=True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, add=False)

    def do_GET(self):
        self.server.fake._serve(self)

    do_POST = do_GET

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


_API_PATH = re.compile(r"/bot([^/]+)/([A-Za-z0-9_]+)/?")
_FILE_PATH = re.compile(r"/file/bot([^/]+)/(.+)")
_FAULT_TEXT = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden: bot was blocked by the user",
               404: "Not Found", 409: "Conflict", 500: "Internal Server Error",
               502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
_NGINX_PAGE = ("<html>\r\n<head><title>{0} {1}</title></head>\r\n<body>\r\n<center><h1>{0} {1}</h1>"
               "</center>\r\n<hr><center>nginx/1.18.0</center>\r\n</body>\r\n</html>\r\n")


@dataclass
class _Fault:
    error: _ApiError
    times: int
    delay: float = 0.0
    body: str | None = None


# ---------------------------------------------------------------------------------------------
# the fake

class FakeTelegram:
    """Local fake Telegram Bot API for one bot. See the module docstring."""

    # canonical method names; requests are matched case-insensitively
    METHODS = (
        "getMe", "logOut", "close", "getUpdates", "setWebhook", "deleteWebhook", "getWebhookInfo",
        "setMyCommands", "getMyCommands", "deleteMyCommands", "setMyDescription",
        "setMyShortDescription", "setChatMenuButton", "sendMessage", "sendPhoto", "sendDocument",
        "sendMediaGroup", "copyMessage", "editMessageText", "editMessageCaption",
        "editMessageReplyMarkup", "deleteMessage", "answerCallbackQuery", "sendChatAction", "getFile",
    )

    def __init__(self, token: str = DEFAULT_TOKEN, bot_username: str = "medialab_test_bot", *,
                 strict_chats: bool = True, port: int = 0, webhook_retry_delay: float = 0.5):
        """``strict_chats``: sending to a user the fake has never seen is ``chat not found``
        (as on Telegram); False creates such users on the fly. ``port``: 0 picks a free port."""
        self.token = token
        self.bot_id = int(token.split(":", 1)[0])
        self.bot_user = {"id": self.bot_id, "is_bot": True, "first_name": "Media Lab",
                         "username": bot_username}
        self.strict_chats = strict_chats
        self.webhook_retry_delay = webhook_retry_delay
        self.webhook_timeout = 10.0
        self._methods = {name.lower(): name for name in self.METHODS}
        self._port = port
        self._cond = threading.Condition(threading.RLock())
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set = set()
        self._stopping = False
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
        self._photo_sets: dict[str, list[dict]] = {}
        self._callbacks: dict[str, dict] = {}
        self._faults: dict[str, list[_Fault]] = {}
        self._commands: dict[str, list] = {}
        self._allowed_updates: list[str] | None = None
        self._webhook: dict | None = None
        self._webhook_error: tuple[int, str] | None = None
        self._poll_generation = 0
        self._polling = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeTelegram:
        """Serve on 127.0.0.1 in daemon threads; returns self."""
        if self._server is not None:
            return self
        self._stopping = False
        self._server = _Server(("127.0.0.1", self._port), _Handler)
        self._server.fake = self
        self._threads = [
            threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01},
                             name="FakeTelegram", daemon=True),
            threading.Thread(target=self._webhook_loop, name="FakeTelegram-webhook", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: wake long polls, close keep-alive connections, join the threads."""
        server, self._server = self._server, None
        if server is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        server.shutdown()
        with self._cond:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL for TELEGRAM_API_URL, e.g. ``http://127.0.0.1:54321`` (no trailing slash)."""
        if self._server is None:
            raise RuntimeError("FakeTelegram is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _track(self, conn, add: bool) -> None:
        with self._cond:
            (self._conns.add if add else self._conns.discard)(conn)

    # ------------------------------------------------------------------ simulated users

    def add_user(self, user_id: int, *, first_name: str = "Tester", username: str | None = None,
                 language_code: str | None = "ru") -> dict:
        """Register a user (as if they had opened the bot) without sending an update."""
        with self._cond:
            return copy.deepcopy(self._user(user_id, first_name, username, language_code))

    def send_text(self, user_id: int, text: str, *, first_name: str = "Tester",
                  username: str | None = None, language_code: str | None = "ru",
                  reply_to_message_id: int | None = None) -> dict:
        """The user sends ``text``; returns the pushed update. A leading ``/command`` gets a
        ``bot_command`` entity, as Telegram adds."""
        if not text or not text.strip():
            raise ValueError("Telegram clients cannot send an empty message")
        if len(text) > MAX_TEXT_LENGTH:
            raise ValueError("Telegram clients split texts over 4096 characters")
        with self._cond:
            user = self._user(user_id, first_name, username, language_code)
            content: dict = {"text": text}
            entities = _bot_command_entities(text)
            if entities:
                content["entities"] = entities
            return self._user_message(user, content, reply_to_message_id)

    send_command = send_text

    def send_photo(self, user_id: int, image_bytes: bytes, *, caption: str | None = None,
                   media_group_id: str | None = None, first_name: str = "Tester",
                   username: str | None = None, language_code: str | None = "ru",
                   file_size: int | None = None, recompress: bool = False) -> dict:
        """The user sends a photo; returns the update. ``message.photo`` holds 2-3 sizes, and the
        last one is the largest: ``image_bytes`` as is, or re-encoded to JPEG (max 2560 px) with
        ``recompress=True``. ``file_size`` overrides the reported size of the largest one."""
        data = _recompress(image_bytes) if recompress else bytes(image_bytes)
        info = _image_info(data)
        if info is None:
            raise ValueError("send_photo needs image bytes Pillow can read")
        with self._cond:
            user = self._user(user_id, first_name, username, language_code)
            sizes = self._store_photo(data, info, file_size=file_size)
            content: dict = {"photo": sizes}
            if media_group_id is not None:
                content["media_group_id"] = str(media_group_id)
            if caption:
                content["caption"] = caption
            return self._user_message(user, content)

    def send_album(self, user_id: int, images: list[bytes], *, caption: str | None = None,
                   **kwargs) -> list[dict]:
        """The user sends several photos as one album (caption on the first); returns the updates."""
        group = str(10**17 + next(self._ids))
        return [self.send_photo(user_id, data, caption=caption if n == 0 else None,
                                media_group_id=group, **kwargs)
                for n, data in enumerate(images)]

    def send_document(self, user_id: int, data: bytes, *, file_name: str, mime_type: str,
                      caption: str | None = None, media_group_id: str | None = None,
                      first_name: str = "Tester", username: str | None = None,
                      language_code: str | None = "ru", file_size: int | None = None) -> dict:
        """The user sends a file as a document; returns the update."""
        with self._cond:
            user = self._user(user_id, first_name, username, language_code)
            record = self._store_file(bytes(data), "documents", file_size=file_size,
                                      file_name=file_name, mime_type=mime_type)
            content: dict = {"document": self._document_json(record)}
            if media_group_id is not None:
                content["media_group_id"] = str(media_group_id)
            if caption:
                content["caption"] = caption
            return self._user_message(user, content)

    def press(self, user_id: int, message_id: int, data: str, *, force: bool = False,
              first_name: str = "Tester", username: str | None = None,
              language_code: str | None = "ru") -> dict:
        """The user presses the inline button with callback ``data`` on a bot message; returns the
        callback_query update. Without ``force`` the message must currently show that button."""
        with self._cond:
            message = self._messages.get((user_id, message_id))
            if message is None or message.get("from", {}).get("id") != self.bot_id:
                raise AssertionError(f"no bot message {message_id} in chat {user_id}")
            if not force and data not in self.button_data(message):
                raise AssertionError(f"message {message_id} in chat {user_id} has no button with "
                                     f"callback_data {data!r}; it has {self.button_data(message)}")
            user = self._user(user_id, first_name, username, language_code)
            query_id = str(4_000_000_000_000_000_000 + next(self._ids))
            self._callbacks[query_id] = {"answered": False, "answer": None}
            return self._push_update("callback_query", {
                "id": query_id, "from": copy.deepcopy(user), "message": copy.deepcopy(message),
                "chat_instance": str(-(7 * 10**18 + user_id)), "data": data,
            })

    def block(self, user_id: int) -> None:
        """The user blocks the bot: sends fail with 403 and a ``my_chat_member`` update is pushed."""
        with self._cond:
            if user_id not in self._users:
                raise AssertionError(f"unknown user {user_id}")
            if user_id not in self._blocked:
                self._blocked.add(user_id)
                self._member_update(user_id, "member", "kicked")

    def unblock(self, user_id: int) -> None:
        """The user restarts the bot (also happens when a blocked user sends anything)."""
        with self._cond:
            if user_id in self._blocked:
                self._blocked.discard(user_id)
                self._member_update(user_id, "kicked", "member")

    def add_file(self, data: bytes, file_size: int | None = None) -> tuple[str, str]:
        """Store bytes under a new file_id; returns (file_id, file_unique_id). ``file_size``
        overrides the size getFile reports (e.g. 30 MB without allocating it)."""
        with self._cond:
            record = self._store_file(bytes(data), "documents", file_size=file_size)
            return record["file_id"], record["file_unique_id"]

    def file_bytes(self, file_id: str) -> bytes:
        """The bytes stored under ``file_id`` (uploads by the bot or the users, ``add_file``)."""
        with self._cond:
            try:
                return self._files[file_id]["data"]
            except KeyError:
                raise KeyError(f"unknown file_id {file_id!r}") from None

    # ------------------------------------------------------------------ fault injection

    def fail_next(self, method: str, error_code: int = 429, description: str | None = None, *,
                  retry_after: int | None = None, times: int = 1, delay: float = 0.0,
                  body: str | None = None, parameters: dict | None = None) -> None:
        """Make the next ``times`` calls of ``method`` fail without side effects.

        A 429 gets ``parameters.retry_after`` (default 1) and the description
        ``Too Many Requests: retry after N``. ``delay`` holds the answer back that many seconds
        (client timeouts). ``body`` answers that raw text instead of JSON, e.g. ``"nginx"`` for an
        nginx 502 page. pyTelegramBotAPI raises ApiHTTPException for it.
        """
        if error_code == 429 and retry_after is None:
            retry_after = 1
        if description is None:
            description = (f"Too Many Requests: retry after {retry_after}" if error_code == 429
                           else _FAULT_TEXT.get(error_code, "Bad Request"))
        params = dict(parameters or {})
        if retry_after is not None:
            params["retry_after"] = retry_after
        if body == "nginx":
            body = _NGINX_PAGE.format(error_code, _FAULT_TEXT.get(error_code, "Error"))
        fault = _Fault(_ApiError(error_code, description, params or None), times, delay, body)
        with self._cond:
            self._faults.setdefault(method.lower(), []).append(fault)

    # ------------------------------------------------------------------ observation

    def calls(self, method: str | None = None, chat_id: int | None = None) -> list[Call]:
        """Recorded bot calls, oldest first, optionally filtered by method and chat."""
        with self._cond:
            return [c for c in self._calls
                    if (method is None or c.method.lower() == method.lower())
                    and (chat_id is None or c.chat_id == chat_id)]

    def mark(self) -> int:
        """The number of calls so far; pass it as ``since=`` to wait only for later calls."""
        with self._cond:
            return len(self._calls)

    def messages(self, chat_id: int) -> list[dict]:
        """The bot's messages in ``chat_id`` in order, as they are now (edits applied, deleted
        ones gone)."""
        with self._cond:
            return [copy.deepcopy(self._messages[(chat_id, mid)])
                    for mid in self._bot_messages.get(chat_id, []) if (chat_id, mid) in self._messages]

    def last_message(self, chat_id: int) -> dict | None:
        """The bot's latest message in ``chat_id`` (current state) or None."""
        found = self.messages(chat_id)
        return found[-1] if found else None

    def message(self, chat_id: int, message_id: int) -> dict | None:
        """Any message (bot or user) in ``chat_id`` as it is now, or None."""
        with self._cond:
            found = self._messages.get((chat_id, message_id))
            return copy.deepcopy(found) if found else None

    def answers(self, callback_query_id: str | None = None) -> list[dict]:
        """Answers given to callback queries (``{"callback_query_id", "text", ...}``)."""
        with self._cond:
            return [dict(c.params) for c in self._calls
                    if c.ok and c.method == "answerCallbackQuery"
                    and (callback_query_id is None or str(c.params.get("callback_query_id")) == callback_query_id)]

    def pending_updates(self) -> int:
        """How many pushed updates the bot has not confirmed yet."""
        with self._cond:
            return len(self._updates)

    def wait_for(self, predicate: Callable[[Call], bool] | str, timeout: float = 10.0, *,
                 since: int = 0) -> Call:
        """Wait for a recorded call (index >= ``since``) for which ``predicate(call)`` is true and
        return it. A string predicate matches the method name. On timeout, AssertionError lists
        the recent calls."""
        if isinstance(predicate, str):
            name = predicate.lower()

            def predicate(call: Call, name=name) -> bool:
                return call.method.lower() == name
        deadline = time.monotonic() + timeout
        seen = since
        with self._cond:
            while True:
                while seen < len(self._calls):
                    call = self._calls[seen]
                    seen += 1
                    if predicate(call):
                        return call
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no matching Telegram call within {timeout}s; "
                                         f"recent calls:\n{self._dump()}")
                self._cond.wait(remaining)

    def wait_for_message(self, chat_id: int, contains: str | None = None, timeout: float = 10.0, *,
                         since: int = 0) -> dict:
        """Wait for a successful send/edit in ``chat_id`` whose text or caption contains
        ``contains`` (any when None); return that message as Telegram answered it."""
        found: list[dict] = []

        def matches(call: Call) -> bool:
            if not call.ok or call.method not in MESSAGE_METHODS or call.chat_id != chat_id:
                return False
            results = call.result if isinstance(call.result, list) else [call.result]
            for result in results:
                if isinstance(result, dict) and "chat" not in result:       # copyMessage
                    result = self._messages.get((chat_id, result.get("message_id")), result)
                if not isinstance(result, dict):
                    continue
                body = result.get("text", result.get("caption", ""))
                if contains is None or contains in (body or ""):
                    found.append(copy.deepcopy(result))
                    return True
            return False

        try:
            self.wait_for(matches, timeout, since=since)
        except AssertionError as exc:
            what = f"containing {contains!r}" if contains is not None else "at all"
            raise AssertionError(f"the bot sent no message {what} to chat {chat_id} within "
                                 f"{timeout}s; {exc}") from None
        return found[0]

    def wait_until_polling(self, timeout: float = 10.0) -> None:
        """Wait until a getUpdates long poll is waiting for updates."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._polling == 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no getUpdates long poll within {timeout}s; "
                                         f"recent calls:\n{self._dump()}")
                self._cond.wait(remaining)

    def commands(self, scope: dict | None = None, language_code: str = "") -> list[dict]:
        """The command list set with setMyCommands for that scope and language."""
        with self._cond:
            return copy.deepcopy(self._commands.get(self._commands_key(scope, language_code), []))

    @staticmethod
    def buttons(message: dict) -> list[dict]:
        """All inline keyboard buttons of ``message``, row by row."""
        keyboard = (message or {}).get("reply_markup") or {}
        return [dict(b) for row in keyboard.get("inline_keyboard", []) for b in row]

    @classmethod
    def button_data(cls, message: dict) -> list[str]:
        """The ``callback_data`` of every inline button of ``message``."""
        return [b["callback_data"] for b in cls.buttons(message) if "callback_data" in b]

    @classmethod
    def button_urls(cls, message: dict) -> list[str]:
        """The ``url`` of every inline URL button of ``message``."""
        return [b["url"] for b in cls.buttons(message) if "url" in b]

    @classmethod
    def find_button(cls, message: dict, text_substring: str) -> dict:
        """The first inline button whose text contains ``text_substring`` (AssertionError if none)."""
        for button in cls.buttons(message):
            if text_substring in button.get("text", ""):
                return button
        raise AssertionError(f"no button containing {text_substring!r}; buttons: "
                             f"{[b.get('text') for b in cls.buttons(message)]}")

    def _dump(self, limit: int = 25) -> str:
        calls = [c for c in self._calls if c.method != "getUpdates"][-limit:]
        return "\n".join("  " + c.summary() for c in calls) or "  (none besides getUpdates)"

    # ------------------------------------------------------------------ internal state (lock held)

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

    def _alloc_message_id(self, chat_id: int) -> int:
        message_id = self._next_message_id.get(chat_id, 1)
        self._next_message_id[chat_id] = message_id + 1
        return message_id

    def _user_message(self, user: dict, content: dict, reply_to_message_id: int | None = None) -> dict:
        chat_id = user["id"]
        if chat_id in self._blocked:      # writing to a blocked bot means restarting it
            self._blocked.discard(chat_id)
            self._member_update(chat_id, "kicked", "member")
        message = {"message_id": self._alloc_message_id(chat_id), "from": copy.deepcopy(user),
                   "chat": self._chat(chat_id), "date": int(time.time())}
        if reply_to_message_id is not None:
            replied = self._messages.get((chat_id, reply_to_message_id))
            if replied is None:
                raise AssertionError(f"no message {reply_to_message_id} in chat {chat_id} to reply to")
            message["reply_to_message"] = self._reply_copy(replied)
        message.update(copy.deepcopy(content))
        self._messages[(chat_id, message["message_id"])] = message
        return self._push_update("message", message)

    def _member_update(self, user_id: int, old: str, new: str) -> None:
        user = self._users[user_id]
        self._push_update("my_chat_member", {
            "chat": self._chat(user_id), "from": copy.deepcopy(user), "date": int(time.time()),
            "old_chat_member": {"user": dict(self.bot_user), "status": old},
            "new_chat_member": dict({"user": dict(self.bot_user), "status": new},
                                    **({"until_date": 0} if new == "kicked" else {})),
        })

    def _push_update(self, kind: str, payload: dict) -> dict:
        update = {"update_id": self._next_update_id, kind: copy.deepcopy(payload)}
        self._next_update_id += 1
        allowed = self._allowed_updates
        if (kind in allowed) if allowed else (kind not in _NOT_DEFAULT_UPDATES):
            self._updates.append(update)
        self._cond.notify_all()
        return copy.deepcopy(update)

    @staticmethod
    def _reply_copy(message: dict) -> dict:
        replied = copy.deepcopy(message)
        replied.pop("reply_to_message", None)
        return replied

    def _new_file_id(self, kind: str) -> tuple[str, str]:
        n = next(self._ids)
        prefix = "AgACAgIAAxkBAAI" if kind == "photos" else "BQACAgIAAxkBAAI"
        return f"{prefix}{n:06d}{self.bot_id % 10_000:04d}FAKE", f"AQAD{n:06d}"

    def _store_file(self, data: bytes, kind: str, *, file_size: int | None = None,
                    file_name: str | None = None, mime_type: str | None = None) -> dict:
        file_id, unique_id = self._new_file_id(kind)
        record = {"file_id": file_id, "file_unique_id": unique_id, "data": data,
                  "file_size": len(data) if file_size is None else int(file_size), "kind": kind,
                  "file_name": file_name, "mime_type": mime_type, "file_path": None}
        self._files[file_id] = record
        return record

    @staticmethod
    def _document_json(record: dict) -> dict:
        document = {"file_id": record["file_id"], "file_unique_id": record["file_unique_id"],
                    "file_size": record["file_size"]}
        if record["file_name"]:
            document["file_name"] = record["file_name"]
        if record["mime_type"]:
            document["mime_type"] = record["mime_type"]
        return document

    def _store_photo(self, data: bytes, info, *, file_size: int | None = None) -> list[dict]:
        width, height = info[0], info[1]
        longest = max(width, height)
        boxes = [box for box in (90, 320) if box < longest] or [max(1, longest // 2)]
        sizes = []
        for box in boxes:
            thumb = _thumbnail(data, box)
            if thumb is None:      # undecodable but sized: refer to the same bytes
                scale = box / longest
                thumb = (data, max(1, round(width * scale)), max(1, round(height * scale)))
            sizes.append(thumb)
        sizes.append((data, width, height))
        photo = []
        for n, (blob, w, h) in enumerate(sizes):
            last = n == len(sizes) - 1
            record = self._store_file(blob, "photos", file_size=file_size if last else None)
            photo.append({"file_id": record["file_id"], "file_unique_id": record["file_unique_id"],
                          "file_size": record["file_size"], "width": w, "height": h})
        for size in photo:
            self._photo_sets[size["file_id"]] = photo
        return copy.deepcopy(photo)

    def _set_allowed_updates(self, value) -> None:
        if isinstance(value, list):
            self._allowed_updates = [str(v) for v in value] or None

    @staticmethod
    def _commands_key(scope, language_code) -> str:
        return json.dumps(scope or {"type": "default"}, sort_keys=True) + "|" + (language_code or "")

    # ------------------------------------------------------------------ HTTP entry points

    def _serve(self, handler: _Handler) -> None:
        try:
            body = handler.read_body()
        except (ValueError, OSError):
            handler.close_connection = True
            handler.reply(400, _json({"ok": False, "error_code": 400, "description": "Bad Request"}))
            return
        parts = urlsplit(handler.path)
        match = _API_PATH.fullmatch(parts.path)
        if match:
            params = dict(parse_qsl(parts.query, keep_blank_values=True))
            try:
                body_params, uploads = _parse_body(handler.headers.get("Content-Type", ""), body)
            except (ValueError, UnicodeDecodeError) as exc:     # approx. wording
                error = _bad(f"can't parse request body: {exc}")
                handler.reply(400, _json({"ok": False, **error.as_dict()}))
                return
            params.update(body_params)
            status, payload, raw = self._api(match.group(1), match.group(2), params, uploads)
            if raw is not None:
                handler.reply(status, raw.encode("utf-8"), "text/html")
            else:
                handler.reply(status, _json(payload))
            return
        match = _FILE_PATH.fullmatch(parts.path)
        if match:
            self._download(handler, match.group(1), match.group(2))
            return
        handler.reply(404, _json({"ok": False, "error_code": 404, "description": "Not Found"}))

    def _download(self, handler: _Handler, token: str, path: str) -> None:
        if token != self.token:
            handler.reply(401, _json({"ok": False, "error_code": 401, "description": "Unauthorized"}))
            return
        with self._cond:
            file_id = self._paths.get(path)
            record = self._files.get(file_id) if file_id else None
            if record is not None:
                self._calls.append(Call("download", {"file_path": path, "file_id": file_id}, {},
                                        time.time(), result=len(record["data"])))
                self._cond.notify_all()
        if record is None:
            handler.reply(404, _json({"ok": False, "error_code": 404, "description": "Not Found"}))
        else:
            handler.reply(200, record["data"], "application/octet-stream")

    def _api(self, token: str, raw_method: str, raw_params: dict, uploads: dict):
        """Run one Bot API request; returns (http_status, json_payload, raw_body_or_None)."""
        if token != self.token:
            return 401, {"ok": False, "error_code": 401, "description": "Unauthorized"}, None
        method = self._methods.get(raw_method.lower(), raw_method)
        call = Call(method, _normalize(raw_params), {k: u.data for k, u in uploads.items()}, time.time())
        with self._cond:
            queue = self._faults.get(method.lower())
            fault = queue[0] if queue else None
            if fault is not None:
                fault.times -= 1
                if fault.times <= 0:
                    queue.pop(0)
        if fault is not None:
            if fault.delay:
                self._pause(fault.delay)
            return self._finish(call, error=fault.error, raw=fault.body)
        try:
            if raw_method.lower() not in self._methods:
                raise _ApiError(404, "Not Found: method not found")
            fetched = self._fetch_urls(method, call.params)
            with self._cond:
                result = getattr(self, "_m_" + method)(call.params, uploads, fetched)
                return self._finish(call, result=result)
        except _ApiError as exc:
            return self._finish(call, error=exc)

    def _finish(self, call: Call, result=None, error: _ApiError | None = None, raw: str | None = None):
        description = None
        if isinstance(result, _Described):
            result, description = result.result, result.description
        with self._cond:
            if error is None:
                call.result = copy.deepcopy(result)
            else:
                call.error = error.as_dict()
            self._calls.append(call)
            self._cond.notify_all()
        if error is not None:
            return error.code, {"ok": False, **error.as_dict()}, raw
        payload = {"ok": True, "result": result}
        if description:
            payload["description"] = description
        return 200, payload, None

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        with self._cond:
            while not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)

    def _fetch_urls(self, method: str, params: dict) -> dict:
        """Download http(s) inputs (outside the lock) like Telegram does."""
        wanted = []
        if method == "sendPhoto":
            wanted.append((params.get("photo"), MAX_PHOTO_BY_URL))
        elif method == "sendDocument":
            wanted.append((params.get("document"), MAX_FILE_BY_URL))
        elif method == "sendMediaGroup" and isinstance(params.get("media"), list):
            for item in params["media"]:
                if isinstance(item, dict):
                    limit = MAX_PHOTO_BY_URL if item.get("type") == "photo" else MAX_FILE_BY_URL
                    wanted.append((item.get("media"), limit))
        fetched = {}
        for url, limit in wanted:
            if isinstance(url, str) and url.lower().startswith(("http://", "https://")):
                fetched[url] = _fetch(url, limit)
        return fetched

    # ------------------------------------------------------------------ webhook delivery

    def _webhook_loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not (self._webhook and self._updates):
                    self._cond.wait()
                if self._stopping:
                    return
                hook = dict(self._webhook)
                update = copy.deepcopy(self._updates[0])
            ok, error, reply = self._post_webhook(hook, update)
            with self._cond:
                if ok:
                    self._updates = [u for u in self._updates if u["update_id"] != update["update_id"]]
                else:
                    self._webhook_error = (int(time.time()), error)
                self._cond.notify_all()
            if ok and isinstance(reply, dict) and reply.get("method"):
                name = str(reply["method"]).lower()
                if not (name.startswith("get") or name in ("setwebhook", "deletewebhook", "close", "logout")):
                    params = {k: v for k, v in reply.items() if k != "method"}
                    self._api(self.token, str(reply["method"]), params, {})
            if not ok:
                self._pause(self.webhook_retry_delay)

    def _post_webhook(self, hook: dict, update: dict):
        request = urllib.request.Request(hook["url"], data=_json(update), method="POST",
                                         headers={"Content-Type": "application/json"})
        if hook["secret_token"]:
            request.add_header("X-Telegram-Bot-Api-Secret-Token", hook["secret_token"])
        handlers = [urllib.request.ProxyHandler({}), _NoRedirect()]
        if hook["url"].lower().startswith("https:"):
            handlers.append(urllib.request.HTTPSHandler(context=ssl._create_unverified_context()))
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(request, timeout=self.webhook_timeout) as response:
                body = response.read()
                content_type = response.headers.get_content_type()
        except urllib.error.HTTPError as exc:
            return False, f"Wrong response from the webhook: {exc.code} {exc.reason}", None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return False, f"Connection failed: {reason}", None      # approx. wording
        reply = None
        if content_type == "application/json" and body:
            try:
                reply = json.loads(body)
            except ValueError:
                reply = None
        return True, None, reply

    # ------------------------------------------------------------------ request helpers (lock held)

    def _target_chat(self, p: dict, key: str = "chat_id", *, sending: bool = True) -> int:
        raw = p.get(key)
        if raw is None or raw == "":
            raise _bad("chat_id is empty")
        chat_id = _as_int(raw)
        if chat_id is None or chat_id == self.bot_id:
            raise _bad("chat not found")
        if chat_id not in self._users:
            if self.strict_chats or chat_id < 0:
                raise _bad("chat not found")
            self._user(chat_id, "User", None, None)
        if sending and chat_id in self._blocked:
            raise _ApiError(403, "Forbidden: bot was blocked by the user")
        return chat_id

    def _reply_markup(self, p: dict) -> dict | None:
        """Validate ``reply_markup``; return what Telegram echoes (inline keyboards only)."""
        markup = p.get("reply_markup")
        if markup is None or markup == "":
            return None
        if isinstance(markup, str):
            raise _bad("can't parse reply keyboard markup JSON object")
        if not isinstance(markup, dict):
            raise _bad("object expected as reply markup")
        if "keyboard" in markup:
            rows = markup["keyboard"]
            if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
                raise _bad('field "keyboard" must be an Array of Arrays')
            for row in rows:
                for button in row:
                    text = button if isinstance(button, str) else (
                        button.get("text") if isinstance(button, dict) else None)
                    if not isinstance(text, str) or not text:
                        raise _bad("can't parse keyboard button: KeyboardButton must have a non-empty "
                                   "text")       # approx.
            if any(rows):
                return None       # reply keyboards are not part of the Message object
        rows = markup.get("inline_keyboard")
        if rows is None:
            return None
        if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
            raise _bad('field "inline_keyboard" of the InlineKeyboardMarkup must be an Array of Arrays')
        echoed = [[self._inline_button(button) for button in row] for row in rows]
        return {"inline_keyboard": echoed} if any(echoed) else None

    @staticmethod
    def _inline_button(button) -> dict:
        def error(message):
            return _bad("can't parse inline keyboard button: " + message)

        if not isinstance(button, dict):
            raise error("InlineKeyboardButton must be an Object")
        if "text" not in button:
            raise error('Can\'t find field "text"')
        text = button["text"]
        if not isinstance(text, str):
            raise error('Field "text" must be of type String')
        out = {"text": text}
        url, data = button.get("url"), button.get("callback_data")
        if isinstance(url, str) and url:
            if not _checked_link(url):
                raise _bad(f"inline keyboard button URL '{url}' is invalid: Wrong HTTP URL")
            out["url"] = url
        elif isinstance(data, str) and data:
            if len(data.encode("utf-8")) > MAX_CALLBACK_DATA_BYTES:
                raise _bad("BUTTON_DATA_INVALID")
            out["callback_data"] = data
        else:
            action = next((k for k in _INLINE_BUTTON_ACTIONS if k in button), None)
            if action is None:
                raise error("Text buttons are unallowed in the inline keyboard")
            out[action] = copy.deepcopy(button[action])
        if not text:
            raise _bad("inline keyboard button text must be non-empty")
        for key in ("style", "icon_custom_emoji_id"):
            if key in button:
                out[key] = button[key]
        return out

    def _reply_target(self, chat_id: int, p: dict) -> dict | None:
        parameters = p.get("reply_parameters")
        if isinstance(parameters, str) and parameters:
            raise _bad("can't parse reply parameters JSON object")
        if isinstance(parameters, dict):
            message_id = _as_int(parameters.get("message_id"))
            allow = _as_bool(parameters.get("allow_sending_without_reply", False))
            target = _as_int(parameters.get("chat_id")) or chat_id
        elif _as_int(p.get("reply_to_message_id")):
            message_id = _as_int(p.get("reply_to_message_id"))
            allow = _as_bool(p.get("allow_sending_without_reply", False))
            target = chat_id
        else:
            return None
        replied = self._messages.get((target, message_id))
        if replied is None:
            if allow:
                return None
            raise _bad("message to be replied not found")
        return self._reply_copy(replied)

    def _bot_message(self, chat_id: int, content: dict, markup: dict | None, p: dict,
                     media_group_id: str | None = None) -> dict:
        replied = self._reply_target(chat_id, p)
        message = {"message_id": self._alloc_message_id(chat_id), "from": dict(self.bot_user),
                   "chat": self._chat(chat_id), "date": int(time.time())}
        if media_group_id:
            message["media_group_id"] = media_group_id
        if replied:
            message["reply_to_message"] = replied
        message.update(content)
        if markup:
            message["reply_markup"] = markup
        self._messages[(chat_id, message["message_id"])] = message
        self._bot_messages.setdefault(chat_id, []).append(message["message_id"])
        return copy.deepcopy(message)

    @staticmethod
    def _text(p: dict) -> tuple[str, list]:
        raw = p.get("text")
        if raw is None or raw == "":
            raise _bad("message text is empty")
        text, entities = _format_text(raw, p.get("parse_mode"), p.get("entities"))
        if not text:
            raise _bad("text must be non-empty")
        if len(text) > MAX_TEXT_LENGTH:
            raise _bad("message is too long")
        return text, entities

    @staticmethod
    def _caption(p: dict) -> dict:
        text, entities = _format_text(p.get("caption"), p.get("parse_mode"), p.get("caption_entities"))
        if len(text) > MAX_CAPTION_LENGTH:
            raise _bad("message caption is too long")
        content: dict = {}
        if text:
            content["caption"] = text
            if entities:
                content["caption_entities"] = entities
        return content

    def _resolve_input(self, value, uploads: dict, fetched: dict, field_name: str | None):
        """(upload, None) for new bytes, (None, record) for a known file_id, (None, None) if absent."""
        if value is None or value == "":
            upload = uploads.get(field_name) if field_name else None
            return upload, None
        if isinstance(value, str):
            if value.startswith("attach://"):
                return uploads.get(value[len("attach://"):]), None
            if value in fetched:
                return fetched[value], None
            record = self._files.get(value)
            if record is None:
                raise _bad("wrong file identifier/HTTP URL specified")
            return None, record
        raise _bad("wrong file identifier/HTTP URL specified")

    @staticmethod
    def _check_upload(upload: _Upload) -> None:
        if len(upload.data) > MAX_UPLOAD:
            raise _ApiError(413, "Request Entity Too Large")
        if not upload.data:
            raise _bad("file must be non-empty")

    def _photo(self, upload: _Upload | None, record: dict | None) -> list[dict]:
        if record is not None:
            if record["file_id"] not in self._photo_sets:
                raise _bad("type of file mismatch")
            return copy.deepcopy(self._photo_sets[record["file_id"]])
        self._check_upload(upload)
        if len(upload.data) > MAX_PHOTO_UPLOAD:
            raise _bad("file is too big")
        info = _image_info(upload.data)
        if info is None:
            raise _bad("wrong type of the web page content" if upload.from_url else "IMAGE_PROCESS_FAILED")
        width, height = info[0], info[1]
        if width + height > 10000 or max(width, height) > 20 * min(width, height):
            raise _bad("PHOTO_INVALID_DIMENSIONS")
        return self._store_photo(upload.data, info)

    def _document(self, upload: _Upload | None, record: dict | None, file_name: str | None = None) -> dict:
        if record is not None:
            if record["kind"] != "documents":
                raise _bad("type of file mismatch")
            return self._document_json(record)
        self._check_upload(upload)
        name = file_name or upload.filename or "document"
        mime = mimetypes.guess_type(name)[0]
        if mime is None:
            info = _image_info(upload.data)
            mime = f"image/{info[2].lower()}" if info and info[2] else "application/octet-stream"
        return self._document_json(self._store_file(upload.data, "documents", file_name=name, mime_type=mime))

    def _edit_target(self, p: dict) -> dict:
        if p.get("inline_message_id"):
            raise _bad("MESSAGE_ID_INVALID")           # inline messages are not modelled
        chat_id = self._target_chat(p, sending=False)
        message_id = _as_int(p.get("message_id"))
        message = self._messages.get((chat_id, message_id)) if message_id is not None else None
        if message is None:
            raise _bad("message to edit not found")
        if message["from"]["id"] != self.bot_id:
            raise _bad("message can't be edited")
        return message

    @staticmethod
    def _apply(message: dict, key: str, value) -> None:
        if value:
            message[key] = value
        else:
            message.pop(key, None)

    # ------------------------------------------------------------------ Bot API methods (lock held)

    def _m_getMe(self, p, uploads, fetched):
        return dict(self.bot_user, can_join_groups=True, can_read_all_group_messages=False,
                    supports_inline_queries=False, can_connect_to_business=False,
                    has_main_web_app=False)

    def _m_logOut(self, p, uploads, fetched):
        return True

    _m_close = _m_logOut

    def _m_getUpdates(self, p, uploads, fetched):
        if self._webhook:
            raise _ApiError(409, "Conflict: can't use getUpdates method while webhook is active; "
                                 "use deleteWebhook to delete the webhook first")
        offset = _as_int(p.get("offset")) or 0
        limit = min(max(_as_int(p.get("limit")) or 100, 1), 100)
        timeout = min(max(_as_int(p.get("timeout")) or 0, 0), LONG_POLL_MAX_TIMEOUT)
        if "allowed_updates" in p:
            self._set_allowed_updates(p["allowed_updates"])
        self._poll_generation += 1
        generation = self._poll_generation
        if offset < 0:
            del self._updates[:max(0, len(self._updates) + offset)]
        elif offset > 0:
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
        deadline = time.monotonic() + timeout
        self._polling += 1
        self._cond.notify_all()
        try:
            while True:
                if self._updates or self._stopping:
                    return copy.deepcopy(self._updates[:limit])
                if generation != self._poll_generation:
                    raise _ApiError(409, "Conflict: terminated by other getUpdates request; make sure "
                                         "that only one bot instance is running")
                if self._webhook:
                    raise _ApiError(409, "Conflict: terminated by setWebhook request")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._cond.wait(remaining)
        finally:
            self._polling -= 1

    def _m_setWebhook(self, p, uploads, fetched):
        url = str(p.get("url") or "")
        if not url:
            return self._m_deleteWebhook(p, uploads, fetched)
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise _bad("invalid webhook URL specified")
        if parts.scheme.lower() == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise _bad("bad webhook: An HTTPS URL must be provided for webhook")
        secret = str(p.get("secret_token") or "")
        if len(secret) > 256:
            raise _bad("secret token is too long")
        if not re.fullmatch(r"[A-Za-z0-9_-]*", secret):
            raise _bad("secret token contains unallowed characters")
        if p.get("drop_pending_updates"):
            self._updates.clear()
        if "allowed_updates" in p:
            self._set_allowed_updates(p["allowed_updates"])
        max_connections = min(max(_as_int(p.get("max_connections")) or 40, 1), 100)
        hook = {"url": url, "secret_token": secret, "max_connections": max_connections}
        already = self._webhook == hook
        if not already:
            self._webhook, self._webhook_error = hook, None
        self._cond.notify_all()
        return _Described(True, "Webhook is already set" if already else "Webhook was set")

    def _m_deleteWebhook(self, p, uploads, fetched):
        if p.get("drop_pending_updates"):
            self._updates.clear()
        was_set, self._webhook, self._webhook_error = self._webhook is not None, None, None
        self._cond.notify_all()
        return _Described(True, "Webhook was deleted" if was_set else "Webhook is already deleted")

    def _m_getWebhookInfo(self, p, uploads, fetched):
        hook = self._webhook or {}
        info = {"url": hook.get("url", ""), "has_custom_certificate": False,
                "pending_update_count": len(self._updates)}
        if hook:
            info["max_connections"] = hook["max_connections"]
            if self._allowed_updates:
                info["allowed_updates"] = list(self._allowed_updates)
        if self._webhook_error:
            info["last_error_date"], info["last_error_message"] = self._webhook_error
        return info

    def _m_setMyCommands(self, p, uploads, fetched):
        commands = p.get("commands")
        if isinstance(commands, str):
            raise _bad("can't parse commands JSON object")
        if not isinstance(commands, list):
            raise _bad("expected an Array of BotCommand")
        if len(commands) > 100:
            raise _bad("BOT_COMMANDS_TOO_MUCH")
        stored = []
        for command in commands:
            if not isinstance(command, dict):
                raise _bad("can't parse BotCommand: expected an Object")          # approx.
            name, description = str(command.get("command", "")), str(command.get("description", ""))
            if not re.fullmatch(r"[a-z0-9_]{1,32}", name.lstrip("/")):
                raise _bad("BOT_COMMAND_INVALID")
            if not 1 <= len(description) <= 256:
                raise _bad("BOT_COMMAND_DESCRIPTION_INVALID")                     # approx.
            stored.append({"command": name.lstrip("/"), "description": description})
        self._commands[self._commands_key(p.get("scope"), p.get("language_code"))] = stored
        return True

    def _m_getMyCommands(self, p, uploads, fetched):
        return copy.deepcopy(self._commands.get(self._commands_key(p.get("scope"), p.get("language_code")), []))

    def _m_deleteMyCommands(self, p, uploads, fetched):
        self._commands.pop(self._commands_key(p.get("scope"), p.get("language_code")), None)
        return True

    def _m_setMyDescription(self, p, uploads, fetched):
        return True

    _m_setMyShortDescription = _m_setChatMenuButton = _m_setMyDescription

    def _m_sendMessage(self, p, uploads, fetched):
        text, entities = self._text(p)
        markup = self._reply_markup(p)
        chat_id = self._target_chat(p)
        content: dict = {"text": text}
        if entities:
            content["entities"] = entities
        return self._bot_message(chat_id, content, markup, p)

    def _m_sendPhoto(self, p, uploads, fetched):
        caption = self._caption(p)
        markup = self._reply_markup(p)
        upload, record = self._resolve_input(p.get("photo"), uploads, fetched, "photo")
        if upload is None and record is None:
            raise _bad("there is no photo in the request")
        chat_id = self._target_chat(p)
        content = {"photo": self._photo(upload, record), **caption}
        if p.get("has_spoiler"):
            content["has_media_spoiler"] = True
        if p.get("show_caption_above_media"):
            content["show_caption_above_media"] = True
        return self._bot_message(chat_id, content, markup, p)

    def _m_sendDocument(self, p, uploads, fetched):
        caption = self._caption(p)
        markup = self._reply_markup(p)
        upload, record = self._resolve_input(p.get("document"), uploads, fetched, "document")
        if upload is None and record is None:
            raise _bad("there is no document in the request")
        chat_id = self._target_chat(p)
        content = {"document": self._document(upload, record), **caption}
        return self._bot_message(chat_id, content, markup, p)

    def _m_sendMediaGroup(self, p, uploads, fetched):
        media = p.get("media")
        if media is None or media == "":
            raise _bad('parameter "media" is required')
        if isinstance(media, str):
            raise _bad("can't parse media JSON object")
        if not isinstance(media, list):
            raise _bad("expected an Array of InputMedia")
        if not media:
            raise _bad("there are no messages to send")
        if len(media) > 10:
            raise _bad("too many messages to send as an album")
        items = []
        for item in media:
            if not isinstance(item, dict):
                raise _bad("can't parse InputMedia: expected an Object")
            kind = item.get("type")
            if kind == "animation":
                raise _bad('can\'t parse InputMedia: type "animation" can\'t be used in sendMediaGroup')
            if kind not in ("photo", "document"):
                raise _bad(f'can\'t parse InputMedia: type "{kind}" is unsupported')  # video/audio not modelled
            upload, record = self._resolve_input(item.get("media"), uploads, fetched, None)
            if upload is None and record is None:
                raise _bad("can't parse InputMedia: media not found")
            items.append((kind, upload, record, self._caption(item)))
        kinds = {kind for kind, *_ in items}
        if len(kinds) > 1:
            raise _bad("document can't be mixed with other media types")
        chat_id = self._target_chat(p)
        group = str(10**17 + next(self._ids))
        contents = []
        for kind, upload, record, caption in items:
            media_json = self._photo(upload, record) if kind == "photo" else self._document(upload, record)
            contents.append({kind: media_json, **caption})
        return [self._bot_message(chat_id, content, None, p, media_group_id=group) for content in contents]

    def _m_copyMessage(self, p, uploads, fetched):
        from_chat = _as_int(p.get("from_chat_id"))
        source = self._messages.get((from_chat, _as_int(p.get("message_id"))))
        if source is None:
            raise _bad("message to copy not found")
        markup = self._reply_markup(p)
        chat_id = self._target_chat(p)
        content = {k: copy.deepcopy(source[k])
                   for k in ("text", "entities", "photo", "document", "caption", "caption_entities")
                   if k in source}
        if "caption" in p and "text" not in source:
            content.pop("caption", None)
            content.pop("caption_entities", None)
            content.update(self._caption(p))
        message = self._bot_message(chat_id, content, markup, p)
        return {"message_id": message["message_id"]}

    _NOT_MODIFIED = ("message is not modified: specified new message content and reply markup are "
                     "exactly the same as a current content and reply markup of the message")

    def _m_editMessageText(self, p, uploads, fetched):
        text, entities = self._text(p)
        markup = self._reply_markup(p)
        message = self._edit_target(p)
        if "text" not in message:
            raise _bad("there is no text in the message to edit")
        if (text, entities, markup) == (message["text"], message.get("entities", []),
                                        message.get("reply_markup")):
            raise _bad(self._NOT_MODIFIED)
        message["text"] = text
        self._apply(message, "entities", entities)
        self._apply(message, "reply_markup", markup)
        message["edit_date"] = int(time.time())
        return copy.deepcopy(message)

    def _m_editMessageCaption(self, p, uploads, fetched):
        caption = self._caption(p)
        markup = self._reply_markup(p)
        message = self._edit_target(p)
        if not any(k in message for k in ("photo", "document")):
            raise _bad("there is no caption in the message to edit")
        new = (caption.get("caption", ""), caption.get("caption_entities", []), markup)
        if new == (message.get("caption", ""), message.get("caption_entities", []), message.get("reply_markup")):
            raise _bad(self._NOT_MODIFIED)
        self._apply(message, "caption", new[0])
        self._apply(message, "caption_entities", new[1])
        self._apply(message, "reply_markup", markup)
        message["edit_date"] = int(time.time())
        return copy.deepcopy(message)

    def _m_editMessageReplyMarkup(self, p, uploads, fetched):
        markup = self._reply_markup(p)
        message = self._edit_target(p)
        if markup == message.get("reply_markup"):
            raise _bad(self._NOT_MODIFIED)
        self._apply(message, "reply_markup", markup)
        message["edit_date"] = int(time.time())
        return copy.deepcopy(message)

    def _m_deleteMessage(self, p, uploads, fetched):
        chat_id = self._target_chat(p, sending=False)
        key = (chat_id, _as_int(p.get("message_id")))
        if key not in self._messages:
            raise _bad("message to delete not found")
        del self._messages[key]
        return True

    def _m_answerCallbackQuery(self, p, uploads, fetched):
        state = self._callbacks.get(str(p.get("callback_query_id") or ""))
        if state is None or state["answered"]:
            raise _bad("query is too old and response timeout expired or query ID is invalid")
        if len(str(p.get("text") or "")) > 200:
            raise _bad("MESSAGE_TOO_LONG")                                            # approx.
        state["answered"] = True
        state["answer"] = {k: p[k] for k in ("text", "show_alert", "url", "cache_time") if k in p}
        return True

    def _m_sendChatAction(self, p, uploads, fetched):
        if str(p.get("action") or "") not in _CHAT_ACTIONS:
            raise _bad("wrong parameter action in request")
        self._target_chat(p)
        return True

    def _m_getFile(self, p, uploads, fetched):
        file_id = str(p.get("file_id") or "")
        if not file_id:
            raise _bad("file_id not specified")
        record = self._files.get(file_id)
        if record is None:
            raise _bad("invalid file_id")
        if record["file_size"] > MAX_DOWNLOAD:
            raise _bad("file is too big")
        if record["file_path"] is None:
            if record["kind"] == "photos":
                ext = ".jpg"
            else:
                name = record["file_name"] or ""
                ext = name[name.rfind("."):] if "." in name else (
                    mimetypes.guess_extension(record["mime_type"] or "") or "")
            record["file_path"] = f"{record['kind']}/file_{next(self._ids)}{ext}"
            self._paths[record["file_path"]] = file_id
        return {"file_id": file_id, "file_unique_id": record["file_unique_id"],
                "file_size": record["file_size"], "file_path": record["file_path"]}


class _Described:
    """A successful result that also carries Telegram's ``description`` (setWebhook & co)."""

    def __init__(self, result, description: str):
        self.result, self.description = result, description


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None       # Telegram treats a 3xx webhook answer as an error


def _json(value) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def _fetch(url: str, limit: int) -> _Upload:
    """Download an input URL the way Telegram's servers would (no proxies, size-limited)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as response:
            data = response.read(limit + 1)
            content_type = response.headers.get_content_type()
    except (urllib.error.URLError, OSError, ValueError):
        raise _bad("failed to get HTTP URL content") from None
    if len(data) > limit:
        raise _bad("failed to get HTTP URL content")                               # approx.
    name = urlsplit(url).path.rsplit("/", 1)[-1] or "file"
    return _Upload(name, data, content_type, from_url=True)


try:  # the fixture is optional so that a demo script can import this module without pytest
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.fixture
    def fake_telegram():
        """A started ``FakeTelegram()`` (token ``123456:TEST-TOKEN``); stopped afterwards."""
        with FakeTelegram() as fake:
            yield fake
