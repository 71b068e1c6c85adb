"""The job pipeline: the Huey instance, its tasks, and the one Telegram send wrapper.

A paid job (docs/SPEC.md §3), step by step:

* `accept_generation` (called by the bot) validates the request, then in ONE money transaction
  checks MAX_ACTIVE_JOBS_PER_USER, inserts the `Generation` row (status ``queued``) and reserves
  its price. After the commit it sends "⏳ В очереди (N)" and enqueues `run_generation`.
* `run_generation` (a consumer thread) claims the row ``queued → running`` with a conditional
  UPDATE, edits the status message to "🎨 Генерирую…", downloads the inputs from Telegram, builds
  the Fal request (data URIs, never a Telegram file URL), runs it — or resumes the Fal request id
  stored by an earlier attempt, so Fal is never paid twice — downloads the result, sends it as a
  photo (or a document), and only then commits the reservation and marks the row ``delivered``.
* Transient failures (timeouts, 5xx, 429, network) put the row back to ``queued`` and raise
  Huey's ``RetryTask(delay=…)``, at most MAX_ATTEMPTS runs per job; a retry after the request id
  was stored resumes that request. Permanent failures (invalid input, content policy, other 4xx)
  release the reservation at once and tell the user what to change.
* `sweep` (every SWEEP_INTERVAL seconds, from the consumer's `Ticker` thread) re-enqueues jobs
  whose task was lost, resumes jobs whose worker died (stale heartbeat), keeps the holds of live
  jobs and expires the holds nobody is working on.

The `Generation` row is the source of truth, not the queue: Huey delivers a task at most once
(the consumer deletes it before running it, docs/REFERENCES.md §7), and every step above is a
conditional update, so a task that runs twice, or a job that is re-enqueued by the sweeper while
its task is still queued, delivers once and commits once.

Running the consumer (the `worker` make target and systemd unit)::

    huey_consumer worker.huey -w 8 -k thread -f -g INT -t 60

* ``SIGINT`` (``-g INT``, systemd ``KillSignal=SIGINT``) is the graceful stop: running jobs finish,
  for up to ``-t`` seconds.
* ``SIGTERM`` stops at once: Huey fires ``SIGNAL_INTERRUPTED`` for every running task and we put
  the job back to ``queued`` and re-enqueue it (huey docs/recipes.rst); the next consumer resumes
  the stored Fal request id.
* ``SIGKILL``/OOM/power loss: the task is gone and the row stays ``running``; its heartbeat stops,
  and `sweep` re-queues it after HEARTBEAT_STALE seconds (it resumes the stored request id), or,
  once its reservation expired, fails it and tells the user nothing was charged.
* ``-f`` flushes stale Huey locks at start (SQLite locks have no TTL). The sweeper and the
  reconciliation run from a `Ticker` thread started once per consumer process, every
  SWEEP_INTERVAL / RECONCILE_INTERVAL seconds as written; only the daily payment report is a
  Huey periodic task (crontab, minute granularity).
"""
from __future__ import annotations

import datetime
import functools
import logging
import os
import sqlite3
import sys
import threading
import time
import uuid

import requests
import telebot
from huey import Huey, MemoryHuey, RedisHuey, SqliteHuey, crontab
from huey.api import PeriodicTask
from huey.exceptions import RetryTask
from huey.signals import SIGNAL_INTERRUPTED
from peewee import OperationalError, fn
from telebot import apihelper, types
from telebot.apihelper import ApiException, ApiHTTPException, ApiTelegramException

import billing
import config
import media
import models
import ops
import payments
import stars
import startup
import texts
from models import Draft, Generation, Payment, Reservation, User, utcnow

logger = logging.getLogger(__name__)

HUEY_NAME = "medialab"
ACTIVE_STATES = ("queued", "running")

MAX_ATTEMPTS = 4                 # runs of one job (first try + retries, crash resumes included)
RETRY_DELAYS = (5, 30, 120)      # seconds before retry 1, 2, 3…
HEARTBEAT_INTERVAL = 10.0        # seconds between heartbeats of a running job
HEARTBEAT_STALE = 60             # seconds without a heartbeat after which a running job is dead
QUEUED_STALE = 60                # seconds a queued job may wait with no task in the queue
TG_MAX_ATTEMPTS = 5              # tries of one Telegram call under 429 flood control
TG_MAX_WAIT = 30.0               # seconds: a longer retry_after is not slept in place
DOWNLOAD_TIMEOUT = 60.0          # seconds for one Telegram file download
RESULT_TIMEOUT = 60.0            # seconds for downloading the result image
CAPTION_LIMIT = 1024             # Bot API: photo/document caption, 0-1024 characters


# --------------------------------------------------------------------------------------------
# Exceptions
# --------------------------------------------------------------------------------------------


class WorkerError(Exception):
    """The job could not be accepted."""

    #: The user's text for this error (a key of texts.TEXTS) and its values; None: no user text.
    text_key: str | None = None
    values: dict = {}

    def __str__(self):
        return self.args[0] if self.args else (self.__doc__ or "").strip()


class UnknownMode(WorkerError):
    """This mode does not exist or is not a queued (paid) mode."""


class InvalidOptions(WorkerError):
    """These options are not valid for this mode."""


class TooManyJobs(WorkerError):
    """Too many jobs in progress; wait for one to finish."""

    text_key = "too_many_jobs"

    def __init__(self, limit: int):
        self.limit = limit
        self.values = {"limit": limit}
        super().__init__("the user already has %d jobs in progress" % limit)


class TelegramUnavailable(WorkerError):
    """Telegram could not be reached (timeout, network error, 5xx); try again later."""


class InputUnavailable(WorkerError):
    """The photo could not be fetched from Telegram; send it again."""


# --------------------------------------------------------------------------------------------
# The queue and the database
# --------------------------------------------------------------------------------------------


def make_huey(url: str):
    """Return the Huey instance for QUEUE_URL `url` (results are never stored: the Generation
    row tracks each job).

    ``sqlite:///path`` → SqliteHuey (its own file, fsync on, folder created), ``redis://…`` →
    RedisHuey, ``memory://`` → MemoryHuey (tests). Raises ValueError for anything else.
    """
    if url.startswith("memory://"):
        return MemoryHuey(HUEY_NAME, results=False)
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return SqliteHuey(HUEY_NAME, filename=path, fsync=True, results=False)
    if url.startswith(("redis://", "rediss://")):
        return RedisHuey(HUEY_NAME, url=url, results=False)
    raise ValueError("QUEUE_URL must be sqlite:///path, redis://host:port/db or memory://")


class _Huey(Huey):
    """The process's Huey instance. Its storage is opened on first use — from QUEUE_URL, or the
    URL given (tests) — so importing this module creates no queue file and opens no connection
    (issue 10: no work at import). ``huey_consumer worker.huey`` touches the storage first when it
    starts; a configuration problem then is one line and exit 78, not a traceback."""

    def __init__(self, name: str, url: str | None = None):
        self._url = url
        self._storage = None
        self._storage_lock = threading.Lock()
        super().__init__(name, results=False)

    def create_storage(self):
        """Deferred: see `storage`."""
        return None

    @property
    def storage(self):
        """The queue storage for QUEUE_URL (``make_huey(url).storage``), opened on first use."""
        if self._storage is None:
            with self._storage_lock:
                if self._storage is None:
                    try:
                        url = self._url or config.get().queue_url
                    except config.ConfigError as exc:
                        _die(startup.refuse(exc))
                    self._storage = make_huey(url).storage
        return self._storage

    @storage.setter
    def storage(self, value):
        self._storage = value

    def create_consumer(self, **options):
        """``huey_consumer`` calls this in its main thread before any thread starts: the
        configuration and the queue are opened here, so a problem is one line and exit 78 from
        the main thread, never a race between threads that each find it."""
        try:
            cfg = config.get()
        except config.ConfigError as exc:
            _die(startup.refuse(exc))
        self.storage                                      # noqa: B018 - opens the queue now
        startup.configure_logging(cfg)
        _check_consumer_start(cfg)
        return super().create_consumer(**options)


huey = _Huey(HUEY_NAME)


def _die(code: int) -> None:
    """End the consumer process with `code` from whichever thread found the problem (a
    SystemExit would end only that thread; huey catches exceptions in its hooks)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _check_consumer_start(cfg: config.Config) -> None:
    """The consumer checks, before any task runs, that it can work: the database answers and is
    migrated, a Redis queue answers, YooKassa accepts the shop's keys. A problem is one line and
    the process ends with 78 (configuration, unmigrated, refused keys) or 69 (database or Redis
    down); YooKassa not answering is only a warning. Called from the start-up hook, in a worker
    thread, hence ``os._exit``."""
    try:
        warnings = startup.check_services(cfg)
    except (config.ConfigError, models.NotMigrated, startup.Unavailable) as exc:
        _die(startup.refuse(exc))
    for warning in warnings:
        logger.warning("%s", warning)


_setup_lock = threading.Lock()
_started = False


def _bind_db() -> None:
    """Bind the models to DATABASE_URL once per process (entry points and tests bind their own)."""
    if models.db.obj is not None:
        return
    with _setup_lock:
        if models.db.obj is None:
            models.init_db(config.get().database_url)


class _DbSession:
    """The thread's database connection for one task: bound on first use (DATABASE_URL), opened on
    enter if closed, closed on exit. Stateless — the connection is peewee's, per thread — so the one
    instance `DB_SESSION` serves every task thread (``@huey.context_task(DB_SESSION)``)."""

    def __enter__(self):
        _bind_db()
        if models.db.is_closed():
            models.db.connect()
        return models.db

    def __exit__(self, *exc):
        models.db.close()


DB_SESSION = _DbSession()


_keeper: list = []
_process_heartbeat: list = []   # the consumer's ops.HeartbeatThread (process:worker)


class _PeriodicAtDebug(logging.Filter):
    """Huey logs "Enqueueing periodic task …", "Executing …" and "… executed in …" at INFO for every
    task: three lines a minute per periodic task on an idle system. For periodic tasks these
    become DEBUG records (shown only when the logger is at DEBUG); jobs keep their INFO lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        # The secrets filter (startup) merges the arguments into the message when the record is
        # created; it leaves their types in `arg_types`.
        types = getattr(record, "arg_types", None) or tuple(type(a) for a in (record.args or ()))
        if record.levelno == logging.INFO and types and issubclass(types[0], PeriodicTask):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def quiet_periodic_logs() -> None:
    """Install `_PeriodicAtDebug` on huey's loggers ("huey" for Executing/executed, and the
    consumer's scheduler for Enqueueing); idempotent."""
    for name in ("huey", "huey.consumer.Scheduler"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _PeriodicAtDebug) for f in target.filters):
            target.addFilter(_PeriodicAtDebug())


