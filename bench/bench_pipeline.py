"""Benchmark: the job pipeline (accept → queue → worker → Fal → Telegram → commit) and process memory.

Everything runs locally on loopback, against the fakes, in separate processes the way production
runs them:

* the fake Telegram Bot API (tests/fakes/telegram.py) and a zero-latency fake Fal
  (tests/fakes/fal.py), each in a child process;
* a real consumer ``huey_consumer worker.huey -w 8 -k thread -f -g INT -t 60`` (huey's default
  polling: 0.1 s, backing off ×1.15 to 10 s when idle) on a SQLite queue file;
* ``python bot.py`` (long polling the fake Telegram) and ``gunicorn -c deploy/gunicorn.conf.py
  web:app``, when those modules exist, only so their memory can be measured;
* a driver process that calls ``worker.accept_generation`` like the bot does and reads the
  outcome from the database.

Figures (keys ``pipeline_*``):

* ``job_p50_ms``/``job_p99_ms``: one job at a time, from the accept (``Generation.created_at``)
  to the delivered photo (``finished_at``: after Telegram took the photo and the reservation was
  committed); split into ``pickup`` (accept → a worker claimed it, i.e. queue polling) and
  ``run`` (claim → delivered: Telegram download-free generate job, Fal submit/status/result,
  result download, sendPhoto, commit). ``accept_p50_ms`` is the accept call itself.
* ``jobs_per_s``: LOAD_JOBS jobs of LOAD_JOBS/2 users (two each, the per-user limit) accepted
  at once, 8 worker threads; first accept to last delivery.
* ``rss_idle_mb_*`` / ``rss_load_mb_*``: resident memory (psutil; a process plus its children)
  of the worker, bot and web processes after start-up and a warm-up, and the peak while the
  throughput phase runs (the bot and web are not on the job path: their load figure shows they
  stay flat).

``run(quick=False) -> dict``; ``python bench/bench_pipeline.py [--quick]`` prints it as JSON.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TOKEN = "123456:BENCH-TOKEN"
WORKERS = 8
CONSUMER_FLAGS = ["-w", str(WORKERS), "-k", "thread", "-d", "0.01", "-m", "1", "-f", "-g", "INT", "-t", "60"]
START_DEADLINE = 60.0          # seconds for a process to come up
PHASE_DEADLINE = 240.0         # seconds for the whole driver

FAKE_TELEGRAM = """
import sys, threading
sys.path.insert(0, %r)
from tests.fakes import telegram as fake_module
fake = fake_module.FakeTelegram(token=%r, strict_chats=False).start()
print(fake.url, flush=True)
def watch():
    try:
        fake.wait_until_polling(timeout=%r)
        print("polling", flush=True)
    except AssertionError:
        print("no-polling", flush=True)
threading.Thread(target=watch, daemon=True).start()
sys.stdin.read()
fake.stop()
"""

FAKE_FAL = """
import sys
sys.path.insert(0, %r)
from tests.fakes import fal as fake_module
fake = fake_module.FakeFal(key="bench-fal-id:bench-fal-key").start()
print(fake.url, flush=True)
# "prerendered" on stdin: from then on every result file is one PNG rendered here once, so the
# fake's own Pillow work drops out of the job overhead (pipeline_prerendered_*).
render = getattr(fake_module, "_render_png", None)
for line in sys.stdin:
    if line.strip() == "prerendered" and render is not None:
        png = render("prerendered", 512, 512)
        fake_module._render_png = lambda *args, png=png: png
        print("prerendered", flush=True)
fake.stop()
"""


def _percentile(values: list, q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _readline(process, timeout: float) -> str:
    """One line of a child's stdout within `timeout` seconds ("" on timeout or exit)."""
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    return process.stdout.readline().strip() if ready else ""


class _LineReader:
    """The lines of a pipe, read by a daemon thread: `get(timeout)` returns one ("" on timeout/EOF)."""

    def __init__(self, stream):
        import queue

        self._queue = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            self._queue.put(line.strip())
        self._queue.put("")

    def get(self, timeout: float) -> str:
        import queue

        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return ""


class _Child:
    """A child process running `script` (python -c) that prints its URL and stops on stdin EOF."""

    def __init__(self, script: str):
        self.process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.url = _readline(self.process, START_DEADLINE)
        if not self.url.startswith("http://127.0.0.1:"):
            self.close()
            raise RuntimeError("a fake did not start")

    def close(self):
        try:
            self.process.stdin.close()
            self.process.wait(10)
        except (subprocess.TimeoutExpired, OSError):
            self.process.kill()
            self.process.wait(5)


