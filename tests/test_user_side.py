"""Issue 11, the user's side: taps that act once, drafts kept after a refusal, honest waiting,
inputs as people send them, money notices, /history, support and the admin's comfort, referrals.

Through the real bot, the fake Telegram, fake Fal and fake YooKassa (Harness from tests/test_bot.py).
"""
import datetime
import io

import pytest
from PIL import Image

import billing
import config
import models
import payments
import texts
import worker
from models import Draft, Generation, Payment, Reservation, User
from tests.helpers import USER, YK_IP, Harness, audit_ok, buttons, envelope, png, user_row


@pytest.fixture
def shop(app, fake_yookassa):
    """`app` with YooKassa pointed at the fake."""
    app.cfg = config.configure(app.cfg.replace(yookassa_api_url=fake_yookassa.api_url))
    app.restart()
    return app


def to_ratio(app, prompt="маяк"):
    app.send("/start")
    app.press("mode:generate")
    [ask] = app.send(prompt)
    return ask


def tap(app, message, data):
    """Press `data` on `message` even if its keyboard is gone (a fast second tap); return
    (the bot's new messages, the callback answer text)."""
    since = len(app.fake.messages(USER))
    update = app.fake.press(USER, message["message_id"], Harness.full(message, data), force=True)
    app.pump()
    [answer] = app.fake.answers(update["callback_query"]["id"])
    return app.fake.messages(USER)[since:], answer.get("text")


def concurrent_taps(app, message, data, n=2):
    """n presses of the same button fetched together and processed in n threads at once."""
    for _ in range(n):
        app.fake.press(USER, message["message_id"], Harness.full(message, data), force=True)
    updates = app.fetch()
    assert len(updates) == n
    app.process_concurrently(updates)


# --- 1. a tap acts once, and only on its own flow ----------------------------------------------


def test_a_second_tap_on_a_format_answers_already_done_and_spends_once(app):
    ask = to_ratio(app)
    [queued] = app.press("ratio:16:9", message=ask)
    assert "В очереди" in queued["text"]
    assert not app.fake.button_data(app.fake.message(USER, ask["message_id"]))   # keyboard removed
    new, answer = tap(app, ask, "ratio:16:9")
    assert new == [] and "Уже сделано" in answer
    new, answer = tap(app, ask, "ratio:1:1")                # another format of the same question
    assert new == [] and "Уже сделано" in answer
    assert Generation.select().count() == 1
    assert billing.get_balance(user_row().id).free_ops == 3
    audit_ok()


def test_two_concurrent_taps_make_one_job(app):
    ask = to_ratio(app)
    concurrent_taps(app, ask, "ratio:16:9")
    assert Generation.select().count() == 1 and Reservation.select().count() == 1
    answers = [a.get("text") for c in app.fake.calls("answerCallbackQuery") for a in [c.params]]
    assert sum("Уже сделано" in (t or "") for t in answers) == 1
    audit_ok()


def test_again_twice_makes_one_job(app):
    ask = to_ratio(app)
    app.press("ratio:1:1", message=ask)
    app.run_jobs()
    result = app.fake.messages(USER)[-1]
    gen = Generation.get()
    app.press("again:%s" % gen.id, message=result)
    new, answer = tap(app, result, "again:%s" % gen.id)
    assert new == [] and "Уже сделано" in answer
    assert Generation.select().count() == 2
    concurrent_taps(app, result, "again:%s" % gen.id)
    assert Generation.select().count() == 2
    audit_ok()


def test_the_add_text_colour_twice_sends_one_image(app):
    app.send("/start")
    app.press("mode:add_text")
    app.photo(png(300, 200))
    app.send("Привет")
    [colour] = app.press("pos:top")
    [image] = app.press("color:red", message=colour)
    assert image.get("photo")
    new, answer = tap(app, colour, "color:red")
    assert new == [] and "Уже сделано" in answer
    concurrent_taps(app, colour, "color:white")
    assert sum(1 for m in app.fake.messages(USER) if m.get("photo")) == 1


