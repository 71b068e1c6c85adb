"""The job pipeline end to end: accept_generation → run_generation → photo in the chat → commit.

Everything real but the outside world: the real fal-client against tests/fakes/fal.py, the real
pyTelegramBotAPI against tests/fakes/telegram.py, a real SQLite database, and `worker.huey` (a
MemoryHuey in tests) driven by dequeuing and executing its tasks. The last test runs real
`huey_consumer worker.huey` processes on a SQLite queue and SIGKILLs one mid-job.
"""
import datetime
import io
import json
import signal
import threading
import time

import pytest
from PIL import Image

import billing
import media
import worker
from models import Generation, Reservation, utcnow
from tests.helpers import (
    FAR_FUTURE,
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
    worker_button_data,
)

# --------------------------------------------------------------------------------------------
# helpers of this module (the shared ones are in tests/helpers.py)
# --------------------------------------------------------------------------------------------


def strings_of(value):
    return json.dumps(value, ensure_ascii=False)


@pytest.fixture
def pipeline(database, fake_telegram, fake_fal):
    """The test config pointed at both fakes, an empty in-memory queue."""
    cfg = configure(fake_telegram, fake_fal)
    worker.huey.flush()
    yield cfg
    worker.huey.flush()


# --------------------------------------------------------------------------------------------
# every paid mode, end to end
# --------------------------------------------------------------------------------------------

MODE_INPUTS = {
    "generate": ("a red fox in the snow", 0),
    "edit": ("make it blue", 1),
    "merge": ("put them side by side", 3),
    "face_swap": (None, 2),
    "retouch": (None, 1),
    "upscale": (None, 1),
}


@pytest.mark.parametrize("mode", list(MODE_INPUTS))
def test_each_paid_mode_is_delivered_with_caption_and_buttons_and_committed(pipeline, fake_telegram, fake_fal, mode):
    user = make_user(fake_telegram)
    prompt, count = MODE_INPUTS[mode]
    images = [photo((40 * i, 100, 200 - 40 * i)) for i in range(count)]
    file_ids = [fake_telegram.add_file(data)[0] for data in images]

    gen = worker.accept_generation(user, TELEGRAM_ID, mode, prompt=prompt, file_ids=file_ids)
    assert reload(gen).status == "queued"
    assert Reservation.get_by_id(gen.reservation_id).state == "reserved"
    assert drain() == 1

    gen = reload(gen)
    assert gen.status == "delivered" and gen.finished_at is not None and gen.attempts == 1
    (submission,) = fake_fal.submissions
    assert submission["app"] == pipeline.fal_endpoints[mode] == gen.endpoint
    assert gen.fal_request_id == submission["request_id"]
    # images travel as data URIs, never as a (token-bearing) Telegram file URL
    assert fake_fal.token_leaks == [] and "/file/bot" not in strings_of(submission["arguments"])
    uris = [v for v in json.loads(strings_of(submission["arguments"])).values() if isinstance(v, dict)]
    uris += [v for v in submission["arguments"].get("image_urls", [])]
    assert len(uris) == count and all(u.get("data_uri") for u in uris)
    if prompt:
        assert submission["arguments"]["prompt"] == prompt

    (sent,) = [c for c in fake_telegram.calls("sendPhoto") if c.ok]
    assert sent.chat_id == TELEGRAM_ID and gen.result_message_id == sent.result["message_id"]
    caption = sent.result["caption"]
    assert caption.startswith("✅ Готово") and "Бесплатная операция (осталось 3 из 4)" in caption
    assert "parse_mode" not in sent.params
    assert fake_telegram.button_data(sent.result) == (["again:%s" % gen.id] + ["use:%s:%s" % (m, gen.id) for m in ("edit", "upscale", "add_text")] + ["menu"])
    assert fake_telegram.calls("sendChatAction")[0].params["action"] == "upload_photo"

    assert Reservation.get_by_id(gen.reservation_id).state == "committed"
    assert ledger_kinds(gen) == ["reserve", "commit"]
    assert billing.get_balance(user.id).free_ops == 3
    audit_ok()


