"""Telegram Stars as a second way to top up (issue 12): a payment's `provider` (``yookassa`` for
every existing order, ``stars``) and the Telegram charge id of a Stars payment, unique, so one
charge can be credited to one order only.

Both columns are nullable so SQLite adds them in place (no table rebuild); existing rows get
``provider = 'yookassa'``.
"""
from peewee import *


def up(migrator, db):
    migrator.migrate(
        migrator.add_column('payment', 'provider', CharField(default='yookassa', null=True)),
        migrator.add_column('payment', 'telegram_charge_id', CharField(null=True, unique=True)),
    )
    db.execute_sql("UPDATE payment SET provider = 'yookassa' WHERE provider IS NULL")


def down(migrator, db):
    migrator.migrate(
        migrator.drop_index('payment', 'payment_telegram_charge_id'),
        migrator.drop_column('payment', 'telegram_charge_id'),
        migrator.drop_column('payment', 'provider'),
    )
