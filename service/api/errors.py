"""Every error is JSON `{"error": {"code", "message"}}` with the right status: bad input is a
4xx with a clear message, never a 500 or a stack trace."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ServiceError
from service.jobs.modelrefs import ModelNotFound

log = logging.getLogger(__name__)
MAX_MESSAGE = 600

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
               415: "unsupported_media_type", 422: "invalid_request", 429: "too_many_requests"}


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    if len(message) > MAX_MESSAGE:       # never echo a huge input back
        message = message[:MAX_MESSAGE - 100] + " … " + message[-100:]
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers=headers)


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "malformed_json", "request body is not valid JSON")
        msgs = []
        for e in errors[:10]:
            msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
            msgs.append(f"{_loc(tuple(e.get('loc', ())))}: {msg}")
        return error_response(422, "invalid_request", "; ".join(msgs) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail),
                              getattr(exc, "headers", None))

    @app.exception_handler(ModelNotFound)
    async def _model_missing(_: Request, exc: ModelNotFound) -> JSONResponse:
        return error_response(404, "model_not_found", str(exc))

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError) -> JSONResponse:
        # ModelLoadError, ModelRefError, solver budget/constraint errors: all the user's input.
        code = {"ModelLoadError": "invalid_model", "ModelRefError": "invalid_model",
                "InfeasibleBudget": "infeasible_budget",
                "BudgetError": "invalid_budget"}.get(type(exc).__name__, "invalid_request")
        return error_response(422, code, str(exc) or type(exc).__name__)

    async def _database(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, OperationalError | PoolTimeout) or (
                isinstance(exc, DBAPIError) and exc.connection_invalidated):
            log.warning("database unavailable during %s %s: %s", request.method,
                        request.url.path, exc)
            return error_response(503, "database_unavailable",
                                  "the database is unavailable; retry shortly",
                                  {"Retry-After": "5"})
        log.exception("database error during %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error")

    for cls in (OperationalError, PoolTimeout, DBAPIError):
        app.add_exception_handler(cls, _database)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error during %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error")
