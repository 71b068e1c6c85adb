#!/usr/bin/env bash
# Install or upgrade Media Lab on one Debian 12 / Ubuntu 22.04 / 24.04 host: `sudo make install`.
#
#   deploy/install.sh [--domain bot.example.com] [--email you@example.com] [--certbot]
#                     [--prefix /opt/medialab] [--root DIR] [--no-venv] [--no-start]
#
# (also DOMAIN, EMAIL, CERTBOT=1, PREFIX, DESTDIR, NO_VENV=1, NO_START=1 in the environment).
#
# The checkout is COPIED to the prefix (its tracked files, owned by root, read-only to the
# service), so the running code changes only when this script runs; data/ (the databases and
# backups, owned by `medialab`, 0700) and .env (0600, created from .env.example once, never
# overwritten) live in the prefix and are never touched by an upgrade. It creates the system user
# `medialab`, a virtualenv with the runtime requirements (requirements.txt) only, the systemd units
# (medialab-migrate, -bot, -web, -worker, -backup.timer; -bot-webhook for webhook mode) and the
# nginx site for --domain (remembered for later runs), and with --certbot gets the Let's Encrypt
# certificate (http-01 through nginx). Every step compares before it writes: a second run reports
# "no changes" and restarts nothing.
#
# --root DIR (or DESTDIR) writes everything below DIR instead of / and skips what only makes sense
# on the real host (the user, apt, chown, systemctl, nginx reload, certbot): tests use it.
set -euo pipefail
umask 022                   # the code must stay readable by the service user whatever root's umask is

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${PREFIX:-/opt/medialab}"
ROOT="${DESTDIR:-}"
DOMAIN="${DOMAIN:-}"
EMAIL="${EMAIL:-}"
CERTBOT="${CERTBOT:-0}"
NO_VENV="${NO_VENV:-0}"
NO_START="${NO_START:-0}"
SERVICE_USER=medialab
ACME_ROOT=/var/www/letsencrypt

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --domain) DOMAIN="$2"; shift 2 ;;
    --domain=*) DOMAIN="${1#*=}"; shift ;;
    --email) EMAIL="$2"; shift 2 ;;
    --email=*) EMAIL="${1#*=}"; shift ;;
    --certbot) CERTBOT=1; shift ;;
    --prefix) PREFIX="$2"; shift 2 ;;
    --prefix=*) PREFIX="${1#*=}"; shift ;;
    --root) ROOT="$2"; shift 2 ;;
    --root=*) ROOT="${1#*=}"; shift ;;
    --no-venv) NO_VENV=1; shift ;;
    --no-start) NO_START=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
