"""Structured output in the shared sampler, with a backend written here (a fixed list of allowed
tokens per position): the mask decides greedy and sampled draws, matchers follow the outputs the
scheduler reports, ``prepare``'s background work is used when it matches the step, and a ban that
leaves a constrained row nothing (``min_tokens`` against a complete grammar) yields to the grammar."""

from __future__ import annotations

import torch

from flowserve_core.types import SamplingParams, ScheduledSequence, StructuredOutput
from flowserve_sampler import Sampler, allowed_tokens, fill_from_ids

VOCAB = 70  # not a multiple of 32: the last bitmask word is partly padding


class Positional:
    """Allows ``steps[i]`` at output position ``i``, then only end-of-sequence."""

    def __init__(self, steps, eos):
        self.steps, self.eos, self.seen = steps, eos, []

    def accept_token(self, token_id):
        ok = token_id in self._allowed()
        self.seen.append(token_id)
        return ok

    def _allowed(self):
        return self.steps[len(self.seen)] if len(self.seen) < len(self.steps) else self.eos

    def fill_bitmask(self, bitmask, row):
        fill_from_ids(bitmask, row, self._allowed())

    def is_terminated(self):
        return len(self.seen) > len(self.steps)


class Backend:
    """``choice`` constraints whose strings are comma-separated token ids per position."""

    def __init__(self):
        self.made = 0

    def check(self, constraint):
        pass

    def matcher(self, constraint, vocab_size, eos_token_ids):
        self.made += 1
        return Positional([[int(t) for t in c.split(",")] for c in constraint.choice], list(eos_token_ids))


def _seq(seq_id, outputs=(), choice=None, **params):
    constraint = StructuredOutput(choice=choice) if choice else None
    return ScheduledSequence(seq_id=seq_id, token_ids=[1], start_pos=0, block_table=[0], prompt_token_ids=[5],
                             output_token_ids=list(outputs), eos_token_ids=[0],
                             params=SamplingParams(structured_output=constraint, **params))


def test_bitmask_packing_round_trips_including_the_last_partial_word():
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    fill_from_ids(bitmask, 1, [0, 31, 32, 63, 69])
    allowed = allowed_tokens(bitmask, VOCAB)
    assert allowed.shape == (2, VOCAB) and not allowed[0].any()
    assert allowed[1].nonzero().flatten().tolist() == [0, 31, 32, 63, 69]


def test_the_mask_decides_greedy_and_sampled_tokens_and_follows_the_outputs():
    backend = Backend()
    sampler = Sampler(VOCAB, torch.device("cpu"), lambda: backend)
    logits = torch.randn(3, VOCAB)
    logits[:, 7] = 50.0  # what an unconstrained row picks
    choice = ["40,41", "9", "3"]
    seqs = [_seq("greedy", choice=choice, temperature=0), _seq("free", temperature=0),
            _seq("hot", choice=choice, temperature=1.5, seed=1)]
    result = sampler(logits, seqs)
    assert result.token_ids["greedy"] in (40, 41) and result.token_ids["hot"] in (40, 41)
    assert result.token_ids["free"] == 7
    # the next step: the scheduler reports the sampled tokens as outputs; matchers accept them
    seqs = [_seq("greedy", [result.token_ids["greedy"]], choice=choice, temperature=0),
            _seq("hot", [result.token_ids["hot"]], choice=choice, temperature=1.5, seed=1)]
    sampler.prepare(seqs)  # the background fill is what the step then uses
    assert sampler(logits[:2], seqs).token_ids == {"greedy": 9, "hot": 9}
    assert backend.made == 2
    done = [_seq("greedy", [40, 9, 3], choice=choice, temperature=0)]
    assert sampler(logits[:1], done).token_ids == {"greedy": 0}  # complete: end-of-sequence only
    sampler.forget(["greedy", "hot"])
    assert not sampler.constraints.matched


def test_a_grammar_that_must_end_wins_over_min_tokens():
    sampler = Sampler(VOCAB, torch.device("cpu"), Backend)
    seq = _seq("s", [12], choice=["12"], temperature=0, min_tokens=5, max_tokens=10)
    logits = torch.zeros(1, VOCAB)
    # the scheduler bans end-of-sequence until min_tokens; the grammar allows nothing else
    assert sampler(logits, [seq]).token_ids == {"s": 0}


def test_a_broken_backend_leaves_the_sequence_unconstrained():
    def broken():
        raise RuntimeError("no tokenizer here")

    sampler = Sampler(VOCAB, torch.device("cpu"), broken)
    logits = torch.zeros(1, VOCAB)
    logits[0, 7] = 9.0
    assert sampler(logits, [_seq("s", choice=["40"], temperature=0)]).token_ids == {"s": 7}
