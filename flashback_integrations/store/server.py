"""Start a local `chroma run` server: for benchmarks, tests and users who want one process per team."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from .chroma import StoreError, connect


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ChromaServer:
    """``with ChromaServer(path) as (host, port): ...`` runs ``chroma run`` on 127.0.0.1 until exit."""

    def __init__(self, path: str | Path, port: int | None = None, host: str = "127.0.0.1", timeout: float = 60):
        self.path = Path(path)
        self.host = host
        self.port = port or free_port()
        self.timeout = timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[str] | None = None

    def __enter__(self) -> tuple[str, int]:
        exe = shutil.which("chroma") or str(Path(sys.executable).parent / "chroma")
        self.path.mkdir(parents=True, exist_ok=True)
        self._log = open(self.path / "server.log", "w")  # noqa: SIM115 - closed in __exit__
        self._proc = subprocess.Popen(
            [exe, "run", "--path", str(self.path / "db"), "--host", self.host, "--port", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                connect(host=self.host, port=self.port)
                return self.host, self.port
            except StoreError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    log = (self.path / "server.log").read_text()[-2000:]
                    raise StoreError(f"`chroma run` did not start on {self.host}:{self.port}: {log}") from None
                time.sleep(0.3)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._log is not None:
            self._log.close()
