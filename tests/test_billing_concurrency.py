"""The billing core under real concurrency and crashes (ledger.md §7.3 T4, T6, T8).

* Storm: spawned processes, each binding `models.init_db` to the same database, wait on one
  barrier and then reserve for the same users. A user holding k × price gets exactly k
  reservations, however many processes ask; `available` never goes below zero (the ledger's
  lowest `available_after`); no `database is locked` or other error reaches a caller.
* Kill loop: churn workers (reserve / commit / release / credit / refund / sweep / abandon)
  are SIGKILLed at random points while the audit runs against the live file; afterwards the
  file passes `PRAGMA integrity_check`, the ledger passes `billing.audit()`, and the sweeper
  ends every orphaned reservation. `python -m tests.billing_harness soak --seconds N` runs the
  same loop for as long as asked (`make soak`).
"""
import os
import random

import pytest

import billing
import config
import models
from models import Balance, LedgerEntry, Reservation
from tests import billing_harness

PRICE = 7


def run_storm(url, *, processes, k=5, attempts=4, seed=None):
    """Users 0–2 hold k × PRICE credits; user 3 also holds 2 free operations. Returns
    (results, user_ids, expected successes per user)."""
    seed = random.randrange(2**32) if seed is None else seed
    plain = billing_harness.seed_users(3, credits=k * PRICE, first_telegram_id=810000)
    with_free = billing_harness.seed_users(1, credits=k * PRICE, free_operations=2, first_telegram_id=820000)
    user_ids = plain + with_free
    results = billing_harness.storm(url, user_ids, price=PRICE, processes=processes, attempts=attempts, seed=seed)
    expected = {u: k for u in plain} | {u: k + 2 for u in with_free}
    return results, user_ids, expected, seed


def check_storm(results, user_ids, expected, *, processes, attempts, seed):
    errors = [e for r in results for e in r["errors"]]
    assert errors == [], "seed %s: errors reached callers: %s" % (seed, errors[:5])
    reserved = [item for r in results for item in r["reserved"]]
    per_user = {u: sum(1 for item in reserved if item[0] == u) for u in user_ids}
    assert per_user == expected, "seed %s" % seed
    insufficient = sum(r["insufficient"] for r in results)
    assert insufficient == processes * attempts * len(user_ids) - len(reserved)
    free = [item for item in reserved if item[2] == "free_ops"]
    assert len(free) == 2 and all(item[0] == user_ids[3] for item in free)
    assert billing_harness.min_available_after() >= 0, "available went below zero"
    committed = sum(r["committed"] for r in results)
    released = sum(r["released"] for r in results)
    assert committed + released == len(reserved)
    # Every reservation resolved: nothing reserved; what was released is available again.
    assert Reservation.select().where(Reservation.state == "reserved").count() == 0
    assert sum(b.reserved for b in Balance.select()) == 0
    spent = sum(e.amount for e in LedgerEntry.select().where(
        (LedgerEntry.kind == "commit") & (LedgerEntry.asset == "credits")))
    credits = sum(b.available for b in Balance.select().where(Balance.asset == "credits"))
    assert credits + spent == sum(expected.values()) * PRICE - 2 * PRICE
    report = billing.audit()
    assert report.ok, "seed %s:\n%s" % (seed, "\n".join(report.violations))


def test_a_reserve_storm_from_four_processes_gets_exactly_k_per_user(database):
    url = config.get().database_url
    results, user_ids, expected, seed = run_storm(url, processes=4)
    check_storm(results, user_ids, expected, processes=4, attempts=4, seed=seed)
    assert len({r["pid"] for r in results}) == 4


def test_a_reserve_storm_on_postgresql_gets_exactly_k_per_user(pg_database):
    url = config.get().database_url
    results, user_ids, expected, seed = run_storm(url, processes=4)
    check_storm(results, user_ids, expected, processes=4, attempts=4, seed=seed)


def require_slow(request):
    """Marked-slow variants run only when selected with `-m slow`."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow variant: run with -m slow")


@pytest.mark.slow
def test_a_reserve_storm_from_eight_processes_with_more_contention(database, request):
    require_slow(request)
    url = config.get().database_url
    results, user_ids, expected, seed = run_storm(url, processes=8, k=20, attempts=12)
    check_storm(results, user_ids, expected, processes=8, attempts=12, seed=seed)


def _kill_loop_and_check(url, kills):
    seed = int(os.environ.get("BILLING_SEED", random.randrange(2**32)))
    run = billing_harness.kill_loop(url, kills=kills, seed=seed)
    assert run["kills"] == kills
    assert run["violations"] == [], "seed %s: the live audit failed while workers ran" % seed
    assert run["worker_errors"] == [], "seed %s: %s" % (seed, run["worker_errors"][:5])
    assert run["live_audits"] == kills // 5
    check = billing_harness.check_after_crash(url)
    assert billing_harness.crash_problems(check) == [], "seed %s" % seed
    assert check["integrity"] == ("ok" if url.startswith("sqlite") else "n/a")
    assert check["states"].get("committed", 0) > 0, "seed %s: the workers did no work" % seed
    return run, check


def test_sigkill_loop_leaves_a_sound_file_and_ledger(database):
    run, _ = _kill_loop_and_check(config.get().database_url, kills=15)
    assert run["seconds"] < 30


def test_sigkill_loop_on_postgresql(pg_database):
    """T6 on PostgreSQL: killed writers' transactions roll back; the ledger stays sound."""
    run, _ = _kill_loop_and_check(config.get().database_url, kills=10)
    assert run["seconds"] < 60


@pytest.mark.slow
def test_sigkill_loop_long(database, request):
    require_slow(request)
    _kill_loop_and_check(config.get().database_url, kills=300)


def test_the_crash_check_catches_an_orphan_the_sweeper_cannot_see(database):
    """check_after_crash must be able to fail: a reservation left open while its balance row
    claims nothing reserved is reported (audit I1/I4, and the sweeper refuses to expire it)."""
    url = config.get().database_url
    user_id = billing_harness.seed_users(1, credits=50)[0]
    r = billing.reserve(user_id, PRICE, reference="g", idempotency_key="g", ttl=900)
    Balance.update(reserved=0, available=50).where(
        (Balance.user == user_id) & (Balance.asset == "credits")).execute()
    check = billing_harness.check_after_crash(url)
    problems = billing_harness.crash_problems(check)
    assert check["open"] == [r.id]
    assert any("I1 user %d credits" % user_id in p for p in problems)
    # the sweeper logs the broken row and goes on; the reservation stays open and is reported
    assert "sweeper expired [], open were [%d]" % r.id in problems
    assert any(p.startswith("audit after sweep: I4 user %d credits" % user_id) for p in problems)


def test_soak_command_runs_and_reports(tmp_path, capsys, cfg):
    db_path = str(tmp_path / "soak.db")
    code = billing_harness.main(["soak", "--seconds", "2", "--db", db_path, "--seed", "7"])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    assert '"problems": []' in out.out and "soak: OK" in out.err
    assert billing_harness.integrity_check(db_path) == "ok"
    models.init_db("sqlite:///" + db_path)
    assert Reservation.select().where(Reservation.state == "reserved").count() == 0
