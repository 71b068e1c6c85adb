"""Benchmark: the scale-out path (issue 13 §5), keys ``pg_*`` — run only with BENCH_POSTGRES_URL.

PostgreSQL reserve+commit cycles/s with 4 and 16 processes through `billing` (spawned; each binds
`models.init_db` to BENCH_POSTGRES_URL), against raw psycopg2 running the same statements in the
same transactions (reserve: conditional UPDATE of the balance RETURNING + ledger INSERT +
reservation INSERT; commit: conditional UPDATE of the reservation + UPDATE of the balance +
ledger INSERT) on the same migrated schema, interleaved. ``pg_ratio_<n>proc`` = billing / raw.
``pg_webhook_*``: YooKassa notifications offered at 1,000/s for 60 s (10 copies of each
payment) through the real web app under gunicorn on PostgreSQL, with the trivial app's figures
at the same rate as the baseline (bench_webhook.measure).

The database named in BENCH_POSTGRES_URL is the bench's own (``createdb bench``): its schema
``public`` is dropped and recreated at the start. Without the variable the part says it skipped.
With BENCH_REDIS_URL (the bench's own Redis database, e.g. ``redis://127.0.0.1:6379/7``: it is
flushed), keys ``redis_*``: jobs/s through a Redis queue with 1 and 2 consumer processes of 8
threads each, the fake Fal answering after 0.5 s, every job delivered and committed once, audit
clean; ``redis_2_to_1_ratio`` is the scale-out (2 consumers should do ≥ 1.7 × one).

``python -m bench.bench_scaleout [--quick]`` prints the figures as JSON.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

USERS = 64
CREDITS = 10**15
PRICE = 10


def _bind(url):
    """The same binding as the SQLite billing bench (any database URL)."""
    from bench.bench_billing import _bind as bind

    return bind(url)


def _drop_schema(url) -> None:
    """Drop and recreate schema public of the bench database, migrated."""
    import models

    database = models.open_database(url)
    database.connect()
    database.execute_sql("DROP SCHEMA IF EXISTS public CASCADE")
    database.execute_sql("CREATE SCHEMA public")
    models.migrate(database)
    database.close()


def _reset(url) -> list[int]:
    """`_drop_schema`, then create USERS users with plenty of credits."""
    import billing
    import models

    _drop_schema(url)
    _bind(url)
    ids = []
    for n in range(USERS):
        user, _ = billing.get_or_create_user(10**9 + n, free_operations=0)
        billing.credit(user.id, CREDITS, kind="grant", reference="bench", idempotency_key="bench:%d" % n)
        ids.append(user.id)
    models.db.close()
    return ids


def _billing_worker(url, user_ids, seconds, barrier, queue, seed):
    import billing
    import models

    _bind(url)
    rng = random.Random(seed)
    cycles, errors, latencies = 0, [], []
    models.db.connect(reuse_if_open=True)
    barrier.wait(60)
    deadline = time.perf_counter() + seconds
    tag = "%d-%d" % (os.getpid(), seed)
    while time.perf_counter() < deadline:
        key = "pg:%s:%d" % (tag, cycles)
        try:
            t0 = time.perf_counter()
            r = billing.reserve(rng.choice(user_ids), PRICE, reference=key, idempotency_key=key, ttl=900)
            billing.commit(r.id)
            latencies.append((time.perf_counter() - t0) * 1000)
        except Exception as exc:  # noqa: BLE001 - counted, the bench goes on
            errors.append(repr(exc)[:200])
            continue
        cycles += 1
    models.db.close()
    queue.put({"cycles": cycles, "errors": errors[:5], "ms": latencies})


LEDGER = ("INSERT INTO ledger (user_id, asset, kind, amount, delta_available, delta_reserved, available_after, "
          "reserved_after, reference, idempotency_key, shortfall, created_at) "
          "VALUES (%s, 'credits', %s, %s, %s, %s, %s, %s, %s, %s, 0, now())")


def _raw_worker(url, user_ids, seconds, barrier, queue, seed):
    import psycopg2

    conn = psycopg2.connect(url)
    rng = random.Random(seed)
    cycles, errors, latencies = 0, [], []
    barrier.wait(60)
    deadline = time.perf_counter() + seconds
    tag = "%d-%d" % (os.getpid(), seed)
    while time.perf_counter() < deadline:
        key = "raw:%s:%d" % (tag, cycles)
        user_id = rng.choice(user_ids)
        try:
            t0 = time.perf_counter()
            with conn, conn.cursor() as cur:
                cur.execute("UPDATE balance SET available = available - %s, reserved = reserved + %s "
                            "WHERE user_id = %s AND asset = 'credits' AND available >= %s RETURNING available, reserved",
                            (PRICE, PRICE, user_id, PRICE))
                avail, res = cur.fetchone()
                cur.execute(LEDGER, (user_id, "reserve", PRICE, -PRICE, PRICE, avail, res, key, "reserve:" + key))
                cur.execute("INSERT INTO reservation (user_id, asset, amount, price, state, reference, idempotency_key, "
                            "created_at, expires_at) VALUES (%s, 'credits', %s, %s, 'reserved', %s, %s, now(), now()) "
                            "RETURNING id", (user_id, PRICE, PRICE, key, key))
                rid = cur.fetchone()[0]
            with conn, conn.cursor() as cur:
                cur.execute("UPDATE reservation SET state = 'committed', resolved_at = now() "
                            "WHERE id = %s AND state = 'reserved'", (rid,))
                cur.execute("UPDATE balance SET reserved = reserved - %s WHERE user_id = %s AND asset = 'credits' "
                            "AND reserved >= %s RETURNING available, reserved", (PRICE, user_id, PRICE))
                avail, res = cur.fetchone()
                cur.execute(LEDGER, (user_id, "commit", PRICE, 0, -PRICE, avail, res, key, "commit:" + key))
            latencies.append((time.perf_counter() - t0) * 1000)
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc)[:200])
            continue
        cycles += 1
    conn.close()
    queue.put({"cycles": cycles, "errors": errors[:5], "ms": latencies})


def _measure(worker, url, user_ids, processes, seconds) -> dict:
    from bench.bench_billing import spawn

    results, elapsed = spawn(worker, url, user_ids, processes, seconds)
    ms = sorted(x for r in results for x in r["ms"])
    return {"cycles": sum(r["cycles"] for r in results), "elapsed": elapsed,
            "errors": [e for r in results for e in r["errors"]],
            "p99": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2) if ms else None}


def _audit(url) -> bool:
    import billing
    import models

    _bind(url)
    ok = billing.audit().ok
    models.db.close()
    return ok


def run(quick: bool = False) -> dict:
    """PostgreSQL figures when BENCH_POSTGRES_URL is set, else a note that the part was skipped."""
    out: dict = {}
    url = os.environ.get("BENCH_POSTGRES_URL")
    if not url:
        out["pg_skipped"] = "BENCH_POSTGRES_URL is not set"
    else:
        seconds, rounds = (1.0, 1) if quick else (1.5, 2)
        user_ids = _reset(url)
        totals: dict = {}
        for r in range(rounds):
            for processes in (4, 16):
                order = (("billing", _billing_worker), ("raw", _raw_worker))
                for name, worker in (order if r % 2 == 0 else order[::-1]):
                    result = _measure(worker, url, user_ids, processes, seconds)
                    total = totals.setdefault((name, processes), {"cycles": 0, "elapsed": 0.0, "errors": [], "p99": []})
                    total["cycles"] += result["cycles"]
                    total["elapsed"] += result["elapsed"]
                    total["errors"] += result["errors"]
                    total["p99"].append(result["p99"])
        for (name, processes), total in totals.items():
            prefix = "pg_" if name == "billing" else "pg_raw_"
            out["%scycles_per_s_%dproc" % (prefix, processes)] = round(total["cycles"] / total["elapsed"], 1)
            out["%scycle_p99_ms_%dproc" % (prefix, processes)] = max(p for p in total["p99"] if p is not None)
            out["%serrors_%dproc" % (prefix, processes)] = len(total["errors"])
            if total["errors"]:
                out["%serror_sample_%dproc" % (prefix, processes)] = total["errors"][0]
        for processes in (4, 16):
            raw = out["pg_raw_cycles_per_s_%dproc" % processes]
            out["pg_ratio_%dproc" % processes] = round(out["pg_cycles_per_s_%dproc" % processes] / raw, 3) if raw else None
        out["pg_audit_ok"] = _audit(url)
        out.update(_webhook_soak(url, quick))
    redis_url = os.environ.get("BENCH_REDIS_URL")
    if not redis_url:
        out["redis_skipped"] = "BENCH_REDIS_URL is not set"
    else:
        out.update(_redis(redis_url, quick))
    return out


# --------------------------------------------------------------------------------------------
# Webhook soak on PostgreSQL: SOAK_RATE notifications/s for SOAK_SECONDS
# --------------------------------------------------------------------------------------------

SOAK_RATE = 1000.0
SOAK_SECONDS = 60
SOAK_DUPLICATES = 10


def _webhook_soak(url: str, quick: bool) -> dict:
    """bench_webhook's measurement (real gunicorn, fake YooKassa answering the re-fetches, the
    trivial app as the baseline) on PostgreSQL, offered SOAK_RATE/s for SOAK_SECONDS (quick: 200/s
    for 5 s): keys ``pg_webhook_*``. Every payment credited once and the audit clean."""
    import tempfile

    from bench.bench_webhook import measure

    rate, seconds = (200.0, 5) if quick else (SOAK_RATE, SOAK_SECONDS)
    with tempfile.TemporaryDirectory(prefix="bench-pg-webhook-") as tmp:
        return measure(url, tmp, n_payments=int(rate * seconds) // SOAK_DUPLICATES, duplicates=SOAK_DUPLICATES,
                       rate=rate, saturation=200 if quick else 2000, prefix="pg_webhook_", reset=_drop_schema)


# --------------------------------------------------------------------------------------------
# Redis queue: 1 and 2 consumers of 8 threads, Fal answering after FAL_LATENCY seconds
# --------------------------------------------------------------------------------------------

FAL_LATENCY = 0.5
CONSUMER_THREADS = 8
FAKE_FAL_SLOW = """
import sys
sys.path.insert(0, %r)
from tests.fakes import fal as fake_module
fake = fake_module.FakeFal(key="bench-fal-id:bench-fal-key").start()
fake.latency = %r                  # every request runs this long (half queued, half in progress)
print(fake.url, flush=True)
sys.stdin.read()
fake.stop()
"""


def _redis(redis_url: str, quick: bool) -> dict:
    """jobs/s through a Redis queue with 1 and 2 consumer processes (SQLite database, fake
    Telegram, fake Fal with a FAL_LATENCY latency); every job delivered once, audit clean."""
    import shutil
    import signal
    import subprocess
    import tempfile

    import redis

    from bench import bench_pipeline as bp

    jobs = 48 if quick else 96
    out: dict = {"redis_jobs": jobs, "redis_fal_latency_s": FAL_LATENCY, "redis_consumer_threads": CONSUMER_THREADS}
    tmp = tempfile.mkdtemp(prefix="bench-redis-")
    db_path = os.path.join(tmp, "medialab.db")
    import models

    database = models.open_database("sqlite:///" + db_path)
    models.migrate(database)
    database.close()
    redis.Redis.from_url(redis_url).flushdb()         # the bench's own Redis database
    telegram = bp._Child(bp.FAKE_TELEGRAM % (ROOT, bp.TOKEN, 1.0))
    fal = bp._Child(FAKE_FAL_SLOW % (ROOT, FAL_LATENCY))
    ok = False
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("YOOKASSA_", "FAL_", "TELEGRAM_"))}
        env.update(TELEGRAM_BOT_TOKEN=bp.TOKEN, TELEGRAM_API_URL=telegram.url, DATABASE_URL="sqlite:///" + db_path,
                   QUEUE_URL=redis_url, FAL_KEY="bench-fal-id:bench-fal-key", FAL_QUEUE_URL=fal.url,
                   FAL_POLL_INTERVAL="0.05", LOG_LEVEL="WARNING", PYTHONPATH=ROOT)
        rates = {}
        for consumers in (1, 2):
            log = open(os.path.join(tmp, "consumers-%d.log" % consumers), "ab")
            procs = [subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "huey_consumer"), "worker.huey",
                                       "-w", str(CONSUMER_THREADS), "-k", "thread", "-d", "0.01", "-m", "1", "-f",
                                       "-g", "INT", "-t", "60"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                     for _ in range(consumers)]
            try:
                done = subprocess.run([sys.executable, "-m", "bench.bench_scaleout", "--redis-driver", str(jobs),
                                       str(consumers)], cwd=ROOT, env=env, capture_output=True, text=True,
                                      timeout=240)
                result = json.loads(done.stdout.strip().splitlines()[-1])
            finally:
                for proc in procs:
                    proc.send_signal(signal.SIGINT)
                for proc in procs:
                    try:
                        proc.wait(60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(5)
            rates[consumers] = result["jobs_per_s"]
            for key, value in result.items():
                out["redis_%s_%dconsumer" % (key, consumers)] = value
        out["redis_2_to_1_ratio"] = round(rates[2] / rates[1], 2) if rates[1] else None
        ok = True
    finally:
        telegram.close()
        fal.close()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            out["redis_notes"] = "logs kept in %s" % tmp
    return out


def _redis_driver(jobs: int, tag: int) -> None:
    """Accept `jobs` generations (two per user) like the bot does, wait for them, print JSON."""
    import billing
    import config
    import worker
    from models import Generation, Reservation

    cfg = config.get()
    import models

    models.init_db(cfg.database_url)
    users = [billing.get_or_create_user(800_000_000 + tag * 10_000 + n, first_name="Redis", free_operations=0)[0]
             for n in range(jobs // 2)]
    for user in users:
        billing.credit(user.id, 1000, kind="grant", reference="bench", idempotency_key="grant:redis:%s" % user.id)
    ids = [str(worker.accept_generation(user, user.telegram_id, "generate", prompt="redis %d" % n).id)
           for user in users for n in range(2)]
    deadline = time.monotonic() + 180
    pending = set(ids)
    while pending and time.monotonic() < deadline:
        pending -= {str(g.id) for g in Generation.select(Generation.id).where(
            Generation.id.in_(list(pending)) & Generation.status.in_(["delivered", "failed"]))}
        time.sleep(0.02)
    rows = list(Generation.select().where(Generation.id.in_(ids)))
    delivered = [g for g in rows if g.status == "delivered"]
    span = ((max(g.finished_at for g in delivered) - min(g.created_at for g in rows)).total_seconds()
            if delivered else 0)
    committed = Reservation.select().where(Reservation.id.in_([g.reservation_id for g in rows])
                                           & (Reservation.state == "committed")).count()
    print(json.dumps({"jobs_per_s": round(len(delivered) / span, 1) if span else 0.0,
                      "delivered": len(delivered), "committed_once": committed == len(delivered) == jobs,
                      "audit_ok": billing.audit().ok}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--redis-driver":
        _redis_driver(int(sys.argv[2]), int(sys.argv[3]))
    else:
        print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
