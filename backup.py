"""SQLite backups an operator can trust, and the restore that puts one back.

Plain `sqlite3`, no project imports (manage.py passes the paths and settings in):

* `create_backup` copies a consistent snapshot with SQLite's online backup API while the bot
  runs, under a name that never replaces an earlier backup, and verifies the copy
  (`PRAGMA integrity_check`, and the row count of every table equal to the source's at the same
  snapshot) before it gets its final name. `rotate` keeps the newest N; `run_hook` hands the file
  to an off-site command (restic, rclone …).
* `restore` refuses while a process has the database open (`holders`), verifies the file, keeps
  the current database aside as a verified backup, removes the stale `-wal`/`-shm` and moves the
  file into place.

Every failure raises `BackupError` whose message is one line for the operator.
"""
from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import logging
import os
import re
import shlex
import shutil
import sqlite3
import subprocess

logger = logging.getLogger(__name__)

# Names of the backups `rotate` manages: medialab-<UTC yyyymmdd-HHMMSS>[-<n>][-<label>].db
NAME = re.compile(r"^medialab-(\d{8}-\d{6})(?:-(\d+))?(?:-([a-z][a-z-]*))?\.db$")
# Tables a Media Lab database has (a restore refuses a file without them).
REQUIRED_TABLES = ("user", "balance", "ledger", "reservation", "payment")
# Byte of the `-shm` file on which every open SQLite connection holds a shared lock (the WAL
# index "dead man switch", UNIX_SHM_DMS = (22 + 8) * 4 + 8 in SQLite's os_unix.c).
SHM_DMS_BYTE = 128
UNITS = ("medialab-bot", "medialab-web", "medialab-worker")
# Settings a hook never needs: not passed to BACKUP_COMMAND's environment.
SECRETS = ("TELEGRAM_BOT_TOKEN", "TELEGRAM_WEBHOOK_SECRET", "YOOKASSA_SECRET_KEY", "FAL_KEY")


class BackupError(Exception):
    """A backup or restore was refused or failed; the message is one line naming the cause."""


@dataclasses.dataclass
class BackupResult:
    """A verified backup: its path, size in bytes and the row count of every table."""

    path: str
    size: int
    counts: dict


