"""Benchmark: bot responsiveness under load (issue 13 §1), keys ``bot_*``.

N simulated users (default 1,000) talk to the real ``python bot.py`` (long polling) through the
fake Bot API (tests/fakes/telegram.py), with a zero-latency fake Fal and a fake YooKassa behind
and a real huey consumer running the jobs. Each user repeats one script — tap a mode
(``mode:generate``), send a prompt, tap an aspect ratio (a job is reserved and queued), send
/balance, tap a top-up amount (a YooKassa payment is created), /start — one step at a time: a
user's next update is sent only after the bot finished answering the previous one (its
sendMessage arrived) and at least THINK seconds passed. Before the measurement every user sends
/start once (the unmeasured warm-up: users are created, the menu is shown); then each user starts
at a random point of the script, so the mix of updates is even.

The offered rate is ramped (RATES updates/s, STEP seconds each), open loop: updates go out on
schedule whatever the bot's backlog. Per rate: update → first reply (the fake receives
sendMessage / editMessageText in the user's chat, or answerCallbackQuery for the pressed button;
the fake stamps the request's arrival) p50/p99, the rate achieved, updates without a reply within
REPLY_TIMEOUT (errors) and error replies (the generic error text). ``bot_sustained_rate`` is the
highest offered rate whose p99 stayed under 250 ms with no error and ≥ 95 % of it achieved.

Baseline in the same run: a minimal pyTelegramBotAPI bot with the same number of handler threads
answering every update with one message (sendMessage showing the three buttons the driver presses,
answerCallbackQuery for a button), driven by the same driver. ``bot_sustained_ratio`` = product / baseline.

The fake and the driver share one child process (the driver reads the fake's call log directly);
the bot, the consumer, the fake Fal and the fake YooKassa are separate processes, as in
production. ``python bench/bench_bot.py [--quick] [--users N]`` prints the figures as JSON.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TOKEN = "123456:BENCH-BOT-TOKEN"
USERS = 1000
RATES = (20, 50, 100, 150, 200)
STEP = 4.0                 # seconds per rate
THINK = 1.0                # seconds a user waits at least between two updates
REPLY_TIMEOUT = 10.0       # an update without a reply after this long is an error
TARGET_P99_MS = 250.0
BOT_THREADS = 4            # create_bot's default; the baseline uses the same
START_DEADLINE = 60.0
FIRST_USER = 700_000_000

def baseline_bot(api_url: str, token: str, *, threaded: bool, num_threads: int = 1):
    """The baseline: a minimal pyTelegramBotAPI bot answering every message with one message that
    shows the three buttons the driver presses, and every button with answerCallbackQuery. Polled
    in its own process (`BASELINE_BOT`) or served by `baseline_webhook_app`."""
    import telebot
    from telebot import apihelper, types

    apihelper.API_URL = api_url + "/bot{0}/{1}"
    bot = telebot.TeleBot(token, threaded=threaded, num_threads=num_threads)
    markup = types.InlineKeyboardMarkup()
    for data in ("mode:generate", "ratio:1:1", "amount:100"):   # the buttons the driver presses
        markup.add(types.InlineKeyboardButton(data, callback_data=data))

    @bot.message_handler(func=lambda m: True, content_types=["text"])
    def on_message(message):
        bot.send_message(message.chat.id, "ok", reply_markup=markup)

    @bot.callback_query_handler(func=lambda c: True)
    def on_callback(call):
        bot.answer_callback_query(call.id, "ok")

    return bot


# argv: API URL, token, threads (run with cwd=ROOT).
BASELINE_BOT = """
import sys
sys.path.insert(0, ".")
from bench.bench_bot import baseline_bot
bot = baseline_bot(sys.argv[1], sys.argv[2], threaded=True, num_threads=int(sys.argv[3]))
bot.infinity_polling(timeout=30, long_polling_timeout=25, allowed_updates=["message", "callback_query"])
"""

WEBHOOK_SECRET = "bench-webhook-secret-0123456789"
WEBHOOK_PATH = "/telegram/webhook"
WEBHOOK_PROCESSES = 2


def baseline_webhook_app():
    """The webhook-mode baseline (a gunicorn factory): a minimal pyTelegramBotAPI bot answering
    every update inline with one message, at the same path, with the same secret check."""
    import hmac

    from flask import Flask, request
    from telebot import types

    bot = baseline_bot(os.environ["TELEGRAM_API_URL"], TOKEN, threaded=False)

    app = Flask("baseline")

    @app.post(WEBHOOK_PATH)
    def hook():
        if not hmac.compare_digest(request.headers.get("X-Telegram-Bot-Api-Secret-Token", ""), WEBHOOK_SECRET):
            return "", 403
        bot.process_new_updates([types.Update.de_json(request.get_data(as_text=True))])
        return "", 200

    return app


# The script every user repeats: (kind, payload). "press" needs a bot message showing the button.
SCRIPT = (("press", "mode:generate"), ("text", "a red fox in the snow, number {n}"), ("press", "ratio:1:1"),
          ("text", "/balance"), ("press", "amount:100"), ("text", "/start"))
# Positions a user may start at after the warm-up /start (its last message is the menu).
ENTRY_POINTS = (0, 3, 5)
REPLY_METHODS = frozenset({"sendMessage", "editMessageText"})


def _percentile(values, q):
    ordered = sorted(values)
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


# --------------------------------------------------------------------------------------------
# the driver (in the fake's process)
# --------------------------------------------------------------------------------------------


class _Driver:
    """Plays USERS users against `fake` (one update at a time each) and records reply latencies."""

    def __init__(self, fake, users: int, baseline: bool, seed: int = 7, hook: str | None = None):
        self.fake = fake
        self.hook = hook                 # webhook mode: POST each update there (like Telegram, 40 connections)
        self.pool = None
        if hook:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=40)
            self.sessions = threading.local()
        self.baseline = baseline
        self.rng = random.Random(seed)
        self.users = [FIRST_USER + n for n in range(users)]
        self.pos = {u: 0 for u in self.users}
        self.pending: dict = {}          # user -> dict(t0, qid, step, first)
        self.idle: list = []             # (ready_at, user), FIFO by ready time
        self.lock = threading.Lock()
        self.results: list = []          # (step, latency_ms or None, error_reply)
        self.seen = 0
        self.stop = threading.Event()
        self.error_text = None
        try:
            import texts

            self.error_text = texts.t("error_generic", "ru")
        except Exception:  # noqa: BLE001 - the baseline needs no texts
            pass

    # -- the reply watcher --------------------------------------------------------------------

    def _watch(self):
        while not self.stop.is_set():
            self._scan()
            self.stop.wait(0.01)
        self._scan()

    def _scan(self):
        calls = self.fake.calls()
        new, self.seen = calls[self.seen:], len(calls)
        now = time.time()
        with self.lock:
            for call in new:
                if call.method == "answerCallbackQuery":
                    qid = str(call.params.get("callback_query_id"))
                    user = self._by_qid.get(qid)
                elif call.method in REPLY_METHODS:
                    user = call.chat_id
                else:
                    continue
                entry = self.pending.get(user)
                if entry is None or call.time < entry["t0"]:
                    continue
                if entry["first"] is None:
                    entry["first"] = call.time
                    entry["error"] = bool(self.error_text and self.error_text in str(call.params.get("text", "")))
                done = self.baseline or call.method == "sendMessage"
                if done:
                    self._finish(user, entry)
            for user, entry in list(self.pending.items()):
                if now - entry["t0"] > REPLY_TIMEOUT:
                    self._finish(user, entry)

    _by_qid: dict = {}

    def _finish(self, user, entry):
        del self.pending[user]
        if entry.get("qid"):
            self._by_qid.pop(entry["qid"], None)
        latency = (entry["first"] - entry["t0"]) * 1000 if entry["first"] is not None else None
        if entry["step"] is not None:
            self.results.append((entry["step"], latency, entry.get("error", False)))
        self.pos[user] = (self.pos[user] + 1) % len(SCRIPT) if entry["first"] is not None else 5
        self.idle.append((time.monotonic() + THINK, user))

    # -- sending ------------------------------------------------------------------------------

    def _button_message(self, user, data):
        for message in reversed(self.fake.messages(user)):
            if data in self.fake.button_data(message):
                return message
        return None

    def _act(self, user, step):
        kind, payload = SCRIPT[self.pos[user]]
        message = None
        if kind == "press":
            message = self._button_message(user, payload)
            if message is None:                      # out of step (an error reply): start over
                self.pos[user] = 5
                kind, payload = SCRIPT[5]
        entry = {"t0": time.time(), "first": None, "step": step, "qid": None}
        with self.lock:
            self.pending[user] = entry
        if kind == "press":
            update = self.fake.press(user, message["message_id"], payload, first_name="Load")
            qid = update["callback_query"]["id"]
            with self.lock:
                entry["qid"] = qid
                self._by_qid[qid] = user
        else:
            update = self.fake.send_text(user, payload.format(n=self.rng.randrange(10**6)), first_name="Load")
        if self.pool is not None:
            self.pool.submit(self._post, update)

    def _post(self, update):
        import requests

        session = getattr(self.sessions, "session", None)
        if session is None:
            session = self.sessions.session = requests.Session()
        try:
            session.post(self.hook, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": WEBHOOK_SECRET},
                         timeout=REPLY_TIMEOUT)
        except Exception:  # noqa: BLE001 - shows as an update without a reply
            pass

    def _next_idle(self, deadline):
        while time.monotonic() < deadline:
            with self.lock:
                if self.idle and self.idle[0][0] <= time.monotonic():
                    return self.idle.pop(0)[1]
            time.sleep(0.001)
        return None

    def _wait_replies(self, timeout: float) -> None:
        """Poll (every 20 ms, at most `timeout` seconds) until no update waits for its reply."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if not self.pending:
                    return
            time.sleep(0.02)

    def warm_up(self, rate: float, timeout: float) -> float:
        """Every user sends /start at `rate`; wait for all the menus; return the seconds taken."""
        self._by_qid = {}
        began = time.monotonic()
        for n, user in enumerate(self.users):
            delay = began + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.pos[user] = 5
            self._act(user, None)
        self._wait_replies(timeout)
        with self.lock:
            for user in self.users:
                self.pos[user] = self.rng.choice(ENTRY_POINTS)
            self.idle.sort()
        return time.monotonic() - began

    def ramp(self, rates, step_seconds):
        """Offer each rate for `step_seconds`; return per-rate figures."""
        per_rate = []
        for index, rate in enumerate(rates):
            began = time.monotonic()
            sent, starved = 0, 0
            total = int(rate * step_seconds)
            for n in range(total):
                at = began + n / rate
                delay = at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                user = self._next_idle(at + 0.5)
                if user is None:
                    starved += 1
                    continue
                self._act(user, index)
                sent += 1
            per_rate.append({"rate": rate, "sent": sent, "starved": starved,
                             "seconds": time.monotonic() - began})
            with self.lock:
                late = [r for r in self.results if r[0] == index and (r[1] is None or r[1] > 1000)]
            if index >= 1 and len(late) > 0.2 * max(1, sent):
                break                                  # far past saturation: stop the ramp
        self._wait_replies(REPLY_TIMEOUT + 1)
        with self.lock:
            results = list(self.results)
        out = []
        for index, info in enumerate(per_rate):
            mine = [r for r in results if r[0] == index]
            latencies = [r[1] for r in mine if r[1] is not None]
            out.append(dict(info, replied=len(latencies), no_reply=len(mine) - len(latencies),
                            error_replies=sum(1 for r in mine if r[2]),
                            p50_ms=_percentile(latencies, 0.5), p99_ms=_percentile(latencies, 0.99),
                            achieved=round(info["sent"] / info["seconds"], 1)))
        return out


