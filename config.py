"""Settings, read once from the environment (and `.env`) and validated.

Every setting is declared once in `SETTINGS` (environment name, parser with its range or choices,
default, help text, section); `load()` is a loop over the declarations plus the few rules that
involve two settings (`_cross_checks`), and `.env.example` is generated from the same declarations
(`python config.py --env-example`, or `python manage.py env-example`; a test keeps the shipped file
equal to the generated text). `load()` collects *every* problem before failing, so an operator sees
one clear line per mistake instead of fixing them one start at a time; `report()` is the one
printer of those lines and `EX_CONFIG` (78) the exit code of every process refusing to start on a
configuration that cannot work (systemd: ``RestartPreventExitStatus=78``).

This is the only module that reads ``os.environ`` (tests/test_config.py checks it).

Entry points call `get()` (which loads on first use); tests build their own `Config`
with `load(environ)` and install it with `configure()`.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import sys
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable

try:  # python-dotenv is in requirements.txt; config must still import without it
    from dotenv import dotenv_values
except ImportError:  # pragma: no cover
    dotenv_values = None

ROOT = os.path.dirname(os.path.abspath(__file__))

EX_CONFIG = 78          # sysexits.h EX_CONFIG: the configuration is wrong, restarting will not help
EX_UNAVAILABLE = 69     # sysexits.h EX_UNAVAILABLE: a service we need (database, Redis) is down

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

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


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
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------------------------
# Parsers: (NAME, raw text) -> value, or ValueError whose message is the problem line(s)
# --------------------------------------------------------------------------------------------

Parser = Callable[[str, str], Any]


def text(name: str, raw: str) -> str:
    """Any non-empty text, as given."""
    return raw


def integer(low: int, high: int) -> Parser:
    """A whole number in [low, high]."""
    def parse(name, raw):
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("%s must be a whole number, got %r" % (name, raw)) from None
        if not low <= value <= high:
            raise ValueError("%s must be between %s and %s, got %s" % (name, low, high, value))
        return value
    return parse


def seconds(name: str, raw: str) -> float:
    """A number of seconds greater than 0."""
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("%s must be a number of seconds, got %r" % (name, raw)) from None
    if not value > 0:          # also refuses nan
        raise ValueError("%s must be greater than 0.0, got %s" % (name, raw))
    return value


def flag(name: str, raw: str) -> bool:
    """1/0, true/false, yes/no, on/off."""
    raw = raw.lower()
    if raw not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise ValueError("%s must be 1 or 0, got %r" % (name, raw))
    return raw in ("1", "true", "yes", "on")


def int_list(low: int = 1) -> Parser:
    """Comma-separated whole numbers, each ≥ low, as a tuple."""
    def parse(name, raw):
        try:
            items = tuple(int(x) for x in raw.split(",") if x.strip())
        except ValueError:
            raise ValueError("%s must be comma-separated whole numbers, got %r" % (name, raw)) from None
        if any(x < low for x in items):
            raise ValueError("%s must contain only numbers ≥ %s, got %r" % (name, low, raw))
        return items
    return parse


def choice(*options: str) -> Parser:
    """One of `options`, case-insensitive, returned upper-case."""
    def parse(name, raw):
        if raw.upper() not in options:
            raise ValueError("%s must be %s or %s" % (name, ", ".join(options[:-1]), options[-1]))
        return raw.upper()
    return parse


def base_url(name: str, raw: str) -> str:
    """An http(s) base URL, without a trailing slash (the SDKs append paths: ".../v3" + "/payments")."""
    if not raw.startswith(("http://", "https://")):
        raise ValueError("%s must start with http:// or https://, got %r" % (name, raw))
    return raw.rstrip("/")


def host_port(name: str, raw: str) -> str:
    """host:port with a port in 1-65535."""
    host, _, port = raw.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("%s must be host:port, got %r" % (name, raw))
    return raw


def bind_address(name: str, raw: str) -> str:
    """gunicorn's bind: host:port (port 0 picks a free one) or unix:/path/to.sock."""
    if raw.startswith("unix:") and len(raw) > len("unix:"):
        return raw
    host, _, port = raw.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError("%s must be host:port or unix:/path, got %r" % (name, raw))
    return raw


