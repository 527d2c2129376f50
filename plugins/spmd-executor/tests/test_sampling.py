"""Sampling: seeds reproduce regardless of the batch, logprobs equal HF's log-softmax,
penalties follow HF (repetition) and OpenAI (presence, frequency) semantics, min_tokens
holds back end-of-sequence, and the filters keep the distribution they promise."""

from __future__ import annotations

import math

import msgspec
import pytest
import torch
from spmd_helpers import Driver, hf_greedy, random_prompt

from flowserve_core.types import DeploymentSpec, SamplingParams, ScheduledSequence
from flowserve_sampler import Sampler
from flowserve_spmd_executor.executor import SpmdExecutor

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def llama(tiny_llama):
    executor = SpmdExecutor(DeploymentSpec(model=str(tiny_llama), dtype="float32", device="cpu",
                                           kv_cache_memory="4MiB", block_size=16))
    yield executor
    executor.close()


SEEDED = SamplingParams(temperature=1.3, top_k=40, top_p=0.95, seed=1234, max_tokens=16)


async def _sample_alone(executor, prompt, params, seq_id, first_block=0):
    driver = Driver(executor, first_block=first_block)
    driver.add(seq_id, prompt, max_tokens=16, params=params)
    return (await driver.run())[seq_id]


async def test_seeded_sampling_reproduces_across_runs_and_batch_compositions(llama, hf_llama):
    prompt = random_prompt(30, seed=7)
    alone = await _sample_alone(llama, prompt, SEEDED, "alone")
    assert "alone" not in llama.sampler.generators  # finished sequences drop their generator
    again = await _sample_alone(llama, prompt, SEEDED, "again", first_block=100)
    driver = Driver(llama)
    driver.add("other", random_prompt(80, seed=8), max_tokens=16,
               params=SamplingParams(temperature=0.7, seed=99, max_tokens=16))
    driver.add("unseeded", random_prompt(5, seed=9), max_tokens=16, params=SamplingParams(max_tokens=16))
    driver.add("greedy", random_prompt(12, seed=10), max_tokens=16, params=SamplingParams(temperature=0))
    await driver.step()
    driver.add("crowded", prompt, max_tokens=16, params=SEEDED)  # joins later, beside other requests
    crowded = (await driver.run(chunk=7))["crowded"]
    assert alone == again == crowded
    other_seed = await _sample_alone(llama, prompt, msgspec.structs.replace(SEEDED, seed=4321), "other-seed")
    assert other_seed != alone
    assert alone != hf_greedy(hf_llama, prompt, 16)  # it really sampled


async def test_logprobs_equal_hf_log_softmax(llama, hf_llama):
    prompt = random_prompt(25, seed=3)
    driver = Driver(llama)
    seq = driver.add("x", prompt, max_tokens=8, params=SamplingParams(temperature=0, logprobs=3))
    driver.add("plain", prompt, max_tokens=8)  # asks for none
    await driver.run()
    assert len(driver.seqs["plain"].logprobs) == 0
    with torch.no_grad():
        logits = hf_llama(torch.tensor([prompt + seq.output[:-1]])).logits[0, len(prompt) - 1:]
    expected = torch.log_softmax(logits.float(), dim=-1)
    assert len(seq.logprobs) == 8
    for step, (token, entry) in enumerate(zip(seq.output, seq.logprobs)):
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(expected[step, token].item(), abs=1e-4)
        values, ids = expected[step].topk(3)
        assert [t.token_id for t in entry.top] == ids.tolist()
        assert [t.logprob for t in entry.top] == pytest.approx(values.tolist(), abs=1e-4)


async def test_repetition_penalty_matches_hf(llama, hf_llama):
    prompt = random_prompt(20, seed=4)
    driver = Driver(llama)
    driver.add("x", prompt, max_tokens=24, params=SamplingParams(temperature=0, repetition_penalty=1.8))
    outputs = await driver.run()
    assert outputs["x"] == hf_greedy(hf_llama, prompt, 24, repetition_penalty=1.8)
    assert outputs["x"] != hf_greedy(hf_llama, prompt, 24)  # the penalty changed something


def _seq(params: SamplingParams, output: list[int] = (), prompt: list[int] = (0,), eos: list[int] = ()):
    return ScheduledSequence(seq_id=f"s{id(params)}-{len(output)}", token_ids=[1], start_pos=0, block_table=[0],
                             params=params, prompt_token_ids=list(prompt), output_token_ids=list(output),
                             eos_token_ids=list(eos))


