"""The ``llamacpp`` executor in a deployment (scaler ``inproc``): greedy tokens equal to
llama.cpp's own (``llama_cpp.Llama``) on the same file, alone and batched, prefix reuse
through llama.cpp sequence copies, PD-disaggregation through llama.cpp's per-sequence
state, multi-step decoding (``decode_steps``: the tokens of one token a step, in fewer steps),
and the errors a user can meet. (The kit's executor conformance suite runs on it in
tests/test_conformance.py.)"""

from __future__ import annotations

import os
import random
from pathlib import Path

import anyio
import pytest

from flowserve_core.errors import ConfigError
from flowserve_core.types import (
    DeploymentSpec,
    Request,
    SamplingParams,
    ScheduledSequence,
    StepBatch,
    TokenLogprob,
)
from flowserve_llamacpp_executor.executor import LlamaCppExecutor
from flowserve_llamacpp_executor.testing import llama_cpp_greedy
from flowserve_testing import run_deployment

pytestmark = pytest.mark.anyio


def deployment_spec(path: Path, **overrides: object) -> DeploymentSpec:
    fields: dict = dict(name="gguf", model=str(path), tokenizer="hf", executor="llamacpp", kv_cache="paged",
                        batch_scheduler="continuous", job_scheduler="colocated", scaler="inproc",
                        kv_cache_memory="64MiB", max_num_batched_tokens=128, max_num_seqs=16)
    fields.update(overrides)
    return DeploymentSpec(**fields)


def random_prompts(count: int, lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(lengths[i % len(lengths)])] for i in range(count)]


async def generate_concurrently(runner, prompts: list[list[int]], max_tokens: int) -> list:
    """Every prompt at once through the deployment (greedy, exactly ``max_tokens``), in order."""
    outputs: list = [None] * len(prompts)

    async def one(i: int) -> None:
        outputs[i] = await runner.generate(prompts[i], max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async with anyio.create_task_group() as group:
        for i in range(len(prompts)):
            group.start_soon(one, i)
    return outputs


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
async def test_requests_alone_are_greedy_exact_against_llama_cpp(architecture, request):
    path = request.getfixturevalue(f"tiny_{architecture}_gguf")
    prompts = random_prompts(3, [1, 9, 150], 49152, seed=3)  # 150 > the step budget: chunked prefill
    async with run_deployment(deployment_spec(path)) as runner:
        outputs = [await runner.generate(p, max_tokens=12, temperature=0.0, ignore_eos=True) for p in prompts]
    for prompt, output in zip(prompts, outputs):
        assert output.error is None and output.finish_reason == "length"
        assert output.output_token_ids == llama_cpp_greedy(path, prompt, 12)


async def test_smollm2_alone_is_greedy_exact_against_llama_cpp(smollm2):
    async with run_deployment(deployment_spec(smollm2)) as runner:
        prompt = runner.tokenizer.encode("The capital of France is")
        output = await runner.generate(prompt, max_tokens=16, temperature=0.0, ignore_eos=True)
    assert output.output_token_ids == llama_cpp_greedy(smollm2, prompt, 16)


async def test_smollm2_batched_in_per_sequence_streams_is_greedy_exact_against_llama_cpp(smollm2):
    """Quantized, 16 at once (prefill chunks beside decodes), each sequence in its own stream:
    every greedy output equals llama.cpp's alone. (With ``kv_unified`` true, as measured in
    docs/llamacpp.md, most outputs of such a load differ somewhere: 9 or more of these 16.)"""
    texts = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):",
             "List three primary colors:", "Translate 'good morning' into Spanish:",
             "Once upon a time, in a small village,", "The derivative of x squared is", "My favourite food is"]
    preambles = ["You are a helpful assistant. Answer briefly.\nQuestion: ",
                 "The following is a conversation with a patient, knowledgeable teacher who explains things "
                 "step by step to a curious student.\nStudent: "]
    spec = deployment_spec(smollm2, options={"kv_unified": False})
    async with run_deployment(spec) as runner:
        prompts = [runner.tokenizer.encode(preamble + text + "\n") for preamble in preambles for text in texts]
        outputs = await generate_concurrently(runner, prompts, 40)
        steps = sum(engine.stats.steps for engine in runner.engines())
    assert steps < len(prompts) * 40, "the requests were not batched together"
    differing = [i for i, (prompt, output) in enumerate(zip(prompts, outputs))
                 if output.output_token_ids != llama_cpp_greedy(smollm2, prompt, 40)]
    assert differing == []


