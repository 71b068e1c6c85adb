"""Operations over HTTP: /metrics (Prometheus text, parsed back with prometheus_client's parser),
/health (stale heartbeats, low disk, an unwritable database), and the pieces under them in ops."""
from __future__ import annotations

import datetime
import json
import os
import sqlite3

import pytest
from peewee import SqliteDatabase
from prometheus_client.parser import text_string_to_metric_families

import billing
import config
import models
import ops
import payments
import web
import worker
from models import Generation, utcnow
from tests.helpers import ROOT, shop

YK_IP = "185.71.76.1"


@pytest.fixture
def yk(database, fake_yookassa):
    yield from shop(fake_yookassa)


def alive(now=None):
    for process in ops.PROCESSES:
        ops.beat("process:" + process, now)


def scrape(app, **kw) -> dict:
    """GET /metrics and parse it: {(sample name, frozenset(labels)): value}."""
    response = app.test_client().get("/metrics", **kw)
    assert response.status_code == 200, response.status_code
    assert response.content_type.startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


def notify(app, body: bytes, ip=YK_IP):
    return app.test_client().post("/yookassa/webhook", data=body, headers={"X-Forwarded-For": ip},
                                  environ_base={"REMOTE_ADDR": "127.0.0.1"})


def envelope(event: str, obj: dict) -> bytes:
    return json.dumps({"type": "notification", "event": event, "object": obj}).encode()


def test_metrics_after_payments_jobs_and_webhooks(yk):
    app = web.create_app(yk.cfg)
    paid = payments.create_topup(yk.user.id, 500, promo_code="SAVE20")          # 400.00 ₽
    yk.fake.succeed(paid.yookassa_payment_id)
    payments.create_topup(yk.user.id, 100)                                       # stays pending
    obj = yk.fake.payments[paid.yookassa_payment_id]
    assert notify(app, envelope("payment.succeeded", obj)).status_code == 200
    assert notify(app, envelope("payment.succeeded", obj)).status_code == 200   # duplicate
    assert notify(app, envelope("payment.succeeded", obj), ip="8.8.8.8").status_code == 403
    refund = yk.fake.refund(paid.yookassa_payment_id, "100.00")
    assert notify(app, envelope("refund.succeeded", refund)).status_code == 200
    # jobs: one waiting with its reservation open, two failed with their classes, one delivered
    worker.accept_generation(yk.user, yk.user.telegram_id, "generate", prompt="a cat")
    for error in ("rejected: PermanentProviderError: The provider refused the request: 403 Forbidden",
                  "rejected: PermanentProviderError: The provider refused the request: bad image",
                  "expired: reservation expired before the job finished"):
        Generation.create(user=yk.user.id, chat_id=1, mode="edit", status="failed", error=error)
    Generation.create(user=yk.user.id, chat_id=1, mode="upscale", status="delivered")
    now = utcnow()
    alive(now)
    ops.beat("task:sweep", now - datetime.timedelta(seconds=90))

    samples = scrape(app)
    assert value(samples, "medialab_payments", status="succeeded") == 1
    assert value(samples, "medialab_payments", status="pending") == 1
    assert value(samples, "medialab_payment_credits", status="succeeded") == 500
    assert value(samples, "medialab_payment_kopecks", status="succeeded") == 40000
    assert value(samples, "medialab_refunded_kopecks") == 10000
    balance = billing.get_balance(yk.user.id)
    assert balance.credits == 500 - 125 - 10 and balance.credits_reserved == 10
    assert value(samples, "medialab_balance", asset="credits", state="available") == balance.credits
    assert value(samples, "medialab_balance", asset="credits", state="reserved") == 10
    assert value(samples, "medialab_reservations_open", asset="credits") == 1
    assert value(samples, "medialab_reservations_open_amount", asset="credits") == 10
    assert value(samples, "medialab_generations", status="queued", mode="generate") == 1
    assert value(samples, "medialab_generations", status="failed", mode="edit") == 3
    assert value(samples, "medialab_generations", status="delivered", mode="upscale") == 1
    assert value(samples, "medialab_generation_failures", kind="rejected", error="PermanentProviderError") == 2
    assert value(samples, "medialab_generation_failures", kind="expired", error="") == 1
    assert value(samples, "medialab_webhook_notifications_total", status="200", outcome="credited") == 1
    assert value(samples, "medialab_webhook_notifications_total", status="200", outcome="already_applied") == 1
    assert value(samples, "medialab_webhook_notifications_total", status="403", outcome="untrusted_source") == 1
    assert value(samples, "medialab_webhook_notifications_total", status="200", outcome="refunded") == 1
    assert 0 <= value(samples, "medialab_heartbeat_age_seconds", process="bot") < 60
    assert 90 <= value(samples, "medialab_seconds_since_last_run", task="sweep") < 150
    assert value(samples, "medialab_seconds_since_last_run", task="reconcile") == float("inf")
    assert value(samples, "medialab_queue_pending") == worker.huey.pending_count() == 3   # 2 notices + job
    assert value(samples, "medialab_data_free_bytes") > 0
    assert billing.audit().ok
    assert ops.webhook_failures() == 1


