"""Every text the users see, in one catalogue: Russian by default, English for `en*` users.

`t(key, lang, **values)` formats a text; user-supplied values are inserted as plain text
(messages are sent without parse_mode, so nothing a user types is parsed as markup).
Button texts follow the original plan (docs/SPEC.md §3).
"""
import string

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
    "welcome": {
        "ru": "👋 Привет, {name}! Я Media Lab: создаю и редактирую изображения с помощью нейросетей.",
        "en": "👋 Hi, {name}! I am Media Lab: I create and edit images with neural networks.",
    },
    "menu_title": {"ru": "🏠 Главное меню", "en": "🏠 Main menu"},
    "balance_title": {"ru": "💰 Баланс", "en": "💰 Balance"},
    "balance_credits": {"ru": "💳 Кредиты: {credits} (1 кредит = 1 ₽)", "en": "💳 Credits: {credits} (1 credit = 1 ₽)"},
    "balance_reserved": {"ru": "🔒 В резерве за задачи в работе: {reserved}", "en": "🔒 Held for jobs in progress: {reserved}"},
    "free_ops_left": {"ru": "🎁 Бесплатных операций: {left} из {total}", "en": "🎁 Free operations: {left} of {total}"},
    "free_access_forever": {"ru": "♾ Бесплатный доступ: без ограничения срока", "en": "♾ Free access: no end date"},
    "free_access_until": {"ru": "♾ Бесплатный доступ до {until}", "en": "♾ Free access until {until}"},
    "price_line": {"ru": "Цена операции: {price} кредитов. «Добавить текст» — бесплатно.",
                   "en": "One operation costs {price} credits. “Add text” is free."},
    "price_paid": {"ru": "Стоимость: {price} кредитов.", "en": "Cost: {price} credits."},
    "price_you_free_access": {"ru": "У вас бесплатный доступ — ничего не спишется.",
                              "en": "You have free access: nothing will be charged."},
    "price_you_free_op": {"ru": "Будет использована бесплатная операция (осталось {left} из {total}).",
                          "en": "A free operation will be used ({left} of {total} left)."},
    "price_you_balance": {"ru": "Ваш баланс: {balance} кредитов.", "en": "Your balance: {balance} credits."},
    "price_you_short": {"ru": "Ваш баланс: {balance} кредитов — не хватает, пополнить: /balance",
                        "en": "Your balance: {balance} credits, not enough; top up: /balance"},
    "price_free": {"ru": "Это бесплатно.", "en": "This is free."},
    "choose_amount": {"ru": "Выберите сумму пополнения:", "en": "Choose a top-up amount:"},
    "choose_action": {"ru": "Выберите действие в меню 👇", "en": "Choose an action from the menu 👇"},
    "admin_help": {"ru": "👮 Команды администратора:\n/stats — статистика\n/user <id> — пользователь\n"
                         "/grant <id> <кредиты> <причина>\n/free_access <id> [дни]\n/block <id>, /unblock <id>\n"
                         "/promo_add, /promo_list, /promo_off, /promo_on — промокоды\n"
                         "/broadcast [ru|en] <текст> — рассылка (с предпросмотром)\n/payments <id>\n/jobs failed\n"
                         "/refund <id платежа YooKassa> [₽]\n/settle <заказ> credit|cancel — платёж, требующий внимания",
                   "en": "👮 Admin commands:\n/stats — statistics\n/user <id> — a user\n"
                         "/grant <id> <credits> <reason>\n/free_access <id> [days]\n/block <id>, /unblock <id>\n"
                         "/promo_add, /promo_list, /promo_off, /promo_on — promo codes\n"
                         "/broadcast [ru|en] <text> — broadcast (with a preview)\n/payments <id>\n/jobs failed\n"
                         "/refund <YooKassa payment id> [₽]\n/settle <order> credit|cancel — a payment that needs attention"},
    "hint_stray": {"ru": "Сначала выберите, что сделать, — в меню 👇", "en": "First choose what to do, in the menu 👇"},
    "support_line": {"ru": "🛟 Поддержка: {contact}", "en": "🛟 Support: {contact}"},
    "terms_line": {"ru": "📄 Условия: {url}", "en": "📄 Terms: {url}"},
    "privacy_line": {"ru": "🔒 Конфиденциальность: {url}", "en": "🔒 Privacy: {url}"},
    "paysupport": {"ru": "🛟 Вопросы по оплате: напишите {contact}. Укажите дату и сумму платежа — мы проверим "
                         "его и, если нужно, вернём деньги.",
                   "en": "🛟 Payment questions: write to {contact}. Give the date and amount of the payment: we will "
                         "check it and refund it if needed."},
    "paysupport_none": {"ru": "🛟 Вопросы по оплате: контакт поддержки пока не указан администратором — "
                              "смотрите /help.",
                        "en": "🛟 Payment questions: the administrator has not set a support contact yet; see /help."},
    "terms_none": {"ru": "📄 Условия пока не опубликованы. Оплачивая, вы покупаете кредиты для операций в этом боте "
                         "(1 кредит = 1 ₽); неудавшиеся операции не списываются.",
                   "en": "📄 Terms are not published yet. Paying, you buy credits for operations in this bot "
                         "(1 credit = 1 ₽); failed operations are not charged."},
    "help": {
        "ru": "ℹ️ Что умеет Media Lab\n\n"
              "🎨 Создать — картинка по текстовому описанию, в выбранном формате.\n"
              "✏️ Редактировать — одно фото и что в нём изменить.\n"
              "🔗 Объединить — 2–4 фото (альбомом или по одному) и что из них сделать.\n"
              "📝 Добавить текст — надпись на фото. Бесплатно.\n"
              "🔄 Заменить лицо — фото лица, затем фото, на которое его перенести.\n"
              "✨ Ретушь — аккуратная ретушь портрета.\n"
              "⬆️ Улучшить — увеличение и повышение чёткости.\n\n"
              "💰 Операция стоит {price} кредитов (1 кредит = 1 ₽). Новым пользователям — {free} бесплатные "
              "операции. Если задача не удалась, ничего не списывается.\n"
              "🖼 Фото: JPEG, PNG или WEBP, до {max_mb} МБ.\n\n"
              "/start — меню, /balance — баланс и пополнение, /history — последние результаты, /cancel — отменить "
              "текущий шаг, /paysupport — вопросы по оплате, /terms — условия, /help — справка.",
        "en": "ℹ️ What Media Lab does\n\n"
              "🎨 Create — a picture from a text description, in the format you choose.\n"
              "✏️ Edit — one photo and what to change in it.\n"
              "🔗 Merge — 2–4 photos (as an album or one by one) and what to make of them.\n"
              "📝 Add text — a caption drawn on a photo. Free.\n"
              "🔄 Face swap — a photo of a face, then the photo to put it on.\n"
              "✨ Retouch — gentle portrait retouching.\n"
              "⬆️ Upscale — enlarge and sharpen.\n\n"
              "💰 One operation costs {price} credits (1 credit = 1 ₽). New users get {free} free operations. "
              "If a job fails, nothing is charged.\n"
              "🖼 Photos: JPEG, PNG or WEBP, up to {max_mb} MB.\n\n"
              "/start — menu, /balance — balance and top-up, /history — latest results, /cancel — cancel the "
              "current step, /paysupport — payment questions, /terms — terms, /help — help.",
    },
    "cancelled": {"ru": "✖ Отменено. Выберите действие:", "en": "✖ Cancelled. Choose an action:"},
    "cancelled_short": {"ru": "Отменено", "en": "Cancelled"},
    "nothing_to_cancel": {"ru": "Сейчас нечего отменять. Выберите действие:",
                          "en": "There is nothing to cancel. Choose an action:"},
    "unknown_command": {"ru": "Такой команды нет. Выберите действие в меню или отправьте /help.",
                        "en": "Unknown command. Choose an action from the menu or send /help."},
    "button_outdated": {"ru": "Эта кнопка уже не действует. Откройте меню: /start",
                        "en": "This button is no longer active. Open the menu: /start"},
    "button_done": {"ru": "✓ Уже сделано", "en": "✓ Already done"},
    "hint_send_photo": {"ru": "📷 Сейчас нужно фото (как фото или файл JPEG/PNG/WEBP).",
                        "en": "📷 A photo is needed now (as a photo or a JPEG/PNG/WEBP file)."},
    "hint_send_text": {"ru": "✍️ Сейчас нужен текст одним сообщением.", "en": "✍️ Please send the text in one message."},
    "hint_press_button": {"ru": "👆 Выберите вариант кнопкой выше.", "en": "👆 Please choose an option with the buttons above."},
    "hint_send_amount": {"ru": "Отправьте сумму целым числом, например 250.",
                         "en": "Send the amount as a whole number, e.g. 250."},
    "hint_send_code": {"ru": "🎟️ Отправьте промокод одним сообщением.", "en": "🎟️ Send the promo code in one message."},
    "hint_send_email": {"ru": "📧 Отправьте адрес электронной почты для чека.",
                        "en": "📧 Send an e-mail address for the receipt."},
    # buttons
    "btn_generate": {"ru": "🎨 Создать", "en": "🎨 Create"},
    "btn_edit": {"ru": "✏️ Редактировать", "en": "✏️ Edit"},
    "btn_merge": {"ru": "🔗 Объединить", "en": "🔗 Merge"},
    "btn_add_text": {"ru": "📝 Добавить текст", "en": "📝 Add text"},
    "btn_face_swap": {"ru": "🔄 Заменить лицо", "en": "🔄 Face swap"},
    "btn_retouch": {"ru": "✨ Ретушь", "en": "✨ Retouch"},
    "btn_upscale": {"ru": "⬆️ Улучшить", "en": "⬆️ Upscale"},
    "btn_pay": {"ru": "💰 Оплатить / Баланс", "en": "💰 Pay / Balance"},
    "btn_topup": {"ru": "💰 Пополнить", "en": "💰 Top up"},
    "btn_menu": {"ru": "🏠 Меню", "en": "🏠 Menu"},
    "btn_cancel": {"ru": "✖ Отмена", "en": "✖ Cancel"},
    "btn_cancel_job": {"ru": "✖ Отменить", "en": "✖ Cancel job"},
    "btn_consent": {"ru": "✅ Согласен", "en": "✅ I agree"},
    "btn_done": {"ru": "✅ Готово", "en": "✅ Done"},
    "btn_add_text_again": {"ru": "📝 Ещё надпись", "en": "📝 Another caption"},
    "btn_pos_top": {"ru": "⬆️ Сверху", "en": "⬆️ Top"},
    "btn_pos_center": {"ru": "⏺ По центру", "en": "⏺ Center"},
    "btn_pos_bottom": {"ru": "⬇️ Снизу", "en": "⬇️ Bottom"},
    "btn_color_white": {"ru": "⚪ Белый", "en": "⚪ White"},
    "btn_color_black": {"ru": "⚫ Чёрный", "en": "⚫ Black"},
    "btn_color_yellow": {"ru": "🟡 Жёлтый", "en": "🟡 Yellow"},
    "btn_color_red": {"ru": "🔴 Красный", "en": "🔴 Red"},
    "btn_amount": {"ru": "{credits} ₽", "en": "{credits} ₽"},
    "btn_amount_discounted": {"ru": "{credits} кр. за {price} ₽", "en": "{credits} cr. for {price} ₽"},
    "btn_other_amount": {"ru": "Другая сумма", "en": "Other amount"},
    "btn_promo": {"ru": "🎟️ Промокод", "en": "🎟️ Promo code"},
    "btn_pay_url": {"ru": "Оплатить {amount} ₽", "en": "Pay {amount} ₽"},
    "btn_check_payment": {"ru": "Проверить оплату", "en": "Check payment"},
    # modes
    "ask_generate_prompt": {"ru": "🎨 Опишите, что нарисовать (до {max} символов). {price}",
                            "en": "🎨 Describe what to draw (up to {max} characters). {price}"},
    "ask_ratio": {"ru": "Выберите формат изображения:", "en": "Choose the image format:"},
    "ask_edit_photo": {"ru": "✏️ Отправьте фото, которое нужно отредактировать. {price}",
                       "en": "✏️ Send the photo to edit. {price}"},
    "ask_edit_instruction": {"ru": "✍️ Что изменить на фото? Опишите одним сообщением.",
                             "en": "✍️ What should change in the photo? Describe it in one message."},
    "ask_merge_photos": {"ru": "🔗 Отправьте от 2 до 4 фото — альбомом или по одному. {price}",
                         "en": "🔗 Send 2 to 4 photos — as an album or one by one. {price}"},
    "merge_need_more": {"ru": "📷 Фото получено ({count}). Нужно ещё хотя бы одно.",
                        "en": "📷 Photo received ({count}). At least one more is needed."},
    "merge_photo_added": {"ru": "📷 Фото получено ({count} из {max}). Отправьте ещё или нажмите «✅ Готово».",
                          "en": "📷 Photo received ({count} of {max}). Send more or tap “✅ Done”."},
    "too_many_photos": {"ru": "⚠️ В этом режиме можно не больше {limit} фото. Это фото не добавлено.",
                        "en": "⚠️ This mode takes at most {limit} photos. This photo was not added."},
    "ask_merge_instruction": {"ru": "✍️ Что сделать из этих фото? Опишите одним сообщением.",
                              "en": "✍️ What should be made of these photos? Describe it in one message."},
    "face_swap_consent": {
        "ru": "🔄 Замена лица. Загружайте только свои фото или фото людей, которые на это согласились. "
              "Не используйте результат, чтобы выдавать себя за другого человека или вводить в заблуждение.",
        "en": "🔄 Face swap. Upload only your own photos or photos of people who agreed to it. "
              "Do not use the result to impersonate anyone or to mislead.",
    },
    "ask_face_photo": {"ru": "🔄 Отправьте фото лица, которое нужно перенести. {price}",
                       "en": "🔄 Send a photo of the face to transfer. {price}"},
    "ask_target_photo": {"ru": "📷 Теперь отправьте фото, на которое поставить это лицо.",
                         "en": "📷 Now send the photo to put this face on."},
    "ask_retouch_photo": {"ru": "✨ Отправьте портрет для ретуши. {price}", "en": "✨ Send a portrait to retouch. {price}"},
    "ask_upscale_photo": {"ru": "⬆️ Отправьте фото, которое нужно улучшить. {price}",
                          "en": "⬆️ Send the photo to upscale. {price}"},
    "ask_add_text_photo": {"ru": "📝 Отправьте фото, на которое добавить надпись. {price}",
                           "en": "📝 Send the photo to put a caption on. {price}"},
    "ask_add_text_text": {"ru": "✍️ Какой текст написать? (до 200 символов)",
                          "en": "✍️ What text should I write? (up to 200 characters)"},
    "ask_position": {"ru": "Где разместить текст?", "en": "Where should the text go?"},
    "ask_color": {"ru": "Какого цвета текст?", "en": "What colour should the text be?"},
    "add_text_done": {"ru": "📝 Готово! Это бесплатно.", "en": "📝 Done! This was free."},
    "job_queued": {"ru": "⏳ В очереди ({position})", "en": "⏳ Queued ({position})"},
    "job_cancelled": {"ru": "✖ Задача отменена. Кредиты не списаны.", "en": "✖ Job cancelled. No credits were charged."},
    "job_cancelled_short": {"ru": "Задача отменена", "en": "Job cancelled"},
    "job_not_cancellable": {"ru": "Эту задачу уже нельзя отменить: она выполняется или завершена.",
                            "en": "This job can no longer be cancelled: it is running or finished."},
    "insufficient_credits": {"ru": "Недостаточно кредитов: операция стоит {price}, на балансе {balance}. "
                                   "Нажмите «Пополнить и продолжить» — после оплаты задача запустится сама, ничего не нужно отправлять заново 👇",
                             "en": "Not enough credits: the operation costs {price}, your balance is {balance}. "
                                   "Tap “Top up and continue”: once paid, the job starts by itself, nothing to send again 👇"},
    "btn_topup_continue": {"ru": "💰 Пополнить и продолжить", "en": "💰 Top up and continue"},
    "btn_retry": {"ru": "🔁 Повторить", "en": "🔁 Retry"},
    "btn_change_prompt": {"ru": "✏️ Изменить запрос", "en": "✏️ Change the request"},
    "draft_kept": {"ru": "Ваши фото и запрос сохранены — нажмите «Повторить», когда будете готовы.",
                   "en": "Your photos and request are kept: press “Retry” when ready."},
    "draft_still_short": {"ru": "💳 Оплата зачислена, но для задачи всё ещё не хватает: она стоит {price}, "
                                "на балансе {balance}. Запрос сохранён.",
                          "en": "💳 The payment is credited, but the job still needs more: it costs {price}, "
                                "your balance is {balance}. Your request is kept."},
    "draft_resumed": {"ru": "▶️ Запускаю вашу задачу.", "en": "▶️ Starting your job."},
    "draft_topup_note": {"ru": "▶️ После оплаты задача запустится сама.",
                         "en": "▶️ Once paid, your job starts by itself."},
    "ask_new_prompt": {"ru": "✏️ Напишите новый запрос — фото те же.", "en": "✏️ Write a new request; the photos stay."},
    "ask_new_generate_prompt": {"ru": "✏️ Напишите новое описание.", "en": "✏️ Write a new description."},
    "too_many_jobs": {"ru": "⏳ У вас уже {limit} задачи в работе. Дождитесь результата и попробуйте снова.",
                      "en": "⏳ You already have {limit} jobs in progress. Wait for a result and try again."},
    "invalid_prompt_empty": {"ru": "✍️ Описание пустое. Напишите, что нужно сделать.",
                             "en": "✍️ The description is empty. Write what should be done."},
    "invalid_prompt_too_long": {"ru": "✍️ Слишком длинное описание: не больше {limit} символов. Сократите и отправьте снова.",
                                "en": "✍️ The description is too long: {limit} characters at most. Shorten it and send again."},
    "invalid_not_an_image": {"ru": "⚠️ Это не изображение. Отправьте фото или файл JPEG, PNG или WEBP.",
                             "en": "⚠️ This is not an image. Send a photo or a JPEG, PNG or WEBP file."},
    "invalid_unsupported_format": {"ru": "⚠️ Этот формат не подходит: нужен JPEG, PNG или WEBP.",
                                   "en": "⚠️ This format is not supported: JPEG, PNG or WEBP is needed."},
    "invalid_image_too_big": {"ru": "⚠️ Файл слишком большой: Telegram даёт ботам скачивать файлы до {limit} МБ. "
                                    "Отправьте фото поменьше.",
                              "en": "⚠️ The file is too big: Telegram lets bots download files up to {limit} MB. "
                                    "Please send a smaller one."},
    "invalid_image_too_small": {"ru": "⚠️ Изображение слишком маленькое: нужно хотя бы {limit:pixel} по короткой стороне.",
                                "en": "⚠️ The picture is too small: at least {limit:pixel} on the short side."},
    "invalid_image_too_many_pixels": {"ru": "⚠️ Изображение слишком большое: не больше {limit} мегапикселей. "
                                            "Уменьшите его и отправьте снова.",
                                      "en": "⚠️ The picture is too large: {limit} megapixels at most. "
                                            "Please make it smaller and send it again."},
    "album_first_photo_used": {"ru": "ℹ️ Из альбома взято первое фото — этот режим работает с одним.",
                               "en": "ℹ️ The first photo of the album is used: this mode takes one."},
    "album_extra_dropped": {"ru": "Лишние фото не взяты: {count}.", "en": "Extra photos not taken: {count}."},
    "invalid_too_many_images": {"ru": "⚠️ Слишком много фото для этого режима (не больше {limit}).",
                                "en": "⚠️ Too many photos for this mode ({limit} at most)."},
    "invalid_too_few_images": {"ru": "⚠️ Не хватает фото для этого режима (нужно хотя бы {limit}).",
                               "en": "⚠️ Not enough photos for this mode (at least {limit})."},
    "invalid_text_empty": {"ru": "✍️ Текст пустой. Напишите, что добавить на фото.",
                           "en": "✍️ The text is empty. Write what to put on the photo."},
    "invalid_text_too_long": {"ru": "✍️ Слишком длинный текст: не больше {limit} символов.",
                              "en": "✍️ The text is too long: {limit} characters at most."},
    "cmd_start": {"ru": "Главное меню", "en": "Main menu"},
    "cmd_help": {"ru": "Что умеет бот и цены", "en": "What the bot does and prices"},
    "cmd_balance": {"ru": "Баланс и пополнение", "en": "Balance and top-up"},
    "cmd_cancel": {"ru": "Отменить текущий шаг", "en": "Cancel the current step"},
    "cmd_paysupport": {"ru": "Вопросы по оплате", "en": "Payment questions"},
    "cmd_terms": {"ru": "Условия и конфиденциальность", "en": "Terms and privacy"},
    "cmd_history": {"ru": "Последние результаты", "en": "Latest results"},
    "btn_use_edit": {"ru": "✏️ Изменить это", "en": "✏️ Edit this"},
    "btn_use_upscale": {"ru": "⬆️ Улучшить это", "en": "⬆️ Upscale this"},
    "btn_use_add_text": {"ru": "📝 Добавить текст", "en": "📝 Add text"},
    "history_title": {"ru": "🗂 Последние результаты:", "en": "🗂 Latest results:"},
    "history_empty": {"ru": "🗂 Здесь появятся ваши результаты. Выберите режим в меню.",
                      "en": "🗂 Your results will appear here. Choose a mode in the menu."},
    "history_line": {"ru": "{n}. {mode} — {date} — {cost}", "en": "{n}. {mode} — {date} — {cost}"},
    "history_cost_credits": {"ru": "{cost} кр.", "en": "{cost} cr."},
    "history_cost_free": {"ru": "бесплатно", "en": "free"},
    "btn_history_send": {"ru": "📤 {n}", "en": "📤 {n}"},
    "btn_history_rerun": {"ru": "🔁 {n}", "en": "🔁 {n}"},
    "history_hint": {"ru": "📤 — прислать снова (с действиями), 🔁 — сделать ещё раз.",
                     "en": "📤 — send again (with actions), 🔁 — make it again."},
    "history_resent": {"ru": "{mode} — {date}", "en": "{mode} — {date}"},
    # admin
    "yes": {"ru": "да", "en": "yes"},
    "no": {"ru": "нет", "en": "no"},
    "forever": {"ru": "бессрочно", "en": "no end date"},
    "admin_stats": {
        "ru": "📊 Статистика\nПользователи: {users} (новых за 24 ч: {new_24h}, активных за 24 ч: {active_24h})\n"
              "Генерации: {generations_total}, неудачных за 24 ч: {failed_24h} (всего {failed_total})\n"
              "По дням:\n{per_day_text}\nПо режимам:\n{per_mode_text}\n"
              "Оплат: {payments_succeeded}, выручка: {revenue} ₽\n"
              "Платящих: {paying_users}, конверсия в оплату: {conversion_percent}%\n"
              "За сутки: выручка {revenue_day} ₽, платящих {paying_day}, конверсия активных {conversion_day_percent}%\n"
              "За неделю: выручка {revenue_week} ₽, платящих {paying_week}, конверсия активных {conversion_week_percent}%",
        "en": "📊 Statistics\nUsers: {users} (new in 24 h: {new_24h}, active in 24 h: {active_24h})\n"
              "Generations: {generations_total}, failed in 24 h: {failed_24h} ({failed_total} in all)\n"
              "Per day:\n{per_day_text}\nPer mode:\n{per_mode_text}\n"
              "Payments: {payments_succeeded}, revenue: {revenue} ₽\n"
              "Paying users: {paying_users}, conversion to payment: {conversion_percent}%\n"
              "Last day: revenue {revenue_day} ₽, paying {paying_day}, conversion of active users {conversion_day_percent}%\n"
              "Last week: revenue {revenue_week} ₽, paying {paying_week}, conversion of active users {conversion_week_percent}%",
    },
    "admin_user": {
        "ru": "👤 {telegram_id} (id {id}) @{username} {first_name}\nСоздан: {created}, был: {last_seen}\n"
              "Заблокирован: {blocked}, бесплатный доступ: {free_access}\n"
              "Кредиты: {credits} (в резерве {reserved}), бесплатных операций: {free_ops}\n"
              "Генераций: {generations}, оплат: {payments}",
        "en": "👤 {telegram_id} (id {id}) @{username} {first_name}\nCreated: {created}, last seen: {last_seen}\n"
              "Blocked: {blocked}, free access: {free_access}\n"
              "Credits: {credits} ({reserved} held), free operations: {free_ops}\n"
              "Generations: {generations}, payments: {payments}",
    },
    "admin_no_user": {"ru": "Пользователь {telegram_id} не найден.", "en": "User {telegram_id} not found."},
    "admin_granted": {"ru": "✅ Начислено {credits} кредитов пользователю {telegram_id}. Баланс: {balance}.",
                      "en": "✅ Granted {credits} credits to user {telegram_id}. Balance: {balance}."},
    "admin_free_access": {"ru": "✅ Бесплатный доступ для {telegram_id}: {until}.",
                          "en": "✅ Free access for {telegram_id}: {until}."},
    "admin_blocked": {"ru": "⛔ Пользователь {telegram_id} заблокирован.", "en": "⛔ User {telegram_id} is blocked."},
    "admin_unblocked": {"ru": "✅ Пользователь {telegram_id} разблокирован.", "en": "✅ User {telegram_id} is unblocked."},
    "admin_promo_added": {"ru": "✅ Промокод {code} создан.", "en": "✅ Promo code {code} created."},
    "admin_promo_list": {"ru": "🎟️ Промокоды (код — что даёт, использовано/лимит, в ожидании оплаты, до):\n{codes}",
                         "en": "🎟️ Promo codes (code — what it gives, used/limit, held by unpaid orders, until):\n{codes}"},
    "promo_list_line": {"ru": "{code} — {what}, {limit}, ожидают {reserved}, до {until}{state}",
                        "en": "{code} — {what}, {limit}, held {reserved}, until {until}{state}"},
    "promo_cap": {"ru": " (не больше {cap} ₽)", "en": " (at most {cap} ₽)"},
    "promo_kind_free_days": {"ru": "бесплатный доступ на {days} дн.", "en": "free access for {days} days"},
    "promo_kind_free_unlimited": {"ru": "⚠️ БЕССРОЧНЫЙ бесплатный доступ без лимита",
                                  "en": "⚠️ UNLIMITED free access, no end date"},
    "promo_off_mark": {"ru": " (выключен)", "en": " (off)"},
    "admin_promo_exists": {"ru": "⚠️ Промокод {code} уже существует. /promo_list покажет его.",
                           "en": "⚠️ Promo code {code} already exists. See /promo_list."},
    "admin_promo_unknown": {"ru": "⚠️ Промокода {code} нет.", "en": "⚠️ There is no promo code {code}."},
    "admin_promo_on": {"ru": "✅ Промокод {code} включён.", "en": "✅ Promo code {code} is on."},
    "admin_promo_off": {"ru": "⏸ Промокод {code} выключен: новые заказы с ним не принимаются.",
                        "en": "⏸ Promo code {code} is off: no new orders take it."},
    "admin_broadcast_started": {"ru": "📣 Рассылка запущена. Отчёт придёт, когда она закончится.",
                                "en": "📣 Broadcast started. You will get a report when it is done."},
    "admin_broadcast_done": {"ru": "📣 Рассылка завершена: отправлено {sent}, не доставлено {failed}.",
                             "en": "📣 Broadcast finished: {sent} sent, {failed} failed."},
    "admin_user_ledger": {"ru": "Последние операции (вид, актив, Δ доступно → после, Δ резерв → после, ссылка):\n{lines}",
                          "en": "Latest ledger lines (kind, asset, Δ available → after, Δ held → after, reference):\n{lines}"},
    "admin_payments": {"ru": "💳 Платежи {telegram_id} (дата, id в YooKassa — сумма, кредиты, статус):\n{lines}",
                       "en": "💳 Payments of {telegram_id} (date, YooKassa id — amount, credits, status):\n{lines}"},
    "admin_payment_refunded": {"ru": ", возвращено {amount} ₽", "en": ", refunded {amount} ₽"},
    "admin_jobs_failed": {"ru": "❌ Последние неудачные генерации (время, id, режим, пользователь: класс ошибки — текст):\n{lines}",
                          "en": "❌ Latest failed generations (time, id, mode, user: error class — text):\n{lines}"},
    "admin_refund_done": {"ru": "↩️ Возврат {refund_id} на {amount} ₽ проведён: списано {credits} кредитов "
                                "(не хватило {shortfall}).",
                          "en": "↩️ Refund {refund_id} of {amount} ₽ succeeded: {credits} credits taken back "
                                "({shortfall} short)."},
    "admin_refund_pending": {"ru": "↩️ Возврат {refund_id} на {amount} ₽ создан, статус {status}: кредиты спишутся "
                                   "по уведомлению refund.succeeded.",
                             "en": "↩️ Refund {refund_id} of {amount} ₽ created, status {status}: the credits are "
                                   "taken back on the refund.succeeded notification."},
    "admin_refund_failed": {"ru": "⚠️ Возврат не выполнен: {reason}", "en": "⚠️ Refund failed: {reason}"},
    "admin_usage_payments": {"ru": "Использование: /payments <telegram id>", "en": "Usage: /payments <telegram id>"},
    "admin_usage_jobs": {"ru": "Использование: /jobs failed", "en": "Usage: /jobs failed"},
    "admin_usage_settle": {"ru": "Использование: /settle <id заказа, платежа YooKassa или charge id> credit|cancel",
                           "en": "Usage: /settle <order, YooKassa payment or charge id> credit|cancel"},
    "admin_settle_done": {"ru": "✅ Заказ {order}: теперь {status} (кредитов в заказе: {credits}).",
                          "en": "✅ Order {order} is now {status} ({credits} credits in the order)."},
    "admin_settle_no_provider": {
        "ru": "⚠️ Этот заказ не дошёл до платёжной системы — оплаты по нему не было; закройте его: cancel.",
        "en": "⚠️ This order never reached a payment provider — nothing was paid for it; close it with cancel."},
    "admin_settle_unknown": {"ru": "⚠️ Заказ {reference} не найден.", "en": "⚠️ No order {reference}."},
    "admin_settle_not_needed": {
        "ru": "⚠️ Этот заказ не требует внимания (статус: {status}); вручную закрываются только такие.",
        "en": "⚠️ This order does not need attention (status: {status}); only those are settled by hand."},
    "admin_usage_refund": {"ru": "Использование: /refund <id платежа YooKassa> [сумма ₽] или /refund <charge id "
                                 "Stars или id заказа Stars> (звёзды возвращаются целиком)",
                           "en": "Usage: /refund <YooKassa payment id> [amount ₽] or /refund <Stars charge id or "
                                 "Stars order id> (Stars are refunded whole)"},
    "admin_usage_stats": {"ru": "Использование: /stats", "en": "Usage: /stats"},
    "admin_usage_user": {"ru": "Использование: /user <telegram id>", "en": "Usage: /user <telegram id>"},
    "admin_usage_grant": {"ru": "Использование: /grant <telegram id> <кредиты> <причина>",
                          "en": "Usage: /grant <telegram id> <credits> <reason>"},
    "admin_usage_free_access": {"ru": "Использование: /free_access <telegram id> [дни]",
                                "en": "Usage: /free_access <telegram id> [days]"},
    "admin_usage_block": {"ru": "Использование: /block <telegram id>", "en": "Usage: /block <telegram id>"},
    "admin_usage_unblock": {"ru": "Использование: /unblock <telegram id>", "en": "Usage: /unblock <telegram id>"},
    "admin_usage_promo_add": {
        "ru": "Использование:\n"
              "/promo_add КОД <процент 1–99> [uses=лимит] [valid=дни действия] [max=скидка не больше, ₽]\n"
              "/promo_add КОД free_access days=дни uses=лимит [valid=дни действия]\n"
              "Бессрочный бесплатный доступ без лимита — только явно: /promo_add КОД free_access unlimited",
        "en": "Usage:\n"
              "/promo_add CODE <percent 1–99> [uses=limit] [valid=days the code lasts] [max=cap in ₽]\n"
              "/promo_add CODE free_access days=days uses=limit [valid=days the code lasts]\n"
              "Unlimited never-ending free access only explicitly: /promo_add CODE free_access unlimited",
    },
    "admin_usage_promo_off": {"ru": "Использование: /promo_off КОД", "en": "Usage: /promo_off CODE"},
    "admin_usage_promo_on": {"ru": "Использование: /promo_on КОД", "en": "Usage: /promo_on CODE"},
    "admin_usage_promo_list": {"ru": "Использование: /promo_list", "en": "Usage: /promo_list"},
    "admin_usage_broadcast": {"ru": "Использование: /broadcast [ru|en] <текст>", "en": "Usage: /broadcast [ru|en] <text>"},
    "admin_broadcast_preview": {"ru": "📣 Предпросмотр рассылки ({audience}, получателей: {count}):\n\n{text}",
                                "en": "📣 Broadcast preview ({audience}, recipients: {count}):\n\n{text}"},
    "admin_broadcast_all": {"ru": "все языки", "en": "all languages"},
    "btn_broadcast_send": {"ru": "✅ Отправить", "en": "✅ Send"},
    # --- worker (owned by worker.py) ------------------------------------------------------
    "admin_report_mismatch": {
        "ru": "⚠️ Сверка платежей за {day}: учёт бота и YooKassa расходятся.\nПополнения: {topups}\nВозвраты: {refunds}",
        "en": "⚠️ Payment reconciliation for {day}: the bot's ledger and YooKassa disagree.\nTop-ups: {topups}\nRefunds: {refunds}",
    },
    "alert_fal_auth": {
        "ru": "🚨 Fal ответил {status}: проверьте FAL_KEY и баланс аккаунта Fal. Генерации не работают.\n{detail}",
        "en": "🚨 Fal answered {status}: check FAL_KEY and the Fal account balance. Generations are failing.\n{detail}",
    },
    "alert_webhook_failing": {
        "ru": "🚨 Уведомления YooKassa не проходят проверку: {count} подряд (чужой адрес, API не ответил "
              "или объект не совпал). Платежи догонит сверка; проверьте логи web.",
        "en": "🚨 YooKassa notifications fail verification: {count} in a row (untrusted address, the API did "
              "not answer or the object did not match). Reconciliation catches payments up; check the web logs.",
    },
    "alert_task_stale": {
        "ru": "🚨 Периодическая задача {task} не запускалась {minutes} мин. Проверьте worker.",
        "en": "🚨 The periodic task {task} has not run for {minutes} min. Check the worker.",
    },
    "alert_bot_stale": {
        "ru": "🚨 Бот не подаёт признаков жизни {minutes} мин. Проверьте процесс bot.",
        "en": "🚨 The bot has shown no sign of life for {minutes} min. Check the bot process.",
    },
    "alert_disk_low": {
        "ru": "🚨 Мало места на диске с данными: {free} МБ свободно (порог {limit} МБ).",
        "en": "🚨 The data disk is nearly full: {free} MB free (threshold {limit} MB).",
    },
    "job_running": {
        "ru": "🎨 Генерирую…",
        "en": "🎨 Generating…",
    },
    "notify_payment_canceled": {"ru": "✖ Платёж на {amount} ₽ ({credits} кредитов) отменён. Деньги не списаны, баланс не изменился.",
                                "en": "✖ The payment of {amount} ₽ ({credits} credits) was canceled. Nothing was charged; "
                                      "your balance is unchanged."},
    "notify_referral_bonus": {"ru": "🤝 Ваш приглашённый друг пополнил баланс — вам начислено {credits} кредитов. "
                                     "Баланс: {balance}.",
                               "en": "🤝 A friend you invited topped up: you got {credits} credits. Balance: {balance}."},
    "referral_line": {"ru": "🤝 Пригласите друга: {bonus} кредитов вам после его первого пополнения.\n{link}",
                      "en": "🤝 Invite a friend: {bonus} credits for you after their first top-up.\n{link}"},
    "notify_grant": {"ru": "🎁 Администратор начислил вам {credits} кредитов. Баланс: {balance}.",
                     "en": "🎁 The administrator granted you {credits} credits. Balance: {balance}."},
    "notify_free_access": {"ru": "♾ Вам включён бесплатный доступ до {until}.",
                           "en": "♾ Free access is on for you until {until}."},
    "notify_free_access_forever": {"ru": "♾ Вам включён бесплатный доступ без ограничения срока.",
                                   "en": "♾ Free access is on for you, with no end date."},
    "notify_free_access_ending": {"ru": "⏰ Бесплатный доступ закончится {until}. Дальше операции оплачиваются "
                                        "кредитами: /balance",
                                  "en": "⏰ Your free access ends {until}. After that operations are paid with "
                                        "credits: /balance"},
    "job_started": {"ru": "▶️ В работе…", "en": "▶️ In progress…"},
    "job_elapsed": {"ru": "(ждём {time})", "en": "(waiting {time})"},
    "job_fal_queue": {"ru": "⏳ В очереди у модели: {position}-й", "en": "⏳ In the model's queue: number {position}"},
    "job_retrying": {"ru": "🔁 Повторная попытка ({attempt}/{total})…", "en": "🔁 Retrying ({attempt}/{total})…"},
    "job_working_generate": {"ru": "🎨 Генерирую…", "en": "🎨 Generating…"},
    "job_working_edit": {"ru": "✏️ Редактирую…", "en": "✏️ Editing…"},
    "job_working_merge": {"ru": "🔗 Объединяю…", "en": "🔗 Merging…"},
    "job_working_face_swap": {"ru": "🔄 Меняю лицо…", "en": "🔄 Swapping the face…"},
    "job_working_retouch": {"ru": "✨ Ретуширую…", "en": "✨ Retouching…"},
    "job_working_upscale": {"ru": "⬆️ Улучшаю…", "en": "⬆️ Upscaling…"},
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
    "notify_refund": {
        "ru": "↩️ Возврат {amount} ₽ оформлен. Списано {credits} кредитов. Баланс: {balance} кредитов.",
        "en": "↩️ A refund of {amount} ₽ was made. {credits} credits were taken back. Balance: {balance} credits.",
    },
    "admin_alert_needs_attention": {
        "ru": "⚠️ Платёж требует внимания: заказ {order}, YooKassa {yookassa}: {problem}\n"
              "Проверьте его в кабинете ЮKassa, затем: /settle {order} credit (деньги пришли) или "
              "/settle {order} cancel (не пришли).",
        "en": "⚠️ A payment needs attention: order {order}, YooKassa {yookassa}: {problem}\n"
              "Check it in the YooKassa cabinet, then: /settle {order} credit (the money arrived) or "
              "/settle {order} cancel (it did not).",
    },
    "admin_alert_yookassa_auth": {
        "ru": "⚠️ YooKassa отклоняет наши ключи (401/403): проверьте YOOKASSA_SHOP_ID и YOOKASSA_SECRET_KEY. "
              "Уведомления о платежах не подтверждаются, YooKassa будет присылать их повторно.",
        "en": "⚠️ YooKassa refuses our keys (401/403): check YOOKASSA_SHOP_ID and YOOKASSA_SECRET_KEY. "
              "Payment notifications cannot be verified; YooKassa will deliver them again.",
    },
    # --- payments / promo (owned by payments.py, promo.py via bot.py) -----------------------
    "promo_active": {"ru": "🎟️ Промокод {code}: скидка {percent}% на следующее пополнение.",
                     "en": "🎟️ Promo code {code}: {percent}% off your next top-up."},
    "ask_promo": {"ru": "🎟️ Введите промокод:", "en": "🎟️ Enter a promo code:"},
    "free_access_granted": {"ru": "🎉 Промокод принят: бесплатный доступ включён!",
                            "en": "🎉 Code accepted: free access is on!"},
    "ask_amount": {"ru": "Введите сумму пополнения целым числом рублей (от {min} до {max}):",
                   "en": "Enter the top-up amount as a whole number of rubles ({min} to {max}):"},
    "topup_created": {"ru": "Пополнение на {credits} кредитов. К оплате: {amount} ₽",
                      "en": "Top-up of {credits} credits. To pay: {amount} ₽"},
    "topup_discount": {"ru": "🎟️ Скидка {percent}% по промокоду.", "en": "🎟️ {percent}% off with the promo code."},
    "payment_received": {"ru": "✅ Оплата получена! Начислено {credits} кредитов.",
                         "en": "✅ Payment received! {credits} credits added."},
    "payment_already_credited": {"ru": "✅ Эта оплата уже зачислена ({credits} кредитов).",
                                 "en": "✅ This payment has already been credited ({credits} credits)."},
    "promo_error": {
        "ru": "🎟️ Этот промокод сейчас нельзя использовать.",
        "en": "🎟️ This promo code cannot be used right now.",
    },
    "storage_full": {
        "ru": "⚠️ Сервис временно не может сохранить данные. Ничего не списано — попробуйте чуть позже.",
        "en": "⚠️ The service cannot save data right now. Nothing was charged — please try again a bit later.",
    },
    "promo_exists": {
        "ru": "🎟️ Такой промокод уже есть.",
        "en": "🎟️ This promo code already exists.",
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
    "payments_not_configured_contact": {
        "ru": "💳 Оплата пока не подключена. Напишите в поддержку: {contact}",
        "en": "💳 Payments are not set up yet. Please contact support: {contact}",
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
    # --- Telegram Stars (stars.py via bot.py, worker.py) -------------------------------------
    "btn_stars": {"ru": "⭐ Telegram Stars", "en": "⭐ Telegram Stars"},
    "btn_stars_amount": {"ru": "{credits} кредитов — {stars} ⭐", "en": "{credits} credits — {stars} ⭐"},
    "stars_title": {
        "ru": "⭐ Оплата звёздами Telegram (Stars): {rate} ⭐ за 100 кредитов.\n"
              "Промокоды и скидки к оплате звёздами не применяются.\nВыберите сумму пополнения:",
        "en": "⭐ Pay with Telegram Stars: {rate} ⭐ per 100 credits.\n"
              "Promo codes and discounts do not apply to Stars.\nChoose a top-up amount:",
    },
    "stars_invoice_title": {"ru": "Media Lab: {credits} кредитов", "en": "Media Lab: {credits} credits"},
    "stars_invoice_description": {
        "ru": "Пополнение баланса Media Lab на {credits} кредитов (1 кредит = 1 ₽). Промокоды к оплате "
              "звёздами не применяются.",
        "en": "A Media Lab top-up of {credits} credits (1 credit = 1 ₽). Promo codes do not apply to Stars.",
    },
    "stars_price_label": {"ru": "{credits} кредитов", "en": "{credits} credits"},
    "stars_precheckout_unknown": {
        "ru": "Заказ не найден. Откройте «Баланс» и выставите новый счёт.",
        "en": "Order not found. Open “Balance” and create a new invoice.",
    },
    "stars_precheckout_not_pending": {
        "ru": "Этот счёт уже оплачен или устарел. Откройте «Баланс» и выставите новый.",
        "en": "This invoice is already paid or has expired. Open “Balance” and create a new one.",
    },
    "stars_precheckout_mismatch": {
        "ru": "Сумма счёта не совпадает с заказом. Откройте «Баланс» и выставите новый счёт.",
        "en": "The invoice does not match the order. Open “Balance” and create a new invoice.",
    },
    "stars_precheckout_error": {
        "ru": "Не удалось проверить заказ. Попробуйте ещё раз через минуту.",
        "en": "Could not check the order. Please try again in a minute.",
    },
    "stars_not_enabled": {"ru": "⭐ Оплата звёздами сейчас отключена.", "en": "⭐ Paying with Stars is switched off."},
    "help_stars": {
        "ru": "⭐ Пополнить баланс можно и звёздами Telegram: {rate} ⭐ за 100 кредитов. Промокоды к оплате "
              "звёздами не применяются.",
        "en": "⭐ You can also top up with Telegram Stars: {rate} ⭐ per 100 credits. Promo codes do not apply "
              "to Stars.",
    },
    "notify_refund_stars": {
        "ru": "↩️ Возврат {stars} ⭐ оформлен. Списано {credits} кредитов. Баланс: {balance} кредитов.",
        "en": "↩️ A refund of {stars} ⭐ was made. {credits} credits were taken back. Balance: {balance} credits.",
    },
    "admin_alert_stars": {"ru": "⚠️ Telegram Stars: {problem}", "en": "⚠️ Telegram Stars: {problem}"},
    "notify_stars_mismatch": {
        "ru": "⚠️ Оплата звёздами получена, но не совпала с заказом. Мы проверим её вручную: кредиты будут "
              "зачислены или звёзды вернутся. Вопросы — /paysupport.",
        "en": "⚠️ Your Stars payment arrived but does not match the order. We will check it by hand: the credits "
              "will be added or the Stars returned. Questions: /paysupport."},
    "admin_refund_stars_done": {
        "ru": "↩️ Возврат звёзд {charge} ({stars} ⭐) проведён: списано {credits} кредитов, не хватило {shortfall}.",
        "en": "↩️ Stars refund {charge} ({stars} ⭐) done: {credits} credits taken back, {shortfall} short.",
    },
    "admin_refund_stars_whole": {
        "ru": "⭐ Звёзды возвращаются только целиком: /refund <id заказа или charge id> без суммы.",
        "en": "⭐ Stars are refunded whole only: /refund <order id or charge id> without an amount.",
    },
}


LANGS = ("ru", "en")


def lang_of(language_code: str | None) -> str:
    """Return "en" for Telegram language codes starting with "en", else "ru"."""
    return "en" if (language_code or "").lower().startswith("en") else "ru"


PLURALS = {   # unit -> (ru: one, few, many), (en: one, other)
    "pixel": (("пиксель", "пикселя", "пикселей"), ("pixel", "pixels")),
    "credit": (("кредит", "кредита", "кредитов"), ("credit", "credits")),
    "photo": (("фото", "фото", "фото"), ("photo", "photos")),
}


def plural(count: int, unit: str, lang: str = "ru") -> str:
    """``"64 пикселя"``, ``"1 кредит"``, ``"5 кредитов"``; ``"1 pixel"``, ``"64 pixels"``."""
    ru, en = PLURALS[unit]
    n = abs(int(count))
    if lang == "en":
        return "%d %s" % (count, en[0] if n == 1 else en[1])
    if n % 10 == 1 and n % 100 != 11:
        form = ru[0]
    elif 2 <= n % 10 <= 4 and not 12 <= n % 100 <= 14:
        form = ru[1]
    else:
        form = ru[2]
    return "%d %s" % (count, form)


def t(key: str, lang: str = "ru", **values) -> str:
    """Return text `key` in `lang` ("ru" or "en"), formatted with `values`; a field
    ``{name:unit}`` (`unit` a key of PLURALS) writes the count with its noun in `lang`'s plural.

    Raises KeyError for an unknown key (a test checks every key has both languages).
    """
    entry = TEXTS[key]
    text = entry.get(lang) or entry["ru"]
    return _Formatter(lang).format(text, **values) if values else text


class _Formatter(string.Formatter):
    """`str.format`, plus a unit of PLURALS as the format spec: ``"{limit:pixel}"`` with limit=64
    gives ``"64 пикселя"`` / ``"64 pixels"`` (a value that is not an int is written as it is)."""

    def __init__(self, lang: str):
        self.lang = lang

    def format_field(self, value, format_spec):
        if format_spec in PLURALS:
            return plural(value, format_spec, self.lang) if isinstance(value, int) else str(value)
        return super().format_field(value, format_spec)
