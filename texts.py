"""Every text the users see, in one catalogue: Russian by default, English for `en*` users.

`t(key, lang, **values)` formats a text; user-supplied values are inserted as plain text
(messages are sent without parse_mode, so nothing a user types is parsed as markup).
Button texts follow the seeds (../shared/seeds/).
"""

TEXTS = {
    # --- common -------------------------------------------------------------------------
    "error_generic": {
        "ru": "⚠️ Что-то пошло не так. Попробуйте ещё раз чуть позже.",
        "en": "⚠️ Something went wrong. Please try again a bit later.",
    },
    "blocked": {
        "ru": "⛔ Доступ к боту ограничен администратором.",
        "en": "⛔ Access to this bot has been restricted by the administrator.",
    },
    # --- bot (owned by bot.py) ------------------------------------------------------------
    # --- worker (owned by worker.py) ------------------------------------------------------
    "job_running": {
        "ru": "🎨 Генерирую…",
        "en": "🎨 Generating…",
    },
    "job_mode_generate": {"ru": "🎨 Создать", "en": "🎨 Create"},
    "job_mode_edit": {"ru": "✏️ Редактировать", "en": "✏️ Edit"},
    "job_mode_merge": {"ru": "🔗 Объединить", "en": "🔗 Merge"},
    "job_mode_face_swap": {"ru": "🔄 Заменить лицо", "en": "🔄 Face swap"},
    "job_mode_retouch": {"ru": "✨ Ретушь", "en": "✨ Retouch"},
    "job_mode_upscale": {"ru": "⬆️ Улучшить", "en": "⬆️ Upscale"},
    "job_done": {
        "ru": "✅ Готово: {mode}",
        "en": "✅ Done: {mode}",
    },
    "job_seed": {
        "ru": "Seed: {seed}",
        "en": "Seed: {seed}",
    },
    "job_cost_credits": {
        "ru": "💳 Списано {cost} кредитов, осталось {balance}.",
        "en": "💳 {cost} credits charged, {balance} left.",
    },
    "job_cost_free_op": {
        "ru": "🎁 Бесплатная операция (осталось {left} из {total}). Баланс: {balance} кредитов.",
        "en": "🎁 Free operation ({left} of {total} left). Balance: {balance} credits.",
    },
    "job_cost_free_access": {
        "ru": "♾ Бесплатный доступ.",
        "en": "♾ Free access.",
    },
    "job_cost_free": {
        "ru": "🎁 Бесплатно: время резерва истекло, кредиты не списаны.",
        "en": "🎁 Free: the reservation timed out, nothing was charged.",
    },
    "job_again_button": {
        "ru": "🔁 Ещё раз",
        "en": "🔁 Again",
    },
    "job_menu_button": {
        "ru": "🏠 Меню",
        "en": "🏠 Menu",
    },
    "job_failed_policy": {
        "ru": "🚫 Модель отказалась выполнять запрос по правилам контента. Измените запрос или фото "
              "и попробуйте снова. Кредиты не списаны.",
        "en": "🚫 The model refused the request under its content policy. Change the request or the "
              "photo and try again. No credits were charged.",
    },
    "job_failed_rejected": {
        "ru": "❌ Модель не приняла запрос. Измените описание или фото и попробуйте снова. "
              "Кредиты не списаны.",
        "en": "❌ The model did not accept the request. Change the description or the photo and try "
              "again. No credits were charged.",
    },
    "job_failed_input": {
        "ru": "❌ Фото не подходит: {reason} Отправьте другое. Кредиты не списаны.",
        "en": "❌ This photo cannot be used: {reason} Please send another one. No credits were charged.",
    },
    "job_input_not_an_image": {"ru": "это не изображение.", "en": "it is not an image."},
    "job_input_unsupported_format": {"ru": "нужен JPEG, PNG или WEBP.", "en": "JPEG, PNG or WEBP is needed."},
    "job_input_image_too_big": {"ru": "файл слишком большой (до 20 МБ).", "en": "the file is too big (20 MB at most)."},
    "job_input_image_too_small": {"ru": "изображение слишком маленькое.", "en": "the picture is too small."},
    "job_input_other": {"ru": "его не удалось прочитать.", "en": "it could not be read."},
    "job_failed_input_missing": {
        "ru": "❌ Не удалось получить фото из Telegram. Отправьте его ещё раз. Кредиты не списаны.",
        "en": "❌ The photo could not be fetched from Telegram. Please send it again. No credits were charged.",
    },
    "job_failed_timeout": {
        "ru": "⌛ Модель не успела ответить. Попробуйте ещё раз чуть позже. Кредиты не списаны.",
        "en": "⌛ The model did not answer in time. Please try again a bit later. No credits were charged.",
    },
    "job_failed_unavailable": {
        "ru": "⚠️ Сервис генерации сейчас недоступен. Попробуйте ещё раз чуть позже. Кредиты не списаны.",
        "en": "⚠️ The image service is unavailable right now. Please try again a bit later. "
              "No credits were charged.",
    },
    "job_failed_expired": {
        "ru": "⌛ Задачу не удалось выполнить вовремя. Попробуйте ещё раз. Кредиты не списаны.",
        "en": "⌛ The job could not be done in time. Please try again. No credits were charged.",
    },
    "job_failed_generic": {
        "ru": "❌ Не удалось выполнить задачу. Попробуйте ещё раз. Кредиты не списаны.",
        "en": "❌ The job failed. Please try again. No credits were charged.",
    },
    "notify_payment_received": {
        "ru": "✅ Оплата получена! Начислено {credits} кредитов. Баланс: {balance} кредитов.",
        "en": "✅ Payment received! {credits} credits added. Balance: {balance} credits.",
    },
    # --- payments / promo (owned by payments.py, promo.py via bot.py) -----------------------
    "promo_error": {
        "ru": "🎟️ Этот промокод сейчас нельзя использовать.",
        "en": "🎟️ This promo code cannot be used right now.",
    },
    "promo_invalid": {
        "ru": "🎟️ Неверный промокод: нужно 2–32 символа A–Z, 0–9, _ или -, процент 1–99, дни и лимит ≥ 1.",
        "en": "🎟️ Invalid promo code: use 2–32 characters A–Z, 0–9, _ or -, percent 1–99, days and limit ≥ 1.",
    },
    "promo_unknown": {
        "ru": "🎟️ Такого промокода нет. Проверьте написание.",
        "en": "🎟️ There is no such promo code. Please check the spelling.",
    },
    "promo_inactive": {
        "ru": "🎟️ Этот промокод отключён.",
        "en": "🎟️ This promo code has been switched off.",
    },
    "promo_expired": {
        "ru": "🎟️ Срок действия этого промокода истёк.",
        "en": "🎟️ This promo code has expired.",
    },
    "promo_exhausted": {
        "ru": "🎟️ Этот промокод уже закончился: все активации использованы.",
        "en": "🎟️ This promo code has run out: all its uses are taken.",
    },
    "promo_already_used": {
        "ru": "🎟️ Вы уже использовали этот промокод (или он ждёт оплаты другого вашего пополнения).",
        "en": "🎟️ You have already used this promo code (or it is waiting on another unpaid top-up of yours).",
    },
    "promo_wrong_kind_topup": {
        "ru": "🎟️ Этот промокод даёт бесплатный доступ, а не скидку. Введите его через «🎟️ Промокод» в меню баланса.",
        "en": "🎟️ This code grants free access, not a discount. Enter it with “🎟️ Promo code” in the balance menu.",
    },
    "promo_wrong_kind_free": {
        "ru": "🎟️ Это промокод на скидку: он применяется при пополнении баланса.",
        "en": "🎟️ This is a discount code: it applies when you top up your balance.",
    },
    "topup_not_a_number": {
        "ru": "Введите сумму целым числом рублей, например 250.",
        "en": "Please enter the amount as a whole number of rubles, e.g. 250.",
    },
    "topup_too_small": {
        "ru": "Минимальная сумма пополнения — {min} ₽.",
        "en": "The minimum top-up is {min} ₽.",
    },
    "topup_too_big": {
        "ru": "Максимальная сумма пополнения — {max} ₽.",
        "en": "The maximum top-up is {max} ₽.",
    },
    "payment_error": {
        "ru": "⚠️ Не удалось создать платёж. Попробуйте ещё раз чуть позже.",
        "en": "⚠️ Could not create the payment. Please try again a bit later.",
    },
    "payments_not_configured": {
        "ru": "💳 Оплата пока не подключена. Напишите администратору.",
        "en": "💳 Payments are not set up yet. Please contact the administrator.",
    },
    "payment_provider_unavailable": {
        "ru": "⏳ Платёжный сервис сейчас не отвечает. Нажмите «Оплатить» ещё раз через минуту — новый заказ не создастся.",
        "en": "⏳ The payment service is not responding. Tap “Pay” again in a minute — no second order will be created.",
    },
    "payment_rejected": {
        "ru": "⚠️ Платёжный сервис отклонил платёж. Деньги не списаны. Попробуйте другую сумму или позже.",
        "en": "⚠️ The payment service declined the payment. Nothing was charged. Try another amount or later.",
    },
    "payment_email_required": {
        "ru": "📧 Для чека (54-ФЗ) нужна ваша электронная почта. Отправьте её одним сообщением.",
        "en": "📧 A receipt (54-FZ) needs your e-mail address. Please send it in one message.",
    },
    "payment_email_invalid": {
        "ru": "📧 Это не похоже на адрес электронной почты. Пример: name@example.com",
        "en": "📧 That does not look like an e-mail address. Example: name@example.com",
    },
    "payment_unknown": {
        "ru": "Платёж не найден.",
        "en": "Payment not found.",
    },
    "payment_pending": {
        "ru": "⏳ Оплата ещё не поступила. Если вы уже оплатили, подождите минуту и нажмите «Проверить оплату».",
        "en": "⏳ The payment has not arrived yet. If you have paid, wait a minute and tap “Check payment”.",
    },
    "payment_canceled": {
        "ru": "❌ Платёж отменён, деньги не списаны.",
        "en": "❌ The payment was canceled; nothing was charged.",
    },
}


def lang_of(language_code: str | None) -> str:
    """Return "en" for Telegram language codes starting with "en", else "ru"."""
    return "en" if (language_code or "").lower().startswith("en") else "ru"


def t(key: str, lang: str = "ru", **values) -> str:
    """Return text `key` in `lang` ("ru" or "en"), formatted with `values`.

    Raises KeyError for an unknown key (a test checks every key has both languages).
    """
    entry = TEXTS[key]
    text = entry.get(lang) or entry["ru"]
    return text.format(**values) if values else text
