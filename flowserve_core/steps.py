"""What the engine asks an executor to compute in one step, and what comes back (public API,
also in ``flowserve_core.types``): the KV memory the executor set aside, each scheduled
sequence's share of the step, the KV moved in and out (PD), and the sampled tokens, prompt
log-probabilities and embeddings. ``PoolingParams`` lives here because a step carries it
as it is: a request's pooling, applied by the executor to the hidden states it computed."""

from __future__ import annotations

from typing import Literal

import msgspec

from flowserve_core.sampling import SamplingParams, TokenLogprob

PoolingKind = Literal["last", "mean"]


class PoolingParams(msgspec.Struct, kw_only=True, frozen=True):
    """An embedding request: its prompt is computed (no token is sampled) and pooled into one
    vector of the final hidden state (after the model's final norm): the ``last`` token's, or
    the ``mean`` over every prompt position; cut to its first ``dimensions`` values (None:
    all; Matryoshka models), then L2-normalized when ``normalize``."""

    kind: PoolingKind = "last"
    normalize: bool = True
    dimensions: int | None = None


class KVCacheSpec(msgspec.Struct, kw_only=True):
    """The KV memory an executor set aside: ``num_blocks`` blocks of ``block_size`` tokens."""

    num_blocks: int
    block_size: int
    bytes_per_block: int = 0
    max_model_len: int = 2048
    #: every layer attends at most this many positions back (0: some layer reads the whole
    #: history), so KV wholly behind that window of the next query is never read again
    sliding_window: int = 0


class ScheduledSequence(msgspec.Struct, kw_only=True):
    """One sequence's share of a step: compute ``token_ids`` from ``start_pos``; sample with
    ``params`` unless ``sample`` is false (a prefill chunk short of the prompt's end); penalties
    read prompt and output ids; ``eos_token_ids`` are masked until ``min_tokens``."""

    seq_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool = True
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    prompt_token_ids: list[int] = []
    output_token_ids: list[int] = []
    eos_token_ids: list[int] = []
    #: an embedding's chunk (``Request.pooling``): nothing is sampled; the chunk with
    #: ``sample`` set (the prompt's end) gets ``StepResult.embeddings`` instead of a token
    pooling: PoolingParams | None = None
    #: multi-step decoding (``DeploymentSpec.decode_steps``), only for a decode (one token,
    #: ``sample`` set): after sampling, feed each sampled token back and sample again, up to
    #: this many tokens in all (``StepResult.more_token_ids``; an executor may stop early at a
    #: token of ``eos_token_ids`` once ``min_tokens`` are out). KV for them is reserved.
    #: An executor that samples one token per step returns one, which the scheduler accepts.
    decode_steps: int = 1


class KVBlockTransfer(msgspec.Struct, kw_only=True):
    """Raw KV of whole blocks leaving or entering an executor, in its export layout (PD); an
    import writes blocks ``first_block`` onwards of ``data`` into ``block_ids``."""

    seq_id: str
    block_ids: list[int]
    data: bytes = b""
    first_block: int = 0


class StepBatch(msgspec.Struct, kw_only=True):
    """One engine step: copy ``block_copies`` (source, destination), write ``kv_imports``, compute
    ``seqs``, read ``kv_exports``; ``finished_seq_ids``' state may go (e.g. seeded generators)."""

    seqs: list[ScheduledSequence] = []
    finished_seq_ids: list[str] = []
    block_copies: list[tuple[int, int]] = []
    kv_imports: list[KVBlockTransfer] = []
    kv_exports: list[KVBlockTransfer] = []

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


class StepResult(msgspec.Struct, kw_only=True):
    """One sampled token per sequence with ``sample`` set, and the ``kv_exports``' data. For a
    sequence whose ``params.prompt_logprobs`` is set, ``prompt_logprobs`` scores the prompt tokens
    its chunk predicts: positions ``start_pos ..`` predict prompt tokens ``start_pos + 1 ..``."""

    token_ids: dict[str, int] = {}
    logprobs: dict[str, TokenLogprob] = {}
    #: a sequence with ``decode_steps`` > 1: the tokens it sampled after ``token_ids``' one, in
    #: order (their KV is computed, apart from the last's), and their logprobs when asked for
    more_token_ids: dict[str, list[int]] = {}
    more_logprobs: dict[str, list[TokenLogprob]] = {}
    prompt_logprobs: dict[str, list[TokenLogprob]] = {}
    kv_exports: list[KVBlockTransfer] = []
    #: per pooling sequence whose prompt ends this step: its vector (``PoolingParams`` applied)
    embeddings: dict[str, list[float]] = {}
