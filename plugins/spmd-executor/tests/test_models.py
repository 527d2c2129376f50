"""More members of the family and more dtypes: Mistral's sliding window, bfloat16 against
transformers in bfloat16, SmolLM2 from its GGUF (the default model), and CUDA when present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from spmd_helpers import Driver, hf_greedy, load_hf, random_prompt

from flowserve_core.types import DeploymentSpec
from flowserve_spmd_executor.executor import SpmdExecutor
from flowserve_spmd_executor.loader import gguf_cache_dir, resolve_weights

pytestmark = pytest.mark.anyio


def make_executor(model, **overrides) -> SpmdExecutor:
    fields = dict(model=str(model), dtype="float32", device="cpu", kv_cache_memory="4MiB", block_size=16)
    fields.update(overrides)
    return SpmdExecutor(DeploymentSpec(**fields))


async def _greedy_outputs(executor, prompts: dict[str, list[int]], tokens: int, chunk: int = 1 << 30):
    driver = Driver(executor)
    for seq_id, prompt in prompts.items():
        driver.add(seq_id, prompt, max_tokens=tokens)
    return await driver.run(chunk=chunk)


async def test_mistral_sliding_window_matches_hf(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(3)
    config = MistralConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           sliding_window=12, initializer_range=0.35, bos_token_id=None, eos_token_id=None,
                           pad_token_id=0)
    MistralForCausalLM(config).save_pretrained(tmp_path)
    hf = load_hf(tmp_path)
    executor = make_executor(tmp_path)
    try:
        assert executor.config.sliding_windows == (12, 12)
        prompts = {f"len{n}": random_prompt(n, seed=500 + n) for n in (5, 40, 90)}
        outputs = await _greedy_outputs(executor, prompts, 16, chunk=32)
    finally:
        executor.close()
    for seq_id, prompt in prompts.items():
        assert outputs[seq_id] == hf_greedy(hf, prompt, 16), seq_id


def _agree_until_a_near_tie(hf: object, prompt: list[int], ours: list[int], margin: float) -> None:
    """Tokens must agree up to the first step where HF's own top two logits are within
    ``margin`` (low precision may break such a tie either way)."""
    device = next(hf.parameters()).device
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt], device=device), max_new_tokens=len(ours), min_new_tokens=len(ours),
                          do_sample=False, eos_token_id=None, pad_token_id=0, output_logits=True,
                          return_dict_in_generate=True)
    expected = out.sequences[0, len(prompt):].tolist()
    for step, logits in enumerate(out.logits):
        top = logits[0].float().topk(2).values
        if top[0] - top[1] < margin:
            break
        assert ours[step] == expected[step], f"token {step}: {ours} vs HF {expected}"


async def test_bfloat16_matches_transformers_in_bfloat16(tiny_llama):
    hf = load_hf(tiny_llama, torch.bfloat16)
    executor = make_executor(tiny_llama, dtype="bfloat16")
    try:
        assert executor.rank.kv_cache.tensor.dtype == torch.bfloat16
        prompts = {f"len{n}": random_prompt(n, seed=600 + n) for n in (3, 40, 120)}
        outputs = await _greedy_outputs(executor, prompts, 10, chunk=64)
    finally:
        executor.close()
    for seq_id, prompt in prompts.items():
        _agree_until_a_near_tie(hf, prompt, outputs[seq_id], margin=0.1)


@pytest.mark.slow
async def test_smollm2_from_its_gguf_matches_hf():
    from flowserve_core.config import default_model_path

    gguf = Path(default_model_path())
    executor = make_executor(gguf, kv_cache_memory="64MiB")  # converts once, then loads the cache
    try:
        cache = Path(executor.weights.directory)
        assert executor.weights.converted_from_gguf and cache == gguf_cache_dir(gguf)
        assert resolve_weights(str(gguf)).directory == str(cache)  # found, not converted again
        assert executor.config.tie_word_embeddings and executor.config.num_kv_heads == 3
        # "The capital of France is" and a longer run of ordinary tokens
        prompts = {"france": [1, 504, 3458, 282, 4649, 314], "long": random_prompt(90, seed=7, vocab=40000)}
        outputs = await _greedy_outputs(executor, prompts, 16)
    finally:
        executor.close()
    hf = load_hf(cache)  # the same dequantized weights, through transformers' own modeling code
    for seq_id, prompt in prompts.items():
        assert outputs[seq_id] == hf_greedy(hf, prompt, 16), seq_id


def test_the_gguf_cache_key_follows_the_file(tmp_path):
    import os

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    first = gguf_cache_dir(fake)
    os.utime(fake, ns=(1_000_000_000, 2_000_000_000))
    assert gguf_cache_dir(fake) != first
    assert gguf_cache_dir(fake).name.startswith("model-")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_cuda_matches_transformers_on_cuda(tiny_llama, dtype):
    torch_dtype = getattr(torch, dtype)
    hf = load_hf(tiny_llama, torch_dtype).to("cuda")
    executor = make_executor(tiny_llama, device="cuda", dtype=dtype)
    try:
        prompts = {f"len{n}": random_prompt(n, seed=700 + n) for n in (2, 33, 150)}
        outputs = await _greedy_outputs(executor, prompts, 10, chunk=64)
    finally:
        executor.close()
    for seq_id, prompt in prompts.items():
        if dtype == "float32":
            with torch.no_grad():
                out = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=10, min_new_tokens=10,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)
            assert outputs[seq_id] == out[0, len(prompt):].tolist(), seq_id
        else:
            _agree_until_a_near_tie(hf, prompt, outputs[seq_id], margin=0.1)
