"""scripts/run_all.py (`make run`): the first child to exit stops the others cleanly; Ctrl-C on the
supervisor stops them all; no traceback, no "Segmentation fault"."""
import os
import shlex
import signal
import subprocess
import sys
import time

from tests.helpers import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "run_all.py")
PY = sys.executable


def child(marker, signame="SIGTERM"):
    """A long-running child that writes `marker` once started and exits 0 on `signame` (it waits
    for signals, not for time)."""
    code = ("import signal, sys; signal.signal(signal.%s, lambda *a: sys.exit(0)); "
            "open(%r, 'w').close(); signal.pause()" % (signame, str(marker)))
    return '%s -c "%s"' % (PY, code)


def failing_child(markers, code=3):
    """A child that exits with `code` once the other children wrote their `markers` (polled with
    a deadline)."""
    script = ("import os, sys, time; d = time.monotonic() + 20\n"
              "while not all(os.path.exists(p) for p in %r) and time.monotonic() < d: time.sleep(0.02)\n"
              "sys.exit(%d)" % ([str(m) for m in markers], code))
    return "%s -c %s" % (PY, shlex.quote(script))


def wait_for(paths, deadline=20.0):
    stop_at = time.monotonic() + deadline
    while not all(os.path.exists(p) for p in paths):
        assert time.monotonic() < stop_at, "children did not start"
        time.sleep(0.02)    # polling files written by other processes, bounded by the deadline


def test_the_first_exit_stops_the_others(tmp_path):
    started = time.monotonic()
    markers = [tmp_path / "w", tmp_path / "h"]
    out = subprocess.run([PY, SCRIPT, "worker=" + child(markers[0], "SIGINT"), "web=" + child(markers[1]),
                          "bot=" + failing_child(markers)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert time.monotonic() - started < 20                 # nobody waited for the children's own end
    assert "bot exited with 3, stopping the others" in out.stderr
    assert "Traceback" not in out.stderr and "Segmentation" not in out.stderr and "killing" not in out.stderr


def test_ctrl_c_stops_everything(tmp_path):
    markers = [tmp_path / "w", tmp_path / "h"]
    proc = subprocess.Popen([PY, SCRIPT, "worker=" + child(markers[0], "SIGINT"), "web=" + child(markers[1])],
                            stderr=subprocess.PIPE, text=True)
    wait_for(markers)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "SIGINT, stopping" in err and "Traceback" not in err and "killing" not in err


def test_usage():
    out = subprocess.run([PY, SCRIPT, "nonsense"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "usage" in out.stderr
