"""media.py: validation, request building, the Fal gateway against the fake Fal, demo backend,
downloads, add_text and the Telegram photo limits. Real Pillow, real fal-client, no mocks."""
import base64
import io
import json
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fal_client
import fal_client.client
import pytest
from PIL import Image, ImageChops

import config
import media

TOKEN = "123456:SECRET-TOKEN"


def make_cfg(**overrides) -> config.Config:
    cfg = config.load({"TELEGRAM_BOT_TOKEN": TOKEN}, require_token=False)
    return cfg.replace(**overrides) if overrides else cfg


def encode(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **params)
    return out.getvalue()


def solid(width=200, height=150, color=(128, 128, 128), fmt="PNG", mode="RGB") -> bytes:
    return encode(Image.new(mode, (width, height), color), fmt)


def open_bytes(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def decode_uri(uri: str) -> Image.Image:
    assert uri.startswith("data:image/")
    return open_bytes(base64.b64decode(uri.split(",", 1)[1]))


def all_strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from all_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from all_strings(v)
    elif isinstance(value, str):
        yield value


# ------------------------------------------------------------------------------------ mode specs


def test_mode_specs_match_the_spec():
    expected = {
        "generate": (0, 0, True, False, True, False),
        "edit": (1, 1, True, False, True, False),
        "merge": (2, 4, True, False, True, False),
        "add_text": (1, 1, False, True, False, True),
        "face_swap": (2, 2, False, False, True, False),
        "retouch": (1, 1, False, False, True, False),
        "upscale": (1, 1, False, False, True, False),
    }
    got = {m: (s.min_images, s.max_images, s.needs_prompt, s.needs_text, s.paid, s.local)
           for m, s in media.MODE_SPECS.items()}
    assert got == expected
    assert media.MODE_SPECS["face_swap"].image_roles == ("face", "target")


def test_check_image_count():
    media.check_image_count("merge", 2)
    media.check_image_count("merge", 4)
    with pytest.raises(media.InvalidInput) as err:
        media.check_image_count("merge", 1)
    assert (err.value.code, err.value.limit) == ("too_few_images", 2)
    with pytest.raises(media.InvalidInput) as err:
        media.check_image_count("merge", 5)
    assert (err.value.code, err.value.limit) == ("too_many_images", 4)
    with pytest.raises(ValueError):
        media.check_image_count("paint", 1)


# ------------------------------------------------------------------------------------ validation


def test_validate_prompt():
    cfg = make_cfg(max_prompt_length=10)
    assert media.validate_prompt("  кот  \n", cfg) == "кот"
    assert media.validate_prompt("x" * 10, cfg) == "x" * 10
    for empty in ("", "   \n\t", None):
        with pytest.raises(media.InvalidInput) as err:
            media.validate_prompt(empty, cfg)
        assert err.value.code == "prompt_empty"
    with pytest.raises(media.InvalidInput) as err:
        media.validate_prompt("x" * 11, cfg)
    assert (err.value.code, err.value.limit) == ("prompt_too_long", 10)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_inspect_image_accepts_supported_formats(fmt):
    data = solid(320, 240, fmt=fmt)
    assert media.inspect_image(data, make_cfg()) == media.ImageInfo(fmt, 320, 240, len(data))


def _png_with_size(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR claims `width`×`height` (CRC fixed), for bomb checks."""
    data = bytearray(solid(64, 64))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("name, data, code", [
    ("text file", "Привет, это не картинка\n".encode() * 10, "not_an_image"),
    ("empty", b"", "not_an_image"),
    ("gif", solid(100, 100, fmt="GIF"), "unsupported_format"),
    ("bmp", solid(100, 100, fmt="BMP"), "unsupported_format"),
    ("20 MB + 1 byte", b"\xff" * (20 * 1024 * 1024 + 1), "image_too_big"),
    ("10x10 png", solid(10, 10), "image_too_small"),
    ("1000x63 png", solid(1000, 63), "image_too_small"),
    ("bomb header (error)", _png_with_size(40000, 40000), "image_too_big"),
    ("bomb header (warning)", _png_with_size(10000, 10000), "image_too_big"),
    ("corrupt png", solid(100, 100)[:-30] + b"\x00" * 30, "not_an_image"),
])
def test_inspect_image_refuses(name, data, code):
    with pytest.raises(media.InvalidInput) as err:
        media.inspect_image(data, make_cfg())
    assert err.value.code == code, name


def test_check_declared_size():
    cfg = make_cfg()
    media.check_declared_size(None, cfg)
    media.check_declared_size(20 * 1024 * 1024, cfg)
    with pytest.raises(media.InvalidInput) as err:
        media.check_declared_size(30 * 1024 * 1024, cfg)
    assert (err.value.code, err.value.limit) == ("image_too_big", 20 * 1024 * 1024)


def test_invalid_input_rejects_unknown_codes():
    with pytest.raises(ValueError):
        media.InvalidInput("too_ugly")


# ------------------------------------------------------------------------------------ prepare_image


def test_prepare_image_downsizes_large_jpeg():
    big = encode(Image.new("RGB", (4000, 3000), (10, 200, 30)), "JPEG", quality=80)
    out = media.prepare_image(big)
    img = open_bytes(out)
    assert img.format == "JPEG" and img.mode == "RGB"
    assert max(img.size) <= 2048
    assert img.size == (2048, 1536)


def test_prepare_image_applies_exif_orientation():
    img = Image.new("RGB", (400, 200), (255, 0, 0))
    img.paste((0, 0, 255), (200, 0, 400, 200))          # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6                                     # Orientation: rotate 90° CW to display
    out = open_bytes(media.prepare_image(encode(img, "JPEG", exif=exif.tobytes())))
    assert out.size == (200, 400)
    red, _, blue = out.getpixel((100, 50))
    assert red > 200 and blue < 60                       # the left (red) side is now on top
    red, _, blue = out.getpixel((100, 350))
    assert blue > 200 and red < 60
    assert not out.getexif().get(0x0112)                 # metadata is not forwarded


def test_prepare_image_keeps_transparency_as_png():
    img = Image.new("RGBA", (100, 100), (255, 0, 0, 0))
    img.paste((0, 255, 0, 255), (25, 25, 75, 75))
    out = media.prepare_image(encode(img))
    assert media.sniff_content_type(out) == "image/png"
    assert open_bytes(out).mode == "RGBA"
    opaque = media.prepare_image(solid(100, 100, mode="RGBA", color=(1, 2, 3, 255)))
    assert media.sniff_content_type(opaque) == "image/jpeg"


def test_prepare_image_refuses_garbage():
    with pytest.raises(media.InvalidInput) as err:
        media.prepare_image(b"not an image at all")
    assert err.value.code == "not_an_image"


# ------------------------------------------------------------------------------------ build_request

RED, GREEN, BLUE, WHITE = (220, 20, 20), (20, 200, 20), (20, 20, 220), (250, 250, 250)


def _colour_of(uri: str):
    img = decode_uri(uri).convert("RGB")
    return img.getpixel((img.width // 2, img.height // 2))


def _close(a, b, tolerance=12):
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


def _assert_safe(arguments):
    for text in all_strings(arguments):
        assert not text.lower().startswith(("http://", "https://")), text[:60]
    assert TOKEN not in json.dumps(arguments)


def test_build_request_generate():
    cfg = make_cfg()
    req = media.build_request("generate", "  кот в шляпе ", [], cfg)
    assert req.endpoint == cfg.fal_endpoints["generate"] == "fal-ai/nano-banana"
    assert req.mode == "generate"
    assert req.arguments == {"prompt": "кот в шляпе", "num_images": 1, "output_format": "png",
                             "aspect_ratio": "1:1"}
    wide = media.build_request("generate", "кот", [], cfg, options={"aspect_ratio": "16:9"})
    assert wide.arguments["aspect_ratio"] == "16:9"
    with pytest.raises(ValueError):
        media.build_request("generate", "кот", [], cfg, options={"aspect_ratio": "7:1"})
    with pytest.raises(ValueError):
        media.build_request("generate", "кот", [], cfg, options={"aspect": "1:1"})
    with pytest.raises(media.InvalidInput) as err:
        media.build_request("generate", " ", [], cfg)
    assert err.value.code == "prompt_empty"
    with pytest.raises(media.InvalidInput) as err:
        media.build_request("generate", "кот", [solid()], cfg)
    assert err.value.code == "too_many_images"


@pytest.mark.parametrize("mode, count", [("edit", 1), ("merge", 2), ("merge", 4)])
def test_build_request_edit_and_merge(mode, count):
    cfg = make_cfg()
    colours = [RED, GREEN, BLUE, WHITE][:count]
    images = [solid(300, 200, c, fmt="JPEG") for c in colours]
    req = media.build_request(mode, "сделай ярче", images, cfg)
    assert req.endpoint == cfg.fal_endpoints[mode] == "fal-ai/nano-banana/edit"
    assert set(req.arguments) == {"prompt", "image_urls", "num_images", "output_format"}
    assert req.arguments["prompt"] == "сделай ярче"
    assert req.arguments["num_images"] == 1 and req.arguments["output_format"] == "png"
    uris = req.arguments["image_urls"]
    assert len(uris) == count
    for uri, colour in zip(uris, colours, strict=True):
        assert uri.startswith("data:image/jpeg;base64,")
        assert decode_uri(uri).size == (300, 200)
        assert _close(_colour_of(uri), colour)
    _assert_safe(req.arguments)


def test_build_request_face_swap_puts_the_face_second():
    cfg = make_cfg()
    face, target = solid(200, 200, RED), solid(300, 200, BLUE)
    req = media.build_request("face_swap", None, [face, target], cfg)
    assert req.endpoint == "fal-ai/face-swap"
    assert set(req.arguments) == {"base_image_url", "swap_image_url"}
    assert _close(_colour_of(req.arguments["base_image_url"]), BLUE)
    assert _close(_colour_of(req.arguments["swap_image_url"]), RED)
    with pytest.raises(media.InvalidInput) as err:
        media.build_request("face_swap", None, [face], cfg)
    assert err.value.code == "too_few_images"
    _assert_safe(req.arguments)


@pytest.mark.parametrize("mode, endpoint, arguments", [
    ("retouch", "fal-ai/retoucher", {"image_url"}),
    ("upscale", "fal-ai/esrgan", {"image_url", "scale"}),
])
def test_build_request_single_image_modes(mode, endpoint, arguments):
    cfg = make_cfg()
    req = media.build_request(mode, "ignored", [solid(256, 128, GREEN)], cfg)
    assert req.endpoint == endpoint
    assert set(req.arguments) == arguments
    assert decode_uri(req.arguments["image_url"]).size == (256, 128)
    if mode == "upscale":
        assert req.arguments["scale"] == 2
    _assert_safe(req.arguments)


def test_build_request_uses_configured_endpoint_and_extra_args():
    cfg = config.load({"FAL_ENDPOINT_UPSCALE": "fal-ai/clarity-upscaler"}, require_token=False)
    environ = {"FAL_ARGS_UPSCALE": '{"upscale_factor": 3, "scale": null, "prompt": "sharp"}'}
    extra = media.mode_extra_args("upscale", environ)
    assert extra == {"upscale_factor": 3, "scale": None, "prompt": "sharp"}
    req = media.build_request("upscale", None, [solid()], cfg, extra_args=extra)
    assert req.endpoint == "fal-ai/clarity-upscaler"
    assert set(req.arguments) == {"image_url", "upscale_factor", "prompt"}   # null removed "scale"
    assert req.arguments["upscale_factor"] == 3

    two = media.mode_extra_args("generate", {"FAL_ARGS_GENERATE": '{"num_images": 2}'})
    generate = media.build_request("generate", "кот", [], cfg, extra_args=two)
    assert generate.arguments["num_images"] == 2


def test_mode_extra_args_errors():
    assert media.mode_extra_args("edit", {}) == {}
    assert media.mode_extra_args("edit", {"FAL_ARGS_EDIT": "  "}) == {}
    with pytest.raises(ValueError, match="FAL_ARGS_EDIT is not valid JSON"):
        media.mode_extra_args("edit", {"FAL_ARGS_EDIT": "{scale: 4}"})
    with pytest.raises(ValueError, match="FAL_ARGS_EDIT must be a JSON object"):
        media.mode_extra_args("edit", {"FAL_ARGS_EDIT": "[1, 2]"})


def test_build_request_never_sends_the_bot_token():
    cfg = make_cfg()
    leak = {"image_url": "https://api.telegram.org/file/bot%s/photos/file_1.jpg" % TOKEN}
    with pytest.raises(ValueError, match="bot token"):
        media.build_request("retouch", None, [solid()], cfg, extra_args=leak)


def test_build_request_refuses_local_and_unknown_modes():
    with pytest.raises(ValueError):
        media.build_request("add_text", "x", [solid()], make_cfg())
    with pytest.raises(ValueError):
        media.build_request("paint", "x", [], make_cfg())


# ------------------------------------------------------------------------------------ results


def test_parse_result_and_seed():
    many = {"images": [{"url": "https://x/1.png"}, {"url": "https://x/2.png"}], "seed": 42}
    assert media.parse_result(many) == ["https://x/1.png", "https://x/2.png"]
    assert media.parse_seed(many) == 42
    one = {"image": {"url": "https://x/3.png", "width": 10}}
    assert media.parse_result(one) == ["https://x/3.png"]
    assert media.parse_seed(one) is None
    assert media.parse_seed({"seed": True}) is None
    for bad in ({}, {"images": []}, {"image": {"url": ""}}, {"images": [{"file_name": "a"}]}):
        with pytest.raises(media.ResultError):
            media.parse_result(bad)


def test_download_result_data_uri():
    png = solid(100, 80)
    cfg = make_cfg()
    assert media.download_result(media.data_uri(png), cfg) == png
    with pytest.raises(media.ResultError) as err:
        media.download_result(media.data_uri(png), make_cfg(max_result_bytes=100))
    assert not err.value.retryable
    with pytest.raises(media.ResultError) as err:
        media.download_result(media.data_uri(b"hello", "text/plain"), cfg)
    assert "not an image" in str(err.value) and not err.value.transient
    with pytest.raises(media.ResultError):
        media.download_result("data:image/png;base64,%%%", cfg)
    with pytest.raises(media.ResultError):
        media.download_result("ftp://example.com/a.png", cfg)


class _FileHost(BaseHTTPRequestHandler):
    """Serves /ok.png, /big.png (no Content-Length: chunked), /missing (404), /busy (503)."""

    png = solid(120, 90)

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/ok.png":
            self._reply(200, self.png)
        elif self.path == "/big.png":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(64):
                chunk = b"\x00" * 4096
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/busy":
            self._reply(503, b"busy")
        else:
            self._reply(404, b"nope")

    protocol_version = "HTTP/1.1"

    def _reply(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def file_host():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FileHost)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield "http://127.0.0.1:%d" % server.server_address[1]
    server.shutdown()
    server.server_close()


def test_download_result_http(file_host):
    cfg = make_cfg()
    assert media.download_result(file_host + "/ok.png", cfg, timeout=5) == _FileHost.png
    with pytest.raises(media.ResultError, match="larger than"):
        media.download_result(file_host + "/big.png", make_cfg(max_result_bytes=100_000), timeout=5)
    with pytest.raises(media.ResultError) as err:
        media.download_result(file_host + "/missing", cfg, timeout=5)
    assert not err.value.retryable
    with pytest.raises(media.TransientProviderError):
        media.download_result(file_host + "/busy", cfg, timeout=5)


def test_download_result_connection_refused_is_transient():
    with pytest.raises(media.ResultError) as err:
        media.download_result("http://127.0.0.1:9/x.png", make_cfg(), timeout=2)
    assert err.value.transient and err.value.retryable


# ------------------------------------------------------------------------------------ add_text

POSITIONS = ["top", "center", "bottom"]
COLOURS = ["white", "black", "yellow", "red"]


def _changed_box(before: bytes, after: bytes):
    a, b = open_bytes(before).convert("RGB"), open_bytes(after).convert("RGB")
    assert a.size == b.size
    return ImageChops.difference(a, b).getbbox()


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("colour", COLOURS)
def test_add_text_draws_in_the_expected_band(position, colour):
    cfg = make_cfg()
    source = solid(400, 300, (128, 128, 128), fmt="JPEG")
    out = media.add_text(source, "Hello", position=position, color=colour, cfg=cfg)
    assert media.sniff_content_type(out) == "image/png"
    assert open_bytes(out).size == (400, 300)
    box = _changed_box(source, out)
    assert box is not None
    left, top, right, bottom = box
    assert left > 0 and right < 400 and abs((left + right) / 2 - 200) < 12   # centred
    if position == "top":
        assert bottom < 150
    elif position == "bottom":
        assert top > 150
    else:
        assert top < 150 < bottom
    # the fill colour is present in the changed region
    fill = media.TEXT_COLORS[colour][0]
    colours = open_bytes(out).convert("RGB").crop(box).getcolors(1 << 20)
    assert any(_close(colour, fill, 30) for _, colour in colours)


def test_add_text_renders_cyrillic_glyphs():
    cfg = make_cfg()
    source = solid(400, 300, (90, 120, 160))
    hello = media.add_text(source, "Привет, мир!", position="center", color="white", cfg=cfg)
    assert _changed_box(source, hello) is not None
    # a font without Cyrillic draws the same "missing glyph" box for every letter
    a = media.add_text(source, "ППП", position="center", color="white", cfg=cfg)
    b = media.add_text(source, "ЖЖЖ", position="center", color="white", cfg=cfg)
    assert ImageChops.difference(open_bytes(a), open_bytes(b)).getbbox() is not None


def test_add_text_wraps_long_text():
    cfg = make_cfg()
    source = solid(400, 300)
    short = media.add_text(source, "Кот", position="center", color="white", cfg=cfg)
    text = "Очень длинная подпись, которая точно не поместится в одну строку на этой картинке"
    long = media.add_text(source, text, position="center", color="white", cfg=cfg)
    layout = media.layout_text(400, 300, text, cfg)
    assert len(layout.lines) > 1
    assert layout.width <= 400 * 0.9 and layout.height <= 300 * 0.4
    short_box, long_box = _changed_box(source, short), _changed_box(source, long)
    assert long_box[3] - long_box[1] > short_box[3] - short_box[1]
    assert long_box[0] >= 0 and long_box[2] <= 400


def test_add_text_validation():
    cfg = make_cfg()
    for empty in ("", "   \n"):
        with pytest.raises(media.InvalidInput) as err:
            media.add_text(solid(), empty, position="top", color="white", cfg=cfg)
        assert err.value.code == "text_empty"
    with pytest.raises(media.InvalidInput) as err:
        media.add_text(solid(), "я" * 201, position="top", color="white", cfg=cfg)
    assert (err.value.code, err.value.limit) == ("text_too_long", 200)
    media.add_text(solid(), "я" * 200, position="top", color="white", cfg=cfg)
    with pytest.raises(ValueError):
        media.add_text(solid(), "x", position="left", color="white", cfg=cfg)
    with pytest.raises(ValueError):
        media.add_text(solid(), "x", position="top", color="pink", cfg=cfg)


# ------------------------------------------------------------------------------------ demo backend


@pytest.mark.parametrize("mode, count, expect_size", [
    ("generate", 0, (1024, 576)),
    ("edit", 1, (300, 200)),
    ("merge", 3, None),
    ("face_swap", 2, (300, 200)),
    ("retouch", 1, (300, 200)),
    ("upscale", 1, (600, 400)),
])
def test_demo_backend_renders_every_paid_mode(mode, count, expect_size):
    cfg = make_cfg()
    assert cfg.demo_backend
    gateway = media.backend(cfg)
    assert isinstance(gateway, media.DemoBackend)
    images = [solid(300, 200, c, fmt="JPEG") for c in (RED, GREEN, BLUE)[:count]]
    options = {"aspect_ratio": "16:9"} if mode == "generate" else None
    req = media.build_request(mode, "котик", images, cfg, options=options)
    enqueued, updates = [], []
    result = gateway.run(req, request_id=None, on_enqueue=enqueued.append, timeout=10,
                         on_queue_update=updates.append)
    assert len(enqueued) == 1 and enqueued[0].startswith("demo-")
    assert updates[-1] == {"status": "COMPLETED"}
    urls = media.parse_result(result)
    assert urls[0].startswith("data:image/png;base64,")
    img = open_bytes(media.download_result(urls[0], cfg))
    if expect_size:
        assert img.size == expect_size
    # resuming a demo request renders again without a new id
    again = []
    gateway.run(req, request_id=enqueued[0], on_enqueue=again.append, timeout=10)
    assert again == []


def test_backend_picks_fal_gateway_with_a_key(monkeypatch):
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", fal_client.client.QUEUE_URL_FORMAT)
    cfg = make_cfg(fal_key="k", fal_queue_url="http://127.0.0.1:9/")
    gateway = media.backend(cfg)
    try:
        assert isinstance(gateway, media.FalGateway)
        assert media.backend(cfg) is gateway
        assert fal_client.client.QUEUE_URL_FORMAT == "http://127.0.0.1:9/"
    finally:
        media.backend(make_cfg())   # drop the cached gateway


# ------------------------------------------------------------------------------------ Fal gateway


@pytest.fixture
def fal_cfg(fake_fal):
    return make_cfg(fal_key="test-fal-key", fal_queue_url=fake_fal.url, fal_poll_interval=0.02)


def _run(gateway, request, *, request_id=None, timeout=5.0, **kw):
    enqueued = []
    result = gateway.run(request, request_id=request_id, on_enqueue=enqueued.append, timeout=timeout, **kw)
    return result, enqueued


def test_fal_gateway_runs_a_request(fake_fal, fal_cfg):
    gateway = media.FalGateway(fal_cfg)
    req = media.build_request("edit", "сделай ярче", [solid(300, 200, fmt="JPEG")], fal_cfg)
    result, enqueued = _run(gateway, req)
    [submission] = fake_fal.submissions
    assert enqueued == [submission["request_id"]]
    assert submission["app"] == "fal-ai/nano-banana/edit"
    assert submission["headers"]["authorization"] == "Key test-fal-key"
    assert submission["arguments"]["prompt"] == "сделай ярче"
    assert submission["inputs"][0]["format"] == "JPEG" and submission["inputs"][0]["size"] == [300, 200]
    assert fake_fal.token_leaks == []
    [url] = media.parse_result(result)
    assert open_bytes(media.download_result(url, fal_cfg, timeout=5)).format == "PNG"


def test_fal_gateway_resumes_without_submitting_again(fake_fal, fal_cfg):
    fake_fal.script("latency", seconds=0.8)
    req = media.build_request("upscale", None, [solid(100, 100)], fal_cfg)
    with pytest.raises(media.ProviderTimeout) as err:          # the worker "dies" mid-request
        _run(media.FalGateway(fal_cfg), req, timeout=0.3, cancel_on_timeout=False)
    request_id = err.value.request_id
    assert request_id == fake_fal.submissions[0]["request_id"]

    fresh = media.FalGateway(fal_cfg)                           # a restarted worker
    updates = []
    result, enqueued = _run(fresh, req, request_id=request_id, on_queue_update=updates.append)
    assert enqueued == []
    assert len(fake_fal.submissions) == 1
    assert updates[-1] == {"status": "COMPLETED"}
    assert media.parse_seed(result) is not None
    assert open_bytes(media.download_result(media.parse_result(result)[0], fal_cfg)).size == (200, 200)


def test_fal_gateway_reports_queue_updates(fake_fal, fal_cfg):
    fake_fal.script("queue", position=2)
    updates = []
    _run(media.FalGateway(fal_cfg), media.build_request("generate", "кот", [], fal_cfg),
         on_queue_update=updates.append)
    assert updates[0]["status"] == "IN_QUEUE"
    assert {"status": "IN_QUEUE", "queue_position": 0} in updates
    assert updates[-1] == {"status": "COMPLETED"}


def test_fal_gateway_validation_error_is_permanent(fake_fal, fal_cfg):
    fake_fal.script("validation", loc=["body", "image_urls", 0],
                    msg="bad image data:image/png;base64,iVBORw0KGgoAAAANSUhEUg==")
    req = media.build_request("edit", "x", [solid()], fal_cfg)
    with pytest.raises(media.PermanentProviderError) as err:
        _run(media.FalGateway(fal_cfg), req)
    exc = err.value
    assert type(exc) is media.PermanentProviderError and not exc.retryable
    assert exc.status_code == 422
    assert exc.request_id == fake_fal.submissions[0]["request_id"]
    assert "image_urls.0" in exc.detail and "base64" not in exc.detail and "iVBOR" not in str(exc)


def test_fal_gateway_content_policy(fake_fal, fal_cfg):
    fake_fal.script("policy")
    with pytest.raises(media.ContentPolicyError) as err:
        _run(media.FalGateway(fal_cfg), media.build_request("generate", "x", [], fal_cfg))
    assert not err.value.retryable and err.value.request_id


def test_fal_gateway_server_error_is_transient(fake_fal, fal_cfg):
    fake_fal.script("error500")
    with pytest.raises(media.TransientProviderError) as err:
        _run(media.FalGateway(fal_cfg), media.build_request("generate", "x", [], fal_cfg))
    assert err.value.retryable and err.value.status_code == 500
    assert err.value.error_type == "runner_server_error"


def test_fal_gateway_submit_error_is_transient_without_request_id(fake_fal, fal_cfg):
    fake_fal.script("submit_error", status=503, ingress=False)
    with pytest.raises(media.TransientProviderError) as err:
        _run(media.FalGateway(fal_cfg), media.build_request("generate", "x", [], fal_cfg))
    assert err.value.request_id is None and fake_fal.submissions == []


def test_fal_gateway_hang_times_out_and_cancels(fake_fal, fal_cfg):
    fake_fal.script("hang")
    started = time.monotonic()
    with pytest.raises(media.TransientProviderError) as err:
        _run(media.FalGateway(fal_cfg), media.build_request("generate", "x", [], fal_cfg), timeout=1)
    assert isinstance(err.value, media.ProviderTimeout)
    assert time.monotonic() - started < 3
    request_id = fake_fal.submissions[0]["request_id"]
    assert err.value.request_id == request_id
    assert fake_fal.wait_until(lambda: request_id in fake_fal.cancelled, timeout=5)


def test_fal_gateway_unknown_request_id_is_permanent(fake_fal, fal_cfg):
    with pytest.raises(media.PermanentProviderError) as err:
        _run(media.FalGateway(fal_cfg), media.build_request("generate", "x", [], fal_cfg),
             request_id="no-such-request")
    assert err.value.status_code == 404 and fake_fal.submissions == []


def test_fal_gateway_bad_key_is_permanent(fake_fal, fal_cfg):
    gateway = media.FalGateway(fal_cfg.replace(fal_key="wrong"))
    with pytest.raises(media.PermanentProviderError) as err:
        _run(gateway, media.build_request("generate", "x", [], fal_cfg))
    assert err.value.status_code == 401


def test_fal_gateway_cancels_when_on_enqueue_fails(fake_fal, fal_cfg):
    def broken(request_id):
        raise RuntimeError("database is locked")

    fake_fal.script("hang")
    with pytest.raises(RuntimeError, match="database is locked"):
        media.FalGateway(fal_cfg).run(media.build_request("generate", "x", [], fal_cfg),
                                      request_id=None, on_enqueue=broken, timeout=5)
    assert fake_fal.cancelled == [fake_fal.submissions[0]["request_id"]]


def test_fal_gateway_download_rejects_a_too_big_result(fake_fal, fal_cfg):
    fake_fal.script("big_result", width=600, height=600)
    result, _ = _run(media.FalGateway(fal_cfg), media.build_request("generate", "x", [], fal_cfg))
    [url] = media.parse_result(result)
    with pytest.raises(media.ResultError, match="larger than"):
        media.download_result(url, fal_cfg.replace(max_result_bytes=1000), timeout=5)


# ------------------------------------------------------------------------------------ photo limits


@pytest.mark.parametrize("size, expected", [
    ((12000, 200), False),      # width + height > 10000
    ((1000, 1000), True),
    ((4000, 199), False),       # ratio > 20
    ((4000, 200), True),        # ratio exactly 20
])
def test_fits_telegram_photo(size, expected):
    assert media.fits_telegram_photo(encode(Image.new("L", size), "PNG")) is expected


def test_fits_telegram_photo_size_and_garbage():
    assert media.fits_telegram_photo(b"junk") is False
    assert media.fits_telegram_photo(b"\x89PNG" + b"\x00" * (10 * 1000 * 1000)) is False
