"""Benchmark: costs flat as data grows (issue 13 §3), keys ``growth_*``.

A generator builds a consistent database of USERS users and LEDGER_ROWS ledger rows (default
100,000 and 1,000,000) with raw SQL, `executemany` inside one transaction, on a migrated schema
(triggers and constraints in place): per user a welcome grant of free operations, a top-up of
1,000 credits backed by a succeeded, notified Payment, then reserve → commit cycles of 10 credits
each with their committed Reservation — exactly the rows `billing` writes, so the balance-after
chains are continuous and `billing.audit()` is clean.

Each figure is measured on that database and, in the same run, on an empty one (baseline):

* ``cycles_per_s``: reserve+commit cycles through `billing`, one process, interleaved rounds, by
  ACTIVE (1,000) users on both databases (the empty one holds just them);
* ``balance_read_ms``: `billing.get_balance` (mean of many);
* ``sweep_ms``: one `worker.sweep_once` pass (nothing stale: the cost of finding nothing);
* ``reconcile_scan_ms``: the database part of a reconciliation pass
  (`payments.due_for_reconciliation`, `unnotified_payments`, `unnotified_refunds`);
* ``audit_full_s``: ``manage.py audit`` as a subprocess (what `make audit` runs);
* ``audit_since_s``: ``manage.py audit --since-id N`` after a few hundred new rows;
* ``prune_*``, ``state_rows_left``: USERS idle chats' conversation states and once-only keys past
  STATE_RETENTION_DAYS, plus 1,000 fresh ones: the sweep pass that deletes the old ones, the rows
  left (the 2,000 fresh), and the next pass.

``python -m bench.bench_growth [--quick]`` prints the figures;
``python -m bench.bench_growth --generate PATH [--users N] [--rows M]`` only builds a database.
"""
from __future__ import annotations

import datetime
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

USERS = 100_000
LEDGER_ROWS = 1_000_000
TOPUP = 1000
PRICE = 10
FREE_OPS = 4
FIRST_TELEGRAM_ID = 500_000_000
ACTIVE = 1000            # users charging during the cycles measurement, on both databases


def _ts(t: datetime.datetime) -> str:
    return str(t)                    # how peewee stores a DateTimeField on SQLite


