"""A sliding-window model holds only its window of KV: the continuous scheduler asks the paged
KV manager to give back blocks behind every layer's window, so four long generations run in a
cache far smaller than their histories, without a preemption, greedy-exact against
transformers (the blocks given back are reused by the other sequences while the first still
names them in its block table: attention masks them out)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from spmd_helpers import WINDOW, hf_greedy, load_hf, random_prompt, save_tiny_architecture

from flowserve_core.testing import run_deployment
from flowserve_core.types import DeploymentSpec

pytestmark = pytest.mark.anyio

BLOCK = 4
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def phi3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Phi-3 (every layer has the 12-token window) with a small tokenizer."""
    from transformers import AutoTokenizer

    from flowserve_hf_tokenizer.testing import build_llama_style_tokenizer

    path = build_llama_style_tokenizer(tmp_path_factory.mktemp("phi3"))
    return save_tiny_architecture(path, "phi3", seed=91, vocab_size=len(AutoTokenizer.from_pretrained(str(path))))


async def test_long_generations_fit_in_a_cache_smaller_than_their_histories(phi3):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(phi3)))
    prompts = [random_prompt(n, seed=3100 + n, vocab=vocab) for n in (9, 20, 31, 26)]
    # 2 KiB a block of 4 tokens (float32, both layers, K and V): 40 blocks hold
    # 160 tokens, less than the 4 x ~75 the histories reach; each sequence needs about
    # WINDOW / BLOCK + 2 blocks once its prompt is in
    spec = DeploymentSpec(model=str(phi3), tokenizer="hf", executor="spmd", kv_cache="paged",
                          batch_scheduler="continuous", job_scheduler="colocated", scaler="inproc",
                          dtype="float32", device="cpu", block_size=BLOCK, kv_cache_memory="80KiB",
                          max_model_len=128, max_num_seqs=4)
    outputs: dict[int, list[int]] = {}
    async with run_deployment(spec) as deployment:
        kv = deployment.engines()[0].scheduler.kv
        assert kv.sliding_window == WINDOW and kv.num_blocks == 40

        async def generate(index: int) -> None:
            output = await deployment.generate(prompts[index], max_tokens=NEW_TOKENS, ignore_eos=True, temperature=0.0)
            assert output.finish_reason == "length", output.error
            outputs[index] = output.output_token_ids

        async with anyio.create_task_group() as tg:
            for index in range(len(prompts)):
                tg.start_soon(generate, index)
        assert deployment.engines()[0].scheduler.stats().num_preemptions == 0
    histories = sum(-(-(len(p) + NEW_TOKENS) // BLOCK) for p in prompts)
    assert histories > 40  # whole histories would not fit: without the release, preemptions
    hf = load_hf(phi3)
    for index, prompt in enumerate(prompts):
        assert outputs[index] == hf_greedy(hf, prompt, NEW_TOKENS), f"prompt of {len(prompt)} tokens"
