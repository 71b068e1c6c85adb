"""The text catalogue: every key in Russian and English with the same placeholders, and the
language choice from Telegram's language_code."""
import string

import pytest

import texts


def fields(text):
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


@pytest.mark.parametrize("key", sorted(texts.TEXTS))
def test_every_text_has_both_languages_with_the_same_placeholders(key):
    entry = texts.TEXTS[key]
    assert set(entry) == {"ru", "en"}, key
    assert entry["ru"].strip() and entry["en"].strip(), key
    assert fields(entry["ru"]) == fields(entry["en"]), key


@pytest.mark.parametrize("code, lang", [("en", "en"), ("en-GB", "en"), ("EN", "en"), ("ru", "ru"),
                                        ("uk", "ru"), (None, "ru"), ("", "ru")])
def test_language_from_telegram_code(code, lang):
    assert texts.lang_of(code) == lang


def test_an_unknown_key_fails_loudly():
    with pytest.raises(KeyError):
        texts.t("no_such_text")


def test_a_plural_field_takes_the_form_of_the_language():
    assert "хотя бы 64 пикселя по" in texts.t("invalid_image_too_small", "ru", limit=64)
    assert "at least 1 pixel on" in texts.t("invalid_image_too_small", "en", limit=1)
    assert "at least  on" in texts.t("invalid_image_too_small", "en", limit="")   # no limit known
