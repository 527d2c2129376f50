"""The pd-scheduler tests' shared model: a tiny random two-layer Llama and transformers' copy
of it (the oracle), made once per module that asks for it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test_pd_embeddings builds its deployments with test_pd_engine's spec


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """``(path, model)``: the checkpoint's directory and the model loaded by transformers."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("flowserve_spmd_executor")
    from transformers import AutoModelForCausalLM

    from flowserve_testing import write_tiny_llama

    path = write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), num_hidden_layers=2, seed=5)
    return path, AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
