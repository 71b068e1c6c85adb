"""Start-up that survives the network and never leaks a secret (startup.py, bot.start_up).

* The secrets filter: a record carrying the token in its arguments and traceback, telebot's own
  logger, an uncaught exception — none shows a secret.
* The checks: YooKassa /me against the fake (ok, 401 → config error, closed port → warning),
  Redis and PostgreSQL on a closed port → one line "does not answer", a SQLite path that cannot
  be opened → config error.
* The bot's start-up calls retry with a capped, jittered back-off until the fake Telegram answers;
  a wrong token is one line and exit 78.
* The three real processes run against services that refuse, hang, answer 401 and answer 500;
  their whole output is searched for every secret.
"""
import base64
import http.server
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
import requests

import bot
import config
import startup
import worker
from tests.helpers import poll

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

# Distinctive values: any of these (or a part or encoding of them) in an output is a leak.
TOKEN = "7777001:AAsecretTOKENqz9XkLmNoPqRsTuVwX1yZ"
YK_SHOP, YK_SECRET = "506751", "live_YKsecretValue8f3k2j4h5g6"
FAL_KEY = "falKeyId4d2c:falKeySecret9a8b7c6d5e4f"


def leak_forms():
    """Every form in which a secret could show up."""
    forms = {TOKEN, TOKEN.split(":")[1], urllib.parse.quote(TOKEN, safe=""), YK_SECRET, FAL_KEY,
             FAL_KEY.split(":")[1], base64.b64encode(("%s:%s" % (YK_SHOP, YK_SECRET)).encode()).decode()}
    return sorted(forms)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Hostile:
    """A loopback HTTP server that answers every request with `status` and a JSON error body in
    the Bot API shape, or, with status None, reads the request and never answers."""

    def __init__(self, status):
        self.release = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                if status is None:
                    owner.release.wait(60)        # a server that hangs; released when the test ends
                    return
                body = ('{"ok": false, "error_code": %d, "description": "scripted %d", "type": "error", '
                        '"code": "scripted"}' % (status, status)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------------------------
# the filter
# --------------------------------------------------------------------------------------------


@pytest.fixture
def secret_cfg():
    cfg = config.load({"TELEGRAM_BOT_TOKEN": TOKEN, "YOOKASSA_SHOP_ID": YK_SHOP, "YOOKASSA_SECRET_KEY": YK_SECRET,
                       "FAL_KEY": FAL_KEY})
    return cfg


def _handler_with(filter_):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(filter_)
    return stream, handler


def test_filter_redacts_message_args_and_traceback(secret_cfg):
    flt = startup.SecretFilter()
    flt.set_secrets(secret_cfg)
    stream, handler = _handler_with(flt)
    log = logging.getLogger("test_startup.filter")
    log.addHandler(handler)
    log.propagate = False
    try:
        url = "http://127.0.0.1:9/bot%s/getMe" % TOKEN
        try:
            raise requests.ConnectionError("Max retries exceeded with url: %s (key %s, %s)" % (url, FAL_KEY, YK_SECRET))
        except requests.ConnectionError:
            log.exception("call to %s failed", url)
        log.error("Basic %s", base64.b64encode(("%s:%s" % (YK_SHOP, YK_SECRET)).encode()).decode())
        log.error("someone else's bot: /bot123:ABCdef-xyz/getMe")
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert "Traceback" in text and "requests.exceptions.ConnectionError" in text
    assert "bot<TELEGRAM_BOT_TOKEN>/getMe" in text and "<FAL_KEY>" in text and "<YOOKASSA_SECRET_KEY>" in text
    assert "bot<TELEGRAM_BOT_TOKEN>/getMe" in text.splitlines()[-1]
    for form in leak_forms():
        assert form not in text


def test_telebot_logger_and_uncaught_exceptions_go_through_it(secret_cfg):
    """In a fresh process: configure_logging, then telebot's own logger (its console handler and
    the root) and an uncaught exception in the main thread and in a thread."""
    code = (
        "import config, startup, telebot, threading\n"
        "cfg = config.load({'TELEGRAM_BOT_TOKEN': %r, 'YOOKASSA_SHOP_ID': %r, 'YOOKASSA_SECRET_KEY': %r,"
        " 'FAL_KEY': %r})\n"
        "startup.configure_logging(cfg)\n"
        "telebot.logger.error('Exception traceback: url=http://x/bot%%s/getUpdates', cfg.telegram_bot_token)\n"
        "t = threading.Thread(target=lambda: 1 / 0 if False else (_ for _ in ()).throw(RuntimeError(cfg.fal_key)))\n"
        "t.start(); t.join()\n"
        "raise RuntimeError('key %%s' %% cfg.yookassa_secret_key)\n" % (TOKEN, YK_SHOP, YK_SECRET, FAL_KEY))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert text.count("bot<TELEGRAM_BOT_TOKEN>/getUpdates") == 2, text      # telebot's handler + the root's
    assert "RuntimeError: <FAL_KEY>" in text and "RuntimeError: key <YOOKASSA_SECRET_KEY>" in text
    for form in leak_forms():
        assert form not in text


# --------------------------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------------------------


def test_yookassa_keys_are_checked_with_me(cfg, fake_yookassa):
    good = cfg.replace(yookassa_api_url=fake_yookassa.api_url, yookassa_shop_id=fake_yookassa.shop_id,
                       yookassa_secret_key=fake_yookassa.secret_key, yookassa_allow_test=True)
    assert startup.check_yookassa(good) == []
    assert "YOOKASSA_ALLOW_TEST is 0" in startup.check_yookassa(good.replace(yookassa_allow_test=False))[0]
    with pytest.raises(config.ConfigError, match="refused by YooKassa \\(HTTP 401 invalid_credentials\\)") as info:
        startup.check_yookassa(good.replace(yookassa_secret_key="wrong_secret_value"))
    assert "wrong_secret_value" not in str(info.value)
    down = good.replace(yookassa_api_url="http://127.0.0.1:%d/v3" % closed_port())
    [warning] = startup.check_yookassa(down)
    assert "did not answer GET /me" in warning and "ConnectionError" in warning
    assert startup.check_yookassa(cfg.replace(yookassa_shop_id="", yookassa_secret_key="")) == []


def test_yookassa_check_is_bounded_by_a_timeout(cfg):
    hang = Hostile(None)
    try:
        slow = cfg.replace(yookassa_api_url=hang.url + "/v3")
        started = time.monotonic()
        [warning] = startup.check_yookassa(slow, timeout=0.3)
        assert time.monotonic() - started < 5
        assert "ReadTimeout" in warning
    finally:
        hang.stop()


def test_redis_and_postgresql_on_a_closed_port_are_one_line(cfg):
    port = closed_port()
    with pytest.raises(startup.Unavailable, match="the queue redis://:\\*\\*\\*@127.0.0.1:%d/0 does not answer" % port):
        startup.check_queue(cfg.replace(queue_url="redis://:pw-123@127.0.0.1:%d/0" % port), timeout=1)
    with pytest.raises(startup.Unavailable) as info:
        startup.check_database(cfg.replace(database_url="postgresql://u:dbpass@127.0.0.1:%d/medialab" % port))
    message = str(info.value)
    assert "does not answer" in message and "dbpass" not in message and "\n" not in message
    out = io.StringIO()
    assert startup.refuse(info.value, out) == config.EX_UNAVAILABLE
    assert out.getvalue().count("\n") == 1


def test_sqlite_that_cannot_be_opened_is_a_config_error(cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(config.ConfigError, match="DATABASE_URL .* cannot be opened"):
        startup.check_database(cfg.replace(database_url="sqlite:///%s/sub/x.db" % blocker))


# --------------------------------------------------------------------------------------------
# the bot's start-up calls
# --------------------------------------------------------------------------------------------


def test_backoff_is_exponential_capped_and_jittered():
    assert bot.backoff_delay(1, rng=lambda: 0.999999) == pytest.approx(1.0, abs=1e-3)
    assert bot.backoff_delay(3, rng=lambda: 0.0) == 2.0                  # 4 s halved by the jitter
    assert bot.backoff_delay(40, rng=lambda: 0.999999) == pytest.approx(bot.STARTUP_MAX_DELAY, abs=1e-3)
    assert bot.backoff_delay(40, rng=lambda: 0.0) == bot.STARTUP_MAX_DELAY / 2


def test_start_up_retries_until_telegram_answers(cfg, fake_telegram, caplog):
    configured = config.configure(cfg.replace(telegram_api_url=fake_telegram.url, yookassa_return_url=""))
    fake_telegram.fail_next("getMe", 500, times=2)
    fake_telegram.fail_next("deleteWebhook", 429, retry_after=3)
    waits = []
    sender = worker.telegram(configured)
    with caplog.at_level(logging.WARNING, logger="bot"):
        result = bot.start_up(configured, sender, sleep=waits.append, rng=lambda: 0.0)
    assert result.yookassa_return_url == "https://t.me/medialab_test_bot"
    assert waits == [0.5, 1.0, 3]                          # two 500s, then a 429's retry_after
    lines = [r.getMessage() for r in caplog.records if r.name == "bot"]
    assert len(lines) == 3 and "getMe failed (try 1: HTTP 500" in lines[0] and "try 2" in lines[1]
    assert "deleteWebhook failed (try 1: HTTP 429" in lines[2]
    assert len(fake_telegram.calls("setMyCommands")) == 2
    assert not any("TEST-TOKEN" in line for line in lines)


def test_start_up_survives_a_refused_connection(cfg):
    port = closed_port()
    configured = cfg.replace(telegram_api_url="http://127.0.0.1:%d" % port)
    waits = []
    with pytest.raises(requests.ConnectionError):
        bot.call_until_answered(worker.telegram(configured).get_me, "getMe", sleep=waits.append,
                                rng=lambda: 0.0, max_attempts=3)
    assert waits == [0.5, 1.0]


def test_a_wrong_token_is_one_line_and_exit_78(cfg, fake_telegram, db_url, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "YOOKASSA_", "FAL_"))}
    env.update(TELEGRAM_BOT_TOKEN=TOKEN, TELEGRAM_API_URL=fake_telegram.url, DATABASE_URL=db_url,
               QUEUE_URL="sqlite:///%s" % (tmp_path / "queue.db"), ENV_FILE=os.devnull, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bot.py")], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert out.returncode == config.EX_CONFIG, text
    assert "TELEGRAM_BOT_TOKEN was refused by Telegram (getMe: 401 Unauthorized)" in text
    assert "Traceback" not in text
    for form in leak_forms():
        assert form not in text


def test_start_up_refuses_a_token_with_401(cfg, fake_telegram):
    wrong = config.configure(cfg.replace(telegram_api_url=fake_telegram.url, telegram_bot_token="999:nope"))
    with pytest.raises(config.ConfigError, match="getMe: 401"):
        bot.start_up(wrong, worker.telegram(wrong), sleep=lambda s: pytest.fail("retried a 401 after %s s" % s))


# --------------------------------------------------------------------------------------------
# the three processes against hostile services
# --------------------------------------------------------------------------------------------


def _start_all(mode, base_url, db_path, tmp_path):
    """Start bot, gunicorn (under deploy/gunicorn.conf.py) and the consumer against `base_url`."""
    queue_path = str(tmp_path / ("queue-%s.db" % mode))
    target = worker.make_huey("sqlite:///" + queue_path)          # the consumer gets one Telegram task
    target.storage.enqueue(worker.huey.serialize_task(worker.broadcast.s("hello", 1000)), 0)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "YOOKASSA_", "FAL_"))}
    env.update(TELEGRAM_BOT_TOKEN=TOKEN, TELEGRAM_API_URL=base_url, YOOKASSA_SHOP_ID=YK_SHOP,
               YOOKASSA_SECRET_KEY=YK_SECRET, YOOKASSA_API_URL=base_url + "/v3", FAL_KEY=FAL_KEY,
               FAL_QUEUE_URL=base_url, DATABASE_URL="sqlite:///" + db_path, QUEUE_URL="sqlite:///" + queue_path,
               LOG_LEVEL="DEBUG", WEB_BIND="127.0.0.1:0", WEB_WORKERS="1", ENV_FILE=os.devnull,
               PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    commands = {
        "bot": [sys.executable, os.path.join(ROOT, "bot.py")],
        "web": [os.path.join(BIN, "gunicorn"), "-c", os.path.join(ROOT, "deploy", "gunicorn.conf.py"), "web:app"],
        "worker": [os.path.join(BIN, "huey_consumer"), "worker.huey", "-w", "1", "-k", "thread", "-d", "0.05",
                   "-m", "1"],
    }
    procs = {}
    for name, argv in commands.items():
        log = open(tmp_path / ("%s-%s.log" % (mode, name)), "wb")
        procs[name] = (subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True), tmp_path / ("%s-%s.log" % (mode, name)))
    return procs


