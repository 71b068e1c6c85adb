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
