"""Heartbeats: one row per name with a timestamp and a counter — process liveness
(``process:bot``, ``process:worker``, ``process:web``), the last run of the periodic tasks
(``task:sweep``, ``task:reconcile``), alert dedupe (``alert:<key>``) and webhook outcome counts
(``webhook:<status>:<detail>``). Read by ``/health``, ``/metrics`` and the worker's watchdog.

A frozen copy of the model, like 0001.
"""
from peewee import *


def up(migrator, db):
    class Heartbeat(Model):
        name = CharField(primary_key=True)
        at = DateTimeField(null=True)
        value = BigIntegerField(default=0)
        class Meta:
            database = db
            table_name = 'heartbeat'
    db.create_tables([Heartbeat])


def down(migrator, db):
    migrator.migrate(migrator.drop_table('heartbeat'))