def test_every_gunicorn_worker_would_answer_the_same(yk):
    """Two app instances (as two gunicorn workers) read the same rows, not in-process counters."""
    first, second = web.create_app(yk.cfg), web.create_app(yk.cfg)
    assert notify(first, envelope("payment.succeeded", {"id": "x"}), ip="8.8.8.8").status_code == 403
    key = ("medialab_webhook_notifications_total", frozenset({"status": "403", "outcome": "untrusted_source"}.items()))
    assert scrape(first)[key] == scrape(second)[key] == 1


def test_metrics_are_for_loopback_or_the_token(yk):
    app = web.create_app(yk.cfg)
    client = app.test_client()
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "10.1.2.3"}).status_code == 403
    # through a local proxy the forwarded client counts, not the proxy's loopback address
    assert client.get("/metrics", headers={"X-Forwarded-For": "8.8.8.8"}).status_code == 403
    assert client.get("/metrics", headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 200
    tokened = web.create_app(yk.cfg.replace(metrics_token="s3cret-scrape")).test_client()
    remote = {"REMOTE_ADDR": "10.1.2.3"}
    assert tokened.get("/metrics", environ_base=remote, headers={"Authorization": "Bearer nope"}).status_code == 403
    assert tokened.get("/metrics", environ_base=remote,
                       headers={"Authorization": "Bearer s3cret-scrape"}).status_code == 200


def test_nginx_does_not_proxy_metrics_or_health():
    with open(os.path.join(ROOT, "deploy", "nginx-medialab.conf"), encoding="utf-8") as f:
        site = f.read()
    locations = [line.split()[1] for line in site.splitlines() if line.strip().startswith("location")]
    assert "/metrics" not in locations and "/health" not in locations
    assert all(not loc.startswith(("/metrics", "/health")) for loc in locations)


# --- /health ------------------------------------------------------------------------------------

def test_health_is_200_with_fresh_heartbeats(yk):
    alive()
    response = web.create_app(yk.cfg).test_client().get("/health")
    body = response.get_json()
    assert response.status_code == 200, body
    assert body["ok"] and body["problems"] == [] and body["database"] == "ok"
    assert set(body["heartbeats"]) == {"bot", "worker"} and body["free_mb"] > 0
    assert ops.age("process:web") is not None                     # the check itself wrote


def test_health_is_503_on_a_stale_or_missing_heartbeat(yk):
    app = web.create_app(yk.cfg)
    response = app.test_client().get("/health")
    assert response.status_code == 503
    assert response.get_json()["problems"] == ["no heartbeat from the bot", "no heartbeat from the worker"]
    stale = utcnow() - datetime.timedelta(seconds=yk.cfg.health_heartbeat_max_age + 30)
    ops.beat("process:bot")
    ops.beat("process:worker", stale)
    response = app.test_client().get("/health")
    assert response.status_code == 503
    [problem] = response.get_json()["problems"]
    assert problem.startswith("worker heartbeat is ") and problem.endswith(" s old")
    yookassa = app.test_client().get("/yookassa/health")
    assert (yookassa.status_code, yookassa.get_json()["live"]) == (503, False)
    ops.beat("process:worker")
    assert app.test_client().get("/health").status_code == 200
    assert app.test_client().get("/yookassa/health").status_code == 200


def test_health_is_503_under_the_free_disk_threshold(yk):
    alive()
    low = web.create_app(yk.cfg.replace(health_min_free_mb=10**7))     # 10 TB
    response = low.test_client().get("/health")
    assert response.status_code == 503
    [problem] = response.get_json()["problems"]
    assert "free disk" in problem and "under 10000000 MB" in problem
    assert low.test_client().get("/yookassa/health").status_code == 503


def test_health_is_503_when_the_database_takes_no_write(yk):
    """Another connection holds the write lock past our (shortened) busy timeout."""
    alive()
    path = config.get().database_url[len("sqlite:///"):]
    impatient = SqliteDatabase(path, pragmas=dict(models.SQLITE_PRAGMAS, busy_timeout=100), timeout=0.1)
    models.db.initialize(impatient)
    holder = sqlite3.connect(path)
    holder.execute("BEGIN IMMEDIATE")
    try:
        response = web.create_app(yk.cfg).test_client().get("/health")
        assert response.status_code == 503
        body = response.get_json()
        assert body["database"] == "error" and body["problems"] == ["database not writable (OperationalError)"]
    finally:
        holder.rollback()
        holder.close()
        impatient.close()
        models.init_db(config.get().database_url)
    assert web.create_app(yk.cfg).test_client().get("/health").status_code == 200
