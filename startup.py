"""Start-up of the processes: logging that never shows a secret, and the checks that turn a start
that cannot work into one clear line and an exit code instead of a traceback.

Only entry points use this module (``bot.main``, the Huey consumer start in ``worker``, ``web``
under gunicorn, ``deploy/gunicorn.conf.py``, ``manage.py``).

Exit codes (also in README "Exit codes"):

* ``config.EX_CONFIG`` (78) — the configuration cannot work: a bad setting, a token or shop key the
  service refuses (401), an unmigrated database. Restarting does not help; the systemd units say
  ``RestartPreventExitStatus=78``.
* ``config.EX_UNAVAILABLE`` (69) — PostgreSQL or Redis does not answer: systemd restarts the unit.
* ``3`` — gunicorn workers (``web:app``) use gunicorn's WORKER_BOOT_ERROR instead, the only code
  that makes the master halt rather than respawn workers forever; under ``-c
  deploy/gunicorn.conf.py`` the master runs these checks itself first and exits 78 / 69.

Secrets: `install_redaction` puts one `SecretFilter` on every logging handler and on every log
record as it is created, and replaces ``sys.excepthook`` / ``threading.excepthook``, so the bot
token (pyTelegramBotAPI puts it in every request URL, which requests/urllib3 exceptions and
telebot's own logger quote), the YooKassa secret key, the Fal key and the webhook secret are
replaced by ``<NAME>`` in every message, argument, traceback and stack dump.
"""
from __future__ import annotations

import base64
import logging
import re
import sys
import threading
import traceback
import urllib.parse

import requests

import config
import models

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CHECK_TIMEOUT = 5.0          # seconds: connect/read timeout of each start-up check
MIN_SECRET = 4               # characters: shorter values are not searched for (they would mangle logs)
MIN_SECRET_PART = 8          # characters: the part after ':' of a token or key is redacted on its own
# Any Bot API token in a URL path (".../bot123456:AA.../getMe"), configured or not.
BOT_URL_TOKEN = re.compile(r"(?<![A-Za-z0-9])bot\d+:[A-Za-z0-9_-]+")


class Unavailable(Exception):
    """A service the process needs (PostgreSQL, Redis) does not answer; the message is one line."""


# --------------------------------------------------------------------------------------------
# Secrets out of every log line
# --------------------------------------------------------------------------------------------


def secret_variants(cfg) -> list[tuple[str, str]]:
    """Return (text to hide, replacement) pairs for `cfg`'s secrets, longest text first.

    Each secret setting's value, its URL-quoted forms, the part after ':' (token and Fal key
    secrets), and the HTTP Basic credentials YooKassa gets (base64 of ``shop_id:secret_key``).
    """
    pairs: dict[str, str] = {}
    for name, value in cfg.secrets().items():
        label = "<%s>" % name
        for form in (value, urllib.parse.quote(value, safe=""), urllib.parse.quote(value)):
            if len(form) >= MIN_SECRET:
                pairs.setdefault(form, label)
        part = value.partition(":")[2]
        if len(part) >= MIN_SECRET_PART:
            pairs.setdefault(part, label)
    if cfg.yookassa_configured:
        basic = base64.b64encode(("%s:%s" % (cfg.yookassa_shop_id, cfg.yookassa_secret_key)).encode()).decode()
        pairs.setdefault(basic, "<YOOKASSA_SECRET_KEY>")
    return sorted(pairs.items(), key=lambda item: -len(item[0]))


class SecretFilter(logging.Filter):
    """A logging filter that rewrites each record with every configured secret replaced.

    The message is formatted (``msg % args``) and redacted, the traceback (``exc_text``) and
    ``stack_info`` too. Never drops a record.
    """

    def __init__(self):
        super().__init__()
        self._pairs: list[tuple[str, str]] = []

    def set_secrets(self, cfg) -> None:
        """Search for `cfg`'s secrets from now on (see `secret_variants`)."""
        self._pairs = secret_variants(cfg)

    def redact(self, text: str) -> str:
        """Return `text` with every secret replaced by ``<NAME>`` and any ``bot<token>`` URL part
        by ``bot<TELEGRAM_BOT_TOKEN>``."""
        if not isinstance(text, str):
            text = str(text)
        for secret, label in self._pairs:
            if secret in text:
                text = text.replace(secret, label)
        return BOT_URL_TOKEN.sub("bot<TELEGRAM_BOT_TOKEN>", text)

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact `record` in place (idempotent: a record passing several handlers, or another
        filter with other secrets, is redacted again at the cost of one string scan); always True.
        The arguments are merged into the message; their types stay readable as ``record.arg_types``
        (for filters that judge a record by what it is about, e.g. huey's periodic tasks)."""
        if isinstance(record.args, tuple) and not hasattr(record, "arg_types"):
            record.arg_types = tuple(type(arg) for arg in record.args)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string still gets logged, redacted
            message = "%s %r" % (record.msg, record.args)
        record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


FILTER = SecretFilter()
_hooks_installed = False


def _all_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger()] + [
        item for item in logging.Logger.manager.loggerDict.values() if isinstance(item, logging.Logger)]
    return [handler for item in loggers for handler in item.handlers]