def _fake_main(users: int, baseline: bool, rates, step_seconds: float, hook: str | None = None) -> None:
    """The child process: fake Bot API + driver; prints the URL, then one JSON line of results.
    With `hook` (webhook mode) it reads that URL from stdin first and posts the updates there."""
    from tests.fakes import telegram as fake_module

    server = getattr(fake_module, "_Server", None)
    if server is not None and hasattr(server, "request_queue_size"):
        server.request_queue_size = max(server.request_queue_size, 256)
    fake = fake_module.FakeTelegram(token=TOKEN, strict_chats=False).start()
    print(fake.url, flush=True)
    if hook:
        hook = sys.stdin.readline().strip()             # the parent says where once the server answers
    else:
        fake.wait_until_polling(timeout=START_DEADLINE)
    driver = _Driver(fake, users, baseline, hook=hook)
    watcher = threading.Thread(target=driver._watch, daemon=True)
    watcher.start()
    warm = driver.warm_up(rate=100.0, timeout=120.0)
    steps = driver.ramp(rates, step_seconds)
    driver.stop.set()
    watcher.join(5)
    print(json.dumps({"warm_up_s": round(warm, 1), "steps": steps}), flush=True)
    sys.stdin.read()
    fake.stop()


# --------------------------------------------------------------------------------------------
# the parent: processes and figures
# --------------------------------------------------------------------------------------------


