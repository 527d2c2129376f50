"""What the runner needs from a checkpoint's ``config.json``, read without transformers.

Supported: ``model_type`` llama (Llama 2/3, SmolLM2, TinyLlama…), mistral and qwen2 — the
Llama family: RMSNorm, rotary embeddings, grouped-query attention, SiLU-gated MLP. Qwen2 adds
biases to q/k/v; Llama may set ``attention_bias``/``mlp_bias``; Mistral and Qwen2 may use a
sliding attention window. Both config styles are read: transformers 4's ``rope_theta`` +
``rope_scaling`` and transformers 5's ``rope_parameters``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from flowserve_core.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
#: Rotary scaling types implemented in ``layers/rotary.py``.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                  "Qwen2ForCausalLM": "qwen2"}


class RopeConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Rotary embedding settings: base ``theta`` and an optional scaling of its frequencies."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The shape and options of one Llama-family model."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope: RopeConfig
    #: Per layer: the sliding attention window in tokens, 0 for full attention.
    sliding_windows: tuple[int, ...]
    eos_token_ids: tuple[int, ...] = ()

    @property
    def num_params_hint(self) -> int:
        """Roughly how many weights the model has (for log lines)."""
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        head = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp) + head


def load_model_config(directory: str | Path) -> ModelConfig:
    """Read ``directory/config.json`` (raises ``ConfigError`` naming what is missing or unsupported)."""
    path = Path(directory) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: a model directory needs config.json") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return model_config_from_dict(raw, source=str(path))


def model_config_from_dict(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a ``ModelConfig`` from a transformers config dictionary."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        from_arch = [_ARCHITECTURES[a] for a in raw.get("architectures") or [] if a in _ARCHITECTURES]
        if not from_arch:
            raise ConfigError(f"{source}: model_type {model_type!r} (architectures "
                              f"{raw.get('architectures')}) is not supported by the spmd executor; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        model_type = from_arch[0]
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only silu)")

    def need(key: str) -> Any:
        if key not in raw:
            raise ConfigError(f"{source} has no {key!r}")
        return raw[key]

    num_heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    num_layers = int(need("num_hidden_layers"))
    head_dim = int(raw.get("head_dim") or hidden // num_heads)
    max_pos = int(raw.get("max_position_embeddings") or 2048)
    is_qwen2 = model_type == "qwen2"
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases (its config has no switch); Llama's attention_bias
        # covers q, k, v and o.
        qkv_bias=True if is_qwen2 else bool(raw.get("attention_bias", False)),
        o_bias=False if is_qwen2 else bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        rope=_rope_config(raw, max_pos, source),
        sliding_windows=_sliding_windows(raw, model_type, num_layers),
        eos_token_ids=tuple(_id_list(raw.get("eos_token_id"))),
    )


def _rope_config(raw: dict[str, Any], max_pos: int, source: str) -> RopeConfig:
    params: dict[str, Any] = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    if "rope_theta" in raw and "rope_theta" not in params:
        params["rope_theta"] = raw["rope_theta"]
    if any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{source}: per-layer rope parameters are not supported")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported; supported: "
                          f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError(f"{source}: partial_rotary_factor is not supported")
    factor = params.get("factor")
    original = raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    if rope_type == "yarn" and factor is None:
        factor = max_pos / original if original else 1.0
    return RopeConfig(
        theta=float(params.get("rope_theta", 10000.0)),
        type=rope_type,
        factor=float(factor if factor is not None else 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original) if original else (
            max_pos if rope_type in ("llama3", "yarn") else None),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )


def _sliding_windows(raw: dict[str, Any], model_type: str, num_layers: int) -> tuple[int, ...]:
    window = int(raw.get("sliding_window") or 0)
    layer_types = raw.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == num_layers:
        return tuple(window if kind == "sliding_attention" else 0 for kind in layer_types)
    if model_type == "qwen2":
        if not raw.get("use_sliding_window"):
            return (0,) * num_layers
        first = int(raw.get("max_window_layers") or 0)
        return tuple(window if i >= first else 0 for i in range(num_layers))
    return (window,) * num_layers


def _id_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []
