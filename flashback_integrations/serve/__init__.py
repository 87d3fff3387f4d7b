"""``flashback serve``: an OpenAI-compatible server that retrieves during generation (needs the ``serve``
extra: FastAPI, uvicorn, prometheus-client)."""

from .app import APIError, FlashBackServer, ServeSettings, create_app

__all__ = ["APIError", "FlashBackServer", "ServeSettings", "create_app"]
