"""Generation modes: validating inputs, building Fal.ai requests, talking to Fal, local Pillow work.

Layers, top to bottom:

- `MODE_SPECS` says what each mode needs (how many images, a prompt or a text, paid or local);
- `validate_prompt`, `inspect_image`, `check_declared_size`, `check_image_count` refuse bad input
  with `InvalidInput(code)` *before* anything is charged;
- `prepare_image` and `build_request` turn the user's bytes into a `FalRequest` whose images are
  data URIs (never a Telegram file URL: that URL contains the bot token);
- `FalGateway.run` submits (or resumes) a request on Fal's queue and maps every failure onto
  `TransientProviderError` (retry) or `PermanentProviderError` / `ContentPolicyError` (do not);
  `DemoBackend.run` has the same signature and renders stand-ins locally when there is no FAL_KEY;
- `parse_result`, `parse_seed`, `download_result` turn Fal's answer into image bytes;
- `add_text` (the free, local mode) and `fits_telegram_photo` are plain Pillow work.

Imports only the stdlib, Pillow, requests, fal_client and `config`.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import random
import re
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import requests
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

import config


class _OnFirstUse:
    """A module imported on first attribute access. fal-client and httpx (≈4 MB of RSS per
    process) are needed only where generations run (the worker); the bot and web import this
    module for validation and would otherwise carry them (bench/bench_pipeline.py, rss_*)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        import importlib

        return getattr(importlib.import_module(self._name), attr)


fal_client = _OnFirstUse("fal_client")     # fal_client.client too: importing the package imports it
httpx = _OnFirstUse("httpx")

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Exceptions
# --------------------------------------------------------------------------------------------


class MediaError(Exception):
    """Media work failed."""

    #: True when trying the same job again later may succeed (the worker's retry decision).
    retryable = False
    #: The user's text for this error (a key of texts.TEXTS) and its values; None: no user text.
    text_key: str | None = None
    values: dict = {}

    def __init__(self, message: str | None = None):
        super().__init__(message or (self.__doc__ or "").strip().splitlines()[0])


INVALID_INPUT_MESSAGES = {
    "prompt_empty": "The prompt is empty.",
    "prompt_too_long": "The prompt is too long.",
    "not_an_image": "The file is not an image.",
    "unsupported_format": "Only JPEG, PNG and WEBP images are supported.",
    "image_too_big": "The image is too big.",
    "image_too_small": "The image is too small.",
    "too_many_images": "Too many images for this mode.",
    "too_few_images": "Not enough images for this mode.",
    "text_empty": "The text is empty.",
    "text_too_long": "The text is too long.",
}


class InvalidInput(MediaError):
    """The user's input cannot be used; `.code` says why (one of `INVALID_INPUT_MESSAGES`)."""

    def __init__(self, code: str, message: str | None = None, *, limit: int | None = None, unit: str | None = None):
        if code not in INVALID_INPUT_MESSAGES:
            raise ValueError("unknown InvalidInput code %r" % code)
        self.code = code
        #: The limit that was crossed (characters, bytes, pixels or images), when there is one.
        self.limit = limit
        #: What `limit` counts when it is ambiguous: "pixels" for image_too_big from a pixel count
        #: (else bytes).
        self.unit = unit
        # The text shows the limit in the user's units: megabytes, megapixels, "64 пикселя".
        self.text_key, shown = "invalid_" + code, limit
        if code == "image_too_big" and unit == "pixels" and limit:
            self.text_key, shown = "invalid_image_too_many_pixels", max(1, round(limit / 10**6))
        elif code == "image_too_big" and limit and limit > 10**6:
            shown = limit // (1024 * 1024)
        self.values = {"limit": shown if shown is not None else ""}
        super().__init__(message or INVALID_INPUT_MESSAGES[code])


class ProviderError(MediaError):
    """The image provider (Fal.ai) failed."""

    def __init__(
        self,
        detail: str | None = None,
        *,
        request_id: str | None = None,
        status_code: int | None = None,
        error_type: str | None = None,
    ):
        #: Short text safe for logs and admins (no data URIs, no keys); not for end users.
        self.detail = detail or ""
        #: Fal's request id when the request got that far, else None.
        self.request_id = request_id
        self.status_code = status_code
        self.error_type = error_type
        #: True when Fal reported the request itself as failed (COMPLETED with an error): a retry
        #: must submit a new request, re-polling this one only returns the same failure.
        self.request_failed = False
        head = (self.__doc__ or "").strip().splitlines()[0]
        super().__init__("%s: %s" % (head, self.detail) if self.detail else head)


class TransientProviderError(ProviderError):
    """The provider failed in a way that may pass (timeout, 5xx, 429, runner or network trouble)."""

    retryable = True


class ProviderTimeout(TransientProviderError):
    """The provider did not finish within the job's time limit."""


class PermanentProviderError(ProviderError):
    """The provider refused the request (4xx, validation); sending it again will not help."""


class ContentPolicyError(PermanentProviderError):
    """The provider blocked the request or its result under its content policy."""


class ResultError(MediaError):
    """The provider's result cannot be downloaded or decoded (missing, too big, not an image)."""

    def __init__(self, detail: str | None = None, *, transient: bool = False):
        self.detail = detail or ""
        #: True for download timeouts and dropped connections (retry), False for a bad result.
        self.transient = transient
        self.retryable = transient
        head = (self.__doc__ or "").strip().splitlines()[0]
        super().__init__("%s: %s" % (head, self.detail) if self.detail else head)


# --------------------------------------------------------------------------------------------
# Mode specs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """A choice a mode asks for with buttons after its prompt or text (one question per option)."""

    name: str                  # the key in Generation.options / the argument of add_text
    choices: tuple             # the values offered (bot), accepted (worker) and sent (Fal), in button order
    button: str                # callback-data prefix of its buttons: "<button>:<choice>"
    ask_key: str               # text key of the question
    per_row: int               # buttons per keyboard row
    label_key: str | None = None   # text key of a choice's label, "%s" = the choice; None: the choice itself


@dataclass(frozen=True)
class ModeSpec:
    """What a mode needs from the user, and in which order the bot asks for it: the images (one
    question each, the last repeated), then the prompt or the text, then each option. A mode whose
    image count may vary (min < max) waits for the user's "✅ Готово"; a caption sent with the images
    is the prompt. Image order matters where `image_roles` says so."""

    name: str
    min_images: int
    max_images: int
    needs_prompt: bool = False   # an instruction for the model (validate_prompt)
    needs_text: bool = False     # a caption to draw (validate_text)
    paid: bool = True
    local: bool = False          # done here with Pillow, never sent to Fal
    image_roles: tuple = ()      # names of the images in the order the user sends them
    options: tuple = ()          # Option, asked in order after the prompt/text
    image_keys: tuple = ()       # text keys asking for image 1, 2, … (the last one repeats)
    input_key: str | None = None     # text key asking for the prompt or the text
    consent_key: str | None = None   # text key of a note the user accepts once before the first use

    def option(self, name: str) -> Option | None:
        """This mode's option `name`, or None."""
        return next((o for o in self.options if o.name == name), None)


