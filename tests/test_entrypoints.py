"""The three processes, started as the Makefile and systemd start them, refuse a bad
configuration or an unmigrated database with a clear message instead of a traceback.

Exit codes (startup.py): 78 (EX_CONFIG, systemd RestartPreventExitStatus=78) from the bot, the
consumer, manage.py and the gunicorn master under deploy/gunicorn.conf.py; 3 from a bare
`gunicorn web:app`, whose workers must use gunicorn's WORKER_BOOT_ERROR to halt the master."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

COMMANDS = {
    "bot": [sys.executable, os.path.join(ROOT, "bot.py")],
    "web": [os.path.join(BIN, "gunicorn"), "-b", "127.0.0.1:0", "web:app"],
    "web-conf": [os.path.join(BIN, "gunicorn"), "-c", os.path.join(ROOT, "deploy", "gunicorn.conf.py"), "web:app"],
    "worker": [os.path.join(BIN, "huey_consumer"), "worker.huey"],
    "manage": [sys.executable, os.path.join(ROOT, "manage.py"), "seed-promo"],
    "check": [sys.executable, os.path.join(ROOT, "manage.py"), "check"],       # what `make run` runs first
}
EXIT = {"bot": 78, "web": 3, "web-conf": 78, "worker": 78, "manage": 78, "check": 78}    # 3: gunicorn's WORKER_BOOT_ERROR


def start(name, tmp_path, **env):
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("TELEGRAM_", "YOOKASSA_", "FAL_", "DATABASE_URL", "QUEUE_URL"))}
    base.update({"DATABASE_URL": "sqlite:///%s" % (tmp_path / "blank.db"),
                 "QUEUE_URL": "sqlite:///%s" % (tmp_path / "queue.db"),
                 "TELEGRAM_BOT_TOKEN": "123456:TEST-TOKEN", "TELEGRAM_API_URL": "http://127.0.0.1:9",
                 "WEB_BIND": "127.0.0.1:0",
                 "ENV_FILE": os.devnull})             # a developer's .env must not leak in
    base.update(env)
    base = {k: v for k, v in base.items() if v is not None}
    out = subprocess.run(COMMANDS[name], cwd=str(tmp_path), env=dict(base, PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=60)
    return out.returncode, out.stdout + out.stderr


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_an_unmigrated_database_is_refused(name, tmp_path):
    code, output = start(name, tmp_path)
    assert code == EXIT[name], output[-2000:]
    assert "database is not migrated, pending: 0001_initial" in output
    assert "make migrate" in output


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_bad_configuration_is_refused_line_by_line(name, tmp_path):
    code, output = start(name, tmp_path, TELEGRAM_BOT_TOKEN=None, PRICE_PER_OPERATION="ten")
    assert code == EXIT[name], output[-2000:]
    if name != "manage":                      # operator commands need no token
        assert "TELEGRAM_BOT_TOKEN is not set" in output
    assert "PRICE_PER_OPERATION must be a whole number, got 'ten'" in output
    assert "Traceback" not in output


def test_the_check_before_make_run_says_ready_on_a_good_configuration(tmp_path):
    """`manage.py check` on a migrated database with a token: exit 0, "ready" (nothing reachable
    is needed for SQLite queues and without YooKassa keys)."""
    import models

    models.migrate(models.open_database("sqlite:///%s" % (tmp_path / "blank.db")))
    code, output = start("check", tmp_path)
    assert code == 0 and "ready:" in output, output[-2000:]