@huey.on_startup()
def _on_startup() -> None:
    """Consumer start (runs once per worker thread; the work is done once per process):
    configure logging, bind the database, check migrations, keep one idle SQLite connection.

    Each task closes its own connection; when the last connection to a WAL database closes,
    SQLite checkpoints and truncates the WAL (sqlite.org/wal.html), so an idle connection held for
    the life of the process keeps that fsync off every task.
    """
    global _started
    try:
        cfg = config.get()
    except config.ConfigError as exc:      # the queue's first use may race this hook to say it
        _die(startup.refuse(exc))
    with _setup_lock:
        if _started:
            return
        _started = True
        if logging.getLogger("huey").handlers:  # huey_consumer gave it its own handler
            logging.getLogger("huey").propagate = False
        # A root handler at LOG_LEVEL, urllib3/httpx quiet (request URLs, Fal polls), and the
        # secrets filter on every handler, huey's included (it was added after our import).
        startup.configure_logging(cfg)
        quiet_periodic_logs()
        _process_heartbeat.append(ops.HeartbeatThread("worker", cfg.database_url).start())
    _bind_db()
    try:
        with DB_SESSION:
            models.ensure_migrated()
    except models.NotMigrated as exc:
        logger.error("%s", exc)
    if models.is_sqlite() and models.db.obj.database not in ("", ":memory:"):
        _keeper.append(sqlite3.connect(models.db.obj.database, check_same_thread=False))
    with _setup_lock:
        if not _ticker:
            _ticker.append(Ticker(cfg).start())


# --------------------------------------------------------------------------------------------
# Telegram
# --------------------------------------------------------------------------------------------

_bots: dict = {}


def configure_api_url(cfg: config.Config | None = None) -> None:
    """Point pyTelegramBotAPI at ``cfg.telegram_api_url``: ``apihelper.API_URL`` and ``FILE_URL``
    are process-wide globals (there is no constructor argument, docs/REFERENCES.md §5)."""
    cfg = cfg or config.get()
    base = cfg.telegram_api_url.rstrip("/")
    apihelper.API_URL = base + "/bot{0}/{1}"
    apihelper.FILE_URL = base + "/file/bot{0}/{1}"


def telegram(cfg: config.Config | None = None) -> telebot.TeleBot:
    """Return this process's send-only TeleBot (``threaded=False``, no parse_mode).

    Calls `configure_api_url` every time, so a test that swaps the configuration gets a bot
    talking to its fake. One TeleBot per token is kept.
    """
    cfg = cfg or config.get()
    configure_api_url(cfg)
    with _setup_lock:
        bot = _bots.get(cfg.telegram_bot_token)
        if bot is None:
            bot = telebot.TeleBot(cfg.telegram_bot_token, threaded=False)
            _bots[cfg.telegram_bot_token] = bot
    return bot


def retry_after(exc: ApiTelegramException) -> float:
    """Return the seconds a 429 asks to wait (``parameters.retry_after``, Bot API
    ResponseParameters), 1 when it is missing."""
    params = (getattr(exc, "result_json", None) or {}).get("parameters") or {}
    try:
        return max(0.0, float(params.get("retry_after", 1)))
    except (TypeError, ValueError):
        return 1.0


def tg(func, *args, _attempts: int = TG_MAX_ATTEMPTS, _max_wait: float = TG_MAX_WAIT, **kwargs):
    """Call a TeleBot method (``tg(bot.send_message, chat_id, text)``), honouring flood control.

    On ``ApiTelegramException`` 429 sleeps ``parameters.retry_after`` seconds and tries again, up
    to `_attempts` tries in all. A wait longer than `_max_wait` seconds is not slept: the 429 is
    raised so the caller can reschedule (the worker turns it into a delayed retry). Every other
    error is raised unchanged. This is the wrapper for every Telegram call of the worker and the
    bot (telebot's own RETRY_ON_ERROR does not handle 429, docs/REFERENCES.md §5).
    """
    name = getattr(func, "__name__", "call")
    for attempt in range(1, _attempts + 1):
        try:
            return func(*args, **kwargs)
        except ApiTelegramException as exc:
            if exc.error_code != 429 or attempt >= _attempts:
                raise
            wait = retry_after(exc)
            if wait > _max_wait:
                raise
            logger.warning("telegram %s: 429 flood control, retrying in %.3g s (try %d of %d)",
                           name, wait, attempt + 1, _attempts)
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def _bounded(call, timeout: float, what: str):
    """`media.call_with_deadline` for a Telegram call: at most `timeout` seconds, else
    TelegramUnavailable."""
    try:
        return media.call_with_deadline(call, time.monotonic() + timeout, name="tg-download")
    except media.DeadlinePassed:
        raise TelegramUnavailable("%s took longer than %g s" % (what, timeout)) from None


def download_file(file_id: str, cfg: config.Config | None = None, *, timeout: float = DOWNLOAD_TIMEOUT) -> bytes:
    """Download a user's file from Telegram by `file_id` (getFile, then the file download).

    The file URL contains the bot token: it is never built here, logged or passed on, and
    request errors (whose text holds that URL) are replaced by a short description.
    :param timeout: seconds for the download (telebot's own download has no timeout).
    :raises media.InvalidInput: ``image_too_big`` (Telegram's "file is too big": getFile serves up
        to 20 MB, Bot API getFile; or more than ``cfg.max_image_bytes``).
    :raises InputUnavailable: Telegram does not know the file (4xx).
    :raises TelegramUnavailable: timeouts, network errors, 5xx.
    """
    cfg = cfg or config.get()
    bot = telegram(cfg)
    try:
        info = tg(bot.get_file, file_id)
        media.check_declared_size(info.file_size, cfg)
        data = _bounded(lambda: bot.download_file(info.file_path), timeout, "file download")
    except ApiTelegramException as exc:
        if "file is too big" in (exc.description or "").lower():
            raise media.InvalidInput("image_too_big", limit=cfg.max_image_bytes) from None
        if exc.error_code == 429 or exc.error_code >= 500:
            raise TelegramUnavailable("getFile answered %s" % exc.error_code) from None
        raise InputUnavailable("getFile answered %s: %s" % (exc.error_code, exc.description)) from None
    except ApiHTTPException as exc:
        status = getattr(exc.result, "status_code", 0) or 0
        if status == 429 or status >= 500:
            raise TelegramUnavailable("file download answered %s" % status) from None
        raise InputUnavailable("file download answered %s" % status) from None
    except (requests.RequestException, ApiException) as exc:
        raise TelegramUnavailable("Telegram request failed (%s)" % type(exc).__name__) from None
    if len(data) > cfg.max_image_bytes:
        raise media.InvalidInput("image_too_big", limit=cfg.max_image_bytes)
    return data


def _describe(exc: BaseException, cfg: config.Config | None = None) -> str:
    """A one-line, log-safe description of `exc` (the bot token masked, no request URLs)."""
    if isinstance(exc, requests.RequestException):
        return type(exc).__name__
    text = "%s: %s" % (type(exc).__name__, exc)
    token = (cfg or config.get()).telegram_bot_token
    if token:
        text = text.replace(token, "<token>")
    return text[:500]


# --------------------------------------------------------------------------------------------
# Accepting a job
# --------------------------------------------------------------------------------------------


def _check_options(mode: str, options: dict | None) -> dict:
    """The options of a `mode` job without None values; each a known option of the mode
    (``MODE_SPECS[mode].options``) with one of its choices. Raises InvalidOptions otherwise."""
    spec = media.mode_spec(mode)
    options = {k: v for k, v in dict(options or {}).items() if v is not None}
    unknown = [name for name in options if spec.option(name) is None]
    if unknown:
        raise InvalidOptions("unknown option(s) for %s: %s" % (mode, ", ".join(sorted(unknown))))
    for name, value in options.items():
        if value not in spec.option(name).choices:
            raise InvalidOptions("%s must be one of %s" % (name, ", ".join(spec.option(name).choices)))
    return options


def accept_generation(user: User, chat_id: int, mode: str, *, prompt: str | None = None,
                      options: dict | None = None, file_ids=(), cfg: config.Config | None = None) -> Generation:
    """Accept a paid job: validate it, reserve its price and queue it; return the Generation.

    Validation happens before anything is charged: the mode must be a paid (Fal) mode, the
    prompt is checked with `media.validate_prompt` (generate/edit/merge), the number of
    `file_ids` (Telegram file ids of the photos, in ``MODE_SPECS[mode].image_roles`` order) with
    `media.check_image_count`, and `options` ({"aspect_ratio": "16:9"} for generate only).
    Then one money transaction checks MAX_ACTIVE_JOBS_PER_USER, inserts the row and reserves
    ``cfg.price(mode)`` credits (free access → free operation → credits, billing.reserve with
    reference/key ``generation:<uuid>``). `run_generation` is enqueued after the commit
    (``Database.after_commit``; dropped on rollback). The caller (the bot) shows the "⏳ в очереди"
    message and stores its id in ``Generation.status_message_id``; the worker edits it in place.

    :raises UnknownMode: unknown mode, or add_text (use `render_add_text`).
    :raises InvalidOptions: options the mode does not take.
    :raises media.InvalidInput: empty/too long prompt, wrong number of images.
    :raises TooManyJobs: the user has ``cfg.max_active_jobs_per_user`` jobs queued or running.
    :raises billing.InsufficientCredits, billing.UserBlocked: from the reservation.
    """
    cfg = cfg or config.get()
    spec = media.MODE_SPECS.get(mode)
    if spec is None or not spec.paid or spec.local:
        raise UnknownMode("%r is not a queued mode (paid modes: %s)" % (mode, ", ".join(config.PAID_MODES)))
    prompt = media.validate_prompt(prompt, cfg) if spec.needs_prompt else None
    file_ids = [str(f) for f in file_ids]
    media.check_image_count(mode, len(file_ids))
    options = _check_options(mode, options)
    gen = _create_generation(user.id, int(chat_id), mode, prompt, options, file_ids, cfg)
    return gen


@billing.money_transaction
def _create_generation(user_id, chat_id, mode, prompt, options, file_ids, cfg) -> Generation:
    # Serialise concurrent accepts of one user: SQLite's BEGIN IMMEDIATE already does; on
    # PostgreSQL this takes the user's row lock (SQLite ignores FOR UPDATE).
    if not models.is_sqlite():
        User.select(User.id).where(User.id == user_id).for_update().get()
    active = (Generation.select()
              .where((Generation.user == user_id) & (Generation.status.in_(ACTIVE_STATES))).count())
    if active >= cfg.max_active_jobs_per_user:
        raise TooManyJobs(cfg.max_active_jobs_per_user)
    gid = uuid.uuid4()
    key = "generation:%s" % gid
    reservation = billing.reserve(user_id, cfg.price(mode), reference=key, idempotency_key=key,
                                  ttl=cfg.reservation_ttl)
    cost = reservation.amount if reservation.asset == "credits" else 0
    gen = Generation.create(
        id=gid, user=user_id, chat_id=chat_id, mode=mode, status="queued", prompt=prompt,
        options=options, input_file_ids=file_ids, cost=cost, reservation=reservation.id,
        endpoint=cfg.fal_endpoints.get(mode) or config.DEFAULT_ENDPOINTS[mode], created_at=utcnow())
    models.db.after_commit(functools.partial(_after_accept, str(gid), cfg))
    logger.info("generation %s: accepted as queued, user=%s mode=%s reservation=%s %s %s",
                gid, user_id, mode, reservation.id, reservation.amount, reservation.asset)
    return gen


