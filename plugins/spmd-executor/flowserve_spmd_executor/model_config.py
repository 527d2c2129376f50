"""What the runner needs from a checkpoint's ``config.json``, read without transformers.

Which ``model_type``s are supported is the architecture registry's business
(``architectures.py``: the built-ins and whatever plugins add). This module reads what every
decoder-only architecture shares — RMSNorm, rotary embeddings, grouped-query attention, gated
MLP, sliding windows — plus the knobs of the built-in families, each read when the config has
it: Gemma's ``query_pre_attn_scalar`` and logit soft-capping, Granite's multipliers, the
mixture-of-experts sizes (``num_experts``/``num_local_experts``, ``num_experts_per_tok``,
``moe_intermediate_size``), Gemma 3's local rope base and Phi's ``partial_rotary_factor``. An
architecture from a plugin reads anything else from ``ModelConfig.raw``. Both config styles are
read: transformers 4's ``rope_theta`` + ``rope_scaling`` and transformers 5's
``rope_parameters`` (also per layer type, as Gemma 3 has them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from flowserve_core.errors import ConfigError
from flowserve_core.interfaces import PluginLookup

#: Rotary scaling types implemented in ``layers/rotary.py``.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
#: Gated MLP activations implemented in ``layers/mlp.py`` (HF's names).
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_tanh", "gelu")


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
    #: the gated MLP's activation (HF's ``hidden_act``/``hidden_activation``)
    hidden_act: str = "silu"
    #: the rotary embedding of sliding-window layers when it differs (Gemma 3's local base)
    local_rope: RopeConfig | None = None
    #: how many leading dimensions of each head are rotated (Phi's ``partial_rotary_factor``)
    rotary_dim: int = 0
    #: the attention's softmax scale; None: ``head_dim ** -0.5`` (Gemma's
    #: ``query_pre_attn_scalar ** -0.5``, Granite's ``attention_multiplier``)
    attention_scale: float | None = None
    #: ``cap * tanh(x / cap)`` on attention scores and on final logits (Gemma 2); None: off
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    #: Granite: embeddings ×, each block's output × before its residual add, logits ÷
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    #: mixture of experts: experts per MoE layer (0: dense), how many each token goes to, the
    #: size of one expert's MLP, whether the top-k weights are renormalised to sum to one,
    #: and per layer whether it is an MoE layer (Qwen3-MoE's ``mlp_only_layers`` are not)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[bool, ...] = ()
    #: the whole config.json, for what an architecture of a plugin needs beyond the above
    raw: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def num_params_hint(self) -> int:
        """Roughly how many weights the model has (for log lines)."""
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        if self.num_experts:
            mlp = 3 * self.hidden_size * self.moe_intermediate_size * self.num_experts
        head = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp) + head

    @property
    def tp_split_sizes(self) -> dict[str, int]:
        """The sizes tensor parallelism splits over its ranks, by what they are."""
        sizes = {"MLP size": self.intermediate_size}
        if self.num_experts:
            sizes["expert MLP size"] = self.moe_intermediate_size
        return sizes


def load_model_config(directory: str | Path, plugins: PluginLookup | None = None) -> ModelConfig:
    """Read ``directory/config.json`` (raises ``ConfigError`` naming what is missing or unsupported)."""
    path = Path(directory) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: a model directory needs config.json") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return model_config_from_dict(raw, source=str(path), plugins=plugins)


def model_config_from_dict(raw: dict[str, Any], source: str = "config.json",
                           plugins: PluginLookup | None = None) -> ModelConfig:
    """Build a ``ModelConfig`` from a transformers config dictionary; its ``model_type`` (or one
    of its ``architectures``) must be an architecture ``plugins`` registers (``architectures.py``)."""
    from flowserve_spmd_executor.architectures import BUILTIN_ARCHITECTURES, architecture_of, architectures

    text = raw.get("text_config")
    if isinstance(text, dict) and raw.get("model_type") not in architectures(plugins) \
            and text.get("model_type") in architectures(plugins):
        # A multimodal checkpoint (Gemma 3 4B and up): serve its language model, text only.
        # The top level's end tokens and tying are what the checkpoint's model class uses.
        raw = {**_full_text_config(raw), **{k: raw[k] for k in ("tie_word_embeddings", "eos_token_id") if k in raw}}
    model_type = architecture_of(raw, source, plugins)

    def need(key: str) -> Any:
        if key not in raw:
            raise ConfigError(f"{source} has no {key!r}")
        return raw[key]

    act = raw.get("hidden_activation") or raw.get("hidden_act") or "silu"
    # A plugin's architecture brings its own MLP, and with it the activations it knows.
    if model_type in BUILTIN_ARCHITECTURES and act not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"{source}: hidden activation {act!r} is not supported; supported: "
                          f"{', '.join(SUPPORTED_ACTIVATIONS)}")
    num_heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    num_layers = int(need("num_hidden_layers"))
    head_dim = int(raw.get("head_dim") or hidden // num_heads)
    max_pos = int(raw.get("max_position_embeddings") or 2048)
    is_qwen2 = model_type == "qwen2"
    rope, local_rope, partial = _rope_configs(raw, max_pos, source)
    num_experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(raw.get("intermediate_size") or 0) if num_experts else int(need("intermediate_size")),
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
        rope=rope,
        sliding_windows=_sliding_windows(raw, model_type, num_layers),
        eos_token_ids=tuple(_id_list(raw.get("eos_token_id"))),
        hidden_act=act,
        local_rope=local_rope,
        rotary_dim=int(head_dim * partial) if partial != 1.0 else 0,
        attention_scale=_attention_scale(raw),
        attn_logit_softcap=_optional_float(raw.get("attn_logit_softcapping")),
        final_logit_softcap=_optional_float(raw.get("final_logit_softcapping")),
        embedding_multiplier=float(raw.get("embedding_multiplier") or 1.0),
        residual_multiplier=float(raw.get("residual_multiplier") or 1.0),
        logits_scaling=float(raw.get("logits_scaling") or 1.0),
        num_experts=num_experts,
        num_experts_per_tok=int(raw.get("num_experts_per_tok") or 0) if num_experts else 0,
        moe_intermediate_size=int(raw.get("moe_intermediate_size") or raw.get("intermediate_size") or 0)
        if num_experts else 0,
        # Mixtral always renormalises its top-k weights; Qwen3-MoE says so in norm_topk_prob.
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        moe_layers=_moe_layers(raw, num_layers, num_experts),
        raw=raw,
    )


def _full_text_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A multimodal config's ``text_config`` with transformers' defaults filled in: the Hub's
    files keep only what differs from them (Gemma 3 4B's names no head counts)."""
    try:
        from transformers import AutoConfig

        extra = {k: v for k, v in raw.items() if k != "model_type"}
        full: dict[str, Any] = AutoConfig.for_model(raw["model_type"], **extra).get_text_config().to_dict()
        return full
    except Exception:  # an unknown or broken config (transformers raises many kinds): as written
        return dict(raw["text_config"])


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _attention_scale(raw: dict[str, Any]) -> float | None:
    if raw.get("query_pre_attn_scalar"):
        return float(raw["query_pre_attn_scalar"]) ** -0.5
    if raw.get("attention_multiplier"):
        return float(raw["attention_multiplier"])
    return None