def test_credits_are_charged_and_the_caption_says_so(pipeline, fake_telegram, fake_fal):
    user = make_user(fake_telegram, credits=100, free_ops=0)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="a cat", options={"aspect_ratio": "16:9"})
    assert gen.cost == 10
    drain()
    (sent,) = fake_telegram.calls("sendPhoto")
    assert "Списано 10 кредитов, осталось 90." in sent.result["caption"]
    assert fake_fal.submissions[0]["arguments"]["aspect_ratio"] == "16:9"
    assert billing.get_balance(user.id).credits == 90
    audit_ok()


def test_english_user_gets_english_texts(pipeline, fake_telegram, fake_fal):
    user = make_user(fake_telegram, language_code="en-GB")
    worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="a cat")
    drain()
    (sent,) = fake_telegram.calls("sendPhoto")
    assert sent.result["caption"].startswith("✅ Done: 🎨 Create")
    assert "Free operation (3 of 4 left)" in sent.result["caption"]


def test_status_message_is_edited_to_running_then_removed(pipeline, fake_telegram, fake_fal):
    user = make_user(fake_telegram)
    fake_fal.script("queue", position=2, seconds=0.6)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="a cat")
    # the bot shows "⏳ в очереди" and stores the message id (bot._after_accept)
    status = worker.telegram().send_message(TELEGRAM_ID, "⏳ в очереди (%d)" % worker.queue_position(gen.id))
    Generation.update(status_message_id=status.message_id).where(Generation.id == gen.id).execute()
    assert status.text == "⏳ в очереди (1)"
    drain()
    edits = fake_telegram.calls("editMessageText")
    assert {e.params["message_id"] for e in edits} == {status.message_id}
    shown = [e.result["text"] for e in edits]
    assert shown[0] == "▶️ В работе…" and shown[-1] == "🎨 Генерирую…"        # then the mode's own text
    assert "⏳ В очереди у модели: 2-й" in shown                              # Fal's queue position
    assert all(worker_button_data(e.result) == ["jobcancel:%s" % gen.id] for e in edits)  # cancel stays
    assert fake_telegram.message(TELEGRAM_ID, status.message_id) is None          # deleted after delivery
    assert worker.queue_position(gen.id) == 0


def test_demo_backend_without_fal_key_also_delivers(database, fake_telegram, fake_fal):
    configure(fake_telegram)                                   # no FAL_KEY: the local demo backend
    worker.huey.flush()
    user = make_user(fake_telegram)
    file_id = fake_telegram.add_file(photo())[0]
    gen = worker.accept_generation(user, TELEGRAM_ID, "edit", prompt="make it warmer", file_ids=[file_id])
    drain()
    gen = reload(gen)
    assert gen.status == "delivered" and gen.fal_request_id.startswith("demo-")
    assert fake_fal.submissions == []
    (sent,) = fake_telegram.calls("sendPhoto")
    assert sent.ok and sent.files["photo"][:8] == b"\x89PNG\r\n\x1a\n"
    assert Reservation.get_by_id(gen.reservation_id).state == "committed"
    audit_ok()


# --------------------------------------------------------------------------------------------
# permanent failures: released at once, one submission, a message saying what to change
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, text", [
    ("validation", "Модель не приняла запрос. Измените описание или фото"),
    ("policy", "правилам контента. Измените запрос или фото"),
])
def test_permanent_provider_errors_release_at_once(pipeline, fake_telegram, fake_fal, kind, text):
    user = make_user(fake_telegram)
    fake_fal.script(kind)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="something")
    assert drain() == 1                                        # no retry was scheduled
    gen = reload(gen)
    assert gen.status == "failed" and gen.finished_at is not None and gen.attempts == 1
    assert len(fake_fal.submissions) == 1
    assert Reservation.get_by_id(gen.reservation_id).state == "released"
    assert ledger_kinds(gen) == ["reserve", "release"]
    assert billing.get_balance(user.id).free_ops == 4
    message = fake_telegram.last_message(TELEGRAM_ID)
    assert text in message["text"] and message["text"].endswith("Кредиты не списаны.")
    assert fake_telegram.calls("sendPhoto") == []
    audit_ok()


def test_an_unusable_input_photo_is_refused_before_fal(pipeline, fake_telegram, fake_fal):
    user = make_user(fake_telegram)
    file_id = fake_telegram.add_file(b"GIF89a not really a picture")[0]
    gen = worker.accept_generation(user, TELEGRAM_ID, "retouch", file_ids=[file_id])
    drain()
    assert reload(gen).status == "failed" and fake_fal.submissions == []
    assert "Фото не подходит: это не изображение." in fake_telegram.last_message(TELEGRAM_ID)["text"]
    assert Reservation.get_by_id(gen.reservation_id).state == "released"
    audit_ok()