def database_url(name: str, raw: str) -> str:
    """sqlite:///relative/path.db, sqlite:////absolute/path.db or postgresql://user:pass@host/db."""
    scheme = raw.split(":", 1)[0].lower() if ":" in raw else ""
    wrong = "%s must be sqlite:///path or postgresql://..., got %r" % (name, _no_password(raw))
    if scheme == "sqlite":
        if not raw.startswith("sqlite:///") or len(raw) == len("sqlite:///"):
            raise ValueError("%s: a SQLite URL has three slashes and a path (sqlite:///data/medialab.db), "
                             "got %r" % (name, raw))
        return raw
    if scheme in ("postgres", "postgresql"):
        parts = urllib.parse.urlsplit(raw)
        if not raw.startswith(scheme + "://") or not parts.path.strip("/"):
            raise ValueError("%s: a PostgreSQL URL names a database (postgresql://user:pass@host:5432/medialab), "
                             "got %r" % (name, _no_password(raw)))
        return raw
    raise ValueError(wrong)


def queue_url(name: str, raw: str) -> str:
    """sqlite:///path, redis://host:port/db (rediss:// with TLS) or memory:// (tests)."""
    wrong = "%s must be sqlite:///path, redis://host:port/db or memory://, got %r" % (name, _no_password(raw))
    if raw.startswith("sqlite:"):
        if not raw.startswith("sqlite:///") or len(raw) == len("sqlite:///"):
            raise ValueError(wrong)
    elif not raw.startswith(("redis://", "rediss://", "memory://")):
        raise ValueError(wrong)
    return raw


def _no_password(url: str) -> str:
    """`url` with the password of its user part replaced by ***, for messages."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def networks(name: str, raw: str) -> tuple:
    """Comma-separated IP networks (or addresses) as a tuple of ipaddress networks."""
    found, problems = [], []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            found.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            problems.append("%s has an invalid network %r" % (name, item))
    if problems:
        raise ValueError("\n".join(problems))
    return tuple(found)


def bot_token(name: str, raw: str) -> str:
    """A Bot API token, 123456:ABC-def (the value never appears in a message)."""
    if raw.count(":") != 1 or " " in raw or not raw.split(":")[0].isdigit():
        raise ValueError("%s does not look like a bot token (expected 123456:ABC...)" % name)
    return raw


def fal_key(name: str, raw: str) -> str:
    """A Fal API key, key_id:key_secret (the value never appears in a message)."""
    key_id, colon, secret = raw.partition(":")
    if not colon or not key_id.strip() or not secret.strip() or " " in raw:
        raise ValueError("%s does not look like a Fal key (expected key_id:key_secret, as fal.ai/dashboard/keys "
                         "shows it)" % name)
    return raw


def json_object(name: str, raw: str) -> dict:
    """A JSON object (for FAL_ARGS_<MODE>)."""
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValueError("%s is not valid JSON (%s); expected an object like {\"scale\": 4}" % (name, exc)) from None
    if not isinstance(value, dict):
        raise ValueError("%s must be a JSON object like {\"scale\": 4}, got %s" % (name, type(value).__name__))
    return value


def price(name: str, raw: str) -> int:
    """Credits ≥ 1 (PRICE_<MODE>)."""
    if raw.isdigit() and 0 < int(raw) <= 10**6:
        return int(raw)
    raise ValueError("%s must be a whole number of credits ≥ 1, got %r" % (name, raw))


# --------------------------------------------------------------------------------------------
# The declarations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One environment variable.

    `attr` is the Config field (default: the name in lower case); with `key` the value goes into
    the dict field `attr` under `key` (PRICE_<MODE>, FAL_ENDPOINT_<MODE>, FAL_ARGS_<MODE>).
    `default` is the value when the variable is unset or empty; `shown` is what `.env.example`
    shows after ``NAME=`` (default: `default` as text). `secret` values are never printed and are
    redacted from logs. `required` settings are listed uncommented in `.env.example`.
    """

    name: str
    parse: Parser
    default: Any
    help: str
    section: str
    attr: str = ""
    key: str | None = None
    secret: bool = False
    required: bool = False
    shown: str | None = None

    @property
    def field(self) -> str:
        """The Config field this setting fills."""
        return self.attr or self.name.lower()

    def example(self) -> str:
        """The default as `.env.example` shows it."""
        if self.shown is not None:
            return self.shown
        if isinstance(self.default, bool):
            return "1" if self.default else "0"
        if isinstance(self.default, tuple):
            return ",".join(str(x) for x in self.default)
        if isinstance(self.default, dict):
            return json.dumps(self.default) if self.default else ""
        return "%g" % self.default if isinstance(self.default, float) else str(self.default)