ASPECT_RATIO = Option(
    # fal-ai/nano-banana accepts 21:9 … 9:16 (docs/REFERENCES.md §6); we offer these five.
    "aspect_ratio", ("1:1", "16:9", "9:16", "4:3", "3:4"), button="ratio", ask_key="ask_ratio", per_row=3)
TEXT_POSITION = Option("position", ("top", "center", "bottom"), button="pos", ask_key="ask_position",
                       per_row=3, label_key="btn_pos_%s")
TEXT_COLOR = Option("color", ("white", "black", "yellow", "red"), button="color", ask_key="ask_color",
                    per_row=2, label_key="btn_color_%s")

MODE_SPECS: dict[str, ModeSpec] = {
    "generate": ModeSpec("generate", 0, 0, needs_prompt=True, options=(ASPECT_RATIO,),
                         input_key="ask_generate_prompt"),
    "edit": ModeSpec("edit", 1, 1, needs_prompt=True, image_roles=("photo",), image_keys=("ask_edit_photo",),
                     input_key="ask_edit_instruction"),
    "merge": ModeSpec("merge", 2, 4, needs_prompt=True, image_keys=("ask_merge_photos",),
                      input_key="ask_merge_instruction"),
    "add_text": ModeSpec("add_text", 1, 1, needs_text=True, paid=False, local=True, image_roles=("photo",),
                         options=(TEXT_POSITION, TEXT_COLOR), image_keys=("ask_add_text_photo",),
                         input_key="ask_add_text_text"),
    "face_swap": ModeSpec("face_swap", 2, 2, image_roles=("face", "target"),
                          image_keys=("ask_face_photo", "ask_target_photo"), consent_key="face_swap_consent"),
    "retouch": ModeSpec("retouch", 1, 1, image_roles=("photo",), image_keys=("ask_retouch_photo",)),
    "upscale": ModeSpec("upscale", 1, 1, image_roles=("photo",), image_keys=("ask_upscale_photo",)),
}
assert tuple(MODE_SPECS) == config.MODES
assert tuple(m for m, s in MODE_SPECS.items() if s.paid) == config.PAID_MODES

# The one list of aspect ratios (bot buttons, worker validation, Fal arguments); the first is the default.
ASPECT_RATIOS = ASPECT_RATIO.choices

# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

INPUT_FORMATS = ("JPEG", "PNG", "WEBP")
MIN_IMAGE_SIDE = 64            # pixels; smaller pictures give models nothing to work with
MAX_TEXT_LENGTH = 200          # characters drawn by add_text
SEND_MAX_SIDE = 2048           # pixels; longer side of an image sent to Fal
SEND_JPEG_QUALITY = 92


@dataclass(frozen=True)
class ImageInfo:
    """What `inspect_image` found: Pillow format name, stored size in pixels, size in bytes."""

    format: str
    width: int
    height: int
    bytes: int


def validate_prompt(text: str | None, cfg: config.Config) -> str:
    """Return the prompt stripped of surrounding whitespace.

    :param text: what the user typed (None counts as empty).
    :param cfg: uses `cfg.max_prompt_length` (characters, after stripping).
    :raises InvalidInput: ``prompt_empty`` or ``prompt_too_long`` (`.limit` = the maximum).
    """
    text = (text or "").strip()
    if not text:
        raise InvalidInput("prompt_empty")
    if len(text) > cfg.max_prompt_length:
        raise InvalidInput("prompt_too_long", limit=cfg.max_prompt_length)
    return text


def validate_text(text: str | None) -> str:
    """Return the text to draw (add_text) stripped of surrounding whitespace; line breaks are kept.

    :raises InvalidInput: ``text_empty`` or ``text_too_long`` (`.limit` = MAX_TEXT_LENGTH characters).
    """
    text = (text or "").strip()
    if not text:
        raise InvalidInput("text_empty")
    if len(text) > MAX_TEXT_LENGTH:
        raise InvalidInput("text_too_long", limit=MAX_TEXT_LENGTH)
    return text


def validate_input(spec: ModeSpec, text: str | None, cfg: config.Config) -> str:
    """The user's typed input for mode `spec`, checked: its prompt (`validate_prompt`) or its text to
    draw (`validate_text`). Raises InvalidInput as those do; ValueError for a mode that takes neither."""
    if spec.needs_prompt:
        return validate_prompt(text, cfg)
    if spec.needs_text:
        return validate_text(text)
    raise ValueError("mode %r takes no typed input" % spec.name)


def check_declared_size(file_size: int | None, cfg: config.Config) -> None:
    """Refuse a file by the size Telegram declares, before downloading it.

    :param file_size: bytes, from ``PhotoSize.file_size`` / ``Document.file_size``; None = unknown (allowed,
        `inspect_image` checks the bytes later).
    :param cfg: uses `cfg.max_image_bytes` (default 20 MB: "bots can download files of up to 20MB in size",
        Bot API getFile, quoted in the pyTelegramBotAPI ``get_file`` docstring).
    :raises InvalidInput: ``image_too_big`` (`.limit` = the maximum in bytes).
    """
    if file_size is not None and file_size > cfg.max_image_bytes:
        raise InvalidInput("image_too_big", limit=cfg.max_image_bytes)


def check_image_count(mode: str, count: int) -> None:
    """Refuse a wrong number of images for `mode` (see `MODE_SPECS`).

    :raises InvalidInput: ``too_few_images`` / ``too_many_images`` (`.limit` = the bound crossed).
    :raises ValueError: unknown mode.
    """
    spec = mode_spec(mode)
    if count < spec.min_images:
        raise InvalidInput("too_few_images", limit=spec.min_images)
    if count > spec.max_images:
        raise InvalidInput("too_many_images", limit=spec.max_images)


def mode_spec(mode: str) -> ModeSpec:
    """Return the `ModeSpec` of `mode`; raise ValueError for an unknown mode."""
    try:
        return MODE_SPECS[mode]
    except KeyError:
        raise ValueError("unknown mode %r (known: %s)" % (mode, ", ".join(MODE_SPECS))) from None


def inspect_image(data: bytes, cfg: config.Config) -> ImageInfo:
    """Check that `data` is a usable input picture without decoding all of its pixels.

    Reads the header with Pillow (``Image.open``) and runs ``verify()`` (checks PNG chunk CRCs and the
    structure of other formats). Width and height are as stored (before EXIF rotation).

    :param data: the downloaded file.
    :param cfg: uses `cfg.max_image_bytes` (Bot API getFile limit, 20 MB).
    :raises InvalidInput: ``image_too_big`` (more bytes than allowed, or more pixels than Pillow's
        decompression-bomb limit ``Image.MAX_IMAGE_PIXELS``), ``not_an_image``, ``unsupported_format``
        (anything but JPEG/PNG/WEBP, e.g. GIF), ``image_too_small`` (shorter side < 64 px).
    """
    if len(data) > cfg.max_image_bytes:
        raise InvalidInput("image_too_big", limit=cfg.max_image_bytes)
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height) = img.format, img.size
            if fmt in INPUT_FORMATS:
                img.verify()
    except Image.DecompressionBombError:
        raise InvalidInput("image_too_big", limit=Image.MAX_IMAGE_PIXELS, unit="pixels") from None
    except Exception:  # UnidentifiedImageError, SyntaxError/OSError from verify, struct errors...
        raise InvalidInput("not_an_image") from None
    if fmt not in INPUT_FORMATS:
        raise InvalidInput("unsupported_format")
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        raise InvalidInput("image_too_big", limit=Image.MAX_IMAGE_PIXELS, unit="pixels")
    if min(width, height) < MIN_IMAGE_SIDE:
        raise InvalidInput("image_too_small", limit=MIN_IMAGE_SIDE)
    return ImageInfo(fmt, width, height, len(data))