def _readline(process, timeout):
    import select

    ready, _, _ = select.select([process.stdout], [], [], timeout)
    return process.stdout.readline().strip() if ready else ""


def _stop(process, sig=signal.SIGTERM, timeout=15):
    from bench.bench_pipeline import stop_process

    stop_process(process, sig, timeout)


def _child(script: str):
    process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, cwd=ROOT)
    url = _readline(process, START_DEADLINE)
    if not url.startswith("http://127.0.0.1:"):
        _stop(process)
        raise RuntimeError("a fake did not start")
    return process, url


FAKE_FAL = """
import sys
sys.path.insert(0, %r)
from tests.fakes import fal as m
server = getattr(m, "_Server", None)
if server is not None:
    server.request_queue_size = 256
fake = m.FakeFal(key="bench-fal-id:bench-fal-key").start()
print(fake.url, flush=True)
sys.stdin.read()
fake.stop()
"""

FAKE_YOOKASSA = """
import sys
sys.path.insert(0, %r)
from tests.fakes import yookassa as m
server = getattr(m, "_Server", None)
if server is not None:
    server.request_queue_size = 256
fake = m.FakeYooKassa().start()
print(fake.url, flush=True)
sys.stdin.read()
fake.stop()
"""


def _gunicorn(app: str, env: dict, log, port: int):
    bin_dir = os.path.dirname(sys.executable)
    return subprocess.Popen([os.path.join(bin_dir, "gunicorn"), "-w", str(WEBHOOK_PROCESSES), "-k", "gthread",
                             "--threads", str(BOT_THREADS), "-b", "127.0.0.1:%d" % port, "--timeout", "30", app],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_listening(port: int, deadline: float) -> bool:
    import socket

    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def _one(kind: str, users: int, rates, step_seconds: float, tmp: str, env_extra: dict, webhook: bool = False) -> dict:
    """Run the driver against the product (kind="product") or the baseline bot; return its JSON.
    `webhook`: both run as WEBHOOK_PROCESSES gunicorn workers and the driver posts the updates."""
    args = [sys.executable, os.path.abspath(__file__), "--fake", str(users), "1" if kind == "baseline" else "0",
            ",".join(str(r) for r in rates), str(step_seconds)]
    if webhook:
        args.append("webhook")
    driver = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    processes = []
    try:
        url = _readline(driver, START_DEADLINE)
        if not url.startswith("http://127.0.0.1:"):
            raise RuntimeError("the fake Bot API did not start")
        log = open(os.path.join(tmp, "%s%s.log" % (kind, "-webhook" if webhook else "")), "ab")
        if webhook:
            import socket

            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            env = dict(env_extra, TELEGRAM_API_URL=url, TELEGRAM_WEBHOOK_URL="https://bot.example.com" + WEBHOOK_PATH,
                       TELEGRAM_WEBHOOK_SECRET=WEBHOOK_SECRET)
            if kind == "product":
                processes.append(subprocess.Popen(
                    [os.path.join(os.path.dirname(sys.executable), "huey_consumer"), "worker.huey", "-w", "4", "-k",
                     "thread", "-d", "0.01", "-m", "1", "-f", "-g", "INT", "-t", "60"], cwd=ROOT, env=env, stdout=log,
                    stderr=subprocess.STDOUT))
            processes.append(_gunicorn("bot:create_webhook_app()" if kind == "product"
                                       else "bench.bench_bot:baseline_webhook_app()", env, log, port))
            if not _wait_listening(port, time.monotonic() + START_DEADLINE):
                raise RuntimeError("%s webhook server did not start (logs in %s)" % (kind, tmp))
            driver.stdin.write("http://127.0.0.1:%d%s\n" % (port, WEBHOOK_PATH))
            driver.stdin.flush()
        elif kind == "baseline":
            processes.append(subprocess.Popen([sys.executable, "-c", BASELINE_BOT, url, TOKEN, str(BOT_THREADS)],
                                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        else:
            env = dict(env_extra, TELEGRAM_API_URL=url)
            processes.append(subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "huey_consumer"),
                                               "worker.huey", "-w", "4", "-k", "thread", "-d", "0.01", "-m", "1",
                                               "-f", "-g", "INT", "-t", "60"], cwd=ROOT, env=env, stdout=log,
                                              stderr=subprocess.STDOUT))
            processes.append(subprocess.Popen([sys.executable, "bot.py"], cwd=ROOT, env=env, stdout=log,
                                              stderr=subprocess.STDOUT))
        budget = START_DEADLINE + 130 + len(rates) * (step_seconds + 2) + REPLY_TIMEOUT + 30
        line = ""
        deadline = time.monotonic() + budget
        while time.monotonic() < deadline and not line.startswith("{"):
            line = _readline(driver, max(0.1, deadline - time.monotonic()))
            if not line and driver.poll() is not None:
                break
        if not line.startswith("{"):
            raise RuntimeError("%s: the driver gave no result (logs in %s)" % (kind, tmp))
        return json.loads(line)
    finally:
        for process in reversed(processes):
            _stop(process, signal.SIGINT if len(processes) == 2 and process is processes[0] else signal.SIGTERM)
        try:
            driver.stdin.close()
        except OSError:
            pass
        _stop(driver)