def install_redaction(cfg) -> SecretFilter:
    """Hide `cfg`'s secrets from every log record, traceback and uncaught-exception report of this
    process: `FILTER` on every handler that exists now (the root's, telebot's ``TeleBot`` console
    handler, huey's, gunicorn's), on every record created from now on (a record factory, so
    handlers added later are covered too), and in ``sys.excepthook`` / ``threading.excepthook``.
    Idempotent; returns `FILTER`."""
    global _hooks_installed
    FILTER.set_secrets(cfg)
    for handler in _all_handlers():
        if FILTER not in handler.filters:
            handler.addFilter(FILTER)
    if not _hooks_installed:
        _hooks_installed = True
        make_record = logging.getLogRecordFactory()

        def redacting_factory(*args, **kwargs):
            record = make_record(*args, **kwargs)
            FILTER.filter(record)
            return record

        logging.setLogRecordFactory(redacting_factory)

        def excepthook(exc_type, exc, tb):
            sys.stderr.write(FILTER.redact("".join(traceback.format_exception(exc_type, exc, tb))))
            sys.stderr.flush()

        def thread_excepthook(args):
            if args.exc_type is SystemExit:
                return
            name = args.thread.name if args.thread is not None else "?"
            text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
            sys.stderr.write("Exception in thread %s:\n%s" % (name, FILTER.redact(text)))
            sys.stderr.flush()

        sys.excepthook = excepthook
        threading.excepthook = thread_excepthook
    return FILTER


