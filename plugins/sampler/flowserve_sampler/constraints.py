"""Structured output in the sampler: each constrained sequence's grammar matcher, and the token
bitmask that keeps its next token inside its constraint.

A matcher follows a sequence by reading its ``output_token_ids`` at each step (every token it
has not seen yet is accepted), so it stays right through preemption and recomputation, and a
PD decode instance picks up where the prefill instance's first token left it. Filling the masks
is CPU work in the backend (xgrammar releases the GIL): ``prepare`` starts it in a thread of its
own before the executor runs the model, so it overlaps the model step, and the sampler collects
it when the logits are there. Nothing here runs on an event loop: executors sample in their
worker threads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from flowserve_core.interfaces import PluginLookup
from flowserve_core.structured_output import GrammarMatcher, StructuredOutputBackend
from flowserve_core.types import DeploymentSpec, ScheduledSequence

log = logging.getLogger(__name__)

BackendFactory = Callable[[], StructuredOutputBackend]
_BITS = torch.arange(32, dtype=torch.int32)


def bitmask_words(vocab_size: int) -> int:
    """Words (``int32``) per bitmask row for ``vocab_size`` tokens."""
    return (vocab_size + 31) // 32


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``bool [rows, vocab_size]``: which tokens each row of a packed ``int32`` bitmask allows."""
    bits = (bitmask.unsqueeze(-1) >> _BITS.to(bitmask.device)) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def fill_from_ids(bitmask: torch.Tensor, row: int, token_ids: Sequence[int]) -> None:
    """Set row ``row`` of ``bitmask`` to allow exactly ``token_ids`` (for simple backends)."""
    words = torch.zeros(bitmask.shape[1] * 32, dtype=torch.bool)
    words[list(token_ids)] = True
    packed = (words.view(-1, 32).to(torch.int64) << _BITS.to(torch.int64)).sum(dim=1)
    bitmask[row] = ((packed + 2**31) % 2**32 - 2**31).to(torch.int32)  # as int32 bits


class _Matched:
    """One constrained sequence: its matcher and how many of its output tokens it accepted."""

    __slots__ = ("matcher", "accepted", "failed")

    def __init__(self, matcher: GrammarMatcher | None):
        self.matcher = matcher
        self.accepted = 0
        self.failed = matcher is None


