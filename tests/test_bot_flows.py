"""Per-mode flows and top-ups through the real bot, the fake Telegram, fake Fal and fake YooKassa.

The harness comes from tests/helpers.py, the `app` fixture from tests/conftest.py.
"""

import pytest

import billing
import bot
import config
import promo
import worker
from models import Generation, LedgerEntry, Payment, Reservation
from tests.helpers import USER, audit_ok, buttons, png, user_row

MB = 1024 * 1024


def start_mode(app, mode):
    app.send("/start")
    return app.press("mode:" + mode)


def deliver(app):
    """Run the queued jobs and return the bot's last message (the result)."""
    assert app.run_jobs() >= 1
    return app.fake.messages(USER)[-1]


def state_of_ledger(user_id):
    return [(e.asset, e.kind, e.amount) for e in LedgerEntry.select().where(LedgerEntry.user == user_id)
            .order_by(LedgerEntry.id)]


# --- paid modes with images ------------------------------------------------------------------------


def test_edit_end_to_end(app, fake_fal):
    start_mode(app, "edit")
    [ask] = app.photo(png(300, 200))
    assert "Что изменить" in ask["text"]
    [queued] = app.send("Сделай небо розовым")
    assert "В очереди" in queued["text"]
    gen = Generation.get()
    assert (gen.mode, gen.prompt, len(gen.input_file_ids)) == ("edit", "Сделай небо розовым", 1)
    result = deliver(app)
    assert Generation.get().status == "delivered" and result.get("photo")
    [submission] = fake_fal.submissions
    assert submission["app"] == "fal-ai/nano-banana/edit"
    assert [u["data_uri"] for u in submission["arguments"]["image_urls"]] == [True]   # never a Telegram URL
    assert fake_fal.token_leaks == []
    audit_ok()


def test_merge_album_of_three_becomes_one_job_with_three_inputs(app, fake_fal):
    start_mode(app, "merge")
    album = app.fake.send_album(USER, [png(200, 200, (255, 0, 0)), png(210, 200, (0, 255, 0)),
                                       png(220, 200, (0, 0, 255))])
    updates = app.fetch()
    assert len(updates) == 3 and len({u.message.media_group_id for u in updates}) == 1
    app.process_concurrently(updates)
    expected = [u["message"]["photo"][-1]["file_id"] for u in album]
    replies = [m for m in app.fake.messages(USER) if "Фото получено" in (m.get("text") or "")]
    assert len(replies) == 1 and "(3 из 4)" in replies[0]["text"]          # one reply per album, edited
    [queued_prompt] = app.press("done")
    assert "Что сделать из этих фото" in queued_prompt["text"]
    [queued] = app.send("Собери коллаж")
    assert "В очереди" in queued["text"]
    [gen] = list(Generation.select())
    assert gen.input_file_ids == expected
    deliver(app)
    assert Generation.get().status == "delivered"
    [submission] = fake_fal.submissions
    assert len(submission["arguments"]["image_urls"]) == 3
    audit_ok()


def test_merge_one_by_one_refuses_a_fifth_photo(app):
    [ask] = start_mode(app, "merge")
    assert "done" not in buttons(ask)
    [first] = app.photo(png(100, 100))
    assert "Нужно ещё" in first["text"] and "done" not in buttons(first)
    for n in range(2, 5):
        [reply] = app.photo(png(100 + n, 100))
        assert "(%d из 4)" % n in reply["text"] and "done" in buttons(reply)
    [fifth] = app.photo(png(120, 100))
    assert "не больше 4 фото" in fifth["text"]
    [hint] = app.send("объедини их")                          # text before "Готово": point at the button
    assert "done" in buttons(hint) and Generation.select().count() == 0
    app.press("done")
    app.send("объедини")
    assert len(Generation.get().input_file_ids) == 4


