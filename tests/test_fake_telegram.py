"""The fake Telegram Bot API (tests/fakes/telegram.py), driven by the real pyTelegramBotAPI."""
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import telebot
from PIL import Image
from telebot import apihelper, types
from telebot.apihelper import ApiHTTPException, ApiTelegramException
from telebot.storage import StateMemoryStorage

USER = 42


def png(width=64, height=48, color=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def api_error(action) -> ApiTelegramException:
    with pytest.raises(ApiTelegramException) as info:
        action()
    return info.value


def keyboard(*buttons) -> types.InlineKeyboardMarkup:
    markup = types.InlineKeyboardMarkup()
    for text, data in buttons:
        markup.add(types.InlineKeyboardButton(text, callback_data=data))
    return markup


@pytest.fixture
def bot(fake_telegram):
    """A real TeleBot pointed at the fake; USER has already opened the bot."""
    saved = apihelper.API_URL, apihelper.FILE_URL
    apihelper.API_URL = fake_telegram.url + "/bot{0}/{1}"
    apihelper.FILE_URL = fake_telegram.url + "/file/bot{0}/{1}"
    fake_telegram.add_user(USER, first_name="Ann", username="ann")
    try:
        yield telebot.TeleBot(fake_telegram.token, threaded=False, state_storage=StateMemoryStorage())
    finally:
        apihelper.API_URL, apihelper.FILE_URL = saved


def test_get_me(bot, fake_telegram):
    me = bot.get_me()
    assert (me.id, me.is_bot, me.first_name, me.username) == (123456, True, "Media Lab", "medialab_test_bot")
    assert fake_telegram.calls("getMe")[0].ok


def test_send_message_with_inline_keyboard_is_recorded_and_echoed(bot, fake_telegram):
    sent = bot.send_message(USER, "Меню", reply_markup=keyboard(("🎨 Создать", "mode:generate"),
                                                                 ("💰 Баланс", "balance")))
    assert sent.chat.id == USER and sent.from_user.is_bot and sent.text == "Меню"
    assert [[b.callback_data for b in row] for row in sent.reply_markup.keyboard] == [["mode:generate"], ["balance"]]

    call = fake_telegram.calls("sendMessage", chat_id=USER)[0]
    assert call.params["chat_id"] == USER
    assert call.params["reply_markup"]["inline_keyboard"][0][0]["callback_data"] == "mode:generate"
    message = fake_telegram.last_message(USER)
    assert message["message_id"] == sent.message_id
    assert fake_telegram.button_data(message) == ["mode:generate", "balance"]
    assert fake_telegram.find_button(message, "Баланс")["callback_data"] == "balance"
    assert fake_telegram.wait_for_message(USER, contains="Меню")["message_id"] == sent.message_id


def test_html_is_parsed_like_telegram_and_bad_markup_is_rejected(bot, fake_telegram):
    sent = bot.send_message(USER, "<b>Баланс</b>: 10 &lt;кредитов&gt;", parse_mode="HTML")
    assert sent.text == "Баланс: 10 <кредитов>"
    assert [(e.type, e.offset, e.length) for e in sent.entities] == [("bold", 0, 6)]

    error = api_error(lambda: bot.send_message(USER, "2 < 3", parse_mode="HTML"))
    assert error.error_code == 400
    assert error.description.startswith("Bad Request: can't parse entities:")
    error = api_error(lambda: bot.send_message(USER, "Цена 1.5", parse_mode="MarkdownV2"))
    assert "Character '.' is reserved" in error.description
    assert api_error(lambda: bot.send_message(USER, "x" * 4097)).description == "Bad Request: message is too long"
    assert api_error(lambda: bot.send_message(USER, "")).description == "Bad Request: message text is empty"


def test_send_photo_bytes_records_the_upload_and_returns_a_photo_array(bot, fake_telegram):
    data = png(640, 480)
    sent = bot.send_photo(USER, data, caption="Готово", reply_markup=keyboard(("🔁 Ещё раз", "again")))

    largest = sent.photo[-1]
    assert (largest.width, largest.height, largest.file_size) == (640, 480, len(data))
    assert [p.width for p in sent.photo] == sorted(p.width for p in sent.photo) and len(sent.photo) >= 2
    assert sent.caption == "Готово"
    assert fake_telegram.file_bytes(largest.file_id) == data
    assert fake_telegram.calls("sendPhoto")[0].files["photo"] == data
    assert fake_telegram.last_message(USER)["reply_markup"]["inline_keyboard"][0][0]["callback_data"] == "again"


def test_photo_limits_are_enforced(bot, fake_telegram):
    error = api_error(lambda: bot.send_photo(USER, png(), caption="x" * 1025))
    assert (error.error_code, error.description) == (400, "Bad Request: message caption is too long")
    error = api_error(lambda: bot.send_photo(USER, png(2100, 100)))          # aspect ratio 21
    assert error.description == "Bad Request: PHOTO_INVALID_DIMENSIONS"
    assert bot.send_document(USER, ("wide.png", png(2100, 100))).document.mime_type == "image/png"
    assert api_error(lambda: bot.send_photo(USER, b"not an image")).description == "Bad Request: IMAGE_PROCESS_FAILED"


def test_edit_message_text(bot, fake_telegram):
    sent = bot.send_message(USER, "⏳ в очереди", reply_markup=keyboard(("Отмена", "cancel")))
    edited = bot.edit_message_text("🎨 Генерирую…", USER, sent.message_id)
    assert edited.text == "🎨 Генерирую…" and edited.edit_date

    message = fake_telegram.messages(USER)[-1]
    assert message["text"] == "🎨 Генерирую…"
    assert "reply_markup" not in message        # an edit without reply_markup drops the keyboard
    error = api_error(lambda: bot.edit_message_text("🎨 Генерирую…", USER, sent.message_id))
    assert error.description.startswith("Bad Request: message is not modified")
    error = api_error(lambda: bot.edit_message_text("x", USER, 999))
    assert error.description == "Bad Request: message to edit not found"


def test_callback_query_is_delivered_and_answered_once(bot, fake_telegram):
    menu = bot.send_message(USER, "Меню", reply_markup=keyboard(("Купить", "buy:100")))
    seen = []

    @bot.callback_query_handler(func=lambda c: c.data.startswith("buy:"))
    def on_buy(call):
        seen.append((call.data, call.message.message_id, call.from_user.id))
        bot.answer_callback_query(call.id, "Ок")

    update = fake_telegram.press(USER, menu.message_id, "buy:100")
    bot.process_new_updates(bot.get_updates(long_polling_timeout=5, timeout=10))

    assert seen == [("buy:100", menu.message_id, USER)]
    assert fake_telegram.answers(update["callback_query"]["id"])[0]["text"] == "Ок"
    error = api_error(lambda: bot.answer_callback_query(update["callback_query"]["id"]))
    assert "query is too old" in error.description
    with pytest.raises(AssertionError, match="no button"):
        fake_telegram.press(USER, menu.message_id, "buy:999")


def test_429_fault_surfaces_with_retry_after(bot, fake_telegram):
    fake_telegram.fail_next("sendMessage", 429, retry_after=3)
    error = api_error(lambda: bot.send_message(USER, "hi"))
    assert error.error_code == 429
    assert error.description == "Too Many Requests: retry after 3"
    assert error.result_json["parameters"]["retry_after"] == 3
    assert bot.send_message(USER, "hi").text == "hi"          # only the next call failed
    assert [c.ok for c in fake_telegram.calls("sendMessage")] == [False, True]
    assert fake_telegram.messages(USER)[-1]["text"] == "hi" and len(fake_telegram.messages(USER)) == 1


def test_fault_with_an_nginx_page_is_an_http_error(bot, fake_telegram):
    fake_telegram.fail_next("sendPhoto", 502, body="nginx")
    with pytest.raises(ApiHTTPException):
        bot.send_photo(USER, png())


def test_long_poll_returns_an_update_pushed_from_another_thread(bot, fake_telegram):
    received = []
    bot.message_handler(commands=["start"])(lambda message: received.append(message.text))

    def user():
        fake_telegram.wait_until_polling()
        fake_telegram.send_command(USER, "/start")

    pusher = threading.Thread(target=user)
    pusher.start()
    started = time.monotonic()
    updates = bot.get_updates(offset=0, long_polling_timeout=5, timeout=10)
    pusher.join()

    assert time.monotonic() - started < 2
    assert [u.message.text for u in updates] == ["/start"]
    assert updates[0].message.entities[0].type == "bot_command"
    bot.process_new_updates(updates)
    assert received == ["/start"]
    # offset = last + 1 confirms (drops) it, as Telegram does
    fake_telegram.send_text(USER, "next")
    later = bot.get_updates(offset=updates[-1].update_id + 1, long_polling_timeout=5, timeout=10)
    assert [u.message.text for u in later] == ["next"]
    assert fake_telegram.pending_updates() == 1


def test_a_second_long_poll_ends_the_first_with_409(bot, fake_telegram):
    errors = []

    def first_poller():
        try:
            bot.get_updates(long_polling_timeout=5, timeout=10)
        except ApiTelegramException as exc:
            errors.append((exc.error_code, exc.description))
        fake_telegram.send_text(USER, "wake the second poller")

    thread = threading.Thread(target=first_poller)
    thread.start()
    fake_telegram.wait_until_polling()
    assert len(bot.get_updates(long_polling_timeout=5, timeout=10)) == 1
    thread.join(timeout=5)
    assert errors[0][0] == 409
    assert errors[0][1].startswith("Conflict: terminated by other getUpdates request")


def test_get_file_and_download_round_trip(bot, fake_telegram):
    data = png(800, 600)
    update = fake_telegram.send_photo(USER, data, caption="отредактируй")
    sizes = update["message"]["photo"]
    assert 2 <= len(sizes) <= 3 and (sizes[-1]["width"], sizes[-1]["height"]) == (800, 600)

    file = bot.get_file(sizes[-1]["file_id"])
    assert file.file_size == len(data)
    assert bot.download_file(file.file_path) == data
    assert fake_telegram.calls("download")[0].params["file_path"] == file.file_path


def test_get_file_over_20_mb_is_too_big(bot, fake_telegram):
    file_id, _ = fake_telegram.add_file(b"tiny", file_size=30 * 1024 * 1024)
    error = api_error(lambda: bot.get_file(file_id))
    assert (error.error_code, error.description) == (400, "Bad Request: file is too big")


def test_media_group_and_unknown_chats(bot, fake_telegram):
    album = bot.send_media_group(USER, [types.InputMediaPhoto(png(), caption="1"),
                                        types.InputMediaPhoto(png(48, 64))])
    assert len({m.media_group_id for m in album}) == 1 and album[0].caption == "1"
    assert len(fake_telegram.calls("sendMediaGroup")[0].files) == 2

    assert api_error(lambda: bot.send_message(777, "hi")).description == "Bad Request: chat not found"
    fake_telegram.block(USER)
    assert api_error(lambda: bot.send_chat_action(USER, "upload_photo")).error_code == 403


def test_unknown_token_is_401_and_unknown_method_404(bot, fake_telegram):
    error = api_error(lambda: telebot.TeleBot("999:WRONG", threaded=False).get_me())
    assert (error.error_code, error.description) == (401, "Unauthorized")
    answer = requests.get(f"{fake_telegram.url}/bot{fake_telegram.token}/sendSticker", timeout=5)
    assert answer.status_code == 404
    assert answer.json() == {"ok": False, "error_code": 404, "description": "Not Found: method not found"}


def test_form_json_and_multipart_bodies_are_understood(fake_telegram):
    fake_telegram.add_user(USER)
    base = f"{fake_telegram.url}/bot{fake_telegram.token}"
    markup = {"inline_keyboard": [[{"text": "A", "callback_data": "a"}]]}
    as_json = requests.post(base + "/sendMessage", json={"chat_id": USER, "text": "j", "reply_markup": markup},
                            timeout=5).json()
    as_form = requests.post(base + "/sendMessage", data={"chat_id": USER, "text": "f",
                                                         "reply_markup": json.dumps(markup)}, timeout=5).json()
    as_multipart = requests.post(base + "/sendPhoto", data={"chat_id": str(USER), "caption": "m"},
                                 files={"photo": ("p.png", png())}, timeout=5).json()
    assert as_json["result"]["reply_markup"] == markup and as_form["result"]["reply_markup"] == markup
    assert as_multipart["result"]["caption"] == "m"
    assert [c.params["chat_id"] for c in fake_telegram.calls()] == [USER, USER, USER]


def test_webhook_delivery_with_secret_and_reply_method(bot, fake_telegram):
    deliveries = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            deliveries.append((self.headers["X-Telegram-Bot-Api-Secret-Token"], body))
            reply = json.dumps({"method": "sendMessage", "chat_id": USER, "text": "pong"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    try:
        assert bot.set_webhook(f"http://127.0.0.1:{receiver.server_address[1]}/tg", secret_token="s3cret")
        assert api_error(lambda: bot.get_updates(long_polling_timeout=5)).error_code == 409
        fake_telegram.send_text(USER, "ping")
        fake_telegram.wait_for(lambda c: c.method == "sendMessage" and c.params.get("text") == "pong")
        assert deliveries[0][0] == "s3cret" and deliveries[0][1]["message"]["text"] == "ping"
        assert bot.get_webhook_info().pending_update_count == 0
        assert bot.delete_webhook()
    finally:
        receiver.shutdown()
        receiver.server_close()


def test_wait_for_reports_recent_calls_on_timeout(bot, fake_telegram):
    bot.send_message(USER, "first")
    with pytest.raises(AssertionError, match="sendMessage chat=42 text='first'"):
        fake_telegram.wait_for_message(USER, contains="never", timeout=0.05)