# --------------------------------------------------------------------------------------------
# Request building
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FalRequest:
    """One call to a Fal endpoint: the endpoint id, its JSON arguments, and the mode it serves."""

    endpoint: str
    arguments: dict = field(repr=False)
    mode: str = ""


def _open_for_work(data: bytes) -> Image.Image:
    """Decode `data` fully, upright (EXIF orientation applied); raise InvalidInput if it cannot be."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            img.draft("RGB", (SEND_MAX_SIDE, SEND_MAX_SIDE))  # decode big JPEGs at 1/2..1/8 scale
        img.load()
    except Image.DecompressionBombError:
        raise InvalidInput("image_too_big", limit=Image.MAX_IMAGE_PIXELS, unit="pixels") from None
    except Exception:
        raise InvalidInput("not_an_image") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF must not lose the picture
        logger.debug("ignoring unreadable EXIF orientation", exc_info=True)
    return img


def _has_alpha(img: Image.Image) -> bool:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        alpha = img.convert("RGBA").getchannel("A")
        return alpha.getextrema()[0] < 255
    return False


def _png_bytes(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def prepare_image(data: bytes) -> bytes:
    """Re-encode a user's picture for sending to Fal.

    Applies the EXIF orientation (``ImageOps.exif_transpose``), shrinks so the longer side is at most
    2048 px (LANCZOS, never enlarges), and encodes JPEG quality 92 in RGB, or PNG (RGBA) when the picture
    has real transparency. Metadata (EXIF, GPS) is dropped. A 2048 px JPEG is ~1–2 MB, small enough for
    a data URI in the request body.

    :param data: JPEG/PNG/WEBP bytes (already checked with `inspect_image`).
    :returns: JPEG or PNG bytes (see `sniff_content_type`).
    :raises InvalidInput: ``not_an_image`` when Pillow cannot decode it, ``image_too_big`` for a
        decompression bomb.
    """
    img = _open_for_work(data)
    if _has_alpha(img):
        img = img.convert("RGBA")
    else:
        img = img.convert("RGB")
    img.thumbnail((SEND_MAX_SIDE, SEND_MAX_SIDE), Image.Resampling.LANCZOS)
    if img.mode == "RGBA":
        return _png_bytes(img)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=SEND_JPEG_QUALITY, optimize=True)
    return out.getvalue()


def sniff_content_type(data: bytes) -> str:
    """Return the MIME type of PNG/JPEG/WEBP/GIF bytes by their magic number ("application/octet-stream" else)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return "application/octet-stream"


def mode_extra_args(mode: str, environ: dict | None = None) -> dict:
    """Return the operator's extra Fal arguments for `mode` from ``FAL_ARGS_<MODE>`` (a JSON object).

    Example: ``FAL_ARGS_UPSCALE='{"scale": 4, "model": "RealESRGAN_x4plus"}'``. The object is merged over
    the defaults by `build_request`; a ``null`` value removes a default argument.

    :param environ: mapping to read (default: the process configuration, ``config.get().fal_args``,
        validated when it was loaded).
    :raises ValueError: the variable is not valid JSON or not a JSON object (message names the variable).
    """
    if environ is None:
        return dict(config.get().fal_args.get(mode, {}))
    name = "FAL_ARGS_%s" % mode.upper()
    raw = (environ.get(name) or "").strip()
    if not raw:
        return {}
    return config.json_object(name, raw)


def build_request(
    mode: str,
    prompt: str | None,
    images: list[bytes],
    cfg: config.Config,
    options: dict | None = None,
    extra_args: dict | None = None,
) -> FalRequest:
    """Build the Fal request of a paid mode.

    Every image is re-encoded with `prepare_image` and sent as a data URI (``fal_client.encode``); a URL is
    never sent, because a Telegram file URL contains the bot token (docs/SPEC.md §3). Default arguments
    (fal endpoint schemas, docs/REFERENCES.md §6):

    - generate → ``{prompt, num_images: 1, output_format: "png", aspect_ratio}``
    - edit / merge → ``{prompt, image_urls: [uri, ...], num_images: 1, output_format: "png"}``
    - face_swap → ``{base_image_url: target, swap_image_url: face}`` (images are ``[face, target]``)
    - retouch → ``{image_url}``;  upscale → ``{image_url, scale: 2}``

    :param mode: a paid mode of `MODE_SPECS`.
    :param prompt: the instruction (validated for generate/edit/merge, ignored otherwise).
    :param images: raw picture bytes in the order of ``MODE_SPECS[mode].image_roles``.
    :param cfg: uses `cfg.fal_endpoints`, `cfg.max_prompt_length`, `cfg.telegram_bot_token` (as a guard).
    :param options: user choices; only ``aspect_ratio`` (one of `ASPECT_RATIOS`, generate only, default "1:1").
    :param extra_args: operator's arguments merged over the defaults (see `mode_extra_args`); None values
        delete a default.
    :raises InvalidInput: prompt or image-count problems, undecodable images.
    :raises ValueError: unknown or local mode, unknown option, bad aspect ratio.
    """
    spec = mode_spec(mode)
    if spec.local:
        raise ValueError("mode %r is rendered locally and has no Fal request" % mode)
    options = dict(options or {})
    unknown = set(options) - {"aspect_ratio"}
    if unknown:
        raise ValueError("unknown option(s) for %s: %s" % (mode, ", ".join(sorted(unknown))))
    check_image_count(mode, len(images))
    if spec.needs_prompt:
        prompt = validate_prompt(prompt, cfg)
    uris = []
    for data in images:
        prepared = prepare_image(data)
        uris.append(fal_client.encode(prepared, sniff_content_type(prepared)))

    arguments = _default_arguments(mode, prompt, uris, options)
    for key, value in (extra_args or {}).items():
        if value is None:
            arguments.pop(key, None)
        else:
            arguments[key] = value

    token = cfg.telegram_bot_token
    if token and token in json.dumps(arguments):  # ':' is not base64, so a data URI never matches
        raise ValueError("refusing to send the bot token to Fal (check FAL_ARGS_%s)" % mode.upper())
    endpoint = cfg.fal_endpoints.get(mode) or config.DEFAULT_ENDPOINTS[mode]
    return FalRequest(endpoint=endpoint, arguments=arguments, mode=mode)


