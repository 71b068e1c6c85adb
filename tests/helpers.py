"""Plain helpers the test modules share; fixtures live in tests/conftest.py.

No test module imports another test module (tests/test_standalone.py checks): what two modules need
lives here. Project modules are imported at the top, so this module is imported only after
tests/conftest.py has installed the test environment (conftest imports it after doing so).

* ``audit_ok`` — the ledger audit, asserted clean.
* ``yookassa_fixture`` — a captured YooKassa body from tests/fixtures/yookassa/.
* The bot harness (``Harness``, ``harness_for``, ``USER``, ``ADMIN``, ``png``, ``user_row``) used by
  tests/test_bot*.py; the ``app`` fixture in conftest builds one.
* Pipeline helpers (``configure``, ``make_user``, ``drain``, ``photo``, ``ledger_kinds``, ``reload``,
  ``consumer_env``, ``start_consumer``, ``poll``, ``stop``) used by tests/test_pipeline.py,
  tests/test_worker.py and tests/test_worker_report.py.
"""
import datetime
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

from PIL import Image

import billing
import bot
import config
import promo
import worker
from models import Generation, LedgerEntry, User

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
YOOKASSA_FIXTURES = os.path.join(ROOT, "tests", "fixtures", "yookassa")
FAR_FUTURE = datetime.datetime(2100, 1, 1)
TELEGRAM_ID = 555001


def postgres_url() -> str:
    """TEST_POSTGRES_URL, or "" (PostgreSQL tests skip)."""
    return os.environ.get("TEST_POSTGRES_URL", "")


def audit_ok(now=None):
    """Run the ledger audit and assert it found nothing; return the report."""
    report = billing.audit(now=now)
    assert report.ok, "audit violations:\n" + "\n".join(report.violations)
    return report


def yookassa_fixture(name: str) -> bytes:
    """The captured YooKassa body ``tests/fixtures/yookassa/<name>.json``, as bytes."""
    with open(os.path.join(YOOKASSA_FIXTURES, name + ".json"), "rb") as f:
        return f.read()


# --- the bot harness -------------------------------------------------------------------------

USER = 501
ADMIN = 1000          # ADMIN_IDS in tests/conftest.py


def base(data: str) -> str:
    """Callback data without its flow token (``ratio:16:9~k3x9q2`` → ``ratio:16:9``)."""
    return data.split(bot.TOKEN_SEP, 1)[0]


def fake_button_data(message: dict) -> list[str]:
    """The full callback data of a message's inline buttons."""
    keyboard = (message or {}).get("reply_markup") or {}
    return [b["callback_data"] for row in keyboard.get("inline_keyboard", []) for b in row if "callback_data" in b]


def buttons(message: dict) -> list[str]:
    """The callback data of a message's buttons, flow tokens left out."""
    return [base(d) for d in fake_button_data(message)]


def worker_button_data(message: dict) -> list[str]:
    """The callback data of a message's inline buttons (the worker's messages carry no flow token)."""
    return fake_button_data(message)


