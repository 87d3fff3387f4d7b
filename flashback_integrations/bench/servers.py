"""Starting llama.cpp's ``llama-server`` or vLLM on loopback for the server backend's benchmarks and tests.

A real server as a subprocess on a free 127.0.0.1 port, waited for until it answers, stopped on exit.
llama-server comes from ``make llama-server`` (``.venv/bin/llama-server``), ``$FLASHBACK_LLAMA_SERVER`` or
PATH; vLLM from ``make vllm`` (its own virtualenv, ``.venv-vllm``) or ``$FLASHBACK_VLLM_PYTHON``.
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


def _executable(variable: str, defaults: list[str | None]) -> Path | None:
    """``$variable`` when set (and nothing else), else the first of ``defaults`` that can be run."""
    override = os.environ.get(variable)
    for candidate in [override] if override else defaults:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def llama_server_binary() -> Path | None:
    """Where ``llama-server`` is, or None."""
    return _executable(
        "FLASHBACK_LLAMA_SERVER", [str(Path(sys.prefix) / "bin" / "llama-server"), shutil.which("llama-server")]
    )


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
    with _serve("llama-server", command, port, timeout_s) as url:
        yield url


def vllm_python() -> Path | None:
    """The Python of a virtualenv with vLLM (``make vllm``), or None."""
    return _executable(
        "FLASHBACK_VLLM_PYTHON", [str(Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python")]
    )


@contextlib.contextmanager
def vllm_server(
    folder: str | Path,
    *,
    max_model_len: int = 4096,
    kv_cache_gib: int = 1,
    prefix_caching: bool = True,
    report_cached: bool = True,
    timeout_s: float = 600.0,
    extra: list[str] | None = None,
) -> Iterator[str]:
    """Run vLLM's OpenAI server on a Hugging Face folder (``flashback export OUT``) and yield its URL.

    fp32 and eager (no torch.compile: minutes on two cores), one sequence at a time, ``kv_cache_gib`` of KV
    cache (vLLM's CPU build otherwise takes 4 GiB), prefix caching on with the cached-token counts reported
    per request (``--enable-prompt-tokens-details``, ``report_cached``), which the server backend reads."""
    python = vllm_python()
    if python is None:
        raise ConfigError(
            "no vLLM found: build its virtualenv with `make vllm` (.venv-vllm), or set FLASHBACK_VLLM_PYTHON to the "
            "Python of one that has vLLM."
        )
    port = free_port()
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--served-model-name",
        "flashback", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
        "--max-model-len", str(max_model_len), "--max-num-seqs", "1",
        "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
        *(["--enable-prompt-tokens-details"] if report_cached else []), *(extra or []),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "VLLM_TARGET_DEVICE": "cpu"}
    with _serve("vLLM", command, port, timeout_s, env) as url:
        yield url


@contextlib.contextmanager
def _serve(
    name: str, command: list[str], port: int, timeout_s: float, env: dict[str, str] | None = None
) -> Iterator[str]:
    url = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile("w+", prefix=f"{name}-", suffix=".log") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            _wait_ready(name, url, process, timeout_s, log.name)
            yield url
        finally:
            _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """Stop the server and what it started (vLLM runs its engine in child processes)."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait_ready(name: str, url: str, process: subprocess.Popen, timeout_s: float, log: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{Path(log).read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{name} did not answer within {timeout_s:.0f} s:\n{Path(log).read_text()[-2000:]}")
