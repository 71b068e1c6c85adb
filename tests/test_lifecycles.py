"""Issue 10 §3: the Generation and Payment lifecycles are one table each (models.py), and every
status change goes through `models.move`.

The test walks each table: every allowed pair moves a row, every other pair is refused without a
write, and no module changes a status any other way.
"""
import ast
import os
import uuid

import pytest

import billing
import models
from models import GENERATION_STATES, PAYMENT_STATES, Generation, Payment, utcnow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [(Generation, GENERATION_STATES, models.GENERATION_TRANSITIONS),
         (Payment, PAYMENT_STATES, models.PAYMENT_TRANSITIONS)]


def row(model, status):
    user, _ = billing.get_or_create_user(4242, free_operations=0)
    if model is Generation:
        return Generation.create(user=user.id, chat_id=1, mode="generate", status=status).id
    now = utcnow()
    return Payment.create(id=uuid.uuid4(), user=user.id, credits=10, amount_kopecks=1000, status=status,
                          created_at=now, updated_at=now).id


def test_every_state_has_a_row_in_its_table():
    for _, states, table in CASES:
        assert set(table) == set(states)
        assert all(set(targets) <= set(states) for targets in table.values())


@pytest.mark.parametrize("model, states, table", CASES, ids=["generation", "payment"])
def test_the_table_is_walked_and_everything_else_refused(database, model, states, table):
    for source in states:
        for target in states:
            row_id = row(model, source)
            if target in table[source]:
                assert models.move(model, row_id, source, target) is True, (source, target)
                assert model.get_by_id(row_id).status == target
                assert models.move(model, row_id, source, target) is False      # once
            else:
                with pytest.raises(models.IllegalTransition):
                    models.move(model, row_id, source, target)
                assert model.get_by_id(row_id).status == source                 # nothing written


def test_a_move_from_the_wrong_state_changes_nothing(database):
    gid = row(Generation, "delivered")
    assert models.move(Generation, gid, ("queued", "running"), "failed") is False
    assert Generation.get_by_id(gid).status == "delivered"


def test_no_module_changes_a_status_without_move():
    offenders = []
    for name in os.listdir(ROOT):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(ROOT, name), encoding="utf-8").read())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "update" and any(k.arg == "status" for k in node.keywords)):
                offenders.append("%s:%d" % (name, node.lineno))
    assert offenders == ["models.py:%d" % _move_line()], offenders


def _move_line():
    tree = ast.parse(open(os.path.join(ROOT, "models.py"), encoding="utf-8").read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "move")
    return next(n.lineno for n in ast.walk(fn) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "update")