def test_cancel_of_an_older_flow_leaves_the_current_one(app):
    app.send("/start")
    [old] = app.press("mode:edit")                          # flow 1: its "✖ Отмена"
    app.send("/start")
    app.press("mode:generate")                              # flow 2
    new, answer = tap(app, old, "cancel")
    assert new == [] and "не действует" in answer
    [ratio] = app.send("горы")                              # flow 2 goes on
    assert "формат" in ratio["text"]
    [queued] = app.press("ratio:1:1", message=ratio)
    assert "В очереди" in queued["text"]


def test_cancel_twice_answers_already_done(app):
    app.send("/start")
    [ask] = app.press("mode:generate")
    [cancelled] = app.press("cancel", message=ask)
    assert "Отменено" in cancelled["text"]
    new, answer = tap(app, ask, "cancel")
    assert new == [] and "Уже сделано" in answer


def test_an_amount_twice_creates_one_order(shop):
    app = shop
    app.send("/start")
    [menu] = app.press("pay")
    [order] = app.press("amount:100", message=menu)
    assert "Пополнение на 100" in order["text"]
    new, answer = tap(app, menu, "amount:300")
    assert new == [] and "Уже сделано" in answer
    concurrent_taps(app, app.press("pay")[0], "amount:500")
    assert Payment.select().count() == 2


def test_consent_and_done_act_once(app):
    app.send("/start")
    [note] = app.press("mode:face_swap")
    app.press("consent", message=note)
    new, answer = tap(app, note, "consent")
    assert new == [] and "Уже сделано" in answer
    app.send("/start")
    app.press("mode:merge")
    app.photo(png(100, 100))
    [two] = app.photo(png(101, 100))
    [ask] = app.press("done", message=two)
    assert "Что сделать" in ask["text"]
    new, answer = tap(app, two, "done")
    assert new == [] and "Уже сделано" in answer


# --- 2. work is never thrown away ------------------------------------------------------------------


def spend_free_ops(user_id):
    for n in range(4):
        billing.commit(billing.reserve(user_id, 10, reference="t:%d" % n, idempotency_key="t:%d" % n, ttl=60).id)


def paid_by_webhook(app, fake_yookassa, payment):
    """YooKassa says the payment succeeded and notifies; the web app's work, then the worker's."""
    fake_yookassa.succeed(payment.yookassa_payment_id)
    outcome = payments.handle_notification(
        envelope(fake_yookassa, "payment.succeeded", payment.yookassa_payment_id), YK_IP, app.cfg)
    assert outcome.credited_payment_id
    worker.notify_payment(str(payment.id))
    app.run_jobs()


def test_pay_and_continue_starts_the_refused_job_when_the_payment_is_credited(shop, fake_yookassa, fake_fal):
    app = shop
    app.send("/start")
    spend_free_ops(user_row().id)
    [ask] = app.press("mode:generate", message=app.send("/start")[0])
    assert "Стоимость: 10 кредитов" in ask["text"] and "баланс: 0" in ask["text"] and "не хватает" in ask["text"]
    [ratio] = app.send("маяк в тумане")
    [refused] = app.press("ratio:16:9", message=ratio)
    assert "стоит 10, на балансе 0" in refused["text"]
    draft = Draft.get()
    assert (draft.mode, draft.prompt, draft.options, draft.reason) == ("generate", "маяк в тумане",
                                                                      {"aspect_ratio": "16:9"}, "credits")
    [screen] = app.press("payfor:" + draft.token, message=refused)
    assert "запустится сама" in screen["text"]
    new, answer = tap(app, refused, "payfor:" + draft.token)
    assert new == [] and "Уже сделано" in answer
    [order] = app.press("amount:100", message=screen)
    paid_by_webhook(app, fake_yookassa, Payment.get())
    texts_ = [m.get("text") or m.get("caption") or "" for m in app.fake.messages(USER)]
    assert any("Оплата получена" in t for t in texts_) and any("Запускаю вашу задачу" in t for t in texts_)
    gen = Generation.get()
    assert (gen.status, gen.prompt, gen.options) == ("delivered", "маяк в тумане", {"aspect_ratio": "16:9"})
    assert billing.get_balance(user_row().id).credits == 90
    assert Draft.select().count() == 0
    worker.notify_payment.call_local(str(Payment.get().id))      # a repeated notice starts nothing
    assert Generation.select().count() == 1
    audit_ok()