@pytest.mark.parametrize("options", [{"kv_unified": True}, {"kv_unified": False}], ids=["unified", "streams"])
async def test_concurrent_requests_decode_in_one_batch_and_stay_greedy_exact(tiny_llama_gguf, options):
    """Float32 weights: batching does not change the argmax here (for a quantized model it
    may; docs/llamacpp.md gives the measured rate)."""
    prompts = random_prompts(6, [3, 20, 64, 7, 130, 41], 49152, seed=4)
    shared = random_prompts(1, [48], 49152, seed=8)[0]  # a common prefix: shared by llama_memory_seq_cp
    prompts += [shared + suffix for suffix in random_prompts(4, [1, 5, 20, 33], 49152, seed=9)]
    async with run_deployment(deployment_spec(tiny_llama_gguf, options=options)) as runner:
        outputs = await generate_concurrently(runner, prompts, 10)
        steps = sum(engine.stats.steps for engine in runner.engines())
        executor = runner.engines()[0].executor
    assert executor.kv_unified is options["kv_unified"]
    assert steps < len(prompts) * 10, "the requests were not batched together"
    for prompt, output in zip(prompts, outputs):
        assert output.output_token_ids == llama_cpp_greedy(tiny_llama_gguf, prompt, 10)


@pytest.mark.parametrize("budget", [16, 40], ids=["steps-of-exactly-n_batch", "steps-in-parts"])
async def test_steps_of_exactly_n_batch_tokens_or_in_parts_sample_every_sequence(tiny_llama_gguf, budget):
    """``n_batch`` 16: with a step budget of 16, chunked prefills fill steps of exactly 16 tokens,
    decoded in one part whose logits are read in place; with 40, steps take several parts, and
    their logits are copied out part by part. Every sequence gets its token either way."""
    prompts = random_prompts(5, [9, 7, 30, 3, 16], 49152, seed=18)
    spec = deployment_spec(tiny_llama_gguf, max_num_batched_tokens=budget, options={"n_batch": 16})
    async with run_deployment(spec) as runner:
        outputs = await generate_concurrently(runner, prompts, 6)
    for prompt, output in zip(prompts, outputs):
        assert output.error is None
        assert output.output_token_ids == llama_cpp_greedy(tiny_llama_gguf, prompt, 6)


async def test_a_repeated_prompt_reuses_the_kv_of_a_finished_sequence(tiny_llama_gguf):
    prompt = random_prompts(1, [100], 49152, seed=5)[0]
    async with run_deployment(deployment_spec(tiny_llama_gguf, block_size=16)) as runner:
        first = await runner.generate(prompt, max_tokens=8, temperature=0.0, ignore_eos=True)
        second = await runner.generate(prompt, max_tokens=8, temperature=0.0, ignore_eos=True)
        # The prefix cache forgot nothing here; with prefix slots off, the executor recomputes.
        retained = len(runner.engines()[0].executor.slots.retained)
    assert second.num_cached_tokens == 96  # six whole blocks of 16
    assert first.output_token_ids == second.output_token_ids == llama_cpp_greedy(tiny_llama_gguf, prompt, 8)
    assert retained >= 1


