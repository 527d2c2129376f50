"""Every architecture of issue 17 gives transformers' greedy tokens: a tiny random checkpoint per
architecture (made by transformers itself, 2 layers, hidden 64, windows of 12 tokens), served by
the real executor at tensor_parallel 1 and 2 (worker processes), for a concurrent batch of
prompts shorter and longer than the sliding window, prefilled in chunks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from spmd_helpers import ARCHITECTURES, WINDOW, Driver, hf_greedy, load_hf, random_prompt, save_tiny_architecture

from flowserve_core.types import DeploymentSpec
from flowserve_spmd_executor.executor import SpmdExecutor

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def architecture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Any]:
    model_type: str = request.param
    path = save_tiny_architecture(tmp_path_factory.mktemp(model_type), model_type,
                                  seed=list(ARCHITECTURES).index(model_type) + 10)
    return model_type, path, load_hf(path)


def make_executor(model: Path, tensor_parallel: int, dtype: str = "float32") -> SpmdExecutor:
    return SpmdExecutor(DeploymentSpec(model=str(model), dtype=dtype, device="cpu", kv_cache_memory="4MiB",
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


@pytest.mark.parametrize("tensor_parallel", [1, 2])
async def test_a_multimodal_gemma3_checkpoint_serves_its_language_model(tmp_path, tensor_parallel):
    # Gemma 3 4B and up ship as Gemma3ForConditionalGeneration: a vision tower and projector
    # around a gemma3_text model under language_model.*; text prompts use the language model.
    from spmd_helpers import COMMON
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = {**COMMON, **ARCHITECTURES["gemma3_text"]}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=300,
                          boi_token_index=301, eoi_token_index=302, tie_word_embeddings=False)
    torch.manual_seed(71)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "language_model" in name and "norm" in name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(tmp_path)
    executor = make_executor(tmp_path, tensor_parallel)
    try:
        assert executor.config.model_type == "gemma3_text" and executor.config.sliding_windows == (WINDOW, 0)
        prompts = {f"len{n}": random_prompt(n, seed=1800 + n) for n in (5, 2 * WINDOW + 3)}
        driver = Driver(executor)
        for seq_id, prompt in prompts.items():
            driver.add(seq_id, prompt, max_tokens=10)
        outputs = await driver.run(chunk=16)
    finally:
        executor.close()
    for seq_id, prompt in prompts.items():
        assert outputs[seq_id] == hf_greedy(model, prompt, 10), seq_id


@pytest.mark.parametrize("model_type", ["gemma3_text", "qwen3_moe"])
async def test_a_model_preloaded_from_its_dram_image_gives_the_same_tokens(model_type, tmp_path, monkeypatch):
    # The prewarm scaler's fast start: weights written once as a DRAM image, then mapped.
    from flowserve_spmd_executor import image_store
    from flowserve_spmd_executor.preload import preload

    monkeypatch.setenv("FLOWSERVE_SHM_DIR", str(tmp_path / "shm"))
    monkeypatch.setenv("FLOWSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(image_store.SESSION_VARIABLE, "")
    path = save_tiny_architecture(tmp_path / "model", model_type, seed=81)
    spec = DeploymentSpec(model=str(path), dtype="float32", device="cpu", kv_cache_memory="4MiB", block_size=16)
    preload(spec, None)  # built-in architectures: no plugin manager needed
    executor = SpmdExecutor(spec)
    try:
        assert executor.rank.weights_path == "preloaded"
        prompt = random_prompt(2 * WINDOW + 4, seed=1981)
        driver = Driver(executor)
        driver.add("x", prompt, max_tokens=10)
        outputs = await driver.run()
    finally:
        executor.close()
    assert outputs["x"] == hf_greedy(load_hf(path), prompt, 10)


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
async def test_bfloat16_agrees_with_transformers_in_bfloat16_until_a_near_tie(model_type, tmp_path):
    from test_models import _agree_until_a_near_tie

    path = save_tiny_architecture(tmp_path, model_type, seed=91)
    executor = make_executor(path, 1, dtype="bfloat16")
    try:
        prompts = {f"len{n}": random_prompt(n, seed=1990 + n) for n in (4, 2 * WINDOW + 6)}
        driver = Driver(executor)
        for seq_id, prompt in prompts.items():
            driver.add(seq_id, prompt, max_tokens=8)
        outputs = await driver.run(chunk=16)
    finally:
        executor.close()
    hf = load_hf(path, torch.bfloat16)
    for prompt, ours in zip(prompts.values(), outputs.values()):
        _agree_until_a_near_tie(hf, prompt, ours, margin=0.1)


async def test_olmo2_k_norm_over_a_kv_head_replicated_on_both_ranks(tmp_path):
    # One KV head, two ranks: each holds the same head, and the norm's all-reduced sum of
    # squares must count it once.
    path = save_tiny_architecture(tmp_path, "olmo2", seed=61, num_key_value_heads=1)
    executor = make_executor(path, 2)
    try:
        prompt = random_prompt(30, seed=1961)
        driver = Driver(executor)
        driver.add("x", prompt, max_tokens=10)
        outputs = await driver.run()
    finally:
        executor.close()
    assert outputs["x"] == hf_greedy(load_hf(path), prompt, 10)


@pytest.mark.parametrize("model_type", ["gemma3_text", "mixtral"])
async def test_a_prefix_cache_hit_past_the_window_gives_the_cold_start_tokens(model_type, tmp_path):
    path = save_tiny_architecture(tmp_path, model_type, seed=77)
    executor = make_executor(path, 1)
    try:
        driver = Driver(executor)
        first = random_prompt(50, seed=1701)
        driver.add("first", first, max_tokens=4)
        await driver.run()
        # 32 cached tokens (two blocks, well past the 12-token window), then new ones
        second = first[:32] + random_prompt(20, seed=1702)
        hit = driver.add("hit", second, max_tokens=10, shared_blocks=driver.seqs["first"].table[:2])
        outputs = await driver.run(chunk=8)
        assert hit.computed >= len(second)
        cold = Driver(executor, first_block=driver.next_block)
        cold.add("cold", second, max_tokens=10)
        assert outputs["hit"] == (await cold.run())["cold"] == hf_greedy(load_hf(path), second, 10)
    finally:
        executor.close()


async def test_a_checkpoint_sharded_over_several_safetensors_files_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    checkpoint = save_tiny_architecture(tmp_path / "whole", "qwen3_moe", seed=43)
    hf = load_hf(checkpoint)
    AutoModelForCausalLM.from_pretrained(str(checkpoint)).save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    executor = make_executor(tmp_path / "sharded", 1)
    try:
        assert len(executor.weights.files) > 2
        prompt = random_prompt(30, seed=1950)
        driver = Driver(executor)
        driver.add("x", prompt, max_tokens=10)
        outputs = await driver.run()
    finally:
        executor.close()
    assert outputs["x"] == hf_greedy(hf, prompt, 10)


async def test_a_qwen3_gguf_is_checked_from_its_header_then_converted_and_served_exactly(tmp_path, monkeypatch):
    from spmd_helpers import write_gguf

    from flowserve_spmd_executor.checks import model_config_of

    monkeypatch.setenv("FLOWSERVE_CACHE_DIR", str(tmp_path / "cache"))
    # transformers' GGUF reader takes Qwen3's head_dim from its config default (128)
    checkpoint = save_tiny_architecture(tmp_path / "hf", "qwen3", seed=41, head_dim=128)
    gguf = write_gguf(load_hf(checkpoint), tmp_path / "tiny-qwen3.gguf", "qwen3")
    assert model_config_of(str(gguf)).model_type == "qwen3"  # from the header, nothing converted yet
    executor = make_executor(gguf, 1)
    try:
        assert executor.weights.converted_from_gguf
        prompts = {f"len{n}": random_prompt(n, seed=1900 + n) for n in (6, 40)}
        driver = Driver(executor)
        for seq_id, prompt in prompts.items():
            driver.add(seq_id, prompt, max_tokens=10)
        outputs = await driver.run(chunk=32)
    finally:
        executor.close()
    hf = load_hf(Path(executor.weights.directory))  # transformers' own reading of the GGUF
    for seq_id, prompt in prompts.items():
        assert outputs[seq_id] == hf_greedy(hf, prompt, 10), seq_id


def test_a_hub_id_not_in_the_local_cache_is_refused_naming_it_and_the_way_out():
    from flowserve_core.errors import ConfigError
    from flowserve_spmd_executor.loader import resolve_weights

    with pytest.raises(ConfigError) as refused:  # offline: HF_HUB_OFFLINE is set (spmd_helpers)
        resolve_weights("flowserve-tests/no-such-model")
    message = str(refused.value)
    assert "'flowserve-tests/no-such-model'" in message and "hf download flowserve-tests/no-such-model" in message
    assert "model directory with config.json" in message and ".gguf file" in message
    assert "HF_HUB_OFFLINE is set" in message


def test_serve_with_a_hub_id_it_cannot_download_exits_with_the_way_out(tmp_path):
    """Without HF_HUB_OFFLINE FlowServe would download the id; a Hub it cannot reach (a closed
    port here) is a clear error, not a hang or a traceback."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9", "COLUMNS": "300"}
    result = subprocess.run([sys.executable, "-m", "flowserve_core.cli", "serve", "flowserve-tests/no-such-model",
                             "--port", "0"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "'flowserve-tests/no-such-model' is not in the local Hugging Face cache and the Hub cannot be reached" \
        in result.stderr
    assert "pass a local path" in result.stderr and "Traceback" not in result.stderr


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



def test_gemma_configs_from_before_layer_types_interleave_their_windows():
    from flowserve_spmd_executor.model_config import model_config_from_dict

    # as the Hub's Gemma 2 and Gemma 3 config.json files say it (transformers 4)
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096)
    gemma2 = model_config_from_dict({**base, "model_type": "gemma2", "num_hidden_layers": 4,
                                     "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0})
    assert gemma2.sliding_windows == (4096, 0, 4096, 0)
    gemma3 = model_config_from_dict({**base, "model_type": "gemma3_text", "num_hidden_layers": 7,
                                     "sliding_window_pattern": 6, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                                     "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert gemma3.sliding_windows == (4096,) * 5 + (0, 4096)
    assert (gemma3.rope.theta, gemma3.rope.type, gemma3.rope.factor) == (1e6, "linear", 8.0)
    assert gemma3.local_rope is not None
    assert (gemma3.local_rope.theta, gemma3.local_rope.type, gemma3.local_rope.factor) == (1e4, "default", 1.0)


def test_a_multimodal_gemma3_config_that_names_only_what_differs_gets_the_defaults():
    from flowserve_spmd_executor.model_config import model_config_from_dict

    # gemma-3-4b-it's config.json as the Hub has it: its text_config omits the defaults
    config = model_config_from_dict({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                          "patch_size": 14, "vision_use_head": False}})
    assert config.model_type == "gemma3_text" and config.num_layers == 34 and config.hidden_size == 2560
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (8, 4, 256)
    assert config.attention_scale == 256 ** -0.5 and config.eos_token_ids == (1, 106)
    assert config.sliding_windows[:6] == (1024,) * 5 + (0,) and config.sliding_windows.count(0) == 5
    assert config.rope.type == "linear" and config.rope.factor == 8.0
    assert config.local_rope is not None and config.local_rope.theta == 10000.0

