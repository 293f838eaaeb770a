"""Request bodies are JSON (except the dashboard's forms under /ui/), sent as is: other media types and content encodings get a 415 that
says what to send, before FastAPI would misread them (text as "not a dictionary", gzip bytes as
malformed JSON)."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import error_response

JSON = "application/json"
UI_PREFIX = "/ui/"


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == JSON or (media.startswith("application/") and media.endswith("+json"))


def _has_body(headers: dict[bytes, bytes]) -> bool:
    length = headers.get(b"content-length")
    if length is not None:
        return length.strip() not in (b"", b"0")
    return b"transfer-encoding" in headers


class JsonBodies:
    """Pure ASGI middleware: a request with a body must be `application/json` (or `+json`), and
    no request may use a Content-Encoding other than identity."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers") or []}
        encoding = headers.get(b"content-encoding", b"").decode("latin-1").strip().lower()
        if encoding not in ("", "identity"):
            response = error_response(
                415, "unsupported_media_type",
                f"Content-Encoding {encoding[:40]!r} is not supported; send the body "
                "uncompressed (identity)", {"Accept-Encoding": "identity"})
            return await response(scope, receive, send)
        # the dashboard's forms post url-encoded bodies to its own routes (service/api/ui)
        if _has_body(headers) and not scope.get("path", "").startswith(UI_PREFIX):
            given = headers.get(b"content-type", b"").decode("latin-1").strip()
            if not is_json(given):
                got = f"got {given[:80]!r}" if given else "no Content-Type was given"
                response = error_response(
                    415, "unsupported_media_type",
                    f"the request body must be JSON: send Content-Type: {JSON} ({got})")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