def sqlite_path(url: str, root: str) -> str | None:
    """Return the absolute file path of a `sqlite:///path` URL, a relative path taken against
    `root` (the project folder, not the working directory); None for other databases."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return os.path.normpath(os.path.join(root, path))


def table_counts(conn: sqlite3.Connection) -> dict:
    """Return {table: row count} for every table of `conn` (SQLite's own tables excluded)."""
    names = [row[0] for row in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    return {name: conn.execute('SELECT count(*) FROM "%s"' % name.replace('"', '""')).fetchone()[0]
            for name in names}


def _check_source(path: str) -> None:
    if not os.path.exists(path):
        raise BackupError("the database %s does not exist (wrong DATABASE_URL, or nothing to back up yet)" % path)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise BackupError("the database %s is empty: refusing to back it up" % path)


def verify(path: str, expected: dict | None = None) -> dict:
    """Check the SQLite file at `path`: `PRAGMA integrity_check` is ok and, with `expected`, the
    row count of every table equals it. Return the counts; raise BackupError otherwise."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise BackupError("%s is missing or empty" % path)
    try:
        conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
        try:
            check = conn.execute("PRAGMA integrity_check").fetchall()
            counts = table_counts(conn)
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise BackupError("%s is not a readable SQLite database (%s)" % (path, exc)) from None
    if [row[0] for row in check] != ["ok"]:
        raise BackupError("%s fails PRAGMA integrity_check: %s" % (path, "; ".join(str(r[0]) for r in check[:3])))
    if expected is not None and counts != expected:
        differ = sorted(k for k in set(counts) | set(expected) if counts.get(k) != expected.get(k))
        raise BackupError("%s: row counts differ from the source in %s" % (path, ", ".join(differ)))
    return counts


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_snapshot(source: str, partial: str) -> dict:
    """Copy one read snapshot of `source` into `partial`; return the source's counts at it."""
    src = sqlite3.connect(source, isolation_level=None, timeout=30)
    try:
        src.execute("BEGIN")                 # a read transaction: counts and copy see one snapshot
        counts = table_counts(src)
        dest = sqlite3.connect(partial, isolation_level=None)
        try:
            src.backup(dest)                 # all pages in one step, inside our read transaction
            dest.execute("PRAGMA journal_mode=DELETE")   # a self-contained file, no -wal beside it
        finally:
            dest.close()
        src.execute("COMMIT")
    finally:
        src.close()
    return counts


def _unique_name(folder: str, now: datetime.datetime, label: str) -> str:
    """A new name after every existing backup of the same second (so it sorts newest, even when
    an older one of that second was rotated away)."""
    stamp = now.strftime("%Y%m%d-%H%M%S")
    suffix = "-" + label if label else ""
    taken = [int(m.group(2) or 1) for m in map(NAME.match, os.listdir(folder) if os.path.isdir(folder) else ())
             if m and m.group(1) == stamp]
    n = max(taken) + 1 if taken else 1
    while True:
        name = "medialab-%s%s%s.db" % (stamp, "" if n == 1 else "-%d" % n, suffix)
        if not os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
        n += 1


def create_backup(source: str, backup_dir: str, target: str | None = None, *, label: str = "",
                  now: datetime.datetime | None = None) -> BackupResult:
    """Back up the SQLite database `source` and verify the copy; return the result.

    The file goes to `target` when given (refused if it exists) or to a new
    `medialab-<UTC time>[-n][-label].db` in `backup_dir`; an earlier backup is never overwritten
    (the verified copy is hard-linked to its final name, which fails on an existing file). Mode
    0600. Raises BackupError for a missing or empty source, an existing target, or a copy that
    fails `integrity_check` or whose table row counts differ from the source at the same snapshot.
    """
    source = os.path.abspath(source)
    _check_source(source)
    if target:
        final = os.path.abspath(target)
        if os.path.lexists(final):
            raise BackupError("%s already exists: refusing to overwrite a backup" % final)
    else:
        final = _unique_name(os.path.abspath(backup_dir), now or datetime.datetime.now(datetime.timezone.utc), label)
    folder = os.path.dirname(final)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    partial = final + ".partial-%d" % os.getpid()
    fd = os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    try:
        try:
            expected = _copy_snapshot(source, partial)
        except sqlite3.DatabaseError as exc:
            raise BackupError("could not copy %s: %s" % (source, exc)) from None
        counts = verify(partial, expected)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(partial, final)          # never replaces: EEXIST if the name was taken meanwhile
        except FileExistsError:
            raise BackupError("%s already exists: refusing to overwrite a backup" % final) from None
        _fsync_dir(folder)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    size = os.path.getsize(final)
    logger.info("backup written: %s (%d bytes, %d tables verified)", final, size, len(counts))
    return BackupResult(final, size, counts)


def backups(backup_dir: str) -> list[str]:
    """Return the managed backups in `backup_dir` (paths), oldest first."""
    try:
        names = os.listdir(backup_dir)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        m = NAME.match(name)
        if m:
            found.append(((m.group(1), int(m.group(2) or 1)), os.path.join(backup_dir, name)))
    return [path for _, path in sorted(found)]


def rotate(backup_dir: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` managed backups in `backup_dir` (0 keeps all); return the
    deleted paths. Files not named like our backups are never touched."""
    if keep <= 0:
        return []
    old = backups(backup_dir)[:-keep]
    for path in old:
        os.unlink(path)
        logger.info("backup rotated out: %s", path)
    return old


def run_hook(command: str, path: str, timeout: float | None = None) -> int:
    """Run the operator's BACKUP_COMMAND with the backup's path as its last argument.

    The command is split like a shell line (no shell features: use `sh -c '…' sh` for those) and
    runs without the bot's secrets in its environment. Return its exit code (127 when it cannot
    be started); never raises for the command's own failure.
    """
    argv = shlex.split(command) + [path]
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    try:
        return subprocess.run(argv, env=env, timeout=timeout, check=False).returncode
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.error("BACKUP_COMMAND could not run: %s", exc)
        return 127


def holders(db_path: str) -> list[str]:
    """Return why the database at `db_path` counts as in use (empty: nobody uses it).

    Three independent signs, each robust on its own: a process with the database (or its -wal)
    open, found in /proc/*/fd; a shared lock on the `-shm` dead-man-switch byte, which every live
    SQLite connection holds; and an active medialab-bot/-web/-worker systemd unit. Must be called
    from a process that has no SQLite connection to this file itself (POSIX locks are per process).
    """
    reasons = []
    targets = {os.path.realpath(db_path), os.path.realpath(db_path + "-wal")}
    pids = []
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            for fd in os.listdir("/proc/%s/fd" % pid):
                if os.path.realpath("/proc/%s/fd/%s" % (pid, fd)) in targets:
                    pids.append(int(pid))
                    break
        except OSError:
            continue
    if pids:
        reasons.append("opened by process %s" % ", ".join(str(p) for p in sorted(pids)))
    shm = db_path + "-shm"
    if os.path.exists(shm):
        try:
            fd = os.open(shm, os.O_RDWR)
        except OSError:
            fd = None
        if fd is not None:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, SHM_DMS_BYTE)
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, SHM_DMS_BYTE)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    reasons.append("an SQLite connection holds its -shm lock")
            finally:
                os.close(fd)
    if shutil.which("systemctl") and os.path.isdir("/run/systemd/system"):
        active = [u for u in UNITS if subprocess.run(["systemctl", "is-active", "--quiet", u],
                                                     check=False).returncode == 0]
        if active:
            reasons.append("systemd units running: %s" % " ".join(active))
    return reasons


@dataclasses.dataclass
class RestoreResult:
    """What `restore` did: the database restored, and where the previous one was kept (or None)."""

    database: str
    previous: str | None
    counts: dict


def restore(file: str, db_path: str, backup_dir: str, *, force: bool = False) -> RestoreResult:
    """Put the backup `file` in place of the database `db_path`.

    Refuses (BackupError) while the database is in use (see `holders`) unless `force`; verifies
    `file` (integrity_check, the Media Lab tables present) through a private copy; keeps the
    current database aside as a verified backup in `backup_dir` (its raw files when it cannot be
    read); removes the stale `-wal`/`-shm`; then renames the copy into place (mode 0600).
    """
    file, db_path = _check_restorable(file, db_path, force)
    folder = os.path.dirname(db_path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    staged = os.path.join(folder, ".restore-%d.db" % os.getpid())
    fd = os.open(staged, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    os.close(fd)
    try:
        counts = _copy_verified(file, staged)
        previous = _set_aside(db_path, backup_dir)
        with open(staged, "rb") as f:
            os.fsync(f.fileno())
        os.replace(staged, db_path)
        _fsync_dir(folder)
    finally:
        if os.path.exists(staged):
            os.unlink(staged)
    logger.info("restored %s into %s (previous database: %s)", file, db_path, previous)
    return RestoreResult(db_path, previous, counts)


def _check_restorable(file: str, db_path: str, force: bool) -> tuple[str, str]:
    """Return (`file`, `db_path`) made absolute; BackupError when `file` is missing, empty or the
    database itself, or while the database is in use (`holders`) unless `force`."""
    file = os.path.abspath(file)
    db_path = os.path.abspath(db_path)
    if not os.path.isfile(file) or os.path.getsize(file) == 0:
        raise BackupError("%s is missing or empty: nothing to restore" % file)
    if os.path.realpath(file) == os.path.realpath(db_path):
        raise BackupError("%s is the live database itself" % file)
    busy = holders(db_path)
    if busy and not force:
        raise BackupError("the database %s is in use (%s): stop the services first "
                          "(sudo systemctl stop medialab-bot medialab-web medialab-worker) or pass --force"
                          % (db_path, "; ".join(busy)))
    return file, db_path


def _copy_verified(file: str, staged: str) -> dict:
    """Copy the SQLite database `file` into the empty file `staged` (rollback journal, not WAL) and
    verify the copy; return its table counts (`verify`). BackupError when it is no Media Lab database."""
    try:
        src = sqlite3.connect("file:%s?mode=ro" % file, uri=True)
        try:
            dest = sqlite3.connect(staged, isolation_level=None)
            try:
                src.backup(dest)
                dest.execute("PRAGMA journal_mode=DELETE")
            finally:
                dest.close()
        finally:
            src.close()
    except sqlite3.DatabaseError as exc:
        raise BackupError("%s is not a readable SQLite database (%s)" % (file, exc)) from None
    counts = verify(staged)
    missing = [t for t in REQUIRED_TABLES if t not in counts]
    if missing:
        raise BackupError("%s is not a Media Lab database (no table %s)" % (file, ", ".join(missing)))
    return counts


def _set_aside(db_path: str, backup_dir: str) -> str | None:
    """Keep the current database at `db_path` in `backup_dir` (a verified backup, else its raw files)
    and remove its stale -wal/-shm/-journal; return where it was kept (None: there was none)."""
    previous = None
    if os.path.exists(db_path) and os.path.getsize(db_path) > 0:
        try:
            previous = create_backup(db_path, backup_dir, label="pre-restore").path
        except BackupError as exc:
            logger.warning("current database cannot be backed up (%s): moving its files aside", exc)
            previous = _move_aside(db_path, backup_dir)
    for suffix in ("-wal", "-shm", "-journal"):
        if os.path.exists(db_path + suffix):
            os.unlink(db_path + suffix)   # a stale WAL would be replayed into the restored file
    return previous


def _move_aside(db_path: str, backup_dir: str) -> str:
    os.makedirs(backup_dir, mode=0o700, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = os.path.join(backup_dir, "unreadable-%s-%s" % (stamp, os.path.basename(db_path)))
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db_path + suffix):
            os.rename(db_path + suffix, base + suffix)
    return base