def configure_logging(cfg, level: str | None = None, fmt: str = LOG_FORMAT) -> None:
    """Configure this process's logging (entry points only): a stderr handler at `level`
    (default LOG_LEVEL) unless the root logger has one already, urllib3 and httpx at WARNING
    (they log request URLs and every Fal poll), and `install_redaction(cfg)`."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level or cfg.log_level, format=fmt)
    else:
        root.setLevel(level or cfg.log_level)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    install_redaction(cfg)


# --------------------------------------------------------------------------------------------
# Refusing to start, one line per problem
# --------------------------------------------------------------------------------------------


def load_config(require_token: bool = True):
    """Load and install the process configuration, or print its problems and exit `EX_CONFIG`.

    :raises SystemExit: 78 when the configuration is invalid (after `config.report`).
    """
    try:
        return config.configure(config.load(require_token=require_token))
    except config.ConfigError as exc:
        config.report(exc)
        raise SystemExit(config.EX_CONFIG) from None


def refuse(exc: BaseException, stream=None) -> int:
    """Print why the process cannot start (one line per problem, secrets redacted, no traceback)
    and return the exit code: ConfigError/NotMigrated → 78, Unavailable → 69. Other exceptions
    are re-raised."""
    stream = stream or sys.stderr
    if isinstance(exc, config.ConfigError):
        config.report(config.ConfigError([FILTER.redact(p) for p in exc.problems]), stream)
        return config.EX_CONFIG
    if isinstance(exc, models.NotMigrated):
        print(exc, file=stream)                  # "... pending: 0001_initial — run `make migrate`"
        return config.EX_CONFIG
    if isinstance(exc, Unavailable):
        print("Media Lab cannot start: %s" % FILTER.redact(str(exc)), file=stream)
        return config.EX_UNAVAILABLE
    raise exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return "%s: %s" % (type(exc).__name__, text[0].strip()) if text else type(exc).__name__


def check_database(cfg, timeout: float = CHECK_TIMEOUT) -> None:
    """Connect to DATABASE_URL and check that every migration is applied.

    :raises Unavailable: PostgreSQL does not answer within `timeout` seconds (or refuses).
    :raises config.ConfigError: a SQLite file cannot be opened (a path or permission mistake).
    :raises models.NotMigrated: migrations are pending.
    """
    sqlite = cfg.database_url.startswith("sqlite")
    where = config._no_password(cfg.database_url)
    try:
        database = models.open_database(cfg.database_url)     # creates a SQLite file's folder
    except OSError as exc:
        raise config.ConfigError(["DATABASE_URL %s cannot be opened (%s)" % (where, _first_line(exc))]) from None
    if not sqlite:
        database.connect_params.setdefault("connect_timeout", max(1, int(timeout)))
    try:
        try:
            database.connect()
            database.execute_sql("SELECT 1")
        except Exception as exc:  # noqa: BLE001 - peewee wraps the driver's errors; one line each
            if sqlite:
                raise config.ConfigError(["DATABASE_URL %s cannot be opened (%s)" % (where, _first_line(exc))]) from None
            raise Unavailable("the database %s does not answer (%s)" % (where, _first_line(exc))) from None
        models.ensure_migrated(database)
    finally:
        models.discard(database)          # the gunicorn master forks its workers after this check


def check_queue(cfg, timeout: float = CHECK_TIMEOUT) -> None:
    """PING a redis:// QUEUE_URL (SQLite and memory queues need nothing).

    :raises Unavailable: Redis does not answer within `timeout` seconds.
    :raises config.ConfigError: Redis refuses the credentials in the URL.
    """
    if not cfg.queue_url.startswith(("redis://", "rediss://")):
        return
    import redis

    where = config._no_password(cfg.queue_url)
    client = redis.Redis.from_url(cfg.queue_url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise config.ConfigError(["QUEUE_URL %s: Redis refused the credentials (%s)" % (where, _first_line(exc))]) \
            from None
    except redis.RedisError as exc:
        raise Unavailable("the queue %s does not answer (%s)" % (where, _first_line(exc))) from None
    finally:
        client.close()


def check_yookassa(cfg, timeout: float = CHECK_TIMEOUT) -> list[str]:
    """Verify the YooKassa shop credentials with ``GET {YOOKASSA_API_URL}/me`` (HTTP Basic
    ``shop_id:secret_key``; the answer is ``{"account_id", "test", "fiscalization_enabled",
    "payment_methods", "status"}``), within min(`timeout`, YOOKASSA_TIMEOUT) seconds.

    Returns warnings (one line each): the API did not answer (payments are tried again when a
    user pays), answered something unexpected, or describes a shop that does not fit the
    settings (another account id, a test shop without YOOKASSA_ALLOW_TEST, not enabled).
    Returns [] when YooKassa is not configured.

    :raises config.ConfigError: YooKassa refused the credentials (401/403).
    """
    if not cfg.yookassa_configured:
        return []
    seconds = min(timeout, cfg.yookassa_timeout)
    try:
        answer = requests.get(cfg.yookassa_api_url + "/me", auth=(cfg.yookassa_shop_id, cfg.yookassa_secret_key),
                              timeout=(seconds, seconds), headers={"Accept": "application/json"})
    except requests.RequestException as exc:
        return ["YooKassa did not answer GET /me at start (%s within %g s); going on, payments are tried "
                "when users pay" % (type(exc).__name__, seconds)]
    if answer.status_code in (401, 403):
        try:
            code = answer.json().get("code", "")
        except ValueError:
            code = ""
        raise config.ConfigError(["YOOKASSA_SHOP_ID / YOOKASSA_SECRET_KEY were refused by YooKassa (HTTP %d%s): "
                                  "copy both from the shop's Integration → API keys page"
                                  % (answer.status_code, " " + code if code else "")])
    if answer.status_code != 200:
        return ["YooKassa answered HTTP %d to GET /me at start; going on" % answer.status_code]
    try:
        me = answer.json()
    except ValueError:
        return ["YooKassa answered GET /me with something that is not JSON; going on"]
    warnings = []
    if str(me.get("account_id", cfg.yookassa_shop_id)) != str(cfg.yookassa_shop_id):
        warnings.append("YooKassa says these keys belong to shop %s, not YOOKASSA_SHOP_ID" % me.get("account_id"))
    if me.get("test") and not cfg.yookassa_allow_test:
        warnings.append("this is a YooKassa test shop but YOOKASSA_ALLOW_TEST is 0: its payments will be refused")
    if me.get("status", "enabled") != "enabled":
        warnings.append("YooKassa says the shop is %s, not enabled" % me.get("status"))
    return warnings


def check_services(cfg, *, database: bool = True, queue: bool = True, yookassa: bool = True) -> list[str]:
    """Run the start-up checks in order (database, queue, YooKassa) and return the warnings.

    :raises config.ConfigError, models.NotMigrated, Unavailable: see the single checks.
    """
    if database:
        check_database(cfg)
    if queue:
        check_queue(cfg)
    return check_yookassa(cfg) if yookassa else []