class Constraints:
    """The constrained sequences of one sampler; the backend is built on first use, so that
    deployments that never constrain never load it."""

    def __init__(self, backend: BackendFactory | None, vocab_size: int, device: torch.device):
        self._factory = backend
        self._backend: StructuredOutputBackend | None = None
        self.vocab_size = vocab_size
        self.device = device
        self.matched: dict[str, _Matched] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[tuple[tuple[str, int], ...], Future[tuple[list[int], torch.Tensor]]] | None = None

    def forget(self, seq_ids: Sequence[str]) -> None:
        """Drop the matchers of sequences that finished."""
        for seq_id in seq_ids:
            self.matched.pop(seq_id, None)

    def prepare(self, seqs: list[ScheduledSequence]) -> None:
        """Start filling the masks of ``seqs`` (those about to be sampled) in the background."""
        if not any(s.params.structured_output is not None for s in seqs):
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="flowserve-masks")
        self._settle()
        self._pending = (_signature(seqs), self._pool.submit(self._fill, seqs))

    def _settle(self) -> tuple[list[int], torch.Tensor] | None:
        """Wait for the background work (a failed step may have left it) and return its result:
        the matchers are never advanced by two threads at once."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            return pending[1].result()
        except Exception:
            log.exception("filling structured-output masks failed")
            return None

    def masks(self, seqs: list[ScheduledSequence]) -> tuple[list[int], torch.Tensor] | None:
        """``(rows, allowed [len(rows), vocab])`` for the constrained rows of ``seqs``, or None
        when no row is constrained; from ``prepare``'s work when it was for these sequences."""
        pending = self._pending
        done = self._settle()
        if pending is not None and done is not None and pending[0] == _signature(seqs):
            rows, bitmask = done
        elif any(s.params.structured_output is not None for s in seqs):
            rows, bitmask = self._fill(seqs)
        else:
            return None
        if not rows:
            return None
        return rows, allowed_tokens(bitmask, self.vocab_size).to(self.device)

    def _fill(self, seqs: list[ScheduledSequence]) -> tuple[list[int], torch.Tensor]:
        rows: list[int] = []
        matchers: list[GrammarMatcher] = []
        for i, seq in enumerate(seqs):
            if seq.params.structured_output is None:
                continue
            matched = self._follow(seq)
            if matched.matcher is not None and not matched.failed and not matched.matcher.is_terminated():
                rows.append(i)
                matchers.append(matched.matcher)
        bitmask = torch.zeros(len(rows), bitmask_words(self.vocab_size), dtype=torch.int32)
        for row, matcher in enumerate(matchers):
            matcher.fill_bitmask(bitmask, row)
        return rows, bitmask

    def _follow(self, seq: ScheduledSequence) -> _Matched:
        """The sequence's matcher, advanced past every output token it has not seen."""
        matched = self.matched.get(seq.seq_id)
        outputs = seq.output_token_ids
        if matched is None or matched.accepted > len(outputs):
            matched = self.matched[seq.seq_id] = _Matched(self._matcher(seq))
        for token in outputs[matched.accepted:]:
            if matched.failed or matched.matcher is None or matched.matcher.is_terminated():
                break
            if not matched.matcher.accept_token(token):
                # Only a token the mask did not allow gets here (min_tokens fighting the grammar's
                # end, an executor that sampled elsewhere): the rest of the output goes free.
                log.warning("sequence %s left its structured-output constraint at token %d; the rest of its "
                            "output is unconstrained", seq.seq_id, token)
                matched.failed = True
        matched.accepted = len(outputs)
        return matched

    def _matcher(self, seq: ScheduledSequence) -> GrammarMatcher | None:
        constraint = seq.params.structured_output
        assert constraint is not None
        try:
            if self._backend is None:
                if self._factory is None:
                    raise RuntimeError("this executor was built without a structured-output backend")
                self._backend = self._factory()
            return self._backend.matcher(constraint, self.vocab_size, list(seq.eos_token_ids))
        except Exception:  # the server checked the constraint: this is a broken backend
            log.exception("cannot constrain sequence %s (%s); its output is unconstrained", seq.seq_id,
                          constraint.kind)
            return None


def _signature(seqs: list[ScheduledSequence]) -> tuple[tuple[str, int], ...]:
    return tuple((s.seq_id, len(s.output_token_ids)) for s in seqs if s.params.structured_output is not None)


def apply_masks(scores: torch.Tensor, raw: torch.Tensor, rows: list[int], allowed: torch.Tensor) -> None:
    """Forbid, in place, the tokens of ``scores``' ``rows`` that ``allowed`` does not allow. A row
    left with nothing (a ban such as ``min_tokens``' on end-of-sequence against a complete
    grammar) takes the model's own logits under the mask: the constraint wins."""
    index = torch.tensor(rows, dtype=torch.long, device=scores.device)
    masked = scores.index_select(0, index).masked_fill_(~allowed, float("-inf"))
    empty = torch.isneginf(masked).all(dim=-1)
    if bool(empty.any()):
        fallback = raw.index_select(0, index).masked_fill(~allowed, float("-inf"))
        masked = torch.where(empty.unsqueeze(1), fallback, masked)
    scores.index_copy_(0, index, masked)


def deployment_backend(spec: DeploymentSpec, plugins: PluginLookup | None) -> BackendFactory | None:
    """What executors give their ``Sampler``: builds ``spec``'s structured-output backend (the
    plugin named by ``structured_output_backend``) with ``plugins``, the manager that built the
    executor, when the first constrained sequence comes (None without a manager: an executor
    built by hand constrains nothing, and says so when asked to)."""
    if plugins is None:
        return None

    def build() -> StructuredOutputBackend:
        backend: StructuredOutputBackend = plugins.build("structured_output", spec.structured_output_backend, spec)
        return backend

    return build
