"""The fake Telegram Bot API (tests/fakes/telegram.py), driven by the real pyTelegramBotAPI."""
import io
import json
import threading
import time

import pytest
import requests
import telebot
from PIL import Image
from telebot import apihelper, types
from telebot.apihelper import ApiTelegramException
from telebot.storage import StateMemoryStorage
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from tests.fakes.telegram import FakeTelegram

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


def test_get_me_and_commands(bot, fake_telegram):
    me = bot.get_me()
    assert (me.id, me.is_bot, me.first_name, me.username) == (123456, True, "Media Lab", "medialab_test_bot")
    assert bot.set_my_commands([types.BotCommand("start", "Меню")], language_code="ru")
    assert api_error(lambda: bot.set_my_commands([types.BotCommand("Bad-Name", "x")])).description == \
        "Bad Request: BOT_COMMAND_INVALID"
    assert "BOT_COMMAND_DESCRIPTION_INVALID" in api_error(lambda: bot.set_my_commands(
        [types.BotCommand("start", "")])).description
    raw = requests.post(f"{fake_telegram.url}/bot{fake_telegram.token}/setMyCommands", data={"commands": "[nope"},
                        timeout=5).json()
    assert raw["description"] == "Bad Request: can't parse commands JSON object"
    assert [c.ok for c in fake_telegram.calls()] == [True, True, False, False, False]


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
    with pytest.raises(AssertionError, match="no button containing"):
        fake_telegram.find_button(message, "Оплатить")
    assert fake_telegram.wait_for_message(USER, contains="Меню")["message_id"] == sent.message_id


def test_url_buttons_and_invalid_keyboards(bot, fake_telegram):
    markup = types.InlineKeyboardMarkup()
    markup.add(types.InlineKeyboardButton("Оплатить", url="https://yoomoney.ru/checkout/1"))
    assert bot.send_message(USER, "К оплате", reply_markup=markup).reply_markup.keyboard[0][0].url.startswith("https:")
    error = api_error(lambda: bot.send_message(USER, "x", reply_markup=keyboard(("A", "d" * 65))))
    assert error.description == "Bad Request: BUTTON_DATA_INVALID"
    text_only = json.dumps({"inline_keyboard": [[{"text": "A"}]]})
    error = api_error(lambda: bot.send_message(USER, "x", reply_markup=text_only))
    assert error.description.endswith("Text buttons are unallowed in the inline keyboard")
    bad_url = types.InlineKeyboardMarkup()
    bad_url.add(types.InlineKeyboardButton("A", url="https://nohost"))
    assert "is invalid" in api_error(lambda: bot.send_message(USER, "x", reply_markup=bad_url)).description
    spaced = json.dumps({"inline_keyboard": [[{"text": "A", "url": "https://a b.ru"}]]})
    assert "is invalid" in api_error(lambda: bot.send_message(USER, "x", reply_markup=spaced)).description
    for markup, error in (('{"inline_keyboard": ', "can't parse reply keyboard markup JSON object"),
                          ('{"inline_keyboard": "A"}', "must be an Array of Arrays"),
                          ('{"inline_keyboard": [["A"]]}', "InlineKeyboardButton must be an Object"),
                          ('{"inline_keyboard": [[{"text": "", "callback_data": "a"}]]}', "non-empty text")):
        assert error in api_error(lambda markup=markup: bot.send_message(USER, "x", reply_markup=markup)).description
    removed = bot.send_message(USER, "без клавиатуры", reply_markup=types.ReplyKeyboardRemove())
    assert removed.reply_markup is None                  # only inline keyboards are part of a Message


def test_parse_mode_is_refused_and_text_is_trimmed_and_limited(bot, fake_telegram):
    for mode in ("HTML", "MarkdownV2", "Markdown"):     # Media Lab never sends markup
        assert api_error(lambda mode=mode: bot.send_message(USER, "<b>x</b>", parse_mode=mode)).error_code == 400
    assert bot.send_message(USER, "\n  Баланс: 10  \n").text == "Баланс: 10"
    assert bot.send_message(USER, "x" * 4096).text == "x" * 4096
    assert api_error(lambda: bot.send_message(USER, "x" * 4097)).description == "Bad Request: message is too long"
    assert api_error(lambda: bot.send_message(USER, "")).description == "Bad Request: message text is empty"
    assert api_error(lambda: bot.send_message(USER, " \n ")).description == "Bad Request: text must be non-empty"


