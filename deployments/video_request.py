"""How `POST /v1/videos` reads its body: JSON, or multipart/form-data as OpenAI's video API sends it.

JSON carries the input image (image-to-video) as a base64 data URL in `input_reference`;
multipart carries the request's fields as form fields and the image as the file part
`input_reference` (a data URL in a text field of that name is read too); an object-valued
field (`cache`) is a form field holding its JSON. Either way the
result is the same typed request and the image's bytes, and every malformed body is a
400 that names what is wrong, as a JSON body's errors always were.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from api.input_image import FIELD, MAX_IMAGE_BYTES, bytes_of_data_url
from api.schemas import VideoGenerationRequest
from api.validation import InvalidRequest

MAX_FORM_FIELDS = 32
JSON_FORM_FIELDS = ("cache",)
"""Fields whose value is an object: a multipart form carries them as JSON text."""


def _typed(fields: Any) -> VideoGenerationRequest:
    """The typed request, or FastAPI's validation error (answered as a 400 naming the first invalid field)."""
    if not isinstance(fields, dict):
        raise RequestValidationError([{"type": "model_attributes_type", "loc": ("body",), "input": fields,
                                       "msg": "Input should be a valid dictionary or object to extract fields from"}])
    try:
        return VideoGenerationRequest.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc


async def read_video_request(request: Request) -> tuple[VideoGenerationRequest, bytes | None]:
    """The request's fields and its input image's bytes (None without one); nothing is checked of the image yet."""
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return await _multipart(request)
    raw = await request.body()
    try:
        fields = json.loads(raw)
    except ValueError as exc:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", 0), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": str(exc)}}]) from exc
    body = _typed(fields)
    image = None if body.input_reference is None else bytes_of_data_url(body.input_reference)
    return body.model_copy(update={"input_reference": None}), image


async def _multipart(request: Request) -> tuple[VideoGenerationRequest, bytes | None]:
    try:
        form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_IMAGE_BYTES + 1)
    except Exception as exc:  # starlette's MultiPartException, or a body that is not multipart at all
        raise InvalidRequest("body", f"malformed multipart/form-data body: {exc}") from exc
    fields: dict[str, str] = {}
    image: bytes | None = None
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key != FIELD:
                raise InvalidRequest(key, f"unexpected file part {key!r}; the only file part is {FIELD}")
            image = await value.read(MAX_IMAGE_BYTES + 1)
        elif key in fields:
            raise InvalidRequest(key, f"form field {key!r} is given twice")
        else:
            fields[key] = value
    if FIELD in fields:
        if image is not None:
            raise InvalidRequest(FIELD, f"{FIELD} is given both as a file and as a field")
        image = bytes_of_data_url(fields.pop(FIELD))
    return _typed({key: _form_json(key, value) if key in JSON_FORM_FIELDS else value
                   for key, value in fields.items()}), image


def _form_json(key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(key, f"form field {key!r} must hold a JSON object, e.g. {{\"mode\": \"taylorseer\"}}: "
                                  f"{exc}") from exc
