"""Shared fixtures: configuration, a fresh migrated database per test, the fakes and the bot harness.

Plain helper functions live in tests/helpers.py; test modules import those, never each other.

The environment is set before any project module is imported, so module-level objects
(`worker.huey`, `web.app`) are built against test settings: an in-memory Huey queue and no
real Telegram, YooKassa or Fal. Each test gets its own SQLite file copied from a template
migrated once per session. PostgreSQL tests use TEST_POSTGRES_URL and are skipped, with the
reason shown, when it is not set.
"""
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TEST_ENV = {
    "TELEGRAM_BOT_TOKEN": "123456:TEST-TOKEN",
    "TELEGRAM_API_URL": "http://127.0.0.1:9",      # tests point it at a fake
    "DATABASE_URL": "sqlite:///data/test-unused.db",
    "QUEUE_URL": "memory://",
    "FAL_KEY": "",
    "FAL_QUEUE_URL": "http://127.0.0.1:9",
    "YOOKASSA_SHOP_ID": "123456",
    "YOOKASSA_SECRET_KEY": "test_secret",
    "YOOKASSA_API_URL": "http://127.0.0.1:9/v3",
    "YOOKASSA_RETURN_URL": "https://t.me/medialab_test_bot",
    "YOOKASSA_ALLOW_TEST": "1",
    "TRUSTED_PROXY_COUNT": "1",
    "ADMIN_IDS": "1000",
    "LOG_LEVEL": "DEBUG",
    "ENV_FILE": os.devnull,          # a developer's .env never leaks into the tests
}
for _name, _value in TEST_ENV.items():
    os.environ[_name] = _value

import config  # noqa: E402
import models  # noqa: E402
from tests.helpers import harness_for, postgres_url  # noqa: E402  (after the environment: it imports the project)

pytest_plugins = [
    name for name, path in (
        ("tests.fakes.telegram", "telegram.py"),
        ("tests.fakes.yookassa", "yookassa.py"),
        ("tests.fakes.fal", "fal.py"),
    ) if os.path.exists(os.path.join(ROOT, "tests", "fakes", path))
]


def make_config(**overrides) -> config.Config:
    """Return the test configuration with `overrides` (Config field names) applied."""
    cfg = config.load(dict(TEST_ENV))
    return cfg.replace(**overrides) if overrides else cfg


@pytest.fixture
def test_env() -> dict:
    """A copy of the test environment (for the subprocesses a test starts)."""
    return dict(TEST_ENV)


@pytest.fixture
def cfg():
    """The test configuration, installed as the process configuration."""
    previous = config._current
    installed = config.configure(make_config())
    yield installed
    config._current = previous


@pytest.fixture(scope="session")
def _template_db(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("template") / "template.db")
    database = models.open_database("sqlite:///" + path)
    models.migrate(database)
    database.close()
    return path


@pytest.fixture
def db_url(_template_db, tmp_path):
    """URL of a fresh, migrated SQLite database file for this test."""
    path = str(tmp_path / "medialab.db")
    shutil.copyfile(_template_db, path)
    return "sqlite:///" + path


@pytest.fixture
def database(cfg, db_url):
    """Bind the models to a fresh migrated SQLite database (and the config to it)."""
    config.configure(cfg.replace(database_url=db_url))
    database = models.init_db(db_url)
    yield database
    database.close()


@pytest.fixture
def pg_database(cfg):
    """Bind the models to a freshly migrated PostgreSQL schema (TEST_POSTGRES_URL)."""
    url = postgres_url()
    if not url:
        pytest.skip("TEST_POSTGRES_URL is not set: PostgreSQL tests skipped (CI sets it)")
    database = models.init_db(url)
    database.execute_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    models.migrate(database)
    config.configure(cfg.replace(database_url=url))
    yield database
    database.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database(request, cfg, db_url):
    """Run the test once on SQLite and once on PostgreSQL (skipped without TEST_POSTGRES_URL)."""
    if request.param == "sqlite":
        database = models.init_db(db_url)
        config.configure(cfg.replace(database_url=db_url))
    else:
        url = postgres_url()
        if not url:
            pytest.skip("TEST_POSTGRES_URL is not set: PostgreSQL tests skipped (CI sets it)")
        database = models.init_db(url)
        database.execute_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        models.migrate(database)
        config.configure(cfg.replace(database_url=url))
    yield database
    database.close()


@pytest.fixture
def app(database, fake_telegram, fake_fal):
    """The bot and the fakes, ready to play a user (`Harness` in tests/helpers.py)."""
    yield from harness_for(fake_telegram, fake_fal)
