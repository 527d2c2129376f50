"""What an instance start would refuse, checked once before a ``llamacpp`` deployment starts,
from the GGUF's header only (``gguf``'s reader maps the file and reads no tensor data)."""

from __future__ import annotations

from flowserve_core.config import parse_memory_size
from flowserve_core.errors import ConfigError
from flowserve_core.types import DeploymentSpec
from flowserve_llamacpp_executor.model import MAX_SEQUENCES, kv_bytes_per_token, kv_per_sequence_streams, resolve_gguf


def check_deployment(spec: DeploymentSpec) -> None:
    """``ConfigError`` naming why ``spec`` can never run on executor ``llamacpp``."""
    if spec.tensor_parallel != 1:
        raise ConfigError(f"executor 'llamacpp' runs a model in one process; tensor_parallel="
                          f"{spec.tensor_parallel} needs executor 'spmd'")
    path = resolve_gguf(spec.model)
    try:
        import gguf

        fields = gguf.GGUFReader(str(path), "r").fields
    except Exception as exc:  # a damaged header: the reader's own words say where
        raise ConfigError(f"model {str(path)!r} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None

    def metadata(key: str) -> object:
        field = fields.get(key)
        return None if field is None else field.contents()

    per_token = kv_bytes_per_token(metadata)
    cells = parse_memory_size(spec.kv_cache_memory) // per_token
    if cells < spec.block_size:
        raise ConfigError(f"kv_cache_memory {spec.kv_cache_memory!r} holds {cells} tokens of this model "
                          f"({per_token} bytes each); give it more")
    context = metadata(f"{metadata('general.architecture')}.context_length")
    trained = int(context) if isinstance(context, (int, float)) else 0  # the model's own context length
    if kv_per_sequence_streams(spec.options.get("kv_unified"), cells, spec.max_num_seqs,
                               spec.max_model_len or trained or cells):
        cells //= max(1, min(MAX_SEQUENCES, spec.max_num_seqs))  # a stream per sequence
    if spec.max_model_len is not None and spec.max_model_len > cells:
        raise ConfigError(f"max_model_len {spec.max_model_len} does not fit the KV cache: kv_cache_memory "
                          f"{spec.kv_cache_memory!r} holds {cells} tokens of this model ({per_token} bytes each)")
