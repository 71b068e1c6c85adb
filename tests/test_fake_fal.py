"""Proves tests/fakes/fal.py against the real fal-client SyncClient (fal-client 1.0.3), with
``QUEUE_URL_FORMAT`` pointed at the fake (the ``fake_fal`` fixture), as the app talks to Fal."""
import io
import time

import fal_client
import httpx
import pytest
from fal_client import Completed, InProgress, Queued
from PIL import Image

KEY = "test-fal-key"
TG_URL = "https://api.telegram.org/file/bot123456:AAH-secret-token/photos/file_7.jpg"

# An httpx client costs ~25 ms (SSL context) and a SyncClient two, so the module shares one of each,
# like the app shares one SyncClient per process. SyncClient has no close(): its cached `_client` is
# closed here so no socket is left for the garbage collector.
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


def test_subscribe_nano_banana_returns_downloadable_png(fake_fal, client):
    enqueued = []
    result = sub(client, "fal-ai/nano-banana", {"prompt": "a red cat"}, on_enqueue=enqueued.append)
    assert list(result) == ["images", "description"]
    (image,) = result["images"]
    assert image["content_type"] == "image/png" and image["url"].startswith(fake_fal.url + "/files/")
    assert download(image["url"]).size == (512, 512) == (image["width"], image["height"])
    assert image["file_size"] == len(HTTP.get(image["url"]).content)
    (record,) = fake_fal.submissions
    assert record["request_id"] == enqueued[0] and record["app"] == "fal-ai/nano-banana"
    assert record["arguments"] == {"prompt": "a red cat"}
    assert record["headers"]["authorization"] == "Key " + KEY
    assert HTTP.get(fake_fal.url + "/files/nope.png").status_code == 404


def test_num_images_and_seed_are_respected(fake_fal, client):
    result = sub(client, "fal-ai/nano-banana", {"prompt": "x", "num_images": 3, "seed": 7})
    assert len(result["images"]) == 3 and result["seed"] == 7
    assert len({i["url"] for i in result["images"]}) == 3


def test_edit_with_data_uri_records_the_decoded_input(fake_fal, client):
    uri = fal_client.encode(png_bytes((300, 200)), "image/png")
    sub(client, "fal-ai/nano-banana/edit", {"prompt": "bluer", "image_urls": [uri]})
    (record,) = fake_fal.submissions
    assert record["app"] == "fal-ai/nano-banana/edit"
    summary = record["arguments"]["image_urls"][0]
    assert summary["data_uri"] is True and summary["format"] == "PNG" and summary["size"] == [300, 200]
    assert record["inputs"] == [dict(summary, field="image_urls[0]")]
    sub(client, "fal-ai/nano-banana/edit", {"prompt": "x", "image_urls": ["data:image/png;base64,bm90IGFuIGltYWdl"]})
    assert fake_fal.submissions[1]["inputs"][0]["error"].startswith("not a decodable image")


def test_upscalers_scale_the_input_and_other_models_answer_one_image(fake_fal, client):
    uri = fal_client.encode(png_bytes((100, 60)), "image/png")
    result = sub(client, "fal-ai/esrgan", {"image_url": uri})
    assert (result["image"]["width"], result["image"]["height"]) == (200, 120) and isinstance(result["seed"], int)
    result = sub(client, "fal-ai/clarity-upscaler", {"image_url": uri, "upscale_factor": 3})
    assert download(result["image"]["url"]).size == (300, 180)
    swapped = sub(client, "fal-ai/face-swap", {"base_image_url": uri, "swap_image_url": uri, "seed": 5})
    assert set(swapped) == {"image", "seed"} and swapped["seed"] == 5


def test_big_result_sizes(fake_fal, client):
    fake_fal.script("big_result", width=3000, height=20)
    (image,) = sub(client, "fal-ai/nano-banana", {"prompt": "x"})["images"]
    assert (image["width"], image["height"]) == (3000, 20) == download(image["url"]).size


def test_a_telegram_file_url_is_refused_with_422(fake_fal, client):
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        sub(client, "fal-ai/nano-banana/edit", {"prompt": "x", "image_urls": [TG_URL]})
    assert info.value.status_code == 422 and info.value.message[0]["type"] == "telegram_file_url_leak"
    assert fake_fal.token_leaks == [TG_URL] and fake_fal.submissions == []


def test_wrong_or_missing_key_is_401(fake_fal, new_client):
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        sub(new_client("wrong-key"), "fal-ai/nano-banana", {"prompt": "x"})
    assert info.value.status_code == 401
    assert HTTP.post(fake_fal.url + "/fal-ai/nano-banana", json={}).json() == {"detail": "Missing authorization header"}