def test_send_photo_bytes_records_the_upload_and_returns_a_photo_array(bot, fake_telegram):
    data = png(640, 480)
    sent = bot.send_photo(USER, data, caption="Готово", reply_markup=keyboard(("🔁 Ещё раз", "again")))
    largest = sent.photo[-1]
    assert (largest.width, largest.height, largest.file_size) == (640, 480, len(data))
    assert [p.width for p in sent.photo] == [320, 640]              # a thumbnail, then the upload
    assert sent.caption == "Готово"
    assert fake_telegram.calls("sendPhoto")[0].files["photo"] == data
    assert bot.download_file(bot.get_file(largest.file_id).file_path) == data
    assert fake_telegram.button_data(fake_telegram.last_message(USER)) == ["again"]


def test_photo_limits_are_enforced_and_documents_take_the_rest(bot, fake_telegram):
    error = api_error(lambda: bot.send_photo(USER, png(), caption="x" * 1025))
    assert (error.error_code, error.description) == (400, "Bad Request: message caption is too long")
    assert api_error(lambda: bot.send_photo(USER, png(2100, 100))).description == "Bad Request: PHOTO_INVALID_DIMENSIONS"
    assert api_error(lambda: bot.send_photo(USER, png(5001, 5000))).description == "Bad Request: PHOTO_INVALID_DIMENSIONS"
    assert api_error(lambda: bot.send_photo(USER, b"not an image")).description == "Bad Request: IMAGE_PROCESS_FAILED"
    big = b"\0" * (10 * 1024 * 1024 + 1)
    assert api_error(lambda: bot.send_photo(USER, big)).description == "Bad Request: file is too big"
    assert api_error(lambda: bot.send_document(USER, b"\0" * (50 * 1024 * 1024 + 1))).error_code == 413
    assert api_error(lambda: bot.send_photo(USER, "AgACAgIAAxkBAAI000001FAKE")).description == \
        "Bad Request: wrong file identifier/HTTP URL specified"
    document = bot.send_document(USER, ("wide.png", png(2100, 100)), caption="без сжатия").document
    assert (document.file_name, document.mime_type) == ("wide.png", "image/png")
    assert len(fake_telegram.messages(USER)) == 1


def test_edits_deletes_and_chat_actions(bot, fake_telegram):
    sent = bot.send_message(USER, "⏳ в очереди", reply_markup=keyboard(("Отмена", "cancel")))
    edited = bot.edit_message_text("🎨 Генерирую…", USER, sent.message_id)
    assert edited.text == "🎨 Генерирую…" and edited.edit_date
    assert "reply_markup" not in fake_telegram.messages(USER)[-1]     # an edit without markup drops it
    error = api_error(lambda: bot.edit_message_text("🎨 Генерирую…", USER, sent.message_id))
    assert error.description.startswith("Bad Request: message is not modified")
    assert api_error(lambda: bot.edit_message_text("x", USER, 999)).description == \
        "Bad Request: message to edit not found"
    assert "no caption" in api_error(lambda: bot.edit_message_caption("c", USER, sent.message_id)).description
    photo = bot.send_photo(USER, png(), caption="до")
    assert bot.edit_message_caption("после", USER, photo.message_id).caption == "после"
    assert "no text" in api_error(lambda: bot.edit_message_text("t", USER, photo.message_id)).description
    user_message = fake_telegram.send_text(USER, "моё")["message"]["message_id"]
    assert api_error(lambda: bot.edit_message_text("чужое", USER, user_message)).description == \
        "Bad Request: message can't be edited"
    assert bot.delete_message(USER, sent.message_id)
    assert fake_telegram.message(USER, sent.message_id) is None and len(fake_telegram.messages(USER)) == 1
    assert "not found" in api_error(lambda: bot.delete_message(USER, sent.message_id)).description
    assert bot.send_chat_action(USER, "upload_photo")
    assert api_error(lambda: bot.send_chat_action(USER, "dancing")).error_code == 400


