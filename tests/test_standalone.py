"""The repository stands alone: a user's clone has nothing beside it.

No tracked file may read or cite a path outside the checkout (``../something``, an absolute path
into the developer's machine, or the planning folder that sat beside the first checkouts). Facts
the code relies on live in ``docs/``, fixtures in ``tests/fixtures/``.
"""
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `../x` as a path (not `...`), an explicit walk out of the repo root, the old planning folder,
# and absolute paths of the machines the project was built on.
OUTSIDE = re.compile(
    r"(?<![.\w])\.\./(?!\.)"                 # ../anything
    r"|[\"']\.\.[\"']"                        # os.path.join(ROOT, "..", ...)
    r"|\bshared/(fixtures|notes|seeds|SPEC)"  # the planning folder beside the first checkouts
    r"|/work/|/root/"                         # absolute paths of a developer's machine
)
# Places where `../` is not a path out of the repository.
ALLOWED = {
    "tests/test_standalone.py",  # this file names the patterns it looks for
}


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: cannot list the tracked files")
    return [p for p in out.decode().split("\0") if p]


def offending_lines(root, files):
    found = []
    for rel in files:
        if rel in ALLOWED:
            continue
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                lines = f.readlines()
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
        for no, line in enumerate(lines, 1):
            if OUTSIDE.search(line):
                found.append("%s:%d: %s" % (rel, no, line.strip()[:120]))
    return found


def test_no_tracked_file_reaches_outside_the_repository():
    found = offending_lines(ROOT, tracked_files())
    assert not found, "tracked files read or cite paths outside the repository:\n" + "\n".join(found)


def test_the_check_catches_each_form(tmp_path):
    up, planning = "..", "shar" + "ed"  # spelled in pieces so this file does not match itself
    samples = {
        "a.py": 'FIXTURES = os.path.join(ROOT, "%s", "%s", "fixtures")\n' % (up, planning),
        "b.py": "# see %s/%s/notes/ledger.md\n" % (up, planning),
        "c.md": "The product is %s/SPEC.md\n" % planning,
        "d.sh": "cp /work/%s/x .\n" % planning,
        "ok.py": "x = a[...]  # nothing outside\nopen(os.path.join(ROOT, 'tests', 'fixtures'))\n",
    }
    for name, text in samples.items():
        (tmp_path / name).write_text(text)
    found = offending_lines(str(tmp_path), sorted(samples))
    assert sorted(f.split(":")[0] for f in found) == ["a.py", "b.py", "c.md", "d.sh"]


def test_fixtures_ship_with_the_tests():
    here = os.path.join(ROOT, "tests", "fixtures", "yookassa")
    for name in ("payment.succeeded.json", "payment.canceled.json", "payment.waiting_for_capture.json",
                 "refund.succeeded.json", "ip-allowlist.txt"):
        assert os.path.getsize(os.path.join(here, name)) > 0, name
