"""The scale-out path is configuration, not a rewrite: QUEUE_URL=redis://… gives a RedisHuey that
carries the same tasks; DATABASE_URL=postgresql://… is covered by the `any_database` tests.

Runs against the real Redis named by TEST_REDIS_URL (CI sets it); skipped with the reason
otherwise.
"""
import os
import uuid

import pytest
from huey import MemoryHuey, RedisHuey, SqliteHuey

import worker

REDIS_URL = os.environ.get("TEST_REDIS_URL", "")
needs_redis = pytest.mark.skipif(not REDIS_URL, reason="TEST_REDIS_URL is not set: Redis queue test skipped (CI sets it)")


def test_queue_url_picks_the_backend(tmp_path):
    assert isinstance(worker.make_huey("memory://"), MemoryHuey)
    sqlite_huey = worker.make_huey("sqlite:///" + str(tmp_path / "q" / "queue.db"))
    assert isinstance(sqlite_huey, SqliteHuey)
    assert os.path.isdir(tmp_path / "q")
    assert isinstance(worker.make_huey("redis://127.0.0.1:6379/15"), RedisHuey)
    with pytest.raises(ValueError):
        worker.make_huey("amqp://127.0.0.1")


@needs_redis
def test_a_task_travels_through_redis():
    huey = worker.make_huey(REDIS_URL)
    huey.storage.conn.ping()
    huey.flush()
    seen = []

    @huey.task()
    def record(value):
        seen.append(value)
        return value

    token = str(uuid.uuid4())
    record(token)
    assert huey.pending_count() == 1
    task = huey.dequeue()
    huey.execute(task)
    assert seen == [token]
    assert huey.pending_count() == 0
    huey.flush()


def test_a_postgresql_database_pools_its_connections():
    """Each request, task and update opens and closes its connection: on PostgreSQL a closed
    connection goes back to the pool (a new one is a new server process), rolled back if a
    transaction was left open; `discard` closes them all."""
    import models
    from tests.helpers import postgres_url
    url = postgres_url()
    if not url:
        pytest.skip("TEST_POSTGRES_URL is not set: PostgreSQL tests skipped (CI sets it)")
    database = models.open_database(url)
    database.connect()
    first = database.connection()
    backend = database.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    database.execute_sql("BEGIN")
    database.close()                                       # back to the pool, the open transaction rolled back
    database.connect()
    assert database.connection() is first
    assert database.execute_sql("SELECT pg_backend_pid()").fetchone()[0] == backend
    assert database.execute_sql("SELECT now() = statement_timestamp()").fetchone()[0] is True   # not in a transaction
    database.close()
    models.discard(database)
    assert first.closed
