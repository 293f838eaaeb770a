"""The REST API: `create_app(settings)` builds a fresh FastAPI app (tests build their own)."""

from service.api.app import create_app

__all__ = ["create_app"]
