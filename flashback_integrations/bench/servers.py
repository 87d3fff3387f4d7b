"""Starting llama.cpp's ``llama-server`` on loopback for the server backend's benchmarks, tests and notebook.

A real server as a subprocess on a free 127.0.0.1 port, waited for until it answers, stopped on exit.
The binary comes from ``make llama-server`` (``.venv/bin/llama-server``), ``$FLASHBACK_LLAMA_SERVER`` or PATH.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from ..errors import ConfigError
from ..store.server import free_port


def llama_server_binary() -> Path | None:
    """Where ``llama-server`` is, or None."""
    env = os.environ.get("FLASHBACK_LLAMA_SERVER")
    candidates = [env] if env else []
    candidates += [str(Path(sys.prefix) / "bin" / "llama-server"), shutil.which("llama-server")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


@contextlib.contextmanager
def llama_server(
    gguf: str | Path,
    *,
    alias: str = "flashback",
    threads: int | None = None,
    n_ctx: int = 4096,
    slots: int = 1,
    timeout_s: float = 120.0,
    extra: list[str] | None = None,
) -> Iterator[str]:
    """Run ``llama-server`` on ``gguf`` and yield its URL; the process is stopped when the block ends."""
    binary = llama_server_binary()
    if binary is None:
        raise ConfigError(
            "llama-server not found: build it with `make llama-server` (into .venv/bin), or set "
            "FLASHBACK_LLAMA_SERVER to a llama.cpp server binary."
        )
    port = free_port()
    command = [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--alias", alias,
        "-c", str(n_ctx), "-np", str(slots), "-t", str(threads or os.cpu_count() or 1), "--no-webui", *(extra or []),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile("w+", prefix="llama-server-", suffix=".log") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(url, process, timeout_s, log.name)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(url: str, process: subprocess.Popen, timeout_s: float, log: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama-server exited with {process.returncode}:\n{Path(log).read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"llama-server did not answer within {timeout_s:.0f} s:\n{Path(log).read_text()[-2000:]}")