def _after_accept(generation_id: str, cfg: config.Config) -> None:
    """After the accept commits: enqueue the job. A failed enqueue must not fail the (already
    committed) accept: `sweep` enqueues queued jobs that have no task."""
    try:
        run_generation(generation_id)
    except Exception as exc:
        logger.error("generation %s: enqueue failed (%s); the sweeper will enqueue it again",
                     generation_id, _describe(exc, cfg))


# --- drafts: a refused job's inputs are never thrown away -------------------------------------

DRAFT_REASONS = ("credits", "jobs", "policy", "failed")


def save_draft(user_id: int, chat_id: int, mode: str, *, prompt: str | None = None, options: dict | None = None,
               file_ids=(), reason: str = "failed", resume_on_payment: bool = False,
               cfg: config.Config | None = None) -> Draft:
    """Keep a refused or failed job's inputs for DRAFT_TTL seconds, replacing the user's earlier
    draft (one per user); return it. Its buttons carry ``draft.token``."""
    cfg = cfg or config.get()
    now = utcnow()
    with models.db.atomic():
        Draft.delete().where(Draft.user == user_id).execute()
        return Draft.create(user=user_id, token=uuid.uuid4().hex[:10], chat_id=int(chat_id), mode=mode,
                            prompt=prompt, options=dict(options or {}), input_file_ids=[str(f) for f in file_ids],
                            reason=reason, resume_on_payment=resume_on_payment, created_at=now,
                            expires_at=now + datetime.timedelta(seconds=cfg.draft_ttl))


def live_draft(user_id: int, token: str | None = None) -> Draft | None:
    """The user's draft if it has not expired (and carries `token`, when given)."""
    query = Draft.select().where((Draft.user == user_id) & (Draft.expires_at > utcnow()))
    if token is not None:
        query = query.where(Draft.token == token)
    return query.first()


def take_draft(user_id: int, token: str | None = None, *, resume_only: bool = False) -> Draft | None:
    """Remove and return the user's live draft (with `token` if given; only one marked
    resume_on_payment with `resume_only`); None when there is none. Atomic: of two callers racing
    for one draft, one gets it."""
    draft = live_draft(user_id, token)
    if draft is None or (resume_only and not draft.resume_on_payment):
        return None
    if not Draft.delete().where((Draft.id == draft.id) & (Draft.token == draft.token)).execute():
        return None
    return draft


def mark_draft_resume(user_id: int, token: str) -> Draft | None:
    """"Пополнить и продолжить": start the draft when the next top-up is credited; the draft, or
    None when it is gone (expired, replaced)."""
    changed = (Draft.update(resume_on_payment=True)
               .where((Draft.user == user_id) & (Draft.token == token) & (Draft.expires_at > utcnow())).execute())
    return live_draft(user_id, token) if changed else None


def discard_draft(user_id: int) -> None:
    """Forget the user's draft (a new flow replaced it)."""
    Draft.delete().where(Draft.user == user_id).execute()


def draft_buttons(draft: Draft, lang: str, *, topup: bool = False) -> types.InlineKeyboardMarkup:
    """The buttons under a refusal: "💰 Пополнить и продолжить" (credits) or "🔁 Повторить", plus
    "✏️ Изменить запрос" for modes with a prompt, and "🏠 Меню"."""
    markup = types.InlineKeyboardMarkup()
    if topup:
        markup.row(types.InlineKeyboardButton(texts.t("btn_topup_continue", lang), callback_data="payfor:" + draft.token))
    else:
        markup.row(types.InlineKeyboardButton(texts.t("btn_retry", lang), callback_data="dretry:" + draft.token))
    if media.MODE_SPECS[draft.mode].needs_prompt:
        markup.row(types.InlineKeyboardButton(texts.t("btn_change_prompt", lang), callback_data="dedit:" + draft.token))
    markup.row(types.InlineKeyboardButton(texts.t("job_menu_button", lang), callback_data="menu"))
    return markup


def refusal_text(exc: BaseException, lang: str) -> str:
    """The text in `lang` for a job refused at accept time (`exc.text_key` with `exc.values`: for
    too few credits the mode's price and the balance); a refusal for the job limit adds that the
    inputs are kept."""
    if not isinstance(exc, (billing.InsufficientCredits, TooManyJobs)):
        return texts.t("job_failed_generic", lang)
    text = texts.t(exc.text_key, lang, **exc.values)
    return text + "\n" + texts.t("draft_kept", lang) if isinstance(exc, TooManyJobs) else text


def show_status(gen: Generation, lang: str, cfg: config.Config | None = None):
    """Send the "⏳ В очереди (N)" status message (with its cancel button) for a job started
    outside the bot (a draft resumed after a top-up) and store its id; return the message."""
    bot = telegram(cfg)
    markup = types.InlineKeyboardMarkup()
    markup.add(types.InlineKeyboardButton(texts.t("btn_cancel_job", lang), callback_data="jobcancel:%s" % gen.id))
    sent = tg(bot.send_message, gen.chat_id, texts.t("job_queued", lang, position=queue_position(gen.id) or 1),
              reply_markup=markup)
    Generation.update(status_message_id=sent.message_id).where(
        (Generation.id == gen.id) & Generation.status_message_id.is_null()).execute()
    return sent


def resume_draft(user_id: int, cfg: config.Config | None = None) -> Generation | None:
    """After a top-up was credited: start the user's draft marked "pay and continue" (reserving
    now), show its status message; when the balance is still short or the job limit is reached,
    keep the draft and say so. Returns the new job or None. Acts once per draft (`take_draft`)."""
    cfg = cfg or config.get()
    draft = take_draft(user_id, resume_only=True)
    if draft is None:
        return None
    user = User.get_by_id(user_id)
    lang = texts.lang_of(user.language_code)
    inputs = dict(prompt=draft.prompt, options=dict(draft.options or {}), file_ids=list(draft.input_file_ids or []))
    try:
        gen = accept_generation(user, draft.chat_id, draft.mode, cfg=cfg, **inputs)
    except (billing.InsufficientCredits, TooManyJobs) as exc:
        short = isinstance(exc, billing.InsufficientCredits)
        kept = save_draft(user_id, draft.chat_id, draft.mode, reason="credits" if short else "jobs",
                          resume_on_payment=short, cfg=cfg, **inputs)
        text = texts.t("draft_still_short", lang, **exc.values) if short else refusal_text(exc, lang)
        _best_effort(telegram(cfg).send_message, draft.chat_id, text, reply_markup=draft_buttons(kept, lang, topup=short))
        logger.info("draft of user=%s not resumed (%s), kept", user_id, type(exc).__name__)
        return None
    except Exception as exc:  # noqa: BLE001 - an invalid old draft must not break the payment notice
        logger.warning("draft of user=%s could not be resumed (%s)", user_id, _describe(exc, cfg))
        return None
    logger.info("generation %s: resumed from a draft after a top-up, user=%s", gen.id, user_id)
    _best_effort(telegram(cfg).send_message, draft.chat_id, texts.t("draft_resumed", lang))
    try:
        show_status(gen, lang, cfg)
    except Exception as exc:  # noqa: BLE001 - the job runs without its status message
        logger.info("generation %s: no status message (%s)", gen.id, _describe(exc, cfg))
    return gen


def queue_position(generation_id) -> int:
    """Return the job's place in the queue (1 = next), counting queued jobs of every user created
    no later than it; 0 when it is no longer queued. For the bot's "⏳ в очереди (N)" message."""
    gen = Generation.get_or_none(Generation.id == generation_id)
    if gen is None or gen.status != "queued":
        return 0
    return (Generation.select()
            .where((Generation.status == "queued") & (Generation.created_at <= gen.created_at)).count())


def render_add_text(image_bytes: bytes, text: str, position: str = "bottom", color: str = "white",
                    cfg: config.Config | None = None) -> bytes:
    """The free local mode: draw `text` on the picture and return PNG bytes (the bot sends them).

    Never touches billing or the queue. `position` is top|center|bottom, `color`
    white|black|yellow|red (`media.TEXT_POSITIONS`, `media.TEXT_COLORS`).
    :raises media.InvalidInput: not a usable picture (`media.inspect_image`), empty or too long text.
    :raises ValueError: unknown position or colour.
    """
    cfg = cfg or config.get()
    media.inspect_image(image_bytes, cfg)
    return media.add_text(image_bytes, text, position=position, color=color, cfg=cfg)


def cancel_generation(generation_id, user_id: int, cfg: config.Config | None = None) -> bool:
    """Cancel a job of user `user_id` and release its reservation; True if it was cancelled.

    A job whose image was sent (a result message) is never cancelled. A queued job that never
    reached Fal is cancelled at once. A job with a Fal request id (running, or queued for a
    retry) is cancelled only when Fal confirms the cancel before a result (``PUT …/cancel``
    answered 202); otherwise the image is delivered and charged. A running job that has not
    submitted yet cannot be cancelled (it may submit at any moment). False for an unknown id or
    another user's job.
    """
    try:
        gid = uuid.UUID(str(generation_id))
    except ValueError:
        return False
    gen = Generation.get_or_none((Generation.id == gid) & (Generation.user == user_id))
    if gen is None or gen.status not in ACTIVE_STATES or gen.result_message_id:
        return False
    if not gen.fal_request_id:
        return gen.status == "queued" and _cancel(gid, user_id, None)
    cfg = cfg or config.get()
    if not media.backend(cfg).cancel(gen.endpoint, gen.fal_request_id):
        logger.info("generation %s: cancel refused, Fal did not cancel request %s (it finished or is "
                    "finishing): delivered and charged", gid, gen.fal_request_id)
        return False
    return _cancel(gid, user_id, gen.fal_request_id)


@billing.money_transaction
def _cancel(gid: uuid.UUID, user_id: int, request_id: str | None) -> bool:
    """active → canceled and the reservation released, only while no image was sent and the
    Fal request is the one whose cancel was confirmed (`request_id`, None: never submitted)."""
    request_match = (Generation.fal_request_id.is_null() if request_id is None
                     else (Generation.fal_request_id == request_id))
    changed = models.move(Generation, gid, ACTIVE_STATES if request_id else "queued", "canceled",
                          Generation.user == user_id, Generation.result_message_id.is_null(), request_match,
                          finished_at=utcnow())
    if not changed:
        return False
    gen = Generation.get_by_id(gid)
    try:
        billing.release(gen.reservation_id)
    except billing.ReservationClosed:
        pass  # expired by the sweeper already: nothing is held any more
    logger.info("generation %s: → canceled by user=%s, reservation %s released, request=%s", gid, user_id,
                gen.reservation_id, request_id)
    return True


# --------------------------------------------------------------------------------------------
# Running a job
# --------------------------------------------------------------------------------------------


class _Heartbeat:
    """Touch ``Generation.heartbeat_at`` every `interval` seconds from a daemon thread while a job
    runs, so `sweep` can tell a live job from one whose worker died."""

    def __init__(self, generation_id: str, interval: float = HEARTBEAT_INTERVAL, tick=None):
        self.generation_id = generation_id
        self.interval = interval
        self.tick = tick                 # called after each beat (the status message's elapsed time)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(self.interval + 5)
        return False

    def _loop(self):
        while not self._stop.wait(self.interval):
            try:
                with models.db.connection_context():
                    (Generation.update(heartbeat_at=utcnow())
                     .where((Generation.id == self.generation_id) & (Generation.status == "running")).execute())
                    if self.tick is not None:
                        self.tick()
            except Exception as exc:
                logger.warning("generation %s: heartbeat failed (%s)", self.generation_id, _describe(exc))