def _default_arguments(mode: str, prompt: str | None, uris: list[str], options: dict) -> dict:
    """The Fal arguments of `mode` before the operator's FAL_ARGS_* (see `build_request`)."""
    if mode == "generate":
        ratio = options.get("aspect_ratio") or ASPECT_RATIOS[0]
        if ratio not in ASPECT_RATIOS:
            raise ValueError("aspect_ratio must be one of %s, got %r" % (", ".join(ASPECT_RATIOS), ratio))
        return {"prompt": prompt, "num_images": 1, "output_format": "png", "aspect_ratio": ratio}
    if mode in ("edit", "merge"):
        return {"prompt": prompt, "image_urls": uris, "num_images": 1, "output_format": "png"}
    if mode == "face_swap":
        face, target = uris
        return {"base_image_url": target, "swap_image_url": face}
    if mode == "retouch":
        return {"image_url": uris[0]}
    if mode == "upscale":
        return {"image_url": uris[0], "scale": 2}
    raise ValueError("no request mapping for mode %r" % mode)  # pragma: no cover - kept with MODE_SPECS


def parse_result(result: dict) -> list[str]:
    """Return the image URLs of a Fal result, in order.

    Accepts ``{"images": [{"url": ...}, ...]}`` (nano-banana) and ``{"image": {"url": ...}}``
    (face-swap, retoucher, esrgan) — output schemas in docs/REFERENCES.md §6.

    :raises ResultError: (permanent) no image URL in the result.
    """
    urls: list[str] = []
    if isinstance(result, dict):
        items = result.get("images")
        if isinstance(items, list):
            urls.extend(i["url"] for i in items if isinstance(i, dict) and isinstance(i.get("url"), str))
        single = result.get("image")
        if not urls and isinstance(single, dict) and isinstance(single.get("url"), str):
            urls.append(single["url"])
    urls = [u for u in urls if u]
    if not urls:
        keys = ", ".join(sorted(result)) if isinstance(result, dict) else type(result).__name__
        raise ResultError("no image in the provider's result (keys: %s)" % keys)
    return urls


def parse_seed(result: dict) -> int | None:
    """Return the integer ``seed`` of a Fal result, or None when it has none."""
    seed = result.get("seed") if isinstance(result, dict) else None
    if isinstance(seed, int) and not isinstance(seed, bool):
        return seed
    return None


# --------------------------------------------------------------------------------------------
# Fal gateway
# --------------------------------------------------------------------------------------------

SUBMIT_TIMEOUT = 60.0        # seconds for the submit POST (the body carries the data URIs)
RESULT_GRACE = 60.0          # seconds allowed to fetch a result that completed right at the deadline
CANCEL_TIMEOUT = 10.0        # seconds a best-effort cancel may take
TRANSIENT_STATUS = (408, 409, 429)
TRANSIENT_ERROR_TYPES = ("request_timeout", "startup_timeout", "internal_error", "runner_server_error")
_DATA_URI_RE = re.compile(r"data:[\w.+/-]*;base64,[A-Za-z0-9+/=\s]+")


def _short_detail(message: Any, limit: int = 300) -> str:
    """Condense a fal error ``detail`` (text, or a list of {loc, msg, type}) into one safe log line."""
    if isinstance(message, list):
        parts = []
        for item in message:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                msg = str(item.get("msg") or item.get("type") or "")
                parts.append("%s: %s" % (loc, msg) if loc else msg)
            else:
                parts.append(str(item))
        text = "; ".join(parts)
    elif isinstance(message, dict):
        text = json.dumps(message, ensure_ascii=False, default=str)
    else:
        text = str(message)
    text = _DATA_URI_RE.sub("data:…", text).replace("\n", " ").strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _mentions_policy(*parts: Any) -> bool:
    blob = " ".join(json.dumps(p, default=str) if not isinstance(p, str) else p for p in parts if p)
    blob = blob.lower()
    return "content_policy" in blob or "content policy" in blob


def _classify(status_code: int | None, error_type: str | None, message: Any, request_id: str | None) -> ProviderError:
    """Turn an HTTP status / fal ``error_type`` / ``detail`` into the matching ProviderError."""
    detail = _short_detail(message)
    kwargs = dict(request_id=request_id, status_code=status_code, error_type=error_type)
    if _mentions_policy(error_type, message) and (status_code is None or 400 <= status_code < 500):
        return ContentPolicyError(detail, **kwargs)
    if status_code is None:
        if error_type and (error_type in TRANSIENT_ERROR_TYPES or error_type.startswith("runner_")):
            return TransientProviderError(detail, **kwargs)
        return PermanentProviderError(detail, **kwargs)
    if status_code in TRANSIENT_STATUS or status_code >= 500:
        return TransientProviderError(detail, **kwargs)
    return PermanentProviderError(detail, **kwargs)


def _map_exception(exc: BaseException, request_id: str | None) -> BaseException:
    """Map a fal-client/httpx exception onto our hierarchy; return anything unknown unchanged."""
    if isinstance(exc, MediaError):
        return exc
    if isinstance(exc, fal_client.FalClientHTTPError):
        return _classify(exc.status_code, exc.error_type, exc.message, request_id)
    if isinstance(exc, fal_client.FalClientTimeoutError):
        return ProviderTimeout("timed out after %s s" % exc.timeout, request_id=request_id or exc.request_id)
    if isinstance(exc, httpx.TimeoutException):
        return TransientProviderError("network timeout (%s)" % type(exc).__name__, request_id=request_id)
    if isinstance(exc, httpx.HTTPError):  # TransportError and the rest, after fal-client's own retries
        return TransientProviderError("network error (%s)" % type(exc).__name__, request_id=request_id)
    if isinstance(exc, fal_client.FalClientError):
        return TransientProviderError(_short_detail(str(exc)), request_id=request_id)
    if isinstance(exc, (ValueError, KeyError, TypeError)):  # malformed JSON / unknown status from the queue
        return TransientProviderError("unexpected answer from Fal (%s)" % type(exc).__name__, request_id=request_id)
    return exc


def _status_event(status: Any) -> dict:
    """Describe a fal ``Status`` as Fal's JSON does: {"status": ..., "queue_position"?: int}."""
    if isinstance(status, fal_client.Queued):
        return {"status": "IN_QUEUE", "queue_position": status.position}
    if isinstance(status, fal_client.InProgress):
        return {"status": "IN_PROGRESS"}
    if isinstance(status, fal_client.Completed):
        return {"status": "COMPLETED"}
    return {"status": type(status).__name__.upper()}


class DeadlinePassed(TimeoutError):
    """`call_with_deadline`: the call did not finish before its deadline."""


