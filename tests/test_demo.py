"""`make demo` end to end: the real bot, web (gunicorn) and worker (huey_consumer) processes
against the fakes, driven through the whole journey of issue #2, ending with a clean audit."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_journey_runs_clean():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TELEGRAM_", "YOOKASSA_", "FAL_", "DATABASE_URL", "QUEUE_URL"))}
    out = subprocess.run([sys.executable, "demo.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=240)
    transcript = out.stdout + out.stderr
    assert out.returncode == 0, transcript[-4000:]
    for expected in ("Бесплатная операция", "К оплате: 90.00 ₽", "Начислено 100 кредитов",
                     "Списано 10 кредитов, осталось 90", "Кредиты не списаны", "Кредиты: 90",
                     "pre-checkout → paid", "70 XTR", "Кредиты: 190", "audit: OK"):
        assert expected in transcript, "missing %r in:\n%s" % (expected, transcript[-4000:])
    # three concurrent copies of the notification, one credit and one message; the same for the
    # three deliveries of the Stars successful_payment
    assert transcript.count("Оплата получена") == 2, transcript
    assert "HTTP [200, 200, 200]" in transcript
    images = sorted(os.listdir(os.path.join(ROOT, "data", "demo")))
    assert [name for name in images if name.endswith(".png")] == ["01.png", "02.png"], images
