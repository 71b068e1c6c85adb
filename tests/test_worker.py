"""worker.py piece by piece: the queue factory, the Telegram wrapper and downloads, accepting and
cancelling jobs, the free add-text mode, payment notifications, the sweeper and shutdown.

Real pyTelegramBotAPI against tests/fakes/telegram.py, real Huey (MemoryHuey in tests, SqliteHuey
and real consumers where the queue itself matters), real SQLite. End-to-end runs of each mode
are in tests/test_pipeline.py; the helpers both use are in tests/helpers.py.
"""
import datetime
import io
import os
import re
import signal
import threading
import time
import uuid

import pytest
from huey import MemoryHuey, RedisHuey, SqliteHuey
from huey.storage import MemoryStorage
from PIL import Image, ImageChops
from telebot import apihelper
from telebot.apihelper import ApiTelegramException

import billing
import config
import media
import models
import texts
import worker
from models import Generation, LedgerEntry, Payment, Reservation, utcnow
from tests.helpers import (
    TELEGRAM_ID,
    audit_ok,
    configure,
    consumer_env,
    drain,
    ledger_kinds,
    make_user,
    photo,
    poll,
    reload,
    start_consumer,
    stop,
)


@pytest.fixture
def demo(database, fake_telegram):
    """The test config pointed at the fake Telegram, demo backend (no FAL_KEY), empty queue."""
    cfg = configure(fake_telegram)
    worker.huey.flush()
    yield cfg
    worker.huey.flush()


def generation_count() -> int:
    return Generation.select().count()


# --------------------------------------------------------------------------------------------
# the queue
# --------------------------------------------------------------------------------------------


def test_make_huey_builds_the_backend_named_by_the_url(tmp_path):
    folder = tmp_path / "new" / "folder"
    sqlite = worker.make_huey("sqlite:///%s/queue.db" % folder)
    assert isinstance(sqlite, SqliteHuey) and folder.is_dir()
    assert sqlite.name == "medialab" and sqlite.results is False
    assert sqlite.storage.filename == "%s/queue.db" % folder
    assert isinstance(worker.make_huey("memory://"), MemoryHuey)
    redis = worker.make_huey("redis://127.0.0.1:6379/3")
    assert isinstance(redis, RedisHuey) and redis.results is False
    with pytest.raises(ValueError):
        worker.make_huey("amqp://nope")


def test_the_test_queue_is_in_memory_and_holds_the_tasks():
    assert isinstance(worker.huey.storage, MemoryStorage) and worker.huey.results is False
    names = {name.split(".")[-1] for name in worker.huey._registry._registry}
    assert {"run_generation", "notify_payment", "notify_refund", "alert_admins_task"} <= names


# --------------------------------------------------------------------------------------------
# Telegram: the wrapper, the bot, downloads
# --------------------------------------------------------------------------------------------


def test_telegram_points_the_library_at_the_configured_api(demo, fake_telegram):
    bot = worker.telegram()
    assert bot is worker.telegram() and bot.token == demo.telegram_bot_token
    assert apihelper.API_URL == fake_telegram.url + "/bot{0}/{1}"
    assert apihelper.FILE_URL == fake_telegram.url + "/file/bot{0}/{1}"
    assert bot.get_me().username == "medialab_test_bot"


def test_tg_waits_out_429s_and_then_succeeds(demo, fake_telegram):
    fake_telegram.add_user(TELEGRAM_ID)
    fake_telegram.fail_next("sendMessage", 429, retry_after=0, times=2)
    message = worker.tg(worker.telegram().send_message, TELEGRAM_ID, "hello")
    assert message.text == "hello"
    assert [c.ok for c in fake_telegram.calls("sendMessage")] == [False, False, True]


def test_tg_raises_a_429_it_should_not_sleep_through(demo, fake_telegram):
    fake_telegram.add_user(TELEGRAM_ID)
    fake_telegram.fail_next("sendMessage", 429, retry_after=45)
    started = time.monotonic()
    with pytest.raises(ApiTelegramException) as caught:
        worker.tg(worker.telegram().send_message, TELEGRAM_ID, "hello")
    assert caught.value.error_code == 429 and worker.retry_after(caught.value) == 45
    assert time.monotonic() - started < 1
    fake_telegram.fail_next("sendMessage", 429, retry_after=0, times=3)
    with pytest.raises(ApiTelegramException):
        worker.tg(worker.telegram().send_message, TELEGRAM_ID, "hello", _attempts=3)
    assert len(fake_telegram.calls("sendMessage")) == 4


