"""Initial schema: users, balances, the append-only ledger, reservations, generations,
payments, promo codes and redemptions, refunds, conversation state.

Generated with `pwmigrate ... initial models:ALL_MODELS` (a frozen copy of the models, so
later model changes never change what this file creates), then extended by hand with the
CHECK constraints and the triggers that make the ledger append-only and reservation end
states final, on SQLite and PostgreSQL alike.
"""
import uuid

from peewee import *

SQLITE_TRIGGERS = [
    """CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
       BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END""",
    """CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
       BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END""",
    """CREATE TRIGGER reservation_final BEFORE UPDATE ON reservation
       WHEN OLD.state != 'reserved'
       BEGIN SELECT RAISE(ABORT, 'reservation already resolved'); END""",
    """CREATE TRIGGER reservation_no_delete BEFORE DELETE ON reservation
       BEGIN SELECT RAISE(ABORT, 'reservations are never deleted'); END""",
]

POSTGRES_TRIGGERS = [
    """CREATE OR REPLACE FUNCTION medialab_append_only() RETURNS trigger AS $$
       BEGIN RAISE EXCEPTION 'ledger is append-only'; END; $$ LANGUAGE plpgsql""",
    """CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
       FOR EACH ROW EXECUTE FUNCTION medialab_append_only()""",
    """CREATE OR REPLACE FUNCTION medialab_reservation_final() RETURNS trigger AS $$
       BEGIN
         IF TG_OP = 'DELETE' THEN RAISE EXCEPTION 'reservations are never deleted'; END IF;
         IF OLD.state <> 'reserved' THEN RAISE EXCEPTION 'reservation already resolved'; END IF;
         RETURN NEW;
       END; $$ LANGUAGE plpgsql""",
    """CREATE TRIGGER reservation_final BEFORE UPDATE OR DELETE ON reservation
       FOR EACH ROW EXECUTE FUNCTION medialab_reservation_final()""",
]


