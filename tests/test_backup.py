"""Backups an operator can trust (issue 8 §4): `manage.py backup` and `manage.py restore`.

The commands run as the operator runs them — `python manage.py …` in a subprocess, from another
working directory — against a database the test writes to with the real billing functions.
"""
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

import backup
import billing
import models
from models import LedgerEntry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANAGE = os.path.join(ROOT, "manage.py")


def manage(*args, db, cwd, **env):
    """Run `python manage.py args…` for the SQLite file `db` from `cwd`; return the CompletedProcess."""
    environ = dict(os.environ, DATABASE_URL="sqlite:///" + str(db), DATA_DIR=str(os.path.dirname(db)),
                   ENV_FILE=os.devnull, BACKUP_KEEP="14", BACKUP_COMMAND="")
    environ.update({k: str(v) for k, v in env.items()})
    return subprocess.run([sys.executable, MANAGE, *map(str, args)], cwd=str(cwd), env=environ,
                          capture_output=True, text=True, timeout=60)


def db_file():
    return models.db.obj.database


def wait_for(predicate, seconds=20.0, what="condition"):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.005)   # a poll interval with a deadline, not a wait for a guessed duration


def balances_of(path):
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        return sorted(conn.execute("SELECT user_id, asset, available, reserved FROM balance").fetchall())
    finally:
        conn.close()


def balances_at(source, last_ledger_id):
    """Balances of `source` replayed up to ledger row `last_ledger_id` (the chain's *_after values)."""
    conn = sqlite3.connect("file:%s?mode=ro" % source, uri=True)
    try:
        rows = conn.execute(
            "SELECT user_id, asset, available_after, reserved_after FROM ledger l WHERE id = ("
            " SELECT max(id) FROM ledger m WHERE m.user_id = l.user_id AND m.asset = l.asset AND m.id <= ?)",
            (last_ledger_id,)).fetchall()
    finally:
        conn.close()
    return sorted(rows)


def test_backup_during_writes_restores_elsewhere_with_a_clean_audit(database, tmp_path):
    users = [billing.get_or_create_user(7000 + i)[0].id for i in range(3)]
    for uid in users:
        billing.credit(uid, 1000, kind="grant", reference="test", idempotency_key="seed:%d" % uid)
    done = []
    stop = threading.Event()
    errors = []

    def write():
        i = 0
        try:
            while not stop.is_set():
                uid = users[i % len(users)]
                r = billing.reserve(uid, 3, reference="generation:w%d" % i, idempotency_key="generation:w%d" % i,
                                    ttl=900)
                (billing.commit if i % 2 else billing.release)(r.id)
                billing.credit(uid, 2, kind="grant", reference="test", idempotency_key="grant:w%d" % i)
                i += 1
                done.append(i)
        except Exception as exc:   # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            models.db.close()

    source = db_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    thread = threading.Thread(target=write)
    thread.start()
    try:
        wait_for(lambda: len(done) >= 20, what="writes before the backup")
        before = len(done)
        made = manage("backup", "snap.db", db=source, cwd=elsewhere)   # a relative target: the caller's folder
        during = len(done) - before
        wait_for(lambda: len(done) >= before + during + 5, what="writes after the backup")
    finally:
        stop.set()
        thread.join(30)
    assert errors == [] and made.returncode == 0, (errors, made.stderr)
    snap = elsewhere / "snap.db"
    assert "integrity_check ok" in made.stdout and oct(snap.stat().st_mode & 0o777) == "0o600"

    # The copy is one consistent snapshot: later writes are not in it.
    last_id = sqlite3.connect(str(snap)).execute("SELECT max(id) FROM ledger").fetchone()[0]
    assert last_id < LedgerEntry.select().count()

    fresh = tmp_path / "fresh" / "medialab.db"
    (tmp_path / "fresh").mkdir()
    relative = os.path.relpath(str(snap), str(tmp_path / "fresh"))      # named from the caller's folder
    restored = manage("restore", relative, db=fresh, cwd=tmp_path / "fresh")
    assert restored.returncode == 0, restored.stderr
    audit = manage("audit", db=fresh, cwd=tmp_path)
    assert audit.returncode == 0 and "audit: OK" in audit.stdout, audit.stdout + audit.stderr
    assert balances_of(fresh) == balances_at(source, last_id)
    assert not os.path.exists(str(fresh) + "-wal") or os.path.getsize(str(fresh) + "-wal") == 0
    assert billing.audit().ok