# --------------------------------------------------------------------------------------------
# transient failures: retried with the same request id, released after the cap
# --------------------------------------------------------------------------------------------


def test_a_500_at_submit_is_retried_and_then_succeeds(pipeline, fake_telegram, fake_fal):
    user = make_user(fake_telegram)
    fake_fal.script("submit_error", status=500, ingress=False)      # no job, no request id
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="a cat")
    assert drain() == 2
    gen = reload(gen)
    assert gen.status == "delivered" and gen.attempts == 2
    assert len(fake_fal.submissions) == 1 and gen.fal_request_id == fake_fal.submissions[0]["request_id"]
    assert ledger_kinds(gen) == ["reserve", "commit"]
    audit_ok()


def test_a_request_fal_reported_failed_is_retried_as_a_new_request(pipeline, fake_telegram, fake_fal):
    """Re-polling a request Fal reported failed only returns the same failure: the retry submits anew,
    and the user sees "retrying (2/4)" meanwhile."""
    user = make_user(fake_telegram)
    fake_fal.script("error500")
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="a cat")
    status = worker.show_status(reload(gen), "ru")
    task = worker.huey.dequeue()
    worker.huey.execute(task, timestamp=FAR_FUTURE)
    assert reload(gen).fal_request_id is None and reload(gen).status == "queued"
    assert "Повторная попытка (2/%d)" % worker.MAX_ATTEMPTS in fake_telegram.message(TELEGRAM_ID, status.message_id)["text"]
    drain()
    gen = reload(gen)
    assert gen.status == "delivered" and gen.attempts == 2
    first, second = fake_fal.submissions
    assert gen.fal_request_id == second["request_id"] != first["request_id"]
    assert ledger_kinds(gen) == ["reserve", "commit"]
    audit_ok()


def test_requests_failing_every_time_end_after_the_attempt_cap_and_are_released(pipeline, fake_telegram, fake_fal):
    user = make_user(fake_telegram)
    fake_fal.set_default("error500")
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="a cat")
    assert drain() == worker.MAX_ATTEMPTS
    gen = reload(gen)
    assert gen.status == "failed" and gen.attempts == worker.MAX_ATTEMPTS
    assert len(fake_fal.submissions) == worker.MAX_ATTEMPTS             # each retry a new request
    assert Reservation.get_by_id(gen.reservation_id).state == "released"
    assert "Сервис генерации сейчас недоступен" in fake_telegram.last_message(TELEGRAM_ID)["text"]
    audit_ok()


def test_a_retry_is_scheduled_with_backoff_and_the_job_waits_in_queued(pipeline, fake_telegram, fake_fal):
    user = make_user(fake_telegram)
    fake_fal.script("error500")
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="a cat")
    task = worker.huey.dequeue()
    before = utcnow()
    worker.huey.execute(task)
    (retry,) = worker.huey.scheduled()
    assert retry.args == (str(gen.id),)
    delay = (retry.eta - before).total_seconds()
    assert worker.RETRY_DELAYS[0] - 1 <= delay <= worker.RETRY_DELAYS[0] + 2
    gen = reload(gen)
    assert gen.status == "queued" and gen.heartbeat_at > utcnow()   # the sweeper leaves it alone
    assert worker.sweep_once()["requeued"] == []


def test_the_whole_wait_is_capped_by_fal_timeout(pipeline, fake_telegram, fake_fal):
    """A request slower than FAL_TIMEOUT is cancelled at the cap and released; no retry starts a
    new wait past it."""
    configure(fake_telegram, fake_fal, fal_timeout=0.4)
    user = make_user(fake_telegram)
    fake_fal.script("hang")
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="slow")
    started = time.monotonic()
    assert drain() == 1
    assert time.monotonic() - started < 5
    gen = reload(gen)
    (submission,) = fake_fal.submissions
    assert gen.status == "failed" and gen.fal_request_id == submission["request_id"]
    assert fake_fal.wait_until(lambda: fake_fal.cancelled) == [submission["request_id"]]
    assert "Модель не успела ответить" in fake_telegram.last_message(TELEGRAM_ID)["text"]
    assert Reservation.get_by_id(gen.reservation_id).state == "released"
    audit_ok()