def test_users_press_buttons_and_a_callback_is_answered_once(bot, fake_telegram):
    menu = bot.send_message(USER, "Меню", reply_markup=keyboard(("Купить", "buy:100")))
    seen = []

    @bot.callback_query_handler(func=lambda c: c.data.startswith("buy:"))
    def on_buy(call):
        seen.append((call.data, call.message.message_id, call.from_user.language_code))
        bot.answer_callback_query(call.id, "Ок")

    update = fake_telegram.press(USER, menu.message_id, "buy:100", language_code="en")
    bot.process_new_updates(bot.get_updates(long_polling_timeout=5, timeout=10))
    assert seen == [("buy:100", menu.message_id, "en")]
    assert fake_telegram.answers(update["callback_query"]["id"])[0]["text"] == "Ок"
    assert "query is too old" in api_error(lambda: bot.answer_callback_query(update["callback_query"]["id"])).description
    with pytest.raises(AssertionError, match="no button"):
        fake_telegram.press(USER, menu.message_id, "buy:999")
    with pytest.raises(AssertionError, match="no bot message 999"):
        fake_telegram.press(USER, 999, "buy:100")
    album = fake_telegram.send_album(USER, [png(), png(48, 64)], caption="два фото")
    assert len({u["message"]["media_group_id"] for u in album}) == 1 and album[0]["message"]["caption"] == "два фото"
    document = fake_telegram.send_document(USER, b"%PDF", file_name="a.pdf", mime_type="application/pdf",
                                           caption="файл")
    assert document["message"]["document"]["file_name"] == "a.pdf" and document["message"]["caption"] == "файл"
    with pytest.raises(ValueError, match="image bytes"):
        fake_telegram.send_photo(USER, b"not an image")
    ids = [u["message"]["message_id"] for u in album] + [document["message"]["message_id"]]
    assert ids == [menu.message_id + 1, menu.message_id + 2, menu.message_id + 3]   # one counter per chat


def test_fail_next_fails_only_the_next_calls(bot, fake_telegram):
    fake_telegram.fail_next("sendMessage", 429, retry_after=3)
    error = api_error(lambda: bot.send_message(USER, "hi"))
    assert (error.error_code, error.description) == (429, "Too Many Requests: retry after 3")
    assert error.result_json["parameters"]["retry_after"] == 3
    fake_telegram.fail_next("sendPhoto", 400, "Bad Request: PHOTO_INVALID_DIMENSIONS", times=2)
    for _ in range(2):
        assert api_error(lambda: bot.send_photo(USER, png())).description == "Bad Request: PHOTO_INVALID_DIMENSIONS"
    assert bot.send_message(USER, "hi").text == "hi" and bot.send_photo(USER, png()).photo
    assert [c.ok for c in fake_telegram.calls()] == [False, False, False, True, True]
    assert len(fake_telegram.messages(USER)) == 2                    # failed calls change nothing
    fake_telegram.fail_next("sendMessage")
    assert api_error(lambda: bot.send_message(USER, "hi")).description == "Too Many Requests: retry after 1"


def test_long_poll_returns_an_update_pushed_from_another_thread(bot, fake_telegram):
    received = []
    bot.message_handler(commands=["start"])(lambda message: received.append(message.text))

    def user():
        fake_telegram.wait_until_polling()
        fake_telegram.send_text(USER, "/start")

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
    fake_telegram.send_text(USER, "next")
    later = bot.get_updates(offset=updates[-1].update_id + 1, long_polling_timeout=5, timeout=10)
    assert [u.message.text for u in later] == ["next"]      # offset = last + 1 confirmed the first
    assert fake_telegram.pending_updates() == 1
    with pytest.raises(ValueError):
        fake_telegram.send_text(USER, " ")


def test_stop_ends_a_waiting_long_poll():
    fake = FakeTelegram().start()
    polled = []
    thread = threading.Thread(target=lambda: polled.append(requests.get(
        f"{fake.url}/bot{fake.token}/getUpdates", params={"timeout": 50}, timeout=60).json()))
    thread.start()
    fake.wait_until_polling()
    fake.stop()
    thread.join(5)
    assert polled == [{"ok": True, "result": []}]


