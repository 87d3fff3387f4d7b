"""A `flashback serve` app on a free loopback port in a thread, for the server tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """The app served by uvicorn on 127.0.0.1 (a port the OS picks); yields its base URL, stops on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class SlowRetriever:
    """Passages after a delay (a slow store), or a hang/raise on demand."""

    def __init__(self, delay: float = 0.0, fail: bool = False, hang: bool = False) -> None:
        self.delay, self.fail, self.hang = delay, fail, hang
        self.release = threading.Event()

    def retrieve(self, query: str, k: int) -> list[str]:
        if self.hang:
            self.release.wait(60)
        time.sleep(self.delay)
        if self.fail:
            raise ConnectionError("the store is down")
        return [f"Passage about {query[-12:]!r} number {i}." for i in range(k)]
