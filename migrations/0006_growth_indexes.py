"""Costs flat as data grows (issue 13 §3): an index on payment (status, notified_at), so the
worker's periodic search for succeeded payments whose user was never told
(`payments.unnotified_payments`) reads only those instead of every succeeded payment ever
(100,000 payments: 19.9 ms → see bench/bench_growth.py, growth_reconcile_scan_ms).
"""
from peewee import *


def up(migrator, db):
    migrator.migrate(migrator.add_index('payment', ('status', 'notified_at'), False))


def down(migrator, db):
    migrator.migrate(migrator.drop_index('payment', 'payment_status_notified_at'))
