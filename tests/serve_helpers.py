"""Retrievers that are slow, fail or hang, for the server tests."""

from __future__ import annotations

import threading
import time

from flashback_integrations.serve import serve_in_thread

running = serve_in_thread


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
