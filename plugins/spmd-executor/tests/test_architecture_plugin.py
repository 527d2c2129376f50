"""Architectures are a seam: a distribution outside the executor (``arcee_plugin/``, Arcee's
squared-ReLU MLP) adds one through ``flowserve_register_model_architectures``, and the
executor built by that plugin manager then serves its checkpoints greedy-exact against
transformers; without it, such a checkpoint is refused with a message naming the hook."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from spmd_helpers import VOCAB, Driver, hf_greedy, load_hf, random_prompt

from flowserve_core.errors import ConfigError
from flowserve_core.plugins import PluginManager
from flowserve_core.types import DeploymentSpec
from flowserve_spmd_executor.architectures import architectures

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
def with_arcee() -> Iterator[PluginManager]:
    """A plugin manager of the installed plugins plus the Arcee plugin, registered as its entry
    point would load it (the process-global manager stays as it is)."""
    sys.path.insert(0, str(PLUGIN_DIR))
    import flowserve_arcee_architecture

    manager = PluginManager()
    manager.register(flowserve_arcee_architecture, name="arcee_architecture",
                     distribution="flowserve-arcee-architecture")
    yield manager
    sys.path.remove(str(PLUGIN_DIR))


def spec_of(model: Path) -> DeploymentSpec:
    return DeploymentSpec(model=str(model), dtype="float32", device="cpu", kv_cache_memory="4MiB", block_size=16)


def test_without_the_plugin_the_architecture_is_refused_naming_the_hook(arcee):
    manager = PluginManager()
    assert "arcee" not in architectures(manager)
    with pytest.raises(ConfigError, match=r"model_type 'arcee'.*flowserve_register_model_architectures"):
        manager.hook.flowserve_check_deployment(spec=spec_of(arcee), plugins=manager)  # the deployment check
    with pytest.raises(ConfigError, match=r"model_type 'arcee'"):  # and an instance start
        manager.build("executor", "spmd", spec_of(arcee))


async def test_an_architecture_from_a_plugin_serves_greedy_exact(arcee, with_arcee):
    assert architectures(with_arcee)["arcee"].plugin == "arcee_architecture"
    assert {"llama", "qwen3_moe", "gemma3_text"} <= set(architectures(with_arcee))  # the built-ins stay
    with_arcee.hook.flowserve_check_deployment(spec=spec_of(arcee), plugins=with_arcee)  # passes now
    executor = with_arcee.build("executor", "spmd", spec_of(arcee))
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