def test_tg_does_not_retry_other_errors(demo, fake_telegram):
    with pytest.raises(ApiTelegramException) as caught:
        worker.tg(worker.telegram().send_message, 999999, "nobody")
    assert caught.value.error_code == 400 and "chat not found" in caught.value.description
    assert len(fake_telegram.calls("sendMessage")) == 1


def test_download_file_returns_the_bytes(demo, fake_telegram):
    data = photo()
    file_id, _ = fake_telegram.add_file(data)
    assert worker.download_file(file_id) == data
    assert [c.method for c in fake_telegram.calls()][-2:] == ["getFile", "download"]


def test_download_file_refuses_big_and_unknown_files(demo, fake_telegram):
    big, _ = fake_telegram.add_file(b"x", file_size=30 * 1024 * 1024)
    with pytest.raises(media.InvalidInput) as caught:
        worker.download_file(big)
    assert caught.value.code == "image_too_big"
    declared, _ = fake_telegram.add_file(b"y", file_size=demo.max_image_bytes + 1)
    with pytest.raises(media.InvalidInput):
        worker.download_file(declared)
    assert [c.method for c in fake_telegram.calls()].count("download") == 0   # refused before downloading
    with pytest.raises(worker.InputUnavailable):
        worker.download_file("no-such-file")


def test_download_errors_never_carry_the_token(demo):
    config.configure(demo.replace(telegram_api_url="http://127.0.0.1:9"))   # nothing listens there
    with pytest.raises(worker.TelegramUnavailable) as caught:
        worker.download_file("some-file")
    assert demo.telegram_bot_token not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_describe_masks_the_token(demo):
    exc = RuntimeError("failed at /bot%s/sendPhoto" % demo.telegram_bot_token)
    assert demo.telegram_bot_token not in worker._describe(exc)
    assert "<token>" in worker._describe(exc)


# --------------------------------------------------------------------------------------------
# accepting jobs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, kwargs, error, code", [
    ("paint", {"prompt": "x"}, worker.UnknownMode, None),
    ("add_text", {"file_ids": ["f"]}, worker.UnknownMode, None),
    ("generate", {"prompt": "   "}, media.InvalidInput, "prompt_empty"),
    ("generate", {"prompt": "x" * 1001}, media.InvalidInput, "prompt_too_long"),
    ("edit", {"prompt": "x"}, media.InvalidInput, "too_few_images"),
    ("merge", {"prompt": "x", "file_ids": ["a"]}, media.InvalidInput, "too_few_images"),
    ("merge", {"prompt": "x", "file_ids": list("abcde")}, media.InvalidInput, "too_many_images"),
    ("face_swap", {"file_ids": ["a", "b", "c"]}, media.InvalidInput, "too_many_images"),
    ("generate", {"prompt": "x", "options": {"aspect_ratio": "7:5"}}, worker.InvalidOptions, None),
    ("upscale", {"file_ids": ["a"], "options": {"scale": 8}}, worker.InvalidOptions, None),
])
def test_invalid_requests_are_refused_before_anything_is_charged(demo, fake_telegram, mode, kwargs, error, code):
    user = make_user(fake_telegram)
    with pytest.raises(error) as caught:
        worker.accept_generation(user, TELEGRAM_ID, mode, **kwargs)
    if code:
        assert caught.value.code == code
    assert generation_count() == 0 and Reservation.select().count() == 0
    assert worker.huey.pending_count() == 0
    assert billing.get_balance(user.id).free_ops == 4


def test_accept_reserves_stores_the_job_and_enqueues_it(demo, fake_telegram):
    user = make_user(fake_telegram)
    gen = worker.accept_generation(user, TELEGRAM_ID, "merge", prompt="  together  ", file_ids=["a", "b"])
    gen = reload(gen)
    assert (gen.status, gen.mode, gen.prompt, gen.input_file_ids) == ("queued", "merge", "together", ["a", "b"])
    assert gen.cost == 0 and gen.endpoint == "fal-ai/nano-banana/edit" and gen.attempts == 0
    reservation = Reservation.get_by_id(gen.reservation_id)
    assert (reservation.asset, reservation.state, reservation.reference) == ("free_ops", "reserved",
                                                                             "generation:%s" % gen.id)
    assert (reservation.expires_at - reservation.created_at).total_seconds() == demo.reservation_ttl
    (task,) = worker.huey.pending()
    assert task.args == (str(gen.id),) and task.name == "run_generation"
    audit_ok()


