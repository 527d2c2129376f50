"""Embeddings, the same for every executor: the pooled final hidden states → one vector.

An executor pools each embedding's chunk of final hidden states (after the model's final
norm) into a sum over rows (its last token's row for ``last``, every row for ``mean``) and
hands the sums to ``Pooler``, which adds up a ``mean``'s chunks per sequence, divides by the
positions it saw, cuts the vector to ``dimensions`` and L2-normalizes it, as
``PoolingParams`` asks.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from flowserve_core.types import ScheduledSequence


class Pooler:
    """Rank 0's embedding state: the running sums of mean-pooled prompts under way."""

    def __init__(self) -> None:
        self._sums: dict[str, tuple[torch.Tensor, int]] = {}

    def forget(self, seq_ids: Iterable[str]) -> None:
        """Sequences that ended or were preempted: their partial sums go."""
        for seq_id in seq_ids:
            self._sums.pop(seq_id, None)

    def __call__(self, sums: torch.Tensor, seqs: Sequence[ScheduledSequence],
                 rows: Sequence[int]) -> dict[str, list[float]]:
        """``sums[i]`` is the sum of ``rows[i]`` final hidden states of ``seqs[i]``'s chunk;
        returns the finished vectors of the sequences whose prompt ends here (``sample``)."""
        vectors: dict[str, list[float]] = {}
        for vector, seq, count in zip(sums, seqs, rows):
            params = seq.pooling
            assert params is not None  # only pooled sequences come here
            if params.kind == "mean":
                earlier = self._sums.pop(seq.seq_id, None)
                if earlier is not None and seq.start_pos > 0:  # a chunk from 0 starts afresh
                    vector, count = vector + earlier[0], count + earlier[1]
                if not seq.sample:
                    self._sums[seq.seq_id] = (vector, count)
                    continue
                vector = vector / count
            vectors[seq.seq_id] = finish_embedding(vector, params.dimensions, params.normalize)
        return vectors


def finish_embedding(vector: torch.Tensor, dimensions: int | None, normalize: bool) -> list[float]:
    """The first ``dimensions`` values (Matryoshka), L2-normalized when ``normalize``."""
    vector = vector.float()
    if dimensions is not None:
        vector = vector[:dimensions]
    if normalize:
        vector = torch.nn.functional.normalize(vector, dim=0)
    return [float(x) for x in vector.tolist()]
