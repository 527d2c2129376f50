"""Helpers for the OpenAI frontend's tests: a live ``flowserve serve`` subprocess and its
command line, SSE parsing, and the toy executor's parameter records.

``ENGINE_ARGS`` is the one line to change to run these tests on the real engine instead of
the toy components of ``tests/fixture_plugin`` (tests that rely on the toy's arithmetic are
marked ``toy_only`` and skip then).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

TOY_ENGINE = ["--model", "toy", "--served-model-name", "toy", "--tokenizer", "whitespace", "--executor", "counter",
              "--kv-cache", "unbounded", "--batch-scheduler", "fifo", "--job-scheduler", "least-tasks"]
ENGINE_ARGS = TOY_ENGINE  # the real engine: ["--served-model-name", "toy", "--tokenizer", "hf", "--executor", "spmd", …]
TOY = ENGINE_ARGS is TOY_ENGINE
MODEL = ENGINE_ARGS[ENGINE_ARGS.index("--served-model-name") + 1]
#: The toy context: WhitespaceTokenizer.max_model_len.
TOY_CONTEXT = 256

toy_only = pytest.mark.skipif(not TOY, reason="relies on the toy counter executor's arithmetic")

LISTENING = re.compile(r"serving the OpenAI API on (http://[^\s\"]+)")


def serve_command(*extra: str, scaler: str = "inproc") -> list[str]:
    """``flowserve serve`` on 127.0.0.1 (a free port) with the engine under test."""
    return [sys.executable, "-m", "flowserve_core.cli", "serve", "--host", "127.0.0.1", "--port", "0",
            "--scaler", scaler, *ENGINE_ARGS, *extra]


class LiveServer:
    """One ``flowserve serve`` process: its URL, log, metrics, clients, and a clean stop."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.command = command
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "COLUMNS": "200", **(env or {})})
        self.url = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = 90) -> LiveServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := LISTENING.search(self.log()):
                self.url = match[1]
                return self
            if self.process.poll() is not None:
                pytest.fail(f"flowserve serve exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        pytest.fail(f"flowserve serve did not listen within {timeout} s:\n{self.log()[-3000:]}")

    def wait_ready(self, timeout: float = 90) -> LiveServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if httpx.get(self.url + "/ready", timeout=10).status_code == 200:
                return self
            time.sleep(0.05)
        pytest.fail(f"{self.url}/ready did not answer 200 within {timeout} s:\n{self.log()[-3000:]}")

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def client(self, api_key: str = "unused", **kw: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=60, **kw)

    def async_client(self, api_key: str = "unused", **kw: Any) -> Any:
        import openai

        return openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=60, **kw)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics as ``{(name, sorted labels): value}``."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def metric(self, name: str, **labels: str) -> float:
        labels = {"model_name": MODEL, **labels}
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_metric(self, name: str, predicate: Callable[[float], bool], timeout: float = 30, **labels: str) -> float:
        deadline = time.monotonic() + timeout
        while True:
            value = self.metric(name, **labels)
            if predicate(value) or time.monotonic() > deadline:
                return value
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return self.process.returncode


def write_config(directory: Path, text: str) -> str:
    """Write a ``flowserve.toml`` into ``directory``; its path for ``--config``."""
    path = directory / "flowserve.toml"
    path.write_text(text)
    return str(path)


def recorded_params(record_path: Path, prompt_token_ids: list[int]) -> list[dict]:
    """The SamplingParams the engine received for sequences whose prompt ends with these
    tokens (a chat prompt starts with its template's tokens)."""
    if not record_path.exists():
        return []
    lines = [json.loads(line) for line in record_path.read_text().splitlines() if line.strip()]
    n = len(prompt_token_ids)
    return [line["params"] for line in lines if line["prompt_token_ids"][-n:] == prompt_token_ids]


def unique_prompt(rng_seed: int | None = None) -> tuple[str, list[int]]:
    """A prompt of toy tokens no other test uses (so its recorded params can be found);
    its last token is small, so the counter stays far from the failing token 900."""
    rng = random.Random(rng_seed)
    ids = [rng.randrange(1, 999) for _ in range(6)] + [rng.randrange(1, 400)]
    return " ".join(f"t{i}" for i in ids), ids


def sse_events(raw: str) -> list[str]:
    """The ``data:`` payloads of a Server-Sent Events body, checking the framing."""
    assert raw.endswith("\n\n"), raw[-200:]
    events = [block for block in raw.split("\n\n") if block]
    for block in events:
        assert block.startswith("data: "), block
    return [block[len("data: "):] for block in events]
