"""Harness for the billing core's concurrency and crash tests: multi-process storms, the
SIGKILL loop, and the soak run behind `make soak`.

    python -m tests.billing_harness soak --seconds 600 [--db PATH] [--workers 3] [--seed N]
    python -m tests.billing_harness churn URL SEED USER_ID...   (one kill-loop worker; internal)

* `storm(url, ...)` starts processes (multiprocessing, spawn) that each bind `models.init_db(url)`
  and, behind one barrier, reserve for the same users; each reports what it got.
* `user_race(url, telegram_id, processes)` runs first contacts of one Telegram account at once.
* `kill_loop(url, kills=...)` keeps churn workers (reserve / commit / release / credit /
  take_back / sweep / abandon, with replayed idempotency keys) running as separate processes
  and SIGKILLs one at a random point after it is working, `kills` times, auditing the live
  database between kills; `check_after_crash(url)` then proves the file and the ledger intact.

Works on SQLite files and (storms) PostgreSQL. Nothing here mocks the billing core: every
worker runs the real `billing` functions against the real database.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import multiprocessing
import os
import random
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from peewee import fn  # noqa: E402  (after the sys.path set-up above)

import billing  # noqa: E402
import config  # noqa: E402
import models  # noqa: E402

logger = logging.getLogger(__name__)

FAR_FUTURE = datetime.datetime(2200, 1, 1)
START_TIMEOUT = 60.0       # seconds a worker may take to start and reach the barrier


# --- binding a process to a database ---------------------------------------------------------

def make_config(url: str) -> config.Config:
    """Return a self-contained test configuration for the database at `url` (no .env read)."""
    return config.load({"DATABASE_URL": url, "QUEUE_URL": "memory://",
                        "TELEGRAM_BOT_TOKEN": "123456:TEST-TOKEN"}, require_token=False)


def bind(url: str):
    """Install the test configuration for `url` and bind the models to it; return the database."""
    config.configure(make_config(url))
    return models.init_db(url)


def new_sqlite(path: str) -> str:
    """Create and migrate a blank SQLite database at `path`; return its URL."""
    url = "sqlite:///" + os.path.abspath(path)
    database = models.open_database(url)
    models.migrate(database)
    database.close()
    return url


def sqlite_path(url: str) -> str:
    """Return the file path of a sqlite:/// URL."""
    assert url.startswith("sqlite:///"), url
    return url[len("sqlite:///"):]


def seed_users(count: int, *, credits: int = 0, free_operations: int = 0, first_telegram_id: int = 700000):
    """Create `count` users on the bound database, each with `credits` (an admin grant) and
    `free_operations`; return their ids."""
    ids = []
    for n in range(count):
        user, _ = billing.get_or_create_user(first_telegram_id + n, free_operations=free_operations)
        if credits:
            billing.credit(user.id, credits, kind="grant", reference="seed",
                           idempotency_key="seed:%d:%d" % (first_telegram_id, n))
        ids.append(user.id)
    return ids


def integrity_check(path: str) -> str:
    """Return SQLite's `PRAGMA integrity_check` answer for the file at `path` ('ok' when sound)."""
    conn = sqlite3.connect(path, timeout=30)
    try:
        return "\n".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


def min_available_after() -> int | None:
    """Return the lowest `available_after` the ledger ever recorded (never below 0 if sound)."""
    return models.LedgerEntry.select(fn.MIN(models.LedgerEntry.available_after)).scalar()


# --- the reserve storm -----------------------------------------------------------------------

