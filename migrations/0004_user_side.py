"""The user's side (issue 11): drafts of refused or failed jobs (one per user, kept DRAFT_TTL),
the Telegram file id of each delivered result (/history re-sends it; no image bytes kept), and
who referred a user (/start ref_<code>).

New columns are nullable so SQLite adds them in place (no table rebuild); the draft table is a
frozen copy of the model, like 0001.
"""
from peewee import *


def up(migrator, db):
    migrator.migrate(
        migrator.add_column('generation', 'result_file_id', CharField(null=True)),
        migrator.add_column('user', 'referred_by', BigIntegerField(null=True)),
    )

    class User(Model):
        class Meta:
            database = db
            table_name = 'user'

    class Draft(Model):
        user = ForeignKeyField(User, unique=True, on_delete='RESTRICT')
        token = CharField()
        chat_id = BigIntegerField()
        mode = CharField()
        prompt = TextField(null=True)
        options = JSONField(default=dict)
        input_file_ids = JSONField(default=list)
        reason = CharField()
        resume_on_payment = BooleanField(default=False)
        created_at = DateTimeField()
        expires_at = DateTimeField(index=True)

        class Meta:
            database = db
            table_name = 'draft'
    db.create_tables([Draft])


def down(migrator, db):
    migrator.migrate(migrator.drop_table('draft'))
    migrator.migrate(
        migrator.drop_column('user', 'referred_by'),
        migrator.drop_column('generation', 'result_file_id'),
    )