def _rss_mb(pid: int, kind: str = "rss") -> float:
    """Memory of a process plus its children in MiB: `rss` (shared pages counted in every
    process, so gunicorn's forked workers count the same libraries twice) or `pss` (shared
    pages divided among the processes sharing them — what the box really spends; Linux)."""
    import psutil

    def one(proc):
        if kind == "pss":
            return proc.memory_full_info().pss
        return proc.memory_info().rss

    try:
        proc = psutil.Process(pid)
        total = one(proc)
        for child in proc.children(recursive=True):
            try:
                total += one(child)
            except psutil.NoSuchProcess:
                pass
        return total / (1024 * 1024)
    except (psutil.NoSuchProcess, AttributeError):
        return 0.0


def stop_process(process, sig=signal.SIGINT, timeout: float = 20) -> None:
    """Send `sig` to `process` (a Popen; None or an exited one: nothing) and wait `timeout`
    seconds, then kill it."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def _start(args: list, env: dict, log_path: str):
    log = open(log_path, "ab")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_http(url: str, process, deadline: float) -> bool:
    import requests

    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.05)
    return False


class _Sampler:
    """Peak RSS of some processes, sampled every 50 ms in a thread while `running`."""

    def __init__(self, pids: dict):
        self.pids = pids
        self.peak = {name: 0.0 for name in pids}
        self.peak_pss = {name: 0.0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], _rss_mb(pid))
                self.peak_pss[name] = max(self.peak_pss[name], _rss_mb(pid, "pss"))
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


def run(quick: bool = False) -> dict:
    """Run the benchmark (bounded: about 30 s quick, 90 s full) and return flat figures."""
    seq_jobs, load_jobs = (15, 40) if quick else (60, 240)
    figures: dict = {"pipeline_consumer_flags": " ".join(CONSUMER_FLAGS),
                     "pipeline_sequential_jobs": seq_jobs, "pipeline_load_jobs": load_jobs}
    notes = []
    tmp = tempfile.mkdtemp(prefix="bench-pipeline-")
    db_path, queue_path = os.path.join(tmp, "medialab.db"), os.path.join(tmp, "queue.db")
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import models

    database = models.open_database("sqlite:///" + db_path)
    models.migrate(database)
    database.close()

    telegram = _Child(FAKE_TELEGRAM % (ROOT, TOKEN, START_DEADLINE))
    fal = _Child(FAKE_FAL % ROOT)
    web_port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOOKASSA_", "FAL_", "TELEGRAM_"))}
    env.update(
        TELEGRAM_BOT_TOKEN=TOKEN, TELEGRAM_API_URL=telegram.url, DATABASE_URL="sqlite:///" + db_path,
        QUEUE_URL="sqlite:///" + queue_path, FAL_KEY="bench-fal-id:bench-fal-key", FAL_QUEUE_URL=fal.url,
        FAL_POLL_INTERVAL="0.05", LOG_LEVEL="WARNING", YOOKASSA_SHOP_ID="123456",
        YOOKASSA_SECRET_KEY="bench_secret", YOOKASSA_API_URL="http://127.0.0.1:9/v3",
        YOOKASSA_RETURN_URL="https://t.me/medialab_bench_bot", WEB_BIND="127.0.0.1:%d" % web_port,
        PYTHONPATH=ROOT)
    if os.environ.get("BENCH_WEB_WORKERS"):          # else deploy/gunicorn.conf.py's default, as deployed
        env["WEB_WORKERS"] = os.environ["BENCH_WEB_WORKERS"]
    figures["pipeline_web_workers"] = env.get("WEB_WORKERS", "default")
    processes: dict = {}
    try:
        processes["worker"] = _start([os.path.join(BIN, "huey_consumer"), "worker.huey", *CONSUMER_FLAGS], env,
                                     os.path.join(tmp, "worker.log"))
        deadline = time.monotonic() + START_DEADLINE
        # The bot first: web's health check answers 503 until the bot has written a heartbeat.
        if os.path.exists(os.path.join(ROOT, "bot.py")):
            processes["bot"] = _start([sys.executable, "bot.py"], env, os.path.join(tmp, "bot.log"))
            if _readline(telegram.process, START_DEADLINE) != "polling":
                notes.append("bot did not start long polling (see %s/bot.log)" % tmp)
        else:
            notes.append("bot.py missing: bot memory not measured")
        if os.path.exists(os.path.join(ROOT, "web.py")):
            processes["web"] = _start([sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "web:app"],
                                      env, os.path.join(tmp, "web.log"))
            if not _wait_http("http://127.0.0.1:%d/yookassa/health" % web_port, processes["web"], deadline):
                notes.append("web did not become healthy (see %s/web.log)" % tmp)
        else:
            notes.append("web.py missing: web memory not measured")

        driver = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--driver", str(seq_jobs),
                                   str(load_jobs)], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        result = None
        phase_deadline = time.monotonic() + PHASE_DEADLINE
        sampler = None
        lines = _LineReader(driver.stdout)      # not select()+readline(): two lines may arrive in one read
        while time.monotonic() < phase_deadline:
            line = lines.get(max(0.1, phase_deadline - time.monotonic()))
            if not line:
                if driver.poll() is not None:
                    break
                continue
            if line == "IDLE":
                for name, process in processes.items():
                    figures["pipeline_rss_idle_mb_%s" % name] = round(_rss_mb(process.pid), 1)
                    figures["pipeline_pss_idle_mb_%s" % name] = round(_rss_mb(process.pid, "pss"), 1)
                figures["pipeline_rss_idle_mb_total"] = round(sum(
                    figures["pipeline_rss_idle_mb_%s" % n] for n in processes), 1)
                figures["pipeline_pss_idle_mb_total"] = round(sum(
                    figures["pipeline_pss_idle_mb_%s" % n] for n in processes), 1)
                sampler = _Sampler({name: p.pid for name, p in processes.items()}).__enter__()
            elif line == "LOAD_END" and sampler is not None:
                sampler.__exit__()
                for name, peak in sampler.peak.items():
                    figures["pipeline_rss_load_mb_%s" % name] = round(peak, 1)
                    figures["pipeline_pss_load_mb_%s" % name] = round(sampler.peak_pss[name], 1)
                figures["pipeline_rss_load_mb_total"] = round(sum(sampler.peak.values()), 1)
                figures["pipeline_pss_load_mb_total"] = round(sum(sampler.peak_pss.values()), 1)
                sampler = None
            elif line == "PRERENDER":
                fal.process.stdin.write("prerendered\n")
                fal.process.stdin.flush()
                answer = _readline(fal.process, 10)
                driver.stdin.write(("ok" if answer == "prerendered" else "no") + "\n")
                driver.stdin.flush()
            elif line.startswith("{"):
                result = json.loads(line)
        if sampler is not None:
            sampler.__exit__()
        stop_process(driver, signal.SIGTERM, 5)
        if result is None:
            notes.append("the driver did not finish within %s s (logs in %s)" % (PHASE_DEADLINE, tmp))
        else:
            figures.update({"pipeline_" + k: v for k, v in result.items()})
    finally:
        for name in ("bot", "web", "worker"):
            stop_process(processes.get(name), signal.SIGTERM if name == "bot" else signal.SIGINT)
        telegram.close()
        fal.close()
    if notes:
        figures["pipeline_notes"] = "; ".join(notes)
    else:
        shutil.rmtree(tmp, ignore_errors=True)          # logs are kept only when something went wrong
    return figures


# --------------------------------------------------------------------------------------------
# the driver (a separate process, so `worker.huey` is built from the bench's QUEUE_URL)
# --------------------------------------------------------------------------------------------


def _driver(seq_jobs: int, load_jobs: int) -> None:
    import billing
    import config
    import models
    import worker
    from models import Generation

    cfg = config.get()
    models.init_db(cfg.database_url)

    def wait_all(ids, timeout=120.0):
        deadline = time.monotonic() + timeout
        pending = set(ids)
        while pending and time.monotonic() < deadline:
            done = {str(g.id) for g in Generation.select(Generation.id).where(
                Generation.id.in_(list(pending)) & Generation.status.in_(["delivered", "failed"]))}
            pending -= done
            if pending:
                time.sleep(0.005)
        return not pending

    solo, _ = billing.get_or_create_user(900000001, first_name="Bench", language_code="ru")
    billing.credit(solo.id, 10**6, kind="grant", reference="bench", idempotency_key="grant:bench:solo")
    # warm-up: imports, connections, the first Fal/Telegram round trips
    for n in range(3):
        gen = worker.accept_generation(solo, solo.telegram_id, "generate", prompt="warm-up %d" % n)
        if not wait_all([str(gen.id)], timeout=START_DEADLINE):
            raise SystemExit("warm-up job did not finish: is the consumer running?")
    time.sleep(0.5)                             # let the processes settle before the idle reading
    print("IDLE", flush=True)
    time.sleep(0.2)

    accept_ms, ids = [], []
    for n in range(seq_jobs):
        started = time.perf_counter()
        gen = worker.accept_generation(solo, solo.telegram_id, "generate", prompt="sequential %d" % n)
        accept_ms.append((time.perf_counter() - started) * 1000)
        ids.append(str(gen.id))
        wait_all([str(gen.id)])
    rows = list(Generation.select().where(Generation.id.in_(ids)))
    job = [(g.finished_at - g.created_at).total_seconds() * 1000 for g in rows if g.finished_at]
    pickup = [(g.started_at - g.created_at).total_seconds() * 1000 for g in rows if g.started_at]
    run_ms = [(g.finished_at - g.started_at).total_seconds() * 1000 for g in rows if g.finished_at]

    users = [billing.get_or_create_user(910000000 + n, first_name="Load", language_code="ru")[0]
             for n in range(load_jobs // 2)]
    load_ids = []
    began = time.perf_counter()
    for user in users:
        for n in range(2):
            load_ids.append(str(worker.accept_generation(user, user.telegram_id, "generate",
                                                         prompt="load %d" % n).id))
    accept_s = time.perf_counter() - began
    finished = wait_all(load_ids, timeout=PHASE_DEADLINE / 2)
    print("LOAD_END", flush=True)
    # The same sequential jobs again with the fake Fal serving one pre-rendered PNG: the
    # product's share of the overhead without the fake's own rendering.
    print("PRERENDER", flush=True)
    pre = {}
    if sys.stdin.readline().strip() == "ok":
        pre_ids = []
        for n in range(seq_jobs):
            gen = worker.accept_generation(solo, solo.telegram_id, "generate", prompt="prerendered %d" % n)
            pre_ids.append(str(gen.id))
            wait_all([str(gen.id)])
        pre_rows = [g for g in Generation.select().where(Generation.id.in_(pre_ids)) if g.finished_at]
        pre_job = [(g.finished_at - g.created_at).total_seconds() * 1000 for g in pre_rows]
        pre_pickup = [(g.started_at - g.created_at).total_seconds() * 1000 for g in pre_rows if g.started_at]
        pre_run = [(g.finished_at - g.started_at).total_seconds() * 1000 for g in pre_rows if g.started_at]
        pre = {"prerendered_job_p50_ms": round(_percentile(pre_job, 0.5), 1),
               "prerendered_job_p99_ms": round(_percentile(pre_job, 0.99), 1),
               "prerendered_pickup_p50_ms": round(_percentile(pre_pickup, 0.5), 1),
               "prerendered_run_p50_ms": round(_percentile(pre_run, 0.5), 1)}
    rows = list(Generation.select().where(Generation.id.in_(load_ids)))
    delivered = [g for g in rows if g.status == "delivered"]
    span = (max(g.finished_at for g in delivered) - min(g.created_at for g in rows)).total_seconds() if delivered else 0
    load_job = [(g.finished_at - g.created_at).total_seconds() * 1000 for g in delivered]
    report = billing.audit()
    print(json.dumps({
        "job_p50_ms": round(_percentile(job, 0.5), 1), "job_p99_ms": round(_percentile(job, 0.99), 1),
        "pickup_p50_ms": round(_percentile(pickup, 0.5), 1), "pickup_p99_ms": round(_percentile(pickup, 0.99), 1),
        "run_p50_ms": round(_percentile(run_ms, 0.5), 1), "run_p99_ms": round(_percentile(run_ms, 0.99), 1),
        "accept_p50_ms": round(_percentile(accept_ms, 0.5), 2),
        "accept_p99_ms": round(_percentile(accept_ms, 0.99), 2),
        "load_accepts_per_s": round(len(load_ids) / accept_s, 1) if accept_s else 0.0,
        "jobs_per_s": round(len(delivered) / span, 1) if span else 0.0,
        "load_job_p50_ms": round(_percentile(load_job, 0.5), 1),
        "load_job_p99_ms": round(_percentile(load_job, 0.99), 1),
        "load_delivered": len(delivered), "load_all_finished": finished,
        "audit_ok": report.ok, **pre,
    }), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--driver":
        _driver(int(sys.argv[2]), int(sys.argv[3]))
    else:
        print(json.dumps(run(quick="--quick" in sys.argv)))
