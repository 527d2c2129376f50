"""Issue 20, item 8: degenerate values never make the sampler draw from NaN. Temperatures
below ``GREEDY_TEMPERATURE`` are greedy; rows whose scores hold NaN or +inf (a model that
overflowed, a repetition penalty of almost nothing) are picked greedily from what is finite."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch

from flowserve_core.types import SamplingParams, ScheduledSequence
from flowserve_sampler import GREEDY_TEMPERATURE, Sampler


def _seq(name: str, params: SamplingParams, prompt: list[int] = (0,)) -> ScheduledSequence:
    return ScheduledSequence(seq_id=name, token_ids=[1], start_pos=0, block_table=[0], params=params,
                             prompt_token_ids=list(prompt))


def _tokens(logits: torch.Tensor, seqs: list[ScheduledSequence]) -> list[int]:
    result = Sampler(logits.shape[-1], torch.device("cpu"))(logits, seqs)
    return [result.token_ids[s.seq_id] for s in seqs]


def test_a_temperature_below_the_epsilon_is_greedy():
    # A draw from NaN weights (logits / 1e-300) lands on the last index; the likeliest is the second
    logits = torch.tensor([[1.0, 7.5, -3.0, 4.0, 0.5, 2.0]] * 3)
    seqs = [_seq(f"t{t}", SamplingParams(temperature=t)) for t in (1e-300, 1e-30, GREEDY_TEMPERATURE / 2)]
    for _ in range(20):
        assert _tokens(logits, seqs) == [1, 1, 1]


def test_rows_with_nan_or_inf_are_picked_from_their_finite_scores():
    logits = torch.tensor([
        [float("nan"), 1.0, 3.0, 2.0],            # NaN: the best finite score
        [0.5, float("inf"), 3.0, float("nan")],  # +inf: the token it favours
        [0.1, 0.2, 0.3, 9.0],                    # a healthy row in the same batch still samples
    ])
    seqs = [_seq("nan", SamplingParams(temperature=1.0)), _seq("inf", SamplingParams(temperature=0.8, top_p=0.9)),
            _seq("ok", SamplingParams(temperature=0.01, seed=3))]
    assert _tokens(logits, seqs) == [2, 1, 3]


def test_a_repetition_penalty_of_almost_nothing_samples_a_real_token():
    # 2.0 / 1e-300 overflows to +inf and -1.0 * 1e-300 to -0.0: the penalised token wins
    # greedily instead of a NaN draw picking an arbitrary index
    logits = torch.tensor([[2.0, 5.0, -1.0, 3.0]] * 2)
    seqs = [_seq("sampled", SamplingParams(temperature=1.0, repetition_penalty=1e-300), prompt=[0, 2]),
            _seq("greedy", SamplingParams(temperature=0.0, repetition_penalty=1e-300), prompt=[0, 2])]
    assert _tokens(logits, seqs) == [0, 0]


def test_plain_greedy_rows_on_the_cpu_pick_what_torch_argmax_picks_and_degenerate_rows_still_work():
    # All rows plain greedy: the numpy path (ties go to the first maximum, as torch's argmax)
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 1000, generator=generator)
    logits[2, 10] = logits[2, 20] = logits[2].max() + 1.0  # a tie
    seqs = [_seq(f"g{i}", SamplingParams(temperature=0.0)) for i in range(6)]
    assert _tokens(logits, seqs) == logits.argmax(dim=-1).tolist()
    assert _tokens(logits, seqs)[2] == 10
    # A NaN or +inf in a plain greedy batch: the general path reads NaN as -inf, +inf as huge
    degenerate = torch.tensor([[float("nan"), 1.0, 3.0, 2.0], [0.5, float("inf"), 3.0, 1.0]])
    assert _tokens(degenerate, [_seq("nan", SamplingParams(temperature=0.0)),
                                _seq("inf", SamplingParams(temperature=0.0))]) == [2, 1]
    # min_tokens not reached: the stop tokens are masked, so the plain path is not taken
    masked = ScheduledSequence(seq_id="m", token_ids=[1], start_pos=0, block_table=[0], prompt_token_ids=[0],
                               params=SamplingParams(temperature=0.0, min_tokens=2), eos_token_ids=[3])
    assert _tokens(torch.tensor([[0.0, 1.0, 2.0, 9.0]]), [masked]) == [2]


def test_min_tokens_with_nothing_to_mask_keeps_the_plain_greedy_path():
    # ignore_eos and no stop_token_ids (what flowserve bench asks with min_tokens): min_tokens
    # masks nothing, so the numpy path picks, and the end-of-sequence token may win
    sampler = Sampler(4, torch.device("cpu"))
    logits = np.array([[0.0, 1.0, 2.0, 9.0]], dtype=np.float32)
    unmasked = ScheduledSequence(seq_id="u", token_ids=[1], start_pos=0, block_table=[0], prompt_token_ids=[0],
                                 params=SamplingParams(temperature=0.0, min_tokens=5, ignore_eos=True),
                                 eos_token_ids=[3])
    assert sampler.greedy(logits, [unmasked]).token_ids == {"u": 3}
    assert _tokens(torch.from_numpy(logits), [unmasked]) == [3]
    # a stop token id is still masked until min_tokens: not plain greedy, the general path masks it
    stopped = msgspec.structs.replace(unmasked, params=SamplingParams(temperature=0.0, min_tokens=5, ignore_eos=True,
                                                                      stop_token_ids=[3]))
    assert sampler.greedy(logits, [stopped]) is None
    assert _tokens(torch.from_numpy(logits), [stopped]) == [2]


def test_the_numpy_greedy_path_leaves_nan_and_inf_rows_and_sampled_rows_to_the_general_path():
    sampler = Sampler(4, torch.device("cpu"))
    plain = [_seq("a", SamplingParams(temperature=0.0)), _seq("b", SamplingParams(temperature=0.0))]
    healthy = np.array([[0.0, 5.0, 5.0, 1.0], [-np.inf, -np.inf, -np.inf, -np.inf]], dtype=np.float32)
    assert sampler.greedy(healthy, plain).token_ids == {"a": 1, "b": 0}  # first maximum, as torch's argmax
    for bad in (np.nan, np.inf):
        rows = healthy.copy()
        rows[1, 2] = bad
        assert sampler.greedy(rows, plain) is None
    assert sampler.greedy(healthy, [plain[0], _seq("t", SamplingParams(temperature=0.7))]) is None
    assert sampler.greedy(healthy, [plain[0], _seq("l", SamplingParams(temperature=0.0, logprobs=1))]) is None
    with pytest.raises(ValueError, match="1 rows of logits for 2 sequences"):  # never a token silently missing
        sampler.greedy(healthy[:1], plain)