async def test_without_prefix_slots_a_cached_prefix_is_recomputed_and_still_exact(tiny_llama_gguf):
    prompt = random_prompts(1, [70], 49152, seed=6)[0]
    spec = deployment_spec(tiny_llama_gguf, options={"prefix_slots": 0})
    async with run_deployment(spec) as runner:
        outputs = [await runner.generate(prompt, max_tokens=6, temperature=0.0, ignore_eos=True) for _ in range(2)]
    assert outputs[1].num_cached_tokens == 64
    assert outputs[0].output_token_ids == outputs[1].output_token_ids == llama_cpp_greedy(tiny_llama_gguf, prompt, 6)


async def test_pd_disaggregation_moves_llama_cpp_sequence_state(tiny_llama_gguf):
    pytest.importorskip("flowserve_pd_scheduler")
    prompts = random_prompts(4, [5, 40, 17, 90], 49152, seed=7)
    spec = deployment_spec(tiny_llama_gguf, job_scheduler="pd-disaggregated", prefill_instances=1,
                           decode_instances=1, kv_transport="shm")
    async with run_deployment(spec) as runner:
        outputs = [await runner.generate(p, max_tokens=8, temperature=0.0, ignore_eos=True) for p in prompts]
        moved = sum(s.stats().kv_transfer_bytes for s in runner.batch_schedulers())
    assert moved > 0, "no KV moved from the prefill to the decode instance"
    for prompt, output in zip(prompts, outputs):
        assert output.error is None
        assert output.output_token_ids == llama_cpp_greedy(tiny_llama_gguf, prompt, 8)


def test_tensor_parallel_is_a_clear_error(tiny_llama_gguf):
    with pytest.raises(ConfigError, match="tensor_parallel=2 needs executor 'spmd'"):
        LlamaCppExecutor(DeploymentSpec(model=str(tiny_llama_gguf), tensor_parallel=2))


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model")
    with pytest.raises(ConfigError, match="is not a GGUF file"):
        LlamaCppExecutor(DeploymentSpec(model=str(fake)))
    with pytest.raises(ConfigError, match="no such GGUF file"):
        LlamaCppExecutor(DeploymentSpec(model=str(tmp_path / "missing.gguf")))


def test_a_deployment_that_can_never_run_is_refused_before_it_starts(tiny_llama_gguf, tmp_path):
    """The start-time check (hook ``flowserve_check_deployment``) reads the GGUF header only."""
    from flowserve_llamacpp_executor.checks import check_deployment

    check_deployment(DeploymentSpec(executor="llamacpp", model=str(tiny_llama_gguf), kv_cache_memory="16MiB"))
    with pytest.raises(ConfigError, match="tensor_parallel=2 needs executor 'spmd'"):
        check_deployment(DeploymentSpec(executor="llamacpp", model=str(tiny_llama_gguf), tensor_parallel=2))
    with pytest.raises(ConfigError, match="max_model_len 4096 does not fit the KV cache"):
        check_deployment(DeploymentSpec(executor="llamacpp", model=str(tiny_llama_gguf), kv_cache_memory="512KiB",
                                        max_model_len=4096))
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(tiny_llama_gguf.read_bytes()[:4096])  # the header cut short
    with pytest.raises(ConfigError, match="not a readable GGUF file"):
        check_deployment(DeploymentSpec(executor="llamacpp", model=str(damaged)))


def test_flowserve_serve_exits_with_the_reason_for_tensor_parallel(tiny_llama_gguf):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "flowserve_core.cli", "serve", "--model", str(tiny_llama_gguf),
                           "--executor", "llamacpp", "--tensor-parallel", "2", "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "tensor_parallel=2 needs executor 'spmd'" in done.stdout + done.stderr


@pytest.mark.parametrize(("kv_cache_memory", "max_model_len", "streams"),
                         [("64MiB", None, True), ("4MiB", None, False), ("4MiB", 1024, True)])
