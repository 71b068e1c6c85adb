# Media Lab — a few obvious verbs. The run targets (bot, web, worker) are exactly what the
# systemd units in deploy/ run. Every target bootstraps the virtualenv it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)
WORKERS ?= 4
ARGS ?=
SECONDS ?= 60

.PHONY: setup venv run bot web worker migrate env-example seed-promo audit backup test demo bench soak lint clean
.PHONY: install restore
# An installed copy (deploy/install.sh) has a runtime-only virtualenv: its operator commands use it
# as it is instead of installing the development tools into it.
OPS := $(if $(wildcard $(VENV)/.runtime-only),,venv)

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=python3.11)")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	@rm -f $(VENV)/.installed-* && touch $(STAMP)

venv: $(STAMP)

setup: venv                      ## venv, deps, .env, migrate, seed promo codes
	@test -f .env || (umask 077 && cp .env.example .env && chmod 600 .env && echo "created .env (mode 0600) from .env.example: put your TELEGRAM_BOT_TOKEN there")
	$(BIN)/python manage.py migrate
	$(BIN)/python manage.py seed-promo

BOT_CMD = $(BIN)/python bot.py
WEB_CMD = $(BIN)/gunicorn -c deploy/gunicorn.conf.py web:app
WORKER_CMD = $(BIN)/huey_consumer worker.huey -w $(WORKERS) -k thread -d 0.01 -m 1 -f -g INT -t 60

run: venv                        ## checks once (manage.py check), then all three processes; Ctrl-C, or any one exiting, stops all three
	@$(BIN)/python manage.py check
	@$(BIN)/python scripts/run_all.py worker="$(WORKER_CMD)" web="$(WEB_CMD)" bot="$(BOT_CMD)"

bot: venv
	$(BOT_CMD)

web: venv
	$(WEB_CMD)

worker: venv
	$(WORKER_CMD)

migrate: $(OPS)
	$(BIN)/python manage.py migrate

env-example: venv               ## regenerate .env.example from the declarations in config.py
	$(BIN)/python config.py --env-example > .env.example

seed-promo: venv
	$(BIN)/python manage.py seed-promo

audit: $(OPS)
	$(BIN)/python manage.py audit

backup: $(OPS)                   ## verified copy into data/backup/, keeps the newest BACKUP_KEEP, runs BACKUP_COMMAND
	$(BIN)/python manage.py backup

restore: $(OPS)                  ## make restore FILE=data/backup/medialab-….db [FORCE=1] — with the services stopped
	@test -n "$(FILE)" || { echo "usage: make restore FILE=path/to/backup.db [FORCE=1]"; exit 2; }
	$(BIN)/python manage.py restore "$(abspath $(FILE))" $(if $(FORCE),--force)

install:                         ## sudo make install DOMAIN=bot.example.com [EMAIL=…] [CERTBOT=1] — see README "Deploying"
	DOMAIN="$(DOMAIN)" EMAIL="$(EMAIL)" CERTBOT="$(CERTBOT)" PREFIX="$(or $(PREFIX),/opt/medialab)" \
	  DESTDIR="$(DESTDIR)" deploy/install.sh $(INSTALL_ARGS)

test: venv                       ## the suite; PostgreSQL/Redis tests run when TEST_POSTGRES_URL/TEST_REDIS_URL are set
	$(BIN)/python -m pytest $(ARGS)

demo: venv                       ## offline sandbox: real bot, web, worker against local fakes
	$(BIN)/python demo.py

bench: venv
	$(BIN)/python -m bench

soak: venv                       ## SIGKILL loop against the billing core for SECONDS
	$(BIN)/python -m tests.billing_harness soak --seconds $(SECONDS)

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