TG, STORE, FAL, PRICES, PAY, OPS, PROC = (
    "Telegram", "Storage", "Fal.ai", "Prices and limits (credits; 1 credit = 1 ₽)", "YooKassa",
    "Operations: /health, /metrics, admin alerts", "Processes")

SETTINGS: tuple[Setting, ...] = (
    # --- Telegram
    Setting("TELEGRAM_BOT_TOKEN", bot_token, "", "From @BotFather; required", TG, secret=True, required=True),
    Setting("TELEGRAM_API_URL", base_url, "https://api.telegram.org",
            "Base URL of the Bot API server (a self-hosted telegram-bot-api server works too)", TG),
    Setting("TELEGRAM_WEBHOOK_URL", text, "",
            "Empty: long polling. Set to the public https URL Telegram should POST updates to (nginx\n"
            "forwards its path to TELEGRAM_WEBHOOK_LISTEN), e.g. https://bot.example.com/telegram/webhook", TG),
    Setting("TELEGRAM_WEBHOOK_SECRET", text, "",
            "Required with a webhook URL: 16–256 characters of A-Z a-z 0-9 _ - (Telegram echoes it back)",
            TG, secret=True),
    Setting("TELEGRAM_WEBHOOK_LISTEN", host_port, "127.0.0.1:8081",
            "Where `python bot.py` serves webhook mode", TG),
    Setting("ADMIN_IDS", int_list(1), (), "Comma-separated Telegram user ids allowed to use /stats, /grant, /broadcast …",
            TG),
    # --- Storage
    Setting("DATABASE_URL", database_url, "sqlite:///data/medialab.db",
            "sqlite:///relative/path.db, sqlite:////absolute/path.db or postgresql://user:pass@host/db", STORE),
    Setting("QUEUE_URL", queue_url, "sqlite:///data/queue.db",
            "sqlite:///data/queue.db (one box) or redis://127.0.0.1:6379/0 (scale-out)", STORE),
    Setting("DATA_DIR", text, os.path.join(ROOT, "data"), "Folder for backups and other files (default: data/ here)",
            STORE, shown=""),
    Setting("BACKUP_KEEP", integer(0, 10000), 14,
            "`make backup` (daily from medialab-backup.timer) keeps this many newest backups in <data>/backup; "
            "0 keeps all", STORE),
    Setting("BACKUP_COMMAND", text, "",
            "Run after each verified backup with the file's path appended (off-site copy; see README \"Backups\"),\n"
            "e.g. restic -r sftp:backup@host:/srv/restic --password-file /etc/medialab/restic.pass backup", STORE),
    # --- Fal
    Setting("FAL_KEY", fal_key, "",
            "key_id:key_secret from fal.ai. Empty: a local demo backend renders stand-in images with\n"
            "Pillow (no Fal account needed)", FAL, secret=True),
    Setting("FAL_QUEUE_URL", base_url, "https://queue.fal.run", "Base URL of Fal's queue API", FAL),
    Setting("FAL_TIMEOUT", seconds, 300.0, "Seconds a job may wait on Fal; RESERVATION_TTL must be longer", FAL),
    Setting("FAL_POLL_INTERVAL", seconds, 1.0, "Seconds between Fal status polls", FAL),
    *(Setting("FAL_ENDPOINT_%s" % mode.upper(), text, DEFAULT_ENDPOINTS[mode],
              "Fal endpoint per mode" if mode == PAID_MODES[0] else "", FAL, attr="fal_endpoints", key=mode)
      for mode in PAID_MODES),
    *(Setting("FAL_ARGS_%s" % mode.upper(), json_object, {},
              "Extra JSON arguments merged into a mode's request, e.g. FAL_ARGS_UPSCALE={\"scale\": 4}"
              if mode == PAID_MODES[0] else "", FAL, attr="fal_args", key=mode)
      for mode in PAID_MODES),
    Setting("FONT_PATH", text, _default_font(),
            "Cyrillic-capable TTF for \"Добавить текст\" (default: Roboto Bold from the font-roboto package)",
            FAL, shown=""),
    # --- Prices and limits
    Setting("PRICE_PER_OPERATION", integer(1, 10**6), 10, "Price of one paid operation, in credits", PRICES),
    *(Setting("PRICE_%s" % mode.upper(), price, None,
              "Per-mode overrides of PRICE_PER_OPERATION" if mode == PAID_MODES[0] else "", PRICES,
              attr="mode_prices", key=mode, shown="")
      for mode in PAID_MODES),
    Setting("FREE_OPERATIONS_COUNT", integer(0, 1000), 4, "Free operations every new user gets", PRICES),
    Setting("TOPUP_AMOUNTS", int_list(1), (100, 300, 500, 1000), "Top-up buttons, in credits", PRICES),
    Setting("MIN_TOPUP", integer(1, 10**7), 10, "Smallest and largest top-up typed by hand, in credits", PRICES),
    Setting("MAX_TOPUP", integer(1, 10**7), 100000, "", PRICES),
    Setting("MAX_ACTIVE_JOBS_PER_USER", integer(1, 100), 2, "Jobs one user may have queued or running", PRICES),
    Setting("DRAFT_TTL", integer(60, 30 * 86400), 86400,
            "Seconds a refused or failed job's inputs are kept so the user can retry or top up and continue", PRICES),
    Setting("REFERRAL_BONUS", integer(0, 10**6), 0,
            "Credits to the referrer when a user who came by their /start ref_ link has a top-up credited, once per "
            "user; refunds of that user's top-ups take it back by the same share (0: off)",
            PRICES),
    Setting("MAX_PROMPT_LENGTH", integer(1, 100000), 1000, "Characters", PRICES),
    Setting("MAX_IMAGE_BYTES", integer(1024, 20 * 1024 * 1024), 20 * 1024 * 1024,
            "Bytes; the Bot API lets bots download files up to 20 MB", PRICES),
    Setting("MAX_RESULT_BYTES", integer(1024, 50 * 1024 * 1024), 50 * 1024 * 1024,
            "Bytes; a larger result is refused (bots upload at most 50 MB)", PRICES),
    Setting("RESERVATION_TTL", integer(3, 7 * 86400), 900,
            "Seconds a reservation may stay open before the sweeper expires it", PRICES),
    Setting("SWEEP_INTERVAL", integer(1, 86400), 60, "Seconds between sweeps (rounded up to whole minutes)", PRICES),
    Setting("STATE_RETENTION_DAYS", integer(0, 3650), 90,
            "Days an idle chat's conversation state and the once-only keys (claimed taps, notices, admin "
            "command ids) are kept; the sweeper deletes older ones (0: keep forever)", PRICES),
    # --- YooKassa
    Setting("YOOKASSA_SHOP_ID", text, "", "Empty: the top-up menu says payments are not configured", PAY),
    Setting("YOOKASSA_SECRET_KEY", text, "", "", PAY, secret=True),
    Setting("YOOKASSA_API_URL", base_url, "https://api.yookassa.ru/v3", "", PAY),
    Setting("YOOKASSA_RETURN_URL", text, "", "Where the payment page returns the user; empty: https://t.me/<bot username>",
            PAY),
    Setting("YOOKASSA_TRUSTED_NETWORKS", networks, networks("YOOKASSA_TRUSTED_NETWORKS", YOOKASSA_NETWORKS),
            "Networks notifications may come from (YooKassa's published list by default)", PAY,
            shown=YOOKASSA_NETWORKS),
    Setting("SUPPORT_CONTACT", text, "", "Shown by /help, /paysupport and the payment screens (e.g. @medialab_support)",
            PAY),
    Setting("TERMS_URL", text, "", "Offer terms and privacy policy (/terms, /help, the payment screen)", PAY),
    Setting("PRIVACY_URL", text, "", "", PAY),
    Setting("TRUSTED_PROXY_COUNT", integer(0, 10), 1, "Reverse proxies in front of gunicorn (nginx = 1)", PAY),
    Setting("YOOKASSA_ALLOW_TEST", flag, False, "Accept payments made in a YooKassa test shop (never in production)",
            PAY),
    Setting("YOOKASSA_TIMEOUT", seconds, 10.0, "Seconds for every YooKassa API call", PAY),
    Setting("YOOKASSA_RECEIPTS", flag, False,
            "54-FZ receipts: 1 to attach a receipt to every payment (the bot asks for an e-mail once)", PAY),
    Setting("YOOKASSA_VAT_CODE", integer(1, 12), 1, "Receipt fields", PAY),
    Setting("YOOKASSA_PAYMENT_MODE", text, "full_prepayment", "", PAY),
    Setting("YOOKASSA_PAYMENT_SUBJECT", text, "service", "", PAY),
    Setting("RECONCILE_INTERVAL", integer(1, 86400), 120, "Seconds between reconciliations of pending payments", PAY),
    Setting("RECONCILE_AFTER", integer(0, 7 * 86400), 300,
            "Seconds an order stays pending before reconciliation asks YooKassa", PAY),
    Setting("REFUND_WINDOW_DAYS", integer(1, 3650), 30,
            "Days after a top-up during which reconciliation looks for refunds it was not told about", PAY),
    Setting("STARS_ENABLED", flag, False,
            "Telegram Stars top-ups (XTR, no provider token): 1 to offer them beside the card payment;\n"
            "reconciled with getStarTransactions every RECONCILE_INTERVAL seconds. Promo codes do not apply", PAY),
    Setting("STARS_PER_100_CREDITS", integer(1, 100000), 70,
            "Whole Stars per 100 credits: a top-up of N credits costs ceil(N × this / 100) Stars", PAY),
    # --- Operations
    Setting("HEALTH_MIN_FREE_MB", integer(0, 10**7), 500,
            "/health and /yookassa/health answer 503 below this much free disk (MB) in DATA_DIR, or when\n"
            "the bot's or the worker's heartbeat is older than HEALTH_HEARTBEAT_MAX_AGE seconds", OPS),
    Setting("HEALTH_HEARTBEAT_MAX_AGE", integer(30, 86400), 180, "", OPS),
    Setting("ALERT_INTERVAL", integer(60, 7 * 86400), 1800,
            "The worker tells ADMIN_IDS about each problem at most once per ALERT_INTERVAL seconds; a sweep or\n"
            "reconciliation that has not run for ALERT_TASK_STALE seconds is a problem", OPS),
    Setting("ALERT_TASK_STALE", integer(60, 7 * 86400), 600, "", OPS),
    Setting("METRICS_TOKEN", text, "",
            "/metrics answers loopback clients; from elsewhere only with \"Authorization: Bearer <METRICS_TOKEN>\"",
            OPS, secret=True),
    # --- Processes
    Setting("LOG_LEVEL", choice(*LOG_LEVELS), "INFO", "DEBUG, INFO, WARNING or ERROR", PROC),
    Setting("WEB_BIND", bind_address, "127.0.0.1:8000", "Where gunicorn (deploy/gunicorn.conf.py) listens", PROC),
    Setting("WEB_WORKERS", integer(1, 64), 1,
            "gunicorn worker processes (each has 8 threads; another process is ~70 MB more memory)", PROC),
)

