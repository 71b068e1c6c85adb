"""A local fake of the Telegram Bot API HTTP server, spoken to by the real pyTelegramBotAPI.

Point the bot at it with ``TELEGRAM_API_URL=fake.url``; the bot then sets::

    apihelper.API_URL = fake.url + "/bot{0}/{1}"
    apihelper.FILE_URL = fake.url + "/file/bot{0}/{1}"

Tests play the users (``send_text``, ``send_photo``, ``press`` ... push updates) and watch the bot
(``calls``, ``messages``, ``wait_for``, ``wait_for_message``). The ``fake_telegram`` fixture at the
bottom yields a started fake. The server is stdlib only (``http.server.ThreadingHTTPServer`` on
127.0.0.1, HTTP/1.1 keep-alive). Pillow, which is a runtime dependency anyway, reads image sizes
and makes thumbnails.

What is faithful. Error texts and limits come from the Bot API server source
(tdlib/telegram-bot-api ``Client.cpp``) and TDLib (``MessageEntity.cpp``, ``MessageContent.cpp``).
-----------------------------------------------------------------------------------------------
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
  ``BUTTON_DATA_INVALID``, bad URLs -> ``BUTTON_URL_INVALID``). Only inline keyboards are echoed in
  ``reply_markup``. An edit without ``reply_markup`` removes the keyboard, as on Telegram.
  Editing to identical content -> ``message is not modified: ...``.
* Chats: private chats only (chat id == user id). ``message_id`` is one counter per chat, shared
  by user and bot messages. Sending to a user who never wrote to the bot -> 400 ``chat not found``
  (pass ``strict_chats=False`` to allow it). A user who ``block``\\ s the bot -> 403
  ``Forbidden: bot was blocked by the user``, with ``my_chat_member`` updates.
* Files: an uploaded photo gets a ``photo`` array of PhotoSize (real JPEG thumbnails, and the
  last entry is the uploaded bytes with their real width/height). Photos > 10 MB -> ``file is too
  big``. Width+height > 10000 or aspect ratio > 20 -> ``PHOTO_INVALID_DIMENSIONS``. Bytes that are
  not an image -> ``IMAGE_PROCESS_FAILED``. Any upload > 50 MB -> 413. Re-sending by file_id works,
  and an unknown file_id -> ``wrong file identifier/HTTP URL specified``. HTTP(S) URLs are really
  downloaded (photo 5 MB, other 20 MB). getFile over 20 MiB -> ``file is too big``. Downloads
  serve the bytes, and an unknown path -> 404.
* Callback queries can be answered once. A second answer or an unknown id ->
  ``query is too old and response timeout expired or query ID is invalid``.

What is simplified
------------------
* One bot, private chats only: no groups, channels, inline mode, payments or business features.
* The largest PhotoSize is the uploaded file as is. Telegram would re-encode it to JPEG and cap it
  at 2560 px; ``send_photo(..., recompress=True)`` imitates that for user photos. Thumbnails are
  only generated, never checked.
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
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
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

    def __enter__(self) -> FakeTelegram:
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
            predicate = lambda call: call.method.lower() == name  # noqa: E731
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

    def _dispatch_allowed(self, update: dict) -> bool:
        kind = next(k for k in update if k != "update_id")
        allowed = self._allowed_updates
        return (kind in allowed) if allowed else (kind not in _NOT_DEFAULT_UPDATES)

    def _set_allowed_updates(self, value) -> None:
        if isinstance(value, list):
            self._allowed_updates = [str(v) for v in value] or None
