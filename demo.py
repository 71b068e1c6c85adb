"""`make demo`: the whole product, offline, as a scripted user would meet it.

Starts local fakes of the Telegram Bot API, YooKassa and Fal (tests/fakes/, in this process, on
loopback), then the three real processes — `python bot.py`, `gunicorn web:app`,
`huey_consumer worker.huey` — configured only through the public environment variables, and
drives one user through: /start → a free generation → balance → a top-up of 100 credits with
WELCOME10 (pays 90.00 ₽) → YooKassa's notification → a paid generation → a job Fal refuses,
released → a top-up of 100 credits in Telegram Stars (the invoice, the pre-checkout answered by
the bot, successful_payment delivered three times, one credit) → `make audit`. The conversation is printed as it happens; images land in data/demo/.

The demo grants one free operation (FREE_OPERATIONS_COUNT=1) so the second image is paid.
"""
from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import requests
from PIL import Image

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

from tests.fakes.fal import FakeFal  # noqa: E402
from tests.fakes.telegram import FakeTelegram  # noqa: E402
from tests.fakes.yookassa import FakeYooKassa  # noqa: E402

USER = 700_001
OUT = os.path.join(ROOT, "data", "demo")
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    """A free TCP port on loopback for gunicorn."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Transcript:
    """Prints what the user does and what the bot answers, and saves the images it sends."""

    def __init__(self, telegram: FakeTelegram):
        self.telegram = telegram
        self.seen = 0
        self.images = 0

    def user(self, text: str) -> None:
        print("\n👤  %s" % text, flush=True)

    def note(self, text: str) -> None:
        print("    ·  %s" % text, flush=True)

    def flush(self) -> None:
        calls = self.telegram.calls()
        for call in calls[self.seen:]:
            if not call.ok or call.chat_id != USER:
                continue
            params = call.params
            if call.method in ("sendMessage", "editMessageText"):
                verb = "✎" if call.method.startswith("edit") else "🤖"
                print("%s  %s%s" % (verb, params.get("text", "").replace("\n", "\n    "),
                                    self._buttons(call.result)), flush=True)
            elif call.method in ("sendPhoto", "sendDocument"):
                field = "photo" if call.method == "sendPhoto" else "document"
                data = call.files.get(field)
                saved = self._save(data) if data else "(by file id)"
                print("🖼  [%s %s] %s%s" % (field, saved, (params.get("caption") or "").replace("\n", "\n    "),
                                           self._buttons(call.result)), flush=True)
            elif call.method == "answerCallbackQuery" and params.get("text"):
                print("💬  %s" % params["text"], flush=True)
        self.seen = len(calls)

    def _buttons(self, result) -> str:
        if not isinstance(result, dict):
            return ""
        texts = [b.get("text", "") for b in FakeTelegram.buttons(result)]
        return ("\n    " + " ".join("[%s]" % t for t in texts)) if texts else ""

    def _save(self, data: bytes) -> str:
        self.images += 1
        image = Image.open(io.BytesIO(data))
        path = os.path.join(OUT, "%02d.%s" % (self.images, (image.format or "png").lower()))
        with open(path, "wb") as fh:
            fh.write(data)
        return "%d×%d → %s" % (image.width, image.height, os.path.relpath(path, ROOT))


class Demo:
    """The fakes, the three real processes, and the scripted user."""

    def __init__(self):
        self.telegram = FakeTelegram(bot_username="medialab_demo_bot").start()
        self.yookassa = FakeYooKassa().start()
        self.fal = FakeFal(key="demo-fal-id:demo-fal-key").start()
        self.web_port = free_port()
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.t = Transcript(self.telegram)
        if os.path.isdir(OUT):
            shutil.rmtree(OUT)
        os.makedirs(OUT)
        self.env = dict(os.environ)
        self.env.update({
            "TELEGRAM_BOT_TOKEN": self.telegram.token,
            "TELEGRAM_API_URL": self.telegram.url,
            "DATABASE_URL": "sqlite:///" + os.path.join(OUT, "medialab.db"),
            "QUEUE_URL": "sqlite:///" + os.path.join(OUT, "queue.db"),
            "FAL_KEY": "demo-fal-id:demo-fal-key",
            "FAL_QUEUE_URL": self.fal.url,
            "FAL_POLL_INTERVAL": "0.2",
            "YOOKASSA_SHOP_ID": self.yookassa.shop_id,
            "YOOKASSA_SECRET_KEY": self.yookassa.secret_key,
            "YOOKASSA_API_URL": self.yookassa.api_url,
            "YOOKASSA_RETURN_URL": "https://t.me/medialab_demo_bot",
            "YOOKASSA_ALLOW_TEST": "1",
            "TRUSTED_PROXY_COUNT": "1",          # as behind nginx: the fake says X-Forwarded-For
            "FREE_OPERATIONS_COUNT": "1",
            "STARS_ENABLED": "1",
            "STARS_PER_100_CREDITS": "70",
            "WEB_BIND": "127.0.0.1:%d" % self.web_port,
            "WEB_WORKERS": "2",
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        })

    # --- processes -------------------------------------------------------------------------
    def run(self, *args: str) -> str:
        out = subprocess.run([sys.executable, *args], cwd=ROOT, env=self.env, capture_output=True, text=True)
        if out.returncode not in (0, 1):
            raise SystemExit("%s failed:\n%s%s" % (" ".join(args), out.stdout, out.stderr))
        return out.stdout + out.stderr

    def start(self, name: str, argv: list[str]) -> None:
        log = open(os.path.join(OUT, "%s.log" % name), "wb")
        proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.processes.append((name, proc))

    def start_all(self) -> None:
        print("· migrate + seed promo codes:", self.run("manage.py", "migrate").strip(), "/",
              self.run("manage.py", "seed-promo").strip())
        self.start("worker", [os.path.join(BIN, "huey_consumer"), "worker.huey", "-w", "4", "-k", "thread", "-d", "0.01", "-m", "1",
                              "-f", "-g", "INT", "-t", "10"])
        self.start("web", [os.path.join(BIN, "gunicorn"), "-c", "deploy/gunicorn.conf.py", "web:app"])
        self.start("bot", [sys.executable, "bot.py"])
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get("http://127.0.0.1:%d/yookassa/health" % self.web_port, timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            self.check_alive()
            if time.monotonic() > deadline:
                raise SystemExit("web did not become healthy; see data/demo/web.log")
            time.sleep(0.1)
        self.telegram.wait_until_polling(timeout=30)
        print("· bot, web (127.0.0.1:%d) and worker are up; logs in data/demo/*.log" % self.web_port)

    def check_alive(self) -> None:
        for name, proc in self.processes:
            if proc.poll() is not None:
                raise SystemExit("%s exited with %s; see data/demo/%s.log" % (name, proc.returncode, name))

    def stop_all(self) -> None:
        for name, proc in reversed(self.processes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT if name == "worker" else signal.SIGTERM)
        for _name, proc in self.processes:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for fake in (self.telegram, self.yookassa, self.fal):
            fake.stop()

    # --- the user ----------------------------------------------------------------------------
    def wait(self, contains: str, since: int, timeout: float = 30.0) -> dict:
        try:
            message = self.telegram.wait_for_message(USER, contains, timeout=timeout, since=since)
        except AssertionError:
            self.t.flush()
            self.check_alive()
            raise
        self.t.flush()
        return message

    def wait_photo(self, since: int, timeout: float = 60.0):
        call = self.telegram.wait_for(lambda c: c.ok and c.chat_id == USER and c.method in ("sendPhoto", "sendDocument"),
                                      timeout=timeout, since=since)
        self.t.flush()
        return call

    def say(self, text: str) -> int:
        self.t.user(text)
        mark = self.telegram.mark()
        self.telegram.send_text(USER, text, first_name="Аня", username="anya_demo")
        return mark

    def tap(self, message: dict, label: str) -> int:
        button = FakeTelegram.find_button(self.telegram.message(USER, message["message_id"]) or message, label)
        self.t.user("нажимает «%s»" % button["text"])
        mark = self.telegram.mark()
        self.telegram.press(USER, message["message_id"], button["callback_data"], first_name="Аня")
        return mark

    def generate(self, prompt: str, menu: dict) -> int:
        mark = self.tap(menu, "Создать")
        self.wait("", mark)                     # "опишите…"
        mark = self.say(prompt)
        ratio = self.wait("", mark)
        mark = self.tap(ratio, "1:1")
        return mark

    def script(self) -> None:
        """The whole story: a free generation, a refused one paid with YooKassa and continued, one
        Fal refuses (nothing charged), a top-up with Telegram Stars."""
        mark = self.say("/start")
        menu = self.wait("", mark)
        while not FakeTelegram.buttons(menu):
            menu = self.wait("", self.telegram.mark() - 1)

        self.t.note("первая генерация — бесплатная операция")
        mark = self.generate("Кот-космонавт над ночной Москвой, акварель", menu)
        self.wait_photo(mark)
        self.pay_and_continue(menu)

        self.t.note("Fal отклонит следующий запрос (content policy) — резерв будет снят")
        self.fal.script("policy")
        mark = self.generate("Запрос, который модель отклонит", menu)
        self.wait("не списан", mark, timeout=60)

        mark = self.say("/balance")
        self.wait("", mark)
        self.pay_with_stars()

    def pay_and_continue(self, menu: dict) -> None:
        """A generation refused for credits, "Пополнить и продолжить" with WELCOME10, the YooKassa
        payment notified three times at once, the kept job starting by itself."""
        self.t.note("вторая генерация: бесплатных операций нет, кредитов тоже — запрос сохраняется")
        mark = self.generate("Тот же кот, но в стиле пиксель-арт", menu)
        refused = self.wait("Недостаточно кредитов", mark)
        mark = self.tap(refused, "Пополнить и продолжить")
        balance = self.wait("запустится сама", mark)
        mark = self.tap(balance, "Промокод")
        self.wait("", mark)
        mark = self.say("WELCOME10")
        after_code = self.wait("", mark)
        topup_menu = after_code if any("100" in b.get("text", "") for b in FakeTelegram.buttons(after_code)) else None
        if topup_menu is None:
            mark = self.say("/balance")
            topup_menu = self.wait("", mark)
        mark = self.tap(topup_menu, "100")
        self.wait("К оплате", mark)             # the order with its pay button
        payment_id = list(self.yookassa.payments)[-1]
        payment = self.yookassa.payments[payment_id]
        self.t.note("YooKassa: платёж %s на %s %s, idempotence key = наш заказ %s"
                    % (payment_id, payment["amount"]["value"], payment["amount"]["currency"],
                       payment["metadata"].get("order_id")))
        self.t.user("оплачивает на странице YooKassa")
        self.yookassa.succeed(payment_id)
        mark = self.telegram.mark()
        codes = self.yookassa.notify("payment.succeeded", payment_id,
                                     "http://127.0.0.1:%d/yookassa/webhook" % self.web_port,
                                     times=3, concurrency=3, source_ip="185.71.76.10")
        self.t.note("YooKassa доставляет уведомление payment.succeeded 3 раза одновременно → HTTP %s" % codes)
        self.wait("Оплата получена", mark)
        self.t.note("оплата зачислена — сохранённая задача запускается сама, ничего не отправляя заново")
        self.wait("Запускаю", mark)
        self.wait_photo(mark)

    def pay_with_stars(self) -> None:
        """A top-up with Telegram Stars whose successful_payment arrives three times: credited once."""
        self.t.note("второй способ пополнить — звёзды Telegram (Stars)")
        mark = self.say("/balance")
        balance = self.wait("", mark)
        mark = self.tap(balance, "Telegram Stars")
        stars_menu = self.wait("", mark)
        mark = self.tap(stars_menu, "100 кредитов")
        sent = self.telegram.wait_for(lambda c: c.ok and c.method == "sendInvoice" and c.chat_id == USER,
                                      timeout=30, since=mark)
        self.t.note("счёт «%s»: %s %s, provider_token «%s», payload = наш заказ %s" % (
            sent.params["title"], sent.params["prices"][0]["amount"], sent.params["currency"],
            sent.params["provider_token"], sent.params["payload"]))
        self.t.user("оплачивает счёт звёздами")
        mark = self.telegram.mark()
        attempt = self.telegram.pay_invoice(USER)
        self.t.note("pre-checkout → %s, Telegram charge %s" % (attempt.wait(15), attempt.charge_id))
        self.wait("Оплата получена", mark)
        self.telegram.deliver_again(attempt.update, times=2)
        self.t.note("Telegram доставляет successful_payment ещё 2 раза — начисление одно")
        mark = self.say("/balance")
        self.wait("", mark)

    def audit(self) -> int:
        print("\n$ make audit")
        out = subprocess.run([sys.executable, "manage.py", "audit"], cwd=ROOT, env=self.env,
                             capture_output=True, text=True)
        print(out.stdout + out.stderr)
        return out.returncode


def main() -> int:
    """Run the demo; the exit code is `make audit`'s."""
    demo = Demo()
    code = 1
    try:
        demo.start_all()
        demo.script()
        code = demo.audit()
        print("images saved under %s" % os.path.relpath(OUT, ROOT))
    finally:
        demo.stop_all()
    return code


if __name__ == "__main__":
    sys.exit(main())