BY_NAME = {s.name: s for s in SETTINGS}
SECTIONS = (TG, STORE, FAL, PRICES, PAY, OPS, PROC)


def _field_defaults() -> dict:
    """Config field -> default, built from the declarations (dict fields collect their keys)."""
    defaults: dict = {}
    for s in SETTINGS:
        if s.key is None:
            defaults[s.field] = s.default
        else:
            bucket = defaults.setdefault(s.field, {})
            if s.default not in (None, {}):
                bucket[s.key] = s.default
    return defaults


class _ConfigMethods:
    """Behaviour of `Config` (its fields are generated from `SETTINGS`)."""

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

    def secrets(self) -> dict:
        """Return {setting name: value} of every secret setting that is set (for log redaction)."""
        return {s.name: getattr(self, s.field) for s in SETTINGS if s.secret and getattr(self, s.field)}


def _config_field(default):
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d))
    return field(default=default)


# All settings of one process, one field per declaration (dict fields for the per-mode ones).
# Money is in credits (1 credit = 1 ₽) unless named *_kopecks; times are in seconds.
Config = dataclasses.make_dataclass(
    "Config", [(name, Any, _config_field(default)) for name, default in _field_defaults().items()],
    bases=(_ConfigMethods,), frozen=True, namespace={"__module__": __name__})