def _output(path):
    return path.read_text(errors="replace")


def test_no_secret_in_any_output_when_services_refuse_hang_or_fail(_template_db, tmp_path):
    """Four rounds at once (closed port, a server that never answers, 401, 500); each runs until
    its processes have hit the failing service (or 20 s), then they are killed and every line they
    wrote is searched for every form of every secret."""
    servers = {"hang": Hostile(None), "401": Hostile(401), "500": Hostile(500)}
    bases = {"refuse": "http://127.0.0.1:%d" % closed_port(), **{k: s.url for k, s in servers.items()}}
    evidence = {   # what each process logs once it met the hostile service
        "refuse": {"bot": "getMe failed (try 2", "worker": "could not report the broadcast",
                   "web": "did not answer GET /me"},
        "hang": {"bot": "did not answer GET /me", "worker": "did not answer GET /me", "web": "did not answer GET /me"},
        "401": {"bot": "refused by YooKassa", "worker": "refused by YooKassa", "web": "refused by YooKassa"},
        "500": {"bot": "getMe failed (try 2", "worker": "could not report the broadcast",
                "web": "answered HTTP 500 to GET /me"},
    }
    runs = {}
    try:
        for mode, base in bases.items():
            db_path = str(tmp_path / ("medialab-%s.db" % mode))
            shutil.copyfile(_template_db, db_path)
            runs[mode] = _start_all(mode, base, db_path, tmp_path)

        def reached():
            return all(proc.poll() is not None or evidence[mode][name] in _output(path)
                       for mode, procs in runs.items() for name, (proc, path) in procs.items())
        poll(reached, 30, "every process meeting its hostile service")
        codes = {(mode, name): proc.poll() for mode, procs in runs.items() for name, (proc, _) in procs.items()}
    finally:
        for procs in runs.values():
            for proc, _ in procs.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for server in servers.values():
            server.stop()
    outputs = {(mode, name): _output(path) for mode, procs in runs.items() for name, (_, path) in procs.items()}
    for key, text in outputs.items():
        assert evidence[key[0]][key[1]] in text, (key, text[-3000:])
        for form in leak_forms():
            assert form not in text, "%s leaked in %s:\n%s" % (form, key, text[-3000:])
    # 401 from YooKassa stops every process: 78 (the gunicorn master runs the check itself).
    assert [codes[("401", name)] for name in ("bot", "web", "worker")] == [78, 78, 78], codes
    for mode in ("refuse", "hang", "500"):                       # unreachable or failing: they keep going
        assert codes[(mode, "bot")] is None and codes[(mode, "worker")] is None, (mode, codes)
        assert "Traceback" not in outputs[(mode, "bot")]
