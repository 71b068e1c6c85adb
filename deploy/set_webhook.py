"""Register TELEGRAM_WEBHOOK_URL (with its secret token) and the command list with Telegram.

What `python bot.py` does before serving webhook mode itself, for the gunicorn variant
(deploy/medialab-bot-webhook.service runs it as ExecStartPre). Idempotent. Exit 0 done,
78 (EX_CONFIG) a bad configuration or no TELEGRAM_WEBHOOK_URL.
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bot  # noqa: E402
import config  # noqa: E402
import worker  # noqa: E402

logger = logging.getLogger(__name__)


def main() -> int:
    """Call setWebhook and setMyCommands; return the exit code."""
    try:
        cfg = config.configure(config.load())
    except config.ConfigError as exc:
        config.report(exc)
        return 78
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not cfg.telegram_webhook_url:
        print("TELEGRAM_WEBHOOK_URL is not set: use medialab-bot.service (long polling)", file=sys.stderr)
        return 78
    sender = worker.telegram(cfg)
    worker.tg(sender.set_webhook, url=cfg.telegram_webhook_url, secret_token=cfg.telegram_webhook_secret,
              allowed_updates=bot.ALLOWED_UPDATES)
    try:
        bot.set_commands(sender)
    except Exception as exc:  # noqa: BLE001 - a convenience; the webhook itself is registered
        logger.warning("setMyCommands failed, going on: %s", exc.__class__.__name__)
    logger.info("webhook registered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
