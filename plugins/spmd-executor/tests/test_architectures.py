"""Every architecture of issue 17 gives transformers' greedy tokens: a tiny random checkpoint per
architecture (made by transformers itself, 2 layers, hidden 64, windows of 12 tokens), served by
the real executor at tensor_parallel 1 and 2 (worker processes), for a concurrent batch of
prompts shorter and longer than the sliding window, prefilled in chunks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from spmd_helpers import VOCAB, Driver, hf_greedy, load_hf, random_prompt

from flowserve_core.types import DeploymentSpec
from flowserve_spmd_executor.executor import SpmdExecutor

pytestmark = pytest.mark.anyio

WINDOW = 12
COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=0.35,
    bos_token_id=None, eos_token_id=None, pad_token_id=0, rms_norm_eps=1e-5, tie_word_embeddings=False)

#: model_type → what its tiny config sets beyond ``COMMON`` (each exercises its family's features)
ARCHITECTURES: dict[str, dict[str, Any]] = {
    # a global layer, then a sliding one (max_window_layers)
    "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "gemma2": dict(sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=20.0,
                   final_logit_softcapping=15.0, hidden_activation="gelu_pytorch_tanh"),
    "gemma3_text": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                        query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh",
                        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "phi3": dict(sliding_window=WINDOW, partial_rotary_factor=0.5),
    "olmo2": dict(),
    "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.1,
                    logits_scaling=2.0),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, sliding_window=WINDOW),
    # the first layer dense, the second routed; top-k weights not renormalised
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=False,
                      mlp_only_layers=[0]),
}


def save_tiny_architecture(path: Path, model_type: str, seed: int) -> Path:
    """A tiny random checkpoint of ``model_type`` from transformers' own ``from_config``; the
    norms' weights are drawn too (HF starts them at one), so a norm loaded wrongly shows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**COMMON, **ARCHITECTURES[model_type]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # Gemma's norms store weight - 1
                param.normal_(0.0 if model_type.startswith("gemma") else 1.0, 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def architecture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Any]:
    model_type: str = request.param
    path = save_tiny_architecture(tmp_path_factory.mktemp(model_type), model_type,
                                  seed=list(ARCHITECTURES).index(model_type) + 10)
    return model_type, path, load_hf(path)


def make_executor(model: Path, tensor_parallel: int) -> SpmdExecutor:
    return SpmdExecutor(DeploymentSpec(model=str(model), dtype="float32", device="cpu", kv_cache_memory="4MiB",
                                       block_size=16, tensor_parallel=tensor_parallel))


@pytest.mark.parametrize("tensor_parallel", [1, 2])
async def test_greedy_tokens_equal_transformers(architecture, tensor_parallel):
    model_type, path, hf = architecture
    executor = make_executor(path, tensor_parallel)
    try:
        assert executor.config.model_type == model_type
        prompts = {f"len{n}": random_prompt(n, seed=1000 + n) for n in (3, 2 * WINDOW + 5, 70)}
        driver = Driver(executor)
        for seq_id, prompt in prompts.items():  # one concurrent batch, long prompts in chunks
            driver.add(seq_id, prompt, max_tokens=10)
        outputs = await driver.run(chunk=32)
    finally:
        executor.close()
    for seq_id, prompt in prompts.items():
        assert outputs[seq_id] == hf_greedy(hf, prompt, 10), f"{model_type} tp={tensor_parallel} {seq_id}"


def test_each_config_reads_its_family_features(tmp_path):
    from flowserve_spmd_executor.model_config import load_model_config

    configs = {t: load_model_config(save_tiny_architecture(tmp_path / t, t, seed=0)) for t in ARCHITECTURES}
    assert configs["qwen3"].sliding_windows == (0, WINDOW)
    gemma2 = configs["gemma2"]
    assert gemma2.sliding_windows == (WINDOW, 0) and gemma2.attention_scale == 24 ** -0.5
    assert gemma2.attn_logit_softcap == 20.0 and gemma2.final_logit_softcap == 15.0
    gemma3 = configs["gemma3_text"]
    assert gemma3.rope.theta == 1e6 and gemma3.local_rope is not None and gemma3.local_rope.theta == 1e4
    assert configs["phi3"].rotary_dim == 8 and configs["phi3"].sliding_windows == (WINDOW, WINDOW)
    granite = configs["granite"]
    assert (granite.embedding_multiplier, granite.residual_multiplier, granite.attention_scale,
            granite.logits_scaling) == (3.0, 0.5, 0.1, 2.0)
    assert configs["mixtral"].num_experts == 4 and configs["mixtral"].norm_topk_prob
    moe = configs["qwen3_moe"]
    assert moe.moe_layers == (False, True) and moe.num_experts_per_tok == 3 and not moe.norm_topk_prob