def call_with_deadline(fn: Callable[[], Any], deadline: float, *, on_late: Callable[[Any], None] | None = None,
                       name: str = "bounded-call") -> Any:
    """Run `fn()` in a daemon thread and wait for it until `deadline` (a ``time.monotonic()``
    value); return its value or re-raise its exception. The one deadline helper of the project
    (Fal calls here, Telegram downloads in the worker): libraries whose own timeouts do not bound
    the whole call are bounded by it.

    A call still running at the deadline is abandoned (its thread finishes in the background);
    when it later returns a value, `on_late(value)` runs in that thread (e.g. cancel a Fal request
    that was submitted after all). Raises DeadlinePassed (no time left, or the deadline passed).
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlinePassed("no time left before the call")
    box: dict = {}
    done = threading.Event()
    lock = threading.Lock()

    def target():
        try:
            value = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = exc
        else:
            with lock:
                late = box.get("abandoned", False)
                box["value"] = value
            if late and on_late is not None:
                try:
                    on_late(value)
                except Exception:
                    logger.warning("late-completion handler failed", exc_info=True)
        finally:
            done.set()

    threading.Thread(target=target, name=name, daemon=True).start()
    if not done.wait(remaining):
        with lock:
            box["abandoned"] = True
            finished = "value" in box or "error" in box
        if not finished:
            raise DeadlinePassed("the deadline passed")
    if "error" in box:
        raise box["error"]
    return box["value"]


class FalGateway:
    """Runs `FalRequest`s on Fal's queue API with fal-client 1.0.3 (``fal_client.SyncClient``).

    Construction points the process-wide ``fal_client.client.QUEUE_URL_FORMAT`` at ``cfg.fal_queue_url``
    (a test fake or the real ``https://queue.fal.run``). fal-client reads that global at call time: in
    ``SyncClient.submit`` (``url = QUEUE_URL_FORMAT + application``) and in
    ``SyncRequestHandle.from_request_id`` (used by ``get_handle``/``status``/``result``/``cancel``); a
    submitted handle follows the ``status_url``/``response_url``/``cancel_url`` the server returned.
    Because it is a module global, every gateway in one process uses the last configured URL.

    Duplicate-submission hazard (docs/REFERENCES.md §6): fal-client's ``_maybe_retry_request`` retries
    every request, the submit POST included, up to ``MAX_ATTEMPTS`` = 10 times on transport errors,
    timeouts and 408/409/429. A submit that reached Fal but whose answer was lost is therefore POSTed
    again and may run (and be billed by Fal) twice. Mitigations here: the caller persists the
    request id in ``on_enqueue`` and passes it back as ``request_id`` so a retried job resumes instead of
    submitting again; and the ``X-Fal-Request-Timeout`` header (``start_timeout``) is set, which makes
    fal-client stop retrying timed-out submits and makes Fal drop a request that has not started in time.

    Why not ``SyncClient.subscribe(client_timeout=...)``: it runs the whole job on fal-client's shared
    thread pool and, on timeout, leaves that thread polling forever while the request stays unfinished;
    it calls ``on_enqueue`` from that pool thread (peewee connections are per-thread); and with
    ``client_timeout <= 1`` it fails with ValueError (``start_timeout`` must be > 1 s). `run` does the same
    submit → poll → fetch itself, with the callbacks in the caller's thread and each HTTP call bounded by
    the job's deadline.
    """

    def __init__(self, cfg: config.Config, client: fal_client.SyncClient | None = None):
        """Create the gateway; `client` replaces the ``SyncClient(key=cfg.fal_key, ...)`` (tests)."""
        self.cfg = cfg
        fal_client.client.QUEUE_URL_FORMAT = cfg.fal_queue_url.rstrip("/") + "/"
        if client is None:
            client = fal_client.SyncClient(key=cfg.fal_key, default_timeout=min(SUBMIT_TIMEOUT, cfg.fal_timeout))
            _ = client._client  # open the (thread-safe) httpx pool now, not racily in the first jobs
        self.client = client

    def close(self) -> None:
        """Close the HTTP connection pool (only if it was opened)."""
        http = self.client.__dict__.get("_client")
        if http is not None:
            http.close()

    # A fal call in a daemon thread, waited for until `deadline` (time.monotonic()).
    def _call(self, fn: Callable[[], Any], deadline: float, request_id: str | None,
              on_late: Callable[[Any], None] | None = None) -> Any:
        try:
            return call_with_deadline(fn, deadline, on_late=on_late, name="fal-call")
        except DeadlinePassed as exc:
            raise ProviderTimeout(str(exc), request_id=request_id) from None
        except Exception as error:
            mapped = _map_exception(error, request_id)
            if mapped is error:
                raise
            if isinstance(error, fal_client.FalClientHTTPError):
                raise mapped from None  # its text may echo the arguments (data URIs) into tracebacks
            raise mapped from error

    def run(
        self,
        request: FalRequest,
        *,
        request_id: str | None,
        on_enqueue: Callable[[str], None],
        timeout: float,
        on_queue_update: Callable[[dict], None] | None = None,
        cancel_on_timeout: bool = True,
    ) -> dict:
        """Run `request` on Fal's queue (or resume it) and return the model's output JSON.

        Protocol (fal queue API, docs/REFERENCES.md §6): ``POST {queue}/{endpoint}`` → request id;
        ``GET status_url`` every ``cfg.fal_poll_interval`` s until COMPLETED; ``GET response_url``.

        :param request: from `build_request`.
        :param request_id: a Fal request id persisted by an earlier attempt: the request is RESUMED
            (status/result of that id on the same endpoint) and nothing is submitted.
        :param on_enqueue: called once, in the caller's thread, with the new request id right after a
            submit (persist it there). If it raises, the request is cancelled best-effort and the
            exception propagates. Not called when resuming.
        :param timeout: seconds for the whole job (submit, queue, run); also sent to Fal as
            ``X-Fal-Request-Timeout`` (start timeout) when > 1 s.
        :param on_queue_update: called in the caller's thread with ``{"status": "IN_QUEUE",
            "queue_position": n}``, ``{"status": "IN_PROGRESS"}`` or ``{"status": "COMPLETED"}`` each time
            the status changes.
        :param cancel_on_timeout: cancel the Fal request (best-effort) when `timeout` passes; pass False
            if the job will be resumed later with the same id.
        :returns: the output JSON, e.g. ``{"images": [{"url": ...}], "description": ...}``.
        :raises ProviderTimeout: (a TransientProviderError) the deadline passed; `.request_id` is set if known.
        :raises TransientProviderError: 5xx, 408/409/429, network failures, runner errors.
        :raises ContentPolicyError: a 4xx whose detail / error_type mentions the content policy.
        :raises PermanentProviderError: other 4xx (validation, unknown request id, ...).
        """
        deadline = time.monotonic() + timeout
        endpoint = request.endpoint
        rid = request_id
        try:
            if rid:
                logger.info("fal: resuming %s request %s", endpoint, rid)
                handle = self.client.get_handle(endpoint, rid)
            else:
                handle = self._submit(request, deadline, timeout, on_enqueue)
                rid = handle.request_id
            status = self._wait(handle, deadline, timeout, on_queue_update)
            result = self._fetch(handle, status, deadline)
            logger.info("fal: request %s completed", rid)
            return result
        except ProviderTimeout as exc:
            rid = exc.request_id or rid
            logger.warning("fal: request %s on %s timed out after %s s", rid, endpoint, timeout)
            if cancel_on_timeout and rid:
                threading.Thread(target=self.cancel, args=(endpoint, rid), name="fal-cancel", daemon=True).start()
            raise ProviderTimeout("timed out after %g s" % timeout, request_id=rid) from exc
        except ProviderError as exc:
            logger.warning("fal: request %s on %s failed: %s (%s, status %s)", rid, endpoint,
                           exc.detail, type(exc).__name__, exc.status_code)
            raise

    def _submit(self, request: FalRequest, deadline: float, timeout: float, on_enqueue: Callable[[str], None]):
        """Step 1 of `run`: submit, hand the request id to `on_enqueue`; return the handle. A submit
        that completes after the deadline is cancelled; so is one whose id could not be stored."""
        endpoint = request.endpoint
        start_timeout = timeout if timeout > 1 else None  # fal-client requires > 1 s

        def submit():
            return self.client.submit(endpoint, request.arguments, start_timeout=start_timeout)

        def orphan(late_handle):
            logger.warning("fal: submit of %s finished after the deadline; cancelling %s",
                           endpoint, late_handle.request_id)
            self._cancel_handle(late_handle)

        handle = self._call(submit, deadline, None, on_late=orphan)
        rid = handle.request_id
        logger.info("fal: submitted %s as request %s", endpoint, rid)
        try:
            on_enqueue(rid)
        except BaseException:
            logger.warning("fal: on_enqueue failed for request %s; cancelling it", rid)
            self._cancel_handle(handle)
            raise
        return handle

    def _wait(self, handle, deadline: float, timeout: float, on_queue_update) -> Any:
        """Step 2 of `run`: poll the status every FAL_POLL_INTERVAL s until COMPLETED (returned);
        ProviderTimeout at the deadline."""
        rid, interval, last_event = handle.request_id, self.cfg.fal_poll_interval, None
        while True:
            status = self._call(lambda: handle.status(with_logs=False), deadline, rid)
            event = _status_event(status)
            if on_queue_update is not None and event != last_event:
                on_queue_update(event)
            last_event = event
            if isinstance(status, fal_client.Completed):
                return status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProviderTimeout("timed out after %.3g s" % timeout, request_id=rid)
            time.sleep(min(interval, remaining))

    def _fetch(self, handle, status, deadline: float) -> dict:
        """Step 3 of `run`: the result of a COMPLETED request (a little grace past the deadline);
        a request Fal reports failed raises with ``request_failed`` set."""
        rid = handle.request_id
        fetch_deadline = max(deadline, time.monotonic() + RESULT_GRACE)
        try:
            result = self._call(lambda: handle.get(interval=self.cfg.fal_poll_interval), fetch_deadline, rid)
        except ProviderError as exc:
            exc.request_failed = bool(status.error)     # Fal said this request failed
            raise
        if status.error and not (isinstance(result, dict) and (result.get("images") or result.get("image"))):
            failure = _classify(None, status.error_type, status.error, rid)
            failure.request_failed = True
            raise failure
        return result

    def _cancel_handle(self, handle: Any) -> bool:
        try:
            self._call(handle.cancel, time.monotonic() + CANCEL_TIMEOUT, handle.request_id)
            return True
        except Exception as exc:
            logger.info("fal: cancel of %s failed (%s)", handle.request_id, type(exc).__name__)
            return False

    def cancel(self, endpoint: str, request_id: str) -> bool:
        """Ask Fal to cancel a request (``PUT .../requests/<id>/cancel``); best-effort, never raises.

        Fal cancels requests that are still queued; a running one may finish anyway.
        :returns: True when Fal accepted the cancel.
        """
        return self._cancel_handle(self.client.get_handle(endpoint, request_id))


# --------------------------------------------------------------------------------------------
# Demo backend (no FAL_KEY)
# --------------------------------------------------------------------------------------------

_FALLBACK_FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
)


def _load_font(path: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Load `path` at `size` px, falling back to DejaVu and then Pillow's default font."""
    for candidate in (path, *_FALLBACK_FONTS):
        if not candidate:
            continue
        try:
            return ImageFont.truetype(candidate, size)
        except OSError:
            continue
    logger.warning("no TrueType font found (FONT_PATH=%s); Cyrillic will not render", path)
    return ImageFont.load_default(size)