@pytest.mark.parametrize("kind, status, error_type, body_type", [
    ("validation", 422, None, "value_error"),
    ("policy", 422, None, "content_policy_violation"),
    ("error500", 500, "runner_server_error", None),
])
def test_run_failures_come_with_the_result(fake_fal, client, kind, status, error_type, body_type):
    fake_fal.script(kind)
    handle = client.submit("fal-ai/nano-banana", {"prompt": "x"})
    completed = handle.status()
    while not isinstance(completed, Completed):
        completed = handle.status()
    assert completed.error and completed.error_type == (error_type or body_type)
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        handle.get()
    assert (info.value.status_code, info.value.error_type) == (status, error_type)
    if body_type:
        assert info.value.message[0]["type"] == body_type
        assert info.value.response.headers["x-fal-retryable"] == "false"


def test_hang_with_client_timeout_cancels(fake_fal, client):
    fake_fal.script("hang")
    started = time.monotonic()
    # client_timeout=1 itself is refused by fal-client 1.0.3 (it becomes X-Fal-Request-Timeout, > 1 s).
    with pytest.raises(fal_client.FalClientTimeoutError) as info:
        sub(client, "fal-ai/nano-banana", {"prompt": "x"}, client_timeout=1.05)
    assert time.monotonic() - started < 2.5
    rid = info.value.request_id
    assert fake_fal.cancelled == [rid]                     # subscribe() cancelled before raising
    assert fake_fal.submissions[0]["headers"]["x-fal-request-timeout"] == "1.05"
    # fal-client's worker thread keeps polling; once cancelled it sees COMPLETED and fetches the
    # result (499 client_cancelled). Wait for that so the orphan thread ends before the fake stops.
    fake_fal.wait_until(lambda: any(e["path"].endswith("/requests/" + rid) and e["status"] == 499
                                    for e in fake_fal.requests_log), timeout=3)
    assert client.cancel("fal-ai/nano-banana", rid) is None          # a second cancel is accepted too


def test_cancel_after_completion_and_early_results(fake_fal, client):
    handle = client.submit("fal-ai/nano-banana", {"prompt": "x"})
    handle.get()
    answer = HTTP.put(handle.cancel_url, headers={"Authorization": "Key " + KEY})
    assert (answer.status_code, answer.json()) == (400, {"status": "ALREADY_COMPLETED"})
    fake_fal.script("latency", seconds=5)
    slow = client.submit("fal-ai/nano-banana", {"prompt": "x"})
    early = HTTP.get(slow.response_url, headers={"Authorization": "Key " + KEY})
    assert (early.status_code, early.json()) == (400, {"detail": "Request is still in progress"})
    assert early.headers["x-fal-request-id"] == slow.request_id
    slow.cancel()
    fake_fal.script("queue", position=5)
    queued = client.submit("fal-ai/nano-banana", {"prompt": "x"})
    assert HTTP.get(queued.response_url, headers={"Authorization": "Key " + KEY}).status_code == 400
    assert queued.status().position == 4                 # fetching the result took no queue step


def test_wrong_methods_and_bodies(fake_fal, client):
    auth = {"Authorization": "Key " + KEY}
    assert HTTP.get(fake_fal.url + "/fal-ai/nano-banana", headers=auth).status_code == 405
    handle = client.submit("fal-ai/nano-banana", {"prompt": "x"})
    assert HTTP.post(handle.status_url, headers=auth).status_code == 405
    broken = HTTP.post(fake_fal.url + "/fal-ai/nano-banana", content=b"{", headers=auth)
    assert broken.status_code == 422 and broken.json()["detail"][0]["type"] == "json_invalid"
    assert HTTP.get(fake_fal.url + "/", headers=auth).status_code == 404


def test_latency_goes_through_queue_and_progress(fake_fal, client):
    fake_fal.script("latency", seconds=0.5)
    events = []
    started = time.monotonic()
    assert sub(client, "fal-ai/nano-banana", {"prompt": "slow"}, on_queue_update=events.append)["images"]
    assert time.monotonic() - started >= 0.5
    kinds = [type(e) for e in events]
    assert kinds[0] is Queued and kinds[-1] is Completed and InProgress in kinds
    assert all(k is not Queued for k in kinds[kinds.index(InProgress):])
    assert events[-1].metrics["inference_time"] >= 0.5


