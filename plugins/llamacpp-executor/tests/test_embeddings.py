"""Embeddings on the ``llamacpp`` executor, through a deployment (continuous batching, paged KV):
the vectors equal llama.cpp's own per-token embeddings (``llama_cpp.Llama(embedding=True)``,
pooling NONE) pooled the same way and normalized, for prompts computed whole or in chunks,
while generations run in the same steps and stay greedy-exact."""

from __future__ import annotations

from pathlib import Path

import anyio
import numpy as np
import pytest

from flowserve_core.types import DeploymentSpec, PoolingParams, Request, RequestOutput
from flowserve_llamacpp_executor.testing import llama_cpp_greedy
from flowserve_testing import run_deployment

pytestmark = pytest.mark.anyio

TEXTS = ["Hello", "The capital of France is Paris, and the capital of Italy is Rome.",
         " ".join(f"word{i}" for i in range(60))]  # ~180 tokens: chunked at 128 a step


def deployment_spec(path: Path) -> DeploymentSpec:
    return DeploymentSpec(name="gguf", model=str(path), executor="llamacpp", scaler="inproc", kv_cache_memory="64MiB",
                          max_num_batched_tokens=128, max_num_seqs=16)


def llama_cpp_token_embeddings(path: Path, texts: list[str]) -> list[tuple[list[int], np.ndarray]]:
    """The oracle: each text's tokens and their final hidden states, from llama.cpp's own API."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=1024, n_ubatch=1024, embedding=True,
                          pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE, flash_attn=True, verbose=False)
    try:
        return [(llm.tokenize(text.encode()), np.array(llm.embed(text))) for text in texts]
    finally:
        llm.close()


async def embed(runner, tokens: list[int], pooling: PoolingParams) -> tuple[RequestOutput, list[float] | None]:
    request = Request(prompt_token_ids=tokens, pooling=pooling)
    embedding = None
    async with runner.deployment.open(request) as handle:
        async for event in handle:
            assert not event.token_ids
            if event.embedding is not None:
                embedding = event.embedding
    return handle.output, embedding


async def together(runner, embedded: list[list[int]], kind: str, generate: list[list[int]]) -> tuple[list, list]:
    """Every embedding and generation at once: the vectors and the greedy tokens, in order."""
    vectors: list = [None] * len(embedded)
    generated: list = [None] * len(generate)

    async def one(i: int) -> None:
        output, vectors[i] = await embed(runner, embedded[i], PoolingParams(kind=kind))
        assert output.finish_reason == "stop", output.error

    async def gen(i: int) -> None:
        output = await runner.generate(generate[i], max_tokens=6, temperature=0.0, ignore_eos=True)
        generated[i] = output.output_token_ids

    async with anyio.create_task_group() as group:
        for i in range(len(embedded)):
            group.start_soon(one, i)
        for i in range(len(generate)):
            group.start_soon(gen, i)
    return vectors, generated


async def test_pooled_vectors_equal_llama_cpps_own_beside_generations(tiny_llama_gguf):
    oracle = llama_cpp_token_embeddings(tiny_llama_gguf, TEXTS)
    generate = [oracle[1][0], oracle[2][0]]
    expected_tokens = [llama_cpp_greedy(tiny_llama_gguf, prompt, 6) for prompt in generate]
    async with run_deployment(deployment_spec(tiny_llama_gguf)) as runner:
        for kind in ("last", "mean"):
            vectors, generated = await together(runner, [tokens for tokens, _ in oracle], kind, generate)
            assert generated == expected_tokens
            for i, (_, hidden) in enumerate(oracle):
                pooled = hidden[-1] if kind == "last" else hidden.mean(0)
                want = pooled / np.linalg.norm(pooled)
                got = np.array(vectors[i])
                assert got.shape == want.shape and abs(np.linalg.norm(got) - 1) < 1e-5
                np.testing.assert_allclose(got, want, atol=2e-4, err_msg=f"{kind} pooling of text {i}")