def _stored(db_path: str, queue_path: str) -> dict:
    """What the run left behind (issue 13 §3: nothing grows without bound): conversation-state
    rows against users, and the queue database (jobs done are deleted; results are not stored)."""
    import sqlite3

    out = {}
    conn = sqlite3.connect(db_path)
    try:
        out["bot_users_stored"] = conn.execute('SELECT count(*) FROM "user"').fetchone()[0]
        out["bot_conversation_state_rows"] = conn.execute("SELECT count(*) FROM conversation_state").fetchone()[0]
        out["bot_generations_stored"] = conn.execute("SELECT count(*) FROM generation").fetchone()[0]
    finally:
        conn.close()
    if os.path.exists(queue_path):
        conn = sqlite3.connect(queue_path)
        try:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            out["bot_queue_rows"] = sum(conn.execute('SELECT count(*) FROM "%s"' % t).fetchone()[0] for t in tables)
        finally:
            conn.close()
        out["bot_queue_db_kb"] = round(sum(os.path.getsize(queue_path + suffix) for suffix in ("", "-wal")
                                           if os.path.exists(queue_path + suffix)) / 1024)
    return out


def _sustained(steps) -> int:
    best = 0
    for s in steps:
        ok = (s["p99_ms"] is not None and s["p99_ms"] < TARGET_P99_MS and not s["no_reply"]
              and not s["error_replies"] and s["achieved"] >= 0.95 * s["rate"])
        if ok:
            best = max(best, s["rate"])
    return best


