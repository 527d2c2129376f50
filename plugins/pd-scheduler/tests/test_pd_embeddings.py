"""Embeddings (``Request.pooling``) under the PD job schedulers: nothing to decode, so the
request runs whole as one task on a prefill instance (``pd-disaggregated``; ``pd-hybrid`` may
also take a colocated one), beside disaggregated generations that stay greedy-exact, and no
KV moves for it. The vectors are transformers' final hidden states pooled alike."""

from __future__ import annotations

import random

import anyio
import pytest

from flowserve_core.types import PoolingParams, Request

torch = pytest.importorskip("torch")
pytest.importorskip("flowserve_spmd_executor")

from test_pd_engine import spec  # noqa: E402  (after the importorskip above)

from flowserve_testing import hf_greedy, run_deployment  # noqa: E402  (after the importorskip above)

pytestmark = pytest.mark.anyio


def expected(model, prompt: list[int], kind: str) -> torch.Tensor:
    with torch.no_grad():
        hidden = model.model(torch.tensor([prompt])).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden[-1] if kind == "last" else hidden.mean(0), dim=0)


async def embed(runner, prompt: list[int], kind: str) -> list[float]:
    vector = None
    async with runner.deployment.open(Request(prompt_token_ids=prompt, pooling=PoolingParams(kind=kind))) as handle:
        async for event in handle:
            assert not event.token_ids and event.kv_handoff is None
            vector = event.embedding or vector
    assert handle.output.finish_reason == "stop", handle.output.error
    assert vector is not None
    return vector


def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(length)]


async def together(runner, embedded: dict[int, list[int]], kind: str, generated: list[list[int]]) -> tuple:
    """Every embedding and generation at once: the vectors by prompt length, the outputs in order."""
    vectors: dict[int, list[float]] = {}
    outputs: list = [None] * len(generated)

    async def one(n: int) -> None:
        vectors[n] = await embed(runner, embedded[n], kind)

    async def gen(i: int) -> None:
        outputs[i] = await runner.generate(generated[i], max_tokens=6, temperature=0.0, ignore_eos=True)

    async with anyio.create_task_group() as group:
        for n in embedded:
            group.start_soon(one, n)
        for i in range(len(generated)):
            group.start_soon(gen, i)
    return vectors, outputs


@pytest.mark.parametrize("job_scheduler, extra", [("pd-disaggregated", {}),
                                                  ("pd-hybrid", {"colocated_instances": 1})])
async def test_embeddings_run_whole_beside_disaggregated_generations(tiny_llama, job_scheduler, extra):
    path, model = tiny_llama
    vocab = model.config.vocab_size
    embedded = {n: random_prompt(n, vocab, seed=n) for n in (3, 40, 150)}  # 150: three chunks of 64
    generated = [random_prompt(n, vocab, seed=100 + n) for n in (20, 70)]
    async with run_deployment(spec(path, job_scheduler=job_scheduler, **extra)) as runner:
        for kind in ("last", "mean"):
            vectors, outputs = await together(runner, embedded, kind, generated)
            for n, prompt in embedded.items():
                torch.testing.assert_close(torch.tensor(vectors[n]), expected(model, prompt, kind),
                                           atol=1e-4, rtol=1e-4)
            for prompt, output in zip(generated, outputs):
                assert output.output_token_ids == hf_greedy(model, prompt, 6)
        # an embedding alone moves no KV to a decode instance (only decode tasks import any)
        moved = sum(s.stats().kv_transfer_bytes for s in runner.batch_schedulers())
        assert moved > 0 or job_scheduler == "pd-hybrid"  # disaggregated generations did move theirs
        await embed(runner, random_prompt(90, vocab, seed=7), "last")
        assert sum(s.stats().kv_transfer_bytes for s in runner.batch_schedulers()) == moved
