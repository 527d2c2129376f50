"""PD-disaggregation on llama.cpp: a sequence's KV leaves and enters a context in llama.cpp's
per-sequence state format (``llama_state_seq_get_data`` / ``llama_state_seq_set_data``), whole."""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp

from flowserve_core.types import KVBlockTransfer


def read_sequence_state(ctx: Any, sequence: int) -> memoryview:
    """The whole state (KV) of llama.cpp sequence ``sequence`` in ``ctx``, uncopied."""
    size = llama_cpp.llama_state_seq_get_size(ctx, sequence)
    buffer = (ctypes.c_uint8 * size)()
    written = llama_cpp.llama_state_seq_get_data(ctx, buffer, size, sequence)
    return memoryview(buffer).cast("B")[:written]


def write_sequence_state(ctx: Any, memory: Any, sequence: int, transfer: KVBlockTransfer) -> int:
    """Write ``transfer``'s exported state into the empty llama.cpp sequence ``sequence``; the
    positions it holds now. ``RuntimeError`` if llama.cpp refuses it (another model or build)."""
    data = bytes(memoryview(transfer.data).cast("B"))
    buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    if llama_cpp.llama_state_seq_set_data(ctx, buffer, len(data), sequence) == 0:
        raise RuntimeError(f"llama.cpp refused the KV state imported for {transfer.seq_id} "
                           f"({len(data)} bytes; another model or llama.cpp version?)")
    return int(llama_cpp.llama_memory_seq_pos_max(memory, sequence)) + 1