def test_get_file_limits_and_downloads(bot, fake_telegram):
    update = fake_telegram.send_photo(USER, png(800, 600), file_size=30 * 1024 * 1024)
    assert update["message"]["photo"][-1]["file_size"] == 30 * 1024 * 1024
    assert api_error(lambda: bot.get_file(update["message"]["photo"][-1]["file_id"])).description == \
        "Bad Request: file is too big"
    file_id, _ = fake_telegram.add_file(b"bytes")
    file = bot.get_file(file_id)
    assert bot.download_file(file.file_path) == b"bytes"
    assert fake_telegram.calls("download")[0].params == {"file_path": file.file_path, "file_id": file_id}
    assert api_error(lambda: bot.get_file("nope")).description == "Bad Request: invalid file_id"
    assert requests.get(f"{fake_telegram.url}/file/bot{fake_telegram.token}/documents/x", timeout=5).status_code == 404
    assert requests.get(f"{fake_telegram.url}/file/bot1:WRONG/{file.file_path}", timeout=5).status_code == 401


def test_chats_must_exist_and_blocked_users_refuse_messages(bot, fake_telegram):
    assert api_error(lambda: bot.send_message(777, "hi")).description == "Bad Request: chat not found"
    empty = requests.post(f"{fake_telegram.url}/bot{fake_telegram.token}/sendMessage", json={"text": "hi"}, timeout=5)
    assert empty.json()["description"] == "Bad Request: chat_id is empty"
    with pytest.raises(AssertionError, match="unknown user"):
        fake_telegram.block(777)
    fake_telegram.block(USER)
    assert api_error(lambda: bot.send_chat_action(USER, "upload_photo")).description == \
        "Forbidden: bot was blocked by the user"
    fake_telegram.send_text(USER, "/start")                  # writing again restarts the bot
    assert bot.send_message(USER, "снова здесь").text == "снова здесь"
    with FakeTelegram(strict_chats=False) as lenient:
        answer = requests.post(f"{lenient.url}/bot{lenient.token}/sendMessage", json={"chat_id": 777, "text": "hi"},
                               timeout=5).json()
        assert answer["ok"] and answer["result"]["chat"]["id"] == 777


def test_unknown_token_is_401_and_unknown_method_404(bot, fake_telegram):
    error = api_error(lambda: telebot.TeleBot("999:WRONG", threaded=False).get_me())
    assert (error.error_code, error.description) == (401, "Unauthorized")
    answer = requests.get(f"{fake_telegram.url}/bot{fake_telegram.token}/sendSticker", timeout=5)
    assert answer.status_code == 404
    assert answer.json() == {"ok": False, "error_code": 404, "description": "Not Found: method not found"}
    assert requests.get(f"{fake_telegram.url}/bot{fake_telegram.token}/GETME", timeout=5).json()["ok"]


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
    no_file = requests.post(base + "/sendPhoto", data={"chat_id": str(USER)}, timeout=5).json()
    assert no_file["description"] == "Bad Request: there is no photo in the request"
    assert [c.params["chat_id"] for c in fake_telegram.calls()] == [USER, USER, USER, USER]