ROOT="${ROOT%/}"
case "$PREFIX" in /*) ;; *) echo "install.sh: --prefix must be an absolute path" >&2; exit 2 ;; esac
if [ -n "$DOMAIN" ] && ! [[ "$DOMAIN" =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; then
  echo "install.sh: --domain must be a host name like bot.example.com, got '$DOMAIN'" >&2; exit 2
fi
REAL=1                      # acting on the real host (not below --root)
[ -n "$ROOT" ] && REAL=0
if [ "$REAL" = 1 ] && [ "$(id -u)" != 0 ]; then
  echo "install.sh: run it as root (sudo make install), or with --root DIR for a trial install" >&2; exit 2
fi
DEST="$ROOT$PREFIX"
if [ "$(readlink -f "$SRC")" = "$(readlink -f "$DEST" 2>/dev/null || true)" ]; then
  echo "install.sh: $SRC is the installed copy; run it from your checkout (git pull there, then sudo make install)" >&2
  exit 2
fi
STATE="$DEST/.install.env"   # what later runs remember: DOMAIN, EMAIL
CHANGES=0
changed() { CHANGES=$((CHANGES + 1)); echo "  changed: $*"; }
have() { command -v "$1" >/dev/null 2>&1; }
systemd_up() { [ "$REAL" = 1 ] && [ -d /run/systemd/system ] && have systemctl; }

if [ -f "$STATE" ]; then
  saved_domain=$(sed -n 's/^DOMAIN=//p' "$STATE"); saved_email=$(sed -n 's/^EMAIL=//p' "$STATE")
  DOMAIN="${DOMAIN:-$saved_domain}"; EMAIL="${EMAIL:-$saved_email}"
fi
echo "Media Lab: installing $SRC into $DEST${DOMAIN:+ for $DOMAIN}"

# --- packages and the system user (real host only) ----------------------------------------------
pick_python() {   # the distribution's Python: one under /root or /home is hidden from the units (ProtectHome)
  for p in /usr/bin/python3.13 /usr/bin/python3.12 /usr/bin/python3.11 /usr/bin/python3 \
           /usr/local/bin/python3.13 /usr/local/bin/python3.12 /usr/local/bin/python3.11; do
    if have "$p" && "$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$p"; return 0
    fi
  done
  return 1
}
if [ "$REAL" = 1 ] && have apt-get; then
  want=()
  PY=$(pick_python || true)
  if [ -z "$PY" ]; then want+=(python3.11 python3.11-venv); PY=python3.11   # Ubuntu 22.04 ships 3.10
  elif ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then want+=("$(basename "$PY")-venv"); fi
  have nginx || want+=(nginx)
  [ "$CERTBOT" = 1 ] && ! have certbot && want+=(certbot)
  if [ ${#want[@]} -gt 0 ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${want[@]}"
    changed "packages installed: ${want[*]}"
  fi
fi

OWNER=""
if [ "$REAL" = 1 ]; then
  if ! getent passwd "$SERVICE_USER" >/dev/null; then
    useradd --system --user-group --home-dir "$PREFIX" --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
    changed "system user $SERVICE_USER created"
  fi
  OWNER="$SERVICE_USER:$SERVICE_USER"
fi

# --- helpers: write only what differs -------------------------------------------------------------
# put SRC_FILE DEST_FILE MODE [OWNER]: copy when content, mode or owner differ.
put() {
  local from="$1" to="$2" mode="$3" owner="${4:-}"
  if [ -f "$to" ] && cmp -s "$from" "$to"; then
    fix_meta "$to" "$mode" "$owner"
    return 0
  fi
  install -D -m "$mode" /dev/null "$to.new.$$"
  cat "$from" > "$to.new.$$"
  [ -n "$owner" ] && chown "$owner" "$to.new.$$"
  mv -f "$to.new.$$" "$to"
  changed "${to#"$ROOT"}"
}
# fix_meta PATH MODE [OWNER]
fix_meta() {
  local path="$1" mode="$2" owner="${3:-}"
  local meta
  meta=$(stat -c '%a %U:%G' "$path")
  if [ "${meta%% *}" != "${mode#0}" ]; then chmod "$mode" "$path"; changed "mode $mode ${path#"$ROOT"}"; fi
  if [ -n "$owner" ] && [ "${meta#* }" != "$owner" ]; then
    chown "$owner" "$path"; changed "owner $owner ${path#"$ROOT"}"
  fi
}
# render TEMPLATE DEST MODE: the template with /opt/medialab → PREFIX and bot.example.com → DOMAIN.
render() {
  local tmp
  tmp=$(mktemp)
  sed -e "s#/opt/medialab#$PREFIX#g" -e "s#bot\.example\.com#${DOMAIN:-bot.example.com}#g" "$1" > "$tmp"
  put "$tmp" "$2" "$3"
  rm -f "$tmp"
}
dir() {   # dir PATH MODE [OWNER]
  if [ ! -d "$1" ]; then mkdir -p "$1"; changed "${1#"$ROOT"}/"; fi
  fix_meta "$1" "$2" "${3:-}"
}

# --- the code ------------------------------------------------------------------------------------
dir "$DEST" 0755
if git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  mapfile -t FILES < <(git -C "$SRC" ls-files | grep -v -e '^\.ci/' -e '^\.git')
else
  mapfile -t FILES < <(cd "$SRC" && find . -type f ! -path './.git*' ! -path './.venv/*' ! -path './data/*' \
                         ! -name .env ! -name '.install*' ! -path '*/__pycache__/*' ! -path './.ci/*' | sed 's#^\./##' | sort)
fi
CODE_BEFORE=$CHANGES
# Compare in bulk (one sha256sum and one stat per side): a run that changes nothing stays quick.
mapfile -t FILES < <(cd "$SRC" && for f in "${FILES[@]}"; do [ -f "$f" ] && printf '%s\n' "$f"; done)
declare -A WANT=() HAVE=() MODE=()
while read -r sum path; do WANT["$path"]=$sum; done < <(cd "$SRC" && sha256sum -- "${FILES[@]}")
while read -r sum path; do HAVE["$path"]=$sum; done < <(cd "$DEST" && sha256sum -- "${FILES[@]}" 2>/dev/null || true)
while read -r mode path; do MODE["$path"]=$mode; done < <(cd "$DEST" && stat -c '%a %n' -- "${FILES[@]}" 2>/dev/null || true)
TODO=(); EXEC=(); PLAIN=()
for f in "${FILES[@]}"; do
  mode=0644; [ -x "$SRC/$f" ] && mode=0755
  [ "${HAVE["$f"]:-}" = "${WANT["$f"]}" ] && [ "${MODE["$f"]:-}" = "${mode#0}" ] && continue
  TODO+=("$f"); if [ $mode = 0755 ]; then EXEC+=("$DEST/$f"); else PLAIN+=("$DEST/$f"); fi
  changed "$PREFIX/$f"
done
if [ ${#TODO[@]} -gt 0 ]; then    # a new file replaces the old one (a reader never sees half a file)
  (cd "$SRC" && cp --parents --remove-destination --no-preserve=mode,ownership -- "${TODO[@]}" "$DEST/")
  [ ${#PLAIN[@]} -eq 0 ] || chmod 0644 -- "${PLAIN[@]}"
  [ ${#EXEC[@]} -eq 0 ] || chmod 0755 -- "${EXEC[@]}"
fi
MANIFEST="$DEST/.installed-files"
declare -A SHIPPED=()
for f in "${FILES[@]}"; do SHIPPED["$f"]=1; done
if [ -f "$MANIFEST" ]; then                     # files an upgrade no longer ships
  while IFS= read -r old; do
    if [ -n "$old" ] && [ -f "$DEST/$old" ] && [ -z "${SHIPPED["$old"]:-}" ]; then
      rm -f "$DEST/$old"; changed "removed $old"
    fi
  done < "$MANIFEST"
fi
# bookkeeping files: written when needed, not counted (they change only with what they record)
quiet_put() { local n=$CHANGES; put "$@" >/dev/null; CHANGES=$n; }
tmp=$(mktemp); printf '%s\n' "${FILES[@]}" > "$tmp"; quiet_put "$tmp" "$MANIFEST" 0644; rm -f "$tmp"
CODE_CHANGED=$((CHANGES - CODE_BEFORE))

# --- data folder and .env ------------------------------------------------------------------------
dir "$DEST/data" 0700 "$OWNER"
if [ ! -e "$DEST/.env" ]; then
  install -m 0600 "$SRC/.env.example" "$DEST/.env"
  [ -n "$OWNER" ] && chown "$OWNER" "$DEST/.env"
  changed "${PREFIX}/.env created from .env.example: fill in TELEGRAM_BOT_TOKEN and the rest"
fi
fix_meta "$DEST/.env" 0600 "$OWNER"
tmp=$(mktemp); printf 'DOMAIN=%s\nEMAIL=%s\n' "$DOMAIN" "$EMAIL" > "$tmp"; quiet_put "$tmp" "$STATE" 0644; rm -f "$tmp"

# --- virtualenv: runtime requirements only ----------------------------------------------------
if [ "$NO_VENV" != 1 ]; then
  PY=$(pick_python || true)
  [ -n "$PY" ] || { echo "install.sh: Python 3.11+ is required (apt-get install python3.11 python3.11-venv)" >&2; exit 2; }
  stamp="$(cat "$SRC/requirements.txt" | sha256sum | cut -c1-16)-$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  if [ -x "$DEST/.venv/bin/python" ] && [ "$(readlink -f "$DEST/.venv/bin/python")" != "$(readlink -f "$PY")" ]; then
    rm -rf "$DEST/.venv"                         # built on another interpreter: start again
  fi
  if [ ! -x "$DEST/.venv/bin/python" ]; then
    "$PY" -m venv "$DEST/.venv"; changed "virtualenv $PREFIX/.venv"
  fi
  if [ "$(cat "$DEST/.venv/.runtime-only" 2>/dev/null)" != "$stamp" ]; then
    "$DEST/.venv/bin/python" -m pip install -q --upgrade pip
    "$DEST/.venv/bin/python" -m pip install -q -r "$DEST/requirements.txt"
    echo "$stamp" > "$DEST/.venv/.runtime-only"   # also tells the Makefile not to install dev tools
    changed "runtime requirements installed into $PREFIX/.venv"
  fi
fi

# --- systemd units --------------------------------------------------------------------------------
UNIT_DIR="$ROOT/etc/systemd/system"
UNITS_BEFORE=$CHANGES
for unit in "$SRC"/deploy/*.service "$SRC"/deploy/*.timer; do
  render "$unit" "$UNIT_DIR/$(basename "$unit")" 0644
done
UNITS_CHANGED=$((CHANGES - UNITS_BEFORE))

# --- nginx site and certificate -------------------------------------------------------------------
NGINX_BEFORE=$CHANGES
cert="/etc/letsencrypt/live/$DOMAIN/fullchain.pem"
install_site() {
  local template=nginx-medialab-http.conf
  [ -f "$ROOT$cert" ] && template=nginx-medialab.conf
  dir "$ROOT$ACME_ROOT" 0755
  render "$SRC/deploy/$template" "$ROOT/etc/nginx/sites-available/medialab" 0644
  mkdir -p "$ROOT/etc/nginx/sites-enabled"
  if [ "$(readlink "$ROOT/etc/nginx/sites-enabled/medialab" 2>/dev/null)" != /etc/nginx/sites-available/medialab ]; then
    ln -sfn /etc/nginx/sites-available/medialab "$ROOT/etc/nginx/sites-enabled/medialab"
    changed "/etc/nginx/sites-enabled/medialab"
  fi
}
reload_nginx() {
  if [ "$REAL" = 1 ] && [ $CHANGES -gt "$NGINX_BEFORE" ] && have nginx; then
    nginx -t -q
    if systemd_up; then systemctl reload-or-restart nginx; else nginx -s reload 2>/dev/null || nginx; fi
  fi
}
if [ -z "$DOMAIN" ]; then
  echo "  note: no --domain (DOMAIN=...) given: the nginx site is not installed"
else
  install_site
  reload_nginx
  if [ ! -f "$ROOT$cert" ]; then
    if [ "$CERTBOT" = 1 ] && [ "$REAL" = 1 ]; then
      contact=(--register-unsafely-without-email)
      [ -n "$EMAIL" ] && contact=(--email "$EMAIL")
      certbot certonly --webroot -w "$ACME_ROOT" -d "$DOMAIN" --non-interactive --agree-tos "${contact[@]}" \
        --deploy-hook "systemctl reload nginx"
      NGINX_BEFORE=$CHANGES
      install_site
      reload_nginx
    else
      echo "  note: no certificate for $DOMAIN yet; nginx serves port 80 only. Get one with"
      echo "        sudo certbot certonly --webroot -w $ACME_ROOT -d $DOMAIN --deploy-hook 'systemctl reload nginx'"
      echo "        (or rerun with --certbot), then run sudo make install again to enable https."
    fi
  fi
fi

# --- services -------------------------------------------------------------------------------------
if systemd_up; then
  [ $UNITS_CHANGED -gt 0 ] && systemctl daemon-reload
  bot_unit=medialab-bot.service
  systemctl is-enabled --quiet medialab-bot-webhook.service 2>/dev/null && bot_unit=medialab-bot-webhook.service
  for u in $bot_unit medialab-web.service medialab-worker.service medialab-backup.timer; do
    if ! systemctl is-enabled --quiet "$u" 2>/dev/null; then systemctl enable --quiet "$u"; changed "enabled $u"; fi
  done
  if [ "$NO_START" = 1 ]; then
    echo "  --no-start: services not (re)started"
  elif ! grep -Eq '^TELEGRAM_BOT_TOKEN=.+' "$DEST/.env"; then
    echo "  next: put TELEGRAM_BOT_TOKEN (and the rest) into $PREFIX/.env, then sudo make install again"
    echo "        (or: sudo systemctl start $bot_unit medialab-web medialab-worker medialab-backup.timer)"
  else
    if [ $((CODE_CHANGED + UNITS_CHANGED)) -gt 0 ] && systemctl is-active --quiet medialab-migrate.service; then
      # Stops bot, web and worker (they Require= it), backs up and migrates, starts them again.
      systemctl restart medialab-migrate.service
      echo "  restarted: migrations (backup first), then $bot_unit medialab-web medialab-worker"
    fi
    systemctl start $bot_unit medialab-web.service medialab-worker.service medialab-backup.timer
  fi
fi

if [ $CHANGES -eq 0 ]; then
  echo "Media Lab: no changes"
else
  echo "Media Lab: $CHANGES change(s)"
fi