def test_the_kv_layout_is_streams_when_every_stream_holds_max_model_len(tiny_llama_gguf, kv_cache_memory,
                                                                        max_model_len, streams):
    """``kv_unified`` ``auto`` (the default): a stream per sequence when each of the
    ``max_num_seqs`` streams holds ``max_model_len`` (the model's 2,048 when not given: 64 MiB
    holds 16,384 tokens a stream of this model, 4 MiB 1,024), else the unified cache, so a
    sequence is never capped below what the deployment serves."""
    spec = deployment_spec(tiny_llama_gguf, kv_cache_memory=kv_cache_memory, max_model_len=max_model_len)
    executor = LlamaCppExecutor(spec)
    try:
        assert executor.kv_unified is not streams
        assert executor.n_ctx_seq == (executor.n_ctx // 16 if streams else executor.n_ctx)  # 16 = max_num_seqs
        assert executor.max_model_len == (max_model_len or 2048)
    finally:
        executor.close()


def test_an_instance_gives_large_freed_buffers_back_to_the_system(tiny_llama_gguf):
    """A step's logits and the sampler's work tensors are megabytes each: once the executor is
    made, a freed large buffer leaves the process (glibc would otherwise keep it in its heap
    after a larger one was freed, having raised its mmap threshold)."""
    import numpy as np

    from flowserve_llamacpp_executor.host import unmap_large_buffers_when_freed

    def resident() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    if not unmap_large_buffers_when_freed():
        pytest.skip("not glibc on Linux")
    executor = LlamaCppExecutor(deployment_spec(tiny_llama_gguf))
    try:
        larger = np.ones(2**22, dtype=np.float32)  # 16 MiB, freed: glibc's default raises its threshold
        del larger
        before = resident()
        buffer = np.ones(2**21, dtype=np.float32)  # 8 MiB, touched
        del buffer
        assert resident() - before < 2 * 2**20
    finally:
        executor.close()


async def test_per_sequence_streams_are_exact_and_reuse_prefixes(tiny_llama_gguf):
    """Option ``kv_unified=false`` (llama-server's layout): a stream per sequence, prefixes
    copied whole between streams and cut back; concurrent and repeated requests stay exact."""
    shared = random_prompts(1, [48], 49152, seed=10)[0]
    prompts = [shared + suffix for suffix in random_prompts(4, [1, 5, 20, 33], 49152, seed=11)]
    spec = deployment_spec(tiny_llama_gguf, options={"kv_unified": False})
    async with run_deployment(spec) as runner:
        outputs = await generate_concurrently(runner, prompts, 8)
        again = await runner.generate(prompts[3], max_tokens=8, temperature=0.0, ignore_eos=True)
        executor = runner.engines()[0].executor
        per_sequence = executor.n_ctx_seq
    assert per_sequence == executor.n_ctx // 16  # 16 = max_num_seqs of deployment_spec
    assert again.num_cached_tokens > 0
    for prompt, output in zip(prompts, outputs):
        assert output.output_token_ids == llama_cpp_greedy(tiny_llama_gguf, prompt, 8)
    assert again.output_token_ids == outputs[3].output_token_ids


# ---------------------------------------------------------------------- multi-step decoding (decode_steps)


async def test_multi_step_decoding_is_greedy_exact_against_llama_cpp_in_fewer_steps(tiny_llama_gguf):
    prompts = random_prompts(5, [3, 20, 64, 7, 130], 49152, seed=14)
    async with run_deployment(deployment_spec(tiny_llama_gguf, decode_steps=8)) as runner:
        alone = await runner.generate(prompts[0], max_tokens=30, temperature=0.0, ignore_eos=True)
        steps_alone = runner.engines()[0].stats.steps
        together = await generate_concurrently(runner, prompts, 20)
    # one step for the prompt and first token, then 8 tokens a step (the last one: 29 = 3 × 8 + 5)
    assert steps_alone == 5
    assert alone.output_token_ids == llama_cpp_greedy(tiny_llama_gguf, prompts[0], 30)
    for prompt, output in zip(prompts, together):
        assert output.finish_reason == "length"
        assert output.output_token_ids == llama_cpp_greedy(tiny_llama_gguf, prompt, 20)


async def test_smollm2_multi_step_is_greedy_exact_against_llama_cpp(smollm2):
    async with run_deployment(deployment_spec(smollm2, decode_steps=8)) as runner:
        prompt = runner.tokenizer.encode("The capital of France is")
        output = await runner.generate(prompt, max_tokens=24, temperature=0.0, ignore_eos=True)
    assert output.output_token_ids == llama_cpp_greedy(smollm2, prompt, 24)


async def test_seeded_sampling_penalties_and_logprobs_are_those_of_one_token_a_step(tiny_llama_gguf):
    prompts = random_prompts(3, [5, 17, 40], 49152, seed=15)
    params = dict(max_tokens=16, temperature=0.9, top_p=0.95, seed=7, presence_penalty=0.4,
                  repetition_penalty=1.2, logprobs=2, ignore_eos=True)
    outputs = {}
    for steps in (1, 4):
        async with run_deployment(deployment_spec(tiny_llama_gguf, decode_steps=steps)) as runner:
            outputs[steps] = [await tokens_and_logprobs(runner, p, **params) for p in prompts]
    for (single, single_logprobs), (multi, multi_logprobs) in zip(outputs[1], outputs[4]):
        assert len(multi) == 16 and multi == single
        assert [lp.token_id for lp in multi_logprobs] == multi
        assert [lp.logprob for lp in multi_logprobs] == pytest.approx([lp.logprob for lp in single_logprobs], abs=1e-4)


async def tokens_and_logprobs(runner, prompt: list[int], **params) -> tuple[list[int], list[TokenLogprob]]:
    """One request's output tokens and their logprobs, gathered from its events."""
    request = Request(prompt_token_ids=prompt, params=SamplingParams(**params),
                      eos_token_ids=list(runner.tokenizer.eos_token_ids))
    tokens: list[int] = []
    logprobs: list[TokenLogprob] = []
    async with runner.deployment.open(request) as handle:
        async for event in handle:
            tokens += event.token_ids
            logprobs += event.logprobs or []
    return tokens, logprobs


async def test_a_stop_token_ends_the_rounds_and_the_sequence(tiny_llama_gguf):
    prompt = random_prompts(1, [9], 49152, seed=16)[0]
    expected = llama_cpp_greedy(tiny_llama_gguf, prompt, 12)
    stop = expected[5]
    async with run_deployment(deployment_spec(tiny_llama_gguf, decode_steps=8)) as runner:
        output = await runner.generate(prompt, max_tokens=12, temperature=0.0, stop_token_ids=[stop])
    assert output.finish_reason == "stop"
    assert output.output_token_ids == expected[:expected.index(stop) + 1]


async def test_new_work_ends_a_multi_step_decoding_after_its_round(tiny_llama_gguf):
    spec = deployment_spec(tiny_llama_gguf, kv_cache_memory="64MiB", options={"kv_unified": True})
    executor = LlamaCppExecutor(spec)
    prompt = random_prompts(1, [6], 49152, seed=17)[0]
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    try:
        first = await executor.execute(StepBatch(seqs=[ScheduledSequence(
            seq_id="a", token_ids=prompt, start_pos=0, block_table=[], params=greedy, prompt_token_ids=prompt)]))
        token = first.token_ids["a"]
        decode = ScheduledSequence(seq_id="a", token_ids=[token], start_pos=len(prompt), block_table=[],
                                   params=greedy, prompt_token_ids=prompt, output_token_ids=[token],
                                   decode_steps=3000)  # far longer than the wait below
        async with anyio.create_task_group() as group:
            async def arrive() -> None:
                await anyio.sleep(0.3)
                executor.end_step_early()

            group.start_soon(arrive)
            result = await executor.execute(StepBatch(seqs=[decode]))
    finally:
        executor.close()
    more = result.more_token_ids["a"]
    assert 0 < len(more) < 2999
    assert [token, result.token_ids["a"], *more] == llama_cpp_greedy(tiny_llama_gguf, prompt, len(more) + 2)
