"""Architectures are a seam: a distribution outside the executor (``arcee_plugin/``, Arcee's
squared-ReLU MLP) adds one through ``flowserve_register_model_architectures``, and the
executor then serves its checkpoints greedy-exact against transformers; without it, such a
checkpoint is refused with a message naming the hook."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from spmd_helpers import VOCAB, Driver, hf_greedy, load_hf, random_prompt

from flowserve_core.errors import ConfigError
from flowserve_core.plugins import get_plugin_manager
from flowserve_core.types import DeploymentSpec
from flowserve_spmd_executor.architectures import architectures, refresh_architectures
from flowserve_spmd_executor.executor import SpmdExecutor

pytestmark = pytest.mark.anyio

PLUGIN_DIR = Path(__file__).parent / "arcee_plugin"


@pytest.fixture(scope="module")
def arcee(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "arcee", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.35,
        bos_token_id=None, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("arcee")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


@pytest.fixture
def arcee_plugin():
    """The plugin registered in this process's manager, as its entry point would load it."""
    sys.path.insert(0, str(PLUGIN_DIR))
    import flowserve_arcee_architecture

    manager = get_plugin_manager()
    manager.register(flowserve_arcee_architecture, name="arcee_architecture",
                     distribution="flowserve-arcee-architecture")
    refresh_architectures()
    yield
    manager.unregister("arcee_architecture")
    refresh_architectures()
    sys.path.remove(str(PLUGIN_DIR))


def make_executor(model: Path) -> SpmdExecutor:
    return SpmdExecutor(DeploymentSpec(model=str(model), dtype="float32", device="cpu", kv_cache_memory="4MiB",
                                       block_size=16))


def test_without_the_plugin_the_architecture_is_refused_naming_the_hook(arcee):
    assert "arcee" not in architectures()
    with pytest.raises(ConfigError, match=r"model_type 'arcee'.*flowserve_register_model_architectures"):
        make_executor(arcee)


async def test_an_architecture_from_a_plugin_serves_greedy_exact(arcee, arcee_plugin):
    assert architectures()["arcee"].plugin == "arcee_architecture"
    assert {"llama", "qwen3_moe", "gemma3_text"} <= set(architectures())  # the built-ins stay
    executor = make_executor(arcee)
    try:
        prompts = {f"len{n}": random_prompt(n, seed=1500 + n) for n in (4, 37)}
        driver = Driver(executor)
        for seq_id, prompt in prompts.items():
            driver.add(seq_id, prompt, max_tokens=10)
        outputs = await driver.run(chunk=16)
    finally:
        executor.close()
    hf = load_hf(arcee)
    for seq_id, prompt in prompts.items():
        assert outputs[seq_id] == hf_greedy(hf, prompt, 10), seq_id