def test_credits_are_reserved_when_free_operations_are_used_up(demo, fake_telegram):
    config.configure(demo.replace(mode_prices={"upscale": 25}))
    user = make_user(fake_telegram, credits=40, free_ops=0)
    gen = worker.accept_generation(user, TELEGRAM_ID, "upscale", file_ids=["a"])
    assert gen.cost == 25 and Reservation.get_by_id(gen.reservation_id).asset == "credits"
    assert billing.get_balance(user.id).credits == 15
    with pytest.raises(billing.InsufficientCredits):
        worker.accept_generation(user, TELEGRAM_ID, "upscale", file_ids=["b"])
    assert generation_count() == 1 and worker.huey.pending_count() == 1
    audit_ok()


def test_a_blocked_user_is_refused(demo, fake_telegram):
    user = make_user(fake_telegram)
    models.User.update(is_blocked=True).where(models.User.id == user.id).execute()
    with pytest.raises(billing.UserBlocked):
        worker.accept_generation(models.User.get_by_id(user.id), TELEGRAM_ID, "generate", prompt="x")
    assert generation_count() == 0 and worker.huey.pending_count() == 0


def test_too_many_jobs_are_refused_until_one_finishes(demo, fake_telegram):
    user = make_user(fake_telegram)
    first = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="one")
    worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="two")
    with pytest.raises(worker.TooManyJobs) as caught:
        worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="three")
    assert caught.value.limit == demo.max_active_jobs_per_user == 2
    assert generation_count() == 2 and Reservation.select().count() == 2
    other = make_user(fake_telegram, telegram_id=TELEGRAM_ID + 1)        # the limit is per user
    worker.accept_generation(other, TELEGRAM_ID + 1, "generate", prompt="mine")
    worker.run_generation.call_local(str(first.id))
    assert reload(first).status == "delivered"
    worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="three")
    audit_ok()


def race_accepts(user, count: int, prompt: str) -> list[str]:
    """`count` threads accept a generate job at once; return the sorted outcomes."""
    start = threading.Barrier(count)
    outcomes = []

    def accept(n):
        start.wait()
        try:
            with models.db.connection_context():
                worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="%s %d" % (prompt, n))
            outcomes.append("ok")
        except worker.TooManyJobs:
            outcomes.append("too many")

    threads = [threading.Thread(target=accept, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return sorted(outcomes)


def test_concurrent_accepts_never_pass_the_limit(demo, fake_telegram):
    user = make_user(fake_telegram)
    assert race_accepts(user, 6, "job") == ["ok", "ok"] + ["too many"] * 4
    assert generation_count() == 2 and worker.huey.pending_count() == 2
    audit_ok()


def test_the_task_is_enqueued_only_after_the_commit(demo, fake_telegram):
    user = make_user(fake_telegram)
    with pytest.raises(RuntimeError):
        with models.db.atomic():
            worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="x")
            assert worker.huey.pending_count() == 0            # not before the commit
            raise RuntimeError("the caller's transaction fails")
    assert generation_count() == 0 and worker.huey.pending_count() == 0
    with models.db.atomic():
        worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="x")
        assert worker.huey.pending_count() == 0
    assert worker.huey.pending_count() == 1


def test_queue_position_counts_older_queued_jobs(demo, fake_telegram):
    a = make_user(fake_telegram)
    b = make_user(fake_telegram, telegram_id=TELEGRAM_ID + 1)
    first = worker.accept_generation(a, TELEGRAM_ID, "generate", prompt="1")
    second = worker.accept_generation(b, TELEGRAM_ID + 1, "generate", prompt="2")
    assert (worker.queue_position(first.id), worker.queue_position(second.id)) == (1, 2)
    worker.run_generation.call_local(str(first.id))
    assert (worker.queue_position(first.id), worker.queue_position(second.id)) == (0, 1)
    assert worker.queue_position(uuid.uuid4()) == 0


# --------------------------------------------------------------------------------------------
# cancelling
# --------------------------------------------------------------------------------------------