def run(quick: bool = False, users: int = USERS, rates=None, kinds=("baseline", "product"),
        webhook: bool | None = None) -> dict:
    """Run product and baseline (about 2 × (warm-up + ramp)); return flat ``bot_*`` figures."""
    default_rates, step_seconds = ((20, 100, 200), 2.0) if quick else (RATES, STEP)
    if webhook is None:                 # webhook mode (2 gunicorn processes) too, unless quick
        webhook = not quick
    rates = tuple(rates or default_rates)
    if quick:
        users = min(users, 400)
    tmp = tempfile.mkdtemp(prefix="bench-bot-")
    db_path, queue_path = os.path.join(tmp, "medialab.db"), os.path.join(tmp, "queue.db")
    import models

    database = models.open_database("sqlite:///" + db_path)
    models.migrate(database)
    database.close()
    fal, fal_url = _child(FAKE_FAL % ROOT)
    yookassa, yookassa_url = _child(FAKE_YOOKASSA % ROOT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOOKASSA_", "FAL_", "TELEGRAM_"))}
    env.update(TELEGRAM_BOT_TOKEN=TOKEN, DATABASE_URL="sqlite:///" + db_path, QUEUE_URL="sqlite:///" + queue_path,
               FAL_KEY="bench-fal-id:bench-fal-key", FAL_QUEUE_URL=fal_url, FAL_POLL_INTERVAL="0.05", LOG_LEVEL="WARNING",
               YOOKASSA_SHOP_ID="123456", YOOKASSA_SECRET_KEY="test_secret", YOOKASSA_API_URL=yookassa_url + "/v3",
               YOOKASSA_RETURN_URL="https://t.me/medialab_bench_bot", PYTHONPATH=ROOT)
    figures: dict = {"bot_users": users, "bot_rates": ",".join(map(str, rates)), "bot_step_s": step_seconds,
                     "bot_threads": BOT_THREADS}
    ok = False
    try:
        modes = [(kind, False) for kind in kinds] + ([(kind, True) for kind in kinds] if webhook else [])
        for kind, hooked in modes:
            result = _one(kind, users, rates, step_seconds, tmp, env, webhook=hooked)
            prefix = ("bot_webhook_" if hooked else "bot_") + ("" if kind == "product" else "baseline_")
            figures[prefix + "warm_up_s"] = result["warm_up_s"]
            for s in result["steps"]:
                r = s["rate"]
                figures["%sp50_ms_at_%d" % (prefix, r)] = s["p50_ms"]
                figures["%sp99_ms_at_%d" % (prefix, r)] = s["p99_ms"]
                figures["%sachieved_at_%d" % (prefix, r)] = s["achieved"]
                figures["%serrors_at_%d" % (prefix, r)] = s["no_reply"] + s["error_replies"] + s["starved"]
            figures[prefix + "sustained_rate"] = _sustained(result["steps"])
        if "product" in kinds:
            figures.update(_stored(db_path, queue_path))
        for prefix in ("bot_", "bot_webhook_"):
            base, mine = figures.get(prefix + "baseline_sustained_rate"), figures.get(prefix + "sustained_rate")
            if base is not None or mine is not None:
                figures[prefix + "sustained_ratio"] = round(mine / base, 2) if base and mine is not None else None
        ok = True
    finally:
        _stop(fal)
        _stop(yookassa)
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            figures["bot_notes"] = "logs kept in %s" % tmp
    return figures


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--fake":
        _fake_main(int(sys.argv[2]), sys.argv[3] == "1", [int(r) for r in sys.argv[4].split(",")],
                   float(sys.argv[5]), hook=sys.argv[6] if len(sys.argv) > 6 else None)
    else:
        n = USERS
        if "--users" in sys.argv:
            n = int(sys.argv[sys.argv.index("--users") + 1])
        chosen = None
        if "--rates" in sys.argv:
            chosen = [int(r) for r in sys.argv[sys.argv.index("--rates") + 1].split(",")]
        kinds = ("product",) if "--product-only" in sys.argv else ("baseline", "product")
        hooked = True if "--webhook" in sys.argv else (False if "--no-webhook" in sys.argv else None)
        print(json.dumps(run(quick="--quick" in sys.argv, users=n, rates=chosen, kinds=kinds, webhook=hooked),
                         indent=1))