Config.__doc__ = ("All settings of one process (fields generated from config.SETTINGS). Money is in credits "
                  "(1 credit = 1 ₽) unless named *_kopecks; times are in seconds.")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


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

    Every declared setting is parsed; an unset or empty variable keeps its default.
    Raises `ConfigError` listing every invalid or missing setting, one per line (secret values
    are never quoted).
    """
    env = _read_env(environ, env_file)
    problems: list[str] = []
    values: dict = _field_defaults()
    given: set = set()
    for s in SETTINGS:
        raw = (env.get(s.name) or "").strip()
        if not raw:
            continue
        try:
            value = s.parse(s.name, raw)
        except ValueError as exc:
            problems.extend(str(exc).splitlines())
            continue
        given.add(s.name)
        if s.key is None:
            values[s.field] = value
        else:
            values[s.field][s.key] = value
    problems.extend(_cross_checks(values, env, require_token))
    if problems:
        raise ConfigError(problems)
    return Config(**values)


def _cross_checks(values: dict, env: dict, require_token: bool) -> list[str]:
    """The rules that involve more than one setting (or a missing required one)."""
    problems = []
    if require_token and not (env.get("TELEGRAM_BOT_TOKEN") or "").strip():
        problems.append("TELEGRAM_BOT_TOKEN is not set (get one from @BotFather and put it in .env)")
    hook = values["telegram_webhook_url"]
    if hook:
        local = hook.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]"))
        if not (hook.startswith("https://") or local):
            problems.append("TELEGRAM_WEBHOOK_URL must be an https:// URL (Telegram sends updates over TLS)")
        if not re.fullmatch(r"[A-Za-z0-9_-]{16,256}", values["telegram_webhook_secret"]):
            problems.append("TELEGRAM_WEBHOOK_SECRET must be 16–256 characters of A-Z, a-z, 0-9, _ and - "
                            "when TELEGRAM_WEBHOOK_URL is set")
    shop, secret = (env.get("YOOKASSA_SHOP_ID") or "").strip(), (env.get("YOOKASSA_SECRET_KEY") or "").strip()
    if bool(shop) != bool(secret):
        problems.append("YOOKASSA_SHOP_ID and YOOKASSA_SECRET_KEY must be set together")
    if values["min_topup"] > values["max_topup"]:
        problems.append("MIN_TOPUP (%s) must not exceed MAX_TOPUP (%s)" % (values["min_topup"], values["max_topup"]))
    if values["reservation_ttl"] <= values["fal_timeout"]:
        problems.append("RESERVATION_TTL (%s s) must be longer than FAL_TIMEOUT (%s s)"
                        % (values["reservation_ttl"], values["fal_timeout"]))
    return problems


def report(exc: ConfigError, stream=None) -> None:
    """Print a ConfigError as one line per problem, no traceback (every entry point uses this
    before exiting with `EX_CONFIG`). `stream` defaults to stderr."""
    stream = stream or sys.stderr
    print("Media Lab cannot start, the configuration has problems:", file=stream)
    for line in exc.problems:
        print("  - " + line, file=stream)
    stream.flush()


def env_example() -> str:
    """Return the text of `.env.example`, generated from `SETTINGS`.

    Every setting appears once, under its section, with its help as comments and its default
    commented out (``# NAME=default``) so a later release can change a default that an operator
    never chose; required settings (the bot token) appear uncommented and empty.
    """
    lines = [
        "# Media Lab settings. `make setup` copies this file to .env (mode 0600); fill in at least",
        "# TELEGRAM_BOT_TOKEN. Every other setting is optional: the commented value is its default;",
        "# uncomment a line to change it. Generated by `python config.py --env-example` (do not edit).",
    ]
    for section in SECTIONS:
        lines += ["", "# --- %s %s" % (section, "-" * max(3, 92 - len(section)))]
        for s in SETTINGS:
            if s.section != section:
                continue
            lines += ["# " + line for line in s.help.splitlines()]
            lines.append(("%s=" if s.required else "# %s=%s") % ((s.name,) if s.required else (s.name, s.example())))
    lines += ["", "# Read settings from another file than ./.env (set in the environment, not here)",
              "# ENV_FILE="]
    return "\n".join(lines) + "\n"


_current: Config | None = None


def get() -> Config:
    """Return the process configuration, loading it from the environment on first use.

    Raises `ConfigError` when the environment is invalid."""
    global _current
    if _current is None:
        _current = load()
    return _current


def configure(cfg: Config) -> Config:
    """Install `cfg` as the process configuration (entry points and tests) and return it."""
    global _current
    _current = cfg
    return cfg


if __name__ == "__main__":
    if sys.argv[1:] == ["--env-example"]:
        sys.stdout.write(env_example())
        sys.exit(0)
    if sys.argv[1:] == ["--check"]:
        try:
            load()
        except ConfigError as _exc:
            report(_exc)
            sys.exit(EX_CONFIG)
        print("configuration OK")
        sys.exit(0)
    print("usage: python config.py --env-example | --check", file=sys.stderr)
    sys.exit(2)
