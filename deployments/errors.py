"""OpenAI-style error responses, shared by the video and coder ingresses."""

from __future__ import annotations

from fastapi.responses import JSONResponse


def openai_error(status: int, message: str, param: str | None = None, *, error_type: str | None = None,
                 code: str | int | None = None) -> JSONResponse:
    """`{"error": {message, type, param, code}}` as the `openai` client parses it.

    `type` defaults to invalid_request_error for 4xx and server_error for 5xx; `code` to the status.
    """
    kind = error_type or ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": status if code is None else code}})
