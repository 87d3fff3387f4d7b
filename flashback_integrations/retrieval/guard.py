"""A user's retriever run under the call's policy: a timeout (in a daemon thread, so a hung
retriever never blocks the interpreter) and ``on_retrieval_error`` (raise, or skip the stride)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from ..config import FlashBackConfig
from ..errors import RetrievalError
from .base import Passage

_STUCK_LOCK = threading.Lock()
_STUCK: dict[int, tuple[Any, threading.Thread]] = {}  # id(retriever) -> (it, its call that timed out)


def call_with_timeout(fn: Callable[[str, int], list[Passage]], query: str, k: int, timeout: float) -> list[Passage]:
    """Run a retrieval in a daemon thread: a hung retriever never keeps the interpreter alive, and
    while one of its calls is still hung no other is started (threads never pile up)."""
    owner = getattr(fn, "source", fn)
    with _STUCK_LOCK:
        held = _STUCK.get(id(owner))
        if held is not None and held[0] is owner and held[1].is_alive():
            raise TimeoutError("an earlier call to this retriever timed out and is still running; not starting another")
        _STUCK.pop(id(owner), None)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(query, k)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's policy
            box["error"] = exc

    thread = threading.Thread(target=target, name="flashback-retriever", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        with _STUCK_LOCK:
            for key in [key for key, (_, t) in _STUCK.items() if not t.is_alive()]:  # bounded by the hung calls
                del _STUCK[key]
            _STUCK[id(owner)] = (owner, thread)
        raise TimeoutError(f"retriever took longer than retrieval_timeout={timeout}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


class GuardedRetriever:
    """Runs the user's retriever with the timeout and error policy of ``config``, and times it."""

    def __init__(self, retrieve: Callable[[str, int], list[Passage]], config: FlashBackConfig) -> None:
        self.retrieve = retrieve
        self.config = config

    def __call__(self, query: str) -> tuple[list[Passage], float, str | None]:
        cfg = self.config
        started = time.perf_counter()
        try:
            if cfg.retrieval_timeout is None:
                passages = self.retrieve(query, cfg.num_passages)
            else:
                passages = call_with_timeout(self.retrieve, query, cfg.num_passages, cfg.retrieval_timeout)
        except RetrievalError:
            raise  # wrong return type: a bug in the retriever, never skipped
        except Exception as exc:  # noqa: BLE001 - the policy decides
            latency = time.perf_counter() - started
            if cfg.on_retrieval_error == "raise":
                raise RetrievalError(
                    f"Retriever failed ({type(exc).__name__}: {exc}). Set "
                    "on_retrieval_error='skip' to generate that stride without a block."
                ) from exc
            return [], latency, f"{type(exc).__name__}: {exc}"
        return passages, time.perf_counter() - started, None

    def close(self) -> None:
        """Nothing to release: a hung call's daemon thread ends with it or with the interpreter."""