def test_pay_and_continue_with_too_little_says_still_short_and_keeps_the_draft(shop, fake_yookassa):
    app = shop
    app.cfg = config.configure(app.cfg.replace(mode_prices={"generate": 500}))
    app.restart()
    app.send("/start")
    spend_free_ops(user_row().id)
    ratio = to_ratio(app)
    [refused] = app.press("ratio:1:1", message=ratio)
    app.press("payfor:" + Draft.get().token, message=refused)
    [order] = app.press("amount:100")
    paid_by_webhook(app, fake_yookassa, Payment.get())
    last = app.fake.messages(USER)[-1]
    assert "всё ещё не хватает" in last["text"] and "стоит 500, на балансе 100" in last["text"]
    assert Generation.select().count() == 0 and Draft.get().resume_on_payment
    audit_ok()


def test_a_failed_job_offers_retry_and_change_the_request(app, fake_fal):
    app.send("/start")
    app.press("mode:edit")
    app.photo(png(300, 200))
    fake_fal.script("policy")
    app.send("Сделай небо розовым")
    app.run_jobs()
    failed = app.fake.messages(USER)[-1]
    assert "не списан" in failed["text"].lower() or "не списаны" in failed["text"]
    draft = Draft.get()
    assert (draft.mode, draft.reason, len(draft.input_file_ids)) == ("edit", "policy", 1)
    [ask] = app.press("dedit:" + draft.token, message=failed)
    assert "новый запрос" in ask["text"]
    [queued] = app.send("Сделай небо зелёным")
    assert "В очереди" in queued["text"]
    app.run_jobs()
    gens = list(Generation.select().order_by(Generation.created_at))
    assert [g.status for g in gens] == ["failed", "delivered"]
    assert gens[1].input_file_ids == gens[0].input_file_ids and gens[1].prompt == "Сделай небо зелёным"
    new, answer = tap(app, failed, "dedit:" + draft.token)
    assert new == [] and "Уже сделано" in answer
    audit_ok()


def test_retry_after_a_failure_and_after_the_job_limit(app, fake_fal):
    app.send("/start")
    app.press("mode:upscale")
    fake_fal.script("policy")
    app.photo(png(128, 128))
    app.run_jobs()
    failed = app.fake.messages(USER)[-1]
    assert buttons(failed)[0].startswith("dretry:") and not any(b.startswith("dedit:") for b in buttons(failed))
    [queued] = app.press(buttons(failed)[0], message=failed)
    assert "В очереди" in queued["text"]
    app.run_jobs()
    assert [g.status for g in Generation.select().order_by(Generation.created_at)] == ["failed", "delivered"]
    # the active-job limit: the third job is kept and retried once a slot is free
    for prompt in ("один", "два"):
        app.press("ratio:1:1", message=to_ratio(app, prompt))
    [refused] = app.press("ratio:1:1", message=to_ratio(app, "три"))
    assert "уже 2 задачи" in refused["text"] and "сохранены" in refused["text"]
    app.run_jobs()
    app.press(buttons(refused)[0], message=refused)
    assert Generation.select().where(Generation.prompt == "три").count() == 1
    audit_ok()


def test_a_draft_expires_after_draft_ttl(app):
    app.send("/start")
    spend_free_ops(user_row().id)
    [refused] = app.press("ratio:1:1", message=to_ratio(app))
    Draft.update(expires_at=Draft.get().expires_at.replace(year=2000)).execute()
    new, answer = tap(app, refused, buttons(refused)[1])
    assert new == [] and "не действует" in answer
    worker.sweep_once(cfg=app.cfg)
    assert Draft.select().count() == 0


def test_the_mode_start_shows_price_and_what_pays_for_it(app):
    app.send("/start")
    [ask] = app.press("mode:retouch")
    assert "Стоимость: 10 кредитов" in ask["text"] and "осталось 4 из 4" in ask["text"]
    billing.set_free_access(user_row().id, days=3)
    [ask] = app.press("mode:upscale", message=app.send("/start")[0])
    assert "бесплатный доступ" in ask["text"]