def up(migrator, db):
    class User(Model):
        telegram_id = BigIntegerField(unique=True)
        username = CharField(null=True)
        first_name = CharField(null=True)
        language_code = CharField(null=True)
        email = CharField(null=True)
        created_at = DateTimeField()
        last_seen_at = DateTimeField()
        is_blocked = BooleanField(default=False)
        has_free_access = BooleanField(default=False)
        free_access_until = DateTimeField(null=True)
        class Meta:
            database = db
            table_name = 'user'
    db.create_tables([User])

    class Balance(Model):
        user = ForeignKeyField(User, on_delete='RESTRICT')
        asset = CharField()
        available = BigIntegerField(default=0, constraints=[Check('available >= 0')])
        reserved = BigIntegerField(default=0, constraints=[Check('reserved >= 0')])
        class Meta:
            database = db
            table_name = 'balance'
            indexes = ((('user', 'asset'), True),)
    db.create_tables([Balance])

    class ConversationState(Model):
        key = CharField(primary_key=True)
        state = CharField(null=True)
        data = JSONField(default=dict)
        updated_at = DateTimeField()
        class Meta:
            database = db
            table_name = 'conversation_state'
    db.create_tables([ConversationState])

    class Reservation(Model):
        user = ForeignKeyField(User, on_delete='RESTRICT')
        asset = CharField()
        amount = BigIntegerField()
        price = BigIntegerField()
        state = CharField(index=True, default='reserved')
        reference = CharField()
        idempotency_key = CharField(unique=True)
        created_at = DateTimeField()
        expires_at = DateTimeField(index=True)
        resolved_at = DateTimeField(null=True)
        class Meta:
            database = db
            table_name = 'reservation'
    db.create_tables([Reservation])

    class Generation(Model):
        id = UUIDField(primary_key=True, default=uuid.uuid4)
        user = ForeignKeyField(User, on_delete='RESTRICT')
        chat_id = BigIntegerField()
        mode = CharField()
        status = CharField(index=True, default='queued')
        prompt = TextField(null=True)
        options = JSONField(default=dict)
        input_file_ids = JSONField(default=list)
        cost = IntegerField(default=0)
        reservation = ForeignKeyField(Reservation, null=True, on_delete='RESTRICT')
        endpoint = CharField(null=True)
        fal_request_id = CharField(null=True)
        attempts = IntegerField(default=0)
        status_message_id = BigIntegerField(null=True)
        result_message_id = BigIntegerField(null=True)
        seed = BigIntegerField(null=True)
        error = TextField(null=True)
        created_at = DateTimeField(index=True)
        started_at = DateTimeField(null=True)
        heartbeat_at = DateTimeField(null=True)
        finished_at = DateTimeField(null=True)
        class Meta:
            database = db
            table_name = 'generation'
    db.create_tables([Generation])

    class LedgerEntry(Model):
        user = ForeignKeyField(User, on_delete='RESTRICT')
        asset = CharField()
        kind = CharField()
        amount = BigIntegerField()
        delta_available = BigIntegerField()
        delta_reserved = BigIntegerField()
        available_after = BigIntegerField()
        reserved_after = BigIntegerField()
        reference = CharField()
        idempotency_key = CharField(unique=True)
        shortfall = BigIntegerField(default=0)
        created_at = DateTimeField()
        class Meta:
            database = db
            table_name = 'ledger'
    db.create_tables([LedgerEntry])

    class PromoCode(Model):
        code = CharField(unique=True)
        kind = CharField()
        percent = IntegerField(default=0)
        free_access_days = IntegerField(null=True)
        max_uses = IntegerField(null=True)
        uses = IntegerField(default=0)
        expires_at = DateTimeField(null=True)
        active = BooleanField(default=True)
        created_at = DateTimeField()
        class Meta:
            database = db
            table_name = 'promo_code'
    db.create_tables([PromoCode])

    class Payment(Model):
        id = UUIDField(primary_key=True, default=uuid.uuid4)
        user = ForeignKeyField(User, on_delete='RESTRICT')
        credits = BigIntegerField()
        amount_kopecks = BigIntegerField()
        currency = CharField(default='RUB')
        promo = ForeignKeyField(PromoCode, null=True, on_delete='RESTRICT')
        discount_percent = IntegerField(default=0)
        status = CharField(index=True, default='pending')
        yookassa_payment_id = CharField(unique=True, null=True)
        confirmation_url = TextField(null=True)
        test = BooleanField(default=False)
        refunded_kopecks = BigIntegerField(default=0)
        created_at = DateTimeField(index=True)
        updated_at = DateTimeField()
        succeeded_at = DateTimeField(null=True)
        notified_at = DateTimeField(null=True)
        cancel_reason = CharField(null=True)
        class Meta:
            database = db
            table_name = 'payment'
    db.create_tables([Payment])

    class PromoRedemption(Model):
        promo = ForeignKeyField(PromoCode, on_delete='RESTRICT')
        user = ForeignKeyField(User, on_delete='RESTRICT')
        payment = ForeignKeyField(Payment, null=True, on_delete='RESTRICT')
        state = CharField(default='reserved')
        created_at = DateTimeField()
        updated_at = DateTimeField()
        class Meta:
            database = db
            table_name = 'promo_redemption'
            indexes = ((('promo', 'user'), True),)
    db.create_tables([PromoRedemption])

    class Refund(Model):
        id = CharField(primary_key=True)
        payment = ForeignKeyField(Payment, on_delete='RESTRICT')
        amount_kopecks = BigIntegerField()
        credits_requested = BigIntegerField()
        credits_debited = BigIntegerField()
        shortfall = BigIntegerField(default=0)
        created_at = DateTimeField()
        class Meta:
            database = db
            table_name = 'refund'
    db.create_tables([Refund])

    triggers = POSTGRES_TRIGGERS if isinstance(db, PostgresqlDatabase) else SQLITE_TRIGGERS
    for statement in triggers:
        db.execute_sql(statement)


def down(migrator, db):
    if isinstance(db, PostgresqlDatabase):
        db.execute_sql('DROP FUNCTION IF EXISTS medialab_append_only() CASCADE')
        db.execute_sql('DROP FUNCTION IF EXISTS medialab_reservation_final() CASCADE')
    migrator.migrate(migrator.drop_table('refund'))
    migrator.migrate(migrator.drop_table('promo_redemption'))
    migrator.migrate(migrator.drop_table('payment'))
    migrator.migrate(migrator.drop_table('promo_code'))
    migrator.migrate(migrator.drop_table('ledger'))
    migrator.migrate(migrator.drop_table('generation'))
    migrator.migrate(migrator.drop_table('reservation'))
    migrator.migrate(migrator.drop_table('conversation_state'))
    migrator.migrate(migrator.drop_table('balance'))
    migrator.migrate(migrator.drop_table('user'))
