"""Fixtures: live ``flowserve serve`` subprocesses (see openai_live.py for the command line)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helper module openai_live, for the test modules

from openai_live import LiveServer, serve_command as build_serve_command  # noqa: E402  (after the sys.path entry above)


@pytest.fixture(scope="session")
def serve_command() -> Callable[..., list[str]]:
    """Builds ``flowserve serve`` on 127.0.0.1 (a free port) with the engine under test
    (``openai_live.ENGINE_ARGS``)."""
    return build_serve_command


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., LiveServer]]:
    """Start servers for a test session; every one is stopped at the end."""
    started: list[LiveServer] = []

    def start(command: list[str], env: dict[str, str] | None = None, ready: bool = True) -> LiveServer:
        log_path = tmp_path_factory.mktemp("server") / "server.log"
        server = LiveServer(command, log_path, env)
        started.append(server)
        server.wait_listening()
        return server.wait_ready() if ready else server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def record_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the toy executor records every sequence's SamplingParams (option record_params)."""
    return tmp_path_factory.mktemp("record") / "params.jsonl"


@pytest.fixture(scope="session")
def toy_server(start_server: Any, serve_command: Any, record_path: Path) -> LiveServer:
    """The shared server: small step delay (streams last long enough to interrupt), every
    sequence's parameters recorded, a step emitting token 900 fails (engine errors)."""
    return start_server(serve_command("-o", "step_delay=0.005", "-o", f"record_params={record_path}",
                                      "-o", "fail_on_token=900"))