# --- 3. honest waiting ----------------------------------------------------------------------------


def test_queue_positions_are_updated_as_the_queue_moves(app):
    app.send("/start")
    user = user_row()
    billing.credit(user.id, 100, kind="grant", reference="t", idempotency_key="t:credit")
    app.cfg = config.configure(app.cfg.replace(max_active_jobs_per_user=5))
    gens = [worker.accept_generation(user, USER, "generate", prompt="p%d" % n, cfg=app.cfg) for n in range(3)]
    status = [worker.show_status(Generation.get_by_id(g.id), "ru", app.cfg) for g in gens]
    assert [s.text for s in status] == ["⏳ В очереди (1)", "⏳ В очереди (2)", "⏳ В очереди (3)"]
    task = worker.huey.dequeue()
    worker.huey.execute(task)                                  # job 1 starts: the others move up
    shown = [app.fake.message(USER, s.message_id) for s in status[1:]]
    assert [m["text"] for m in shown] == ["⏳ В очереди (1)", "⏳ В очереди (2)"]
    assert all(buttons(m) == ["jobcancel:%s" % g.id] for m, g in zip(shown, gens[1:], strict=True))
    app.run_jobs()
    assert {g.status for g in Generation.select()} == {"delivered"}
    audit_ok()


def test_the_status_shows_the_time_waited_on_long_jobs(app):
    app.send("/start")
    gen = worker.accept_generation(user_row(), USER, "upscale", file_ids=["x"], cfg=app.cfg)
    sent = worker.show_status(Generation.get_by_id(gen.id), "ru", app.cfg)
    status = worker.StatusMessage(Generation.get_by_id(gen.id), "ru", app.cfg)
    status.on_queue_update({"status": "IN_PROGRESS"})
    assert app.fake.message(USER, sent.message_id)["text"] == "⬆️ Улучшаю…"
    status.began -= 75                                         # as if 75 s had passed
    status.at -= 60
    status.tick()
    assert app.fake.message(USER, sent.message_id)["text"] == "⬆️ Улучшаю… (ждём 1:15)"
    assert buttons(app.fake.message(USER, sent.message_id)) == ["jobcancel:%s" % gen.id]


# --- 4. inputs as people send them ----------------------------------------------------------------


def album_in_threads(app, images, caption=None):
    """The user sends an album; its updates are processed at once in one thread each."""
    app.fake.send_album(USER, images, caption=caption)
    app.process_concurrently(app.fetch())


def test_an_edit_photo_with_a_caption_starts_at_once(app):
    app.send("/start")
    app.press("mode:edit")
    [queued] = app.photo(png(300, 200), caption="Сделай небо розовым")
    assert "В очереди" in queued["text"]
    assert Generation.get().prompt == "Сделай небо розовым"


def test_a_merge_album_of_five_with_a_caption_answers_once(app):
    app.send("/start")
    app.press("mode:merge")
    since = len(app.fake.messages(USER))
    album_in_threads(app, [png(100 + n, 100) for n in range(5)], caption="Собери коллаж")
    replies = app.fake.messages(USER)[since:]
    assert len(replies) == 1
    reply = app.fake.message(USER, replies[0]["message_id"])
    assert "(4 из 4)" in reply["text"] and "не взяты: 1" in reply["text"]
    [queued] = app.press("done", message=reply)                # the caption is the instruction
    assert "В очереди" in queued["text"]
    gen = Generation.get()
    assert gen.prompt == "Собери коллаж" and len(gen.input_file_ids) == 4


def test_an_edit_album_uses_the_first_photo_and_says_so(app):
    app.send("/start")
    app.press("mode:edit")
    since = len(app.fake.messages(USER))
    album_in_threads(app, [png(100, 100), png(120, 100)])
    texts_ = [m["text"] for m in app.fake.messages(USER)[since:]]
    assert any("первое фото" in t for t in texts_) and any("Что изменить" in t for t in texts_)
    assert len(texts_) == 2


