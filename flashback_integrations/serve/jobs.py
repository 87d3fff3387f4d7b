"""Generations run off the event loop: a bounded admission count, a fixed pool of worker threads, and
a cancel flag a disconnected client sets (the worker stops at its next token and frees its slot).

The engine's generator is synchronous (a torch or llama.cpp decode per token), so each generation runs
in a worker thread and hands its events to the request's asyncio queue. Admission is counted, not
queued in asyncio: a request beyond ``parallel + max_queue`` is answered 429 at once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_DONE = object()


class QueueFull(Exception):
    """Every worker is busy and the waiting room is full."""


class Job:
    """One generation: started in a worker, read by the request, cancelled by a disconnect."""

    def __init__(self, start: Callable[[], Iterator[Any]]) -> None:
        self.start = start
        self.cancelled = threading.Event()
        self.started = threading.Event()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()

    def _put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def work(self) -> None:
        """In a worker thread: run the generation, stop at the next token once cancelled."""
        self.started.set()
        if self.cancelled.is_set():
            self._put(_DONE)
            return
        events = None
        try:
            events = self.start()
            for event in events:
                if self.cancelled.is_set():
                    break
                self._put(event)
        except BaseException as exc:  # noqa: BLE001 - handed to the request, which answers with it
            self._put(exc)
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()  # a generator's cleanup (the KV context) runs here, in this thread
            self._put(_DONE)

    async def events(self) -> AsyncIterator[Any]:
        """The generation's events; raises what the generation raised."""
        while True:
            item = await self.queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Scheduler:
    """``parallel`` workers and room for ``max_queue`` waiting requests."""

    def __init__(self, parallel: int, max_queue: int) -> None:
        if parallel < 1 or max_queue < 0:
            raise ValueError("parallel must be >= 1 and max_queue >= 0")
        self.parallel, self.max_queue = parallel, max_queue
        self.pool = ThreadPoolExecutor(parallel, thread_name_prefix="flashback-serve")
        self._lock = threading.Lock()
        self.admitted = 0
        self.running = 0

    @property
    def waiting(self) -> int:
        return max(0, self.admitted - self.running)

    def submit(self, job: Job, on_done: Callable[[], None] | None = None) -> None:
        with self._lock:
            if self.admitted >= self.parallel + self.max_queue:
                raise QueueFull
            self.admitted += 1

        def run() -> None:
            with self._lock:
                self.running += 1
            try:
                job.work()
            finally:
                with self._lock:
                    self.running -= 1
                    self.admitted -= 1
                if on_done is not None:
                    on_done()

        self.pool.submit(run)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=False)