def test_retries_stop_when_their_delay_would_pass_fal_timeout(pipeline, fake_telegram, fake_fal):
    configure(fake_telegram, fake_fal, fal_timeout=20)      # the first retry waits 5 s, the second 30 s
    user = make_user(fake_telegram)
    fake_fal.set_default("error500")
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="a cat")
    assert drain() == 2
    assert reload(gen).status == "failed" and len(fake_fal.submissions) == 2
    audit_ok()


def test_submit_lost_is_a_known_duplicate_that_we_deliver_once(pipeline, fake_telegram, fake_fal):
    """Documents the hazard in media.FalGateway: fal-client re-POSTs a submit whose answer was
    lost, so Fal holds two requests (the first may be billed by Fal). We know only the second id,
    persist it, and deliver and commit once."""
    user = make_user(fake_telegram)
    fake_fal.script("submit_lost")
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="a cat")
    drain()
    gen = reload(gen)
    first, second = fake_fal.submissions
    assert first["response_dropped"] and gen.fal_request_id == second["request_id"]
    assert gen.status == "delivered" and len(fake_telegram.calls("sendPhoto")) == 1
    assert ledger_kinds(gen) == ["reserve", "commit"]
    audit_ok()


# --------------------------------------------------------------------------------------------
# Telegram side of delivery
# --------------------------------------------------------------------------------------------


def test_a_result_telegram_would_refuse_as_a_photo_is_sent_as_a_document(pipeline, fake_telegram, fake_fal):
    user = make_user(fake_telegram)
    fake_fal.script("big_result", width=12000, height=200)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="a panorama")
    drain()
    assert fake_telegram.calls("sendPhoto") == []
    (sent,) = fake_telegram.calls("sendDocument")
    assert sent.ok and sent.result["document"]["file_name"] == "medialab-generate.png"
    assert Image.open(io.BytesIO(sent.files["document"])).size == (12000, 200)
    assert sent.result["caption"].startswith("✅ Готово")
    assert fake_telegram.button_data(sent.result) == (["again:%s" % gen.id] + ["use:%s:%s" % (m, gen.id) for m in ("edit", "upscale", "add_text")] + ["menu"])
    assert reload(gen).status == "delivered"
    audit_ok()


def test_a_photo_refused_by_telegram_falls_back_to_a_document(pipeline, fake_telegram, fake_fal):
    user = make_user(fake_telegram)
    fake_telegram.fail_next("sendPhoto", 400, "Bad Request: PHOTO_INVALID_DIMENSIONS")
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="a cat")
    drain()
    assert [c.ok for c in fake_telegram.calls("sendPhoto")] == [False]
    assert [c.ok for c in fake_telegram.calls("sendDocument")] == [True]
    assert reload(gen).status == "delivered"
    assert Reservation.get_by_id(gen.reservation_id).state == "committed"


def test_telegram_429_on_send_photo_is_honoured(pipeline, fake_telegram, fake_fal):
    user = make_user(fake_telegram)
    fake_telegram.fail_next("sendPhoto", 429, retry_after=1)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="a cat")
    drain()
    first, second = fake_telegram.calls("sendPhoto")
    assert first.error["error_code"] == 429 and first.error["parameters"]["retry_after"] == 1
    assert second.ok and 0.95 <= second.time - first.time < 5.0
    assert reload(gen).status == "delivered"
    audit_ok()


def test_a_long_429_becomes_a_delayed_retry_that_resumes_the_request(pipeline, fake_telegram, fake_fal):
    user = make_user(fake_telegram)
    fake_telegram.fail_next("sendPhoto", 429, retry_after=90)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="a cat")
    worker.huey.execute(worker.huey.dequeue())
    (retry,) = worker.huey.scheduled()
    assert (retry.eta - utcnow()).total_seconds() > 85              # retry_after, not the short backoff
    drain()
    gen = reload(gen)
    assert gen.status == "delivered" and gen.attempts == 2 and len(fake_fal.submissions) == 1
    assert [c.ok for c in fake_telegram.calls("sendPhoto")] == [False, True]
    audit_ok()