@huey.context_task(DB_SESSION)
def run_generation(generation_id: str):
    """Run (or resume) one queued job; safe to run more than once for the same id."""
    _run_generation(str(generation_id), config.get())


def _claim(gid: str) -> Generation | None:
    now = utcnow()
    claimed = models.move(Generation, gid, "queued", "running", started_at=fn.COALESCE(Generation.started_at, now),
                          heartbeat_at=now, attempts=Generation.attempts + 1)
    gen = Generation.get_or_none(Generation.id == gid)
    if not claimed:
        logger.info("generation %s: not run, status is %s", gid, gen.status if gen else "unknown")
        return None
    logger.info("generation %s: queued → running (attempt %d of %d) user=%s mode=%s request=%s",
                gid, gen.attempts, MAX_ATTEMPTS, gen.user_id, gen.mode, gen.fal_request_id)
    return gen


def _run_generation(gid: str, cfg: config.Config) -> None:
    gen = _claim(gid)
    if gen is None:
        return
    lang = texts.lang_of(User.get_by_id(gen.user_id).language_code)
    reservation = Reservation.get_by_id(gen.reservation_id)
    if reservation.state != "reserved" and not gen.fal_request_id and not gen.result_message_id:
        # The sweeper expired it while the job waited: do not start paying Fal for it now.
        _fail(gen, lang, "expired", "reservation %s is %s" % (reservation.id, reservation.state), cfg)
        return
    status = StatusMessage(gen, lang, cfg)
    refresh_queue_positions(cfg)                 # the jobs behind this one moved up
    with _Heartbeat(gid, tick=status.tick):
        try:
            _execute(gen, lang, cfg, status)
        except RetryTask:
            raise
        except Exception as exc:
            _handle_failure(gid, lang, exc, cfg)


def _execute(gen: Generation, lang: str, cfg: config.Config, status: "StatusMessage | None" = None) -> None:
    bot = telegram(cfg)
    status = status or StatusMessage(gen, lang, cfg)
    if gen.result_message_id is None:
        _show_running(bot, gen, lang, status)
        data, seed = _produce(gen, cfg, status.on_queue_update)
        status = Generation.select(Generation.status).where(Generation.id == gen.id).scalar()
        if status != "running":
            logger.info("generation %s: result not sent, the job is %s", gen.id, status)
            return
        message = _deliver(bot, gen, lang, data, seed, cfg)
        (Generation.update(result_message_id=message.message_id, seed=seed, result_file_id=_sent_file_id(message))
         .where(Generation.id == gen.id).execute())
        gen.result_message_id, gen.seed = message.message_id, seed
        logger.info("generation %s: result sent as message %s (%d bytes)", gen.id, message.message_id, len(data))
    outcome = _finish_delivered(gen.id, gen.reservation_id)
    if outcome in ("expired", "released"):
        logger.error("anomaly: generation %s delivered FREE, reservation %s was already %s (counted by "
                     "make audit as free_deliveries)", gen.id, gen.reservation_id, outcome)
        _best_effort(bot.edit_message_caption, _caption_free(gen, lang), chat_id=gen.chat_id,
                     message_id=gen.result_message_id, reply_markup=_result_buttons(gen, lang))
    logger.info("generation %s: running → delivered, reservation %s %s", gen.id, gen.reservation_id, outcome)
    status_message_id = _status_message_id(gen.id)
    if status_message_id:
        _best_effort(bot.delete_message, gen.chat_id, status_message_id)


def _sent_file_id(message) -> str | None:
    """The Telegram file id of a sent photo (its largest size) or document (for /history)."""
    if getattr(message, "photo", None):
        return message.photo[-1].file_id
    document = getattr(message, "document", None)
    return document.file_id if document is not None else None


def _status_message_id(gid) -> int | None:
    """The status message id as stored now (the bot may store it after the job started)."""
    row = Generation.select(Generation.status_message_id).where(Generation.id == gid).first()
    return row.status_message_id if row else None


def _best_effort(func, *args, **kwargs):
    """A Telegram call whose failure must not fail the job (status edits, chat actions)."""
    try:
        return tg(func, *args, **kwargs)
    except Exception as exc:
        logger.info("telegram %s failed (%s)", getattr(func, "__name__", "call"), _describe(exc))
        return None


STATUS_EDIT_INTERVAL = 3.0       # seconds between two edits of one status message (Telegram rate limits)
ELAPSED_AFTER = 20               # seconds: from then on the status message shows the time waited
_queue_shown: dict = {}          # generation id -> (position shown, monotonic time) for queued jobs


def _cancel_markup(gen_id, lang: str) -> types.InlineKeyboardMarkup:
    markup = types.InlineKeyboardMarkup()
    markup.add(types.InlineKeyboardButton(texts.t("btn_cancel_job", lang), callback_data="jobcancel:%s" % gen_id))
    return markup


class StatusMessage:
    """One job's status message, edited in place while the job runs: "▶️ В работе", Fal's queue
    position, the mode's own text ("⬆️ Улучшаю…"), the time waited for long jobs, "retrying
    (2/4)". Edits are rate-limited (STATUS_EDIT_INTERVAL) and skipped when nothing changed; the
    cancel button stays on each. Never raises."""

    def __init__(self, gen: Generation, lang: str, cfg: config.Config):
        self.gen, self.lang, self.cfg = gen, lang, cfg
        self.phase = texts.t("job_started", lang)
        self.shown: str | None = None
        self.at = 0.0
        self.queue_seen = False
        self.began = time.monotonic()

    def _text(self) -> str:
        elapsed = int(time.monotonic() - self.began)
        if elapsed >= ELAPSED_AFTER:
            return "%s %s" % (self.phase, texts.t("job_elapsed", self.lang, time="%d:%02d" % divmod(elapsed, 60)))
        return self.phase

    def show(self, phase: str | None = None, *, force: bool = False) -> None:
        """Set the phase text (None: keep it) and edit the message unless rate-limited."""
        if phase is not None:
            self.phase = phase
        text = self._text()
        now = time.monotonic()
        if text == self.shown or (not force and now - self.at < STATUS_EDIT_INTERVAL):
            return
        message_id = self.gen.status_message_id or _status_message_id(self.gen.id)
        if not message_id:
            return
        self.gen.status_message_id = message_id
        self.shown, self.at = text, now
        _best_effort(telegram(self.cfg).edit_message_text, text, chat_id=self.gen.chat_id, message_id=message_id,
                     reply_markup=_cancel_markup(self.gen.id, self.lang))

    def tick(self) -> None:
        """From the heartbeat thread: refresh the time waited."""
        self.show()

    def on_queue_update(self, event: dict) -> None:
        """Fal's status changes: its queue position, then the mode's own "working" text."""
        if event.get("status") == "IN_QUEUE" and event.get("queue_position") is not None:
            first, self.queue_seen = not self.queue_seen, True
            self.show(texts.t("job_fal_queue", self.lang, position=int(event["queue_position"]) + 1), force=first)
        elif event.get("status") == "IN_PROGRESS":
            self.show(texts.t("job_working_" + self.gen.mode, self.lang), force=True)


def refresh_queue_positions(cfg: config.Config | None = None, limit: int = 20) -> int:
    """Edit the "⏳ В очереди (N)" messages of the oldest `limit` queued jobs whose place changed,
    each at most every STATUS_EDIT_INTERVAL seconds; return how many were edited. Never raises."""
    try:
        cfg = cfg or config.get()
        queued = list(Generation.select(Generation.id, Generation.chat_id, Generation.status_message_id,
                                        Generation.user)
                      .where(Generation.status == "queued").order_by(Generation.created_at).limit(limit))
        edited, now = 0, time.monotonic()
        for position, gen in enumerate(queued, start=1):
            shown = _queue_shown.get(str(gen.id))
            if not gen.status_message_id or (shown and (shown[0] == position or now - shown[1] < STATUS_EDIT_INTERVAL)):
                continue
            lang = texts.lang_of(User.get_by_id(gen.user_id).language_code)
            _queue_shown[str(gen.id)] = (position, now)
            _best_effort(telegram(cfg).edit_message_text, texts.t("job_queued", lang, position=position),
                         chat_id=gen.chat_id, message_id=gen.status_message_id,
                         reply_markup=_cancel_markup(gen.id, lang))
            edited += 1
        if len(_queue_shown) > 10 * limit:
            _queue_shown.clear()
        return edited
    except Exception as exc:  # noqa: BLE001 - cosmetic
        logger.info("queue positions not refreshed (%s)", _describe(exc))
        return 0


def _show_running(bot, gen: Generation, lang: str, status: StatusMessage | None = None) -> None:
    """Edit the bot's "⏳ в очереди" message into "▶️ В работе…" (its cancel button stays: a
    cancel Fal confirms releases the hold) and send the upload_photo chat action. With no status
    message yet (the bot has not stored it), only the chat action is sent: no second status message."""
    _queue_shown.pop(str(gen.id), None)
    (status or StatusMessage(gen, lang, config.get())).show(force=True)
    _best_effort(bot.send_chat_action, gen.chat_id, "upload_photo")


def _store_request_id(gid, endpoint: str, request_id: str) -> None:
    """on_enqueue: persist the Fal request id at once, in its own short transaction."""
    with models.db.atomic():
        Generation.update(fal_request_id=request_id, endpoint=endpoint).where(Generation.id == gid).execute()
    logger.info("generation %s: Fal request %s stored (%s)", gid, request_id, endpoint)


MIN_ATTEMPT_WAIT = 5.0           # seconds a run gets even when FAL_TIMEOUT is spent (crash resume, backlog)


def _budget(gen: Generation, cfg: config.Config, now: datetime.datetime | None = None) -> float:
    """Seconds left of FAL_TIMEOUT, counted from the job's first start (retries included)."""
    started = gen.started_at or now or utcnow()
    return cfg.fal_timeout - ((now or utcnow()) - started).total_seconds()


def _produce(gen: Generation, cfg: config.Config, on_queue_update=None) -> tuple[bytes, int | None]:
    """Build (or resume) the provider request and return (result image bytes, seed or None)."""
    backend = media.backend(cfg)
    if gen.fal_request_id and isinstance(backend, media.FalGateway):
        # Resuming: Fal only needs the endpoint and the id; nothing is submitted again.
        request = media.FalRequest(endpoint=gen.endpoint, arguments={}, mode=gen.mode)
    else:
        images = []
        for file_id in gen.input_file_ids or []:
            data = download_file(file_id, cfg)
            media.inspect_image(data, cfg)
            images.append(data)
        request = media.build_request(gen.mode, gen.prompt, images, cfg, gen.options or None,
                                      media.mode_extra_args(gen.mode))
    # The whole wait is capped by FAL_TIMEOUT: this run gets what is left of it; a run resumed after
    # a crash (the sweeper) or delayed by a backlog still gets a short wait (its result may be ready).
    remaining = max(_budget(gen, cfg), min(cfg.fal_timeout, MIN_ATTEMPT_WAIT))
    result = backend.run(request, request_id=gen.fal_request_id,
                         on_enqueue=functools.partial(_store_request_id, gen.id, request.endpoint),
                         timeout=remaining, cancel_on_timeout=True, on_queue_update=on_queue_update)
    urls = media.parse_result(result)
    seed = media.parse_seed(result)
    return media.download_result(urls[0], cfg, timeout=RESULT_TIMEOUT), seed