def _moe_layers(raw: dict[str, Any], num_layers: int, num_experts: int) -> tuple[bool, ...]:
    if not num_experts:
        return (False,) * num_layers
    dense = set(raw.get("mlp_only_layers") or ())
    step = int(raw.get("decoder_sparse_step") or 1)
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))


def _rope_configs(raw: dict[str, Any], max_pos: int, source: str) -> tuple[RopeConfig, RopeConfig | None, float]:
    """The global rope, the sliding layers' rope when it differs, and the partial rotary factor."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        # transformers 5's per-layer-type parameters (Gemma 3)
        unknown = set(params) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ConfigError(f"{source}: rope parameters for layer types {sorted(unknown)} are not supported")
        full, partial = _rope_config({**raw, "rope_parameters": params["full_attention"]}, max_pos, source)
        local = params.get("sliding_attention")
        sliding = _rope_config({**raw, "rope_parameters": local}, max_pos, source)[0] \
            if isinstance(local, dict) else None
        return full, sliding if sliding != full else None, partial
    rope, partial = _rope_config(raw, max_pos, source)
    local_base = raw.get("rope_local_base_freq")  # transformers 4's Gemma 3 configs
    local = msgspec.structs.replace(rope, theta=float(local_base), type="default", factor=1.0) if local_base else None
    return rope, local if local != rope else None, partial


def _rope_config(raw: dict[str, Any], max_pos: int, source: str) -> tuple[RopeConfig, float]:
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
    partial = float(params.get("partial_rotary_factor") or raw.get("partial_rotary_factor") or 1.0)
    factor = params.get("factor")
    original = raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    if rope_type == "yarn" and factor is None:
        factor = max_pos / original if original else 1.0
    return RopeConfig(
        theta=float(params.get("rope_theta", raw.get("rope_theta", 10000.0))),
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
    ), partial


def _sliding_windows(raw: dict[str, Any], model_type: str, num_layers: int) -> tuple[int, ...]:
    window = int(raw.get("sliding_window") or 0)
    if "use_sliding_window" in raw and not raw["use_sliding_window"]:
        window = 0  # the Qwen families keep a window size in configs that do not use it
    layer_types = raw.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == num_layers:
        return tuple(window if kind == "sliding_attention" else 0 for kind in layer_types)
    if model_type in ("qwen2", "qwen3") and window:
        first = int(raw.get("max_window_layers") or 0)
        return tuple(window if i >= first else 0 for i in range(num_layers))
    # Gemma configs written before ``layer_types`` existed: every ``pattern``-th layer is global.
    pattern = {"gemma2": 2, "gemma3_text": int(raw.get("sliding_window_pattern") or 6)}.get(model_type)
    if pattern:
        return tuple(window if (i + 1) % pattern else 0 for i in range(num_layers))
    return (window,) * num_layers


def _id_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []
