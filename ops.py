"""Operations: heartbeats, counters, health, alert dedupe and the admins' read-only views.

Everything durable lives in the `Heartbeat` table (migrations/0003), one row per name:

* ``process:bot``, ``process:worker``, ``process:web`` — the last sign of life of each process
  (`beat`, or a `HeartbeatThread` that writes through its own connection);
* ``task:sweep``, ``task:reconcile`` — the last run of the periodic tasks;
* ``alert:<key>`` — when the admins were last told about condition `key` (`claim_alert`);
* ``webhook:<status>:<detail>`` — how many YooKassa notifications got that answer (`count_webhook`).

Every web and worker process reads the same rows, so `/health` and `/metrics` answer the same
numbers whichever gunicorn worker serves them. Imports only `config` and `models`.
"""
from __future__ import annotations

import datetime
import logging
import os
import shutil
import threading
from dataclasses import dataclass, field

from peewee import IntegrityError, fn

import config
import models
from models import Generation, Heartbeat, LedgerEntry, Payment, utcnow

logger = logging.getLogger(__name__)

PROCESSES = ("bot", "worker")            # processes whose heartbeat /health requires
TASKS = ("sweep", "reconcile")           # periodic tasks whose last run is recorded
HEARTBEAT_EVERY = 30.0                   # seconds between heartbeats of a HeartbeatThread
WEBHOOK_FAILURE_DETAILS = ("untrusted_source", "provider_unavailable", "not_configured", "mismatch")


# --- heartbeats and counters ------------------------------------------------------------------

def _upsert_at(name: str, now: datetime.datetime):
    return (Heartbeat.insert(name=name, at=now, value=0)
            .on_conflict(conflict_target=[Heartbeat.name], update={Heartbeat.at: now}))


def beat(name: str, now: datetime.datetime | None = None) -> None:
    """Record `name` (``process:bot``, ``task:sweep`` …) as alive / run at `now` (default: now, UTC).

    One short write transaction on the bound database; raises peewee errors (a database that
    cannot be written is what `check_health` reports)."""
    with models.db.atomic():
        _upsert_at(name, now or utcnow()).execute()


def count(name: str, by: int = 1, now: datetime.datetime | None = None) -> None:
    """Add `by` to counter `name` and stamp it with `now`; raises peewee errors."""
    now = now or utcnow()
    with models.db.atomic():
        (Heartbeat.insert(name=name, at=now, value=by)
         .on_conflict(conflict_target=[Heartbeat.name],
                      update={Heartbeat.at: now, Heartbeat.value: Heartbeat.value + by})).execute()


def beats(prefix: str = "") -> dict:
    """Return {name: (at, value)} for every row whose name starts with `prefix`."""
    query = Heartbeat.select(Heartbeat.name, Heartbeat.at, Heartbeat.value)
    if prefix:
        query = query.where(Heartbeat.name.startswith(prefix))
    return {name: (at, value) for name, at, value in query.tuples()}


def age(name: str, now: datetime.datetime | None = None) -> float | None:
    """Seconds since `name` last beat, or None when it never did."""
    row = Heartbeat.select(Heartbeat.at).where(Heartbeat.name == name).first()
    if row is None or row.at is None:
        return None
    return max(0.0, ((now or utcnow()) - row.at).total_seconds())


class Loop:
    """A daemon thread running `_loop` until `stop()` (subclasses wait on ``self._stop``)."""

    def __init__(self, thread_name: str):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=thread_name, daemon=True)

    def start(self):
        """Start the thread; return self."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to end and wait up to `timeout` seconds for the thread."""
        self._stop.set()
        self._thread.join(timeout)

    def _loop(self) -> None:  # pragma: no cover - every subclass has its own
        raise NotImplementedError


class HeartbeatThread(Loop):
    """A daemon thread that beats ``process:<name>`` every `interval` seconds through its own
    connection to `database_url` (never the shared `models.db` binding, so it cannot write into
    whatever database another thread binds later). `stop()` ends it; the first beat is immediate."""

    def __init__(self, name: str, database_url: str, interval: float = HEARTBEAT_EVERY):
        super().__init__("heartbeat-" + name)
        self.name, self.database_url, self.interval = "process:" + name, database_url, interval

    def _loop(self) -> None:
        database = models.open_database(self.database_url)
        failing = False
        while True:
            try:
                with database.connection_context(), database.atomic():
                    database.execute(_upsert_at(self.name, utcnow()))
                failing = False
            except Exception as exc:  # noqa: BLE001 - /health reports the stale heartbeat
                if not failing:
                    logger.warning("heartbeat %s failed (%s)", self.name, type(exc).__name__)
                failing = True
            if self._stop.wait(self.interval):
                models.discard(database)
                return


# --- webhook outcomes -------------------------------------------------------------------------

def count_webhook(http_status: int, detail: str) -> None:
    """Count one YooKassa notification answered `http_status` with outcome `detail`; never raises
    (a failed count must not change the answer)."""
    try:
        count("webhook:%d:%s" % (int(http_status), str(detail)[:40]))
    except Exception as exc:  # noqa: BLE001
        logger.warning("could not count a webhook outcome (%s)", type(exc).__name__)


