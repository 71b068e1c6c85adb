"""Operator commands: `python manage.py migrate | status | seed-promo | audit | backup [PATH]`.

Each is what a `make` target runs. Exit codes: 0 ok, 1 a check failed (audit, pending
migrations), 2 bad configuration or usage.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys

import config
import models

logger = logging.getLogger("manage")


def cmd_migrate(cfg, args) -> int:
    """Apply pending migrations and print their names."""
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
    report = billing.audit()
    if args.json:
        print(json.dumps({"ok": report.ok, "violations": report.violations, "summary": report.summary},
                         default=str, ensure_ascii=False))
    else:
        print("audit summary:")
        for key, value in report.summary.items():
            print("  %-20s %s" % (key, value))
        if report.ok:
            print("audit: OK — all invariants hold (I1–I11)")
        else:
            print("audit: %d VIOLATION(S)" % len(report.violations))
            for line in report.violations:
                print("  " + line)
    return 0 if report.ok else 1


def cmd_backup(cfg, args) -> int:
    """Copy the SQLite database with the online backup API (safe while the bot runs)."""
    url = cfg.database_url
    if not url.startswith("sqlite:///"):
        print("backup: only SQLite databases are backed up here; use pg_dump for PostgreSQL")
        return 2
    source_path = url[len("sqlite:///"):]
    target = args.path or os.path.join(cfg.data_dir, "backup", "medialab-%s.db"
                                       % models.utcnow().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    source = sqlite3.connect(source_path)
    dest = sqlite3.connect(target)
    try:
        with dest:
            source.backup(dest)       # sqlite3.Connection.backup: page-by-page, consistent snapshot
        check = dest.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        dest.close()
        source.close()
    print("backup written: %s (integrity_check: %s)" % (target, check))
    return 0 if check == "ok" else 1


COMMANDS = {"migrate": cmd_migrate, "status": cmd_status, "seed-promo": cmd_seed_promo,
            "audit": cmd_audit, "backup": cmd_backup}


def main(argv=None) -> int:
    """Parse the command line, load the configuration, run one command; return the exit code."""
    parser = argparse.ArgumentParser(prog="manage.py", description=__doc__)
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("path", nargs="?", help="backup: target file")
    parser.add_argument("--json", action="store_true", help="audit: print JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config.configure(config.load(require_token=False))
    except config.ConfigError as exc:
        print("configuration problems:", file=sys.stderr)
        for line in exc.problems:
            print("  - " + line, file=sys.stderr)
        return 2
    models.init_db(cfg.database_url)
    try:
        return COMMANDS[args.command](cfg, args)
    except models.NotMigrated as exc:
        print(str(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
