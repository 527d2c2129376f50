"""Sampling on the device, per sequence, vectorised over the batch (rank 0 only).

Order, as in HF and vLLM: repetition penalty (prompt + output, HF semantics: positive
logits divided, negative multiplied), frequency and presence penalties (output tokens,
OpenAI semantics), ``min_tokens`` (end-of-sequence and stop token ids masked until
reached), then greedy (temperature 0 or top-k 1) or temperature → top-k → top-p → min-p →
a categorical draw. Draws use the "exponential race" (argmax of ``p / E``, ``E ~ Exp(1)``);
a request with a ``seed`` draws its noise from its own ``torch.Generator``, so its tokens
do not depend on what else is in the batch. Logprobs are the log-softmax of the raw logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flowserve_core.types import ScheduledSequence, StepResult, TokenLogprob, TopLogprob

_NEG_INF = float("-inf")


class Sampler:
    """Turns logits into tokens; keeps one seeded generator per sequence that asked for one."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = device
        self.generators: dict[str, torch.Generator] = {}

    def forget(self, seq_ids: Sequence[str]) -> None:
        """Drop the state of sequences that finished."""
        for seq_id in seq_ids:
            self.generators.pop(seq_id, None)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[ScheduledSequence]) -> StepResult:
        """Sample one token for each row of ``logits [len(seqs), vocab]``."""
        raw = logits.float()
        scores = self._apply_penalties(raw, seqs)
        tokens = torch.empty(len(seqs), dtype=torch.long, device=raw.device)
        greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if len(greedy) == len(seqs):
            tokens = scores.argmax(dim=-1)
        else:
            if greedy:
                rows = self._index(greedy)
                tokens[rows] = scores.index_select(0, rows).argmax(dim=-1)
            rows = self._index(sampled)
            tokens[rows] = self._draw(scores.index_select(0, rows), [seqs[i] for i in sampled])
        token_list = tokens.tolist()
        result = StepResult(token_ids={s.seq_id: t for s, t in zip(seqs, token_list)})
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if wanted:
            result.logprobs = self._logprobs(raw, tokens, seqs, wanted)
        return result

    def _index(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _apply_penalties(self, raw: torch.Tensor, seqs: list[ScheduledSequence]) -> torch.Tensor:
        vocab = raw.shape[-1]
        repetition = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
        additive = [i for i, s in enumerate(seqs)
                    if s.params.presence_penalty != 0.0 or s.params.frequency_penalty != 0.0]
        banned = [(i, self._banned_ids(s)) for i, s in enumerate(seqs)
                  if len(s.output_token_ids) < s.params.min_tokens]
        banned = [(i, ids) for i, ids in banned if ids]
        if not (repetition or additive or banned):
            return raw
        scores = raw.clone()
        if repetition:
            rows = self._index(repetition)
            histories = [seqs[i].prompt_token_ids + seqs[i].output_token_ids for i in repetition]
            seen = self._counts(histories, vocab) > 0
            penalty = torch.tensor([seqs[i].params.repetition_penalty for i in repetition],
                                   device=raw.device).unsqueeze(1)
            values = scores.index_select(0, rows)
            penalised = torch.where(values < 0, values * penalty, values / penalty)
            scores.index_copy_(0, rows, torch.where(seen, penalised, values))
        if additive:
            rows = self._index(additive)
            counts = self._counts([seqs[i].output_token_ids for i in additive], vocab)
            frequency = torch.tensor([seqs[i].params.frequency_penalty for i in additive], device=raw.device)
            presence = torch.tensor([seqs[i].params.presence_penalty for i in additive], device=raw.device)
            values = scores.index_select(0, rows)
            values = values - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0)
            scores.index_copy_(0, rows, values)
        for row, ids in banned:
            scores[row, ids] = _NEG_INF
        return scores

    def _banned_ids(self, seq: ScheduledSequence) -> list[int]:
        ids = list(seq.params.stop_token_ids)
        if not seq.params.ignore_eos:
            ids += seq.eos_token_ids
        return [i for i in dict.fromkeys(ids) if 0 <= i < self.vocab_size]

    def _counts(self, histories: list[list[int]], vocab: int) -> torch.Tensor:
        """``[len(histories), vocab]`` float counts of each token id in each history."""
        width = max(1, max(len(h) for h in histories))
        # Padding points at an extra column that is dropped afterwards.
        ids = torch.tensor([h + [vocab] * (width - len(h)) for h in histories], dtype=torch.long,
                           device=self.device).clamp_(0, vocab)
        counts = torch.zeros(len(histories), vocab + 1, device=self.device)
        counts.scatter_add_(1, ids, torch.ones(ids.shape, device=self.device))
        return counts[:, :vocab]

    def _draw(self, scores: torch.Tensor, seqs: list[ScheduledSequence]) -> torch.Tensor:
        params = [s.params for s in seqs]
        scores = scores / torch.tensor([p.temperature for p in params], device=scores.device).unsqueeze(1)
        vocab = scores.shape[-1]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
            ordered, order = scores.sort(dim=-1, descending=True)
            if any(k < vocab for k in top_k):
                ranks = torch.arange(vocab, device=scores.device)
                limit = torch.tensor(top_k, device=scores.device).unsqueeze(1)
                ordered = ordered.masked_fill(ranks.unsqueeze(0) >= limit, _NEG_INF)
            if any(p < 1.0 for p in top_p):
                probs = ordered.softmax(dim=-1)
                before = probs.cumsum(dim=-1) - probs  # mass of the better tokens; the top one stays
                limit = torch.tensor(top_p, device=scores.device).unsqueeze(1)
                ordered = ordered.masked_fill(before > limit, _NEG_INF)
            scores = torch.full_like(scores, _NEG_INF).scatter_(1, order, ordered)
        min_p = [p.min_p for p in params]
        if any(m > 0 for m in min_p):
            probs = scores.softmax(dim=-1)
            floor = torch.tensor(min_p, device=scores.device).unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
            scores = scores.masked_fill(probs < floor, _NEG_INF)
        probs = scores.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for row, seq in enumerate(seqs):
            if seq.params.seed is not None:
                noise[row].exponential_(generator=self._generator(seq))
        return (probs / noise).argmax(dim=-1)

    def _generator(self, seq: ScheduledSequence) -> torch.Generator:
        generator = self.generators.get(seq.seq_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(seq.params.seed) & 0xFFFF_FFFF_FFFF_FFFF)
            self.generators[seq.seq_id] = generator
        return generator

    def _logprobs(self, raw: torch.Tensor, tokens: torch.Tensor, seqs: list[ScheduledSequence],
                  wanted: list[int]) -> dict[str, TokenLogprob]:
        rows = self._index(wanted)
        logprobs = torch.log_softmax(raw.index_select(0, rows), dim=-1)
        chosen = logprobs.gather(1, tokens.index_select(0, rows).unsqueeze(1)).squeeze(1).tolist()
        chosen_ids = tokens.index_select(0, rows).tolist()
        most = max(seqs[i].params.logprobs or 0 for i in wanted)
        top_values: list[list[float]] = [[] for _ in wanted]
        top_ids: list[list[int]] = [[] for _ in wanted]
        if most:
            values, ids = logprobs.topk(most, dim=-1)
            top_values, top_ids = values.tolist(), ids.tolist()
        out: dict[str, TokenLogprob] = {}
        for j, i in enumerate(wanted):
            n = seqs[i].params.logprobs or 0
            top = [TopLogprob(token_id=t, logprob=v) for t, v in zip(top_ids[j][:n], top_values[j][:n])]
            out[seqs[i].seq_id] = TokenLogprob(token_id=chosen_ids[j], logprob=chosen[j], top=top)
        return out
