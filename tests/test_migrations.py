"""migrations/ against models.py: a blank database migrated to head has exactly the schema the
models describe (peewee's schema_diff, plus a stricter comparison of column types,
nullability, CHECK constraints and indexes against tables created from the models), migrating
again is a no-op, an unmigrated database is refused with the pending names, and down() then
up() round-trips. SQLite always; PostgreSQL with TEST_POSTGRES_URL.
"""
import json
import re

import pytest
from peewee import IntegrityError, PostgresqlDatabase
from playhouse.migrations import Runner
from playhouse.schema_diff import diff_models

import billing
import config
import models
from tests.helpers import postgres_url

HEAD = ["0001_initial", "0002_money_leaks", "0003_heartbeat", "0004_user_side", "0005_stars", "0006_growth_indexes",
        "0007_mode_flow_states", "0008_retention"]
SQLITE_TRIGGERS = {"ledger_no_update", "ledger_no_delete", "reservation_final", "reservation_no_delete"}
PG_TRIGGERS = {"ledger_append_only", "reservation_final"}


def blank_sqlite(tmp_path, name="blank.db"):
    return models.open_database("sqlite:///" + str(tmp_path / name))


def unnamed(ddl):
    """An index's DDL without its name: 0001's frozen models name indexes after the class
    (`ledgerentry_user_id`), the live models after the table (`ledger_user_id`)."""
    return re.sub(r'INDEX "?[\w]+"? ON', "INDEX ON", ddl)


def sqlite_schema(database):
    """Tables and indexes as SQLite stores their DDL (the migration history table left out)."""
    rows = database.execute_sql(
        "SELECT type, tbl_name, sql FROM sqlite_master WHERE type IN ('table', 'index') "
        "AND name NOT LIKE 'sqlite_%' AND tbl_name != 'schema_migration'").fetchall()
    return sorted((kind, table, unnamed(sql)) for kind, table, sql in rows)


def sqlite_triggers(database):
    return {row[0] for row in database.execute_sql("SELECT name FROM sqlite_master WHERE type = 'trigger'")}


def assert_no_diff(database):
    diff = diff_models(database, models.ALL_MODELS)
    assert not diff, "schema differs from the models:\n%s" % diff


# --- SQLite ----------------------------------------------------------------------------------

def test_a_blank_sqlite_database_migrates_to_the_models(tmp_path):
    database = blank_sqlite(tmp_path)
    assert models.migrate(database) == HEAD
    assert_no_diff(database)
    assert sqlite_triggers(database) == SQLITE_TRIGGERS


def test_the_migrated_sqlite_schema_is_exactly_what_the_models_create(tmp_path):
    """Stricter than schema_diff (which ignores types, NULL, CHECK): the DDL of every table
    and index equals the DDL peewee emits for the models themselves."""
    migrated = blank_sqlite(tmp_path, "migrated.db")
    models.migrate(migrated)
    reference = blank_sqlite(tmp_path, "reference.db")
    with reference.bind_ctx(models.ALL_MODELS):
        reference.create_tables(models.ALL_MODELS)
    assert sqlite_schema(migrated) == sqlite_schema(reference)


def test_migrating_twice_is_a_no_op(tmp_path):
    database = blank_sqlite(tmp_path)
    models.migrate(database)
    before = sqlite_schema(database), sqlite_triggers(database)
    assert models.migrate(database) == []
    assert models.pending_migrations(database) == []
    assert (sqlite_schema(database), sqlite_triggers(database)) == before


def test_an_unmigrated_database_is_refused_with_the_pending_names(tmp_path):
    database = blank_sqlite(tmp_path)
    assert models.pending_migrations(database) == HEAD
    with pytest.raises(models.NotMigrated) as caught:
        models.ensure_migrated(database)
    assert ", ".join(HEAD) in str(caught.value) and "make migrate" in str(caught.value)
    models.migrate(database)
    models.ensure_migrated(database)


def test_down_then_up_round_trips_on_sqlite(tmp_path, cfg):
    database = blank_sqlite(tmp_path)
    models.migrate(database)
    schema = sqlite_schema(database)
    runner = Runner(database, directory=models.MIGRATIONS_DIR)
    assert runner.down(target=HEAD[0]) == HEAD[::-1]
    assert set(database.get_tables()) == {"schema_migration"}
    assert sqlite_triggers(database) == set()
    assert models.pending_migrations(database) == HEAD
    assert runner.up() == HEAD
    assert sqlite_schema(database) == schema and sqlite_triggers(database) == SQLITE_TRIGGERS
    # …and the billing core works on the re-created schema.
    database.close()
    models.init_db("sqlite:///" + database.database)
    config.configure(cfg.replace(database_url="sqlite:///" + database.database))
    user, _ = billing.get_or_create_user(1)
    billing.commit(billing.reserve(user.id, 10, reference="g", idempotency_key="g", ttl=900).id)
    assert billing.audit().ok


