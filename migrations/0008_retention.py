"""Conversation states and once-only keys stop growing (issue 13 §3): indexes on
conversation_state(updated_at) and admin_action(created_at), so the sweeper deletes what is older
than STATE_RETENTION_DAYS by an index range (O(rows deleted), not a scan of every chat).
"""
from peewee import *


def up(migrator, db):
    migrator.migrate(
        migrator.add_index('conversation_state', ('updated_at',), False),
        migrator.add_index('admin_action', ('created_at',), False),
    )


def down(migrator, db):
    migrator.migrate(
        migrator.drop_index('admin_action', 'admin_action_created_at'),
        migrator.drop_index('conversation_state', 'conversation_state_updated_at'),
    )