@pytest.mark.parametrize("attempt", range(3))
def test_an_edit_album_with_a_caption_is_one_job_with_that_instruction(app, attempt):
    app.send("/start")
    app.press("mode:edit")
    album_in_threads(app, [png(100, 100), png(120, 100)], caption="Сделай ярче")
    [gen] = list(Generation.select())
    assert gen.prompt == "Сделай ярче" and len(gen.input_file_ids) == 1


def test_a_face_swap_album_of_two_is_face_and_target(app, fake_fal):
    app.send("/start")
    app.press("consent", message=app.press("mode:face_swap")[0])
    since = len(app.fake.messages(USER))
    album_in_threads(app, [png(200, 200), png(300, 200)])
    [queued] = app.fake.messages(USER)[since:]
    assert "В очереди" in queued["text"]
    assert len(Generation.get().input_file_ids) == 2


def test_size_errors_name_the_real_limit_in_the_right_plural(app):
    app.send("/start")
    app.press("mode:upscale")
    [reply] = app.photo(png(40, 40))
    assert "64 пикселя" in reply["text"]
    assert [texts.plural(n, "pixel") for n in (1, 2, 5, 11, 21, 64)] == [
        "1 пиксель", "2 пикселя", "5 пикселей", "11 пикселей", "21 пиксель", "64 пикселя"]
    assert texts.plural(1, "pixel", "en") == "1 pixel"


def test_a_picture_over_the_pixel_limit_names_megapixels_not_megabytes(app):
    app.send("/start")
    app.press("mode:upscale")
    big = io.BytesIO()
    Image.new("1", (10000, 10000)).save(big, "PNG")       # a small file with too many pixels
    [reply] = app.document(big.getvalue(), file_name="big.png", mime_type="image/png")
    assert "мегапикселей" in reply["text"] and "МБ" not in reply["text"]
    assert Reservation.select().count() == 0


def test_seed_only_where_it_means_something(app):
    app.send("/start")
    app.press("mode:upscale")
    app.photo(png(128, 128))
    app.run_jobs()
    assert "Seed" not in app.fake.messages(USER)[-1]["caption"]


# --- 5. every money change is told, once ----------------------------------------------------------

ADMIN = 1000


def test_a_canceled_payment_is_told_once_in_the_users_language(shop, fake_yookassa):
    app = shop
    app.send("/start", language_code="en")
    app.press("amount:100", message=app.press("pay", language_code="en")[0], language_code="en")
    payment = Payment.get()
    fake_yookassa.cancel(payment.yookassa_payment_id)
    body = envelope(fake_yookassa, "payment.canceled", payment.yookassa_payment_id)
    outcome = payments.handle_notification(body, YK_IP, app.cfg)
    assert outcome.canceled_payment_id == payment.id
    for _ in range(2):
        worker.notify_payment_canceled(str(payment.id))
    app.run_jobs()
    assert payments.handle_notification(body, YK_IP, app.cfg).canceled_payment_id is None   # a duplicate
    told = [m["text"] for m in app.fake.messages(USER) if "canceled" in (m.get("text") or "")]
    assert told == ["✖ The payment of 100.00 ₽ (100 credits) was canceled. Nothing was charged; "
                    "your balance is unchanged."]


def test_grants_and_free_access_are_told_once_and_the_end_is_announced_a_day_before(app):
    app.send("/start")
    app.send("/start", user=ADMIN)
    for text in ("/grant %d 50 sorry" % USER, "/free_access %d 7" % USER):
        app.fake.send_text(ADMIN, text)
        [update] = app.fetch()
        app.bot.process_new_updates([update])
        app.bot.process_new_updates([update])          # Telegram delivers it again
    told = [m["text"] for m in app.fake.messages(USER)][-2:]
    assert "начислил вам 50 кредитов" in told[0] and "Баланс: 50" in told[0]
    assert "бесплатный доступ до" in told[1]
    assert len([m for m in app.fake.messages(USER) if "начислил" in m["text"]]) == 1
    until = user_row().free_access_until
    assert worker.remind_free_access_once(now=until - datetime.timedelta(days=3), cfg=app.cfg) == 0
    assert worker.remind_free_access_once(now=until - datetime.timedelta(hours=20), cfg=app.cfg) == 1
    assert worker.remind_free_access_once(now=until - datetime.timedelta(hours=2), cfg=app.cfg) == 0
    assert "закончится" in app.fake.messages(USER)[-1]["text"]


