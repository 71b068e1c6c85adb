"""Issue 9 §3: holds that survive a backlog, through a real `huey_consumer`.

One consumer thread, a slow fake Fal and a short RESERVATION_TTL make the queue several times
longer than the TTL. The consumer's own Ticker sweeps every second. Every job must be delivered
once and charged once: no "expired" failure, no free delivery, audit clean — also when the
consumer is SIGKILLed in the middle and started again.
"""
from __future__ import annotations

import collections
import datetime
import signal

import pytest

import billing
import worker
from models import Generation, LedgerEntry, Reservation, utcnow
from tests.helpers import consumer_env, poll, start_consumer, stop

TTL = 3                  # seconds: the smallest RESERVATION_TTL the configuration accepts
FAL_SECONDS = 0.4        # each job's time at the fake Fal
JOBS = 30                # one thread: the backlog lasts at least 30 × 0.4 s = 12 s = 4 TTLs, by construction
USERS = JOBS // 2        # MAX_ACTIVE_JOBS_PER_USER is 2


@pytest.fixture
def backlog(database, db_url, fake_telegram, fake_fal, tmp_path, cfg):
    """JOBS accepted jobs in a SQLite queue file, the environment of a consumer for them."""
    import config
    fake_fal.key = "test-fal-id:test-fal-key"       # FAL_KEY must look like a real key: key_id:key_secret
    config.configure(config.get().replace(telegram_api_url=fake_telegram.url, fal_queue_url=fake_fal.url,
                                          fal_key=fake_fal.key, reservation_ttl=TTL, fal_timeout=2.0))
    fake_fal.set_default("latency", seconds=FAL_SECONDS)
    worker.huey.flush()
    queue_path = str(tmp_path / "queue.db")
    queue = worker.make_huey("sqlite:///" + queue_path)
    gens = []
    for i in range(USERS):
        telegram_id = 700000 + i
        fake_telegram.add_user(telegram_id)
        user, _ = billing.get_or_create_user(telegram_id, first_name="U", free_operations=0)
        billing.credit(user.id, 20, kind="grant", reference="test", idempotency_key="grant:%d" % telegram_id)
        for n in range(2):
            gens.append(worker.accept_generation(user, telegram_id, "generate", prompt="job %d.%d" % (i, n)))
    while (data := worker.huey.storage.dequeue()) is not None:
        queue.storage.enqueue(data, 0)
    env = dict(consumer_env(db_url, queue_path, fake_telegram, fake_fal), FAL_TIMEOUT="2",
               RESERVATION_TTL=str(TTL), SWEEP_INTERVAL="1", RECONCILE_INTERVAL="3600")
    return gens, env


def delivered() -> int:
    return Generation.select().where(Generation.status == "delivered").count()


def assert_each_delivered_and_charged_once(gens, fake_fal, started, killed=False):
    """Every job delivered and charged once; Fal paid once per job, except — when the consumer was
    SIGKILLed — the one job whose submission Fal accepted in the instant before we stored its request
    id: Fal's queue API takes no idempotency key, so that job is submitted again (and still charged
    to the user once)."""
    statuses = {g.status for g in Generation.select()}
    assert statuses == {"delivered"}, statuses
    for gen in gens:
        kinds = [r.kind for r in LedgerEntry.select().where(LedgerEntry.reference == "generation:%s" % gen.id)
                 .order_by(LedgerEntry.id)]
        assert kinds == ["reserve", "commit"], (gen.id, kinds)
    assert {r.state for r in Reservation.select()} == {"committed"}
    per_prompt = collections.Counter(s["arguments"]["prompt"] for s in fake_fal.submissions)
    assert set(per_prompt) == {g.prompt for g in gens}
    twice = [prompt for prompt, n in per_prompt.items() if n > 1]
    assert len(twice) <= (1 if killed else 0), per_prompt               # nobody else paid Fal twice
    assert max(per_prompt.values()) <= 2, per_prompt
    report = billing.audit()
    assert report.ok, "\n".join(report.violations)
    assert report.summary["free_deliveries"] == 0
    # The backlog really outlived the TTL: the last job was delivered well after the first expiry.
    last = max(g.finished_at for g in Generation.select())
    assert (last - started).total_seconds() > 3 * TTL


def test_a_backlog_longer_than_the_ttl_is_delivered_and_charged_once(backlog, fake_fal, tmp_path):
    gens, env = backlog
    started = utcnow()
    log = str(tmp_path / "consumer.log")
    proc = start_consumer(env, log, workers=1)
    try:
        poll(lambda: delivered() == JOBS, timeout=150, what="every job delivered", log=log)
    finally:
        stop(proc, timeout=15)
    assert_each_delivered_and_charged_once(gens, fake_fal, started)
    assert "failed (expired" not in open(log, errors="replace").read()


def test_a_backlog_survives_a_sigkilled_consumer(backlog, fake_fal, tmp_path):
    gens, env = backlog
    started = utcnow()
    first_log, second_log = str(tmp_path / "consumer-1.log"), str(tmp_path / "consumer-2.log")
    first = start_consumer(env, first_log, workers=1)
    try:
        poll(lambda: delivered() >= JOBS // 3, timeout=120, what="a third delivered", log=first_log)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        stop(first, timeout=15)
    # The job the consumer was running is left "running"; once its heartbeat is stale (pretend
    # HEARTBEAT_STALE has passed) the restarted consumer's own sweeper resumes it.
    stale = utcnow() - datetime.timedelta(seconds=worker.HEARTBEAT_STALE + 5)
    Generation.update(heartbeat_at=stale).where(Generation.status == "running").execute()
    second = start_consumer(env, second_log, workers=1)
    try:
        poll(lambda: delivered() == JOBS, timeout=150, what="every job delivered after the restart", log=second_log)
    finally:
        stop(second, timeout=15)
    assert_each_delivered_and_charged_once(gens, fake_fal, started, killed=True)