def test_cancel_of_a_queued_job_releases_it_and_the_task_does_nothing(demo, fake_telegram):
    user = make_user(fake_telegram, credits=10, free_ops=0)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="x")
    assert billing.get_balance(user.id).credits == 0
    assert worker.cancel_generation(gen.id, user.id + 1) is False            # not yours
    assert worker.cancel_generation("not-a-uuid", user.id) is False
    assert worker.cancel_generation(str(gen.id), user.id) is True
    assert worker.cancel_generation(str(gen.id), user.id) is False           # once
    gen = reload(gen)
    assert gen.status == "canceled" and gen.finished_at is not None
    assert Reservation.get_by_id(gen.reservation_id).state == "released"
    assert billing.get_balance(user.id).credits == 10
    drain()
    assert fake_telegram.calls("sendPhoto") == [] and reload(gen).status == "canceled"
    assert ledger_kinds(gen) == ["reserve", "release"]
    audit_ok()


def test_a_running_or_finished_job_cannot_be_cancelled(demo, fake_telegram):
    user = make_user(fake_telegram)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="x")
    Generation.update(status="running").where(Generation.id == gen.id).execute()
    assert worker.cancel_generation(gen.id, user.id) is False
    Generation.update(status="queued").where(Generation.id == gen.id).execute()
    drain()
    assert reload(gen).status == "delivered" and worker.cancel_generation(gen.id, user.id) is False
    assert Reservation.get_by_id(gen.reservation_id).state == "committed"


# --------------------------------------------------------------------------------------------
# add text: free, local
# --------------------------------------------------------------------------------------------


def test_render_add_text_is_free_and_local(demo, fake_telegram):
    user = make_user(fake_telegram)
    ledger_before = LedgerEntry.select().count()
    original = photo(size=(400, 300), fmt="PNG")
    png = worker.render_add_text(original, "Привет, мир", "top", "yellow")
    img = Image.open(io.BytesIO(png)).convert("RGB")
    assert Image.open(io.BytesIO(png)).format == "PNG" and img.size == (400, 300)
    before = Image.open(io.BytesIO(original)).convert("RGB")
    changed = ImageChops.difference(img, before).getbbox()                  # where the text was drawn
    assert changed is not None and changed[1] < 100 and changed[3] < 150
    assert LedgerEntry.select().count() == ledger_before and generation_count() == 0
    assert billing.get_balance(user.id).free_ops == 4 and worker.huey.pending_count() == 0
    with pytest.raises(media.InvalidInput):
        worker.render_add_text(b"not an image", "hi")
    with pytest.raises(media.InvalidInput):
        worker.render_add_text(photo(), "   ")


# --------------------------------------------------------------------------------------------
# payments
# --------------------------------------------------------------------------------------------


def paid_order(user, credits=100, succeeded_at=None) -> Payment:
    payment = Payment.create(user=user.id, credits=credits, amount_kopecks=credits * 100, status="succeeded",
                             yookassa_payment_id="yk-%s" % uuid.uuid4(), succeeded_at=succeeded_at or utcnow())
    billing.credit(user.id, credits, kind="topup", reference="payment:%s" % payment.id,
                   idempotency_key="topup:%s" % payment.id)
    return payment


def test_notify_payment_tells_the_user_once(demo, fake_telegram):
    user = make_user(fake_telegram, credits=5)
    payment = paid_order(user)
    worker.notify_payment(str(payment.id))
    worker.notify_payment(str(payment.id))
    assert drain() == 2
    worker.notify_payment.call_local(payment.id)
    (sent,) = fake_telegram.calls("sendMessage")
    assert sent.result["text"] == "✅ Оплата получена! Начислено 100 кредитов. Баланс: 105 кредитов."
    assert Payment.get_by_id(payment.id).notified_at is not None
    audit_ok()


def test_notify_payment_ignores_a_payment_that_did_not_succeed(demo, fake_telegram):
    user = make_user(fake_telegram)
    pending = Payment.create(user=user.id, credits=100, amount_kopecks=10000, status="pending")
    worker.notify_payment.call_local(str(pending.id))
    assert fake_telegram.calls("sendMessage") == []