# --- 6. /history and results as the next input ---------------------------------------------------


def generate_one(app, prompt):
    app.press("ratio:1:1", message=to_ratio(app, prompt))
    app.run_jobs()
    return app.fake.messages(USER)[-1]


def test_a_fresh_result_feeds_the_next_mode(app, fake_fal):
    result = generate_one(app, "кот")
    gen = Generation.get()
    assert gen.result_file_id == result["photo"][-1]["file_id"]          # Telegram's id, no bytes kept
    [queued] = app.press("use:upscale:%s" % gen.id, message=result)
    assert "В очереди" in queued["text"]
    app.run_jobs()
    upscaled = Generation.select().where(Generation.mode == "upscale").get()
    assert upscaled.input_file_ids == [gen.result_file_id] and upscaled.status == "delivered"
    [ask] = app.press("use:edit:%s" % gen.id, message=result)
    assert "Что изменить" in ask["text"]
    app.send("добавь шляпу")
    assert Generation.select().where(Generation.mode == "edit").get().input_file_ids == [gen.result_file_id]
    [ask] = app.press("use:add_text:%s" % gen.id, message=result)
    assert "Какой текст" in ask["text"]
    app.send("Мяу")
    app.press("pos:top")
    [image] = app.press("color:white")
    assert image.get("photo")
    audit_ok()


def test_history_lists_the_last_results_to_send_again_or_rerun(app):
    generate_one(app, "первый")
    generate_one(app, "второй")
    [listing] = app.send("/history")
    lines = listing["text"].splitlines()
    assert "Последние результаты" in lines[0] and "1. 🎨 Создать" in lines[1] and "бесплатно" in lines[1]
    assert len([line for line in lines if "Создать" in line]) == 2
    newest = Generation.select().order_by(Generation.created_at.desc()).get()
    [again] = app.press("hsend:%s" % newest.id, message=listing)
    assert again.get("photo")                               # sent again by its file id: the same picture
    assert (worker.download_file(again["photo"][-1]["file_id"], app.cfg)
            == worker.download_file(newest.result_file_id, app.cfg))
    assert "use:upscale:%s" % newest.id in buttons(again)
    [queued] = app.press("rerun:%s" % newest.id, message=listing)
    assert "В очереди" in queued["text"]
    new, answer = tap(app, listing, "rerun:%s" % newest.id)
    assert new == [] and "Уже сделано" in answer
    assert Generation.select().where(Generation.prompt == "второй").count() == 2
    assert app.send("/history", user=777)[0]["text"].startswith("🗂 Здесь появятся")


# --- 7. support, terms, no dead ends --------------------------------------------------------------


def with_settings(app, **changes):
    app.cfg = config.configure(app.cfg.replace(**changes))
    app.restart()
    return app


def test_help_paysupport_terms_and_the_payment_screen_show_support(shop):
    app = with_settings(shop, support_contact="@ml_support", terms_url="https://example.com/terms",
                        privacy_url="https://example.com/privacy")
    [help_] = app.send("/help")
    assert "@ml_support" in help_["text"] and "https://example.com/terms" in help_["text"]
    assert "Команды администратора" not in help_["text"]
    assert "@ml_support" in app.send("/paysupport")[0]["text"]
    [terms] = app.send("/terms")
    assert "https://example.com/terms" in terms["text"] and "https://example.com/privacy" in terms["text"]
    [screen] = app.send("/balance")
    assert "@ml_support" in screen["text"] and "https://example.com/terms" in screen["text"]
    [order] = app.press("amount:100", message=screen)
    assert "@ml_support" in order["text"]


def test_without_payments_the_balance_screen_has_no_dead_ends(app):
    app = with_settings(app, yookassa_shop_id="", yookassa_secret_key="", support_contact="@ml_support")
    [screen] = app.send("/balance")
    assert "Оплата пока не подключена" in screen["text"] and "@ml_support" in screen["text"]
    assert buttons(screen) == ["menu"]
    assert "не указан" not in app.send("/paysupport")[0]["text"]
    assert "кредиты" in app.send("/terms")[0]["text"]                 # no URLs set: what buying means