def test_webhook_delivery_with_secret_and_retries(bot, fake_telegram):
    deliveries, answers = [], [500, 200, 200]

    def receiver(environ, start_response):
        request = Request(environ)
        deliveries.append((request.headers.get("X-Telegram-Bot-Api-Secret-Token"), request.get_json()))
        return Response(status=answers.pop(0))(environ, start_response)

    server = make_server("127.0.0.1", 0, receiver, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    fake_telegram.webhook_retry_delay = 0.05
    try:
        assert api_error(lambda: bot.set_webhook("ftp://example.com/tg")).description == \
            "Bad Request: invalid webhook URL specified"
        assert api_error(lambda: bot.set_webhook("http://example.com/tg")).description.endswith(
            "An HTTPS URL must be provided for webhook")
        assert "unallowed characters" in api_error(lambda: bot.set_webhook(
            "https://example.com/tg", secret_token="no spaces")).description
        fake_telegram.send_text(USER, "old")
        assert bot.set_webhook(f"http://127.0.0.1:{server.server_port}/tg", secret_token="s3cret",
                               drop_pending_updates=True)
        assert fake_telegram.pending_updates() == 0
        assert api_error(lambda: bot.get_updates(long_polling_timeout=5)).error_code == 409
        fake_telegram.send_text(USER, "ping")
        fake_telegram.send_text(USER, "pong")
        fake_telegram.wait_until(lambda: not fake_telegram._updates)
        assert [(secret, body["message"]["text"]) for secret, body in deliveries] == [
            ("s3cret", "ping"), ("s3cret", "ping"), ("s3cret", "pong")]     # retried after the 500, in order
        assert bot.delete_webhook() and bot.get_updates(long_polling_timeout=0.001) == []
    finally:
        server.shutdown()
        thread.join(5)
        server.server_close()


def test_wait_for_reports_recent_calls_on_timeout(bot, fake_telegram):
    bot.send_message(USER, "first")
    mark = fake_telegram.mark()
    bot.send_photo(USER, png(), caption="second")
    assert fake_telegram.wait_for("sendphoto", since=mark).params["caption"] == "second"
    assert api_error(lambda: bot.send_message(777, "third")).error_code == 400
    with pytest.raises(AssertionError) as info:
        fake_telegram.wait_for_message(USER, contains="never", timeout=0.05)
    assert "sendMessage chat=42 text='first'" in str(info.value)
    assert "sendPhoto chat=42 caption='second' files=photo:" in str(info.value)
    assert "sendMessage chat=777 text='third' -> 400 Bad Request: chat not found" in str(info.value)
    with pytest.raises(AssertionError, match="no getUpdates long poll"):
        fake_telegram.wait_until_polling(timeout=0.05)


# --- Telegram Stars --------------------------------------------------------------------------

def stars_invoice(bot, **changes):
    params = dict(chat_id=USER, title="Media Lab: 100 кредитов", description="Пополнение баланса",
                  invoice_payload="order-1", provider_token="", currency="XTR",
                  prices=[types.LabeledPrice("100 кредитов", 70)])
    params.update(changes)
    return bot.send_invoice(**params)


def test_send_invoice_accepts_only_stars_with_one_price_and_checks_the_lengths(bot, fake_telegram):
    sent = stars_invoice(bot)
    assert (sent.invoice.currency, sent.invoice.total_amount, sent.invoice.title) == ("XTR", 70, "Media Lab: 100 кредитов")
    assert fake_telegram.invoice(USER)["payload"] == "order-1"
    call = fake_telegram.calls("sendInvoice")[0]
    assert call.params["provider_token"] == "" and call.params["prices"] == [{"label": "100 кредитов", "amount": 70}]
    for changes, error in (({"currency": "RUB"}, "CURRENCY_INVALID"),
                           ({"provider_token": "381764678:TEST:1"}, "PAYMENT_PROVIDER_INVALID"),
                           ({"prices": [types.LabeledPrice("a", 1), types.LabeledPrice("b", 2)]}, "exactly one price"),
                           ({"prices": [types.LabeledPrice("a", 0)]}, "STARS_INVOICE_INVALID"),
                           ({"title": "x" * 33}, "TITLE_INVALID"),
                           ({"description": "x" * 256}, "DESCRIPTION_INVALID"),
                           ({"invoice_payload": "я" * 65}, "PAYLOAD_INVALID")):
        assert error in api_error(lambda changes=changes: stars_invoice(bot, **changes)).description
    assert stars_invoice(bot, title="x" * 32, description="y" * 255, invoice_payload="z" * 128).invoice
    link = bot.create_invoice_link("Media Lab", "Пополнение", "order-2", "", "XTR", [types.LabeledPrice("x", 5)])
    assert link.startswith("https://t.me/$") and fake_telegram.invoice(USER, link=link)["total_amount"] == 5
    assert "CURRENCY_INVALID" in api_error(lambda: bot.create_invoice_link(
        "Media Lab", "x", "p", "", "USD", [types.LabeledPrice("x", 5)])).description


def test_a_payment_needs_an_ok_pre_checkout_answer_in_time(bot, fake_telegram):
    fake_telegram.pre_checkout_timeout = 0.3
    stars_invoice(bot)
    # ok=True in time: charged, one successful_payment message.
    attempt = fake_telegram.pay_invoice(USER)
    query = bot.get_updates(long_polling_timeout=0.001)[-1].pre_checkout_query
    assert (query.currency, query.total_amount, query.invoice_payload, query.from_user.id) == ("XTR", 70, "order-1", USER)
    assert bot.answer_pre_checkout_query(query.id, ok=True)
    assert attempt.wait() == "paid" and attempt.charge_id.startswith("stx")
    assert "query is too old" in api_error(lambda: bot.answer_pre_checkout_query(query.id, ok=True)).description
    paid = types.Update.de_json(attempt.update).message.successful_payment
    assert (paid.currency, paid.total_amount, paid.invoice_payload, paid.telegram_payment_charge_id) == (
        "XTR", 70, "order-1", attempt.charge_id)
    # ok=False: no charge; an answer after the deadline is refused and nothing is charged.
    refused = fake_telegram.pay_invoice(USER)
    assert "ERROR_MESSAGE_EMPTY" in api_error(lambda: bot.answer_pre_checkout_query(refused.query_id, ok=False)).description
    assert bot.answer_pre_checkout_query(refused.query_id, ok=False, error_message="Заказ не найден")
    assert refused.wait() == "refused" and refused.error_message == "Заказ не найден"
    late = fake_telegram.pay_invoice(USER)
    assert late.wait() == "timeout"
    assert "query is too old" in api_error(lambda: bot.answer_pre_checkout_query(late.query_id, ok=True)).description
    assert [t["id"] for t in fake_telegram.star_transactions()] == [attempt.charge_id]


def test_successful_payment_redelivery_lost_delivery_refunds_and_transactions(bot, fake_telegram):
    fake_telegram.pre_checkout_timeout = 2
    stars_invoice(bot)
    attempt = fake_telegram.pay_invoice(USER)
    bot.answer_pre_checkout_query(attempt.query_id, ok=True)
    attempt.wait()
    copies = fake_telegram.deliver_again(attempt.update, times=3)
    assert len({u["update_id"] for u in copies + [attempt.update]}) == 4
    assert {u["message"]["successful_payment"]["telegram_payment_charge_id"] for u in copies} == {attempt.charge_id}
    fake_telegram.lose_next_successful_payment()
    lost = fake_telegram.pay_invoice(USER)
    bot.answer_pre_checkout_query(lost.query_id, ok=True)
    assert lost.wait() == "paid" and lost.update is None
    updates = bot.get_updates(long_polling_timeout=0.001)
    assert sum(1 for u in updates if u.message and u.message.successful_payment) == 4   # the lost one never came
    # The bot refunds once; the second refund of the same charge fails.
    assert "USER_ID_INVALID" in api_error(lambda: bot.refund_star_payment(USER + 1, attempt.charge_id)).description
    assert bot.refund_star_payment(USER, attempt.charge_id) is True
    assert "CHARGE_ALREADY_REFUNDED" in api_error(lambda: bot.refund_star_payment(USER, attempt.charge_id)).description
    refunded = types.Update.de_json(fake_telegram.refund(lost.charge_id)).message
    assert refunded.content_type is None            # pyTelegramBotAPI 4.37.1: no handler sees it
    assert (refunded.refunded_payment.telegram_payment_charge_id, refunded.refunded_payment.total_amount) == (
        lost.charge_id, 70)
    # getStarTransactions: oldest first, paged; a refund has the payment's id and a receiver.
    page = bot.get_star_transactions(offset=1, limit=2).transactions
    assert [(t.id, t.source is None, t.receiver is None) for t in page] == [
        (lost.charge_id, False, True), (attempt.charge_id, True, False)]
    every = bot.get_star_transactions().transactions
    assert [t.id for t in every] == [attempt.charge_id, lost.charge_id, attempt.charge_id, lost.charge_id]
    assert every[0].source.user.id == USER and every[0].source.invoice_payload == "order-1" and every[0].amount == 70
    assert "limit" in api_error(lambda: bot.get_star_transactions(limit=101)).description