RESULT_ACTIONS = (("edit", "btn_use_edit"), ("upscale", "btn_use_upscale"), ("add_text", "btn_use_add_text"))


def result_buttons(gen, lang: str, *, again: bool = True) -> types.InlineKeyboardMarkup:
    """The buttons under a result: "🔁 Ещё раз", the actions that take the result as the next
    input ("✏️ Изменить это", "⬆️ Улучшить это", "📝 Добавить текст": ``use:<mode>:<id>``), "🏠 Меню"."""
    markup = types.InlineKeyboardMarkup()
    if again:
        markup.row(types.InlineKeyboardButton(texts.t("job_again_button", lang), callback_data="again:%s" % gen.id))
    markup.row(*[types.InlineKeyboardButton(texts.t(key, lang), callback_data="use:%s:%s" % (mode, gen.id))
                 for mode, key in RESULT_ACTIONS])
    markup.row(types.InlineKeyboardButton(texts.t("job_menu_button", lang), callback_data="menu"))
    return markup


_result_buttons = result_buttons


SEED_MODES = ("generate", "edit", "merge")   # where a seed reproduces a picture from a prompt


def _caption(gen: Generation, lang: str, seed: int | None, cfg: config.Config) -> str:
    """Mode, seed, what the job costs and what is left (≤ 1024 characters, plain text)."""
    lines = [texts.t("job_done", lang, mode=texts.t("job_mode_" + gen.mode, lang))]
    if seed is not None and gen.mode in SEED_MODES:
        lines.append(texts.t("job_seed", lang, seed=seed))
    reservation = Reservation.get_by_id(gen.reservation_id)
    balance = billing.get_balance(gen.user_id)
    if reservation.state not in ("reserved", "committed"):
        lines.append(texts.t("job_cost_free", lang))
    elif reservation.asset == "credits":
        lines.append(texts.t("job_cost_credits", lang, cost=reservation.amount, balance=balance.credits))
    elif reservation.asset == "free_ops":
        lines.append(texts.t("job_cost_free_op", lang, left=balance.free_ops, total=cfg.free_operations_count,
                             balance=balance.credits))
    else:
        lines.append(texts.t("job_cost_free_access", lang))
    return "\n".join(lines)[:CAPTION_LIMIT]


def _caption_free(gen: Generation, lang: str) -> str:
    lines = [texts.t("job_done", lang, mode=texts.t("job_mode_" + gen.mode, lang))]
    if gen.seed is not None and gen.mode in SEED_MODES:
        lines.append(texts.t("job_seed", lang, seed=gen.seed))
    lines.append(texts.t("job_cost_free", lang))
    return "\n".join(lines)[:CAPTION_LIMIT]


def _photo_refused(exc: ApiTelegramException) -> bool:
    """True when Telegram refuses bytes as a photo that it would take as a document (sendPhoto:
    ≤ 10 MB, width + height ≤ 10000, ratio ≤ 20)."""
    text = (exc.description or "").upper()
    return exc.error_code == 413 or (exc.error_code == 400 and any(
        word in text for word in ("PHOTO_INVALID_DIMENSIONS", "TOO BIG", "PHOTO_SAVE_FILE_INVALID",
                                  "IMAGE_PROCESS_FAILED", "PHOTO_EXT_INVALID")))


def _deliver(bot, gen: Generation, lang: str, data: bytes, seed: int | None, cfg: config.Config):
    """Send the result with caption and buttons: as a photo when Telegram takes it, else as a
    document (lossless). No parse_mode: nothing the user typed is parsed as markup."""
    caption = _caption(gen, lang, seed, cfg)
    markup = _result_buttons(gen, lang)
    ext = {"image/jpeg": "jpg", "image/webp": "webp"}.get(media.sniff_content_type(data), "png")
    name = "medialab-%s.%s" % (gen.mode, ext)
    if media.fits_telegram_photo(data):
        try:
            return tg(bot.send_photo, gen.chat_id, (name, data), caption=caption, reply_markup=markup)
        except ApiTelegramException as exc:
            if not _photo_refused(exc):
                raise
            logger.info("generation %s: Telegram refused the photo (%s); sending a document", gen.id,
                        exc.description)
    return tg(bot.send_document, gen.chat_id, data, caption=caption, reply_markup=markup,
              visible_file_name=name)


@billing.money_transaction
def _finish_delivered(gid, reservation_id: int) -> str:
    """Mark the job delivered and commit its reservation in one transaction; return
    "committed", or "expired"/"released"/"already" when the reservation was closed before."""
    models.move(Generation, gid, ACTIVE_STATES, "delivered", finished_at=utcnow(), error=None)
    try:
        billing.commit(reservation_id)
        return "committed"
    except billing.AlreadyCommitted:
        return "already"
    except billing.ReservationExpired:
        return "expired"
    except billing.AlreadyReleased:
        return "released"


# --- failures --------------------------------------------------------------------------------

_INPUT_REASONS = ("not_an_image", "unsupported_format", "image_too_big", "image_too_small")


def _classify(exc: BaseException) -> tuple[str, bool, float]:
    """Return (kind, retryable, minimum delay in seconds) for a failure of a job."""
    if isinstance(exc, media.InvalidInput):
        return "input", False, 0
    if isinstance(exc, media.ContentPolicyError):
        return "policy", False, 0
    if isinstance(exc, media.PermanentProviderError):
        return "rejected", False, 0
    if isinstance(exc, media.ProviderTimeout):
        return "timeout", True, 0
    if isinstance(exc, media.TransientProviderError):
        return "unavailable", True, 0
    if isinstance(exc, media.ResultError):
        return ("unavailable", True, 0) if exc.transient else ("generic", False, 0)
    if isinstance(exc, TelegramUnavailable):
        return "unavailable", True, 0
    if isinstance(exc, InputUnavailable):
        return "input_missing", False, 0
    if isinstance(exc, ApiTelegramException):
        if exc.error_code == 429:
            return "unavailable", True, retry_after(exc)
        return ("unavailable", True, 0) if exc.error_code >= 500 else ("generic", False, 0)
    if isinstance(exc, (ApiHTTPException, requests.ConnectionError, requests.Timeout, OperationalError)):
        return "unavailable", True, 0
    return "generic", False, 0


def _retry_delay(gen: Generation, at_least: float = 0) -> float:
    return max(at_least, RETRY_DELAYS[min(max(gen.attempts, 1) - 1, len(RETRY_DELAYS) - 1)])


def _may_retry(gen: Generation, reservation: Reservation | None, cfg: config.Config, delay: float,
               now: datetime.datetime) -> bool:
    """True if one more run fits: attempts left, the reservation still open, and the retry's delay
    within what is left of FAL_TIMEOUT (the whole wait is capped). (The sweeper keeps the hold of
    a live job, so a retry never runs out of reservation time.)"""
    return (gen.attempts < MAX_ATTEMPTS and reservation is not None and reservation.state == "reserved"
            and _budget(gen, cfg, now) > delay)


def _handle_failure(gid: str, lang: str, exc: BaseException, cfg: config.Config) -> None:
    """Retry a transient failure later (RetryTask) or fail the job for good."""
    _alert_fal_auth(exc, cfg)
    kind, retryable, at_least = _classify(exc)
    gen = Generation.get_by_id(gid)  # fresh: the request id may have been stored meanwhile
    reservation = Reservation.get_or_none(Reservation.id == gen.reservation_id)
    delay = _retry_delay(gen, at_least)
    now = utcnow()
    if gen.result_message_id and reservation is not None and reservation.state == "reserved":
        retryable = True  # the image is out; only the bookkeeping failed: always finish it
    if retryable and (_may_retry(gen, reservation, cfg, delay, now) or gen.result_message_id):
        changes = dict(heartbeat_at=now + datetime.timedelta(seconds=delay), error=_describe(exc, cfg))
        if getattr(exc, "request_failed", False) and not gen.result_message_id:
            changes["fal_request_id"] = None     # Fal failed that request: the retry submits a new one
        requeued = models.move(Generation, gid, "running", "queued", **changes)
        logger.warning("generation %s: running → queued, retry in %g s after attempt %d of %d (%s: %s), "
                       "request=%s%s", gid, delay, gen.attempts, MAX_ATTEMPTS, kind, _describe(exc, cfg),
                       gen.fal_request_id, " (failed on Fal: a new request next)" if "fal_request_id" in changes else "")
        if requeued:
            if not gen.result_message_id:
                StatusMessage(gen, lang, cfg).show(texts.t("job_retrying", lang, attempt=gen.attempts + 1,
                                                           total=MAX_ATTEMPTS), force=True)
            raise RetryTask(delay=delay)
        return
    if kind == "generic":
        logger.error("generation %s: unexpected failure: %s", gid, _describe(exc, cfg),
                     exc_info=not isinstance(exc, (requests.RequestException, ApiException)))
    _fail(gen, lang, kind, _describe(exc, cfg), cfg, exc=exc)


@billing.money_transaction
def _finish_failed(gid, reservation_id: int, error: str) -> bool:
    changed = models.move(Generation, gid, ACTIVE_STATES, "failed", finished_at=utcnow(), error=error[:1000])
    if not changed:
        return False
    try:
        billing.release(reservation_id)
    except billing.ReservationClosed:
        pass  # expired by the sweeper: already back with the user
    return True


def _failure_text(kind: str, lang: str, exc: BaseException | None) -> str:
    if kind == "input":
        code = getattr(exc, "code", "")
        reason = texts.t("job_input_" + code if code in _INPUT_REASONS else "job_input_other", lang)
        return texts.t("job_failed_input", lang, reason=reason)
    key = "job_failed_" + kind
    return texts.t(key if key in texts.TEXTS else "job_failed_generic", lang)


def _fail(gen: Generation, lang: str, kind: str, error: str, cfg: config.Config, *, exc=None) -> None:
    """Fail the job for good: release its reservation and tell the user nothing was charged."""
    if not _finish_failed(gen.id, gen.reservation_id, "%s: %s" % (kind, error)):
        logger.info("generation %s: already finished, failure (%s) not recorded", gen.id, kind)
        return
    logger.warning("generation %s: → failed (%s: %s), reservation %s released, request=%s", gen.id, kind,
                   error, gen.reservation_id, gen.fal_request_id)
    if kind == "unavailable" and gen.fal_request_id and gen.endpoint:
        # We stop waiting for a request Fal may still be running: ask it to stop (best-effort,
        # never raises). Timeouts were already cancelled by the gateway on the final attempt.
        media.backend(cfg).cancel(gen.endpoint, gen.fal_request_id)
    markup = None
    try:   # the inputs are kept: "🔁 Повторить" / "✏️ Изменить запрос"
        draft = save_draft(gen.user_id, gen.chat_id, gen.mode, prompt=gen.prompt, options=gen.options,
                           file_ids=gen.input_file_ids or [], reason="policy" if kind == "policy" else "failed", cfg=cfg)
        markup = draft_buttons(draft, lang)
    except Exception as exc_:  # noqa: BLE001 - the failure notice matters more than the draft
        logger.warning("generation %s: draft not kept (%s)", gen.id, _describe(exc_, cfg))
    _tell(gen, _failure_text(kind, lang, exc), cfg, markup)


