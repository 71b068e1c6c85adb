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
    # --- payments / promo (owned by payments.py, promo.py via bot.py) -----------------------
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