def _storm_worker(url, barrier, user_ids, price, attempts, seed, queue):
    result = {"pid": os.getpid(), "reserved": [], "insufficient": 0, "errors": [],
              "committed": 0, "released": 0}
    try:
        bind(url)
        rng = random.Random(seed)
        barrier.wait(START_TIMEOUT)
        for _attempt in range(attempts):
            order = list(user_ids)
            rng.shuffle(order)
            for user_id in order:
                key = "storm:%s" % uuid.uuid4()
                try:
                    r = billing.reserve(user_id, price, reference=key, idempotency_key=key, ttl=900)
                    result["reserved"].append((user_id, r.id, r.asset, r.amount))
                except billing.InsufficientCredits:
                    result["insufficient"] += 1
                except Exception as exc:  # every other error is a failure the parent reports
                    result["errors"].append("reserve: %r" % (exc,))
        barrier.wait(START_TIMEOUT)   # every process has reserved: nothing released can be taken again
        for n, (_, reservation_id, _, _) in enumerate(result["reserved"]):
            try:
                if n % 2 == 0:
                    billing.commit(reservation_id)
                    result["committed"] += 1
                else:
                    billing.release(reservation_id)
                    result["released"] += 1
            except Exception as exc:
                result["errors"].append("resolve %s: %r" % (reservation_id, exc))
    except Exception:
        result["errors"].append(traceback.format_exc())
        barrier.abort()   # the others fail fast instead of waiting out the timeout
    finally:
        queue.put(result)
        if models.db.obj is not None:
            models.db.close()


def _collect(procs, queue, timeout=120.0):
    results, deadline = [], time.monotonic() + timeout
    while len(results) < len(procs):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            results.append(queue.get(timeout=min(remaining, 1.0)))
        except Exception:  # queue.Empty: check for a dead worker, then wait on
            if all(p.exitcode not in (None, 0) for p in procs if p.exitcode is not None) and \
                    all(p.exitcode is not None for p in procs) and len(results) < len(procs):
                break
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
    if len(results) < len(procs):
        raise RuntimeError("only %d of %d workers reported (exit codes %s)"
                           % (len(results), len(procs), [p.exitcode for p in procs]))
    return results


def storm(url: str, user_ids: list[int], *, price: int, processes: int = 4, attempts: int = 4,
          seed: int = 0) -> list[dict]:
    """Reserve `price` for every user `attempts` times from each of `processes` spawned
    processes released together by one barrier; after a second barrier (all reserving done)
    each commits its even-numbered and releases its odd-numbered reservations, concurrently. Returns one result dict per process:
    reserved [(user_id, reservation_id, asset, amount)], insufficient, committed, released, errors."""
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_storm_worker, args=(url, barrier, user_ids, price, attempts, seed + n, queue))
             for n in range(processes)]
    for p in procs:
        p.start()
    return _collect(procs, queue)


# --- the first-contact race ------------------------------------------------------------------

def _user_race_worker(url, barrier, telegram_id, queue):
    try:
        bind(url)
        barrier.wait(START_TIMEOUT)
        user, created = billing.get_or_create_user(telegram_id, username="racer")
        queue.put({"user_id": user.id, "created": created, "error": None})
    except Exception as exc:
        queue.put({"user_id": None, "created": None, "error": repr(exc)})
    finally:
        if models.db.obj is not None:
            models.db.close()


def user_race(url: str, telegram_id: int, processes: int = 10) -> list[dict]:
    """Call get_or_create_user(telegram_id) from `processes` spawned processes at once;
    return one {user_id, created, error} per process."""
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_user_race_worker, args=(url, barrier, telegram_id, queue))
             for _ in range(processes)]
    for p in procs:
        p.start()
    return _collect(procs, queue)


# --- the SIGKILL loop ------------------------------------------------------------------------

