"""scripts/run_all.py (`make run`): the first child to exit stops the others cleanly; Ctrl-C on the
supervisor stops them all; no traceback, no "Segmentation fault"."""
import os
import signal
import subprocess
import sys
import time

from tests.helpers import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "run_all.py")
PY = sys.executable


def child(marker, signame="SIGTERM"):
    """A long-running child that writes `marker` once started and exits 0 on `signame`."""
    code = ("import signal, sys, time; signal.signal(signal.%s, lambda *a: sys.exit(0)); "
            "open(%r, 'w').close(); time.sleep(120)" % (signame, str(marker)))
    return '%s -c "%s"' % (PY, code)


def wait_for(paths, deadline=20.0):
    stop_at = time.monotonic() + deadline
    while not all(os.path.exists(p) for p in paths):
        assert time.monotonic() < stop_at, "children did not start"
        time.sleep(0.02)    # polling files written by other processes, bounded by the deadline


def test_the_first_exit_stops_the_others(tmp_path):
    started = time.monotonic()
    out = subprocess.run([PY, SCRIPT, "worker=" + child(tmp_path / "w", "SIGINT"), "web=" + child(tmp_path / "h"),
                          "bot=%s -c \"import sys, time; time.sleep(1); sys.exit(3)\"" % PY],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert time.monotonic() - started < 20                 # nobody waited for the 120 s sleeps
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
