"""config.load(): defaults, the public variable names, and one clear line per problem."""
import ipaddress

import pytest

import config


def test_defaults_with_only_a_token():
    cfg = config.load({"TELEGRAM_BOT_TOKEN": "123:abc"})
    assert cfg.telegram_api_url == "https://api.telegram.org"
    assert cfg.database_url == "sqlite:///data/medialab.db"
    assert cfg.queue_url == "sqlite:///data/queue.db"
    assert cfg.fal_queue_url == "https://queue.fal.run"
    assert cfg.yookassa_api_url == "https://api.yookassa.ru/v3"
    assert (cfg.price_per_operation, cfg.free_operations_count, cfg.min_topup) == (10, 4, 10)
    assert cfg.topup_amounts == (100, 300, 500, 1000)
    assert cfg.trusted_proxy_count == 1
    assert cfg.demo_backend and not cfg.yookassa_configured
    with open(config.os.path.join(config.ROOT, "tests", "fixtures", "yookassa", "ip-allowlist.txt")) as f:
        allow = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert [str(n) for n in cfg.yookassa_trusted_networks] == [
        str(ipaddress.ip_network(a, strict=False)) for a in allow]


def test_public_names_are_read():
    cfg = config.load({
        "TELEGRAM_BOT_TOKEN": "1:x", "TELEGRAM_API_URL": "http://127.0.0.1:8081",
        "DATABASE_URL": "postgresql://u@h/db", "QUEUE_URL": "redis://127.0.0.1:6379/0",
        "FAL_KEY": "key-id:k", "FAL_QUEUE_URL": "http://127.0.0.1:9000",
        "YOOKASSA_SHOP_ID": "1", "YOOKASSA_SECRET_KEY": "s", "YOOKASSA_API_URL": "http://127.0.0.1:9001/v3",
        "YOOKASSA_RETURN_URL": "https://t.me/x_bot", "YOOKASSA_TRUSTED_NETWORKS": "127.0.0.1/32, ::1",
        "TRUSTED_PROXY_COUNT": "2", "PRICE_PER_OPERATION": "15", "PRICE_UPSCALE": "5",
        "FREE_OPERATIONS_COUNT": "2", "TOPUP_AMOUNTS": "50,150", "MIN_TOPUP": "20", "MAX_TOPUP": "5000",
        "ADMIN_IDS": "7,8", "FAL_ENDPOINT_UPSCALE": "fal-ai/clarity-upscaler",
    })
    assert cfg.telegram_api_url == "http://127.0.0.1:8081"
    assert cfg.queue_url.startswith("redis://") and cfg.fal_key == "key-id:k" and cfg.yookassa_configured
    assert [str(n) for n in cfg.yookassa_trusted_networks] == ["127.0.0.1/32", "::1/128"]
    assert cfg.trusted_proxy_count == 2 and cfg.admin_ids == (7, 8)
    assert cfg.price("generate") == 15 and cfg.price("upscale") == 5 and cfg.price("add_text") == 0
    assert cfg.fal_endpoints["upscale"] == "fal-ai/clarity-upscaler"
    assert cfg.fal_endpoints["edit"] == "fal-ai/nano-banana/edit"
    assert (cfg.free_operations_count, cfg.topup_amounts, cfg.min_topup, cfg.max_topup) == (2, (50, 150), 20, 5000)


def test_every_problem_is_one_line():
    with pytest.raises(config.ConfigError) as info:
        config.load({"PRICE_PER_OPERATION": "ten", "MIN_TOPUP": "-1", "TOPUP_AMOUNTS": "100,abc",
                     "YOOKASSA_SHOP_ID": "1", "YOOKASSA_TRUSTED_NETWORKS": "300.1.1.1/8",
                     "TELEGRAM_API_URL": "api.telegram.org", "QUEUE_URL": "amqp://x",
                     "FAL_TIMEOUT": "1000", "RESERVATION_TTL": "900"})
    problems = info.value.problems
    assert len(problems) == 9, problems
    text = "\n".join(problems)
    for name in ("TELEGRAM_BOT_TOKEN", "PRICE_PER_OPERATION", "MIN_TOPUP", "TOPUP_AMOUNTS",
                 "YOOKASSA_SHOP_ID and YOOKASSA_SECRET_KEY", "YOOKASSA_TRUSTED_NETWORKS",
                 "TELEGRAM_API_URL", "QUEUE_URL", "RESERVATION_TTL"):
        assert name in text


@pytest.mark.parametrize("token", ["abc", "1:2:3", "12 3:abc", "x:abc"])
def test_malformed_token_is_refused(token):
    with pytest.raises(config.ConfigError, match="TELEGRAM_BOT_TOKEN"):
        config.load({"TELEGRAM_BOT_TOKEN": token})


def test_dotenv_is_read_and_environment_wins(tmp_path, monkeypatch):
    env_file = tmp_path / ".env"
    env_file.write_text("TELEGRAM_BOT_TOKEN=5:fromfile\nPRICE_PER_OPERATION=12\n")
    monkeypatch.setenv("PRICE_PER_OPERATION", "13")
    cfg = config.load(env_file=str(env_file))
    assert cfg.price_per_operation == 13
    assert cfg.telegram_bot_token in ("5:fromfile", "123456:TEST-TOKEN")  # the test env sets a token


def test_base_urls_lose_a_trailing_slash():
    cfg = config.load({"TELEGRAM_BOT_TOKEN": "1:x", "TELEGRAM_API_URL": "http://127.0.0.1:8081/",
                       "YOOKASSA_API_URL": "http://127.0.0.1:9001/v3/", "FAL_QUEUE_URL": "http://127.0.0.1:9/"})
    assert (cfg.telegram_api_url, cfg.yookassa_api_url, cfg.fal_queue_url) == (
        "http://127.0.0.1:8081", "http://127.0.0.1:9001/v3", "http://127.0.0.1:9")