def test_face_swap_asks_consent_once_then_face_then_target(app, fake_fal):
    [note] = start_mode(app, "face_swap")
    assert "Замена лица" in note["text"] and buttons(note) == ["consent", "cancel"]
    [ask_face] = app.press("consent")
    assert "фото лица" in ask_face["text"]
    [ask_target] = app.photo(png(200, 200, (10, 10, 10)))
    assert "на которое поставить" in ask_target["text"]
    [queued] = app.photo(png(300, 200, (200, 200, 200)))
    assert "В очереди" in queued["text"]
    deliver(app)
    assert Generation.get().status == "delivered"
    [submission] = fake_fal.submissions
    assert submission["app"] == "fal-ai/face-swap"
    assert {"base_image_url", "swap_image_url"} <= set(submission["arguments"])
    # The consent is remembered: next time the flow asks for the face at once.
    [again] = app.press("mode:face_swap", message=app.send("/start")[0])
    assert "фото лица" in again["text"]


@pytest.mark.parametrize("mode, endpoint", [("retouch", "fal-ai/retoucher"), ("upscale", "fal-ai/esrgan")])
def test_one_photo_modes_start_at_once(app, fake_fal, mode, endpoint):
    start_mode(app, mode)
    [queued] = app.photo(png(128, 128))
    assert "В очереди" in queued["text"]
    result = deliver(app)
    gen = Generation.get()
    assert (gen.mode, gen.status) == (mode, "delivered")
    assert result.get("photo") or result.get("document")
    assert [s["app"] for s in fake_fal.submissions] == [endpoint]
    assert billing.get_balance(user_row().id).free_ops == 3
    audit_ok()


def test_add_text_is_free_and_local(app, fake_fal):
    start_mode(app, "add_text")
    [ask] = app.photo(png(400, 300))
    assert "Какой текст" in ask["text"]
    [where] = app.send("С днём рождения!")
    assert buttons(where) == ["pos:top", "pos:center", "pos:bottom", "cancel"]
    [colour] = app.press("pos:bottom")
    assert buttons(colour) == ["color:white", "color:black", "color:yellow", "color:red", "cancel"]
    [result] = app.press("color:yellow")
    assert result.get("photo") and "бесплатно" in result["caption"]
    assert Generation.select().count() == 0 and Reservation.select().count() == 0
    assert fake_fal.submissions == []
    assert state_of_ledger(user_row().id) == [("free_ops", "grant", 4)]


# --- input checks before anything is reserved ------------------------------------------------------


def test_a_30_mb_document_is_refused_before_download_and_reservation(app):
    start_mode(app, "edit")
    before = state_of_ledger(user_row().id)
    [reply] = app.document(png(), file_name="huge.png", mime_type="image/png", file_size=30 * MB)
    assert "слишком большой" in reply["text"] and "20 МБ" in reply["text"]
    assert app.fake.calls("getFile") == []
    assert Reservation.select().count() == 0 and Generation.select().count() == 0
    assert state_of_ledger(user_row().id) == before
    # The step is still open: a proper photo continues the flow.
    [ask] = app.document(png(), file_name="ok.png", mime_type="image/png")
    assert "Что изменить" in ask["text"]
    audit_ok()


@pytest.mark.parametrize("data, name, mime, expected", [
    (b"just some notes", "notes.txt", "text/plain", "Это не изображение"),
    (b"GIF89a....", "anim.gif", "image/gif", "нужен JPEG, PNG или WEBP"),
    (b"\x89PNG\r\n\x1a\n broken", "broken.png", "image/png", "Это не изображение"),
])
def test_non_images_are_refused(app, data, name, mime, expected):
    start_mode(app, "retouch")
    [reply] = app.document(data, file_name=name, mime_type=mime)
    assert expected in reply["text"]
    assert Reservation.select().count() == 0


def test_too_small_image_is_refused(app):
    start_mode(app, "upscale")
    [reply] = app.photo(png(40, 40))
    assert "слишком маленькое" in reply["text"] and "64" in reply["text"]
    assert Reservation.select().count() == 0


def test_prompt_too_long_keeps_the_step(app):
    start_mode(app, "generate")
    [reply] = app.send("к" * 1001)
    assert "не больше 1000 символов" in reply["text"]
    [ratio] = app.send("к" * 1000)
    assert "формат" in ratio["text"]
    assert Reservation.select().count() == 0


