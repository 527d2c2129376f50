"""Reading what a ``llama_decode`` output: its logits rows, as numpy views of llama.cpp's own
buffer, and copies of chosen rows where a step needs them past the next decode."""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp
import numpy as np

#: Views kept before the cache is emptied (llama.cpp moved its buffer, or many row counts came).
_MAX_VIEWS = 512


class OutputLogits:
    """The logits rows of a context's last decode: contiguous, in batch order, one per token
    whose ``batch.logits`` was set. A view lasts until the next ``llama_decode``. Views are
    kept by the buffer's address and the row count: after a decode step has streamed the
    weights through the caches, making one costs ~80 µs, a few percent of a small model's step."""

    def __init__(self, ctx: Any, n_vocab: int):
        self.ctx = ctx
        self.n_vocab = n_vocab
        self._views: dict[tuple[int | None, int], np.ndarray] = {}

    def rows(self, outputs: int) -> np.ndarray:
        """The last decode's ``outputs`` logits rows, uncopied."""
        if not outputs:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        pointer = llama_cpp.llama_get_logits(self.ctx)
        key = (ctypes.cast(pointer, ctypes.c_void_p).value, outputs)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= _MAX_VIEWS:
                self._views.clear()
            view = self._views[key] = np.ctypeslib.as_array(pointer, shape=(outputs, self.n_vocab))
        return view

    def copy(self, produced: np.ndarray, pending: list[tuple[int, int]], logits: np.ndarray) -> None:
        """Copy rows of ``produced`` into ``logits``: ``pending`` holds (source row, target row)."""
        if not pending:
            return
        sources, targets = zip(*pending)
        source, target, k = sources[0], targets[0], len(pending)
        if sources == tuple(range(source, source + k)) and targets == tuple(range(target, target + k)):
            logits[target:target + k] = produced[source:source + k]  # a decode step: one block copy
        else:
            logits[list(targets)] = produced[list(sources)]

    def forget(self) -> None:
        """Drop every view (the context is being freed)."""
        self._views.clear()
