"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the
HTTP status a client expects; and the translation of decoding and validation errors into them."""

from __future__ import annotations

import math
import re

import msgspec

from flowserve_core.types import Rejection
from flowserve_openai.protocol import ErrorDetail, ErrorResponse, encoder

#: OpenAI's ``type`` for each status we answer with.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error to answer with: HTTP ``status``, a message for people, the guilty ``param``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        """The OpenAI error object."""
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type,
                                               param=self.param, code=self.code))

    def encode(self) -> bytes:
        """The OpenAI error object as JSON."""
        return encoder.encode(self.body())

    @classmethod
    def from_rejection(cls, rejection: Rejection) -> APIError:
        """A kernel ``Rejection`` (queue full, admission hook) with its status and Retry-After."""
        headers = {}
        if rejection.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(rejection.retry_after)))
        code = "rate_limit_exceeded" if rejection.status == 429 else None
        return cls(rejection.status, rejection.message, code=code, headers=headers)


#: Why a parameter declared with only the values the server accepts refused another value.
UNSUPPORTED = {
    "suffix": "suffix is not supported by this server",
    "best_of": "best_of other than 1 is not supported by this server",
}

_AT_PATH = re.compile(r"^(?P<detail>.*?) - at `\$(?P<path>[^`]*)`$", re.S)
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`")


def invalid_body(exc: msgspec.DecodeError) -> APIError:
    """A 400 for a body msgspec could not decode: malformed JSON, or a field of the wrong
    type or out of range (``param`` then names the field, e.g. ``messages[0].role``)."""
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return APIError(400, f"The request body is not valid JSON: {text}", code="invalid_json")
    detail, path = text, ""
    if match := _AT_PATH.match(text):
        detail, path = match["detail"], match["path"]
    param = path.lstrip(".").replace("[...]", "") or None  # a dict's value: msgspec writes its key as [...]
    if missing := _MISSING.match(detail):
        param = f"{param}.{missing['field']}" if param else missing["field"]
    message = f"Invalid value for '{param}': {detail}" if param else f"Invalid request body: {detail}"
    if param in UNSUPPORTED:
        return APIError(400, f"{message} ({UNSUPPORTED[param]})", param=param, code="unsupported_parameter")
    return APIError(400, message, param=param, code="invalid_value")
