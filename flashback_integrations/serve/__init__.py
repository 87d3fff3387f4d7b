"""``flashback serve``: an OpenAI-compatible server that retrieves during generation (needs the ``serve``
extra: FastAPI, uvicorn, prometheus-client)."""

from .app import APIError, FlashBackServer, ServeSettings, create_app
from .thread import serve_in_thread

__all__ = ["APIError", "FlashBackServer", "ServeSettings", "create_app", "serve_in_thread"]
