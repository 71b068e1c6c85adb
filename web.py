"""The Flask app: the YooKassa notification endpoint and a health check.

Run it as ``gunicorn web:app`` from the repository root (``make web`` uses deploy/gunicorn.conf.py),
bound to loopback behind nginx. The real client address comes from Werkzeug's ProxyFix trusting
exactly TRUSTED_PROXY_COUNT proxies (never a raw ``X-Forwarded-For``); everything else about a
notification is decided by ``payments.handle_notification``. After a credit the user is told by
the worker (``worker.notify_payment``), never inside the request.

``python web.py [port]`` serves the app with Werkzeug's development server, for local tries only.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import sqlite3
import sys

from flask import Flask, Response, g, jsonify, request
from peewee import SqliteDatabase
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix

import config
import metrics
import models
import ops
import payments
import startup
import worker

logger = logging.getLogger(__name__)


_keepers: dict = {}


def _keep_sqlite_open(database) -> None:
    """Hold one idle connection to a SQLite file for the life of this process.

    Each request closes its own connection. "The WAL file is created when the first connection to
    the database is opened and is normally removed when the last connection to the database
    closes" (https://www.sqlite.org/wal.html): that last close checkpoints the WAL into the database
    first, a synced write on nearly every request of a quiet worker (measured: 0.4-2.8 ms per close
    instead of 0.02 ms). An idle connection, never inside a transaction, prevents it and blocks nothing.
    """
    if not isinstance(database, SqliteDatabase) or database.database in _keepers:
        return
    if database.database in ("", ":memory:"):
        return
    keeper = sqlite3.connect(database.database, check_same_thread=False)
    try:
        # A connection only counts once it has read (it then maps the WAL index); the read ends
        # at once, so the keeper never holds a snapshot that would stall checkpoints.
        keeper.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.Error:
        keeper.close()
        return
    _keepers[database.database] = keeper


def _bind_database(url: str):
    """Bind the models to `url`, re-using the bound database when it is already that one."""
    current = models.db.obj
    wanted = models.open_database(url)
    if current is not None and type(current) is type(wanted) and current.database == wanted.database:
        wanted = current
    else:
        models.db.initialize(wanted)
    _keep_sqlite_open(wanted)
    return wanted


def create_app(cfg: config.Config | None = None) -> Flask:
    """Build the Flask app for `cfg` (default: the process configuration).

    Routes: ``POST /yookassa/webhook`` (the body, at most 64 KB, goes to
    payments.handle_notification with the client address; the answer is an empty body with the
    outcome's status; after a credit ``worker.notify_payment`` is enqueued) and
    ``GET /yookassa/health`` (JSON ``{"yookassa_configured": bool, "database": "ok"|"error",
    "live": bool}``, 200 when all are fine, else 503), ``GET /health`` (JSON with the problems:
    503 when the database takes no write, the bot's or the worker's heartbeat is stale, or DATA_DIR
    is under HEALTH_MIN_FREE_MB; `ops.check_health`) and ``GET /metrics`` (Prometheus text from
    `metrics`, for loopback clients or the METRICS_TOKEN bearer only; 403 otherwise). Each
    notification's outcome is counted (`ops.count_webhook`). The database is bound on the first
    request and each request opens and closes its own connection.
    """
    cfg = cfg or config.get()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = payments.MAX_NOTIFICATION_BYTES
    app.extensions["medialab"] = {"cfg": cfg, "database": None}
    if cfg.trusted_proxy_count > 0:
        # Werkzeug's ProxyFix takes the client address from the last `x_for` entries of
        # X-Forwarded-For, the ones our own proxies appended; anything a client put in front is ignored.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=cfg.trusted_proxy_count)
    _add_database_session(app, cfg)
    _add_webhook(app, cfg)
    _add_health(app, cfg)
    _add_metrics(app, cfg)
    return app


def _add_database_session(app: Flask, cfg: config.Config) -> None:
    """Bind the database on the first request; each request opens and closes its connection
    (``g.db_error`` tells the routes to answer 503)."""

    @app.before_request
    def _open_db():
        state = app.extensions["medialab"]
        g.db_error = False
        try:
            if state["database"] is None or models.db.obj is not state["database"]:
                state["database"] = _bind_database(cfg.database_url)
            models.db.connect(reuse_if_open=True)
        except Exception as exc:             # noqa: BLE001 - the routes answer 503 for it
            logger.error("database unavailable: %s: %s", type(exc).__name__, exc)
            g.db_error = True
        # returning None lets the request through (a value here would become the response)

    @app.teardown_request
    def _close_db(exc):
        if models.db.obj is not None and not models.db.is_closed():
            models.db.close()


def _add_webhook(app: Flask, cfg: config.Config) -> None:
    """``POST /yookassa/webhook``: `payments.handle_notification`, then the follow-ups (user
    notices, admin alert) enqueued for the worker; the outcome is counted."""

    @app.post("/yookassa/webhook")
    def yookassa_webhook():
        try:
            body = request.get_data(cache=False)
        except RequestEntityTooLarge:
            logger.warning("notification refused: body over %s bytes", payments.MAX_NOTIFICATION_BYTES)
            return Response(status=413)
        if g.db_error:
            return Response(status=503)          # YooKassa delivers it again later
        outcome = payments.handle_notification(body, request.remote_addr or "", cfg)
        try:                                 # what was committed is never answered with 5xx
            if outcome.credited_payment_id is not None:
                worker.notify_payment(outcome.credited_payment_id)
            if outcome.refund_id is not None:
                worker.notify_refund(outcome.refund_id)
            if outcome.canceled_payment_id is not None:
                worker.notify_payment_canceled(str(outcome.canceled_payment_id))
            if outcome.detail == "auth_failed":
                worker.alert_admins_task("yookassa_auth", "admin_alert_yookassa_auth")
        except Exception:
            logger.exception("could not enqueue the follow-up of notification %s", outcome.detail)
        logger.info("notification answered %s (%s) from %s", outcome.http_status, outcome.detail, request.remote_addr)
        ops.count_webhook(outcome.http_status, outcome.detail)
        return Response(status=outcome.http_status)


def _add_health(app: Flask, cfg: config.Config) -> None:
    """``GET /yookassa/health`` (public through nginx: three fields) and ``GET /health`` (details)."""

    def _health() -> ops.Health:
        if g.db_error:
            return ops.Health(ok=False, problems=["database not reachable"], database="error")
        health = ops.check_health(cfg)
        if not health.ok:
            logger.warning("health: %s", "; ".join(health.problems))
        return health

    @app.get("/yookassa/health")
    def yookassa_health():
        health = _health()
        # Proxied by nginx to the world: no details beyond these three.
        body = {"yookassa_configured": cfg.yookassa_configured, "database": health.database, "live": health.ok}
        ok = health.ok and cfg.yookassa_configured
        return jsonify(body), 200 if ok else 503

    @app.get("/health")
    def health():
        health = _health()
        body = {"ok": health.ok, "problems": health.problems, "database": health.database,
                "heartbeats": health.heartbeats, "free_mb": health.free_mb}
        return jsonify(body), 200 if health.ok else 503


def _add_metrics(app: Flask, cfg: config.Config) -> None:
    """``GET /metrics``: Prometheus text for loopback clients or the METRICS_TOKEN bearer."""
    registry = metrics.registry(cfg, worker.huey)

    @app.get("/metrics")
    def prometheus_metrics():
        if not _metrics_allowed(cfg):
            return Response(status=403)
        if g.db_error:
            return Response(status=503)
        return Response(metrics.render(registry), content_type=metrics.CONTENT_TYPE)


def _loopback(address: str | None) -> bool:
    try:
        return ipaddress.ip_address((address or "").strip()).is_loopback
    except ValueError:
        return False


def _metrics_allowed(cfg: config.Config) -> bool:
    """/metrics (not proxied by nginx): a loopback client — both the socket peer and the address
    ProxyFix resolved, so nothing forwarded by a local proxy counts — or the METRICS_TOKEN bearer."""
    if cfg.metrics_token:
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), ("Bearer " + cfg.metrics_token).encode()):
            return True
    peer = request.environ.get("werkzeug.proxy_fix.orig", {}).get("REMOTE_ADDR", request.environ.get("REMOTE_ADDR"))
    return _loopback(peer) and _loopback(request.remote_addr)


def served_app() -> Flask:
    """The app gunicorn serves (``web:app``, built on first access, never at import): a bad
    configuration, an unreachable or unmigrated database stops the start with one clear line per
    problem instead of serving errors.

    Exit code 3 is gunicorn's WORKER_BOOT_ERROR, the only code that halts the master rather than
    respawning workers forever (gunicorn/arbiter.py); under ``-c deploy/gunicorn.conf.py`` (make
    web, systemd) the master has already run the same checks and exited 78 / 69 itself
    (startup.py "Exit codes"). YooKassa's keys are checked by the master only.
    """
    try:
        cfg = config.get()
    except config.ConfigError as exc:
        startup.refuse(exc)
        raise SystemExit(3) from None
    startup.install_redaction(cfg)
    try:
        startup.check_database(cfg)
    except (config.ConfigError, models.NotMigrated, startup.Unavailable) as exc:
        startup.refuse(exc)
        raise SystemExit(3) from None
    return create_app(cfg)


_served: list = []


def __getattr__(name: str):
    """``web.app`` (what ``gunicorn web:app`` loads) is built by `served_app` on first access
    (PEP 562), so importing this module does nothing but define it."""
    if name == "app":
        if not _served:
            _served.append(served_app())
        return _served[0]
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


if __name__ == "__main__":
    startup.configure_logging(config.get())
    served_app().run(host="127.0.0.1", port=int(sys.argv[1]) if len(sys.argv) > 1 else 8000)
