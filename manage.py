"""Operator commands: `python manage.py check | migrate [--backup] | status | seed-promo | audit |
backup [PATH] | restore FILE [--force] | env-example`.

Each is what a `make` target runs. Exit codes: 0 ok, 1 a check failed (audit, pending
migrations), 2 bad usage or a refused backup/restore, 78 bad configuration or an unmigrated
database, 69 the database does not answer (startup.py "Exit codes").

`python manage.py env-example` prints `.env.example` as generated from config.SETTINGS.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import peewee

import backup
import config
import models
import startup

logger = logging.getLogger("manage")


def cmd_check(cfg, args) -> int:
    """What the three processes check at start, once, before `make run` starts them: the whole
    configuration (the bot token included: `main` requires it for this command), the database reachable and migrated, the queue, the
    YooKassa keys. Prints the warnings and "ready"; a problem is one line per item and exit 78/69
    (`startup.refuse`), so one clear message replaces three processes failing side by side."""
    try:
        warnings = startup.check_services(cfg)
    except (config.ConfigError, models.NotMigrated, startup.Unavailable) as exc:
        return startup.refuse(exc)
    for warning in warnings:
        print("warning: %s" % warning, file=sys.stderr)
    print("ready: configuration, database, queue and payments checked")
    return 0


def cmd_migrate(cfg, args) -> int:
    """Apply pending migrations and print their names.

    With --backup (what medialab-migrate.service runs) an existing SQLite database with pending
    migrations is backed up and verified first; a failed backup stops the migration (exit 2).
    """
    path = _sqlite_file(cfg)
    if args.backup and path and os.path.isfile(path) and os.path.getsize(path) > 0 and models.pending_migrations():
        try:
            backup.create_backup(path, _backup_dir(cfg), label="pre-migrate")
            print("backup before migrating: done")
        except backup.BackupError as exc:
            print("migrate: no backup, not migrating: %s" % exc, file=sys.stderr)
            return 2
    applied = models.migrate()
    print("applied: %s" % ", ".join(applied) if applied else "database is up to date")
    return 0


def cmd_status(cfg, args) -> int:
    """Print pending migrations; exit 1 if any."""
    pending = models.pending_migrations()
    print("pending: %s" % ", ".join(pending) if pending else "database is up to date")
    return 1 if pending else 0


def cmd_seed_promo(cfg, args) -> int:
    """Create the default promo codes (idempotent)."""
    import promo

    models.ensure_migrated()
    created = promo.seed_defaults()
    print("promo codes created: %d (existing ones left as they are)" % created)
    return 0


def cmd_audit(cfg, args) -> int:
    """Check every ledger invariant on a read snapshot; exit 1 on any violation."""
    import billing

    models.ensure_migrated()
    # --since-id N: only what rows after ledger id N could have broken (billing.audit_since), for a
    # frequent check between full audits; the summary's last_ledger_id is the next N.
    report = billing.audit() if args.since_id is None else billing.audit_since(args.since_id)
    if args.json:
        print(json.dumps({"ok": report.ok, "violations": report.violations, "summary": report.summary},
                         default=str, ensure_ascii=False))
    else:
        print("audit summary:")
        for key, value in report.summary.items():
            print("  %-20s %s" % (key, value))
        if report.ok:
            print("audit: OK — all invariants hold (I1–I16)")
        else:
            print("audit: %d VIOLATION(S)" % len(report.violations))
            for line in report.violations:
                print("  " + line)
    return 0 if report.ok else 1


def _sqlite_file(cfg) -> str | None:
    """The SQLite database file of `cfg`, a relative path taken against the project folder."""
    return backup.sqlite_path(cfg.database_url, config.ROOT)


def _backup_dir(cfg) -> str:
    return os.path.join(os.path.join(config.ROOT, cfg.data_dir), "backup")


def _backup_and_rotate(cfg, target=None, label="") -> int:
    """Verified backup, rotation, then the BACKUP_COMMAND hook; return the exit code."""
    result = backup.create_backup(_sqlite_file(cfg), _backup_dir(cfg), target, label=label)
    tables = ", ".join("%s %d" % item for item in sorted(result.counts.items()) if item[0] != "migratehistory")
    print("backup written: %s (%d bytes; integrity_check ok; rows equal to the source: %s)"
          % (result.path, result.size, tables))
    if not target:
        for path in backup.rotate(_backup_dir(cfg), cfg.backup_keep):
            print("backup rotated out (BACKUP_KEEP=%d): %s" % (cfg.backup_keep, path))
    if cfg.backup_command:
        code = backup.run_hook(cfg.backup_command, result.path)
        if code != 0:
            print("backup: BACKUP_COMMAND failed with exit code %d (the backup itself is kept: %s)"
                  % (code, result.path), file=sys.stderr)
            return 1
        print("backup: BACKUP_COMMAND done")
    return 0


def cmd_backup(cfg, args) -> int:
    """Back up the SQLite database with the online backup API (safe while the bot runs).

    The copy is verified (integrity_check, row counts equal to the source's snapshot) and never
    overwrites an earlier backup; the newest BACKUP_KEEP in <data>/backup are kept; BACKUP_COMMAND
    then gets the file. Exit 0 ok, 1 the hook failed (backup kept), 2 refused or failed.
    """
    if _sqlite_file(cfg) is None:
        print("backup: only SQLite databases are backed up here; use pg_dump for PostgreSQL", file=sys.stderr)
        return 2
    try:
        return _backup_and_rotate(cfg, args.path)
    except backup.BackupError as exc:
        print("backup: %s" % exc, file=sys.stderr)
        return 2


def cmd_restore(cfg, args) -> int:
    """Put a backup file in place of the SQLite database (the services must be stopped).

    Exit 0 restored, 2 refused (in use without --force, unreadable or foreign file) or failed.
    """
    path = _sqlite_file(cfg)
    if path is None:
        print("restore: only SQLite databases are restored here; use pg_restore for PostgreSQL", file=sys.stderr)
        return 2
    if not args.path:
        print("restore: which file? python manage.py restore FILE [--force]", file=sys.stderr)
        return 2
    try:
        result = backup.restore(args.path, path, _backup_dir(cfg), force=args.force)
    except backup.BackupError as exc:
        print("restore: %s" % exc, file=sys.stderr)
        return 2
    print("restored %s into %s (integrity_check ok, %d tables)" % (os.path.abspath(args.path), path,
                                                                 len(result.counts)))
    if result.previous:
        print("the previous database is kept as %s" % result.previous)
    print("next: make migrate (if the backup is older than the code), make audit, then start the services")
    return 0


def _become_data_owner(cfg) -> None:
    """Run as root (`sudo make backup`)? Switch to the owner of the data folder (the `medialab`
    user of an installed copy) so no file we create (backup, -wal, -shm, a restored database)
    ends up owned by root where the services cannot open it."""
    if os.geteuid() != 0:
        return
    folder = os.path.dirname(_sqlite_file(cfg) or "") or os.path.join(config.ROOT, cfg.data_dir)
    try:
        st = os.stat(folder)
    except OSError:
        return
    if st.st_uid != 0:
        os.setgroups([])
        os.setgid(st.st_gid)
        os.setuid(st.st_uid)


COMMANDS = {"check": cmd_check, "migrate": cmd_migrate, "status": cmd_status, "seed-promo": cmd_seed_promo,
            "audit": cmd_audit, "backup": cmd_backup, "restore": cmd_restore, "env-example": None}


def main(argv=None) -> int:
    """Parse the command line, load the configuration, run one command; return the exit code."""
    parser = argparse.ArgumentParser(prog="manage.py", description=__doc__)
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("path", nargs="?", help="backup: target file (default: a new one in <data>/backup); "
                                               "restore: the backup to put in place")
    parser.add_argument("--json", action="store_true", help="audit: print JSON")
    parser.add_argument("--since-id", type=int, default=None, metavar="N",
                        help="audit: only the ledger rows after id N (a full audit found the rest clean)")
    parser.add_argument("--backup", action="store_true", help="migrate: back up first when migrations are pending")
    parser.add_argument("--force", action="store_true", help="restore: even while the database is in use")
    args = parser.parse_intermixed_args(argv)
    if args.command == "env-example":
        sys.stdout.write(config.env_example())
        return 0
    if args.path:
        args.path = os.path.abspath(args.path)     # a file named by the caller, from the caller's folder
    try:
        cfg = config.configure(config.load(require_token=args.command == "check"))
    except config.ConfigError as exc:
        return startup.refuse(exc)
    startup.configure_logging(cfg, level="WARNING")
    if _sqlite_file(cfg):  # like the services (WorkingDirectory = the project), whatever the caller's folder
        cfg = config.configure(cfg.replace(database_url="sqlite:///" + _sqlite_file(cfg)))
    _become_data_owner(cfg)
    models.init_db(cfg.database_url)
    try:
        return COMMANDS[args.command](cfg, args)
    except models.NotMigrated as exc:
        return startup.refuse(exc)
    except peewee.OperationalError as exc:
        return startup.refuse(startup.Unavailable("the database %s does not answer (%s)" % (
            config._no_password(cfg.database_url), str(exc).strip().splitlines()[0] if str(exc).strip() else
            type(exc).__name__)))


if __name__ == "__main__":
    sys.exit(main())