def test_stray_input_gets_a_short_hint_with_one_button(app):
    app.send("/start")
    for reply in (app.send("привет")[0], app.photo(png())[0], app.send("/nonsense")[0]):
        assert buttons(reply) == ["menu"]


# --- 8. admin comfort -------------------------------------------------------------------------------


def test_broadcast_preview_confirms_once_and_can_target_a_language(app):
    app.send("/start")
    app.send("/start", user=601, language_code="en")
    app.send("/start", user=ADMIN)
    [preview] = app.send("/broadcast en New mode!", user=ADMIN)
    assert "получателей: 1" in preview["text"] and "New mode!" in preview["text"]
    app.press("bcast", user=ADMIN, message=preview)
    new, answer = tap_as(app, ADMIN, preview, "bcast")
    assert new == [] and "Уже сделано" in answer
    app.run_jobs()
    assert [m.get("text") for m in app.fake.messages(601)].count("New mode!") == 1
    assert "New mode!" not in [m.get("text") for m in app.fake.messages(USER)]
    [preview] = app.send("/broadcast Отмена теста", user=ADMIN)
    app.press("cancel", user=ADMIN, message=preview)
    assert app.run_jobs() == 0


def tap_as(app, user, message, data):
    since = len(app.fake.messages(user))
    update = app.fake.press(user, message["message_id"], Harness.full(message, data), force=True)
    app.pump()
    [answer] = app.fake.answers(update["callback_query"]["id"])
    return app.fake.messages(user)[since:], answer.get("text")


def test_admin_help_and_stats_with_display_names_revenue_and_conversion(app):
    app.send("/start")
    app.send("/start", user=ADMIN)
    assert "/broadcast [ru|en]" in app.send("/help", user=ADMIN)[0]["text"]
    user = user_row()
    Payment.create(user=user.id, credits=100, amount_kopecks=9000, status="succeeded", yookassa_payment_id="p1",
                   succeeded_at=models.utcnow())
    Payment.create(user=user.id, credits=300, amount_kopecks=30000, status="succeeded", yookassa_payment_id="p2",
                   succeeded_at=models.utcnow() - datetime.timedelta(days=3))
    Generation.create(user=user.id, chat_id=USER, mode="face_swap", status="delivered")
    [stats] = app.send("/stats", user=ADMIN)
    assert "🔄 Заменить лицо: 1" in stats["text"] and "face_swap" not in stats["text"]
    assert "За сутки: выручка 90.00 ₽, платящих 1, конверсия активных 50.0%" in stats["text"]
    assert "За неделю: выручка 390.00 ₽" in stats["text"]


# --- 9. referrals -----------------------------------------------------------------------------------


def test_a_referral_pays_the_referrer_once_on_the_first_real_top_up(shop, fake_yookassa):
    app = with_settings(shop, referral_bonus=20)
    app.send("/start")
    referrer = user_row()
    [screen] = app.send("/balance")
    link = [line for line in screen["text"].splitlines() if "?start=ref_" in line][0]
    code = link.rsplit("ref_", 1)[1]
    assert link.startswith("https://t.me/") and code == worker.referral_code(referrer.id)
    app.send("/start ref_" + code, user=602)
    app.send("/start", user=603)
    app.send("/start ref_" + code, user=603)               # an existing user is not "referred"
    friend = User.get(User.telegram_id == 602)
    assert friend.referred_by == referrer.id and User.get(User.telegram_id == 603).referred_by is None
    assert not worker.set_referrer(referrer.id, code)       # no self-referral
    assert not worker.set_referrer(friend.id, "zzzzzz")     # no such user
    assert billing.get_balance(referrer.id).credits == 0    # signing up pays nothing
    for _ in range(2):                                      # two top-ups of the friend: one bonus
        app.press("amount:100", user=602, message=app.send("/balance", user=602)[0])
        paid_by_webhook(app, fake_yookassa, Payment.select().order_by(Payment.created_at.desc()).get())
    assert billing.get_balance(referrer.id).credits == 20
    bonus = models.LedgerEntry.get(models.LedgerEntry.idempotency_key == "referral:%s" % friend.id)
    assert (bonus.kind, bonus.user_id, bonus.amount) == ("grant", referrer.id, 20)
    told = [m["text"] for m in app.fake.messages(USER) if "приглашённый друг" in (m.get("text") or "")]
    assert len(told) == 1 and "20 кредитов" in told[0]
    audit_ok()


