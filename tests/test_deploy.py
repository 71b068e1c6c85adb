"""A deploy that works the first time (issue 8 §3): deploy/install.sh, the units, the nginx site.

`install.sh --root DIR` installs into a temporary root (no user, apt, chown or systemctl there).
The units go through `systemd-analyze verify` and `systemd-analyze security --offline=yes` and the
site through `nginx -t` with a self-signed certificate; those tests skip, saying why, where the
tools are missing (.ci/run installs them).
"""
import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL = os.path.join(ROOT, "deploy", "install.sh")
DOMAIN = "bot.test.example"
PREFIX = "/opt/medialab"
SERVICES = ("medialab-migrate", "medialab-bot", "medialab-bot-webhook", "medialab-web", "medialab-worker",
            "medialab-backup")
MAX_EXPOSURE = 4.0


def missing_tool(reason):
    """Skip, saying why — except in CI (.ci/run installs the tools and sets CI_REQUIRE_DEPLOY_TOOLS)."""
    if os.environ.get("CI_REQUIRE_DEPLOY_TOOLS"):
        pytest.fail("CI must have it: " + reason)
    pytest.skip(reason)


def install(root, *args):
    """Run install.sh into `root` (no virtualenv: the tests never download packages)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DOMAIN", "EMAIL", "CERTBOT", "PREFIX", "DESTDIR")}
    result = subprocess.run(["bash", INSTALL, "--root", str(root), "--no-venv", *args], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def tree(root):
    """{path: (mode, sha256, mtime_ns)} of every file and link below `root`."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            digest = ""
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            found[os.path.relpath(path, root)] = (st.st_mode, digest, st.st_mtime_ns if digest else 0)
    return found


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """One trial install into a temporary root, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("root")
    first = install(root, "--domain", DOMAIN)
    return root, first


def unit_path(root, name):
    return os.path.join(str(root), "etc", "systemd", "system", name)


def test_install_renders_everything_and_a_second_run_changes_nothing(installed):
    root, first = installed
    dest = os.path.join(str(root), PREFIX.lstrip("/"))
    assert "change(s)" in first
    for name in SERVICES:
        assert os.path.isfile(unit_path(root, name + ".service")), name
    assert os.path.isfile(unit_path(root, "medialab-backup.timer"))
    assert oct(os.stat(os.path.join(dest, ".env")).st_mode & 0o777) == "0o600"
    assert oct(os.stat(os.path.join(dest, "data")).st_mode & 0o777) == "0o700"
    for name in ("manage.py", "bot.py", "requirements.txt", "deploy/gunicorn.conf.py"):
        assert os.path.isfile(os.path.join(dest, name)), name
    site = os.path.join(str(root), "etc", "nginx", "sites-available", "medialab")
    assert "server_name %s;" % DOMAIN in open(site).read()
    assert os.readlink(os.path.join(str(root), "etc", "nginx", "sites-enabled", "medialab")) == \
        "/etc/nginx/sites-available/medialab"

    # An operator's .env is never overwritten; the domain is remembered.
    with open(os.path.join(dest, ".env"), "a") as f:
        f.write("TELEGRAM_BOT_TOKEN=123:operator\n")
    before = tree(root)
    second = install(root)
    assert "Media Lab: no changes" in second and "changed:" not in second, second
    assert tree(root) == before


def test_an_upgrade_copies_changed_files_and_drops_removed_ones(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, str(src), ignore=shutil.ignore_patterns(".git", ".venv", "data", "__pycache__", ".env"))
    script = str(src / "deploy" / "install.sh")
    env = {k: v for k, v in os.environ.items() if k not in ("DOMAIN", "PREFIX", "DESTDIR")}
    root = tmp_path / "root"
    (src / "obsolete.py").write_text("x = 1\n")

    def run():
        out = subprocess.run(["bash", script, "--root", str(root), "--no-venv"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    run()
    dest = root / PREFIX.lstrip("/")
    assert (dest / "obsolete.py").exists() and "note: no --domain" in run()
    (src / "obsolete.py").unlink()
    (src / "README.md").write_text("new\n")
    out = run()
    assert "removed obsolete.py" in out and "/opt/medialab/README.md" in out
    assert not (dest / "obsolete.py").exists() and (dest / "README.md").read_text() == "new\n"


def test_units_have_the_shape_the_deploy_needs(installed):
    root, _ = installed
    text = {name: open(unit_path(root, name + ".service")).read() for name in SERVICES}
    for name in ("medialab-bot", "medialab-bot-webhook", "medialab-web", "medialab-worker"):
        assert "Requires=medialab-migrate.service" in text[name], name
        assert re.search(r"^After=.*medialab-migrate\.service", text[name], re.M), name
        assert re.search(r"^RestartPreventExitStatus=78\b", text[name], re.M), name
        assert "RestartSec=" in text[name], name
    for name, body in text.items():
        for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=%s/data" % PREFIX,
                     "PrivateTmp=yes", "ProtectHome=yes", "UMask=0077", "CapabilityBoundingSet=\n",
                     "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "SystemCallFilter=@system-service",
                     "User=medialab"):
            assert line in body, (name, line)
    assert "manage.py migrate --backup" in text["medialab-migrate"] and "Type=oneshot" in text["medialab-migrate"]
    assert "KillSignal=SIGINT" in text["medialab-worker"] and "TimeoutStopSec=" in text["medialab-worker"]
    assert "gunicorn" in text["medialab-bot-webhook"] and "bot:create_webhook_app()" in text["medialab-bot-webhook"]
    assert "manage.py backup" in text["medialab-backup"]
    timer = open(unit_path(root, "medialab-backup.timer")).read()
    assert "OnCalendar=" in timer and "Persistent=true" in timer


def systemd_analyze():
    tool = shutil.which("systemd-analyze")
    if not tool:
        missing_tool("systemd-analyze is not installed (apt-get install systemd): units not checked")
    probe = subprocess.run([tool, "security", "--help"], capture_output=True, text=True)
    if "--offline" not in probe.stdout:
        missing_tool("this systemd-analyze has no `security --offline` (systemd < 250)")
    return tool


def test_units_verify_and_score_at_most_4(installed, tmp_path):
    tool = systemd_analyze()
    root, _ = installed
    # verify wants the ExecStart programs to exist: point the units at a prefix where they do.
    prefix = tmp_path / "opt" / "medialab"
    (prefix / ".venv" / "bin").mkdir(parents=True)
    (prefix / "data").mkdir()
    bindir = os.path.dirname(sys.executable)
    for program in ("python", "gunicorn", "huey_consumer"):
        os.symlink(os.path.join(bindir, program) if program != "python" else sys.executable,
                   str(prefix / ".venv" / "bin" / program))
    (prefix / ".env").write_text("")
    units = tmp_path / "units"
    units.mkdir()
    names = [n + ".service" for n in SERVICES] + ["medialab-backup.timer"]
    for name in names:
        text = open(unit_path(root, name)).read().replace(PREFIX, str(prefix))
        (units / name).write_text(text)
    verify = subprocess.run([tool, "verify", *[str(units / n) for n in names]], capture_output=True, text=True,
                            timeout=120, cwd=str(units))
    problems = [line for line in (verify.stdout + verify.stderr).splitlines() if line.strip()]
    assert verify.returncode == 0 and not problems, "\n".join(problems)
    scores = {}
    for name in SERVICES:
        out = subprocess.run([tool, "security", "--offline=yes", str(units / (name + ".service"))],
                             capture_output=True, text=True, timeout=60)
        match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout + out.stderr)
        assert match, out.stdout + out.stderr
        scores[name] = float(match.group(1))
    assert all(score <= MAX_EXPOSURE for score in scores.values()), scores


def nginx_check(tmp_path, site_text):
    """`nginx -t` on `site_text` inside a minimal nginx.conf, with a fresh self-signed certificate."""
    nginx, openssl = shutil.which("nginx") or "/usr/sbin/nginx", shutil.which("openssl")
    if not os.path.exists(nginx):
        missing_tool("nginx is not installed (apt-get install nginx; .ci/run does): site not checked")
    if not openssl:
        missing_tool("openssl is not installed: no test certificate for nginx -t")
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=" + DOMAIN, "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    live = "/etc/letsencrypt/live/%s/" % DOMAIN
    site = tmp_path / "site.conf"
    site.write_text(site_text.replace(live, str(tmp_path) + "/"))
    conf = tmp_path / "nginx.conf"
    temp = "".join("%s_temp_path %s/%s;\n" % (n, tmp_path, n) for n in ("client_body", "proxy", "fastcgi",
                                                                       "uwsgi", "scgi"))
    conf.write_text("pid %s/nginx.pid;\nerror_log %s/error.log;\nevents {}\nhttp {\n access_log off;\n%s"
                    " include %s;\n}\n" % (tmp_path, tmp_path, temp, site))
    result = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_the_https_site_passes_nginx_t(tmp_path):
    template = open(os.path.join(ROOT, "deploy", "nginx-medialab.conf")).read()
    text = template.replace("bot.example.com", DOMAIN)
    assert "http2 on" not in re.sub(r"#.*", "", text)           # nginx 1.22 (Debian 12) has no such directive
    for needle in ("listen [::]:80;", "listen 443 ssl http2;", "listen [::]:443 ssl http2;",
                   "client_max_body_size", "Strict-Transport-Security", "proxy_pass http://127.0.0.1:8000;",
                   "X-Forwarded-For $proxy_add_x_forwarded_for", "X-Forwarded-Proto $scheme",
                   "location /telegram/"):
        assert needle in text, needle
    port80 = text.split("server {")[1]
    assert port80.index("/.well-known/acme-challenge/") < port80.index("return 301 https://")
    nginx_check(tmp_path, text)


def test_the_site_before_the_certificate_passes_nginx_t(installed, tmp_path):
    root, _ = installed
    text = open(os.path.join(str(root), "etc", "nginx", "sites-available", "medialab")).read()
    assert "/.well-known/acme-challenge/" in text and "443" not in text   # no certificate yet: port 80
    nginx_check(tmp_path, text)


def test_install_switches_to_https_once_the_certificate_exists(tmp_path):
    root = tmp_path / "root"
    install(root, "--domain", DOMAIN)
    live = root / "etc" / "letsencrypt" / "live" / DOMAIN
    live.mkdir(parents=True)
    (live / "fullchain.pem").write_text("stand-in")
    out = install(root)
    assert "/etc/nginx/sites-available/medialab" in out
    text = (root / "etc" / "nginx" / "sites-available" / "medialab").read_text()
    assert "listen [::]:443 ssl http2;" in text and "ssl_certificate     /etc/letsencrypt/live/%s/" % DOMAIN in text