def generate(path: str, users: int = USERS, rows: int = LEDGER_ROWS) -> dict:
    """Build a migrated, audit-clean database at `path`; return what it holds."""
    import models

    database = models.open_database("sqlite:///" + path)
    models.migrate(database)
    database.close()
    cycles = max(0, (rows // users - 2) // 2)       # 2 rows per user + 2 per cycle
    began = time.monotonic()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -262144")
    conn.execute("PRAGMA foreign_keys = 1")
    start = models.utcnow() - datetime.timedelta(days=30)
    rng = random.Random(13)
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        'INSERT INTO "user" (id, telegram_id, first_name, language_code, created_at, last_seen_at, is_blocked, '
        "has_free_access) VALUES (?, ?, 'Grown', 'ru', ?, ?, 0, 0)",
        ((n, FIRST_TELEGRAM_ID + n, _ts(start), _ts(start)) for n in range(1, users + 1)))
    final_credits = TOPUP - cycles * PRICE
    conn.executemany("INSERT INTO balance (user_id, asset, available, reserved) VALUES (?, ?, ?, 0)",
                     ((n, asset, final_credits if asset == "credits" else FREE_OPS)
                      for n in range(1, users + 1) for asset in ("credits", "free_ops")))
    ledger_sql = ("INSERT INTO ledger (user_id, asset, kind, amount, delta_available, delta_reserved, "
                  "available_after, reserved_after, reference, idempotency_key, shortfall, created_at) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)")
    payment_ids = [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(users)]
    conn.executemany(
        "INSERT INTO payment (id, user_id, credits, amount_kopecks, currency, discount_percent, status, "
        "yookassa_payment_id, test, refunded_kopecks, created_at, updated_at, succeeded_at, notified_at) "
        "VALUES (?, ?, ?, ?, 'RUB', 0, 'succeeded', ?, 0, 0, ?, ?, ?, ?)",
        ((payment_ids[n - 1].hex, n, TOPUP, TOPUP * 100, "yk-%d" % n, _ts(start), _ts(start), _ts(start),
          _ts(start)) for n in range(1, users + 1)))

    def opening():
        for n in range(1, users + 1):
            yield (n, "free_ops", "grant", FREE_OPS, FREE_OPS, 0, FREE_OPS, 0, "welcome",
                   "free_ops:tg:%d" % (FIRST_TELEGRAM_ID + n), _ts(start))
            yield (n, "credits", "topup", TOPUP, TOPUP, 0, TOPUP, 0, "payment:%s" % payment_ids[n - 1],
                   "topup:%s" % payment_ids[n - 1], _ts(start))

    conn.executemany(ledger_sql, opening())
    reservation_sql = ("INSERT INTO reservation (user_id, asset, amount, price, state, reference, idempotency_key, "
                       "created_at, expires_at, resolved_at) VALUES (?, 'credits', ?, ?, 'committed', ?, ?, ?, ?, ?)")
    for c in range(cycles):
        when = _ts(start + datetime.timedelta(hours=c + 1))
        after = TOPUP - c * PRICE

        def cycle_rows(c=c, when=when, after=after):
            for n in range(1, users + 1):
                key = "generation:g%d-%d" % (n, c)
                yield (n, "credits", "reserve", PRICE, -PRICE, PRICE, after - PRICE, PRICE, key, "reserve:" + key, when)
                yield (n, "credits", "commit", PRICE, 0, -PRICE, after - PRICE, 0, key, "commit:" + key, when)

        conn.executemany(ledger_sql, cycle_rows())
        conn.executemany(reservation_sql, ((n, PRICE, PRICE, "generation:g%d-%d" % (n, c),
                                            "generation:g%d-%d" % (n, c), when, when, when)
                                           for n in range(1, users + 1)))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    count = conn.execute("SELECT count(*) FROM ledger").fetchone()[0]
    conn.close()
    return {"users": users, "ledger_rows": count, "reservations": users * cycles,
            "seconds": round(time.monotonic() - began, 1)}


def _bind(path: str):
    import config
    import models

    if models.db.obj is not None:
        models.db.close()
    config.configure(config.load({"DATABASE_URL": "sqlite:///" + path, "QUEUE_URL": "memory://",
                                  "TELEGRAM_BOT_TOKEN": "123456:BENCH"}, require_token=False))
    models.init_db("sqlite:///" + path)
    models.db.connect(reuse_if_open=True)


def _cycles(path: str, user_ids: list, seconds: float, tag: str) -> int:
    import billing

    _bind(path)
    rng = random.Random(tag)
    n, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        key = "growth:%s:%d" % (tag, n)
        reservation = billing.reserve(rng.choice(user_ids), PRICE, reference=key, idempotency_key=key, ttl=900)
        billing.commit(reservation.id)
        n += 1
    return n


def _timed(func, repeat: int) -> float:
    """Mean milliseconds of `func()` over `repeat` calls."""
    began = time.perf_counter()
    for _ in range(repeat):
        func()
    return (time.perf_counter() - began) * 1000 / repeat


def _reads(path: str, user_ids: list) -> dict:
    import billing
    import config
    import payments
    import worker

    _bind(path)
    cfg = config.get()
    rng = random.Random(3)
    now = datetime.datetime.utcnow()

    def scan():
        payments.due_for_reconciliation(cfg, now)
        payments.unnotified_payments(older_than=60, now=now)
        payments.unnotified_refunds(older_than=60, now=now)

    return {"balance_read_ms": round(_timed(lambda: billing.get_balance(rng.choice(user_ids)), 2000), 3),
            "sweep_ms": round(_timed(lambda: worker.sweep_once(cfg=cfg), 20), 2),
            "reconcile_scan_ms": round(_timed(scan, 20), 2)}


def _prune(path: str, users: int) -> dict:
    """`users` idle chats' conversation states and as many once-only keys, older than
    STATE_RETENTION_DAYS, plus 1,000 fresh ones: the first sweep pass after them (it prunes the old
    ones), the rows left, and the next pass (nothing to prune)."""
    import config
    import worker

    conn = sqlite3.connect(path)
    old, fresh = (_ts(datetime.datetime.utcnow() - datetime.timedelta(days=days)) for days in (400, 0))
    conn.executemany("INSERT INTO conversation_state (key, state, data, updated_at) VALUES (?, NULL, '{}', ?)",
                     (("medialab:1:%d:%d" % (n, n), old if n > 1000 else fresh) for n in range(1, users + 1001)))
    conn.executemany("INSERT INTO admin_action (key, created_at) VALUES (?, ?)",
                     (("tap:again:%d" % n, old if n > 1000 else fresh) for n in range(1, users + 1001)))
    conn.commit()
    conn.close()
    _bind(path)
    cfg = config.get()
    began = time.perf_counter()
    pruned = worker.sweep_once(cfg=cfg)["pruned"]
    first = (time.perf_counter() - began) * 1000
    conn = sqlite3.connect(path)
    left = conn.execute("SELECT (SELECT count(*) FROM conversation_state) + (SELECT count(*) FROM admin_action)")
    left = left.fetchone()[0]
    conn.close()
    return {"prune_rows": pruned, "prune_first_sweep_ms": round(first, 1), "state_rows_left": left,
            "prune_next_sweep_ms": round(_timed(lambda: worker.sweep_once(cfg=cfg), 5), 2)}


def _audit_cli(path: str, *args) -> tuple[float, bool, str]:
    env = dict(os.environ, DATABASE_URL="sqlite:///" + path, QUEUE_URL="memory://", PYTHONPATH=ROOT,
               TELEGRAM_BOT_TOKEN="123456:BENCH")
    began = time.monotonic()
    done = subprocess.run([sys.executable, "manage.py", "audit", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    return round(time.monotonic() - began, 2), done.returncode == 0, (done.stdout + done.stderr).strip()[-300:]


def run(quick: bool = False) -> dict:
    """Generate the grown database, then measure it against an empty one; return ``growth_*``."""
    users, rows = (10_000, 100_000) if quick else (USERS, LEDGER_ROWS)
    seconds, rounds = (0.5, 2) if quick else (1.0, 3)
    folder = tempfile.mkdtemp(prefix="bench-growth-", dir=os.environ.get("BENCH_DIR") or None)
    out: dict = {}
    try:
        grown, empty = os.path.join(folder, "grown.db"), os.path.join(folder, "empty.db")
        info = generate(grown, users, rows)
        generate(empty, ACTIVE, 0)
        out.update({"growth_users": info["users"], "growth_ledger_rows": info["ledger_rows"],
                    "growth_generate_s": info["seconds"]})
        # The same workload on both: ACTIVE users charging; only the history differs.
        active = sorted(random.Random(5).sample(range(1, users + 1), min(ACTIVE, users)))
        grown_ids, empty_ids = list(range(1, users + 1)), list(range(1, ACTIVE + 1))
        cycles = {"grown": 0, "empty": 0}
        for r in range(rounds):                      # interleaved: the disk drifts
            for name in (("grown", "empty") if r % 2 else ("empty", "grown")):
                cycles[name] += _cycles(grown if name == "grown" else empty, active if name == "grown"
                                        else empty_ids, seconds, "%s-%d" % (name, r))
        # Disclosed too: charges spread uniformly over all 100,000 users (every cycle touches cold
        # index pages of a 330 MB file and dirties more distinct pages per WAL checkpoint).
        out["growth_cycles_per_s_spread_all_users"] = round(_cycles(grown, grown_ids, seconds, "spread") / seconds, 1)
        total = seconds * rounds
        out["growth_cycles_per_s"] = round(cycles["grown"] / total, 1)
        out["growth_baseline_cycles_per_s"] = round(cycles["empty"] / total, 1)
        out["growth_cycles_ratio"] = round(cycles["grown"] / cycles["empty"], 3) if cycles["empty"] else None
        for name, path, ids in (("", grown, grown_ids), ("baseline_", empty, empty_ids)):
            for key, value in _reads(path, ids).items():
                out["growth_%s%s" % (name, key)] = value
        for key, value in _prune(grown, users).items():          # issue 13 §3: states do not grow
            out["growth_" + key] = value
        import models

        models.db.close()
        out["growth_audit_full_s"], ok, tail = _audit_cli(grown)
        out["growth_audit_ok"] = ok
        if not ok:
            out["growth_audit_output"] = tail
        out["growth_baseline_audit_full_s"], _, _ = _audit_cli(empty)
        conn = sqlite3.connect(grown)
        last = conn.execute("SELECT max(id) FROM ledger").fetchone()[0]
        conn.close()
        _cycles(grown, grown_ids, 0.3, "after-audit")
        models.db.close()
        out["growth_audit_since_s"], ok_since, tail = _audit_cli(grown, "--since-id", str(last))
        out["growth_audit_since_ok"] = ok_since
        if not ok_since:
            out["growth_audit_since_output"] = tail
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--generate":
        n_users = int(sys.argv[sys.argv.index("--users") + 1]) if "--users" in sys.argv else USERS
        n_rows = int(sys.argv[sys.argv.index("--rows") + 1]) if "--rows" in sys.argv else LEDGER_ROWS
        print(json.dumps(generate(sys.argv[2], n_users, n_rows)))
    else:
        print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