def test_backup_refuses_a_missing_or_empty_source_and_an_existing_target(tmp_path):
    missing = manage("backup", db=tmp_path / "none.db", cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    (tmp_path / "empty.db").write_bytes(b"")
    empty = manage("backup", db=tmp_path / "empty.db", cwd=tmp_path)
    assert empty.returncode == 2 and "empty" in empty.stderr
    assert not (tmp_path / "backup").exists() or os.listdir(tmp_path / "backup") == []


def test_backups_never_overwrite_rotate_and_hand_over_to_the_hook(database, tmp_path):
    source = db_file()
    folder = os.path.join(os.path.dirname(source), "backup")
    target = tmp_path / "mine.db"
    target.write_bytes(b"an earlier backup")
    refused = manage("backup", target, db=source, cwd=tmp_path)
    assert refused.returncode == 2 and "already exists" in refused.stderr
    assert target.read_bytes() == b"an earlier backup"

    paths = [backup.create_backup(source, folder).path for _ in range(4)]   # same second: distinct names
    assert len(set(paths)) == 4 and backup.backups(folder) == paths
    assert backup.rotate(folder, 3) == paths[:1] and backup.backups(folder) == paths[1:]

    log = tmp_path / "hook.log"
    hook = "sh -c 'echo \"$1\" >> %s' sh" % log
    ok = manage("backup", db=source, cwd=tmp_path, BACKUP_KEEP=2, BACKUP_COMMAND=hook)
    assert ok.returncode == 0, ok.stderr
    kept = backup.backups(folder)
    assert len(kept) == 2 and log.read_text().split() == [kept[-1]]
    failing = manage("backup", db=source, cwd=tmp_path, BACKUP_KEEP=0, BACKUP_COMMAND="sh -c 'exit 5'")
    assert failing.returncode == 1 and "exit code 5" in failing.stderr
    assert len(backup.backups(folder)) == 3          # the backup stays; 0 keeps all
    assert backup.verify(backup.backups(folder)[-1])["ledger"] == LedgerEntry.select().count()


def test_restore_refuses_a_database_in_use_and_keeps_the_current_one(database, tmp_path):
    source = db_file()
    user = billing.get_or_create_user(4242)[0].id
    billing.credit(user, 50, kind="grant", reference="test", idempotency_key="grant:before")
    snap = backup.create_backup(source, str(tmp_path / "b")).path
    billing.credit(user, 25, kind="grant", reference="test", idempotency_key="grant:after")
    assert billing.get_balance(user).credits == 75

    busy = manage("restore", snap, db=source, cwd=tmp_path)       # this process has it open
    assert busy.returncode == 2 and "in use" in busy.stderr and str(os.getpid()) in busy.stderr
    assert billing.get_balance(user).credits == 75                 # untouched
    models.db.close()

    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    refused = manage("restore", junk, db=source, cwd=tmp_path)
    assert refused.returncode == 2 and "not a readable SQLite database" in refused.stderr

    done = manage("restore", snap, db=source, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    previous = [line.rsplit(" ", 1)[1] for line in done.stdout.splitlines() if "previous database" in line][0]
    assert previous.endswith("-pre-restore.db") and backup.verify(previous)
    assert billing.get_balance(user).credits == 50
    assert sqlite3.connect(previous).execute(
        "SELECT available FROM balance WHERE user_id = ? AND asset = 'credits'", (user,)).fetchone() == (75,)
    assert billing.audit().ok


def test_force_restores_over_an_open_database(database, tmp_path):
    source = db_file()
    snap = backup.create_backup(source, str(tmp_path / "b")).path
    models.db.execute_sql("SELECT 1")
    assert manage("restore", snap, db=source, cwd=tmp_path).returncode == 2
    forced = manage("restore", "--force", snap, db=source, cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr


def test_migrate_backs_up_a_database_with_pending_migrations(tmp_path):
    old = tmp_path / "medialab.db"
    conn = sqlite3.connect(str(old))
    conn.execute("CREATE TABLE notes (x)")
    conn.execute("INSERT INTO notes VALUES (1)")
    conn.commit()
    conn.close()
    run = manage("migrate", "--backup", db=old, cwd=tmp_path)
    assert run.returncode == 0 and "backup before migrating" in run.stdout, run.stderr
    [copy] = backup.backups(str(tmp_path / "backup"))
    assert copy.endswith("-pre-migrate.db") and backup.verify(copy) == {"notes": 1}
    again = manage("migrate", "--backup", db=old, cwd=tmp_path)
    assert again.returncode == 0 and "up to date" in again.stdout
    assert len(backup.backups(str(tmp_path / "backup"))) == 1      # nothing pending: no new backup


def test_a_relative_database_url_is_taken_against_the_project():
    assert backup.sqlite_path("sqlite:///data/medialab.db", ROOT) == os.path.join(ROOT, "data", "medialab.db")
    assert backup.sqlite_path("sqlite:////srv/m.db", ROOT) == "/srv/m.db"
    assert backup.sqlite_path("postgresql://u@h/db", ROOT) is None


@pytest.mark.parametrize("name", ["backup", "restore"])
def test_make_targets_exist(name):
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
        assert ("\n%s:" % name) in f.read()


def test_a_money_operation_on_a_full_disk_fails_naming_the_cause_and_changes_nothing(database):
    """Disk full, simulated for this connection with PRAGMA max_page_count: billing.StorageFull
    names the cause, nothing changed."""
    uid = billing.get_or_create_user(5151)[0].id
    billing.credit(uid, 100, kind="grant", reference="test", idempotency_key="grant:first")
    pages = models.db.execute_sql("PRAGMA page_count").fetchone()[0]
    models.db.execute_sql("PRAGMA max_page_count = %d" % pages)
    try:
        for i in range(5000):
            before = (LedgerEntry.select().count(), billing.get_balance(uid).credits)
            try:
                billing.credit(uid, 1, kind="grant", reference="test", idempotency_key="grant:fill:%d" % i)
            except billing.StorageFull as exc:
                assert "disk full" in str(exc) and "The disk holding the database is full" in exc.__doc__
                break
        else:
            pytest.fail("the capped database never filled up")
        assert (LedgerEntry.select().count(), billing.get_balance(uid).credits) == before
    finally:
        models.db.execute_sql("PRAGMA max_page_count = 1073741823")
    assert billing.audit().ok
