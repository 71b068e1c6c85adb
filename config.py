"""Settings, read once from the environment (and `.env`) and validated.

Every setting is an environment variable; `.env.example` lists them all with their
defaults. `load()` collects *every* problem before failing, so an operator sees one
clear line per mistake instead of fixing them one start at a time.

Entry points call `get()` (which loads on first use); tests build their own `Config`
with `load(environ)` and install it with `configure()`.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, field

try:  # python-dotenv is in requirements.txt; config must still import without it
    from dotenv import dotenv_values
except ImportError:  # pragma: no cover
    dotenv_values = None

ROOT = os.path.dirname(os.path.abspath(__file__))

# YooKassa's published notification networks (https://yookassa.ru/developers/using-api/webhooks#ip),
# the same list as tests/fixtures/yookassa/ip-allowlist.txt.
YOOKASSA_NETWORKS = (
    "185.71.76.0/27,185.71.77.0/27,77.75.153.0/25,77.75.156.11,"
    "77.75.156.35,77.75.154.128/25,2a02:5180::/32"
)

MODES = ("generate", "edit", "merge", "add_text", "face_swap", "retouch", "upscale")
PAID_MODES = ("generate", "edit", "merge", "face_swap", "retouch", "upscale")

# Default Fal endpoint per paid mode (docs/SPEC.md §3); each is overridable with FAL_ENDPOINT_<MODE>.
DEFAULT_ENDPOINTS = {
    "generate": "fal-ai/nano-banana",
    "edit": "fal-ai/nano-banana/edit",
    "merge": "fal-ai/nano-banana/edit",
    "face_swap": "fal-ai/face-swap",
    "retouch": "fal-ai/retoucher",
    "upscale": "fal-ai/esrgan",
}


def _default_font() -> str:
    """Return a TTF path that renders Cyrillic: Roboto from the font-roboto package, else DejaVu."""
    try:
        import font_roboto  # noqa: F401  (ships Roboto-*.ttf, Apache-2.0)

        path = os.path.join(os.path.dirname(font_roboto.__file__), "files", "Roboto-Bold.ttf")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    return "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"


class ConfigError(Exception):
    """The configuration is invalid (each problem is one line of the message)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Config:
    """All settings of one process. Money is in credits (1 credit = 1 ₽) unless named *_kopecks."""

    telegram_bot_token: str = ""
    telegram_api_url: str = "https://api.telegram.org"
    telegram_webhook_url: str = ""          # empty: long polling
    telegram_webhook_secret: str = ""       # setWebhook secret_token, checked on every update
    telegram_webhook_listen: str = "127.0.0.1:8081"   # where `python bot.py` serves webhook mode
    database_url: str = "sqlite:///data/medialab.db"
    queue_url: str = "sqlite:///data/queue.db"
    fal_key: str = ""                       # empty: the local demo backend renders images
    fal_queue_url: str = "https://queue.fal.run"
    fal_endpoints: dict = field(default_factory=lambda: dict(DEFAULT_ENDPOINTS))
    fal_timeout: float = 300.0              # seconds a job may wait on Fal before it fails
    fal_poll_interval: float = 1.0          # seconds between Fal status polls
    yookassa_shop_id: str = ""
    yookassa_secret_key: str = ""
    yookassa_api_url: str = "https://api.yookassa.ru/v3"
    yookassa_return_url: str = ""           # empty: https://t.me/<bot username>
    yookassa_trusted_networks: tuple = ()   # ipaddress networks
    yookassa_allow_test: bool = False
    yookassa_receipts: bool = False
    yookassa_vat_code: int = 1
    yookassa_payment_mode: str = "full_prepayment"
    yookassa_payment_subject: str = "service"
    yookassa_timeout: float = 10.0          # seconds, HTTP read timeout of every YooKassa call
    trusted_proxy_count: int = 1
    price_per_operation: int = 10           # credits
    mode_prices: dict = field(default_factory=dict)   # mode -> credits, overrides price_per_operation
    free_operations_count: int = 4
    topup_amounts: tuple = (100, 300, 500, 1000)      # credits
    min_topup: int = 10                     # credits
    max_topup: int = 100000                 # credits
    admin_ids: tuple = ()
    max_active_jobs_per_user: int = 2
    max_prompt_length: int = 1000           # characters
    max_image_bytes: int = 20 * 1024 * 1024  # Bot API getFile limit (core.telegram.org/bots/api#getfile)
    max_result_bytes: int = 50 * 1024 * 1024
    reservation_ttl: int = 900              # seconds; longer than fal_timeout
    sweep_interval: int = 60                # seconds
    reconcile_interval: int = 120           # seconds
    reconcile_after: int = 300              # seconds an order stays pending before reconciliation
    refund_window_days: int = 30            # days after a top-up during which refunds are reconciled
    font_path: str = field(default_factory=_default_font)
    log_level: str = "INFO"
    data_dir: str = os.path.join(ROOT, "data")
    backup_keep: int = 14                   # newest backups kept in <data>/backup (0: keep all)
    backup_command: str = ""                # run after a verified backup with its path appended
    health_min_free_mb: int = 500           # /health answers 503 below this much free disk in data_dir
    health_heartbeat_max_age: int = 180     # seconds: an older bot/worker heartbeat makes /health 503
    alert_interval: int = 1800              # seconds: one admin alert per condition per interval
    alert_task_stale: int = 600             # seconds without a sweep / reconciliation before an alert
    metrics_token: str = ""                 # bearer token for /metrics from other hosts (else loopback only)

    def price(self, mode: str) -> int:
        """Return the price of one operation in `mode`, in credits (0 for free modes)."""
        if mode not in PAID_MODES:
            return 0
        return self.mode_prices.get(mode, self.price_per_operation)

    @property
    def demo_backend(self) -> bool:
        """True when no FAL_KEY is set: images are rendered locally by the demo backend."""
        return not self.fal_key

    @property
    def yookassa_configured(self) -> bool:
        """True when YOOKASSA_SHOP_ID and YOOKASSA_SECRET_KEY are both set."""
        return bool(self.yookassa_shop_id and self.yookassa_secret_key)

    def replace(self, **changes) -> "Config":
        """Return a copy with `changes` (field names) applied (tests and entry points)."""
        return dataclasses.replace(self, **changes)