# --------------------------------------------------------------------------------------------
# reservations and at-least-once
# --------------------------------------------------------------------------------------------


def test_a_reservation_expired_mid_job_still_delivers_free_and_logs_it(pipeline, fake_telegram, fake_fal, caplog):
    user = make_user(fake_telegram, credits=50, free_ops=0)
    fake_fal.script("latency", seconds=0.8)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="a cat")
    task = worker.huey.dequeue()
    runner = threading.Thread(target=worker.huey.execute, args=(task,))
    with caplog.at_level("WARNING", logger="worker"):
        runner.start()
        fake_fal.wait_for_submissions(1)
        # the sweeper decides the reservation is too old while Fal is still working
        later = utcnow() + datetime.timedelta(seconds=pipeline.reservation_ttl + 1)
        assert billing.expire_stale(later) == [gen.reservation_id]
        runner.join(10)
    gen = reload(gen)
    assert gen.status == "delivered"
    (sent,) = fake_telegram.calls("sendPhoto")
    assert "Бесплатно: время резерва истекло" in sent.result["caption"]
    assert Reservation.get_by_id(gen.reservation_id).state == "expired"
    assert ledger_kinds(gen) == ["reserve", "expire"]
    assert billing.get_balance(user.id).credits == 50
    assert any("delivered FREE" in r.getMessage() and str(gen.id) in r.getMessage() for r in caplog.records)
    audit_ok()


def test_running_the_task_twice_delivers_once_and_commits_once(pipeline, fake_telegram, fake_fal):
    user = make_user(fake_telegram)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="a cat")
    worker.run_generation.call_local(str(gen.id))
    worker.run_generation.call_local(str(gen.id))
    worker.run_generation(str(gen.id))                              # and a third copy via the queue
    drain()
    assert len(fake_fal.submissions) == 1 and len(fake_telegram.calls("sendPhoto")) == 1
    assert ledger_kinds(gen) == ["reserve", "commit"] and reload(gen).attempts == 1
    audit_ok()


def test_two_workers_racing_on_one_job_deliver_once(pipeline, fake_telegram, fake_fal):
    user = make_user(fake_telegram)
    fake_fal.script("latency", seconds=0.2)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="a cat")
    start = threading.Barrier(2)

    def run():
        start.wait()
        worker.run_generation.call_local(str(gen.id))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(fake_fal.submissions) == 1 and len(fake_telegram.calls("sendPhoto")) == 1
    assert ledger_kinds(gen) == ["reserve", "commit"]
    audit_ok()


# --------------------------------------------------------------------------------------------
# a real consumer, SIGKILLed mid-job
# --------------------------------------------------------------------------------------------


def forward(source, target) -> int:
    """Move every serialized task from `source` (worker.huey here) to `target` (the consumer's
    SQLite queue): the sweeper ran in this process, the consumer runs elsewhere."""
    moved = 0
    while (data := source.storage.dequeue()) is not None:
        target.storage.enqueue(data, 0)
        moved += 1
    return moved


def test_a_sigkilled_worker_is_resumed_by_the_sweeper_with_the_same_request(
        pipeline, db_url, fake_telegram, fake_fal, tmp_path):
    queue_path = str(tmp_path / "queue.db")
    queue = worker.make_huey("sqlite:///" + queue_path)
    env = consumer_env(db_url, queue_path, fake_telegram, fake_fal)
    user = make_user(fake_telegram, credits=30, free_ops=0)
    fake_fal.script("latency", seconds=2.5)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="survive a crash")
    assert forward(worker.huey, queue) == 1

    first_log = tmp_path / "consumer-1.log"
    first = start_consumer(env, first_log)
    try:
        stored = poll(lambda: reload(gen).fal_request_id, what="request id stored", log=first_log)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        stop(first)
    gen = reload(gen)
    assert gen.status == "running" and gen.fal_request_id == stored
    assert fake_telegram.calls("sendPhoto") == []

    second_log = tmp_path / "consumer-2.log"
    second = start_consumer(env, second_log)
    try:
        later = utcnow() + datetime.timedelta(seconds=worker.HEARTBEAT_STALE + 5)
        report = worker.sweep_once(now=later)
        assert report["resumed"] == [str(gen.id)] and report["expired"] == []
        assert forward(worker.huey, queue) == 1
        poll(lambda: reload(gen).status == "delivered", what="delivery after resume", log=second_log)
    finally:
        stop(second)
    log = (tmp_path / "consumer-2.log").read_text(errors="replace")
    gen = reload(gen)
    assert len(fake_fal.submissions) == 1 and gen.fal_request_id == stored, log
    assert gen.attempts == 2
    assert len([c for c in fake_telegram.calls("sendPhoto") if c.ok]) == 1
    assert ledger_kinds(gen) == ["reserve", "commit"]
    assert billing.get_balance(user.id).credits == 20
    assert "resuming" in log and stored in log
    audit_ok()


