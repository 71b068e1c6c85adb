"""The bot built by `bot.create_bot(cfg)`, driven through the fake Telegram Bot API.

Users type, send photos and press buttons on `fake_telegram`; the real pyTelegramBotAPI fetches the
updates with getUpdates (`Harness.pump`, a non-threaded bot processing them inline) or by real long
polling in a thread (`test_long_polling_end_to_end`). Jobs run through the real worker tasks
(`worker.huey` is a MemoryHuey in tests: dequeue + execute) against `fake_fal`.

The harness lives in tests/helpers.py (the `app` fixture in tests/conftest.py builds one).
"""
import threading

import pytest

import billing
import bot
import config
import models
import worker
from models import ConversationState, Generation, LedgerEntry, Reservation, User
from tests.helpers import ADMIN, USER, Harness, audit_ok, buttons, png, user_row

# --- users, menu, buttons --------------------------------------------------------------------


def test_start_greets_with_free_operations_and_the_main_menu(app):
    [reply] = app.send("/start", first_name="Ann")
    assert "Привет, Ann" in reply["text"]
    assert "Бесплатных операций: 4 из 4" in reply["text"]
    assert buttons(reply) == ["mode:generate", "mode:edit", "mode:merge", "mode:add_text",
                                           "mode:face_swap", "mode:retouch", "mode:upscale", "pay"]
    labels = [b["text"] for b in app.fake.buttons(reply)]
    assert labels == ["🎨 Создать", "✏️ Редактировать", "🔗 Объединить", "📝 Добавить текст",
                      "🔄 Заменить лицо", "✨ Ретушь", "⬆️ Улучшить", "💰 Оплатить / Баланс"]
    assert User.select().count() == 1


def test_ten_concurrent_starts_create_one_user(app):
    for _ in range(10):
        app.fake.send_text(USER, "/start")
    updates = app.fetch()
    assert len(updates) == 10
    barrier = threading.Barrier(10)
    errors = []

    def run(update):
        try:
            barrier.wait(5)
            app.bot.process_new_updates([update])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(u,)) for u in updates]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert User.select().where(User.telegram_id == USER).count() == 1
    user = user_row()
    assert billing.get_balance(user.id).free_ops == 4
    grants = LedgerEntry.select().where((LedgerEntry.user == user.id) & (LedgerEntry.kind == "grant")).count()
    assert grants == 1
    welcomes = [m for m in app.fake.messages(USER) if "Бесплатных операций: 4 из 4" in (m.get("text") or "")]
    assert len(welcomes) == 10
    audit_ok()


def test_every_main_menu_button_answers_and_leads_somewhere(app):
    [menu] = app.send("/start")
    expected = {
        "mode:generate": "Опишите, что нарисовать",
        "mode:edit": "Отправьте фото, которое нужно отредактировать",
        "mode:merge": "Отправьте от 2 до 4 фото",
        "mode:add_text": "на которое добавить надпись",
        "mode:face_swap": "Замена лица",
        "mode:retouch": "портрет для ретуши",
        "mode:upscale": "которое нужно улучшить",
        "pay": "Баланс",
    }
    for data in buttons(menu):
        replies = app.press(data, message=menu)
        assert replies, "button %s sent nothing" % data
        assert expected[data] in replies[-1]["text"], (data, replies[-1]["text"])
        # Every step offers a way out (cancel) or more choices.
        assert buttons(replies[-1]), data
        back = app.press("cancel", message=replies[-1])
        assert "Отменено" in back[-1]["text"]
    answered = {c.params["callback_query_id"] for c in app.fake.calls("answerCallbackQuery") if c.ok}
    assert len(answered) == 2 * len(expected)


def test_menu_command_cancel_and_unknown_inputs(app):
    app.send("/start")
    app.press("mode:generate")
    assert ConversationState.get().state == bot.Step.prompt.name
    [reply] = app.send("/cancel")
    assert "Отменено" in reply["text"]
    assert ConversationState.get().state is None
    [reply] = app.send("/cancel")
    assert "нечего отменять" in reply["text"]
    [reply] = app.send("/nonsense")
    assert "Такой команды нет" in reply["text"]
    [reply] = app.send("просто текст")
    assert "выберите, что сделать" in reply["text"] and buttons(reply) == ["menu"]    # a short hint
    [reply] = app.photo(png())                                  # a photo outside any flow
    assert "выберите, что сделать" in reply["text"] and buttons(reply) == ["menu"]
    [reply] = app.send("/help")
    assert "Добавить текст" in reply["text"] and "10 кредитов" in reply["text"]
    # A button of a finished step is answered, not ignored.
    app.press("mode:generate")
    app.send("кот")
    app.send("/start")                                          # leaves the ratio step
    assert "не действует" in app.answer_text("ratio:1:1")
    assert Generation.select().count() == 0


