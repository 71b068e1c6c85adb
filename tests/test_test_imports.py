"""Tests share helpers, not each other: no file under tests/ imports a test module or conftest.

Shared plain functions live in tests/helpers.py, shared fixtures in tests/conftest.py (pytest
provides those without an import).
"""
import ast
import os

TESTS = os.path.dirname(os.path.abspath(__file__))


def forbidden_imports(path: str) -> list[str]:
    """The test modules (``test_*``) and ``conftest`` that the file at ``path`` imports."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = ("tests." if node.level else "") + (node.module or "")
            names += [module] if node.module else []
            if module.rstrip(".") == "tests":             # from tests import test_x / from . import x
                names += ["tests." + alias.name for alias in node.names]
    return [name for name in names if _is_test_module(name)]


def _is_test_module(name: str) -> bool:
    parts = name.split(".")
    if parts[0] == "tests":
        parts = parts[1:2]                                 # the module right under tests/
    elif len(parts) > 1:
        return False                                       # another package's module
    return bool(parts) and (parts[0] == "conftest" or parts[0].startswith("test_"))


def test_no_test_module_imports_another_test_module_or_conftest():
    offenders = []
    for folder, _, files in os.walk(TESTS):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                offenders += ["%s imports %s" % (os.path.relpath(path, TESTS), imported)
                              for imported in forbidden_imports(path)]
    assert not offenders, "; ".join(offenders) + " (move shared helpers to tests/helpers.py)"


def test_the_checker_catches_each_form(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text("from tests.test_bot import USER\nimport tests.test_pipeline\nfrom tests import test_web, helpers\n"
                   "from tests.conftest import ROOT\nfrom .test_worker import drain\nfrom . import conftest\n"
                   "import test_media\n")
    assert forbidden_imports(str(bad)) == ["tests.test_bot", "tests.test_pipeline", "tests.test_web", "tests.conftest",
                                           "tests.test_worker", "tests.conftest", "test_media"]
    fine = tmp_path / "test_fine.py"
    fine.write_text("from tests.helpers import audit_ok\nfrom tests.fakes.telegram import FakeTelegram\n"
                    "from tests import billing_harness\nimport testing_lib\n")
    assert forbidden_imports(str(fine)) == []
