"""Proves tests/fakes/fal.py against the real fal-client SyncClient (fal-client 1.0.3).

Everything goes through ``fal_client.SyncClient(key=...)`` with ``QUEUE_URL_FORMAT`` pointed at
the fake (the ``fake_fal`` fixture), exactly how the app talks to Fal.
"""

import io
import time

import fal_client
import httpx
import pytest
from fal_client import Completed, InProgress, Queued
from PIL import Image

from tests.fakes.fal import FakeFal

# The `fake_fal` fixture comes from tests/fakes/fal.py, registered as a plugin by tests/conftest.py.

KEY = "test-fal-key"
TG_URL = "https://api.telegram.org/file/bot123456:AAH-secret-token/photos/file_7.jpg"


# Building an httpx client costs ~25 ms (SSL context) and a SyncClient two of them, so the
# module shares one of each, like the app shares one SyncClient per process. Tests still ask
# for `fake_fal`, which points QUEUE_URL_FORMAT at a fresh fake for every test.
# SyncClient has no close(); its httpx client is the cached `_client` (see notes B2), closed here
# so no socket is left for the garbage collector (ResourceWarning).
HTTP = httpx.Client()


@pytest.fixture(scope="module", autouse=True)
def _close_http():
    yield
    HTTP.close()


def close_client(sync_client):
    if "_client" in sync_client.__dict__:
        sync_client._client.close()


@pytest.fixture(scope="module")
def client():
    sync_client = fal_client.SyncClient(key=KEY)
    yield sync_client
    close_client(sync_client)


@pytest.fixture
def new_client():
    """Factory for extra SyncClients (another key, or a fresh process resuming by id)."""
    made = []

    def make(key=KEY):
        made.append(fal_client.SyncClient(key=key))
        return made[-1]

    yield make
    for sync_client in made:
        close_client(sync_client)


