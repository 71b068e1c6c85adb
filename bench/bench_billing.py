"""Billing throughput and latency against the physical baseline (docs/REFERENCES.md §1, §2).

A *cycle* is one charge: a reserve transaction then a commit transaction. Measured for 1 and 4
processes (spawned; each binds `models.init_db` to the same SQLite file, WAL, synchronous=FULL,
BEGIN IMMEDIATE) through the real `billing` functions, then the same statements through raw
`sqlite3` — reserve: conditional UPDATE of the balance + ledger INSERT + reservation INSERT;
commit: conditional UPDATE of the reservation + conditional UPDATE of the balance + ledger
INSERT — on an identical migrated schema (same indexes and triggers). The raw figure is what
this disk and this SQLite allow; `billing_to_raw_ratio_4proc` is the share of it we keep.

    python bench/bench_billing.py            # 3 s per measurement, prints one JSON object
    BENCH_DIR=/var/lib/medialab python bench/bench_billing.py   # measure on the production disk

Targets (issue #3), reported here and not asserted: ≥ 500 cycles/s with 4 processes,
p99 < 50 ms for reserve and commit, ratio to raw ≥ 0.25, zero busy errors.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

USERS = 64
ROUNDS = 3
CREDITS = 10**15
PRICE = 10


def _bind(url):
    import config
    import models

    config.configure(config.load({"DATABASE_URL": url, "QUEUE_URL": "memory://",
                                  "TELEGRAM_BOT_TOKEN": "123456:BENCH"}, require_token=False))
    return models.init_db(url)


def _prepare(path) -> list[int]:
    """Create a migrated database at `path` with USERS users holding CREDITS each; return ids."""
    import billing
    import models

    url = "sqlite:///" + path
    database = models.open_database(url)
    models.migrate(database)
    database.close()
    _bind(url)
    ids = []
    for n in range(USERS):
        user, _ = billing.get_or_create_user(10**9 + n, free_operations=0)
        billing.credit(user.id, CREDITS, kind="grant", reference="bench", idempotency_key="bench:%d" % n)
        ids.append(user.id)
    models.db.close()
    return ids


def _is_busy(exc) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _billing_worker(path, user_ids, seconds, barrier, queue, seed):
    import billing
    import models

    _bind("sqlite:///" + path)
    rng = random.Random(seed)
    reserve_ms, commit_ms, busy, errors, cycles = [], [], 0, [], 0
    models.db.connect(reuse_if_open=True)
    barrier.wait(60)
    deadline = time.perf_counter() + seconds
    tag = "%d-%d" % (os.getpid(), seed)
    while time.perf_counter() < deadline:
        key = "bench:%s:%d" % (tag, cycles)
        try:
            t0 = time.perf_counter()
            r = billing.reserve(rng.choice(user_ids), PRICE, reference=key, idempotency_key=key, ttl=900)
            t1 = time.perf_counter()
            billing.commit(r.id)
            t2 = time.perf_counter()
        except Exception as exc:
            if _is_busy(exc):
                busy += 1
            else:
                errors.append(repr(exc))
            continue
        reserve_ms.append((t1 - t0) * 1000)
        commit_ms.append((t2 - t1) * 1000)
        cycles += 1
    models.db.close()
    queue.put({"cycles": cycles, "reserve_ms": reserve_ms, "commit_ms": commit_ms, "busy": busy, "errors": errors[:5]})


def _raw_worker(path, user_ids, seconds, barrier, queue, seed):
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    for pragma in ("journal_mode = wal", "synchronous = full", "foreign_keys = 1", "busy_timeout = 30000",
                   "cache_size = -16000"):
        conn.execute("PRAGMA " + pragma)
    rng = random.Random(seed)
    reserve_ms, commit_ms, busy, errors, cycles = [], [], 0, [], 0
    barrier.wait(60)
    deadline = time.perf_counter() + seconds
    tag = "%d-%d" % (os.getpid(), seed)
    ledger_sql = ("INSERT INTO ledger (user_id, asset, kind, amount, delta_available, delta_reserved, "
                  "available_after, reserved_after, reference, idempotency_key, shortfall, created_at) "
                  "VALUES (?, 'credits', ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)")
    while time.perf_counter() < deadline:
        key = "raw:%s:%d" % (tag, cycles)
        user_id = rng.choice(user_ids)
        try:
            t0 = time.perf_counter()
            now = time.strftime("%Y-%m-%d %H:%M:%S")
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("UPDATE balance SET available = available - ?, reserved = reserved + ? "
                               "WHERE user_id = ? AND asset = 'credits' AND available >= ? "
                               "RETURNING available, reserved", (PRICE, PRICE, user_id, PRICE)).fetchone()
            conn.execute(ledger_sql, (user_id, "reserve", PRICE, -PRICE, PRICE, row[0], row[1], key,
                                      "reserve:" + key, now))
            rid = conn.execute("INSERT INTO reservation (user_id, asset, amount, price, state, reference, "
                               "idempotency_key, created_at, expires_at) "
                               "VALUES (?, 'credits', ?, ?, 'reserved', ?, ?, ?, ?)",
                               (user_id, PRICE, PRICE, key, key, now, now)).lastrowid
            conn.execute("COMMIT")
            t1 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            changed = conn.execute("UPDATE reservation SET state = 'committed', resolved_at = ? "
                                   "WHERE id = ? AND state = 'reserved'", (now, rid)).rowcount
            assert changed == 1
            row = conn.execute("UPDATE balance SET reserved = reserved - ? WHERE user_id = ? AND asset = 'credits' "
                               "AND reserved >= ? RETURNING available, reserved", (PRICE, user_id, PRICE)).fetchone()
            conn.execute(ledger_sql, (user_id, "commit", PRICE, 0, -PRICE, row[0], row[1], key, "commit:" + key, now))
            conn.execute("COMMIT")
            t2 = time.perf_counter()
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if _is_busy(exc):
                busy += 1
            else:
                errors.append(repr(exc))
            continue
        reserve_ms.append((t1 - t0) * 1000)
        commit_ms.append((t2 - t1) * 1000)
        cycles += 1
    conn.close()
    queue.put({"cycles": cycles, "reserve_ms": reserve_ms, "commit_ms": commit_ms, "busy": busy, "errors": errors[:5]})


def _percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


def spawn(worker, target, user_ids, processes: int, seconds: float) -> tuple[list, float]:
    """Run `worker(target, user_ids, seconds, barrier, queue, n)` in `processes` spawned processes
    started together on a barrier; return (the dict each put on the queue, seconds elapsed)."""
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(processes + 1), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(target, user_ids, seconds, barrier, queue, n)) for n in range(processes)]
    for p in procs:
        p.start()
    barrier.wait(120)
    started = time.perf_counter()
    results = [queue.get(timeout=seconds + 120) for _ in procs]
    elapsed = time.perf_counter() - started
    for p in procs:
        p.join(30)
    return results, elapsed


def _measure(worker, path, user_ids, processes, seconds) -> dict:
    results, elapsed = spawn(worker, path, user_ids, processes, seconds)
    reserve_ms = [x for r in results for x in r["reserve_ms"]]
    commit_ms = [x for r in results for x in r["commit_ms"]]
    cycles = sum(r["cycles"] for r in results)
    return {
        "elapsed": elapsed, "reserve_all": reserve_ms, "commit_all": commit_ms,
        "cycles_per_s": round(cycles / elapsed, 1),
        "cycles": cycles,
        "reserve_p50_ms": _percentile(reserve_ms, 0.50), "reserve_p99_ms": _percentile(reserve_ms, 0.99),
        "commit_p50_ms": _percentile(commit_ms, 0.50), "commit_p99_ms": _percentile(commit_ms, 0.99),
        "reserve_max_ms": _percentile(reserve_ms, 1.0), "commit_max_ms": _percentile(commit_ms, 1.0),
        "busy": sum(r["busy"] for r in results),
        "errors": [e for r in results for e in r["errors"]],
    }


def _audit(path) -> tuple[bool, int]:
    import billing
    import models

    _bind("sqlite:///" + path)
    report = billing.audit()
    rows = models.LedgerEntry.select().count()
    models.db.close()
    return report.ok, rows


def _pooled(parts: list) -> dict:
    """One figure set from several interleaved slices of the same configuration."""
    elapsed = sum(p["elapsed"] for p in parts)
    reserve_ms = [x for p in parts for x in p["reserve_all"]]
    commit_ms = [x for p in parts for x in p["commit_all"]]
    cycles = sum(p["cycles"] for p in parts)
    return {
        "cycles_per_s": round(cycles / elapsed, 1) if elapsed else 0.0, "cycles": cycles,
        "reserve_p50_ms": _percentile(reserve_ms, 0.50), "reserve_p99_ms": _percentile(reserve_ms, 0.99),
        "commit_p50_ms": _percentile(commit_ms, 0.50), "commit_p99_ms": _percentile(commit_ms, 0.99),
        "reserve_max_ms": _percentile(reserve_ms, 1.0), "commit_max_ms": _percentile(commit_ms, 1.0),
        "busy": sum(p["busy"] for p in parts), "errors": [e for p in parts for e in p["errors"]],
        "per_round": [round(p["cycles"] / p["elapsed"], 1) if p["elapsed"] else 0.0 for p in parts],
    }


def run(quick: bool = False) -> dict:
    """Measure and return flat figures: billing and raw cycles/s for 1 and 4 processes, p50/p99
    latency (ms) of reserve and commit transactions, busy errors, the ratio to raw, and whether
    the audit passed afterwards.

    The four configurations run interleaved in ROUNDS rounds (order rotated each round) of
    seconds/ROUNDS each, then are pooled: the disk's fsync latency on a shared box drifts by
    several times within a minute, and back-to-back blocks of one configuration each measured
    the drift as much as the code. 3 s per configuration (quick: 1 s)."""
    seconds = 1.0 if quick else 3.0
    rounds = 1 if quick else ROUNDS
    folder = tempfile.mkdtemp(prefix="bench-billing-", dir=os.environ.get("BENCH_DIR") or None)
    try:
        billing_db, raw_db = os.path.join(folder, "billing.db"), os.path.join(folder, "raw.db")
        billing_users, raw_users = _prepare(billing_db), _prepare(raw_db)
        out = {"seconds_per_measurement": seconds, "rounds": rounds, "sqlite_version": sqlite3.sqlite_version,
               "cpus": os.cpu_count()}
        configs = [("billing", _billing_worker, billing_db, billing_users, 1),
                   ("raw", _raw_worker, raw_db, raw_users, 1),
                   ("billing", _billing_worker, billing_db, billing_users, 4),
                   ("raw", _raw_worker, raw_db, raw_users, 4)]
        slices: dict = {}
        for n in range(rounds):
            for name, worker, path, users, processes in configs[n % 4:] + configs[:n % 4]:
                slices.setdefault((name, processes), []).append(
                    _measure(worker, path, users, processes, seconds / rounds))
        runs = {key: _pooled(parts) for key, parts in slices.items()}
        for (name, processes), result in runs.items():
            out["%s_cycles_per_s_%dproc" % (name, processes)] = result["cycles_per_s"]
            out["%s_cycles_per_s_%dproc_rounds" % (name, processes)] = result["per_round"]
        b1, b4 = runs["billing", 1]["cycles_per_s"], runs["billing", 4]["cycles_per_s"]
        out["billing_4proc_to_1proc_ratio"] = round(b4 / b1, 3) if b1 else None
        for name in ("billing", "raw"):
            for processes, suffix in ((4, ""), (1, "_1proc")):
                result = runs[name, processes]
                for metric in ("reserve_p50_ms", "reserve_p99_ms", "commit_p50_ms", "commit_p99_ms",
                               "reserve_max_ms", "commit_max_ms"):
                    out["%s_%s%s" % (name, metric, suffix)] = result[metric]
        out["billing_busy_errors"] = runs["billing", 1]["busy"] + runs["billing", 4]["busy"]
        out["raw_busy_errors"] = runs["raw", 1]["busy"] + runs["raw", 4]["busy"]
        out["billing_other_errors"] = runs["billing", 1]["errors"] + runs["billing", 4]["errors"]
        out["raw_other_errors"] = runs["raw", 1]["errors"] + runs["raw", 4]["errors"]
        raw4, raw1 = runs["raw", 4]["cycles_per_s"], runs["raw", 1]["cycles_per_s"]
        out["billing_to_raw_ratio_4proc"] = round(out["billing_cycles_per_s_4proc"] / raw4, 3) if raw4 else None
        out["billing_to_raw_ratio_1proc"] = round(out["billing_cycles_per_s_1proc"] / raw1, 3) if raw1 else None
        ok, rows = _audit(billing_db)
        cycles = runs["billing", 1]["cycles"] + runs["billing", 4]["cycles"]
        out["billing_audit_ok"] = ok and rows == USERS + 2 * cycles
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:])))
