"""Errors the service reports to users: each carries an HTTP status and a stable code (the
API's envelope); UserError is the command line's (one line, exit status 2)."""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input on the command line: one line, exit status 2."""


class ServiceError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.headers = headers or {}


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class Invalid(ServiceError):
    status, code = 422, "invalid_request"


class TooManyRequests(ServiceError):
    status, code = 429, "too_many_requests"


class Unavailable(ServiceError):
    """This server lacks what the request needs (e.g. llama.cpp for target gguf)."""
    status, code = 503, "unavailable"