def _tell(gen: Generation, text: str, cfg: config.Config, markup=None) -> None:
    """Show `text` (with `markup`) in place of the status message (or as a new message); never raises."""
    bot = telegram(cfg)
    status_message_id = _status_message_id(gen.id)
    if status_message_id and _best_effort(bot.edit_message_text, text, chat_id=gen.chat_id,
                                          message_id=status_message_id, reply_markup=markup):
        return
    _best_effort(bot.send_message, gen.chat_id, text, reply_markup=markup)


@huey.signal(SIGNAL_INTERRUPTED)
def _on_interrupted(signal_name, task, *args, **kwargs):
    """SIGTERM stopped a running task: put its job back to queued and re-enqueue it (huey
    docs/recipes.rst); the next run resumes the stored Fal request id."""
    if isinstance(task, PeriodicTask):
        return
    try:
        if isinstance(task, run_generation.task_class) and task.args:
            with DB_SESSION:
                models.move(Generation, str(task.args[0]), "running", "queued", heartbeat_at=utcnow())
            logger.warning("generation %s: interrupted by shutdown, re-enqueued", task.args[0])
        huey.enqueue(task)
    except Exception as exc:
        logger.error("could not re-enqueue interrupted task %s (%s); the sweeper will", task.id, _describe(exc))


# --------------------------------------------------------------------------------------------
# Payments
# --------------------------------------------------------------------------------------------


@huey.context_task(DB_SESSION)
def notify_payment(payment_id: str):
    """Tell the user a top-up was credited: "✅ Оплата получена! Начислено N кредитов." + balance.

    Sends once per payment however often it runs (`payments.claim_notification`)."""
    return _notify_payment(str(payment_id), config.get())


_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def referral_code(user_id: int) -> str:
    """The code of a user's referral link (``/start ref_<code>``): the user id in base 36."""
    n, out = int(user_id), ""
    while True:
        n, r = divmod(n, 36)
        out = _B36[r] + out
        if n == 0:
            return out


def set_referrer(user_id: int, code: str) -> bool:
    """Record that `code`'s owner referred user `user_id` (a new user; never themselves; never
    changed once set). True when recorded."""
    try:
        referrer_id = int(code.lower(), 36) if code and len(code) <= 12 else None
    except ValueError:
        referrer_id = None
    if referrer_id is None or referrer_id == user_id or not User.select().where(User.id == referrer_id).exists():
        logger.info("user=%s: referral code %r ignored", user_id, code[:16])
        return False
    changed = (User.update(referred_by=referrer_id)
               .where((User.id == user_id) & User.referred_by.is_null()).execute())
    if changed:
        logger.info("user=%s referred by user=%s", user_id, referrer_id)
    return bool(changed)


def referral_bonus(payment_id, cfg: config.Config | None = None) -> bool:
    """When a referred user's top-up is credited, give the referrer REFERRAL_BONUS credits — once
    per referred user (ledger idempotency key ``referral:<user id>``, kind grant), only for a
    succeeded (credited) top-up — and tell them. True when this call granted it."""
    cfg = cfg or config.get()
    payment = Payment.get_or_none(Payment.id == str(payment_id))
    if cfg.referral_bonus <= 0 or payment is None or payment.status != "succeeded":
        return False
    user = User.get_by_id(payment.user_id)
    if not user.referred_by or user.referred_by == user.id:
        return False
    key = "referral:%s" % user.id
    if models.LedgerEntry.select().where(models.LedgerEntry.idempotency_key == key).exists():
        return False
    # Two tellers of one top-up may race here: the same key and reference replay, crediting once.
    billing.credit(user.referred_by, cfg.referral_bonus, kind="grant", reference=key, idempotency_key=key)
    logger.info("referral: user=%s got %s credits for user=%s's first top-up %s", user.referred_by,
                cfg.referral_bonus, user.id, payment.id)
    tell_user_once("notice:" + key, user.referred_by, "notify_referral_bonus", cfg, credits=cfg.referral_bonus,
                   balance=billing.get_balance(user.referred_by).credits)
    return True


def _notify_payment(payment_id: str, cfg: config.Config) -> bool:
    try:
        referral_bonus(payment_id, cfg)
    except Exception as exc:  # noqa: BLE001 - the payment notice must go out
        logger.error("payment %s: referral bonus failed (%s)", payment_id, _describe(exc, cfg))
    if not payments.claim_notification(payment_id):
        logger.info("payment %s: notification already sent or not due", payment_id)
        return False
    payment = Payment.get_by_id(payment_id)
    _tell_user(payment.user_id, "notify_payment_received", "payment %s" % payment_id, cfg,
               credits=payment.credits)
    resume_draft(payment.user_id, cfg)       # "Пополнить и продолжить": the job starts now
    return True


def _tell_user(user_id: int, text_key: str, what: str, cfg: config.Config, **values) -> None:
    """Send text `text_key` (with `values` and the user's balance) to user `user_id` in their
    language; a failure is logged, never raised (the money change it reports is committed)."""
    user = User.get_by_id(user_id)
    text = texts.t(text_key, texts.lang_of(user.language_code), balance=billing.get_balance(user.id).credits,
                   **values)
    try:
        tg(telegram(cfg).send_message, user.telegram_id, text)
        logger.info("%s: user=%s told (%s)", what, user.id, text_key)
    except Exception as exc:
        logger.warning("%s: could not tell user=%s (%s)", what, user.id, _describe(exc, cfg))


def tell_payment(payment_id, cfg: config.Config | None = None) -> bool:
    """`notify_payment` in this process now (the bot, after a Stars successful_payment): tells the
    user once per payment however many processes call it; True for the call that claimed it."""
    return _notify_payment(str(payment_id), cfg or config.get())


def tell_refund(refund_id: str, cfg: config.Config | None = None) -> bool:
    """`notify_refund` in this process now (the bot, after a Stars refund); once per refund."""
    return _notify_refund(str(refund_id), cfg or config.get())


@huey.context_task(DB_SESSION)
def notify_refund(refund_id: str):
    """Tell the user a refund took credits back (once per refund: `payments.claim_refund_notification`)."""
    return _notify_refund(str(refund_id), config.get())


def _notify_refund(refund_id: str, cfg: config.Config) -> bool:
    if not payments.claim_refund_notification(refund_id):
        logger.info("refund %s: notification already sent", refund_id)
        return False
    refund = models.Refund.get_by_id(refund_id)
    order = Payment.get_by_id(refund.payment_id)
    if order.currency == stars.CURRENCY:       # amount_kopecks counts Stars for a Stars order
        _tell_user(order.user_id, "notify_refund_stars", "refund %s" % refund_id, cfg,
                   stars=refund.amount_kopecks, credits=refund.credits_debited)
    else:
        _tell_user(order.user_id, "notify_refund", "refund %s" % refund_id, cfg,
                   amount=payments.kopecks_to_value(refund.amount_kopecks), credits=refund.credits_debited)
    return True


# --- every money change is told, once ----------------------------------------------------------


def tell_user_once(key: str, user_id: int, text_key: str, cfg: config.Config | None = None, markup=None,
                   **values) -> bool:
    """Send text `text_key` (in the user's language, with `values`) to user `user_id` once per
    `key` (``notice:…``, recorded with `billing.claim_action`: a repeat sends nothing). Returns True
    when this call sent (or tried to send) it. Never raises for a Telegram failure."""
    cfg = cfg or config.get()
    if models.AdminAction.select().where(models.AdminAction.key == key).exists() or not billing.claim_action(key):
        return False
    user = User.get_by_id(user_id)
    text = texts.t(text_key, texts.lang_of(user.language_code), **values)
    try:
        tg(telegram(cfg).send_message, user.telegram_id, text, reply_markup=markup)
        logger.info("user=%s told %s (%s)", user_id, text_key, key)
    except Exception as exc:  # noqa: BLE001 - the change is done; the notice is best effort
        logger.warning("user=%s not told %s (%s)", user_id, text_key, _describe(exc, cfg))
    return True


@huey.context_task(DB_SESSION)
def notify_payment_canceled(payment_id: str):
    """Tell the user a top-up was canceled (nothing was charged), once per payment."""
    payment = Payment.get_or_none(Payment.id == str(payment_id))
    if payment is None or payment.status != "canceled":
        return False
    return tell_user_once("notice:canceled:%s" % payment.id, payment.user_id, "notify_payment_canceled",
                          amount=payments.kopecks_to_value(payment.amount_kopecks), credits=payment.credits)


def notify_grant(user_id: int, credits: int, key: str, cfg: config.Config | None = None) -> bool:
    """Tell the user an admin granted `credits` (once per grant idempotency `key`)."""
    return tell_user_once("notice:" + key, user_id, "notify_grant", cfg, credits=credits,
                          balance=billing.get_balance(user_id).credits)


def notify_free_access(user_id: int, key: str, cfg: config.Config | None = None) -> bool:
    """Tell the user free access was granted, with its end date if any (once per `key`)."""
    user = User.get_by_id(user_id)
    if user.free_access_until is None:
        return tell_user_once("notice:" + key, user_id, "notify_free_access_forever", cfg)
    return tell_user_once("notice:" + key, user_id, "notify_free_access", cfg,
                          until=user.free_access_until.strftime("%d.%m.%Y %H:%M UTC"))


def remind_free_access_once(now: datetime.datetime | None = None, cfg: config.Config | None = None) -> int:
    """Tell each user whose free access ends within a day that it ends (once per end date);
    return how many were told."""
    now = now or utcnow()
    ending = (User.select().where(User.has_free_access & User.free_access_until.is_null(False)
                                  & (User.free_access_until > now)
                                  & (User.free_access_until <= now + datetime.timedelta(days=1))))
    told = 0
    for user in ending:
        key = "notice:free_access_ends:%s:%s" % (user.id, user.free_access_until.strftime("%Y%m%d%H%M"))
        told += tell_user_once(key, user.id, "notify_free_access_ending", cfg,
                               until=user.free_access_until.strftime("%d.%m.%Y %H:%M UTC"))
    return told


@huey.periodic_task(crontab(minute="*/10"))
def free_access_reminders():
    """Every 10 minutes: `remind_free_access_once`."""
    with DB_SESSION:
        return remind_free_access_once()


@huey.context_task(DB_SESSION)
def alert_admins_task(key: str, text_key: str, **values):
    """`alert_admins` with text `texts[text_key]` (Russian) formatted with `values`, from a process
    that must not wait on Telegram (the web app)."""
    return alert_admins(key, texts.t(text_key, "ru", **values))


# --------------------------------------------------------------------------------------------
# Periodic tasks
# --------------------------------------------------------------------------------------------