def test_refunds_of_the_friend_take_the_referral_bonus_back_by_the_same_share(shop, fake_yookassa):
    """A bonus is earned by money that stays paid: refunding half of the friend's top-up takes back
    half the bonus, the rest the rest (capped by the referrer's balance, the shortfall recorded)."""
    app = with_settings(shop, referral_bonus=20)
    app.send("/start")
    referrer = user_row()
    app.send("/start ref_" + worker.referral_code(referrer.id), user=602)
    app.press("amount:100", user=602, message=app.send("/balance", user=602)[0])
    order = Payment.get()
    paid_by_webhook(app, fake_yookassa, order)
    assert billing.get_balance(referrer.id).credits == 20
    order = Payment.get_by_id(order.id)
    payments.refund_topup(order.yookassa_payment_id, order.amount_kopecks // 2, idempotency_key="half")
    assert billing.get_balance(referrer.id).credits == 10
    while billing.get_balance(referrer.id).credits == 10:   # free operations go first, then 8 credits
        key = "generation:r%d" % billing.get_balance(referrer.id).free_ops
        billing.commit(billing.reserve(referrer.id, 8, reference=key, idempotency_key=key, ttl=900).id)
    assert billing.get_balance(referrer.id).credits == 2
    payments.refund_topup(order.yookassa_payment_id, None, idempotency_key="rest")
    back = list(models.LedgerEntry.select().where(models.LedgerEntry.reference == "referral:%s" % User.get(
        User.telegram_id == 602).id).order_by(models.LedgerEntry.id))
    assert [(e.kind, e.amount, e.shortfall) for e in back] == [("grant", 20, 0), ("payment_refund", 10, 0),
                                                               ("payment_refund", 10, 8)]
    assert billing.get_balance(referrer.id).credits == 0
    audit_ok()
    billing.take_back(referrer.id, 1, reference=back[0].reference, idempotency_key=back[0].reference + ":refund:x")
    assert [v for v in billing.audit().violations if v.startswith("I16")] == [
        "I16 %s: 21 credits taken back, the bonus was 20" % back[0].reference]


def test_no_referral_link_or_bonus_when_the_bonus_is_off(shop, fake_yookassa):
    app = shop                                              # REFERRAL_BONUS=0 (the default)
    app.send("/start")
    [screen] = app.send("/balance")
    assert "ref_" not in screen["text"]
    app.send("/start ref_" + worker.referral_code(user_row().id), user=602)
    app.press("amount:100", user=602, message=app.send("/balance", user=602)[0])
    paid_by_webhook(app, fake_yookassa, Payment.get())
    assert billing.get_balance(user_row().id).credits == 0
    audit_ok()


def test_an_edit_album_whose_captioned_photo_is_handled_last_still_starts_the_job(app):
    """The race behind the threaded album tests, made deterministic: the photo without the caption
    is handled first and moves the flow to the instruction step; the captioned photo, dispatched
    after that, must still reach the image handler and start the job with its caption."""
    app.send("/start")
    app.press("mode:edit")
    app.fake.send_album(USER, [png(100, 100), png(120, 100)], caption="Сделай ярче")
    updates = app.fetch()
    captioned = [u for u in updates if u.message.caption]
    plain = [u for u in updates if not u.message.caption]
    assert len(captioned) == 1 and len(plain) == 1
    app.bot.process_new_updates(plain)
    assert Generation.select().count() == 0
    app.bot.process_new_updates(captioned)
    [gen] = list(Generation.select())
    assert gen.prompt == "Сделай ярче" and len(gen.input_file_ids) == 1
