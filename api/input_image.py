"""The input image of an image-to-video request (`input_reference`, as OpenAI's video API names it).

A client sends it as a multipart file part or, in a JSON body, as a base64 `data:` URL (no
other URL scheme: the server fetches nothing). Before a job is stored the bytes are decoded
here: a PNG, JPEG or WebP file within `MAX_IMAGE_BYTES` whose sides are within
[`MIN_IMAGE_SIDE`, `MAX_IMAGE_SIDE`]; anything else is a 400 naming `input_reference`. The bytes
are stored with the job (a restart replays the same image); resizing to the request's size
happens where the VAE encodes it, the way the family's diffusers pipeline does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings

from PIL import Image

from api.validation import InvalidRequest

FIELD = "input_reference"
FORMATS = ("PNG", "JPEG", "WEBP")
MAX_IMAGE_BYTES = 10 * 2**20
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 16, 4096
_DATA_URL = re.compile(r"^data:image/(png|jpeg|jpg|webp);base64,(?P<data>[A-Za-z0-9+/=\s]*)$", re.IGNORECASE)


def bytes_of_data_url(url: str) -> bytes:
    """The image bytes of a `data:image/{png,jpeg,webp};base64,...` URL."""
    match = _DATA_URL.match(url)
    if match is None:
        raise InvalidRequest(FIELD, f"{FIELD} must be a base64 data URL (data:image/png;base64,... ; png, jpeg or "
                                    "webp) or a multipart file; other URLs are not fetched")
    try:
        return base64.b64decode(match["data"], validate=False)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(FIELD, f"{FIELD}: invalid base64 ({exc})") from exc


def open_image(data: bytes) -> Image.Image:
    """The decoded RGB image, or a 400 naming the field and what is allowed."""
    if not data:
        raise InvalidRequest(FIELD, f"{FIELD} is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidRequest(FIELD, f"{FIELD} has {len(data)} bytes; allowed at most {MAX_IMAGE_BYTES}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image_format = image.format
            width, height = image.size
            if image_format in FORMATS and all(MIN_IMAGE_SIDE <= v <= MAX_IMAGE_SIDE for v in (width, height)):
                image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequest(FIELD, f"{FIELD} is not a readable image ({exc}); allowed: "
                                    f"{', '.join(FORMATS)}") from exc
    if image_format not in FORMATS:
        raise InvalidRequest(FIELD, f"{FIELD} is a {image_format} image; allowed: {', '.join(FORMATS)}")
    if not all(MIN_IMAGE_SIDE <= v <= MAX_IMAGE_SIDE for v in (width, height)):
        raise InvalidRequest(FIELD, f"{FIELD} is {width}x{height} pixels; each side must lie in "
                                    f"[{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}]")
    return image.convert("RGB")


def image_digest(data: bytes) -> str:
    """The job spec's name for its input image: the same bytes give the same spec (Idempotency-Key checks)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()
