"""A deployment that can never run is refused once, at its start, from the model's config.json
or GGUF header alone (issue 20, item 4): the checks are those of an instance start, and they
load no weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flowserve_core.config import default_model_path
from flowserve_core.errors import ConfigError
from flowserve_core.plugins import get_plugin_manager
from flowserve_core.types import DeploymentSpec
from flowserve_spmd_executor.checks import check_deployment, model_config_of
from flowserve_spmd_executor.executor import SpmdExecutor
from flowserve_spmd_executor.gguf_header import config_from_gguf


def spec(model, **fields) -> DeploymentSpec:
    return DeploymentSpec(**{"model": str(model), "dtype": "float32", "device": "cpu", "kv_cache_memory": "4MiB",
                             **fields})


def test_a_working_spec_passes_and_the_instance_start_agrees(tiny_llama):
    check_deployment(spec(tiny_llama, tensor_parallel=2))
    check_deployment(spec(tiny_llama))
    SpmdExecutor(spec(tiny_llama))  # what the check let through does start


@pytest.mark.parametrize("fields, message", [
    (dict(tensor_parallel=3), "does not divide the model's 4 attention heads"),
    (dict(kv_cache_memory="64KiB", max_model_len=1024), "fewer than one sequence of max_model_len 1024"),
    (dict(device="npu"), "torch_npu is not installed"),
    (dict(decode_steps=4), "multi-step decoding needs executor 'llamacpp'"),
])
def test_what_can_never_run_is_refused_with_its_reason_at_check_and_at_instance_start(tiny_llama, fields, message):
    with pytest.raises(ConfigError, match=message):
        check_deployment(spec(tiny_llama, **fields))
    with pytest.raises(ConfigError, match=message):
        SpmdExecutor(spec(tiny_llama, **fields))


def test_an_unset_max_model_len_is_capped_to_what_the_kv_cache_holds(tiny_llama):
    check_deployment(spec(tiny_llama, kv_cache_memory="64KiB", max_model_len=64))
    check_deployment(spec(tiny_llama, kv_cache_memory="64KiB"))
    executor = SpmdExecutor(spec(tiny_llama, kv_cache_memory="64KiB"))  # 1024 positions, 80 tokens of cache
    assert executor.kv_cache_spec().max_model_len == executor.kv_cache_spec().num_blocks * 16 == 80


def test_a_missing_or_unreadable_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        check_deployment(spec(tmp_path / "nowhere"))
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n" * 10)
    with pytest.raises(ConfigError, match="is not a GGUF file"):
        check_deployment(spec(text))
    broken = tmp_path / "cut.gguf"
    broken.write_bytes(Path(default_model_path()).read_bytes()[:4096])
    with pytest.raises(ConfigError, match="cannot be read"):
        check_deployment(spec(broken))


def test_smollm2_gguf_is_checked_from_its_header_without_converting_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSERVE_CACHE_DIR", str(tmp_path / "cache"))
    gguf = default_model_path()
    config = model_config_of(gguf)
    assert (config.num_heads, config.num_kv_heads, config.num_layers, config.max_position_embeddings) == (9, 3, 30, 8192)
    assert config_from_gguf(gguf)["vocab_size"] == 49152
    with pytest.raises(ConfigError, match="tensor_parallel=2 does not divide the model's 9 attention heads"):
        check_deployment(DeploymentSpec(model=gguf, device="cpu", tensor_parallel=2))
    check_deployment(DeploymentSpec(model=gguf, device="cpu", tensor_parallel=3))
    assert not (tmp_path / "cache").exists()  # nothing was dequantized


def test_the_hook_checks_only_spmd_deployments(tiny_llama):
    pm = get_plugin_manager()
    with pytest.raises(ConfigError):
        pm.hook.flowserve_check_deployment(spec=spec(tiny_llama, tensor_parallel=3), plugins=pm)
    pm.hook.flowserve_check_deployment(spec=spec(tiny_llama, tensor_parallel=3, executor="counter"), plugins=pm)


def test_flowserve_serve_exits_1_with_the_reason_instead_of_respawning(tmp_path):
    """``flowserve serve --tensor-parallel 2`` on SmolLM2 (9 heads) used to respawn instances forever."""
    # COLUMNS=40: the message must stay on one line however narrow the console (CI's longer path split it)
    env = {**os.environ, "FLOWSERVE_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "40"}
    result = subprocess.run([sys.executable, "-m", "flowserve_core.cli", "serve", "--port", "0",
                             "--tensor-parallel", "2", "--device", "cpu"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "does not divide the model's 9 attention heads" in result.stderr
    assert "serving the OpenAI API" not in result.stderr + result.stdout
    assert not (tmp_path / "cache").exists()


def test_a_converted_gguf_is_checked_from_its_cached_config(tmp_path, monkeypatch, tiny_llama):
    """Once converted, the GGUF's cached config.json is what instances load; the check reads it."""
    from flowserve_spmd_executor.loader import _DONE_MARKER, gguf_cache_dir

    monkeypatch.setenv("FLOWSERVE_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    shutil.copy(default_model_path(), gguf)
    entry = gguf_cache_dir(gguf)
    entry.mkdir(parents=True)
    raw = json.loads((Path(tiny_llama) / "config.json").read_text())
    (entry / "config.json").write_text(json.dumps(raw))
    (entry / _DONE_MARKER).write_text("{}")
    assert model_config_of(str(gguf)).num_heads == raw["num_attention_heads"]