def png(width=256, height=192, color=(40, 120, 200)) -> bytes:
    """A small valid PNG."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


class Harness:
    """One bot plus the fakes: play a user, pump updates into the bot, run queued jobs."""

    def __init__(self, fake, cfg, *, threaded=False):
        self.fake = fake
        self.cfg = cfg
        self.bot = bot.create_bot(cfg, threaded=threaded)
        self.offset = 0

    # -- the bot side -------------------------------------------------------------------------

    def fetch(self) -> list:
        """getUpdates from the fake (confirming what was fetched before), as telebot Updates.

        No long poll: telebot sends `long_polling_timeout` as getUpdates' `timeout` and replaces 0
        by its 10 s default, so a tiny value is passed (the fake reads it as 0)."""
        updates = self.bot.get_updates(offset=self.offset + 1, long_polling_timeout=0.001)
        if updates:
            self.offset = updates[-1].update_id
        return updates

    def process_concurrently(self, updates: list) -> None:
        """Process `updates` at the same moment, one thread each (how a threaded bot meets an album
        or a double tap); returns when all are done."""
        barrier = threading.Barrier(len(updates))

        def run(update):
            barrier.wait(5)
            self.bot.process_new_updates([update])

        threads = [threading.Thread(target=run, args=(u,)) for u in updates]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)

    def pump(self) -> int:
        """Fetch and process every pending update (inline: a non-threaded bot); return the count."""
        total = 0
        while True:
            updates = self.fetch()
            if not updates:
                return total
            self.bot.process_new_updates(updates)
            total += len(updates)

    def restart(self):
        """A new bot object (as after a process restart), continuing from the same offset."""
        self.bot = bot.create_bot(self.cfg, threaded=False)
        return self.bot

    def run_jobs(self) -> int:
        """Run every task queued in the MemoryHuey (the worker's consumer, inline); return the count."""
        count = 0
        while True:
            task = worker.huey.dequeue()
            if task is None:
                return count
            worker.huey.execute(task)
            count += 1

    # -- the user side ------------------------------------------------------------------------

    def send(self, text, user=USER, **kw) -> list[dict]:
        """The user sends `text`; return the bot's messages sent in reply."""
        since = len(self.fake.messages(user))
        self.fake.send_text(user, text, **kw)
        self.pump()
        return self.fake.messages(user)[since:]

    def photo(self, data=None, user=USER, **kw) -> list[dict]:
        since = len(self.fake.messages(user))
        self.fake.send_photo(user, data or png(), **kw)
        self.pump()
        return self.fake.messages(user)[since:]

    def document(self, data, *, file_name, mime_type, user=USER, **kw) -> list[dict]:
        since = len(self.fake.messages(user))
        self.fake.send_document(user, data, file_name=file_name, mime_type=mime_type, **kw)
        self.pump()
        return self.fake.messages(user)[since:]

    def message_with(self, data, user=USER) -> dict:
        """The latest bot message that shows a button with callback `data`."""
        for message in reversed(self.fake.messages(user)):
            if data in fake_button_data(message) or data in buttons(message):
                return message
        raise AssertionError("no bot message with button %r; last: %r" % (data, self.fake.last_message(user)))

    def press(self, data, user=USER, message=None, **kw) -> list[dict]:
        """Press the button `data` on the latest message showing it; assert the callback was answered;
        return the bot's new messages."""
        message = message or self.message_with(data, user)
        since = len(self.fake.messages(user))
        update = self.fake.press(user, message["message_id"], self.full(message, data), **kw)
        self.pump()
        query_id = update["callback_query"]["id"]
        assert self.fake.answers(query_id), "callback %r was not answered" % data
        return [m for m in self.fake.messages(user)[since:]]

    @staticmethod
    def full(message: dict, data: str) -> str:
        """The full callback data (with the flow token) of the button `data` on `message`."""
        for full in fake_button_data(message or {}):
            if full == data or base(full) == data:
                return full
        return data

    def answer_text(self, data, user=USER, message=None, **kw) -> str | None:
        """Press `data` and return the text of the callback answer (the toast)."""
        message = message or self.message_with(data, user)
        update = self.fake.press(user, message["message_id"], self.full(message, data), **kw)
        self.pump()
        answers = self.fake.answers(update["callback_query"]["id"])
        assert answers, "callback %r was not answered" % data
        return answers[0].get("text")


def harness_for(fake_telegram, fake_fal):
    """Yield a Harness with the configuration pointed at the fakes, the default promo codes and an
    empty queue (the body of the `app` fixtures; needs the `database` fixture)."""
    cfg = config.configure(config.get().replace(
        telegram_api_url=fake_telegram.url, fal_key="test-fal-key", fal_queue_url=fake_fal.url,
        fal_poll_interval=0.02))
    promo.seed_defaults()
    worker.huey.flush()
    yield Harness(fake_telegram, cfg)
    worker.huey.flush()


def user_row(telegram_id=USER) -> User:
    return User.get(User.telegram_id == telegram_id)


# --- the job pipeline ------------------------------------------------------------------------


def photo(color=(200, 60, 60), size=(320, 240), fmt="JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


def configure(fake_telegram, fake_fal=None, **overrides) -> config.Config:
    """Install the current config pointed at the fakes (Fal only when `fake_fal` is given)."""
    changes = dict(telegram_api_url=fake_telegram.url, fal_poll_interval=0.02)
    if fake_fal is not None:
        changes.update(fal_queue_url=fake_fal.url, fal_key="test-fal-key")
    else:
        changes.update(fal_key="")
    changes.update(overrides)
    return config.configure(config.get().replace(**changes))


def make_user(fake_telegram, telegram_id=TELEGRAM_ID, *, credits=0, free_ops=None, language_code="ru"):
    fake_telegram.add_user(telegram_id, language_code=language_code)
    user, _ = billing.get_or_create_user(telegram_id, first_name="Tester", language_code=language_code,
                                         free_operations=free_ops)
    if credits:
        billing.credit(user.id, credits, kind="grant", reference="test", idempotency_key="grant:%s" % telegram_id)
    return user


def drain(huey=None, rounds=20) -> int:
    """Run every queued task, then every scheduled one (retries), until both are empty.

    Returns how many tasks ran. A retry's delay is not waited for: its eta is treated as due."""
    huey = huey or worker.huey
    ran = 0
    for _ in range(rounds):
        task = huey.dequeue()
        if task is not None:
            huey.execute(task, timestamp=FAR_FUTURE)
            ran += 1
            continue
        scheduled = huey.read_schedule(FAR_FUTURE)
        if not scheduled:
            return ran
        for task in scheduled:
            huey.execute(task, timestamp=FAR_FUTURE)
            ran += 1
    raise AssertionError("the queue did not drain in %d rounds" % rounds)


def ledger_kinds(gen) -> list:
    reference = "generation:%s" % gen.id
    return [row.kind for row in LedgerEntry.select().where(LedgerEntry.reference == reference).order_by(LedgerEntry.id)]


def reload(gen) -> Generation:
    return Generation.get_by_id(gen.id)


def consumer_env(db_url, queue_path, fake_telegram, fake_fal) -> dict:
    env = dict(os.environ)
    fake_fal.key = "test-fal-id:test-fal-key"       # FAL_KEY must look like a real key: key_id:key_secret
    env.update(DATABASE_URL=db_url, QUEUE_URL="sqlite:///" + queue_path, TELEGRAM_API_URL=fake_telegram.url,
               FAL_KEY=fake_fal.key, FAL_QUEUE_URL=fake_fal.url, FAL_POLL_INTERVAL="0.05", LOG_LEVEL="INFO",
               PYTHONPATH=ROOT)
    return env


def start_consumer(env, log_path, workers=2) -> subprocess.Popen:
    log = open(log_path, "ab")
    return subprocess.Popen(
        [os.path.join(BIN, "huey_consumer"), "worker.huey", "-w", str(workers), "-k", "thread", "-f",
         "-n", "-d", "0.02", "-m", "0.1", "-C"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def poll(predicate, timeout=60.0, what="condition", log=None):
    """Re-check `predicate` every 20 ms until it is truthy (return it) or `timeout` seconds pass
    (AssertionError with the tail of the consumer's `log` file, if given)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    tail = open(log, errors="replace").read()[-3000:] if log and os.path.exists(log) else ""
    raise AssertionError("%s not reached within %s s\n%s" % (what, timeout, tail))


def stop(proc, sig=signal.SIGINT, timeout=10):
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def shop(fake_yookassa):
    """A generator fixture body: the configuration pointed at `fake_yookassa`, the default promo
    codes, one payer (888000, no free operations) and an empty queue, as SimpleNamespace(cfg, fake,
    user); the queue is emptied again afterwards."""
    cfg = config.configure(config.get().replace(yookassa_api_url=fake_yookassa.api_url, yookassa_timeout=1.0))
    promo.seed_defaults()
    user, _ = billing.get_or_create_user(888000, first_name="Payer", free_operations=0)
    worker.huey.flush()
    yield SimpleNamespace(cfg=cfg, fake=fake_yookassa, user=user)
    worker.huey.flush()


YK_IP = "185.71.76.1"     # inside YooKassa's published notification networks


def envelope(fake, event: str, object_id: str, **changes) -> bytes:
    """The notification YooKassa would POST for the fake's current object (with `changes` applied)."""
    table = fake.refunds if event.startswith("refund.") else fake.payments
    obj = json.loads(json.dumps(table[object_id]))
    obj.update(changes)
    return json.dumps({"type": "notification", "event": event, "object": obj}).encode()