def churn(url: str, seed: int, user_ids: list[int], error_path: str, think: float = 0.002) -> None:
    """Run billing operations forever (until killed); print `ready` after the first one.

    Mix: reserve (ttl 1 s or 900 s, sometimes replaying the key), commit or release (sometimes
    a second, illegal commit), credit (sometimes replayed), take_back, the sweeper, and
    abandoning a reservation (a lost job), with a mean `think` seconds between operations. A result that breaks the contract is appended to
    `error_path`; the parent fails the run if that file is not empty.
    """
    bind(url)
    rng = random.Random(seed)
    tag = "%d-%d" % (seed, os.getpid())
    open_ids: list[int] = []
    count = 0

    def problem(text):
        with open(error_path, "a") as fh:
            fh.write("[churn %s] %s\n" % (tag, text))

    while True:
        op, user_id = rng.random(), rng.choice(user_ids)
        key = "churn:%s:%d" % (tag, count)
        try:
            if op < 0.40:
                ttl = rng.choice((1, 900))
                amount = rng.randint(1, 20)
                r = billing.reserve(user_id, amount, reference=key, idempotency_key=key, ttl=ttl)
                if rng.random() < 0.1:
                    again = billing.reserve(user_id, amount, reference=key, idempotency_key=key, ttl=ttl)
                    if again.id != r.id:
                        problem("replayed reserve %s gave reservation %s, first %s" % (key, again.id, r.id))
                open_ids.append(r.id)
            elif op < 0.75 and open_ids:
                reservation_id = open_ids.pop(rng.randrange(len(open_ids)))
                try:
                    if rng.random() < 0.6:
                        billing.commit(reservation_id)
                    else:
                        billing.release(reservation_id)
                except billing.ReservationExpired:
                    pass  # the sweeper (another worker) got there first: ttl 1 s
                if rng.random() < 0.1:
                    try:
                        billing.commit(reservation_id)
                        problem("second commit of reservation %s succeeded" % reservation_id)
                    except billing.ReservationClosed:
                        pass
            elif op < 0.87:
                amount = rng.randint(1, 200)
                entry = billing.credit(user_id, amount, kind="grant", reference="churn", idempotency_key=key)
                if rng.random() < 0.1:
                    again = billing.credit(user_id, amount, kind="grant", reference="churn", idempotency_key=key)
                    if again.id != entry.id:
                        problem("replayed credit %s wrote ledger row %s, first %s" % (key, again.id, entry.id))
            elif op < 0.92:
                billing.take_back(user_id, rng.randint(1, 50), reference="churn-refund", idempotency_key=key)
            elif op < 0.96:
                billing.expire_stale(now=models.utcnow())
            elif open_ids:
                open_ids.pop(rng.randrange(len(open_ids)))  # abandoned: only the sweeper can end it
        except billing.InsufficientCredits:
            pass
        except Exception as exc:
            problem("%s: %r" % (key, exc))
        count += 1
        if count == 1:
            sys.stdout.write("ready\n")
            sys.stdout.flush()
        # Think time between operations, as real processes have: without it three tight loops
        # keep the write lock so busy that SQLite's sleeping busy handler starves a newcomer
        # for seconds (measured: up to 10 s), and the loop would kill mostly idle processes.
        time.sleep(rng.expovariate(1 / think))


class ChurnWorker:
    """One churn process (`python -m tests.billing_harness churn ...`)."""

    def __init__(self, url, seed, user_ids, error_path, log):
        self.seed = seed
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.billing_harness", "churn", url, str(seed), error_path]
            + [str(u) for u in user_ids],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        self.ready = False

    def wait_ready(self, timeout=START_TIMEOUT) -> None:
        """Block until the worker has finished its first operation (it prints `ready`)."""
        if self.ready:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.proc.stdout], [], [], deadline - time.monotonic())
            if readable:
                line = self.proc.stdout.readline()
                if line.strip() == b"ready":
                    self.ready = True
                    return
                if not line:
                    raise RuntimeError("churn worker %s exited with %s before it was ready"
                                       % (self.seed, self.proc.wait()))
        raise RuntimeError("churn worker %s not ready after %s s" % (self.seed, timeout))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()