def test_english_texts_for_english_users(app):
    [reply] = app.send("/start", language_code="en-GB", first_name="Bob")
    assert "Hi, Bob" in reply["text"] and "Free operations: 4 of 4" in reply["text"]
    assert app.fake.buttons(reply)[0]["text"] == "🎨 Create"
    replies = app.press("mode:generate", language_code="en")
    assert "Describe what to draw" in replies[-1]["text"]
    [reply] = app.send("x" * 1001, language_code="en")
    assert "too long" in reply["text"] and "1000" in reply["text"]


def test_blocked_user_is_refused(app):
    app.send("/start")
    User.update(is_blocked=True).where(User.telegram_id == USER).execute()
    [reply] = app.send("/start")
    assert "ограничен администратором" in reply["text"]
    assert not buttons(reply)


# --- state ---------------------------------------------------------------------------------------


def test_state_storage_implements_every_method(database):
    storage = bot.PeeweeStateStorage()
    assert storage.get_state(1, 2, bot_id=9) is None and storage.get_data(1, 2, bot_id=9) == {}
    assert storage.set_state(1, 2, bot.Step.prompt, bot_id=9)
    assert storage.get_state(1, 2, bot_id=9) == "Step:prompt"
    assert storage.set_data(1, 2, "mode", "edit", bot_id=9)
    with storage.get_interactive_data(1, 2, bot_id=9) as data:
        data["files"] = [[1, "a"]]
    assert storage.get_data(1, 2, bot_id=9) == {"mode": "edit", "files": [[1, "a"]]}
    assert storage.save(1, 2, {"x": 1}, bot_id=9) and storage.get_data(1, 2, bot_id=9) == {"x": 1}
    assert storage.reset_data(1, 2, bot_id=9) and storage.get_data(1, 2, bot_id=9) == {}
    assert storage.get_state(1, 2, bot_id=9) == "Step:prompt"
    assert storage.get_state(1, 2, bot_id=8) is None            # another bot's key
    assert storage.delete_state(1, 2, bot_id=9) and not storage.delete_state(1, 2, bot_id=9)
    assert ConversationState.select().count() == 0