def data_uri(data: bytes, content_type: str = "image/png") -> str:
    """Return ``data:<content_type>;base64,...`` for `data` (same as ``fal_client.encode``)."""
    return fal_client.encode(data, content_type)


def decode_data_uri(uri: str) -> bytes:
    """Return the bytes of a base64 ``data:`` URI.

    :raises ValueError: not a base64 data URI, or bad base64.
    """
    head, sep, payload = uri.partition(",")
    if not (uri.startswith("data:") and sep and head.endswith(";base64")):
        raise ValueError("not a base64 data URI")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("bad base64 in data URI") from None


def _size_for_ratio(ratio: str, long_side: int = 1024) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in ratio.split(":"))
    except (AttributeError, ValueError):
        w, h = 1, 1
    if w <= 0 or h <= 0:
        w, h = 1, 1
    if w >= h:
        return long_side, max(1, round(long_side * h / w))
    return max(1, round(long_side * w / h)), long_side


class DemoBackend:
    """Stand-in for `FalGateway` when no FAL_KEY is set: renders results locally with Pillow.

    Same `run` signature and result shape as Fal (``{"images": [{"url", ...}]}`` or ``{"image": {...}}``),
    with ``data:image/png;base64,...`` URLs so `download_result` handles them like any result.
    """

    def __init__(self, cfg: config.Config):
        self.cfg = cfg

    def close(self) -> None:
        """Nothing to release (same interface as `FalGateway.close`)."""

    def cancel(self, endpoint: str, request_id: str) -> bool:
        """Nothing runs in the background; always True."""
        return True

    def run(
        self,
        request: FalRequest,
        *,
        request_id: str | None,
        on_enqueue: Callable[[str], None],
        timeout: float,
        on_queue_update: Callable[[dict], None] | None = None,
        cancel_on_timeout: bool = True,
    ) -> dict:
        """Render the stand-in result of `request` (see `FalGateway.run` for the arguments).

        A new id ``demo-<uuid4>`` is passed to `on_enqueue` unless `request_id` is given (resume).
        generate: a gradient (1024 px on the long side, per ``aspect_ratio``) with the prompt drawn on it;
        edit: the photo tinted with the instruction as a caption; merge: a collage; face_swap: the target
        with the face pasted as a circle; retouch: a smoothing filter; upscale: LANCZOS ×``scale``.

        :raises PermanentProviderError: the arguments hold no decodable image where one is needed.
        """
        rid = request_id or "demo-%s" % uuid.uuid4()
        if not request_id:
            on_enqueue(rid)
        if on_queue_update is not None:
            on_queue_update({"status": "IN_PROGRESS"})
        args = request.arguments
        mode = request.mode or self._guess_mode(request)
        try:
            img, seed = self._render(mode, args)
        except (ValueError, OSError, KeyError, TypeError) as exc:
            raise PermanentProviderError("demo backend cannot read its input (%s)" % type(exc).__name__,
                                         request_id=rid) from None
        if on_queue_update is not None:
            on_queue_update({"status": "COMPLETED"})
        png = _png_bytes(img)
        item = {"url": data_uri(png), "content_type": "image/png", "file_name": "demo.png",
                "file_size": len(png), "width": img.width, "height": img.height}
        logger.info("demo: rendered %s as %s (%dx%d)", mode, rid, img.width, img.height)
        if mode in ("generate", "edit", "merge"):
            result = {"images": [item], "description": "demo backend"}
        else:
            result = {"image": item}
        if seed is not None:
            result["seed"] = seed
        return result

    def _guess_mode(self, request: FalRequest) -> str:
        args = request.arguments
        if "swap_image_url" in args:
            return "face_swap"
        if "image_urls" in args:
            return "merge" if len(args["image_urls"]) > 1 else "edit"
        if "image_url" in args:
            return "upscale" if "scale" in args else "retouch"
        return "generate"

    @staticmethod
    def _image(uri: str) -> Image.Image:
        img = Image.open(io.BytesIO(decode_data_uri(uri)))
        img.load()
        return img.convert("RGB")

    def _render(self, mode: str, args: dict) -> tuple[Image.Image, int | None]:
        prompt = str(args.get("prompt") or "")
        caption = prompt if len(prompt) <= 160 else prompt[:159] + "…"
        if mode == "generate":
            seed = zlib.crc32(prompt.encode("utf-8"))
            rnd = random.Random(seed)
            size = _size_for_ratio(str(args.get("aspect_ratio") or "1:1"))
            top = tuple(rnd.randrange(30, 220) for _ in range(3))
            bottom = tuple(rnd.randrange(30, 220) for _ in range(3))
            mask = Image.linear_gradient("L").resize(size)
            img = Image.composite(Image.new("RGB", size, bottom), Image.new("RGB", size, top), mask)
            draw = ImageDraw.Draw(img)
            for _ in range(6):
                x, y, r = rnd.randrange(size[0]), rnd.randrange(size[1]), rnd.randrange(30, 200)
                shade = tuple(rnd.randrange(256) for _ in range(3))
                draw.ellipse((x - r, y - r, x + r, y + r), outline=shade, width=6)
            _draw_text(img, caption or "…", "center", "white", self.cfg)
            _draw_text(img, "DEMO", "top", "yellow", self.cfg, max_height=0.08)
            return img, seed
        if mode in ("edit", "merge"):
            images = [self._image(u) for u in args["image_urls"]]
            if mode == "edit" or len(images) == 1:
                img = images[0]
                tint = Image.new("RGB", img.size, (255, 140, 40))
                img = Image.blend(img, tint, 0.25)
            else:
                img = self._collage(images)
            if caption:
                _draw_text(img, caption, "bottom", "white", self.cfg, max_height=0.25)
            return img, None
        if mode == "face_swap":
            target = self._image(args["base_image_url"])
            side = max(16, min(target.size) // 3)
            face = ImageOps.fit(self._image(args["swap_image_url"]), (side, side), Image.Resampling.LANCZOS)
            mask = Image.new("L", (side, side), 0)
            ImageDraw.Draw(mask).ellipse((0, 0, side - 1, side - 1), fill=255)
            target.paste(face, ((target.width - side) // 2, max(0, target.height // 5 - side // 4)), mask)
            return target, None
        if mode == "retouch":
            img = self._image(args["image_url"]).filter(ImageFilter.SMOOTH_MORE)
            return img, zlib.crc32(args["image_url"][-64:].encode())
        if mode == "upscale":
            img = self._image(args["image_url"])
            try:
                scale = max(1, min(4, int(args.get("scale") or 2)))
            except (TypeError, ValueError):
                scale = 2
            return img.resize((img.width * scale, img.height * scale), Image.Resampling.LANCZOS), None
        raise ValueError("unknown mode %r" % mode)

    @staticmethod
    def _collage(images: list[Image.Image], width: int = 1024) -> Image.Image:
        cols = 2
        rows = (len(images) + cols - 1) // cols
        cell = width // cols
        canvas = Image.new("RGB", (width, cell * rows), (24, 24, 24))
        for i, img in enumerate(images):
            tile = ImageOps.fit(img, (cell - 8, cell - 8), Image.Resampling.LANCZOS)
            canvas.paste(tile, ((i % cols) * cell + 4, (i // cols) * cell + 4))
        return canvas


_backend_lock = threading.Lock()
_backend_cache: list = [None, None]  # [cfg, backend]


def backend(cfg: config.Config) -> FalGateway | DemoBackend:
    """Return the generation backend for `cfg`: `DemoBackend` when ``cfg.demo_backend`` (no FAL_KEY),
    else a `FalGateway`. The last one built is reused while the same `cfg` object is passed, so the
    HTTP connection pool is shared by the jobs of one process.
    """
    with _backend_lock:
        if _backend_cache[0] is cfg:
            return _backend_cache[1]
        made = DemoBackend(cfg) if cfg.demo_backend else FalGateway(cfg)
        _backend_cache[:] = [cfg, made]  # the previous one may still be in use: left to the GC
    return made


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------

DOWNLOAD_CHUNK = 64 * 1024


def _check_image_bytes(data: bytes) -> None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Image.DecompressionBombError:
        raise ResultError("the result has too many pixels") from None
    except Exception:
        raise ResultError("the result is not an image") from None


def download_result(url: str, cfg: config.Config, timeout: float = 60) -> bytes:
    """Return the bytes of a result image.

    ``data:`` URIs (the demo backend, some Fal models with ``sync_mode``) are decoded locally; ``http(s)``
    URLs are fetched with ``requests.get(stream=True, timeout=(10, timeout))`` in 64 KiB chunks, and
    the whole download must also finish within `timeout` seconds. The URL is never logged (only its host).

    :param url: from `parse_result`.
    :param cfg: uses `cfg.max_result_bytes`.
    :param timeout: seconds (read timeout and overall limit).
    :raises ResultError: bigger than ``cfg.max_result_bytes``, not an image, bad URL, 4xx
        (``transient=False``); timeouts and dropped connections (``transient=True``).
    :raises TransientProviderError: the file host answered 5xx or 429.
    """
    limit = cfg.max_result_bytes
    if url.startswith("data:"):
        payload = url.partition(",")[2]
        if len(payload) * 3 // 4 > limit:
            raise ResultError("the result is larger than %d bytes" % limit)
        try:
            data = decode_data_uri(url)
        except ValueError as exc:
            raise ResultError(str(exc)) from None
        if len(data) > limit:
            raise ResultError("the result is larger than %d bytes" % limit)
        _check_image_bytes(data)
        return data
    if not url.startswith(("http://", "https://")):
        raise ResultError("unsupported result URL scheme")
    host = requests.utils.urlparse(url).hostname
    started = time.monotonic()
    try:
        with requests.get(url, stream=True, timeout=(10, timeout)) as response:
            status = response.status_code
            if status == 429 or status >= 500:
                raise TransientProviderError("result download from %s answered %s" % (host, status),
                                             status_code=status)
            if not 200 <= status < 300:
                raise ResultError("result download from %s answered %s" % (host, status))
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise ResultError("the result is larger than %d bytes" % limit)
            chunks, size = [], 0
            for chunk in response.iter_content(DOWNLOAD_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise ResultError("the result is larger than %d bytes" % limit)
                if time.monotonic() - started > timeout:
                    raise ResultError("result download from %s took over %s s" % (host, timeout), transient=True)
                chunks.append(chunk)
    except (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
        raise ResultError("result download from %s failed (%s)" % (host, type(exc).__name__),
                          transient=True) from None
    except requests.RequestException as exc:
        raise ResultError("result download from %s failed (%s)" % (host, type(exc).__name__)) from None
    data = b"".join(chunks)
    _check_image_bytes(data)
    logger.debug("downloaded a %d-byte result from %s", len(data), host)
    return data


# --------------------------------------------------------------------------------------------
# Add text (free, local)
# --------------------------------------------------------------------------------------------

TEXT_POSITIONS = TEXT_POSITION.choices
TEXT_COLORS = {  # name -> (fill, outline), for each of TEXT_COLOR.choices
    "white": ((255, 255, 255), (0, 0, 0)),
    "black": ((0, 0, 0), (255, 255, 255)),
    "yellow": ((255, 221, 0), (0, 0, 0)),
    "red": ((230, 30, 30), (255, 255, 255)),
}
assert tuple(TEXT_COLORS) == TEXT_COLOR.choices
_MIN_FONT = 10  # pixels


@dataclass(frozen=True)
class TextLayout:
    """How `layout_text` fits a text: font size (px), wrapped lines, block size (px), stroke width (px)."""

    font_size: int
    lines: tuple
    width: int
    height: int
    stroke_width: int
    line_height: int


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, max_width: float) -> list[str]:
    """Greedy word wrap on measured widths; words wider than a line are split by characters."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            while len(word) > 1 and draw.textlength(word, font=font) > max_width:
                cut = len(word) - 1
                while cut > 1 and draw.textlength(word[:cut], font=font) > max_width:
                    cut -= 1
                if line:
                    lines.append(line)
                    line = ""
                lines.append(word[:cut])
                word = word[cut:]
            candidate = "%s %s" % (line, word) if line else word
            if not line or draw.textlength(candidate, font=font) <= max_width:
                line = candidate
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def layout_text(width: int, height: int, text: str, cfg: config.Config, *, max_height: float = 0.4) -> TextLayout:
    """Fit `text` onto a `width`×`height` picture: start at 1/10 of the height and shrink the font
    (×0.9 per step, down to 10 px) until the wrapped block fits 90 % of the width and `max_height` of
    the height. Uses ``cfg.font_path`` (a Cyrillic-capable TTF).
    """
    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    size = max(_MIN_FONT, height // 10)
    while True:
        font = _load_font(cfg.font_path, size)
        stroke = max(1, size // 15)
        usable = width * 0.9 - 2 * stroke
        lines = _wrap(draw, text, font, usable)
        ascent, descent = font.getmetrics()
        line_height = ascent + descent
        spacing = max(1, size // 6)
        block_h = len(lines) * line_height + (len(lines) - 1) * spacing + 2 * stroke
        block_w = max((draw.textlength(line, font=font) for line in lines), default=0) + 2 * stroke
        if (block_w <= width * 0.9 and block_h <= height * max_height) or size <= _MIN_FONT:
            return TextLayout(size, tuple(lines), int(block_w), int(block_h), stroke, line_height + spacing)
        size = max(_MIN_FONT, int(size * 0.9))


def _draw_text(img: Image.Image, text: str, position: str, color: str, cfg: config.Config,
               *, max_height: float = 0.4) -> TextLayout:
    """Draw `text` on `img` in place (centred horizontally, outlined) and return its layout."""
    fill, outline = TEXT_COLORS[color]
    layout = layout_text(img.width, img.height, text, cfg, max_height=max_height)
    font = _load_font(cfg.font_path, layout.font_size)
    margin = round(img.height * 0.05)
    if position == "top":
        y = margin
    elif position == "bottom":
        y = img.height - margin - layout.height
    else:
        y = (img.height - layout.height) // 2
    y = max(0, y) + layout.stroke_width
    draw = ImageDraw.Draw(img)
    if img.mode == "RGBA":
        fill, outline = fill + (255,), outline + (255,)
    for line in layout.lines:
        draw.text((img.width / 2, y), line, font=font, fill=fill, anchor="ma",
                  stroke_width=layout.stroke_width, stroke_fill=outline)
        y += layout.line_height
    return layout


def add_text(image: bytes, text: str, *, position: str = "bottom", color: str = "white",
             cfg: config.Config) -> bytes:
    """Draw `text` on a picture, the free local mode; return PNG bytes of the same size (upright).

    The font (``cfg.font_path``, Cyrillic-capable) is sized automatically (`layout_text`), the text is
    word-wrapped, centred horizontally at the top, centre or bottom, and outlined in a contrasting
    colour (``stroke_width``/``stroke_fill``) so it reads on any background.

    :param image: JPEG/PNG/WEBP bytes (checked with `inspect_image` first).
    :param text: up to 200 characters, stripped; line breaks are kept.
    :param position: "top" | "center" | "bottom".
    :param color: "white" | "black" | "yellow" | "red".
    :raises InvalidInput: ``text_empty``, ``text_too_long`` (`.limit` = 200), ``not_an_image``.
    :raises ValueError: unknown position or colour.
    """
    if position not in TEXT_POSITIONS:
        raise ValueError("position must be one of %s, got %r" % (", ".join(TEXT_POSITIONS), position))
    if color not in TEXT_COLORS:
        raise ValueError("color must be one of %s, got %r" % (", ".join(TEXT_COLORS), color))
    text = validate_text(text)
    img = _open_for_work(image)
    img = img.convert("RGBA") if _has_alpha(img) else img.convert("RGB")
    _draw_text(img, text, position, color, cfg)
    return _png_bytes(img)


# --------------------------------------------------------------------------------------------
# Telegram photo limits
# --------------------------------------------------------------------------------------------

PHOTO_MAX_BYTES = 10 * 1000 * 1000   # "at most 10 MB" (decimal, to stay on the safe side)
PHOTO_MAX_DIMENSIONS_SUM = 10000
PHOTO_MAX_RATIO = 20


def fits_telegram_photo(data: bytes) -> bool:
    """Return True when Telegram accepts `data` as a photo (else send it as a document).

    Source, pyTelegramBotAPI 4.37.1 ``send_photo`` docstring (Bot API sendPhoto): "The photo must be at
    most 10 MB in size. The photo's width and height must not exceed 10000 in total. Width and height
    ratio must be at most 20." Bytes that are not an image give False.
    """
    if len(data) > PHOTO_MAX_BYTES:
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception:
        return False
    if width <= 0 or height <= 0 or width + height > PHOTO_MAX_DIMENSIONS_SUM:
        return False
    return max(width, height) / min(width, height) <= PHOTO_MAX_RATIO