def test_reconcile_once_notifies_succeeded_payments_nobody_told(demo, fake_telegram):
    config.configure(demo.replace(yookassa_shop_id="", yookassa_secret_key=""))   # no API calls
    user = make_user(fake_telegram, language_code="en")
    old = paid_order(user, 300, succeeded_at=utcnow() - datetime.timedelta(minutes=5))
    paid_order(user, 100)                                                # fresh: the webhook's turn
    assert worker.reconcile_once() == [str(old.id)]
    drain()
    (sent,) = fake_telegram.calls("sendMessage")
    assert sent.result["text"] == "✅ Payment received! 300 credits added. Balance: 400 credits."
    assert worker.reconcile_once() == []


# --------------------------------------------------------------------------------------------
# the sweeper
# --------------------------------------------------------------------------------------------


def later(seconds) -> datetime.datetime:
    return utcnow() + datetime.timedelta(seconds=seconds)


def test_sweep_re_enqueues_a_job_whose_enqueue_was_lost(demo, fake_telegram):
    user = make_user(fake_telegram)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="x")
    assert worker.sweep_once(now=later(worker.QUEUED_STALE + 1))["requeued"] == []   # its task is queued
    worker.huey.flush()                                               # crash between commit and enqueue
    assert worker.sweep_once()["requeued"] == []                      # too fresh to call lost
    report = worker.sweep_once(now=later(worker.QUEUED_STALE + 1))
    assert report["requeued"] == [str(gen.id)]
    assert worker.sweep_once(now=later(worker.QUEUED_STALE + 1))["requeued"] == []   # once
    drain()
    assert reload(gen).status == "delivered"
    audit_ok()


def test_sweep_resumes_a_running_job_without_heartbeat_but_leaves_live_ones(demo, fake_telegram):
    user = make_user(fake_telegram)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="x")
    worker.huey.flush()
    Generation.update(status="running", attempts=1, heartbeat_at=utcnow()).where(Generation.id == gen.id).execute()
    assert worker.sweep_once()["resumed"] == []                       # heartbeat is fresh
    report = worker.sweep_once(now=later(worker.HEARTBEAT_STALE + 1))
    assert report["resumed"] == [str(gen.id)] and reload(gen).status == "queued"
    drain()
    gen = reload(gen)
    assert gen.status == "delivered" and gen.attempts == 2
    audit_ok()


def test_a_queued_job_keeps_its_hold_past_the_ttl_and_is_charged_once(demo, fake_telegram):
    """Issue 9 §3: a job simply waiting in the queue longer than RESERVATION_TTL is alive: the
    sweeper extends its hold instead of failing it ("expired")."""
    user = make_user(fake_telegram, credits=10, free_ops=0)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="x")
    first_expiry = Reservation.get_by_id(gen.reservation_id).expires_at
    for ttls in (1, 2, 3):                                            # a backlog three TTLs long
        report = worker.sweep_once(now=later(ttls * demo.reservation_ttl + 1))
        assert report["expired"] == [] and report["failed"] == [] and report["extended"] == 1
    assert Reservation.get_by_id(gen.reservation_id).expires_at > first_expiry
    assert reload(gen).status == "queued"
    drain()
    gen = reload(gen)
    assert gen.status == "delivered" and ledger_kinds(gen) == ["reserve", "commit"]
    assert billing.get_balance(user.id).credits == 0
    audit_ok()


def test_a_hold_with_no_live_job_still_expires(demo, fake_telegram):
    """Only dead holds expire: a reservation whose job ended without resolving it (or that has no
    job) goes back to the user."""
    user = make_user(fake_telegram, credits=10, free_ops=0)
    orphan = billing.reserve(user.id, 10, reference="generation:lost", idempotency_key="generation:lost", ttl=60)
    report = worker.sweep_once(now=later(61))
    assert report["expired"] == [orphan.id] and billing.get_balance(user.id).credits == 10
    audit_ok()


def test_a_job_claimed_after_its_reservation_expired_is_not_sent_to_the_provider(demo, fake_telegram):
    user = make_user(fake_telegram)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="x")
    billing.expire_stale(later(demo.reservation_ttl + 1))
    drain()
    gen = reload(gen)
    assert gen.status == "failed" and gen.fal_request_id is None
    assert "не удалось выполнить вовремя" in fake_telegram.last_message(TELEGRAM_ID)["text"]


