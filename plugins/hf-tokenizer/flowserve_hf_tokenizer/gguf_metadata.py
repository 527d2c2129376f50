"""Read the scalar metadata of a GGUF file (context length, end-of-sequence ids) quickly.

``gguf.GGUFReader`` maps every tensor and decodes every array (49,152 vocabulary strings for
SmolLM2: seconds); the few numbers the tokenizer needs sit in the header, so this reader
walks the key/value section once, skipping arrays without decoding them.
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (versions 2 and 3).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

# GGUF value types → struct format of one scalar (8 = string, 9 = array are handled apart).
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands."""


def read_gguf_scalars(path: str | Path) -> dict[str, Any]:
    """Every scalar and string key of the GGUF header at ``path``; arrays are left out."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise GGUFFormatError(f"{path} is not a GGUF file (it does not start with b'GGUF')")
        (version,) = struct.unpack_from("<I", data, 4)
        if version not in (2, 3):
            raise GGUFFormatError(f"{path}: GGUF version {version} is not supported (2 or 3 are)")
        (kv_count,) = struct.unpack_from("<Q", data, 16)
        reader = _Cursor(data, 24, str(path))
        found: dict[str, Any] = {}
        for _ in range(kv_count):
            key = reader.string()
            value_type = reader.scalar("<I")
            if value_type == _ARRAY:
                reader.skip_array()
            else:
                found[key] = reader.value(value_type)
        return found


class _Cursor:
    """A read position in the mapped file."""

    def __init__(self, data: mmap.mmap, offset: int, path: str):
        self.data, self.offset, self.path = data, offset, path

    def scalar(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.data, self.offset)
        except struct.error:
            raise GGUFFormatError(f"{self.path}: the GGUF header is truncated") from None
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        raw = self.data[self.offset:self.offset + length]
        self.offset += length
        return raw.decode("utf-8", errors="replace")

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type not in _SCALAR_FORMATS:
            raise GGUFFormatError(f"{self.path}: unknown GGUF value type {value_type}")
        return self.scalar(_SCALAR_FORMATS[value_type])

    def skip_array(self) -> None:
        item_type = self.scalar("<I")
        count = self.scalar("<Q")
        if item_type == _STRING:
            for _ in range(count):
                self.offset += 8 + struct.unpack_from("<Q", self.data, self.offset)[0]
        elif item_type == _ARRAY:
            for _ in range(count):
                self.skip_array()
        elif item_type in _SCALAR_FORMATS:
            self.offset += count * struct.calcsize(_SCALAR_FORMATS[item_type])
        else:
            raise GGUFFormatError(f"{self.path}: unknown GGUF array item type {item_type}")


def gguf_model_facts(metadata: dict[str, Any]) -> tuple[list[int], int | None]:
    """End-of-generation token ids and context length from GGUF metadata.

    llama.cpp stops at ``eos`` and also at ``eot``/``eom`` (end of turn / of message), so all
    three count as end-of-sequence ids when present.
    """
    eos = [int(metadata[key]) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                          "tokenizer.ggml.eom_token_id") if key in metadata]
    architecture = metadata.get("general.architecture", "")
    context = metadata.get(f"{architecture}.context_length")
    return list(dict.fromkeys(eos)), int(context) if context else None