def test_insufficient_credits_offers_a_top_up(app):
    app.send("/start")
    user = user_row()
    for n in range(4):                                      # spend the free operations
        billing.commit(billing.reserve(user.id, 10, reference="t:%d" % n, idempotency_key="t:%d" % n, ttl=60).id)
    app.press("mode:generate")
    app.send("горы")
    [reply] = app.press("ratio:1:1")
    assert "Недостаточно кредитов" in reply["text"] and "стоит 10, на балансе 0" in reply["text"]
    assert [b.split(":")[0] for b in buttons(reply)] == ["payfor", "dedit", "menu"]
    assert Generation.select().count() == 0
    [balance] = app.press(buttons(reply)[0], message=reply)
    assert "Кредиты: 0" in balance["text"]
    audit_ok()


def test_insufficient_credits_name_the_price_of_the_mode(app):
    """PRICE_GENERATE differs from PRICE_PER_OPERATION: the refused job and the bot's generic error
    reply (what `_guarded` sends for an InsufficientCredits a handler lets through) both name it."""
    app.cfg = config.configure(app.cfg.replace(mode_prices={"generate": 25}))
    app.restart()
    app.send("/start")
    user = user_row()
    for n in range(4):                                      # spend the free operations
        billing.commit(billing.reserve(user.id, 10, reference="t:%d" % n, idempotency_key="t:%d" % n, ttl=60).id)
    billing.credit(user.id, 7, kind="grant", reference="t:grant", idempotency_key="t:grant")
    app.press("mode:generate")
    app.send("горы")
    [refused] = app.press("ratio:1:1")
    assert "стоит 25, на балансе 7" in refused["text"]
    with pytest.raises(billing.InsufficientCredits) as caught:
        worker.accept_generation(user, USER, "generate", prompt="горы", options={"aspect_ratio": "1:1"}, cfg=app.cfg)
    ctx = bot.Ctx(bot=app.bot, cfg=app.cfg, user=user, lang="ru", chat_id=USER, telegram_id=USER, update_id=None)
    bot._report(ctx, caught.value)
    reply = app.fake.last_message(USER)
    assert "стоит 25, на балансе 7" in reply["text"] and buttons(reply) == ["pay", "menu"]
    assert caught.value.values == {"price": 25, "balance": 7}
    assert Generation.select().count() == 0
    audit_ok()


def test_too_many_jobs(app):
    app.send("/start")
    for prompt in ("один", "два"):
        app.press("mode:generate", message=app.send("/start")[0])
        app.send(prompt)
        app.press("ratio:1:1")
    app.press("mode:generate", message=app.send("/start")[0])
    app.send("три")
    [reply] = app.press("ratio:1:1")
    assert "уже 2 задачи в работе" in reply["text"]
    assert Generation.select().count() == 2


# --- balance, top-ups, promo codes -----------------------------------------------------------------


@pytest.fixture
def shop(app, fake_yookassa):
    """`app` with YooKassa pointed at the fake."""
    cfg = config.configure(app.cfg.replace(yookassa_api_url=fake_yookassa.api_url))
    app.cfg = cfg
    app.restart()
    return app


def test_top_up_with_welcome10(shop, fake_yookassa):
    app = shop
    app.send("/start")
    [menu] = app.press("pay")
    assert buttons(menu) == ["amount:100", "amount:300", "amount:500", "amount:1000",
                                          "amount_custom", "promo", "cancel"]
    assert "Бесплатных операций: 4 из 4" in menu["text"]
    app.press("promo")
    [discounted] = app.send(" welcome10 ")
    assert "WELCOME10" in discounted["text"] and "10%" in discounted["text"]
    assert app.fake.find_button(discounted, "100 кр.")["text"] == "100 кр. за 90 ₽"
    [order] = app.press("amount:100", message=discounted)
    assert "Пополнение на 100 кредитов. К оплате: 90.00 ₽" in order["text"]
    pay_button = app.fake.find_button(order, "Оплатить")
    assert pay_button["text"] == "Оплатить 90 ₽"
    payment = Payment.get()
    assert pay_button["url"] == payment.confirmation_url
    assert (payment.credits, payment.amount_kopecks, payment.status) == (100, 9000, "pending")
    assert fake_yookassa.payments[payment.yookassa_payment_id]["amount"]["value"] == "90.00"
    check = "check:%s" % payment.id
    assert "ещё не поступила" in app.answer_text(check)
    assert billing.get_balance(user_row().id).credits == 0
    fake_yookassa.succeed(payment.yookassa_payment_id)
    [paid] = app.press(check)
    assert "Оплата получена! Начислено 100 кредитов" in paid["text"]
    assert billing.get_balance(user_row().id).credits == 100
    assert Payment.get().status == "succeeded"
    # A second press does not credit again.
    [again] = app.press(check, message=order)
    assert "уже зачислена" in again["text"]
    assert billing.get_balance(user_row().id).credits == 100
    with pytest.raises(promo.CodeAlreadyUsed):
        promo.check_discount("WELCOME10", user_row().id)
    audit_ok()


