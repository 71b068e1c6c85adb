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