def test_a_running_job_keeps_its_hold_and_a_dead_one_is_resumed_until_its_runs_are_used(demo, fake_telegram):
    """A running job with a fresh heartbeat past the TTL keeps its hold (no free delivery); when
    its worker dies it is resumed, hold kept; a job that killed its worker MAX_ATTEMPTS times is
    dead: it fails and its hold is released."""
    user = make_user(fake_telegram)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="x")
    worker.huey.flush()
    ttl = demo.reservation_ttl + 1
    Generation.update(status="running", heartbeat_at=later(ttl), attempts=1).where(Generation.id == gen.id).execute()
    report = worker.sweep_once(now=later(ttl))
    assert report["expired"] == [] and report["failed"] == [] and report["extended"] == 1
    assert reload(gen).status == "running" and Reservation.get_by_id(gen.reservation_id).state == "reserved"
    # its worker dies: resumed (queued again with a task), the hold stays
    report = worker.sweep_once(now=later(ttl + worker.HEARTBEAT_STALE + 1))
    assert report["resumed"] == [str(gen.id)] and report["expired"] == []
    assert Reservation.get_by_id(gen.reservation_id).state == "reserved"
    worker.huey.flush()
    Generation.update(status="running", heartbeat_at=utcnow(), attempts=worker.MAX_ATTEMPTS).where(
        Generation.id == gen.id).execute()
    report = worker.sweep_once(now=later(worker.HEARTBEAT_STALE + 1))
    assert report["failed"] == [str(gen.id)] and reload(gen).status == "failed"
    assert Reservation.get_by_id(gen.reservation_id).state == "released"
    audit_ok()


def test_heartbeat_touches_only_a_running_job(demo, fake_telegram):
    user = make_user(fake_telegram)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="x")
    Generation.update(status="running", heartbeat_at=utcnow() - datetime.timedelta(minutes=5)).where(
        Generation.id == gen.id).execute()
    with worker._Heartbeat(str(gen.id), interval=0.02):
        poll(lambda: reload(gen).heartbeat_at > utcnow() - datetime.timedelta(seconds=5), timeout=5,
             what="a heartbeat")
    Generation.update(status="delivered", heartbeat_at=None).where(Generation.id == gen.id).execute()
    with worker._Heartbeat(str(gen.id), interval=0.02) as beat:
        beat._stop.wait(0.1)                              # a few ticks of a finished job
    assert reload(gen).heartbeat_at is None


def test_the_ticker_runs_each_job_at_its_interval_in_seconds(demo):
    """SWEEP_INTERVAL / RECONCILE_INTERVAL are honoured as written in seconds (issue 9 §5)."""
    calls = {"fast": 0, "slow": 0}
    ticker = worker.Ticker(demo, jobs=[(lambda: calls.__setitem__("fast", calls["fast"] + 1), 0.05),
                                       (lambda: calls.__setitem__("slow", calls["slow"] + 1), 3600)]).start()
    try:
        poll(lambda: calls["fast"] >= 4, timeout=5, what="four fast ticks")
    finally:
        ticker.stop()
    assert calls["slow"] == 1                                          # once at start, then in an hour


def test_the_ticker_survives_a_failing_pass(demo):
    runs = []

    def flaky():
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("database is locked")

    ticker = worker.Ticker(demo, jobs=[(flaky, 0.05)]).start()
    try:
        poll(lambda: len(runs) >= 3, timeout=5, what="passes after a failure")
    finally:
        ticker.stop()


def test_the_real_sweep_runs_from_the_ticker(demo, fake_telegram):
    user = make_user(fake_telegram)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="x")
    worker.huey.flush()
    Generation.update(status="running", attempts=1,
                      heartbeat_at=utcnow() - datetime.timedelta(seconds=worker.HEARTBEAT_STALE + 5)).where(
        Generation.id == gen.id).execute()
    ticker = worker.Ticker(demo, jobs=[(worker.sweep, 0.05)]).start()
    try:
        poll(lambda: reload(gen).status == "queued", timeout=5, what="the sweeper to resume the dead job")
    finally:
        ticker.stop()
    drain()
    assert reload(gen).status == "delivered"
    audit_ok()


# --------------------------------------------------------------------------------------------
# shutdown: SIGTERM re-enqueues the running job (huey's SIGNAL_INTERRUPTED recipe)
# --------------------------------------------------------------------------------------------


