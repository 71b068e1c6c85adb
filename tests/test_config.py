"""config.load(): defaults, the public variable names, and one clear line per problem."""
import ast
import io
import ipaddress
import os
import subprocess
import sys

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


# --- declarations, .env.example, one reader of os.environ -------------------------------------


def test_shipped_env_example_is_the_generated_text():
    with open(os.path.join(config.ROOT, ".env.example"), encoding="utf-8") as f:
        shipped = f.read()
    assert shipped == config.env_example(), "regenerate it: python config.py --env-example > .env.example"


def test_env_example_lists_every_setting_once_with_its_default_commented_out():
    lines = config.env_example().splitlines()
    for s in config.SETTINGS:
        entries = [line for line in lines if line.lstrip("# ").startswith(s.name + "=")]
        assert len(entries) == 1, s.name
        if s.required:
            assert entries[0] == s.name + "="
        else:
            assert entries[0] == "# %s=%s" % (s.name, s.example())
    assert len({s.name for s in config.SETTINGS}) == len(config.SETTINGS)


def test_every_shown_default_loads_to_the_declared_default():
    """Uncommenting every line of .env.example changes nothing."""
    env = {"TELEGRAM_BOT_TOKEN": "1:x"}
    for line in config.env_example().splitlines():
        if line.startswith("# ") and "=" in line and line[2:].split("=")[0] in config.BY_NAME:
            name, _, value = line[2:].partition("=")
            env[name] = value
    assert config.load(env) == config.load({"TELEGRAM_BOT_TOKEN": "1:x"})


def _reads_environ(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb") \
                and isinstance(node.value, ast.Name) and node.value.id == "os":
            yield node.lineno
        if isinstance(node, ast.ImportFrom) and node.module == "os" and \
                any(a.name in ("environ", "getenv") for a in node.names):
            yield node.lineno


# Modules that copy the environment for a child process (not to read a setting from it).
ENVIRON_COPIERS = {
    "config.py": "the one reader of settings",
    "demo.py": "builds the environment of the bot, web and worker it starts",
    "backup.py": "BACKUP_COMMAND runs with the environment minus the secrets",
}


def test_only_config_reads_the_environment():
    paths = [os.path.join(config.ROOT, n) for n in os.listdir(config.ROOT) if n.endswith(".py")]
    paths.append(os.path.join(config.ROOT, "deploy", "gunicorn.conf.py"))
    offenders = ["%s:%s" % (os.path.relpath(p, config.ROOT), line) for p in sorted(paths)
                 if os.path.basename(p) not in ENVIRON_COPIERS for line in _reads_environ(p)]
    assert not offenders, "read settings through config: %s" % offenders


def test_the_checker_sees_environ_reads(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("import os\nfrom os import getenv\nx = os.environ.get('A')\n")
    assert sorted(_reads_environ(str(bad))) == [2, 3]


# --- new validations ---------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["sqlite://x", "sqlite://data/medialab.db", "sqlite:///", "mysql://u@h/db",
                                 "postgresql://u:secretpw@h", "data/medialab.db"])
def test_database_url_typos_are_one_line(url):
    with pytest.raises(config.ConfigError) as info:
        config.load({"TELEGRAM_BOT_TOKEN": "1:x", "DATABASE_URL": url})
    [line] = info.value.problems
    assert line.startswith("DATABASE_URL") and "secretpw" not in line


def test_good_database_and_queue_urls():
    cfg = config.load({"TELEGRAM_BOT_TOKEN": "1:x", "DATABASE_URL": "sqlite:////var/lib/medialab/db.sqlite",
                       "QUEUE_URL": "rediss://:pw@redis.example:6380/1"})
    assert cfg.database_url == "sqlite:////var/lib/medialab/db.sqlite" and cfg.queue_url.startswith("rediss://")
    with pytest.raises(config.ConfigError, match="QUEUE_URL must be"):
        config.load({"TELEGRAM_BOT_TOKEN": "1:x", "QUEUE_URL": "sqlite://queue.db"})


def test_log_level_is_validated_and_normalised():
    assert config.load({"TELEGRAM_BOT_TOKEN": "1:x", "LOG_LEVEL": "warning"}).log_level == "WARNING"
    with pytest.raises(config.ConfigError, match="^LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR$"):
        config.load({"TELEGRAM_BOT_TOKEN": "1:x", "LOG_LEVEL": "verbose"})


@pytest.mark.parametrize("key", ["nocolonsecretvalue", ":secretvalue", "someid:", "someid: secret"])
def test_a_fal_key_without_id_and_secret_is_refused_without_quoting_it(key):
    with pytest.raises(config.ConfigError) as info:
        config.load({"TELEGRAM_BOT_TOKEN": "1:x", "FAL_KEY": key})
    [line] = info.value.problems
    assert "FAL_KEY does not look like a Fal key" in line and key not in line


def test_secrets_are_never_quoted_in_problems():
    with pytest.raises(config.ConfigError) as info:
        config.load({"TELEGRAM_BOT_TOKEN": "12x:verysecretpart", "FAL_KEY": "alsosecretvalue"})
    assert "verysecretpart" not in str(info.value) and "alsosecretvalue" not in str(info.value)


def test_fal_args_come_from_the_configuration():
    cfg = config.load({"TELEGRAM_BOT_TOKEN": "1:x", "FAL_ARGS_UPSCALE": '{"scale": 4}'})
    assert cfg.fal_args == {"upscale": {"scale": 4}}
    with pytest.raises(config.ConfigError, match="FAL_ARGS_EDIT must be a JSON object"):
        config.load({"TELEGRAM_BOT_TOKEN": "1:x", "FAL_ARGS_EDIT": "[1]"})


def test_web_settings_and_the_env_example_command():
    cfg = config.load({"TELEGRAM_BOT_TOKEN": "1:x", "WEB_BIND": "unix:/run/medialab.sock", "WEB_WORKERS": "3"})
    assert (cfg.web_bind, cfg.web_workers) == ("unix:/run/medialab.sock", 3)
    out = subprocess.run([sys.executable, os.path.join(config.ROOT, "manage.py"), "env-example"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == config.env_example()


def test_report_is_one_line_per_problem():
    stream = io.StringIO()
    config.report(config.ConfigError(["A is wrong", "B is wrong"]), stream)
    assert stream.getvalue().splitlines()[1:] == ["  - A is wrong", "  - B is wrong"]


def test_make_setup_creates_env_private():
    with open(os.path.join(config.ROOT, "Makefile"), encoding="utf-8") as f:
        recipe = [line for line in f if "cp .env.example .env" in line]
    assert recipe and "umask 077" in recipe[0] and "chmod 600 .env" in recipe[0]