def test_chats_in_an_old_per_mode_step_are_carried_into_the_one_flow(tmp_path):
    """0007: the states ratio/text/position/color of the earlier per-mode flows become prompt and
    option, with the typed input and the choices made so far where the new flow keeps them."""
    database = blank_sqlite(tmp_path)
    runner = Runner(database, directory=models.MIGRATIONS_DIR)
    runner.up(target="0006_growth_indexes")
    old = {"a": ("Step:ratio", {"mode": "generate", "prompt": "маяк", "flow": "t1"}),
           "b": ("Step:text", {"mode": "add_text", "files": [[1, "f"]], "flow": "t2"}),
           "c": ("Step:position", {"mode": "add_text", "text": "Привет", "flow": "t3"}),
           "d": ("Step:color", {"mode": "add_text", "text": "Привет", "position": "top", "flow": "t4"}),
           "e": ("Step:images", {"mode": "merge", "files": [], "flow": "t5"})}
    for key, (state, data) in old.items():
        database.execute_sql("INSERT INTO conversation_state (key, state, data, updated_at) VALUES (?, ?, ?, ?)",
                             (key, state, json.dumps(data), "2026-01-01 00:00:00"))
    assert runner.up() == ["0007_mode_flow_states", "0008_retention"]
    rows = {key: (state, json.loads(data)) for key, state, data
            in database.execute_sql("SELECT key, state, data FROM conversation_state")}
    assert rows == {
        "a": ("Step:option", {"mode": "generate", "input": "маяк", "option": "aspect_ratio", "chosen": {}, "flow": "t1"}),
        "b": ("Step:prompt", {"mode": "add_text", "files": [[1, "f"]], "flow": "t2"}),
        "c": ("Step:option", {"mode": "add_text", "input": "Привет", "option": "position", "chosen": {}, "flow": "t3"}),
        "d": ("Step:option", {"mode": "add_text", "input": "Привет", "option": "color", "chosen": {"position": "top"},
                         "flow": "t4"}),
        "e": old["e"]}


def test_the_check_constraints_exist(database):
    user, _ = billing.get_or_create_user(1)
    for column in ("available", "reserved"):
        with pytest.raises(IntegrityError), database.atomic():
            models.Balance.update(**{column: -1}).where(models.Balance.user == user.id).execute()


# --- PostgreSQL ------------------------------------------------------------------------------

@pytest.fixture
def blank_pg(cfg):
    url = postgres_url()
    if not url:
        pytest.skip("TEST_POSTGRES_URL is not set: PostgreSQL tests skipped (CI sets it)")
    database = models.init_db(url)
    database.execute_sql("DROP SCHEMA IF EXISTS models_ref CASCADE")
    database.execute_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    config.configure(cfg.replace(database_url=url))
    yield database
    database.execute_sql("DROP SCHEMA IF EXISTS models_ref CASCADE")
    database.close()


def pg_schema(database, schema):
    """Columns (type, length, NULL), CHECK constraints and indexes of `schema`, names made schema-free."""
    columns = database.execute_sql(
        "SELECT table_name, column_name, data_type, character_maximum_length, is_nullable "
        "FROM information_schema.columns WHERE table_schema = %s AND table_name != 'schema_migration'",
        (schema,)).fetchall()
    checks = database.execute_sql(
        "SELECT cl.relname, pg_get_constraintdef(c.oid) FROM pg_constraint c "
        "JOIN pg_class cl ON cl.oid = c.conrelid JOIN pg_namespace n ON n.oid = cl.relnamespace "
        "WHERE n.nspname = %s AND c.contype IN ('c', 'u', 'f', 'p') AND cl.relname != 'schema_migration'",
        (schema,)).fetchall()
    indexes = database.execute_sql(
        "SELECT tablename, replace(indexdef, %s, '') FROM pg_indexes "
        "WHERE schemaname = %s AND tablename != 'schema_migration' AND indexname NOT LIKE '%%_pkey'",
        (schema + ".", schema)).fetchall()
    return (sorted(columns), sorted((t, d.replace(schema + ".", "")) for t, d in checks),
            sorted((t, unnamed(d)) for t, d in indexes))


def pg_triggers(database):
    return {row[0] for row in database.execute_sql(
        "SELECT tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE NOT tgisinternal AND n.nspname = 'public'")}


def test_a_blank_postgresql_database_migrates_to_the_models(blank_pg):
    assert models.pending_migrations(blank_pg) == HEAD
    with pytest.raises(models.NotMigrated):
        models.ensure_migrated(blank_pg)
    assert models.migrate(blank_pg) == HEAD
    assert_no_diff(blank_pg)
    assert pg_triggers(blank_pg) == PG_TRIGGERS
    before = pg_schema(blank_pg, "public")
    assert models.migrate(blank_pg) == []
    assert pg_schema(blank_pg, "public") == before
    models.ensure_migrated(blank_pg)


def test_the_migrated_postgresql_schema_is_exactly_what_the_models_create(blank_pg):
    models.migrate(blank_pg)
    blank_pg.execute_sql("CREATE SCHEMA models_ref")
    reference = PostgresqlDatabase(blank_pg.database, **dict(blank_pg.connect_params,
                                                             options="-c search_path=models_ref"))
    with reference.bind_ctx(models.ALL_MODELS):
        reference.create_tables(models.ALL_MODELS, safe=False)
    reference.close()
    migrated, created = pg_schema(blank_pg, "public"), pg_schema(blank_pg, "models_ref")
    for part, name in zip(range(3), ("columns", "constraints", "indexes"), strict=True):
        assert migrated[part] == created[part], name


def test_down_then_up_round_trips_on_postgresql(blank_pg):
    models.migrate(blank_pg)
    schema = pg_schema(blank_pg, "public")
    runner = Runner(blank_pg, directory=models.MIGRATIONS_DIR)
    assert runner.down(target=HEAD[0]) == HEAD[::-1]
    assert set(blank_pg.get_tables()) == {"schema_migration"} and pg_triggers(blank_pg) == set()
    assert runner.up() == HEAD
    assert pg_schema(blank_pg, "public") == schema and pg_triggers(blank_pg) == PG_TRIGGERS
