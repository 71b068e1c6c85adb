"""Money leaks closed (issue 9): a cap on a discount, reconciliation bookkeeping per order
(round-robin with backoff, the needs_attention state), refund notices, admin commands keyed on
their update, and the public FREE_ACCESS code of earlier releases switched off.

New columns are nullable so SQLite adds them in place (no table rebuild).
"""
from peewee import *


def up(migrator, db):
    migrator.migrate(
        migrator.add_column('promo_code', 'max_discount_kopecks', BigIntegerField(null=True)),
        migrator.add_column('payment', 'checked_at', DateTimeField(null=True)),
        migrator.add_column('payment', 'next_check_at', DateTimeField(null=True)),
        migrator.add_column('payment', 'check_attempts', IntegerField(null=True)),
        migrator.add_column('payment', 'problem', TextField(null=True)),
        migrator.add_index('payment', ('next_check_at',), False),
        migrator.add_column('refund', 'notified_at', DateTimeField(null=True)),
    )

    class AdminAction(Model):
        key = CharField(primary_key=True)
        created_at = DateTimeField()

        class Meta:
            database = db
            table_name = 'admin_action'
    db.create_tables([AdminAction])

    # Earlier releases seeded FREE_ACCESS with no limit and no expiry, and the README named it:
    # anyone could generate for free forever. Switch such a code off (an admin can turn it back
    # on with /promo_on, or create a limited one with /promo_add).
    db.execute_sql(
        "UPDATE promo_code SET active = %s WHERE code = 'FREE_ACCESS' AND kind = 'free_access' "
        "AND max_uses IS NULL AND free_access_days IS NULL AND expires_at IS NULL"
        % ("false" if isinstance(db, PostgresqlDatabase) else "0"))


def down(migrator, db):
    migrator.migrate(migrator.drop_table('admin_action'))
    migrator.migrate(
        migrator.drop_index('payment', 'payment_next_check_at'),
        migrator.drop_column('refund', 'notified_at'),
        migrator.drop_column('payment', 'problem'),
        migrator.drop_column('payment', 'check_attempts'),
        migrator.drop_column('payment', 'next_check_at'),
        migrator.drop_column('payment', 'checked_at'),
        migrator.drop_column('promo_code', 'max_discount_kopecks'),
    )
