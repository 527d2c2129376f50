"""A GGUF file's model shape from its header alone, as a transformers-style config dict.

Checking a deployment must not dequantize the weights (the converter takes ~16 s for
SmolLM2) nor decode the vocabulary (``gguf.GGUFReader`` decodes every array), so this walks
the key/value section once, keeping scalars and the lengths of arrays.
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (versions 2 and 3).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from flowserve_core.errors import ConfigError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
#: transformers config key ← GGUF key suffix (after ``{architecture}.``)
_KEYS = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
         "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
         "num_key_value_heads": "attention.head_count_kv", "max_position_embeddings": "context_length",
         "rms_norm_eps": "attention.layer_norm_rms_epsilon", "rope_theta": "rope.freq_base",
         "head_dim": "attention.key_length", "vocab_size": "vocab_size",
         "sliding_window": "attention.sliding_window", "num_experts": "expert_count",
         "num_experts_per_tok": "expert_used_count", "moe_intermediate_size": "expert_feed_forward_length"}
#: HF ``model_type`` ← GGUF ``general.architecture``, where they differ
_MODEL_TYPES = {"qwen3moe": "qwen3_moe", "gemma3": "gemma3_text"}


def read_header(path: str | Path) -> dict[str, Any]:
    """Every scalar of the header; an array's value is its length. ``ConfigError`` when the
    file is not a GGUF file or its header is cut short."""
    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != b"GGUF":
                raise ConfigError(f"{path} is not a GGUF file (it does not start with b'GGUF')")
            version, tensors, count = struct.unpack_from("<IQQ", data, 4)
            if version not in (2, 3):
                raise ConfigError(f"{path}: GGUF version {version} is not supported (2 or 3 are)")
            # Each tensor's description takes at least 33 bytes (name length and a 1-byte name,
            # one dimension, type, offset), each key/value 14: a count past that is a forgery.
            for claimed, what, least in ((tensors, "tensors", 33), (count, "metadata keys", 14)):
                if claimed * least > len(data):
                    raise ConfigError(f"{path}: the GGUF header claims {claimed} {what}, more than a file of "
                                      f"{len(data)} bytes can describe: the file is truncated, damaged or not a model")
            cursor = _Cursor(data, 24)
            found: dict[str, Any] = {}
            for _ in range(count):
                key = cursor.string()
                found[key] = cursor.value(cursor.scalar("<I"))
            return found
    except (struct.error, ValueError, OverflowError, MemoryError) as exc:
        raise ConfigError(f"{path}: the GGUF header cannot be read ({exc})") from None


def config_from_gguf(path: str | Path) -> dict[str, Any]:
    """The model's shape as ``config.json`` would say it (``model_type`` is GGUF's architecture,
    in transformers' spelling)."""
    header = read_header(path)
    arch = header.get("general.architecture")
    if not isinstance(arch, str):
        raise ConfigError(f"{path}: the GGUF header names no general.architecture")
    raw: dict[str, Any] = {"model_type": _MODEL_TYPES.get(arch, arch)}
    for name, suffix in _KEYS.items():
        if f"{arch}.{suffix}" in header:
            raw[name] = header[f"{arch}.{suffix}"]
    raw.setdefault("vocab_size", header.get("tokenizer.ggml.tokens"))
    if raw["vocab_size"] is None:
        del raw["vocab_size"]
    return raw


class _Cursor:
    """A read position in the mapped header."""

    def __init__(self, data: mmap.mmap, offset: int):
        self.data, self.offset = data, offset

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        if self.offset + length > len(self.data):
            raise ValueError("a string runs past the end of the file")
        raw = self.data[self.offset:self.offset + length]
        self.offset += length
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            for _ in range(count if item in (_STRING, _ARRAY) else 0):
                self.value(item)
            if item in _SCALARS:
                self.offset += count * struct.calcsize(_SCALARS[item])
            elif item not in (_STRING, _ARRAY):
                raise ValueError(f"unknown GGUF array item type {item}")
            if self.offset > len(self.data):
                raise ValueError("an array runs past the end of the file")
            return count
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        return self.scalar(_SCALARS[kind])
