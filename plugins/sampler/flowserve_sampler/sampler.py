"""Sampling, per sequence, vectorised over the batch, on the device the logits are on.

Order, as in HF and vLLM: repetition penalty (prompt + output, HF semantics: positive
logits divided, negative multiplied), frequency and presence penalties (output tokens,
OpenAI semantics), ``logit_bias`` (added to the logits), ``min_tokens`` (end-of-sequence
and stop token ids masked until reached), the structured-output mask (``constraints.py``),
then greedy (temperature below ``GREEDY_TEMPERATURE`` or top-k 1) or temperature →
top-k → top-p → min-p → one draw. Logprobs are the log-softmax of the raw logits.

Degenerate values never reach a draw: a row whose scores hold NaN or +inf (a model that
overflowed, a penalty that divided by almost nothing) has NaN read as -inf and +inf as a huge
finite score, and is picked greedily; a draw never sees a NaN probability.

Cost matters at a 49k vocabulary on a CPU: penalties touch only the history's token ids,
top-k and top-p work on a ``topk`` of candidates instead of sorting the vocabulary (a row
whose nucleus is wider than the candidates falls back to a full sort), and a draw is one
uniform number per row against the cumulative weights (inverse CDF). A request with a
``seed`` takes that number from its own ``torch.Generator``, so its tokens do not depend on
what else is in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from flowserve_core.types import SamplingParams, ScheduledSequence, StepResult, TokenLogprob, TopLogprob
from flowserve_sampler.constraints import BackendFactory, Constraints, apply_masks

_NEG_INF = float("-inf")
#: Temperatures below this are greedy: dividing logits by less overflows to inf, then NaN.
GREEDY_TEMPERATURE = 1e-5
#: What +inf scores become: finite, and still finite after division by GREEDY_TEMPERATURE.
_HUGE = 1e30
#: Candidates examined for top-p when a row sets no top-k (enough for any usual nucleus).
TOP_P_CANDIDATES = 1024


class Sampler:
    """Turns logits into tokens; keeps one seeded generator per sequence that asked for one,
    and a grammar matcher per sequence with a structured-output constraint (``constraints.py``:
    ``structured_output`` builds the deployment's backend when one first comes)."""

    def __init__(self, vocab_size: int, device: torch.device, structured_output: BackendFactory | None = None):
        self.vocab_size = vocab_size
        self.device = device
        self.generators: dict[str, torch.Generator] = {}
        self.constraints = Constraints(structured_output, vocab_size, device)

    def forget(self, seq_ids: Sequence[str]) -> None:
        """Drop the state of sequences that finished."""
        for seq_id in seq_ids:
            self.generators.pop(seq_id, None)
        self.constraints.forget(seq_ids)

    def prepare(self, seqs: list[ScheduledSequence]) -> None:
        """Before the model step: start computing the structured-output masks of ``seqs`` (the
        rows the step will sample) in a background thread, so they overlap the model's work."""
        self.constraints.prepare(seqs)

    def __call__(self, logits: torch.Tensor | np.ndarray, seqs: list[ScheduledSequence]) -> StepResult:
        """Sample one token for each row of ``logits [len(seqs), vocab]``: a tensor, or a numpy
        array (an executor that computes on the CPU need not make a tensor of it)."""
        if isinstance(logits, np.ndarray):
            array: np.ndarray | None = logits
        else:
            array = logits.detach().numpy() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
        if array is not None and (result := self.greedy(array, seqs)) is not None:
            return result
        return self._sample(torch.from_numpy(logits) if isinstance(logits, np.ndarray) else logits, seqs)

    def greedy(self, logits: np.ndarray, seqs: list[ScheduledSequence]) -> StepResult | None:
        """The tokens, when every row of ``logits`` (float32 on the CPU) is plain greedy: each
        row's first maximum, as ``torch.argmax`` picks it. None when a row is not plain greedy
        or holds NaN or +inf (the sampler's general path handles those).

        Numpy rather than torch, and as few calls as can be: on a CPU a decode step streams the
        weights through every cache, and each library call after it runs cold (measured after a
        SmolLM2 decode step of one sequence: this about 60 µs, the torch path about 250 µs, of a
        9–10 ms step)."""
        if len(logits) != len(seqs):
            raise ValueError(f"{len(logits)} rows of logits for {len(seqs)} sequences")
        if not all(map(self._plain_greedy, seqs)):
            return None
        best = logits.argmax(axis=-1).tolist()
        for row, token in enumerate(best):
            value = float(logits[row, token])  # numpy's argmax picks a row's first NaN, else its +inf
            if math.isnan(value) or value == math.inf:
                return None
        return StepResult(token_ids={s.seq_id: t for s, t in zip(seqs, best)})

    @torch.inference_mode()
    def _sample(self, logits: torch.Tensor, seqs: list[ScheduledSequence]) -> StepResult:
        raw = logits.float()
        scores = self._apply_penalties(raw, seqs)
        if (masks := self.constraints.masks(seqs)) is not None:
            scores = scores.clone() if scores is raw else scores
            apply_masks(scores, raw, *masks)
        scores, broken = _finite(scores)
        greedy = [i for i, s in enumerate(seqs) if _is_greedy(s.params) or i in broken]
        if len(greedy) == len(seqs):
            tokens = scores.argmax(dim=-1)
        else:
            tokens = torch.empty(len(seqs), dtype=torch.long, device=raw.device)
            if greedy:
                rows = self._index(greedy)
                tokens[rows] = scores.index_select(0, rows).argmax(dim=-1)
            chosen = set(greedy)
            sampled = [i for i in range(len(seqs)) if i not in chosen]
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

    # ------------------------------------------------------------------ penalties

    def _apply_penalties(self, raw: torch.Tensor, seqs: list[ScheduledSequence]) -> torch.Tensor:
        repetition = [(i, s.prompt_token_ids + s.output_token_ids) for i, s in enumerate(seqs)
                      if s.params.repetition_penalty != 1.0]
        presence = [(i, s.output_token_ids) for i, s in enumerate(seqs)
                    if s.params.presence_penalty != 0.0 and s.output_token_ids]
        frequency = [(i, s.output_token_ids) for i, s in enumerate(seqs)
                     if s.params.frequency_penalty != 0.0 and s.output_token_ids]
        banned = [(i, ids) for i, s in enumerate(seqs)
                  if len(s.output_token_ids) < s.params.min_tokens and (ids := self._banned_ids(s))]
        repetition = [(i, h) for i, h in repetition if h]
        biased = [(i, s.params.logit_bias) for i, s in enumerate(seqs) if s.params.logit_bias]
        if not (repetition or presence or frequency or banned or biased):
            return raw
        scores = raw.clone()
        flat = scores.view(-1)
        if repetition:  # each distinct token once: duplicates gather and write the same value
            index, _ = self._flat_ids(repetition, scores.shape[-1])
            values = flat.gather(0, index)
            penalty = self._per_token([seqs[i].params.repetition_penalty for i, _ in repetition], repetition)
            flat.scatter_(0, index, torch.where(values < 0, values * penalty, values / penalty))
        if presence:
            index, _ = self._flat_ids(presence, scores.shape[-1])
            penalty = self._per_token([seqs[i].params.presence_penalty for i, _ in presence], presence)
            flat.scatter_(0, index, flat.gather(0, index) - penalty)
        if frequency:  # once per occurrence
            index, real = self._flat_ids(frequency, scores.shape[-1])
            penalty = self._per_token([seqs[i].params.frequency_penalty for i, _ in frequency], frequency)
            flat.scatter_add_(0, index, -penalty * real)
        for row, bias in biased:  # OpenAI's logit_bias: added to the logits, after the penalties
            ids = [t for t in bias if 0 <= t < self.vocab_size]
            if ids:
                index = torch.tensor(ids, dtype=torch.long, device=scores.device)
                scores[row].index_add_(0, index, torch.tensor([bias[t] for t in ids], device=scores.device))
        for row, ids in banned:
            scores[row, ids] = _NEG_INF
        return scores

    def _flat_ids(self, rows: list[tuple[int, list[int]]], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indexes ``row * vocab + token`` of each row's tokens, padded by repeating the
        row's first token, and a 1/0 mask telling real entries from padding."""
        width = max(len(ids) for _, ids in rows)
        index = [[row * vocab + t for t in ids] + [row * vocab + ids[0]] * (width - len(ids)) for row, ids in rows]
        real = [[1.0] * len(ids) + [0.0] * (width - len(ids)) for _, ids in rows]
        return (torch.tensor(index, dtype=torch.long, device=self.device).view(-1),
                torch.tensor(real, device=self.device).view(-1))

    def _per_token(self, values: list[float], rows: list[tuple[int, list[int]]]) -> torch.Tensor:
        width = max(len(ids) for _, ids in rows)
        return torch.tensor(values, device=self.device).repeat_interleave(width)

    def _plain_greedy(self, seq: ScheduledSequence) -> bool:
        """Greedy with nothing that changes the scores or asks for more than the token: no
        penalty, bias, structured output or logprobs, and no token masked by ``min_tokens``
        (none is with ``ignore_eos`` and no ``stop_token_ids``, as benchmarks ask)."""
        params = seq.params
        return (_is_greedy(params) and params.logprobs is None and params.structured_output is None
                and params.repetition_penalty == 1.0 and params.presence_penalty == 0.0
                and params.frequency_penalty == 0.0 and not params.logit_bias
                and (len(seq.output_token_ids) >= params.min_tokens or not self._banned_ids(seq)))

    def _banned_ids(self, seq: ScheduledSequence) -> list[int]:
        ids = list(seq.params.stop_token_ids)
        if not seq.params.ignore_eos:
            ids += seq.eos_token_ids
        return [i for i in dict.fromkeys(ids) if 0 <= i < self.vocab_size]

    # ------------------------------------------------------------------ drawing

    def _draw(self, scores: torch.Tensor, seqs: list[ScheduledSequence]) -> torch.Tensor:
        """One token per row of ``scores`` (penalised logits of non-greedy sequences)."""
        params = [s.params for s in seqs]
        vocab = scores.shape[-1]
        temperature = torch.tensor([p.temperature for p in params], device=scores.device).unsqueeze(1)
        probs = torch.softmax(scores / temperature, dim=-1).nan_to_num_(nan=0.0)  # a row of -inf only
        uniforms = self._uniforms(seqs)
        tokens = torch.empty(len(seqs), dtype=torch.long, device=scores.device)
        filtered = [i for i, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1.0]
        plain = sorted(set(range(len(params))) - set(filtered))
        if plain:
            rows = self._index(plain)
            weights = probs.index_select(0, rows)
            _min_p(weights, [params[i] for i in plain], weights.amax(dim=-1, keepdim=True))
            tokens[rows] = _inverse_cdf(weights, uniforms.index_select(0, rows))
        if filtered:
            rows = self._index(filtered)
            tokens[rows] = self._draw_filtered(probs.index_select(0, rows), [params[i] for i in filtered],
                                               uniforms.index_select(0, rows))
        return tokens

    def _draw_filtered(self, probs: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor
                       ) -> torch.Tensor:
        """Top-k / top-p / min-p over the best candidates, in descending order."""
        vocab = probs.shape[-1]
        top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        width = min(vocab, max([k for k in top_k if k] + ([TOP_P_CANDIDATES] if not all(top_k) else [])))
        values, ids = probs.topk(width, dim=-1)
        ranks = torch.arange(width, device=probs.device).unsqueeze(0)
        limit = torch.tensor([k or width for k in top_k], device=probs.device).unsqueeze(1)
        values = values.masked_fill(ranks >= limit, 0.0)
        cumulative = values.cumsum(dim=-1)
        # Top-p is relative to what top-k kept (all the vocabulary when no top-k: mass 1).
        kept = torch.where(torch.tensor([k > 0 for k in top_k], device=probs.device),
                           cumulative[:, -1], torch.ones_like(cumulative[:, -1])).unsqueeze(1)
        top_p = torch.tensor([p.top_p for p in params], device=probs.device).unsqueeze(1)
        wide = ((cumulative[:, -1:] < top_p * kept) & (limit >= width)).squeeze(1)
        values = values.masked_fill(cumulative - values >= top_p * kept, 0.0)  # the best one stays
        _min_p(values, params, values[:, :1])
        tokens = ids.gather(1, _inverse_cdf(values, uniforms).unsqueeze(1)).squeeze(1)
        if bool(wide.any()):  # a nucleus wider than the candidates: sort the whole vocabulary
            rows = wide.nonzero().squeeze(1)
            tokens[rows] = self._draw_sorted(probs.index_select(0, rows),
                                             [params[i] for i in rows.tolist()], uniforms.index_select(0, rows))
        return tokens

    def _draw_sorted(self, probs: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor
                     ) -> torch.Tensor:
        values, ids = probs.sort(dim=-1, descending=True)
        top_p = torch.tensor([p.top_p for p in params], device=probs.device).unsqueeze(1)
        values = values.masked_fill(values.cumsum(dim=-1) - values >= top_p, 0.0)
        _min_p(values, params, values[:, :1])
        return ids.gather(1, _inverse_cdf(values, uniforms).unsqueeze(1)).squeeze(1)

    def _uniforms(self, seqs: list[ScheduledSequence]) -> torch.Tensor:
        """One number in (0, 1] per row: from the sequence's own generator when seeded."""
        uniforms = torch.rand(len(seqs), device=self.device)
        for row, seq in enumerate(seqs):
            if seq.params.seed is not None:
                uniforms[row] = torch.rand(1, generator=self._generator(seq, seq.params.seed), device=self.device)[0]
        return 1.0 - uniforms

    def _generator(self, seq: ScheduledSequence, seed: int) -> torch.Generator:
        generator = self.generators.get(seq.seq_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
            # A sequence that already has outputs (recomputed after a preemption, or a PD decode
            # task going on from its prefill's first token) drew one number per token it sampled:
            # skip them, so that a seeded request gives the same tokens however it was scheduled.
            for _ in seq.output_token_ids:
                torch.rand(1, generator=generator, device=self.device)
            self.generators[seq.seq_id] = generator
        return generator

    # ------------------------------------------------------------------ logprobs

    def _logprobs(self, raw: torch.Tensor, tokens: torch.Tensor, seqs: list[ScheduledSequence],
                  wanted: list[int]) -> dict[str, TokenLogprob]:
        rows = self._index(wanted)
        scored = score_tokens(raw.index_select(0, rows), tokens.index_select(0, rows).tolist(),
                              [seqs[i].params.logprobs or 0 for i in wanted])
        return {seqs[i].seq_id: logprob for i, logprob in zip(wanted, scored)}


def score_tokens(logits: torch.Tensor, token_ids: Sequence[int], top: Sequence[int]) -> list[TokenLogprob]:
    """Per row of ``logits [rows, vocab]``: the log-softmax of ``token_ids[row]``, its rank and
    the ``top[row]`` most likely alternatives. Logprobs are of the raw logits (no penalty, no
    temperature), as vLLM reports them; sampled tokens and prompt tokens are scored alike."""
    if not token_ids:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(token_ids, dtype=torch.long, device=logits.device)
    chosen_values = logprobs.gather(1, ids.unsqueeze(1))
    ranks = ((logprobs > chosen_values).sum(dim=-1) + 1).tolist()
    chosen = chosen_values.squeeze(1).tolist()
    most = max(top)
    top_values: list[list[float]] = [[] for _ in token_ids]
    top_ids: list[list[int]] = [[] for _ in token_ids]
    if most:
        values, best = logprobs.topk(most, dim=-1)
        top_values, top_ids = values.tolist(), best.tolist()
    return [TokenLogprob(token_id=int(token), logprob=chosen[j], rank=ranks[j],
                         top=[TopLogprob(token_id=t, logprob=v) for t, v in zip(top_ids[j][:top[j]], top_values[j][:top[j]])])
            for j, token in enumerate(token_ids)]


def score_prompts(logits: torch.Tensor, scored: Sequence[tuple[ScheduledSequence, list[int]]]
                  ) -> dict[str, list[TokenLogprob]]:
    """``StepResult.prompt_logprobs`` from the logits of every scored row, sequence after
    sequence as in ``scored`` (each with its ``prompt_targets``)."""
    targets = [token for _, tokens in scored for token in tokens]
    top = [seq.params.prompt_logprobs or 0 for seq, tokens in scored for _ in tokens]
    scores = iter(score_tokens(logits, targets, top))
    return {seq.seq_id: [next(scores) for _ in tokens] for seq, tokens in scored}


def prompt_targets(seq: ScheduledSequence) -> list[int]:
    """The prompt tokens that ``seq``'s chunk predicts, when its prompt is scored
    (``params.prompt_logprobs``): position ``p`` of the chunk predicts prompt token ``p + 1``,
    so the chunk's first ``len(result)`` rows score them. Empty when not asked for, or when the
    chunk lies past the prompt (a decode step, or outputs recomputed after a preemption)."""
    if seq.params.prompt_logprobs is None:
        return []
    start = seq.start_pos
    end = min(start + len(seq.token_ids), len(seq.prompt_token_ids) - 1)
    return list(seq.prompt_token_ids[start + 1:end + 1]) if end > start else []


def _is_greedy(params: SamplingParams) -> bool:
    return params.greedy or params.temperature < GREEDY_TEMPERATURE


def _finite(scores: torch.Tensor) -> tuple[torch.Tensor, set[int]]:
    """``scores`` with NaN as -inf and +inf as ``_HUGE``, and the rows that held either."""
    total = float(scores.sum())  # one reduction per step: NaN or +inf only if a score may be
    if not (math.isnan(total) or total == math.inf):
        return scores, set()
    bad = torch.isnan(scores) | torch.isposinf(scores)
    rows = set(bad.any(dim=-1).nonzero().squeeze(1).tolist())
    return torch.nan_to_num(scores, nan=_NEG_INF, posinf=_HUGE, neginf=_NEG_INF), rows


def _min_p(weights: torch.Tensor, params: list[SamplingParams], best: torch.Tensor) -> None:
    """Zero, in place, the weights below ``min_p`` times the best token's."""
    min_p = [p.min_p for p in params]
    if any(m > 0 for m in min_p):
        floor = torch.tensor(min_p, device=weights.device).unsqueeze(1) * best
        weights.masked_fill_(weights < floor, 0.0)


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the index drawn with probability proportional to ``weights`` (unnormalised,
    some zero) given ``uniforms`` in (0, 1]: the first index whose cumulative weight reaches
    ``u × total`` — always one with a positive weight."""
    cumulative = weights.cumsum(dim=-1)
    total = cumulative[:, -1:]
    target = torch.minimum(uniforms.unsqueeze(1) * total, total)
    return torch.searchsorted(cumulative, target).squeeze(1).clamp_(max=weights.shape[-1] - 1)
