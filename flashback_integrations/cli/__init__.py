"""The ``flashback`` command line. Each command parses its options (most derived from the settings
objects, see ``options``), calls one library function and prints."""

from . import bench, chat, export, generate, index, qa, serve, train  # noqa: F401 - each registers its commands on the app
from .app import app


def main() -> None:  # pragma: no cover
    app()


__all__ = ["app", "main"]