@pytest.mark.parametrize("typed, expected", [
    ("abc", "целым числом"), ("-5", "Минимальная сумма пополнения — 10 ₽"), ("10.5", "целым числом"),
    ("９９", "целым числом"), ("1e9", "целым числом"), ("5", "Минимальная сумма"),
    ("100001", "Максимальная сумма пополнения — 100000 ₽"),
])
def test_custom_amounts_are_checked(shop, typed, expected):
    app = shop
    app.send("/start")
    app.press("pay")
    [ask] = app.press("amount_custom")
    assert "от 10 до 100000" in ask["text"]
    [reply] = app.send(typed)
    assert expected in reply["text"]
    assert Payment.select().count() == 0
    [order] = app.send("250")                            # still in the step: a good amount works
    assert "Пополнение на 250 кредитов. К оплате: 250.00 ₽" in order["text"]
    assert Payment.select().count() == 1


def test_unknown_promo_code(shop):
    app = shop
    app.send("/start")
    app.press("pay")
    app.press("promo")
    [reply] = app.send("NOPE2024")
    assert "Такого промокода нет" in reply["text"]
    [menu] = app.send("SAVE20")                          # still asking: another code works
    assert "SAVE20" in menu["text"] and app.fake.find_button(menu, "100 кр.")["text"] == "100 кр. за 80 ₽"


def test_free_access_code_makes_the_next_generation_free(shop, fake_fal):
    app = shop
    promo.add_code("VIP7", "free_access", days=7, max_uses=10)      # an admin's code; none is seeded
    app.send("/start")
    app.press("pay")
    app.press("promo")
    [refused] = app.send("FREE_ACCESS")                 # the public code of earlier releases is gone
    assert "нет" in refused["text"].lower() or "не найден" in refused["text"].lower()
    app.press("pay")
    app.press("promo")
    [reply] = app.send("vip7")
    assert "бесплатный доступ включён" in reply["text"] and "Бесплатный доступ" in reply["text"]
    app.press("mode:generate", message=reply)
    app.send("звёздное небо")
    app.press("ratio:9:16")
    assert Reservation.get().asset == "free_access"
    result = deliver(app)
    assert Generation.get().status == "delivered" and "Бесплатный доступ" in result["caption"]
    view = billing.get_balance(user_row().id)
    assert (view.credits, view.free_ops, view.free_access) == (0, 4, True)
    audit_ok()


def test_receipts_ask_for_the_email_once(shop, fake_yookassa):
    app = shop
    app.cfg = config.configure(app.cfg.replace(yookassa_receipts=True))
    app.restart()
    fake_yookassa.receipts_required = True
    app.send("/start")
    app.press("pay")
    [ask] = app.press("amount:300")
    assert "электронная почта" in ask["text"]
    [bad] = app.send("not-an-email")
    assert "не похоже на адрес" in bad["text"]
    [order] = app.send("Ann@Example.RU")
    assert "Пополнение на 300 кредитов" in order["text"]
    assert user_row().email == "Ann@example.ru"
    [order2] = app.press("amount:500", message=app.press("pay")[0])
    assert "Пополнение на 500 кредитов" in order2["text"]           # not asked again
    assert Payment.select().count() == 2


def test_balance_without_yookassa_says_so(app):
    app.cfg = config.configure(app.cfg.replace(yookassa_shop_id="", yookassa_secret_key=""))
    app.restart()
    [reply] = app.send("/balance")
    assert "Оплата пока не подключена" in reply["text"]
    assert buttons(reply) == ["menu"]                      # no promo entry or top-up that leads nowhere
