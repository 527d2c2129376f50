"""Reading configs and options: memory sizes, dtype and device choice, rotary scaling
(checked against transformers' own functions), and clear refusals of what is unsupported."""

from __future__ import annotations

import json

import pytest
import torch

from flowserve_core.errors import ConfigError
from flowserve_spmd_executor.layers.rotary import inverse_frequencies
from flowserve_spmd_executor.model_config import model_config_from_dict
from flowserve_spmd_executor.options import (
    cpu_has_native_bf16,
    parse_memory_size,
    resolve_device_type,
    resolve_dtype,
)

BASE = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


@pytest.mark.parametrize("text, size", [
    ("1GiB", 1 << 30), ("512MiB", 512 << 20), ("512 mib", 512 << 20), ("1.5GB", 1_500_000_000),
    ("64K", 64 << 10), ("4096", 4096), (123, 123),
])
def test_memory_sizes_parse(text, size):
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("text", ["lots", "1 parsec", "-5MiB", "0"])
def test_bad_memory_sizes_are_refused_by_name(text):
    with pytest.raises(ConfigError, match="kv_cache_memory"):
        parse_memory_size(text)


def test_auto_dtype_is_bfloat16_only_where_the_hardware_has_it():
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert resolve_dtype("auto", "cpu") == expected
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ConfigError, match="dtype 'float8'"):
        resolve_dtype("float8", "cpu")


def test_device_choice():
    if not torch.cuda.is_available():
        assert resolve_device_type("auto") in ("cpu", "npu")
        with pytest.raises(ConfigError, match="CUDA"):
            resolve_device_type("cuda:0")
    assert resolve_device_type("cpu") == "cpu"
    with pytest.raises(ConfigError, match="not one of"):
        resolve_device_type("tpu")


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 1024},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    {"rope_type": "yarn", "factor": 2.0, "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5},
])
def test_rotary_scaling_matches_transformers(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = LlamaConfig(**{k: v for k, v in BASE.items() if k != "model_type"},
                            rope_parameters={"rope_theta": 50000.0, **rope})
    expected, expected_scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config, torch.device("cpu"))
    config = model_config_from_dict(json.loads(hf_config.to_json_string()))
    inv_freq, scaling = inverse_frequencies(config.rope, config.head_dim)
    assert torch.allclose(inv_freq, expected, rtol=1e-6)
    assert scaling == pytest.approx(expected_scaling)


def test_transformers_4_style_rope_keys_are_read():
    config = model_config_from_dict({**BASE, "rope_theta": 500000.0,
                                     "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (config.rope.theta, config.rope.type, config.rope.factor) == (500000.0, "linear", 2.0)


def test_family_differences_come_from_the_config():
    qwen2 = model_config_from_dict({**BASE, "model_type": "qwen2", "sliding_window": 32,
                                    "use_sliding_window": False, "tie_word_embeddings": True})
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.sliding_windows == (0, 0) and qwen2.tie_word_embeddings
    mistral = model_config_from_dict({**BASE, "model_type": "mistral", "sliding_window": 32, "head_dim": 32})
    assert mistral.sliding_windows == (32, 32) and mistral.head_dim == 32 and not mistral.qkv_bias
    llama = model_config_from_dict({**BASE, "attention_bias": True})
    assert llama.qkv_bias and llama.o_bias


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type 'gpt2'"),
    ({"hidden_act": "relu"}, "hidden activation 'relu'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope type 'dynamic'"),
    ({"num_attention_heads": None}, "no 'num_attention_heads'"),
])
def test_unsupported_models_are_refused_clearly(change, message):
    raw = {**BASE, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        model_config_from_dict(raw)
