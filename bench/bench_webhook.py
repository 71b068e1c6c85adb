"""Benchmark: YooKassa notifications through a real gunicorn (2 gthread workers) vs. a trivial Flask app.

Everything is local and bounded: a temporary SQLite database, the local fake YooKassa
(tests/fakes/yookassa.py, in a child process) answering the webhook's re-fetches, both servers on
loopback ports.

Phase 1 (open loop, issue #4's target: p99 < 100 ms at 100 notifications/s): 100 payments × 10
duplicates = 1,000 deliveries in a shuffled order, offered at RATE per second from a thread pool;
latency is measured from each delivery's scheduled time, so a slow server cannot hide its queue.
Phase 2 (closed loop): 16 clients send duplicates back to back, for the saturated rate.
The same two phases run against the baseline app, each server after an unmeasured warm-up of
WARMUP requests. Afterwards exactly 100 payments must be credited and the ledger audit must be
clean.

``run(quick=False) -> dict`` of flat figures (keys ``webhook_*``);
``python bench/bench_webhook.py`` prints them as JSON.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
YK_IP = "185.71.76.1"
RATE = 100.0            # notifications offered per second in phase 1
CLIENT_THREADS = 64     # phase 1 pool: enough that the client never queues at 100/s
SATURATION_CLIENTS = 16
WARMUP = 64             # unmeasured requests before each server's phases
START_DEADLINE = 30.0   # seconds for gunicorn to answer its health check


def baseline_app():
    """The baseline: a trivial Flask app with the same routes that does nothing (gunicorn factory)."""
    from flask import Flask, Response

    app = Flask("baseline")

    @app.post("/yookassa/webhook")
    def webhook():
        return Response(status=200)

    @app.get("/yookassa/health")
    def health():
        return {"ok": True}

    return app


# The fake YooKassa runs in its own process so the load generator's threads do not slow its
# answers through the GIL. It listens with Werkzeug's backlog of 128 (tests/fakes/base.py), not
# socketserver's 5: with several concurrent re-fetches a full backlog drops SYNs, which the kernel
# retries only after 1 s (a harness artefact, not something YooKassa's API does).
FAKE_SCRIPT = """
import sys
sys.path.insert(0, %r)
from tests.fakes import yookassa as fake_module
fake = fake_module.FakeYooKassa().start()
print(fake.url, flush=True)
sys.stdin.read()
fake.stop()
"""


class _FakeProcess:
    """The fake YooKassa in a child process, driven over its /_test HTTP controls."""

    def __enter__(self):
        self.process = subprocess.Popen([sys.executable, "-c", FAKE_SCRIPT % ROOT], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.url = self.process.stdout.readline().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            self.process.kill()
            raise RuntimeError("the fake YooKassa did not start")
        self.api_url = self.url + "/v3"
        return self

    def control(self, method: str, path: str) -> dict:
        import requests

        response = requests.request(method, self.url + "/_test" + path, json={}, timeout=10)
        response.raise_for_status()
        return response.json()

    def __exit__(self, *exc):
        self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_gunicorn(app: str, chdir: str, env: dict, log_path: str):
    import requests

    port = _free_port()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--workers", "2", "--worker-class", "gthread", "--threads", "4",
             "--bind", "127.0.0.1:%d" % port, "--chdir", chdir, "--timeout", "30", "--graceful-timeout", "5", app],
            cwd=chdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = "http://127.0.0.1:%d" % port
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline and process.poll() is None:
        try:
            # Any answer means it serves: /yookassa/health is 503 here because no bot or worker
            # writes a heartbeat during the benchmark.
            if requests.get(base + "/yookassa/health", timeout=1).status_code in (200, 503):
                return process, base
        except requests.RequestException:
            pass
        time.sleep(0.05)
    _stop(process)
    with open(log_path, errors="replace") as f:
        raise RuntimeError("gunicorn %s did not start:\n%s" % (app, f.read()[-2000:]))


def _stop(process) -> None:
    from bench.bench_pipeline import stop_process

    stop_process(process, signal.SIGTERM, 15)


def _percentile(values: list, q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _open_loop(url: str, bodies: list, rate: float) -> dict:
    """POST `bodies` at `rate` per second; latency counted from each body's scheduled send time."""
    import requests

    local = threading.local()
    results = [None] * len(bodies)
    headers = {"Content-Type": "application/json", "X-Forwarded-For": YK_IP}
    start = time.monotonic() + 0.2
    index_lock = threading.Lock()
    next_index = iter(range(len(bodies)))

    def client():
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        while True:
            with index_lock:
                i = next(next_index, None)
            if i is None:
                return
            scheduled = start + i / rate
            delay = scheduled - time.monotonic()
            if delay > 0:
                time.sleep(delay)      # pacing the offered load, not waiting for a result
            try:
                status = session.post(url, data=bodies[i], headers=headers, timeout=30).status_code
            except requests.RequestException:
                status = 0
            results[i] = (status, time.monotonic() - scheduled)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENT_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    elapsed = time.monotonic() - start
    latencies = [r[1] * 1000 for r in results if r]
    return {"count": len(bodies), "ok": sum(1 for r in results if r and r[0] == 200),
            "per_s": len(bodies) / elapsed if elapsed > 0 else 0.0,
            "p50_ms": _percentile(latencies, 0.50), "p99_ms": _percentile(latencies, 0.99),
            "max_ms": max(latencies) if latencies else 0.0}


