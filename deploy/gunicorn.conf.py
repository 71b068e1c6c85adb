"""gunicorn settings for `gunicorn -c deploy/gunicorn.conf.py web:app` (behind nginx).

Bound to loopback: only nginx reaches it, so ProxyFix can trust TRUSTED_PROXY_COUNT hops.
No preload: each worker opens its own database connections after the fork.

This file runs in the master before any worker starts: it loads the settings (WEB_BIND,
WEB_WORKERS, LOG_LEVEL … from .env and the environment, validated by config.py) and runs the
start-up checks (database reachable and migrated, Redis queue reachable, YooKassa keys accepted).
A problem is one line and the master exits 78 (configuration; systemd does not restart it) or 69
(database/Redis down; systemd restarts it) — see startup.py "Exit codes".

One worker process (WEB_WORKERS, default 1) with 8 threads: the web process serves only
YooKassa notifications, health checks and scrapes, whose work is mostly waiting on YooKassa and
SQLite, so threads carry it; every extra worker is another ~70 MB of RSS (the whole product is
meant to fit in 300 MB: bench/bench_pipeline.py). A preloaded app would not help that figure:
RSS counts the pages a forked worker shares with the master in both.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Private names: gunicorn reads every module-level name that matches one of its settings
# (`config` is one).
import config as _config  # noqa: E402
import models as _models  # noqa: E402
import startup as _startup  # noqa: E402

_cfg = _startup.load_config()          # exits 78 with one line per problem
_startup.install_redaction(_cfg)
try:
    _warnings = _startup.check_services(_cfg)
except (_config.ConfigError, _models.NotMigrated, _startup.Unavailable) as _exc:
    sys.exit(_startup.refuse(_exc))
for _warning in _warnings:
    print("warning: %s" % _warning, file=sys.stderr, flush=True)

bind = _cfg.web_bind
workers = _cfg.web_workers
worker_class = "gthread"
threads = 8
timeout = 30               # a webhook answers within a few seconds (YooKassa calls are 10 s max)
graceful_timeout = 30
max_requests = 1000
max_requests_jitter = 100
preload_app = False
accesslog = "-"
errorlog = "-"
forwarded_allow_ips = "127.0.0.1,::1"


def post_fork(server, worker):
    """Log our money and notification lines at LOG_LEVEL (gunicorn configures only its own
    loggers), with every secret redacted from every handler, gunicorn's included."""
    _startup.configure_logging(_cfg, fmt="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