def png_bytes(size=(300, 200), color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def download(url):
    response = HTTP.get(url)
    response.raise_for_status()
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def sub(client, app, args, **kw):
    return client.subscribe(app, args, interval=0.02, **kw)


# ---------------------------------------------------------------- happy paths

def test_subscribe_nano_banana_returns_downloadable_png(fake_fal, client):
    enqueued = []
    order = []

    def on_enqueue(rid):
        enqueued.append(rid)
        order.append("enqueue")

    result = sub(client, "fal-ai/nano-banana", {"prompt": "a red cat"}, on_enqueue=on_enqueue)
    order.append("result")

    assert order == ["enqueue", "result"]
    assert list(result) == ["images", "description"]
    (image,) = result["images"]
    assert image["content_type"] == "image/png"
    assert image["url"].startswith(fake_fal.url + "/files/")
    img = download(image["url"])
    assert img.format == "PNG" and img.size == (512, 512)
    assert (image["width"], image["height"]) == (512, 512)
    assert image["file_size"] == len(HTTP.get(image["url"]).content)

    (record,) = fake_fal.submissions
    assert record["request_id"] == enqueued[0]
    assert record["app"] == "fal-ai/nano-banana"
    assert record["arguments"] == {"prompt": "a red cat"}
    assert record["headers"]["authorization"] == "Key " + KEY
    assert record["status"] == "COMPLETED"


def test_num_images_and_seed_are_respected(fake_fal, client):
    result = sub(client, "fal-ai/nano-banana", {"prompt": "x", "num_images": 3, "seed": 42})
    assert len(result["images"]) == 3
    assert len({i["url"] for i in result["images"]}) == 3
    assert result["seed"] == 42


def test_edit_with_data_uri_records_decoded_input(fake_fal, client):
    data = png_bytes((300, 200))
    uri = fal_client.encode(data, "image/png")
    result = sub(client, "fal-ai/nano-banana/edit", {"prompt": "make it blue", "image_urls": [uri]})
    assert len(result["images"]) == 1

    (record,) = fake_fal.submissions
    summary = record["arguments"]["image_urls"][0]
    assert summary["data_uri"] is True
    assert summary["bytes"] == len(data)
    assert summary["format"] == "PNG"
    assert summary["size"] == [300, 200]
    assert record["inputs"][0]["field"] == "image_urls[0]"
    # the status/result URLs drop the sub-path, like queue.fal.run
    paths = [e["path"] for e in fake_fal.requests_log]
    assert paths[0] == "/fal-ai/nano-banana/edit"
    rid = record["request_id"]
    assert f"/fal-ai/nano-banana/requests/{rid}/status" in paths
    assert paths[-1] == f"/fal-ai/nano-banana/requests/{rid}"


def test_esrgan_doubles_input_and_face_swap_shape(fake_fal, client):
    uri = fal_client.encode(png_bytes((100, 80)), "image/png")
    up = sub(client, "fal-ai/esrgan", {"image_url": uri})
    assert set(up) == {"image", "seed"}
    assert (up["image"]["width"], up["image"]["height"]) == (200, 160)
    assert download(up["image"]["url"]).size == (200, 160)

    swapped = sub(client, "fal-ai/face-swap", {"base_image_url": uri, "swap_image_url": uri})
    assert set(swapped) == {"image", "seed"}
    assert download(swapped["image"]["url"]).size == (512, 512)


def test_big_result_sizes(fake_fal, client):
    fake_fal.script("big_result", width=12000, height=200)
    fake_fal.script("big_result", bytes=300_000)
    wide = sub(client, "fal-ai/nano-banana", {"prompt": "panorama"})["images"][0]
    assert (wide["width"], wide["height"]) == (12000, 200)
    assert download(wide["url"]).size == (12000, 200)
    heavy = sub(client, "fal-ai/retoucher", {"image_url": fal_client.encode(png_bytes(), "image/png")})
    assert heavy["image"]["file_size"] >= 300_000


# ---------------------------------------------------------------- errors

def test_telegram_file_url_is_rejected_with_422(fake_fal, client):
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        sub(client, "fal-ai/nano-banana/edit", {"prompt": "x", "image_urls": [TG_URL]})
    assert info.value.status_code == 422
    assert info.value.message[0]["loc"] == ["body", "image_urls", 0]
    assert fake_fal.token_leaks == [TG_URL]
    assert fake_fal.submissions == []  # no job, nothing billed


def test_wrong_key_is_401(fake_fal, new_client):
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        sub(new_client("wrong"), "fal-ai/nano-banana", {"prompt": "x"})
    assert info.value.status_code == 401
    assert fake_fal.submissions == []


def test_validation_error_is_422_list(fake_fal, client):
    fake_fal.script("validation", loc=["body", "aspect_ratio"], msg="bad ratio")
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        sub(client, "fal-ai/nano-banana", {"prompt": "x"})
    assert info.value.status_code == 422
    assert info.value.message == [
        {"loc": ["body", "aspect_ratio"], "msg": "bad ratio", "type": "value_error"}]
    assert len(fake_fal.submissions) == 1  # accepted, then failed (like real fal)


def test_missing_required_field_is_422(fake_fal, client):
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        sub(client, "fal-ai/nano-banana/edit", {"prompt": "no images"})
    assert info.value.status_code == 422
    assert info.value.message[0]["loc"] == ["body", "image_urls"]
    assert info.value.message[0]["type"] == "missing"


def test_content_policy_violation(fake_fal, client):
    fake_fal.script("policy")
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        sub(client, "fal-ai/nano-banana", {"prompt": "forbidden"})
    exc = info.value
    assert exc.status_code == 422
    # What fal-client exposes: message is the `detail` list; the category is in its `type`.
    # error_type stays None for model errors (it is only filled for infra errors).
    assert exc.message[0]["type"] == "content_policy_violation"
    assert exc.message[0]["loc"] == ["body", "prompt"]
    assert "content policy" in str(exc)
    assert exc.error_type is None


def test_error500_runner_server_error(fake_fal, client):
    fake_fal.script("error500")
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        sub(client, "fal-ai/retoucher", {"image_url": fal_client.encode(png_bytes(), "image/png")})
    assert info.value.status_code == 500
    assert info.value.error_type == "runner_server_error"
    assert info.value.message == "Internal error"
    assert info.value.response_headers["x-fal-error-type"] == "runner_server_error"
    # status() of the failed request reports it too
    rid = fake_fal.submissions[0]["request_id"]
    status = client.status("fal-ai/retoucher", rid)
    assert isinstance(status, Completed) and status.error_type == "runner_server_error"


def test_script_endpoint_filter(fake_fal, client):
    fake_fal.script("error500", endpoint="fal-ai/esrgan")
    assert sub(client, "fal-ai/nano-banana", {"prompt": "x"})["images"]  # not matched
    with pytest.raises(fal_client.FalClientHTTPError):
        sub(client, "fal-ai/esrgan", {"image_url": fal_client.encode(png_bytes(), "image/png")})


# ---------------------------------------------------------------- time, queue, timeouts

def test_hang_with_client_timeout_cancels(fake_fal, client):
    fake_fal.script("hang")
    started = time.monotonic()
    # NB: client_timeout=1 itself is refused by fal-client 1.0.3: subscribe() copies it into
    # start_timeout (X-Fal-Request-Timeout), which must be > 1 s (ValueError otherwise).
    with pytest.raises(fal_client.FalClientTimeoutError) as info:
        sub(client, "fal-ai/nano-banana", {"prompt": "x"}, client_timeout=1.05)
    assert time.monotonic() - started < 2.5
    rid = info.value.request_id
    assert rid == fake_fal.submissions[0]["request_id"]
    assert fake_fal.cancelled == [rid]  # subscribe() cancelled before raising
    assert fake_fal.submissions[0]["headers"]["x-fal-request-timeout"] == "1.05"
    # fal-client's worker thread keeps polling after the timeout; once cancelled it sees
    # COMPLETED and fetches the result (499 client_cancelled). Wait for that so the orphan
    # thread ends before the server stops (it would otherwise retry for ~50 s at exit).
    fake_fal.wait_until(lambda: any(
        e["path"].endswith("/requests/" + rid) and e["status"] == 499
        for e in fake_fal.requests_log), timeout=3)


def test_latency_goes_through_queue_and_progress(fake_fal, client):
    fake_fal.script("latency", seconds=0.5)
    events = []
    started = time.monotonic()
    result = sub(client, "fal-ai/nano-banana", {"prompt": "slow"}, on_queue_update=events.append,
                 with_logs=True)
    assert time.monotonic() - started >= 0.5
    assert result["images"]
    kinds = [type(e) for e in events]
    assert kinds[0] is Queued and kinds[-1] is Completed
    assert InProgress in kinds
    assert kinds.index(InProgress) > kinds.index(Queued)
    assert all(k is not Queued for k in kinds[kinds.index(InProgress):])
    assert events[-1].metrics["inference_time"] >= 0.5
    assert any(isinstance(e, InProgress) and e.logs for e in events)  # logs=true honoured


def test_queue_positions_decrease_per_poll(fake_fal, client):
    fake_fal.script("queue", position=3)
    handle = client.submit("fal-ai/nano-banana", {"prompt": "x"})
    events = list(handle.iter_events(interval=0.01))
    assert [e.position for e in events if isinstance(e, Queued)] == [2, 1, 0]
    assert isinstance(events[-1], Completed)
    assert handle.get()["images"]


# ---------------------------------------------------------------- resume and retries

def test_resume_by_request_id_with_fresh_client(fake_fal, client, new_client):
    ids = []
    first = sub(client, "fal-ai/nano-banana/edit",
                {"prompt": "x", "image_urls": [fal_client.encode(png_bytes(), "image/png")]},
                on_enqueue=ids.append)
    fresh = new_client()  # e.g. a huey retry in another worker after a crash
    status = fresh.status("fal-ai/nano-banana/edit", ids[0])
    assert isinstance(status, Completed) and status.error is None
    assert fresh.result("fal-ai/nano-banana/edit", ids[0]) == first
    assert len(fake_fal.submissions) == 1  # no second generation


def test_resume_while_still_running(fake_fal, client, new_client):
    fake_fal.script("latency", seconds=0.3)
    handle = client.submit("fal-ai/nano-banana", {"prompt": "x"})
    fresh = new_client()
    assert isinstance(fresh.status("fal-ai/nano-banana", handle.request_id), (Queued, InProgress))
    result = fresh.result("fal-ai/nano-banana", handle.request_id)
    assert result["images"]
    assert len(fake_fal.submissions) == 1


def test_unknown_request_id_is_404(fake_fal, client):
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        client.status("fal-ai/nano-banana", "00000000-0000-0000-0000-000000000000")
    assert info.value.status_code == 404


def test_submit_lost_makes_a_duplicate_job(fake_fal, client):
    """THE HAZARD: fal accepted (and will bill) the first POST, but its answer never arrived.
    fal-client's _maybe_retry_request treats that as a transport error and silently re-POSTs,
    creating a SECOND generation. The caller only ever learns the second id (on_enqueue fires
    once), so the first job is invisible to it. That is why the app must persist the request id
    from on_enqueue and, on its own retry, resume with status()/result() instead of submitting
    again - and why fal-client's own retry of the submit cannot be made safe by the app."""
    fake_fal.script("submit_lost")
    ids = []
    result = sub(client, "fal-ai/nano-banana", {"prompt": "x"}, on_enqueue=ids.append)
    assert result["images"]
    subs = fake_fal.submissions
    assert len(subs) == 2
    assert subs[0]["response_dropped"] is True and subs[1]["response_dropped"] is False
    assert ids == [subs[1]["request_id"]]  # the lost job's id never reached the app
    posts = [e["status"] for e in fake_fal.requests_log if e["method"] == "POST"]
    assert posts == ["dropped", 200]


def test_submit_error_503_is_retried(fake_fal, client):
    fake_fal.script("submit_error", status=503)
    result = sub(client, "fal-ai/nano-banana", {"prompt": "x"})
    assert result["images"]
    assert len(fake_fal.submissions) == 1
    assert [e["status"] for e in fake_fal.requests_log if e["method"] == "POST"] == [503, 200]


def test_submit_error_500_is_not_retried(fake_fal, client):
    fake_fal.script("submit_error", status=500, times=3)
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        sub(client, "fal-ai/nano-banana", {"prompt": "x"})
    assert info.value.status_code == 500
    assert [e["method"] for e in fake_fal.requests_log] == ["POST"]
    assert fake_fal.submissions == []


# ---------------------------------------------------------------- controls

def test_http_control_endpoints(fake_fal, client):
    HTTP.post(fake_fal.url + "/_test/script", json={"kind": "validation"}).raise_for_status()
    with pytest.raises(fal_client.FalClientHTTPError):
        sub(client, "fal-ai/nano-banana", {"prompt": "x"})
    state = HTTP.get(fake_fal.url + "/_test/state").json()
    assert len(state["submissions"]) == 1 and state["submissions"][0]["kind"] == "validation"
    waited = HTTP.get(fake_fal.url + "/_test/wait_for_submissions", params={"n": 1}).json()
    assert len(waited["submissions"]) == 1
    HTTP.post(fake_fal.url + "/_test/reset").raise_for_status()
    assert fake_fal.submissions == [] and fake_fal.requests_log == []


def test_defaults_and_wait_for_submissions(fake_fal, client):
    fake_fal.set_default("error500", status=504, error_type="request_timeout",
                         detail="Request timed out")
    handle = client.submit("fal-ai/nano-banana", {"prompt": "x"})
    assert fake_fal.wait_for_submissions(1, timeout=1)[0]["request_id"] == handle.request_id
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        handle.get(interval=0.01)
    assert (info.value.status_code, info.value.error_type) == (504, "request_timeout")
    with pytest.raises(TimeoutError):
        fake_fal.wait_for_submissions(2, timeout=0.05)
    with pytest.raises(ValueError):
        fake_fal.script("nonsense")


def test_standalone_context_manager():
    with FakeFal(key=None, image_size=(64, 32)) as fake:
        response = HTTP.post(fake.url + "/fal-ai/retoucher", json={"image_url": "https://x/y.png"})
        assert response.status_code == 200
        body = response.json()
        assert set(body) >= {"request_id", "response_url", "status_url", "cancel_url"}
        assert body["status"] == "IN_QUEUE" and body["logs"] is None
        result = HTTP.get(body["response_url"]).json()
        assert (result["image"]["width"], result["image"]["height"]) == (64, 32)
