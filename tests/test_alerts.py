"""Admin alerts sent by the worker (fake Telegram): deduplicated per condition, Fal refusing our key
(fake Fal answering 401), the watchdog's checks, and quiet logs for idle periodic tasks."""
import datetime
import logging

import pytest

import billing
import config
import ops
import startup
import worker
from models import Generation, Payment, utcnow
from tests.helpers import configure, drain, make_user

ADMIN = 1000      # ADMIN_IDS in the test environment


def admin_texts(fake_telegram):
    return [m["text"] for m in fake_telegram.messages(ADMIN)]


@pytest.fixture
def setup(database, fake_telegram):
    cfg = configure(fake_telegram)
    fake_telegram.add_user(ADMIN)
    worker.huey.flush()
    worker._webhook_failures_seen.clear()
    yield cfg
    worker.huey.flush()
    worker._webhook_failures_seen.clear()


def test_each_condition_alerts_once_per_interval(setup, fake_telegram):
    now = utcnow()
    assert worker.alert_admins("disk_low", "disk!", setup, now) is True
    assert worker.alert_admins("disk_low", "disk again!", setup, now + datetime.timedelta(seconds=60)) is False
    assert worker.alert_admins("bot_stale", "bot!", setup, now) is True           # another condition
    later = now + datetime.timedelta(seconds=setup.alert_interval + 1)
    assert worker.alert_admins("disk_low", "disk later!", setup, later) is True
    assert admin_texts(fake_telegram) == ["disk!", "bot!", "disk later!"]


def test_fal_refusing_the_key_alerts_once(database, fake_telegram, fake_fal):
    cfg = configure(fake_telegram, fake_fal, fal_key="wrong-key")
    fake_telegram.add_user(ADMIN)
    worker.huey.flush()
    user = make_user(fake_telegram, credits=100)
    for _ in range(2):
        gen = worker.accept_generation(user, user.telegram_id, "generate", prompt="a cat", cfg=cfg)
        drain()
        assert Generation.get_by_id(gen.id).status == "failed"
    [alert] = admin_texts(fake_telegram)
    assert alert.startswith("🚨 Fal ответил 401") and "FAL_KEY" in alert and "wrong-key" not in alert
    assert billing.get_balance(user.id).credits == 100        # both released
    worker.huey.flush()


def test_the_watchdog_alerts_on_stale_tasks_and_bot(setup, fake_telegram):
    now = utcnow()
    ops.beat("task:sweep", now - datetime.timedelta(seconds=setup.alert_task_stale + 120))
    ops.beat("task:reconcile", now)
    ops.beat("process:bot", now - datetime.timedelta(seconds=setup.health_heartbeat_max_age + 60))
    assert worker.watchdog_once(setup, now) == ["task_stale:sweep", "bot_stale"]
    texts = admin_texts(fake_telegram)
    assert len(texts) == 2 and "sweep" in texts[0] and "Бот" in texts[1]
    # the next minute: still stale, already told
    assert worker.watchdog_once(setup, now + datetime.timedelta(seconds=60)) == ["task_stale:sweep", "bot_stale"]
    assert len(admin_texts(fake_telegram)) == 2
    ops.beat("task:sweep", now)
    ops.beat("process:bot", now)
    assert worker.watchdog_once(setup, now) == []


def test_the_watchdog_alerts_on_low_disk(setup, fake_telegram):
    ops.beat("task:sweep")
    ops.beat("task:reconcile")
    assert worker.watchdog_once(setup.replace(health_min_free_mb=10**7)) == ["disk_low"]
    [alert] = admin_texts(fake_telegram)
    assert "Мало места" in alert and "10000000" in alert


def test_the_watchdog_alerts_on_repeated_webhook_failures(setup, fake_telegram):
    ops.beat("task:sweep")
    ops.beat("task:reconcile")
    ops.count_webhook(403, "untrusted_source")
    assert worker.watchdog_once(setup) == []            # the first run only takes the baseline
    ops.count_webhook(200, "credited")
    ops.count_webhook(503, "provider_unavailable")
    ops.count_webhook(403, "untrusted_source")
    assert worker.watchdog_once(setup) == []            # 2 failures since: under the threshold
    ops.count_webhook(200, "mismatch")
    ops.count_webhook(503, "provider_unavailable")
    ops.count_webhook(403, "untrusted_source")
    assert worker.watchdog_once(setup) == ["webhook_failing"]
    [alert] = admin_texts(fake_telegram)
    assert "YooKassa" in alert and "3" in alert


def test_needs_attention_payments_alert_once_each(setup, fake_telegram):
    ops.beat("task:sweep")
    ops.beat("task:reconcile")
    user = make_user(fake_telegram)
    odd = Payment.create(user=user.id, credits=100, amount_kopecks=10000, status="needs_attention")
    Payment.create(user=user.id, credits=100, amount_kopecks=10000, status="pending")
    assert worker.watchdog_once(setup) == ["needs_attention:%s" % odd.id]
    assert worker.watchdog_once(setup) == ["needs_attention:%s" % odd.id]
    [alert] = admin_texts(fake_telegram)
    assert str(odd.id) in alert
    assert worker.alert_needs_attention(odd.id, setup) is False            # deduplicated


def test_idle_periodic_tasks_do_not_log_at_info(setup, caplog):
    """huey's "Executing …"/"… executed" lines for periodic tasks become DEBUG records; a job's stay
    INFO; an idle sweep (run by the consumer's Ticker, not the queue) logs at DEBUG. As in the
    consumer, the secrets filter is installed (it merges a record's arguments into its message)."""
    startup.install_redaction(config.get())
    worker.quiet_periodic_logs()
    huey_logger = logging.getLogger("huey")
    previous = huey_logger.level
    huey_logger.setLevel(logging.INFO)
    try:
        with caplog.at_level(logging.INFO):
            worker.sweep()
            worker.huey.execute(worker.watchdog.s())
            worker.huey.execute(worker.notify_payment.s("00000000-0000-0000-0000-000000000000"))
    finally:
        huey_logger.setLevel(previous)
    lines = [(r.name, r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert not [line for line in lines if "sweep" in line[2] or "watchdog" in line[2]], lines
    assert any(name == "huey" and "notify_payment" in message for name, _, message in lines), lines
    assert ops.age("task:sweep") is not None             # it did run
