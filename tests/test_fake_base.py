"""The HTTP server the fakes share (tests/fakes/base.py): keep-alive, faults, logging, clean stop."""
import socket
import threading
import time

import pytest
import requests

from tests.fakes.base import DropConnection, FakeServer, json_response, nginx_page


class Echo(FakeServer):
    name = "fake"

    def handle(self, request):
        if request.path == "/drop":
            raise DropConnection
        if request.path == "/hang":
            self.hang(30)
        if request.path == "/bug":
            raise RuntimeError("a bug in the fake")
        if request.path == "/nginx":
            return nginx_page(503)
        return json_response({"path": request.path, "body": request.get_data(as_text=True)})


@pytest.fixture
def echo():
    with Echo() as fake:
        yield fake


def test_serves_on_loopback_and_keeps_connections_alive(echo):
    assert echo.url.startswith("http://127.0.0.1:") and not echo.url.endswith("/")
    with requests.Session() as session:
        first = session.post(echo.url + "/a", data="x" * 100_000, timeout=5)
        second = session.get(echo.url + "/b?q=1", timeout=5)
        assert first.json() == {"path": "/a", "body": "x" * 100_000} and second.json()["path"] == "/b"
        assert "close" not in first.headers.get("Connection", "").lower()
        with echo._lock:
            [conn] = echo._connections                   # both requests on one connection
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    log = echo.requests_log
    assert [(e["method"], e["path"], e["query"], e["status"]) for e in log] == [
        ("POST", "/a", {}, 200), ("GET", "/b", {"q": "1"}, 200)]


def test_faults_drop_hang_nginx_and_bugs(echo):
    with pytest.raises(requests.ConnectionError):
        requests.get(echo.url + "/drop", timeout=5)
    assert echo.requests_log[-1]["status"] == "dropped"
    page = requests.get(echo.url + "/nginx", timeout=5)
    assert page.status_code == 503 and "text/html" in page.headers["Content-Type"] and "nginx" in page.text
    bug = requests.get(echo.url + "/bug", timeout=5)
    assert bug.status_code == 500 and "a bug in the fake" in bug.text
    with pytest.raises(requests.ReadTimeout):
        requests.get(echo.url + "/hang", timeout=0.2)


def test_stop_releases_hangs_closes_idle_connections_and_joins_threads():
    fake = Echo().start()
    url = fake.url
    session = requests.Session()
    assert session.get(url + "/idle", timeout=5).ok       # an idle keep-alive connection stays open
    errors = []
    hanging = threading.Thread(target=lambda: errors.append(
        pytest.raises(requests.ConnectionError, requests.get, url + "/hang", timeout=10)))
    hanging.start()
    fake.wait_until(lambda: len(fake.requests_log) == 2)
    started = time.monotonic()
    fake.stop()
    hanging.join(5)
    assert time.monotonic() - started < 2 and errors and not hanging.is_alive()
    assert not fake._thread.is_alive()
    assert not [t for t in threading.enumerate() if t.name == "fake-connection"]   # handlers joined
    assert not fake._connections
    with pytest.raises(requests.ConnectionError):
        session.get(url + "/after", timeout=2)
    session.close()
    with pytest.raises(RuntimeError, match="not started"):
        _ = fake.url
    fake.stop()                                            # a second stop is harmless


def test_wait_until_returns_the_value_or_times_out(echo):
    assert echo.wait_until(lambda: 42, timeout=0.1) == 42
    with pytest.raises(TimeoutError):
        echo.wait_until(lambda: None, timeout=0.05)
