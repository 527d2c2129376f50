"""What can never run on an instance, refused when its task is queued, so that the batch
scheduler can always make progress: a sequence alone in the KV cache must fit at its longest."""

from __future__ import annotations

from flowserve_colocated.sequence import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    """The KV blocks of ``block_size`` tokens that ``num_tokens`` tokens take (the last one partly)."""
    return -(-num_tokens // block_size)


def check_fits(seq: Sequence, max_model_len: int, block_size: int, total_blocks: int) -> None:
    """``ValueError`` (its message says why) if ``seq`` could never run alone in a cache of
    ``total_blocks`` blocks of ``block_size`` tokens with context length ``max_model_len``: a
    generation at its longest (prompt plus ``max_tokens``), an embedding with its prompt."""
    if seq.pooling is not None:
        _check_pooled_fits(seq, max_model_len, block_size, total_blocks)
        return
    if seq.num_tokens >= max_model_len:
        raise ValueError(f"task {seq.seq_id}: the prompt has {seq.num_tokens} tokens but the "
                         f"context length is {max_model_len}, which leaves no room for output")
    max_tokens = seq.params.max_tokens
    longest = max_model_len if max_tokens is None else min(len(seq.prompt_token_ids) + max_tokens, max_model_len)
    slots = longest - 1  # the last sampled token is never fed back
    blocks = blocks_for(slots, block_size)
    if blocks > total_blocks:
        raise ValueError(
            f"task {seq.seq_id} needs KV for up to {slots} tokens ({blocks} blocks of "
            f"{block_size}) but the whole KV cache has {total_blocks} blocks "
            f"({total_blocks * block_size} tokens); lower max_tokens or give the "
            f"cache more memory")


def _check_pooled_fits(seq: Sequence, max_model_len: int, block_size: int, total_blocks: int) -> None:
    if seq.num_tokens > max_model_len:
        raise ValueError(f"task {seq.seq_id}: the input has {seq.num_tokens} tokens but the context "
                         f"length is {max_model_len}")
    blocks = blocks_for(seq.num_tokens, block_size)
    if blocks > total_blocks:
        raise ValueError(f"task {seq.seq_id} needs KV for {seq.num_tokens} tokens ({blocks} blocks) but the "
                         f"whole KV cache has {total_blocks} blocks; give the cache more memory")
