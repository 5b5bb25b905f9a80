"""OpenAI-style error responses, and the FastAPI handlers that the video and diffusion-LM ingresses share."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from api.validation import InvalidRequest


class Overloaded(Exception):
    """The server is at capacity for now: HTTP 429, the client should retry later (after `retry_after_s` when
    known: the `Retry-After` header)."""

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthorized(Exception):
    """No valid API key: HTTP 401."""


def openai_error(status: int, message: str, param: str | None = None, *, error_type: str | None = None,
                 code: str | int | None = None) -> JSONResponse:
    """`{"error": {message, type, param, code}}` as the `openai` client parses it.

    `type` defaults to invalid_request_error for 4xx and server_error for 5xx; `code` to the status.
    """
    kind = error_type or ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": status if code is None else code}})


def validation_error(exc: RequestValidationError) -> JSONResponse:
    """A 400 naming the first invalid field and its allowed range (instead of FastAPI's 422 list)."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return openai_error(400, f"malformed JSON body: {first.get('msg')}", code="json_invalid")
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    if not loc and first.get("type") == "model_attributes_type":
        return openai_error(400, "request body must be a JSON object (Content-Type: application/json)",
                            code="invalid_body")
    param = ".".join(loc) or None
    ctx = first.get("ctx") or {}
    allowed = ", ".join(f"{k}={v}" for k, v in ctx.items() if k in ("ge", "le", "gt", "lt", "min_length",
                                                                     "max_length", "expected", "pattern"))
    message = f"{param}: {first.get('msg')}" + (f" (allowed: {allowed})" if allowed else "")
    return openai_error(400, message, param, code=first.get("type", "invalid"))


def install_error_handlers(app: FastAPI) -> None:
    """Invalid bodies and values -> 400/404/409 naming the field; `Unauthorized` -> 401; `Overloaded` -> 429."""

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc)

    @app.exception_handler(InvalidRequest)
    async def _invalid_request(_: Request, exc: InvalidRequest) -> JSONResponse:
        return openai_error(exc.status_code, exc.message, exc.param,
                            code="invalid_value" if exc.status_code == 400 else "not_found")

    @app.exception_handler(Unauthorized)
    async def _unauthorized(_: Request, exc: Unauthorized) -> JSONResponse:
        return openai_error(401, str(exc), error_type="unauthorized", code="invalid_api_key")

    @app.exception_handler(Overloaded)
    async def _overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        response = openai_error(429, str(exc), code="overloaded")
        if exc.retry_after_s is not None:
            response.headers["Retry-After"] = str(exc.retry_after_s)
        return response