def _closed_loop(url: str, body: bytes, count: int) -> float:
    """SATURATION_CLIENTS clients send `body` back to back, `count` in all; return requests/s."""
    import requests

    headers = {"Content-Type": "application/json", "X-Forwarded-For": YK_IP}
    remaining = iter(range(count))
    lock = threading.Lock()

    def client():
        with requests.Session() as session:
            while True:
                with lock:
                    if next(remaining, None) is None:
                        return
                try:
                    session.post(url, data=body, headers=headers, timeout=30)
                except requests.RequestException:
                    pass

    started = time.monotonic()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(SATURATION_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return count / (time.monotonic() - started)


def run(quick: bool = False) -> dict:
    """Run the benchmark on a temporary SQLite database; return flat figures with keys starting
    ``webhook_``.

    quick: 20 payments × 10 duplicates at 200/s and a shorter saturation phase (a smoke run).
    """
    n_payments, duplicates = (20, 10) if quick else (100, 10)
    rate = 200.0 if quick else RATE
    saturation = 200 if quick else 1000
    with tempfile.TemporaryDirectory(prefix="bench-webhook-") as tmp:
        return measure("sqlite:///%s" % os.path.join(tmp, "medialab.db"), tmp, n_payments=n_payments,
                       duplicates=duplicates, rate=rate, saturation=saturation, prefix="webhook_")


def measure(db_url: str, tmp: str, *, n_payments: int, duplicates: int, rate: float, saturation: int,
            prefix: str, reset=None) -> dict:
    """Offer `n_payments` × `duplicates` notifications at `rate` per second (open loop), then
    `saturation` back to back, to the real web app under gunicorn on database `db_url` and to the
    trivial baseline app; return flat figures with keys starting `prefix`.

    `tmp` holds the queue and the logs; `reset(db_url)` (optional) empties the database first (the
    PostgreSQL soak drops its schema), else the SQLite file is migrated from blank.
    """
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import billing
    import config
    import models
    import payments

    started = time.monotonic()
    with _FakeProcess() as fake:
        env = {
            "TELEGRAM_BOT_TOKEN": "123456:BENCH", "DATABASE_URL": db_url,
            "QUEUE_URL": "sqlite:///%s" % os.path.join(tmp, "queue.db"),
            "YOOKASSA_SHOP_ID": "123456", "YOOKASSA_SECRET_KEY": "test_secret",     # the fake's defaults
            "YOOKASSA_API_URL": fake.api_url, "YOOKASSA_RETURN_URL": "https://t.me/medialab_bench_bot",
            "YOOKASSA_ALLOW_TEST": "1", "YOOKASSA_TIMEOUT": "5", "TRUSTED_PROXY_COUNT": "1",
            "LOG_LEVEL": "WARNING", "FAL_KEY": "",
        }
        previous_cfg = config._current
        cfg = config.configure(config.load(env))
        if reset is not None:
            reset(db_url)
        database = models.init_db(db_url)
        try:
            models.migrate(database)
            bodies = _notifications(fake, cfg, n_payments, duplicates, billing, payments)
            # Warm-up (not measured): a notification for a payment that is not ours goes through
            # the whole stack except the re-fetch, in every worker thread.
            warm = json.dumps({"type": "notification", "event": "payment.succeeded",
                               "object": {"id": "00000000-000f-5000-8000-000000000000", "status": "succeeded",
                                          "paid": True, "amount": {"value": "1.00", "currency": "RUB"}}}).encode()
            proc_env = dict(os.environ, **env)
            results = {}
            for name, app, folder in (("hook", "web:app", ROOT), ("baseline", "bench_webhook:baseline_app()", HERE)):
                server, url = _start_gunicorn(app, folder, proc_env, os.path.join(tmp, name + ".log"))
                try:
                    _closed_loop(url + "/yookassa/webhook", warm, WARMUP)
                    results[name] = _open_loop(url + "/yookassa/webhook", bodies, rate)
                    results[name]["saturated"] = _closed_loop(url + "/yookassa/webhook", bodies[0], saturation)
                finally:
                    _stop(server)
            credited = models.Payment.select().where(models.Payment.status == "succeeded").count()
            topups = models.LedgerEntry.select().where(models.LedgerEntry.kind == "topup").count()
            audit = billing.audit(free_operations=0)
        finally:
            database.close()
            config._current = previous_cfg
    hook, baseline = results["hook"], results["baseline"]

    def ratio(a, b):
        return round(a / b, 2) if b else None

    figures = {
        "payments": n_payments,
        "deliveries": len(bodies),
        "rate_offered_per_s": rate,
        "status_200": hook["ok"],
        "notifications_per_s": round(hook["per_s"], 1),
        "p50_ms": round(hook["p50_ms"], 2),
        "p99_ms": round(hook["p99_ms"], 2),
        "max_ms": round(hook["max_ms"], 2),
        "saturated_per_s": round(hook["saturated"], 1),
        "baseline_status_200": baseline["ok"],
        "baseline_notifications_per_s": round(baseline["per_s"], 1),
        "baseline_p50_ms": round(baseline["p50_ms"], 2),
        "baseline_p99_ms": round(baseline["p99_ms"], 2),
        "baseline_saturated_per_s": round(baseline["saturated"], 1),
        "p50_ratio": ratio(hook["p50_ms"], baseline["p50_ms"]),
        "p99_ratio": ratio(hook["p99_ms"], baseline["p99_ms"]),
        "saturated_ratio": ratio(hook["saturated"], baseline["saturated"]),
        "p99_target_met": hook["p99_ms"] < 100.0 and hook["ok"] == len(bodies),
        "credited_payments": credited,
        "topup_ledger_rows": topups,
        "audit_ok": audit.ok,
        "wall_s": round(time.monotonic() - started, 1),
    }
    return {prefix + key: value for key, value in figures.items()}


def _notifications(fake, cfg, n_payments: int, duplicates: int, billing, payments) -> list:
    """`n_payments` real orders made succeeded at the fake; each one's notification body
    `duplicates` times, shuffled."""
    bodies = []
    for i in range(n_payments):
        user, _ = billing.get_or_create_user(900000 + i, first_name="bench", free_operations=0)
        order = payments.create_topup(user.id, 100 + i % 1000, cfg=cfg)
        fake.control("POST", "/payments/%s/succeed" % order.yookassa_payment_id)
        obj = fake.control("GET", "/payments/%s" % order.yookassa_payment_id)
        body = json.dumps({"type": "notification", "event": "payment.succeeded", "object": obj}).encode()
        bodies.extend([body] * duplicates)
    random.Random(4).shuffle(bodies)
    return bodies


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv[1:])))