def kill_loop(url: str, *, kills: int, workers: int = 3, users: int = 4, seed: int | None = None,
              max_delay: float = 0.25, audit_every: int = 5, deadline: float | None = None) -> dict:
    """SIGKILL churn workers at random points `kills` times (or until the monotonic `deadline`).

    The models must be bound to `url` in this process (it audits the live database every
    `audit_every` kills, while the workers run). Users are created on first use of a file.
    Returns {seed, kills, live_audits, violations, worker_errors, seconds}; `violations`
    holds every line a live audit reported and `worker_errors` every broken contract.
    """
    seed = random.randrange(2**32) if seed is None else seed
    rng = random.Random(seed)
    user_ids = [u.id for u in models.User.select(models.User.id).where(models.User.telegram_id >= 900000)
                .order_by(models.User.id)]
    if not user_ids:
        user_ids = seed_users(users, credits=500, free_operations=3, first_telegram_id=900000)
    base = sqlite_path(url) if url.startswith("sqlite:///") else os.path.join(tempfile.gettempdir(), "billing-pg")
    error_path, log_path = base + ".churn-errors", base + ".churn-log"
    started = time.monotonic()
    result = {"seed": seed, "kills": 0, "live_audits": 0, "violations": [], "worker_errors": [],
              "url": url}
    with open(log_path, "ab") as log:
        pool = [ChurnWorker(url, rng.randrange(2**31), user_ids, error_path, log) for _ in range(workers)]
        try:
            while result["kills"] < kills and (deadline is None or time.monotonic() < deadline):
                victim = rng.randrange(workers)
                pool[victim].wait_ready()
                time.sleep(rng.uniform(0, max_delay))  # the random kill point (fault injection, not a wait)
                pool[victim].kill()
                result["kills"] += 1
                pool[victim] = ChurnWorker(url, rng.randrange(2**31), user_ids, error_path, log)
                if audit_every and result["kills"] % audit_every == 0:
                    report = billing.audit()
                    result["live_audits"] += 1
                    result["violations"].extend(report.violations)
                    if not report.ok:
                        break
        finally:
            for worker in pool:
                worker.kill()
    if os.path.exists(error_path):
        with open(error_path) as fh:
            result["worker_errors"] = fh.read().splitlines()
    result["seconds"] = round(time.monotonic() - started, 2)
    return result


def check_after_crash(url: str) -> dict:
    """Check a database every writer of which was SIGKILLed (models bound to `url` here).

    Returns {integrity, audit (violations now), open, stale_violations (I10 lines when the
    open reservations are judged from the far future), expired (ids the sweeper ended),
    still_open, audit_after_sweep (violations), reserved_after_sweep, states}.
    """
    out = {"integrity": integrity_check(sqlite_path(url)) if url.startswith("sqlite:///") else "n/a"}
    out["audit"] = billing.audit().violations
    open_ids = sorted(r.id for r in models.Reservation.select(models.Reservation.id)
                      .where(models.Reservation.state == "reserved"))
    out["open"] = open_ids
    out["stale_violations"] = [v for v in billing.audit(now=FAR_FUTURE).violations]
    try:
        out["expired"] = sorted(billing.expire_stale(now=FAR_FUTURE, limit=10**7))
        out["sweep_error"] = None
    except billing.BillingError as exc:   # one corrupt reservation stops the sweep: report it
        out["expired"], out["sweep_error"] = [], repr(exc)
    out["still_open"] = models.Reservation.select().where(models.Reservation.state == "reserved").count()
    out["audit_after_sweep"] = billing.audit(now=FAR_FUTURE).violations
    out["reserved_after_sweep"] = sum(b.reserved for b in models.Balance.select())
    out["states"] = {row.state: row.n for row in models.Reservation.select(
        models.Reservation.state, fn.COUNT(models.Reservation.id).alias("n"))
        .group_by(models.Reservation.state)}
    return out


