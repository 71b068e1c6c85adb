"""gunicorn settings for `gunicorn -c deploy/gunicorn.conf.py web:app` (behind nginx).

Bound to loopback: only nginx reaches it, so ProxyFix can trust TRUSTED_PROXY_COUNT hops.
No preload: each worker opens its own database connections after the fork.
"""
import os

bind = os.environ.get("WEB_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_WORKERS", "2"))
worker_class = "gthread"
threads = 4
timeout = 30               # a webhook answers within a few seconds (YooKassa calls are 10 s max)
graceful_timeout = 30
max_requests = 1000
max_requests_jitter = 100
preload_app = False
accesslog = "-"
errorlog = "-"
forwarded_allow_ips = "127.0.0.1,::1"


def post_fork(server, worker):
    """Log our money and notification lines at LOG_LEVEL (gunicorn configures only its own loggers)."""
    import logging

    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    logging.getLogger("urllib3").setLevel(logging.WARNING)   # request paths never reach the log
