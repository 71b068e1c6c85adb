"""`make run`: start named commands, wait for the first to exit, then stop the others cleanly.

    python scripts/run_all.py worker="huey_consumer …" web="gunicorn …" bot="python bot.py"

Each command runs in its own session (so a terminal's Ctrl-C reaches only this supervisor, which
then stops the children itself, in the order given reversed). The stop signal is SIGINT for the
worker (the consumer's graceful stop, ``-g INT``) and SIGTERM for the others (gunicorn's graceful
stop; the bot's default exit). Whoever is still running after GRACE seconds gets SIGKILL. Exit
status: that of the first command to exit (0 after Ctrl-C / SIGTERM to the supervisor).
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

GRACE = 20.0                                  # seconds the children get to stop
STOP_SIGNALS = {"worker": signal.SIGINT}      # default: SIGTERM


class _Stop(Exception):
    """The supervisor got SIGINT or SIGTERM (args[0]: the signal number)."""


def _stop(children: list) -> None:
    for name, proc in reversed(children):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, STOP_SIGNALS.get(name, signal.SIGTERM))
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + GRACE
    for name, proc in children:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print("run: %s did not stop in %g s, killing it" % (name, GRACE), file=sys.stderr)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: list[str]) -> int:
    """Run `argv` (name=command …) until one exits; return the exit status described above."""
    specs = [arg.split("=", 1) for arg in argv]
    if not specs or any(len(spec) != 2 or not spec[0] or not spec[1].strip() for spec in specs):
        print("usage: run_all.py name=command [name=command …]", file=sys.stderr)
        return 2

    def on_signal(signum, frame):
        raise _Stop(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    children = []
    status = 0
    try:
        for name, command in specs:
            children.append((name, subprocess.Popen(shlex.split(command), start_new_session=True)))
        while True:
            exited = [(name, proc) for name, proc in children if proc.poll() is not None]
            if exited:
                name, proc = exited[0]
                status = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
                print("run: %s exited with %s, stopping the others" % (name, proc.returncode), file=sys.stderr)
                break
            try:
                os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)   # sleeps until a child exits
            except ChildProcessError:
                pass
    except _Stop as stop:
        print("run: %s, stopping" % signal.Signals(stop.args[0]).name, file=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # a second Ctrl-C must not cut the clean stop short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _stop(children)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