@pytest.mark.parametrize("backend", ["database", "pg_database"])
def test_concurrent_updates_of_one_chat_lose_nothing(request, backend):
    request.getfixturevalue(backend)                            # SQLite, or PostgreSQL when configured
    storage = bot.PeeweeStateStorage()
    barrier = threading.Barrier(8)

    def add(n):
        barrier.wait(5)
        for i in range(5):
            storage.update(7, 7, lambda record, item=(n, i): record["data"].setdefault("items", []).append(item))

    threads = [threading.Thread(target=add, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(map(tuple, storage.get_data(7, 7)["items"])) == [(n, i) for n in range(8) for i in range(5)]


def test_state_survives_a_bot_restart(app):
    app.send("/start")
    app.press("mode:generate")
    app.send("рыжий кот на крыше")
    app.restart()                                               # a new bot object mid-flow
    replies = app.press("ratio:16:9")
    gen = Generation.get()
    assert (gen.mode, gen.prompt, gen.options) == ("generate", "рыжий кот на крыше", {"aspect_ratio": "16:9"})
    assert "В очереди" in replies[-1]["text"]


# --- generate end to end ---------------------------------------------------------------------------


def test_generate_end_to_end(app, fake_fal):
    app.send("/start")
    app.press("mode:generate")
    [ask] = app.send("Закат над морем")
    assert buttons(ask) == ["ratio:1:1", "ratio:16:9", "ratio:9:16", "ratio:4:3", "ratio:3:4", "cancel"]
    [queued] = app.press("ratio:16:9")
    assert queued["text"].startswith("⏳ В очереди")
    gen = Generation.get()
    assert gen.status == "queued" and gen.status_message_id == queued["message_id"]
    assert Reservation.get().asset == "free_ops"
    assert app.run_jobs() >= 1
    gen = Generation.get()
    assert gen.status == "delivered", gen.error
    [submission] = fake_fal.submissions
    assert submission["arguments"]["prompt"] == "Закат над морем"
    assert submission["arguments"]["aspect_ratio"] == "16:9"
    result = app.fake.messages(USER)[-1]
    assert result.get("photo") and "Готово" in result["caption"]
    assert buttons(result) == (["again:%s" % gen.id] + ["use:%s:%s" % (m, gen.id) for m in ("edit", "upscale", "add_text")]
                               + ["menu"])
    assert app.fake.message(USER, queued["message_id"]) is None   # the status message is gone
    [balance] = app.send("/balance")
    assert "Бесплатных операций: 3 из 4" in balance["text"]
    # 🔁 Ещё раз: the same job again, with a new reservation.
    [again] = app.press("again:%s" % gen.id, message=result)
    assert "В очереди" in again["text"]
    second = Generation.select().order_by(Generation.created_at.desc()).first()
    assert second.id != gen.id and (second.prompt, second.options) == (gen.prompt, gen.options)
    assert second.reservation_id != gen.reservation_id
    app.run_jobs()
    assert Generation.get_by_id(second.id).status == "delivered"
    assert billing.get_balance(user_row().id).free_ops == 2
    audit_ok()


def test_queued_job_can_be_cancelled_from_its_status_message(app):
    app.send("/start")
    app.press("mode:generate")
    app.send("лес")
    [queued] = app.press("ratio:1:1")
    gen = Generation.get()
    toast = app.answer_text("jobcancel:%s" % gen.id)
    assert "отменена" in toast
    assert Generation.get().status == "canceled"
    assert "Кредиты не списаны" in app.fake.message(USER, queued["message_id"])["text"]
    assert billing.get_balance(user_row().id).free_ops == 4
    app.run_jobs()
    assert Generation.get().status == "canceled"
    audit_ok()


def test_long_polling_end_to_end(database, fake_telegram, fake_fal):
    """A real `infinity_polling` thread (threaded bot, worker pool) serves a whole generate flow."""
    cfg = config.configure(config.get().replace(
        telegram_api_url=fake_telegram.url, fal_key="test-fal-key", fal_queue_url=fake_fal.url,
        fal_poll_interval=0.02))
    worker.huey.flush()
    live = bot.create_bot(cfg, threaded=True)
    thread = threading.Thread(target=live.infinity_polling, kwargs={
        "timeout": 5, "long_polling_timeout": 1, "allowed_updates": bot.ALLOWED_UPDATES}, daemon=True)
    thread.start()
    try:
        fake_telegram.wait_until_polling()
        fake_telegram.send_text(USER, "/start")
        menu = fake_telegram.wait_for_message(USER, "Привет")
        mark = fake_telegram.mark()
        fake_telegram.press(USER, menu["message_id"], "mode:generate")
        ask = fake_telegram.wait_for_message(USER, "Опишите", since=mark)
        fake_telegram.send_text(USER, "маяк в тумане")
        ratio = fake_telegram.wait_for_message(USER, "формат", since=mark)
        fake_telegram.press(USER, ratio["message_id"], Harness.full(ratio, "ratio:1:1"))
        queued = fake_telegram.wait_for_message(USER, "В очереди", since=mark)
        fake_telegram.wait_for(lambda c: c.method == "answerCallbackQuery" and c.ok, since=mark)
        assert ask["message_id"] < queued["message_id"]
        gen = Generation.get()
        for _ in range(100):        # the status message id is stored right after the reply is sent
            if Generation.get_by_id(gen.id).status_message_id:
                break
            threading.Event().wait(0.02)
        assert Generation.get_by_id(gen.id).status_message_id == queued["message_id"]
    finally:
        live.stop_polling()
        thread.join(10)
        live.stop_bot()
    assert not thread.is_alive()
    while (task := worker.huey.dequeue()) is not None:
        worker.huey.execute(task)
    assert Generation.get().status == "delivered"
    assert fake_telegram.pending_updates() == 0
    worker.huey.flush()


# --- admin ---------------------------------------------------------------------------------------


def test_admin_grant_and_stats(app):
    app.send("/start")
    app.send("/start", user=ADMIN)
    [reply] = app.send("/grant %d 50 welcome bonus" % USER, user=ADMIN)
    assert "Начислено 50" in reply["text"]
    user = user_row()
    assert billing.get_balance(user.id).credits == 50
    entry = LedgerEntry.get((LedgerEntry.user == user.id) & (LedgerEntry.kind == "grant") & (LedgerEntry.asset == "credits"))
    assert entry.reference == "admin:%d:welcome bonus" % ADMIN and entry.idempotency_key.startswith("grant:")
    [reply] = app.send("/grant %d abc x" % USER, user=ADMIN)
    assert "Использование" in reply["text"]
    [reply] = app.send("/grant 777 5 x", user=ADMIN)
    assert "не найден" in reply["text"]
    [stats] = app.send("/stats", user=ADMIN)
    assert "Пользователи: 2" in stats["text"] and "конверсия в оплату: 0.0%" in stats["text"]
    [info] = app.send("/user %d" % USER, user=ADMIN)
    assert "Кредиты: 50" in info["text"]
    # Not an admin: the normal unknown-command reply, nothing granted.
    [refused] = app.send("/grant %d 500 hack" % USER)
    assert "Такой команды нет" in refused["text"]
    [refused] = app.send("/stats")
    assert "Такой команды нет" in refused["text"]
    assert billing.get_balance(user.id).credits == 50
    audit_ok()


def test_admin_block_free_access_promo_and_broadcast(app):
    app.send("/start")
    app.send("/start", user=502)
    app.send("/start", user=ADMIN)
    [reply] = app.send("/block 502", user=ADMIN)
    assert "заблокирован" in reply["text"]
    [refused] = app.send("/start", user=502)
    assert "ограничен" in refused["text"]
    app.send("/unblock 502", user=ADMIN)
    assert not user_row(502).is_blocked
    [reply] = app.send("/free_access %d 7" % USER, user=ADMIN)
    assert "Бесплатный доступ" in reply["text"]
    assert billing.get_balance(user_row().id).free_access
    [reply] = app.send("/promo_add SPRING15 15 100 30", user=ADMIN)
    assert "SPRING15" in reply["text"]
    code = models.PromoCode.get(models.PromoCode.code == "SPRING15")
    assert (code.kind, code.percent, code.max_uses) == ("discount", 15, 100)
    [listing] = app.send("/promo_list", user=ADMIN)
    assert "SPRING15 — 15%, 0/100, ожидают 0" in listing["text"] and "WELCOME10" in listing["text"]
    app.fake.block(502)
    [preview] = app.send("/broadcast Новый режим!", user=ADMIN)
    assert "Предпросмотр" in preview["text"] and "получателей: 3" in preview["text"]
    assert app.run_jobs() == 0                               # nothing sent before the confirm
    [started] = app.press("bcast", user=ADMIN, message=preview)
    assert "Рассылка запущена" in started["text"]
    assert app.run_jobs() == 1                               # the worker sends it, then reports
    report = app.fake.messages(ADMIN)[-1]
    assert "отправлено 2, не доставлено 1" in report["text"]
    assert any(m.get("text") == "Новый режим!" for m in app.fake.messages(USER))


def test_admin_promo_commands(app):
    """/promo_add forms, free access only with days and a limit (or the explicit word), a cap in
    rubles, /promo_off and /promo_on, an existing code, /promo_list (issue 9 §1)."""
    app.send("/start", user=ADMIN)
    [reply] = app.send("/promo_add VIP free_access days=7 uses=1", user=ADMIN)
    assert "VIP" in reply["text"]
    vip = models.PromoCode.get(models.PromoCode.code == "VIP")
    assert (vip.kind, vip.free_access_days, vip.max_uses) == ("free_access", 7, 1)
    for refused in ("/promo_add OPEN free_access", "/promo_add OPEN free_access days=7",
                    "/promo_add OPEN free_access uses=5", "/promo_add OPEN free_access days=7 unlimited",
                    "/promo_add OPEN 20 unlimited", "/promo_add OPEN 20 uses=٣", "/promo_add OPEN 20 uses=0"):
        [usage] = app.send(refused, user=ADMIN)
        assert "Использование" in usage["text"], refused
    assert not models.PromoCode.select().where(models.PromoCode.code == "OPEN").exists()
    app.send("/promo_add OWNER free_access unlimited", user=ADMIN)
    [reply] = app.send("/promo_add BIG 40 uses=10 valid=30 max=300", user=ADMIN)
    big = models.PromoCode.get(models.PromoCode.code == "BIG")
    assert (big.percent, big.max_uses, big.max_discount_kopecks) == (40, 10, 30000) and big.expires_at
    [exists] = app.send("/promo_add big 10", user=ADMIN)
    assert "уже существует" in exists["text"]
    [listing] = app.send("/promo_list", user=ADMIN)
    text = listing["text"]
    assert "BIG — 40% (не больше 300 ₽), 0/10" in text
    assert "OWNER — ⚠️ БЕССРОЧНЫЙ" in text and "VIP — бесплатный доступ на 7 дн., 0/1" in text
    [off] = app.send("/promo_off big", user=ADMIN)
    assert "выключен" in off["text"] and not models.PromoCode.get_by_id(big.id).active
    app.send("/start")
    app.press("pay")
    app.press("promo")
    [refused] = app.send("BIG")
    assert "отключён" in refused["text"]
    [on] = app.send("/promo_on BIG", user=ADMIN)
    assert "включён" in on["text"] and models.PromoCode.get_by_id(big.id).active
    [unknown] = app.send("/promo_off NOPE", user=ADMIN)
    assert "нет" in unknown["text"]


def test_admin_free_access_and_broadcast_act_once_per_update(app):
    """A redelivered update (same update_id) neither doubles free access nor the broadcast (§6)."""
    app.send("/start")
    app.send("/start", user=ADMIN)
    for text in ("/free_access %d 7" % USER, "/broadcast Привет!"):
        app.fake.send_text(ADMIN, text)
        [update] = app.fetch()
        app.bot.process_new_updates([update])
        app.bot.process_new_updates([update])          # Telegram delivers it again
    for preview in [m for m in app.fake.messages(ADMIN) if "Предпросмотр" in (m.get("text") or "")]:
        app.press("bcast", user=ADMIN, message=preview)      # both previews confirmed: one broadcast
    user = user_row()
    now = models.utcnow()
    assert abs((user.free_access_until - now).total_seconds() - 7 * 86400) < 60   # 7 days, not 14
    assert app.run_jobs() == 1                                                   # one broadcast
    assert [m.get("text") for m in app.fake.messages(USER)].count("Привет!") == 1
    # A new update is a new command: it extends again.
    app.send("/free_access %d 7" % USER, user=ADMIN)
    assert abs((user_row().free_access_until - now).total_seconds() - 14 * 86400) < 60


def test_admin_numbers_are_ascii_digits_only(app):
    app.send("/start")
    app.send("/start", user=ADMIN)
    for text in ("/grant ٥٠١ 5 x", "/grant %d ５ x" % USER, "/free_access %d ٣" % USER, "/block ٥٠١"):
        [reply] = app.send(text, user=ADMIN)
        assert "Использование" in reply["text"], text
    assert billing.get_balance(user_row().id).credits == 0 and not user_row().has_free_access


def test_collect_stats_counts_payments_and_failures(app):
    app.send("/start")
    user = user_row()
    models.Payment.create(user=user.id, credits=100, amount_kopecks=9000, status="succeeded",
                          yookassa_payment_id="p1")
    models.Payment.create(user=user.id, credits=300, amount_kopecks=30000, status="pending")
    Generation.create(user=user.id, chat_id=USER, mode="edit", status="failed")
    Generation.create(user=user.id, chat_id=USER, mode="generate", status="delivered")
    stats = bot.collect_stats()
    assert stats["users"] == 1 and stats["paying_users"] == 1 and stats["conversion_percent"] == 100.0
    assert stats["revenue_kopecks"] == 9000
    assert stats["generations_per_mode"] == {"edit": 1, "generate": 1}
    assert sum(stats["generations_per_day"].values()) == 2
    assert stats["failed_24h"] == 1


# --- main() ----------------------------------------------------------------------------------------


def test_main_reports_each_config_problem_and_exits_78(monkeypatch, capsys, cfg):
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "not a token")
    monkeypatch.setenv("PRICE_PER_OPERATION", "ten")
    assert bot.main() == 78
    err = capsys.readouterr().err
    assert "TELEGRAM_BOT_TOKEN does not look like a bot token" in err
    assert "PRICE_PER_OPERATION must be a whole number" in err


def test_main_refuses_an_unmigrated_database(monkeypatch, capsys, cfg, tmp_path):
    monkeypatch.setenv("DATABASE_URL", "sqlite:///%s" % (tmp_path / "blank.db"))
    assert bot.main() == 78
    assert "make migrate" in capsys.readouterr().err
