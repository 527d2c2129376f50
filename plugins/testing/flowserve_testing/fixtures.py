"""pytest fixtures for plugin tests. In your ``tests/conftest.py``::

    from flowserve_core.testing.fixtures import anyio_backend, live_server, tiny_engine, tiny_model  # noqa: F401  (pytest fixtures)

- ``tiny_model``: path of a tiny random Llama checkpoint with its tokenizer (session).
- ``tiny_engine``: the smallest installed engine as a ``TinyEngine`` (session); skips the
  test, saying what to install, when none is.
- ``live_server``: ``live_server(*serve_args, frontend="openai")`` starts ``flowserve serve``
  and returns the started ``LiveServer``; every server is stopped after the test.
- ``anyio_backend``: ``"asyncio"``, for ``@pytest.mark.anyio`` tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from flowserve_testing.engines import TinyEngine, find_tiny_engine, write_tiny_llama
from flowserve_testing.live import LiveServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory: pytest.TempPathFactory) -> TinyEngine:
    engine = find_tiny_engine(lambda: write_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))
    if engine is None:
        pytest.skip("no engine to test on: pip install flowserve-hf-tokenizer flowserve-spmd-executor "
                    "flowserve-paged-kv flowserve-colocated")
    return engine


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    started: list[LiveServer] = []

    def start(*args: str, frontend: str = "openai", **kw: Any) -> LiveServer:
        server = LiveServer(*args, frontend=frontend, log_path=tmp_path / f"server-{len(started)}.log", **kw)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