def webhook_outcomes() -> dict:
    """Return {(http status, detail): count} of every notification counted so far."""
    outcomes = {}
    for name, (_at, value) in beats("webhook:").items():
        _, status, detail = name.split(":", 2)
        outcomes[(int(status), detail)] = value
    return outcomes


def webhook_failures() -> int:
    """Notifications we could not verify or refused: untrusted source (403), API re-fetch
    failed or payments not configured (503), fetched object not matching (200 ``mismatch``)."""
    return sum(n for (status, detail), n in webhook_outcomes().items()
               if status in (403, 503) or detail in WEBHOOK_FAILURE_DETAILS)


# --- health -----------------------------------------------------------------------------------

def free_disk_mb(path: str) -> float:
    """Free space in MB (2**20 bytes) for unprivileged users on the file system holding `path`
    (its nearest existing parent when `path` does not exist yet)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free / (1024 * 1024)


@dataclass
class Health:
    """What `check_health` found: `ok` is False when any of `problems` (short, log-safe lines)."""

    ok: bool
    problems: list = field(default_factory=list)
    database: str = "ok"                  # ok | error
    heartbeats: dict = field(default_factory=dict)   # process -> age in seconds, None = never
    free_mb: float | None = None


def check_health(cfg: config.Config | None = None, now: datetime.datetime | None = None, *,
                 writer: str = "web") -> Health:
    """Check that the database takes a write (beats ``process:<writer>``), that the bot's and the
    worker's heartbeats are at most HEALTH_HEARTBEAT_MAX_AGE seconds old, and that DATA_DIR has
    at least HEALTH_MIN_FREE_MB free. Never raises."""
    cfg = cfg or config.get()
    now = now or utcnow()
    health = Health(ok=True)
    try:
        beat("process:" + writer, now)
    except Exception as exc:  # noqa: BLE001 - reported
        health.database = "error"
        health.problems.append("database not writable (%s)" % type(exc).__name__)
    if health.database == "ok":
        for process in PROCESSES:
            seconds = age("process:" + process, now)
            health.heartbeats[process] = None if seconds is None else round(seconds, 1)
            if seconds is None:
                health.problems.append("no heartbeat from the %s" % process)
            elif seconds > cfg.health_heartbeat_max_age:
                health.problems.append("%s heartbeat is %d s old" % (process, seconds))
    try:
        health.free_mb = round(free_disk_mb(cfg.data_dir), 1)
        if health.free_mb < cfg.health_min_free_mb:
            health.problems.append("free disk %.0f MB is under %d MB" % (health.free_mb, cfg.health_min_free_mb))
    except OSError as exc:
        health.problems.append("free disk unknown (%s)" % type(exc).__name__)
    health.ok = not health.problems
    return health


# --- alert dedupe -----------------------------------------------------------------------------

def claim_alert(key: str, interval: float, now: datetime.datetime | None = None) -> bool:
    """True when condition `key` was not alerted in the last `interval` seconds (and records this
    alert, across every process); False when it was. Raises peewee errors."""
    now = now or utcnow()
    name = "alert:" + key
    cutoff = now - datetime.timedelta(seconds=interval)
    with models.db.atomic():
        claimed = (Heartbeat.update(at=now, value=Heartbeat.value + 1)
                   .where((Heartbeat.name == name) & (Heartbeat.at.is_null() | (Heartbeat.at <= cutoff)))
                   .execute())
        if claimed:
            return True
        if Heartbeat.select().where(Heartbeat.name == name).exists():
            return False
        try:
            with models.db.atomic():
                Heartbeat.insert(name=name, at=now, value=1).execute()
            return True
        except IntegrityError:
            return False     # another process claimed it first


# --- admin views ------------------------------------------------------------------------------

def error_class(error: str | None) -> tuple[str, str]:
    """Split a failed generation's ``error`` ("rejected: PermanentProviderError: …", written by
    the worker as "<kind>: <exception class>: <detail>") into (kind, exception class); the class is
    "" when the text names none."""
    parts = [p.strip() for p in (error or "").split(":", 2)]
    kind = parts[0] or "unknown"
    exc = parts[1] if len(parts) > 1 and parts[1].isidentifier() else ""
    return kind, exc


def user_payments(user_id: int, limit: int = 10) -> list:
    """The user's latest `limit` top-up orders (`Payment` rows), newest first."""
    return list(Payment.select().where(Payment.user == user_id)
                .order_by(Payment.created_at.desc()).limit(limit))


def failed_generations(limit: int = 10) -> list:
    """The latest `limit` failed generations (`Generation` rows), newest first."""
    return list(Generation.select().where(Generation.status == "failed")
                .order_by(fn.COALESCE(Generation.finished_at, Generation.created_at).desc()).limit(limit))


def ledger_lines(user_id: int, limit: int = 10) -> list:
    """The user's latest `limit` ledger rows (`LedgerEntry`), newest first."""
    return list(LedgerEntry.select().where(LedgerEntry.user == user_id)
                .order_by(LedgerEntry.id.desc()).limit(limit))