def _queued_task_ids(limit: int = 10000) -> set:
    """Generation ids that have a run_generation task waiting in the queue or the schedule."""
    ids = set()
    try:
        for task in list(huey.pending(limit)) + list(huey.scheduled(limit)):
            if isinstance(task, run_generation.task_class) and task.args:
                ids.add(str(task.args[0]))
    except Exception as exc:
        logger.warning("could not read the queue (%s)", _describe(exc))
    return ids


def sweep_once(now: datetime.datetime | None = None, cfg: config.Config | None = None) -> dict:
    """One pass of the sweeper; return {"expired": [reservation ids], "extended": count,
    "failed", "resumed", "requeued": [generation ids], "pruned": count}.

    A hold lasts as long as its job is alive (issue 9 §3): a job waiting in a long queue, or
    running with a fresh heartbeat, is never failed or delivered free because of its hold's age.

    1. ``running`` jobs without a heartbeat for HEARTBEAT_STALE s (worker killed) go back to
       ``queued`` and are enqueued: they resume their stored Fal request id. A job that has used
       all MAX_ATTEMPTS runs this way (it keeps killing its worker) is dead: it fails, released.
    2. ``queued`` jobs untouched for QUEUED_STALE s with no task in the queue (an enqueue lost
       by a crash between commit and enqueue) are enqueued again.
    3. The holds of every queued or running job that reach their expiry get another
       RESERVATION_TTL (`billing.extend`): the job is alive, steps 1–2 saw to that.
    4. `billing.expire_stale(now)`: what is left past its expiry has no live job; it goes back.
    5. Jobs whose reservation is closed and that are not alive fail (the user is told nothing
       was charged); one whose image was already sent is marked delivered (a counted anomaly).
    6. `prune_idle_state`: conversation states and once-only keys past STATE_RETENTION_DAYS.
    """
    cfg = cfg or config.get()
    now = now or utcnow()
    report = {"expired": [], "extended": 0, "failed": [], "resumed": [], "requeued": []}
    _resume_dead_jobs(now, cfg, report)
    _requeue_lost_jobs(now, report)
    # A hold expiring within the next sweep is extended now, so it never lapses between passes.
    horizon = now + datetime.timedelta(seconds=cfg.sweep_interval)
    live = [row.reservation_id for row in Generation.select(Generation.reservation)
            .join(Reservation, on=(Generation.reservation == Reservation.id))
            .where(Generation.status.in_(ACTIVE_STATES) & (Reservation.state == "reserved")
                   & (Reservation.expires_at <= horizon))]
    report["extended"] = billing.extend(live, cfg.reservation_ttl, now)
    if report["extended"]:
        logger.info("sweep: extended the holds of %d live jobs by %s s", report["extended"], cfg.reservation_ttl)
    report["expired"] = billing.expire_stale(now)
    Draft.delete().where(Draft.expires_at <= now).execute()     # DRAFT_TTL is over
    _end_jobs_without_a_hold(now, cfg, report)
    report["pruned"] = prune_idle_state(now, cfg)
    return report


def prune_idle_state(now: datetime.datetime, cfg: config.Config) -> int:
    """Delete the conversation states of chats idle for STATE_RETENTION_DAYS and the once-only
    keys (`models.AdminAction`) older than that; return the rows deleted (0 when the setting is 0).

    Safe to forget: a button of a forgotten flow answers "no longer active" (its flow token is
    gone), a face-swap consent is asked again, and Telegram redelivers an update for 24 hours
    only, far inside any retention. Money idempotency lives in the ledger, never here.
    """
    if not cfg.state_retention_days:
        return 0
    cutoff = now - datetime.timedelta(days=cfg.state_retention_days)
    with billing.writer_turn():
        deleted = (models.ConversationState.delete().where(models.ConversationState.updated_at < cutoff).execute()
                   + models.AdminAction.delete().where(models.AdminAction.created_at < cutoff).execute())
    if deleted:
        logger.info("sweep: %d idle conversation states and once-only keys older than %d days deleted",
                    deleted, cfg.state_retention_days)
    return deleted


def _resume_dead_jobs(now: datetime.datetime, cfg: config.Config, report: dict) -> None:
    """Step 1 of `sweep_once`: running jobs without a fresh heartbeat are resumed, or failed once
    they have used MAX_ATTEMPTS runs."""
    stale = now - datetime.timedelta(seconds=HEARTBEAT_STALE)
    dead = (Generation.select().where((Generation.status == "running")
                                      & (Generation.heartbeat_at.is_null() | (Generation.heartbeat_at < stale))))
    for gen in dead:
        if gen.attempts >= MAX_ATTEMPTS and not gen.result_message_id:
            lang = texts.lang_of(User.get_by_id(gen.user_id).language_code)
            _fail(gen, lang, "unavailable", "the worker died during each of %d runs" % gen.attempts, cfg)
            report["failed"].append(str(gen.id))
            continue
        moved = models.move(Generation, gen.id, "running", "queued",
                            Generation.heartbeat_at.is_null() | (Generation.heartbeat_at < stale), heartbeat_at=now)
        if moved:
            logger.warning("generation %s: running → queued by the sweeper (no heartbeat since %s), "
                           "resumes request %s", gen.id, gen.heartbeat_at, gen.fal_request_id)
            _enqueue(str(gen.id))
            report["resumed"].append(str(gen.id))


def _requeue_lost_jobs(now: datetime.datetime, report: dict) -> None:
    """Step 2 of `sweep_once`: queued jobs untouched for QUEUED_STALE s with no task in the queue
    are enqueued again."""
    waiting = now - datetime.timedelta(seconds=QUEUED_STALE)
    lost = list(Generation.select().where(
        (Generation.status == "queued")
        & (fn.COALESCE(Generation.heartbeat_at, Generation.created_at) < waiting)))
    if not lost:
        return
    in_queue = _queued_task_ids()
    for gen in lost:
        if str(gen.id) in in_queue:
            continue
        Generation.update(heartbeat_at=now).where((Generation.id == gen.id)
                                                  & (Generation.status == "queued")).execute()
        logger.warning("generation %s: queued with no task in the queue, enqueued again", gen.id)
        _enqueue(str(gen.id))
        report["requeued"].append(str(gen.id))


def _end_jobs_without_a_hold(now: datetime.datetime, cfg: config.Config, report: dict) -> None:
    """Step 5 of `sweep_once`: jobs whose reservation is closed and that are not alive fail; one
    whose image was already sent is marked delivered (a counted anomaly)."""
    stale = now - datetime.timedelta(seconds=HEARTBEAT_STALE)
    closed = (Generation.select().join(Reservation, on=(Generation.reservation == Reservation.id))
              .where(Generation.status.in_(ACTIVE_STATES) & (Reservation.state != "reserved")))
    for gen in closed:
        if gen.status == "running" and gen.heartbeat_at is not None and gen.heartbeat_at > stale:
            continue
        if gen.result_message_id:  # the image was sent; its bookkeeping never finished
            _finish_delivered(gen.id, gen.reservation_id)
            logger.error("anomaly: generation %s marked delivered FREE by the sweeper", gen.id)
            continue
        lang = texts.lang_of(User.get_by_id(gen.user_id).language_code)
        _fail(gen, lang, "expired", "reservation expired before the job finished", cfg)
        report["failed"].append(str(gen.id))


def _enqueue(generation_id: str) -> None:
    try:
        run_generation(generation_id)
    except Exception as exc:
        logger.error("generation %s: enqueue failed (%s)", generation_id, _describe(exc))


def sweep() -> dict:
    """One sweeper pass with its own database connection (`sweep_once`); logs only when it did
    something. Run every SWEEP_INTERVAL seconds by the consumer's `Ticker`."""
    cfg = config.get()
    with DB_SESSION:
        report = sweep_once(cfg=cfg)
        ops.beat("task:sweep")
    if any(report.values()):
        logger.info("sweep: %s", {k: (len(v) if isinstance(v, list) else v) for k, v in report.items()})
    else:
        logger.debug("sweep: nothing to do")
    return report


def reconcile_once(cfg: config.Config | None = None, now: datetime.datetime | None = None) -> list:
    """Reconcile pending top-ups and refunds with YooKassa (`payments.reconcile`), then enqueue
    `notify_payment` for each credited payment and for succeeded payments whose user was never
    told (older than a minute, so the webhook's own notification goes first), `notify_refund`
    likewise for refunds, and tell the admins about orders that need attention and about
    refused credentials. Returns the payment ids notified."""
    cfg = cfg or config.get()
    now = now or utcnow()
    report = payments.ReconcileReport()
    if cfg.yookassa_configured:
        try:
            report = payments.reconcile(cfg, now)
        except payments.PaymentError as exc:
            logger.warning("reconcile failed (%s)", _describe(exc, cfg))
    for payment_id in report.needs_attention:
        alert_needs_attention(payment_id, cfg)
    if report.auth_failed:
        alert_admins("yookassa_auth", texts.t("admin_alert_yookassa_auth", "ru"), cfg)
    unnotified = [str(p) for p in payments.unnotified_payments(older_than=60, now=now)]
    ids = list(dict.fromkeys([str(p) for p in report.credited] + unnotified))
    for payment_id in ids:
        try:
            notify_payment(payment_id)
        except Exception as exc:
            logger.error("payment %s: could not enqueue the notification (%s)", payment_id, _describe(exc, cfg))
    for payment_id in report.canceled_ids:
        try:
            notify_payment_canceled(str(payment_id))
        except Exception as exc:
            logger.error("payment %s: could not enqueue the cancel notice (%s)", payment_id, _describe(exc, cfg))
    for refund_id in dict.fromkeys(list(report.refunds) + payments.unnotified_refunds(older_than=60, now=now)):
        try:
            notify_refund(refund_id)
        except Exception as exc:
            logger.error("refund %s: could not enqueue the notification (%s)", refund_id, _describe(exc, cfg))
    return ids


def reconcile_stars_once(cfg: config.Config | None = None, now: datetime.datetime | None = None
                         ) -> stars.StarsReconcileReport:
    """Reconcile Telegram Stars (`stars.reconcile` over getStarTransactions with the send-only bot):
    enqueue `notify_payment` for each order it credited and `notify_refund` for each refund it
    applied, and tell the admins (deduplicated per transaction) about what it could not match.
    Returns the report (empty when STARS_ENABLED is off)."""
    cfg = cfg or config.get()
    if not cfg.stars_enabled:
        return stars.StarsReconcileReport()
    report = stars.reconcile(telegram(cfg), cfg, now)
    for key, problem in report.problems:
        alert_admins(key, texts.t("admin_alert_stars", "ru", problem=problem), cfg, now)
    for payment_id in report.credited:
        try:
            notify_payment(str(payment_id))
        except Exception as exc:
            logger.error("payment %s: could not enqueue the notification (%s)", payment_id, _describe(exc, cfg))
    for refund_id in report.refunds:
        try:
            notify_refund(refund_id)
        except Exception as exc:
            logger.error("refund %s: could not enqueue the notification (%s)", refund_id, _describe(exc, cfg))
    return report


def reconcile_stars() -> stars.StarsReconcileReport:
    """One Stars reconciliation pass with its own database connection (`reconcile_stars_once`). Run
    every RECONCILE_INTERVAL seconds by the consumer's `Ticker` when STARS_ENABLED is on."""
    with DB_SESSION:
        report = reconcile_stars_once(config.get())
        ops.beat("task:reconcile_stars")
    return report