def test_queue_positions_decrease_per_poll(fake_fal, client):
    fake_fal.script("queue", position=3)
    handle = client.submit("fal-ai/nano-banana", {"prompt": "x"})
    events = list(handle.iter_events(interval=0.01))
    assert [e.position for e in events if isinstance(e, Queued)] == [2, 1, 0]
    assert isinstance(events[-1], Completed) and handle.get()["images"]


def test_submission_reports_the_current_status(fake_fal, client):
    fake_fal.script("latency", seconds=0.4)
    handle = client.submit("fal-ai/nano-banana", {"prompt": "x"})
    assert fake_fal.submission(handle.request_id)["status"] == "IN_QUEUE"
    fake_fal.wait_until(lambda: fake_fal.submission(handle.request_id)["status"] == "IN_PROGRESS", timeout=2)
    fake_fal.wait_until(lambda: fake_fal.submission(handle.request_id)["status"] == "COMPLETED", timeout=2)
    fake_fal.script("hang")
    hanging = client.submit("fal-ai/nano-banana", {"prompt": "x"})
    hanging.cancel()
    assert fake_fal.submission(hanging.request_id)["status"] == "CANCELLED"
    with pytest.raises(KeyError):
        fake_fal.submission("nope")


def test_resume_by_request_id_with_a_fresh_client(fake_fal, client, new_client):
    fake_fal.script("latency", seconds=0.3)
    handle = client.submit("fal-ai/nano-banana/edit", {"prompt": "x", "image_urls": [
        fal_client.encode(png_bytes(), "image/png")]})
    fresh = new_client()                                 # e.g. a huey retry in another worker after a crash
    assert isinstance(fresh.status("fal-ai/nano-banana/edit", handle.request_id), (Queued, InProgress))
    assert fresh.result("fal-ai/nano-banana/edit", handle.request_id)["images"]
    assert len(fake_fal.submissions) == 1                # no second generation
    with pytest.raises(fal_client.FalClientHTTPError) as info:   # the id belongs to another app
        fresh.status("fal-ai/esrgan", handle.request_id)
    assert info.value.status_code == 404


def test_submit_lost_makes_a_duplicate_job(fake_fal, client):
    """fal accepted (and would bill) the first POST, but its answer never arrived: fal-client
    re-POSTs and the caller only learns the second id - why the app resumes by id instead."""
    fake_fal.script("submit_lost")
    ids = []
    assert sub(client, "fal-ai/nano-banana", {"prompt": "x"}, on_enqueue=ids.append)["images"]
    first, second = fake_fal.submissions
    assert first["response_dropped"] is True and second["response_dropped"] is False
    assert ids == [second["request_id"]]
    assert [e["status"] for e in fake_fal.requests_log if e["method"] == "POST"] == ["dropped", 200]


def test_submit_error_503_from_the_ingress_is_retried(fake_fal, client):
    fake_fal.script("submit_error", status=503)
    assert sub(client, "fal-ai/nano-banana", {"prompt": "x"})["images"]
    assert len(fake_fal.submissions) == 1
    assert [e["status"] for e in fake_fal.requests_log if e["method"] == "POST"] == [503, 200]


def test_submit_error_500_is_not_retried(fake_fal, client):
    fake_fal.script("submit_error", status=500, ingress=False, times=3)
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        sub(client, "fal-ai/nano-banana", {"prompt": "x"})
    assert info.value.status_code == 500
    assert [e["method"] for e in fake_fal.requests_log] == ["POST"] and fake_fal.submissions == []


def test_the_default_behaviour_applies_when_no_script_is_queued(fake_fal, client):
    fake_fal.set_default("error500")
    fake_fal.script("ok")
    assert sub(client, "fal-ai/nano-banana", {"prompt": "x"})["images"]          # the script first
    for _ in range(2):
        with pytest.raises(fal_client.FalClientHTTPError) as info:
            sub(client, "fal-ai/nano-banana", {"prompt": "x"})
        assert info.value.status_code == 500
    with pytest.raises(ValueError):
        fake_fal.set_default("submit_lost")


def test_wait_for_submissions_and_unknown_kinds(fake_fal, client):
    handle = client.submit("fal-ai/nano-banana", {"prompt": "x"})
    assert fake_fal.wait_for_submissions(1, timeout=1)[0]["request_id"] == handle.request_id
    with pytest.raises(TimeoutError):
        fake_fal.wait_for_submissions(2, timeout=0.05)
    with pytest.raises(ValueError):
        fake_fal.script("nonsense")
