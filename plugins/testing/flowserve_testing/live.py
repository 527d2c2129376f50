"""``flowserve serve`` as a subprocess on a free 127.0.0.1 port, for frontend tests.

The server's log (stdout and stderr, JSON lines) goes to a file, so a test can read what the
server said and a failure shows its last lines. Stopping sends SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """One ``flowserve serve`` process: ``url`` (``http://127.0.0.1:PORT``), ``log()``, ``stop()``.

    :param args: ``serve`` flags after ``--host``/``--port`` (e.g. ``tiny_engine.serve_args()``).
    :param frontend: the frontend plugin to serve with; it must answer ``GET health_path``
        with 200 once it listens.
    """

    def __init__(self, *args: str, frontend: str = "openai", env: Mapping[str, str] | None = None,
                 health_path: str = "/health", log_path: str | os.PathLike | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.health_path = health_path
        self.command = [sys.executable, "-m", "flowserve_core.cli", "serve", "--host", "127.0.0.1",
                        "--port", str(self.port), "--frontend", frontend, *args]
        if log_path is None:
            handle, log_path = tempfile.mkstemp(prefix="flowserve-serve-", suffix=".log")
            os.close(handle)
        self.log_path = Path(log_path)
        self._env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLOWSERVE_LOG_FORMAT": "json", **(env or {})}
        self.process: subprocess.Popen | None = None

    def log(self) -> str:
        """Everything the server wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 120.0) -> LiveServer:
        """Start the process and wait until ``health_path`` answers 200; on failure, stop it and
        raise ``RuntimeError`` with the end of its log."""
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self._env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self._failure(f"flowserve serve exited with status {self.process.returncode}")
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=5) as reply:
                    if reply.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise self._failure(f"{self.url}{self.health_path} did not answer 200 within {timeout} s")

    def _failure(self, why: str) -> RuntimeError:
        self.stop()
        return RuntimeError(f"{why}; command: {' '.join(self.command)}\n--- server log ---\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s for a graceful exit, then SIGKILL; the exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)
        return process.returncode

    def __enter__(self) -> LiveServer:
        return self if self.process else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def serve(*args: str, frontend: str = "openai", env: Mapping[str, str] | None = None,
          health_path: str = "/health", timeout: float = 120.0) -> Iterator[LiveServer]:
    """Run ``flowserve serve --frontend FRONTEND ARGS…`` for the ``with`` block; yields the
    started ``LiveServer`` (its ``url`` is the base URL)."""
    server = LiveServer(*args, frontend=frontend, env=env, health_path=health_path).start(timeout)
    try:
        yield server
    finally:
        server.stop()