def reconcile_payments() -> list:
    """One reconciliation pass with its own database connection (`reconcile_once`). Run every
    RECONCILE_INTERVAL seconds by the consumer's `Ticker`."""
    with DB_SESSION:
        notified = reconcile_once(config.get())
        ops.beat("task:reconcile")
    logger.log(logging.INFO if notified else logging.DEBUG, "reconcile: %d payment(s) to tell", len(notified))
    return notified


class Ticker(ops.Loop):
    """Runs `sweep` every SWEEP_INTERVAL and `reconcile_payments` every RECONCILE_INTERVAL seconds,
    as written (Huey's periodic tasks have minute granularity), from one daemon thread of the
    consumer process. It calls them directly rather than through the queue, so a backlog of
    generations never delays the sweeper that keeps their holds. A failing pass is logged and
    tried again at the next tick. With STARS_ENABLED it also runs `reconcile_stars` every
    RECONCILE_INTERVAL seconds. `stop()` ends the thread. `jobs` (a list of (callable, seconds))
    replaces them for tests."""

    def __init__(self, cfg: config.Config, jobs: list | None = None):
        super().__init__("ticker")
        self.jobs = jobs or [(sweep, cfg.sweep_interval), (reconcile_payments, cfg.reconcile_interval)] + (
            [(reconcile_stars, cfg.reconcile_interval)] if cfg.stars_enabled else [])

    def _loop(self) -> None:
        due = [time.monotonic()] * len(self.jobs)
        while not self._stop.is_set():
            now = time.monotonic()
            for index, (job, interval) in enumerate(self.jobs):
                if now >= due[index]:
                    due[index] = now + interval
                    try:
                        job()
                    except Exception as exc:   # noqa: BLE001 - the next tick tries again
                        logger.error("%s failed: %s", job.__name__, _describe(exc))
            self._stop.wait(max(0.05, min(due) - time.monotonic()))


_ticker: list = []


def payment_report_once(cfg: config.Config | None = None, day: datetime.date | None = None) -> dict | None:
    """Run `payments.daily_report` for `day` (default yesterday, UTC) and log it; when our ledger
    and YooKassa disagree, log an error and tell the admins (ADMIN_IDS) in Telegram. Returns the
    report, or None when YooKassa is not configured or did not answer."""
    cfg = cfg or config.get()
    if not cfg.yookassa_configured:
        return None
    try:
        report = payments.daily_report(cfg, day)
    except payments.PaymentError as exc:
        logger.warning("daily payment report failed (%s)", _describe(exc, cfg))
        return None
    if not report["ok"]:
        logger.error("daily payment report %s: our ledger and YooKassa disagree: %s", report["day"], report)
        text = texts.t("admin_report_mismatch", "ru", day=report["day"],
                       topups=_report_line(report["topups"]), refunds=_report_line(report["refunds"]))
        for admin_id in cfg.admin_ids:
            try:
                tg(telegram(cfg).send_message, admin_id, text)
            except Exception as exc:
                logger.warning("could not tell admin %s about the report (%s)", admin_id, _describe(exc, cfg))
    return report


def _report_line(part: dict) -> str:
    return "ours %s (%.2f ₽), YooKassa %s (%.2f ₽); missing in YooKassa: %s; missing here: %s; amounts differ: %s" % (
        part["ours_count"], part["ours_kopecks"] / 100, part["api_count"], part["api_kopecks"] / 100,
        ", ".join(part["missing_in_api"]) or "—", ", ".join(part["missing_ours"]) or "—",
        ", ".join(part["amount_mismatch"]) or "—")


@huey.periodic_task(crontab(minute="15", hour="3"))
def daily_payment_report():
    """Every day at 03:15 UTC: `payment_report_once` for the day before."""
    with DB_SESSION:
        return payment_report_once()


# --------------------------------------------------------------------------------------------
# Admin alerts and the watchdog
# --------------------------------------------------------------------------------------------

FAL_AUTH_STATUSES = (401, 402, 403)   # Fal: bad key, out of credit, forbidden: every job fails until fixed
WEBHOOK_FAILURES_ALERT = 3            # unverifiable / refused notifications between two watchdog runs


def alert_admins(key: str, text: str, cfg: config.Config | None = None, now: datetime.datetime | None = None) -> bool:
    """Tell every ADMIN_IDS chat `text`, at most once per ALERT_INTERVAL seconds for condition
    `key` (deduplicated across processes through `ops.claim_alert`). Returns True when it was sent
    (to at least the attempt), False when deduplicated. Logs the alert at WARNING; never raises."""
    cfg = cfg or config.get()
    try:
        if not ops.claim_alert(key, cfg.alert_interval, now):
            logger.debug("alert %s: already sent within %s s", key, cfg.alert_interval)
            return False
    except Exception as exc:  # noqa: BLE001 - an alert must never fail its caller
        logger.warning("alert %s: could not record it (%s); sending anyway", key, _describe(exc, cfg))
    logger.warning("alert %s: %s", key, text.replace("\n", " | "))
    for admin_id in cfg.admin_ids:
        try:
            tg(telegram(cfg).send_message, admin_id, text)
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not alert admin %s (%s)", admin_id, _describe(exc, cfg))
    return True


def alert_needs_attention(payment_id, cfg: config.Config | None = None) -> bool:
    """Alert the admins once about payment `payment_id` needing a human (status
    ``needs_attention``: YooKassa does not know it, or it does not match our order); returns what
    `alert_admins` returns."""
    order = Payment.get_or_none(Payment.id == payment_id)
    return alert_admins("needs_attention:%s" % payment_id, texts.t(
        "admin_alert_needs_attention", "ru", order=payment_id,
        yookassa=(order and (order.yookassa_payment_id or order.telegram_charge_id)) or "—",
        problem=(order.problem if order else None) or "—"), cfg)


def _alert_fal_auth(exc: BaseException, cfg: config.Config) -> None:
    """Fal answered 401/402/403: every job will fail until the key or the account is fixed."""
    status = getattr(exc, "status_code", None)
    if isinstance(exc, media.ProviderError) and status in FAL_AUTH_STATUSES:
        alert_admins("fal_auth:%s" % status, texts.t("alert_fal_auth", "ru", status=status,
                                                     detail=str(exc)[:200]), cfg)


_webhook_failures_seen: list = []


def watchdog_once(cfg: config.Config | None = None, now: datetime.datetime | None = None) -> list:
    """Check what nobody would notice and alert the admins (each condition deduplicated):
    the sweeper or reconciliation not run for ALERT_TASK_STALE seconds (from the heartbeat table;
    reconciliation only when YooKassa is configured), the bot's heartbeat stale, free disk under
    HEALTH_MIN_FREE_MB, WEBHOOK_FAILURES_ALERT or more notifications refused or unverifiable since
    the last run, and payments in status ``needs_attention``. Returns the alert keys raised (sent
    or deduplicated)."""
    cfg = cfg or config.get()
    now = now or utcnow()
    raised = []

    def alert(key, text_key, **values):
        raised.append(key)
        alert_admins(key, texts.t(text_key, "ru", **values), cfg, now)

    tasks = ("sweep", "reconcile") if cfg.yookassa_configured else ("sweep",)
    for task in tasks:
        interval = cfg.sweep_interval if task == "sweep" else cfg.reconcile_interval
        limit = max(cfg.alert_task_stale, 2 * interval + 60)
        seconds = ops.age("task:" + task, now)
        if seconds is None:
            seconds = ops.age("process:worker", now)      # a new install: count from the worker's start
        if seconds is not None and seconds > limit:
            alert("task_stale:" + task, "alert_task_stale", task=task, minutes=int(seconds // 60))
    bot_age = ops.age("process:bot", now)
    if bot_age is not None and bot_age > cfg.health_heartbeat_max_age:
        alert("bot_stale", "alert_bot_stale", minutes=int(bot_age // 60))
    try:
        free = ops.free_disk_mb(cfg.data_dir)
        if free < cfg.health_min_free_mb:
            alert("disk_low", "alert_disk_low", free=int(free), limit=cfg.health_min_free_mb)
    except OSError as exc:
        logger.warning("watchdog: free disk unknown (%s)", type(exc).__name__)
    failures = ops.webhook_failures()
    seen = _webhook_failures_seen[0] if _webhook_failures_seen else failures
    _webhook_failures_seen[:] = [failures]
    if failures - seen >= WEBHOOK_FAILURES_ALERT:
        alert("webhook_failing", "alert_webhook_failing", count=failures - seen)
    for payment_id in Payment.select(Payment.id).where(Payment.status == "needs_attention").tuples():
        raised.append("needs_attention:%s" % payment_id[0])
        alert_needs_attention(payment_id[0], cfg)
    return raised


@huey.periodic_task(crontab(minute="*"))
def watchdog():
    """Every minute: `watchdog_once` (logs only when it raised something)."""
    with DB_SESSION:
        raised = watchdog_once()
    logger.log(logging.INFO if raised else logging.DEBUG, "watchdog: %s", raised or "all well")
    return raised


BROADCAST_RATE = 20.0   # messages per second; Telegram allows about 30/s overall (Bot API FAQ)


def _recipients(target_lang: str | None = None) -> list[int]:
    rows = User.select(User.telegram_id, User.language_code).where(~User.is_blocked).tuples()
    return [tid for tid, code in rows if target_lang is None or texts.lang_of(code) == target_lang]


def broadcast_recipients(target_lang: str | None = None) -> int:
    """How many users a broadcast reaches (not blocked; of language `target_lang` if given)."""
    return len(_recipients(target_lang))


@huey.task()
def broadcast(text: str, admin_chat_id: int, lang: str = "ru", rate: float = BROADCAST_RATE,
              target_lang: str | None = None):
    """Send `text` to every user who is not blocked (only those whose language is `target_lang`,
    "ru" or "en", when given), at most `rate` messages per second (each through `tg`, which waits
    out 429s), then tell the admin how many were sent and failed. Returns (sent, failed). Runs in
    the worker so no bot handler is held for minutes."""
    cfg = config.get()
    bot = telegram(cfg)
    sent = failed = 0
    interval = 1.0 / rate
    next_at = time.monotonic()
    with DB_SESSION:
        recipients = _recipients(target_lang)
    for telegram_id in recipients:
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)       # the rate limit itself, not a wait for something to happen
        next_at = max(next_at, time.monotonic()) + interval
        try:
            tg(bot.send_message, telegram_id, text)
            sent += 1
        except Exception as exc:  # noqa: BLE001 - a user who blocked the bot is not an error here
            failed += 1
            logger.info("broadcast to %s failed (%s)", telegram_id, _describe(exc, cfg))
    logger.info("broadcast done: sent=%s failed=%s", sent, failed)
    try:
        tg(bot.send_message, admin_chat_id, texts.t("admin_broadcast_done", lang, sent=sent, failed=failed))
    except Exception as exc:  # noqa: BLE001 - the report is best effort
        logger.warning("could not report the broadcast to %s (%s)", admin_chat_id, _describe(exc, cfg))
    return sent, failed