# --------------------------------------------------------------------------------------------
# cancel (issue 9 §4): never a release for an image that was or will be delivered
# --------------------------------------------------------------------------------------------


def _one_timed_out_attempt(fake_telegram, fake_fal, latency):
    """A job queued for another run with its Fal request id stored while Fal still works on it.

    (Since issue 11 §3 a timeout spends the whole FAL_TIMEOUT and is not retried, so the state is
    made as a run interrupted after its submit leaves it: the request submitted and its id stored,
    the job queued, its task in the queue.)"""
    cfg = configure(fake_telegram, fake_fal)
    user = make_user(fake_telegram, credits=10, free_ops=0)
    fake_fal.script("latency", seconds=latency)
    gen = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="cancel me")
    request = media.build_request("generate", "cancel me", [], cfg)

    def store(request_id):
        Generation.update(fal_request_id=request_id, endpoint=request.endpoint).where(Generation.id == gen.id).execute()

    with pytest.raises(media.ProviderTimeout):
        media.backend(cfg).run(request, request_id=None, on_enqueue=store, timeout=0.3, cancel_on_timeout=False)
    gen = reload(gen)
    assert gen.status == "queued" and gen.fal_request_id
    return user, gen


def test_cancel_of_a_submitted_job_releases_only_when_fal_confirms(pipeline, fake_telegram, fake_fal):
    user, gen = _one_timed_out_attempt(fake_telegram, fake_fal, latency=30)
    assert worker.cancel_generation(gen.id, user.id) is True            # Fal: CANCELLATION_REQUESTED
    assert fake_fal.cancelled == [gen.fal_request_id]
    drain()                                                             # the scheduled retry finds it canceled
    gen = reload(gen)
    assert gen.status == "canceled" and fake_telegram.calls("sendPhoto") == []
    assert ledger_kinds(gen) == ["reserve", "release"] and billing.get_balance(user.id).credits == 10
    audit_ok()


def test_cancel_after_fal_finished_is_refused_and_the_image_is_delivered_and_charged(
        pipeline, fake_telegram, fake_fal):
    user, gen = _one_timed_out_attempt(fake_telegram, fake_fal, latency=0.5)
    fake_fal.wait_until(lambda: fake_fal.submission(gen.fal_request_id)["status"] == "COMPLETED", timeout=5)
    assert worker.cancel_generation(gen.id, user.id) is False           # Fal: ALREADY_COMPLETED
    assert Reservation.get_by_id(gen.reservation_id).state == "reserved"
    drain()
    gen = reload(gen)
    assert gen.status == "delivered" and len(fake_fal.submissions) == 1
    assert ledger_kinds(gen) == ["reserve", "commit"] and billing.get_balance(user.id).credits == 0
    audit_ok()


def test_cancel_is_refused_for_a_sent_image_and_for_a_run_that_may_submit_any_moment(
        pipeline, fake_telegram, fake_fal):
    user = make_user(fake_telegram, credits=20, free_ops=0)
    sent = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="a")
    starting = worker.accept_generation(user, TELEGRAM_ID, "generate", prompt="b")
    worker.huey.flush()
    Generation.update(status="running", result_message_id=99).where(Generation.id == sent.id).execute()
    Generation.update(status="running").where(Generation.id == starting.id).execute()
    assert worker.cancel_generation(sent.id, user.id) is False
    assert worker.cancel_generation(starting.id, user.id) is False
    assert worker.cancel_generation(starting.id, user.id + 1) is False  # not this user's
    assert {Reservation.get_by_id(g.reservation_id).state for g in (sent, starting)} == {"reserved"}
    assert fake_fal.cancelled == []