def test_presence_and_frequency_penalties_lower_repeated_output_tokens():
    sampler = Sampler(6, torch.device("cpu"))
    logits = torch.tensor([[2.0, 1.9, 1.0, 0.0, 0.0, 0.0]] * 4)
    seqs = [
        _seq(SamplingParams(temperature=0), output=[0, 0]),
        _seq(SamplingParams(temperature=0, frequency_penalty=0.06), output=[0, 0]),  # 2.0 - 0.12 < 1.9
        _seq(SamplingParams(temperature=0, presence_penalty=0.15), output=[0, 0, 0]),  # 2.0 - 0.15
        _seq(SamplingParams(temperature=0, frequency_penalty=0.04), output=[0], prompt=[0, 0, 0]),  # prompt ignored
    ]
    result = sampler(logits, seqs)
    assert [result.token_ids[s.seq_id] for s in seqs] == [0, 1, 1, 0]


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached():
    sampler = Sampler(5, torch.device("cpu"))
    logits = torch.tensor([[0.0, 1.0, 2.0, 5.0, 4.0]] * 4)
    seqs = [
        _seq(SamplingParams(temperature=0, min_tokens=2), output=[1], eos=[3]),
        _seq(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[4]), output=[1], eos=[3]),
        _seq(SamplingParams(temperature=0, min_tokens=2), output=[1, 1], eos=[3]),  # reached
        _seq(SamplingParams(temperature=0, min_tokens=2, ignore_eos=True), output=[1], eos=[3]),
    ]
    result = sampler(logits, seqs)
    assert [result.token_ids[s.seq_id] for s in seqs] == [4, 2, 3, 3]


def test_sampling_follows_the_filtered_distribution():
    sampler = Sampler(4, torch.device("cpu"))
    torch.manual_seed(0)
    rows = 4000
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).repeat(rows, 1)

    def frequencies(params: SamplingParams) -> list[float]:
        result = sampler(logits, [ScheduledSequence(seq_id=str(i), token_ids=[1], start_pos=0, block_table=[0],
                                                    params=params) for i in range(rows)])
        counts = torch.bincount(torch.tensor(list(result.token_ids.values())), minlength=4).float()
        return (counts / rows).tolist()

    assert frequencies(SamplingParams(temperature=1.0)) == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=0.03)
    assert frequencies(SamplingParams(temperature=1.0, top_k=2)) == pytest.approx([0, 0, 3 / 7, 4 / 7], abs=0.03)
    assert frequencies(SamplingParams(temperature=1.0, top_p=0.65)) == pytest.approx([0, 0, 3 / 7, 4 / 7], abs=0.03)
    assert frequencies(SamplingParams(temperature=1.0, min_p=0.6)) == pytest.approx([0, 0, 3 / 7, 4 / 7], abs=0.03)
    hot = [math.exp(math.log(p) / 2) for p in (0.1, 0.2, 0.3, 0.4)]
    assert frequencies(SamplingParams(temperature=2.0)) == pytest.approx([h / sum(hot) for h in hot], abs=0.03)
    assert frequencies(SamplingParams(temperature=1.0, top_k=1)) == [0, 0, 0, 1]


def test_a_nucleus_wider_than_the_candidates_is_still_exact():
    from flowserve_sampler import TOP_P_CANDIDATES

    vocab, rows = 2000, 600
    sampler = Sampler(vocab, torch.device("cpu"))
    torch.manual_seed(1)
    logits = (-torch.arange(vocab, dtype=torch.float32) / 1000).repeat(rows, 1)
    seqs = [ScheduledSequence(seq_id=str(i), token_ids=[1], start_pos=0, block_table=[0],
                              params=SamplingParams(temperature=1.0, top_p=0.9)) for i in range(rows)]
    drawn = torch.tensor(list(sampler(logits, seqs).token_ids.values()))
    probs = torch.softmax(logits[0], -1)
    nucleus = int(((probs.cumsum(0) - probs) < 0.9).sum())  # about 1500 tokens
    assert nucleus > TOP_P_CANDIDATES
    assert int(drawn.max()) < nucleus
    assert int((drawn >= TOP_P_CANDIDATES).sum()) > rows // 20  # drawn beyond the candidates


def test_top_k_and_top_p_together_renormalise_within_top_k():
    sampler = Sampler(5, torch.device("cpu"))
    torch.manual_seed(2)
    rows = 3000
    logits = torch.log(torch.tensor([0.05, 0.15, 0.2, 0.25, 0.35])).repeat(rows, 1)
    seqs = [ScheduledSequence(seq_id=str(i), token_ids=[1], start_pos=0, block_table=[0],
                              params=SamplingParams(temperature=1.0, top_k=3, top_p=0.5)) for i in range(rows)]
    counts = torch.bincount(torch.tensor(list(sampler(logits, seqs).token_ids.values())), minlength=5)
    # top-3 = {4: .35, 3: .25, 2: .2} renormalised to .4375/.3125/.25; top-p 0.5 keeps 4 and 3
    assert (counts / rows).tolist() == pytest.approx([0, 0, 0, 0.3125 / 0.75, 0.4375 / 0.75], abs=0.03)