def test_sigterm_puts_the_running_job_back_and_the_next_consumer_resumes_it(
        database, db_url, fake_telegram, fake_fal, tmp_path):
    configure(fake_telegram, fake_fal)
    worker.huey.flush()
    queue_path = str(tmp_path / "queue.db")
    queue = worker.make_huey("sqlite:///" + queue_path)
    env = consumer_env(db_url, queue_path, fake_telegram, fake_fal)
    user = make_user(fake_telegram)
    fake_fal.script("latency", seconds=1.5)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="graceful")
    queue.storage.enqueue(worker.huey.storage.dequeue(), 0)

    first_log = tmp_path / "consumer-1.log"
    first = start_consumer(env, first_log)
    try:
        stored = poll(lambda: reload(gen).fal_request_id, what="request id stored", log=first_log)
        first.send_signal(signal.SIGTERM)                            # -g INT: TERM interrupts
        assert first.wait(30) == 0
    finally:
        stop(first)
    log = (tmp_path / "consumer-1.log").read_text(errors="replace")
    assert reload(gen).status == "queued", log
    (data,) = queue.storage.enqueued_items()                         # re-enqueued on the way out
    assert worker.huey.deserialize_task(data).args == (str(gen.id),)

    second_log = tmp_path / "consumer-2.log"
    second = start_consumer(env, second_log)
    try:
        poll(lambda: reload(gen).status == "delivered", what="delivery after restart", log=second_log)
    finally:
        stop(second)
    gen = reload(gen)
    assert len(fake_fal.submissions) == 1 and gen.fal_request_id == stored and gen.attempts == 2
    assert len(fake_telegram.calls("sendPhoto")) == 1 and ledger_kinds(gen) == ["reserve", "commit"]
    audit_ok()


# --------------------------------------------------------------------------------------------
# texts
# --------------------------------------------------------------------------------------------


def worker_text_keys() -> list:
    """The keys of the worker's section of texts.py (between its marker and the next one)."""
    source = open(texts.__file__, encoding="utf-8").read()
    section = source.split("# --- worker (owned by worker.py)", 1)[1].split("# --- ", 1)[0]
    return re.findall(r'^    "([a-z_]+)": ', section, flags=re.M)


def test_every_worker_text_has_both_languages_and_formats():
    values = dict(mode="m", seed=1, cost=10, balance=90, left=3, total=4, reason="r", credits=100, limit=2,
                  day="2026-11-21", topups="t", refunds="r", amount="90.00", order="o", yookassa="y", problem="p",
                  status=401, detail="d", count=3, task="sweep", minutes=11, free=100, payment_id="p",
                  time="1:00", position=3, attempt=2, price=10, until="01.01.2027", bonus=20, link="l")
    keys = worker_text_keys()
    assert len(keys) > 20
    for key in keys:
        assert set(texts.TEXTS[key]) == {"ru", "en"}, key
        for lang in ("ru", "en"):
            text = texts.t(key, lang, **values)
            assert "{" not in text and text.strip(), key
    for mode in media.MODE_SPECS:
        if media.MODE_SPECS[mode].paid:
            assert "job_mode_" + mode in texts.TEXTS
    for key in [k for k in keys if k.startswith("job_failed_")]:
        assert texts.t(key, "ru", reason="r").endswith("Кредиты не списаны.")
        assert texts.t(key, "en", reason="r").endswith("No credits were charged.")


def test_a_caption_never_exceeds_the_bot_api_limit(demo, fake_telegram):
    user = make_user(fake_telegram)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="x")
    caption = worker._caption(reload(gen), "ru", 2**62, demo)
    assert len(caption) <= worker.CAPTION_LIMIT and "Seed: %d" % 2**62 in caption
    assert os.environ.get("QUEUE_URL") == "memory://"


# --------------------------------------------------------------------------------------------
# PostgreSQL (TEST_POSTGRES_URL): the same pipeline, and the per-user limit under a row lock
# --------------------------------------------------------------------------------------------


def test_the_pipeline_and_the_job_limit_on_postgresql(pg_database, fake_telegram):
    configure(fake_telegram)
    worker.huey.flush()
    user = make_user(fake_telegram)
    assert race_accepts(user, 5, "pg") == ["ok", "ok", "too many", "too many", "too many"]
    assert drain() == 2
    assert [g.status for g in Generation.select()] == ["delivered", "delivered"]
    assert len(fake_telegram.calls("sendPhoto")) == 2
    audit_ok()
    worker.huey.flush()
