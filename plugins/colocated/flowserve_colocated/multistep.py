"""Multi-step decoding (``DeploymentSpec.decode_steps``) in the ``continuous`` scheduler.

A step whose batch holds decodes only may ask each of them for several tokens
(``ScheduledSequence.decode_steps``): the executor feeds each sampled token back and samples
again, and the scheduler then takes the tokens one by one, up to the first that ends the
sequence (the rest are dropped). That saves a Python round trip per token (schedule, step
hand-off, events, frontend) where a step is short, i.e. few sequences on a CPU. The scheduler
asks for it only when no waiting sequence could start meanwhile, and an executor ends such a
step early when a sequence ends or new work arrives (``EndsStepsEarly``).
"""

from __future__ import annotations

from typing import Callable

from flowserve_colocated.sequence import Sequence
from flowserve_core.interfaces import KVCacheManager
from flowserve_core.types import FinishReason, TaskRole


def plan_decode_steps(decodes: list[Sequence], decode_steps: int, max_model_len: int,
                      kv: KVCacheManager) -> dict[str, int]:
    """The tokens each of a step's sequences samples, when that is more than one: all of
    them, or none (an empty dict: one token each). Each asks for up to ``decode_steps``, cut to
    its ``max_tokens`` and the context length, with KV blocks reserved for them (nobody is
    preempted for it). Never for a batch holding a prompt chunk, a sequence's first token (its
    time to first token stays one step), a prefill task, a structured output (its grammar
    follows the tokens one by one), a sequence that ends with this token, or one whose
    blocks would run out."""
    if decode_steps <= 1 or not decodes:
        return {}
    if any(seq.num_remaining != 1 or not seq.reported_first or seq.role is TaskRole.PREFILL
           or seq.params.structured_output is not None for seq in decodes):
        return {}
    steps: dict[str, int] = {}
    for seq in decodes:
        room = max_model_len - seq.num_tokens
        if seq.params.max_tokens is not None:
            room = min(room, seq.params.max_tokens - len(seq.output_token_ids))
        count = min(decode_steps, room)
        # Blocks reserved for a batch that falls back to one token stay the sequence's: its
        # next steps use them.
        if count <= 1 or not kv.append_slots(seq.seq_id, seq.num_computed + count):
            return {}
        steps[seq.seq_id] = count
    return steps


def accept_tokens(seq: Sequence, sampled: list[int], asked: int,
                  finish_reason: Callable[[Sequence, int], FinishReason | None],
                  kv: KVCacheManager) -> tuple[list[int], FinishReason | None]:
    """Append the tokens ``seq`` sampled in a step (several under multi-step decoding, at most
    ``asked``) up to the first that ends it by ``finish_reason``: the tokens kept and why it
    ends. The KV of every kept token but the last was computed in the step, so it is
    committed as computed."""
    kept: list[int] = []
    reason: FinishReason | None = None
    for token in sampled[:asked]:
        seq.append(token)
        kept.append(token)
        reason = finish_reason(seq, token)
        if reason:
            break
    if len(kept) > 1:
        seq.num_computed += len(kept) - 1
        kv.commit(seq.seq_id, seq.token_ids, seq.num_computed)
    return kept, reason
