"""Webhook mode: Telegram (the fake) POSTs updates to the bot's Flask app, served by a real
Werkzeug server on loopback; the secret token is checked on every update."""
import json
import threading
import time

import pytest
import requests
from werkzeug.serving import make_server

import bot
import config
import worker
from models import User

USER = 424242
SECRET = "s3cret-token_0123456789"


@pytest.fixture
def hook(database, fake_telegram):
    cfg = config.configure(config.get().replace(
        telegram_api_url=fake_telegram.url, telegram_webhook_url="http://127.0.0.1/telegram/webhook",
        telegram_webhook_secret=SECRET))
    server = make_server("127.0.0.1", 0, bot.create_webhook_app(cfg), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = "http://127.0.0.1:%d/telegram/webhook" % server.server_port
    yield cfg, url
    worker.tg(worker.telegram(cfg).delete_webhook)
    server.shutdown()
    thread.join(5)


def test_updates_arrive_through_the_webhook(hook, fake_telegram):
    cfg, url = hook
    assert worker.tg(worker.telegram(cfg).set_webhook, url=url, secret_token=SECRET,
                     allowed_updates=bot.ALLOWED_UPDATES)
    fake_telegram.send_text(USER, "/start", first_name="Вебхук")
    menu = fake_telegram.wait_for_message(USER, "Привет")
    assert "Создать" in " ".join(b["text"] for b in fake_telegram.buttons(menu))
    mark = fake_telegram.mark()
    fake_telegram.press(USER, menu["message_id"], "pay")
    fake_telegram.wait_for_message(USER, "Баланс", since=mark)
    deadline = time.monotonic() + 5                      # the 200 lands just after the reply
    while fake_telegram.pending_updates() and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    assert fake_telegram.pending_updates() == 0          # every update was answered 200
    assert User.select().where(User.telegram_id == USER).count() == 1


@pytest.mark.parametrize("headers", [{}, {bot.SECRET_HEADER: "wrong-secret-0123456789"}])
def test_a_forged_update_is_refused_and_changes_nothing(hook, headers):
    _, url = hook
    update = {"update_id": 1, "message": {"message_id": 1, "date": 0, "chat": {"id": USER, "type": "private"},
                                          "from": {"id": USER, "is_bot": False, "first_name": "X"},
                                          "text": "/start"}}
    response = requests.post(url, data=json.dumps(update), headers=dict(headers, **{
        "Content-Type": "application/json"}), timeout=5)
    assert response.status_code == 403
    assert User.select().count() == 0


def test_a_body_that_is_not_an_update_is_a_400(hook):
    _, url = hook
    response = requests.post(url, data="not json", headers={bot.SECRET_HEADER: SECRET}, timeout=5)
    assert response.status_code == 400


def test_webhook_settings_are_validated():
    with pytest.raises(config.ConfigError) as info:
        config.load({"TELEGRAM_BOT_TOKEN": "1:x", "TELEGRAM_WEBHOOK_URL": "http://bot.example.com/hook",
                     "TELEGRAM_WEBHOOK_SECRET": "short", "TELEGRAM_WEBHOOK_LISTEN": "nowhere"})
    text = "\n".join(info.value.problems)
    assert "TELEGRAM_WEBHOOK_URL must be an https:// URL" in text
    assert "TELEGRAM_WEBHOOK_SECRET must be 16–256 characters" in text
    assert "TELEGRAM_WEBHOOK_LISTEN must be host:port" in text
    ok = config.load({"TELEGRAM_BOT_TOKEN": "1:x", "TELEGRAM_WEBHOOK_URL": "https://bot.example.com/telegram/webhook",
                      "TELEGRAM_WEBHOOK_SECRET": SECRET})
    assert ok.telegram_webhook_listen == "127.0.0.1:8081"