def _read_env(environ: dict | None, env_file: str | None) -> dict:
    env: dict = {}
    if environ is None:
        path = env_file or os.environ.get("ENV_FILE") or os.path.join(ROOT, ".env")
        if dotenv_values is not None and os.path.exists(path):
            env.update({k: v for k, v in dotenv_values(path).items() if v is not None})
        env.update(os.environ)
    else:
        env.update(environ)
    return env


def load(environ: dict | None = None, env_file: str | None = None, require_token: bool = True) -> Config:
    """Build a `Config` from `environ` (default: `.env` overlaid by `os.environ`).

    Raises `ConfigError` listing every invalid or missing setting, one per line.
    """
    env = _read_env(environ, env_file)
    problems: list[str] = []
    values: dict = {}

    def text(name, attr, default=None):
        value = env.get(name, "").strip()
        if value:
            values[attr] = value
        elif default is not None:
            values[attr] = default

    def integer(name, attr, low=None, high=None):
        raw = env.get(name, "").strip()
        if not raw:
            return
        try:
            value = int(raw)
        except ValueError:
            problems.append("%s must be a whole number, got %r" % (name, raw))
            return
        if (low is not None and value < low) or (high is not None and value > high):
            problems.append("%s must be between %s and %s, got %s" % (name, low, high, value))
            return
        values[attr] = value

    def number(name, attr, low=0.0):
        raw = env.get(name, "").strip()
        if not raw:
            return
        try:
            value = float(raw)
        except ValueError:
            problems.append("%s must be a number of seconds, got %r" % (name, raw))
            return
        if value <= low:
            problems.append("%s must be greater than %s, got %s" % (name, low, raw))
            return
        values[attr] = value

    def flag(name, attr):
        raw = env.get(name, "").strip().lower()
        if not raw:
            return
        if raw not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            problems.append("%s must be 1 or 0, got %r" % (name, raw))
            return
        values[attr] = raw in ("1", "true", "yes", "on")

    def int_list(name, attr, low=1):
        raw = env.get(name, "").strip()
        if not raw:
            return
        try:
            items = tuple(int(x) for x in raw.split(",") if x.strip())
        except ValueError:
            problems.append("%s must be comma-separated whole numbers, got %r" % (name, raw))
            return
        if any(x < low for x in items):
            problems.append("%s must contain only numbers ≥ %s, got %r" % (name, low, raw))
            return
        values[attr] = items

    text("TELEGRAM_BOT_TOKEN", "telegram_bot_token")
    token = values.get("telegram_bot_token", "")
    if not token and require_token:
        problems.append("TELEGRAM_BOT_TOKEN is not set (get one from @BotFather and put it in .env)")
    elif token and (token.count(":") != 1 or " " in token or not token.split(":")[0].isdigit()):
        problems.append("TELEGRAM_BOT_TOKEN does not look like a bot token (expected 123456:ABC...)")
    text("TELEGRAM_API_URL", "telegram_api_url")
    text("TELEGRAM_WEBHOOK_URL", "telegram_webhook_url")
    text("TELEGRAM_WEBHOOK_SECRET", "telegram_webhook_secret")
    text("TELEGRAM_WEBHOOK_LISTEN", "telegram_webhook_listen")
    text("DATABASE_URL", "database_url")
    text("QUEUE_URL", "queue_url")
    text("FAL_KEY", "fal_key")
    text("FAL_QUEUE_URL", "fal_queue_url")
    number("FAL_TIMEOUT", "fal_timeout")
    number("FAL_POLL_INTERVAL", "fal_poll_interval")
    text("YOOKASSA_SHOP_ID", "yookassa_shop_id")
    text("YOOKASSA_SECRET_KEY", "yookassa_secret_key")
    text("YOOKASSA_API_URL", "yookassa_api_url")
    text("YOOKASSA_RETURN_URL", "yookassa_return_url")
    flag("YOOKASSA_ALLOW_TEST", "yookassa_allow_test")
    flag("YOOKASSA_RECEIPTS", "yookassa_receipts")
    integer("YOOKASSA_VAT_CODE", "yookassa_vat_code", 1, 12)
    text("YOOKASSA_PAYMENT_MODE", "yookassa_payment_mode")
    text("YOOKASSA_PAYMENT_SUBJECT", "yookassa_payment_subject")
    number("YOOKASSA_TIMEOUT", "yookassa_timeout")
    integer("TRUSTED_PROXY_COUNT", "trusted_proxy_count", 0, 10)
    integer("PRICE_PER_OPERATION", "price_per_operation", 1, 10**6)
    integer("FREE_OPERATIONS_COUNT", "free_operations_count", 0, 1000)
    int_list("TOPUP_AMOUNTS", "topup_amounts")
    integer("MIN_TOPUP", "min_topup", 1, 10**7)
    integer("MAX_TOPUP", "max_topup", 1, 10**7)
    int_list("ADMIN_IDS", "admin_ids")
    integer("MAX_ACTIVE_JOBS_PER_USER", "max_active_jobs_per_user", 1, 100)
    integer("MAX_PROMPT_LENGTH", "max_prompt_length", 1, 100000)
    integer("MAX_IMAGE_BYTES", "max_image_bytes", 1024, 20 * 1024 * 1024)
    integer("RESERVATION_TTL", "reservation_ttl", 3, 7 * 86400)
    integer("SWEEP_INTERVAL", "sweep_interval", 1, 86400)
    integer("RECONCILE_INTERVAL", "reconcile_interval", 1, 86400)
    integer("RECONCILE_AFTER", "reconcile_after", 0, 7 * 86400)
    integer("REFUND_WINDOW_DAYS", "refund_window_days", 1, 3650)
    text("FONT_PATH", "font_path")
    text("LOG_LEVEL", "log_level")
    text("DATA_DIR", "data_dir")
    integer("BACKUP_KEEP", "backup_keep", 0, 10000)
    text("BACKUP_COMMAND", "backup_command")
    integer("HEALTH_MIN_FREE_MB", "health_min_free_mb", 0, 10**7)
    integer("HEALTH_HEARTBEAT_MAX_AGE", "health_heartbeat_max_age", 30, 86400)
    integer("ALERT_INTERVAL", "alert_interval", 60, 7 * 86400)
    integer("ALERT_TASK_STALE", "alert_task_stale", 60, 7 * 86400)
    text("METRICS_TOKEN", "metrics_token")

    prices = {}
    endpoints = dict(DEFAULT_ENDPOINTS)
    for mode in PAID_MODES:
        raw = env.get("PRICE_%s" % mode.upper(), "").strip()
        if raw:
            if raw.isdigit() and 0 < int(raw) <= 10**6:
                prices[mode] = int(raw)
            else:
                problems.append("PRICE_%s must be a whole number of credits ≥ 1, got %r" % (mode.upper(), raw))
        endpoint = env.get("FAL_ENDPOINT_%s" % mode.upper(), "").strip()
        if endpoint:
            endpoints[mode] = endpoint
    values["mode_prices"] = prices
    values["fal_endpoints"] = endpoints

    raw_networks = env.get("YOOKASSA_TRUSTED_NETWORKS", "").strip() or YOOKASSA_NETWORKS
    networks = []
    for item in raw_networks.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            problems.append("YOOKASSA_TRUSTED_NETWORKS has an invalid network %r" % item)
    values["yookassa_trusted_networks"] = tuple(networks)

    for name in ("TELEGRAM_API_URL", "FAL_QUEUE_URL", "YOOKASSA_API_URL"):
        raw = env.get(name, "").strip()
        if raw and not raw.startswith(("http://", "https://")):
            problems.append("%s must start with http:// or https://, got %r" % (name, raw))
        elif raw:
            values[name.lower()] = raw.rstrip("/")   # paths are appended: ".../v3" + "/payments"
    for name in ("DATABASE_URL",):
        raw = env.get(name, "").strip()
        if raw and not raw.startswith(("sqlite://", "postgres://", "postgresql://")):
            problems.append("%s must be sqlite:///path or postgresql://..., got %r" % (name, raw))
    raw = env.get("QUEUE_URL", "").strip()
    if raw and not raw.startswith(("sqlite://", "redis://", "memory://")):
        problems.append("QUEUE_URL must be sqlite:///path, redis://host:port/db or memory://, got %r" % raw)
    hook = values.get("telegram_webhook_url", "")
    if hook:
        local = hook.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]"))
        if not (hook.startswith("https://") or local):
            problems.append("TELEGRAM_WEBHOOK_URL must be an https:// URL (Telegram sends updates over TLS)")
        secret = values.get("telegram_webhook_secret", "")
        if not re.fullmatch(r"[A-Za-z0-9_-]{16,256}", secret):
            problems.append("TELEGRAM_WEBHOOK_SECRET must be 16–256 characters of A-Z, a-z, 0-9, _ and - "
                            "when TELEGRAM_WEBHOOK_URL is set")
    listen = values.get("telegram_webhook_listen", Config.telegram_webhook_listen)
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        problems.append("TELEGRAM_WEBHOOK_LISTEN must be host:port, got %r" % listen)
    shop, secret = env.get("YOOKASSA_SHOP_ID", "").strip(), env.get("YOOKASSA_SECRET_KEY", "").strip()
    if bool(shop) != bool(secret):
        problems.append("YOOKASSA_SHOP_ID and YOOKASSA_SECRET_KEY must be set together")
    lo, hi = values.get("min_topup", Config.min_topup), values.get("max_topup", Config.max_topup)
    if lo > hi:
        problems.append("MIN_TOPUP (%s) must not exceed MAX_TOPUP (%s)" % (lo, hi))
    if values.get("log_level", "INFO").upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        problems.append("LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
    else:
        values["log_level"] = values.get("log_level", "INFO").upper()
    ttl = values.get("reservation_ttl", Config.reservation_ttl)
    timeout = values.get("fal_timeout", Config.fal_timeout)
    if ttl <= timeout:
        problems.append("RESERVATION_TTL (%s s) must be longer than FAL_TIMEOUT (%s s)" % (ttl, timeout))

    if problems:
        raise ConfigError(problems)
    return Config(**values)


def queue_url_from_env(environ: dict | None = None, env_file: str | None = None) -> str:
    """Return QUEUE_URL alone (for building the queue at import, before the full validation)."""
    return _read_env(environ, env_file).get("QUEUE_URL", "").strip() or Config.queue_url


def report(exc: ConfigError, stream=None) -> None:
    """Print a ConfigError as one line per problem (what entry points show before exiting 2)."""
    import sys

    stream = stream or sys.stderr
    print("Media Lab cannot start, the configuration has problems:", file=stream)
    for line in exc.problems:
        print("  - " + line, file=stream)


_current: Config | None = None


def get() -> Config:
    """Return the process configuration, loading it from the environment on first use."""
    global _current
    if _current is None:
        _current = load()
    return _current


def configure(cfg: Config) -> Config:
    """Install `cfg` as the process configuration (entry points and tests) and return it."""
    global _current
    _current = cfg
    return cfg
