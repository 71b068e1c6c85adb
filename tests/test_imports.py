"""Issue 10 §1: importing any module does nothing but define things.

Each top-level module is imported in a fresh interpreter with an empty environment, in an empty
working directory, with network connections refused: nothing may be written, no database bound,
no migration checked, no connection opened, no configuration error raised.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(name[:-3] for name in os.listdir(ROOT)
                 if name.endswith(".py") and name not in ("conftest.py", "setup.py"))

PROBE = r"""
import os, socket, sys
sys.path.insert(0, %(root)r)
def refuse(*args, **kwargs):
    raise AssertionError("network at import: %%r" %% (args,))
socket.socket.connect = refuse
socket.create_connection = refuse
import %(module)s
import models
assert models.db.obj is None, "a database was bound at import"
print("OK")
"""


@pytest.mark.parametrize("module", MODULES)
def test_importing_does_nothing(module, tmp_path):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", PROBE % {"root": ROOT, "module": module}], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "OK", result.stderr[-2000:]
    assert os.listdir(tmp_path) == [], "files created at import: %s" % os.listdir(tmp_path)


def test_the_module_list_is_complete():
    assert {"bot", "web", "worker", "payments", "media", "config", "billing", "models"} <= set(MODULES)
