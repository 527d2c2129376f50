"""One task's sequence inside the ``continuous`` batch scheduler: its tokens and progress."""

from __future__ import annotations

import enum
from typing import Any

from flowserve_core.types import PoolingParams, SamplingParams, Task, TaskRole, TokenLogprob


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # holds no KV blocks (new, or preempted)
    RUNNING = "running"  # holds blocks for all its tokens
    FETCHING = "fetching"  # a PD decode task: holds its blocks, waits for its KV from a transport
    FINISHED = "finished"


class Sequence:
    """A task's tokens (prompt, then outputs) and how many of them have KV computed.

    ``num_computed`` tokens are in the KV cache; the rest (``num_remaining``) are computed by
    the next steps, the last of which samples a token. A decoding sequence has exactly one
    remaining token: the one it sampled last. ``order`` numbers sequences as the scheduler
    queued them. ``key`` orders the scheduler's queues; the scheduler sets it once, from its
    ``queue_key``, when the task is queued (first come, first served: arrival time, then
    ``order``). A preempted sequence keeps it, so it goes back to the front of the queue.
    """

    __slots__ = ("task", "seq_id", "role", "params", "prompt_token_ids", "output_token_ids",
                 "token_ids", "order", "key", "status", "num_computed", "num_cached_tokens", "admitted",
                 "reported_first", "stop_token_ids", "banned_until_min_tokens", "prompt_logprobs", "pooling")

    def __init__(self, task: Task, order: int):
        request = task.request
        self.task = task
        self.seq_id = task.id
        self.role: TaskRole = task.role
        self.params: SamplingParams = request.params
        #: an embedding (see ``Request.pooling``): its prompt is computed, then it ends with its vector
        self.pooling: PoolingParams | None = request.pooling
        self.prompt_token_ids: list[int] = list(request.prompt_token_ids)
        # The task's record stays the job scheduler's; the sequence keeps its own copy.
        self.output_token_ids: list[int] = list(task.output_token_ids)
        self.token_ids: list[int] = self.prompt_token_ids + self.output_token_ids
        self.order = order
        self.key: tuple[Any, ...] = (request.arrival_time, order)
        self.status = SequenceStatus.WAITING
        self.num_computed = 0
        self.num_cached_tokens = 0
        self.admitted = False
        self.reported_first = False
        eos = [] if self.params.ignore_eos else list(request.eos_token_ids)
        self.stop_token_ids = frozenset(eos) | frozenset(self.params.stop_token_ids)
        # What the executor masks while ``min_tokens`` is not reached (as vLLM does).
        self.banned_until_min_tokens = sorted(self.stop_token_ids)
        #: with ``params.prompt_logprobs``: the scores of prompt tokens 1.. gathered so far
        self.prompt_logprobs: list[TokenLogprob] = []

    @property
    def needs_every_position(self) -> bool:
        """Whether every prompt position must be computed here (no prefix-cache hits): its
        prompt is scored (``prompt_logprobs``) on this task, which a PD decode task never does,
        or mean-pooled (an embedding)."""
        if self.pooling is not None and self.pooling.kind == "mean":
            return True
        return self.params.prompt_logprobs is not None and self.role is not TaskRole.DECODE

    def add_prompt_logprobs(self, start: int, scored: list[TokenLogprob]) -> None:
        """Keep the scores of a chunk computed from position ``start`` (they score prompt tokens
        ``start + 1 ..``); a chunk computed again after a preemption adds only what is new."""
        known = len(self.prompt_logprobs)
        if start <= known:
            self.prompt_logprobs.extend(scored[known - start:])

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_remaining(self) -> int:
        return len(self.token_ids) - self.num_computed

    def append(self, token: int) -> None:
        self.output_token_ids.append(token)
        self.token_ids.append(token)

    def __lt__(self, other: Sequence) -> bool:  # for bisect.insort
        return self.key < other.key

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed})")
