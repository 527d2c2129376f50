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

from flowserve_core.errors import ConfigError

# GGUF value types → struct format of one scalar (8 = string, 9 = array are handled apart).
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
#: The fewest bytes one key/value pair (key length, a 1-byte key, type, 1-byte value) and one
#: tensor description (name length, 1-byte name, 1 dimension, type, offset) take in a header.
_MIN_KV_BYTES, _MIN_TENSOR_BYTES = 8 + 1 + 4 + 1, 8 + 1 + 4 + 8 + 4 + 8


class GGUFFormatError(ConfigError):
    """The file is not a GGUF file this reader understands (a client's or operator's error:
    a 400 from the admin API, a clear message from ``flowserve serve``)."""


def read_gguf_scalars(path: str | Path) -> dict[str, Any]:
    """Every scalar and string key of the GGUF header at ``path``; arrays are left out."""
    try:
        with open(path, "rb") as file:
            size = file.seek(0, 2)
            if size < 24:
                raise GGUFFormatError(f"{path} is not a GGUF file: {size} bytes, shorter than a GGUF header")
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _read_scalars(data, size, str(path))
    except OSError as exc:
        raise GGUFFormatError(f"cannot read the GGUF file {path}: {exc.strerror or exc}") from None


def _read_scalars(data: mmap.mmap, size: int, path: str) -> dict[str, Any]:
    if data[:4] != b"GGUF":
        raise GGUFFormatError(f"{path} is not a GGUF file (it does not start with b'GGUF')")
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", data, 4)
    if version not in (2, 3):
        raise GGUFFormatError(f"{path}: GGUF version {version} is not supported (2 or 3 are)")
    claims = ((tensor_count, "tensors", _MIN_TENSOR_BYTES), (kv_count, "metadata keys", _MIN_KV_BYTES))
    for count, what, least in claims:
        if count * least > size:
            raise GGUFFormatError(f"{path}: the GGUF header claims {count} {what}, more than a file of "
                                  f"{size} bytes can describe: the file is truncated, damaged or not a model")
    reader = _Cursor(data, 24, path)
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
        if self.offset + length > len(self.data):
            raise GGUFFormatError(f"{self.path}: the GGUF header is truncated (a string runs past the end)")
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
        if count > len(self.data) - self.offset:  # every item takes at least a byte
            raise GGUFFormatError(f"{self.path}: the GGUF header is truncated (an array of {count} items)")
        if item_type == _STRING:
            for _ in range(count):
                self.offset += 8 + self.scalar("<Q")
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