def crash_problems(check: dict) -> list[str]:
    """Return what is wrong in a `check_after_crash` result (empty when all is well)."""
    problems = []
    if check["integrity"] not in ("ok", "n/a"):
        problems.append("integrity_check: %s" % check["integrity"])
    problems += ["live audit: " + v for v in check["audit"]]
    i10 = [v for v in check["stale_violations"] if v.startswith("I10 ")]
    if len(i10) != len(check["open"]):
        problems.append("audit from the far future reports %d I10 lines for %d open reservations"
                        % (len(i10), len(check["open"])))
    if check["sweep_error"]:
        problems.append("the sweeper failed: %s" % check["sweep_error"])
    if check["expired"] != check["open"]:
        problems.append("sweeper expired %s, open were %s" % (check["expired"], check["open"]))
    if check["still_open"]:
        problems.append("%d reservations still open after the sweep" % check["still_open"])
    problems += ["audit after sweep: " + v for v in check["audit_after_sweep"]]
    if check["reserved_after_sweep"]:
        problems.append("balances still hold %d reserved after the sweep" % check["reserved_after_sweep"])
    return problems


# --- the soak --------------------------------------------------------------------------------

def soak(seconds: float, *, db_path: str | None = None, workers: int = 3, seed: int | None = None,
         round_kills: int = 50) -> dict:
    """Run the kill loop for `seconds`, checking the file and the ledger after every
    `round_kills` kills (all workers killed, integrity_check, audit, the sweeper). Returns the
    summary; `problems` is empty when every check passed. Without `db_path` the run uses a
    new file in a temporary folder, removed afterwards unless something failed."""
    seed = random.randrange(2**32) if seed is None else seed
    folder = None
    if db_path is None:
        folder = tempfile.mkdtemp(prefix="billing-soak-")
        db_path = os.path.join(folder, "soak.db")
    url = new_sqlite(db_path) if not os.path.exists(db_path) else "sqlite:///" + os.path.abspath(db_path)
    bind(url)
    deadline = time.monotonic() + seconds
    summary = {"db": db_path, "seed": seed, "rounds": 0, "kills": 0, "live_audits": 0, "orphans_expired": 0,
               "problems": []}
    rng = random.Random(seed)
    while time.monotonic() < deadline and not summary["problems"]:
        run = kill_loop(url, kills=round_kills, workers=workers, seed=rng.randrange(2**32), deadline=deadline)
        check = check_after_crash(url)
        summary["rounds"] += 1
        summary["kills"] += run["kills"]
        summary["live_audits"] += run["live_audits"]
        summary["orphans_expired"] += len(check["expired"])
        summary["problems"] += ["round %d (seed %s): %s" % (summary["rounds"], run["seed"], v)
                                for v in run["violations"] + run["worker_errors"] + crash_problems(check)]
        summary["states"] = check["states"]
    summary["ledger_rows"] = models.LedgerEntry.select().count()
    models.db.close()
    if folder and not summary["problems"]:
        shutil.rmtree(folder, ignore_errors=True)   # a failed run keeps its file for inspection
        summary["db"] += " (removed: no problems)"
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.billing_harness", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_soak = sub.add_parser("soak", help="SIGKILL loop against the billing core for --seconds")
    p_soak.add_argument("--seconds", type=float, default=60.0)
    p_soak.add_argument("--db", default=None, help="SQLite file (default: a new one in a temp folder)")
    p_soak.add_argument("--workers", type=int, default=3)
    p_soak.add_argument("--seed", type=int, default=None)
    p_churn = sub.add_parser("churn", help="one kill-loop worker (internal)")
    p_churn.add_argument("url")
    p_churn.add_argument("seed", type=int)
    p_churn.add_argument("error_path")
    p_churn.add_argument("user_ids", type=int, nargs="+")
    args = parser.parse_args(argv)
    if args.command == "churn":
        logging.basicConfig(level=logging.ERROR)
        churn(args.url, args.seed, args.user_ids, args.error_path)
        return 0
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = soak(args.seconds, db_path=args.db, workers=args.workers, seed=args.seed)
    print(json.dumps(summary, indent=2, default=str))
    if summary["problems"]:
        print("soak: FAILED (%d problems; replay with --seed %s)" % (len(summary["problems"]), summary["seed"]),
              file=sys.stderr)
        return 1
    print("soak: OK — %d kills in %d rounds, %d orphaned reservations expired, %d live audits clean"
          % (summary["kills"], summary["rounds"], summary["orphans_expired"], summary["live_audits"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
